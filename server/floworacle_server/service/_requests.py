"""Request validation: wire messages to checked, engine-ready jobs, in one pass per request.

Every rule is one of :mod:`floworacle.protocol`'s (``rules``), applied here with the data set's
facts (N, D, classes); a broken rule raises :class:`~floworacle.protocol.RequestError`, whose code
and message the servicer sends. Failures that are not about the request's contents (an unknown
data set, a fingerprint pin that does not match) are :class:`RpcFailure`. Everything runs before
a request reaches the batcher, so one bad request cannot fail the others it would have been
merged with; the engine only asserts its invariants.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import grpc
import numpy as np

from floworacle.paths import PathCoefficients
from floworacle.protocol import CodecError, OutputSpec, RequestError, decode, dtype_by_enum, pb, rules
from floworacle_server.data import Dataset, DatasetStore
from floworacle_server.engine import Guidance, Precision, check_search

__all__ = [
    "RpcFailure",
    "Limits",
    "OracleJob",
    "NearestJob",
    "resolve_dataset",
    "parse_oracle",
    "parse_nearest",
]


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
        exclude: (B,) int64 data set indices left out of each query's posterior, -1 = none, or None.
        outputs: the outputs to compute, in table order.
        out_dtype: wire dtype name of the float outputs.
        out_shape: per-sample shape of the outputs (the request's sample shape or (D,)).
    """

    dataset: Dataset
    x: np.ndarray
    coeffs: PathCoefficients
    t: np.ndarray | None
    labels: np.ndarray | None
    exclude: np.ndarray | None
    guidance: Guidance | None
    outputs: tuple[OutputSpec, ...]
    top_k: int
    precision: Precision
    out_dtype: str
    out_shape: tuple[int, ...]
    request_id: str

    @property
    def rows(self) -> int:
        return int(self.x.shape[0])

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.outputs)

    @property
    def key(self) -> Hashable:
        """What must match for two jobs to share one engine call (labels may differ)."""
        g = None if self.guidance is None else (self.guidance.scale, self.guidance.t_lo, self.guidance.t_hi)
        return ("oracle", self.dataset.name, id(self.dataset), self.precision.value, g)


@dataclass
class NearestJob:
    """One validated nearest request.

    Attributes:
        x: (B, D) points as decoded from the wire, or x_t for a posterior-nearest query.
        alpha, sigma: (B,) float64 path coefficients of a posterior-nearest query (the search
            ranks samples by posterior weight at x_t), else None.
        exclude: (B,) int64 data set indices left out of each answer, -1 = none, or None.
        exact: True / False, or None for the server's choice.
        nprobe: inverted lists an index search probes (0: the index's default).
        space: "data" or "features".
    """

    dataset: Dataset
    x: np.ndarray
    k: int
    alpha: np.ndarray | None
    sigma: np.ndarray | None
    exclude: np.ndarray | None
    exact: bool | None
    nprobe: int
    space: str

    @property
    def rows(self) -> int:
        return int(self.x.shape[0])

    @property
    def key(self) -> Hashable:
        posterior = self.alpha is not None
        return ("nearest", self.dataset.name, id(self.dataset), posterior, self.exact, self.nprobe, self.space)


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


def _decode(t: pb.Tensor, field: str, kind: str) -> np.ndarray:
    """Decode a wire tensor whose dtype must be of ``kind`` ("float" or "int64")."""
    wd = dtype_by_enum(t.dtype, field)
    if kind == "float" and not wd.is_float:
        raise CodecError(f"{field} must be float32, float16, bfloat16 or float64, got {wd.name}")
    if kind == "int64" and wd.name != "int64":
        raise CodecError(f"{field} must be int64, got {wd.name}")
    return decode(t, field)


def _float_vector(t: pb.Tensor, field: str, b: int) -> np.ndarray:
    return rules.check_times(_decode(t, field, "float"), b, field)


def _queries(
    t: pb.Tensor, field: str, ds: Dataset, limits: Limits, present: bool, space: str = "data"
) -> tuple[np.ndarray, str, tuple]:
    """Decode (B, *sample_shape) or (B, D) float queries -> ((B, D) view, wire dtype, out shape);
    in the feature space the rows are (B, F) feature vectors."""
    dim, sample_shape = (ds.feature_dim, (ds.feature_dim,)) if space == "features" else (ds.dim, ds.sample_shape)
    if not present:
        raise RequestError(f"{field} is required: a tensor of shape (B, {dim}) or (B, *{list(sample_shape)})")
    declared = tuple(int(s) for s in t.shape)
    if declared:
        # on the declared shape, before decoding, so an oversized request costs nothing
        rules.check_rows(declared[0], field, limits.max_request_rows)
    arr = _decode(t, field, "float")
    out_shape = rules.sample_layout(arr.shape, field, ds.name, dim, sample_shape)
    flat = arr.reshape(arr.shape[0], dim)  # a view of the wire bytes, never a copy
    rules.check_finite_rows(flat, field)
    return flat, dtype_by_enum(t.dtype).name, out_shape


def _coefficients(
    req: pb.OracleRequest | pb.NearestRequest, t: np.ndarray | None, b: int, *, for_nearest: bool = False
) -> PathCoefficients | None:
    kind = req.path.WhichOneof("kind") if req.HasField("path") else None
    if kind == "custom":
        c = req.path.custom
        fields = ("alpha", "sigma", "d_alpha", "d_sigma")
        missing = [f for f in fields if not c.HasField(f)]
        if missing:
            raise RequestError(f"custom path coefficients need all of {list(fields)}; missing {missing}")
        values = [_decode(getattr(c, f), f"path.custom.{f}", "float") for f in fields]
        return rules.custom_coefficients(values, b)
    name, sigma_min = ("linear", 0.0)
    if kind == "named":
        name = req.path.named.name or "linear"
        sigma_min = float(req.path.named.sigma_min)
    if t is None:
        if for_nearest:
            return None
        raise RequestError(f"t is required for the named path {name!r}: a float tensor of shape ({b},), t in [0, 1]")
    return rules.named_coefficients(name, sigma_min, t)


def _labels(req: pb.OracleRequest, ds: Dataset, b: int) -> np.ndarray | None:
    if not req.HasField("labels"):
        return None
    labels = _decode(req.labels, "labels", "int64")
    rules.check_labels(labels, b, ds.name, ds.num_classes)
    return labels


def _exclude(req: pb.OracleRequest | pb.NearestRequest, ds: Dataset, b: int) -> np.ndarray | None:
    if not req.HasField("exclude"):
        return None
    exclude = _decode(req.exclude, "exclude", "int64")
    rules.check_exclude(exclude, b, ds.total_samples)
    return exclude


def _guidance(g: pb.Guidance) -> Guidance:
    t_lo, t_hi = float(g.t_lo), float(g.t_hi)
    if t_lo == 0.0 and t_hi == 0.0:  # both unset on the wire (proto3 zeros): the whole path
        t_hi = 1.0
    scale, t_lo, t_hi = rules.check_guidance(float(g.scale), t_lo, t_hi)
    return Guidance(scale=scale, t_lo=t_lo, t_hi=t_hi)


def parse_oracle(req: pb.OracleRequest, store: DatasetStore, limits: Limits) -> OracleJob:
    """Validate an :class:`OracleRequest` into an :class:`OracleJob` (raises :class:`RpcFailure`
    or :class:`~floworacle.protocol.RequestError`)."""
    ds = resolve_dataset(store, req.dataset, req.fingerprint)
    x, in_dtype, out_shape = _queries(req.x_t, "x_t", ds, limits, req.HasField("x_t"))
    b = int(x.shape[0])
    t = _float_vector(req.t, "t", b) if req.HasField("t") else None
    coeffs = _coefficients(req, t, b)
    assert coeffs is not None  # _coefficients raises for oracle queries without t or coefficients
    labels = _labels(req, ds, b)
    exclude = _exclude(req, ds, b)
    guidance = None
    if req.HasField("guidance"):
        guidance = _guidance(req.guidance)
        if labels is None:
            raise RequestError(rules.GUIDANCE_NEEDS_LABELS)
        if t is None:
            raise RequestError(rules.GUIDANCE_NEEDS_T)

    top_k = int(req.top_k)
    outputs = rules.outputs_from_enums(req.outputs, top_k)
    rules.check_top_k(top_k, any(o.name == "topk" for o in outputs), ds.total_samples)
    precision = Precision(rules.precision_from_enum(req.precision))

    out_dtype = in_dtype
    if req.output_dtype != pb.DTYPE_UNSPECIFIED:
        wd = dtype_by_enum(req.output_dtype, "output_dtype")
        if not wd.is_float:
            raise RequestError(
                f"output_dtype must be a float dtype (float32, float16, bfloat16, float64), got {wd.name}"
            )
        out_dtype = wd.name

    return OracleJob(
        dataset=ds,
        x=x,
        coeffs=coeffs,
        t=t,
        labels=labels,
        exclude=exclude,
        guidance=guidance,
        outputs=outputs,
        top_k=top_k,
        precision=precision,
        out_dtype=out_dtype,
        out_shape=out_shape,
        request_id=req.request_id,
    )


def parse_nearest(req: pb.NearestRequest, store: DatasetStore, limits: Limits) -> NearestJob:
    """Validate a :class:`NearestRequest`. With t (or custom coefficients) the points are x_t and
    the search ranks samples by posterior weight (the engine's posterior-nearest search)."""
    ds = resolve_dataset(store, req.dataset, req.fingerprint)
    exact = req.exact if req.HasField("exact") else None
    nprobe = int(req.nprobe)
    rules.check_nearest_mode(exact, nprobe)
    space = rules.space_from_enum(req.space)
    try:  # the data set must have the space, and an index for an index search
        check_search(ds, space, exact, nprobe or None)
    except ValueError as exc:
        raise RpcFailure(grpc.StatusCode.FAILED_PRECONDITION, str(exc), reason="invalid") from None
    x, _, _ = _queries(req.x, "x", ds, limits, req.HasField("x"), space)
    b = int(x.shape[0])
    k = int(req.k)
    rules.check_k(k, ds.total_samples)
    t = _float_vector(req.t, "t", b) if req.HasField("t") else None
    coeffs = _coefficients(req, t, b, for_nearest=True)
    if coeffs is not None:
        zero = coeffs.alpha <= 0
        if zero.any():
            i = int(np.flatnonzero(zero)[0])
            raise RequestError(
                f"alpha_t[{i}] = 0 (pure noise, t = 0): x_t says nothing about which sample it came from; "
                "use t > 0 for posterior-nearest queries"
            )
        if space != "data":
            raise RequestError("posterior-nearest queries (with t) search the data space; drop t or space")
    return NearestJob(
        dataset=ds,
        x=x,
        k=k,
        alpha=None if coeffs is None else coeffs.alpha,
        sigma=None if coeffs is None else coeffs.sigma,
        exclude=_exclude(req, ds, b),
        exact=exact,
        nprobe=nprobe,
        space=space,
    )
