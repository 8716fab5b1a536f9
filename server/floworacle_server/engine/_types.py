"""Inputs and outputs of the engine: a batch of oracle queries and what comes back."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch

from floworacle.paths import PathCoefficients

__all__ = ["Precision", "Guidance", "OracleQuery", "OracleResult", "NearestResult", "OUTPUTS"]

#: Output names the engine knows; diagnostics are "topk", "entropy", "ess", "variance".
OUTPUTS = ("velocity", "x1_hat", "eps_hat", "score", "topk", "entropy", "ess", "variance")


class Precision(str, Enum):
    """EXACT: float64-accurate result. FAST: screening-GEMM logits used directly, with a bound."""

    EXACT = "exact"
    FAST = "fast"


@dataclass(frozen=True)
class Guidance:
    """CFG: ``u_w = u(x) + scale (u(x | y) - u(x))`` for t in [t_lo, t_hi], else ``u(x | y)``."""

    scale: float
    t_lo: float = 0.0
    t_hi: float = 1.0


@dataclass
class OracleQuery:
    """A batch of B oracle queries.

    Attributes:
        x_t: (B, D) queries, any float dtype, on any device (moved to the data's device).
        coeffs: path coefficients, each (B,) float64.
        t: (B,) float64 times, or None (needed only for a guidance interval).
        labels: (B,) int64 class labels for class-conditional / guided queries (-1 = an
            unconditional query), or None.
        guidance: CFG setting (needs labels and t), or None.
        exclude: (B,) int64 data set indices (the caller's original order, as in
            ``topk_indices``), -1 for none: that sample weighs 0 for that query (leave-one-out),
            in the unconditional and the conditional posterior alike; or None.
        outputs: names from :data:`OUTPUTS`.
        top_k: number of top posterior weights for "topk".
        precision: EXACT or FAST.
    """

    x_t: torch.Tensor
    coeffs: PathCoefficients
    t: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    guidance: Guidance | None = None
    exclude: torch.Tensor | None = None
    outputs: tuple[str, ...] = ("velocity",)
    top_k: int = 0
    precision: Precision = Precision.EXACT


@dataclass
class OracleResult:
    """Engine outputs for B queries; tensors are float64 (B, D) / (B,) / (B, k) on the data device.

    ``x1_hat_error_bound`` and ``velocity_error_bound`` are (B,) upper bounds on the max abs
    error of each query's x1_hat / velocity against the exact value over the stored data.
    ``variance`` (B,) is the posterior variance ``sum_i gamma_i ||x_i - x1_hat||^2`` (the trace
    of the posterior covariance) and ``variance_error_bound`` an upper bound on its absolute error.
    ``refined`` counts the (query, sample) pairs recomputed in float64.
    For guided queries, x1_hat / eps_hat / score are the guided combination of the
    unconditional and conditional ones (linear in the same way as the velocity), and the
    diagnostics (top-k, entropy, ESS, variance) are those of the conditional posterior.
    """

    x1_hat: torch.Tensor
    velocity: torch.Tensor | None = None
    eps_hat: torch.Tensor | None = None
    score: torch.Tensor | None = None
    topk_indices: torch.Tensor | None = None
    topk_weights: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    ess: torch.Tensor | None = None
    variance: torch.Tensor | None = None
    variance_error_bound: torch.Tensor | None = None
    x1_hat_error_bound: torch.Tensor | None = None
    velocity_error_bound: torch.Tensor | None = None
    refined: int = 0
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class NearestResult:
    """k nearest samples of B points: (B, k) int64 indices (caller's order), float64 distances,
    and int64 labels (None when the data set has none).

    ``approximate``: the candidates came from a faiss index (still re-ranked by exact float64
    distances, but a true neighbour may be missing). ``similarities``: (B, k) float64 cosine
    similarities when the searched space's metric is cosine, else None.
    """

    indices: torch.Tensor
    distances: torch.Tensor
    labels: torch.Tensor | None = None
    approximate: bool = False
    similarities: torch.Tensor | None = None
