"""Transition curves against an independent float64 brute force, switch times, and their D / N trend."""

from __future__ import annotations

import numpy as np
import pytest
from analysis_reference import linear_diagnostics

from floworacle_server.analysis import (
    TransitionCurve,
    make_queries,
    parse_t_grid,
    switch_time,
    switch_times,
    switch_uncertainty,
    synthetic_dataset,
    transition_curve,
)
from floworacle_server.data import Dataset

T_GRID = np.array([0.05, 0.3, 0.5, 0.7, 0.85, 0.95])


@pytest.fixture(scope="module")
def small() -> tuple[Dataset, np.ndarray, np.ndarray]:
    """N = 60 clustered samples in D = 5 with 3 classes, labels shuffled so rows != caller's order."""
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 3, size=60)
    x = (rng.standard_normal((60, 5)) * 0.5 + labels[:, None] * 1.5).astype(np.float32)
    return Dataset.from_arrays("small", x, labels), x, labels


def test_queries_are_training_rows_and_seeded(small: tuple[Dataset, np.ndarray, np.ndarray]) -> None:
    ds, x, labels = small
    a = make_queries(ds, 20, seed=3)
    b = make_queries(ds, 20, seed=3)
    c = make_queries(ds, 20, seed=4)
    np.testing.assert_array_equal(a.x1, b.x1)
    np.testing.assert_array_equal(a.x0, b.x0)
    assert not np.array_equal(a.x0, c.x0)
    # every x1 is a training sample (M <= N: drawn without replacement)
    for row in a.x1:
        assert np.any(np.all(x.astype(np.float64) == row, axis=1))
    assert len(set(a.rows.tolist())) == 20
    q = make_queries(ds, 10, seed=0, label=2)
    assert q.labels is not None and (q.labels == 2).all()
    cls = x[labels == 2].astype(np.float64)
    for row in q.x1:
        assert np.any(np.all(cls == row, axis=1))


def test_curves_match_float64_brute_force(small: tuple[Dataset, np.ndarray, np.ndarray]) -> None:
    ds, x, _ = small
    curve = transition_curve(ds, T_GRID, queries_per_t=24, seed=11)
    qs = make_queries(ds, 24, seed=11)  # the same seed: the same queries
    for j, t in enumerate(T_GRID):
        ref = linear_diagnostics(x, qs.x1, qs.x0, float(t))
        np.testing.assert_allclose(curve.values["top1"][j], ref.top1, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(curve.values["entropy"][j], ref.entropy, rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(curve.values["ess"][j], ref.ess, rtol=1e-10)
        np.testing.assert_allclose(curve.values["gap"][j], ref.gap, rtol=1e-7, atol=1e-22)
        # the summaries are the mean, population std and quantiles of those values
        for metric, vals in (("top1", ref.top1), ("entropy", ref.entropy), ("ess", ref.ess)):
            s = curve.stats[metric]
            assert s["mean"][j] == pytest.approx(vals.mean(), rel=1e-9, abs=1e-12)
            assert s["std"][j] == pytest.approx(vals.std(), rel=1e-6, abs=1e-9)
            assert s["q10"][j] == pytest.approx(np.quantile(vals, 0.1), rel=1e-9, abs=1e-12)
            assert s["q50"][j] == pytest.approx(np.median(vals), rel=1e-9, abs=1e-12)
            assert s["q90"][j] == pytest.approx(np.quantile(vals, 0.9), rel=1e-9, abs=1e-12)
    # the posterior starts spread out and collapses onto the query's own sample
    top1 = curve.stats["top1"]["mean"]
    assert top1[0] < 0.2 and top1[-1] > 0.99
    assert curve.t_switch_50 == pytest.approx(switch_time(T_GRID, top1, 0.5))
    assert curve.num_samples == 60 and curve.dim == 5 and curve.label is None


def test_class_conditional_curves_use_the_class_only(small: tuple[Dataset, np.ndarray, np.ndarray]) -> None:
    ds, x, labels = small
    curve = transition_curve(ds, T_GRID, queries_per_t=12, seed=5, label=1)
    qs = make_queries(ds, 12, seed=5, label=1)
    cls = x[labels == 1]
    assert curve.num_samples == cls.shape[0] and curve.label == 1
    for j, t in enumerate(T_GRID):
        ref = linear_diagnostics(cls, qs.x1, qs.x0, float(t))
        np.testing.assert_allclose(curve.values["top1"][j], ref.top1, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(curve.values["ess"][j], ref.ess, rtol=1e-10)
        np.testing.assert_allclose(curve.values["gap"][j], ref.gap, rtol=1e-7, atol=1e-22)


def test_switch_time_interpolates_linearly() -> None:
    t = np.array([0.1, 0.2, 0.4, 0.8])
    c = np.array([0.0, 0.4, 0.6, 1.0])
    assert switch_time(t, c, 0.5) == pytest.approx(0.3)  # halfway between 0.2 and 0.4
    assert switch_time(t, c, 0.99) == pytest.approx(0.4 + 0.39 / 0.4 * 0.4)
    assert switch_time(t, c, 0.6) == pytest.approx(0.4)  # reached exactly on a grid point
    assert switch_time(t, c * 0.9, 0.99) is None  # never reached
    assert switch_time(t, c + 0.7, 0.5) == pytest.approx(0.1)  # already above at the first point
    # the first crossing counts, even if the curve dips afterwards
    assert switch_time(t, np.array([0.0, 0.6, 0.4, 1.0]), 0.5) == pytest.approx(0.1 + 0.5 / 0.6 * 0.1)


def test_parse_t_grid() -> None:
    g = parse_t_grid("logit:-2:2:5")
    np.testing.assert_allclose(g, 1.0 / (1.0 + np.exp(-np.linspace(-2, 2, 5))))
    np.testing.assert_allclose(parse_t_grid("linspace:0.1:0.5:5"), [0.1, 0.2, 0.3, 0.4, 0.5])
    np.testing.assert_allclose(parse_t_grid("0.5, 0.1,0.5"), [0.1, 0.5])
    for bad in ("", "0.5", "logit:1:2", "abc", "linspace:0:1:1"):
        with pytest.raises(ValueError):
            parse_t_grid(bad)
    with pytest.raises(ValueError, match="must lie in"):
        parse_t_grid("0.1,1.0", t_max=0.9999)


def _switch(n: int, d: int) -> float:
    ds = synthetic_dataset(n, d, seed=1)
    curve = transition_curve(ds, np.linspace(0.02, 0.98, 25), queries_per_t=48, seed=2)
    assert curve.t_switch_50 is not None
    return curve.t_switch_50


def test_switch_is_earlier_for_higher_dimension() -> None:
    # separation grows like D while the posterior needs ~ log N nats: a clear, robust gap
    t4, t32, t256 = _switch(200, 4), _switch(200, 32), _switch(200, 256)
    assert t256 < t32 - 0.05 and t32 < t4 - 0.1


def test_switch_is_later_for_more_samples() -> None:
    t_small, t_large = _switch(20, 16), _switch(2000, 16)
    assert t_large > t_small + 0.05


def test_synthetic_data_is_unit_gaussian_and_seeded() -> None:
    a = synthetic_dataset(4000, 8, seed=0)
    b = synthetic_dataset(4000, 8, seed=0)
    assert a.fingerprint == b.fingerprint != synthetic_dataset(4000, 8, seed=1).fingerprint
    x = a.x.double().numpy()
    assert abs(x.mean()) < 0.02 and abs(x.std() - 1.0) < 0.02


# -- the uncertainty of a switch time ---------------------------------------------------------------


def test_switch_times_of_many_curves_equal_the_scalar_rule() -> None:
    rng = np.random.default_rng(3)
    t = np.sort(rng.uniform(0, 1, 12))
    curves = np.sort(rng.uniform(0, 1, (50, 12)), axis=1)
    curves[0] = 0.2  # never reaches
    curves[1] = 0.9  # at the first point already
    for level in (0.5, 0.8):
        got = switch_times(t, curves, level)
        want = [switch_time(t, c, level) for c in curves]
        assert np.array_equal(np.isnan(got), [w is None for w in want])
        np.testing.assert_allclose(got[~np.isnan(got)], [w for w in want if w is not None], rtol=0, atol=1e-15)


def test_the_bootstrap_spread_matches_the_spread_over_seeds() -> None:
    """The standard error must predict how far a measurement with another seed lands: over 24
    seeds, the spread of each switch time and the mean bootstrap se agree within a factor 1.6
    (on digits, M = 128: 0.0054 / 0.0121 over seeds vs 0.0058 / 0.0112 bootstrap)."""
    ds = synthetic_dataset(300, 12, seed=4)
    grid = parse_t_grid("logit:-3:4:29")
    times: dict[str, list[float]] = {"t_switch_50": [], "t_switch_99": []}
    ses: dict[str, list[float]] = {"t_switch_50": [], "t_switch_99": []}
    for seed in range(24):
        c = transition_curve(ds, grid, queries_per_t=48, seed=seed)
        for key in times:
            value, u = getattr(c, key), c.uncertainty[key]
            assert value is not None and u.se is not None and u.lo is not None and u.hi is not None
            assert u.lo <= value <= u.hi
            times[key].append(value)
            ses[key].append(u.se)
    for key in times:
        spread, predicted = float(np.std(times[key], ddof=1)), float(np.mean(ses[key]))
        assert 1 / 1.6 < predicted / spread < 1.6, (key, spread, predicted)


def test_more_queries_until_the_target_standard_error() -> None:
    ds = synthetic_dataset(300, 12, seed=4)
    grid = parse_t_grid("logit:-3:4:29")
    fixed = transition_curve(ds, grid, queries_per_t=32, seed=1)
    assert fixed.queries == 32 and fixed.uncertainty["t_switch_99"].se > 0.01  # too few for 0.01
    grown = transition_curve(ds, grid, queries_per_t=32, seed=1, target_se=0.01, max_queries=2000)
    assert 32 < grown.queries < 2000 and grown.values["top1"].shape == (grid.size, grown.queries)
    assert all(u.se is not None and u.se <= 0.01 for u in grown.uncertainty.values())
    # the first batch is the fixed measurement's queries: the adaptive one only adds to them
    np.testing.assert_array_equal(grown.values["top1"][:, :32], fixed.values["top1"])
    capped = transition_curve(ds, grid, queries_per_t=32, seed=1, target_se=1e-4, max_queries=80)
    assert capped.queries == 80
    # the uncertainty travels through JSON
    back = TransitionCurve.from_json(grown.to_json())
    assert back.queries == grown.queries and back.uncertainty == grown.uncertainty


def test_a_switch_that_resamples_may_miss_has_an_open_interval() -> None:
    t = np.array([0.1, 0.5, 0.9])
    top1 = np.array([[0.1] * 10, [0.5] * 10, [1.0] * 9 + [0.85]])  # the mean just reaches 0.985 at the end
    u = switch_uncertainty(t, top1, 0.98, resamples=200)
    assert u.never > 0.025 and u.hi is None and u.lo is not None
