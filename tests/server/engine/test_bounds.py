"""The one rounding-error model: GEMM settings, and the screening and dense bounds against the truth."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from floworacle.paths import get_path
from floworacle_server.data import Dataset
from floworacle_server.engine import OracleQuery, _bounds, _knn, nearest, oracle
from floworacle_server.engine._bounds import ScreenModel, dense_logit_error, screen_logit_error
from oracle_reference import oracle_reference, rel_err


@pytest.fixture
def matmul_precision() -> Iterator[None]:
    before = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("setting, u", [("highest", 2.0**-24), ("high", 2.0**-11), ("medium", 2.0**-8)])
def test_one_gemm_model_for_oracle_and_nearest(matmul_precision: None, setting: str, u: float) -> None:
    # "high" allows TF32 (2^-11) and "medium" bfloat16 (2^-8), on CPUs (oneDNN) as on GPUs: the
    # oracle and the nearest-sample search read the same model
    torch.set_float32_matmul_precision(setting)
    cpu = torch.device("cpu")
    assert _bounds.float32_gemm_unit_roundoff(cpu) == u
    assert _knn.float32_gemm_unit_roundoff(cpu) == u  # the nearest screen's bound reads it
    model = ScreenModel.choose("float32", cpu, torch.float32, 100)
    inside = 0.0 if u == 2.0**-24 else 2 * u  # both operands rounded inside the GEMM
    assert model.gamma == pytest.approx(((100 + 4) * 2.0**-24 + 2.0**-24 + inside) * 1.01 + 4 * 2.0**-53)


@pytest.mark.parametrize("setting", ["high", "medium"])
def test_answers_stay_exact_below_highest_precision(matmul_precision: None, setting: str) -> None:
    """Whatever the GEMM really does under the setting, the bound follows it, so the answers stay
    exact (more candidates are recomputed in float64 when the screen is coarser)."""
    rng = np.random.default_rng(4)
    X = rng.standard_normal((800, 48)).astype(np.float32)
    ds = Dataset.from_arrays("p", X)
    t = np.concatenate([np.linspace(0, 0.99, 12), [0.999]])
    c = get_path("linear").coefficients(t)
    xt = c.alpha[:, None] * X[rng.integers(0, 800, len(t))] + c.sigma[:, None] * rng.standard_normal((len(t), 48))
    torch.set_float32_matmul_precision(setting)
    res = oracle(ds, OracleQuery(x_t=torch.from_numpy(xt), coeffs=c), chunk_rows=128)
    near = nearest(ds, xt, 3)
    torch.set_float32_matmul_precision("highest")
    ref = oracle_reference(X, xt, c.alpha, c.sigma, c.d_alpha, c.d_sigma)
    assert rel_err(res.velocity.numpy(), ref.velocity) < 1e-9
    d2 = ((xt[:, None, :] - X[None].astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_array_equal(near.indices.numpy(), np.argsort(d2, axis=1, kind="stable")[:, :3])


@pytest.mark.parametrize("scale, offset", [(1.0, 0.0), (1.0, 30.0), (50.0, 0.0)])
def test_screening_logit_bound_holds_for_the_float32_gemm(scale: float, offset: float) -> None:
    rng = np.random.default_rng(5)
    n, d, b = 500, 700, 24
    X = (offset + scale * rng.standard_normal((n, d))).astype(np.float32)
    t = rng.uniform(0.05, 0.999, b)
    c = get_path("linear").coefficients(t)
    xt = c.alpha[:, None] * X[rng.integers(0, n, b)] + c.sigma[:, None] * scale * rng.standard_normal((b, d))
    alpha, sigma = c.alpha, c.sigma
    cc, h = alpha / sigma**2, alpha**2 / (2 * sigma**2)
    sq = (X.astype(np.float64) ** 2).sum(axis=1)
    # the engine's evaluation: the query rounded to float32 and scaled by c there, one GEMM
    xc = torch.from_numpy(xt).float() * torch.from_numpy(cc).float()[:, None]
    lt = (xc @ torch.from_numpy(X).T).addr_(torch.from_numpy(h).float(), torch.from_numpy(sq).float(), alpha=-1)
    exact = cc[:, None] * (xt.astype(np.longdouble) @ X.astype(np.longdouble).T) - h[:, None] * sq[None, :]
    err = np.abs(lt.double().numpy() - exact.astype(np.float64)).max(axis=1)
    model = ScreenModel.choose("float32", torch.device("cpu"), torch.float32, d)
    bound = screen_logit_error(
        model,
        torch.from_numpy(cc),
        torch.from_numpy(h),
        torch.from_numpy(np.linalg.norm(xt, axis=1)),
        torch.tensor(sq.max()),
        0.0,
        d,
    ).numpy()
    assert (err <= bound).all(), (err / bound).max()
    assert (err > 1e-3 * bound).any()  # the bound is not vacuous either


def test_dense_logit_bound_holds_for_the_float64_pass() -> None:
    rng = np.random.default_rng(6)
    n, d, b = 300, 512, 16
    X = rng.standard_normal((n, d)).astype(np.float32)
    t = rng.uniform(0.0, 0.95, b)
    c = get_path("linear").coefficients(t)
    xt = c.alpha[:, None] * X[rng.integers(0, n, b)] + c.sigma[:, None] * rng.standard_normal((b, d))
    alpha, inv = c.alpha, 1.0 / (2 * c.sigma**2)
    x64 = X.astype(np.float64)
    sq = (x64**2).sum(axis=1)
    # the pass's evaluation: (c x_t) . x_i - h ||x_i||^2 - ||x_t||^2 / (2 sigma^2), float64
    got = ((2 * alpha * inv)[:, None] * xt) @ x64.T - (alpha**2 * inv)[:, None] * sq - ((xt**2).sum(1) * inv)[:, None]
    diff = xt[:, None, :].astype(np.longdouble) - alpha[:, None, None] * x64[None].astype(np.longdouble)
    exact = -(diff**2).sum(-1) * inv[:, None]
    err = np.abs(got - exact.astype(np.float64)).max(axis=1)
    bound = dense_logit_error(
        torch.from_numpy(np.linalg.norm(xt, axis=1)),
        torch.from_numpy(alpha),
        torch.tensor(np.sqrt(sq.max())),
        torch.from_numpy(inv),
        0.0,
        d,
    ).numpy()
    assert (err <= bound).all(), (err / bound).max()
