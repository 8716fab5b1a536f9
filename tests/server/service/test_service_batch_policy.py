"""The batcher's wait policy: a lone caller stops paying the queue delay, bursts still merge."""

import asyncio
import time

from floworacle_server.service._batcher import DynamicBatcher


class _Job:
    def __init__(self, rows: int, value: int) -> None:
        self.rows, self.value = rows, value


def _double(jobs):
    return [2 * j.value for j in jobs], 1


async def test_lone_caller_stops_waiting_and_a_burst_still_merges():
    b = DynamicBatcher(max_batch_rows=100, max_queue_delay_s=0.2, max_queue_requests=100)
    b.start()
    start = time.perf_counter()
    assert await b.submit("k", 1, _Job(1, 1), _double) == 2
    first = time.perf_counter() - start
    start = time.perf_counter()
    assert await b.submit("k", 1, _Job(1, 2), _double) == 4
    second = time.perf_counter() - start
    assert first >= 0.19 and second < 0.1  # the first wait bought nothing: the key stops waiting
    start = time.perf_counter()
    await b.submit("other", 1, _Job(1, 3), _double)  # a new key starts waiting
    assert time.perf_counter() - start >= 0.19
    calls = b.engine_calls
    out = await asyncio.gather(*(b.submit("k", 1, _Job(1, i), _double) for i in range(8)))
    assert out == [2 * i for i in range(8)] and b.engine_calls - calls == 1  # still one merged call
    start = time.perf_counter()
    await b.submit("k", 1, _Job(1, 9), _double)  # the merge put the key back to waiting
    assert time.perf_counter() - start >= 0.19
    await b.close()
