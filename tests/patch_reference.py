"""Independent float64 references of the generalising oracles, in plain numpy loops.

Written from the formulas (docs/analysis.md, oracle-math.md "Closed forms that generalise"),
sharing no code and no numerical strategy with the engine: windows are cut out of explicitly
zero-padded images pixel by pixel, distances are sums of squared differences, the softmax is
taken over the whole list at once; the linear oracle solves its linear system directly.
"""

from __future__ import annotations

import numpy as np


def _padded(img: np.ndarray, r: int) -> np.ndarray:
    c, h, w = img.shape
    out = np.zeros((c, h + 2 * r, w + 2 * r))
    out[:, r : r + h, r : r + w] = img
    return out


def _window(padded: np.ndarray, r: int, y: int, x: int) -> np.ndarray:
    """The (C, P, P) window centred on pixel (y, x) of the original image."""
    return padded[:, y : y + 2 * r + 1, x : x + 2 * r + 1]


def _softmax_mean(logits: np.ndarray, values: np.ndarray) -> np.ndarray:
    g = np.exp(logits - logits.max())
    g /= g.sum()
    return g @ values


def local_reference(
    data: np.ndarray,
    x_t: np.ndarray,
    alpha: float,
    sigma: float,
    patch: int,
    shape: tuple[int, int, int],
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """One query: x1_hat (D,) of the local oracle, pixel by pixel over all images."""
    c, h, w = shape
    r = (patch - 1) // 2
    imgs = [_padded(np.asarray(d, dtype=np.float64).reshape(shape), r) for d in data]
    q = _padded(np.asarray(x_t, dtype=np.float64).reshape(shape), r)
    with np.errstate(divide="ignore"):
        logp = np.zeros(len(imgs)) if weights is None else np.log(np.asarray(weights, dtype=np.float64))
    out = np.zeros(shape)
    for y in range(h):
        for x in range(w):
            wq = _window(q, r, y, x)
            logits = np.array(
                [
                    logp[i] - np.sum((wq - alpha * _window(im, r, y, x)) ** 2) / (2 * sigma**2)
                    for i, im in enumerate(imgs)
                ]
            )
            values = np.array([im[:, r + y, r + x] for im in imgs])
            out[:, y, x] = _softmax_mean(logits, values)
    return out.reshape(-1)


def equivariant_reference(
    data: np.ndarray,
    x_t: np.ndarray,
    alpha: float,
    sigma: float,
    patch: int,
    shape: tuple[int, int, int],
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """One query: x1_hat (D,) of the equivariant local oracle over all images and locations."""
    c, h, w = shape
    r = (patch - 1) // 2
    imgs = [_padded(np.asarray(d, dtype=np.float64).reshape(shape), r) for d in data]
    q = _padded(np.asarray(x_t, dtype=np.float64).reshape(shape), r)
    with np.errstate(divide="ignore"):
        logp = np.zeros(len(imgs)) if weights is None else np.log(np.asarray(weights, dtype=np.float64))
    patches, values, prior = [], [], []
    for i, im in enumerate(imgs):
        for y in range(h):
            for x in range(w):
                patches.append(_window(im, r, y, x))
                values.append(im[:, r + y, r + x])
                prior.append(logp[i])
    pat = np.array(patches)
    val = np.array(values)
    pri = np.array(prior)
    out = np.zeros(shape)
    for y in range(h):
        for x in range(w):
            wq = _window(q, r, y, x)
            d2 = np.sum((wq[None] - alpha * pat) ** 2, axis=(1, 2, 3))  # one distance per (image, location)
            out[:, y, x] = _softmax_mean(pri - d2 / (2 * sigma**2), val)
    return out.reshape(-1)


def linear_reference(
    data: np.ndarray, x_t: np.ndarray, alpha: float, sigma: float, weights: np.ndarray | None = None
) -> np.ndarray:
    """One query: mu + alpha Sigma (alpha^2 Sigma + sigma^2 I)^-1 (x_t - alpha mu), by a direct solve."""
    X = np.asarray(data, dtype=np.float64).reshape(len(data), -1)
    p = np.full(len(X), 1.0 / len(X)) if weights is None else np.asarray(weights, dtype=np.float64) / np.sum(weights)
    mu = p @ X
    cen = X - mu
    cov = (cen * p[:, None]).T @ cen
    d = X.shape[1]
    y = np.asarray(x_t, dtype=np.float64).reshape(-1) - alpha * mu
    return mu + alpha * cov @ np.linalg.solve(alpha**2 * cov + sigma**2 * np.eye(d), y)
