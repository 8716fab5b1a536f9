"""Faults over real channels: device out-of-memory splits a merged batch, cancelled / timed-out
requests leave their batch mates untouched, a client that disconnects mid-stream frees its work, the
SDK reconnects to a restarted server, a tampered index refuses to load, and SIGTERM drains the
`floworacle serve` process with an in-flight request finishing."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from service_helpers import linear_coeffs, max_rel, noisy_queries, oracle_request, ref_oracle

from floworacle import OracleClient, OracleError, RetryPolicy, protocol
from floworacle.v1 import oracle_pb2 as pb
from floworacle.v1 import oracle_pb2_grpc as pb_grpc
from floworacle_server.data import Dataset, DatasetStore, build_index
from floworacle_server.service import build_store
from floworacle_server.service.testing import RunningServer, serve_in_thread
from floworacle_server.settings import Settings


def _wait(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def _velocity_ref(x: np.ndarray, xt: np.ndarray, t: np.ndarray) -> np.ndarray:
    return ref_oracle(x, xt, *linear_coeffs(t))["velocity"]


def _gauge(srv: RunningServer, method: str) -> float:
    v = srv.server.metrics.registry.get_sample_value("floworacle_inflight_requests", {"method": method})
    return float(v or 0.0)


# -- (a) out of memory ---------------------------------------------------------------------------


def test_out_of_memory_splits_the_merged_batch_until_it_fits(digits):
    x, _ = digits
    settings = Settings(device="cpu", metrics_port=-1, max_queue_delay_ms=400.0)
    cases = [(noisy_queries(x, t, seed=40 + i), t) for i, t in enumerate(np.linspace(0.2, 0.8, 15).reshape(5, 3))]
    calls: list[int] = []
    lock = threading.Lock()

    def small_device(runner, payloads):
        rows = sum(p.rows for p in payloads)
        with lock:
            calls.append(rows)
        if rows > 8:  # as if the device held only 8 query rows' worth of work
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate a batch of {rows} rows")
        return runner(payloads)

    with serve_in_thread(settings) as srv, grpc.insecure_channel(srv.address) as ch:
        srv.server.batcher.compute_hook = small_device
        stub = pb_grpc.FlowOracleStub(ch)
        futures = [stub.Oracle.future(oracle_request(xt, t, dtype="float64"), timeout=30) for xt, t in cases]
        answers = [f.result() for f in futures]
        splits = srv.server.batcher.oom_splits
        # one request that alone is too large: RESOURCE_EXHAUSTED telling the caller to send less
        big_t = np.linspace(0.1, 0.9, 12)
        with pytest.raises(grpc.RpcError) as info:
            stub.Oracle(oracle_request(noisy_queries(x, big_t), big_t), timeout=30)
        srv.server.batcher.compute_hook = None
        after = stub.Oracle(oracle_request(noisy_queries(x, big_t), big_t, dtype="float64"), timeout=30)
    # the five 3-row requests were merged (15 rows) and failed; halves of 3 + 2 requests; the
    # 9-row half failed again and split into 6 + 3; then the 6-row half; the lone 12-row request
    assert calls == [15, 9, 6, 3, 6, 12] and splits == 2
    for (xt, t), resp in zip(cases, answers, strict=True):
        assert max_rel(protocol.decode(resp.velocity), _velocity_ref(x, xt, t)) < 1e-6
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "out of memory" in info.value.details() and "smaller batches" in info.value.details()
    assert max_rel(protocol.decode(after.velocity), _velocity_ref(x, noisy_queries(x, big_t), big_t)) < 1e-6


def test_an_answer_over_the_message_limit_is_refused_before_it_is_computed(digits):
    """A small float16 request asking for four float64 outputs would be answered with a message
    the server cannot send: RESOURCE_EXHAUSTED naming the size and the limit, with no engine call
    (it was computed in full before, then lost), and a request that fits is answered after it."""
    x, _ = digits
    limit = 64 * 1024
    outs = (pb.OUTPUT_VELOCITY, pb.OUTPUT_X1_HAT, pb.OUTPUT_EPS_HAT, pb.OUTPUT_SCORE)
    t = np.full(100, 0.5)
    calls: list[int] = []

    def counting(runner, payloads):
        calls.append(sum(p.rows for p in payloads))
        return runner(payloads)

    with serve_in_thread(Settings(device="cpu", metrics_port=-1, max_message_bytes=limit)) as srv:
        srv.server.batcher.compute_hook = counting
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.FlowOracleStub(ch)
            big = oracle_request(noisy_queries(x, t), t, dtype="float16", outputs=outs, output_dtype=pb.DTYPE_FLOAT64)
            assert big.ByteSize() < limit // 4  # the request itself is small
            with pytest.raises(grpc.RpcError) as err:
                stub.Oracle(big, timeout=30)
            assert calls == []
            small_t = t[:8]
            fits = stub.Oracle(oracle_request(noisy_queries(x, small_t), small_t, dtype="float64"), timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert re.search(
        r"the answer to these 100 queries would take \d+ bytes, over this server's message limit "
        rf"of {limit}",
        err.value.details(),
    )
    assert calls == [8]
    assert max_rel(protocol.decode(fits.velocity), _velocity_ref(x, noisy_queries(x, small_t), small_t)) < 1e-6


def test_a_nearest_answer_over_the_message_limit_is_refused_before_it_is_computed(digits):
    """8 points asking for k = 512 on the labelled digits: indices, distances and labels of
    8 x 512 neighbours (98 KB) over a 64 KiB limit: RESOURCE_EXHAUSTED naming the size, no search
    run; a smaller k is answered after it, exactly."""
    x, _ = digits
    calls: list[int] = []

    def counting(runner, payloads):
        calls.append(sum(p.rows for p in payloads))
        return runner(payloads)

    with serve_in_thread(Settings(device="cpu", metrics_port=-1, max_message_bytes=64 * 1024)) as srv:
        srv.server.batcher.compute_hook = counting
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.FlowOracleStub(ch)
            with pytest.raises(grpc.RpcError) as err:
                stub.Nearest(pb.NearestRequest(x=protocol.encode(x[:8].astype(np.float64)), k=512), timeout=30)
            assert calls == []
            fits = stub.Nearest(pb.NearestRequest(x=protocol.encode(x[:8].astype(np.float64)), k=3), timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    tensors = 8 * 512 * 24  # indices, distances, labels: 8 bytes each
    assert f"would take {tensors + protocol.MESSAGE_OVERHEAD} bytes" in err.value.details()
    assert "a smaller k" in err.value.details()
    assert calls == [8]
    assert 8 * 3 * 24 <= fits.ByteSize() <= 8 * 3 * 24 + protocol.MESSAGE_OVERHEAD  # the size the check used
    assert protocol.decode(fits.indices)[:, 0].tolist() == list(range(8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: a real device out-of-memory error")
def test_real_cuda_out_of_memory_splits_the_batch(digits):
    x, _ = digits
    store = DatasetStore([Dataset.from_arrays("gpu", x, device="cuda")])
    settings = Settings(device="cuda", metrics_port=-1, max_queue_delay_ms=400.0)
    cases = [(noisy_queries(x, t, seed=50 + i), t) for i, t in enumerate(np.linspace(0.2, 0.8, 8).reshape(4, 2))]
    calls: list[int] = []

    def tight_device(runner, payloads):
        rows = sum(p.rows for p in payloads)
        calls.append(rows)
        if rows > 4:  # ask the CUDA allocator for far more than any device holds: a real OOM
            torch.empty(2**50, dtype=torch.uint8, device="cuda")
        return runner(payloads)

    with serve_in_thread(settings, store) as srv, grpc.insecure_channel(srv.address) as ch:
        srv.server.batcher.compute_hook = tight_device
        stub = pb_grpc.FlowOracleStub(ch)
        futures = [stub.Oracle.future(oracle_request(xt, t, dtype="float64"), timeout=60) for xt, t in cases]
        answers = [f.result() for f in futures]
    assert calls == [8, 4, 4] and srv.server.batcher.oom_splits == 1
    for (xt, t), resp in zip(cases, answers, strict=True):
        assert max_rel(protocol.decode(resp.velocity), _velocity_ref(x, xt, t)) < 1e-6


# -- (b) cancelled and timed-out batch mates ------------------------------------------------------


def test_cancelled_and_expired_requests_do_not_disturb_their_batch_mates(digits):
    x, _ = digits
    settings = Settings(device="cpu", metrics_port=-1, max_queue_delay_ms=400.0)
    cases = [(noisy_queries(x, t, seed=60 + i), t) for i, t in enumerate(np.linspace(0.2, 0.8, 8).reshape(4, 2))]
    with serve_in_thread(settings) as srv, grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.FlowOracleStub(ch)
        stub.ListDatasets(pb.ListDatasetsRequest())
        batcher = srv.server.batcher
        computed = batcher.requests_computed
        keep0 = stub.Oracle.future(oracle_request(*cases[0], dtype="float64"), timeout=30)
        expires = stub.Oracle.future(oracle_request(*cases[1], dtype="float64"), timeout=0.15)
        cancelled = stub.Oracle.future(oracle_request(*cases[2], dtype="float64"), timeout=30)
        keep3 = stub.Oracle.future(oracle_request(*cases[3], dtype="float64"), timeout=30)
        assert _wait(lambda: batcher.queue_depth == 4)
        assert cancelled.cancel()
        good = [keep0.result(), keep3.result()]
        with pytest.raises(grpc.RpcError) as info:
            expires.result()
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert batcher.requests_computed == computed + 2  # only the two live ones reached the engine
        assert batcher.history[-1].requests == 2 and batcher.history[-1].rows == 4  # ... in one merged call
        assert _wait(lambda: batcher.inflight_rows == 0)
    for (xt, t), resp in zip([cases[0], cases[3]], good, strict=True):
        assert max_rel(protocol.decode(resp.velocity), _velocity_ref(x, xt, t)) < 1e-6


def test_request_cancelled_while_its_batch_computes_leaves_the_others_exact(digits):
    x, _ = digits
    settings = Settings(device="cpu", metrics_port=-1, max_queue_delay_ms=200.0)
    cases = [(noisy_queries(x, t, seed=70 + i), t) for i, t in enumerate(np.linspace(0.3, 0.7, 6).reshape(3, 2))]
    started, release = threading.Event(), threading.Event()

    def held(runner, payloads):
        started.set()
        release.wait(10)
        return runner(payloads)

    with serve_in_thread(settings) as srv, grpc.insecure_channel(srv.address) as ch:
        srv.server.batcher.compute_hook = held
        stub = pb_grpc.FlowOracleStub(ch)
        futures = [stub.Oracle.future(oracle_request(xt, t, dtype="float64"), timeout=30) for xt, t in cases]
        assert started.wait(10)
        assert futures[1].cancel()
        assert _wait(lambda: _gauge(srv, "Oracle") == 2.0)  # the cancelled RPC's handler has ended
        release.set()
        good = [futures[0].result(), futures[2].result()]
        assert srv.server.batcher.history[-1].requests == 3  # it was merged with them
        assert _wait(lambda: srv.server.batcher.inflight_rows == 0 and _gauge(srv, "Oracle") == 0.0)
    for (xt, t), resp in zip([cases[0], cases[2]], good, strict=True):
        assert max_rel(protocol.decode(resp.velocity), _velocity_ref(x, xt, t)) < 1e-6


# -- (c) a client that disconnects mid-stream ----------------------------------------------------


def test_client_disconnecting_mid_stream_frees_its_work(digits):
    x, _ = digits
    settings = Settings(device="cpu", metrics_port=-1, max_queue_delay_ms=500.0)
    t = np.array([0.4, 0.6])
    req = oracle_request(noisy_queries(x, t, seed=80), t)
    more = threading.Event()

    def requests():
        yield req
        yield req
        more.wait(20)  # the client never finishes its request stream

    with serve_in_thread(settings) as srv:
        batcher = srv.server.batcher
        ch = grpc.insecure_channel(srv.address)
        pb_grpc.FlowOracleStub(ch).ListDatasets(pb.ListDatasetsRequest(), timeout=10)
        computed = batcher.requests_computed
        call = pb_grpc.FlowOracleStub(ch).OracleStream(requests(), timeout=30)
        assert _wait(lambda: batcher.inflight_rows == 4 and _gauge(srv, "OracleStream") == 1.0)
        ch.close()  # the client goes away with two messages queued
        assert _wait(lambda: _gauge(srv, "OracleStream") == 0.0)  # the stream handler ended
        assert _wait(lambda: batcher.inflight_rows == 0 and batcher.queue_depth == 0)
        time.sleep(0.6)  # past the queue delay: the abandoned messages were dropped, not computed
        assert batcher.requests_computed == computed
        more.set()
        del call
        with OracleClient(srv.address) as c:  # and the server goes on answering
            assert (
                max_rel(c.velocity(noisy_queries(x, t, seed=81), t), _velocity_ref(x, noisy_queries(x, t, seed=81), t))
                < 1e-5
            )


# -- (d) restart ----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_calls_ride_out_a_restart_with_the_default_policy(digits):
    """A 3 s outage: every call made while the server is down, with the default RetryPolicy and
    within its deadline, succeeds once the server is back (gRPC's wait-for-ready plus retries of
    UNAVAILABLE), and so do the first calls after it is back."""
    x, _ = digits
    t = np.array([0.35, 0.55, 0.75])
    xt = noisy_queries(x, t, seed=90)
    ref = _velocity_ref(x, xt, t)
    settings = Settings(device="cpu", metrics_port=-1, max_queue_delay_ms=0.0)
    port = _free_port()
    with OracleClient(f"127.0.0.1:{port}", timeout=20) as client:
        assert client.config.retry == RetryPolicy()  # the default policy
        with serve_in_thread(settings, port=port):
            assert max_rel(client.velocity(xt, t), ref) < 1e-6
        down = time.monotonic()
        results: list[tuple[float, object]] = []
        lock = threading.Lock()

        def call(start: float) -> None:
            time.sleep(start)
            began = time.monotonic()
            try:
                out: object = client.velocity(xt, t)
            except Exception as exc:  # recorded: the test asserts there is none
                out = exc
            with lock:
                results.append((time.monotonic() - began, out))

        callers = [threading.Thread(target=call, args=(s,)) for s in (0.0, 1.0, 2.0, 2.8)]
        for c in callers:
            c.start()
        time.sleep(max(0.0, 3.0 - (time.monotonic() - down)))
        assert all(c.is_alive() for c in callers)  # all are waiting, none failed
        with serve_in_thread(settings, port=port):
            assert max_rel(client.velocity(xt, t), ref) < 1e-6  # the first call after the restart
            for c in callers:
                c.join(25)
            assert len(results) == 4
            for took, out in results:
                assert isinstance(out, np.ndarray), out
                assert max_rel(out, ref) < 1e-6 and took < 20
        with OracleClient(f"127.0.0.1:{port}", timeout=1.0) as fresh, pytest.raises(OracleError) as gone:
            fresh.velocity(xt, t)  # nobody there: retried until the deadline, then gRPC's own reason
        assert gone.value.code == grpc.StatusCode.UNAVAILABLE and f"127.0.0.1:{port}" in gone.value.details


# -- (e) a tampered index -------------------------------------------------------------------------


def test_index_whose_contents_changed_refuses_to_load(tmp_path: Path):
    rng = np.random.default_rng(5)
    data = rng.standard_normal((40, 6)).astype(np.float32)
    index = tmp_path / "idx"
    manifest = build_index(data, index, name="toy", progress=False)
    assert build_store(Settings(data=[str(index)], device="cpu")).get("idx").fingerprint == manifest["fingerprint"]
    stored = np.load(index / "data.npy", mmap_mode="r+")
    stored[3, 2] += 1.0  # same shape and dtype, different contents
    stored.flush()
    del stored
    with pytest.raises(ValueError, match="do not match the manifest fingerprint") as info:
        build_store(Settings(data=[str(index)], device="cpu"))
    assert "rebuild the index" in str(info.value)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWORACLE_")}
    cmd = [sys.executable, "-m", "floworacle_server.cli", "serve", "--data", str(index), "--port", "0",
           "--metrics-port", "-1", "--device", "cpu"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "do not match the manifest fingerprint" in out.stdout + out.stderr
    assert "serving on" not in out.stdout + out.stderr


# -- (f) SIGTERM drain of the process -------------------------------------------------------------


def test_sigterm_drains_the_process_and_finishes_in_flight_work(digits):
    x, _ = digits
    t = np.array([0.45, 0.65])
    xt = noisy_queries(x, t, seed=95)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWORACLE_")}
    # The in-flight request waits 2.5 s in the queue, past the 0.8 s in which health says
    # NOT_SERVING before the port refuses new RPCs.
    cmd = [sys.executable, "-m", "floworacle_server.cli", "serve", "--port", "0", "--metrics-port", "-1",
           "--host", "127.0.0.1", "--max-queue-delay-ms", "2500", "--shutdown-delay-s", "0.8",
           "--grace-period-s", "20"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        assert proc.stdout is not None
        port = None
        deadline = time.monotonic() + 60
        while port is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            m = re.search(r"serving on 127\.0\.0\.1:(\d+)", line)
            port = int(m.group(1)) if m else None
        assert port
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.FlowOracleStub(ch)
            health = health_pb2_grpc.HealthStub(ch)
            stub.ListDatasets(pb.ListDatasetsRequest(), timeout=10)
            inflight = stub.Oracle.future(oracle_request(xt, t, dtype="float64"), timeout=30)
            time.sleep(0.2)  # let it reach the queue
            proc.send_signal(signal.SIGTERM)
            check = health_pb2.HealthCheckRequest(service="")
            assert _wait(lambda: health.Check(check, timeout=5).status == health_pb2.HealthCheckResponse.NOT_SERVING)
            refused = None
            deadline = time.monotonic() + 10
            while refused is None and time.monotonic() < deadline:  # after shutdown_delay_s: no new work
                try:
                    stub.ListDatasets(pb.ListDatasetsRequest(), timeout=5)
                    time.sleep(0.05)
                except grpc.RpcError as exc:
                    refused = exc
            # UNAVAILABLE, or CANCELLED for a call that raced the shutdown before any handler took
            # it (gRPC core, grpc/grpc#41785; the SDK retries both)
            assert refused is not None
            assert refused.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), refused
            assert not inflight.done()  # still waiting in the queue when the port closed ...
            resp = inflight.result(timeout=20)  # ... and answered exactly within the grace period
        assert max_rel(protocol.decode(resp.velocity), _velocity_ref(x, xt, t)) < 1e-6
        rest, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, rest
        assert "draining" in rest and "stopped" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
