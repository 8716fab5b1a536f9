"""The exact oracle against the independent float64 reference, and its mathematical properties."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from floworacle.paths import PathCoefficients, custom_coefficients, get_path
from floworacle_server.data import Dataset
from floworacle_server.engine import CPU, Guidance, OracleQuery, compute_partials, oracle
from oracle_reference import oracle_reference, rel_err

ALL = ("velocity", "x1_hat", "eps_hat", "score", "topk", "entropy", "ess", "variance")


def _queries(rng: np.random.Generator, X: np.ndarray, t: np.ndarray, coeffs: PathCoefficients) -> np.ndarray:
    x1 = X[rng.integers(0, len(X), len(t))].astype(np.float64)
    x0 = rng.standard_normal(x1.shape)
    return coeffs.alpha[:, None] * x1 + coeffs.sigma[:, None] * x0


def _near_ties(rng: np.random.Generator, X: np.ndarray, coeffs: PathCoefficients, k: int = 2) -> np.ndarray:
    """Queries on the way to the midpoint of k samples: nearly equidistant from all of them."""
    out = []
    for b in range(len(coeffs)):
        idx = rng.choice(len(X), size=k, replace=False)
        mid = X[idx].astype(np.float64).mean(axis=0)
        out.append(coeffs.alpha[b] * mid + coeffs.sigma[b] * 1e-3 * rng.standard_normal(X.shape[1]))
    return np.array(out)


def _check(res, ref, tol: float = 1e-5) -> None:
    for name in ("velocity", "x1_hat", "eps_hat", "score"):
        got = getattr(res, name).cpu().numpy()
        assert rel_err(got, getattr(ref, name)) <= tol, name
    # the reported bound really bounds the error
    err = np.abs(res.velocity.cpu().numpy() - ref.velocity).max(axis=1)
    assert (err <= res.velocity_error_bound.cpu().numpy() * (1 + 1e-9) + 1e-300).all()


@pytest.mark.parametrize(
    "path",
    [get_path("linear"), get_path("linear", sigma_min=1e-3), get_path("cosine")],
    ids=["linear", "linear-sigma_min", "cosine"],
)
def test_matches_float64_reference_every_t(path) -> None:
    rng = np.random.default_rng(1)
    X = rng.standard_normal((3000, 48)).astype(np.float32)
    ds = Dataset.from_arrays("r", X)
    t = np.concatenate([np.linspace(0.0, path.t_max, 40), [path.t_max, 0.999, 0.99, 0.5]])
    c = path.coefficients(t)
    xt = _queries(rng, X, t, c)
    res = oracle(ds, OracleQuery(x_t=torch.from_numpy(xt), coeffs=c, outputs=ALL, top_k=4), chunk_rows=256)
    ref = oracle_reference(X, xt, c.alpha, c.sigma, c.d_alpha, c.d_sigma)
    _check(res, ref)
    assert np.allclose(res.entropy.numpy(), ref.entropy, atol=1e-8)
    assert np.allclose(res.ess.numpy(), ref.ess, rtol=1e-8)
    top = np.argsort(-ref.weights, axis=1, kind="stable")[:, :4]
    np.testing.assert_allclose(res.topk_weights.numpy(), np.take_along_axis(ref.weights, top, 1), atol=1e-10)
    assert (res.topk_weights.numpy()[:, 0] >= res.topk_weights.numpy()[:, 1]).all()
    # the top-1 index carries the top-1 weight (ties aside)
    got_w = np.take_along_axis(ref.weights, res.topk_indices.numpy()[:, :1], 1)[:, 0]
    np.testing.assert_allclose(got_w, ref.weights.max(axis=1), atol=1e-10)


def test_custom_coefficients_per_query_mixed_batch() -> None:
    rng = np.random.default_rng(2)
    X = rng.standard_normal((500, 16)).astype(np.float32)
    ds = Dataset.from_arrays("r", X)
    b = 12
    alpha = rng.uniform(0.0, 1.0, b)
    sigma = rng.uniform(0.05, 1.0, b)
    c = custom_coefficients(alpha, sigma, rng.uniform(0.5, 2, b), -rng.uniform(0.5, 2, b))
    xt = _queries(rng, X, np.zeros(b), c)
    res = oracle(ds, OracleQuery(x_t=torch.from_numpy(xt), coeffs=c, outputs=ALL, top_k=1))
    _check(res, oracle_reference(X, xt, c.alpha, c.sigma, c.d_alpha, c.d_sigma))


@pytest.mark.parametrize("t_late", [0.99, 0.999])
def test_near_ties_high_dimension(t_late: float) -> None:
    """D = 3,072, queries nearly equidistant from two or three samples: float32 alone fails here."""
    rng = np.random.default_rng(3)
    X = rng.uniform(-1, 1, (600, 3072)).astype(np.float32)
    ds = Dataset.from_arrays("r", X)
    t = np.full(8, t_late)
    c = get_path("linear").coefficients(t)
    xt = np.concatenate([_near_ties(rng, X, c.take(slice(0, 4)), 2), _near_ties(rng, X, c.take(slice(4, 8)), 3)])
    res = oracle(ds, OracleQuery(x_t=torch.from_numpy(xt), coeffs=c, outputs=ALL, top_k=3), chunk_rows=128)
    ref = oracle_reference(X, xt, c.alpha, c.sigma, c.d_alpha, c.d_sigma)
    _check(res, ref)
    # they really are ties: the two best weights are both substantial
    assert (np.sort(ref.weights, axis=1)[:, -2] > 1e-3).any()
    # and the fast float32 path really is inaccurate there, which is why the refinement exists
    fast = oracle(ds, OracleQuery(x_t=torch.from_numpy(xt), coeffs=c, precision="fast"), chunk_rows=128)
    assert rel_err(fast.velocity.numpy(), ref.velocity) > 1e-5
    assert (np.abs(fast.velocity.numpy() - ref.velocity).max(axis=1) <= fast.velocity_error_bound.numpy()).all()


def test_high_dimension_8192() -> None:
    rng = np.random.default_rng(4)
    X = rng.standard_normal((300, 8192)).astype(np.float32)
    ds = Dataset.from_arrays("r", X)
    t = np.array([0.0, 0.05, 0.2, 0.6, 0.95, 0.999])
    c = get_path("linear").coefficients(t)
    xt = _queries(rng, X, t, c)
    res = oracle(ds, OracleQuery(x_t=torch.from_numpy(xt), coeffs=c, outputs=ALL, top_k=2), chunk_rows=64)
    _check(res, oracle_reference(X, xt, c.alpha, c.sigma, c.d_alpha, c.d_sigma))


def test_many_chunks_n_far_above_chunk() -> None:
    """N / chunk = 400: a wrong merge of chunk results (adding logsumexps) would show at once."""
    rng = np.random.default_rng(5)
    X = rng.standard_normal((8000, 8)).astype(np.float32)
    ds = Dataset.from_arrays("r", X)
    t = np.linspace(0, 0.9999, 16)
    c = get_path("linear").coefficients(t)
    xt = _queries(rng, X, t, c)
    res = oracle(ds, OracleQuery(x_t=torch.from_numpy(xt), coeffs=c, outputs=ALL, top_k=5), chunk_rows=20)
    _check(res, oracle_reference(X, xt, c.alpha, c.sigma, c.d_alpha, c.d_sigma))


def test_sample_weights() -> None:
    rng = np.random.default_rng(6)
    X = rng.standard_normal((400, 10)).astype(np.float32)
    w = rng.uniform(0.0, 3.0, 400)
    w[:50] = 0.0
    ds = Dataset.from_arrays("r", X, weights=w)
    t = np.linspace(0, 0.99, 10)
    c = get_path("linear").coefficients(t)
    xt = _queries(rng, X, t, c)
    res = oracle(ds, OracleQuery(x_t=torch.from_numpy(xt), coeffs=c, outputs=ALL, top_k=3), chunk_rows=64)
    _check(res, oracle_reference(X, xt, c.alpha, c.sigma, c.d_alpha, c.d_sigma, weights=w))
    assert not np.isin(res.topk_indices.numpy()[:, 0], np.arange(50)).any()


def test_one_sample_gives_the_conditional_velocity() -> None:
    rng = np.random.default_rng(7)
    x1 = rng.standard_normal((1, 20))
    ds = Dataset.from_arrays("one", x1.astype(np.float32))
    x1s = x1.astype(np.float32).astype(np.float64)
    t = np.array([0.1, 0.5, 0.9])
    for path in (get_path("linear"), get_path("cosine")):
        c = path.coefficients(t)
        x0 = rng.standard_normal((3, 20))
        xt = c.alpha[:, None] * x1s + c.sigma[:, None] * x0
        res = oracle(ds, OracleQuery(x_t=torch.from_numpy(xt), coeffs=c))
        target = c.d_alpha[:, None] * x1s + c.d_sigma[:, None] * x0
        np.testing.assert_allclose(res.velocity.numpy(), target, rtol=1e-9, atol=1e-9)


def test_t0_gives_mean_minus_xt_on_linear() -> None:
    rng = np.random.default_rng(8)
    X = rng.standard_normal((1000, 6)).astype(np.float32)
    ds = Dataset.from_arrays("r", X)
    xt = rng.standard_normal((5, 6))
    res = oracle(ds, OracleQuery(x_t=torch.from_numpy(xt), coeffs=get_path("linear").coefficients(np.zeros(5))))
    np.testing.assert_allclose(res.velocity.numpy(), X.astype(np.float64).mean(0) - xt, atol=1e-12)


def test_invariant_to_chunk_size_and_permutation() -> None:
    rng = np.random.default_rng(9)
    X = rng.standard_normal((2000, 12)).astype(np.float32)
    perm = rng.permutation(2000)
    t = np.linspace(0, 0.99, 12)
    c = get_path("linear").coefficients(t)
    xt = _queries(rng, X, t, c)
    q = OracleQuery(x_t=torch.from_numpy(xt), coeffs=c, outputs=ALL, top_k=3)
    base = oracle(Dataset.from_arrays("a", X), q, chunk_rows=2000)
    for chunk in (7, 128, 999):
        other = oracle(Dataset.from_arrays("a", X), q, chunk_rows=chunk)
        np.testing.assert_allclose(other.velocity.numpy(), base.velocity.numpy(), rtol=1e-10, atol=1e-10)
    shuffled = oracle(Dataset.from_arrays("b", X[perm]), q, chunk_rows=100)
    np.testing.assert_allclose(shuffled.velocity.numpy(), base.velocity.numpy(), rtol=1e-10, atol=1e-10)
    # indices are reported in the caller's order of each data set
    late = t > 0  # at t = 0 all weights tie
    np.testing.assert_array_equal(perm[shuffled.topk_indices.numpy()[late, 0]], base.topk_indices.numpy()[late, 0])


def test_merge_of_partials_equals_whole() -> None:
    rng = np.random.default_rng(10)
    X = rng.standard_normal((1500, 9)).astype(np.float32)
    ds = Dataset.from_arrays("r", X)
    t = np.linspace(0, 0.99, 10)
    c = get_path("linear").coefficients(t)
    xq = torch.from_numpy(_queries(rng, X, t, c))
    a, s = torch.from_numpy(c.alpha), torch.from_numpy(c.sigma)
    whole, _, _ = compute_partials(ds, xq, a, s, top_k=4, chunk_rows=300)
    parts = [
        compute_partials(ds, xq, a, s, rows=r, top_k=4, chunk_rows=300)[0]
        for r in ((0, 700), (700, 1100), (1100, 1500))
    ]
    merged = parts[2].merge(parts[0]).merge(parts[1])  # order must not matter
    w, m = whole.finalize(), merged.finalize()
    torch.testing.assert_close(m.x1_hat, w.x1_hat, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.entropy, w.entropy, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(m.ess, w.ess, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(m.topk_weights, w.topk_weights, rtol=1e-10, atol=1e-12)
    # indices agree wherever the weight is distinct (t > 0) and within float64's reach; beyond
    # the reach (weight < e^-37 of the top) a slot may hold -1 with weight 0
    clear = (w.topk_weights > 1e-12) & torch.from_numpy(t > 0)[:, None]
    assert torch.equal(m.topk_indices[clear], w.topk_indices[clear])


def test_dense_pass_blocks_and_padded_groups_equal_one_block() -> None:
    # The dense float64 pass streams blocks of rows into its state (rescaling, the weighted sum
    # written by the GEMM) and pads groups of different sizes into one batched pass; neither may
    # change the answer: blocks of 256 rows vs one block, classes of 300 / 500 / 700 rows padded
    # together vs each alone, with zero-weight rows, left-out samples and top-k.
    rng = np.random.default_rng(11)
    y = np.repeat([0, 1, 2], [300, 500, 700])
    X = rng.standard_normal((1500, 24)).astype(np.float32)
    w = rng.uniform(0.5, 2.0, 1500)
    w[::7] = 0.0
    ds = Dataset.from_arrays("d", X, labels=y, weights=w)
    b = 24
    t = np.full(b, 0.1)  # navigation: every query takes the dense pass
    c = get_path("linear").coefficients(t)
    xt = torch.from_numpy(_queries(rng, X, t, c))
    labels = torch.from_numpy(np.tile([0, 1, 2, -1], b // 4))
    exclude = torch.from_numpy(rng.integers(-1, 1500, b))
    q = OracleQuery(x_t=xt, coeffs=c, labels=labels, exclude=exclude, outputs=ALL, top_k=5)
    small = replace(CPU, dense_elements=256 * 24, dense_share=0.0, early_dense=False)
    big = replace(small, dense_elements=1 << 24)
    a, z = oracle(ds, q, config=small), oracle(ds, q, config=big)
    assert a.refined == z.refined and a.refined >= b * 300  # dense, not refined pairs
    for name in ("velocity", "x1_hat", "entropy", "ess", "variance", "topk_weights"):
        torch.testing.assert_close(getattr(a, name), getattr(z, name), rtol=1e-12, atol=1e-13)
    assert torch.equal(a.topk_indices, z.topk_indices)
    # and each query against the plain reference over its class, without its left-out sample
    for i in range(b):
        keep = np.ones(1500, dtype=bool) if labels[i] < 0 else y == int(labels[i])
        ww = w.copy()
        if exclude[i] >= 0:
            ww[int(exclude[i])] = 0.0
        ref = oracle_reference(
            X[keep],
            xt[i : i + 1].numpy(),
            *(v[i : i + 1] for v in (c.alpha, c.sigma, c.d_alpha, c.d_sigma)),
            weights=ww[keep],
        )
        assert rel_err(a.velocity[i : i + 1].numpy(), ref.velocity) < 1e-10


def _labelled(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    X = rng.standard_normal((900, 10)).astype(np.float32)
    y = rng.integers(0, 3, 900)
    return X, y


def test_class_conditional_equals_engine_over_subset() -> None:
    rng = np.random.default_rng(11)
    X, y = _labelled(rng)
    ds = Dataset.from_arrays("lab", X, labels=y)
    t = np.linspace(0, 0.99, 9)
    c = get_path("linear").coefficients(t)
    xt = _queries(rng, X, t, c)
    labels = np.array([0, 1, 2, -1, 0, 1, 2, -1, 1])
    res = oracle(
        ds, OracleQuery(x_t=torch.from_numpy(xt), coeffs=c, labels=torch.from_numpy(labels), outputs=ALL, top_k=2)
    )
    for b, lab in enumerate(labels):
        sub = X if lab < 0 else X[y == lab]
        ref = oracle_reference(
            sub, xt[b : b + 1], c.alpha[b : b + 1], c.sigma[b : b + 1], c.d_alpha[b : b + 1], c.d_sigma[b : b + 1]
        )
        assert rel_err(res.velocity.numpy()[b : b + 1], ref.velocity) < 1e-9
        if lab >= 0:  # top-k indices are in the caller's order and belong to the class
            assert (y[res.topk_indices.numpy()[b]] == lab).all()


def test_guidance_only_inside_its_interval() -> None:
    rng = np.random.default_rng(12)
    X, y = _labelled(rng)
    ds = Dataset.from_arrays("lab", X, labels=y)
    t = np.linspace(0.0, 0.95, 20)
    c = get_path("linear").coefficients(t)
    xt = _queries(rng, X, t, c)
    labels = torch.full((20,), 1, dtype=torch.int64)
    g = Guidance(scale=3.0, t_lo=0.2, t_hi=0.6)
    guided = oracle(
        ds, OracleQuery(x_t=torch.from_numpy(xt), coeffs=c, t=torch.from_numpy(t), labels=labels, guidance=g)
    )
    cond = oracle(ds, OracleQuery(x_t=torch.from_numpy(xt), coeffs=c, labels=labels))
    unc = oracle(ds, OracleQuery(x_t=torch.from_numpy(xt), coeffs=c))
    inside = (t >= 0.2) & (t <= 0.6)
    expect = np.where(
        inside[:, None],
        unc.velocity.numpy() + 3.0 * (cond.velocity.numpy() - unc.velocity.numpy()),
        cond.velocity.numpy(),
    )
    np.testing.assert_allclose(guided.velocity.numpy(), expect, rtol=1e-10, atol=1e-10)
    assert not np.allclose(guided.velocity.numpy()[inside], cond.velocity.numpy()[inside])


def test_float16_and_bfloat16_storage_exact_relative_to_stored_values() -> None:
    rng = np.random.default_rng(13)
    X = rng.standard_normal((700, 32)).astype(np.float32)
    t = np.linspace(0, 0.999, 10)
    c = get_path("linear").coefficients(t)
    xt = _queries(rng, X, t, c)
    for dtype, tdt in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        ds = Dataset.from_arrays("h", X, dtype=dtype)
        assert ds.x.dtype == tdt
        stored = torch.from_numpy(X).to(tdt).double().numpy()
        res = oracle(ds, OracleQuery(x_t=torch.from_numpy(xt), coeffs=c, outputs=ALL, top_k=1), chunk_rows=100)
        _check(res, oracle_reference(stored, xt, c.alpha, c.sigma, c.d_alpha, c.d_sigma))


def test_class_whose_weights_are_all_zero_is_refused_not_nan() -> None:
    X = np.random.default_rng(3).standard_normal((6, 3)).astype(np.float32)
    ds = Dataset.from_arrays("w", X, labels=[0, 0, 0, 1, 1, 1], weights=[1, 2, 3, 0, 0, 0])
    c = get_path("linear").coefficients(np.array([0.5]))
    with pytest.raises(ValueError, match="weight 0"):
        oracle(ds, OracleQuery(x_t=torch.zeros(1, 3), coeffs=c, labels=torch.tensor([1])))
    ok = oracle(ds, OracleQuery(x_t=torch.zeros(1, 3), coeffs=c, labels=torch.tensor([0])))
    assert torch.isfinite(ok.velocity).all()


def test_shape_nan_and_singular_end_policy() -> None:
    ds = Dataset.from_arrays("r", np.ones((3, 4), dtype=np.float32))
    c = get_path("linear").coefficients(np.array([0.5]))
    with pytest.raises(ValueError, match="NaN or Inf"):
        oracle(ds, OracleQuery(x_t=torch.tensor([[0.0, math.nan, 0, 0]]), coeffs=c))
    with pytest.raises(ValueError, match="too large"):  # finite, but past float32's range once screened
        oracle(ds, OracleQuery(x_t=torch.full((1, 4), 3e38, dtype=torch.float64), coeffs=c))
    with pytest.raises(ValueError, match="singular"):
        get_path("linear").coefficients(np.array([1.0]))
    assert get_path("linear").t_max == pytest.approx(0.9999)
    # at the largest allowed t the answer is still exact
    X = np.random.default_rng(1).standard_normal((100, 4)).astype(np.float32)
    ds = Dataset.from_arrays("r", X)
    c = get_path("linear").coefficients(np.array([0.9999]))
    xt = 0.9999 * X[:1].astype(np.float64) + 1e-4 * np.ones((1, 4))
    res = oracle(ds, OracleQuery(x_t=torch.from_numpy(xt), coeffs=c, outputs=ALL, top_k=1))
    _check(res, oracle_reference(X, xt, c.alpha, c.sigma, c.d_alpha, c.d_sigma))


def test_split_route_exact_head_and_screened_tail_within_its_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    # In the middle of the path the weight sits on a few samples while many more are within
    # reach: those few (the head) are recomputed in float64, the rest (the tail) keep their
    # screened logits; the answer must stay within its bound and 1e-10 of the reference, with
    # left-out samples, top-k, entropy and ESS
    from floworacle_server.engine import _passes

    seen: dict[str, list[int]] = {}
    route = _passes._route

    def spy(*args):
        out = route(*args)
        seen["code"] = out.code
        return out

    monkeypatch.setattr(_passes, "_route", spy)
    rng = np.random.default_rng(31)
    X = rng.standard_normal((4000, 256)).astype(np.float32)
    ds = Dataset.from_arrays("s", X)
    t = np.repeat([0.32, 0.33, 0.37], 6)
    c = get_path("linear").coefficients(t)
    src = rng.integers(0, 4000, len(t))
    xt = _queries(rng, X, t, c)
    exclude = np.where(np.arange(len(t)) % 2 == 0, src, -1)
    q = OracleQuery(x_t=torch.from_numpy(xt), coeffs=c, exclude=torch.from_numpy(exclude), outputs=ALL[:-1], top_k=3)
    res = oracle(ds, q, chunk_rows=256, config=replace(CPU, split=True))  # an opt-in route
    assert _passes.Route.SPLIT in seen["code"]
    for b in range(len(t)):
        w = np.ones(4000)
        if exclude[b] >= 0:
            w[exclude[b]] = 0.0
        sl = slice(b, b + 1)
        ref = oracle_reference(X, xt[sl], c.alpha[sl], c.sigma[sl], c.d_alpha[sl], c.d_sigma[sl], weights=w)
        err = np.abs(res.x1_hat[b].numpy() - ref.x1_hat[0]).max()
        assert err <= res.x1_hat_error_bound[b].item(), b
        assert res.x1_hat_error_bound[b].item() < 1e-6  # a bound that says exact
        assert rel_err(res.velocity[b].numpy(), ref.velocity[0]) < 1e-10, b
        assert abs(res.entropy[b].item() - ref.entropy[0]) < 1e-8 and abs(res.ess[b].item() / ref.ess[0] - 1) < 1e-8
        top = np.argsort(-ref.weights[0], kind="stable")[:3]
        np.testing.assert_allclose(res.topk_weights[b].numpy(), ref.weights[0][top], atol=1e-10)
