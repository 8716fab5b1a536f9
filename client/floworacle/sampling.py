"""Sampling by integrating a velocity field from noise (t = 0) to data (t = 1).

``integrate(velocity, x0)`` solves ``dx/dt = velocity(x, t)`` with fixed steps; the velocity is any
callable ``(x_t, t) -> u`` over a batch: a model, or the oracle itself
(``lambda x, t: client.velocity(x, t)``). Works on numpy arrays and torch tensors alike.

Samples of the exact oracle are copies of training samples (the refinement stage collapses onto
one sample); ``floworacle analyze memorization`` shows it, and a model's samples are compared with
the same test. ``integrate_mixed(oracle, model, x0, switch)`` follows the oracle up to a switch
time and the model after it (Liu et al., Fig. 5): where the switch falls relative to the data
set's navigation -> refinement point decides whether the samples are new or copies.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from floworacle.paths import SIGMA_FLOOR

__all__ = ["integrate", "integrate_mixed", "split_grid", "time_grid", "METHODS"]

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
    times: Sequence[float] | np.ndarray | None = None,
    shift: float = 1.0,
) -> Any:
    """Integrate ``dx/dt = velocity(x, t)`` from ``x0`` (noise, t = 0) to t = 1 - 1e-4.

    Args:
        velocity: ``(x_t (B, ...), t (B,)) -> u (B, ...)``, in the standard convention (t = 0 noise).
        x0: (B, ...) starting points, numpy or torch.
        steps: number of steps (ignored when ``times`` is given).
        method: "euler", "midpoint" (default) or "heun".
        times: the time grid, increasing (default: :func:`time_grid` of ``steps``, ``shift``, from
            0); a grid that starts later integrates from its first time.
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


def split_grid(grid: Sequence[float] | np.ndarray, switch: float) -> tuple[np.ndarray, np.ndarray]:
    """The parts of an increasing time grid before and after ``switch``, the switch a point of both.

    A switch at or before the grid's start leaves the first part a single point (no steps), one at
    or after its end the second; a switch within 1e-12 of a grid point switches there; any other
    switch becomes a grid point, splitting the step it falls in.
    """
    g = np.asarray(grid, dtype=np.float64)
    if switch <= g[0]:
        return g[:1], g
    if switch >= g[-1]:
        return g, g[-1:]
    j = int(np.argmin(np.abs(g - switch)))
    if abs(g[j] - switch) <= 1e-12:
        return g[: j + 1], g[j:]
    before = g[g < switch]
    after = g[g > switch]
    return np.concatenate([before, [switch]]), np.concatenate([[switch], after])


def integrate_mixed(
    oracle: Callable[[Any, Any], Any],
    model: Callable[[Any, Any], Any],
    x0: Any,
    switch: float,
    *,
    steps: int = 50,
    method: str = "midpoint",
    times: Sequence[float] | np.ndarray | None = None,
    shift: float = 1.0,
) -> Any:
    """Integrate with ``oracle`` from noise up to t = ``switch`` and with ``model`` from there on.

    Both are velocity fields ``(x_t (B, ...), t (B,)) -> u`` in the standard convention (e.g. the
    exact oracle ``lambda x, t: client.velocity(x, t)`` and a trained network). The time grid
    (:func:`integrate`'s) is split at the switch (:func:`split_grid`): each solver step lies wholly
    on one side, so switch = 0 is the model alone and switch >= the grid's end (1 - 1e-4 by
    default) the oracle alone, step for step as :func:`integrate` would take them.

    Returns:
        the end points, same type and shape as ``x0``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not 0.0 <= switch <= 1.0:
        raise ValueError(f"the switch time must lie in [0, 1] (t = 0 noise, t = 1 data), got {switch}")
    grid = np.asarray(times if times is not None else time_grid(steps, shift=shift), dtype=np.float64)
    if grid.ndim != 1 or len(grid) < 2 or np.any(np.diff(grid) <= 0):
        raise ValueError("times must be an increasing sequence of at least two values")
    first, second = split_grid(grid, switch)
    x = x0
    if len(first) >= 2:
        x = integrate(oracle, x, method=method, times=first)
    if len(second) >= 2:
        x = integrate(model, x, method=method, times=second)
    return x
