"""Paths and parameterisation conversions: analytic coefficients, round trips in float64,
the singular-end policy and the reversed (SD3 / Flux) convention."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from floworacle.paths import (
    SIGMA_FLOOR,
    PathCoefficients,
    custom_coefficients,
    eps_from_x1,
    get_path,
    reversed_to_t,
    score_from_x1,
    t_to_reversed,
    velocity_from_reversed,
    velocity_from_x1,
    velocity_to_reversed,
    x1_from_eps,
    x1_from_velocity,
)


def test_linear_and_cosine_coefficients_are_the_textbook_ones() -> None:
    t = np.array([0.0, 0.25, 0.5, 0.9])
    lin = get_path("linear").coefficients(t)
    np.testing.assert_array_equal(lin.alpha, t)
    np.testing.assert_array_equal(lin.sigma, 1 - t)
    np.testing.assert_array_equal(lin.d_alpha, 1.0)
    np.testing.assert_array_equal(lin.d_sigma, -1.0)
    ot = get_path("linear", sigma_min=0.01).coefficients(t)
    np.testing.assert_allclose(ot.sigma, 1 - 0.99 * t)
    cos = get_path("cosine").coefficients(t)
    np.testing.assert_allclose(cos.alpha, np.sin(np.pi * t / 2))
    np.testing.assert_allclose(cos.d_sigma, -np.pi / 2 * np.sin(np.pi * t / 2))
    # derivatives are the derivatives: central differences
    h = 1e-6
    for path in (get_path("linear", sigma_min=0.01), get_path("cosine")):
        up, dn = path.coefficients(t[1:] + h), path.coefficients(t[1:] - h)
        c = path.coefficients(t[1:])
        np.testing.assert_allclose((up.alpha - dn.alpha) / (2 * h), c.d_alpha, rtol=1e-6)
        np.testing.assert_allclose((up.sigma - dn.sigma) / (2 * h), c.d_sigma, rtol=1e-6, atol=1e-9)


def test_linear_velocity_is_x1_minus_x0_and_oracle_form() -> None:
    rng = np.random.default_rng(0)
    x1, x0 = rng.standard_normal((2, 5, 7))
    t = rng.uniform(0, 0.99, 5)
    c = get_path("linear").coefficients(t)
    xt = t[:, None] * x1 + (1 - t[:, None]) * x0
    np.testing.assert_allclose(velocity_from_x1(x1, xt, c), x1 - x0, atol=1e-12)
    np.testing.assert_allclose(velocity_from_x1(x1, xt, c), (x1 - xt) / (1 - t[:, None]), atol=1e-12)
    np.testing.assert_allclose(eps_from_x1(x1, xt, c), x0, atol=1e-12)
    np.testing.assert_allclose(score_from_x1(x1, xt, c), -x0 / (1 - t[:, None]), atol=1e-12)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_round_trips_in_float64_numpy_and_torch(name: str) -> None:
    rng = np.random.default_rng(1)
    t = rng.uniform(0.01, 0.99, 6)
    c = get_path(name).coefficients(t)
    x1, xt = rng.standard_normal((2, 6, 3, 4))
    u = velocity_from_x1(x1, xt, c)
    np.testing.assert_allclose(x1_from_velocity(u, xt, c), x1, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(x1_from_eps(eps_from_x1(x1, xt, c), xt, c), x1, rtol=1e-10, atol=1e-12)
    tu = velocity_from_x1(torch.from_numpy(x1), torch.from_numpy(xt), c)
    assert isinstance(tu, torch.Tensor) and tu.dtype == torch.float64
    np.testing.assert_allclose(tu.numpy(), u, rtol=1e-12)


def test_reversed_convention_maps_time_and_negates_the_velocity() -> None:
    rng = np.random.default_rng(2)
    x_data, noise = rng.standard_normal((2, 4, 3))
    s = np.array([0.1, 0.4, 0.7, 0.95])
    x_s = (1 - s[:, None]) * x_data + s[:, None] * noise  # SD3 / Flux forward process
    t = reversed_to_t(s)
    c = get_path("linear").coefficients(t)
    ours = velocity_from_x1(x_data, x_s, c)  # x_s is our x_t at t = 1 - s
    np.testing.assert_allclose(velocity_to_reversed(ours), noise - x_data, atol=1e-12)
    np.testing.assert_allclose(velocity_from_reversed(noise - x_data), ours, atol=1e-12)
    np.testing.assert_allclose(t_to_reversed(t), s)


def test_singular_end_policy_and_bad_times() -> None:
    lin = get_path("linear")
    assert lin.t_max == pytest.approx(1 - SIGMA_FLOOR)
    lin.coefficients(np.array([0.0, 0.999, lin.t_max]))
    for bad in (1.0, -0.1, math.nan, 1.5):
        with pytest.raises(ValueError, match="t\\[0\\]"):
            lin.coefficients(np.array([bad]))
    # with sigma_min >= the floor, t = 1 is allowed and finite
    c = get_path("linear", sigma_min=1e-3).coefficients(np.array([1.0]))
    assert c.sigma[0] == pytest.approx(1e-3) and np.isfinite(c.velocity_x1).all()
    cos = get_path("cosine")
    assert math.cos(math.pi * cos.t_max / 2) == pytest.approx(SIGMA_FLOOR)
    with pytest.raises(ValueError, match="unknown path"):
        get_path("vp")
    with pytest.raises(ValueError, match="sigma_min"):
        get_path("cosine", sigma_min=0.1)


def test_custom_coefficients_are_validated() -> None:
    ok = custom_coefficients([0.5, 0.2], [0.5, 0.9], [1, 1], [-1, -1])
    assert len(ok) == 2 and ok.take(np.array([1])).sigma[0] == 0.9
    with pytest.raises(ValueError, match="below the floor"):
        custom_coefficients([0.5], [0.0], [1], [-1])
    with pytest.raises(ValueError, match="negative"):
        custom_coefficients([-0.5], [0.5], [1], [-1])
    with pytest.raises(ValueError, match="not finite"):
        custom_coefficients([0.5], [0.5], [math.inf], [-1])
    with pytest.raises(ValueError, match="one length"):
        PathCoefficients(np.zeros(2), np.ones(3), np.ones(2), np.ones(2))
