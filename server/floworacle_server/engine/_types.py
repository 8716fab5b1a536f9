"""What the engine answers: the oracle's outputs and the nearest samples of a batch, and the
outputs that follow from a posterior mean (:func:`outputs_from_x1`, shared by every estimate of it).

Its inputs are the protocol's queries (:class:`floworacle.protocol.OracleQuery`,
:class:`~floworacle.protocol.NearestQuery`), taken as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from floworacle.paths import PathCoefficients
from floworacle.protocol import SAMPLE_OUTPUT_NAMES, WireArray
from floworacle_server.engine._bounds import U64

__all__ = [
    "OracleResult",
    "NearestResult",
    "as_tensor",
    "as_host",
    "as_host_pair",
    "per_query",
    "check_sample_outputs",
    "outputs_from_x1",
]


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


def as_host_pair(a: Any, b: Any) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Two small query fields (or None) on the host; two (B,) tensors in one device read (labels
    and t of a guided batch: an int64 label is exact through float64)."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape:
        both = torch.stack([a.detach().to(torch.float64), b.detach().to(a.device, torch.float64)]).cpu().numpy()
        return both[0].astype(np.dtype(str(a.dtype).removeprefix("torch."))), both[1]
    return (None if a is None else as_host(a)), (None if b is None else as_host(b))


def as_host(a: Any) -> np.ndarray:
    """A (small) query field as a numpy array on the host (one device read for a GPU tensor)."""
    if isinstance(a, WireArray):
        return a.numpy()
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def per_query(v: Any, b: int, what: str) -> np.ndarray:
    """A scalar or (B,) per-query value (numpy, torch, Python) as a finite (B,) float64 array."""
    a = np.asarray(v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v, dtype=np.float64)
    if a.ndim == 0:
        a = np.full(b, float(a))
    if a.shape != (b,):
        raise ValueError(f"{what} must be a scalar or have shape ({b},), got {tuple(a.shape)}")
    if not np.isfinite(a).all():
        raise ValueError(f"{what} must be finite")
    return a


def check_sample_outputs(outputs: Sequence[str], who: str) -> None:
    """``who`` answers from a posterior mean: it gives the per-sample outputs only (the protocol's
    ``SAMPLE_OUTPUT_NAMES``); ValueError for the diagnostics."""
    unknown = sorted(set(outputs) - set(SAMPLE_OUTPUT_NAMES))
    if unknown:
        raise ValueError(
            f"{who} gives {', '.join(SAMPLE_OUTPUT_NAMES)}; {unknown} are diagnostics of the global posterior over "
            "samples (they need the whole posterior): ask the exact oracle (kind 'global') for them"
        )


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


def outputs_from_x1(
    x: torch.Tensor,
    x1: torch.Tensor,
    x1_err: torch.Tensor | None,
    coeffs: PathCoefficients,
    outputs: Sequence[str] = ("velocity",),
    *,
    x1_max: torch.Tensor | float | None = None,
) -> OracleResult:
    """The outputs of B queries from their posterior mean (module docstring).

    Args:
        x: (B, D) queries (any float dtype), x1: (B, D) float64, x1_err: (B,) its bound (None: an
            estimate that claims none, such as the kNN target's), all on one device.
        coeffs: the queries' path coefficients (B each).
        outputs: names among "velocity", "x1_hat", "eps_hat", "score".
        x1_max: a bound on ``max |x1_hat|`` per query (default: measured).

    Returns:
        an :class:`OracleResult` with x1_hat, the outputs asked for, and the x1 and velocity bounds
        (when ``x1_err`` is given).
    """
    dev = x1.device
    c = coeffs
    coefs = torch.from_numpy(np.stack([c.alpha, c.sigma, c.velocity_x1, c.velocity_xt]).astype(np.float64)).to(dev)
    alpha, sigma, a_t, b_t = coefs.unbind(0)
    xf = x.reshape(x1.shape).to(device=dev, dtype=torch.float64)
    check_sample_outputs(outputs, "an oracle from its posterior mean")
    velocity = eps_hat = score = None
    if "velocity" in outputs:
        velocity = torch.addcmul(xf * b_t[:, None], x1, a_t[:, None])
    if "eps_hat" in outputs:
        eps_hat = torch.addcmul(xf, x1, alpha[:, None], value=-1).div_(sigma[:, None])
    if "score" in outputs:
        score = torch.addcmul(-xf, x1, alpha[:, None]).div_((sigma * sigma)[:, None])
    if x1_err is None:
        return OracleResult(x1_hat=x1, velocity=velocity, eps_hat=eps_hat, score=score)
    xm = x1.abs().amax(dim=1) if x1_max is None else x1_max
    qn = torch.linalg.vector_norm(xf, dim=1)
    v_err = a_t.abs() * x1_err + 4 * U64 * (a_t.abs() * xm + b_t.abs() * qn)
    return OracleResult(
        x1_hat=x1, velocity=velocity, eps_hat=eps_hat, score=score, x1_hat_error_bound=x1_err,
        velocity_error_bound=v_err,
    )  # fmt: skip
