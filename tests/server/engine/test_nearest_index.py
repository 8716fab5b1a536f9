"""Approximate nearest search through faiss indexes: exact float64 re-ranking, recall, the default
rule, exclusion, the feature space; against a float64 brute force written here in numpy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from floworacle_server.data import build_index, load_index, read_manifest
from floworacle_server.engine import build_nearest_index, nearest, nearest_info, parse_index_spec, posterior_nearest


def _clustered(n: int, d: int, seed: int, clusters: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = 4.0 * rng.standard_normal((clusters, d))
    return (centres[rng.integers(0, clusters, n)] + rng.standard_normal((n, d))).astype(np.float32)


def _ref(data: np.ndarray, q: np.ndarray, k: int, exclude: np.ndarray | None = None):
    d2 = ((q[:, None, :] - data[None].astype(np.float64)) ** 2).sum(-1)
    if exclude is not None:
        for b, e in enumerate(exclude):
            if e >= 0:
                d2[b, e] = np.inf
    idx = np.stack([np.lexsort((np.arange(data.shape[0]), d2[b]))[:k] for b in range(q.shape[0])])
    return idx, np.take_along_axis(d2, idx, 1)


@pytest.fixture(scope="module")
def indexed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray]:
    """N = 2,000, D = 16 clustered data with labels, cosine features, an IVF-Flat data index and an IVF-PQ features index."""
    root = tmp_path_factory.mktemp("indexed")
    x = _clustered(2000, 16, 0)
    y = np.random.default_rng(1).integers(0, 5, 2000)
    f = _clustered(2000, 8, 2, clusters=25)
    build_index(x, root / "idx", labels=y, features=f, features_metric="cosine", progress=False)
    build_nearest_index(root / "idx", "ivf:nlist=32,queries=400", progress=False)
    build_nearest_index(root / "idx", "ivfpq:nlist=16,m=4,nbits=6,queries=400", space="features", progress=False)
    return root / "idx", x, y, f


def test_approximate_answers_are_re_ranked_exactly(indexed) -> None:
    path, x, y, _ = indexed
    ds = load_index(path)
    rng = np.random.default_rng(3)
    q = x[rng.integers(0, 2000, 64)].astype(np.float64) + 0.5 * rng.standard_normal((64, 16))
    exact = nearest(ds, q, 10, exact=True)
    low = nearest(ds, q, 10, nprobe=1)
    assert low.approximate and not exact.approximate
    # every returned distance is the float64 distance of the returned sample, sorted, labels match
    d = np.linalg.norm(q[:, None] - x[low.indices.numpy()].astype(np.float64), axis=-1)
    np.testing.assert_allclose(low.distances.numpy(), d, rtol=1e-13, atol=1e-13)
    assert (np.diff(low.distances.numpy(), axis=1) >= 0).all()
    np.testing.assert_array_equal(low.labels.numpy(), y[low.indices.numpy()])  # type: ignore[union-attr]
    # one probed list misses true neighbours for some queries (the test means something) ...
    assert not np.array_equal(low.indices.numpy(), exact.indices.numpy())
    # ... and never beats the exact answer
    assert (low.distances.numpy() >= exact.distances.numpy() - 1e-12).all()
    # with every list probed the candidates hold the true neighbours: the exact answer, bit for bit
    full = nearest(ds, q, 10, nprobe=32)
    ref_idx, ref_d2 = _ref(x, q, 10)
    np.testing.assert_array_equal(full.indices.numpy(), ref_idx)
    np.testing.assert_array_equal(full.distances.numpy(), exact.distances.numpy())
    np.testing.assert_allclose(full.distances.numpy() ** 2, ref_d2, rtol=1e-12)


def test_ivfpq_candidates_get_exact_distances(indexed) -> None:
    path, _, _, f = indexed
    ds = load_index(path)
    rng = np.random.default_rng(4)
    q = f[:40].astype(np.float64) + 0.2 * rng.standard_normal((40, 8))
    res = nearest(ds, q, 5, space="features", exact=False)
    assert res.approximate and res.similarities is not None
    stored = f.astype(np.float64) / np.linalg.norm(f.astype(np.float64), axis=1, keepdims=True)
    stored = stored.astype(np.float32).astype(np.float64)
    got = stored[res.indices.numpy()]
    cos = (got @ (q / np.linalg.norm(q, axis=1, keepdims=True))[:, :, None])[..., 0] / np.linalg.norm(got, axis=-1)
    np.testing.assert_allclose(res.similarities.numpy(), cos, atol=1e-13)  # PQ codes do not leak into the answer
    assert (np.diff(res.similarities.numpy(), axis=1) <= 1e-15).all()


def test_default_rule_exclude_and_errors(indexed) -> None:
    path, x, _, _ = indexed
    ds = load_index(path)
    q = x[[5, 6, 7]].astype(np.float64)
    assert not nearest(ds, q, 3).approximate  # N <= exact_nearest_max_samples: exact
    ds.exact_nearest_max_samples = 1000
    assert nearest(ds, q, 3).approximate  # a larger set with an index: the index
    assert not nearest(ds, q, 3, exact=True).approximate
    ex = torch.tensor([5, -1, 7])
    res = nearest(ds, q, 4, nprobe=32, exclude=ex)
    idx, _ = _ref(x, q, 4, ex.numpy())
    np.testing.assert_array_equal(res.indices.numpy(), idx)
    assert res.indices[1, 0] == 6 and 5 not in res.indices[0].tolist() and 7 not in res.indices[2].tolist()
    # posterior-nearest on the index: x_t / alpha is searched
    pn = posterior_nearest(ds, 0.5 * q, 0.5, k=2, nprobe=32, exclude=ex)
    np.testing.assert_array_equal(pn.indices.numpy(), res.indices[:, :2].numpy())
    assert pn.approximate
    with pytest.raises(ValueError, match="exact = true asks for brute force; drop one"):
        nearest(ds, q, 1, exact=True, nprobe=4)
    with pytest.raises(ValueError, match="at most the index's 32"):
        nearest(ds, q, 1, nprobe=33)
    with pytest.raises(ValueError, match="integer >= 1"):
        nearest(ds, q, 1, nprobe=0)
    plain = load_index(path)
    plain.nearest_indexes.clear()
    with pytest.raises(ValueError, match="has no nearest index"):
        nearest(plain, q, 1, exact=False)


def test_weighted_posterior_nearest_stays_exact(tmp_path: Path) -> None:
    x = _clustered(600, 6, 5)
    w = np.random.default_rng(6).uniform(0.1, 1.0, 600)
    build_index(x, tmp_path / "w", weights=w, progress=False)
    build_nearest_index(tmp_path / "w", "ivf:nlist=8,queries=50", progress=False)
    ds = load_index(tmp_path / "w")
    ds.exact_nearest_max_samples = 10  # the default would pick the index ...
    res = posterior_nearest(ds, x[:4], 0.7, 0.3, k=2)
    assert not res.approximate  # ... but an index cannot rank by log p_i: exact
    with pytest.raises(ValueError, match="exact only"):
        posterior_nearest(ds, x[:4], 0.7, 0.3, nprobe=2)


def test_recall_in_the_manifest_matches_an_independent_count(tmp_path: Path) -> None:
    """With the k-means sample = all N and queries = N, every sample is a recall query (leave-one-out):
    the stored recall@k per nprobe must equal the share found, counted here against a numpy brute force."""
    x = _clustered(500, 8, 7, clusters=12)
    build_index(x, tmp_path / "r", progress=False)
    entry = build_nearest_index(tmp_path / "r", "ivf:nlist=12,train=500,queries=500,k=5,recall=1.0", progress=False)
    assert "drawn from" in entry["recall_queries"]
    manifest = read_manifest(tmp_path / "r")
    assert manifest["nearest_indexes"][0]["recall_by_nprobe"] == entry["recall_by_nprobe"]
    ds = load_index(tmp_path / "r")
    q = x.astype(np.float64)
    own = np.arange(500)
    _, ref_d2 = _ref(x, q, 5, own)
    table = entry["recall_by_nprobe"]
    assert [e["nprobe"] for e in table] == [1, 2, 4, 8, 12][: len(table)]
    for e in table:
        got = nearest(ds, q, 5, nprobe=e["nprobe"], exclude=torch.from_numpy(own)).distances.numpy()
        found = (got**2 <= ref_d2[:, 4:5] * (1 + 1e-12)).sum(1) / 5
        assert e["recall"] == pytest.approx(float(found.mean()), abs=1e-6)
    assert table[0]["recall"] < 1.0  # one list of twelve misses neighbours
    # the default nprobe is the first that reaches the target (1.0 here), reported with its recall
    first = next(e for e in table if e["recall"] >= 1.0)
    assert entry["default_nprobe"] == first["nprobe"] and entry["recall"] == first["recall"] == 1.0
    assert entry["recall_target_met"]
    info = nearest_info(ds)
    (idx,) = info.indexes
    assert (idx.space, idx.kind, idx.params, idx.recall_k) == ("data", "ivf", "IVF12,Flat", 5)
    assert idx.recall == entry["recall"] and idx.default_nprobe == entry["default_nprobe"]
    assert idx.device == "cpu" and idx.bytes == (tmp_path / "r" / entry["file"]).stat().st_size > 0


def test_held_out_queries_and_spec_parsing(tmp_path: Path) -> None:
    x = _clustered(3000, 8, 8)
    build_index(x, tmp_path / "h", progress=False)
    entry = build_nearest_index(tmp_path / "h", "ivf:nlist=16,train=1000,queries=200,nprobe=3", progress=False)
    assert "outside" in entry["recall_queries"] and entry["default_nprobe"] == 3 and entry["train_rows"] == 1000
    assert [e["nprobe"] for e in entry["recall_by_nprobe"]] == [1, 2, 3]
    spec = parse_index_spec("ivfpq:nlist=64,m=8,recall=0.95")
    assert (spec.kind, spec.nlist, spec.m, spec.recall, spec.rerank) == ("ivfpq", 64, 8, 0.95, None)
    for bad, msg in [
        ("hnsw", "index kind"),
        ("ivf:nlsit=4", "key=value with key one of"),
        ("ivf:nlist=four", "an integer"),
        ("ivf:nlist", "key=value"),
    ]:
        with pytest.raises(ValueError, match=msg):
            parse_index_spec(bad)
    for bad, msg in [
        ("ivf:nlist=4000", "nlist must lie in"),
        ("ivfpq:nlist=8,m=3", "must divide D"),
        ("ivf:nlist=8,nprobe=9", "nprobe must lie in"),
    ]:
        with pytest.raises(ValueError, match=msg):
            build_nearest_index(tmp_path / "h", bad, progress=False)
    with pytest.raises(ValueError, match="no feature space"):
        build_nearest_index(tmp_path / "h", "ivf", space="features", progress=False)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_storage_indexes_the_stored_values(tmp_path: Path, dtype: str) -> None:
    x = _clustered(700, 8, 9)
    build_index(x, tmp_path / "h", dtype=dtype, progress=False)
    build_nearest_index(tmp_path / "h", "ivf:nlist=8,queries=50", progress=False)
    ds = load_index(tmp_path / "h")
    stored = np.empty((700, 8))
    stored[ds.original_index.numpy()] = ds.x.double().numpy()
    q = stored[:20] + 0.3
    res = nearest(ds, q, 5, nprobe=8)  # every list: the exact answer over the stored half values
    idx, d2 = _ref(stored, q, 5)
    np.testing.assert_array_equal(res.indices.numpy(), idx)
    np.testing.assert_allclose(res.distances.numpy() ** 2, d2, rtol=1e-12)
