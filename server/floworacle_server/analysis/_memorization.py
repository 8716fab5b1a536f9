"""Memorisation report: which generated samples are near-copies of a training sample.

For each generated sample x the two nearest training samples (exact L2) give distances
d1 <= d2 and the ratio d1 / d2; a sample counts as a copy when the ratio is below a threshold
(1/3 by convention): it sits much closer to one training sample than to any other.

In a feature space (the embeddings of a copy detector such as SSCD, or DINO / CLIP, given at
``floworacle index build --features``) the test of Somepalli et al. is the top-1 cosine
similarity of each generated sample's features to the training set's: its mean, percentiles and
the share above a threshold (0.5), beside the same for a train-to-train baseline, where each of M
training samples is searched against the rest of the training set (leave-one-out). With an L2
feature space the d1/d2 ratio test is applied to the features instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from floworacle_server.data import Dataset

__all__ = [
    "DEFAULT_SIMILARITY_THRESHOLD",
    "DEFAULT_THRESHOLD",
    "FeatureMemorizationReport",
    "MemorizationReport",
    "feature_memorization_report",
    "load_samples",
    "memorization_report",
    "image_shape_for",
]

#: Ratio d1 / d2 below which a sample counts as a copy.
DEFAULT_THRESHOLD = 1.0 / 3.0
#: Top-1 cosine similarity above which a sample counts as a copy (Somepalli et al.: 0.5 with SSCD).
DEFAULT_SIMILARITY_THRESHOLD = 0.5
#: Percentiles reported of the top-1 score (numpy's linear interpolation).
PERCENTILES = (50, 75, 90, 95)
#: Training samples searched for the train-to-train baseline (all when N is smaller).
DEFAULT_BASELINE_SAMPLES = 10_000


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
    from floworacle_server.engine import nearest

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


def _summary(score: np.ndarray, flagged: np.ndarray) -> dict[str, Any]:
    if score.size == 0:
        return {"count": 0, "mean": None, **{f"p{q}": None for q in PERCENTILES}, "share": 0.0}
    pct = np.percentile(score, PERCENTILES)
    return {
        "count": int(score.size),
        "mean": float(score.mean()),
        **{f"p{q}": float(v) for q, v in zip(PERCENTILES, pct, strict=True)},
        "share": float(flagged.mean()),
    }


@dataclass
class FeatureMemorizationReport:
    """Top-1 neighbours of generated samples in the feature space, beside a train-to-train baseline.

    Attributes:
        metric: the feature space's metric, "cosine" or "l2".
        threshold: cosine: a sample is flagged when its top-1 similarity is above it; l2: when
            its feature-space d1 / d2 is below it.
        nearest: (B, 2) int64 training indices of the two nearest features.
        score: (B,) the top-1 similarity (cosine) or distance (l2).
        ratio: (B,) d1 / d2 of the feature-space distances (0 when both are 0).
        flagged: (B,) bool.
        baseline_index: (M,) training samples used for the baseline (original indices).
        baseline_nearest: (M,) their nearest other training sample.
        baseline_score, baseline_ratio, baseline_flagged: the same for the baseline.
        approximate: an index (not the exact search) found the neighbours.
    """

    metric: str
    threshold: float
    nearest: np.ndarray
    score: np.ndarray
    ratio: np.ndarray
    flagged: np.ndarray
    baseline_index: np.ndarray
    baseline_nearest: np.ndarray
    baseline_score: np.ndarray
    baseline_ratio: np.ndarray
    baseline_flagged: np.ndarray
    approximate: bool

    @property
    def score_name(self) -> str:
        return "top1_similarity" if self.metric == "cosine" else "top1_distance"

    @property
    def rule(self) -> str:
        if self.metric == "cosine":
            return f"top-1 cosine similarity > {self.threshold:g}"
        return f"feature-space d1/d2 < {self.threshold:g}"

    def to_json(self) -> dict[str, Any]:
        """Summaries (mean, p50..p95, share flagged) of generated samples and baseline, and per-sample rows."""
        return {
            "metric": self.metric,
            "score": self.score_name,
            "rule": self.rule,
            "threshold": self.threshold,
            "approximate": self.approximate,
            "generated": _summary(self.score, self.flagged),
            "train_baseline": _summary(self.baseline_score, self.baseline_flagged),
            "baseline_definition": "each of the baseline training samples searched against the rest of the training "
            "set (itself excluded)",
            "samples": [
                {
                    "index": i,
                    "nearest": int(self.nearest[i, 0]),
                    "second": int(self.nearest[i, 1]),
                    "score": float(self.score[i]),
                    "ratio": float(self.ratio[i]),
                    "flagged": bool(self.flagged[i]),
                }
                for i in range(self.score.shape[0])
            ],
        }


def _ratio(d: np.ndarray) -> np.ndarray:
    d1, d2 = d[:, 0], d[:, 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(d2 > 0, d1 / np.where(d2 > 0, d2, 1.0), 0.0)


def feature_memorization_report(
    dataset: Dataset,
    generated_features: Any,
    *,
    threshold: float | None = None,
    baseline_samples: int = DEFAULT_BASELINE_SAMPLES,
    seed: int = 0,
    exact: bool | None = None,
    nprobe: int | None = None,
) -> FeatureMemorizationReport:
    """The feature-space memorisation test of B generated samples against ``dataset``'s features.

    Args:
        dataset: the training data, with a feature space (N >= 2).
        generated_features: (B, F) features of the generated samples, computed like the
            training features (same model, same preprocessing).
        threshold: default 0.5 (cosine similarity) or 1/3 (d1/d2, l2 features).
        baseline_samples: training samples in the train-to-train baseline (all if N is smaller).
        seed: which training samples form the baseline.
        exact, nprobe: as in :func:`floworacle_server.engine.nearest`.

    Raises:
        ValueError: no feature space, N < 2, features of the wrong width, a bad threshold.
    """
    from floworacle_server.engine import nearest

    if dataset.features is None:
        raise ValueError(
            f"data set {dataset.name!r} has no feature space; build its index with --features TRAIN_FEATURES.npy "
            "(or pass --train-features)"
        )
    n = dataset.num_samples
    if n < 2:
        raise ValueError("the feature-space test needs at least two training samples")
    metric = dataset.features.metric
    thr = (
        threshold
        if threshold is not None
        else (DEFAULT_SIMILARITY_THRESHOLD if metric == "cosine" else DEFAULT_THRESHOLD)
    )
    if (
        not math.isfinite(thr)
        or (metric == "cosine" and not -1.0 <= thr <= 1.0)
        or (metric == "l2" and not 0 < thr <= 1)
    ):
        raise ValueError(
            f"the feature threshold must lie in [-1, 1] for cosine similarity or (0, 1] for d1/d2, got {thr}"
        )
    if baseline_samples < 1:
        raise ValueError(f"--baseline-samples must be >= 1, got {baseline_samples}")
    g = torch.as_tensor(
        np.asarray(generated_features) if not isinstance(generated_features, torch.Tensor) else generated_features
    )
    if not g.is_floating_point():
        g = g.to(torch.float64)
    if g.ndim != 2 or g.shape[1] != dataset.feature_dim:
        raise ValueError(
            f"generated features must have shape (B, {dataset.feature_dim}) to match the training features, "
            f"got {tuple(g.shape)}"
        )
    res = nearest(dataset, g, 2, space="features", exact=exact, nprobe=nprobe)
    rng = np.random.default_rng(seed)
    m = min(baseline_samples, n)
    base_idx = np.sort(rng.choice(n, size=m, replace=False)).astype(np.int64)
    idx_t = torch.from_numpy(base_idx).to(dataset.device)
    base_q = dataset.features.x[dataset.rows_of(idx_t)].to(torch.float64)
    base = nearest(dataset, base_q, 2, space="features", exact=exact, nprobe=nprobe, exclude=idx_t)

    def score(r: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        d = r.distances.cpu().numpy()
        ratio = _ratio(d)
        if metric == "cosine":
            sc = r.similarities[:, 0].cpu().numpy()
            return sc, ratio, sc > thr
        return d[:, 0], ratio, ratio < thr

    sc, ratio, flagged = score(res)
    bsc, bratio, bflagged = score(base)
    return FeatureMemorizationReport(
        metric=metric,
        threshold=float(thr),
        nearest=res.indices.cpu().numpy().astype(np.int64),
        score=sc,
        ratio=ratio,
        flagged=flagged,
        baseline_index=base_idx,
        baseline_nearest=base.indices[:, 0].cpu().numpy().astype(np.int64),
        baseline_score=bsc,
        baseline_ratio=bratio,
        baseline_flagged=bflagged,
        approximate=bool(res.approximate or base.approximate),
    )
