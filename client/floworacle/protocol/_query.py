"""The protocol's request objects: one typed query per RPC, from the SDK call to the engine.

An :class:`OracleQuery` (``Oracle``, ``OracleStream``) or :class:`NearestQuery` (``Nearest``) is
made once per request and carried as it is:

* the SDK builds it from a call's arguments (:meth:`OracleQuery.build`: the cheap rules, before any
  I/O) and sends it with :meth:`~OracleQuery.to_request` (rows cut to fit the message limit);
* the server reads it with :meth:`~OracleQuery.from_request` (the message's own rules) and checks it
  against the data set it asks (:meth:`~OracleQuery.check` with the data set's :class:`DatasetFacts`);
* the batcher merges the queries of one engine call with :meth:`~OracleQuery.concat` (what may be
  merged is each field's ``role``: see :data:`ROWS` and the others) and answers each one from the
  merged result with :meth:`~OracleQuery.response`;
* the engine takes the merged query as it is (torch at its entry), and a gang sends it to its other
  ranks field by field (:func:`to_parts` / :func:`from_parts`, from the dataclass's own fields).

A new per-query option is a field here (with its role), its rule, its place in
``to_request``/``from_request``, a keyword in the SDK's option list, and the engine's use of it.

Arrays are numpy (the queries themselves as a :class:`~floworacle.protocol.WireArray`, in their
wire dtype); in-process callers of the engine may hold torch tensors in the array fields instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar, TypeVar

import numpy as np

from floworacle import paths
from floworacle.paths import COEFFICIENT_NAMES, PathCoefficients
from floworacle.protocol import _rules as rules
from floworacle.protocol._codec import (
    DTYPES,
    FLOAT_DTYPES,
    CodecError,
    WireArray,
    dtype_by_enum,
    dtype_by_name,
    fill,
    is_torch,
)
from floworacle.protocol._errors import RequestError
from floworacle.protocol._limits import MAX_TOP_K, MESSAGE_OVERHEAD
from floworacle.protocol._tables import (
    BOUND_FIELDS,
    KNN_FIELDS,
    OUTPUTS,
    PRECISIONS,
    SAMPLE_OUTPUT_NAMES,
    SPACES,
    output_by_name,
)
from floworacle.v1 import oracle_pb2 as pb

__all__ = [
    "KINDS",
    "PATCH_KINDS",
    "patch_schedule",
    "ROWS",
    "SHARED",
    "MERGED",
    "OWN",
    "CUSTOM_PATH",
    "Guidance",
    "SpaceFacts",
    "DatasetFacts",
    "OracleQuery",
    "NearestQuery",
    "to_parts",
    "from_parts",
    "wire_dtype_name",
]

#: Field roles. ROWS: one entry per query row ((B, ...) arrays): the batcher concatenates them, a
#: missing one is filled with the field's ``fill`` (or, without a fill, its presence must match).
ROWS = "rows"
#: SHARED: one value per engine call: queries merge only when these are equal (the batch key).
SHARED = "shared"
#: MERGED: per request, merged by the field's ``merge`` function (the engine computes the union).
MERGED = "merged"
#: OWN: per request, not the engine's business (how its answer is shaped and where it came from).
OWN = "own"

#: ``path`` of a query whose coefficients the caller gave (``PathSpec.custom``).
CUSTOM_PATH = "custom"
#: Oracle kinds and their ``floworacle.v1.Kind`` values (unspecified means global), the exact one first.
KINDS: dict[str, int] = {
    "global": pb.KIND_GLOBAL,
    "local": pb.KIND_LOCAL,
    "equivariant": pb.KIND_EQUIVARIANT,
    "linear": pb.KIND_LINEAR,
}
#: Kinds that read each sample as an image through P x P windows, and need a patch size.
PATCH_KINDS: tuple[str, ...] = ("local", "equivariant")


def patch_schedule(t: Any, schedule: Any) -> np.ndarray:
    """(B,) int64 patch sizes for times ``t`` (B,) from one P, or pairs ``(t_start, P)`` with
    increasing ``t_start``, the first at 0: a query at time t gets the P of the last pair with
    ``t_start <= t``, e.g. ``[(0.0, 7), (0.5, 5), (0.8, 3)]`` (the ELS paper calibrates small P
    late in the path)."""
    tt = np.asarray(_as_numpy(t), dtype=np.float64).reshape(-1)
    if isinstance(schedule, int | np.integer):
        return np.full(tt.shape[0], int(schedule), dtype=np.int64)
    try:
        pairs = [(float(a), rules.integer(p, "patch size")) for a, p in schedule]
    except (TypeError, ValueError):
        pairs = []
    starts = [a for a, _ in pairs]
    if not pairs or starts[0] != 0.0 or any(b <= a for a, b in zip(starts, starts[1:], strict=False)):
        raise RequestError(
            "patch_size is one odd P, one per query, or a schedule of (t_start, P) pairs with increasing t_start, "
            f"the first at 0.0, e.g. [(0.0, 7), (0.5, 5), (0.8, 3)]; got {schedule!r}"
        )
    at = np.searchsorted(np.asarray(starts), tt, side="right") - 1
    return np.asarray([p for _, p in pairs], dtype=np.int64)[np.clip(at, 0, None)]


def _check_kind(kind: str, patch: np.ndarray | None, outputs: tuple[str, ...], precision: str) -> None:
    """A kind's own rules: patch kinds need odd patch sizes, the others none; the kinds other than
    global give velocity, x1_hat, eps_hat and score, always in float64."""
    if kind not in KINDS:
        raise RequestError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    if kind == "global":
        if patch is not None:
            raise RequestError("patch_size belongs to kind='local' or 'equivariant'; drop it or ask one of those")
        return
    if kind in PATCH_KINDS:
        if patch is None:
            raise RequestError(
                f"kind {kind!r} needs patch_size: one odd P, one per query, or a schedule over t, e.g. 3 or "
                "[(0.0, 7), (0.5, 5), (0.8, 3)]"
            )
        bad = (patch < 1) | (patch % 2 == 0)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise RequestError(
                f"patch_size[{i}] = {int(patch[i])} must be a positive odd number (a window centred on its pixel)"
            )
    elif patch is not None:
        raise RequestError(f"kind {kind!r} takes no patch_size (it is not a patch oracle); drop it")
    other = [o for o in outputs if o not in SAMPLE_OUTPUT_NAMES]
    if other:
        raise RequestError(
            f"kind {kind!r} answers {list(SAMPLE_OUTPUT_NAMES)}; {other} describe the posterior over samples: ask "
            "kind='global' for them"
        )
    if precision != "exact":
        raise RequestError(f"kind {kind!r} answers in float64 with its bound; drop precision={precision!r}")


#: The dtypes float answers travel in, by their enum value.
FLOAT_BY_ENUM = {d.enum: d for d in DTYPES if d.is_float}


def _f(role: str, default: Any = None, *, fill: Any = None, merge: Callable[[list[Any]], Any] | None = None) -> Any:
    return field(default=default, metadata={"role": role, "fill": fill, "merge": merge})


def _union_outputs(values: list[tuple[str, ...]]) -> tuple[str, ...]:
    wanted = {n for v in values for n in v}
    return tuple(o.name for o in OUTPUTS if o.name in wanted)


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance: ``u_w = u(x) + scale (u(x | y) - u(x))`` for t in [t_lo, t_hi],
    else ``u(x | y)``."""

    scale: float
    t_lo: float = 0.0
    t_hi: float = 1.0


@dataclass(frozen=True)
class SpaceFacts:
    """A searchable space of a data set: its dimension, its faiss index's inverted lists (0: no
    index) and whether it is a cosine space (its answers carry similarities)."""

    dim: int
    index_nlist: int = 0
    cosine: bool = False


@dataclass(frozen=True)
class DatasetFacts:
    """What the request rules need to know of a data set (the data room states it once per data set).

    Attributes:
        name: its name.
        num_samples: N of the whole data set (what limits and indices refer to).
        dim: D, the values per sample.
        sample_shape: the shape of one sample (prod = D).
        num_classes: C, 0 without labels.
        spaces: the nearest-search spaces it has ("data" always, "features" when it has embeddings).
        has_weights: whether its samples carry weights (they enter a posterior ranking, which an
            index cannot search).
        sharded: whether a gang's ranks hold it in shards (the kinds other than "global" and the
            kNN target are one process's).
    """

    name: str
    num_samples: int
    dim: int
    sample_shape: tuple[int, ...]
    num_classes: int = 0
    spaces: Mapping[str, SpaceFacts] = field(default_factory=dict)
    has_weights: bool = False
    sharded: bool = False


def wire_dtype_name(x: Any) -> str:
    """The wire dtype name of a float array (WireArray, numpy, torch); "float64" for a float dtype
    the wire lacks (numpy's longdouble)."""
    if isinstance(x, WireArray):
        return x.dtype.name
    name = str(x.dtype).removeprefix("torch.") if is_torch(x) else np.asarray(x).dtype.name
    return name if name in FLOAT_DTYPES else "float64"


def _as_numpy(x: Any) -> np.ndarray:
    if is_torch(x):
        t = x.detach().cpu()
        return np.asarray((t.float() if str(t.dtype) == "torch.bfloat16" else t).numpy())
    return np.asarray(x)


def _rows(x: Any) -> int:
    return int(x.shape[0])


# -- decoding a message's fields ------------------------------------------------------------


def _wire_of(t: pb.Tensor, name: str, kind: str) -> WireArray:
    """A wire tensor whose dtype must be of ``kind`` ("float" or "int64"), validated, as a view."""
    wd = dtype_by_enum(t.dtype, name)
    if kind == "float" and not wd.is_float:
        raise CodecError(
            f"{name} must be {', '.join(list(FLOAT_DTYPES)[:-1])} or {list(FLOAT_DTYPES)[-1]}, got {wd.name}"
        )
    if kind == "int64" and wd.name != "int64":
        raise CodecError(f"{name} must be int64, got {wd.name}")
    return WireArray.decode(t, name)


def _decode(t: pb.Tensor, name: str, kind: str) -> np.ndarray:
    """A wire tensor whose dtype must be of ``kind`` ("float" or "int64"), as numbers."""
    return _wire_of(t, name, kind).numpy()


def _points(req: Any, name: str, max_rows: int, what: str) -> WireArray:
    """The (B, ...) float points of a request, validated on their declared shape first (so that an
    oversized request costs nothing), then decoded as a view of the message's bytes."""
    if not req.HasField(name):
        raise RequestError(f"{name} is required: {what}")
    t = getattr(req, name)
    declared = tuple(int(s) for s in t.shape)
    if declared:
        rules.check_rows(declared[0], name, max_rows)
    x = _wire_of(t, name, "float")
    rules.check_batch_shape(x.shape, name)
    return x


def _path_of(req: Any, t: np.ndarray | None, b: int, *, required: bool) -> tuple[str, float, PathCoefficients | None]:
    """(path name, sigma_min, coefficients) of a request's ``path`` and ``t``; a named path needs t
    unless the coefficients are optional (nearest queries without t)."""
    kind = req.path.WhichOneof("kind") if req.HasField("path") else None
    if kind == "custom":
        c = req.path.custom
        missing = [n for n in COEFFICIENT_NAMES if not c.HasField(n)]
        if missing:
            raise RequestError(f"custom path coefficients need all of {list(COEFFICIENT_NAMES)}; missing {missing}")
        values = [_decode(getattr(c, n), f"path.custom.{n}", "float") for n in COEFFICIENT_NAMES]
        return CUSTOM_PATH, 0.0, rules.custom_coefficients(values, b)
    name, sigma_min = "linear", 0.0
    if kind == "named":
        name = req.path.named.name or "linear"
        sigma_min = float(req.path.named.sigma_min)
    if t is None:
        if not required:
            return name, sigma_min, None
        raise RequestError(f"t is required for the named path {name!r}: a float tensor of shape ({b},), t in [0, 1]")
    return name, sigma_min, rules.named_coefficients(name, sigma_min, t)


def _int_vector(req: Any, name: str) -> np.ndarray | None:
    return _decode(getattr(req, name), name, "int64") if req.HasField(name) else None


def _fill_path(req: Any, path: str, sigma_min: float, coeffs: PathCoefficients | None, start: int, stop: int) -> None:
    if path == CUSTOM_PATH:
        assert coeffs is not None
        for n in COEFFICIENT_NAMES:
            fill(getattr(req.path.custom, n), getattr(coeffs, n)[start:stop], "float64")
    else:
        req.path.named.name = path
        req.path.named.sigma_min = float(sigma_min)


def _fill_vectors(req: Any, values: Mapping[str, np.ndarray | None], start: int, stop: int) -> None:
    for name, v in values.items():
        if v is not None:
            fill(getattr(req, name), _as_numpy(v)[start:stop], "float64" if name == "t" else "int64")


# -- the SDK's argument forms ------------------------------------------------------------------


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


def _given_coefficients(coefficients: Any, batch: int) -> PathCoefficients:
    """The SDK's ``coefficients=``: a PathCoefficients, a mapping or a 4-tuple of scalars / (B,) arrays."""
    if isinstance(coefficients, PathCoefficients):
        values = [getattr(coefficients, k) for k in COEFFICIENT_NAMES]
    elif isinstance(coefficients, Mapping):
        missing = [k for k in COEFFICIENT_NAMES if k not in coefficients]
        if missing:
            raise RequestError(f"custom path coefficients need all of {list(COEFFICIENT_NAMES)}; missing {missing}")
        values = [coefficients[k] for k in COEFFICIENT_NAMES]
    elif isinstance(coefficients, Sequence) and len(coefficients) == len(COEFFICIENT_NAMES):
        values = list(coefficients)
    else:
        names = ", ".join(COEFFICIENT_NAMES)
        raise RequestError(f"coefficients must be a PathCoefficients, a mapping with {names}, or a 4-tuple")
    vectors = []
    for name, v in zip(COEFFICIENT_NAMES, values, strict=True):
        try:
            a = np.asarray(v.detach().cpu().double().numpy() if is_torch(v) else v, dtype=np.float64)
        except (TypeError, ValueError):
            raise RequestError(f"path.custom.{name} must be numbers (a scalar or shape ({batch},))") from None
        vectors.append(np.full(batch, float(a.reshape(-1)[0])) if a.size == 1 else a)  # a scalar applies to all
    return rules.custom_coefficients(vectors, batch)


def _batch_points(x: Any, name: str, wire_dtype: str | None) -> WireArray:
    """The caller's (B, ...) float array or tensor in its wire form."""
    if is_torch(x):
        if not x.is_floating_point():
            raise RequestError(f"{name} must be a floating tensor, got {x.dtype}; convert it with .float()")
    else:
        x = np.asarray(x)
        if x.dtype.kind != "f":
            raise RequestError(
                f"{name} must be a floating array, got dtype {x.dtype}; convert it with .astype(np.float32)"
            )
    rules.check_batch_shape(tuple(x.shape), name)
    if wire_dtype is not None and wire_dtype not in FLOAT_DTYPES:
        raise RequestError(f"wire_dtype must be one of {list(FLOAT_DTYPES)} or None, got {wire_dtype!r}")
    return WireArray.encode(x, wire_dtype or wire_dtype_name(x))


def _called_times(t: Any, batch: int, convention: str, path: str, coefficients: Any) -> np.ndarray | None:
    """(B,) float64 times in our convention from the caller's t (or s, reversed: t = 1 - s)."""
    rules.check_convention(convention)
    if t is None:
        if convention == "reversed":
            raise RequestError("the reversed convention needs s (pass it as t)")
        return None
    if convention != "reversed":
        return rules.check_times(_float_vector(t, batch, "t"), batch)
    if coefficients is not None or path != "linear":
        raise RequestError(
            "convention='reversed' is the linear path with t = 1 - s (SD3 / Flux); "
            "use path='linear' without custom coefficients"
        )
    s = rules.check_times(_float_vector(t, batch, "s"), batch, "s")
    rules.check_reversed_times(s)
    return paths.reversed_to_t(s)


def _called_path(
    batch: int, t: np.ndarray | None, path: str, sigma_min: float, coefficients: Any, *, required: bool
) -> tuple[str, float, PathCoefficients | None]:
    if coefficients is not None:
        return CUSTOM_PATH, 0.0, _given_coefficients(coefficients, batch)
    if t is None:
        if not required:
            return path, sigma_min, None
        raise RequestError("t is required with a named path; pass t (shape (B,) or a scalar) or custom coefficients")
    return path, float(sigma_min), rules.named_coefficients(path, sigma_min, t)


# -- the queries ---------------------------------------------------------------------------------

Q = TypeVar("Q", bound="_Query")


@dataclass(frozen=True)
class _Query:
    """What both query types share: roles, merging, the batch key, rows."""

    points_field: ClassVar[str]

    @property
    def rows(self) -> int:
        return _rows(getattr(self, self.points_field))

    @property
    def key(self) -> tuple[Any, ...]:
        """What must be equal for two queries to share one engine call: the SHARED fields, and which
        fillless ROWS fields are present."""
        out: list[Any] = []
        for f in fields(self):
            role = f.metadata.get("role")
            v = getattr(self, f.name)
            if role == SHARED:
                out.append((f.name, v))
            elif role == ROWS and f.metadata.get("fill") is None:
                out.append((f.name, v is not None))
        return tuple(out)

    @classmethod
    def concat(cls: type[Q], queries: Sequence[Q]) -> Q:
        """One query of all rows of ``queries`` (equal keys), for one engine call. ROWS fields are
        concatenated (a missing one filled; the points in their promoted dtype, exactly), MERGED
        fields merged, SHARED fields kept, OWN fields left at their defaults."""
        if len(queries) == 1:
            return queries[0]
        values: dict[str, Any] = {}
        for f in fields(cls):
            role = f.metadata.get("role")
            got = [getattr(q, f.name) for q in queries]
            if role == ROWS:
                values[f.name] = _concat_rows(got, [q.rows for q in queries], f.metadata.get("fill"))
            elif role == SHARED:
                assert all(v == got[0] for v in got), f"queries of one engine call differ in {f.name}"
                values[f.name] = got[0]
            elif role == MERGED:
                values[f.name] = f.metadata["merge"](got)
        return cls(**values)


def _concat_rows(values: list[Any], rows: list[int], fill_value: Any) -> Any:
    if all(v is None for v in values):
        return None
    first = next(v for v in values if v is not None)
    if isinstance(first, PathCoefficients):
        return PathCoefficients.concat(values)
    if isinstance(first, WireArray) or first.ndim > 1:  # the points: numbers, in their promoted dtype
        arrays = [v.numpy() if isinstance(v, WireArray) else _as_numpy(v) for v in values]
        return np.concatenate([a.reshape(a.shape[0], -1) for a in arrays], axis=0)
    dtype = np.result_type(*[_as_numpy(v).dtype for v in values if v is not None])
    parts = [
        _as_numpy(v) if v is not None else np.full(n, fill_value, dtype) for v, n in zip(values, rows, strict=True)
    ]
    return np.concatenate(parts)


@dataclass(frozen=True)
class OracleQuery(_Query):
    """A batch of B oracle queries (``OracleRequest``).

    Attributes:
        x_t: (B, D) or (B, *sample_shape) queries: a :class:`WireArray` from the SDK or the wire; a
            numpy array or torch tensor (any float dtype, any device) for in-process callers.
        coeffs: the path coefficients, each (B,) float64 (from the named path and t, or given).
        t: (B,) float64 times, or None (custom coefficients without t; needed for guidance).
        labels: (B,) int64 class labels (class-conditional; -1: that query is unconditional), or None.
        exclude: (B,) int64 data set indices left out of each query's posterior (-1: none), or None.
        guidance: CFG setting (needs labels and t), or None.
        precision: "exact" (float64-accurate), "fast" (screening logits, with a bound) or "knn" (a
            sublinear estimate from the nearest samples and a uniform tail, with indicators).
        outputs: names from the protocol's output table, in table order.
        top_k: number of top posterior weights for "topk".
        knn_k, knn_tail: precision "knn": neighbours and tail samples per query (0 otherwise).
        kind: "global" (the exact posterior over the data set), "local", "equivariant" or "linear".
        patch_size: (B,) int64 odd patch sizes of the patch kinds, or None.
        path, sigma_min: the named path the coefficients came from, or :data:`CUSTOM_PATH`.
        output_dtype: wire dtype of the float outputs (None: the queries' own).
        sample_shape: the per-sample shape of the answers (set by :meth:`check`; None: as x_t's rows).
        request_id: echoed in the answer.
        dataset, fingerprint: the data set asked for ("" = the server's default) and a pin.
    """

    points_field: ClassVar[str] = "x_t"
    #: how a caller makes its answer smaller (the message of a refused answer)
    shrink_hint: ClassVar[str] = "ask for fewer outputs or a smaller top_k, or a 2-byte wire dtype"

    x_t: Any = _f(ROWS)
    coeffs: PathCoefficients = _f(ROWS)
    t: Any = _f(ROWS, fill=math.nan)
    labels: Any = _f(ROWS, fill=-1)
    exclude: Any = _f(ROWS, fill=-1)
    guidance: Guidance | None = _f(SHARED)
    precision: str = _f(SHARED, "exact")
    outputs: tuple[str, ...] = _f(MERGED, ("velocity",), merge=_union_outputs)
    top_k: int = _f(MERGED, 0, merge=max)
    knn_k: int = _f(SHARED, 0)
    knn_tail: int = _f(SHARED, 0)
    kind: str = _f(SHARED, "global")
    patch_size: Any = _f(ROWS, fill=0)
    path: str = _f(OWN, "linear")
    sigma_min: float = _f(OWN, 0.0)
    output_dtype: str | None = _f(OWN)
    sample_shape: tuple[int, ...] | None = _f(OWN)
    request_id: str = _f(OWN, "")
    dataset: str = _f(OWN, "")
    fingerprint: str = _f(OWN, "")

    # -- the SDK ---------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        x_t: Any,
        t: Any,
        *,
        path: str = "linear",
        sigma_min: float = 0.0,
        coefficients: Any = None,
        labels: Any = None,
        exclude: Any = None,
        guidance: float | None = None,
        guidance_interval: tuple[float, float] | None = None,
        precision: str = "exact",
        outputs: Sequence[str] = ("velocity",),
        top_k: Any = 0,
        knn_k: Any = None,
        knn_tail: Any = None,
        kind: str = "global",
        patch_size: Any = None,
        convention: str = "standard",
        wire_dtype: str | None = None,
        dataset: str = "",
        fingerprint: str = "",
    ) -> OracleQuery:
        """The query of an SDK call, checked by every rule that needs no data set facts (raises
        :class:`~floworacle.protocol.RequestError`). ``x_t`` (numpy or torch, any device) is encoded
        in ``wire_dtype`` (None: its own); the answers come back in that dtype too. ``t`` is a
        scalar or (B,) (None only with ``coefficients``). With ``convention="reversed"`` ``t`` and
        ``guidance_interval`` are in s (noise at s = 1) and become ``t = 1 - s``; negating the
        velocity of the answer is the caller's part. ``patch_size`` (patch kinds): one P, (B,) of
        them, or a schedule over t (:func:`patch_schedule`)."""
        x = _batch_points(x_t, "x_t", wire_dtype)
        b = x.shape[0]
        outs = rules.outputs_from_names(outputs)
        k = rules.integer(top_k, "top_k")
        rules.check_top_k(k, any(o.name == "topk" for o in outs))
        rules.precision_from_name(precision)
        nk, nt = rules.check_knn(
            precision,
            0 if knn_k is None else rules.integer(knn_k, "knn_k"),
            0 if knn_tail is None else rules.integer(knn_tail, "knn_tail"),
            tuple(o.name for o in outs),
        )
        tv = _called_times(t, b, convention, path, coefficients)
        path_name, smin, coeffs = _called_path(b, tv, path, sigma_min, coefficients, required=True)
        lab = exc = None
        if labels is not None:
            lab = rules.int_vector(labels, b, "labels")
            rules.check_labels(lab, b)
        if exclude is not None:
            exc = rules.int_vector(exclude, b, "exclude")
            rules.check_exclude(exc, b)
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
            if convention == "reversed":  # checked in s, as given, then mapped
                rules.check_guidance(float(guidance), lo, hi, "s")
                lo, hi = 1.0 - hi, 1.0 - lo
            scale, lo, hi = rules.check_guidance(float(guidance), lo, hi)
            if tv is None:
                raise RequestError(rules.GUIDANCE_NEEDS_T)
            guide = Guidance(scale, lo, hi)
        elif guidance_interval is not None:
            raise RequestError("guidance_interval needs guidance (the CFG scale)")
        patch = None
        if patch_size is not None:
            if isinstance(patch_size, Sequence) and patch_size and isinstance(patch_size[0], Sequence):
                if tv is None:
                    raise RequestError("a patch_size schedule over t needs t; send t or one patch size")
                patch = patch_schedule(tv, patch_size)
            else:
                patch = rules.int_vector(patch_size, b, "patch_size")
        _check_kind(kind, patch, tuple(o.name for o in outs), precision)
        assert coeffs is not None
        return cls(
            kind=kind, patch_size=patch,
            x_t=x, coeffs=coeffs, t=tv, labels=lab, exclude=exc, guidance=guide, precision=precision,
            outputs=tuple(o.name for o in outs), top_k=k, knn_k=nk, knn_tail=nt, path=path_name, sigma_min=smin,
            output_dtype=x.dtype.name, dataset=dataset, fingerprint=fingerprint,
        )  # fmt: skip

    def to_request(self, start: int = 0, stop: int | None = None) -> pb.OracleRequest:
        """The message of rows [start, stop) (None: to the end)."""
        x = self.x_t if isinstance(self.x_t, WireArray) else WireArray.encode(self.x_t, self.output_dtype)
        req = pb.OracleRequest(
            dataset=self.dataset,
            fingerprint=self.fingerprint,
            outputs=[output_by_name(o).enum for o in self.outputs],  # type: ignore[union-attr,misc]
            top_k=self.top_k,
            precision=PRECISIONS[self.precision],  # type: ignore[arg-type]
            knn_k=self.knn_k,
            knn_tail=self.knn_tail,
            request_id=self.request_id,
        )
        if self.kind != "global":
            req.kind = KINDS[self.kind]  # type: ignore[assignment]
        if self.output_dtype is not None:
            req.output_dtype = dtype_by_name(self.output_dtype).enum  # type: ignore[assignment]
        x.fill(req.x_t, start, stop)
        stop = self.rows if stop is None else stop
        _fill_vectors(req, {"t": self.t, "labels": self.labels, "exclude": self.exclude}, start, stop)
        if self.patch_size is not None:
            fill(req.patch_size, _as_numpy(self.patch_size)[start:stop], "int64")
        _fill_path(req, self.path, self.sigma_min, self.coeffs, start, stop)
        if self.guidance is not None:
            g = self.guidance
            req.guidance.CopyFrom(pb.Guidance(scale=g.scale, t_lo=g.t_lo, t_hi=g.t_hi))
        return req

    # -- the server ------------------------------------------------------------------------------
    @classmethod
    def from_request(cls, req: pb.OracleRequest, max_rows: int) -> OracleQuery:
        """The query a message carries, checked by every rule that needs no data set facts (raises
        :class:`~floworacle.protocol.RequestError`); ``x_t`` is a view of the message's bytes."""
        x = _points(req, "x_t", max_rows, "a float tensor of shape (B, D) or (B, *sample_shape)")
        b = x.shape[0]
        t = rules.check_times(_decode(req.t, "t", "float"), b) if req.HasField("t") else None
        path, sigma_min, coeffs = _path_of(req, t, b, required=True)
        labels = _int_vector(req, "labels")
        if labels is not None:
            rules.check_labels(labels, b)
        exclude = _int_vector(req, "exclude")
        if exclude is not None:
            rules.check_exclude(exclude, b)
        guidance = None
        if req.HasField("guidance"):
            g = req.guidance
            t_lo, t_hi = float(g.t_lo), float(g.t_hi)
            if t_lo == 0.0 and t_hi == 0.0:  # both unset on the wire (proto3 zeros): the whole path
                t_hi = 1.0
            guidance = Guidance(*rules.check_guidance(float(g.scale), t_lo, t_hi))
            if labels is None:
                raise RequestError(rules.GUIDANCE_NEEDS_LABELS)
            if t is None:
                raise RequestError(rules.GUIDANCE_NEEDS_T)
        top_k = int(req.top_k)
        outputs = rules.outputs_from_enums(req.outputs, top_k)
        rules.check_top_k(top_k, any(o.name == "topk" for o in outputs))
        precision = rules.precision_from_enum(req.precision)
        knn_k, knn_tail = rules.check_knn(precision, int(req.knn_k), int(req.knn_tail), tuple(o.name for o in outputs))
        kind = next((name for name, v in KINDS.items() if v == req.kind), "global" if req.kind == 0 else None)
        if kind is None:
            raise RequestError(f"unknown kind {int(req.kind)}; use one of {[pb.Kind.Name(v) for v in KINDS.values()]}")
        patch = _int_vector(req, "patch_size")
        if patch is not None and patch.shape != (b,):
            raise RequestError(f"patch_size must have shape ({b},), one per query, got {list(patch.shape)}")
        _check_kind(kind, patch, tuple(o.name for o in outputs), precision)
        output_dtype = None
        if req.output_dtype != pb.DTYPE_UNSPECIFIED:
            wd = FLOAT_BY_ENUM.get(int(req.output_dtype))
            if wd is None:
                choices = ", ".join(f"{d.name} ({d.enum})" for d in FLOAT_BY_ENUM.values())
                raise RequestError(
                    f"output_dtype {int(req.output_dtype)} is not a float wire dtype; use one of {choices}"
                )
            output_dtype = wd.name
        assert coeffs is not None
        return cls(
            x_t=x, coeffs=coeffs, t=t, labels=labels, exclude=exclude, guidance=guidance,
            precision=precision, outputs=tuple(o.name for o in outputs),
            top_k=top_k, knn_k=knn_k, knn_tail=knn_tail, kind=kind, patch_size=patch, path=path, sigma_min=sigma_min,
            output_dtype=output_dtype,
            request_id=req.request_id, dataset=req.dataset, fingerprint=req.fingerprint,
        )  # fmt: skip

    def check(self, facts: DatasetFacts) -> OracleQuery:
        """The rules that need the data set's facts: the queries' layout and values, labels within
        its classes, exclusions within its samples, top_k within N. Returns the query with its
        points as (B, D) rows and its answers' sample shape."""
        x, shape = _layout(self.x_t, "x_t", facts.name, facts.dim, facts.sample_shape)
        b = x.shape[0]
        if self.labels is not None:
            rules.check_labels(_as_numpy(self.labels), b, facts.name, facts.num_classes)
        if self.exclude is not None:
            rules.check_exclude(_as_numpy(self.exclude), b, facts.num_samples)
        rules.check_top_k(self.top_k, "topk" in self.outputs, facts.num_samples)
        if self.precision == "knn":
            rules.check_knn_index(facts.name, facts.spaces)
        rules.check_kind_served(self.kind, facts.name, facts.sharded)
        return replace(self, x_t=x, sample_shape=shape)

    def answer_bytes(self, facts: DatasetFacts | None = None) -> int:
        """The size of this query's answer message (its tensors' bytes, exactly, plus at most
        :data:`MESSAGE_OVERHEAD` for names, shapes and framing): what the server checks against its
        message limit before computing anything. (An oracle answer's size does not depend on the
        data set's ``facts``.)"""
        b = self.rows
        dim = int(math.prod(self.x_t.shape[1:]))
        itemsize = dtype_by_name(self.output_dtype or wire_dtype_name(self.x_t)).itemsize
        total = max(len(BOUND_FIELDS), len(KNN_FIELDS)) * 8 * b
        for spec in OUTPUTS:
            if spec.name in self.outputs:
                per = {"sample": dim * itemsize, "topk": 16 * self.top_k, "per_query": 8}[spec.kind]
                total += per * b * (len(spec.fields) if spec.kind == "per_query" else 1)
        return total + MESSAGE_OVERHEAD

    def response(self, result: Any, start: int = 0, into: pb.OracleResponse | None = None) -> pb.OracleResponse:
        """The answer to this query from rows [start, start + B) of an engine result (an object with
        one (rows, ...) array or tensor per response field, None where not computed): every
        requested output in its wire dtype, and the error bounds; written into ``into`` (e.g. the
        ``response`` of a stream's answer, which saves copying it there) when given."""
        b = self.rows
        sl = slice(start, start + b)
        shape = self.sample_shape if self.sample_shape is not None else tuple(getattr(self.x_t, "shape", (b, 0))[1:])
        out_dtype = self.output_dtype or wire_dtype_name(self.x_t)
        resp = into if into is not None else pb.OracleResponse()
        resp.dataset = self.dataset
        resp.fingerprint = self.fingerprint
        resp.precision = PRECISIONS[self.precision]  # type: ignore[assignment]
        resp.request_id = self.request_id
        for spec in OUTPUTS:
            if spec.name not in self.outputs:
                continue
            for name in spec.fields:
                value = getattr(result, name)
                if value is None:
                    raise RuntimeError(f"the engine did not compute the requested {name}")
                part = value[sl]
                if spec.kind == "sample":
                    _finite_into(getattr(resp, name), WireArray.encode(part.reshape(b, *shape), out_dtype), name, part)
                elif spec.kind == "topk":
                    _finite_into(getattr(resp, name), WireArray.encode(part[:, : self.top_k]), name, part)
                else:
                    _finite_into(getattr(resp, name), WireArray.encode(part, "float64"), name, part)
        for name in (*BOUND_FIELDS, *KNN_FIELDS):
            value = getattr(result, name, None)
            if value is not None:
                _finite_into(getattr(resp, name), WireArray.encode(value[sl], "float64"), name, value[sl])
        return resp

    def empty_response(self, into: pb.OracleResponse | None = None) -> pb.OracleResponse:
        """The answer to a batch of no queries: every requested output with 0 rows, in its shape."""
        shape = self.sample_shape if self.sample_shape is not None else tuple(getattr(self.x_t, "shape", (0, 0))[1:])
        empty: dict[str, np.ndarray] = {n: np.zeros(0) for n in BOUND_FIELDS}
        for spec in OUTPUTS:
            for name in spec.fields:
                if spec.kind == "sample":
                    empty[name] = np.zeros((0, *shape), np.float64)
                elif spec.kind == "topk":
                    empty[name] = np.zeros((0, self.top_k), np.int64 if name == "topk_indices" else np.float64)
                else:
                    empty[name] = np.zeros(0)
        return self.response(_Values(empty), into=into)


@dataclass(frozen=True)
class NearestQuery(_Query):
    """A batch of B nearest-sample queries (``NearestRequest``).

    Attributes:
        x: (B, D) or (B, *sample_shape) points (features space: (B, F)); a :class:`WireArray` from the
            wire, or a numpy array / torch tensor in-process.
        k: neighbours per point.
        t: (B,) float64 times or None; with t (or custom coefficients) the points are x_t and the
            search ranks samples by posterior weight (the nearest to ``x_t / alpha_t``).
        coeffs: their path coefficients (None without t or coefficients).
        exclude: (B,) int64 data set index left out of each answer (-1: none), or None.
        exact: True (certified brute force), False (the space's faiss index) or None (the server's choice).
        nprobe: inverted lists an index search probes (0: the index's default).
        space: "data" or "features".
        path, sigma_min, dataset, fingerprint: as in :class:`OracleQuery`.
    """

    points_field: ClassVar[str] = "x"
    shrink_hint: ClassVar[str] = "ask for a smaller k"

    x: Any = _f(ROWS)
    coeffs: PathCoefficients | None = _f(ROWS)
    t: Any = _f(ROWS, fill=math.nan)
    exclude: Any = _f(ROWS, fill=-1)
    k: int = _f(MERGED, 1, merge=max)
    exact: bool | None = _f(SHARED)
    nprobe: int = _f(SHARED, 0)
    space: str = _f(SHARED, "data")
    path: str = _f(OWN, "linear")
    sigma_min: float = _f(OWN, 0.0)
    dataset: str = _f(OWN, "")
    fingerprint: str = _f(OWN, "")

    @classmethod
    def build(
        cls,
        x: Any,
        k: Any,
        *,
        t: Any = None,
        path: str = "linear",
        sigma_min: float = 0.0,
        coefficients: Any = None,
        exclude: Any = None,
        exact: bool | None = None,
        nprobe: Any = 0,
        space: str = "data",
        convention: str = "standard",
        dataset: str = "",
        fingerprint: str = "",
    ) -> NearestQuery:
        """The query of an SDK call, checked by every rule that needs no data set facts; with ``t``
        (or coefficients) the points are x_t and the search is for ``x_t / alpha_t``."""
        points = _batch_points(x, "x", None)
        b = points.shape[0]
        kk = rules.integer(k, "k")
        rules.check_k(kk)
        probes = rules.integer(nprobe, "nprobe")
        if exact is not None and not isinstance(exact, bool | np.bool_):
            raise RequestError(f"exact must be True, False or None (the server's choice), got {exact!r}")
        rules.check_nearest_mode(exact, probes)
        rules.space_from_name(space)
        tv = _called_times(t, b, convention, path, coefficients)
        path_name, smin, coeffs = _called_path(b, tv, path, sigma_min, coefficients, required=False)
        exc = None
        if exclude is not None:
            exc = rules.int_vector(exclude, b, "exclude")
            rules.check_exclude(exc, b)
        return cls(
            x=points, coeffs=coeffs, t=tv, exclude=exc, k=kk, exact=None if exact is None else bool(exact),
            nprobe=probes, space=space, path=path_name, sigma_min=smin, dataset=dataset, fingerprint=fingerprint,
        )  # fmt: skip

    def to_request(self, start: int = 0, stop: int | None = None) -> pb.NearestRequest:
        x = self.x if isinstance(self.x, WireArray) else WireArray.encode(self.x, wire_dtype_name(self.x))
        req = pb.NearestRequest(
            dataset=self.dataset,
            fingerprint=self.fingerprint,
            k=self.k,
            nprobe=self.nprobe,
            space=SPACES[self.space],  # type: ignore[arg-type]
        )
        if self.exact is not None:
            req.exact = self.exact
        x.fill(req.x, start, stop)
        stop = self.rows if stop is None else stop
        _fill_vectors(req, {"t": self.t, "exclude": self.exclude}, start, stop)
        if self.coeffs is not None:
            _fill_path(req, self.path, self.sigma_min, self.coeffs, start, stop)
        return req

    @classmethod
    def from_request(cls, req: pb.NearestRequest, max_rows: int) -> NearestQuery:
        exact = req.exact if req.HasField("exact") else None
        nprobe = int(req.nprobe)
        rules.check_nearest_mode(exact, nprobe)
        space = rules.space_from_enum(req.space)
        x = _points(req, "x", max_rows, "a float tensor of shape (B, D) or (B, *sample_shape)")
        b = x.shape[0]
        k = int(req.k)
        rules.check_k(k)
        t = rules.check_times(_decode(req.t, "t", "float"), b) if req.HasField("t") else None
        path, sigma_min, coeffs = _path_of(req, t, b, required=False)
        exclude = _int_vector(req, "exclude")
        if exclude is not None:
            rules.check_exclude(exclude, b)
        return cls(
            x=x, coeffs=coeffs, t=t, exclude=exclude, k=k, exact=exact, nprobe=nprobe, space=space, path=path,
            sigma_min=sigma_min, dataset=req.dataset, fingerprint=req.fingerprint,
        )  # fmt: skip

    def check(self, facts: DatasetFacts, *, max_k: int | None = MAX_TOP_K) -> NearestQuery:
        """The rules that need the data set's facts: the space and its index, the points' layout and
        values, k within N (and ``max_k``, a message's cap; None in-process), exclusions within N.
        Returns the query with (B, D) points."""
        rules.space_from_name(self.space)
        rules.check_nearest_mode(self.exact, self.nprobe)
        if self.coeffs is not None:
            rules.check_posterior_search(self.coeffs.alpha, self.space, facts, self.exact, self.nprobe)
        sp = rules.check_space(facts.name, facts.spaces, self.space, self.exact, self.nprobe)
        sample_shape = facts.sample_shape if self.space == "data" else (sp.dim,)
        x, _ = _layout(self.x, "x", facts.name, sp.dim, sample_shape)
        rules.check_k(self.k, facts.num_samples, max_k)
        exclude = self.exclude
        if exclude is not None:
            exclude = rules.int_vector(exclude, x.shape[0], "exclude")
            rules.check_exclude(exclude, x.shape[0], facts.num_samples)
            rules.check_k_with_exclusion(self.k, exclude, facts.num_samples)
        return replace(self, x=x, exclude=exclude)

    def answer_bytes(self, facts: DatasetFacts) -> int:
        """The size of this query's answer message from a data set with ``facts`` (its tensors'
        bytes, exactly, plus at most :data:`MESSAGE_OVERHEAD`): k indices and distances per point,
        labels when the data set has classes, similarities in a cosine space."""
        columns = 2 + (facts.num_classes > 0) + bool(facts.spaces[self.space].cosine)
        return self.rows * self.k * 8 * columns + MESSAGE_OVERHEAD

    def response(self, result: Any, start: int = 0) -> pb.NearestResponse:
        """The answer from rows [start, start + B) of an engine result (indices, distances, labels,
        similarities, approximate), cut to this query's k."""
        sl = slice(start, start + self.rows)
        resp = pb.NearestResponse(
            dataset=self.dataset, fingerprint=self.fingerprint, approximate=bool(result.approximate)
        )
        fill(resp.indices, result.indices[sl, : self.k], "int64")
        distances = result.distances[sl, : self.k]
        _finite_into(resp.distances, WireArray.encode(distances, "float64"), "distances", distances)
        if result.labels is not None:
            fill(resp.labels, result.labels[sl, : self.k], "int64")
        if result.similarities is not None:
            sims = result.similarities[sl, : self.k]
            _finite_into(resp.similarities, WireArray.encode(sims, "float64"), "similarities", sims)
        return resp

    def empty_response(self, has_labels: bool) -> pb.NearestResponse:
        """The answer to a batch of no points: (0, k) columns."""
        idx = np.zeros((0, self.k), np.int64)
        labels = idx if has_labels else None
        return self.response(_Values(dict(indices=idx, distances=np.zeros((0, self.k)), labels=labels)))


def _finite_into(field: pb.Tensor, wire: WireArray, name: str, exact: Any) -> None:
    """Write an answer's tensor, unless a value in it is not finite: an answer never carries NaN
    or an infinity (RequestError naming the query, and what to change)."""
    row = wire.nonfinite_row()
    if row is not None:
        big = float(np.abs(_as_numpy(exact[row]).astype(np.float64)).max())
        if math.isfinite(big) and wire.dtype.itemsize < 8:
            wider = "float32 or float64" if wire.dtype.itemsize == 2 else "float64"
            raise RequestError(
                f"the {name} of query {row} reaches {big:.4g}, beyond the range of {wire.dtype.name}: ask for the "
                f"answers in {wider} (output_dtype; the SDK's wire_dtype)"
            )
        raise RequestError(
            f"the {name} of query {row} is not finite: its path coefficients, guidance scale or values are too large "
            "for float64 (send ordinary magnitudes)"
        )
    wire.fill(field)


class _Values:
    """A result made of named arrays (the empty answers)."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.__dict__.update(values)
        self.approximate = False
        self.similarities = values.get("similarities")

    def __getattr__(self, name: str) -> Any:
        return None


def _layout(x: Any, name: str, dataset: str, dim: int, sample_shape: Sequence[int]) -> tuple[Any, tuple[int, ...]]:
    """(B, D) rows of the points (a view) and the answers' per-sample shape; every value finite."""
    shape = tuple(int(s) for s in x.shape)
    out_shape = rules.sample_layout(shape, name, dataset, dim, sample_shape)
    flat = x.reshape(shape[0], dim)
    wire = flat if isinstance(flat, WireArray) else WireArray.encode(flat, wire_dtype_name(flat))
    rules.check_finite_rows(wire, name)
    return flat, out_shape


# -- a query in parts (a gang's broadcast) -----------------------------------------------------------


def to_parts(query: _Query) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``query`` as (plain values, numpy arrays), from its own fields: what a gang broadcasts
    (the values as one object, each array as a tensor of the shape and dtype the values name)."""
    meta: dict[str, Any] = {"type": type(query).__name__, "arrays": {}}
    arrays: dict[str, np.ndarray] = {}
    for f in fields(query):
        v = getattr(query, f.name)
        if f.metadata.get("role") != ROWS:
            meta[f.name] = v
        elif isinstance(v, PathCoefficients):
            for n in COEFFICIENT_NAMES:
                arrays[f"{f.name}.{n}"] = getattr(v, n)
            meta[f.name] = "coefficients"
        elif isinstance(v, WireArray):
            arrays[f.name] = v.data
            meta[f.name] = ("wire", v.dtype.name)
        elif v is not None:
            arrays[f.name] = _as_numpy(v)
            meta[f.name] = "array"
        else:
            meta[f.name] = None
    meta["arrays"] = {k: (a.shape, a.dtype.str) for k, a in arrays.items()}
    return meta, arrays


def from_parts(meta: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> OracleQuery | NearestQuery:
    """The query :func:`to_parts` took apart."""
    cls: type[OracleQuery] | type[NearestQuery] = OracleQuery if meta["type"] == "OracleQuery" else NearestQuery
    values: dict[str, Any] = {}
    for f in fields(cls):
        how = meta[f.name]
        if f.metadata.get("role") != ROWS:
            values[f.name] = how
        elif how == "coefficients":
            values[f.name] = PathCoefficients(*(arrays[f"{f.name}.{n}"] for n in COEFFICIENT_NAMES))
        elif isinstance(how, tuple) and how[0] == "wire":
            values[f.name] = WireArray(dtype_by_name(how[1]), np.asarray(arrays[f.name]))
        elif how == "array":
            values[f.name] = arrays[f.name]
        else:
            values[f.name] = None
    return cls(**values)
