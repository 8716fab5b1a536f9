"""Dynamic batcher: merges concurrent compatible requests into one engine call and runs engine calls
one at a time on a dedicated worker thread, off the event loop.

A request is an item with a *key* (what must be equal for two requests to share an engine call,
e.g. data set, precision and guidance) and a number of rows. The oldest waiting item decides the
next batch: the batcher waits up to ``max_queue_delay`` from that item's arrival for more items of
the same key, then takes items of that key in arrival order up to ``max_batch_rows`` rows (an item
larger than that runs alone). Items whose caller went away or whose deadline passed while waiting
are dropped before compute. Admission is bounded twice: a full queue, or more rows in flight (queued
plus computing) than ``max_inflight_rows``, refuses new items at once. A merged batch that runs the
device out of memory is split in halves and retried, down to single requests.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import sys
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = [
    "BatchRunner",
    "DynamicBatcher",
    "QueueFullError",
    "InflightFullError",
    "DeadlineExpiredError",
    "BatcherClosedError",
]

log = logging.getLogger(__name__)


class QueueFullError(Exception):
    """The batcher queue holds ``max_queue_requests`` items; the caller should back off and retry."""


class InflightFullError(QueueFullError):
    """Admitting the item would put more than ``max_inflight_rows`` rows in flight; the caller should
    back off and retry (the servicer answers it like a full queue, with a retry hint)."""


class DeadlineExpiredError(Exception):
    """The item's deadline passed while it waited; it was not computed."""


class BatcherClosedError(Exception):
    """The batcher is shutting down and computes nothing more."""


#: Computes one merged batch on the worker thread. Receives the payloads of the merged items (same
#: key) in order and returns one result per payload (a result that is an ``Exception`` instance is
#: raised to that item's caller only) and the number of (query, sample) pairs the engine refined in
#: float64 (for the metrics). Payloads expose ``rows``.
BatchRunner = Callable[[Sequence[Any]], tuple[list[Any], int]]


class _Metrics(Protocol):
    def observe_queue(self, seconds: float) -> None: ...
    def observe_batch(self, rows: int, seconds: float, refined: int) -> None: ...
    def set_queue_depth(self, depth: int) -> None: ...
    def rejected(self, reason: str) -> None: ...


@dataclass
class _Item:
    key: Hashable
    rows: int
    payload: Any
    runner: BatchRunner
    future: asyncio.Future[Any]
    enqueued: float
    deadline: float | None
    # The item's rows count towards max_inflight_rows until both its caller is gone and its
    # engine call (if any) has ended: a cancelled caller does not free rows still on the device.
    holds_rows: bool = True
    computing: bool = False


def _is_out_of_memory(exc: BaseException) -> bool:
    """torch.OutOfMemoryError (= torch.cuda.OutOfMemoryError), without importing torch here."""
    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    return isinstance(oom, type) and isinstance(exc, oom)


def _release_device_cache() -> None:
    # After an out-of-memory error the caching allocator may hold the failed attempt's blocks;
    # hand them back before the halves are tried.
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


@dataclass
class BatchRecord:
    """One engine call: its key, the rows merged and how many requests they came from."""

    key: Hashable
    rows: int
    requests: int
    seconds: float


@dataclass
class _Stats:
    engine_calls: int = 0
    requests: int = 0
    history: collections.deque[BatchRecord] = field(default_factory=lambda: collections.deque(maxlen=1000))


class DynamicBatcher:
    """Merges concurrent items of equal key into engine calls on one worker thread.

    Args:
        max_batch_rows: most rows merged into one call.
        max_queue_delay_s: longest the oldest item waits for company before its batch runs.
        max_queue_requests: most items waiting (not counting the batch being computed).
        max_inflight_rows: most rows queued or computing at once (None: no cap). An item that
            arrives when nothing is in flight is always admitted, so one request larger than the
            cap still runs (alone).
        metrics: optional :class:`~floworacle_server.metrics.ServiceMetrics`-like sink.
    """

    def __init__(
        self,
        *,
        max_batch_rows: int,
        max_queue_delay_s: float,
        max_queue_requests: int,
        max_inflight_rows: int | None = None,
        metrics: _Metrics | None = None,
        engine_thread_setup: Callable[[], None] | None = None,
    ) -> None:
        if max_batch_rows < 1 or max_queue_requests < 1 or max_queue_delay_s < 0:
            raise ValueError("max_batch_rows and max_queue_requests must be >= 1 and max_queue_delay_s >= 0")
        if max_inflight_rows is not None and max_inflight_rows < 1:
            raise ValueError(f"max_inflight_rows must be >= 1 or None, got {max_inflight_rows}")
        self.max_inflight_rows = max_inflight_rows
        self._inflight_rows = 0
        #: Merged batches split in halves after the device ran out of memory.
        self.oom_splits = 0
        #: Optional wrapper around every engine call, ``hook(runner, payloads)`` in place of
        #: ``runner(payloads)``, on the worker thread: fault injection and tracing in tests.
        self.compute_hook: Callable[[BatchRunner, list[Any]], tuple[list[Any], int]] | None = None
        self.max_batch_rows = max_batch_rows
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queue_requests = max_queue_requests
        self._metrics = metrics
        self._pending: collections.deque[_Item] = collections.deque()
        # Events bind to the running loop on first use (Python >= 3.10), so creating it here is safe.
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # One thread: engine calls on a device never overlap, and the event loop never computes.
        # ``engine_thread_setup`` runs first thing on that thread (flush-to-zero, see the server).
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="floworacle-engine", initializer=engine_thread_setup
        )
        self._closed = False
        self._stats = _Stats()
        # Keys whose last wait for company was in vain (see _worth_waiting).
        self._solo: dict[Hashable, bool] = {}

    # -- counters (tests and metrics read these) ---------------------------------------------
    @property
    def engine_calls(self) -> int:
        """Number of runner calls made so far (merged batches, plus single retries after an error)."""
        return self._stats.engine_calls

    @property
    def requests_computed(self) -> int:
        """Number of items that reached an engine call."""
        return self._stats.requests

    @property
    def history(self) -> list[BatchRecord]:
        """The last (up to 1,000) engine calls."""
        return list(self._stats.history)

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def inflight_rows(self) -> int:
        """Rows admitted and not yet finished (queued or computing)."""
        return self._inflight_rows

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the collector task on the running event loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._collect(), name="floworacle-batcher")

    async def close(self) -> None:
        """Fail waiting items with :class:`BatcherClosedError`, stop the collector, wait for the
        running engine call to end and release the worker thread."""
        self._closed = True
        while self._pending:
            item = self._pending.popleft()
            if not item.future.done():
                item.future.set_exception(BatcherClosedError("the server is shutting down; retry on another replica"))
        self._set_depth()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        await asyncio.get_running_loop().run_in_executor(None, lambda: self._executor.shutdown(wait=True))

    # -- submission ---------------------------------------------------------------------------
    async def submit(
        self,
        key: Hashable,
        rows: int,
        payload: Any,
        runner: BatchRunner,
        deadline: float | None = None,
    ) -> Any:
        """Queue one item and wait for its result.

        Args:
            key: items with equal keys may share an engine call (and must share ``runner``).
            rows: query rows of this item.
            payload: what ``runner`` receives for this item.
            deadline: ``time.monotonic()`` value after which the item is dropped uncomputed.

        Raises:
            QueueFullError, DeadlineExpiredError, BatcherClosedError, or what the runner returned
            as this item's exception. Cancelling the awaiting task removes the item from compute.
        """
        if self._closed or self._task is None:
            raise BatcherClosedError("the server is shutting down; retry on another replica")
        # Rejections are counted by the servicer, which sees every exception raised here.
        if len(self._pending) >= self.max_queue_requests:
            raise QueueFullError(
                f"the server's queue is full ({self.max_queue_requests} requests waiting); retry after a short "
                "backoff (tens of milliseconds), send fewer concurrent requests, or raise max_queue_requests"
            )
        cap = self.max_inflight_rows
        if cap is not None and self._inflight_rows > 0 and self._inflight_rows + rows > cap:
            raise InflightFullError(
                f"the server has {self._inflight_rows} rows in flight and this request's {rows} would pass its "
                f"cap of {cap} (max_inflight_rows); retry after a short backoff (tens of milliseconds) or send "
                "fewer rows at once"
            )
        loop = asyncio.get_running_loop()
        item = _Item(key, rows, payload, runner, loop.create_future(), time.monotonic(), deadline)
        self._pending.append(item)
        self._inflight_rows += rows
        self._set_depth()
        self._wakeup.set()
        # A cancelled caller cancels item.future too (Task.cancel cancels what it awaits), which
        # is how the collector knows to skip it.
        try:
            return await item.future
        finally:
            if not item.computing:
                self._release(item)

    # -- internals ----------------------------------------------------------------------------
    def _release(self, item: _Item) -> None:
        if item.holds_rows:
            item.holds_rows = False
            self._inflight_rows -= item.rows

    def _set_depth(self) -> None:
        if self._metrics is not None:
            self._metrics.set_queue_depth(len(self._pending))

    async def _wait(self, timeout: float | None) -> None:
        self._wakeup.clear()
        try:
            await asyncio.wait_for(self._wakeup.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    def _worth_waiting(self, key: Hashable) -> bool:
        """Whether the head item of ``key`` should wait (up to ``max_queue_delay``) for company.

        The wait only pays when other requests of the key are about to arrive. Policy: wait,
        unless the last batch of this key waited the full delay and still held a single request
        (a lone caller, e.g. one trainer calling in a loop: waiting would add the delay to every
        call and merge nothing). Such a key runs at once while the worker is idle; requests that
        arrive meanwhile queue behind the running engine call and are merged into the next batch,
        and as soon as a batch holds more than one request the key waits again. A batch that is
        already ``max_batch_rows`` full never waits. A new key starts in the waiting mode.
        """
        return not self._solo.get(key, False)

    def _learn(self, key: Hashable, requests: int, waited: bool) -> None:
        if requests > 1:
            self._solo.pop(key, None)
        elif requests == 1 and waited:
            if len(self._solo) >= 1024:  # keys include guidance settings: keep the map small
                self._solo.clear()
            self._solo[key] = True

    def _rows_for(self, key: Hashable) -> int:
        return sum(i.rows for i in self._pending if i.key == key and not i.future.done())

    def _take(self, key: Hashable) -> list[_Item]:
        batch: list[_Item] = []
        rows = 0
        keep: collections.deque[_Item] = collections.deque()
        for item in self._pending:
            if item.key == key and (not batch or rows + item.rows <= self.max_batch_rows):
                batch.append(item)
                rows += item.rows
            else:
                keep.append(item)
        self._pending = keep
        self._set_depth()
        return batch

    async def _collect(self) -> None:
        while True:
            while not self._pending:
                await self._wait(None)
            # Drop cancelled items at the head so they do not hold the others back.
            while self._pending and self._pending[0].future.done():
                self._pending.popleft()
            if not self._pending:
                self._set_depth()
                continue
            first = self._pending[0]
            waited = False
            while (
                self._worth_waiting(first.key)
                and self._rows_for(first.key) < self.max_batch_rows
                and not first.future.done()
            ):
                remaining = first.enqueued + self.max_queue_delay_s - time.monotonic()
                if remaining <= 0:
                    break
                waited = True
                await self._wait(remaining)
            batch = self._take(first.key)
            self._learn(first.key, sum(not i.future.done() for i in batch), waited)
            now = time.monotonic()
            live: list[_Item] = []
            for item in batch:
                if item.future.done():
                    continue
                if item.deadline is not None and item.deadline <= now:
                    item.future.set_exception(DeadlineExpiredError("the deadline passed while the request was queued"))
                    continue
                if self._metrics is not None:
                    self._metrics.observe_queue(now - item.enqueued)
                live.append(item)
            if live:
                try:
                    await self._execute(live)
                except asyncio.CancelledError:
                    for item in live:
                        if not item.future.done():
                            item.future.set_exception(BatcherClosedError("the server is shutting down"))
                    raise
                except Exception as exc:  # never let one batch kill the collector
                    log.exception("batch failed")
                    for item in live:
                        if not item.future.done():
                            item.future.set_exception(exc)

    async def _execute(self, items: list[_Item]) -> None:
        for item in items:
            item.computing = True
        try:
            await self._run_items(items)
        finally:
            for item in items:
                item.computing = False
                if item.future.done():
                    self._release(item)

    async def _run_items(self, items: list[_Item]) -> None:
        """Compute ``items`` in one engine call. If it runs out of device memory, compute each
        half on its own (recursively, down to single items); if it fails otherwise, rerun each
        item alone so only the culprit sees the error."""
        live = [i for i in items if not i.future.done()]
        if not live:
            return
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(
            self._executor, self._call, live[0].key, live[0].runner, [i.payload for i in live]
        )
        if isinstance(results, Exception):
            if len(live) == 1:
                if not live[0].future.done():
                    live[0].future.set_exception(results)
                return
            if _is_out_of_memory(results):
                self.oom_splits += 1
                half = (len(live) + 1) // 2
                log.warning(
                    "device out of memory on a batch of %d rows; retrying it in halves",
                    sum(i.rows for i in live),
                )
                await self._run_items(live[:half])
                await self._run_items(live[half:])
            else:
                for item in live:
                    await self._run_items([item])
            return
        for item, result in zip(live, results, strict=True):
            if item.future.done():
                continue
            if isinstance(result, Exception):
                item.future.set_exception(result)
            else:
                item.future.set_result(result)

    def _call(self, key: Hashable, runner: BatchRunner, payloads: list[Any]) -> list[Any] | Exception:
        # Runs on the worker thread.
        rows = sum(int(getattr(p, "rows", 0)) for p in payloads)
        start = time.perf_counter()
        self._stats.engine_calls += 1
        self._stats.requests += len(payloads)
        try:
            hook = self.compute_hook
            results, refined = hook(runner, payloads) if hook is not None else runner(payloads)
        except Exception as exc:
            if _is_out_of_memory(exc):
                _release_device_cache()
            return exc
        seconds = time.perf_counter() - start
        if len(results) != len(payloads):
            return RuntimeError(f"batch runner returned {len(results)} results for {len(payloads)} requests")
        self._stats.history.append(BatchRecord(key=key, rows=rows, requests=len(payloads), seconds=seconds))
        if self._metrics is not None:
            self._metrics.observe_batch(rows, seconds, refined)
        return results
