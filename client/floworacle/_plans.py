"""Request building and response parsing shared by the sync and asyncio clients (no I/O here).

A call is turned into a *plan*: the request messages (one per row chunk when a batch is over the
message limit) and a ``finish`` function that joins the chunk responses and converts them to the
caller's array type. The clients only differ in how they send the requests. The cheap request
rules of :mod:`floworacle.protocol` are applied here, before any I/O, with the server's messages.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc
import numpy as np

from floworacle import paths
from floworacle._results import DatasetInfo, NearestIndexInfo, Neighbors, Prediction
from floworacle.protocol import (
    BOUND_FIELDS,
    FLOAT_DTYPES,
    MESSAGE_OVERHEAD,
    OUTPUTS,
    CodecError,
    OracleError,
    OutputSpec,
    RequestError,
    WireDType,
    dtype_by_enum,
    dtype_by_name,
    encode,
    encode_array,
    fill_rows,
    is_torch,
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

_COEFFICIENTS = ("alpha", "sigma", "d_alpha", "d_sigma")


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


# ----------------------------------------------------------------------------------------------
# input checks


def _batch_array(x: Any, name: str) -> Any:
    """numpy array or torch tensor of shape (B, ...) with a float dtype the wire carries."""
    if is_torch(x):
        if not x.is_floating_point():
            raise RequestError(f"{name} must be a floating tensor, got {x.dtype}; convert it with .float()")
        arr = x
    else:
        arr = np.asarray(x)
        if arr.dtype.kind != "f":
            raise RequestError(
                f"{name} must be a floating array, got dtype {arr.dtype}; convert it with .astype(np.float32)"
            )
        if arr.dtype.name not in FLOAT_DTYPES:
            arr = arr.astype(np.float64)
    rules.check_batch_shape(tuple(arr.shape), name)
    return arr


def _float_vector(v: Any, batch: int, name: str) -> np.ndarray:
    """Scalar or (B,) array / tensor -> numpy (B,) float64."""
    if is_torch(v):
        v = v.detach().cpu().double().numpy()
    a = np.asarray(v)
    if a.dtype.kind not in "iuf" or a.dtype.kind == "b":
        raise RequestError(f"{name} must be numbers, got dtype {a.dtype}")
    a = a.astype(np.float64)
    if a.ndim == 0:
        a = np.full((batch,), a, dtype=np.float64)
    if a.shape != (batch,):
        raise RequestError(f"{name} must be a scalar or have shape ({batch},), one per query, got {tuple(a.shape)}")
    return a


def _wire_name(arr: Any, wire_dtype: str | None) -> str:
    if wire_dtype is not None:
        if wire_dtype not in FLOAT_DTYPES:
            raise RequestError(f"wire_dtype must be one of {list(FLOAT_DTYPES)} or None, got {wire_dtype!r}")
        return wire_dtype
    name = str(arr.dtype).removeprefix("torch.") if is_torch(arr) else arr.dtype.name
    return name if name in FLOAT_DTYPES else "float32"


def _coefficients(coefficients: Any, batch: int) -> paths.PathCoefficients:
    if isinstance(coefficients, paths.PathCoefficients):
        values = [getattr(coefficients, k) for k in _COEFFICIENTS]
    elif isinstance(coefficients, Mapping):
        missing = [k for k in _COEFFICIENTS if k not in coefficients]
        if missing:
            raise RequestError(f"custom path coefficients need all of {list(_COEFFICIENTS)}; missing {missing}")
        values = [coefficients[k] for k in _COEFFICIENTS]
    elif isinstance(coefficients, Sequence) and len(coefficients) == 4:
        values = list(coefficients)
    else:
        raise RequestError(
            "coefficients must be a PathCoefficients, a mapping with alpha, sigma, d_alpha, d_sigma, or a 4-tuple"
        )
    vectors = []
    for name, v in zip(_COEFFICIENTS, values, strict=True):
        try:
            a = np.asarray(v.detach().cpu().double().numpy() if is_torch(v) else v, dtype=np.float64)
        except (TypeError, ValueError):
            raise RequestError(f"path.custom.{name} must be numbers (a scalar or shape ({batch},))") from None
        vectors.append(np.full(batch, float(a.reshape(-1)[0])) if a.size == 1 else a)  # a scalar applies to all
    return rules.custom_coefficients(vectors, batch)


def _path_spec(batch: int, t: np.ndarray | None, path: str, sigma_min: float, coefficients: Any) -> pb.PathSpec:
    """The request's PathSpec; named paths are validated here so a bad t fails before any I/O."""
    if coefficients is not None:
        c = _coefficients(coefficients, batch)
        return pb.PathSpec(custom=pb.CustomCoefficients(**{k: encode(getattr(c, k)) for k in _COEFFICIENTS}))
    if t is None:
        raise RequestError("t is required with a named path; pass t (shape (B,) or a scalar) or custom coefficients")
    rules.named_coefficients(path, sigma_min, t)
    return pb.PathSpec(named=pb.NamedPath(name=path, sigma_min=float(sigma_min)))


def _times(t: Any, batch: int, convention: str, path: str, coefficients: Any) -> np.ndarray | None:
    rules.check_convention(convention)
    if t is None:
        if convention == "reversed":
            raise RequestError("the reversed convention needs s (pass it as t)")
        return None
    tv = rules.check_times(_float_vector(t, batch, "t"), batch)
    if convention == "reversed":
        if coefficients is not None or path != "linear":
            raise RequestError(
                "convention='reversed' is the linear path with t = 1 - s (SD3 / Flux); "
                "use path='linear' without custom coefficients"
            )
        tv = paths.reversed_to_t(tv)
    return tv


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


def _vector_encoding(v: np.ndarray | None, dtype: str) -> tuple[WireDType, tuple[int, ...], np.ndarray] | None:
    return encode_array(v, dtype) if v is not None else None


def _coefficient_encodings(custom: pb.CustomCoefficients | None) -> dict[str, Any]:
    """The custom coefficients (already encoded whole) as row-sliceable encodings."""
    if custom is None:
        return {}
    return {k: encode_array(np.frombuffer(getattr(custom, k).data, "<f8"), "float64") for k in _COEFFICIENTS}


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


@dataclass(frozen=True)
class _OracleArgs:
    """The checked arguments of an oracle call (what the request messages are made of)."""

    arr: Any
    batch: int
    outputs: tuple[OutputSpec, ...]
    top_k: int
    precision: int
    spec: pb.PathSpec
    t: np.ndarray | None
    labels: np.ndarray | None
    exclude: np.ndarray | None
    guidance: pb.Guidance | None
    wire: WireDType
    negate: bool


def _oracle_args(
    x_t: Any,
    t: Any,
    *,
    path: str,
    sigma_min: float,
    coefficients: Any,
    labels: Any,
    exclude: Any,
    guidance: float | None,
    guidance_interval: tuple[float, float] | None,
    precision: str,
    convention: str,
    outputs: Sequence[str],
    top_k: Any,
    wire_dtype: str | None,
) -> _OracleArgs:
    arr = _batch_array(x_t, "x_t")
    batch = int(arr.shape[0])
    outs = rules.outputs_from_names(outputs)
    k = rules.integer(top_k, "top_k")
    rules.check_top_k(k, any(o.name == "topk" for o in outs))
    prec = rules.precision_from_name(precision)
    tv = _times(t, batch, convention, path, coefficients)
    spec = _path_spec(batch, tv, path, sigma_min, coefficients)
    lab = None
    if labels is not None:
        lab = rules.int_vector(labels, batch, "labels")
        rules.check_labels(lab, batch)
    exc = None
    if exclude is not None:
        exc = rules.int_vector(exclude, batch, "exclude")
        rules.check_exclude(exc, batch)
    guide = None
    if guidance is not None:
        if lab is None:
            raise RequestError(rules.GUIDANCE_NEEDS_LABELS)
        if guidance_interval is None:
            lo, hi = 0.0, 1.0
        elif isinstance(guidance_interval, Sequence) and len(guidance_interval) == 2:
            lo, hi = (float(v) for v in guidance_interval)
        else:
            raise RequestError(f"guidance_interval must be (lo, hi), got {guidance_interval!r}")
        if convention == "reversed":
            lo, hi = 1.0 - hi, 1.0 - lo
        scale, lo, hi = rules.check_guidance(float(guidance), lo, hi)
        if tv is None:
            raise RequestError(rules.GUIDANCE_NEEDS_T)
        guide = pb.Guidance(scale=scale, t_lo=lo, t_hi=hi)
    elif guidance_interval is not None:
        raise RequestError("guidance_interval needs guidance (the CFG scale)")
    return _OracleArgs(
        arr=arr,
        batch=batch,
        outputs=outs,
        top_k=k,
        precision=prec,
        spec=spec,
        t=tv,
        labels=lab,
        exclude=exc,
        guidance=guide,
        wire=dtype_by_name(_wire_name(arr, wire_dtype)),
        negate=convention == "reversed",
    )


def build_oracle(
    x_t: Any,
    t: Any,
    *,
    dataset: str,
    fingerprint: str,
    path: str = "linear",
    sigma_min: float = 0.0,
    coefficients: Any = None,
    labels: Any = None,
    exclude: Any = None,
    guidance: float | None = None,
    guidance_interval: tuple[float, float] | None = None,
    precision: str = "exact",
    convention: str = "standard",
    outputs: Sequence[str] = ("velocity",),
    top_k: Any = 0,
    wire_dtype: str | None = None,
    max_message_bytes: int,
    max_request_rows: int,
) -> Plan[Prediction]:
    """Plan an Oracle call for ``x_t`` (B, *sample_shape) at times ``t`` (B,) or a scalar.

    In the reversed convention ``t`` holds s (noise at s = 1), sent as ``1 - s``; the velocity
    comes back negated (target noise - data) and ``guidance_interval`` is read in s as well.
    Raises :class:`~floworacle.protocol.RequestError` for arguments that break a request rule.
    """
    a = _oracle_args(
        x_t, t, path=path, sigma_min=sigma_min, coefficients=coefficients, labels=labels, exclude=exclude,
        guidance=guidance, guidance_interval=guidance_interval, precision=precision, convention=convention,
        outputs=outputs, top_k=top_k, wire_dtype=wire_dtype,
    )  # fmt: skip
    x_enc = encode_array(a.arr, a.wire.name)
    dim = math.prod(int(s) for s in a.arr.shape[1:])
    n_sample = sum(o.kind == "sample" for o in a.outputs)
    request_row = dim * a.wire.itemsize + 8 * 7 + 32
    response_row = n_sample * dim * a.wire.itemsize + a.top_k * 16 + 8 * 6 + 32
    rows = _rows_per_message(
        a.batch, request_row, response_row, len(dataset) + len(fingerprint), max_message_bytes, max_request_rows
    )
    vectors = {
        "t": _vector_encoding(a.t, "float64"),
        "labels": _vector_encoding(a.labels, "int64"),
        "exclude": _vector_encoding(a.exclude, "int64"),
    }
    custom = a.spec.custom if a.spec.HasField("custom") else None
    coef_enc = _coefficient_encodings(custom)
    requests = []
    for start, stop in _chunks(a.batch, rows):
        req = pb.OracleRequest(
            dataset=dataset,
            fingerprint=fingerprint,
            outputs=[o.enum for o in a.outputs],  # type: ignore[misc]
            top_k=a.top_k,
            precision=a.precision,  # type: ignore[arg-type]
            output_dtype=a.wire.enum,  # type: ignore[arg-type]
        )
        fill_rows(req.x_t, x_enc, start, stop)
        for name, enc in vectors.items():
            if enc is not None:
                fill_rows(getattr(req, name), enc, start, stop)
        if custom is not None:
            for k in _COEFFICIENTS:
                fill_rows(getattr(req.path.custom, k), coef_enc[k], start, stop)
        else:
            req.path.CopyFrom(a.spec)
        if a.guidance is not None:
            req.guidance.CopyFrom(a.guidance)
        requests.append(req)
    fields = [f for o in OUTPUTS for f in o.fields if o.kind != "sample"] + list(BOUND_FIELDS)

    def finish(responses: list[Any]) -> Prediction:
        _check_same_fingerprint(responses)
        values: dict[str, Any] = {}
        for o in OUTPUTS:
            if o.kind != "sample":
                continue
            joined = _field(responses, o.name, a.batch)
            if joined is not None:
                values[o.name] = to_like(joined, a.arr, o.name)
            elif o in a.outputs:
                raise OracleError(grpc.StatusCode.INTERNAL, f"server did not answer the requested output {o.name}")
        if a.negate and "velocity" in values:
            values["velocity"] = paths.velocity_to_reversed(values["velocity"])
        for name in fields:
            joined = _field(responses, name, a.batch)
            if joined is not None:
                values[name] = to_like(joined, a.arr, name, keep_wire_dtype=True)
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
    dataset: str,
    fingerprint: str,
    t: Any = None,
    path: str = "linear",
    sigma_min: float = 0.0,
    coefficients: Any = None,
    convention: str = "standard",
    exclude: Any = None,
    exact: bool | None = None,
    nprobe: Any = 0,
    space: str = "data",
    max_message_bytes: int,
    max_request_rows: int,
) -> Plan[Neighbors]:
    """Plan a Nearest call: the ``k`` nearest training samples of ``x`` (B, *sample_shape); with
    ``t`` (or coefficients) the points are x_t and the search is for ``x_t / alpha_t``."""
    arr = _batch_array(x, "x")
    batch = int(arr.shape[0])
    kk = rules.integer(k, "k")
    rules.check_k(kk)
    probes = rules.integer(nprobe, "nprobe")
    if exact is not None and not isinstance(exact, bool | np.bool_):
        raise RequestError(f"exact must be True, False or None (the server's choice), got {exact!r}")
    rules.check_nearest_mode(exact, probes)
    space_enum = rules.space_from_name(space)
    tv = _times(t, batch, convention, path, coefficients)
    spec = (
        _path_spec(batch, tv, path, sigma_min, coefficients) if (tv is not None or coefficients is not None) else None
    )
    exc = None
    if exclude is not None:
        exc = rules.int_vector(exclude, batch, "exclude")
        rules.check_exclude(exc, batch)
    wire = _wire_name(arr, None)
    x_enc = encode_array(arr, wire)
    dim = math.prod(int(s) for s in arr.shape[1:])
    request_row = dim * dtype_by_name(wire).itemsize + 8 * 6 + 32
    response_row = kk * 32
    rows = _rows_per_message(
        batch, request_row, response_row, len(dataset) + len(fingerprint), max_message_bytes, max_request_rows
    )
    vectors = {"t": _vector_encoding(tv, "float64"), "exclude": _vector_encoding(exc, "int64")}
    custom = spec.custom if spec is not None and spec.HasField("custom") else None
    coef_enc = _coefficient_encodings(custom)
    requests = []
    for start, stop in _chunks(batch, rows):
        req = pb.NearestRequest(dataset=dataset, fingerprint=fingerprint, k=kk, nprobe=probes, space=space_enum)  # type: ignore[arg-type]
        if exact is not None:
            req.exact = bool(exact)
        fill_rows(req.x, x_enc, start, stop)
        for name, enc in vectors.items():
            if enc is not None:
                fill_rows(getattr(req, name), enc, start, stop)
        if custom is not None:
            for n in _COEFFICIENTS:
                fill_rows(getattr(req.path.custom, n), coef_enc[n], start, stop)
        elif spec is not None:
            req.path.CopyFrom(spec)
        requests.append(req)

    def finish(responses: list[Any]) -> Neighbors:
        _check_same_fingerprint(responses)
        idx = _field(responses, "indices", batch)
        dist = _field(responses, "distances", batch)
        if idx is None or dist is None:
            raise OracleError(grpc.StatusCode.INTERNAL, "server answered Nearest without indices or distances")
        lab = _field(responses, "labels", batch)
        sim = _field(responses, "similarities", batch)
        return Neighbors(
            indices=to_like(idx, arr, "indices", keep_wire_dtype=True),
            distances=to_like(dist, arr, "distances", keep_wire_dtype=True),
            labels=to_like(lab, arr, "labels", keep_wire_dtype=True) if lab is not None else None,
            similarities=to_like(sim, arr, "similarities", keep_wire_dtype=True) if sim is not None else None,
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
