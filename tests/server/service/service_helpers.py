"""Helpers for the service tests: an independent float64 numpy reference of the oracle and of
nearest-neighbour search, and request builders for the raw generated stub."""

from __future__ import annotations

import numpy as np

from floworacle import protocol
from floworacle.v1 import oracle_pb2 as pb
from oracle_reference import posterior_weights


def ref_posterior(data: np.ndarray, x_t: np.ndarray, alpha: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """(B, N) posterior weights gamma_i = softmax(-||x_t - alpha x_i||^2 / (2 sigma^2)), float64
    (the tests' one reference, tests/oracle_reference.py)."""
    return posterior_weights(data, x_t, alpha, sigma)


class FakeJob:
    """A batcher job for tests that need no engine: ``rows`` rows carrying one integer."""

    def __init__(self, rows: int, value: int, fail: bool = False) -> None:
        self.rows, self.value, self.fail = rows, value, fail


def double_values(jobs: list[FakeJob]) -> tuple[list[int], int]:
    """A batcher runner: doubles each job's value (no float64 refinement work)."""
    return [2 * j.value for j in jobs], 0


def ref_oracle(
    data: np.ndarray,
    x_t: np.ndarray,
    alpha: np.ndarray,
    sigma: np.ndarray,
    d_alpha: np.ndarray,
    d_sigma: np.ndarray,
    data_labels: np.ndarray | None = None,
    labels: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """x1_hat, velocity, eps_hat, score, weights, entropy, ess in float64; per query, only the
    samples of its label when ``labels[b] >= 0``."""
    X = np.asarray(data, np.float64).reshape(len(data), -1)
    xt = np.asarray(x_t, np.float64).reshape(len(x_t), -1)
    w = ref_posterior(X, xt, alpha, sigma)
    if labels is not None:
        for b, y in enumerate(labels):
            if y >= 0:
                assert data_labels is not None
                mask = data_labels == y
                wb = ref_posterior(X[mask], xt[b : b + 1], alpha[b : b + 1], sigma[b : b + 1])[0]
                w[b] = 0.0
                w[b, mask] = wb
    x1 = w @ X
    a, s, da, ds = (v[:, None] for v in (alpha, sigma, d_alpha, d_sigma))
    eps = (xt - a * x1) / s
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(w > 0, w * np.log(w), 0.0).sum(axis=1)
    return {
        "x1_hat": x1,
        "velocity": da * x1 + ds * eps,
        "eps_hat": eps,
        "score": (a * x1 - xt) / s**2,
        "weights": w,
        "entropy": entropy,
        "ess": 1.0 / (w**2).sum(axis=1),
    }


def linear_coeffs(t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    t = np.asarray(t, np.float64)
    return t, 1.0 - t, np.ones_like(t), -np.ones_like(t)


def ref_nearest(data: np.ndarray, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, k) indices and Euclidean distances, nearest first, float64."""
    X = np.asarray(data, np.float64).reshape(len(data), -1)
    q = np.asarray(x, np.float64).reshape(len(x), -1)
    d = np.sqrt(((q[:, None, :] - X[None]) ** 2).sum(-1))
    idx = np.argsort(d, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(d, idx, axis=1)


def noisy_queries(data: np.ndarray, t: np.ndarray, seed: int = 0) -> np.ndarray:
    """x_t = t x1 + (1 - t) x0 for random data rows x1 and Gaussian x0, float64 (B, D)."""
    rng = np.random.default_rng(seed)
    X = np.asarray(data, np.float64).reshape(len(data), -1)
    rows = rng.integers(0, len(X), size=len(t))
    return t[:, None] * X[rows] + (1.0 - t[:, None]) * rng.standard_normal((len(t), X.shape[1]))


def oracle_request(
    x_t: np.ndarray,
    t: np.ndarray | None,
    *,
    dtype: str | None = None,
    outputs: tuple[int, ...] = (),
    **fields: object,
) -> pb.OracleRequest:
    req = pb.OracleRequest(x_t=protocol.encode(x_t, dtype), outputs=list(outputs), **fields)  # type: ignore[arg-type]
    if t is not None:
        req.t.CopyFrom(protocol.encode(np.asarray(t, np.float64)))
    return req


def max_rel(got: np.ndarray, ref: np.ndarray) -> float:
    """max |got - ref| / max |ref| (a scale-aware error for whole output tensors)."""
    return float(np.max(np.abs(np.asarray(got, np.float64) - ref)) / max(np.max(np.abs(ref)), 1e-300))
