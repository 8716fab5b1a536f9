"""The one rounding-error model: GEMM settings, and the screening and dense bounds against the truth."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from floworacle.paths import get_path
from floworacle_server.data import Dataset
from floworacle_server.engine import OracleQuery, OracleResult, _bounds, _knn, nearest, oracle
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


# -- bounds of near ties, and of the fast mode's diagnostics (issue 19, finding 11) ---------------


def _extended_reference(X: np.ndarray, xt: np.ndarray, t: np.ndarray) -> dict[str, np.ndarray]:
    """Linear path, 80-bit long double (x86; elsewhere at least float64): velocity, entropy, ESS,
    written apart from the engine. Near t = 1 a logit is ~1e8 nats, so float64 itself is the
    question; the extended reference carries ~3 more digits."""
    ld = np.longdouble
    data = X.astype(ld)
    vel, ent, ess = [], [], []
    for b in range(len(xt)):
        q, a = xt[b].astype(ld), ld(t[b])
        s = ld(1) - a
        logits = -((q[None, :] - a * data) ** 2).sum(axis=1) / (2 * s * s)
        w = np.exp(logits - logits.max())
        w /= w.sum()
        x1 = (w[:, None] * data).sum(axis=0)
        vel.append((x1 - q) / s)
        nz = w[w > 0]
        ent.append(-(nz * np.log(nz)).sum())
        ess.append(1 / (w * w).sum())
    return {"velocity": np.array(vel), "entropy": np.array(ent), "ess": np.array(ess)}


def _tie_queries(rng: np.random.Generator, X: np.ndarray, t: float, ties: list[int]) -> np.ndarray:
    """Queries at time t (linear path): k = 2 on the line through two samples at a logit gap in
    [-2, 2] nats (a real tie), k = 3 near the midpoint of three, k = 1 near one sample."""
    sigma = 1.0 - t
    out = []
    for k in ties:
        rows = X[rng.choice(len(X), size=k, replace=False)].astype(np.float64)
        if k == 2:  # l_a - l_b = t^2 |delta|^2 lam / sigma^2
            delta = rows[0] - rows[1]
            lam = rng.uniform(-2, 2) * sigma**2 / (t**2 * float(delta @ delta))
            out.append(t * (rows.mean(axis=0) + lam * delta))
        else:
            out.append(t * rows.mean(axis=0) + sigma * 1e-3 * rng.standard_normal(X.shape[1]))
    return np.array(out)


@pytest.mark.parametrize("dim", [784, 3072])
def test_near_tie_velocity_bound_holds_and_is_tight(dim: int) -> None:
    """At t = 0.999 a tie between two samples is float64's hardest case: each logit is ~1e8 nats,
    and the velocity is within ~1e-9 - 3e-8 of |A_t| max|x| of an extended-precision reference
    (float64's conditioning). The returned bound must cover that without being orders wider.
    Before: ~3.5e-4 of |A_t| max|x| on every query at D = 3,072 (1e4 - 1e5 times a tie's error,
    1e12 times that of a query near one sample)."""
    rng = np.random.default_rng(3)
    X = rng.uniform(-1, 1, (600, dim)).astype(np.float32)
    xt = _tie_queries(rng, X, 0.999, [2] * 8 + [3] * 2 + [1] * 4)
    t = np.full(len(xt), 0.999)
    c = get_path("linear").coefficients(t)
    q = OracleQuery(x_t=torch.from_numpy(xt), coeffs=c, outputs=("velocity", "topk"), top_k=2)
    res = oracle(Dataset.from_arrays("r", X), q)
    ref = _extended_reference(X, xt, t)
    scale = 1000.0 * float(np.abs(X).max())  # |A_t| max|x|, A_t = 1 / (1 - t)
    err = np.abs(res.velocity.numpy() - ref["velocity"].astype(np.float64)).max(axis=1)
    bound = res.velocity_error_bound.numpy()
    assert (err <= bound).all(), (err, bound)
    tied = res.topk_weights.numpy()[:, 1] > 1e-3
    assert tied.sum() >= 8, "the queries must include real ties"
    assert (bound[tied] < 1e-5 * scale).all() and (bound[tied] / err[tied] < 5e3).all(), (bound / scale, bound / err)
    # a query whose posterior sits on one sample: its x1 is that sample, and the bound knows it
    single = res.topk_weights.numpy()[:, 1] < 1e-12
    assert single.any() and (bound[single] < 1e-13 * scale).all(), bound[single] / scale


@pytest.mark.parametrize("precision", ["fast", "exact"])
def test_entropy_and_ess_carry_bounds_that_hold(precision: str) -> None:
    """The fast mode's diagnostics come from the screening logits: off by tenths of a nat and tens
    of percent near t = 1 at D = 3,072; ``entropy_error_bound`` / ``ess_error_bound`` must cover
    that, and be of float64's order in the exact mode."""
    rng = np.random.default_rng(5)
    X = rng.uniform(-1, 1, (600, 3072)).astype(np.float32)
    ds = Dataset.from_arrays("r", X)
    tie = _tie_queries(rng, X, 0.99, [2, 2, 3, 3])
    t_rand = np.array([0.05, 0.3, 0.6, 0.9])
    x1 = X[rng.integers(0, 600, 4)].astype(np.float64)
    spread = t_rand[:, None] * x1 + (1 - t_rand[:, None]) * rng.standard_normal((4, 3072))
    xt = np.concatenate([tie, spread])
    t = np.concatenate([np.full(4, 0.99), t_rand])
    c = get_path("linear").coefficients(t)
    q = OracleQuery(x_t=torch.from_numpy(xt), coeffs=c, outputs=("velocity", "entropy", "ess"), precision=precision)
    res = oracle(ds, q)
    assert isinstance(res, OracleResult)
    ref = _extended_reference(X, xt, t)
    ent_err = np.abs(res.entropy.numpy() - ref["entropy"].astype(np.float64))
    ess_err = np.abs(res.ess.numpy() - ref["ess"].astype(np.float64))
    ent_bound, ess_bound = res.entropy_error_bound.numpy(), res.ess_error_bound.numpy()
    assert (ent_err <= ent_bound).all(), (ent_err, ent_bound)
    assert (ess_err <= ess_bound).all(), (ess_err, ess_bound)
    if precision == "fast":
        assert ent_err.max() > 1e-3 and (ess_err / ref["ess"].astype(np.float64)).max() > 1e-3  # really off
        # the bounds never claim more than the range allows; where the screening is accurate (early
        # t) they are small, near t = 1 at D = 3,072 (thousands of nats of screening bound) they are
        # that range, which is the truth about what the fast mode knows there
        assert (ent_bound <= np.log(600) + 1e-9).all() and (ess_bound <= 600).all()
        assert ent_bound[4] < 0.5 and ess_bound[4] < 0.5 * res.ess.numpy()[4], (ent_bound, ess_bound)
    else:
        assert (ent_bound < 1e-4).all() and (ess_bound < 1e-4 * res.ess.numpy()).all(), (ent_bound, ess_bound)


def test_blocked_sum_and_its_term_count() -> None:
    rng = np.random.default_rng(0)
    for d in (1, 2, 7, 64, 784, 997, 3072):
        x = torch.from_numpy(rng.uniform(0, 1, (3, d)))
        exact = np.array([float(np.sum(r.astype(np.longdouble))) for r in x.numpy()])
        got = _bounds.blocked_sum(x).numpy()
        k = _bounds.blocked_sum_terms(d)
        assert k <= max(d - 1, 0) and (d < 64 or k < 2.1 * np.sqrt(d) + 2)
        assert (np.abs(got - exact) <= 1.01 * k * _bounds.U64 * x.sum(dim=1).numpy() + 1e-300).all()
