"""The dynamic batcher: unit behaviour with a fake runner, and merging over a real channel where
every caller still gets its own exact answer."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from service_helpers import FakeJob, linear_coeffs, max_rel, noisy_queries, oracle_request, ref_oracle

from floworacle import protocol
from floworacle.v1 import oracle_pb2 as pb
from floworacle.v1 import oracle_pb2_grpc as pb_grpc
from floworacle_server.data import Dataset, DatasetStore
from floworacle_server.service._batcher import (
    BatcherClosedError,
    DeadlineExpiredError,
    DynamicBatcher,
    QueueFullError,
)
from floworacle_server.service.testing import serve_in_thread
from floworacle_server.settings import Settings


class _Runner:
    """Doubles each value; a batch holding a failing job raises (like the engine would)."""

    def __init__(self, delay: float = 0.0) -> None:
        self.calls: list[list[int]] = []
        self.threads: set[str] = set()
        self.delay = delay

    def __call__(self, jobs):
        self.calls.append([j.value for j in jobs])
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay)
        if any(j.fail for j in jobs):
            raise ValueError("bad job")
        return [2 * j.value for j in jobs], 1


async def test_merges_up_to_max_rows_and_keeps_keys_apart():
    b = DynamicBatcher(max_batch_rows=10, max_queue_delay_s=0.05, max_queue_requests=100)
    b.start()
    run = _Runner()
    jobs = [("a", FakeJob(4, i)) for i in range(5)] + [("b", FakeJob(1, 100 + i)) for i in range(3)]
    out = await asyncio.gather(*(b.submit(k, j.rows, j, run) for k, j in jobs))
    assert out == [2 * j.value for _, j in jobs]
    # key "a": 5 x 4 rows under a 10-row cap -> [0, 1], [2, 3], [4]; key "b" in one call
    assert sorted(run.calls) == sorted([[0, 1], [2, 3], [4], [100, 101, 102]])
    assert b.engine_calls == 4 and b.requests_computed == 8
    assert run.threads == {next(iter(run.threads))} and next(iter(run.threads)).startswith("floworacle-engine")
    await b.close()


async def test_oversized_item_runs_alone():
    b = DynamicBatcher(max_batch_rows=4, max_queue_delay_s=0.0, max_queue_requests=10)
    b.start()
    run = _Runner()
    assert await b.submit("k", 50, FakeJob(50, 3), run) == 6
    assert run.calls == [[3]]
    await b.close()


async def test_failing_request_does_not_fail_its_batch_mates():
    b = DynamicBatcher(max_batch_rows=100, max_queue_delay_s=0.05, max_queue_requests=10)
    b.start()
    run = _Runner()
    res = await asyncio.gather(
        b.submit("k", 1, FakeJob(1, 1), run),
        b.submit("k", 1, FakeJob(1, 2, fail=True), run),
        b.submit("k", 1, FakeJob(1, 3), run),
        return_exceptions=True,
    )
    assert res[0] == 2 and res[2] == 6 and isinstance(res[1], ValueError)
    assert run.calls[0] == [1, 2, 3] and sorted(run.calls[1:]) == [[1], [2], [3]]
    await b.close()


async def test_queue_full_deadline_and_cancel_are_not_computed():
    b = DynamicBatcher(max_batch_rows=100, max_queue_delay_s=0.2, max_queue_requests=3)
    b.start()
    run = _Runner()
    keep = asyncio.ensure_future(b.submit("k", 1, FakeJob(1, 1), run))
    expired = asyncio.ensure_future(b.submit("k", 1, FakeJob(1, 2), run, deadline=time.monotonic() + 0.01))
    cancelled = asyncio.ensure_future(b.submit("k", 1, FakeJob(1, 3), run))
    await asyncio.sleep(0.02)
    assert b.queue_depth == 3
    with pytest.raises(QueueFullError, match="retry"):
        await b.submit("k", 1, FakeJob(1, 4), run)
    cancelled.cancel()
    assert await keep == 2
    with pytest.raises(DeadlineExpiredError):
        await expired
    assert run.calls == [[1]]  # neither the expired nor the cancelled item reached the engine
    await b.close()


async def test_close_fails_waiting_items():
    b = DynamicBatcher(max_batch_rows=100, max_queue_delay_s=5.0, max_queue_requests=3)
    b.start()
    waiting = asyncio.ensure_future(b.submit("k", 1, FakeJob(1, 1), _Runner()))
    await asyncio.sleep(0.01)
    await b.close()
    with pytest.raises(BatcherClosedError):
        await waiting
    with pytest.raises(BatcherClosedError):
        await b.submit("k", 1, FakeJob(1, 1), _Runner())


def test_concurrent_requests_merge_and_stay_exact(digits):
    """16 callers with different t, labels, outputs and dtypes share a few engine calls; each
    gets exactly its own answer."""
    x, y = digits
    settings = Settings(device="cpu", max_queue_delay_ms=300.0, metrics_port=-1)
    rng = np.random.default_rng(21)
    cases = []
    for i in range(16):
        b = 1 + i % 3
        t = rng.uniform(0.05, 0.95, size=b)
        xt = noisy_queries(x, t, seed=100 + i)
        labels = rng.integers(-1, 10, size=b) if i % 2 else None
        cases.append((xt, t, labels, ["float32", "float64"][i % 2]))

    def call(stub, case):
        xt, t, labels, dtype = case
        req = oracle_request(xt, t, dtype=dtype, outputs=(pb.OUTPUT_VELOCITY, pb.OUTPUT_X1_HAT), request_id="q")
        if labels is not None:
            req.labels.CopyFrom(protocol.encode(labels))
        return stub.Oracle(req, timeout=30)

    with serve_in_thread(settings) as srv, grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.FlowOracleStub(ch)
        stub.ListDatasets(pb.ListDatasetsRequest())  # connect before the burst
        before = srv.server.batcher.engine_calls
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda c: call(stub, c), cases))
        calls = srv.server.batcher.engine_calls - before
        merged_rows = [r.rows for r in srv.server.batcher.history[-calls:]]
    assert calls <= 4, f"16 concurrent requests took {calls} engine calls"
    assert sum(merged_rows) == sum(len(c[1]) for c in cases) and max(merged_rows) > 3
    for (xt, t, labels, dtype), resp in zip(cases, answers, strict=True):
        sent = xt.astype(dtype)
        ref = ref_oracle(x, sent, *linear_coeffs(t), data_labels=y, labels=labels)
        tol = 1e-6 if dtype == "float64" else 2e-6
        assert max_rel(protocol.decode(resp.velocity), ref["velocity"]) < tol
        assert max_rel(protocol.decode(resp.x1_hat), ref["x1_hat"]) < tol


def test_queue_full_is_resource_exhausted_with_retry_hint(digits):
    settings = Settings(device="cpu", max_queue_delay_ms=1500.0, max_queue_requests=2, metrics_port=-1)
    x, _ = digits
    req = oracle_request(noisy_queries(x, np.array([0.5])), np.array([0.5]))
    with serve_in_thread(settings) as srv, grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.FlowOracleStub(ch)
        waiting = [stub.Oracle.future(req, timeout=30) for _ in range(2)]
        deadline = time.monotonic() + 10
        while srv.server.batcher.queue_depth < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        with pytest.raises(grpc.RpcError) as info:
            stub.Oracle(req, timeout=10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue is full" in info.value.details() and "retry" in info.value.details()
        assert ("grpc-retry-pushback-ms", "50") in tuple(info.value.trailing_metadata())
        assert all(f.result().HasField("velocity") for f in waiting)  # the queued ones still finish


def test_request_whose_deadline_passes_in_queue_is_skipped(digits):
    settings = Settings(device="cpu", max_queue_delay_ms=400.0, metrics_port=-1)
    x, _ = digits
    req = oracle_request(noisy_queries(x, np.array([0.5])), np.array([0.5]))
    with serve_in_thread(settings) as srv, grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.FlowOracleStub(ch)
        stub.ListDatasets(pb.ListDatasetsRequest())
        computed = srv.server.batcher.requests_computed
        with pytest.raises(grpc.RpcError) as info:
            stub.Oracle(req, timeout=0.1)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        time.sleep(0.6)
        assert srv.server.batcher.requests_computed == computed
        assert stub.Oracle(req, timeout=10).HasField("velocity")


def test_request_cancelled_by_its_caller_is_not_computed(digits):
    settings = Settings(device="cpu", max_queue_delay_ms=500.0, metrics_port=-1)
    x, _ = digits
    req = oracle_request(noisy_queries(x, np.array([0.5])), np.array([0.5]))
    with serve_in_thread(settings) as srv, grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.FlowOracleStub(ch)
        stub.ListDatasets(pb.ListDatasetsRequest())
        computed = srv.server.batcher.requests_computed
        fut = stub.Oracle.future(req, timeout=30)
        deadline = time.monotonic() + 10
        while srv.server.batcher.queue_depth < 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert fut.cancel()
        time.sleep(0.8)
        assert srv.server.batcher.requests_computed == computed
        assert stub.Oracle(req, timeout=10).HasField("velocity")
        assert srv.server.batcher.requests_computed == computed + 1


def test_engine_error_fails_only_its_own_request_in_a_merged_batch():
    rng = np.random.default_rng(3)
    data = rng.standard_normal((20, 6)).astype(np.float32)
    labels = np.array([0] * 10 + [2] * 10)  # class 1 has no samples: the engine refuses label 1
    store = DatasetStore([Dataset.from_arrays("gappy", data, labels)])
    settings = Settings(device="cpu", max_queue_delay_ms=300.0, metrics_port=-1)
    t = np.array([0.5, 0.7])
    xt = noisy_queries(data, t, seed=1)

    def req(label: int) -> pb.OracleRequest:
        r = oracle_request(xt, t, dtype="float64")
        r.labels.CopyFrom(protocol.encode(np.array([label, label])))
        return r

    with serve_in_thread(settings, store) as srv, grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.FlowOracleStub(ch)
        stub.ListDatasets(pb.ListDatasetsRequest())
        calls = srv.server.batcher.engine_calls
        futures = [stub.Oracle.future(req(label), timeout=30) for label in (0, 1, 2)]
        with pytest.raises(grpc.RpcError) as info:
            futures[1].result()
        good = [futures[0].result(), futures[2].result()]
        calls = srv.server.batcher.engine_calls - calls
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "class 1 has no samples" in info.value.details()
    assert calls == 4  # one merged call that failed, then each request alone
    for label, resp in zip((0, 2), good, strict=True):
        ref = ref_oracle(data, xt, *linear_coeffs(t), data_labels=labels, labels=np.array([label, label]))
        assert max_rel(protocol.decode(resp.velocity), ref["velocity"]) < 1e-6


def test_the_engine_thread_flushes_denormals(digits):
    """The server's engine thread runs with flush-to-zero, for it and its OpenMP workers (the
    exp() of very negative float32 logits makes denormals, slow on many CPUs); the caller's
    thread is left as it was."""
    from floworacle_server.engine._flush import denormals_flushed

    x, _ = digits
    t = np.array([0.3, 0.8])
    seen: list[bool] = []

    def probe(runner, payloads):
        seen.append(denormals_flushed())
        return runner(payloads)

    before = denormals_flushed()
    with serve_in_thread(Settings(device="cpu", metrics_port=-1)) as srv, grpc.insecure_channel(srv.address) as ch:
        srv.server.batcher.compute_hook = probe
        pb_grpc.FlowOracleStub(ch).Oracle(oracle_request(noisy_queries(x, t), t), timeout=30)
    assert seen == [True]
    assert denormals_flushed() == before
