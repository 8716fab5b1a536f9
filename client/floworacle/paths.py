"""Probability paths and parameterisation conversions, shared by the SDK and the server.

Convention (everywhere in Flow Oracle): x0 ~ N(0, I) is noise, x1 is data, t in [0, 1],
**t = 0 is noise, t = 1 is data**, and ``x_t = alpha_t * x1 + sigma_t * x0``.

A path only maps t to ``(alpha_t, sigma_t, d_alpha_t, d_sigma_t)``; the conversions below turn
an x1-prediction into velocity, noise prediction or score and back. Every function works on
numpy arrays and on torch tensors (torch is optional for this module).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, TypeVar

import numpy as np

__all__ = [
    "SIGMA_FLOOR",
    "PathCoefficients",
    "COEFFICIENT_NAMES",
    "Path",
    "LinearPath",
    "CosinePath",
    "get_path",
    "custom_coefficients",
    "velocity_from_x1",
    "eps_from_x1",
    "score_from_x1",
    "x1_from_velocity",
    "x1_from_eps",
    "reversed_to_t",
    "t_to_reversed",
    "velocity_to_reversed",
    "velocity_from_reversed",
]

#: Smallest sigma_t the oracle accepts. The velocity, noise prediction and score divide by
#: sigma_t; at sigma_t = 0 they are undefined (x1_hat collapses to the nearest sample). Below
#: this floor the logits scale as 1 / sigma^2 > 1e8 and no finite-precision answer is
#: meaningful, so queries with sigma_t < SIGMA_FLOOR are rejected. For ``linear`` this means
#: t <= 0.9999.
SIGMA_FLOOR = 1e-4

ArrayT = TypeVar("ArrayT")


@dataclass(frozen=True)
class PathCoefficients:
    """Path coefficients for a batch of queries; each field has shape (batch,), float64."""

    alpha: np.ndarray
    sigma: np.ndarray
    d_alpha: np.ndarray
    d_sigma: np.ndarray

    def __post_init__(self) -> None:
        for name in COEFFICIENT_NAMES:
            object.__setattr__(self, name, np.atleast_1d(np.asarray(getattr(self, name), dtype=np.float64)))
        shapes = {getattr(self, n).shape for n in COEFFICIENT_NAMES}
        if len(shapes) != 1 or len(next(iter(shapes))) != 1:
            raise ValueError(f"path coefficients must be 1-D arrays of one length, got shapes {sorted(shapes)}")

    def __len__(self) -> int:
        return int(self.alpha.shape[0])

    @property
    def velocity_x1(self) -> np.ndarray:
        """A_t in ``u = A_t x1_hat + B_t x_t``: ``d_alpha - alpha d_sigma / sigma`` (may overflow to
        inf for absurd coefficients: answers are checked for finiteness before they are sent)."""
        with np.errstate(over="ignore", invalid="ignore"):
            return self.d_alpha - self.alpha * self.d_sigma / self.sigma

    @property
    def velocity_xt(self) -> np.ndarray:
        """B_t in ``u = A_t x1_hat + B_t x_t``: ``d_sigma / sigma``."""
        with np.errstate(over="ignore", invalid="ignore"):
            return self.d_sigma / self.sigma

    def validate(self) -> None:
        """Raise ValueError (with what to change) unless every query is inside the oracle's domain."""
        for name in COEFFICIENT_NAMES:
            v = getattr(self, name)
            bad = ~np.isfinite(v)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise ValueError(f"{name}[{i}] = {float(v[i])} is not finite; send finite path coefficients")
        if (self.alpha < 0).any():
            i = int(np.flatnonzero(self.alpha < 0)[0])
            raise ValueError(f"alpha[{i}] = {float(self.alpha[i]):.10g} is negative; alpha_t must be >= 0")
        low = self.sigma < SIGMA_FLOOR * (1 - 1e-9)  # t_max itself is allowed despite rounding
        if low.any():
            i = int(np.flatnonzero(low)[0])
            raise ValueError(
                f"sigma[{i}] = {self.sigma[i]:.3g} is below the floor {SIGMA_FLOOR:g}: the velocity is "
                "singular at the data end (sigma_t = 0); use a t with sigma_t >= 1e-4 "
                "(t <= 0.9999 on the linear path)"
            )

    def take(self, index: Any) -> PathCoefficients:
        """The coefficients of a subset of the queries (numpy index, slice or mask)."""
        return PathCoefficients(*(getattr(self, n)[index] for n in COEFFICIENT_NAMES))

    @staticmethod
    def concat(parts: list[PathCoefficients]) -> PathCoefficients:
        """The coefficients of several batches, one after the other."""
        return PathCoefficients(*(np.concatenate([getattr(p, n) for p in parts]) for n in COEFFICIENT_NAMES))


#: The coefficients' names, in order (the fields of :class:`PathCoefficients`).
COEFFICIENT_NAMES: tuple[str, ...] = tuple(f.name for f in fields(PathCoefficients))


def custom_coefficients(alpha: Any, sigma: Any, d_alpha: Any, d_sigma: Any) -> PathCoefficients:
    """Per-query coefficients given directly by the caller, validated."""
    c = PathCoefficients(alpha, sigma, d_alpha, d_sigma)
    c.validate()
    return c


class Path:
    """A named affine path: maps t (shape (batch,)) to its coefficients."""

    name: str = ""

    def _coefficients(self, t: np.ndarray) -> PathCoefficients:
        raise NotImplementedError

    @property
    def t_max(self) -> float:
        """Largest t whose sigma_t is at or above :data:`SIGMA_FLOOR`."""
        raise NotImplementedError

    def coefficients(self, t: Any) -> PathCoefficients:
        """Coefficients at t; raises ValueError for t outside [0, t_max] or not finite."""
        t = np.atleast_1d(np.asarray(_to_numpy(t), dtype=np.float64))
        if t.ndim != 1:
            raise ValueError(f"t must have shape (batch,), got {t.shape}")
        if not np.isfinite(t).all():
            i = int(np.flatnonzero(~np.isfinite(t))[0])
            raise ValueError(f"t[{i}] = {float(t[i])} is not finite")
        bad = (t < 0) | (t > self.t_max)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"t[{i}] = {float(t[i]):.10g} is outside [0, {self.t_max:.8g}] for path {self.name!r} "
                "(t = 0 is noise, t = 1 is data; the end where sigma_t < 1e-4 is excluded because the "
                "velocity is singular there). If your code uses the reversed convention "
                "(noise at s = 1), pass t = 1 - s."
            )
        return self._coefficients(t)


@dataclass(frozen=True)
class LinearPath(Path):
    """Rectified flow / CondOT: ``alpha_t = t, sigma_t = 1 - (1 - sigma_min) t``."""

    sigma_min: float = 0.0

    def __post_init__(self) -> None:
        if not (0.0 <= self.sigma_min < 1.0) or not math.isfinite(self.sigma_min):
            raise ValueError(f"sigma_min must lie in [0, 1), got {self.sigma_min}")

    @property
    def name(self) -> str:  # type: ignore[override]
        return "linear"

    @property
    def t_max(self) -> float:
        if self.sigma_min >= SIGMA_FLOOR:
            return 1.0
        return (1.0 - SIGMA_FLOOR) / (1.0 - self.sigma_min)

    def _coefficients(self, t: np.ndarray) -> PathCoefficients:
        k = 1.0 - self.sigma_min
        return PathCoefficients(t, 1.0 - k * t, np.ones_like(t), np.full_like(t, -k))


@dataclass(frozen=True)
class CosinePath(Path):
    """``alpha_t = sin(pi t / 2), sigma_t = cos(pi t / 2)``."""

    @property
    def name(self) -> str:  # type: ignore[override]
        return "cosine"

    @property
    def t_max(self) -> float:
        return 1.0 - 2.0 / math.pi * math.asin(SIGMA_FLOOR)

    def _coefficients(self, t: np.ndarray) -> PathCoefficients:
        h = 0.5 * math.pi
        return PathCoefficients(np.sin(h * t), np.cos(h * t), h * np.cos(h * t), -h * np.sin(h * t))


def get_path(name: str, sigma_min: float = 0.0) -> Path:
    """A named path: ``"linear"`` (optionally with ``sigma_min``) or ``"cosine"``."""
    if name == "linear":
        return LinearPath(sigma_min)
    if name == "cosine":
        if sigma_min:
            raise ValueError("sigma_min applies to the linear path only")
        return CosinePath()
    raise ValueError(f"unknown path {name!r}; choose 'linear' or 'cosine', or send custom coefficients")


def _to_numpy(x: Any) -> Any:
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        return x.detach().cpu().double().numpy()
    return x


def _bcast(coef: np.ndarray, like: Any) -> Any:
    """Reshape a (batch,) coefficient to broadcast against ``like`` (batch, ...), same array type."""
    shape = (coef.shape[0],) + (1,) * (like.ndim - 1)
    if hasattr(like, "new_tensor"):
        return like.new_tensor(coef).reshape(shape)
    return coef.reshape(shape).astype(np.result_type(like.dtype, np.float32), copy=False)


def velocity_from_x1(x1_hat: ArrayT, x_t: ArrayT, c: PathCoefficients) -> ArrayT:
    """``u = A_t x1_hat + B_t x_t``; shapes (batch, ...)."""
    return _bcast(c.velocity_x1, x_t) * x1_hat + _bcast(c.velocity_xt, x_t) * x_t  # type: ignore[operator]


def eps_from_x1(x1_hat: ArrayT, x_t: ArrayT, c: PathCoefficients) -> ArrayT:
    """``eps_hat = (x_t - alpha_t x1_hat) / sigma_t``; shapes (batch, ...)."""
    return (x_t - _bcast(c.alpha, x_t) * x1_hat) / _bcast(c.sigma, x_t)  # type: ignore[operator]


def score_from_x1(x1_hat: ArrayT, x_t: ArrayT, c: PathCoefficients) -> ArrayT:
    """``grad log p_t(x_t) = (alpha_t x1_hat - x_t) / sigma_t^2``; shapes (batch, ...)."""
    return (_bcast(c.alpha, x_t) * x1_hat - x_t) / _bcast(c.sigma**2, x_t)  # type: ignore[operator]


def x1_from_velocity(u: ArrayT, x_t: ArrayT, c: PathCoefficients) -> ArrayT:
    """Invert :func:`velocity_from_x1`; needs A_t != 0 (true for linear and cosine)."""
    a = c.velocity_x1
    if (a == 0).any():
        raise ValueError("A_t = d_alpha - alpha d_sigma / sigma is 0: the velocity does not determine x1")
    return (u - _bcast(c.velocity_xt, x_t) * x_t) / _bcast(a, x_t)  # type: ignore[operator]


def x1_from_eps(eps: ArrayT, x_t: ArrayT, c: PathCoefficients) -> ArrayT:
    """Invert :func:`eps_from_x1`; needs alpha_t > 0 (not at pure noise)."""
    if (c.alpha == 0).any():
        raise ValueError("alpha_t = 0 (pure noise): the noise prediction does not determine x1")
    return (x_t - _bcast(c.sigma, x_t) * eps) / _bcast(c.alpha, x_t)  # type: ignore[operator]


# Reversed convention (SD3, Flux, diffusers' flow-match schedulers):
#   x_s = (1 - s) x_data + s noise, s = 1 at noise, model target = noise - x_data.
# That is our linear path with t = 1 - s, and the velocity negated.


def reversed_to_t(s: ArrayT) -> ArrayT:
    """Time in the reversed convention (s = 1 noise) to ours: ``t = 1 - s``."""
    return 1.0 - s  # type: ignore[operator,return-value]


def t_to_reversed(t: ArrayT) -> ArrayT:
    """Our time to the reversed convention: ``s = 1 - t``."""
    return 1.0 - t  # type: ignore[operator,return-value]


def velocity_to_reversed(u: ArrayT) -> ArrayT:
    """Our velocity (toward data) to the reversed target ``noise - x_data``: ``-u``."""
    return -u  # type: ignore[operator,no-any-return]


def velocity_from_reversed(v: ArrayT) -> ArrayT:
    """A reversed-convention velocity to ours: ``-v``."""
    return -v  # type: ignore[operator,no-any-return]
