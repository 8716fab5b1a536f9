"""The engine on CUDA against the CPU float64 reference (runs where a GPU is present; CI has none,
so the same code path is covered on the CPU by test_oracle.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from floworacle.paths import get_path
from floworacle_server.data import Dataset
from floworacle_server.engine import Guidance, OracleQuery, oracle
from oracle_reference import oracle_reference, rel_err

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("screen", ["float32", "bfloat16"])
def test_cuda_matches_float64_reference_with_near_ties(dtype: str, screen: str) -> None:
    rng = np.random.default_rng(0)
    X = rng.uniform(-1, 1, (20_000, 3072)).astype(np.float32)
    ds = Dataset.from_arrays("g", X, dtype=dtype, device="cuda")
    stored = torch.from_numpy(X).to(ds.x.dtype).double().numpy()
    t = np.concatenate([np.linspace(0.0, 0.95, 24), np.full(8, 0.99), np.full(8, 0.999)])
    c = get_path("linear").coefficients(t)
    x1 = stored[rng.integers(0, len(X), len(t))]
    xt = c.alpha[:, None] * x1 + c.sigma[:, None] * rng.standard_normal(x1.shape)
    for b in range(24, len(t)):  # nearly equidistant from two samples
        i, j = rng.choice(len(X), 2, replace=False)
        xt[b] = c.alpha[b] * (stored[i] + stored[j]) / 2 + c.sigma[b] * 1e-3 * rng.standard_normal(3072)
    q = OracleQuery(
        x_t=torch.from_numpy(xt).cuda(), coeffs=c, outputs=("velocity", "x1_hat", "topk", "variance"), top_k=2
    )
    res = oracle(ds, q, screen=screen)
    assert res.velocity.is_cuda
    ref = oracle_reference(stored, xt, c.alpha, c.sigma, c.d_alpha, c.d_sigma)
    assert rel_err(res.velocity.cpu().numpy(), ref.velocity) <= 1e-5
    assert rel_err(res.x1_hat.cpu().numpy(), ref.x1_hat) <= 1e-5
    err = np.abs(res.velocity.cpu().numpy() - ref.velocity).max(axis=1)
    assert (err <= res.velocity_error_bound.cpu().numpy() * (1 + 1e-9)).all()
    var = np.array([(ref.weights[b] * ((stored - ref.x1_hat[b]) ** 2).sum(1)).sum() for b in range(len(t))])
    assert (np.abs(res.variance.cpu().numpy() - var) <= res.variance_error_bound.cpu().numpy() * (1 + 1e-9)).all()


@cuda
def test_cuda_leave_one_out_conditional_and_guided() -> None:
    rng = np.random.default_rng(2)
    y = np.repeat(np.arange(10), 2_000)
    X = rng.uniform(-1, 1, (20_000, 1024)).astype(np.float32)
    ds = Dataset.from_arrays("g", X, labels=y, device="cuda")
    t = rng.uniform(0.0, 0.999, 64)
    c = get_path("linear").coefficients(t)
    src = rng.integers(0, 20_000, 64)
    xt = c.alpha[:, None] * X[src] + c.sigma[:, None] * rng.standard_normal((64, 1024))
    labels = y[src].copy()
    labels[::3] = -1
    g = Guidance(scale=2.0, t_lo=0.2, t_hi=0.7)
    q = OracleQuery(
        x_t=torch.from_numpy(xt).cuda(),
        coeffs=c,
        t=torch.from_numpy(t),
        labels=torch.from_numpy(labels),
        guidance=g,
        exclude=torch.from_numpy(src).cuda(),
        outputs=("velocity", "variance"),
    )
    res = oracle(ds, q)
    for b in range(64):
        w = np.ones(20_000)
        w[src[b]] = 0.0
        sl = slice(b, b + 1)
        unc = oracle_reference(X, xt[sl], c.alpha[sl], c.sigma[sl], c.d_alpha[sl], c.d_sigma[sl], weights=w)
        want = unc.velocity[0]
        if labels[b] >= 0:
            keep = y == labels[b]
            cond = oracle_reference(
                X[keep], xt[sl], c.alpha[sl], c.sigma[sl], c.d_alpha[sl], c.d_sigma[sl], weights=w[keep]
            )
            inside = g.t_lo <= t[b] <= g.t_hi
            want = unc.velocity[0] + g.scale * (cond.velocity[0] - unc.velocity[0]) if inside else cond.velocity[0]
        got = res.velocity[b].cpu().numpy()
        assert np.abs(got - want).max() <= res.velocity_error_bound[b].item() * (1 + 1e-9)
        assert rel_err(got, want) <= 1e-5


@cuda
def test_cuda_fast_mode_reports_a_bound_that_holds() -> None:
    rng = np.random.default_rng(1)
    X = rng.standard_normal((50_000, 1024)).astype(np.float32)
    ds = Dataset.from_arrays("g", X, device="cuda")
    t = np.linspace(0.0, 0.9, 32)
    c = get_path("linear").coefficients(t)
    xt = c.alpha[:, None] * X[rng.integers(0, len(X), 32)] + c.sigma[:, None] * rng.standard_normal((32, 1024))
    res = oracle(ds, OracleQuery(x_t=torch.from_numpy(xt).cuda(), coeffs=c, precision="fast"))
    ref = oracle_reference(X, xt, c.alpha, c.sigma, c.d_alpha, c.d_sigma)
    err = np.abs(res.velocity.cpu().numpy() - ref.velocity).max(axis=1)
    assert (err <= res.velocity_error_bound.cpu().numpy()).all()
