"""Admission and overload: the cap on rows in flight (queued + computing) refuses a burst beyond it
with RESOURCE_EXHAUSTED and a retry hint, admitted requests are answered exactly, and the SDK's
backoff gets every answer through once the burst passes."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from service_helpers import (
    FakeJob,
    double_values,
    linear_coeffs,
    max_rel,
    noisy_queries,
    oracle_request,
    ref_oracle,
)

from floworacle import OracleClient, RetryPolicy, protocol
from floworacle.v1 import oracle_pb2_grpc as pb_grpc
from floworacle_server.service._batcher import DynamicBatcher, InflightFullError, QueueFullError
from floworacle_server.service.testing import serve_in_thread
from floworacle_server.settings import Settings


async def test_inflight_row_cap_counts_queued_and_computing_rows():
    b = DynamicBatcher(max_batch_rows=100, max_queue_delay_s=0.2, max_queue_requests=100, max_inflight_rows=10)
    b.start()
    first = [asyncio.ensure_future(b.submit("k", 4, FakeJob(4, i), double_values)) for i in range(2)]
    await asyncio.sleep(0.01)
    assert b.inflight_rows == 8
    with pytest.raises(InflightFullError, match="max_inflight_rows") as info:
        await b.submit("k", 4, FakeJob(4, 9), double_values)
    assert isinstance(info.value, QueueFullError)  # answered like a full queue: with a retry hint
    assert await b.submit("k", 2, FakeJob(2, 5), double_values) == 10  # fits exactly: 8 + 2 = 10
    assert [await f for f in first] == [0, 2]
    assert b.inflight_rows == 0
    # with nothing in flight, a request larger than the cap is still admitted (it runs alone)
    assert await b.submit("k", 50, FakeJob(50, 7), double_values) == 14
    assert b.inflight_rows == 0
    await b.close()


async def test_cancelled_caller_keeps_its_rows_until_its_engine_call_ends():
    b = DynamicBatcher(max_batch_rows=100, max_queue_delay_s=0.0, max_queue_requests=10, max_inflight_rows=5)
    b.start()
    started, release = threading.Event(), threading.Event()

    def slow(jobs):
        started.set()
        release.wait(10)
        return double_values(jobs)

    caller = asyncio.ensure_future(b.submit("k", 4, FakeJob(4, 1), slow))
    assert await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
    caller.cancel()
    await asyncio.sleep(0.01)
    assert b.inflight_rows == 4  # still on the device
    with pytest.raises(InflightFullError):
        await b.submit("k", 4, FakeJob(4, 2), double_values)
    release.set()
    deadline = time.monotonic() + 10
    while b.inflight_rows and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    assert b.inflight_rows == 0
    assert await b.submit("k", 4, FakeJob(4, 3), double_values) == 6
    await b.close()


def _cases(x: np.ndarray, n: int, rows: int) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for i in range(n):
        t = np.linspace(0.15, 0.8, rows) + 0.01 * i
        out.append((noisy_queries(x, t, seed=300 + i), t))
    return out


def test_burst_beyond_the_cap_is_refused_with_a_hint_and_admitted_ones_are_exact(digits):
    x, _ = digits
    # The batch waits 0.6 s for company, so the whole burst arrives while the first 4 requests
    # (8 rows) are in flight.
    settings = Settings(device="cpu", metrics_port=-1, max_queue_delay_ms=600.0, max_inflight_rows=8)
    cases = _cases(x, 10, 2)
    with serve_in_thread(settings) as srv, grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.FlowOracleStub(ch)
        futures = [stub.Oracle.future(oracle_request(xt, t, dtype="float64"), timeout=30) for xt, t in cases]
        ok, refused = [], []
        for (xt, t), fut in zip(cases, futures, strict=True):
            try:
                ok.append((xt, t, fut.result()))
            except grpc.RpcError as exc:
                refused.append(exc)
        assert srv.server.batcher.inflight_rows == 0
        after = stub.Oracle(oracle_request(*cases[0], dtype="float64"), timeout=30)  # the server still answers
    assert len(ok) == 4 and len(refused) == 6
    for err in refused:
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_inflight_rows" in err.details() and "retry" in err.details()
        assert ("grpc-retry-pushback-ms", "50") in tuple(err.trailing_metadata())
    for xt, t, resp in ok:
        assert max_rel(protocol.decode(resp.velocity), ref_oracle(x, xt, *linear_coeffs(t))["velocity"]) < 1e-6
    assert (
        max_rel(protocol.decode(after.velocity), ref_oracle(x, cases[0][0], *linear_coeffs(cases[0][1]))["velocity"])
        < 1e-6
    )


def test_sdk_backoff_gets_every_answer_through_the_cap(digits):
    x, _ = digits
    settings = Settings(device="cpu", max_queue_delay_ms=30.0, max_inflight_rows=6)
    cases = _cases(x, 16, 3)
    retry = RetryPolicy(max_attempts=60, initial_backoff=0.01, max_backoff=0.1)
    with serve_in_thread(settings) as srv, OracleClient(srv.address, retry=retry, timeout=60) as client:
        barrier = threading.Barrier(len(cases))

        def call(case: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
            barrier.wait(10)  # one burst: all clients at once
            return client.velocity(case[0], case[1])

        with ThreadPoolExecutor(len(cases)) as pool:
            answers = list(pool.map(call, cases))
        refused = srv.server.metrics.registry.get_sample_value(
            "floworacle_rejected_requests_total", {"reason": "queue_full"}
        )
        assert srv.server.batcher.inflight_rows == 0
    assert refused is not None and refused > 0  # the burst did hit the cap ...
    for (xt, t), got in zip(cases, answers, strict=True):  # ... and every caller got its exact answer
        assert max_rel(got, ref_oracle(x, xt, *linear_coeffs(t))["velocity"]) < 1e-6


def test_streams_wait_out_a_full_queue_instead_of_failing(digits):
    """Three concurrent streams of 12 messages against a queue of 2: every message is answered
    exactly, none with RESOURCE_EXHAUSTED (a stream has no retry hint, so the server waits)."""
    x, _ = digits
    settings = Settings(port=0, metrics_port=-1, max_queue_requests=2, max_queue_delay_ms=0.0, max_batch_rows=4)
    with serve_in_thread(settings) as srv, grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.FlowOracleStub(ch)

        def one_stream(seed: int):
            t = np.linspace(0.1, 0.9, 12)
            xt = noisy_queries(x, t, seed=seed)
            reqs = [oracle_request(xt[i : i + 1], t[i : i + 1], request_id=f"{seed}-{i}") for i in range(12)]
            answers = list(stub.OracleStream(iter(reqs), timeout=60))
            return xt, t, answers

        with ThreadPoolExecutor(3) as pool:
            results = list(pool.map(one_stream, (11, 12, 13)))
    for xt, t, answers in results:
        assert [a.error_code for a in answers] == [0] * 12, [a.error_message for a in answers if a.error_code]
        got = np.concatenate([protocol.decode(a.response.velocity) for a in answers])
        assert max_rel(got, ref_oracle(x, xt, *linear_coeffs(t))["velocity"]) < 1e-6
