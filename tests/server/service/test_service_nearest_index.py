"""Nearest search at scale through the service, as a user reaches it: an index directory built by
`floworacle index build` with a faiss index and cosine feature embeddings, served, and queried
with the SDK: exact and approximate answers (re-ranked in float64, marked approximate), the
feature space with its similarities, the facts DescribeDataset reports, and precise refusals."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from floworacle import OracleClient, OracleError
from floworacle_server.cli import main as cli
from floworacle_server.service.testing import RunningServer, serve_in_thread
from floworacle_server.settings import Settings

N, D, F = 600, 16, 8


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, np.ndarray, Path]:
    d = tmp_path_factory.mktemp("idx")
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((12, D)) * 4
    x = (centers[rng.integers(0, 12, N)] + rng.standard_normal((N, D))).astype(np.float32)
    feats = rng.standard_normal((N, F)).astype(np.float32)
    np.save(d / "x.npy", x)
    np.save(d / "f.npy", feats)
    out = d / "index"
    rc = cli(
        ["index", "build", str(d / "x.npy"), str(out), "--features", str(d / "f.npy"), "--features-metric", "cosine",
         "--nearest-index", "ivf:nlist=8"]
    )  # fmt: skip
    assert rc == 0
    return x.astype(np.float64), feats.astype(np.float64), out


@pytest.fixture(scope="module")
def server(data: tuple[np.ndarray, np.ndarray, Path]) -> Iterator[RunningServer]:
    with serve_in_thread(Settings(device="cpu", metrics_port=-1, data=[f"idx={data[2]}"])) as srv:
        yield srv


def test_exact_approximate_and_feature_searches(server: RunningServer, data) -> None:
    x, feats, _ = data
    q = x[:20] + 0.1
    with OracleClient(server.address) as c:
        info = c.describe()
        assert info.nearest_backend in ("torch", "faiss") and info.nearest_backend_reason
        assert info.feature_dim == F and info.feature_metric == "cosine"
        (ix,) = [i for i in info.nearest_indexes if i.space == "data"]
        assert ix.kind == "ivf" and 0.0 < ix.recall <= 1.0 and ix.default_nprobe >= 1
        exact = c.nearest(q, k=3)
        assert not exact.approximate
        ref = np.sqrt(((q[:, None, :] - x[None]) ** 2).sum(-1))
        np.testing.assert_array_equal(exact.indices, np.argsort(ref, axis=1, kind="stable")[:, :3])
        approx = c.nearest(q, k=3, exact=False, nprobe=8)  # every list probed: the exact answer
        assert approx.approximate
        np.testing.assert_array_equal(approx.indices, exact.indices)
        got = np.take_along_axis(ref, approx.indices, axis=1)
        np.testing.assert_allclose(approx.distances, got, rtol=1e-12)  # re-ranked with float64 distances
        fq = feats[:5] * 3.0
        fs = c.nearest(fq, k=2, space="features")
        cos = (fq / np.linalg.norm(fq, axis=1, keepdims=True)) @ (
            feats / np.linalg.norm(feats, axis=1, keepdims=True)
        ).T
        np.testing.assert_array_equal(fs.indices[:, 0], np.arange(5))
        np.testing.assert_allclose(fs.similarities, np.take_along_axis(cos, fs.indices, axis=1), atol=1e-6)
        left_out = c.nearest(q[:4], k=1, exclude=exact.indices[:4, 0])  # leave-one-out
        np.testing.assert_array_equal(left_out.indices[:, 0], exact.indices[:4, 1])


def test_searches_the_data_set_cannot_run_are_failed_precondition(server: RunningServer) -> None:
    with serve_in_thread(Settings(device="cpu", metrics_port=-1)) as plain, OracleClient(plain.address) as c:
        for kwargs in ({"space": "features"}, {"exact": False}, {"nprobe": 4}):
            with pytest.raises(OracleError) as e:
                c.nearest(np.zeros((2, 64)), k=1, **kwargs)
            assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION, kwargs
            assert "floworacle index build" in e.value.details
        assert c.nearest(np.zeros((2, 64)), k=1).indices.shape == (2, 1)  # and the server goes on


def test_the_served_knn_target_over_the_index(server: RunningServer, data) -> None:
    """precision='knn' answers from the index's neighbours and a uniform tail, with its indicators
    and no error bounds: in the refinement stage it equals the exact oracle (the neighbours hold
    all the weight); early in the path the indicators say it is an estimate."""
    x, _, _ = data
    rng = np.random.default_rng(5)
    t = np.array([0.9] * 6 + [0.95] * 6)
    x1 = x[rng.integers(0, N, t.size)]
    x_t = t[:, None] * x1 + (1 - t[:, None]) * rng.standard_normal(x1.shape)
    with OracleClient(server.address, timeout=60) as c:
        exact = c.predict(x_t, t, outputs=("velocity", "x1_hat"))
        knn = c.predict(x_t, t, outputs=("velocity", "x1_hat"), precision="knn", knn_k=32, knn_tail=16)
        assert knn.precision == "knn"
        assert knn.x1_hat_error_bound is None and knn.velocity_error_bound is None  # it claims no bound
        for name in ("knn_weight_share", "knn_tail_bound", "knn_variance"):
            assert getattr(knn, name).shape == (t.size,)
        assert (knn.knn_weight_share > 0.999).all() and (knn.knn_tail_bound < 1e-6).all()
        np.testing.assert_allclose(knn.x1_hat, exact.x1_hat, atol=1e-5)
        np.testing.assert_allclose(knn.velocity, exact.velocity, rtol=1e-5, atol=1e-4)
        early = c.predict(x_t[:4] * 0 + rng.standard_normal((4, D)), 0.05, outputs=("x1_hat",), precision="knn")
        assert (early.knn_weight_share < 0.999).all() and (early.knn_variance > 0).all()
        with pytest.raises(OracleError) as err:  # the diagnostics need the whole posterior
            c.predict(x_t, t, outputs=("velocity", "entropy"), precision="knn")
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "precision='exact'" in err.value.details
        with pytest.raises(OracleError) as err:
            c.velocity(x_t, t, knn_k=8)  # a kNN option without the kNN precision
        assert "belong to precision='knn'" in err.value.details


def test_the_knn_target_needs_an_index() -> None:
    with serve_in_thread(Settings(device="cpu", metrics_port=-1)) as srv, OracleClient(srv.address) as c:
        with pytest.raises(OracleError) as err:
            c.velocity(np.zeros((2, 64)), 0.5, precision="knn")
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "--nearest-index ivf" in err.value.details
