"""Sampling by integrating a velocity field from noise (t = 0) to data (t = 1).

``integrate(velocity, x0)`` solves ``dx/dt = velocity(x, t)`` with fixed steps; the velocity is any
callable ``(x_t, t) -> u`` over a batch: a model, or the oracle itself
(``lambda x, t: client.velocity(x, t)``). Works on numpy arrays and torch tensors alike.

Samples of the exact oracle are copies of training samples (the refinement stage collapses onto
one sample); ``floworacle analyze memorization`` shows it, and a model's samples are compared with
the same test.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from floworacle.paths import SIGMA_FLOOR

__all__ = ["integrate", "time_grid", "METHODS"]

#: Fixed-step solvers: Euler (1 evaluation per step), midpoint and Heun (2 each).
METHODS = ("euler", "midpoint", "heun")


def time_grid(steps: int, t_max: float = 1.0 - SIGMA_FLOOR, shift: float = 1.0) -> np.ndarray:
    """``steps + 1`` times from 0 to ``t_max``; ``shift`` > 1 puts more steps early (in the
    navigation stage): ``t = s u / (1 + (s - 1) u)`` of uniform u, as ``analyze advice`` suggests."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0 < t_max <= 1:
        raise ValueError(f"t_max must lie in (0, 1], got {t_max}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    u = np.linspace(0.0, 1.0, steps + 1)
    return t_max * (shift * u / (1.0 + (shift - 1.0) * u))


def _full(t: float, like: Any) -> Any:
    if hasattr(like, "new_full"):  # torch
        return like.new_full((like.shape[0],), float(t), dtype=like.dtype if like.is_floating_point() else None)
    return np.full(like.shape[0], float(t))


def integrate(
    velocity: Callable[[Any, Any], Any],
    x0: Any,
    *,
    steps: int = 50,
    method: str = "midpoint",
    times: Sequence[float] | None = None,
    shift: float = 1.0,
) -> Any:
    """Integrate ``dx/dt = velocity(x, t)`` from ``x0`` (noise, t = 0) to t = 1 - 1e-4.

    Args:
        velocity: ``(x_t (B, ...), t (B,)) -> u (B, ...)``, in the standard convention (t = 0 noise).
        x0: (B, ...) starting points, numpy or torch.
        steps: number of steps (ignored when ``times`` is given).
        method: "euler", "midpoint" (default) or "heun".
        times: the time grid, increasing, from 0 (default: :func:`time_grid` of ``steps``, ``shift``).
        shift: timestep shift of the default grid.

    Returns:
        the end points, same type and shape as ``x0``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    grid = np.asarray(times if times is not None else time_grid(steps, shift=shift), dtype=np.float64)
    if grid.ndim != 1 or len(grid) < 2 or np.any(np.diff(grid) <= 0):
        raise ValueError("times must be an increasing sequence of at least two values")
    x = x0
    for t0, t1 in zip(grid[:-1], grid[1:], strict=True):
        h = float(t1 - t0)
        u0 = velocity(x, _full(t0, x))
        if method == "euler":
            x = x + h * u0
        elif method == "midpoint":
            x = x + h * velocity(x + 0.5 * h * u0, _full(t0 + 0.5 * h, x))
        else:
            u1 = velocity(x + h * u0, _full(t1, x))
            x = x + 0.5 * h * (u0 + u1)
    return x
