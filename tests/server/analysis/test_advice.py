"""The timestep-shift formula and the advice built on it."""

from __future__ import annotations

import numpy as np
import pytest

from floworacle_server.analysis import (
    TransitionCurve,
    advise,
    format_advice_table,
    share_before,
    shift_for_share,
    shifted_time,
)


@pytest.mark.parametrize("t_s", [0.01, 0.1, 0.35, 0.5, 0.8, 0.97])
@pytest.mark.parametrize("share", [0.05, 0.3, 0.5, 0.75, 0.95])
def test_shift_puts_the_share_of_steps_before_the_switch(t_s: float, share: float) -> None:
    s = shift_for_share(t_s, share)
    assert s > 0
    # closed form inverted: the step position u = share maps exactly onto the switch
    assert shifted_time(share, s) == pytest.approx(t_s, rel=1e-12)
    assert share_before(t_s, s) == pytest.approx(share, rel=1e-12)
    # and by counting: of many uniform steps, the share whose shifted time is below t_s
    u = (np.arange(200_000) + 0.5) / 200_000
    assert np.mean(shifted_time(u, s) < t_s) == pytest.approx(share, abs=1e-5)
    # the map is a bijection of [0, 1] that keeps the ends
    assert shifted_time(0.0, s) == 0.0 and shifted_time(1.0, s) == pytest.approx(1.0)


def test_shift_direction_and_identity() -> None:
    # a switch early in t needs s < 1 (steps pushed toward noise); share = t_s needs no shift
    assert shift_for_share(0.1, 0.5) == pytest.approx(0.1 * 0.5 / (0.5 * 0.9))
    assert shift_for_share(0.1, 0.5) < 1.0
    assert shift_for_share(0.3, 0.3) == pytest.approx(1.0)
    assert shift_for_share(0.8, 0.5) > 1.0


def test_reversed_convention_shift_is_the_inverse() -> None:
    # SD3 / Flux: sigma = 1 - t, sigma' = k sigma / (1 + (k - 1) sigma) with k = 1 / s
    s = shift_for_share(0.12, 0.5)
    k = 1.0 / s
    u = np.linspace(0.0, 1.0, 101)
    sigma = 1.0 - u
    np.testing.assert_allclose(1.0 - shifted_time(u, s), k * sigma / (1.0 + (k - 1.0) * sigma), atol=1e-14)


@pytest.mark.parametrize("bad", [(0.0, 0.5), (1.0, 0.5), (0.5, 0.0), (0.5, 1.0), (-0.1, 0.5)])
def test_shift_rejects_out_of_range(bad: tuple[float, float]) -> None:
    with pytest.raises(ValueError):
        shift_for_share(*bad)


def _curve(t50: float | None, t99: float | None) -> TransitionCurve:
    t = np.array([0.1, 0.5, 0.9])
    return TransitionCurve("toy", 10, 4, None, t, {}, t50, t99)


def test_advice_counts_steps_and_sets_the_guidance_interval() -> None:
    a = advise(_curve(0.1, 0.2), share=0.5, steps=50)
    assert a.switch == "t_switch_99" and a.t_switch == 0.2
    assert a.shift == pytest.approx(0.2 * 0.5 / (0.5 * 0.8))
    assert a.shift_reversed == pytest.approx(1.0 / a.shift)
    assert a.steps_before_switch_uniform == 10  # 0.2 of 50 uniform steps
    assert a.steps_before_switch_shifted == 25  # half of them after the shift
    assert a.guidance_interval == (0.2, 1.0)
    assert a.guidance_interval_reversed == pytest.approx((0.0, 0.8))
    b = advise(_curve(0.1, 0.2), share=0.3, steps=10, switch="50", guidance_end=0.6)
    assert b.t_switch == 0.1 and b.steps_before_switch_shifted == 3 and b.guidance_interval == (0.1, 0.6)
    assert set(a.to_json()) >= {"shift", "shift_reversed", "guidance_interval", "t_switch", "switch"}


def test_advice_falls_back_and_says_why() -> None:
    a = advise(_curve(0.4, None))
    assert a.switch == "t_switch_50" and a.t_switch == 0.4 and a.shift is not None and "0.99" in a.note
    none = advise(_curve(None, None))
    assert none.shift is None and none.guidance_interval is None and none.note
    with pytest.raises(ValueError):
        advise(_curve(0.1, 0.2), share=1.5)
    with pytest.raises(ValueError):
        advise(_curve(0.1, 0.2), switch="90")


def test_advice_carries_the_switch_interval_to_the_shift_and_guidance() -> None:
    from floworacle_server.analysis import SwitchUncertainty

    c = _curve(0.1, 0.2)
    c.uncertainty["t_switch_99"] = SwitchUncertainty(se=0.01, lo=0.18, hi=0.23, never=0.0, resamples=400)
    a = advise(c, share=0.5)
    assert a.t_switch_se == 0.01 and a.t_switch_interval == (0.18, 0.23)
    s_lo, s_hi = (tl * 0.5 / (0.5 * (1 - tl)) for tl in (0.18, 0.23))  # s = t (1 - p) / (p (1 - t))
    assert a.shift_interval == pytest.approx((s_lo, s_hi)) and s_lo < a.shift < s_hi
    assert a.shift_reversed_interval == pytest.approx((1 / s_hi, 1 / s_lo))
    assert a.guidance_start_interval == (0.18, 0.23)
    assert a.to_json()["shift_interval"] == pytest.approx([s_lo, s_hi])
    c.uncertainty["t_switch_99"] = SwitchUncertainty(se=0.05, lo=0.15, hi=None, never=0.1, resamples=400)
    open_ended = advise(c)
    assert open_ended.shift_interval is not None and open_ended.shift_interval[1] is None
    assert "?" in format_advice_table([open_ended])
