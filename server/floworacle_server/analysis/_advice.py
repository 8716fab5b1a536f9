"""Sampling advice from a measured switch time: a timestep shift and a guidance interval.

A sampler with K steps usually spaces them uniformly in u in [0, 1]; a timestep shift maps u to

    t'(u) = s u / (1 + (s - 1) u)        (t = 0 noise, t = 1 data; s < 1 moves steps toward noise).

t' is increasing in u, so the share of steps that end before the switch t_s is the u* with
t'(u*) = t_s, i.e. u* = t_s / (s (1 - t_s) + t_s). Asking for u* = p gives the closed form

    s = t_s (1 - p) / (p (1 - t_s)).

In the reversed convention of SD3 / Flux / diffusers (sigma = 1 - t, s = 1 is noise) the same map
is ``sigma' = k sigma / (1 + (k - 1) sigma)`` with k = 1 / s, their ``shift`` parameter.

A switch time is measured on random queries and carries a bootstrap 95 % interval [lo, hi]; s is
increasing in t_s, so the shift's interval is [s(lo), s(hi)] and the guidance interval's start
ranges over [lo, hi]: the advice says how far it would move with another measurement.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from floworacle.study import text_table
from floworacle_server.analysis._transition import SwitchUncertainty, TransitionCurve

__all__ = [
    "Advice",
    "advise",
    "format_advice_table",
    "shift_for_share",
    "share_before",
    "shifted_time",
    "SWITCH_LEVELS",
]

#: Which switch time the advice is anchored at: "99" (default) or "50".
SWITCH_LEVELS = ("99", "50")


def shifted_time(u: Any, shift: float) -> Any:
    """``t'(u) = s u / (1 + (s - 1) u)`` for step positions u in [0, 1] (numpy arrays or floats)."""
    return shift * u / (1.0 + (shift - 1.0) * u)


def share_before(t_switch: float, shift: float) -> float:
    """Share of uniformly spaced steps u whose shifted time is below ``t_switch``: ``t_s / (s (1 - t_s) + t_s)``."""
    return t_switch / (shift * (1.0 - t_switch) + t_switch)


def shift_for_share(t_switch: float, share: float) -> float:
    """The shift s that puts the share p of steps before t_s: ``s = t_s (1 - p) / (p (1 - t_s))``.

    Raises:
        ValueError: unless 0 < t_switch < 1 and 0 < share < 1.
    """
    if not 0.0 < t_switch < 1.0:
        raise ValueError(f"the switch time must lie strictly between 0 and 1 to place steps around it, got {t_switch}")
    if not 0.0 < share < 1.0:
        raise ValueError(f"--share must lie strictly between 0 and 1, got {share}")
    return t_switch * (1.0 - share) / (share * (1.0 - t_switch))


@dataclass(frozen=True)
class Advice:
    """Advice for one data set.

    Attributes:
        dataset: the transition entry's name.
        switch: which switch it is anchored at ("t_switch_99" or "t_switch_50").
        t_switch: that time, or None when the curve never reached it (then no advice).
        share: the requested share of steps before the switch.
        steps: K, the sampling steps counted below.
        shift: s in ``t' = s u / (1 + (s - 1) u)`` (t = 0 noise).
        shift_reversed: 1 / s, the ``shift`` of SD3 / Flux / diffusers (noise at s = 1).
        steps_before_switch_uniform: steps (of K, uniform in t) that end at or before t_switch.
        steps_before_switch_shifted: the same with the shift applied.
        guidance_interval: (t_lo, t_hi) = (t_switch, guidance_end): guide only after the switch.
        guidance_interval_reversed: the same interval in the reversed convention, (1 - t_hi, 1 - t_lo).
        note: why there is no advice, or "".
        t_switch_se: the switch time's bootstrap standard error (None: not measured, e.g. an old JSON).
        t_switch_interval: its 95 % interval (lo, hi); hi None when it may lie beyond the grid.
        shift_interval: (s(lo), s(hi)), the shift's range over that interval (hi None likewise).
        shift_reversed_interval: (1 / s(hi), 1 / s(lo)) (lo None when s(hi) is).
        guidance_start_interval: the range of the guidance interval's start, = t_switch_interval.
    """

    dataset: str
    switch: str
    t_switch: float | None
    share: float
    steps: int
    shift: float | None
    shift_reversed: float | None
    steps_before_switch_uniform: int | None
    steps_before_switch_shifted: int | None
    guidance_interval: tuple[float, float] | None
    guidance_interval_reversed: tuple[float, float] | None
    note: str = ""
    t_switch_se: float | None = None
    t_switch_interval: tuple[float | None, float | None] | None = None
    shift_interval: tuple[float | None, float | None] | None = None
    shift_reversed_interval: tuple[float | None, float | None] | None = None
    guidance_start_interval: tuple[float | None, float | None] | None = None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d


def _shift_or_none(t_s: float | None, share: float) -> float | None:
    """s for a switch at ``t_s``, None where there is none (beyond the grid, or at an end)."""
    return shift_for_share(t_s, share) if t_s is not None and 0.0 < t_s < 1.0 else None


def _intervals(u: SwitchUncertainty | None, share: float) -> dict[str, Any]:
    """The Advice fields that carry the switch time's bootstrap interval through to s and 1 / s."""
    if u is None:
        return {}
    s_lo, s_hi = _shift_or_none(u.lo, share), _shift_or_none(u.hi, share)
    return {
        "t_switch_se": u.se,
        "t_switch_interval": (u.lo, u.hi),
        "shift_interval": (s_lo, s_hi),
        "shift_reversed_interval": (None if s_hi is None else 1.0 / s_hi, None if s_lo is None else 1.0 / s_lo),
        "guidance_start_interval": (u.lo, u.hi),
    }


def _steps_before(t_switch: float, shift: float, steps: int) -> int:
    # a step [u_(i-1), u_i] lies before the switch when its end t'(u_i) does; a tiny tolerance
    # keeps a step that ends exactly on the switch (p K an integer) from flipping on rounding
    u = np.arange(1, steps + 1, dtype=np.float64) / steps
    return int(np.count_nonzero(shifted_time(u, shift) <= t_switch * (1.0 + 1e-12)))


def advise(
    curve: TransitionCurve,
    *,
    share: float = 0.5,
    steps: int = 50,
    switch: str = "99",
    guidance_end: float = 1.0,
) -> Advice:
    """Timestep shift and guidance interval for one transition curve.

    The navigation stage lasts until the posterior has collapsed, so by default the advice is
    anchored at t_switch_99 (top-1 >= 0.99); t_switch_50 is the middle of the switch, and steps
    put only before it would leave the second half of the transition coarse. When t_switch_99
    was never reached on the grid the advice falls back to t_switch_50 and says so.

    Args:
        curve: a measured (or loaded) transition curve.
        share: the share p of steps to place before the switch, 0 < p < 1.
        steps: K >= 1 sampling steps (for the step counts).
        switch: "99" or "50".
        guidance_end: t_hi of the guidance interval (default 1: guide from the switch to the end).
    """
    if switch not in SWITCH_LEVELS:
        raise ValueError(f"--switch must be one of {SWITCH_LEVELS}, got {switch!r}")
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    if not 0.0 < share < 1.0:
        raise ValueError(f"--share must lie strictly between 0 and 1, got {share}")
    if not 0.0 < guidance_end <= 1.0:
        raise ValueError(f"--guidance-end must lie in (0, 1], got {guidance_end}")
    key = f"t_switch_{switch}"
    t_s = getattr(curve, key)
    note = ""
    if t_s is None and switch == "99" and curve.t_switch_50 is not None:
        key, t_s = "t_switch_50", curve.t_switch_50
        note = "top-1 never reached 0.99 on the grid; anchored at t_switch_50"
    empty = dict(
        shift=None,
        shift_reversed=None,
        steps_before_switch_uniform=None,
        steps_before_switch_shifted=None,
        guidance_interval=None,
        guidance_interval_reversed=None,
    )
    if t_s is None:
        return Advice(curve.name, key, None, share, steps, note="the top-1 weight never reached the switch", **empty)
    if not 0.0 < t_s < 1.0:
        return Advice(
            curve.name, key, t_s, share, steps, note="switch at the grid's first point: refine the grid", **empty
        )
    s = shift_for_share(t_s, share)
    t_lo, t_hi = t_s, max(t_s, guidance_end)
    return Advice(
        dataset=curve.name,
        switch=key,
        t_switch=t_s,
        share=share,
        steps=steps,
        shift=s,
        shift_reversed=1.0 / s,
        steps_before_switch_uniform=_steps_before(t_s, 1.0, steps),
        steps_before_switch_shifted=_steps_before(t_s, s, steps),
        guidance_interval=(t_lo, t_hi),
        guidance_interval_reversed=(1.0 - t_hi, 1.0 - t_lo),
        note=note,
        **_intervals(curve.uncertainty.get(key), share),
    )


def format_advice_table(advice: list[Advice]) -> str:
    """A plain-text table of the advice, one row per data set."""
    head = (
        "data set", "switch", "t_s +- se", "shift s [95%]", "SD3 shift [95%]", "steps<t_s uniform", "shifted",
        "guidance (t)",
    )  # fmt: skip
    rows = [head]
    for a in advice:
        if a.shift is None:
            rows.append((a.dataset, a.switch, _fmt(a.t_switch), "-", "-", "-", "-", a.note or "-"))
            continue
        assert a.guidance_interval is not None and a.shift_reversed is not None
        se = "" if a.t_switch_se is None else f" +- {a.t_switch_se:.3f}"
        start = a.guidance_start_interval
        start_range = "" if start is None else f" (start {_range(start, '.3f')})"
        rows.append(
            (
                a.dataset,
                a.switch,
                _fmt(a.t_switch) + se,
                f"{a.shift:.3g}" + ("" if a.shift_interval is None else f" {_range(a.shift_interval, '.3g')}"),
                f"{a.shift_reversed:.3g}"
                + ("" if a.shift_reversed_interval is None else f" {_range(a.shift_reversed_interval, '.3g')}"),
                f"{a.steps_before_switch_uniform}/{a.steps}",
                f"{a.steps_before_switch_shifted}/{a.steps}",
                f"[{a.guidance_interval[0]:.3f}, {a.guidance_interval[1]:.3f}]{start_range}",
            )
        )
    return text_table(rows, left=True)


def _fmt(v: float | None) -> str:
    return "never" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def _range(interval: tuple[float | None, float | None], spec: str) -> str:
    """``[lo, hi]`` with "?" for an end that lies beyond the grid."""
    lo, hi = interval
    return f"[{'?' if lo is None else format(lo, spec)}, {'?' if hi is None else format(hi, spec)}]"
