"""The zero-copy framing of tensor payloads (floworacle._wire): what it sends is standard protobuf,
what it parses equals protobuf's own parse for any input, and over a real channel at the production
size threshold every client and a plain generated stub get the float64 reference's answers."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st
from sdk_support import linear_ref

from floworacle import AsyncOracleClient, OracleClient, _codec, _wire
from floworacle.v1 import oracle_pb2 as pb
from floworacle.v1 import oracle_pb2_grpc as pb_grpc
from floworacle_server.data import Dataset, DatasetStore
from floworacle_server.service.testing import serve_in_thread
from floworacle_server.settings import Settings


def _tensor(a: np.ndarray) -> pb.Tensor:
    return _codec.encode(a)


def _full_request(x: np.ndarray, t: np.ndarray) -> pb.OracleRequest:
    return pb.OracleRequest(
        dataset="d",
        fingerprint="sha256:00",
        x_t=_tensor(x),
        t=_tensor(t),
        outputs=[pb.OUTPUT_VELOCITY, pb.OUTPUT_TOPK],
        top_k=3,
        path=pb.PathSpec(
            custom=pb.CustomCoefficients(alpha=_tensor(t), sigma=_tensor(1 - t), d_alpha=_tensor(t), d_sigma=_tensor(t))
        ),
        request_id="7.1",
    )


def test_outgoing_serializes_to_the_standard_message() -> None:
    x = np.arange(64 * 300, dtype=np.float32).reshape(64, 300)
    t = np.linspace(0.1, 0.9, 64)
    full = _full_request(x, t)
    head = pb.OracleRequest()
    head.CopyFrom(full)
    head.x_t.ClearField("data")
    out = _wire.Outgoing(head)
    out.attach("x_t", x)
    raw = out.serialize()
    assert pb.OracleRequest.FromString(raw) == full
    # one more key and length of the x_t field, and at most 2 ALIGN bytes of alignment padding
    assert full.ByteSize() < len(raw) <= full.ByteSize() + 8 + 2 * _wire.ALIGN
    # put() sets dtype and shape and replaces data that was in the message
    again = pb.OracleRequest()
    again.CopyFrom(full)
    out = _wire.Outgoing(again)
    out.put("x_t", pb.DTYPE_FLOAT32, x[:2].shape, x[:2])
    assert pb.OracleRequest.FromString(out.serialize()).x_t == _tensor(x[:2])
    with pytest.raises(ValueError, match="Tensor"):
        out.attach("path", x)
    with pytest.raises(ValueError, match="singular message"):
        out.attach("outputs", x)


def test_parse_hands_out_views_of_the_received_bytes() -> None:
    x = np.random.default_rng(0).standard_normal((64, 300)).astype(np.float32)
    t = np.linspace(0.1, 0.9, 64)
    raw = _full_request(x, t).SerializeToString()
    assert len(raw) >= _wire.SCAN_MIN_BYTES
    got = _wire.parse(pb.OracleRequest, raw)
    assert isinstance(got, _wire.Received)
    assert isinstance(got.x_t.data, memoryview) and got.x_t.data.obj is raw  # no copy
    assert np.array_equal(_codec.decode(got.x_t, "x_t"), x)
    assert np.array_equal(_codec.decode(got.path.custom.sigma, "sigma"), 1 - t)
    assert got.HasField("x_t") and not got.HasField("labels") and got.path.WhichOneof("kind") == "custom"
    assert got.dataset == "d" and list(got.outputs) == [pb.OUTPUT_VELOCITY, pb.OUTPUT_TOPK]
    assert got.message == pb.OracleRequest.FromString(raw)


def test_nested_stream_answer_round_trip() -> None:
    v = np.random.default_rng(1).standard_normal((128, 256)).astype(np.float32)
    resp = pb.OracleResponse(dataset="d", fingerprint="f", entropy=_tensor(np.ones(128)))
    out = _wire.Outgoing(resp)
    out.put("velocity", pb.DTYPE_FLOAT32, v.shape, v)
    raw = out.wrapped(pb.OracleStreamResponse(request_id="3.0"), "response").serialize()
    plain = pb.OracleStreamResponse.FromString(raw)
    assert plain.request_id == "3.0" and plain.response.velocity == _tensor(v)
    got = _wire.parse(pb.OracleStreamResponse, raw)
    assert got.request_id == "3.0" and got.response.HasField("velocity")
    assert np.array_equal(_codec.decode(got.response.velocity), v)
    assert got.message == plain


def test_a_later_oneof_member_wins_as_in_protobuf() -> None:
    x = np.zeros((64, 300), np.float32)
    t = np.full(64, 0.5)
    custom = _full_request(x, t).SerializeToString()
    named = pb.OracleRequest(path=pb.PathSpec(named=pb.NamedPath(name="cosine"))).SerializeToString()
    raw = custom + named  # concatenated messages merge; the oneof's last member wins
    ref = pb.OracleRequest.FromString(raw)
    got = _wire.parse(pb.OracleRequest, raw)
    assert ref.path.WhichOneof("kind") == "named"
    assert got.path.WhichOneof("kind") == "named" and got.path.named.name == "cosine"
    assert got.message == ref


def _as_message(parsed: Any) -> Any:
    return parsed.message if isinstance(parsed, _wire.Received) else parsed


_tensors = st.builds(
    pb.Tensor,
    dtype=st.integers(0, 7),
    shape=st.lists(st.integers(-3, 1 << 40), max_size=3),
    data=st.binary(max_size=64),
)
_requests = st.builds(
    pb.OracleRequest,
    dataset=st.text(max_size=5),
    x_t=st.none() | _tensors,
    t=st.none() | _tensors,
    labels=st.none() | _tensors,
    path=st.none()
    | st.builds(pb.PathSpec, custom=st.builds(pb.CustomCoefficients, alpha=_tensors, d_sigma=_tensors))
    | st.builds(pb.PathSpec, named=st.builds(pb.NamedPath, name=st.text(max_size=3))),
    top_k=st.integers(0, 2**32 - 1),
)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(parts=st.lists(_requests, min_size=1, max_size=3))
def test_parse_equals_protobuf_on_any_valid_message(parts: list[pb.OracleRequest]) -> None:
    raw = b"".join(p.SerializeToString() for p in parts)  # concatenation = merge, duplicates included
    assert _as_message(_wire.parse(pb.OracleRequest, raw, min_bytes=0)) == pb.OracleRequest.FromString(raw)


@settings(max_examples=500, deadline=None, derandomize=True)
@given(
    prefix=_requests,
    noise=st.binary(max_size=40),
    cut=st.integers(0, 200),
)
def test_parse_accepts_and_rejects_as_protobuf_does(prefix: pb.OracleRequest, noise: bytes, cut: int) -> None:
    raw = (prefix.SerializeToString() + noise)[: max(cut, 1)]
    try:
        ref = pb.OracleRequest.FromString(raw)
    except DecodeError:
        with pytest.raises(DecodeError):
            _wire.parse(pb.OracleRequest, raw, min_bytes=0)
        return
    assert _as_message(_wire.parse(pb.OracleRequest, raw, min_bytes=0)) == ref


# -- over a real channel, at the production threshold ------------------------------------------

N_BIG, D_BIG, B_BIG = 300, 1024, 48  # 196 KB requests and answers: above SCAN_MIN_BYTES


@pytest.fixture(scope="module")
def big() -> Any:
    rng = np.random.default_rng(5)
    data = rng.standard_normal((N_BIG, D_BIG)).astype(np.float32)
    t = rng.uniform(0.5, 0.97, size=B_BIG)
    idx = rng.integers(0, N_BIG, size=B_BIG)
    x_t = t[:, None] * data[idx] + (1 - t[:, None]) * rng.standard_normal((B_BIG, D_BIG))
    ref = linear_ref(data.astype(np.float64), x_t, t)
    store = DatasetStore([Dataset.from_arrays("big", data)])
    with serve_in_thread(Settings(device="cpu", metrics_port=-1), store) as srv:
        yield srv, x_t.astype(np.float32), t, ref


def _rel(got: Any, want: np.ndarray) -> float:
    got = np.asarray(got, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


def test_large_messages_over_a_real_channel(big: Any) -> None:
    srv, x_t, t, ref = big
    assert x_t.nbytes >= _wire.SCAN_MIN_BYTES
    # float32 on the wire: within float32 rounding of the float64 reference
    tol = 1e-6
    with OracleClient(srv.address, timeout=60) as c:
        p = c.predict(x_t, t, outputs=("velocity", "x1_hat", "entropy"))
        assert _rel(p.velocity, ref.velocity) < tol and _rel(p.x1_hat, ref.x1_hat) < tol
        assert np.abs(p.entropy - ref.entropy).max() < 1e-6
        assert p.velocity.flags.c_contiguous and p.velocity.shape == (B_BIG, D_BIG)
        streamed = list(c.velocity_stream([(x_t[:20], t[:20]), (x_t[20:], t[20:])]))
        assert _rel(np.concatenate(streamed), ref.velocity) < tol
        near = c.nearest(x_t / t[:, None].astype(np.float32), 2)
        assert near.indices.shape == (B_BIG, 2)
    torch = pytest.importorskip("torch")
    with OracleClient(srv.address, timeout=60) as c:
        v = c.velocity(torch.from_numpy(x_t), torch.from_numpy(t))
        assert isinstance(v, torch.Tensor) and v.dtype == torch.float32
        v.add_(0)  # writable: the SDK copies out of the received message for torch
        assert _rel(v.numpy(), ref.velocity) < tol

    async def run() -> np.ndarray:
        async with AsyncOracleClient(srv.address, timeout=60) as ac:
            return np.asarray(await ac.velocity(x_t, t))

    assert _rel(asyncio.run(run()), ref.velocity) < tol


def test_plain_protobuf_stub_gets_the_same_answers(big: Any) -> None:
    import grpc

    srv, x_t, t, ref = big
    req = pb.OracleRequest(
        x_t=_codec.encode(x_t), t=_codec.encode(t), path=pb.PathSpec(named=pb.NamedPath(name="linear"))
    )
    with grpc.insecure_channel(srv.address, options=[("grpc.max_receive_message_length", 1 << 26)]) as ch:
        resp = pb_grpc.FlowOracleStub(ch).Oracle(req, timeout=60)
    assert isinstance(resp, pb.OracleResponse)  # the generated stub's own parser read it
    assert _rel(_codec.decode(resp.velocity), ref.velocity) < 1e-6


@settings(max_examples=200, deadline=None, derandomize=True)
@given(name=st.text(max_size=300), rows=st.integers(1, 70), dim=st.integers(1, 40), nested=st.booleans())
def test_payloads_start_aligned_in_the_message(name: str, rows: int, dim: int, nested: bool) -> None:
    # Padding (repeats of the tensor's dtype field) puts every payload ALIGN bytes into the
    # message, so the receiver's views are aligned: numpy is ~10x slower on misaligned floats.
    x = np.arange(rows * dim, dtype=np.float64).reshape(rows, dim)
    resp = pb.OracleResponse(dataset=name, entropy=_tensor(np.ones(rows)))
    out = _wire.Outgoing(resp)
    out.put("velocity", pb.DTYPE_FLOAT64, x.shape, x)
    out.put("x1_hat", pb.DTYPE_FLOAT32, x.shape, x.astype(np.float32))
    cls = pb.OracleResponse
    if nested:
        out, cls = out.wrapped(pb.OracleStreamResponse(request_id=name[:7]), "response"), pb.OracleStreamResponse
    raw = out.serialize()
    plain = cls.FromString(raw)
    answer = plain.response if nested else plain
    assert answer.velocity == _tensor(x) and answer.x1_hat == _tensor(x.astype(np.float32))
    assert answer.dataset == name
    got = _wire.parse(cls, raw, min_bytes=0)
    got = got.response if nested else got
    for field, want in (("velocity", x), ("x1_hat", x.astype(np.float32))):
        view = getattr(got, field).data
        assert view.obj is raw
        start = np.frombuffer(view, np.uint8).ctypes.data - np.frombuffer(raw, np.uint8).ctypes.data
        assert start % _wire.ALIGN == 0 and bytes(view) == want.tobytes()
        assert np.array_equal(_codec.decode(getattr(got, field)), want)


def test_decode_copies_a_misaligned_payload_into_an_aligned_array() -> None:
    x = np.random.default_rng(2).standard_normal((33, 7))
    raw = b"\0" + x.tobytes()  # a sender that put the bytes at an odd offset
    view = pb.Tensor(dtype=pb.DTYPE_FLOAT64, shape=x.shape)
    misaligned = _wire.TensorView(view.dtype, view.shape, memoryview(raw)[1:])
    got = _codec.decode(misaligned)
    assert got.flags.aligned and np.array_equal(got, x)
