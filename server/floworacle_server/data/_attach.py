"""Giving a resident data set its feature space, and the fingerprint of each space's vectors."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from floworacle_server.data._dataset import Dataset
from floworacle_server.data._features import (
    FeatureSpace,
    check_metric,
    combined_fingerprint,
    fingerprint_features,
    prepare_features,
)

__all__ = ["attach_features", "space_fingerprint"]

_ROWS = 65536  # rows per block when computing norms


def attach_features(
    dataset: Dataset,
    features: Any,
    metric: str = "l2",
    *,
    prepared: bool = False,
    fingerprint: str | None = None,
) -> FeatureSpace:
    """Give ``dataset`` a feature space: (N, F) rows in the caller's sample order.

    Args:
        dataset: the resident data set (its fingerprint becomes the combined one).
        features: (N, F) real values, numpy or torch, row i for the caller's sample i.
        metric: "l2" or "cosine" (rows are normalised, see the module docstring).
        prepared: ``features`` are already the stored float32 rows (an index directory's).
        fingerprint: their known fingerprint (computed when None).

    Raises:
        ValueError: see :func:`prepare_features`; or the data set already has features.
    """
    if dataset.features is not None:
        raise ValueError(f"data set {dataset.name!r} already has features")
    check_metric(metric)
    n = dataset.total_samples  # a shard gets the whole set's features and keeps its rows
    stored = np.asarray(features) if prepared else prepare_features(features, n, metric)
    if prepared and (stored.dtype != np.float32 or stored.shape[0] != n or stored.ndim != 2):
        raise ValueError(f"stored features must be float32 ({n}, F), got {stored.dtype} {stored.shape}")
    fp = fingerprint or fingerprint_features(stored, metric)
    order = dataset.original_index.cpu()
    with warnings.catch_warnings():
        # a memory-mapped features file is read-only; indexing by the row order copies it
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        x = torch.from_numpy(np.ascontiguousarray(stored[order.numpy()])).to(dataset.device)  # only these rows
    sq = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    for s in range(0, x.shape[0], _ROWS):
        sq[s : s + _ROWS] = x[s : s + _ROWS].to(torch.float64).pow(2).sum(dim=1)
    space = FeatureSpace(x=x, sq_norms=sq, metric=metric, fingerprint=fp, data_fingerprint=dataset.fingerprint)
    dataset.features = space
    dataset.fingerprint = combined_fingerprint(space.data_fingerprint, fp)
    return space


def space_fingerprint(dataset: Dataset, space: str) -> str:
    """Fingerprint of the vectors of ``space`` ("data" or "features"): what an index built on them records."""
    if space == "features":
        if dataset.features is None:
            raise ValueError(f"data set {dataset.name!r} has no features")
        return dataset.features.fingerprint
    return dataset.features.data_fingerprint if dataset.features is not None else dataset.fingerprint
