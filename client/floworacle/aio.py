"""The asyncio client: the same calls as :class:`floworacle.OracleClient` over ``grpc.aio``
channels. Create it inside the running event loop; ``async with`` or ``await client.close()``."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from floworacle._base import ALL_OUTPUTS, ClientBase, closed_error, nearest_options, oracle_options, stream_item
from floworacle._errors import OracleError, error_from_code, translate_rpc_error
from floworacle._options import NearestOptions, OracleOptions
from floworacle._plans import Plan, deadline_error, is_connection_error, parse_dataset_info, unreachable_error
from floworacle._results import DatasetInfo, Neighbors, Prediction
from floworacle.protocol import RequestError, pb, pb_grpc

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["AsyncOracleClient"]


class AsyncOracleClient(ClientBase):
    """asyncio Flow Oracle client; constructor arguments as :class:`floworacle.OracleClient`
    (``interceptors`` are ``grpc.aio`` client interceptors). Split parts of a large batch after
    the first are sent concurrently."""

    def _open(self, interceptors: list[Any]) -> None:
        cfg = self._config
        inter = interceptors or None
        if cfg.credentials is not None:
            self._channel = grpc.aio.secure_channel(
                cfg.target, cfg.credentials, options=list(cfg.options), interceptors=inter
            )
        else:
            self._channel = grpc.aio.insecure_channel(cfg.target, options=list(cfg.options), interceptors=inter)
        self._stub = pb_grpc.FlowOracleStub(self._channel)

    async def close(self) -> None:
        """Close the channels. Safe to call twice."""
        if not self._closed:
            self._closed = True
            await self._channel.close()

    async def __aenter__(self) -> AsyncOracleClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- transport ---------------------------------------------------------------------------

    async def _unary(self, method: str, request: Any, deadline: float | None, timeout: float | None) -> Any:
        self._check_open()
        policy = self._config.retry
        metadata = self._config.metadata or None
        attempt = 0
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise deadline_error(timeout)
            try:
                return await getattr(self._stub, method)(request, timeout=remaining, metadata=metadata)
            except grpc.RpcError as exc:
                error = translate_rpc_error(exc)
            except asyncio.CancelledError:
                # grpc.aio ends the pending calls of a closed channel with CancelledError; that is
                # this client's CANCELLED, unless the caller's task itself is being cancelled
                if self._closed and not _task_cancelling():
                    raise closed_error() from None
                raise
            if self._closed:  # close() ended this call: final
                raise closed_error() from None
            left = math.inf if deadline is None else deadline - time.monotonic()
            wait = policy.delay(error, attempt, left, self._rng)
            if wait is None:
                state = self._channel.get_state()
                if is_connection_error(error) and state != grpc.ChannelConnectivity.READY:
                    raise unreachable_error(self._config.display_target, timeout, state.name, error) from None
                raise error
            await asyncio.sleep(wait)
            attempt += 1

    async def _run(self, plan: Plan[Any], timeout: float | None) -> Any:
        used, deadline = self._config.deadline(timeout)
        # The requests hold copies of the caller's arrays (made while planning), so other tasks may
        # change those arrays while this call waits. Later chunks are pinned to the first answer's
        # fingerprint and sent concurrently.
        first = await self._unary(plan.method, plan.requests[0], deadline, used)
        rest = plan.requests[1:]
        for request in rest:
            plan.pin(request, first)
        others = await asyncio.gather(*(self._unary(plan.method, r, deadline, used) for r in rest))
        return plan.finish([first, *others])

    # -- oracle ------------------------------------------------------------------------------

    async def velocity(self, x_t: Any, t: Any, **options: Unpack[OracleOptions]) -> Any:
        """See :meth:`floworacle.OracleClient.velocity`."""
        plan = self._plan_oracle(x_t, t, oracle_options("velocity", options), outputs=("velocity",))
        return (await self._run(plan, options.get("timeout"))).velocity

    async def predict(
        self,
        x_t: Any,
        t: Any,
        *,
        outputs: Sequence[str] = ALL_OUTPUTS,
        top_k: int = 8,
        **options: Unpack[OracleOptions],
    ) -> Prediction:
        """See :meth:`floworacle.OracleClient.predict`."""
        top = top_k if "topk" in outputs else 0
        plan = self._plan_oracle(x_t, t, oracle_options("predict", options), outputs=outputs, top_k=top)
        return await self._run(plan, options.get("timeout"))  # type: ignore[no-any-return]

    async def nearest(self, x: Any, k: int = 1, **options: Unpack[NearestOptions]) -> Neighbors:
        """See :meth:`floworacle.OracleClient.nearest`."""
        plan = self._plan_nearest(x, k, nearest_options("nearest", options))
        return await self._run(plan, options.get("timeout"))  # type: ignore[no-any-return]

    async def datasets(self, *, timeout: float | None = None) -> list[DatasetInfo]:
        """Every data set the server holds."""
        used, deadline = self._config.deadline(timeout)
        resp = await self._unary("ListDatasets", pb.ListDatasetsRequest(), deadline, used)
        return [parse_dataset_info(d) for d in resp.datasets]

    async def describe(self, name: str | None = None, *, timeout: float | None = None) -> DatasetInfo:
        """One data set (the client's default when ``name`` is None)."""
        used, deadline = self._config.deadline(timeout)
        req = pb.DescribeDatasetRequest(name=self._config.dataset if name is None else name)
        return parse_dataset_info(await self._unary("DescribeDataset", req, deadline, used))

    # -- streaming ---------------------------------------------------------------------------

    async def predict_stream(
        self,
        items: Iterable[Any] | AsyncIterable[Any],
        *,
        outputs: Sequence[str] = ("velocity",),
        top_k: int = 0,
        max_in_flight: int = 4,
        return_errors: bool = False,
        **options: Unpack[OracleOptions],
    ) -> AsyncIterator[Prediction | OracleError]:
        """See :meth:`floworacle.OracleClient.predict_stream`; ``items`` may be an async iterable."""
        self._check_open()
        oracle_options("predict_stream", options)
        timeout = options.get("timeout")
        if max_in_flight < 1:
            raise RequestError(f"max_in_flight must be >= 1, got {max_in_flight}")
        top = top_k if "topk" in outputs else 0
        slots = asyncio.Semaphore(max_in_flight)
        plans: dict[int, Plan[Any]] = {}
        order: list[int] = []
        failed: list[BaseException] = []

        async def source() -> AsyncIterator[Any]:
            if isinstance(items, AsyncIterable):
                async for item in items:
                    yield item
            else:
                for item in items:
                    yield item

        async def requests() -> AsyncIterator[Any]:
            try:
                n = 0
                async for item in source():
                    fields = stream_item(item)
                    x_t, t = fields.pop("x_t"), fields.pop("t")
                    plan = self._plan_oracle(x_t, t, {**options, **fields}, outputs=outputs, top_k=top)
                    plans[n] = plan
                    order.append(n)
                    for j, req in enumerate(plan.requests):
                        await slots.acquire()
                        req.request_id = f"{n}.{j}"
                        yield req
                    n += 1
            except Exception as exc:  # reported to the caller after the answers already due
                failed.append(exc)

        call = self._stub.OracleStream(
            requests(), timeout=timeout, metadata=self._config.metadata or None, wait_for_ready=True
        )
        parts: dict[int, dict[int, Any]] = {}
        head = 0
        try:
            try:
                async for msg in call:
                    slots.release()
                    n_str, _, j_str = msg.request_id.partition(".")
                    n, j = int(n_str), int(j_str or 0)
                    parts.setdefault(n, {})[j] = (
                        msg.response if msg.error_code == 0 else error_from_code(msg.error_code, msg.error_message)
                    )
                    while head < len(order):
                        nxt = order[head]
                        plan = plans[nxt]
                        got = parts.get(nxt, {})
                        if len(got) < len(plan.requests):
                            break
                        head += 1
                        del parts[nxt], plans[nxt]
                        errors = [r for r in got.values() if isinstance(r, OracleError)]
                        result: Any
                        if errors:
                            result = errors[0]
                        else:
                            try:
                                result = plan.finish([got[i] for i in range(len(got))])
                            except OracleError as exc:
                                result = exc
                        if isinstance(result, OracleError) and not return_errors:
                            raise result
                        yield result
            except grpc.RpcError as exc:
                raise translate_rpc_error(exc) from None
            if failed:
                raise failed[0]
        finally:
            call.cancel()

    async def velocity_stream(self, items: Iterable[Any] | AsyncIterable[Any], **kwargs: Any) -> AsyncIterator[Any]:
        """Like :meth:`predict_stream` with the velocity only."""
        async for out in self.predict_stream(items, outputs=("velocity",), **kwargs):
            yield out if isinstance(out, OracleError) else out.velocity


def _task_cancelling() -> bool:
    """Whether the current task has a cancellation request (unknown before Python 3.11: True)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return True if cancelling is None else cancelling() > 0
