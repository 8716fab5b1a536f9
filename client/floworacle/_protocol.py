"""Request building and response parsing shared by the sync and asyncio clients (no I/O here).

A call is turned into a *plan*: the request messages (one per row chunk when a batch is over the
message limit) and a ``finish`` function that joins the chunk responses and converts them to the
caller's array type. The clients only differ in how they send the requests.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import grpc
import numpy as np

from floworacle import paths
from floworacle._codec import CodecError, WireDType, _is_torch, dtype_by_name, encode, encode_array, to_like
from floworacle._errors import OracleError
from floworacle._results import DatasetInfo, Neighbors, Prediction
from floworacle._wire import Outgoing, string_field
from floworacle.v1 import oracle_pb2 as pb

__all__ = ["RetryPolicy", "Plan", "build_oracle", "build_nearest", "parse_dataset_info", "OUTPUT_NAMES"]

R = TypeVar("R")

OUTPUT_NAMES: dict[str, Any] = {
    "velocity": pb.OUTPUT_VELOCITY,
    "x1_hat": pb.OUTPUT_X1_HAT,
    "eps_hat": pb.OUTPUT_EPS_HAT,
    "score": pb.OUTPUT_SCORE,
    "topk": pb.OUTPUT_TOPK,
    "entropy": pb.OUTPUT_ENTROPY,
    "ess": pb.OUTPUT_ESS,
}
_FLOAT_OUTPUTS = ("velocity", "x1_hat", "eps_hat", "score")
_PRECISIONS = {"exact": pb.PRECISION_EXACT, "fast": pb.PRECISION_FAST}
_PRECISION_NAMES = {pb.PRECISION_UNSPECIFIED: "exact", pb.PRECISION_EXACT: "exact", pb.PRECISION_FAST: "fast"}
_CONVENTIONS = ("standard", "reversed")
_WIRE_FLOATS = ("float32", "float16", "bfloat16", "float64")
# Headroom per message for names, fingerprints, ids and the protobuf framing of ~16 tensors.
_MESSAGE_OVERHEAD = 4096


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of transient failures, always within the call's deadline.

    UNAVAILABLE is retried; RESOURCE_EXHAUSTED only when the server sent a retry hint (a full
    queue), never for a message over the size limit. The n-th retry waits a uniformly random time
    in ``[0, min(max_backoff, initial_backoff * multiplier**n)]`` ("full jitter"), and at least
    the server's hint.
    """

    max_attempts: int = 5
    initial_backoff: float = 0.05
    max_backoff: float = 2.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.initial_backoff < 0 or self.max_backoff < 0 or self.multiplier < 1:
            raise ValueError("backoffs must be >= 0 and multiplier >= 1")

    def delay(self, error: OracleError, attempt: int, remaining: float, rng: random.Random) -> float | None:
        """Seconds to wait before attempt ``attempt + 1`` (0-based ``attempt`` just failed), or None
        when the error is final: not retryable, attempts used up, or the wait would pass the deadline."""
        if attempt + 1 >= self.max_attempts:
            return None
        if error.code == grpc.StatusCode.UNAVAILABLE:
            pass
        elif error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and error.retry_after is not None:
            pass
        else:
            return None
        cap = min(self.max_backoff, self.initial_backoff * self.multiplier**attempt)
        wait = rng.uniform(0.0, cap)
        if error.retry_after is not None:
            wait = max(wait, error.retry_after)
        return wait if wait < remaining else None


@dataclass
class Plan(Generic[R]):
    """Requests of one call (one per row chunk) and how to turn their responses into the result.

    Chunks after the first are sent pinned to the first answer's fingerprint, so a split batch is
    never answered by two different data sets (``pin``).
    """

    method: str
    requests: list[Any]
    finish: Callable[[list[Any]], R]
    pin: Callable[[Any, Any], None] = field(default=lambda req, first: None)

    def pinned(self, request: Any, payload: bytes, first: Any) -> bytes:
        """``payload`` (``request`` serialized earlier) with ``pin`` applied: the fingerprint
        field is appended, as the last occurrence of a field wins in protobuf."""
        msg = _message(request)
        before = getattr(msg, "fingerprint", None)
        self.pin(request, first)
        after = getattr(msg, "fingerprint", None)
        if not after or after == before:
            return payload
        number = msg.DESCRIPTOR.fields_by_name["fingerprint"].number
        return payload + string_field(number, after)


# ----------------------------------------------------------------------------------------------
# input checks


def _batch_array(x: Any, name: str) -> Any:
    """numpy array or torch tensor of shape (B, ...) with a float dtype the wire carries."""
    if _is_torch(x):
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got {x.dtype}; convert it with .float()")
        arr = x
    else:
        arr = np.asarray(x)
        if arr.dtype.kind != "f":
            raise ValueError(
                f"{name} must be a floating array, got dtype {arr.dtype}; convert it with .astype(np.float32)"
            )
        if arr.dtype.name not in _WIRE_FLOATS:
            arr = arr.astype(np.float64)
    if arr.ndim < 2:
        raise ValueError(
            f"{name} must have shape (B, D) or (B, *sample_shape), got {tuple(arr.shape)}; for one query use x[None]"
        )
    return arr


def _vector(v: Any, batch: int, name: str, dtype: Any = np.float64) -> np.ndarray:
    """Scalar or (B,) array / tensor -> numpy (B,) of ``dtype``."""
    if _is_torch(v):
        v = v.detach().cpu()
        v = (v.double() if v.is_floating_point() else v).numpy()
    a = np.asarray(v)
    if np.dtype(dtype).kind == "i" and a.dtype.kind not in "iu":
        if a.dtype.kind == "f" and np.all(np.mod(a, 1) == 0):
            a = a.astype(np.int64)
        else:
            raise ValueError(f"{name} must be integers (class indices), got dtype {a.dtype}")
    a = a.astype(dtype, copy=False)
    if a.ndim == 0:
        a = np.full((batch,), a, dtype=dtype)
    if a.shape != (batch,):
        raise ValueError(f"{name} must be a scalar or have shape ({batch},), got {a.shape}")
    return a


def _wire_name(arr: Any, wire_dtype: str | None) -> str:
    if wire_dtype is not None:
        if wire_dtype not in _WIRE_FLOATS:
            raise ValueError(f"wire_dtype must be one of {_WIRE_FLOATS} or None, got {wire_dtype!r}")
        return wire_dtype
    name = str(arr.dtype).removeprefix("torch.") if _is_torch(arr) else arr.dtype.name
    return name if name in _WIRE_FLOATS else "float32"


def _coefficients(coefficients: Any, batch: int) -> paths.PathCoefficients:
    if isinstance(coefficients, paths.PathCoefficients):
        c = coefficients
    elif isinstance(coefficients, Mapping):
        c = paths.PathCoefficients(
            **{k: _vector(coefficients[k], batch, k) for k in ("alpha", "sigma", "d_alpha", "d_sigma")}
        )
    elif isinstance(coefficients, Sequence) and len(coefficients) == 4:
        c = paths.PathCoefficients(*(_vector(v, batch, "coefficients") for v in coefficients))
    else:
        raise ValueError(
            "coefficients must be a PathCoefficients, a mapping with alpha, sigma, d_alpha, d_sigma, or a 4-tuple"
        )
    if len(c) == 1 and batch != 1:
        c = paths.PathCoefficients(
            *(np.full(batch, getattr(c, k)[0]) for k in ("alpha", "sigma", "d_alpha", "d_sigma"))
        )
    if len(c) != batch:
        raise ValueError(f"coefficients have {len(c)} entries for a batch of {batch}")
    c.validate()
    return c


def _path_spec(
    batch: int,
    t: np.ndarray | None,
    path: str,
    sigma_min: float,
    coefficients: Any,
) -> pb.PathSpec:
    """The request's PathSpec; named paths are validated here so a bad t fails before any I/O."""
    if coefficients is not None:
        c = _coefficients(coefficients, batch)
        return pb.PathSpec(
            custom=pb.CustomCoefficients(
                alpha=encode(c.alpha), sigma=encode(c.sigma), d_alpha=encode(c.d_alpha), d_sigma=encode(c.d_sigma)
            )
        )
    if t is None:
        raise ValueError("t is required with a named path; pass t (shape (B,) or a scalar) or custom coefficients")
    paths.get_path(path, sigma_min).coefficients(t)
    return pb.PathSpec(named=pb.NamedPath(name=path, sigma_min=float(sigma_min)))


def _times(t: Any, batch: int, convention: str, path: str, coefficients: Any) -> np.ndarray | None:
    if convention not in _CONVENTIONS:
        raise ValueError(f"convention must be 'standard' or 'reversed', got {convention!r}")
    if t is None:
        if convention == "reversed":
            raise ValueError("the reversed convention needs s (pass it as t)")
        return None
    tv = _vector(t, batch, "t")
    if convention == "reversed":
        if coefficients is not None or path != "linear":
            raise ValueError(
                "convention='reversed' is the linear path with t = 1 - s (SD3 / Flux); "
                "use path='linear' without custom coefficients"
            )
        tv = paths.reversed_to_t(tv)
    return tv


def _rows_per_message(batch: int, request_row: int, response_row: int, fixed: int, limit: int, max_rows: int) -> int:
    per_row = max(request_row, response_row, 1)
    rows = (limit - fixed - _MESSAGE_OVERHEAD) // per_row
    if rows < 1:
        raise ValueError(
            f"one query row needs {per_row} bytes, more than the message limit of {limit} bytes allows; "
            "raise max_message_bytes on the client and the server, or use a 2-byte wire_dtype"
        )
    return max(1, min(batch, rows, max_rows))


def _slice_rows(t: pb.Tensor, start: int, stop: int) -> pb.Tensor:
    """Rows [start, stop) of a wire tensor without decoding it."""
    n = int(t.shape[0])
    if start == 0 and stop == n:
        return t
    row = len(t.data) // n if n else 0
    return pb.Tensor(dtype=t.dtype, shape=[stop - start, *t.shape[1:]], data=t.data[start * row : stop * row])


def _attach_rows(
    out: Outgoing, field: str, enc: tuple[WireDType, tuple[int, ...], np.ndarray], start: int, stop: int
) -> None:
    """Make ``out``'s tensor ``field`` rows [start, stop) of encoded data, by reference: the bytes
    are copied once, when the message is serialized (see :mod:`floworacle._wire`)."""
    wd, shape, arr = enc
    rows = arr if start == 0 and stop == shape[0] else arr[start:stop]
    out.put(field, wd.enum, [stop - start, *shape[1:]], rows)


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


def _message(request: Any) -> Any:
    """The protobuf message of a planned request (an :class:`Outgoing` or a message)."""
    return request.message if isinstance(request, Outgoing) else request


def _pin(request: Any, first: Any) -> None:
    msg = _message(request)
    if not msg.fingerprint:
        msg.fingerprint = first.fingerprint


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
    guidance: float | None = None,
    guidance_interval: tuple[float, float] | None = None,
    precision: str = "exact",
    convention: str = "standard",
    outputs: Sequence[str] = ("velocity",),
    top_k: int = 0,
    wire_dtype: str | None = None,
    max_message_bytes: int,
    max_request_rows: int = 16384,
) -> Plan[Prediction]:
    """Plan an Oracle call for ``x_t`` (B, *sample_shape) at times ``t`` (B,) or a scalar.

    In the reversed convention ``t`` holds s (noise at s = 1), sent as ``1 - s``; the velocity
    comes back negated (target noise - data) and ``guidance_interval`` is read in s as well.
    """
    arr = _batch_array(x_t, "x_t")
    batch = int(arr.shape[0])
    outs = tuple(dict.fromkeys(outputs))
    unknown = [o for o in outs if o not in OUTPUT_NAMES]
    if unknown or not outs:
        raise ValueError(f"outputs must be a non-empty subset of {tuple(OUTPUT_NAMES)}, got {tuple(outputs)}")
    if "topk" in outs and top_k < 1:
        raise ValueError("the 'topk' output needs top_k >= 1")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be 'exact' or 'fast', got {precision!r}")
    tv = _times(t, batch, convention, path, coefficients)
    spec = _path_spec(batch, tv, path, sigma_min, coefficients)
    lab = _vector(labels, batch, "labels", np.int64) if labels is not None else None
    guide = None
    if guidance is not None:
        if lab is None:
            raise ValueError("guidance needs labels (the class of each query)")
        lo, hi = guidance_interval if guidance_interval is not None else (0.0, 1.0)
        if convention == "reversed":
            lo, hi = 1.0 - hi, 1.0 - lo
        if not lo <= hi:
            raise ValueError(f"guidance_interval must be (lo, hi) with lo <= hi, got {guidance_interval}")
        guide = pb.Guidance(scale=float(guidance), t_lo=float(lo), t_hi=float(hi))
    elif guidance_interval is not None:
        raise ValueError("guidance_interval needs guidance (the CFG scale)")

    wire = _wire_name(arr, wire_dtype)
    wd = dtype_by_name(wire)
    x_enc = encode_array(arr, wire)
    dim = math.prod(int(s) for s in arr.shape[1:])
    n_float = sum(o in _FLOAT_OUTPUTS for o in outs)
    request_row = dim * wd.itemsize + 8 + 8 + 32
    response_row = n_float * dim * wd.itemsize + top_k * 16 + 32
    fixed = len(dataset) + len(fingerprint)
    rows = (
        _rows_per_message(batch, request_row, response_row, fixed, max_message_bytes, max_request_rows) if batch else 1
    )
    t_wire = encode(tv) if tv is not None else None
    lab_wire = encode(lab) if lab is not None else None
    requests = []
    for start in range(0, max(batch, 1), rows):
        stop = min(batch, start + rows)
        if spec.HasField("custom"):
            c = spec.custom
            part_spec = pb.PathSpec(
                custom=pb.CustomCoefficients(
                    **{k: _slice_rows(getattr(c, k), start, stop) for k in ("alpha", "sigma", "d_alpha", "d_sigma")}
                )
            )
        else:
            part_spec = spec
        req = pb.OracleRequest(
            dataset=dataset,
            fingerprint=fingerprint,
            path=part_spec,
            outputs=[OUTPUT_NAMES[o] for o in outs],
            top_k=top_k,
            precision=_PRECISIONS[precision],
            output_dtype=wd.enum,  # type: ignore[arg-type]
        )
        out = Outgoing(req)
        _attach_rows(out, "x_t", x_enc, start, stop)
        if t_wire is not None:
            req.t.CopyFrom(_slice_rows(t_wire, start, stop))
        if lab_wire is not None:
            req.labels.CopyFrom(_slice_rows(lab_wire, start, stop))
        if guide is not None:
            req.guidance.CopyFrom(guide)
        requests.append(out)

    negate = convention == "reversed"

    def finish(responses: list[Any]) -> Prediction:
        _check_same_fingerprint(responses)
        values: dict[str, Any] = {}
        for name in _FLOAT_OUTPUTS:
            joined = _field(responses, name, batch)
            if joined is not None:
                values[name] = to_like(joined, arr, name)
            elif name in outs:
                raise OracleError(grpc.StatusCode.INTERNAL, f"server did not answer the requested output {name}")
        if negate and "velocity" in values:
            values["velocity"] = paths.velocity_to_reversed(values["velocity"])
        for name in ("topk_indices", "topk_weights", "entropy", "ess", "x1_hat_error_bound", "velocity_error_bound"):
            joined = _field(responses, name, batch)
            if joined is not None:
                values[name] = to_like(joined, arr, name, keep_wire_dtype=True)
        first = responses[0]
        return Prediction(
            dataset=first.dataset,
            fingerprint=first.fingerprint,
            precision=_PRECISION_NAMES.get(first.precision, "exact"),
            **values,
        )

    return Plan("Oracle", requests, finish, _pin)


# ----------------------------------------------------------------------------------------------
# nearest


def build_nearest(
    x: Any,
    k: int,
    *,
    dataset: str,
    fingerprint: str,
    t: Any = None,
    path: str = "linear",
    sigma_min: float = 0.0,
    coefficients: Any = None,
    convention: str = "standard",
    max_message_bytes: int,
    max_request_rows: int = 16384,
) -> Plan[Neighbors]:
    """Plan a Nearest call: the ``k`` nearest training samples of ``x`` (B, *sample_shape); with
    ``t`` (or coefficients) the points are x_t and the search is for ``x_t / alpha_t``."""
    arr = _batch_array(x, "x")
    batch = int(arr.shape[0])
    if not 1 <= int(k) <= 1024:
        raise ValueError(f"k must lie in 1..1024, got {k}")
    tv = _times(t, batch, convention, path, coefficients)
    spec = (
        _path_spec(batch, tv, path, sigma_min, coefficients) if (tv is not None or coefficients is not None) else None
    )
    wire = _wire_name(arr, None)
    x_enc = encode_array(arr, wire)
    dim = math.prod(int(s) for s in arr.shape[1:])
    request_row = dim * dtype_by_name(wire).itemsize + 8 + 32
    response_row = int(k) * 24
    rows = (
        _rows_per_message(
            batch, request_row, response_row, len(dataset) + len(fingerprint), max_message_bytes, max_request_rows
        )
        if batch
        else 1
    )
    t_wire = encode(tv) if tv is not None else None
    requests = []
    for start in range(0, max(batch, 1), rows):
        stop = min(batch, start + rows)
        req = pb.NearestRequest(dataset=dataset, fingerprint=fingerprint, k=int(k))
        out = Outgoing(req)
        _attach_rows(out, "x", x_enc, start, stop)
        if t_wire is not None:
            req.t.CopyFrom(_slice_rows(t_wire, start, stop))
        if spec is not None:
            if spec.HasField("custom"):
                c = spec.custom
                req.path.custom.CopyFrom(
                    pb.CustomCoefficients(
                        **{n: _slice_rows(getattr(c, n), start, stop) for n in ("alpha", "sigma", "d_alpha", "d_sigma")}
                    )
                )
            else:
                req.path.CopyFrom(spec)
        requests.append(out)

    def finish(responses: list[Any]) -> Neighbors:
        _check_same_fingerprint(responses)
        idx = _field(responses, "indices", batch)
        dist = _field(responses, "distances", batch)
        if idx is None or dist is None:
            raise OracleError(grpc.StatusCode.INTERNAL, "server answered Nearest without indices or distances")
        lab = _field(responses, "labels", batch)
        return Neighbors(
            indices=to_like(idx, arr, "indices", keep_wire_dtype=True),
            distances=to_like(dist, arr, "distances", keep_wire_dtype=True),
            labels=to_like(lab, arr, "labels", keep_wire_dtype=True) if lab is not None else None,
            dataset=responses[0].dataset,
            fingerprint=responses[0].fingerprint,
        )

    return Plan("Nearest", requests, finish, _pin)


# ----------------------------------------------------------------------------------------------
# data sets

_DTYPE_NAMES = {
    pb.DTYPE_FLOAT32: "float32",
    pb.DTYPE_FLOAT16: "float16",
    pb.DTYPE_BFLOAT16: "bfloat16",
    pb.DTYPE_FLOAT64: "float64",
    pb.DTYPE_INT64: "int64",
}


def parse_dataset_info(info: Any) -> DatasetInfo:
    """``floworacle.v1.DatasetInfo`` -> :class:`DatasetInfo`."""
    return DatasetInfo(
        name=info.name,
        num_samples=int(info.num_samples),
        sample_shape=tuple(int(s) for s in info.sample_shape),
        fingerprint=info.fingerprint,
        dim=int(info.dim),
        storage_dtype=_DTYPE_NAMES.get(info.storage_dtype, "unspecified"),
        num_classes=int(info.num_classes),
        has_weights=bool(info.has_weights),
        scale_factor=float(info.scale_factor),
        device=info.device,
        resident_bytes=int(info.resident_bytes),
        is_default=bool(info.is_default),
    )


def deadline_error(timeout: float | None) -> OracleError:
    return OracleError(
        grpc.StatusCode.DEADLINE_EXCEEDED, f"the call's deadline ({timeout} s) passed before an answer came"
    )
