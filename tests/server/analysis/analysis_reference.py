"""Independent float64 numpy reference of the posterior on the linear path (no engine, no paths module)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class RefDiagnostics:
    top1: np.ndarray
    entropy: np.ndarray
    ess: np.ndarray
    gap: np.ndarray


def linear_diagnostics(x: np.ndarray, x1: np.ndarray, x0: np.ndarray, t: float) -> RefDiagnostics:
    """Posterior of x_t = t x1 + (1 - t) x0 over the rows of x (uniform weights), brute force.

    gamma_i = softmax(-||x_t - t x_i||^2 / (2 (1 - t)^2)); u = (x1_hat - x_t) / (1 - t) (linear
    path); conditional target x1 - x0; gap = ||u - (x1 - x0)||^2 / D.
    """
    x = x.astype(np.float64)
    xt = t * x1 + (1.0 - t) * x0
    sq = ((xt[:, None, :] - t * x[None, :, :]) ** 2).sum(axis=2)
    logits = -sq / (2.0 * (1.0 - t) ** 2)
    logits -= logits.max(axis=1, keepdims=True)
    w = np.exp(logits)
    w /= w.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(w > 0, w * np.log(w), 0.0)
    x1_hat = w @ x
    u = (x1_hat - xt) / (1.0 - t)
    diff = u - (x1 - x0)
    return RefDiagnostics(
        top1=w.max(axis=1),
        entropy=-plogp.sum(axis=1),
        ess=1.0 / (w**2).sum(axis=1),
        gap=(diff**2).sum(axis=1) / x.shape[1],
    )


def brute_knn2(train: np.ndarray, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B, 2) indices and float64 distances of the two nearest training rows (ties by index)."""
    d = np.sqrt(((samples[:, None, :].astype(np.float64) - train[None, :, :].astype(np.float64)) ** 2).sum(axis=2))
    idx = np.argsort(d, axis=1, kind="stable")[:, :2]
    return idx, np.take_along_axis(d, idx, axis=1)


def linear_velocity(x: np.ndarray, x_t: np.ndarray, t: float, exclude: np.ndarray | None = None) -> np.ndarray:
    """Oracle velocity (x1_hat - x_t) / (1 - t) over the rows of x on the linear path, brute force in
    float64; ``exclude`` (B,) drops row exclude[b] from query b's posterior (leave-one-out)."""
    x = x.astype(np.float64)
    sq = ((x_t[:, None, :] - t * x[None, :, :]) ** 2).sum(axis=2)
    logits = -sq / (2.0 * (1.0 - t) ** 2)
    if exclude is not None:
        logits[np.arange(x_t.shape[0]), exclude] = -np.inf
    logits -= logits.max(axis=1, keepdims=True)
    w = np.exp(logits)
    w /= w.sum(axis=1, keepdims=True)
    return (w @ x - x_t) / (1.0 - t)


def brute_nearest(train: np.ndarray, samples: np.ndarray) -> np.ndarray:
    """(B,) float64 distance of each sample to its nearest training row."""
    d = np.sqrt(((samples[:, None, :].astype(np.float64) - train[None, :, :].astype(np.float64)) ** 2).sum(axis=2))
    return d.min(axis=1)
