"""Helpers of the SDK tests: a small labelled data set, and an independent float64 numpy reference
of the oracle written here (it shares no code with the engine or the SDK)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from floworacle_server.data import Dataset, DatasetStore
from floworacle_server.settings import Settings

N, SHAPE, CLASSES = 240, (3, 4), 3
D = int(np.prod(SHAPE))


@dataclass(frozen=True)
class Data:
    x: np.ndarray  # (N, D) float64 of the float32-stored values, original order
    labels: np.ndarray  # (N,) int64


def make_data(seed: int = 0) -> Data:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, size=N)
    centers = rng.standard_normal((CLASSES, D)) * 1.5
    x = (centers[labels] + 0.6 * rng.standard_normal((N, D))).astype(np.float32)
    return Data(x.astype(np.float64), labels.astype(np.int64))


def make_store(data: Data, name: str = "blobs") -> DatasetStore:
    ds = Dataset.from_arrays(
        name,
        data.x.astype(np.float32).reshape(N, *SHAPE),
        labels=data.labels,
        sample_shape=SHAPE,
        image_shape=(1, *SHAPE),
    )
    return DatasetStore([ds])


def settings(**kw: object) -> Settings:
    return Settings(device="cpu", metrics_port=-1, **kw)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Ref:
    velocity: np.ndarray
    x1_hat: np.ndarray
    eps_hat: np.ndarray
    score: np.ndarray
    gamma: np.ndarray  # (B, N)
    entropy: np.ndarray
    ess: np.ndarray


def reference(
    X: np.ndarray,
    x_t: np.ndarray,
    alpha: np.ndarray,
    sigma: np.ndarray,
    d_alpha: np.ndarray,
    d_sigma: np.ndarray,
    mask: np.ndarray | None = None,
) -> Ref:
    """gamma = softmax(-||x_t - alpha x_i||^2 / (2 sigma^2)) (over ``mask`` rows per query when
    given), x1_hat = gamma @ X, u = A x1_hat + B x_t with A = d_alpha - alpha d_sigma / sigma,
    B = d_sigma / sigma; all float64."""
    X = np.asarray(X, np.float64)
    xt = np.asarray(x_t, np.float64).reshape(len(x_t), -1)
    a, s, da, ds = (np.asarray(v, np.float64).reshape(-1, 1) for v in (alpha, sigma, d_alpha, d_sigma))
    d2 = ((xt[:, None, :] - a[:, :, None] * X[None, :, :]) ** 2).sum(-1)
    logits = -d2 / (2 * s**2)
    if mask is not None:
        logits = np.where(mask, logits, -np.inf)
    logits -= logits.max(axis=1, keepdims=True)
    g = np.exp(logits)
    g /= g.sum(axis=1, keepdims=True)
    x1 = g @ X
    A = da - a * ds / s
    Bc = ds / s
    u = A * x1 + Bc * xt
    eps = (xt - a * x1) / s
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(g > 0, g * np.log(g), 0.0).sum(1)
    return Ref(u, x1, eps, -eps / s, g, ent, 1.0 / (g**2).sum(1))


def linear_ref(X: np.ndarray, x_t: np.ndarray, t: np.ndarray, mask: np.ndarray | None = None) -> Ref:
    t = np.asarray(t, np.float64)
    return reference(X, x_t, t, 1 - t, np.ones_like(t), -np.ones_like(t), mask)


def queries(data: Data, b: int, seed: int, t_lo: float = 0.05, t_hi: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """(x_t float64 (B, D), t (B,)) drawn on the linear path from the data."""
    rng = np.random.default_rng(seed)
    t = rng.uniform(t_lo, t_hi, size=b)
    idx = rng.integers(0, N, size=b)
    x_t = t[:, None] * data.x[idx] + (1 - t[:, None]) * rng.standard_normal((b, D))
    return x_t, t
