"""Result types of the SDK: frozen dataclasses whose array fields are the caller's array type
(numpy in -> numpy out, torch in -> torch out on the caller's device)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Prediction", "Neighbors", "DatasetInfo", "NearestIndexInfo"]


@dataclass(frozen=True)
class Prediction:
    """Oracle outputs for B queries; a field is None unless it was requested.

    Attributes:
        velocity: (B, *sample_shape) ``u = A_t x1_hat + B_t x_t`` (negated in the reversed convention).
        x1_hat: (B, *sample_shape) posterior mean ``sum_i gamma_i x_i``.
        eps_hat: (B, *sample_shape) noise prediction ``(x_t - alpha_t x1_hat) / sigma_t``.
        score: (B, *sample_shape) ``(alpha_t x1_hat - x_t) / sigma_t^2``.
        topk_indices: (B, k) int64 data set indices of the largest posterior weights.
        topk_weights: (B, k) float64 those weights, by decreasing weight.
        entropy: (B,) float64 ``-sum_i gamma_i log gamma_i``.
        ess: (B,) float64 effective sample size ``1 / sum_i gamma_i^2``.
        variance: (B,) float64 posterior variance ``sum_i gamma_i ||x_i - x1_hat||^2``.
        variance_error_bound: (B,) float64 bound on the absolute error of ``variance``.
        dataset: name of the data set that answered.
        fingerprint: its fingerprint (pin it with ``fingerprint=`` to detect a changed data set).
        precision: "exact", "fast" or "knn".
        x1_hat_error_bound: (B,) float64 bound on ``max_j |x1_hat_j - exact_j|`` (before wire rounding).
        velocity_error_bound: (B,) float64 bound on ``max_j |velocity_j - exact_j|``.
        entropy_error_bound, ess_error_bound: (B,) float64 bounds on the absolute error of entropy
            (nats) and ess, with those outputs.
        knn_weight_share: (B,) float64, precision "knn": the estimated share of the posterior
            weight on the neighbours (near 1: the estimate is near-exact).
        knn_tail_bound: (B,) float64, precision "knn": an upper bound on the posterior weight
            outside the neighbours (certified when the index found the true k nearest).
        knn_variance: (B,) float64, precision "knn": the estimate's variance over its random tail,
            ``E ||x1_hat - E x1_hat||^2`` (times A_t^2 for the velocity).
    """

    velocity: Any = None
    x1_hat: Any = None
    eps_hat: Any = None
    score: Any = None
    topk_indices: Any = None
    topk_weights: Any = None
    entropy: Any = None
    ess: Any = None
    variance: Any = None
    variance_error_bound: Any = None
    dataset: str = ""
    fingerprint: str = ""
    precision: str = "exact"
    x1_hat_error_bound: Any = None
    velocity_error_bound: Any = None
    entropy_error_bound: Any = None
    ess_error_bound: Any = None
    knn_weight_share: Any = None
    knn_tail_bound: Any = None
    knn_variance: Any = None


@dataclass(frozen=True)
class Neighbors:
    """k nearest training samples of B points.

    Attributes:
        indices: (B, k) int64 data set indices, nearest first.
        distances: (B, k) float64 Euclidean distances (to ``x / alpha_t`` when t was given).
        labels: (B, k) int64 labels of the neighbours, or None when the data set has no labels.
        similarities: (B, k) float64 cosine similarities when the searched space's metric is cosine.
        approximate: True when an index proposed the candidates (re-ranked exactly, but a true
            neighbour may be missing; the index's build-time recall is in :class:`DatasetInfo`).
        dataset: name of the data set that answered.
        fingerprint: its fingerprint.
    """

    indices: Any
    distances: Any
    labels: Any = None
    similarities: Any = None
    approximate: bool = False
    dataset: str = ""
    fingerprint: str = ""


@dataclass(frozen=True)
class NearestIndexInfo:
    """A faiss index stored with a data set (mirrors ``floworacle.v1.NearestIndexInfo``)."""

    space: str
    kind: str
    params: str
    recall: float
    recall_k: int
    default_nprobe: int
    device: str
    bytes: int


@dataclass(frozen=True)
class DatasetInfo:
    """What the server holds under one name (mirrors ``floworacle.v1.DatasetInfo``)."""

    name: str
    num_samples: int
    sample_shape: tuple[int, ...]
    fingerprint: str
    dim: int
    storage_dtype: str
    num_classes: int
    has_weights: bool
    scale_factor: float
    device: str
    resident_bytes: int
    is_default: bool
    nearest_backend: str = ""
    nearest_backend_reason: str = ""
    exact_nearest_max_samples: int = 0
    nearest_indexes: tuple[NearestIndexInfo, ...] = ()
    feature_dim: int = 0
    feature_metric: str = ""
