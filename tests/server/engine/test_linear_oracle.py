"""The linear (Gaussian, Wiener) oracle against a direct solve, and its Gaussian's life cycle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from floworacle.paths import get_path
from floworacle_server.data import Dataset, build_index, gaussian_model, load_digits, load_index
from floworacle_server.engine import linear_oracle
from patch_reference import linear_reference

T = np.array([0.02, 0.2, 0.5, 0.8, 0.95, 0.99])


def _queries(rng: np.random.Generator, X: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    c = get_path("linear").coefficients(t)
    x1 = X[rng.integers(0, len(X), len(t))].reshape(len(t), -1).astype(np.float64)
    return c.alpha[:, None] * x1 + c.sigma[:, None] * rng.standard_normal(x1.shape), c.alpha, c.sigma


def _check(res, ref: np.ndarray, tol: float = 1e-9) -> None:  # type: ignore[no-untyped-def]
    err = np.abs(res.x1_hat.numpy() - ref).max(axis=1)
    assert err.max() <= tol * max(1.0, np.abs(ref).max()), err.max()
    assert (err <= res.x1_hat_error_bound.numpy()).all(), (err, res.x1_hat_error_bound)


def test_matches_direct_solve_weighted_and_per_class() -> None:
    rng = np.random.default_rng(0)
    # correlated data of rank 8 in D = 12, plus noise: eigenvalues over many decades
    X = (rng.standard_normal((60, 8)) @ rng.standard_normal((8, 12)) + 0.01 * rng.standard_normal((60, 12))).astype(
        np.float32
    )
    labels = np.arange(60) % 3
    weights = rng.uniform(0.1, 2.0, 60)
    ds = Dataset.from_arrays("g", X, labels, weights)
    xt, a, s = _queries(rng, X, T)
    res = linear_oracle(ds, torch.from_numpy(xt), torch.from_numpy(a), torch.from_numpy(s))
    _check(res, np.array([linear_reference(X, xt[b], a[b], s[b], weights) for b in range(len(T))]))
    lab = np.array([0, 1, 2, 0, -1, 2])
    res = linear_oracle(ds, torch.from_numpy(xt), torch.from_numpy(a), torch.from_numpy(s), labels=lab)
    ref = []
    for b in range(len(T)):
        keep = np.ones(60, dtype=bool) if lab[b] < 0 else labels == lab[b]
        ref.append(linear_reference(X[keep], xt[b], a[b], s[b], weights[keep]))
    _check(res, np.array(ref))


def test_digits_and_custom_coefficients() -> None:
    ds = load_digits()
    X = ds.x.numpy()
    rng = np.random.default_rng(1)
    xt, a, s = _queries(rng, X, T)
    # a custom path: any alpha, sigma > 0
    a = a * rng.uniform(0.5, 1.5, len(T))
    res = linear_oracle(ds, torch.from_numpy(xt), torch.from_numpy(a), torch.from_numpy(s))
    _check(res, np.array([linear_reference(X, xt[b], a[b], s[b]) for b in range(len(T))]))
    # the bound is small where the filter is well conditioned, and grows as 1/sigma^2 late
    assert float(res.x1_hat_error_bound[0]) < 1e-11


def test_rank_truncation_is_the_top_eigenpairs() -> None:
    rng = np.random.default_rng(2)
    X = rng.standard_normal((80, 10)).astype(np.float32) * np.linspace(3, 0.1, 10).astype(np.float32)
    ds = Dataset.from_arrays("g", X)
    xt, a, s = _queries(rng, X, T)
    res = linear_oracle(ds, torch.from_numpy(xt), torch.from_numpy(a), torch.from_numpy(s), rank=4)
    Xd = X.astype(np.float64)
    mu = Xd.mean(0)
    cov = (Xd - mu).T @ (Xd - mu) / len(Xd)
    lam, u = np.linalg.eigh(cov)
    u4, l4 = u[:, ::-1][:, :4], lam[::-1][:4]
    cov4 = (u4 * l4) @ u4.T
    ref = [
        mu + a[b] * cov4 @ np.linalg.solve(a[b] ** 2 * cov4 + s[b] ** 2 * np.eye(10), xt[b] - a[b] * mu)
        for b in range(len(T))
    ]
    _check(res, np.array(ref), tol=1e-8)


def test_refusals() -> None:
    ds = Dataset.from_arrays("g", np.random.default_rng(3).standard_normal((10, 4)))
    x = torch.zeros(1, 4, dtype=torch.float64)
    one = torch.ones(1, dtype=torch.float64)
    with pytest.raises(ValueError, match="no leave-one-out"):
        linear_oracle(ds, x, one, one, exclude=torch.tensor([2]))
    with pytest.raises(ValueError, match="sigma_t > 0"):
        linear_oracle(ds, x, one, torch.zeros(1, dtype=torch.float64))
    with pytest.raises(ValueError, match="no labels"):
        linear_oracle(ds, x, one, one, labels=np.array([0]))
    with pytest.raises(ValueError, match="rank must be >= 1"):
        linear_oracle(ds, x, one, one, rank=0)


def test_index_carries_the_gaussian_and_verifies_it(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    X = rng.standard_normal((40, 2, 3, 3)).astype(np.float32)
    labels = np.arange(40) % 2
    out = tmp_path / "idx"
    manifest = build_index(X, out, labels=labels, progress=False)
    assert manifest["image_shape"] == [2, 3, 3] and manifest["gaussian"]["classes"] == [0, 1]
    ds = load_index(out)
    assert set(ds._gaussians) == {-1, 0, 1}  # brought along, not recomputed
    fresh = Dataset.from_arrays("x", X, labels)
    for y in (-1, 0, 1):
        stored, computed = gaussian_model(ds, y), gaussian_model(fresh, y)
        np.testing.assert_allclose(stored.mean.numpy(), computed.mean.numpy(), atol=1e-15)
        np.testing.assert_allclose(stored.eigenvalues.numpy(), computed.eigenvalues.numpy(), atol=1e-13)
    xt, a, s = _queries(rng, X, T)
    r1 = linear_oracle(ds, torch.from_numpy(xt), torch.from_numpy(a), torch.from_numpy(s), labels=labels[: len(T)])
    r2 = linear_oracle(fresh, torch.from_numpy(xt), torch.from_numpy(a), torch.from_numpy(s), labels=labels[: len(T)])
    np.testing.assert_allclose(r1.x1_hat.numpy(), r2.x1_hat.numpy(), atol=1e-12)
    # a changed Gaussian file is refused
    g = out / "gaussian.npz"
    g.write_bytes(g.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ValueError, match="Gaussian file does not match"):
        load_index(out)
    # a rank-limited build keeps only the largest eigenpairs; --no-linear writes none
    m2 = build_index(X, tmp_path / "r", progress=False, linear_rank=3)
    assert load_index(tmp_path / "r")._gaussians[-1].rank == 3 and m2["gaussian"]["rank"] == 3
    m3 = build_index(X, tmp_path / "n", progress=False, linear=False)
    assert "gaussian" not in m3 and not load_index(tmp_path / "n")._gaussians
