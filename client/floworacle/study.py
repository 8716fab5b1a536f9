"""Model study: where a velocity model sits between the training-set oracle, the held-out oracle
and the leave-one-out oracle along t, and how many of its samples copy training samples.

Queries ``x_t = alpha_t x1 + sigma_t x0`` are built from M training samples and from M held-out
samples, the same M pairs (x1, x0) per source at every t of a grid. At each query the model's
velocity ``u_m`` is compared with the exact oracle velocity over the training set ``u_tr``, over
the held-out set ``u_ho`` and, for queries built from training sample i, over the training set
without sample i ``u_loo`` (leave-one-out: the target of a model that generalises to sample i):

    d_X(t) = mean_b ||u_m(x_t,b) - u_X(x_t,b)||^2 / D        (X in tr, ho, loo)

Every velocity of one x_t has the form ``A_t x1 + B_t x_t``, so ``d_X = A_t^2 d1_X`` with d1_X the
same mean over the x1-predictions; the report gives both. Early in the path (navigation) both
oracles point at a mixture of modes and a model close to one is close to the other; late
(refinement) the training oracle collapses onto the nearest training sample. The model's own
navigation -> refinement point is the first t where ``d_tr < 1/2 d_ho`` on the training-sample
queries (linearly interpolated on the grid): from there on it is close to the training oracle
only. On the held-out queries the held-out oracle collapses onto the query's own (unseen)
sample; the same crossing there says the model pulls unseen samples toward training samples.
Late in the path any good denoiser follows the oracle of the set its query came from, so the
crossing on training-sample queries also happens for a model that generalises; what tells
memorisation apart is the fit ratio ``d_tr(training queries) / d_ho(held-out queries)``: about 1
when the model treats training and unseen samples alike, well below 1 when it fits its training
samples better than unseen ones.

References that generalise (``StudyConfig.kinds``): the same queries (the first
``kind_queries`` of each source) answered by the local, equivariant local and linear oracles over
the training set (Kamb & Ganguli 2025; the Gaussian / Wiener denoiser), and per t the model's
distance to each of them beside its distance to the exact (global) oracle, and which one it is
closest to. The patch oracles take one patch size P or a schedule over t (``patch_size``).

Samples: the model's ODE from noise (``floworacle.sampling.integrate``, any sampler) gives
samples whose nearest and second-nearest training samples (d1 <= d2) flag a copy when
``d1 / d2 < 1/3``; the baseline is the same share for held-out samples. Quality beside it: the
mean distance of the model's samples to their nearest held-out sample, beside the same for
training samples.

Mixed sampling (:meth:`ModelStudy.mixed`, Liu et al. Fig. 5): the same noise integrated with the
training-set oracle up to a switch time and with the model after it
(``floworacle.sampling.integrate_mixed``); per switch time the share of copies and the distance
to the nearest training sample. Switching before the data set's navigation -> refinement point
leaves the model room to make new samples; after it the oracle has already picked the training
sample the path ends on.

A data set is anything with the :class:`StudyData` methods: :class:`ClientData` asks a server
(one per set, or two names on one server); ``floworacle analyze model`` runs the same study
in-process through an engine adapter. numpy only; torch is imported when the model is a torch
module (or ``inputs="torch"``), matplotlib when a plot is drawn.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path as FilePath
from typing import Any, Protocol

import numpy as np

from floworacle import paths
from floworacle.protocol import KINDS, PATCH_KINDS, patch_schedule
from floworacle.sampling import METHODS, integrate, integrate_mixed

__all__ = [
    "DEFAULT_T_GRID",
    "REFERENCE_KINDS",
    "COPY_THRESHOLD",
    "SWITCH_RATIO",
    "NearestAnswer",
    "StudyData",
    "ClientData",
    "StudyConfig",
    "ModelStudy",
    "ModelStudyReport",
    "MixedSamplingReport",
    "as_velocity",
    "first_below",
    "parse_patch_size",
    "text_table",
    "model_study",
    "plot_model_study",
]

#: Default t grid: 25 points, 0.02 to 0.98 in steps of 0.04 (five per fifth of the path).
DEFAULT_T_GRID: tuple[float, ...] = tuple(round(0.02 + 0.04 * i, 10) for i in range(25))
#: A sample is a copy when d1 / d2 is below this (nearest / second-nearest training sample).
COPY_THRESHOLD = 1.0 / 3.0
#: The model's switch: first t where d_tr / d_ho falls below this.
SWITCH_RATIO = 0.5

_SOURCES = ("train", "heldout")
#: Oracle kinds a model can be compared with besides the exact ("global") one.
REFERENCE_KINDS = tuple(k for k in KINDS if k != "global")

PatchSize = int | Sequence[tuple[float, int]]


def text_table(rows: Sequence[Sequence[str]], *, left: bool = False, rules_before: Sequence[int] = (1,)) -> str:
    """Rows of cells as columns two spaces apart, right-aligned (``left``: left-aligned, lines
    right-stripped), with a rule of dashes before each row index of ``rules_before`` (default: under
    the header; a negative index counts from the end)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if left else c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    if left:
        lines = [line.rstrip() for line in lines]
    rule = "  ".join("-" * w for w in widths)
    for i in sorted({i % len(rows) for i in rules_before}, reverse=True):
        lines.insert(i, rule)
    return "\n".join(lines)


def parse_patch_size(text: str) -> PatchSize:
    """``"5"`` or a schedule ``"0:7,0.5:5,0.8:3"`` (P = 7 from t = 0, 5 from 0.5, 3 from 0.8)."""
    text = text.strip()
    try:
        if ":" not in text:
            return int(text)
        pairs = [(float(a), int(b)) for a, b in (part.split(":") for part in text.split(","))]
    except ValueError:
        raise ValueError(f"patch size {text!r}: write P (odd) or a schedule T:P,T:P,... starting at 0") from None
    try:
        patch_schedule(0.0, pairs)  # the protocol's rule for a schedule
    except ValueError:
        raise ValueError(f"patch schedule {text!r}: times must increase from 0, e.g. 0:7,0.5:5,0.8:3") from None
    return pairs


@dataclass(frozen=True)
class NearestAnswer:
    """k nearest samples of B points: (B, k) int64 indices, (B, k) float64 distances (increasing)."""

    indices: np.ndarray
    distances: np.ndarray
    approximate: bool = False


class StudyData(Protocol):
    """A data set as the study uses it: its samples by index, its oracle, its nearest samples.

    Indices are the data set's own (the order its samples were given in); arrays are flat
    (B, D) float64.
    """

    @property
    def name(self) -> str: ...

    @property
    def fingerprint(self) -> str: ...

    @property
    def num_samples(self) -> int: ...

    @property
    def sample_shape(self) -> tuple[int, ...]: ...

    def samples(self, indices: np.ndarray) -> np.ndarray:
        """(k, D) float64 samples with these indices."""
        ...

    def velocity(
        self,
        x_t: np.ndarray,
        t: np.ndarray,
        path: paths.Path,
        exclude: np.ndarray | None,
        *,
        kind: str = "global",
        patch_size: int | None = None,
    ) -> np.ndarray:
        """(B, D) float64 oracle velocity at (x_t, t) on ``path``; ``exclude`` (B,) int64
        leaves that sample out of that query's posterior (-1: none). ``kind``: "global" (the
        exact oracle), "local", "equivariant" (with ``patch_size``) or "linear"; the study asks
        for the other kinds only when its config names them."""
        ...

    def nearest(self, x: np.ndarray, k: int) -> NearestAnswer:
        """The k nearest samples (L2) of each row of x (B, D)."""
        ...


class ClientData:
    """A data set on a Flow Oracle server, with the caller's local copy of its samples.

    The API serves no raw samples, so the study's x1 come from ``samples``: the whole set in the
    server's order (for an index built with ``--holdout``: the part's ``data.npy``). A spot check
    on first use (the nearest served sample of a few local rows must be that row) catches a copy
    in another order or of other data.

    Args:
        client: an :class:`floworacle.OracleClient` (each set may live on its own server).
        dataset: the server's name for the set (None: the client's default).
        samples: (N, *sample_shape) numpy array or torch tensor, the set in the server's order.
        fingerprint: pin the set (calls fail if the server holds other data under that name).
        check_rows: rows of the spot check (0: none).
    """

    def __init__(
        self,
        client: Any,
        dataset: str | None,
        samples: Any,
        *,
        fingerprint: str | None = None,
        check_rows: int = 8,
    ) -> None:
        info = client.describe(dataset)
        x = _as_float64(samples)
        if x.ndim < 2 or x.shape[0] != info.num_samples or math.prod(x.shape[1:]) != info.dim:
            raise ValueError(
                f"samples of shape {tuple(x.shape)} do not match data set {info.name!r} on the server "
                f"({info.num_samples} samples of shape {info.sample_shape}); give the whole set in the server's order"
            )
        self._client = client
        self._dataset = info.name
        self._pin = fingerprint
        self._info = info
        self._x = x.reshape(x.shape[0], -1)
        self._check_rows = int(check_rows)
        self._checked = False

    @property
    def name(self) -> str:
        return str(self._info.name)

    @property
    def fingerprint(self) -> str:
        return str(self._info.fingerprint)

    @property
    def num_samples(self) -> int:
        return int(self._info.num_samples)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self._info.sample_shape)

    def _check(self) -> None:
        if self._checked or self._check_rows <= 0:
            self._checked = True
            return
        n = self.num_samples
        rows = np.unique(np.linspace(0, n - 1, min(self._check_rows, n)).astype(np.int64))
        got = self._client.nearest(self._x[rows], k=1, dataset=self._dataset, fingerprint=self._pin, exact=True)
        idx = np.asarray(got.indices, dtype=np.int64)[:, 0]
        dist = np.asarray(got.distances, dtype=np.float64)[:, 0]
        own = np.linalg.norm(self._x[idx] - self._x[rows], axis=1)
        bad = (idx != rows) & (own > 0)  # a duplicated sample may be answered by its twin
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"the local samples do not match data set {self.name!r} on the server: local row {int(rows[i])}'s "
                f"nearest served sample is {int(idx[i])} (distance {float(dist[i]):.3g}); give the set's samples in "
                "the server's order"
            )
        self._checked = True

    def samples(self, indices: np.ndarray) -> np.ndarray:
        self._check()
        return self._x[np.asarray(indices, dtype=np.int64)]

    def velocity(
        self,
        x_t: np.ndarray,
        t: np.ndarray,
        path: paths.Path,
        exclude: np.ndarray | None,
        *,
        kind: str = "global",
        patch_size: int | None = None,
    ) -> np.ndarray:
        # the other kinds travel as keywords of the SDK's velocity (kind=, patch_size=)
        extra: dict[str, Any] = {} if kind == "global" else {"kind": kind}
        if patch_size is not None:
            extra["patch_size"] = int(patch_size)
        u = self._client.velocity(
            x_t,
            t,
            dataset=self._dataset,
            fingerprint=self._pin,
            path=path.name,
            sigma_min=float(getattr(path, "sigma_min", 0.0)),
            exclude=exclude,
            **extra,
        )
        return np.asarray(u, dtype=np.float64).reshape(x_t.shape[0], -1)

    def nearest(self, x: np.ndarray, k: int) -> NearestAnswer:
        got = self._client.nearest(x, k=k, dataset=self._dataset, fingerprint=self._pin)
        return NearestAnswer(
            np.asarray(got.indices, dtype=np.int64),
            np.asarray(got.distances, dtype=np.float64),
            bool(got.approximate),
        )


def _as_float64(a: Any) -> np.ndarray:
    if hasattr(a, "detach") and hasattr(a, "cpu"):
        return np.asarray(a.detach().cpu().double().numpy())
    return np.asarray(a, dtype=np.float64)


# -- the model -----------------------------------------------------------------------------

Velocity = Callable[[np.ndarray, np.ndarray], np.ndarray]


def as_velocity(
    model: Any,
    sample_shape: Sequence[int],
    *,
    inputs: str = "auto",
    convention: str = "standard",
    batch_rows: int = 1024,
) -> Velocity:
    """Wrap a model ``(x_t, t) -> u`` as a numpy function of flat float64 (B, D) queries.

    Args:
        model: a torch module or any callable taking x_t (B, *sample_shape) and t (B,).
        sample_shape: the shape the model sees per sample.
        inputs: "torch" (tensors in the dtype and on the device of the module's first floating
            parameter, float32 on the CPU without one; evaluated under ``torch.no_grad`` with
            the module in eval mode, its mode restored after each call), "numpy" (float64
            arrays) or "auto" (torch for a ``torch.nn.Module``, else numpy).
        convention: "standard" (t = 0 noise) or "reversed" (a model of ``x_s = (1 - s) x_data +
            s noise`` predicting ``noise - x_data``: called with s = 1 - t, its output negated).
        batch_rows: rows per model call.

    Raises:
        ValueError: an unknown option, or (at call time) an output of the wrong size or not finite.
    """
    if convention not in ("standard", "reversed"):
        raise ValueError(f"convention must be 'standard' or 'reversed', got {convention!r}")
    if inputs not in ("auto", "torch", "numpy"):
        raise ValueError(f"inputs must be 'auto', 'torch' or 'numpy', got {inputs!r}")
    if not callable(model):
        raise ValueError(f"the model must be callable as model(x_t, t); got {type(model).__name__}")
    if isinstance(model, type):
        raise ValueError(f"the model {model.__name__} is a class; give an instance (a module) or a function")
    shape = tuple(int(s) for s in sample_shape)
    dim = math.prod(shape)
    use_torch = inputs == "torch" or (inputs == "auto" and _is_torch_module(model))
    sign = -1.0 if convention == "reversed" else 1.0
    call = _torch_caller(model, shape) if use_torch else _numpy_caller(model, shape)

    def velocity(x: np.ndarray, t: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64).reshape(x.shape[0], dim)
        t = np.asarray(t, dtype=np.float64).reshape(-1)
        t_model = 1.0 - t if convention == "reversed" else t
        out = np.empty_like(x)
        for s in range(0, x.shape[0], batch_rows):
            u = call(x[s : s + batch_rows], t_model[s : s + batch_rows])
            b = min(batch_rows, x.shape[0] - s)
            if u.size != b * dim:
                raise ValueError(
                    f"the model returned {tuple(u.shape)} for x_t of shape {(b, *shape)}; a velocity model returns "
                    "one value per input value"
                )
            out[s : s + b] = sign * u.reshape(b, dim)
        if not np.isfinite(out).all():
            raise ValueError("the model returned NaN or Inf; check the model and its time convention (t = 0 noise)")
        return out

    return velocity


def _is_torch_module(model: Any) -> bool:
    try:
        import torch
    except ImportError:
        return False
    return isinstance(model, torch.nn.Module)


def _numpy_caller(model: Any, shape: tuple[int, ...]) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    def call(x: np.ndarray, t: np.ndarray) -> np.ndarray:
        return _as_float64(model(x.reshape(x.shape[0], *shape), t))

    return call


def _torch_caller(model: Any, shape: tuple[int, ...]) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    import torch

    dtype, device = torch.float32, torch.device("cpu")
    if isinstance(model, torch.nn.Module):
        for p in (*model.parameters(), *model.buffers()):
            if p.is_floating_point():
                dtype, device = p.dtype, p.device
                break

    def call(x: np.ndarray, t: np.ndarray) -> np.ndarray:
        xt = torch.from_numpy(x).to(device=device, dtype=dtype).reshape(x.shape[0], *shape)
        tt = torch.from_numpy(t).to(device=device, dtype=dtype)
        was_training = isinstance(model, torch.nn.Module) and model.training
        try:
            if isinstance(model, torch.nn.Module):
                model.eval()
            with torch.no_grad():
                u = model(xt, tt)
        finally:
            if was_training:
                model.train()
        return np.asarray(torch.as_tensor(u).detach().to("cpu", torch.float64).numpy())

    return call


# -- configuration and report ---------------------------------------------------------------


@dataclass(frozen=True)
class StudyConfig:
    """What the study measures.

    Attributes:
        t_grid: times of the distance curves (inside the path's domain).
        queries_per_t: M queries per source (training, held-out), the same pairs at every t.
        num_samples: model samples drawn from noise for the copy test.
        steps, method, shift: the default sampler (``floworacle.sampling.integrate``).
        threshold: copy threshold on d1 / d2.
        switch_ratio: the model's switch is the first t where d_tr / d_ho < switch_ratio.
        path, sigma_min: the probability path of the model and the queries.
        seed: seed of the queries and of the sampler's noise.
        batch_rows: rows per oracle and nearest call.
        kinds: reference kinds among "local", "equivariant", "linear" (empty: none), compared
            with the model on the first ``kind_queries`` queries of each source at every t.
        patch_size: the patch kinds' P: one odd size, or ``(t_start, P)`` pairs (a schedule).
        kind_queries: queries per source and t for the reference kinds (the equivariant kind
            costs N (H W)^2 C P^2 multiply-adds per query).
    """

    t_grid: Sequence[float] = DEFAULT_T_GRID
    queries_per_t: int = 256
    num_samples: int = 1000
    steps: int = 50
    method: str = "midpoint"
    shift: float = 1.0
    threshold: float = COPY_THRESHOLD
    switch_ratio: float = SWITCH_RATIO
    path: str = "linear"
    sigma_min: float = 0.0
    seed: int = 0
    batch_rows: int = 1024
    kinds: Sequence[str] = ()
    patch_size: PatchSize = 3
    kind_queries: int = 64

    def validated(self) -> tuple[paths.Path, np.ndarray]:
        """(path, grid) after checking every field; ValueError says which field and why."""
        p = paths.get_path(self.path, self.sigma_min)
        t = np.unique(np.asarray(list(self.t_grid), dtype=np.float64))
        if t.size < 2:
            raise ValueError("the t grid needs at least two distinct times")
        p.coefficients(t)
        if self.queries_per_t < 1 or self.num_samples < 1 or self.batch_rows < 1:
            raise ValueError(
                f"queries_per_t ({self.queries_per_t}), num_samples ({self.num_samples}) and batch_rows "
                f"({self.batch_rows}) must be >= 1"
            )
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.steps < 1 or not self.shift > 0:
            raise ValueError(f"steps must be >= 1 and shift > 0, got {self.steps} and {self.shift}")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"the copy threshold must lie in (0, 1], got {self.threshold}")
        if not self.switch_ratio > 0:
            raise ValueError(f"switch_ratio must be > 0, got {self.switch_ratio}")
        unknown = set(self.kinds) - set(REFERENCE_KINDS)
        if unknown:
            raise ValueError(
                f"kinds {sorted(unknown)} are not reference kinds; use some of {', '.join(REFERENCE_KINDS)}"
            )
        if self.kinds and not 1 <= self.kind_queries:
            raise ValueError(f"kind_queries must be >= 1, got {self.kind_queries}")
        sizes = [self.patch_size] if isinstance(self.patch_size, (int, np.integer)) else [p for _, p in self.patch_size]
        if any(int(q) < 1 or int(q) % 2 == 0 for q in sizes):
            raise ValueError(f"patch sizes must be odd and >= 1, got {self.patch_size}")
        return p, t


def first_below(t: np.ndarray, curve: np.ndarray, level: float) -> float | None:
    """First t where ``curve`` is below ``level``, linearly interpolated between grid points;
    t[0] if it starts below, None if it never gets there (NaN counts as not below)."""
    below = np.flatnonzero(curve < level)
    if below.size == 0:
        return None
    j = int(below[0])
    if j == 0:
        return float(t[0])
    c0, c1 = float(curve[j - 1]), float(curve[j])
    if not math.isfinite(c0):  # a 0/0 or x/0 ratio before: no line to interpolate on
        return float(t[j])
    return float(t[j - 1] + (c0 - level) / (c0 - c1) * (t[j] - t[j - 1]))


@dataclass
class ModelStudyReport:
    """The figures of one model study.

    Attributes:
        t: (T,) the grid.
        velocity: ``velocity[source][oracle]`` (T,) mean ``||u_m - u_oracle||^2 / D``; source
            "train" (queries from training samples; oracles train, heldout, loo) or "heldout"
            (queries from held-out samples; oracles train, heldout).
        x1: the same in x1-prediction space (``velocity / A_t^2``).
        switch: ``switch[source]``: first t where d_tr / d_ho < ``switch_ratio`` (None: never).
        samples: the copy test and the quality figures (see :meth:`to_json`).
        info: data sets, model, path, seed, sampler.
        per_query: ``per_query[source][oracle]`` (T, M) velocity distances per query (not in JSON).
        query_rows: ``query_rows[source]`` (M,) data set indices of the queries' x1 (not in JSON).
        query_noise: ``query_noise[source]`` (M, D) their x0 (not in JSON).
        generated: (S, D) the model's samples (not in JSON); ``sample_noise`` their x0.
        baseline_rows: ``baseline_rows[source]`` indices of the held-out samples tested for
            copies ("heldout") and of the training samples measured against the held-out set
            ("train") (not in JSON).
        copy_ratios: d1 / d2 of the model's samples ("model") and of the held-out baseline
            ("heldout") (not in JSON).
        kinds: ``kinds[source][kind]`` (T,) mean ``||x1_model - x1_kind||^2 / D`` over the first
            ``kind_queries`` queries of each source, kind "global" (the exact oracle over the
            training set) and the configured reference kinds; empty without references.
        kind_info: patch size, queries per t of the references.
    """

    t: np.ndarray
    velocity: dict[str, dict[str, np.ndarray]]
    x1: dict[str, dict[str, np.ndarray]]
    switch: dict[str, float | None]
    samples: dict[str, Any]
    info: dict[str, Any]
    per_query: dict[str, dict[str, np.ndarray]] = field(default_factory=dict, repr=False)
    query_rows: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    query_noise: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    generated: np.ndarray | None = field(default=None, repr=False)
    sample_noise: np.ndarray | None = field(default=None, repr=False)
    baseline_rows: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    copy_ratios: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    kinds: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    kind_info: dict[str, Any] = field(default_factory=dict)

    def closest(self, source: str = "train") -> list[str]:
        """Per t, the kind the model is closest to on queries from ``source`` (empty without references)."""
        d = self.kinds.get(source, {})
        if not d:
            return []
        names = list(d)
        table = np.stack([d[k] for k in names])
        return [names[int(i)] for i in np.argmin(table, axis=0)]

    def ratio(self, source: str) -> np.ndarray:
        """(T,) d_tr / d_ho for queries from ``source``."""
        v = self.velocity[source]
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.asarray(v["train"] / v["heldout"])

    def fit_ratio(self) -> np.ndarray:
        """(T,) d_tr on training-sample queries / d_ho on held-out queries: each query against the
        oracle of the set it came from; < 1 means training samples are fitted better than unseen ones."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.asarray(self.velocity["train"]["train"] / self.velocity["heldout"]["heldout"])

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: kind, info, t, distances (velocity and x1), ratio, switch, samples, definitions."""

        def lists(d: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, list[float]]]:
            return {s: {k: [float(v) for v in a] for k, a in o.items()} for s, o in d.items()}

        return {
            "kind": "model_study",
            **self.info,
            "t": [float(v) for v in self.t],
            "distances": {"velocity": lists(self.velocity), "x1": lists(self.x1)},
            "ratio": {s: [_finite_or_none(v) for v in self.ratio(s)] for s in _SOURCES},
            "fit_ratio": [_finite_or_none(v) for v in self.fit_ratio()],
            "switch": dict(self.switch),
            "samples": dict(self.samples),
            **(
                {
                    "kinds": {
                        **self.kind_info,
                        "x1": lists(self.kinds),
                        "closest": {s: self.closest(s) for s in self.kinds},
                    }
                }
                if self.kinds
                else {}
            ),
            "definitions": DEFINITIONS,
        }

    def save_json(self, path: str | FilePath) -> None:
        """Write :meth:`to_json` to ``path``."""
        FilePath(path).write_text(json.dumps(self.to_json(), indent=1, allow_nan=False) + "\n")

    def summary(self) -> str:
        """A plain-text table of the curves, the switch and the copy shares."""
        head = ("t", "tr:d_train", "tr:d_heldout", "tr:d_loo", "tr:ratio", "ho:d_train", "ho:d_heldout", "ho:ratio",
                "fit_ratio")  # fmt: skip
        rows: list[tuple[str, ...]] = [head]
        rt, rh, fit = self.ratio("train"), self.ratio("heldout"), self.fit_ratio()
        for j, tj in enumerate(self.t):
            vt, vh = self.x1["train"], self.x1["heldout"]
            rows.append(
                (
                    f"{tj:.3f}",
                    *(f"{vt[k][j]:.4g}" for k in ("train", "heldout", "loo")),
                    f"{rt[j]:.3f}",
                    *(f"{vh[k][j]:.4g}" for k in ("train", "heldout")),
                    f"{rh[j]:.3f}",
                    f"{fit[j]:.3f}",
                )
            )
        lines = text_table(rows).split("\n")
        s = self.samples
        sw = {k: "never" if v is None else f"{v:.3f}" for k, v in self.switch.items()}
        lines += [
            "(distances: mean ||x1_model - x1_oracle||^2 / D; tr = queries from training samples, ho = from held-out; "
            "ratio = d_train / d_heldout; fit_ratio = tr:d_train / ho:d_heldout)",
            f"model switch (d_train < {self.info['switch_ratio']:g} d_heldout): training-sample queries t = "
            f"{sw['train']}, held-out queries t = {sw['heldout']}",
            f"copies (d1/d2 < {s['threshold']:.4g}): model samples {s['copy_share']:.4f} ({s['copies']} of "
            f"{s['count']}), held-out samples {s['heldout_copy_share']:.4f} ({s['heldout_copies']} of {s['heldout_count']})",
            f"nearest held-out sample: model samples {s['nearest_heldout_mean']:.4g}, training samples "
            f"{s['train_nearest_heldout_mean']:.4g}; nearest training sample: model samples "
            f"{s['nearest_train_mean']:.4g}, held-out samples {s['heldout_nearest_train_mean']:.4g}",
        ]
        if self.kinds:
            lines += ["", self.kinds_table()]
        return "\n".join(lines)

    def kinds_table(self) -> str:
        """Per t: the model's distance to each oracle kind (x1 space) and the closest kind, per source."""
        names = list(self.kinds["train"])
        head = ["t"] + [f"{src[:2]}:{k}" for src in _SOURCES for k in names] + ["tr:closest", "ho:closest"]
        rows = [head]
        close = {src: self.closest(src) for src in _SOURCES}
        for j, tj in enumerate(self.t):
            rows.append(
                [f"{tj:.3f}"]
                + [f"{self.kinds[src][k][j]:.4g}" for src in _SOURCES for k in names]
                + [close["train"][j], close["heldout"][j]]
            )
        lines = text_table(rows).split("\n")
        info = self.kind_info
        lines.append(
            f"(model against the oracle kinds over the training set: mean ||x1_model - x1_kind||^2 / D on the first "
            f"{info.get('queries')} queries per source; patch size {info.get('patch_size')})"
        )
        return "\n".join(lines)


KIND_COLORS = {"global": "C0", "local": "C2", "equivariant": "C3", "linear": "C4"}


def _plot_kinds(ax: Any, report: ModelStudyReport) -> None:
    """Distance of the model to each oracle kind along t; the closest kind marked per t."""
    t = report.t
    for source, ls in (("train", "-"), ("heldout", "--")):
        for kind, v in report.kinds[source].items():
            ax.plot(t, v, ls, color=KIND_COLORS.get(kind, "k"), label=f"{kind} ({source} queries)")
    close = report.closest("heldout")
    for j, kind in enumerate(close):
        v = report.kinds["heldout"][kind][j]
        ax.plot([t[j]], [v], "o", color=KIND_COLORS.get(kind, "k"), ms=4)
    ax.set_yscale("log")
    ax.set_xlabel("t")
    ax.set_ylabel("mean ||x1_model - x1_kind||^2 / D")
    ax.set_title(f"closest oracle kind (dots: held-out queries), P = {report.kind_info.get('patch_size')}", fontsize=9)
    ax.legend(fontsize=6)
    ax.grid(True, alpha=0.3)


def _finite_or_none(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


DEFINITIONS = {
    "queries": "x_t = alpha_t x1 + sigma_t x0, x1 a training sample (source 'train') or a held-out sample "
    "('heldout'), x0 ~ N(0, I); the same M pairs per source at every t",
    "velocity": "mean over the queries of ||u_model - u_oracle||^2 / D; oracles: 'train' (training set), "
    "'heldout' (held-out set), 'loo' (training set without the query's own sample; training-sample queries)",
    "x1": "the same for the x1-predictions: velocity / A_t^2, A_t = d_alpha - alpha d_sigma / sigma",
    "ratio": "d_train / d_heldout per source",
    "fit_ratio": "d_train on training-sample queries / d_heldout on held-out queries (each query against the oracle "
    "of its own set): about 1 when training and unseen samples are treated alike, < 1 when training samples are "
    "fitted better (memorisation)",
    "switch": "first t where ratio < switch_ratio (linear interpolation on the grid; null if never)",
    "copy": "a sample is a copy when d1 / d2 < threshold, d1 <= d2 the distances to its two nearest training samples",
    "quality": "mean distance of the model's samples to their nearest held-out sample, beside the same for "
    "training samples (train_nearest_heldout_mean) and, to the training set, for held-out samples",
    "kinds": "mean over the first kind_queries queries of each source of ||x1_model - x1_kind||^2 / D, kind 'global' "
    "the exact oracle over the training set, 'local' / 'equivariant' the patch oracles (patch_size P, or a schedule "
    "of (t_start, P)), 'linear' the Gaussian (Wiener) oracle; closest: the kind with the smallest distance per t",
}


@dataclass
class MixedSamplingReport:
    """Copies of training samples when the oracle samples up to a switch time and the model after it.

    Attributes:
        switches: (S,) the switch times (0: the model alone; >= the grid's end: the oracle alone).
        copy_share: (S,) share of samples with d1 / d2 < threshold (d1 <= d2: their two nearest
            training samples).
        copies: (S,) counts of those.
        nearest_train_mean, nearest_train_median: (S,) d1 over the samples (their distance to the
            nearest training sample).
        nearest_heldout_mean: (S,) mean distance to the nearest held-out sample.
        info: count, threshold, sampler, baseline (held-out samples' copy share and d1 mean).
        samples: ``samples[j]`` (count, D) the samples of switch j (not in JSON).
    """

    switches: np.ndarray
    copy_share: np.ndarray
    copies: np.ndarray
    nearest_train_mean: np.ndarray
    nearest_train_median: np.ndarray
    nearest_heldout_mean: np.ndarray
    info: dict[str, Any]
    samples: list[np.ndarray] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            **self.info,
            "switches": [float(v) for v in self.switches],
            "copy_share": [float(v) for v in self.copy_share],
            "copies": [int(v) for v in self.copies],
            "nearest_train_mean": [float(v) for v in self.nearest_train_mean],
            "nearest_train_median": [float(v) for v in self.nearest_train_median],
            "nearest_heldout_mean": [float(v) for v in self.nearest_heldout_mean],
            "definitions": {
                "mixed": "the training-set oracle integrates from noise (t = 0) to the switch time, the model from "
                "there to the end; the same noise for every switch",
                "copy_share": "share of samples with d1 / d2 < threshold, d1 <= d2 the distances to the two nearest "
                "training samples",
                "nearest_train": "d1, the distance to the nearest training sample (mean and median over the samples)",
            },
        }

    def summary(self) -> str:
        """A table: per switch time, copies, their share, d1 mean and median, nearest held-out mean."""
        head = ("switch t", "copies", "copy share", "d1 mean", "d1 median", "held-out d mean")
        rows: list[tuple[str, ...]] = [head]
        for j, sw in enumerate(self.switches):
            rows.append((
                f"{sw:.3f}", f"{int(self.copies[j])}/{self.info['count']}", f"{self.copy_share[j]:.4f}",
                f"{self.nearest_train_mean[j]:.4g}", f"{self.nearest_train_median[j]:.4g}",
                f"{self.nearest_heldout_mean[j]:.4g}",
            ))  # fmt: skip
        lines = text_table(rows).split("\n")
        b = self.info["baseline"]
        lines.insert(0, "mixed sampling: the training-set oracle up to the switch time, the model after it "
                     f"({self.info['sampler']['method']}, {self.info['sampler']['steps']} steps)")  # fmt: skip
        lines.append(f"(d1: distance to the nearest training sample; copies: d1/d2 < {self.info['threshold']:.4g}; "
                     f"held-out samples: copy share {b['heldout_copy_share']:.4f}, d1 mean "
                     f"{b['heldout_nearest_train_mean']:.4g})")  # fmt: skip
        return "\n".join(lines)


# -- the study ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Queries:
    rows: np.ndarray  # (M,) data set indices of x1
    x1: np.ndarray  # (M, D)
    x0: np.ndarray  # (M, D)


class ModelStudy:
    """The queries, oracle answers and baselines of one (training, held-out) pair, reusable for
    many models: the oracle answers do not depend on the model and are computed once.

    Args:
        train, heldout: the two data sets (:class:`StudyData`).
        config: what to measure.
        progress: called with a count after each unit of work (e.g. ``tqdm.update``).
        keep_oracle: keep the oracle answers for the next model (T * M * D * 5 float64 values).
    """

    def __init__(
        self,
        train: StudyData,
        heldout: StudyData,
        config: StudyConfig | None = None,
        *,
        progress: Callable[[int], Any] | None = None,
        keep_oracle: bool = True,
    ) -> None:
        self.config = config or StudyConfig()
        self.path, self.t = self.config.validated()
        if math.prod(train.sample_shape) != math.prod(heldout.sample_shape):
            raise ValueError(
                f"the training set ({train.sample_shape}) and the held-out set ({heldout.sample_shape}) have samples "
                "of different sizes"
            )
        if train.num_samples < 2:
            raise ValueError("the leave-one-out oracle and the copy test need at least two training samples")
        self.train = train
        self.heldout = heldout
        self.dim = math.prod(train.sample_shape)
        self._progress = progress
        self._keep = keep_oracle
        rng = np.random.default_rng([self.config.seed, 13])
        m = self.config.queries_per_t
        self._queries: dict[str, _Queries] = {}
        for source, data in (("train", train), ("heldout", heldout)):
            n = data.num_samples
            rows = np.sort(rng.choice(n, size=m, replace=m > n)).astype(np.int64)
            x0 = rng.standard_normal((m, self.dim))
            self._queries[source] = _Queries(rows, data.samples(rows).reshape(m, self.dim), x0)
        self._noise = rng.standard_normal((self.config.num_samples, self.dim))
        self._oracle: list[dict[str, dict[str, np.ndarray]]] | None = None
        self._kind_answers: list[dict[str, dict[str, np.ndarray]]] | None = None
        self._baseline: dict[str, Any] | None = None

    @property
    def work_units(self) -> int:
        """Units ``progress`` counts in the first :meth:`run`: one per t (two with reference kinds),
        plus sampling and baselines."""
        return self.t.size * (2 if self.config.kinds else 1) + 2

    def _tick(self) -> None:
        if self._progress is not None:
            self._progress(1)

    def _call(self, data: StudyData, x: np.ndarray, t: np.ndarray, exclude: np.ndarray | None) -> np.ndarray:
        out = np.empty_like(x)
        b = self.config.batch_rows
        for s in range(0, x.shape[0], b):
            ex = None if exclude is None else exclude[s : s + b]
            out[s : s + b] = data.velocity(x[s : s + b], t[s : s + b], self.path, ex)
        return out

    def _oracle_at(self, j: int) -> dict[str, dict[str, np.ndarray]]:
        """Oracle velocities at grid point j: ``[source][oracle]`` (M, D)."""
        if self._oracle is not None and j < len(self._oracle):
            return self._oracle[j]
        qt, qh = self._queries["train"], self._queries["heldout"]
        m = qt.x1.shape[0]
        c = self.path.coefficients(np.full(1, self.t[j]))
        xt_t = c.alpha[0] * qt.x1 + c.sigma[0] * qt.x0
        xt_h = c.alpha[0] * qh.x1 + c.sigma[0] * qh.x0
        # one call per data set: the training set answers plain and leave-one-out queries together
        none = np.full(m, -1, dtype=np.int64)
        x_tr = np.concatenate([xt_t, xt_t, xt_h])
        u_tr = self._call(self.train, x_tr, np.full(3 * m, self.t[j]), np.concatenate([none, qt.rows, none]))
        u_ho = self._call(self.heldout, np.concatenate([xt_t, xt_h]), np.full(2 * m, self.t[j]), None)
        ans = {
            "train": {"train": u_tr[:m], "loo": u_tr[m : 2 * m], "heldout": u_ho[:m], "x_t": xt_t},
            "heldout": {"train": u_tr[2 * m :], "heldout": u_ho[m:], "x_t": xt_h},
        }
        if self._keep:
            if self._oracle is None:
                self._oracle = []
            self._oracle.append(ans)
        return ans

    def _kinds_at(self, j: int) -> dict[str, dict[str, np.ndarray]]:
        """Reference kinds' velocities at grid point j: ``[source][kind]`` (k, D), k = kind_queries."""
        if self._kind_answers is not None and j < len(self._kind_answers):
            return self._kind_answers[j]
        cfg = self.config
        tj = float(self.t[j])
        ans: dict[str, dict[str, np.ndarray]] = {}
        xs = [self._queries_at(s, j, min(cfg.kind_queries, self._queries[s].x1.shape[0])) for s in _SOURCES]
        x = np.concatenate(xs)
        tt = np.full(x.shape[0], tj)
        k0 = xs[0].shape[0]
        for kind in cfg.kinds:
            p = int(patch_schedule(tj, cfg.patch_size)[0]) if kind in PATCH_KINDS else None
            u = np.empty_like(x)
            b = cfg.batch_rows
            for s in range(0, x.shape[0], b):
                u[s : s + b] = self.train.velocity(
                    x[s : s + b], tt[s : s + b], self.path, None, kind=kind, patch_size=p
                )
            ans.setdefault("train", {})[kind] = u[:k0]
            ans.setdefault("heldout", {})[kind] = u[k0:]
        self._tick()
        if self._keep:
            if self._kind_answers is None:
                self._kind_answers = []
            self._kind_answers.append(ans)
        return ans

    def _baselines(self) -> dict[str, Any]:
        """Held-out samples against the training set, training samples against the held-out set (cached)."""
        if self._baseline is not None:
            return self._baseline
        rng = np.random.default_rng([self.config.seed, 17])
        s = self.config.num_samples
        hn, tn = self.heldout.num_samples, self.train.num_samples
        h_rows = np.sort(rng.choice(hn, size=min(s, hn), replace=False))
        t_rows = np.sort(rng.choice(tn, size=min(s, tn), replace=False))
        h_x = self.heldout.samples(h_rows).reshape(h_rows.size, self.dim)
        t_x = self.train.samples(t_rows).reshape(t_rows.size, self.dim)
        nh = self._nearest(self.train, h_x, 2)
        nt = self._nearest(self.heldout, t_x, 1)
        ratio = _ratio(nh.distances)
        self._baseline = {
            "heldout_count": int(h_rows.size),
            "heldout_copies": int((ratio < self.config.threshold).sum()),
            "heldout_copy_share": float((ratio < self.config.threshold).mean()),
            "heldout_nearest_train_mean": float(nh.distances[:, 0].mean()),
            "train_count": int(t_rows.size),
            "train_nearest_heldout_mean": float(nt.distances[:, 0].mean()),
            "approximate": bool(nh.approximate or nt.approximate),
            "_heldout_ratios": ratio,
            "_rows": {"heldout": h_rows, "train": t_rows},
        }
        return self._baseline

    def _nearest(self, data: StudyData, x: np.ndarray, k: int) -> NearestAnswer:
        b = self.config.batch_rows
        parts = [data.nearest(x[s : s + b], k) for s in range(0, x.shape[0], b)]
        return NearestAnswer(
            np.concatenate([p.indices for p in parts]),
            np.concatenate([p.distances for p in parts]),
            any(p.approximate for p in parts),
        )

    def run(
        self,
        model: Any,
        *,
        inputs: str = "auto",
        convention: str = "standard",
        sampler: Callable[[Velocity, np.ndarray], np.ndarray] | None = None,
        name: str = "",
    ) -> ModelStudyReport:
        """Measure ``model`` (see the module docstring).

        Args:
            model: the velocity model, ``(x_t, t) -> u`` (a torch module or a function; see
                :func:`as_velocity` for ``inputs`` and ``convention``).
            sampler: ``f(velocity, x0) -> samples`` on flat float64 (S, D) arrays, replacing the
                configured fixed-step sampler (e.g. a solver with its own time grid).
            name: how the report names the model.
        """
        cfg = self.config
        velocity = as_velocity(
            model, self.train.sample_shape, inputs=inputs, convention=convention, batch_rows=cfg.batch_rows
        )
        t = self.t
        m = cfg.queries_per_t
        oracles = {"train": ("train", "heldout", "loo"), "heldout": ("train", "heldout")}
        per_query = {s: {o: np.empty((t.size, m)) for o in oracles[s]} for s in _SOURCES}
        for j in range(t.size):
            ans = self._oracle_at(j)
            for source in _SOURCES:
                u_m = velocity(ans[source]["x_t"], np.full(m, t[j]))
                for o in oracles[source]:
                    diff = u_m - ans[source][o]
                    per_query[source][o][j] = np.einsum("bd,bd->b", diff, diff) / self.dim
            self._tick()
        a2 = self.path.coefficients(t).velocity_x1 ** 2
        vel = {s: {o: v.mean(axis=1) for o, v in d.items()} for s, d in per_query.items()}
        x1 = {s: {o: v / a2 for o, v in d.items()} for s, d in vel.items()}
        kinds: dict[str, dict[str, np.ndarray]] = {}
        if cfg.kinds:
            for source in _SOURCES:
                k = min(cfg.kind_queries, m)
                kinds[source] = {"global": per_query[source]["train"][:, :k].mean(axis=1) / a2}
                kinds[source].update({kind: np.empty(t.size) for kind in cfg.kinds})
            for j in range(t.size):
                ans = self._kinds_at(j)
                for source in _SOURCES:
                    k = min(cfg.kind_queries, m)
                    u_m = velocity(self._queries_at(source, j, k), np.full(k, t[j]))
                    for kind in cfg.kinds:
                        diff = u_m - ans[source][kind]
                        kinds[source][kind][j] = np.einsum("bd,bd->", diff, diff) / (k * self.dim) / a2[j]

        if sampler is None:
            generated = integrate(velocity, self._noise.copy(), steps=cfg.steps, method=cfg.method, shift=cfg.shift)
            sampler_info: dict[str, Any] = {"method": cfg.method, "steps": cfg.steps, "shift": cfg.shift}
        else:
            generated = sampler(velocity, self._noise.copy())
            sampler_info = {"custom": getattr(sampler, "__name__", type(sampler).__name__)}
        generated = _as_float64(generated).reshape(self._noise.shape[0], self.dim)
        if not np.isfinite(generated).all():
            raise ValueError("the model's samples contain NaN or Inf; check the model and its time convention")
        self._tick()
        near_tr = self._nearest(self.train, generated, 2)
        near_ho = self._nearest(self.heldout, generated, 1)
        base = self._baselines()
        self._tick()
        ratio = _ratio(near_tr.distances)
        copies = ratio < cfg.threshold
        samples = {
            "count": int(generated.shape[0]),
            "sampler": sampler_info,
            "threshold": float(cfg.threshold),
            "copies": int(copies.sum()),
            "copy_share": float(copies.mean()),
            "nearest_train_mean": float(near_tr.distances[:, 0].mean()),
            "nearest_heldout_mean": float(near_ho.distances[:, 0].mean()),
            **{k: v for k, v in base.items() if not k.startswith("_")},
        }
        samples["approximate"] = bool(base["approximate"] or near_tr.approximate or near_ho.approximate)
        with np.errstate(divide="ignore", invalid="ignore"):
            switch = {s: first_below(t, vel[s]["train"] / vel[s]["heldout"], cfg.switch_ratio) for s in _SOURCES}
        info = {
            "model": name or _model_name(model),
            "train": _describe(self.train),
            "heldout": _describe(self.heldout),
            "path": cfg.path,
            "sigma_min": cfg.sigma_min,
            "seed": cfg.seed,
            "queries_per_t": m,
            "switch_ratio": cfg.switch_ratio,
        }
        return ModelStudyReport(
            t=t.copy(),
            velocity=vel,
            x1=x1,
            switch=switch,
            samples=samples,
            info=info,
            per_query=per_query,
            query_rows={s: q.rows for s, q in self._queries.items()},
            query_noise={s: q.x0 for s, q in self._queries.items()},
            generated=generated,
            sample_noise=self._noise.copy(),
            baseline_rows=dict(base["_rows"]),
            copy_ratios={"model": ratio, "heldout": base["_heldout_ratios"]},
            kinds=kinds,
            kind_info=(
                {
                    "patch_size": cfg.patch_size
                    if isinstance(cfg.patch_size, int)
                    else [list(p) for p in cfg.patch_size],
                    "queries": min(cfg.kind_queries, m),
                }
                if cfg.kinds
                else {}
            ),
        )

    def mixed(
        self,
        model: Any,
        switches: Sequence[float],
        *,
        inputs: str = "auto",
        convention: str = "standard",
    ) -> MixedSamplingReport:
        """Sample with the training-set oracle up to each switch time and ``model`` after it.

        The noise is the study's own (``num_samples`` draws), so switch = 0 gives :meth:`run`'s
        model samples; the sampler is the configured one (steps, method, shift), split at the
        switch (:func:`floworacle.sampling.integrate_mixed`).

        Raises:
            ValueError: no switch times, or one outside [0, 1].
        """
        cfg = self.config
        sw = np.asarray(list(switches), dtype=np.float64)
        if sw.ndim != 1 or sw.size == 0 or not np.all((sw >= 0) & (sw <= 1)):
            raise ValueError(f"switch times must be a non-empty list of values in [0, 1], got {list(switches)}")
        velocity = as_velocity(
            model, self.train.sample_shape, inputs=inputs, convention=convention, batch_rows=cfg.batch_rows
        )

        def oracle(x: np.ndarray, t: np.ndarray) -> np.ndarray:
            return self._call(self.train, x, t, None)

        base = self._baselines()
        shares, copies, d1_mean, d1_median, ho_mean, samples = [], [], [], [], [], []
        for s in sw:
            x = integrate_mixed(oracle, velocity, self._noise.copy(), float(s), steps=cfg.steps, method=cfg.method,
                                shift=cfg.shift)  # fmt: skip
            x = _as_float64(x).reshape(self._noise.shape[0], self.dim)
            if not np.isfinite(x).all():
                raise ValueError(f"the samples of switch t = {s:g} contain NaN or Inf; check the model")
            near = self._nearest(self.train, x, 2)
            near_ho = self._nearest(self.heldout, x, 1)
            is_copy = _ratio(near.distances) < cfg.threshold
            shares.append(float(is_copy.mean()))
            copies.append(int(is_copy.sum()))
            d1_mean.append(float(near.distances[:, 0].mean()))
            d1_median.append(float(np.median(near.distances[:, 0])))
            ho_mean.append(float(near_ho.distances[:, 0].mean()))
            samples.append(x)
            self._tick()
        info = {
            "count": int(self._noise.shape[0]),
            "threshold": float(cfg.threshold),
            "sampler": {"method": cfg.method, "steps": cfg.steps, "shift": cfg.shift},
            "baseline": {
                "heldout_copy_share": base["heldout_copy_share"],
                "heldout_nearest_train_mean": base["heldout_nearest_train_mean"],
            },
        }
        return MixedSamplingReport(
            switches=sw,
            copy_share=np.array(shares),
            copies=np.array(copies, dtype=np.int64),
            nearest_train_mean=np.array(d1_mean),
            nearest_train_median=np.array(d1_median),
            nearest_heldout_mean=np.array(ho_mean),
            info=info,
            samples=samples,
        )

    def _queries_at(self, source: str, j: int, k: int) -> np.ndarray:
        """The first k queries x_t of ``source`` at grid point j."""
        c = self.path.coefficients(np.full(1, self.t[j]))
        q = self._queries[source]
        return c.alpha[0] * q.x1[:k] + c.sigma[0] * q.x0[:k]


def _ratio(d: np.ndarray) -> np.ndarray:
    """d1 / d2 per row (0 when both are 0: a copy of a duplicated sample)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(d[:, 1] > 0, d[:, 0] / np.where(d[:, 1] > 0, d[:, 1], 1.0), 0.0)


def _describe(data: StudyData) -> dict[str, Any]:
    return {
        "name": data.name,
        "N": int(data.num_samples),
        "sample_shape": list(data.sample_shape),
        "fingerprint": data.fingerprint,
    }


def _model_name(model: Any) -> str:
    return str(getattr(model, "__qualname__", None) or type(model).__name__)


def model_study(
    model: Any,
    train: StudyData,
    heldout: StudyData,
    config: StudyConfig | None = None,
    **run_options: Any,
) -> ModelStudyReport:
    """One model, one study: ``ModelStudy(train, heldout, config).run(model, **run_options)``.

    Example (two data sets on one server, e.g. built with ``floworacle index build --holdout``)::

        with OracleClient("localhost:50051") as c:
            train = ClientData(c, "digits-train", np.load("split/train/data.npy"))
            held = ClientData(c, "digits-heldout", np.load("split/heldout/data.npy"))
            report = model_study(my_model, train, held)
        report.save_json("model.json"); plot_model_study(report, "model.png"); print(report.summary())
    """
    return ModelStudy(train, heldout, config).run(model, **run_options)


# -- plot -----------------------------------------------------------------------------------


def plot_model_study(
    report: ModelStudyReport, path: str | FilePath, *, data_switch: dict[str, float | None] | None = None
) -> None:
    """PNG: distances to the three oracles along t, the ratio d_tr / d_ho with the switch, and
    the d1 / d2 histogram of the model's samples beside the held-out baseline.

    ``data_switch``: the data set's ``t_switch_50`` / ``t_switch_99`` (``analyze transition``),
    drawn for comparison. Needs matplotlib.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("plotting the model study needs matplotlib: pip install matplotlib") from exc

    panels = 4 if report.kinds else 3
    fig = Figure(figsize=(5 * panels, 4.4))
    axes = fig.subplots(1, panels)
    t = report.t
    styles = {
        "train": ("C0", "training-set oracle"),
        "heldout": ("C1", "held-out oracle"),
        "loo": ("C2", "leave-one-out"),
    }
    ax = axes[0]
    for source, ls in (("train", "-"), ("heldout", "--")):
        for o, v in report.x1[source].items():
            color, label = styles[o]
            ax.plot(t, v, ls, color=color, label=f"{label} ({source} queries)")
    ax.set_yscale("log")
    ax.set_xlabel("t  (0 = noise, 1 = data)")
    ax.set_ylabel("mean ||x1_model - x1_oracle||^2 / D")
    ax.set_title(f"{FilePath(str(report.info['model'])).name}: distance to the oracles", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)

    ax = axes[1]
    for source, ls in (("train", "-"), ("heldout", "--")):
        ax.plot(t, report.ratio(source), ls, color="k", label=f"d_train / d_heldout ({source} queries)")
    ax.plot(t, report.fit_ratio(), "-", color="C3", label="fit ratio: tr:d_train / ho:d_heldout")
    ax.axhline(report.info["switch_ratio"], color="r", lw=0.8)
    sw = report.switch.get("train")
    if sw is not None:
        ax.axvline(sw, color="r", ls=":", label=f"model switch t = {sw:.3f}")
    for key, color in (("t_switch_50", "C4"), ("t_switch_99", "C5")):
        ts = (data_switch or {}).get(key)
        if ts is not None:
            ax.axvline(ts, color=color, ls="-.", label=f"data {key} = {ts:.3f}")
    ax.set_yscale("log")
    ax.set_xlabel("t")
    ax.set_title("navigation -> refinement of the model")
    ax.legend(fontsize=7)
    ax.grid(True, alpha=0.3)

    ax = axes[2]
    s = report.samples
    bins = np.linspace(0.0, 1.0, 41)
    ax.hist(report.copy_ratios["model"], bins=bins, alpha=0.6, label=f"model samples: copies {s['copy_share']:.3f}")
    ax.hist(
        report.copy_ratios["heldout"], bins=bins, alpha=0.6, label=f"held-out samples: {s['heldout_copy_share']:.3f}"
    )
    ax.axvline(s["threshold"], color="r", lw=0.8)
    ax.set_xlabel("d1 / d2 (nearest / second-nearest training sample)")
    ax.set_title("copies of training samples")
    ax.legend(fontsize=7)
    if report.kinds:
        _plot_kinds(axes[3], report)
    fig.tight_layout()
    FigureCanvasAgg(fig)
    fig.savefig(str(path), format="png", dpi=100)
