"""Request building and response parsing shared by the sync and asyncio clients (no I/O here).

A call is turned into a *plan*: the request messages (one per row chunk when a batch is over the
message limit) and a ``finish`` function that joins the chunk responses and converts them to the
caller's array type. The clients only differ in how they send the requests. The cheap request
rules of :mod:`floworacle.protocol` are applied here, before any I/O, with the server's messages.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc
import numpy as np

from floworacle import paths
from floworacle._results import DatasetInfo, NearestIndexInfo, Neighbors, Prediction
from floworacle.protocol import (
    BOUND_FIELDS,
    FLOAT_DTYPES,
    KNN_FIELDS,
    MESSAGE_OVERHEAD,
    OUTPUTS,
    CodecError,
    NearestQuery,
    OracleError,
    OracleQuery,
    RequestError,
    dtype_by_enum,
    is_torch,
    output_by_name,
    pb,
    rules,
    to_like,
)

__all__ = [
    "RetryPolicy",
    "Plan",
    "build_oracle",
    "build_nearest",
    "parse_dataset_info",
    "deadline_error",
    "is_connection_error",
    "unreachable_error",
]

R = TypeVar("R")


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of transient failures, always within the call's deadline.

    UNAVAILABLE (no connection: a server that is down or restarting; a draining server; a
    connection lost mid-call) is retried until the call's deadline, so a restart is ridden out and
    a server that stays unreachable ends in its own UNAVAILABLE message (connection refused, TLS
    handshake failed, ...) at the deadline. CANCELLED is retried like UNAVAILABLE: the SDK never
    cancels a unary call itself (closing the client ends its calls without a retry), so a
    CANCELLED comes from the other side, as when a draining server shuts down with a call that no
    handler had taken yet (gRPC core answers those CANCELLED, grpc/grpc#41785); oracle and nearest
    calls are pure reads, safe to send again. Streams, which are not retried, wait for the connection
    instead (gRPC's wait-for-ready) until their deadline. RESOURCE_EXHAUSTED is
    retried only when the server sent a retry hint (a full queue), never for a message over the
    size limit. The n-th retry waits a uniformly random time in ``[0, min(max_backoff,
    initial_backoff * multiplier**n)]`` ("full jitter"), and at least the server's hint.
    ``max_attempts=None`` (the default) retries until the deadline; a number caps the attempts.
    """

    max_attempts: int | None = None
    initial_backoff: float = 0.05
    max_backoff: float = 1.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1 or None (until the deadline), got {self.max_attempts}")
        if self.initial_backoff < 0 or self.max_backoff < 0 or self.multiplier < 1:
            raise ValueError("backoffs must be >= 0 and multiplier >= 1")

    def delay(self, error: OracleError, attempt: int, remaining: float, rng: random.Random) -> float | None:
        """Seconds to wait before attempt ``attempt + 1`` (0-based ``attempt`` just failed), or None
        when the error is final: not retryable, attempts used up, or the wait would pass the deadline."""
        if self.max_attempts is not None and attempt + 1 >= self.max_attempts:
            return None
        if error.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
            pass
        elif error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and error.retry_after is not None:
            pass
        else:
            return None
        cap = min(self.max_backoff, self.initial_backoff * self.multiplier ** min(attempt, 64))
        wait = rng.uniform(0.0, cap)
        if error.retry_after is not None:
            wait = max(wait, error.retry_after)
        return wait if wait < remaining else None


@dataclass
class Plan(Generic[R]):
    """Requests of one call (one per row chunk) and how to turn their responses into the result.

    Chunks after the first are sent pinned to the first answer's fingerprint (:meth:`pin`), so a
    split batch is never answered by two different data sets.
    """

    method: str
    requests: list[Any]
    finish: Callable[[list[Any]], R]

    def pin(self, request: Any, first: Any) -> None:
        """Pin ``request`` (a later chunk) to the fingerprint of the first chunk's answer."""
        if hasattr(request, "fingerprint") and not request.fingerprint:
            request.fingerprint = first.fingerprint


def _rows_per_message(batch: int, request_row: int, response_row: int, fixed: int, limit: int, max_rows: int) -> int:
    if batch == 0:
        return 1
    per_row = max(request_row, response_row, 1)
    rows = (limit - fixed - MESSAGE_OVERHEAD) // per_row
    if rows < 1:
        raise RequestError(
            f"one query row needs {per_row} bytes, more than the message limit of {limit} bytes allows; "
            "raise max_message_bytes on the client and the server, or use a 2-byte wire_dtype"
        )
    return max(1, min(batch, rows, max_rows))


def _chunks(batch: int, rows: int) -> list[tuple[int, int]]:
    return [(start, min(batch, start + rows)) for start in range(0, max(batch, 1), rows)]


def _join_rows(parts: list[pb.Tensor], field_name: str) -> pb.Tensor:
    """Concatenate wire tensors along rows without decoding them."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    for p in parts[1:]:
        if p.dtype != first.dtype or list(p.shape[1:]) != list(first.shape[1:]):
            raise CodecError(f"{field_name}: the parts of a split batch disagree in dtype or shape")
    return pb.Tensor(
        dtype=first.dtype,
        shape=[sum(int(p.shape[0]) for p in parts), *first.shape[1:]],
        data=b"".join(p.data for p in parts),
    )


def _check_same_fingerprint(responses: list[Any]) -> None:
    prints = {r.fingerprint for r in responses}
    if len(prints) > 1:
        raise OracleError(
            grpc.StatusCode.ABORTED,
            f"the parts of a split batch were answered by different data sets ({sorted(prints)}); retry the call",
        )


def _field(responses: list[Any], name: str, rows: int) -> pb.Tensor | None:
    present = [r.HasField(name) for r in responses]
    if not any(present):
        return None
    if not all(present):
        raise OracleError(grpc.StatusCode.INTERNAL, f"server answered {name} for only some parts of a split batch")
    joined = _join_rows([getattr(r, name) for r in responses], name)
    if not joined.shape or int(joined.shape[0]) != rows:
        raise OracleError(
            grpc.StatusCode.INTERNAL, f"server answered {name} with shape {list(joined.shape)} for {rows} rows"
        )
    return joined


# ----------------------------------------------------------------------------------------------
# oracle


def _like(x: Any) -> Any:
    """What the answers are converted to: the caller's array, or float64 for a float dtype the wire lacks."""
    if is_torch(x):
        return x
    a = np.asarray(x)
    return a if a.dtype.kind != "f" or a.dtype.name in FLOAT_DTYPES else a.astype(np.float64)


def _chunked(query: Any, request_row: int, response_row: int, limit: int, max_rows: int) -> list[Any]:
    """The query's messages: rows cut so that each request and its answer fit the message limit."""
    fixed = len(query.dataset) + len(query.fingerprint)
    rows = _rows_per_message(query.rows, request_row, response_row, fixed, limit, max_rows)
    return [query.to_request(start, stop) for start, stop in _chunks(query.rows, rows)]


def build_oracle(
    x_t: Any,
    t: Any,
    *,
    outputs: Sequence[str] = ("velocity",),
    top_k: Any = 0,
    max_message_bytes: int,
    max_request_rows: int,
    **options: Any,
) -> Plan[Prediction]:
    """Plan an Oracle call for ``x_t`` (B, *sample_shape) at times ``t`` (B,) or a scalar.

    ``options`` are :class:`~floworacle.protocol.OracleQuery.build`'s (the SDK's option list, with
    data set and fingerprint resolved). In the reversed convention ``t`` holds s (noise at s = 1),
    sent as ``1 - s``; the velocity comes back negated (target noise - data) and
    ``guidance_interval`` is read in s as well. Raises :class:`~floworacle.protocol.RequestError`
    for arguments that break a request rule.
    """
    q = OracleQuery.build(x_t, t, outputs=outputs, top_k=top_k, **options)
    negate = options.get("convention") == "reversed"
    x = q.x_t
    dim = math.prod(x.shape[1:])
    n_sample = sum(output_by_name(o).kind == "sample" for o in q.outputs)  # type: ignore[union-attr]
    request_row = dim * x.dtype.itemsize + 8 * 7 + 32
    response_row = n_sample * dim * x.dtype.itemsize + q.top_k * 16 + 8 * 6 + 32
    requests = _chunked(q, request_row, response_row, max_message_bytes, max_request_rows)
    fields = [f for o in OUTPUTS for f in o.fields if o.kind != "sample"] + [*BOUND_FIELDS, *KNN_FIELDS]
    like = _like(x_t)

    def finish(responses: list[Any]) -> Prediction:
        _check_same_fingerprint(responses)
        values: dict[str, Any] = {}
        for o in OUTPUTS:
            if o.kind != "sample":
                continue
            joined = _field(responses, o.name, q.rows)
            if joined is not None:
                values[o.name] = to_like(joined, like, o.name)
            elif o.name in q.outputs:
                raise OracleError(grpc.StatusCode.INTERNAL, f"server did not answer the requested output {o.name}")
        if negate and "velocity" in values:
            values["velocity"] = paths.velocity_to_reversed(values["velocity"])
        for name in fields:
            joined = _field(responses, name, q.rows)
            if joined is not None:
                values[name] = to_like(joined, like, name, keep_wire_dtype=True)
        first = responses[0]
        return Prediction(
            dataset=first.dataset,
            fingerprint=first.fingerprint,
            precision=rules.precision_from_enum(first.precision),
            **values,
        )

    return Plan("Oracle", requests, finish)


# ----------------------------------------------------------------------------------------------
# nearest


def build_nearest(
    x: Any,
    k: Any,
    *,
    max_message_bytes: int,
    max_request_rows: int,
    **options: Any,
) -> Plan[Neighbors]:
    """Plan a Nearest call: the ``k`` nearest training samples of ``x`` (B, *sample_shape); with
    ``t`` (or coefficients) the points are x_t and the search is for ``x_t / alpha_t``. ``options``
    are :class:`~floworacle.protocol.NearestQuery.build`'s."""
    q = NearestQuery.build(x, k, **options)
    points = q.x
    dim = math.prod(points.shape[1:])
    requests = _chunked(q, dim * points.dtype.itemsize + 8 * 6 + 32, q.k * 32, max_message_bytes, max_request_rows)
    batch = q.rows
    like = _like(x)

    def finish(responses: list[Any]) -> Neighbors:
        _check_same_fingerprint(responses)
        idx = _field(responses, "indices", batch)
        dist = _field(responses, "distances", batch)
        if idx is None or dist is None:
            raise OracleError(grpc.StatusCode.INTERNAL, "server answered Nearest without indices or distances")
        lab = _field(responses, "labels", batch)
        sim = _field(responses, "similarities", batch)
        return Neighbors(
            indices=to_like(idx, like, "indices", keep_wire_dtype=True),
            distances=to_like(dist, like, "distances", keep_wire_dtype=True),
            labels=to_like(lab, like, "labels", keep_wire_dtype=True) if lab is not None else None,
            similarities=to_like(sim, like, "similarities", keep_wire_dtype=True) if sim is not None else None,
            approximate=any(bool(r.approximate) for r in responses),
            dataset=responses[0].dataset,
            fingerprint=responses[0].fingerprint,
        )

    return Plan("Nearest", requests, finish)


# ----------------------------------------------------------------------------------------------
# data sets


def _dtype_name(value: int) -> str:
    try:
        return dtype_by_enum(value).name
    except CodecError:
        return "unspecified"


def parse_dataset_info(info: Any) -> DatasetInfo:
    """``floworacle.v1.DatasetInfo`` -> :class:`DatasetInfo`."""
    return DatasetInfo(
        name=info.name,
        num_samples=int(info.num_samples),
        sample_shape=tuple(int(s) for s in info.sample_shape),
        fingerprint=info.fingerprint,
        dim=int(info.dim),
        storage_dtype=_dtype_name(info.storage_dtype),
        num_classes=int(info.num_classes),
        has_weights=bool(info.has_weights),
        scale_factor=float(info.scale_factor),
        device=info.device,
        resident_bytes=int(info.resident_bytes),
        is_default=bool(info.is_default),
        nearest_backend=info.nearest_backend,
        nearest_backend_reason=info.nearest_backend_reason,
        exact_nearest_max_samples=int(info.exact_nearest_max_samples),
        nearest_indexes=tuple(
            NearestIndexInfo(
                space=rules.space_from_enum(ix.space),
                kind=ix.kind,
                params=ix.params,
                recall=float(ix.recall),
                recall_k=int(ix.recall_k),
                default_nprobe=int(ix.default_nprobe),
                device=ix.device,
                bytes=int(ix.bytes),
            )
            for ix in info.nearest_indexes
        ),
        feature_dim=int(info.feature_dim),
        feature_metric=info.feature_metric,
    )


def deadline_error(timeout: float | None) -> OracleError:
    return OracleError(
        grpc.StatusCode.DEADLINE_EXCEEDED, f"the call's deadline ({timeout} s) passed before an answer came"
    )


def is_connection_error(error: OracleError) -> bool:
    """Whether a call's final error may mean that no server was reached (then the channel's state
    decides): UNAVAILABLE or DEADLINE_EXCEEDED."""
    return error.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def unreachable_error(target: str, timeout: float | None, state: str, last: OracleError) -> OracleError:
    """The final error of a call that never reached a server (the channel is not connected)."""
    return OracleError(
        last.code,
        f"no server answered at {target} within the call's deadline ({timeout} s): the connection is "
        f"{state} (nothing listens there, it does not speak gRPC, or the server is restarting; gRPC "
        f"says: {last.details}); check the address and that the server runs, or give the call a "
        "longer timeout",
    )
