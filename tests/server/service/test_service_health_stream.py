"""Health (overall, service, per data set, NOT_SERVING on drain), reflection, and the
bidirectional OracleStream (order, per-message errors, pipelining), over real channels."""

from __future__ import annotations

import queue
import threading

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from service_helpers import linear_coeffs, max_rel, noisy_queries, oracle_request, ref_oracle

from floworacle import protocol
from floworacle.v1 import oracle_pb2 as pb
from floworacle.v1 import oracle_pb2_grpc as pb_grpc
from floworacle_server.service.testing import serve_in_thread
from floworacle_server.settings import Settings

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_health_names(channel):
    h = health_pb2_grpc.HealthStub(channel)
    for name in ["", "floworacle.v1.FlowOracle", "floworacle.v1.FlowOracle/digits", "floworacle.v1.FlowOracle/shaped"]:
        assert h.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status == SERVING, name
    with pytest.raises(grpc.RpcError) as info:
        h.Check(health_pb2.HealthCheckRequest(service="floworacle.v1.FlowOracle/nope"), timeout=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "'floworacle.v1.FlowOracle/digits'" in info.value.details()
    with pytest.raises(grpc.RpcError) as bare:  # the bare data set name is not a health name
        h.Check(health_pb2.HealthCheckRequest(service="digits"), timeout=5)
    assert bare.value.code() == grpc.StatusCode.NOT_FOUND and "one per data set" in bare.value.details()


def test_reflection_lists_services(channel):
    services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"floworacle.v1.FlowOracle", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services


def test_reflection_can_be_turned_off():
    with serve_in_thread(Settings(device="cpu", reflection=False, metrics_port=-1)) as srv:
        with grpc.insecure_channel(srv.address) as ch:
            with pytest.raises(grpc.RpcError) as info:
                ProtoReflectionDescriptorDatabase(ch).get_services()
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_drain_turns_health_not_serving_and_lets_inflight_finish(digits):
    x, _ = digits
    # a long queue delay keeps one request in flight while the drain starts
    settings = Settings(device="cpu", max_queue_delay_ms=800.0, metrics_port=-1, shutdown_delay_s=0.3)
    req = oracle_request(noisy_queries(x, np.array([0.5])), np.array([0.5]))
    with serve_in_thread(settings) as srv, grpc.insecure_channel(srv.address) as ch:
        h = health_pb2_grpc.HealthStub(ch)
        statuses: queue.Queue[int] = queue.Queue()
        watch = h.Watch(health_pb2.HealthCheckRequest(service="floworacle.v1.FlowOracle/digits"), timeout=20)

        def follow() -> None:
            try:
                for msg in watch:
                    statuses.put(msg.status)
            except grpc.RpcError:
                pass

        threading.Thread(target=follow, daemon=True).start()
        assert statuses.get(timeout=5) == SERVING
        inflight = pb_grpc.FlowOracleStub(ch).Oracle.future(req, timeout=20)
        stopper = threading.Thread(target=srv.stop, kwargs={"grace": 5.0})
        stopper.start()
        assert statuses.get(timeout=5) == NOT_SERVING
        # during shutdown_delay_s the port still answers health checks, with NOT_SERVING
        assert h.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == NOT_SERVING
        assert inflight.result(timeout=20).HasField("velocity")
        stopper.join(20)
        assert not stopper.is_alive()
        watch.cancel()


def _stream_requests(x: np.ndarray) -> list[tuple[pb.OracleRequest, np.ndarray | None]]:
    out: list[tuple[pb.OracleRequest, np.ndarray | None]] = []
    for i in range(12):
        t = np.array([0.1 + 0.07 * i, 0.5])
        xt = noisy_queries(x, t, seed=200 + i)
        if i == 5:
            req = oracle_request(xt, None, dtype="float64", request_id=f"m{i}")  # no t: invalid
            out.append((req, None))
        else:
            req = oracle_request(xt, t, dtype="float64", request_id=f"m{i}")
            out.append((req, ref_oracle(x, xt, *linear_coeffs(t))["velocity"]))
    return out


def test_stream_in_order_with_an_error_in_the_middle(stub, digits):
    x, _ = digits
    reqs = _stream_requests(x)
    answers = list(stub.OracleStream(iter([r for r, _ in reqs]), timeout=30))
    assert [a.request_id for a in answers] == [r.request_id for r, _ in reqs]
    for a, (_, ref) in zip(answers, reqs, strict=True):
        if ref is None:
            assert a.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "t is required" in a.error_message
            assert not a.HasField("response")
        else:
            assert a.error_code == 0 and a.response.request_id == a.request_id
            assert max_rel(protocol.decode(a.response.velocity), ref) < 1e-6


async def test_stream_is_pipelined_with_aio_client(server, digits):
    """All requests are sent before any answer is read: the server must have them in flight at once."""
    x, _ = digits
    reqs = _stream_requests(x)
    before = server.server.batcher.engine_calls
    async with grpc.aio.insecure_channel(server.address) as ch:
        call = pb_grpc.FlowOracleStub(ch).OracleStream(timeout=30)
        for r, _ in reqs:
            await call.write(r)
        await call.done_writing()
        answers = [a async for a in call]
    assert [a.request_id for a in answers] == [r.request_id for r, _ in reqs]
    assert sum(a.error_code != 0 for a in answers) == 1
    # 11 valid messages, queued together, need fewer engine calls than messages
    assert server.server.batcher.engine_calls - before < 11
    for a, (_, ref) in zip(answers, reqs, strict=True):
        if ref is not None:
            assert max_rel(protocol.decode(a.response.velocity), ref) < 1e-6


async def test_unary_with_aio_client(server, digits):
    x, _ = digits
    t = np.array([0.25, 0.75])
    xt = noisy_queries(x, t, seed=300)
    async with grpc.aio.insecure_channel(server.address) as ch:
        stub = pb_grpc.FlowOracleStub(ch)
        resp = await stub.Oracle(oracle_request(xt, t, dtype="bfloat16", output_dtype=pb.DTYPE_FLOAT64))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Oracle(oracle_request(xt, t, dataset="nope"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    sent = protocol.decode(protocol.encode(xt, "bfloat16"))
    assert max_rel(protocol.decode(resp.velocity), ref_oracle(x, sent, *linear_coeffs(t))["velocity"]) < 1e-6


def test_an_unreadable_stream_message_is_answered_in_its_place_and_owed_answers_arrive(channel, digits):
    """Two valid messages then bytes that do not parse, sent back to back: the two answers arrive,
    then the unreadable message's INVALID_ARGUMENT in its place, and the stream goes on."""
    x, _ = digits
    reqs = [r.SerializeToString() for r, ref in _stream_requests(x) if ref is not None][:3]
    garbage = b"\x0a\xff\xff\xff\xff\x0f"  # field 1 (a string) claiming more bytes than follow
    call = channel.stream_stream("/floworacle.v1.FlowOracle/OracleStream")  # raw bytes both ways
    raws = list(call(iter([reqs[0], reqs[1], garbage, reqs[2]]), timeout=30))
    answers = [pb.OracleStreamResponse.FromString(r) for r in raws]
    assert len(answers) == 4
    assert [a.error_code for a in answers] == [0, 0, grpc.StatusCode.INVALID_ARGUMENT.value[0], 0]
    assert "not a valid protobuf message" in answers[2].error_message
    assert answers[0].HasField("response") and answers[1].HasField("response") and answers[3].HasField("response")


def test_an_answer_over_the_message_limit_is_refused_before_any_compute(digits):
    """A client made from proto/ alone asks for more than one message can carry: refused at once
    (no engine call), with the size and what to change."""
    x, _ = digits
    settings = Settings(device="cpu", metrics_port=-1, max_message_bytes=4 << 20)
    with serve_in_thread(settings) as srv, grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.FlowOracleStub(ch)
        b = 4096  # a 2 MiB request; four float64 outputs of (4096, 64) and a top-1024: a 75 MB answer
        req = oracle_request(np.repeat(x[:64], b // 64, axis=0).astype(np.float64), np.full(b, 0.5))
        req.outputs.extend([pb.OUTPUT_VELOCITY, pb.OUTPUT_X1_HAT, pb.OUTPUT_EPS_HAT, pb.OUTPUT_SCORE])
        req.top_k = 1024
        calls = srv.server.batcher.engine_calls
        with pytest.raises(grpc.RpcError) as err:
            stub.Oracle(req, timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "over this server's message limit of 4194304" in err.value.details()
        assert srv.server.batcher.engine_calls == calls
        # the same request cut to fit is answered
        small = oracle_request(x[:8].astype(np.float64), np.full(8, 0.5))
        assert stub.Oracle(small, timeout=30).HasField("velocity")
