"""The local and equivariant local (patch) oracles against the plain-loop float64 reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from floworacle.paths import get_path
from floworacle_server.data import Dataset
from floworacle_server.data._shard import ShardSpec, make_shard
from floworacle_server.engine import (
    OracleQuery,
    PatchConfig,
    equivariant_oracle,
    local_oracle,
    max_patch_size,
    oracle,
)
from patch_reference import equivariant_reference, local_reference

SHAPES = [(1, 6, 6), (2, 5, 5)]
ORACLES = {"local": (local_oracle, local_reference), "equivariant": (equivariant_oracle, equivariant_reference)}


def _data(shape: tuple[int, int, int], n: int = 20, seed: int = 0) -> np.ndarray:
    # values on a 1/8 grid in [-1, 1] (like the digits): exact in float32, many equal pixels
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 17, (n, *shape)) / 8.0 - 1.0).astype(np.float32)


def _queries(rng: np.random.Generator, X: np.ndarray, t: np.ndarray) -> np.ndarray:
    c = get_path("linear").coefficients(t)
    x1 = X[rng.integers(0, len(X), len(t))].reshape(len(t), -1).astype(np.float64)
    return c.alpha[:, None] * x1 + c.sigma[:, None] * rng.standard_normal(x1.shape)


def _near_ties(rng: np.random.Generator, X: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Queries on the way to the midpoint of two training images: every pixel's window is nearly
    equidistant from the two."""
    c = get_path("linear").coefficients(t)
    out = []
    for a, s in zip(c.alpha, c.sigma, strict=True):
        i, j = rng.choice(len(X), size=2, replace=False)
        mid = 0.5 * (X[i].astype(np.float64) + X[j].astype(np.float64)).reshape(-1)
        out.append(a * mid + s * 1e-3 * rng.standard_normal(mid.shape))
    return np.array(out)


def _run(kind: str, ds: Dataset, xt: np.ndarray, t: np.ndarray, patch, **kw):  # type: ignore[no-untyped-def]
    c = get_path("linear").coefficients(t)
    fn = ORACLES[kind][0]
    return fn(ds, torch.from_numpy(xt), torch.from_numpy(c.alpha), torch.from_numpy(c.sigma), patch, **kw)


def _reference(kind: str, X: np.ndarray, xt: np.ndarray, t: np.ndarray, patch, shape, **kw) -> np.ndarray:  # type: ignore[no-untyped-def]
    c = get_path("linear").coefficients(t)
    ref = ORACLES[kind][1]
    sizes = np.broadcast_to(np.asarray(patch), (len(t),))
    flat = X.reshape(len(X), -1)
    return np.array([ref(flat, xt[b], c.alpha[b], c.sigma[b], int(sizes[b]), shape, **kw) for b in range(len(t))])


def _check(res, ref: np.ndarray, tol: float = 1e-9) -> None:  # type: ignore[no-untyped-def]
    got = res.x1_hat.numpy()
    err = np.abs(got - ref).max(axis=1)
    assert err.max() <= tol * max(1.0, np.abs(ref).max()), err.max()
    bound = res.x1_hat_error_bound.numpy()
    assert (err <= bound).all(), (err, bound)


@pytest.mark.parametrize("shape", SHAPES, ids=["1x6x6", "2x5x5"])
@pytest.mark.parametrize("kind", ["local", "equivariant"])
def test_every_patch_size_and_t_matches_reference(kind: str, shape: tuple[int, int, int]) -> None:
    X = _data(shape)
    ds = Dataset.from_arrays("img", X)
    rng = np.random.default_rng(1)
    t = np.array([0.05, 0.3, 0.7, 0.99])
    xt = _queries(rng, X, t)
    for p in range(1, max_patch_size(shape) + 1, 2):
        if kind == "equivariant" and p not in (1, 3, 5, max_patch_size(shape)):
            continue  # the loop reference is slow over images and locations; the small sizes and the largest
        res = _run(kind, ds, xt, t, p)
        _check(res, _reference(kind, X, xt, t, p, shape))


@pytest.mark.parametrize("kind", ["local", "equivariant"])
def test_near_ties_at_t_099_dense_and_exact_routes(kind: str) -> None:
    shape = (1, 6, 6)
    X = _data(shape, seed=2)
    ds = Dataset.from_arrays("img", X)
    rng = np.random.default_rng(3)
    t = np.array([0.99, 0.99, 0.99, 0.999])
    xt = _near_ties(rng, X, t)
    for p in (3, 5):
        ref = _reference(kind, X, xt, t, p, shape)
        dense = _run(kind, ds, xt, t, p)
        exact = _run(kind, ds, xt, t, p, logit_tol=0.0)  # every row recomputed from differences
        # at t = 0.999 the GEMM's bound exceeds the tolerance and those rows are recomputed anyway
        assert exact.refined > dense.refined
        _check(dense, ref)
        _check(exact, ref)
        # the exact route's bound is the tighter one this late in the path
        assert (exact.x1_hat_error_bound <= dense.x1_hat_error_bound).all()


@pytest.mark.parametrize("kind", ["local", "equivariant"])
def test_conditional_weighted_and_excluded(kind: str) -> None:
    shape = (2, 5, 5)
    X = _data(shape, n=24, seed=4)
    labels = np.arange(24) % 3
    weights = np.random.default_rng(5).uniform(0.2, 3.0, 24)
    weights[[2, 13]] = 0.0  # weigh exactly nothing, like an excluded sample
    ds = Dataset.from_arrays("img", X, labels, weights)
    rng = np.random.default_rng(6)
    t = np.array([0.2, 0.6, 0.9, 0.99, 0.5, 0.95])
    xt = _queries(rng, X, t)
    lab = np.array([0, 1, 2, -1, 2, -1])
    # leave out a sample of the query's own scope, including the one it was built from
    exclude = np.array([3, -1, 5, 7, -1, 11])
    res = _run(kind, ds, xt, t, 3, labels=torch.from_numpy(lab), exclude=torch.from_numpy(exclude))
    c = get_path("linear").coefficients(t)
    ref = []
    for b in range(len(t)):
        keep = np.ones(24, dtype=bool) if lab[b] < 0 else labels == lab[b]
        if exclude[b] >= 0:
            keep[exclude[b]] = False
        keep &= weights > 0
        fn = ORACLES[kind][1]
        ref.append(fn(X[keep].reshape(keep.sum(), -1), xt[b], c.alpha[b], c.sigma[b], 3, shape, weights=weights[keep]))
    _check(res, np.array(ref))


def test_largest_patch_is_the_global_oracle() -> None:
    shape = (2, 5, 5)
    X = _data(shape, n=30, seed=7)
    labels = np.arange(30) % 2
    weights = np.random.default_rng(8).uniform(0.5, 2.0, 30)
    ds = Dataset.from_arrays("img", X, labels, weights)
    rng = np.random.default_rng(9)
    t = np.array([0.1, 0.5, 0.8, 0.95, 0.99])
    xt = _queries(rng, X, t)
    lab = np.array([-1, 0, 1, -1, 1])
    c = get_path("linear").coefficients(t)
    glob = oracle(ds, OracleQuery(torch.from_numpy(xt), c, labels=torch.from_numpy(lab), outputs=("x1_hat",)))
    loc = _run("local", ds, xt, t, max_patch_size(shape), labels=torch.from_numpy(lab))
    np.testing.assert_allclose(loc.x1_hat.numpy(), glob.x1_hat.numpy(), rtol=0, atol=1e-12)
    # one size smaller, the border pixels see only part of the image: no longer the global oracle
    near = _run("local", ds, xt, t, max_patch_size(shape) - 2, labels=torch.from_numpy(lab))
    assert np.abs(near.x1_hat.numpy() - glob.x1_hat.numpy()).max() > 1e-6


@pytest.mark.parametrize("kind", ["local", "equivariant"])
def test_chunking_blocks_and_per_query_sizes(kind: str) -> None:
    shape = (1, 6, 6)
    X = _data(shape, n=40, seed=10)
    ds = Dataset.from_arrays("img", X, np.arange(40) % 4)
    rng = np.random.default_rng(11)
    t = np.linspace(0.1, 0.99, 7)
    xt = _queries(rng, X, t)
    sizes = np.array([1, 3, 5, 3, 11, 7, 3])
    lab = torch.tensor([-1, 0, 1, -1, 2, 3, 0])
    whole = _run(kind, ds, xt, t, sizes, labels=lab)
    # one image per chunk and one query per block: the merges of the partials give the same answer
    tiny = _run(kind, ds, xt, t, sizes, labels=lab, config=PatchConfig(logit_elements=1))
    np.testing.assert_allclose(tiny.x1_hat.numpy(), whole.x1_hat.numpy(), rtol=0, atol=1e-13)
    for p in np.unique(sizes):
        sel = np.flatnonzero(sizes == p)
        one = _run(kind, ds, xt[sel], t[sel], int(p), labels=lab[sel])
        np.testing.assert_allclose(whole.x1_hat.numpy()[sel], one.x1_hat.numpy(), rtol=0, atol=1e-13)
    assert whole.patch_size.tolist() == sizes.tolist()


def test_refusals_say_how_to_fix() -> None:
    X = _data((1, 6, 6), n=6)
    flat = Dataset.from_arrays("flat", X.reshape(6, -1))
    t = np.array([0.5])
    xt = _queries(np.random.default_rng(0), X, t)
    with pytest.raises(ValueError, match="no image shape.*image_shape NAME=C,H,W"):
        _run("local", flat, xt, t, 3)
    ds = Dataset.from_arrays("img", X, np.array([0, 0, 0, 1, 1, 2]))
    with pytest.raises(ValueError, match="positive odd"):
        _run("local", ds, xt, t, 4)
    with pytest.raises(ValueError, match="exceeds 2 max\\(H, W\\) - 1 = 11"):
        _run("equivariant", ds, xt, t, 13)
    with pytest.raises(ValueError, match="posterior is empty"):
        _run("local", ds, xt, t, 3, labels=torch.tensor([2]), exclude=torch.tensor([5]))
    # a class whose samples all weigh 0 has an empty posterior (zero weights are exact zeros)
    zero = Dataset.from_arrays("img", X, np.array([0, 0, 0, 1, 1, 2]), np.array([1, 1, 1, 1, 1, 0.0]))
    for kind in ("local", "equivariant"):
        with pytest.raises(ValueError, match="posterior is empty"):
            _run(kind, zero, xt, t, 3, labels=torch.tensor([2]))
    with pytest.raises(ValueError, match="outside the data set's classes"):
        _run("local", ds, xt, t, 3, labels=torch.tensor([3]))
    with pytest.raises(ValueError, match="one per query"):
        _run("local", ds, xt, t, np.array([3, 5]))
    with pytest.raises(ValueError, match="sharded over a gang"):
        _run("equivariant", make_shard(ds, ShardSpec(0, 2)), xt, t, 3)
