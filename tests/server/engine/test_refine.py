"""The float64 refinement kernels and the shortcuts of the per-call fixed cost give the answers of
the plain float64 formula (fixed-width candidate blocks, lone candidates, tiling of wide slots)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from floworacle.paths import get_path
from floworacle_server.data import Dataset
from floworacle_server.engine import CPU, OracleQuery, Partials, _assemble, _bounds, _refine, oracle
from floworacle_server.engine._batch import Want
from oracle_reference import oracle_reference, rel_err

ALL = ("velocity", "x1_hat", "eps_hat", "score", "topk", "entropy", "ess", "variance")


def _batch(ds: Dataset, xq: torch.Tensor, t: np.ndarray, want: Want, cfg=CPU):
    c = get_path("linear").coefficients(t)
    plan = _assemble._plan(ds, None, None, None, len(t))
    a, s = torch.from_numpy(c.alpha), torch.from_numpy(c.sigma)
    return _assemble._batch(ds, xq, a, s, plan, None, want, cfg, "float32")


def _plain(ds: Dataset, xq: torch.Tensor, alpha: np.ndarray, sigma: np.ndarray, rows: list[int]):
    """(m, s, v, m2) of one query over ``rows``, plainly in float64."""
    x = ds.x[rows].to(torch.float64)
    diff = xq[None, :].to(torch.float64) - float(alpha) * x
    logits = -(diff * diff).sum(dim=1) / (2 * float(sigma) ** 2)
    if ds.log_weights is not None:
        logits = logits + ds.log_weights[rows]
    m = logits.max()
    p = torch.exp(logits - m)
    v = (p[:, None] * x).sum(dim=0)
    mu = v / p.sum()
    return m, p.sum(), v, (p * ((x - mu) ** 2).sum(dim=1)).sum()


@pytest.mark.parametrize("kind", ["float32", "float16", "float64-storage", "zero-weights", "tiled"])
def test_exact_rows_match_the_plain_float64_formula(kind: str) -> None:
    rng = np.random.default_rng(7)
    n_data, d, b = 400, 48, 40
    X = rng.standard_normal((n_data, d)).astype(np.float32)
    weights = None
    if kind == "zero-weights":
        weights = rng.uniform(0.5, 1.0, n_data)
        weights[:200] = 0.0  # rows 0..199 weigh nothing: their logits are -inf
    ds = Dataset.from_arrays("p", X, weights=weights, dtype="float16" if kind == "float16" else "float32")
    if kind == "float64-storage":
        ds = dataclasses.replace(ds, x=ds.x.to(torch.float64))
    t = np.full(b, 0.9)
    c = get_path("linear").coefficients(t)
    xq = torch.from_numpy(0.9 * X[rng.integers(0, n_data, b)] + 0.1 * rng.standard_normal((b, d)))
    cfg = dataclasses.replace(CPU, gather_elements=2 * 5 * d) if kind == "tiled" else CPU  # 5 rows a tile
    batch = _batch(ds, xq, t, Want(entropy=True, ess=True, variance=True, top_k=3), cfg)
    widths = rng.integers(1, 30, b).tolist()
    low = 200 if kind == "zero-weights" else 0
    rows = torch.full((b, max(widths)), -1, dtype=torch.int64)
    for i, w in enumerate(widths):
        rows[i, :w] = torch.from_numpy(rng.choice(np.arange(low, n_data), w, replace=False))
    xq_before = xq.clone()
    part, err = _refine.refine(batch, torch.arange(b), rows, widths)
    assert torch.equal(xq, xq_before)  # the queries are read only
    post = part.finalize()
    for i, w in enumerate(widths):
        m, s, v, m2 = _plain(ds, xq[i], c.alpha[i], c.sigma[i], rows[i, :w].tolist())
        # merged tiles carry their own maximum: compare the normalised quantities
        torch.testing.assert_close(post.x1_hat[i], v / s, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(post.variance[i], m2 / s, rtol=1e-9, atol=1e-12)
        assert torch.allclose(part.m[i], m, rtol=1e-12, atol=1e-12)
        assert int(part.topk_index[i, 0]) in rows[i, :w].tolist()
        assert abs(float(post.topk_weights[i].sum()) - 1.0) < 1e-9 or w > 3
    assert (err >= 0).all()


def test_lone_candidates_are_their_rows_bit_for_bit() -> None:
    rng = np.random.default_rng(8)
    X = rng.standard_normal((300, 33)).astype(np.float32)
    ds = Dataset.from_arrays("s", X)
    t = np.full(20, 0.99)
    xq = torch.from_numpy(0.99 * X[:20].astype(np.float64) + 0.01 * rng.standard_normal((20, 33)))
    for logits in (False, True):
        batch = _batch(ds, xq, t, Want(top_k=2, logits=logits))
        part, err = _refine.exact_single(batch, slice(0, 20), torch.arange(20))
        assert torch.equal(part.v, ds.x[:20].to(torch.float64))
        assert torch.equal(part.s, torch.ones(20, dtype=torch.float64))
        assert part.topk_index[:, 0].tolist() == list(range(20)) and (part.topk_index[:, 1] == -1).all()
        if logits:  # the exact logit and its bound, for partials that may be merged with others
            c = get_path("linear").coefficients(t)
            d2 = ((xq - 0.99 * ds.x[:20].double()) ** 2).sum(dim=1)
            torch.testing.assert_close(part.m, -d2 / (2 * torch.from_numpy(c.sigma) ** 2), rtol=1e-12, atol=0)
            assert (err > 0).all()
        else:
            assert (err == 0).all()


def test_finalize_skips_the_division_only_when_told_the_normaliser_is_one() -> None:
    p = Partials.empty(3, 4)
    p.m = torch.zeros(3, dtype=torch.float64)
    p.s = torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64)
    p.v = torch.arange(12, dtype=torch.float64).reshape(3, 4)
    v = p.v.clone()
    assert torch.equal(p.finalize(consume=True).x1_hat, v / p.s[:, None])
    p.v, p.s = v.clone(), torch.ones(3, dtype=torch.float64)
    assert torch.equal(p.finalize(consume=True, unit_normaliser=True).x1_hat, v)


def _refine_queries(X: np.ndarray, t: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = get_path("linear").coefficients(t)
    rows = rng.integers(0, len(X), len(t))
    return c.alpha[:, None] * X[rows] + c.sigma[:, None] * rng.standard_normal((len(t), X.shape[1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_refinement_and_mixed_batches_match_the_reference(dtype: torch.dtype) -> None:
    """Data rows as queries (one candidate each: the lone-candidate path), and a batch mixing them
    with navigation queries that go dense, from float32 and float64 queries: the caller's tensor
    is never written to."""
    rng = np.random.default_rng(3)
    X = rng.standard_normal((3000, 64)).astype(np.float32)
    ds = Dataset.from_arrays("r", X)
    for t in (np.full(48, 0.9), np.full(48, 0.999), np.tile([0.05, 0.99, 0.9, 0.3], 12)):
        c = get_path("linear").coefficients(t)
        xt = torch.from_numpy(_refine_queries(X, t, seed=int(t.sum() * 1000))).to(dtype)
        xt_before = xt.clone()
        res = oracle(ds, OracleQuery(x_t=xt, coeffs=c, outputs=ALL, top_k=2), chunk_rows=256)
        assert torch.equal(xt, xt_before)
        ref = oracle_reference(X, xt.to(torch.float64).numpy(), c.alpha, c.sigma, c.d_alpha, c.d_sigma)
        refine = bool((t > 0.5).all())  # float64 from differences only: far inside the target
        for name in ("velocity", "x1_hat", "eps_hat", "score"):
            assert rel_err(getattr(res, name).numpy(), getattr(ref, name)) <= (1e-10 if refine else 1e-5), name
        err = np.abs(res.velocity.numpy() - ref.velocity).max(axis=1)
        assert (err <= res.velocity_error_bound.numpy() * (1 + 1e-9)).all()
        assert np.allclose(res.ess.numpy(), ref.ess, rtol=1e-8 if refine else 1e-6)


@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_float32_queries_screened_as_sent_give_the_float64_queries_answer(precision: str) -> None:
    rng = np.random.default_rng(5)
    X = rng.standard_normal((700, 32)).astype(np.float32)
    ds = Dataset.from_arrays("s", X, labels=rng.integers(0, 3, 700))
    t = np.linspace(0.0, 0.999, 40)
    c = get_path("linear").coefficients(t)
    x32 = torch.from_numpy(_refine_queries(X, t, seed=9)).to(torch.float32)
    for labels in (None, torch.from_numpy(rng.integers(-1, 3, 40))):
        q32 = OracleQuery(x_t=x32, coeffs=c, labels=labels, outputs=ALL, top_k=3, precision=precision)
        q64 = dataclasses.replace(q32, x_t=x32.to(torch.float64))
        a, b = oracle(ds, q32, chunk_rows=128), oracle(ds, q64, chunk_rows=128)
        for name in ("velocity", "x1_hat", "eps_hat", "score", "entropy", "ess", "variance", "topk_weights"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert torch.equal(a.topk_indices, b.topk_indices)
        assert torch.equal(a.velocity_error_bound, b.velocity_error_bound)


def test_pair_logit_bound_covers_an_unfused_subtraction_near_t_1() -> None:
    # At t -> 1 the difference x_t - alpha x_i is tiny next to alpha x_i, so rounding alpha x_i
    # before the subtraction (no fused multiply-add) is an error absolute in |alpha x_i|, not
    # relative to the difference. Form d2 that way in float64 and check it against an extended
    # precision value: the engine's per-pair logit bound must cover it.
    rng = np.random.default_rng(3)
    n_data, d, b = 50, 3072, 16
    X = (100 * rng.standard_normal((n_data, d))).astype(np.float32)  # |x| / sigma large
    t = np.full(b, 0.9999)
    c = get_path("linear").coefficients(t)
    rows = rng.integers(0, n_data, b)
    xq = t[:, None] * X[rows] + (1 - t[:, None]) * rng.standard_normal((b, d))
    xs, a = X[rows].astype(np.float64), c.alpha[:, None]
    unfused = ((xq - a * xs) ** 2).sum(axis=1)  # numpy: multiply rounded, then subtract
    exact = ((xq.astype(np.longdouble) - a.astype(np.longdouble) * xs.astype(np.longdouble)) ** 2).sum(axis=1)
    inv = 1.0 / (2 * c.sigma**2)
    err = np.abs((unfused - exact) * inv).astype(np.float64)
    ax = torch.from_numpy(np.abs(c.alpha) * np.linalg.norm(xs, axis=1))
    bound = _bounds.pair_logit_error(torch.from_numpy(unfused), torch.from_numpy(inv), ax, None, d).numpy()
    assert (err <= bound).all(), (err / bound).max()
    # the bound without the unfused term, (D + 4) u d2 / (2 sigma^2), is what the rounding can exceed
    old = (d + 4) * 2.0**-53 * unfused * inv
    assert np.finfo(np.longdouble).eps < 2.0**-60 and (err > old).any()
    assert math.isfinite(float(bound.max()))
