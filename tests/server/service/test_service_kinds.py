"""The oracle kinds over gRPC, as a user reaches them with the SDK: local, equivariant local and
linear answers against the independent float64 loops of tests/patch_reference.py, a patch-size
schedule over t, and precise refusals; the kinds ride the same request path as every option."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from floworacle import OracleClient, OracleError, RequestError
from floworacle_server.data import Dataset, DatasetStore
from floworacle_server.service.testing import RunningServer, serve_in_thread
from floworacle_server.settings import Settings
from patch_reference import equivariant_reference, linear_reference, local_reference

SHAPE = (1, 6, 6)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    rng = np.random.default_rng(11)
    return np.clip(rng.standard_normal((30, *SHAPE)), -2, 2).astype(np.float32)


@pytest.fixture(scope="module")
def server(images: np.ndarray) -> Iterator[RunningServer]:
    store = DatasetStore()
    store.add(Dataset.from_arrays("img", images))  # a 3-D sample shape is its image shape
    store.add(Dataset.from_arrays("flat", images.reshape(30, -1)))  # no image shape
    with serve_in_thread(Settings(device="cpu", metrics_port=-1), store) as srv:
        yield srv


def _queries(images: np.ndarray, t: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x1 = images[rng.integers(0, len(images), len(t))].astype(np.float64)
    return t[:, None, None, None] * x1 + (1 - t[:, None, None, None]) * rng.standard_normal(x1.shape)


@pytest.mark.parametrize("kind", ["local", "equivariant", "linear"])
def test_each_kind_matches_its_float64_reference(server: RunningServer, images: np.ndarray, kind: str) -> None:
    t = np.array([0.2, 0.5, 0.8, 0.95])
    x_t = _queries(images, t, seed=len(kind))
    data = images.reshape(len(images), -1).astype(np.float64)
    patch = None if kind == "linear" else 3
    with OracleClient(server.address, dataset="img", timeout=60) as c:
        p = c.predict(x_t, t, outputs=("x1_hat", "velocity"), kind=kind, patch_size=patch)
    for b in range(len(t)):
        if kind == "local":
            ref = local_reference(data, x_t[b], t[b], 1 - t[b], 3, SHAPE)
        elif kind == "equivariant":
            ref = equivariant_reference(data, x_t[b], t[b], 1 - t[b], 3, SHAPE)
        else:
            ref = linear_reference(data, x_t[b], t[b], 1 - t[b])
        got = p.x1_hat[b].reshape(-1)
        assert np.abs(got - ref).max() <= p.x1_hat_error_bound[b] + 1e-12
        assert np.abs(got - ref).max() < 1e-8
        u_ref = (ref - x_t[b].reshape(-1)) / (1 - t[b])  # linear path: (x1_hat - x_t) / (1 - t)
        np.testing.assert_allclose(p.velocity[b].reshape(-1), u_ref, rtol=1e-9, atol=1e-9)
    assert p.x1_hat.shape == x_t.shape  # the caller's sample shape comes back


def test_a_patch_size_schedule_over_t_and_the_global_limit(server: RunningServer, images: np.ndarray) -> None:
    """A schedule gives each query the P of its t; at P = 2 max(H, W) - 1 every window covers the
    image and the local oracle is the global one."""
    t = np.array([0.1, 0.6, 0.9])
    x_t = _queries(images, t, seed=3)
    data = images.reshape(len(images), -1).astype(np.float64)
    with OracleClient(server.address, dataset="img", timeout=60) as c:
        got = c.predict(x_t, t, outputs=("x1_hat",), kind="local", patch_size=[(0.0, 5), (0.5, 3), (0.8, 1)])
        for b, p in enumerate((5, 3, 1)):
            ref = local_reference(data, x_t[b], t[b], 1 - t[b], p, SHAPE)
            assert np.abs(got.x1_hat[b].reshape(-1) - ref).max() < 1e-8
        whole = c.predict(x_t, t, outputs=("x1_hat",), kind="local", patch_size=11)
        exact = c.predict(x_t, t, outputs=("x1_hat",))
        np.testing.assert_allclose(whole.x1_hat, exact.x1_hat, atol=1e-10)


def test_kind_refusals_say_what_to_change(server: RunningServer, images: np.ndarray) -> None:
    x = _queries(images, np.array([0.5, 0.5]), seed=4)
    with OracleClient(server.address, dataset="img", timeout=60) as c:
        with pytest.raises(RequestError, match="needs patch_size"):  # before anything is sent
            c.velocity(x, 0.5, kind="local")
        with pytest.raises(RequestError, match=r"patch_size\[0\] = 4 must be a positive odd number"):
            c.velocity(x, 0.5, kind="equivariant", patch_size=4)
        with pytest.raises(RequestError, match="describe the posterior over samples"):
            c.predict(x, 0.5, outputs=("velocity", "topk"), kind="local", patch_size=3)
        with pytest.raises(RequestError, match="kind must be one of"):
            c.velocity(x, 0.5, kind="patchy")
        with pytest.raises(OracleError) as err:  # the data set's own limit: the server's
            c.velocity(x, 0.5, kind="local", patch_size=13)
        assert (
            err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "exceeds 2 max(H, W) - 1 = 11" in err.value.details
        )
        with pytest.raises(OracleError) as err:
            c.velocity(x.reshape(2, -1), 0.5, kind="local", patch_size=3, dataset="flat")
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "image shape" in err.value.details
        assert c.velocity(x, 0.5).shape == x.shape  # the server goes on
