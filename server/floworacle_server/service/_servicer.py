"""The ``floworacle.v1.FlowOracle`` servicer: thin glue between the wire, request validation and the
dynamic batcher. Every failure leaves here as one precise gRPC status with an actionable message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Protocol, TypeVar

import grpc

from floworacle.protocol import SPACES, RequestError, dtype_by_name, pb, pb_grpc
from floworacle_server.data import Dataset, DatasetStore
from floworacle_server.engine import nearest_info
from floworacle_server.metrics import ServiceMetrics
from floworacle_server.service._batcher import BatcherClosedError, DeadlineExpiredError, DynamicBatcher, QueueFullError
from floworacle_server.service._budget import ByteBudget
from floworacle_server.service._compute import (
    NearestRunner,
    OracleRunner,
    empty_nearest_response,
    empty_oracle_response,
)
from floworacle_server.service._gang import Gang, GangBroken
from floworacle_server.service._requests import Limits, RpcFailure, parse_nearest, parse_oracle, resolve_dataset

__all__ = ["FlowOracleServicer", "dataset_info"]

log = logging.getLogger(__name__)
T = TypeVar("T")


class _TokenCheck(Protocol):
    def check(self, metadata: object) -> str | None: ...


class _Revoked:
    """Queued by a stream's reader when a message arrives after the stream's token was revoked."""

    def __init__(self, message: str) -> None:
        self.message = message


#: Suggested wait before retrying a request refused because the queue was full.
RETRY_PUSHBACK_MS = 50
#: Longest a stream message waits out a full queue when the call has no deadline.
STREAM_RETRY_S = 30.0


def dataset_info(ds: Dataset, default_name: str | None) -> pb.DatasetInfo:
    """The wire description of a resident data set (its nearest-search facts included)."""
    near = nearest_info(ds)
    resident = ds.shard.resident_bytes if ds.shard is not None and ds.shard.resident_bytes else ds.resident_bytes
    return pb.DatasetInfo(
        name=ds.name,
        fingerprint=ds.fingerprint,
        num_samples=ds.total_samples,
        sample_shape=list(ds.sample_shape),
        dim=ds.dim,
        storage_dtype=dtype_by_name(ds.storage_dtype).enum,  # type: ignore[arg-type]
        num_classes=ds.num_classes,
        has_weights=ds.log_weights is not None,
        scale_factor=ds.scale_factor,
        device=str(ds.device),
        resident_bytes=resident,
        is_default=ds.name == default_name,
        nearest_backend=near.backend,
        nearest_backend_reason=near.backend_reason,
        exact_nearest_max_samples=near.exact_max_samples,
        nearest_indexes=[
            pb.NearestIndexInfo(
                space=SPACES[ix.space],  # type: ignore[arg-type]
                kind=ix.kind,
                params=ix.params,
                recall=ix.recall,
                recall_k=ix.recall_k,
                default_nprobe=ix.default_nprobe,
                device=ix.device,
                bytes=ix.bytes,
            )
            for ix in near.indexes
        ],
        feature_dim=near.feature_dim,
        feature_metric=near.feature_metric,
    )


def _as_failure(exc: BaseException) -> RpcFailure:
    """Translate anything raised below the servicer into the status the caller sees."""
    if isinstance(exc, RpcFailure):
        return exc
    if isinstance(exc, RequestError):  # a protocol rule, with its code and message
        reason = "rows_cap" if exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED else "invalid"
        return RpcFailure(exc.code, exc.details, reason=reason)
    if isinstance(exc, QueueFullError):
        return RpcFailure(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            str(exc),
            reason="queue_full",
            trailing=(("grpc-retry-pushback-ms", str(RETRY_PUSHBACK_MS)),),
        )
    if isinstance(exc, DeadlineExpiredError):
        return RpcFailure(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc), reason="deadline")
    if isinstance(exc, BatcherClosedError):
        return RpcFailure(grpc.StatusCode.UNAVAILABLE, str(exc), reason="draining")
    if isinstance(exc, GangBroken):
        return RpcFailure(
            grpc.StatusCode.UNAVAILABLE,
            # the reason (gloo / NCCL internals, peer addresses) stays in the server's log
            "a rank of this server's gang failed; no answer was computed over fewer shards. The gang is "
            "restarting: retry (the SDK retries until the call's deadline) or use another replica",
            reason="unavailable",
        )
    if isinstance(exc, ValueError):  # the engine's (and codec's) contract for bad query contents
        return RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, str(exc), reason="invalid")
    if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, without importing CUDA
        return RpcFailure(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "the device ran out of memory for this batch; send smaller batches or lower max_batch_rows / chunk_rows",
            reason="other",
        )
    log.error("internal error", exc_info=exc)
    return RpcFailure(grpc.StatusCode.INTERNAL, f"internal server error ({type(exc).__name__}: {exc})", reason="other")


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline on the ``time.monotonic`` clock (None: no deadline)."""
    remaining = context.time_remaining()
    if remaining is None:
        return None
    if remaining <= 0:
        raise RpcFailure(
            grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed before the request arrived", reason="deadline"
        )
    return time.monotonic() + remaining


class FlowOracleServicer(pb_grpc.FlowOracleServicer):
    """Validates requests, sends them through the batcher, and maps every error to a status."""

    def __init__(
        self,
        store: DatasetStore,
        batcher: DynamicBatcher,
        metrics: ServiceMetrics,
        *,
        limits: Limits,
        chunk_rows: int | None = None,
        screen: str = "float32",
        max_stream_inflight: int = 16,
        max_stream_inflight_bytes: int = 8 << 20,
        budget: ByteBudget | None = None,
        auth: _TokenCheck | None = None,
        gang: Gang | None = None,
        on_gang_broken: Callable[[str], None] | None = None,
    ) -> None:
        self.store = store
        self.batcher = batcher
        self.metrics = metrics
        self.limits = limits
        self.max_stream_inflight = max_stream_inflight
        self.max_stream_inflight_bytes = max_stream_inflight_bytes
        #: Bytes of requests in flight, server-wide (see _budget); streams get a share of it each.
        self.budget = budget if budget is not None else ByteBudget(128 << 20)
        #: With tokens on: each stream message is checked against the current token set, so a
        #: token revoked (file edited, SIGHUP) ends the streams opened with it.
        self.auth = auth
        self._oracle_runner = OracleRunner(chunk_rows, screen, gang)
        self._nearest_runner = NearestRunner(gang)
        self._on_gang_broken = on_gang_broken
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def wait_idle(self) -> None:
        """Return once no FlowOracle RPC is being handled (used by the drain: health watchers
        and other long-lived streams need not hold the shutdown for the whole grace period)."""
        await self._idle.wait()

    @contextlib.contextmanager
    def _track(self, method: str) -> Iterator[None]:
        self._active += 1
        self._idle.clear()
        try:
            with self.metrics.inflight(method):
                yield
        finally:
            self._active -= 1
            if self._active == 0:
                self._idle.set()

    # -- shared plumbing ------------------------------------------------------------------------
    async def _unary(self, method: str, context: grpc.aio.ServicerContext, fn: Callable[[], Awaitable[T]]) -> T:
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        observed = False
        with self._track(method):
            try:
                return await fn()
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as exc:  # every failure becomes one status, here
                self._notice(exc)
                failure = _as_failure(exc)
                code = failure.code
                if failure.reason != "other":
                    self.metrics.rejected(failure.reason)
                if failure.trailing:
                    context.set_trailing_metadata(failure.trailing)
                # Count the failure before abort() sends the status: a client that reads the
                # metrics right after its error must already see it.
                self.metrics.observe_request(method, code.name, time.perf_counter() - start)
                observed = True
                await context.abort(failure.code, failure.message)
                raise  # unreachable: abort raises
            finally:
                if not observed:
                    self.metrics.observe_request(method, code.name, time.perf_counter() - start)

    async def _oracle(self, method: str, request: pb.OracleRequest, deadline: float | None) -> pb.OracleResponse:
        job = parse_oracle(request, self.store, self.limits)
        if job.rows == 0:  # nothing to compute: the empty answer, in the shapes asked for
            return empty_oracle_response(job)
        resp: pb.OracleResponse = await self.batcher.submit(job.key, job.rows, job, self._oracle_runner, deadline)
        self.metrics.add_rows(method, job.rows)
        return resp

    @contextlib.contextmanager
    def _admitted(self, request: pb.OracleRequest | pb.NearestRequest) -> Iterator[None]:
        """Hold the request's bytes against the server's budget while it is in flight; refuse it
        (RESOURCE_EXHAUSTED with a retry hint) when they do not fit."""
        n = request.ByteSize()
        if not self.budget.try_take(n):
            raise RpcFailure(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the server holds {self.budget.used} bytes of requests in flight and this request's {n} would "
                f"pass its budget of {self.budget.limit} (max_inflight_bytes); retry after a short backoff or "
                "send smaller batches",
                reason="memory",
                trailing=(("grpc-retry-pushback-ms", str(RETRY_PUSHBACK_MS)),),
            )
        try:
            yield
        finally:
            self.budget.give(n)

    # -- RPCs -----------------------------------------------------------------------------------
    async def Oracle(self, request: pb.OracleRequest, context: grpc.aio.ServicerContext) -> pb.OracleResponse:
        async def run() -> pb.OracleResponse:
            with self._admitted(request):
                return await self._oracle("Oracle", request, _deadline(context))

        return await self._unary("Oracle", context, run)

    async def Nearest(self, request: pb.NearestRequest, context: grpc.aio.ServicerContext) -> pb.NearestResponse:
        async def run() -> pb.NearestResponse:
            deadline = _deadline(context)
            with self._admitted(request):
                job = parse_nearest(request, self.store, self.limits)
                if job.rows == 0:
                    return empty_nearest_response(job)
                resp: pb.NearestResponse = await self.batcher.submit(
                    job.key, job.rows, job, self._nearest_runner, deadline
                )
            self.metrics.add_rows("Nearest", job.rows)
            return resp

        return await self._unary("Nearest", context, run)

    async def ListDatasets(
        self, request: pb.ListDatasetsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListDatasetsResponse:
        async def run() -> pb.ListDatasetsResponse:
            default = self.store.default_name
            return pb.ListDatasetsResponse(datasets=[dataset_info(ds, default) for ds in self.store])

        return await self._unary("ListDatasets", context, run)

    async def DescribeDataset(
        self, request: pb.DescribeDatasetRequest, context: grpc.aio.ServicerContext
    ) -> pb.DatasetInfo:
        async def run() -> pb.DatasetInfo:
            return dataset_info(resolve_dataset(self.store, request.name), self.store.default_name)

        return await self._unary("DescribeDataset", context, run)

    async def OracleStream(
        self, request_iterator: AsyncIterator[pb.OracleRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.OracleStreamResponse]:
        """Pipelined oracle: each message is validated and queued as soon as it arrives (up to
        ``max_stream_inflight`` messages and ``max_stream_inflight_bytes`` at once, within the
        server's budget; beyond, the stream is not read, so its sender waits on flow control);
        answers go back in request order; a failed message is answered with its status inside the
        stream, which stays open."""
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        slots = asyncio.Semaphore(self.max_stream_inflight)
        held = ByteBudget(self.max_stream_inflight_bytes, parent=self.budget)  # this stream's bytes
        answers: asyncio.Queue[tuple[asyncio.Task[pb.OracleStreamResponse], int] | _Revoked | None] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def read() -> None:
            try:
                async for req in request_iterator:
                    problem = self.auth.check(context.invocation_metadata()) if self.auth is not None else None
                    if problem is not None:
                        answers.put_nowait(_Revoked(problem))
                        return
                    n = req.ByteSize()
                    await slots.acquire()
                    await held.take(n)
                    answers.put_nowait((loop.create_task(self._stream_one(req, context)), n))
            finally:
                answers.put_nowait(None)

        reader = loop.create_task(read())
        with self._track("OracleStream"):
            try:
                while True:
                    task = await answers.get()
                    if task is None:
                        break
                    if isinstance(task, _Revoked):
                        code = grpc.StatusCode.UNAUTHENTICATED
                        self.metrics.rejected("unauthenticated")
                        log.info("ended an OracleStream: %s", task.message.split(";")[0])
                        await context.abort(code, task.message)
                        return  # unreachable: abort raises
                    work, n = task
                    answer = await work
                    m = answer.ByteSize()
                    held.force(m)  # the answer, until gRPC has taken it
                    yield answer
                    held.give(n + m)
                    slots.release()
                await reader  # a broken request stream surfaces here
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except grpc.aio.AbortError:  # the stream's status was sent (code set above)
                raise
            except Exception:
                # the request stream broke (client went away) or a bug; per-message errors never get here
                code = grpc.StatusCode.UNKNOWN
                raise
            finally:
                reader.cancel()
                while not answers.empty():
                    leftover = answers.get_nowait()
                    if isinstance(leftover, tuple):
                        leftover[0].cancel()
                held.give(held.used)  # whatever this stream still held
                self.metrics.observe_request("OracleStream", code.name, time.perf_counter() - start)

    async def _stream_one(self, req: pb.OracleRequest, context: grpc.aio.ServicerContext) -> pb.OracleStreamResponse:
        deadline = _deadline(context)
        # A stream is already back-pressured by its in-flight slots, and its answers carry no retry
        # hint; so a full queue (a transient state) is waited out here, with backoff, until the
        # call's deadline (or STREAM_RETRY_S without one), instead of failing the message.
        give_up = time.monotonic() + STREAM_RETRY_S if deadline is None else deadline
        backoff = RETRY_PUSHBACK_MS / 1000
        while True:
            try:
                resp = await self._oracle("OracleStream", req, deadline)
                break
            except asyncio.CancelledError:
                raise
            except QueueFullError as exc:
                if time.monotonic() + backoff < give_up:
                    await asyncio.sleep(backoff)
                    backoff = min(2 * backoff, 1.0)
                    continue
                return self._stream_error(req, exc)
            except Exception as exc:
                return self._stream_error(req, exc)
        out = pb.OracleStreamResponse(request_id=req.request_id)
        out.response.CopyFrom(resp)
        return out

    def _notice(self, exc: BaseException) -> None:
        if isinstance(exc, GangBroken) and self._on_gang_broken is not None:
            self._on_gang_broken(str(exc))

    def _stream_error(self, req: pb.OracleRequest, exc: BaseException) -> pb.OracleStreamResponse:
        self._notice(exc)
        failure = _as_failure(exc)
        if failure.reason != "other":
            self.metrics.rejected(failure.reason)
        return pb.OracleStreamResponse(
            request_id=req.request_id, error_code=failure.code.value[0], error_message=failure.message
        )
