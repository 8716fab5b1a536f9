"""Image shapes of data sets: the (C, H, W) the patch oracles read each flat sample as.

A data set keeps the ``sample_shape`` its clients send and receive; its *image shape* is a
separate declaration, so that the embedded digits (stored flat, (64,)) can be read as 1 x 8 x 8
images without changing what today's clients get. Declared by whoever makes the data set: the
digits declare (1, 8, 8), ``floworacle index build --image-shape C,H,W`` writes one into the
manifest, a served file gets one from the ``image_shape`` setting, and a data set whose samples
are already 3-D (C, H, W) has that shape unless told otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["ImageShape", "parse_image_shape", "resolve_image_shape"]

ImageShape = tuple[int, int, int]


def parse_image_shape(text: str | Sequence[int]) -> ImageShape:
    """``"C,H,W"`` (or three integers) as a (C, H, W) tuple; ValueError says how to write it."""
    if isinstance(text, str):
        parts = [p.strip() for p in text.replace("x", ",").split(",") if p.strip()]
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"image shape {text!r}: write C,H,W with three positive integers, e.g. 1,8,8") from None
    else:
        values = [int(v) for v in text]
    if len(values) != 3 or min(values) < 1:
        raise ValueError(f"image shape {text!r}: write C,H,W with three positive integers, e.g. 1,8,8 or 3,32,32")
    return (values[0], values[1], values[2])


def resolve_image_shape(
    declared: str | Sequence[int] | None, sample_shape: Sequence[int], *, source: str = "data set"
) -> ImageShape | None:
    """The image shape of a data set whose samples have ``sample_shape``.

    ``declared`` (a "C,H,W" string or three integers) wins; else a 3-D sample shape is its own
    image shape; else None (the patch oracles then ask for one).

    Raises:
        ValueError: a declared shape whose product is not the sample size, with the fix.
    """
    dim = math.prod(int(s) for s in sample_shape)
    if declared is None:
        return tuple(int(s) for s in sample_shape) if len(sample_shape) == 3 else None  # type: ignore[return-value]
    shape = parse_image_shape(declared)
    if math.prod(shape) != dim:
        raise ValueError(
            f"{source}: image shape {shape} has {math.prod(shape)} values but a sample has D = {dim} "
            f"(sample shape {tuple(sample_shape)}); give C,H,W with C * H * W = {dim}"
        )
    return shape
