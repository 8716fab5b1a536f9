"""The server computes with exactly the request protobuf's parser reads from the bytes.

A differential fuzz over hand-made framings of real requests (repeated fields, a tensor split in
two occurrences, padded and over-long varints, unknown fields, reordered fields, a oneof whose
members alternate, truncation, garbage after the message), large enough to be well past 32 KiB:
whatever ``FromString`` refuses the server refuses with INVALID_ARGUMENT; whatever it accepts the
server answers exactly as it answers the canonical serialization of the parsed message (the same
response bytes, or the same status and message).
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from service_helpers import noisy_queries

from floworacle.protocol import encode, pb
from floworacle_server.data import Dataset, DatasetStore
from floworacle_server.service.testing import RunningServer, serve_in_thread
from floworacle_server.settings import Settings
from protowire import Field, join, split, varint

_RNG = np.random.default_rng(5)
X = _RNG.standard_normal((50, 64)).astype(np.float32)
Y = np.arange(50) % 4
B_BIG = 130  # 130 x 64 float32 = 33 KB of queries


@pytest.fixture(scope="module")
def srv() -> Iterator[RunningServer]:
    store = DatasetStore([Dataset.from_arrays("d", X, Y)])
    with serve_in_thread(Settings(device="cpu", metrics_port=-1, max_queue_delay_ms=0.0), store) as running:
        yield running


@pytest.fixture(scope="module")
def channel(srv: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(srv.address) as ch:
        yield ch


def _base_requests() -> list[tuple[str, bytes]]:
    out = []
    for b in (3, B_BIG):
        t = np.linspace(0.1, 0.95, b)
        xt = noisy_queries(X, t, seed=b).astype(np.float32)
        req = pb.OracleRequest(dataset="d", x_t=encode(xt), t=encode(t), top_k=2)
        req.outputs.extend([pb.OUTPUT_VELOCITY, pb.OUTPUT_TOPK, pb.OUTPUT_ENTROPY])
        req.labels.CopyFrom(encode((np.arange(b) % 5 - 1).astype(np.int64)))
        out.append(("Oracle", req.SerializeToString()))
        custom = pb.OracleRequest(dataset="d", x_t=encode(xt))
        for name, v in zip(("alpha", "sigma", "d_alpha", "d_sigma"), (t, 1 - t, np.ones(b), -np.ones(b)), strict=True):
            getattr(custom.path.custom, name).CopyFrom(encode(v))
        out.append(("Oracle", custom.SerializeToString()))
        out.append(("Nearest", pb.NearestRequest(dataset="d", x=encode(xt), k=3).SerializeToString()))
    return out


BASES = _base_requests()
CLS = {"Oracle": pb.OracleRequest, "Nearest": pb.NearestRequest}


def _call(channel: grpc.Channel, method: str, raw: bytes) -> tuple[str, object]:
    fn = channel.unary_unary(f"/floworacle.v1.FlowOracle/{method}")  # raw bytes both ways
    try:
        return "ok", fn(raw, timeout=30)
    except grpc.RpcError as exc:
        return "error", (exc.code(), exc.details())


# -- mutations ------------------------------------------------------------------------------------


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, bytes]:
    method, raw = draw(st.sampled_from(BASES))
    fields = split(raw)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["duplicate", "split_tensor", "pad_key", "pad_len", "unknown", "swap", "oneof"]))
        i = draw(st.integers(0, len(fields) - 1))
        f = fields[i]
        if kind == "duplicate":
            fields.insert(draw(st.integers(0, len(fields))), Field(f.number, f.wire, f.value))
        elif kind == "split_tensor" and f.wire == 2 and f.number in (3, 4, 7):  # x_t / x, t, labels
            inner = split(f.value)
            cut = draw(st.integers(0, len(inner)))
            fields[i : i + 1] = [Field(f.number, 2, join(inner[:cut])), Field(f.number, 2, join(inner[cut:]))]
        elif kind in ("pad_key", "pad_len") and f.wire != -1:
            width = draw(st.integers(2, 12))  # 11 and 12 bytes are over protobuf's limit of 10
            enc = f.encode(key_len=width) if kind == "pad_key" else f.encode(len_len=width if f.wire == 2 else None)
            fields[i] = Field(0, -1, enc)  # pre-encoded
        elif kind == "unknown":
            number = draw(st.integers(20, 500))
            wire = draw(st.sampled_from([0, 1, 2, 5]))
            value = {0: varint(7), 1: b"\1" * 8, 2: b"xyz", 5: b"\2" * 4}[wire]
            fields.insert(draw(st.integers(0, len(fields))), Field(number, wire, value))
        elif kind == "swap" and len(fields) > 1:
            j = draw(st.integers(0, len(fields) - 1))
            fields[i], fields[j] = fields[j], fields[i]
        elif kind == "oneof" and method == "Oracle":
            # path.custom, then path.named, then path.custom without its tensors (the case found
            # by hand): protobuf keeps the last member only
            custom = next((g for g in fields if g.number == 5), None)
            named = pb.PathSpec(named=pb.NamedPath(name="cosine")).SerializeToString()
            extra = [Field(5, 2, named), Field(5, 2, pb.PathSpec(custom=pb.CustomCoefficients()).SerializeToString())]
            fields += ([custom] if custom is not None else []) + extra[: draw(st.integers(1, 2))]
    out = b"".join(f.value if f.wire == -1 else f.encode() for f in fields)
    tail = draw(st.sampled_from(["none", "none", "truncate", "garbage"]))
    if tail == "truncate":
        out = out[: draw(st.integers(0, len(out) - 1))]
    elif tail == "garbage":
        out += draw(st.binary(min_size=1, max_size=8))
    return method, out


@settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(case=mutated())
def test_server_sees_what_protobuf_reads(channel: grpc.Channel, case: tuple[str, bytes]) -> None:
    method, raw = case
    try:
        parsed = CLS[method].FromString(raw)
    except Exception:  # protobuf's DecodeError: the server must refuse the bytes too
        status, value = _call(channel, method, raw)
        assert status == "error" and value[0] == grpc.StatusCode.INVALID_ARGUMENT, value  # type: ignore[index]
        return
    assert _call(channel, method, raw) == _call(channel, method, parsed.SerializeToString())


def test_the_cases_found_by_hand(channel: grpc.Channel) -> None:
    """Over-long varints (11 bytes) are refused; path.custom, path.named, path.custom-without-data
    is computed as protobuf reads it (an empty custom member: INVALID_ARGUMENT, not the first
    member's coefficients)."""
    method, raw = BASES[4]  # the large custom-path request
    fields = split(raw)
    over_long = b"".join(f.encode(key_len=11) if f.number == 1 else f.encode() for f in fields)
    with pytest.raises(DecodeError):
        pb.OracleRequest.FromString(over_long)
    status, value = _call(channel, method, over_long)
    assert status == "error" and value[0] == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[index]
    custom = next(f for f in fields if f.number == 5)
    alternating = raw + join(
        [
            Field(5, 2, pb.PathSpec(named=pb.NamedPath(name="linear")).SerializeToString()),
            Field(5, 2, pb.PathSpec(custom=pb.CustomCoefficients()).SerializeToString()),
        ]
    )
    assert custom.value and pb.OracleRequest.FromString(alternating).path.custom.ByteSize() == 0
    status, value = _call(channel, method, alternating)
    assert status == "error" and value[0] == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[index]
    assert "custom path coefficients need all of" in value[1]  # type: ignore[index]
