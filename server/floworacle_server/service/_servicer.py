"""The ``floworacle.v1.FlowOracle`` servicer: thin glue between the wire, request validation and the
dynamic batcher. Every failure leaves here as one precise gRPC status with an actionable message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from typing import Any, Protocol, TypeVar

import grpc

from floworacle.protocol import SERVICE_NAME, SPACES, STREAM_WINDOW_BYTES, RequestError, dtype_by_name, pb
from floworacle_server.data import Dataset, DatasetStore
from floworacle_server.engine import nearest_info
from floworacle_server.metrics import ServiceMetrics
from floworacle_server.service._batcher import BatcherClosedError, DeadlineExpiredError, DynamicBatcher, QueueFullError
from floworacle_server.service._budget import ByteBudget
from floworacle_server.service._compute import NearestRunner, OracleRunner
from floworacle_server.service._gang import Gang, GangBroken
from floworacle_server.service._requests import Limits, RpcFailure, read_nearest, read_oracle, resolve_dataset

__all__ = ["FlowOracleServicer", "add_servicer", "dataset_info", "parse_request"]

log = logging.getLogger(__name__)
T = TypeVar("T")


class _TokenCheck(Protocol):
    def check(self, metadata: object) -> str | None: ...


class _Revoked:
    """Queued by a stream's reader when a message arrives after the stream's token was revoked."""

    def __init__(self, message: str) -> None:
        self.message = message


#: Copies of a request the server holds while it is in flight (the received bytes, the parsed
#: message, the decoded points): what the byte budget counts per request byte.
HELD_COPIES = 3
#: What a stream reserves before it reads its first message (then: the size of its last one): what
#: gRPC holds of a stream's unread bytes, its flow-control window.
FIRST_RESERVATION = STREAM_WINDOW_BYTES

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


#: The (request, response) messages of each method (the servicer parses the raw bytes itself).
MESSAGES: dict[str, tuple[Any, Any]] = {
    "Oracle": (pb.OracleRequest, pb.OracleResponse),
    "OracleStream": (pb.OracleRequest, pb.OracleStreamResponse),
    "Nearest": (pb.NearestRequest, pb.NearestResponse),
    "ListDatasets": (pb.ListDatasetsRequest, pb.ListDatasetsResponse),
    "DescribeDataset": (pb.DescribeDatasetRequest, pb.DatasetInfo),
}


def parse_request(method: str, raw: bytes) -> Any:
    """The request message of ``method`` from its bytes; INVALID_ARGUMENT when they do not parse
    (gRPC's own answer to a message its deserializer refuses would be UNKNOWN)."""
    try:
        return MESSAGES[method][0].FromString(raw)
    except Exception as exc:  # protobuf's DecodeError, or anything a parser raises
        raise RpcFailure(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the {method} request is not a valid protobuf message ({type(exc).__name__}: {exc}); "
            "build it with the generated floworacle.v1 classes or the SDK",
            reason="invalid",
        ) from None


def add_servicer(servicer: FlowOracleServicer, server: grpc.aio.Server) -> None:
    """Register the servicer's methods on ``server``: requests reach them as raw bytes, answers are
    messages that protobuf serializes."""
    handlers = {}
    for method, (_, response) in MESSAGES.items():
        make = (
            grpc.stream_stream_rpc_method_handler if method == "OracleStream" else grpc.unary_unary_rpc_method_handler
        )
        handlers[method] = make(getattr(servicer, method), response_serializer=response.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


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


class FlowOracleServicer:
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

    async def _oracle(
        self, method: str, request: pb.OracleRequest, deadline: float | None, into: pb.OracleResponse | None = None
    ) -> tuple[pb.OracleResponse, int]:
        """The answer to one oracle request (written into ``into`` when given) and its size."""
        work = replace(read_oracle(request, self.store, self.limits), into=into)
        if work.rows == 0:  # nothing to compute: the empty answer, in the shapes asked for
            return work.query.empty_response(into), 0
        resp: pb.OracleResponse = await self.batcher.submit(work.key, work.rows, work, self._oracle_runner, deadline)
        self.metrics.add_rows(method, work.rows)
        return resp, work.answer_bytes

    @contextlib.contextmanager
    def _admitted(self, size: int) -> Iterator[None]:
        """Hold what a request of ``size`` bytes costs (:data:`HELD_COPIES` of it) against the
        server's budget while it is in flight; refuse it (RESOURCE_EXHAUSTED with a retry hint)
        when that does not fit."""
        n = HELD_COPIES * size
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

    # -- RPCs: each takes its request's raw bytes, parses them once (parse_request) and so knows
    # -- their size without serializing the message again --------------------------------------
    async def Oracle(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.OracleResponse:
        async def run() -> pb.OracleResponse:
            deadline = _deadline(context)
            with self._admitted(len(raw)):
                resp, _ = await self._oracle("Oracle", parse_request("Oracle", raw), deadline)
                return resp

        return await self._unary("Oracle", context, run)

    async def Nearest(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.NearestResponse:
        async def run() -> pb.NearestResponse:
            deadline = _deadline(context)
            with self._admitted(len(raw)):
                work = read_nearest(parse_request("Nearest", raw), self.store, self.limits)
                if work.rows == 0:
                    return work.query.empty_response(work.dataset.labels is not None)
                resp: pb.NearestResponse = await self.batcher.submit(
                    work.key, work.rows, work, self._nearest_runner, deadline
                )
            self.metrics.add_rows("Nearest", work.rows)
            return resp

        return await self._unary("Nearest", context, run)

    async def ListDatasets(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.ListDatasetsResponse:
        async def run() -> pb.ListDatasetsResponse:
            parse_request("ListDatasets", raw)
            default = self.store.default_name
            return pb.ListDatasetsResponse(datasets=[dataset_info(ds, default) for ds in self.store])

        return await self._unary("ListDatasets", context, run)

    async def DescribeDataset(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.DatasetInfo:
        async def run() -> pb.DatasetInfo:
            request = parse_request("DescribeDataset", raw)
            return dataset_info(resolve_dataset(self.store, request.name), self.store.default_name)

        return await self._unary("DescribeDataset", context, run)

    async def OracleStream(
        self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.OracleStreamResponse]:
        """Pipelined oracle: each message is validated and queued as soon as it arrives (up to
        ``max_stream_inflight`` messages and ``max_stream_inflight_bytes`` at once, within the
        server's budget; beyond, the stream is not read, so its sender waits on flow control);
        answers go back in request order; a failed message (one that does not even parse included)
        is answered with its status inside the stream, which stays open."""
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        slots = asyncio.Semaphore(self.max_stream_inflight)
        held = ByteBudget(self.max_stream_inflight_bytes, parent=self.budget)  # this stream's bytes
        answers: asyncio.Queue[tuple[asyncio.Task[tuple[pb.OracleStreamResponse, int]], int] | _Revoked | None] = (
            asyncio.Queue()
        )
        loop = asyncio.get_running_loop()

        async def read() -> None:
            # Room is taken *before* the next message is asked of gRPC, which until then keeps it in
            # the stream's flow-control window (the sender waits): a reservation of what the last
            # message cost, corrected to the actual cost once the message is read.
            reserve = HELD_COPIES * FIRST_RESERVATION
            messages: AsyncIterator[bytes] | None = None
            try:
                while True:
                    await slots.acquire()
                    await held.take(reserve)
                    if messages is None:  # made at the first read (gRPC's iterator is a coroutine)
                        messages = request_iterator.__aiter__()
                    try:
                        raw = await messages.__anext__()
                    except StopAsyncIteration:
                        held.give(reserve)
                        slots.release()
                        return
                    problem = self.auth.check(context.invocation_metadata()) if self.auth is not None else None
                    if problem is not None:
                        answers.put_nowait(_Revoked(problem))
                        return
                    n = HELD_COPIES * len(raw)
                    if n > reserve:
                        held.force(n - reserve)
                    else:
                        held.give(reserve - n)
                    reserve = max(n, HELD_COPIES * FIRST_RESERVATION)
                    answers.put_nowait((loop.create_task(self._stream_one(raw, context)), n))
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
                    answer, m = await work
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

    async def _stream_one(self, raw: bytes, context: grpc.aio.ServicerContext) -> tuple[pb.OracleStreamResponse, int]:
        """One stream message's answer and its size (the answer's tensors, from its query: measuring
        a message would serialize it once more)."""
        try:
            req = parse_request("OracleStream", raw)
        except RpcFailure as exc:  # unreadable: answered in its place (no request id to echo)
            return self._stream_error(pb.OracleRequest(), exc), 0
        return await self._stream_answer(req, context)

    async def _stream_answer(
        self, req: pb.OracleRequest, context: grpc.aio.ServicerContext
    ) -> tuple[pb.OracleStreamResponse, int]:
        deadline = _deadline(context)
        # A stream is already back-pressured by its in-flight slots, and its answers carry no retry
        # hint; so a full queue (a transient state) is waited out here, with backoff, until the
        # call's deadline (or STREAM_RETRY_S without one), instead of failing the message.
        give_up = time.monotonic() + STREAM_RETRY_S if deadline is None else deadline
        backoff = RETRY_PUSHBACK_MS / 1000
        out = pb.OracleStreamResponse(request_id=req.request_id)
        while True:
            try:
                _, size = await self._oracle("OracleStream", req, deadline, into=out.response)  # written in place
                break
            except asyncio.CancelledError:
                raise
            except QueueFullError as exc:
                if time.monotonic() + backoff < give_up:
                    await asyncio.sleep(backoff)
                    backoff = min(2 * backoff, 1.0)
                    continue
                return self._stream_error(req, exc), 0
            except Exception as exc:
                return self._stream_error(req, exc), 0
        return out, size

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
