"""The batcher's wait policy: a lone caller stops paying the queue delay, bursts still merge."""

import asyncio
import time

from service_helpers import FakeJob, double_values

from floworacle_server.service._batcher import DynamicBatcher


async def test_lone_caller_stops_waiting_and_a_burst_still_merges():
    b = DynamicBatcher(max_batch_rows=100, max_queue_delay_s=0.2, max_queue_requests=100)
    b.start()
    start = time.perf_counter()
    assert await b.submit("k", 1, FakeJob(1, 1), double_values) == 2
    first = time.perf_counter() - start
    start = time.perf_counter()
    assert await b.submit("k", 1, FakeJob(1, 2), double_values) == 4
    second = time.perf_counter() - start
    assert first >= 0.19 and second < 0.1  # the first wait bought nothing: the key stops waiting
    start = time.perf_counter()
    await b.submit("other", 1, FakeJob(1, 3), double_values)  # a new key starts waiting
    assert time.perf_counter() - start >= 0.19
    calls = b.engine_calls
    out = await asyncio.gather(*(b.submit("k", 1, FakeJob(1, i), double_values) for i in range(8)))
    assert out == [2 * i for i in range(8)] and b.engine_calls - calls == 1  # still one merged call
    start = time.perf_counter()
    await b.submit("k", 1, FakeJob(1, 9), double_values)  # the merge put the key back to waiting
    assert time.perf_counter() - start >= 0.19
    await b.close()
