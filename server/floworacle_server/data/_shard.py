"""Shards of a data set for a gang of processes: which rows each rank holds, and the shard itself.

Rows are stored sorted by label (:mod:`._dataset`); a rank holds, of every class, its share of
that class's rows (the r-th of W nearly equal consecutive pieces), so every class has rows on
every shard that can have them and conditional and guided queries need every rank. Unlabelled
data is one class. The shards of a data set partition its rows: together they hold each sample
exactly once, and the softmax partials of disjoint rows merge exactly, so the gang's answer is
the single process's.

A shard knows the whole data set's stats (:class:`~._facts.DataStats`: size, per-class counts,
largest values and norms; weights are normalised over the whole set): error bounds, limits and
refusals are those of the whole, and original indices are the whole set's.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from floworacle_server.data._dataset import Dataset
from floworacle_server.data._facts import ShardSpec

__all__ = ["shard_rows", "shard_arrays", "make_shard"]


def shard_rows(labels: np.ndarray | None, num_samples: int, spec: ShardSpec) -> np.ndarray:
    """The original indices of the rows shard ``spec`` holds, in stored order (by label, stable).

    Of each class with n rows the shard takes rows ``floor(r n / W) .. floor((r + 1) n / W)`` of
    that class's stored rows: consecutive, within one row of equal, and every row in exactly one
    shard.
    """
    if labels is None:
        order = np.arange(num_samples, dtype=np.int64)
        bounds = [(0, num_samples)]
    else:
        lab = np.asarray(labels, dtype=np.int64)
        if lab.shape != (num_samples,):
            raise ValueError(f"labels must have shape ({num_samples},), got {lab.shape}")
        order = np.argsort(lab, kind="stable").astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum(np.bincount(lab))])
        bounds = list(zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True))
    r, w = spec.rank, spec.world
    pieces = [order[a + ((b - a) * r) // w : a + ((b - a) * (r + 1)) // w] for a, b in bounds]
    return np.concatenate(pieces) if pieces else np.empty(0, dtype=np.int64)


def shard_arrays(
    name: str,
    x_rows: Any,
    rows: np.ndarray,
    labels: np.ndarray | None,
    weights: np.ndarray | None,
    spec: ShardSpec,
    *,
    num_samples: int,
    num_classes: int,
    sample_shape: tuple[int, ...],
    dtype: str,
    device: str | torch.device,
    fingerprint: str,
    scale_factor: float = 1.0,
    image_shape: tuple[int, int, int] | None = None,
) -> Dataset:
    """The shard of ``spec`` from its rows: ``x_rows`` its samples in :func:`shard_rows` order
    (already scaled), ``rows`` their original indices, and the whole set's ``labels`` and
    ``weights`` (N,) (or None) and fingerprint. Its stats hold the whole set's counts and this
    shard's extremes until the gang merges them (:meth:`Dataset.set_stats`)."""
    if len(rows) == 0:
        raise ValueError(f"data set {name!r}: shard {spec.rank} of {spec.world} would hold no rows; use fewer ranks")
    lab_rows = labels[rows] if labels is not None else None
    w_rows = np.asarray(weights, dtype=np.float64)[rows] if weights is not None else None
    # from_arrays refuses weights that are all zero; a shard may hold only zero-weight rows, so it
    # is built unweighted and given the whole set's log weights afterwards
    ds = Dataset.from_arrays(
        name, x_rows, lab_rows, None, sample_shape=sample_shape, dtype=dtype, device=device, fingerprint=fingerprint,
        image_shape=image_shape,
    )  # fmt: skip
    ds.scale_factor = float(scale_factor)
    dev = ds.device
    ds.original_index = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64)).to(dev)
    counts: tuple[int, ...] = ()
    if labels is not None:  # every class of the whole set, even those this shard holds none of
        assert lab_rows is not None
        here = np.bincount(lab_rows, minlength=num_classes)
        ds.class_offsets = torch.from_numpy(np.concatenate([[0], np.cumsum(here)]).astype(np.int64))
        counts = tuple(np.bincount(labels, minlength=num_classes).tolist())
    if w_rows is not None:  # normalised over the whole set, so the shards' logits share one constant
        with np.errstate(divide="ignore"):
            logw = np.log(w_rows) - np.log(np.sum(np.asarray(weights), dtype=np.float64))
        ds.log_weights = torch.from_numpy(logw).to(dev)
    ds.become_shard(spec, num_samples, counts)
    return ds


def make_shard(full: Dataset, spec: ShardSpec) -> Dataset:
    """The shard ``spec`` of a resident data set (every process loads the whole set and keeps its
    rows; for files other than index directories, and for tests). Its stats are the whole set's."""
    n = full.num_samples
    if n < spec.world:
        raise ValueError(f"data set {full.name!r} has {n} samples, fewer than the gang's {spec.world} ranks")
    original = full.original_index.cpu().numpy()
    labels = weights = None
    if full.labels is not None:
        labels = np.empty(n, dtype=np.int64)
        labels[original] = full.labels.cpu().numpy()
    if full.log_weights is not None:
        weights = np.empty(n, dtype=np.float64)
        weights[original] = np.exp(full.log_weights.cpu().numpy())
    rows = shard_rows(labels, n, spec)
    inverse = np.empty(n, dtype=np.int64)
    inverse[original] = np.arange(n)
    positions = torch.from_numpy(inverse[rows]).to(full.device)
    x_rows = full.x.index_select(0, positions).cpu().reshape(len(rows), *full.sample_shape)
    ds = shard_arrays(
        full.name, x_rows, rows, labels, weights, spec, num_samples=n, num_classes=full.num_classes,
        sample_shape=full.sample_shape, dtype=full.storage_dtype, device=full.device, fingerprint=full.fingerprint,
        scale_factor=full.scale_factor, image_shape=full.image_shape,
    )  # fmt: skip
    ds.set_stats(full.stats)
    return ds
