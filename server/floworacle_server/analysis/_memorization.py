"""Memorisation report: which generated samples are near-copies of a training sample.

For each generated sample x the two nearest training samples (exact L2) give distances
d1 <= d2 and the ratio d1 / d2; a sample counts as a copy when the ratio is below a threshold
(1/3 by convention): it sits much closer to one training sample than to any other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from floworacle_server.data import Dataset

__all__ = ["DEFAULT_THRESHOLD", "MemorizationReport", "load_samples", "memorization_report", "image_shape_for"]

#: Ratio d1 / d2 below which a sample counts as a copy.
DEFAULT_THRESHOLD = 1.0 / 3.0


@dataclass
class MemorizationReport:
    """Nearest training samples of B generated samples.

    Attributes:
        threshold: the copy threshold on d1 / d2.
        nearest: (B, 2) int64 training indices (the data set's original order), nearest first.
        d1, d2: (B,) float64 distances to the nearest and second-nearest training sample.
        ratio: (B,) d1 / d2 (0 when d1 = d2 = 0, a copy of a duplicated training sample).
        copy: (B,) bool, ratio < threshold.
    """

    threshold: float
    nearest: np.ndarray
    d1: np.ndarray
    d2: np.ndarray
    ratio: np.ndarray
    copy: np.ndarray

    @property
    def copy_fraction(self) -> float:
        """Share of samples flagged as copies (0 for no samples)."""
        return float(self.copy.mean()) if self.copy.size else 0.0

    def to_json(self, **extra: Any) -> dict[str, Any]:
        """``copy_fraction``, ``threshold``, counts and a ``samples`` list (index, nearest, second, d1, d2, ratio, copy)."""
        samples = [
            {
                "index": i,
                "nearest": int(self.nearest[i, 0]),
                "second": int(self.nearest[i, 1]),
                "d1": float(self.d1[i]),
                "d2": float(self.d2[i]),
                "ratio": float(self.ratio[i]),
                "copy": bool(self.copy[i]),
            }
            for i in range(self.d1.shape[0])
        ]
        return {
            **extra,
            "threshold": self.threshold,
            "num_samples": int(self.d1.shape[0]),
            "num_copies": int(self.copy.sum()),
            "copy_fraction": self.copy_fraction,
            "samples": samples,
        }


def load_samples(path: str | Path) -> np.ndarray:
    """Generated samples from .npy / .npz / .safetensors / .pt (as the data loaders read them), float64 (B, ...)."""
    from floworacle_server.data import load_arrays

    loaded = load_arrays(path)
    x = loaded.x
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().to(torch.float64).numpy()
    return np.array(x, dtype=np.float64)  # a copy: .npy files come memory-mapped read-only


def memorization_report(dataset: Dataset, samples: Any, threshold: float = DEFAULT_THRESHOLD) -> MemorizationReport:
    """Nearest and second-nearest training samples of each generated sample and the copy flags.

    Args:
        dataset: the training data (N >= 2).
        samples: (B, D) or (B, *sample_shape) generated samples, numpy or torch.
        threshold: a sample is a copy when d1 / d2 < threshold (0 < threshold <= 1).

    Raises:
        ValueError: bad threshold, N < 2, or samples of the wrong size.
    """
    from floworacle_server.engine._nearest import nearest

    if not (0.0 < threshold <= 1.0) or not math.isfinite(threshold):
        raise ValueError(f"--threshold must lie in (0, 1], got {threshold}")
    if dataset.num_samples < 2:
        raise ValueError("the memorisation ratio needs at least two training samples")
    x = torch.as_tensor(samples)
    if not x.is_floating_point():
        x = x.to(torch.float64)
    b = int(x.shape[0]) if x.ndim else 0
    if x.ndim < 2 or math.prod(x.shape[1:]) != dataset.dim:
        raise ValueError(
            f"samples must have shape (B, {dataset.dim}) or (B, *{dataset.sample_shape}) to match data set "
            f"{dataset.name!r}, got {tuple(x.shape)}"
        )
    res = nearest(dataset, x.reshape(b, dataset.dim), 2)
    d = res.distances.cpu().numpy()
    d1, d2 = d[:, 0], d[:, 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(d2 > 0, d1 / np.where(d2 > 0, d2, 1.0), 0.0)
    return MemorizationReport(
        threshold=float(threshold),
        nearest=res.indices.cpu().numpy().astype(np.int64),
        d1=d1,
        d2=d2,
        ratio=ratio,
        copy=ratio < threshold,
    )


def image_shape_for(dataset: Dataset, override: tuple[int, ...] | None = None) -> tuple[int, ...] | None:
    """The (H, W) or (C, H, W) shape to draw samples as images, or None for non-image data.

    Taken from ``override`` (``--image-shape``), else the sample shape when it is (H, W) or
    (C, H, W) with C in (1, 3), else (s, s) when D = s^2 is a square (digits: 8 x 8).
    """
    d = dataset.dim
    if override is not None:
        if (
            math.prod(override) != d
            or len(override) not in (2, 3)
            or (len(override) == 3 and override[0] not in (1, 3))
        ):
            raise ValueError(f"--image-shape {override} must be (H, W) or (C, H, W) with C in 1, 3 and product D = {d}")
        return tuple(override)
    shp = dataset.sample_shape
    if len(shp) == 2 or (len(shp) == 3 and shp[0] in (1, 3)):
        return tuple(shp)
    side = math.isqrt(d)
    if side * side == d and side > 1:
        return (side, side)
    return None


def training_rows(dataset: Dataset, indices: np.ndarray) -> np.ndarray:
    """(len, D) float64 training samples for original indices (the data set stores rows sorted by label)."""
    inv = torch.empty_like(dataset.original_index)
    inv[dataset.original_index] = torch.arange(dataset.num_samples, device=inv.device)
    rows = inv[torch.as_tensor(indices, dtype=torch.int64, device=inv.device)]
    return dataset.x[rows].to(torch.float64).cpu().numpy()
