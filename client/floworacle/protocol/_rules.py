"""The request rules: one function per rule, with its one message, for the SDK and the server.

The server applies every rule to what it decoded (with the data set's facts: N, D, classes);
the SDK applies the cheap ones before any I/O (without the data set's facts, so limits that
depend on N are checked against the protocol's own caps there). Either way a broken rule raises
:class:`~floworacle.protocol.RequestError` with the same message, so a caller sees one wording
whichever side caught it. Numbers in messages are printed plainly (``t[0] = 1.5``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import grpc
import numpy as np

from floworacle import paths
from floworacle.protocol._codec import WireArray
from floworacle.protocol._errors import RequestError
from floworacle.protocol._limits import MAX_TOP_K
from floworacle.protocol._tables import (
    CONVENTIONS,
    OUTPUT_NAMES,
    OUTPUTS,
    PRECISIONS,
    SAMPLE_OUTPUT_NAMES,
    SPACES,
    OutputSpec,
    output_by_enum,
    output_by_name,
)
from floworacle.v1 import oracle_pb2 as pb

__all__ = [
    "plain",
    "echo",
    "ECHO_CHARS",
    "integer",
    "int_vector",
    "check_batch_shape",
    "sample_layout",
    "check_rows",
    "check_finite_rows",
    "check_times",
    "named_coefficients",
    "custom_coefficients",
    "check_labels",
    "check_exclude",
    "check_guidance",
    "check_reversed_times",
    "check_top_k",
    "check_k",
    "outputs_from_names",
    "outputs_from_enums",
    "precision_from_name",
    "precision_from_enum",
    "space_from_name",
    "space_from_enum",
    "check_convention",
    "check_nearest_mode",
    "check_knn",
    "check_knn_index",
    "KNN_DEFAULT",
    "check_posterior_search",
    "check_k_with_exclusion",
    "check_space",
    "GUIDANCE_NEEDS_LABELS",
    "GUIDANCE_NEEDS_T",
]

GUIDANCE_NEEDS_LABELS = "guidance needs labels: send one class label per query (or drop guidance)"
GUIDANCE_NEEDS_T = "guidance needs t for its interval: send t (shape (B,)) with custom coefficients"
_INT64 = np.iinfo(np.int64)


def plain(x: Any) -> str:
    """A number as a person writes it: ``1.5``, ``3``, ``nan``, never ``np.float64(1.5)``."""
    if isinstance(x, bool | np.bool_):
        return str(bool(x))
    if isinstance(x, int | np.integer):
        return str(int(x))
    if isinstance(x, float | np.floating):
        return f"{float(x):.10g}"
    return str(x)


#: Longest piece of a caller's string echoed into a message (a status message travels in
#: metadata, whose size gRPC limits: an echoed 100 kB name turned NOT_FOUND into RESOURCE_EXHAUSTED).
ECHO_CHARS = 64


def echo(value: str) -> str:
    """A caller's string as a message quotes it: its repr, cut to :data:`ECHO_CHARS` characters."""
    if len(value) <= ECHO_CHARS:
        return repr(value)
    return f"{value[:ECHO_CHARS]!r}... ({len(value)} characters)"


def _shape(shape: Iterable[int]) -> str:
    dims = tuple(int(s) for s in shape)
    return "(" + ", ".join(str(s) for s in dims) + ("," if len(dims) == 1 else "") + ")"


def integer(value: Any, name: str) -> int:
    """An integer argument (``k``, ``top_k``): ints, numpy integers and integral floats; not bools."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | float | np.integer | np.floating):
        raise RequestError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, float | np.floating) and not (math.isfinite(value) and float(value).is_integer()):
        raise RequestError(f"{name} must be an integer, got {plain(value)}")
    return int(value)


def int_vector(values: Any, batch: int, name: str) -> np.ndarray:
    """A scalar or (B,) array of integers -> (B,) int64; refuses non-integers and values that do not
    fit int64 (never wraps them)."""
    if hasattr(values, "detach") and hasattr(values, "cpu"):  # torch, without importing it
        values = values.detach().cpu().numpy()
    a = np.asarray(values)
    if a.dtype.kind == "b" or a.dtype.kind not in "iuf":
        raise RequestError(f"{name} must be integers (data set or class indices), got dtype {a.dtype}")
    if a.dtype.kind == "f":
        bad = ~np.isfinite(a) | (np.mod(a, 1) != 0) if a.size else np.zeros(a.shape, bool)
        if bad.any():
            i = int(np.flatnonzero(bad.reshape(-1))[0])
            raise RequestError(f"{name} must be integers, got {plain(a.reshape(-1)[i])} at [{i}]")
    if a.size:
        # floats compare exactly against the powers of two (int64's max rounds up to 2^63 in float64)
        high = a >= 2.0**63 if a.dtype.kind == "f" else a > _INT64.max
        low = a < -(2.0**63) if a.dtype.kind == "f" else a < _INT64.min
        bad = (high | low).reshape(-1)
        if bad.any():
            big = a.reshape(-1)[int(np.flatnonzero(bad)[0])]
            raise RequestError(f"{name} holds {plain(big)}, which does not fit int64")
    if a.ndim == 0:
        a = np.full((batch,), a, dtype=np.int64)
    if a.shape != (batch,):
        raise RequestError(f"{name} must be a scalar or have shape ({batch},), one per query, got {_shape(a.shape)}")
    return a.astype(np.int64)


# -- queries -----------------------------------------------------------------------------------


def check_batch_shape(shape: Sequence[int], field: str) -> None:
    """Queries need a batch dimension: (B, D) or (B, *sample_shape); B may be 0."""
    if len(shape) < 2:
        raise RequestError(
            f"{field} must have shape (B, D) or (B, *sample_shape), got {_shape(shape)}; "
            "a single query still needs the batch dimension (x[None])"
        )


def sample_layout(
    shape: Sequence[int], field: str, dataset: str, dim: int, sample_shape: Sequence[int]
) -> tuple[int, ...]:
    """The per-sample shape of the answers: the data set's sample shape or (D,), whichever the
    queries use; anything else breaks the rule."""
    check_batch_shape(shape, field)
    rest = tuple(int(s) for s in shape[1:])
    if rest == tuple(sample_shape):
        return tuple(sample_shape)
    if rest == (dim,):
        return (dim,)
    flat = f"(B, {dim})"
    expect = flat if tuple(sample_shape) == (dim,) else f"{flat} or (B, {', '.join(str(s) for s in sample_shape)})"
    raise RequestError(f"{field} has shape {_shape(shape)}; data set {dataset!r} expects {expect}")


def check_rows(rows: int, field: str, max_rows: int) -> None:
    """At most ``max_rows`` rows per request (RESOURCE_EXHAUSTED: the caller should split)."""
    if rows > max_rows:
        raise RequestError(
            f"{field} has {rows} rows; this server accepts at most {max_rows} per request "
            "(max_request_rows): split the batch (the SDK does this automatically)",
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        )


def check_finite_rows(points: WireArray, field: str) -> None:
    """Every value of the (B, ...) points finite (:meth:`WireArray.nonfinite_row`)."""
    row = points.nonfinite_row()
    if row is not None:
        raise RequestError(f"{field}[{row}] has a NaN or Inf; send finite values")


# -- path and time -----------------------------------------------------------------------------


def check_times(t: np.ndarray, batch: int, field: str = "t") -> np.ndarray:
    """(B,) finite times as float64."""
    t = np.asarray(t, dtype=np.float64)
    if t.shape != (batch,):
        raise RequestError(f"{field} must have shape ({batch},), one value per query, got {_shape(t.shape)}")
    bad = ~np.isfinite(t)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise RequestError(f"{field}[{i}] = {plain(t[i])} is not finite")
    return t


def named_coefficients(name: str, sigma_min: float, t: np.ndarray) -> paths.PathCoefficients:
    """The coefficients of a named path at t; t outside the path's range breaks the rule."""
    try:
        return paths.get_path(name or "linear", sigma_min).coefficients(t)
    except ValueError as exc:
        raise RequestError(str(exc)) from None


def custom_coefficients(values: Sequence[np.ndarray], batch: int) -> paths.PathCoefficients:
    """Per-query (alpha, sigma, d_alpha, d_sigma), each (B,), validated."""
    names = paths.COEFFICIENT_NAMES
    for name, v in zip(names, values, strict=True):
        if np.shape(v) != (batch,):
            raise RequestError(
                f"path.custom.{name} must have shape ({batch},), one value per query, got {_shape(np.shape(v))}"
            )
    try:
        return paths.custom_coefficients(*values)
    except ValueError as exc:
        raise RequestError(f"path.custom: {exc}") from None


def check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise RequestError(f"convention must be one of {list(CONVENTIONS)}, got {convention!r}")


# -- labels, exclusion, guidance ----------------------------------------------------------------


def check_labels(labels: np.ndarray, batch: int, dataset: str | None = None, num_classes: int | None = None) -> None:
    """(B,) int64 class labels, -1 (unconditional) .. num_classes - 1; the data set must have labels.

    Without ``num_classes`` (the SDK) only what holds for every data set is checked."""
    if labels.shape != (batch,):
        raise RequestError(f"labels must have shape ({batch},), one per query, got {_shape(labels.shape)}")
    low = labels < -1
    if low.any():
        i = int(np.flatnonzero(low)[0])
        raise RequestError(
            f"labels[{i}] = {plain(labels[i])} is not a class index (-1 means unconditional for that query)"
        )
    if num_classes is None:
        return
    if num_classes == 0:
        raise RequestError(f"data set {dataset!r} has no labels; send no labels (unconditional oracle)")
    high = labels >= num_classes
    if high.any():
        i = int(np.flatnonzero(high)[0])
        raise RequestError(
            f"labels[{i}] = {plain(labels[i])} is outside the classes 0..{num_classes - 1} of data set {dataset!r} "
            "(-1 means unconditional for that query)"
        )


def check_exclude(exclude: np.ndarray, batch: int, num_samples: int | None = None) -> None:
    """(B,) int64 data set indices to leave out, -1 (none) .. N - 1; without ``num_samples`` (the
    SDK) only what holds for every data set is checked."""
    if exclude.shape != (batch,):
        raise RequestError(f"exclude must have shape ({batch},), one index per query, got {_shape(exclude.shape)}")
    low = exclude < -1
    if low.any():
        i = int(np.flatnonzero(low)[0])
        raise RequestError(f"exclude[{i}] = {plain(exclude[i])} is not a data set index (-1 leaves nothing out)")
    if num_samples is None:
        return
    high = exclude >= num_samples
    if high.any():
        i = int(np.flatnonzero(high)[0])
        raise RequestError(
            f"exclude[{i}] = {plain(exclude[i])} is past the data set's {num_samples} samples (indices 0..{num_samples - 1})"
        )


def check_guidance(scale: float, t_lo: float, t_hi: float, time: str = "t") -> tuple[float, float, float]:
    """A finite CFG scale and interval 0 <= lo <= hi <= 1 (in ``time``: "t", or "s" in the
    reversed convention, as the caller gave it)."""
    if not all(math.isfinite(v) for v in (scale, t_lo, t_hi)):
        raise RequestError(
            f"guidance scale and interval must be finite, got scale = {plain(scale)}, "
            f"interval = [{plain(t_lo)}, {plain(t_hi)}]"
        )
    if not 0.0 <= t_lo <= t_hi <= 1.0:
        raise RequestError(
            f"guidance interval must satisfy 0 <= {time}_lo <= {time}_hi <= 1, got [{plain(t_lo)}, {plain(t_hi)}]"
        )
    return float(scale), float(t_lo), float(t_hi)


def check_reversed_times(s: np.ndarray) -> None:
    """Times s of the reversed convention (s = 1 noise, s = 0 data) within the linear path's
    range, said in s: s = 0 (sigma = 0) is excluded, the velocity is singular there."""
    s_min = 1.0 - paths.get_path("linear").t_max
    bad = (s < s_min) | (s > 1.0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise RequestError(
            f"s[{i}] = {plain(s[i])} is outside [{plain(s_min)}, 1] for the reversed convention (s = 1 is noise, "
            "s = 0 is data; the end where sigma < 1e-4 is excluded because the velocity is singular there)"
        )


# -- outputs, precision, counts ------------------------------------------------------------------


def _within_data(name: str, value: int, num_samples: int | None) -> None:
    if num_samples is not None and value > num_samples:
        raise RequestError(f"{name} = {plain(value)} is more than the data set's {num_samples} samples")


def check_top_k(top_k: int, wanted: bool, num_samples: int | None = None) -> None:
    """``top_k`` in 1..1024 (and at most N) when the top-k output is wanted, else >= 0."""
    if top_k < 0:
        raise RequestError(f"top_k must be >= 0, got {plain(top_k)}")
    if wanted and not 1 <= top_k <= MAX_TOP_K:
        raise RequestError(f"the topk output needs top_k in 1..{MAX_TOP_K}, got {plain(top_k)}")
    _within_data("top_k", top_k, num_samples)


def check_k(k: int, num_samples: int | None = None, cap: int | None = MAX_TOP_K) -> None:
    """``k`` nearest neighbours, 1..1024 (a message's cap; None: none, in-process) and at most N."""
    if k < 1 or (cap is not None and k > cap):
        raise RequestError(f"k must lie in 1..{cap}, got {plain(k)}" if cap else f"k must be >= 1, got {plain(k)}")
    _within_data("k", k, num_samples)


def outputs_from_names(names: Iterable[str]) -> tuple[OutputSpec, ...]:
    """The SDK's ``outputs=``: a non-empty subset of the output names, in table order."""
    wanted = tuple(dict.fromkeys(names))
    unknown = [n for n in wanted if output_by_name(n) is None]
    if unknown or not wanted:
        raise RequestError(f"outputs must be a non-empty subset of {list(OUTPUT_NAMES)}, got {list(wanted)}")
    return tuple(o for o in OUTPUTS if o.name in wanted)


def outputs_from_enums(values: Iterable[int], top_k: int) -> tuple[OutputSpec, ...]:
    """A request's ``outputs``: empty means velocity; a top_k > 0 also means the top-k output."""
    specs: set[str] = set()
    for v in values:
        spec = output_by_enum(int(v))
        if spec is None:
            choices = [pb.Output.Name(o.enum) for o in OUTPUTS]
            raise RequestError(f"unknown output {plain(v)}; choose from {choices}")
        specs.add(spec.name)
    if not specs:
        specs.add("velocity")
    if top_k > 0:
        specs.add("topk")
    return tuple(o for o in OUTPUTS if o.name in specs)


#: Neighbours and tail samples of a kNN answer when the request says 0.
KNN_DEFAULT = 128


def check_knn(precision: str, knn_k: int, knn_tail: int, outputs: tuple[str, ...]) -> tuple[int, int]:
    """``knn_k`` / ``knn_tail`` belong to precision "knn" (each 1..1024, 0: 128), whose answer gives
    only velocity, x1_hat, eps_hat and score. Returns the two with the defaults filled in."""
    if precision != "knn":
        if knn_k or knn_tail:
            raise RequestError(
                f"knn_k = {plain(knn_k)} and knn_tail = {plain(knn_tail)} belong to precision='knn'; "
                f"drop them or ask for precision='knn'"
            )
        return 0, 0
    for name, value in (("knn_k", knn_k), ("knn_tail", knn_tail)):
        if not 0 <= value <= MAX_TOP_K:
            raise RequestError(f"{name} must lie in 1..{MAX_TOP_K} (0: {KNN_DEFAULT}), got {plain(value)}")
    other = [o for o in outputs if o not in SAMPLE_OUTPUT_NAMES]
    if other:
        raise RequestError(
            f"precision='knn' answers {list(SAMPLE_OUTPUT_NAMES)}; {other} need the whole posterior: ask "
            "precision='exact' for them"
        )
    return knn_k or KNN_DEFAULT, knn_tail or KNN_DEFAULT


def check_knn_index(dataset: str, spaces: Any) -> None:
    """The kNN target finds its neighbours through the data set's faiss index (an exact search
    would read every row: more than the exact oracle costs)."""
    if not spaces["data"].index_nlist:
        raise RequestError(
            f"precision='knn' searches data set {dataset!r}'s faiss index, and it has none (or it is a gang's "
            "shard); build one with `floworacle index build ... --nearest-index ivf`, or ask precision='exact'",
            grpc.StatusCode.FAILED_PRECONDITION,
        )


def check_kind_served(kind: str, dataset: str, sharded: bool) -> None:
    """The local, equivariant and linear oracles run in one process: a gang's shards refuse them."""
    if sharded and kind != "global":
        raise RequestError(
            f"kind={kind!r} is computed by one process, and data set {dataset!r} is held in shards by a gang; "
            "ask a single-process server for it, or kind='global'",
            grpc.StatusCode.FAILED_PRECONDITION,
        )


def precision_from_name(name: str) -> int:
    if name not in PRECISIONS:
        raise RequestError(f"precision must be one of {list(PRECISIONS)}, got {name!r}")
    return PRECISIONS[name]


def precision_from_enum(value: int) -> str:
    if value == pb.PRECISION_UNSPECIFIED:
        return "exact"
    for name, enum in PRECISIONS.items():
        if enum == value:
            return name
    names = " or ".join(pb.Precision.Name(v) for v in PRECISIONS.values())
    raise RequestError(f"unknown precision {plain(value)}; use {names}")


def space_from_name(name: str) -> int:
    if name not in SPACES:
        raise RequestError(f"space must be one of {list(SPACES)}, got {name!r}")
    return SPACES[name]


def space_from_enum(value: int) -> str:
    if value == pb.SPACE_UNSPECIFIED:
        return "data"
    for name, enum in SPACES.items():
        if enum == value:
            return name
    raise RequestError(f"unknown space {plain(value)}; use SPACE_DATA or SPACE_FEATURES")


def check_nearest_mode(exact: bool | None, nprobe: int) -> None:
    """``nprobe`` tunes an approximate index search; an exact search has nothing to probe."""
    if nprobe < 0:
        raise RequestError(f"nprobe must be >= 0, got {plain(nprobe)}")
    if exact and nprobe:
        raise RequestError(
            f"nprobe = {plain(nprobe)} asks for an index search, but exact = true asks for brute force; drop one"
        )


def check_posterior_search(alpha: np.ndarray, space: str, facts: Any, exact: bool | None, nprobe: int) -> None:
    """A posterior-nearest query (with t) needs alpha_t > 0 and searches the data space; on a data
    set with sample weights (they enter the ranking, which an index cannot) it is exact only."""
    zero = alpha <= 0
    if zero.any():
        i = int(np.flatnonzero(zero)[0])
        raise RequestError(
            f"alpha_t[{i}] = 0 (pure noise, t = 0): x_t says nothing about which sample it came from; "
            "use t > 0 for posterior-nearest queries"
        )
    if space != "data":
        raise RequestError("posterior-nearest queries (with t) search the data space; drop t or space")
    if facts.has_weights and (exact is False or nprobe):
        raise RequestError(
            f"data set {facts.name!r} has sample weights, which enter the posterior ranking but not an index's; "
            "posterior-nearest queries on it are exact only (drop exact=False / nprobe)"
        )


def check_k_with_exclusion(k: int, exclude: np.ndarray, num_samples: int) -> None:
    """A query that leaves a sample out has N - 1 left: k must fit."""
    if k > num_samples - 1 and bool((exclude >= 0).any()):
        raise RequestError(
            f"k = {k} leaves no room for an exclusion: with exclude, k must be at most N - 1 = {num_samples - 1}"
        )


def check_space(dataset: str, spaces: Any, space: str, exact: bool | None, nprobe: int) -> Any:
    """The data set must have the space, and an index for an index search (``exact=False`` or
    ``nprobe``) with at least ``nprobe`` inverted lists (FAILED_PRECONDITION: the caller must build
    something first). Returns the space's facts."""
    failed = grpc.StatusCode.FAILED_PRECONDITION
    sp = spaces.get(space)
    if sp is None:
        raise RequestError(
            f"data set {dataset!r} has no feature space; build its index with `floworacle index build ... --features "
            "FEATURES.npy` (or attach features in-process)",
            failed,
        )
    if exact is False or nprobe:
        if not sp.index_nlist:
            flag = "--nearest-index ivf" if space == "data" else "--features-index ivf"
            raise RequestError(
                f"the {space} space of {dataset!r} has no nearest index, so only exact search is available; "
                f"build one with `floworacle index build ... {flag}` or drop exact=False / nprobe",
                failed,
            )
        if nprobe > sp.index_nlist:
            raise RequestError(
                f"nprobe must be at most the index's {sp.index_nlist} inverted lists, got {nprobe}", failed
            )
    return sp
