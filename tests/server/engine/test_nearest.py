"""Exact nearest-sample search against a float64 brute-force reference written here in numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from floworacle_server.data import Dataset
from floworacle_server.engine import nearest, posterior_nearest
from floworacle_server.engine._bounds import screening_error_bound


def _ref_knn(data: np.ndarray, q: np.ndarray, k: int, extra: np.ndarray | None = None):
    """(B, k) indices and squared distances by (key, index); key = ||q - x_i||^2 (+ extra[b, i])."""
    d2 = ((q[:, None, :].astype(np.float64) - data[None, :, :].astype(np.float64)) ** 2).sum(-1)
    key = d2 if extra is None else d2 + extra
    n = data.shape[0]
    idx = np.stack([np.lexsort((np.arange(n), key[b]))[:k] for b in range(q.shape[0])])
    return idx, np.take_along_axis(d2, idx, 1)


def _stored(ds: Dataset) -> np.ndarray:
    """The stored values in the caller's order, float64."""
    out = np.empty((ds.num_samples, ds.dim))
    out[ds.original_index.numpy()] = ds.x.double().numpy()
    return out


@pytest.fixture(scope="module")
def labelled() -> tuple[Dataset, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(10)
    x = rng.standard_normal((3000, 40)).astype(np.float32)
    y = rng.integers(0, 7, 3000)
    return Dataset.from_arrays("rand", x, y), x, y


@pytest.mark.parametrize("backend", ["torch", "faiss", "auto"])
@pytest.mark.parametrize("k", [1, 10, 1024, 3000])
def test_matches_float64_brute_force(labelled, backend: str, k: int) -> None:
    ds, x, y = labelled
    rng = np.random.default_rng(k)
    q = rng.standard_normal((9, 40))
    q[0] = x[17]  # a point that is a sample: distance 0
    res = nearest(ds, torch.from_numpy(q), k, chunk_rows=257, backend=backend)  # N >> chunk
    idx, d2 = _ref_knn(x, q, k)
    np.testing.assert_array_equal(res.indices.numpy(), idx)
    np.testing.assert_allclose(res.distances.numpy(), np.sqrt(d2), rtol=1e-12, atol=1e-12)
    assert res.distances.dtype == torch.float64 and res.indices.dtype == torch.int64
    assert res.labels is not None
    np.testing.assert_array_equal(res.labels.numpy(), y[idx])
    assert res.indices[0, 0] == 17 and res.distances[0, 0] == 0.0


def _near_tie_data() -> tuple[np.ndarray, np.ndarray]:
    """Samples far from the origin that differ by one float32 ulp, exact duplicates, and queries on top."""
    rng = np.random.default_rng(5)
    base = (100.0 + rng.standard_normal((40, 64))).astype(np.float32)
    x = np.repeat(base, 25, axis=0)  # 1000 rows: groups of 25
    for j in range(x.shape[0]):
        if j % 25 < 20:  # 5 exact duplicates per group stay; the rest move by a few ulps
            col = j % 64
            x[j, col] = np.nextafter(x[j, col], np.float32(np.inf) if j % 2 else np.float32(-np.inf))
            for _ in range(j % 3):
                x[j, col] = np.nextafter(x[j, col], np.float32(np.inf))
    perm = rng.permutation(x.shape[0])
    x = x[perm]
    q = base[:6].astype(np.float64) + 1e-4 * rng.standard_normal((6, 64))
    return x, q


@pytest.mark.parametrize("backend", ["torch", "faiss"])
@pytest.mark.parametrize("k", [1, 3, 30, 1000])
def test_near_ties_and_exact_ties(backend: str, k: int) -> None:
    x, q = _near_tie_data()
    ds = Dataset.from_arrays("ties", x)
    res = nearest(ds, q, k, chunk_rows=64, backend=backend)
    idx, d2 = _ref_knn(x, q, k)
    np.testing.assert_array_equal(res.indices.numpy(), idx)
    np.testing.assert_allclose(res.distances.numpy() ** 2, d2, rtol=1e-12)
    # the case is meaningful: float32 screening alone orders these samples wrongly
    s32 = (x.astype(np.float32) ** 2).sum(1)[None] - 2 * (q.astype(np.float32) @ x.T.astype(np.float32))
    screen_idx = np.argsort(s32, axis=1, kind="stable")[:, :k]
    assert not np.array_equal(screen_idx, idx[:, :k]) or k == 1000


def test_float16_storage_and_query_dtypes() -> None:
    rng = np.random.default_rng(6)
    ds = Dataset.from_arrays("h", rng.standard_normal((500, 4, 2, 2)), dtype="float16")
    data = _stored(ds)
    q = torch.randn(5, 4, 2, 2, dtype=torch.bfloat16)  # (B, *sample_shape), bfloat16
    res = nearest(ds, q, 7, chunk_rows=100)
    idx, d2 = _ref_knn(data, q.double().reshape(5, -1).numpy(), 7)
    np.testing.assert_array_equal(res.indices.numpy(), idx)
    np.testing.assert_allclose(res.distances.numpy() ** 2, d2, rtol=1e-12)
    assert res.labels is None


def test_low_precision_matmul_falls_back_to_an_exact_screen(labelled) -> None:
    ds, x, _ = labelled
    q = np.random.default_rng(7).standard_normal((4, 40))
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        res = nearest(ds, q, 5, backend="torch")
    finally:
        torch.set_float32_matmul_precision(before)
    idx, _ = _ref_knn(x, q, 5)
    np.testing.assert_array_equal(res.indices.numpy(), idx)


def test_screening_error_bound_holds() -> None:
    rng = np.random.default_rng(8)
    for scale, offset in [(1.0, 0.0), (1.0, 50.0), (30.0, 0.0)]:
        x = (offset + scale * rng.standard_normal((400, 300))).astype(np.float32)
        q = offset + scale * rng.standard_normal((16, 300))
        exact = ((q[:, None] - x[None].astype(np.float64)) ** 2).sum(-1)
        sn32 = torch.from_numpy((x.astype(np.float64) ** 2).sum(1)).float()
        r = torch.addmm(sn32[None], torch.from_numpy(q).float(), torch.from_numpy(x).t(), alpha=-2.0).double()
        screened = (q**2).sum(1)[:, None] + r.numpy()
        qn = torch.from_numpy(np.linalg.norm(q, axis=1))
        bound = screening_error_bound(qn, float(np.linalg.norm(x, axis=1).max()), 300).numpy()
        err = np.abs(screened - exact).max(1)
        assert (err < bound).all()
        # worst case grows like D u, typical rounding like sqrt(D) u: about 1e-3 of the bound here
        assert (err > 1e-4 * bound).any()


def test_posterior_nearest_matches_argmax_of_logits(labelled) -> None:
    ds, x, y = labelled
    rng = np.random.default_rng(9)
    alpha = np.array([0.05, 0.3, 0.7, 0.99])
    sigma = 1.0 - alpha
    x1 = x[[3, 50, 700, 2999]].astype(np.float64)
    x_t = alpha[:, None] * x1 + sigma[:, None] * rng.standard_normal((4, 40))
    logits = -((x_t[:, None] - alpha[:, None, None] * x[None].astype(np.float64)) ** 2).sum(-1) / (
        2 * sigma[:, None] ** 2
    )
    res = posterior_nearest(ds, torch.from_numpy(x_t), torch.from_numpy(alpha), k=3, chunk_rows=500)
    ref = np.stack([np.lexsort((np.arange(3000), -logits[b]))[:3] for b in range(4)])
    np.testing.assert_array_equal(res.indices.numpy(), ref)
    dist = np.linalg.norm(x_t[:, None] / alpha[:, None, None] - x[ref].astype(np.float64), axis=-1)
    np.testing.assert_allclose(res.distances.numpy(), dist, rtol=1e-12)
    np.testing.assert_array_equal(res.labels.numpy(), y[ref])  # type: ignore[union-attr]
    # scalar alpha gives the same as a per-query vector of it
    one = posterior_nearest(ds, x_t[:1], float(alpha[0]))
    assert int(one.indices[0, 0]) == ref[0, 0]


def test_posterior_nearest_with_sample_weights() -> None:
    rng = np.random.default_rng(11)
    x = rng.standard_normal((800, 12)).astype(np.float32)
    w = rng.uniform(0.0, 1.0, 800) ** 6  # strongly uneven
    w[:50] = 0.0  # zero weight: never chosen
    ds = Dataset.from_arrays("w", x, weights=w)
    alpha, sigma = np.array([0.2, 0.5, 0.8, 0.5]), np.array([0.8, 0.5, 0.2, 0.5])
    x_t = alpha[:, None] * x[[0, 1, 100, 200]] + sigma[:, None] * rng.standard_normal((4, 12))
    with np.errstate(divide="ignore"):
        logp = np.log(w / w.sum())
    logits = logp[None] - ((x_t[:, None] - alpha[:, None, None] * x[None].astype(np.float64)) ** 2).sum(-1) / (
        2 * sigma[:, None] ** 2
    )
    res = posterior_nearest(ds, x_t, alpha, sigma, k=4, chunk_rows=100)
    ref = np.stack([np.lexsort((np.arange(800), -logits[b]))[:4] for b in range(4)])
    np.testing.assert_array_equal(res.indices.numpy(), ref)
    assert (res.indices >= 50).all()
    plain = posterior_nearest(Dataset.from_arrays("u", x), x_t, alpha)
    assert not np.array_equal(plain.indices[:, 0].numpy(), ref[:, 0])  # the weights changed the ranking
    with pytest.raises(ValueError, match="pass sigma"):
        posterior_nearest(ds, x_t, alpha)


def test_bad_input(labelled) -> None:
    ds, _, _ = labelled
    q = torch.zeros(2, 40)
    # the protocol's rules, with the protocol's messages (what a remote caller reads too)
    for k, message in ((0, "k must be >= 1"), (3001, "k = 3001 is more than the data set's 3000"), (2.5, "integer")):
        with pytest.raises(ValueError, match=message):
            nearest(ds, q, k)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"expects \(B, 40\)"):
        nearest(ds, torch.zeros(2, 41), 1)
    with pytest.raises(ValueError, match="NaN"):
        nearest(ds, torch.full((2, 40), float("nan")), 1)
    with pytest.raises(ValueError, match="backend"):
        nearest(ds, q, 1, backend="annoy")
    with pytest.raises(ValueError, match=r"alpha_t\[1\] = 0 \(pure noise"):
        posterior_nearest(ds, q, torch.tensor([0.5, 0.0]))
    with pytest.raises(ValueError, match="alpha must be a scalar or have shape"):
        posterior_nearest(ds, q, torch.tensor([0.5, 0.5, 0.5]))
    empty = nearest(ds, torch.zeros(0, 40), 3)
    assert empty.indices.shape == (0, 3) and empty.distances.shape == (0, 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(labelled) -> None:
    _, x, y = labelled
    ds = Dataset.from_arrays("gpu", x, y, device="cuda")
    q = torch.randn(33, 40, dtype=torch.float64)
    for k in (1, 10, 1024):
        res = nearest(ds, q.cuda(), k, chunk_rows=300)
        idx, d2 = _ref_knn(x, q.numpy(), k)
        assert res.indices.device.type == "cuda"
        np.testing.assert_array_equal(res.indices.cpu().numpy(), idx)
        np.testing.assert_allclose(res.distances.cpu().numpy() ** 2, d2, rtol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_half_storage_ties_and_weighted_posterior() -> None:
    x, q = _near_tie_data()
    ds = Dataset.from_arrays("ties", x, device="cuda")
    res = nearest(ds, torch.from_numpy(q).cuda(), 30, chunk_rows=64)
    idx, _ = _ref_knn(x, q, 30)
    np.testing.assert_array_equal(res.indices.cpu().numpy(), idx)
    rng = np.random.default_rng(12)
    xb = rng.standard_normal((700, 16))
    w = rng.uniform(0.0, 1.0, 700) ** 4
    dsw = Dataset.from_arrays("w", xb, weights=w, dtype="bfloat16", device="cuda")
    data = _stored(Dataset.from_arrays("w", xb, weights=w, dtype="bfloat16"))
    alpha, sigma = 0.4, 0.6
    x_t = alpha * data[:5] + sigma * rng.standard_normal((5, 16))
    logits = np.log(w / w.sum())[None] - ((x_t[:, None] - alpha * data[None]) ** 2).sum(-1) / (2 * sigma**2)
    got = posterior_nearest(dsw, torch.from_numpy(x_t).cuda(), alpha, sigma, k=2, chunk_rows=128)
    ref = np.stack([np.lexsort((np.arange(700), -logits[b]))[:2] for b in range(5)])
    np.testing.assert_array_equal(got.indices.cpu().numpy(), ref)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 60),
    d=st.integers(1, 9),
    b=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
    chunk=st.integers(1, 70),
    backend=st.sampled_from(["torch", "faiss"]),
)
def test_property_small_integer_grids_with_many_exact_ties(n, d, b, seed, chunk, backend) -> None:
    """Coordinates from {-1, 0, 1} make many exactly equal distances: order must be by index."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-1, 2, (n, d)).astype(np.float32)
    q = rng.integers(-1, 2, (b, d)).astype(np.float64) + rng.choice([0.0, 0.5], (b, d))
    k = int(rng.integers(1, n + 1))
    labels = rng.integers(0, 3, n) if seed % 2 else None  # labels reorder the rows internally
    res = nearest(Dataset.from_arrays("g", x, labels), q, k, chunk_rows=chunk, backend=backend)
    idx, d2 = _ref_knn(x, q, k)
    np.testing.assert_array_equal(res.indices.numpy(), idx)
    if labels is not None:
        np.testing.assert_array_equal(res.labels.numpy(), labels[idx])  # type: ignore[union-attr]
    np.testing.assert_allclose(res.distances.numpy() ** 2, d2, rtol=1e-12, atol=1e-12)


def _ref_excluded(data: np.ndarray, q: np.ndarray, k: int, exclude: np.ndarray):
    """The reference with sample exclude[b] left out of query b (-1: none)."""
    extra = np.zeros((q.shape[0], data.shape[0]))
    for b, e in enumerate(exclude):
        if e >= 0:
            extra[b, e] = np.inf
    return _ref_knn(data, q, k, extra)


@pytest.mark.parametrize("backend", ["torch", "faiss"])
@pytest.mark.parametrize("k", [1, 10, 2999])
def test_exclude_leaves_one_sample_out(labelled, backend: str, k: int) -> None:
    ds, x, y = labelled  # rows are stored sorted by label: exclude is in the caller's order
    rng = np.random.default_rng(20 + k)
    src = np.array([17, 0, 2999, 1234, 5, 77])
    q = x[src].astype(np.float64)
    q[3:] += 0.01 * rng.standard_normal((3, 40))
    exclude = np.array([17, 0, -1, 1234, -1, 5])  # the last query leaves out a sample that is not its own
    res = nearest(ds, q, k, exclude=torch.from_numpy(exclude), chunk_rows=257, backend=backend)
    idx, d2 = _ref_excluded(x, q, k, exclude)
    np.testing.assert_array_equal(res.indices.numpy(), idx)
    np.testing.assert_allclose(res.distances.numpy(), np.sqrt(d2), rtol=1e-12, atol=1e-12)
    for b, e in enumerate(exclude):
        if e >= 0:
            assert e not in res.indices[b].tolist()
    assert res.indices[2, 0] == 2999 and res.distances[2, 0] == 0.0  # not excluded: finds itself
    assert not res.approximate and res.similarities is None


def test_exclude_one_of_two_duplicates_and_weighted_posterior() -> None:
    rng = np.random.default_rng(21)
    x = rng.standard_normal((300, 8)).astype(np.float32)
    x[200] = x[100]  # an exact duplicate
    ds = Dataset.from_arrays("dup", x)
    res = nearest(ds, x[[100, 200]].astype(np.float64), 2, exclude=torch.tensor([100, 200]))
    assert res.indices[:, 0].tolist() == [200, 100] and (res.distances[:, 0] == 0).all()
    # weighted posterior-nearest with exclusion against the logits with that sample removed
    w = rng.uniform(0.1, 1.0, 300)
    dsw = Dataset.from_arrays("w", x, weights=w)
    alpha, sigma = 0.6, 0.4
    x_t = alpha * x[:6].astype(np.float64) + sigma * rng.standard_normal((6, 8))
    logits = np.log(w / w.sum())[None] - ((x_t[:, None] - alpha * x[None].astype(np.float64)) ** 2).sum(-1) / (
        2 * sigma**2
    )
    ex = np.array([0, 1, -1, 3, 4, -1])
    for b, e in enumerate(ex):
        if e >= 0:
            logits[b, e] = -np.inf
    got = posterior_nearest(dsw, x_t, alpha, sigma, k=3, exclude=ex)
    ref = np.stack([np.lexsort((np.arange(300), -logits[b]))[:3] for b in range(6)])
    np.testing.assert_array_equal(got.indices.numpy(), ref)


def test_exclude_bad_input(labelled) -> None:
    ds, _, _ = labelled
    q = torch.zeros(2, 40)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        nearest(ds, q, 1, exclude=torch.tensor([1]))
    with pytest.raises(ValueError, match=r"exclude\[1\] = 3000 is past the data set's 3000 samples"):
        nearest(ds, q, 1, exclude=torch.tensor([1, 3000]))
    with pytest.raises(ValueError, match=r"exclude\[0\] = -2 is not a data set index"):
        nearest(ds, q, 1, exclude=torch.tensor([-2, 0]))
    with pytest.raises(ValueError, match="exclude must be integers, got 1.5"):
        nearest(ds, q, 1, exclude=torch.tensor([1.5, 2.0]))
    as_floats = nearest(ds, q, 2, exclude=torch.tensor([1.0, 2.0]))  # integral floats are indices, as in the SDK
    assert 1 not in as_floats.indices[0].tolist() and 2 not in as_floats.indices[1].tolist()
    with pytest.raises(ValueError, match="at most N - 1 = 2999"):
        nearest(ds, q, 3000, exclude=torch.tensor([1, -1]))
    full = nearest(ds, q, 3000, exclude=torch.tensor([-1, -1]))  # -1 everywhere: k = N is fine
    assert full.indices.shape == (2, 3000)


def _with_features(x: np.ndarray, feats: np.ndarray, metric: str, labels: np.ndarray | None = None) -> Dataset:
    from floworacle_server.data import attach_features

    ds = Dataset.from_arrays("f", x, labels)
    attach_features(ds, feats, metric)
    return ds


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_feature_space_l2_matches_numpy(backend: str) -> None:
    rng = np.random.default_rng(22)
    x = rng.standard_normal((1500, 10)).astype(np.float32)
    labels = rng.integers(0, 5, 1500)
    feats = rng.standard_normal((1500, 24)).astype(np.float32)
    ds = _with_features(x, feats, "l2", labels)
    q = rng.standard_normal((7, 24))
    q[0] = feats[33]
    ex = np.array([33, -1, -1, 5, -1, -1, -1])
    res = nearest(ds, q, 12, space="features", exclude=ex, chunk_rows=100, backend=backend)
    idx, d2 = _ref_excluded(feats, q, 12, ex)
    np.testing.assert_array_equal(res.indices.numpy(), idx)
    np.testing.assert_allclose(res.distances.numpy(), np.sqrt(d2), rtol=1e-12)
    np.testing.assert_array_equal(res.labels.numpy(), labels[idx])  # type: ignore[union-attr]
    assert res.similarities is None
    # the data space is untouched by the features
    np.testing.assert_array_equal(nearest(ds, x[:3], 1).indices[:, 0].numpy(), [0, 1, 2])


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_feature_space_cosine_matches_numpy(backend: str) -> None:
    rng = np.random.default_rng(23)
    x = rng.standard_normal((1200, 6)).astype(np.float32)
    feats = (rng.standard_normal((1200, 32)) * rng.uniform(0.1, 50.0, (1200, 1))).astype(np.float32)
    ds = _with_features(x, feats, "cosine")
    stored = feats.astype(np.float64) / np.linalg.norm(feats.astype(np.float64), axis=1, keepdims=True)
    stored = stored.astype(np.float32).astype(np.float64)  # what the data set keeps: unit rows in float32
    q = rng.standard_normal((6, 32)) * 7.0
    q[1] = 3.0 * feats[400]  # a scaled copy: cosine 1
    ex = np.array([-1, -1, 2, -1, 9, -1])
    res = nearest(ds, q, 9, space="features", exclude=ex, chunk_rows=128, backend=backend)
    cos = (q @ stored.T) / (np.linalg.norm(q, axis=1)[:, None] * np.linalg.norm(stored, axis=1)[None])
    for b, e in enumerate(ex):
        if e >= 0:
            cos[b, e] = -np.inf
    ref = np.stack([np.lexsort((np.arange(1200), -cos[b]))[:9] for b in range(6)])
    np.testing.assert_array_equal(res.indices.numpy(), ref)
    assert res.similarities is not None
    np.testing.assert_allclose(res.similarities.numpy(), np.take_along_axis(cos, ref, 1), rtol=0, atol=1e-13)
    np.testing.assert_allclose(res.distances.numpy() ** 2, 2.0 - 2.0 * np.take_along_axis(cos, ref, 1), atol=1e-12)
    assert res.indices[1, 0] == 400 and abs(float(res.similarities[1, 0]) - 1.0) < 1e-7
    with pytest.raises(ValueError, match="is zero"):
        nearest(ds, np.zeros((1, 32)), 1, space="features")


def test_feature_space_errors() -> None:
    rng = np.random.default_rng(24)
    x = rng.standard_normal((50, 4)).astype(np.float32)
    plain = Dataset.from_arrays("p", x)
    with pytest.raises(ValueError, match="no feature space"):
        nearest(plain, x[:1], 1, space="features")
    with pytest.raises(ValueError, match="space must be one of"):
        nearest(plain, x[:1], 1, space="pixels")
    ds = _with_features(x, rng.standard_normal((50, 3)), "l2")
    with pytest.raises(ValueError, match=r"expects \(B, 3\)"):
        nearest(ds, np.zeros((2, 4)), 1, space="features")
    with pytest.raises(ValueError, match="data space"):
        posterior_nearest(ds, x[:1], 0.5, space="features")
