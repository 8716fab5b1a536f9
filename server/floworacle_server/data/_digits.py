"""The embedded default data set: scikit-learn's 8x8 handwritten digits, shipped with the package.

The file ``_digits.npz`` holds the 1,797 raw images (uint8 pixel counts 0..16, 64 per image) and
their labels 0-9, taken once from scikit-learn, so the server needs no scikit-learn to load it.
"""

from __future__ import annotations

from importlib import resources

import numpy as np
import torch

from floworacle_server.data._dataset import Dataset

__all__ = ["DIGITS_NAME", "DIGITS_IMAGE_SHAPE", "load_digits", "digits_arrays"]

DIGITS_NAME = "digits"
#: The digits are 8 x 8 grey images, stored flat.
DIGITS_IMAGE_SHAPE = (1, 8, 8)


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The digits as float32 (1797, 64) samples in [-1, 1] (``x / 8 - 1``) and int64 (1797,) labels 0-9."""
    with resources.files("floworacle_server.data").joinpath("_digits.npz").open("rb") as fh, np.load(fh) as npz:
        raw = npz["x"]
        labels = npz["labels"]
    # pixel counts 0..16 map exactly onto multiples of 1/8 in [-1, 1]
    x = raw.astype(np.float32) / np.float32(8.0) - np.float32(1.0)
    return x, labels.astype(np.int64)


def load_digits(device: str | torch.device = "cpu", dtype: str = "float32") -> Dataset:
    """The ``digits`` data set: N = 1,797, D = 64 (sample shape (64,), image shape (1, 8, 8) for the
    patch oracles), labels 0-9, values in [-1, 1]."""
    x, labels = digits_arrays()
    return Dataset.from_arrays(
        DIGITS_NAME, x, labels, sample_shape=(64,), dtype=dtype, device=device, image_shape=DIGITS_IMAGE_SHAPE
    )
