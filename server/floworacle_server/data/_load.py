"""One entry point that turns a user's data argument into a resident :class:`Dataset`."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from floworacle_server.data._attach import attach_features
from floworacle_server.data._dataset import Dataset
from floworacle_server.data._digits import DIGITS_NAME, load_digits
from floworacle_server.data._formats import SUPPORTED_SUFFIXES, load_arrays
from floworacle_server.data._image import resolve_image_shape
from floworacle_server.data._index import is_index_dir, load_index
from floworacle_server.data._nearest_index import DEFAULT_EXACT_NEAREST_MAX_SAMPLES
from floworacle_server.data._shard import ShardSpec, make_shard

__all__ = ["load_dataset"]


def load_dataset(
    spec: str | Path,
    *,
    name: str | None = None,
    labels: Any | None = None,
    weights: Any | None = None,
    device: str | torch.device = "cpu",
    dtype: str = "float32",
    scale_factor: float = 1.0,
    verify: bool = True,
    features: Any | None = None,
    features_metric: str = "l2",
    exact_nearest_max_samples: int = DEFAULT_EXACT_NEAREST_MAX_SAMPLES,
    shard: ShardSpec | None = None,
    image_shape: str | tuple[int, ...] | None = None,
) -> Dataset:
    """Load ``spec``: ``"digits"``, an index directory, or a data file.

    Args:
        spec: ``"digits"`` (the embedded set), a directory built by ``floworacle index build``,
            or a .npy / .npz / .safetensors / .pt file of shape (N, *sample_shape).
        name: data set name; default ``digits``, the manifest's name, or the file's stem.
        labels, weights: arrays or paths (files only; an index carries its own).
        device: where the data lives ("cpu", "cuda", "cuda:1", ...).
        dtype: storage dtype for files and digits ("float32", "float16", "bfloat16"); an
            index keeps the dtype it was built with.
        scale_factor: multiplies file samples before storage; an index was scaled at build time.
        verify: for an index, recompute its fingerprint before trusting it.
        shard: load only that shard of a gang (:mod:`._shard`); an index directory reads just
            its rows from the memory-mapped files, anything else is loaded whole and cut.
        features: (N, F) feature embeddings (an array or a file) for ``digits`` and data files;
            an index carries its own (``floworacle index build --features``).
        features_metric: "l2" or "cosine".
        exact_nearest_max_samples: see :class:`Dataset`.
        image_shape: (C, H, W) or "C,H,W" the patch oracles read each sample as (default: the
            digits' 1 x 8 x 8, an index's manifest, or a 3-D sample shape); must agree with a
            shape the data already declare.

    Raises:
        ValueError: an unknown spec, a missing file, or invalid contents.
    """
    s = str(spec)
    if s == DIGITS_NAME and not Path(s).exists():
        if labels is not None or weights is not None or scale_factor != 1.0:
            raise ValueError("the embedded digits data set takes no labels, weights or scale_factor")
        ds = load_digits(device=device, dtype=dtype)
        if image_shape is not None and resolve_image_shape(image_shape, ds.sample_shape) != ds.image_shape:
            raise ValueError(f"the digits are {ds.image_shape} images; drop the image shape setting for them")
        if name:
            ds.name = name
        return _cut(_nearest_extras(ds, features, features_metric, exact_nearest_max_samples), shard)
    p = Path(s)
    if p.is_dir():
        if not is_index_dir(p):
            raise ValueError(
                f"{p} is a directory without a manifest.json; build an index with `floworacle index build`"
            )
        if labels is not None or weights is not None or scale_factor != 1.0 or features is not None:
            raise ValueError(
                f"{p} is an index: its labels, weights, scale and features are fixed at build time; rebuild to change "
                "them"
            )
        return load_index(
            p, device=device, verify=verify, name=name, exact_nearest_max_samples=exact_nearest_max_samples,
            shard=shard, with_indexes=shard is None, image_shape=image_shape,
        )  # fmt: skip
    if not p.exists():
        raise ValueError(
            f"data {s!r} not found; give 'digits', an index directory, or a file ({', '.join(SUPPORTED_SUFFIXES)})"
        )
    loaded = load_arrays(p, labels=labels, weights=weights)
    with warnings.catch_warnings():
        # .npy files are memory-mapped read-only; the data set copies rows, it never writes them
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        ds = Dataset.from_arrays(
            name or p.stem,
            loaded.x,
            loaded.labels,
            loaded.weights,
            sample_shape=loaded.sample_shape,
            scale_factor=scale_factor,
            dtype=dtype,
            device=device,
            image_shape=image_shape,
        )
    return _cut(_nearest_extras(ds, features, features_metric, exact_nearest_max_samples), shard)


def _cut(ds: Dataset, shard: ShardSpec | None) -> Dataset:
    """``ds`` itself, or its shard (with the whole set's features' rows of the shard)."""
    if shard is None:
        return ds
    part = make_shard(ds, shard)
    part.exact_nearest_max_samples = ds.exact_nearest_max_samples
    if ds.features is not None:  # the whole set's feature rows in caller order, cut like the data
        whole = torch.empty_like(ds.features.x)
        whole[ds.original_index.to(whole.device)] = ds.features.x
        fp = ds.features.fingerprint
        part.fingerprint = ds.features.data_fingerprint
        attach_features(part, whole.cpu().numpy(), ds.features.metric, prepared=True, fingerprint=fp)
    return part


def _nearest_extras(ds: Dataset, features: Any | None, metric: str, exact_max: int) -> Dataset:
    ds.exact_nearest_max_samples = int(exact_max)
    if features is not None:
        feats = load_arrays(features, validate=False).x if isinstance(features, (str, Path)) else features
        attach_features(ds, feats, metric)
    return ds
