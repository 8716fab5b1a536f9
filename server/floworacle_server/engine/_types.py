"""What the engine answers: the oracle's outputs and the nearest samples of a batch.

Its inputs are the protocol's queries (:class:`floworacle.protocol.OracleQuery`,
:class:`~floworacle.protocol.NearestQuery`), taken as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from floworacle.protocol import WireArray

__all__ = ["OracleResult", "NearestResult", "as_tensor", "as_host"]


def as_tensor(a: Any, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A query field as a torch tensor on ``device``: the engine's one conversion at its entry. A
    :class:`WireArray` or numpy array is viewed (no copy) before it moves; torch tensors as they are.

    Queries in a 2-byte float wire dtype become float32 for a CPU (exactly: bfloat16 by a bit shift,
    in numpy): the engine's passes convert the queries several times (to the screening dtype, to
    float64), and torch's elementwise ops from those dtypes were measured 10-100x slower than
    numpy's one widening on a loaded 2-core CPU. A GPU gets the 2-byte tensor (half the bytes to
    move, conversions are cheap there)."""
    if isinstance(a, WireArray):
        if a.dtype.is_float and a.dtype.itemsize == 2 and torch.device(device).type == "cpu":
            return torch.from_numpy(a.numpy().astype(np.float32, copy=False))
        t = a.torch()
    elif isinstance(a, np.ndarray):
        t = torch.from_numpy(a)
    else:
        t = torch.as_tensor(a)
    return t.to(device=device, dtype=dtype) if dtype is not None else t.to(device)


def as_host(a: Any) -> np.ndarray:
    """A (small) query field as a numpy array on the host (one device read for a GPU tensor)."""
    if isinstance(a, WireArray):
        return a.numpy()
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


@dataclass
class OracleResult:
    """Engine outputs for B queries; tensors are float64 (B, D) / (B,) / (B, k) on the data device.

    ``x1_hat_error_bound`` and ``velocity_error_bound`` are (B,) upper bounds on the max abs
    error of each query's x1_hat / velocity against the exact value over the stored data.
    ``variance`` (B,) is the posterior variance ``sum_i gamma_i ||x_i - x1_hat||^2`` (the trace
    of the posterior covariance) and ``variance_error_bound`` an upper bound on its absolute error.
    ``entropy_error_bound`` / ``ess_error_bound`` (B,) bound the absolute error of the entropy
    (nats) and of the ESS (:mod:`._diagnostics`; with those outputs only).
    ``knn_weight_share`` / ``knn_tail_bound`` / ``knn_variance`` (B,) are the indicators of a kNN
    answer (precision "knn", :mod:`._knn_target`), which carries no error bounds.
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
    entropy_error_bound: torch.Tensor | None = None
    ess_error_bound: torch.Tensor | None = None
    knn_weight_share: torch.Tensor | None = None
    knn_tail_bound: torch.Tensor | None = None
    knn_variance: torch.Tensor | None = None
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
