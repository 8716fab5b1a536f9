"""Every message on the wire, both ways, is what protobuf's deterministic serializer writes for
the parsed message: one occurrence per field, in field-number order, minimal varints.

The SDK talks to the real server through a recording proxy that forwards raw bytes, so the test
sees exactly the bytes each side sent, for every RPC, output combination, batch size and wire
dtype (sync, asyncio and streaming clients alike).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator

import numpy as np
import pytest
from sdk_support import CLASSES, SHAPE, Data, N, queries

from floworacle import AsyncOracleClient, OracleClient
from floworacle.protocol import FLOAT_DTYPES, OUTPUT_NAMES, pb
from floworacle_server.service.testing import RunningServer
from protowire import recording_proxy

METHODS = {"Oracle": "unary", "Nearest": "unary", "ListDatasets": "unary", "DescribeDataset": "unary"}
METHODS["OracleStream"] = "stream"
CLASSES_OF = {
    "Oracle": (pb.OracleRequest, pb.OracleResponse),
    "OracleStream": (pb.OracleRequest, pb.OracleStreamResponse),
    "Nearest": (pb.NearestRequest, pb.NearestResponse),
    "ListDatasets": (pb.ListDatasetsRequest, pb.ListDatasetsResponse),
    "DescribeDataset": (pb.DescribeDatasetRequest, pb.DatasetInfo),
}
#: each output alone, every output, and pairs across the kinds (sample / per-query / top-k)
OUTPUT_SETS = [(o,) for o in OUTPUT_NAMES] + [OUTPUT_NAMES, ("velocity", "topk"), ("x1_hat", "entropy", "variance")]


def _canonical(cls: type, raw: bytes) -> bool:
    return bool(cls.FromString(raw).SerializeToString(deterministic=True) == raw)


@pytest.fixture(scope="module")
def proxied(server: RunningServer) -> Iterator[tuple[str, object]]:
    with recording_proxy(server.address, METHODS) as (address, rec):
        yield address, rec


def _assert_all_canonical(rec: object, expect: set[str]) -> int:
    seen = 0
    for method, (req_cls, resp_cls) in CLASSES_OF.items():
        for raw in rec.requests.get(method, []):  # type: ignore[attr-defined]
            assert _canonical(req_cls, raw), (method, "request", raw[:80])
            seen += 1
        for raw in rec.responses.get(method, []):  # type: ignore[attr-defined]
            assert _canonical(resp_cls, raw), (method, "response", raw[:80])
            seen += 1
    got = {m for m in CLASSES_OF if rec.requests.get(m) and rec.responses.get(m)}  # type: ignore[attr-defined]
    assert expect <= got, (expect, got)
    return seen


@pytest.mark.parametrize("wire", FLOAT_DTYPES)
def test_oracle_and_nearest_bytes_are_canonical(proxied, data: Data, wire: str) -> None:
    address, rec = proxied
    rec.clear()  # type: ignore[attr-defined]
    with OracleClient(address, wire_dtype=wire) as c:
        for b in (0, 1, 5, 64):
            x_t, t = queries(data, b, seed=b)
            labels = np.arange(b) % (CLASSES + 1) - 1
            exclude = np.where(np.arange(b) % 2 == 0, np.arange(b) % N, -1)
            for outs in OUTPUT_SETS:
                c.predict(x_t, t, outputs=outs, top_k=3, labels=labels, exclude=exclude)
            c.velocity(x_t.reshape(b, *SHAPE), t, labels=labels, guidance=2.0, guidance_interval=(0.1, 0.7))
            coef = {"alpha": t, "sigma": 1 - t, "d_alpha": np.ones(b), "d_sigma": -np.ones(b)}
            c.predict(x_t, t, coefficients=coef, outputs=("velocity", "score"), precision="fast")
            c.velocity(x_t, 1 - t, convention="reversed")
            c.predict(x_t.reshape(b, *SHAPE), t, outputs=("velocity", "x1_hat"), kind="local", patch_size=3)
            c.velocity(x_t, t, kind="linear")
            c.nearest(x_t, k=4, exclude=exclude)
            if b:
                c.nearest(x_t, k=2, t=t)
        c.datasets()
        c.describe()
    assert _assert_all_canonical(rec, {"Oracle", "Nearest", "ListDatasets", "DescribeDataset"}) >= 130


def test_stream_and_async_bytes_are_canonical(proxied, data: Data) -> None:
    address, rec = proxied
    rec.clear()  # type: ignore[attr-defined]
    items = [queries(data, b, seed=30 + b) for b in (3, 0, 17)]
    with OracleClient(address) as c:
        answers = list(c.predict_stream(items, outputs=("velocity", "topk", "ess"), top_k=2))
    assert [len(a.velocity) for a in answers] == [3, 0, 17]

    async def run() -> None:
        async with AsyncOracleClient(address, wire_dtype="bfloat16") as c:
            for (x_t, t), outs in itertools.product(items, OUTPUT_SETS[:3]):
                await c.predict(x_t, t, outputs=outs, top_k=2)
            await c.nearest(items[0][0], k=3)
            async for _ in c.predict_stream(items):
                pass

    asyncio.run(run())
    assert _assert_all_canonical(rec, {"Oracle", "OracleStream", "Nearest"}) > 20


def test_the_check_would_catch_a_hand_made_framing() -> None:
    """The property the tests above rely on: a repeated tensor field or a padded varint, which
    plain protobuf parsers accept, is not canonical."""
    msg = pb.OracleResponse(velocity=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1, 1], data=b"\0\0\0\0"))
    raw = msg.SerializeToString()
    assert _canonical(pb.OracleResponse, raw)
    split_tensor = (
        pb.OracleResponse(velocity=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1, 1])).SerializeToString()
        + pb.OracleResponse(velocity=pb.Tensor(data=b"\0\0\0\0")).SerializeToString()
    )
    assert pb.OracleResponse.FromString(split_tensor) == msg and not _canonical(pb.OracleResponse, split_tensor)
    padded = raw[:-6] + b"\x1a\x84\x00" + raw[-4:]  # data's length 4 as a 2-byte varint
    padded = padded[:1] + bytes([padded[1] + 1]) + padded[2:]
    assert pb.OracleResponse.FromString(padded) == msg and not _canonical(pb.OracleResponse, padded)
