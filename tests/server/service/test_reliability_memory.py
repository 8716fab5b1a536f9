"""The server's memory for requests in flight is bounded by its own budget (bytes received and not
yet answered, plus answers not yet handed to gRPC; per stream and in total), whatever clients do.

The hostile case: eight OracleStreams on one channel send 132 KB messages as fast as they can and
never read an answer. A stream over its budget is not read, so its sender waits on HTTP/2 flow
control; the server's peak RSS stays well below a fixed bound above idle, and the memory goes back
once the streams are cancelled. A unary call that does not fit is refused with a retry hint.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from floworacle.protocol import STREAM_WINDOW_BYTES, encode, pb, pb_grpc
from floworacle_server.service._budget import ByteBudget
from floworacle_server.service._server import concurrent_rpc_cap
from floworacle_server.service.testing import serve_in_thread
from floworacle_server.settings import Settings

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's RSS from /proc")


def _vm_mib(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def test_never_reading_streams_stay_within_the_budget_and_memory_returns():
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWORACLE_")}
    cmd = [sys.executable, "-m", "floworacle_server.cli", "serve", "--port", "0", "--metrics-port", "-1",
           "--host", "127.0.0.1"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        assert proc.stdout is not None
        port = None
        while port is None and (line := proc.stdout.readline()):
            m = re.search(r"serving on 127\.0\.0\.1:(\d+)", line)
            port = int(m.group(1)) if m else None
        assert port
        x = np.random.default_rng(0).standard_normal((512, 64)).astype(np.float32)
        req = pb.OracleRequest(x_t=encode(x), t=encode(np.full(512, 0.5)))
        assert 130_000 < req.ByteSize() < 140_000
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_receive_message_length", 1 << 30)]) as ch:
            stub = pb_grpc.FlowOracleStub(ch)
            assert len(list(stub.OracleStream(iter([req] * 8), timeout=60))) == 8  # warm: every code path ran
            time.sleep(1)
            idle = _vm_mib(proc.pid, "VmRSS")
            stop = threading.Event()
            sent = [0] * 8

            def send(i: int):
                while not stop.is_set():
                    sent[i] += 1
                    yield req

            calls = [stub.OracleStream(send(i)) for i in range(8)]  # answers never read
            time.sleep(15)
            peak = _vm_mib(proc.pid, "VmHWM") - idle
            stop.set()
            for c in calls:
                c.cancel()
        assert peak < 512, f"peak RSS {peak:.0f} MiB above idle with never-reading streams"
        assert min(sent) > 30, sent  # every stream did push far more than its budget's worth
        deadline = time.monotonic() + 15
        while (after := _vm_mib(proc.pid, "VmRSS") - idle) > 64 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert after <= 64, f"{after:.0f} MiB still held after the streams were cancelled"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


async def test_the_budget_admits_waits_and_wakes():
    freed: list[int] = []
    total = ByteBudget(100, on_idle=freed.append)
    stream = ByteBudget(60, parent=total)
    other = ByteBudget(60, parent=total)
    assert stream.try_take(50) and total.used == 50
    assert not stream.try_take(20)  # over the stream's 60
    assert other.try_take(50) and total.used == 100
    assert not total.try_take(1)
    waiter = asyncio.ensure_future(other.take(5))  # the total is full: waits
    await asyncio.sleep(0.01)
    assert not waiter.done()
    stream.give(50)
    await asyncio.wait_for(waiter, 1)
    assert total.used == 55 and other.used == 55
    other.give(55)
    assert total.used == 0 and freed == [105]
    assert ByteBudget(10).try_take(1000)  # one item is always admitted when nothing is in flight


def test_a_unary_call_over_the_byte_budget_is_refused_with_a_hint_and_the_sdk_rides_it_out():
    from floworacle import OracleClient

    x = np.random.default_rng(1).standard_normal((64, 64)).astype(np.float32)
    t = np.full(64, 0.5)
    one = pb.OracleRequest(dataset="digits", x_t=encode(x), t=encode(t))
    # the batch waits 0.5 s for company: the first request holds the budget meanwhile
    settings = Settings(
        device="cpu", metrics_port=-1, max_queue_delay_ms=500.0, max_inflight_bytes=one.ByteSize() + 100
    )
    with serve_in_thread(settings) as srv, grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.FlowOracleStub(ch)
        first = stub.Oracle.future(one, timeout=30)
        time.sleep(0.2)
        with pytest.raises(grpc.RpcError) as info:
            stub.Oracle(one, timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_inflight_bytes" in info.value.details()
        assert ("grpc-retry-pushback-ms", "50") in tuple(info.value.trailing_metadata())
        reference = first.result().velocity.data
        assert srv.server._servicer is not None and srv.server._servicer.budget.used == 0
        with OracleClient(srv.address) as c:  # the SDK's backoff gets through once the first is done
            answers = [c.velocity(x, t) for _ in range(2)]
        assert all(a.tobytes() == reference for a in answers)
        reason = srv.server.metrics.registry.get_sample_value(
            "floworacle_rejected_requests_total", {"reason": "memory"}
        )
        assert reason == 1.0


def test_never_reading_streams_push_only_a_window_past_the_budget():
    """Forty streams over four connections send 132 KB messages and never read an answer, against
    a 1 MiB byte budget. What their clients manage to push is what the server (gRPC included)
    holds: the budget, one message a stream waiting for it, and one fixed 64 KiB window a stream.
    With BDP probing, gRPC grew each stream's window to MBs: 200-1,160 MB went out in 3 s."""
    x = np.random.default_rng(0).standard_normal((512, 64)).astype(np.float32)
    req = pb.OracleRequest(x_t=encode(x), t=encode(np.full(512, 0.5)))
    settings = Settings(device="cpu", metrics_port=-1, max_inflight_bytes=1 << 20, max_stream_inflight=2)
    streams, connections = 10, 4
    with serve_in_thread(settings) as srv:
        channels = [grpc.insecure_channel(srv.address, options=[("test.connection", i)]) for i in range(connections)]
        stop = threading.Event()
        sent = [0] * (streams * connections)

        def send(i: int):
            while not stop.is_set():
                sent[i] += 1
                yield req

        calls = [
            pb_grpc.FlowOracleStub(ch).OracleStream(send(c * streams + s))
            for c, ch in enumerate(channels)
            for s in range(streams)
        ]
        time.sleep(3)
        stop.set()
        for c in calls:
            c.cancel()
        for ch in channels:
            ch.close()
    # about 24-32 MB: the budget, and per stream a window, the message waiting for the budget and
    # a few more whose answers went into the client's own receive buffers (it never reads them)
    pushed = sum(sent) * req.ByteSize()
    assert pushed < 64e6, (pushed, sorted(sent))


def test_concurrent_calls_are_capped_so_that_their_windows_fit_the_budget():
    assert concurrent_rpc_cap(128 << 20) == (128 << 20) // STREAM_WINDOW_BYTES == 2048
    assert concurrent_rpc_cap(1) == 64  # the floor
    settings = Settings(device="cpu", metrics_port=-1, max_inflight_bytes=64 * STREAM_WINDOW_BYTES)
    hold = threading.Event()

    def nothing():
        hold.wait(30)
        yield from ()

    with serve_in_thread(settings) as srv, grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.FlowOracleStub(ch)
        open_calls = [stub.OracleStream(nothing()) for _ in range(64)]
        try:
            deadline = time.monotonic() + 10
            while srv.server._servicer is not None and srv.server._servicer._active < 64:
                assert time.monotonic() < deadline, "the 64 streams did not start"
                time.sleep(0.05)
            with pytest.raises(grpc.RpcError) as info:
                stub.ListDatasets(pb.ListDatasetsRequest(), timeout=10)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            hold.set()
            for c in open_calls:
                c.cancel()
        # the cap counts calls, not callers: once they are gone, calls are served again
        deadline = time.monotonic() + 10
        while True:
            try:
                assert [d.name for d in stub.ListDatasets(pb.ListDatasetsRequest(), timeout=10).datasets] == ["digits"]
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
                time.sleep(0.1)
