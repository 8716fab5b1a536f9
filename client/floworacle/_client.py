"""The synchronous client: blocking calls over grpc channels, with retries within a deadline,
round-robin over several addresses, and the pipelined bidirectional stream."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import grpc

from floworacle._base import ALL_OUTPUTS, ClientBase, closed_error, nearest_options, oracle_options, stream_item
from floworacle._errors import OracleError, error_from_code, translate_rpc_error
from floworacle._options import NearestOptions, OracleOptions
from floworacle._plans import Plan, deadline_error, is_connection_error, parse_dataset_info, unreachable_error
from floworacle._results import DatasetInfo, Neighbors, Prediction
from floworacle.protocol import RequestError, pb, pb_grpc

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["OracleClient"]


class OracleClient(ClientBase):
    """Blocking Flow Oracle client.

    Args:
        target: ``"host:port"``, ``"dns:///host:port"`` (every address the name resolves to is
            used, round robin) or a list of addresses (one channel each, calls rotate over them).
        dataset: default data set of calls that name none ("" or None: the server's default).
        fingerprint: pin for the default data set: calls fail with FAILED_PRECONDITION if the
            server holds different data under that name.
        wire_dtype: float dtype of x_t and of the answers on the wire ("float16" / "bfloat16"
            halve the bytes); None sends the array's own dtype. Answers are converted back.
        timeout: default per-call deadline in seconds (retries and split parts included); None: none.
        retry: :class:`~floworacle.RetryPolicy` for UNAVAILABLE / RESOURCE_EXHAUSTED with a hint.
        max_message_bytes: message limit; bigger batches are split by rows and rejoined.
        max_request_rows: most query rows per message (the server's ``max_request_rows``).
        root_certificates, private_key, certificate_chain, secure: TLS (``secure=True`` with no
            roots uses the system's), mTLS with key and chain.
        token: sent as ``authorization: Bearer <token>`` on every call.
        options: extra grpc channel options.
        interceptors: grpc client interceptors (e.g. tracing).
        seed: seed of the retry jitter.

    Use as a context manager or call :meth:`close`.
    """

    def _open(self, interceptors: list[Any]) -> None:
        cfg = self._config
        if cfg.credentials is not None:
            self._channel = grpc.secure_channel(cfg.target, cfg.credentials, options=list(cfg.options))
        else:
            self._channel = grpc.insecure_channel(cfg.target, options=list(cfg.options))
        wrapped = grpc.intercept_channel(self._channel, *interceptors) if interceptors else self._channel
        self._stub = pb_grpc.FlowOracleStub(wrapped)

    def _connected(self) -> bool:
        """Whether the channel is READY now: asked of a call's final error only, to tell "no server there"
        from a slow answer (a standing subscription would race the channel's close in gRPC's
        polling thread, which then raises on a closed channel)."""
        ready = grpc.channel_ready_future(self._channel)
        try:
            ready.result(timeout=0.05)
            return True
        except grpc.FutureTimeoutError:
            return False
        finally:
            ready.cancel()

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        """Close the channels; pending calls fail with CANCELLED. Safe to call twice."""
        if not self._closed:
            self._closed = True
            self._channel.close()

    def __enter__(self) -> OracleClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport ---------------------------------------------------------------------------

    def _unary(self, method: str, request: Any, deadline: float | None, timeout: float | None) -> Any:
        self._check_open()
        policy = self._config.retry
        metadata = self._config.metadata or None
        attempt = 0
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise deadline_error(timeout)
            try:
                return getattr(self._stub, method)(request, timeout=remaining, metadata=metadata)
            except grpc.RpcError as exc:
                error = translate_rpc_error(exc)
            if self._closed:  # close() ended this call: final
                raise closed_error() from None
            left = math.inf if deadline is None else deadline - time.monotonic()
            wait = policy.delay(error, attempt, left, self._rng)
            if wait is None:
                if is_connection_error(error) and not self._connected():
                    raise unreachable_error(self._config.display_target, timeout, "not ready", error) from None
                raise error
            time.sleep(wait)
            attempt += 1

    def _run(self, plan: Plan[Any], timeout: float | None) -> Any:
        used, deadline = self._config.deadline(timeout)
        responses: list[Any] = []
        for i, request in enumerate(plan.requests):
            if i:
                plan.pin(request, responses[0])
            responses.append(self._unary(plan.method, request, deadline, used))
        return plan.finish(responses)

    # -- oracle ------------------------------------------------------------------------------

    def velocity(self, x_t: Any, t: Any, **options: Unpack[OracleOptions]) -> Any:
        """Oracle velocity ``u = d_alpha_t x1_hat + d_sigma_t eps_hat`` of each query.

        Args:
            x_t: (B, D) or (B, *sample_shape) numpy array or torch tensor (any device, float32,
                float16, bfloat16 or float64).
            t: (B,) or scalar times (t = 0 noise, t = 1 data); with ``convention="reversed"`` this
                is s (s = 1 noise) and the answer is the reversed target ``noise - data``.
            options: :class:`~floworacle.OracleOptions`: dataset, fingerprint, path, sigma_min,
                coefficients, labels (class-conditional; with ``guidance`` the guided
                ``u + w (u(x | y) - u)`` inside ``guidance_interval``), exclude, precision
                ("exact", "fast" or "knn" with knn_k / knn_tail), kind and patch_size (the
                oracles that generalise), convention, wire_dtype, timeout.

        Returns:
            (B, *sample_shape) in the caller's array type, dtype and device.
        """
        plan = self._plan_oracle(x_t, t, oracle_options("velocity", options), outputs=("velocity",))
        return self._run(plan, options.get("timeout")).velocity

    def predict(
        self,
        x_t: Any,
        t: Any,
        *,
        outputs: Sequence[str] = ALL_OUTPUTS,
        top_k: int = 8,
        **options: Unpack[OracleOptions],
    ) -> Prediction:
        """Several oracle outputs at once (see :class:`~floworacle.Prediction`); arguments as in
        :meth:`velocity`, plus ``outputs`` (names from velocity, x1_hat, eps_hat, score, topk,
        entropy, ess, variance) and ``top_k`` (used by "topk")."""
        top = top_k if "topk" in outputs else 0
        plan = self._plan_oracle(x_t, t, oracle_options("predict", options), outputs=outputs, top_k=top)
        return self._run(plan, options.get("timeout"))  # type: ignore[no-any-return]

    def nearest(self, x: Any, k: int = 1, **options: Unpack[NearestOptions]) -> Neighbors:
        """The ``k`` nearest training samples (exact L2) of each row of ``x`` (B, *sample_shape).

        ``options``: :class:`~floworacle.NearestOptions` (dataset, t, path, sigma_min, coefficients,
        convention, exclude, exact, nprobe, space, fingerprint, timeout). With ``t`` (or
        coefficients) the rows are x_t and the search is for ``x_t / alpha_t``: the first neighbour
        is then the sample of largest posterior weight.
        """
        plan = self._plan_nearest(x, k, nearest_options("nearest", options))
        return self._run(plan, options.get("timeout"))  # type: ignore[no-any-return]

    # -- data sets ---------------------------------------------------------------------------

    def datasets(self, *, timeout: float | None = None) -> list[DatasetInfo]:
        """Every data set the server holds."""
        used, deadline = self._config.deadline(timeout)
        resp = self._unary("ListDatasets", pb.ListDatasetsRequest(), deadline, used)
        return [parse_dataset_info(d) for d in resp.datasets]

    def describe(self, name: str | None = None, *, timeout: float | None = None) -> DatasetInfo:
        """One data set (the client's default when ``name`` is None)."""
        used, deadline = self._config.deadline(timeout)
        req = pb.DescribeDatasetRequest(name=self._config.dataset if name is None else name)
        return parse_dataset_info(self._unary("DescribeDataset", req, deadline, used))

    # -- streaming ---------------------------------------------------------------------------

    def predict_stream(
        self,
        items: Iterable[Any],
        *,
        outputs: Sequence[str] = ("velocity",),
        top_k: int = 0,
        max_in_flight: int = 4,
        return_errors: bool = False,
        **options: Unpack[OracleOptions],
    ) -> Iterator[Prediction | OracleError]:
        """Pipelined oracle over one bidirectional stream.

        ``items`` yields ``(x_t, t)``, ``(x_t, t, labels)`` or mappings (x_t, t, labels, exclude,
        coefficients); ``options`` are :meth:`predict`'s (:class:`~floworacle.OracleOptions`), shared
        by every item (an item's own labels, exclude or coefficients take precedence), and
        ``timeout`` bounds the whole stream (None: no deadline). Up to ``max_in_flight`` messages
        are outstanding while answers come back; answers are matched to items by request id and
        yielded in item order. An item the server rejects raises its :class:`OracleError` (or
        yields it with ``return_errors=True``; the stream goes on). Not retried.
        """
        self._check_open()
        oracle_options("predict_stream", options)
        if max_in_flight < 1:
            raise RequestError(f"max_in_flight must be >= 1, got {max_in_flight}")
        top = top_k if "topk" in outputs else 0

        def plan_of(item: Any) -> Plan[Prediction]:
            fields = stream_item(item)
            x_t, t = fields.pop("x_t"), fields.pop("t")
            return self._plan_oracle(x_t, t, {**options, **fields}, outputs=outputs, top_k=top)

        yield from self._stream(items, plan_of, max_in_flight, return_errors, options.get("timeout"))

    def velocity_stream(self, items: Iterable[Any], **kwargs: Any) -> Iterator[Any]:
        """Like :meth:`predict_stream` with the velocity only: yields arrays (or OracleError
        with ``return_errors=True``) in item order."""
        for out in self.predict_stream(items, outputs=("velocity",), **kwargs):
            yield out if isinstance(out, OracleError) else out.velocity

    def _stream(
        self,
        items: Iterable[Any],
        plan_of: Any,
        max_in_flight: int,
        return_errors: bool,
        timeout: float | None,
    ) -> Iterator[Any]:
        slots = threading.Semaphore(max_in_flight)
        stop = threading.Event()
        lock = threading.Lock()
        plans: dict[int, Plan[Any]] = {}
        order: list[int] = []  # items in the order sent
        failed: list[BaseException] = []  # an input the SDK itself rejected (ends the stream)

        def requests() -> Iterator[Any]:
            try:
                for n, item in enumerate(items):
                    plan = plan_of(item)
                    with lock:
                        plans[n] = plan
                        order.append(n)
                    for j, req in enumerate(plan.requests):
                        while not slots.acquire(timeout=0.05):
                            if stop.is_set():
                                return
                        req.request_id = f"{n}.{j}"
                        yield req
            except Exception as exc:  # reported to the caller after the answers already due
                failed.append(exc)

        call = self._stub.OracleStream(
            requests(), timeout=timeout, metadata=self._config.metadata or None, wait_for_ready=True
        )
        parts: dict[int, dict[int, Any]] = {}
        head = 0
        try:
            try:
                for msg in call:
                    slots.release()
                    n_str, _, j_str = msg.request_id.partition(".")
                    n, j = int(n_str), int(j_str or 0)
                    parts.setdefault(n, {})[j] = (
                        msg.response if msg.error_code == 0 else error_from_code(msg.error_code, msg.error_message)
                    )
                    while True:
                        with lock:
                            if head >= len(order):
                                break
                            nxt = order[head]
                            plan = plans[nxt]
                        got = parts.get(nxt, {})
                        if len(got) < len(plan.requests):
                            break
                        head += 1
                        del parts[nxt], plans[nxt]
                        errors = [r for r in got.values() if isinstance(r, OracleError)]
                        if errors:
                            result: Any = errors[0]
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
            stop.set()
            call.cancel()
