"""The feature space of a data set: a second (N, F) matrix the user computed (SSCD, DINO or CLIP
embeddings of the same samples) that nearest queries can search instead of the data.

Features are stored as float32 in the data set's row order. With the ``cosine`` metric every
row is divided by its float64 norm before it is rounded to float32, so the stored rows are unit
vectors up to one float32 rounding per value; the search ranks by the cosine similarity of those
stored rows. The features have their own fingerprint (format tag, metric, shape, bytes in the
caller's order); a data set that carries features reports the combined fingerprint
``sha256(tag | data fingerprint | features fingerprint)``, so a client's pin covers both.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = [
    "FEATURE_METRICS",
    "FeatureSpace",
    "check_metric",
    "combined_fingerprint",
    "fingerprint_features",
    "prepare_features",
]

#: Metrics of a feature space.
FEATURE_METRICS = ("l2", "cosine")

_ROWS = 65536  # rows per block when validating, normalising and hashing


@dataclass
class FeatureSpace:
    """Feature embeddings of a resident data set.

    Attributes:
        x: (N, F) float32 features in the data set's row order (rows sorted by label), unit
            rows for ``cosine``.
        sq_norms: (N,) float64 ``||f_i||^2`` of the stored rows.
        metric: "l2" or "cosine".
        fingerprint: ``sha256:...`` of the stored features (:func:`fingerprint_features`).
        data_fingerprint: the data set's own fingerprint (samples, labels, weights) before the
            features were attached.
    """

    x: torch.Tensor
    sq_norms: torch.Tensor
    metric: str
    fingerprint: str
    data_fingerprint: str

    @property
    def dim(self) -> int:
        return int(self.x.shape[1])

    @property
    def resident_bytes(self) -> int:
        return int(self.x.numel() * self.x.element_size() + self.sq_norms.numel() * 8)


def check_metric(metric: str) -> None:
    if metric not in FEATURE_METRICS:
        raise ValueError(f"feature metric must be one of {FEATURE_METRICS}, got {metric!r}")


def prepare_features(
    features: Any, num_samples: int, metric: str, *, source: str = "features", out: np.ndarray | None = None
) -> np.ndarray:
    """Validate an (N, F) feature matrix and return the float32 rows to store (caller's order).

    Works in blocks, so a memory-mapped input and ``out`` (e.g. an ``open_memmap`` of shape
    (N, F), float32) never need the whole matrix in memory.

    Raises:
        ValueError: not 2-D, a row count other than N, non-real or non-finite values, or (for
            cosine) a zero row, which has no direction.
    """
    check_metric(metric)
    f = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    if f.ndim != 2 or f.shape[1] == 0:
        raise ValueError(f"{source} must have shape (N, F) with F >= 1, got {tuple(f.shape)}")
    if f.shape[0] != num_samples:
        raise ValueError(
            f"{source} has {f.shape[0]} rows but the data set has {num_samples} samples; give one feature row per "
            "sample, in the data's order"
        )
    if not (np.issubdtype(f.dtype, np.floating) or np.issubdtype(f.dtype, np.integer)):
        raise ValueError(f"{source} must hold real numbers, got dtype {f.dtype}")
    if out is None:
        out = np.empty(f.shape, dtype=np.float32)
    elif out.shape != f.shape or out.dtype != np.float32:
        raise ValueError(f"out must be float32 {f.shape}, got {out.dtype} {out.shape}")
    for start in range(0, f.shape[0], _ROWS):
        block = np.asarray(f[start : start + _ROWS], dtype=np.float64)
        finite = np.isfinite(block).all(axis=1)
        if not finite.all():
            raise ValueError(f"{source} row {start + int(np.argmin(finite))} has a NaN or Inf; clean the features")
        if metric == "cosine":
            norms = np.sqrt((block**2).sum(axis=1))
            if not (norms > 0).all():
                raise ValueError(
                    f"{source} row {start + int(np.argmin(norms > 0))} is zero, which has no cosine similarity; "
                    "drop the sample or use --features-metric l2"
                )
            block = block / norms[:, None]
        with np.errstate(over="ignore"):
            stored = block.astype(np.float32)
        if not np.isfinite(stored).all():
            bad = start + int(np.argmin(np.isfinite(stored).all(axis=1)))
            raise ValueError(f"{source} row {bad} overflows float32; rescale the features")
        out[start : start + _ROWS] = stored
    return out


def fingerprint_features(stored: Any, metric: str) -> str:
    """``sha256:<hex>`` over a tag, the metric, the shape and the stored float32 rows (caller's order)."""
    check_metric(metric)
    h = hashlib.sha256()
    shape = tuple(int(s) for s in stored.shape)
    h.update(f"floworacle-features-v1|float32|{metric}|{shape}|".encode())
    for start in range(0, shape[0], _ROWS):
        block = stored[start : start + _ROWS]
        block = block.detach().cpu().numpy() if isinstance(block, torch.Tensor) else np.asarray(block)
        h.update(np.ascontiguousarray(block, dtype="<f4").tobytes())
    return "sha256:" + h.hexdigest()


def combined_fingerprint(data_fingerprint: str, features_fingerprint: str) -> str:
    """The fingerprint of a data set that carries features: one digest over both."""
    h = hashlib.sha256(f"floworacle-v1+features|{data_fingerprint}|{features_fingerprint}".encode())
    return "sha256:" + h.hexdigest()
