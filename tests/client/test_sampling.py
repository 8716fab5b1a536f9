"""floworacle.sampling: the mixed integrator (oracle up to a switch time, model after it) against
hand-written Euler and midpoint loops, its ends (switch 0 = the model alone, switch at the grid's
end = the oracle alone), the split of the grid, torch inputs and bad switches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from floworacle.sampling import integrate, integrate_mixed, split_grid, time_grid


def _oracle(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    return np.sin(3.0 * x) - t[:, None] * x


def _model(x: np.ndarray, t: np.ndarray) -> np.ndarray:
    return 0.5 * x * x - np.cos(t)[:, None]


def _x0() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((5, 3))


def test_split_grid() -> None:
    g = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
    a, b = split_grid(g, 0.6)
    np.testing.assert_array_equal(a, [0.0, 0.25, 0.5, 0.6])
    np.testing.assert_array_equal(b, [0.6, 0.75, 1.0])
    a, b = split_grid(g, 0.5)  # on a grid point: no extra step
    np.testing.assert_array_equal(a, [0.0, 0.25, 0.5])
    np.testing.assert_array_equal(b, [0.5, 0.75, 1.0])
    assert split_grid(g, 0.0)[0].tolist() == [0.0] and split_grid(g, 1.0)[1].tolist() == [1.0]


def test_ends_are_the_model_alone_and_the_oracle_alone() -> None:
    x0 = _x0()
    for method in ("euler", "midpoint", "heun"):
        model_only = integrate(_model, x0, steps=7, method=method)
        oracle_only = integrate(_oracle, x0, steps=7, method=method)
        np.testing.assert_array_equal(integrate_mixed(_oracle, _model, x0, 0.0, steps=7, method=method), model_only)
        np.testing.assert_array_equal(integrate_mixed(_oracle, _model, x0, 1.0, steps=7, method=method), oracle_only)
        assert np.abs(model_only - oracle_only).max() > 0.1  # the two fields differ, so the test can tell


@pytest.mark.parametrize("switch", [0.3, float(time_grid(5)[2]), 0.55])
def test_euler_against_a_hand_written_loop(switch: float) -> None:
    x0 = _x0()
    got = integrate_mixed(_oracle, _model, x0, switch, steps=5, method="euler")
    grid = [(1.0 - 1e-4) * i / 5 for i in range(6)]  # the default grid: 5 uniform steps to 1 - 1e-4
    if switch not in grid:
        grid = sorted([*grid, switch])
    x = x0.copy()
    for t0, t1 in zip(grid[:-1], grid[1:], strict=True):
        f = _oracle if t0 < switch else _model
        x = x + (t1 - t0) * f(x, np.full(5, t0))
    np.testing.assert_allclose(got, x, rtol=1e-15, atol=1e-15)


def test_midpoint_steps_stay_on_their_side_of_the_switch() -> None:
    calls: dict[str, list[float]] = {"oracle": [], "model": []}

    def oracle(x: np.ndarray, t: np.ndarray) -> np.ndarray:
        calls["oracle"].extend(t.tolist())
        return _oracle(x, t)

    def model(x: np.ndarray, t: np.ndarray) -> np.ndarray:
        calls["model"].extend(t.tolist())
        return _model(x, t)

    x0 = _x0()
    got = integrate_mixed(oracle, model, x0, 0.37, steps=6, method="midpoint", shift=3.0)
    assert max(calls["oracle"]) < 0.37 <= min(calls["model"])
    # the same as integrating the two pieces of the shifted grid by hand
    g = time_grid(6, shift=3.0)
    first, second = split_grid(g, 0.37)
    x = x0.copy()
    for piece, f in ((first, _oracle), (second, _model)):
        for t0, t1 in zip(piece[:-1], piece[1:], strict=True):
            h = t1 - t0
            x = x + h * f(x + 0.5 * h * f(x, np.full(5, t0)), np.full(5, t0 + 0.5 * h))
    np.testing.assert_allclose(got, x, rtol=1e-14, atol=1e-14)


def test_torch_inputs_and_bad_switches() -> None:
    x0 = torch.from_numpy(_x0())
    got = integrate_mixed(lambda x, t: -x, lambda x, t: x * t[:, None], x0, 0.5, steps=4, method="heun")
    assert isinstance(got, torch.Tensor) and got.shape == x0.shape
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        integrate_mixed(_oracle, _model, _x0(), 1.5)
    with pytest.raises(ValueError, match="method"):
        integrate_mixed(_oracle, _model, _x0(), 0.5, method="rk4")
