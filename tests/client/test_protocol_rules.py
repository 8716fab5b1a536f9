"""The request rules: one rule, one message, whichever side applies it.

The SDK refuses what it can check locally with OracleError (INVALID_ARGUMENT, also a ValueError)
carrying the very message the server sends for the same request when it bypasses the SDK (sent
with the generated stub); every failure of an SDK call is an OracleError; an empty batch is
answered with empty arrays of the right shapes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from sdk_support import CLASSES, SHAPE, Data, queries, settings

from floworacle import AsyncOracleClient, OracleClient, OracleError, RequestError
from floworacle.protocol import encode, pb, pb_grpc
from floworacle_server.data import Dataset, DatasetStore
from floworacle_server.service.testing import RunningServer, serve_in_thread

INVALID = grpc.StatusCode.INVALID_ARGUMENT
B = 4


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[OracleClient]:
    with OracleClient(server.address) as c:
        yield c


@pytest.fixture(scope="module")
def stub(server: RunningServer) -> Iterator[pb_grpc.FlowOracleStub]:
    with grpc.insecure_channel(server.address) as ch:
        yield pb_grpc.FlowOracleStub(ch)


def _oracle_request(x_t: np.ndarray, t: np.ndarray, **fields: Any) -> pb.OracleRequest:
    return pb.OracleRequest(x_t=encode(x_t.astype(np.float32)), t=encode(t), **fields)


# (name, SDK call, the same request built by hand for the stub)
def _cases(data: Data) -> list[tuple[str, Callable[[OracleClient], Any], Callable[[], Any]]]:
    x, t = queries(data, B, seed=1)
    bad_t = t.copy()
    bad_t[0] = 1.5
    lab = np.array([0, 1, -2, 2])
    exc = np.array([-1, -3, 0, 1])
    return [
        ("t outside", lambda c: c.velocity(x, bad_t), lambda: ("Oracle", _oracle_request(x, bad_t))),
        (
            "top_k too large",
            lambda c: c.predict(x, t, outputs=("topk",), top_k=2000),
            lambda: ("Oracle", _oracle_request(x, t, top_k=2000)),
        ),
        (
            "label below -1",
            lambda c: c.velocity(x, t, labels=lab),
            lambda: ("Oracle", _oracle_request(x, t, labels=encode(lab))),
        ),
        (
            "exclude below -1",
            lambda c: c.velocity(x, t, exclude=exc),
            lambda: ("Oracle", _oracle_request(x, t, exclude=encode(exc))),
        ),
        (
            "guidance interval",
            lambda c: c.velocity(x, t, labels=np.zeros(B, int), guidance=2.0, guidance_interval=(0.7, 0.2)),
            lambda: (
                "Oracle",
                _oracle_request(
                    x, t, labels=encode(np.zeros(B, np.int64)), guidance=pb.Guidance(scale=2.0, t_lo=0.7, t_hi=0.2)
                ),
            ),
        ),
        (
            "sigma below the floor",
            lambda c: c.velocity(x, None, coefficients={"alpha": 1.0, "sigma": 0.0, "d_alpha": 1.0, "d_sigma": -1.0}),
            lambda: (
                "Oracle",
                pb.OracleRequest(
                    x_t=encode(x.astype(np.float32)),
                    path=pb.PathSpec(
                        custom=pb.CustomCoefficients(
                            alpha=encode(np.ones(B)),
                            sigma=encode(np.zeros(B)),
                            d_alpha=encode(np.ones(B)),
                            d_sigma=encode(-np.ones(B)),
                        )
                    ),
                ),
            ),
        ),
        ("k zero", lambda c: c.nearest(x, k=0), lambda: ("Nearest", pb.NearestRequest(x=encode(x), k=0))),
        ("k too large", lambda c: c.nearest(x, k=1025), lambda: ("Nearest", pb.NearestRequest(x=encode(x), k=1025))),
        (
            "nprobe with exact",
            lambda c: c.nearest(x, k=1, exact=True, nprobe=4),
            lambda: ("Nearest", pb.NearestRequest(x=encode(x), k=1, exact=True, nprobe=4)),
        ),
    ]


@pytest.mark.parametrize("index", range(9))
def test_local_and_server_messages_agree(client: OracleClient, stub, data: Data, index: int) -> None:
    name, sdk_call, raw = _cases(data)[index]
    with pytest.raises(OracleError) as local:
        sdk_call(client)
    assert isinstance(local.value, RequestError) and isinstance(local.value, ValueError), name
    assert local.value.code == INVALID
    method, request = raw()
    with pytest.raises(grpc.RpcError) as remote:
        getattr(stub, method)(request, timeout=10)
    assert remote.value.code() == INVALID, (name, remote.value.details())
    assert remote.value.details() == local.value.details, name


def test_numbers_are_printed_plainly(client: OracleClient, data: Data) -> None:
    x, t = queries(data, B, seed=2)
    t = t.copy()
    t[0] = 1.5
    with pytest.raises(RequestError) as e:
        client.velocity(x, t)
    assert "t[0] = 1.5 is outside" in e.value.details and "np." not in e.value.details
    with pytest.raises(RequestError) as e:
        client.velocity(
            x, np.full(B, 0.5), labels=np.zeros(B, int), guidance=np.float64(2.0), guidance_interval=(0.9, 0.1)
        )
    assert "got [0.9, 0.1]" in e.value.details and "np." not in e.value.details


def test_the_expected_shape_is_named_once(client: OracleClient, data: Data) -> None:
    x, t = queries(data, B, seed=3)
    with pytest.raises(OracleError) as e:
        client.velocity(x[:, :5], t)
    assert e.value.code == INVALID and f"expects (B, {x.shape[1]}) or (B, {SHAPE[0]}, {SHAPE[1]})" in e.value.details
    flat = DatasetStore([Dataset.from_arrays("flat", np.zeros((3, 64), np.float32))])
    with serve_in_thread(settings(), flat) as srv, OracleClient(srv.address) as c:  # digits-like: one shape
        with pytest.raises(OracleError) as e:
            c.velocity(np.zeros((2, 63)), 0.5)
    assert "expects (B, 64)" in e.value.details and "or (B, 64)" not in e.value.details


def test_integers_are_checked_not_wrapped(client: OracleClient, data: Data) -> None:
    x, t = queries(data, B, seed=4)
    with pytest.raises(RequestError, match="does not fit int64"):
        client.velocity(x, t, labels=np.array([2**64 - 1, 0, 0, 0], dtype=np.uint64))
    with pytest.raises(RequestError, match="does not fit int64"):
        client.velocity(x, t, exclude=[2**63, 0, 0, 0])
    with pytest.raises(RequestError, match=r"k must be an integer, got 2\.5"):
        client.nearest(x, k=2.5)
    with pytest.raises(RequestError, match="top_k must be an integer"):
        client.predict(x, t, top_k=1.5)
    with pytest.raises(RequestError, match="labels must be integers"):
        client.velocity(x, t, labels=np.array([0.5, 0, 0, 0]))
    assert client.nearest(x, k=2.0).indices.shape == (B, 2)  # an integral float is an integer


def test_every_failure_is_an_oracle_error(server: RunningServer, data: Data) -> None:
    x, t = queries(data, B, seed=5)
    with OracleClient(server.address) as c:
        for call in (
            lambda: c.velocity(np.zeros(5), t),  # no batch dimension
            lambda: c.velocity(x.astype(np.int32), t),  # not floats
            lambda: c.velocity(x, t, dataset="missing"),  # NOT_FOUND from the server
            lambda: c.velocity(x, t, timeout=-1),
            lambda: c.predict(x, t, outputs=("bogus",)),
            lambda: list(c.predict_stream([(x, t), "not an item"])),
        ):
            with pytest.raises(OracleError):
                call()
    with pytest.raises(OracleError) as e:
        c.velocity(x, t)  # closed
    assert e.value.code == grpc.StatusCode.CANCELLED


def test_empty_batches_answer_empty_arrays(client: OracleClient, server: RunningServer, data: Data) -> None:
    empty = np.zeros((0, *SHAPE), np.float32)
    t = np.zeros(0)
    assert client.velocity(empty, t).shape == (0, *SHAPE)
    p = client.predict(empty, t, top_k=3, labels=np.zeros(0, int))
    assert p.velocity.shape == p.x1_hat.shape == p.score.shape == (0, *SHAPE)
    assert p.topk_indices.shape == p.topk_weights.shape == (0, 3)
    assert p.entropy.shape == p.ess.shape == p.variance.shape == p.x1_hat_error_bound.shape == (0,)
    nn = client.nearest(np.zeros((0, int(np.prod(SHAPE)))), k=2)
    assert nn.indices.shape == nn.distances.shape == nn.labels.shape == (0, 2)
    tv = client.velocity(torch.zeros(0, *SHAPE, dtype=torch.bfloat16), torch.zeros(0))
    assert isinstance(tv, torch.Tensor) and tv.shape == (0, *SHAPE) and tv.dtype == torch.bfloat16
    x, tt = queries(data, 2, seed=6)
    outs = list(client.velocity_stream([(empty, t), (x, tt), (empty, t)]))
    assert [o.shape[0] for o in outs] == [0, 2, 0]

    async def run() -> None:
        async with AsyncOracleClient(server.address) as c:
            assert (await c.velocity(empty, t)).shape == (0, *SHAPE)
            assert (await c.nearest(np.zeros((0, 12)), k=1)).indices.shape == (0, 1)

    asyncio.run(run())
    assert CLASSES  # the blobs data set has labels: conditional empty batches are answered too
