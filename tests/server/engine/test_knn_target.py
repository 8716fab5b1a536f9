"""The kNN + uniform-tail estimate of the posterior mean, against float64 references written here:
exact when the neighbours and the tail cover the support, its sampling distribution against an
enumeration of every tail subset, the tail bound against the reference weights, near-exact in the
refinement stage, classes, leave-one-out, sample weights, an IVF index, and the oracle outputs."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from floworacle.paths import get_path
from floworacle_server.data import Dataset, build_index, load_index
from floworacle_server.engine import Guidance, OracleQuery, build_nearest_index, knn_oracle, knn_target
from floworacle_server.engine._knn_target import _draw_distinct, _tail_rows
from oracle_reference import oracle_reference, posterior_weights


def _clustered(n: int, d: int, seed: int, clusters: int = 6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = 3.0 * rng.standard_normal((clusters, d))
    return (centres[rng.integers(0, clusters, n)] + 0.7 * rng.standard_normal((n, d))).astype(np.float32)


def _queries(x: np.ndarray, t: float, m: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x1 = x[rng.integers(0, x.shape[0], m)].astype(np.float64)
    return t * x1 + (1.0 - t) * rng.standard_normal(x1.shape)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("t", [0.0, 0.3, 0.7, 0.95])
def test_exact_when_neighbours_and_tail_cover_the_support(t: float) -> None:
    x = _clustered(50, 5, 0)
    ds = Dataset.from_arrays("c", x)
    xt = _queries(x, t, 7, 1)
    ref = oracle_reference(x, xt, np.full(7, t), np.full(7, 1 - t), np.ones(7), -np.ones(7))
    for k, m in ((50, 0), (20, 30), (20, 100), (0, 50)):
        r = knn_target(ds, torch.from_numpy(xt), t, 1 - t, k=k, tail=m, exact=True, generator=_gen(0))
        np.testing.assert_allclose(r.x1_hat.numpy(), ref.x1_hat, rtol=0, atol=1e-12)
        assert (r.variance == 0).all()
        assert (r.population == 50 - r.neighbours).all()
        assert (r.neighbours == k).all()  # at alpha = 0 (t = 0) any k samples are the k nearest
        if k == 50:
            assert (r.neighbour_share == 1).all() and (r.tail_bound == 0).all()


def _enumerate(x: np.ndarray, xt: np.ndarray, t: float, k: int, m: int) -> tuple[np.ndarray, float]:
    """Exact mean (D,) and variance (trace) of the estimator for one query over every m-subset of the rest."""
    w = posterior_weights(x, xt[None], np.array([t]), np.array([1 - t]))[0]
    order = np.argsort(-w, kind="stable")
    nb, rest = order[:k], np.sort(order[k:])
    f = len(rest) / m
    xs = x.astype(np.float64)
    ests = []
    for sub in itertools.combinations(rest, m):
        sub = np.array(sub)
        num = (w[nb, None] * xs[nb]).sum(0) + f * (w[sub, None] * xs[sub]).sum(0)
        ests.append(num / (w[nb].sum() + f * w[sub].sum()))
    e = np.array(ests)
    mean = e.mean(0)
    return mean, float(((e - mean) ** 2).sum(1).mean())


def test_sampling_distribution_matches_an_enumeration_of_the_tail_subsets() -> None:
    x = _clustered(12, 3, 3, clusters=3)
    ds = Dataset.from_arrays("c", x)
    t, k, m = 0.45, 3, 3
    xt = _queries(x, t, 1, 4)[0]
    mean, var = _enumerate(x, xt, t, k, m)
    reps = 20000
    r = knn_target(ds, torch.from_numpy(np.tile(xt, (reps, 1))), t, 1 - t, k=k, tail=m, exact=True, generator=_gen(1))
    est = r.x1_hat.numpy()
    emp_mean = est.mean(0)
    emp_var = float(((est - emp_mean) ** 2).sum(1).mean())
    # every m-subset equally likely: mean within 5 standard errors, variance within 5 %
    assert np.all(np.abs(emp_mean - mean) < 5 * np.sqrt(var / reps))
    assert abs(emp_var / var - 1) < 0.05
    # the delta-method estimate follows the true variance (first order: within a factor 2 on average)
    ratio = float(r.variance.mean()) / var
    assert 0.5 < ratio < 2.0, ratio
    assert (r.neighbours == k).all() and (r.tail == m).all() and (r.population == 12 - k).all()


def test_bias_and_variance_fall_as_the_tail_grows() -> None:
    x = _clustered(400, 6, 5)
    ds = Dataset.from_arrays("c", x)
    t = 0.35
    xt = _queries(x, t, 1, 6)[0]
    ref = oracle_reference(x, xt[None], np.array([t]), np.array([1 - t]), np.ones(1), -np.ones(1)).x1_hat[0]
    reps = 3000
    mse = []
    for m in (8, 64, 256):
        r = knn_target(
            ds, torch.from_numpy(np.tile(xt, (reps, 1))), t, 1 - t, k=8, tail=m, exact=True, generator=_gen(m)
        )
        e = r.x1_hat.numpy()
        mse.append(float(((e - ref) ** 2).sum(1).mean()))
        emp = float(((e - e.mean(0)) ** 2).sum(1).mean())
        if m >= 64:  # first order: good once the tail holds enough of the weight's spread (low by ~2x at m = 8)
            assert 0.75 < float(r.variance.mean()) / emp < 1.33
    assert mse[0] > 3 * mse[1] > 9 * mse[2]


@pytest.mark.parametrize("t", [0.3, 0.6, 0.9])
def test_tail_bound_holds_and_refinement_is_near_exact(t: float) -> None:
    x = _clustered(300, 8, 7)
    ds = Dataset.from_arrays("c", x)
    b = 16
    xt = _queries(x, t, b, 8)
    w = posterior_weights(x, xt, np.full(b, t), np.full(b, 1 - t))
    ref = w @ x.astype(np.float64)
    r = knn_target(ds, torch.from_numpy(xt), t, 1 - t, k=16, tail=16, exact=True, generator=_gen(2))
    outside = 1.0 - np.sort(w, axis=1)[:, ::-1][:, :16].sum(1)
    assert np.all(outside <= r.tail_bound.numpy() * (1 + 1e-9) + 1e-15)
    if t == 0.9:  # refinement: the neighbours carry the posterior
        assert float(r.tail_bound.max()) < 1e-8
        assert float(r.neighbour_share.min()) > 1 - 1e-8
        assert np.abs(r.x1_hat.numpy() - ref).max() < 1e-7 * np.abs(ref).max()
        assert float(r.variance.max()) < 1e-12


def test_class_conditional_and_leave_one_out() -> None:
    x = _clustered(60, 4, 9)
    y = np.random.default_rng(10).integers(0, 3, 60)
    ds = Dataset.from_arrays("c", x, labels=y)
    t, b = 0.6, 9
    xt = _queries(x, t, b, 11)
    lab = np.array([0, 1, 2, -1, 0, 1, 2, -1, 0])
    excl = np.array([5, -1, 7, 3, -1, 20, -1, -1, 59])
    # class-conditional reference: the class's samples only, the excluded one left out
    ref = np.empty((b, 4))
    for q in range(b):
        keep = np.ones(60, bool) if lab[q] < 0 else y == lab[q]
        if excl[q] >= 0:
            keep[excl[q]] = False
        wq = posterior_weights(x[keep], xt[q : q + 1], np.array([t]), np.array([1 - t]))[0]
        ref[q] = wq @ x[keep].astype(np.float64)
    # k = N - 1 global neighbours (N - 1 is the most with an exclusion) and the one left; a tail that covers the rest
    for k, m in ((59, 1), (10, 60)):
        r = knn_target(ds, torch.from_numpy(xt), t, 1 - t, k=k, tail=m, labels=torch.from_numpy(lab),
                       exclude=torch.from_numpy(excl), exact=True, generator=_gen(3))  # fmt: skip
        np.testing.assert_allclose(r.x1_hat.numpy(), ref, rtol=0, atol=1e-12)
        assert (r.variance == 0).all()
    # a partial tail never draws another class or the excluded sample: the estimate stays in the class's hull
    r = knn_target(ds, torch.from_numpy(xt), t, 1 - t, k=2, tail=3, labels=torch.from_numpy(lab),
                   exclude=torch.from_numpy(excl), exact=True, generator=_gen(4))  # fmt: skip
    in_class = np.array([e >= 0 and (c < 0 or y[e] == c) for c, e in zip(lab, excl, strict=True)])
    sizes = np.array([(y == c).sum() if c >= 0 else 60 for c in lab]) - in_class
    assert np.all(r.population.numpy() + r.neighbours.numpy() == sizes)


def test_tail_rows_avoid_the_removed_rows_and_are_uniform() -> None:
    lo = torch.tensor([0, 10, 3])
    hi = torch.tensor([20, 30, 9])
    removed = torch.tensor([[0, 5, 19, -1], [10, 11, 29, 15], [3, 8, 4, -1]])
    ok = torch.tensor([[True, True, True, False], [True, True, True, True], [True, True, True, False]])
    rows, used, rest = _tail_rows(lo, hi, removed, ok, 6, _gen(5))
    assert rest.tolist() == [17, 16, 3]
    for q in range(3):
        got = rows[q][used[q]].tolist()
        allowed = set(range(int(lo[q]), int(hi[q]))) - set(removed[q][ok[q]].tolist())
        assert len(got) == len(set(got)) == min(6, len(allowed)) and set(got) <= allowed
    assert set(rows[2][used[2]].tolist()) == {5, 6, 7}  # a rest smaller than m is taken whole
    # both ways of drawing distinct positions: uniform counts over many draws
    for size in (40, 3_000_000):
        pos = _draw_distinct(torch.full((4000,), size), 5, _gen(6))
        s, _ = pos.sort(dim=1)
        assert (s[:, 1:] != s[:, :-1]).all() and int(pos.min()) >= 0 and int(pos.max()) < size
        if size == 40:
            counts = np.bincount(pos.flatten().numpy(), minlength=40)
            expect = 4000 * 5 / 40
            assert np.abs(counts - expect).max() < 5 * np.sqrt(expect)


def test_sample_weights_enter_the_logits() -> None:
    x = _clustered(40, 3, 12)
    p = np.random.default_rng(13).uniform(0.1, 2.0, 40)
    ds = Dataset.from_arrays("w", x, weights=p)
    t, b = 0.5, 6
    xt = _queries(x, t, b, 14)
    ref = oracle_reference(x, xt, np.full(b, t), np.full(b, 1 - t), np.ones(b), -np.ones(b), weights=p)
    r = knn_target(ds, torch.from_numpy(xt), t, 1 - t, k=10, tail=40, exact=True, generator=_gen(7))
    np.testing.assert_allclose(r.x1_hat.numpy(), ref.x1_hat, rtol=0, atol=1e-12)
    # the bound uses the posterior order (weights included): still a bound
    r = knn_target(ds, torch.from_numpy(xt), t, 1 - t, k=10, tail=0, exact=True)
    top = np.sort(ref.weights, axis=1)[:, ::-1][:, :10].sum(1)
    assert np.all(1 - top <= r.tail_bound.numpy() * (1 + 1e-9) + 1e-15)


def test_oracle_outputs_and_guidance() -> None:
    x = _clustered(30, 4, 15)
    y = np.arange(30) % 2
    ds = Dataset.from_arrays("g", x, labels=y)
    b = 5
    t = np.array([0.2, 0.4, 0.5, 0.7, 0.9])
    xt = np.stack([_queries(x, float(tt), 1, 16 + i)[0] for i, tt in enumerate(t)])
    path = get_path("cosine")
    c = path.coefficients(t)
    lab = np.array([0, 1, -1, 1, 0])
    q = OracleQuery(
        x_t=torch.from_numpy(xt), coeffs=c, t=torch.from_numpy(t), labels=torch.from_numpy(lab),
        guidance=Guidance(2.5, 0.3, 0.8), outputs=("velocity", "x1_hat", "eps_hat", "score"),
    )  # fmt: skip
    got = knn_oracle(ds, q, k=29, tail=30, exact=True, generator=_gen(8))
    # reference: unconditional and class posteriors, combined where guided (t in [0.3, 0.8], label >= 0)
    x64 = x.astype(np.float64)
    x1 = np.empty((b, 4))
    for i in range(b):
        a, s = c.alpha[i : i + 1], c.sigma[i : i + 1]
        u = posterior_weights(x, xt[i : i + 1], a, s)[0] @ x64
        if lab[i] < 0:
            x1[i] = u
            continue
        cond = posterior_weights(x[y == lab[i]], xt[i : i + 1], a, s)[0] @ x64[y == lab[i]]
        x1[i] = u + 2.5 * (cond - u) if 0.3 <= t[i] <= 0.8 else cond
    a_t, b_t = c.velocity_x1[:, None], c.velocity_xt[:, None]
    res = got.result
    assert res.x1_hat_error_bound is None and res.velocity_error_bound is None  # no exactness claimed
    np.testing.assert_allclose(res.x1_hat.numpy(), x1, rtol=0, atol=1e-12)
    assert res.velocity is not None and res.eps_hat is not None and res.score is not None
    np.testing.assert_allclose(res.velocity.numpy(), a_t * x1 + b_t * xt, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(res.eps_hat.numpy(), (xt - c.alpha[:, None] * x1) / c.sigma[:, None], rtol=1e-12)
    np.testing.assert_allclose(res.score.numpy(), (c.alpha[:, None] * x1 - xt) / c.sigma[:, None] ** 2, rtol=1e-12)
    assert (got.velocity_variance == 0).all()
    with pytest.raises(ValueError, match="whole posterior"):
        knn_oracle(ds, OracleQuery(x_t=torch.from_numpy(xt), coeffs=c, outputs=("velocity", "entropy")), k=4, tail=4)


def test_rejects_bad_arguments() -> None:
    ds = Dataset.from_arrays("c", _clustered(20, 3, 17))
    xt = torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="k \\+ tail >= 1"):
        knn_target(ds, xt, 0.5, 0.5, k=0, tail=0)
    with pytest.raises(ValueError, match="sigma > 0"):
        knn_target(ds, xt, 0.5, 0.0, k=2, tail=2)
    with pytest.raises(ValueError, match="shape"):
        knn_target(ds, torch.zeros(2, 4), 0.5, 0.5, k=2, tail=2)
    with pytest.raises(ValueError, match="exclude"):
        knn_target(ds, xt, 0.5, 0.5, k=2, tail=2, exclude=torch.tensor([0, 20]))
    with pytest.raises(ValueError, match="no labels"):
        knn_target(ds, xt, 0.5, 0.5, k=2, tail=2, labels=torch.tensor([0, -1]))


def _rows(ds: Dataset, xt: np.ndarray, t: float, exact: bool) -> list[list[int]]:
    from floworacle_server.engine import posterior_nearest

    return posterior_nearest(ds, torch.from_numpy(xt), t, 1 - t, k=32, exact=exact).indices.tolist()


def test_through_an_ivf_index(tmp_path: Path) -> None:
    x = _clustered(3000, 16, 18, clusters=30)
    build_index(x, tmp_path / "idx", progress=False)
    build_nearest_index(tmp_path / "idx", "ivf:nlist=32,queries=200", progress=False)
    ds = load_index(tmp_path / "idx")
    b = 12
    for t, tol in ((0.9, 1e-9), (0.5, None)):
        xt = _queries(x, t, b, 19)
        r = knn_target(ds, torch.from_numpy(xt), t, 1 - t, k=32, tail=64, exact=False, generator=_gen(9))
        assert r.approximate
        ref = posterior_weights(x, xt, np.full(b, t), np.full(b, 1 - t)) @ x.astype(np.float64)
        err = np.abs(r.x1_hat.numpy() - ref).max() / np.abs(ref).max()
        # where the index found the true k nearest, its tail bound is the certified one
        w = posterior_weights(x, xt, np.full(b, t), np.full(b, 1 - t))
        exact = knn_target(ds, torch.from_numpy(xt), t, 1 - t, k=32, tail=64, exact=True, generator=_gen(9))
        same = np.array(
            [set(a) == set(c) for a, c in zip(_rows(ds, xt, t, False), _rows(ds, xt, t, True), strict=True)]
        )
        assert same.sum() >= b // 2
        np.testing.assert_allclose(r.tail_bound.numpy()[same], exact.tail_bound.numpy()[same], rtol=1e-12)
        outside = 1 - np.sort(w, axis=1)[:, ::-1][:, :32].sum(1)
        assert np.all(outside[same] <= r.tail_bound.numpy()[same] * (1 + 1e-9) + 1e-15)
        if tol is not None:
            assert err < tol and float(r.neighbour_share.min()) > 1 - 1e-9
        else:  # the estimate is an estimate: its error is of the order its variance says
            per_q = ((r.x1_hat.numpy() - ref) ** 2).sum(1)
            assert per_q.mean() < 10 * float(r.variance.mean()) + 1e-12
