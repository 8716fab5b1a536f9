"""An independent, plain float64 reference of the oracle (numpy only, no streaming, no tricks).

It computes the formulas of oracle-math.md literally, query by query, so that it shares no code
and no numerical strategy with the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Reference:
    x1_hat: np.ndarray
    velocity: np.ndarray
    eps_hat: np.ndarray
    score: np.ndarray
    weights: np.ndarray  # (B, N) posterior weights
    entropy: np.ndarray
    ess: np.ndarray


def posterior_weights(
    data: np.ndarray, x_t: np.ndarray, alpha: np.ndarray, sigma: np.ndarray, weights: np.ndarray | None = None
) -> np.ndarray:
    """(B, N) posterior weights ``softmax_i(log p_i - ||x_t - alpha x_i||^2 / (2 sigma^2))``, query by query."""
    X = np.asarray(data, dtype=np.float64).reshape(len(data), -1)
    xt = np.asarray(x_t, dtype=np.float64).reshape(len(x_t), -1)
    with np.errstate(divide="ignore"):  # zero weights give log p = -inf, i.e. excluded
        logp = np.zeros(len(X)) if weights is None else np.log(np.asarray(weights, dtype=np.float64) / np.sum(weights))
    out = []
    for b in range(len(xt)):
        diff = xt[b][None, :] - alpha[b] * X
        logits = logp - np.einsum("nd,nd->n", diff, diff) / (2.0 * sigma[b] ** 2)
        g = np.exp(logits - logits.max())
        out.append(g / g.sum())
    return np.array(out)


def oracle_reference(
    data: np.ndarray,
    x_t: np.ndarray,
    alpha: np.ndarray,
    sigma: np.ndarray,
    d_alpha: np.ndarray,
    d_sigma: np.ndarray,
    weights: np.ndarray | None = None,
) -> Reference:
    """data (N, D), x_t (B, D), coefficients (B,); optional sample weights (N,)."""
    X = np.asarray(data, dtype=np.float64).reshape(len(data), -1)
    xt = np.asarray(x_t, dtype=np.float64).reshape(len(x_t), -1)
    w = posterior_weights(X, xt, alpha, sigma, weights)
    x1 = w @ X
    a, s, da, ds = (np.asarray(v, dtype=np.float64)[:, None] for v in (alpha, sigma, d_alpha, d_sigma))
    eps = (xt - a * x1) / s
    vel = da * x1 + ds * eps
    score = (a * x1 - xt) / s**2
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(w > 0, w * np.log(w), 0.0).sum(axis=1)
    ess = 1.0 / (w * w).sum(axis=1)
    return Reference(x1, vel, eps, score, w, ent, ess)


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    """max |err| / max |ref| over the whole batch."""
    return float(np.abs(np.asarray(got, dtype=np.float64) - ref).max() / np.abs(ref).max())
