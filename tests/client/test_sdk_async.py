"""The asyncio client over a real channel: every method, dtypes, split parts sent concurrently,
retries, deadlines, streaming."""

from __future__ import annotations

import asyncio
import sys

import grpc
import numpy as np
import pytest
import torch
from sdk_support import CLASSES, SHAPE, Data, linear_ref, make_store, queries, settings

from floworacle import AsyncOracleClient, OracleError, RetryPolicy
from floworacle_server.service.testing import RunningServer, serve_in_thread


async def test_every_method(server: RunningServer, data: Data) -> None:
    x_t, t = queries(data, 8, seed=40)
    ref = linear_ref(data.x, x_t, t)
    async with AsyncOracleClient(server.address) as c:
        np.testing.assert_allclose(await c.velocity(x_t, t), ref.velocity, rtol=1e-6, atol=1e-8)
        p = await c.predict(x_t, t, top_k=3)
        np.testing.assert_allclose(p.score, ref.score, rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(p.ess, ref.ess, rtol=1e-6)
        assert p.topk_indices.shape == (8, 3)
        nb = await c.nearest(data.x[:4], 2)
        np.testing.assert_array_equal(nb.indices[:, 0], np.arange(4))
        (info,) = await c.datasets()
        assert info.sample_shape == SHAPE and info.num_classes == CLASSES
        assert await c.describe("blobs") == info
        with pytest.raises(OracleError) as e:
            await c.velocity(x_t, t, dataset="nope")
        assert e.value.code == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
async def test_torch_dtypes(server: RunningServer, data: Data, dtype: torch.dtype) -> None:
    x_t, t = queries(data, 4, seed=41)
    x = torch.from_numpy(x_t).to(dtype)
    async with AsyncOracleClient(server.address) as c:
        u = await c.velocity(x, t)
    assert u.dtype == dtype
    want = linear_ref(data.x, x.double().numpy(), t).velocity
    assert np.abs(u.double().numpy() - want).max() / np.abs(want).max() < 2e-2


async def test_concurrent_calls_and_reversed(server: RunningServer, data: Data) -> None:
    x_t, t = queries(data, 12, seed=42)
    async with AsyncOracleClient(server.address) as c:
        outs = await asyncio.gather(*(c.velocity(x_t[i : i + 3], t[i : i + 3]) for i in range(0, 12, 3)))
        rev = await c.velocity(x_t, 1 - t, convention="reversed")
    np.testing.assert_allclose(np.concatenate(outs), linear_ref(data.x, x_t, t).velocity, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(rev, -np.concatenate(outs), rtol=1e-9, atol=1e-12)


async def test_split_parts(data: Data) -> None:
    x_t, t = queries(data, 96, seed=43)
    with serve_in_thread(settings(max_message_bytes=16 * 1024), make_store(data)) as small:
        async with AsyncOracleClient(small.address, max_message_bytes=16 * 1024) as c:
            p = await c.predict(x_t, t, outputs=("velocity", "x1_hat", "eps_hat", "score"))
    ref = linear_ref(data.x, x_t, t)
    np.testing.assert_allclose(p.velocity, ref.velocity, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(p.x1_hat, ref.x1_hat, rtol=1e-6, atol=1e-8)


async def test_retry_and_deadline(server: RunningServer, data: Data) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    x_t, t = queries(data, 2, seed=44)
    async with AsyncOracleClient([dead, server.address], retry=RetryPolicy(initial_backoff=0.01)) as c:
        for _ in range(2):
            np.testing.assert_allclose(
                await c.velocity(x_t, t), linear_ref(data.x, x_t, t).velocity, rtol=1e-6, atol=1e-8
            )
    async with AsyncOracleClient(
        dead, retry=RetryPolicy(max_attempts=1000, initial_backoff=0.02, max_backoff=0.05)
    ) as c:
        with pytest.raises(OracleError) as e:
            await c.velocity(x_t, t, timeout=0.3)
    assert e.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


async def test_close_ends_a_call_without_retrying_it(data: Data) -> None:
    # CANCELLED is retried (a draining server's answer to calls it never took), but not the
    # CANCELLED that closing this client gives its own pending call
    x_t, t = queries(data, 2, seed=45)
    with serve_in_thread(settings(max_queue_delay_ms=2000, max_batch_rows=4096), make_store(data)) as slow:
        c = AsyncOracleClient(slow.address)
        await c.datasets()
        call = asyncio.ensure_future(c.velocity(x_t, t, timeout=30))
        await asyncio.sleep(0.3)
        await c.close()
        if sys.version_info < (3, 11):  # no Task.cancelling(): grpc.aio's CancelledError stays
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(call, 5)
            return
        with pytest.raises(OracleError) as e:
            await asyncio.wait_for(call, 5)
    assert e.value.code == grpc.StatusCode.CANCELLED and "closed" in e.value.details


async def test_cancelling_the_callers_task_stays_a_cancellation(data: Data) -> None:
    x_t, t = queries(data, 2, seed=46)
    with serve_in_thread(settings(max_queue_delay_ms=2000, max_batch_rows=4096), make_store(data)) as slow:
        async with AsyncOracleClient(slow.address) as c:
            call = asyncio.ensure_future(c.velocity(x_t, t, timeout=30))
            await asyncio.sleep(0.3)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            # the client still answers
            np.testing.assert_allclose(
                await c.velocity(x_t, t, timeout=30), linear_ref(data.x, x_t, t).velocity, rtol=1e-6, atol=1e-8
            )


async def test_stream(server: RunningServer, data: Data) -> None:
    items = [queries(data, 3 + i, seed=50 + i) for i in range(5)]

    async def source():  # an async iterable works too
        for x, t in items:
            yield (x, t)

    async with AsyncOracleClient(server.address) as c:
        got = [u async for u in c.velocity_stream(source(), max_in_flight=2)]
        bad = [(items[0][0], items[0][1]), (items[1][0][:, :5], items[1][1]), (items[2][0], items[2][1])]
        mixed = [r async for r in c.predict_stream(bad, return_errors=True)]
    for (x, t), u in zip(items, got, strict=True):
        np.testing.assert_allclose(u, linear_ref(data.x, x, t).velocity, rtol=1e-6, atol=1e-8)
    assert isinstance(mixed[1], OracleError) and mixed[1].code == grpc.StatusCode.INVALID_ARGUMENT
    np.testing.assert_allclose(mixed[2].velocity, linear_ref(data.x, *items[2]).velocity, rtol=1e-6, atol=1e-8)
