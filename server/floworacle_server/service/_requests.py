"""Request validation: wire messages to checked, engine-ready jobs, or an :class:`RpcFailure` that
carries the precise gRPC status code and a message saying how to fix the request.

Everything here is explicit (never ``assert``) and runs before a request reaches the batcher, so
one bad request cannot fail the others it would have been merged with.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass

import grpc
import numpy as np

from floworacle import _codec
from floworacle.paths import PathCoefficients, custom_coefficients, get_path
from floworacle.v1 import oracle_pb2 as pb
from floworacle_server.data import Dataset, DatasetStore
from floworacle_server.engine import Guidance, Precision

__all__ = [
    "MAX_TOP_K",
    "RpcFailure",
    "Limits",
    "OracleJob",
    "NearestJob",
    "resolve_dataset",
    "parse_oracle",
    "parse_nearest",
    "OUTPUT_NAMES",
]

#: Largest k for top-k diagnostics and nearest-sample queries (proto: 1 <= k <= min(N, 1024)).
MAX_TOP_K = 1024

#: Wire output enum -> engine output name, in the order responses are filled.
OUTPUT_NAMES: dict[int, str] = {
    pb.OUTPUT_VELOCITY: "velocity",
    pb.OUTPUT_X1_HAT: "x1_hat",
    pb.OUTPUT_EPS_HAT: "eps_hat",
    pb.OUTPUT_SCORE: "score",
    pb.OUTPUT_TOPK: "topk",
    pb.OUTPUT_ENTROPY: "entropy",
    pb.OUTPUT_ESS: "ess",
}
_OUTPUT_ORDER = tuple(OUTPUT_NAMES.values())
_FLOAT_WIRE = {"float32", "float16", "bfloat16", "float64"}
_WIRE_NAME = {d.enum: d.name for d in _codec.DTYPES}


class RpcFailure(Exception):
    """A request that fails with ``code``; ``message`` tells the caller what to change.

    ``reason`` is the rejection label for the metrics; ``trailing`` is extra trailing metadata
    (e.g. the retry hint ``grpc-retry-pushback-ms`` on a full queue).
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str = "invalid",
        trailing: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.reason = reason
        self.trailing = trailing


def _invalid(message: str) -> RpcFailure:
    return RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, message, reason="invalid")


@dataclass(frozen=True)
class Limits:
    """Per-request limits from the settings."""

    max_request_rows: int


@dataclass
class OracleJob:
    """One validated oracle request.

    Attributes:
        x: (B, D) queries as decoded from the wire (float16/32/64; bfloat16 arrives as float32).
        coeffs: (B,) float64 path coefficients.
        t: (B,) float64 times or None (custom coefficients without t).
        labels: (B,) int64 labels, -1 = unconditional, or None.
        outputs: engine output names in canonical order.
        out_dtype: wire dtype name of the float outputs.
        out_shape: per-sample shape of the outputs (the request's sample shape or (D,)).
    """

    dataset: Dataset
    x: np.ndarray
    coeffs: PathCoefficients
    t: np.ndarray | None
    labels: np.ndarray | None
    guidance: Guidance | None
    outputs: tuple[str, ...]
    top_k: int
    precision: Precision
    out_dtype: str
    out_shape: tuple[int, ...]
    request_id: str

    @property
    def rows(self) -> int:
        return int(self.x.shape[0])

    @property
    def key(self) -> Hashable:
        """What must match for two jobs to share one engine call (labels may differ)."""
        g = None if self.guidance is None else (self.guidance.scale, self.guidance.t_lo, self.guidance.t_hi)
        return ("oracle", self.dataset.name, id(self.dataset), self.precision.value, g)


@dataclass
class NearestJob:
    """One validated nearest request: (B, D) float64 points (already divided by alpha_t for
    posterior-nearest queries) and k."""

    dataset: Dataset
    x: np.ndarray
    k: int
    out_rows: int

    @property
    def rows(self) -> int:
        return int(self.x.shape[0])

    @property
    def key(self) -> Hashable:
        return ("nearest", self.dataset.name, id(self.dataset))


def resolve_dataset(store: DatasetStore, name: str, fingerprint: str = "") -> Dataset:
    """The named (or default) data set; NOT_FOUND listing the names, FAILED_PRECONDITION on a
    fingerprint pin that does not match."""
    try:
        ds = store.get(name)
    except KeyError as exc:
        msg = exc.args[0] if exc.args else f"unknown data set {name!r}"
        raise RpcFailure(grpc.StatusCode.NOT_FOUND, str(msg), reason="not_found") from None
    if fingerprint and fingerprint != ds.fingerprint:
        raise RpcFailure(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"data set {ds.name!r} has fingerprint {ds.fingerprint}, but the request pinned {fingerprint}; "
            "the server holds different data than you expect (update the pin or point at the right server)",
            reason="invalid",
        )
    return ds


def _decode(t: pb.Tensor, field: str) -> tuple[np.ndarray, str]:
    try:
        arr = _codec.decode(t, field)
    except _codec.CodecError as exc:
        raise _invalid(str(exc)) from None
    return arr, _WIRE_NAME[t.dtype]


def _decode_float(t: pb.Tensor, field: str) -> tuple[np.ndarray, str]:
    arr, name = _decode(t, field)
    if name not in _FLOAT_WIRE:
        raise _invalid(f"{field} must be float32, float16, bfloat16 or float64, got {name}")
    return arr, name


def _decode_vector(t: pb.Tensor, field: str, b: int) -> np.ndarray:
    arr, _ = _decode_float(t, field)
    if arr.shape != (b,):
        raise _invalid(f"{field} must have shape ({b},), one value per query, got {list(arr.shape)}")
    return arr.astype(np.float64)


def _check_rows(shape: tuple[int, ...], field: str, limits: Limits) -> None:
    # Checked on the declared shape, before decoding, so an oversized request costs nothing.
    if shape and shape[0] > limits.max_request_rows:
        raise RpcFailure(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"{field} has {shape[0]} rows; this server accepts at most {limits.max_request_rows} per request "
            "(max_request_rows): split the batch (the SDK does this automatically)",
            reason="rows_cap",
        )


def _queries(t: pb.Tensor, field: str, ds: Dataset, limits: Limits, present: bool) -> tuple[np.ndarray, str, tuple]:
    """Decode (B, *sample_shape) or (B, D) float queries -> ((B, D) array, wire dtype, out shape)."""
    if not present:
        raise _invalid(f"{field} is required: a tensor of shape (B, {ds.dim}) or (B, *{list(ds.sample_shape)})")
    _check_rows(tuple(int(s) for s in t.shape), field, limits)
    arr, name = _decode_float(t, field)
    expect = f"(B, {ds.dim}) or (B, {', '.join(str(s) for s in ds.sample_shape)})"
    if arr.ndim < 2:
        raise _invalid(
            f"{field} has shape {list(arr.shape)}; data set {ds.name!r} expects {expect} "
            "(a single query still needs the batch dimension)"
        )
    b = int(arr.shape[0])
    if b == 0:
        raise _invalid(f"{field} is an empty batch (B = 0); send at least one query")
    rest = tuple(int(s) for s in arr.shape[1:])
    if rest == tuple(ds.sample_shape):
        out_shape = tuple(ds.sample_shape)
    elif rest == (ds.dim,):
        out_shape = (ds.dim,)
    else:
        raise _invalid(f"{field} has shape {list(arr.shape)}; data set {ds.name!r} expects {expect}")
    flat = arr.reshape(b, ds.dim)
    # Fast path without a temporary: min and max are both finite iff every value is (they
    # propagate NaN, and +-Inf would be the max or min); only a failing request pays for the
    # element-wise scan that finds the row to report. A view of the wire bytes, never a copy.
    if not (np.isfinite(flat.min()) and np.isfinite(flat.max())):
        finite = np.isfinite(flat).all(axis=1)
        if not finite.all():
            row = int(np.flatnonzero(~finite)[0])
            raise _invalid(f"{field}[{row}] has a NaN or Inf; send finite values")
    return flat, name, out_shape


def _coefficients(
    path: pb.PathSpec, has_path: bool, t: np.ndarray | None, b: int, *, for_nearest: bool = False
) -> PathCoefficients | None:
    kind = path.WhichOneof("kind") if has_path else None
    if kind == "custom":
        c = path.custom
        fields = ("alpha", "sigma", "d_alpha", "d_sigma")
        missing = [f for f in fields if not c.HasField(f)]
        if missing:
            raise _invalid(f"custom path coefficients need all of {list(fields)}; missing {missing}")
        values = [_decode_vector(getattr(c, f), f"path.custom.{f}", b) for f in fields]
        try:
            return custom_coefficients(*values)
        except ValueError as exc:
            raise _invalid(f"path.custom: {exc}") from None
    name, sigma_min = ("linear", 0.0)
    if kind == "named":
        name = path.named.name or "linear"
        sigma_min = float(path.named.sigma_min)
    if t is None:
        if for_nearest:
            return None
        raise _invalid(f"t is required for the named path {name!r}: a float tensor of shape ({b},), t in [0, 1]")
    try:
        return get_path(name, sigma_min).coefficients(t)
    except ValueError as exc:
        raise _invalid(str(exc)) from None


def _labels(req_labels: pb.Tensor, ds: Dataset, b: int) -> np.ndarray:
    arr, name = _decode(req_labels, "labels")
    if name != "int64":
        raise _invalid(f"labels must be int64, got {name}")
    if arr.shape != (b,):
        raise _invalid(f"labels must have shape ({b},), one per query, got {list(arr.shape)}")
    if ds.num_classes == 0:
        raise _invalid(f"data set {ds.name!r} has no labels; send no labels (unconditional oracle)")
    bad = (arr < -1) | (arr >= ds.num_classes)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise _invalid(
            f"labels[{i}] = {int(arr[i])} is outside the classes 0..{ds.num_classes - 1} of data set "
            f"{ds.name!r} (-1 means unconditional for that query)"
        )
    return arr.astype(np.int64)


def _guidance(g: pb.Guidance) -> Guidance:
    values = (g.scale, g.t_lo, g.t_hi)
    if not all(math.isfinite(v) for v in values):
        raise _invalid(f"guidance scale and interval must be finite, got scale={g.scale}, t_lo={g.t_lo}, t_hi={g.t_hi}")
    t_lo, t_hi = float(g.t_lo), float(g.t_hi)
    if t_lo == 0.0 and t_hi == 0.0:
        # Both unset on the wire (proto3 zeros): guidance on the whole path.
        t_hi = 1.0
    if not 0.0 <= t_lo <= t_hi <= 1.0:
        raise _invalid(f"guidance interval must satisfy 0 <= t_lo <= t_hi <= 1, got [{t_lo}, {t_hi}]")
    return Guidance(scale=float(g.scale), t_lo=t_lo, t_hi=t_hi)


def parse_oracle(req: pb.OracleRequest, store: DatasetStore, limits: Limits) -> OracleJob:
    """Validate an :class:`OracleRequest` into an :class:`OracleJob` (raises :class:`RpcFailure`)."""
    ds = resolve_dataset(store, req.dataset, req.fingerprint)
    x, in_dtype, out_shape = _queries(req.x_t, "x_t", ds, limits, req.HasField("x_t"))
    b = int(x.shape[0])
    t = _decode_vector(req.t, "t", b) if req.HasField("t") else None
    if t is not None and not np.isfinite(t).all():
        i = int(np.flatnonzero(~np.isfinite(t))[0])
        raise _invalid(f"t[{i}] = {t[i]} is not finite")
    coeffs = _coefficients(req.path, req.HasField("path"), t, b)
    if coeffs is None:  # _coefficients raised already for oracle queries without t; kept for the type
        raise _invalid("t or custom path coefficients are required")
    labels = _labels(req.labels, ds, b) if req.HasField("labels") else None
    guidance = None
    if req.HasField("guidance"):
        guidance = _guidance(req.guidance)
        if labels is None:
            raise _invalid("guidance needs labels: send one class label per query (or drop guidance)")
        if t is None:
            raise _invalid("guidance needs t for its interval: send t (shape (B,)) with custom coefficients")

    names: set[str] = set()
    for o in req.outputs:
        if o not in OUTPUT_NAMES:
            raise _invalid(f"unknown output {o}; choose from {sorted(pb.Output.Name(k) for k in OUTPUT_NAMES)}")
        names.add(OUTPUT_NAMES[o])
    if not names:
        names.add("velocity")
    top_k = int(req.top_k)
    if top_k > 0:
        names.add("topk")  # a top_k without OUTPUT_TOPK still means "send the top k"
    if "topk" in names:
        limit = min(ds.num_samples, MAX_TOP_K)
        if not 1 <= top_k <= limit:
            raise _invalid(f"OUTPUT_TOPK needs top_k in 1..{limit} (min(N, {MAX_TOP_K})), got {top_k}")

    if req.precision in (pb.PRECISION_UNSPECIFIED, pb.PRECISION_EXACT):
        precision = Precision.EXACT
    elif req.precision == pb.PRECISION_FAST:
        precision = Precision.FAST
    else:
        raise _invalid(f"unknown precision {req.precision}; use PRECISION_EXACT or PRECISION_FAST")

    out_dtype = in_dtype
    if req.output_dtype != pb.DTYPE_UNSPECIFIED:
        try:
            out_dtype = next(d.name for d in _codec.DTYPES if d.enum == req.output_dtype)
        except StopIteration:
            raise _invalid(f"unknown output_dtype {req.output_dtype}") from None
        if out_dtype not in _FLOAT_WIRE:
            raise _invalid(f"output_dtype must be a float dtype (float32, float16, bfloat16, float64), got {out_dtype}")

    return OracleJob(
        dataset=ds,
        x=x,
        coeffs=coeffs,
        t=t,
        labels=labels,
        guidance=guidance,
        outputs=tuple(n for n in _OUTPUT_ORDER if n in names),
        top_k=top_k,
        precision=precision,
        out_dtype=out_dtype,
        out_shape=out_shape,
        request_id=req.request_id,
    )


def parse_nearest(req: pb.NearestRequest, store: DatasetStore, limits: Limits) -> NearestJob:
    """Validate a :class:`NearestRequest`. With t (or custom coefficients) the points are x_t and
    the search runs for ``x_t / alpha_t`` (posterior-nearest)."""
    ds = resolve_dataset(store, req.dataset, req.fingerprint)
    x, _, _ = _queries(req.x, "x", ds, limits, req.HasField("x"))
    b = int(x.shape[0])
    limit = min(ds.num_samples, MAX_TOP_K)
    k = int(req.k)
    if not 1 <= k <= limit:
        raise _invalid(f"k must lie in 1..{limit} (min(N, {MAX_TOP_K})), got {k}")
    t = _decode_vector(req.t, "t", b) if req.HasField("t") else None
    coeffs = _coefficients(req.path, req.HasField("path"), t, b, for_nearest=True)
    if coeffs is None:
        points = x.astype(np.float64)  # a copy (the wire buffer is read-only): the runner hands it to torch
    else:
        zero = coeffs.alpha <= 0
        if zero.any():
            i = int(np.flatnonzero(zero)[0])
            raise _invalid(
                f"alpha_t[{i}] = 0 (pure noise, t = 0): x_t says nothing about which sample it came from; "
                "use t > 0 for posterior-nearest queries"
            )
        points = np.divide(x, coeffs.alpha[:, None], dtype=np.float64)  # widen and divide in one pass
    return NearestJob(dataset=ds, x=points, k=k, out_rows=b)
