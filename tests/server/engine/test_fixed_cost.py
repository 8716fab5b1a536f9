"""The engine's shortcuts for its fixed per-call cost give the answers of the general arithmetic.

``_exact_pairs`` (single-pair queries whose rows become the weighted sum, differences formed in
place, blocks), the partials that start as the first block's instead of zeros, the float32 queries
screened as sent, the velocity built in the float64 copy of the queries, and ``_abs_max_rows``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from floworacle.paths import get_path
from floworacle_server.data import Dataset
from floworacle_server.engine import OracleQuery, Partials, Precision, oracle
from floworacle_server.engine import _oracle as eng
from oracle_reference import oracle_reference, rel_err

ALL = ("velocity", "x1_hat", "eps_hat", "score", "topk", "entropy", "ess")


def _pairs_reference(ds: Dataset, xq: torch.Tensor, co, qi: torch.Tensor, rows: torch.Tensor):
    """Per query of ``qi``: (max logit, normaliser, weighted sum), plainly in float64."""
    out = {}
    for q in torch.unique(qi).tolist():
        r = rows[qi == q]
        x = ds.x[r].to(torch.float64)
        diff = xq[q][None, :] - co.alpha[q] * x
        logits = -(diff * diff).sum(dim=1) * co.inv2s2[q]
        if ds.log_weights is not None:
            logits = logits + ds.log_weights[r]
        m = logits.max()
        p = torch.exp(logits - m) if torch.isfinite(m) else torch.zeros_like(logits)
        out[q] = (m, p.sum(), (p[:, None] * x).sum(dim=0))
    return out


def _pairs_case(kind: str):
    rng = np.random.default_rng(7)
    n_data, d, b = 400, 48, 64
    X = rng.standard_normal((n_data, d)).astype(np.float32)
    weights = None
    if kind == "zero-weights":
        weights = rng.uniform(0.5, 1.0, n_data)
        weights[:200] = 0.0  # rows 0..199 weigh nothing: their logits are -inf
    ds = Dataset.from_arrays("p", X, weights=weights, dtype="float16" if kind == "float16" else "float32")
    if kind == "float64-storage":  # no staging buffer: rows gathered straight into float64
        ds = dataclasses.replace(ds, x=ds.x.to(torch.float64))
    t = np.full(b, 0.9)
    c = get_path("linear").coefficients(t)
    co = eng._Coef.build(torch.from_numpy(c.alpha), torch.from_numpy(c.sigma))
    xq = torch.from_numpy(0.9 * X[rng.integers(0, n_data, b)] + 0.1 * rng.standard_normal((b, d)))
    if kind in ("single-contiguous", "float16", "float64-storage", "zero-weights"):
        qi = torch.arange(3, b)
    elif kind == "single-gaps":
        qi = torch.tensor(sorted(rng.choice(b, 40, replace=False).tolist()))
    elif kind == "multi-one-block":
        qi = torch.arange(b).repeat_interleave(torch.from_numpy(rng.integers(1, 4, b)))
    else:  # "multi-blocks": more pairs than one gather block (1,365 rows at D = 48)
        assert eng._gather_block(d, torch.device("cpu")) < b * 30
        qi = torch.arange(b).repeat_interleave(30)
    rows = torch.from_numpy(rng.integers(0, n_data, qi.shape[0]))
    if kind == "zero-weights":
        rows[::3] = torch.from_numpy(rng.integers(0, 200, rows[::3].shape[0]))
    return ds, xq, co, qi, rows


@pytest.mark.parametrize(
    "kind",
    [
        "single-contiguous",
        "single-gaps",
        "multi-one-block",
        "multi-blocks",
        "float16",
        "float64-storage",
        "zero-weights",
    ],
)
def test_exact_pairs_match_the_plain_float64_formula(kind: str) -> None:
    ds, xq, co, qi, rows = _pairs_case(kind)
    xq_before = xq.clone()
    uq, part, pair_err = eng._exact_pairs(ds, xq, co, qi, rows, top_k=3)
    assert torch.equal(xq, xq_before)  # the queries are read only
    ref = _pairs_reference(ds, xq, co, qi, rows)
    assert uq.tolist() == sorted(ref)
    for j, q in enumerate(uq.tolist()):
        m, s, v = ref[q]
        if not torch.isfinite(m):
            assert part.m[j] == -math.inf and part.s[j] == 0 and bool((part.v[j] == 0).all())
            continue
        assert torch.allclose(part.m[j], m, rtol=1e-12, atol=1e-12)
        assert torch.allclose(part.s[j], s, rtol=1e-9)
        assert torch.allclose(part.v[j], v, rtol=1e-9, atol=1e-12)
        assert part.topk_logits[j, 0] == part.m[j]
    # the rows themselves are the weighted sum of a single finite pair: bit for bit
    one = (torch.unique_consecutive(qi, return_counts=True)[1] == 1) & torch.isfinite(part.m)
    if bool(one.all()):
        assert torch.equal(part.v, ds.x[rows].to(torch.float64))
    # per-pair bound of the float64 sum of squares, from the pair's own squared distance
    d2 = ((xq[qi] - co.alpha[qi, None] * ds.x[rows].to(torch.float64)) ** 2).sum(dim=1)
    assert torch.allclose(pair_err, (ds.dim + 4) * eng.U64 * d2 * co.inv2s2[qi], rtol=1e-9)


def test_abs_max_rows_is_the_row_max_of_abs_including_nan_and_inf() -> None:
    x = torch.randn(6, 37, dtype=torch.float64)
    x[1, 3] = -50.0
    x[2, 5] = math.nan
    x[3, 0] = -math.inf
    x[4, 9] = math.inf
    got = eng._abs_max_rows(x)
    want = x.abs().amax(dim=1)
    assert torch.equal(got[~torch.isnan(want)], want[~torch.isnan(want)])
    assert torch.isnan(got[2]) and got[3] == math.inf and got[4] == math.inf and got[1] == 50.0


def test_finalize_skips_the_division_only_for_unit_normalisers() -> None:
    p = Partials.empty(3, 4)
    p.m, p.s, p.h, p.q = (
        torch.zeros(3, dtype=torch.float64),
        torch.ones(3, dtype=torch.float64),
        torch.zeros(3, dtype=torch.float64),
        torch.ones(3, dtype=torch.float64),
    )
    p.v = torch.arange(12, dtype=torch.float64).reshape(3, 4)
    v = p.v.clone()
    assert torch.equal(p.finalize(consume=True).x1_hat, v)
    p.v, p.s = v.clone(), torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64)
    assert torch.equal(p.finalize(consume=True).x1_hat, v / p.s[:, None])


def _refine_queries(X: np.ndarray, t: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = get_path("linear").coefficients(t)
    rows = rng.integers(0, len(X), len(t))
    return c.alpha[:, None] * X[rows] + c.sigma[:, None] * rng.standard_normal((len(t), X.shape[1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_refinement_and_mixed_batches_match_the_reference(dtype: torch.dtype) -> None:
    """Data rows as queries (one candidate each: the single-pair path, contiguous), and a batch
    mixing them with navigation queries that go dense (single pairs with gaps), from float32 and
    float64 queries: the caller's tensor is never written to."""
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


@pytest.mark.parametrize("precision", [Precision.EXACT, Precision.FAST])
def test_float32_queries_screened_as_sent_give_the_float64_queries_answer(precision: Precision) -> None:
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
        for name in ("velocity", "x1_hat", "eps_hat", "score", "entropy", "ess", "topk_weights"):
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
    ds = Dataset.from_arrays("p", X)
    t = np.full(b, 0.9999)
    c = get_path("linear").coefficients(t)
    co = eng._Coef.build(torch.from_numpy(c.alpha), torch.from_numpy(c.sigma))
    rows = torch.from_numpy(rng.integers(0, n_data, b))
    xq = torch.from_numpy(t[:, None] * X[rows.numpy()] + (1 - t[:, None]) * rng.standard_normal((b, d)))
    qi = torch.arange(b)
    _, part, pair_err = eng._exact_pairs(ds, xq, co, qi, rows, 1)
    xs, xt, a = X[rows.numpy()].astype(np.float64), xq.numpy(), c.alpha[:, None]
    unfused = ((xt - a * xs) ** 2).sum(axis=1)  # numpy: multiply rounded, then subtract
    exact = ((xt.astype(np.longdouble) - a.astype(np.longdouble) * xs.astype(np.longdouble)) ** 2).sum(axis=1)
    inv = co.inv2s2.numpy()
    err = np.abs((unfused - exact) * inv).astype(np.float64)
    assert (err <= pair_err.numpy()).all(), (err / pair_err.numpy()).max()
    # the old bound, (D + 4) u d2 / (2 sigma^2) alone, is what the unfused rounding can exceed
    old = (d + 4) * 2.0**-53 * unfused * inv
    assert np.finfo(np.longdouble).eps < 2.0**-60 and (err > old).any()
