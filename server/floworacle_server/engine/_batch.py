"""Per-batch state shared by the passes: slots, their coefficients, and what to compute.

A *slot* is one posterior to evaluate: a query over one data row range (the whole data set, or
one class's rows). A plain batch has one slot per query; a class-conditional batch one slot per
query over its class's rows; a guided query inside its interval has two (unconditional and
conditional). Slots of one row range are contiguous (a :class:`Group`), so every pass works on
slices of per-slot tensors.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from floworacle_server.data._dataset import Dataset
from floworacle_server.engine._bounds import REACH_MARGIN, ScreenModel
from floworacle_server.engine._config import EngineConfig

__all__ = ["Coef", "Group", "Want", "Batch", "DatasetFacts", "facts"]


@dataclass(frozen=True)
class Want:
    """Which partial sums the passes must produce."""

    entropy: bool = False
    ess: bool = False
    variance: bool = False
    top_k: int = 0
    #: exact logits even where a lone candidate's weight is 1 whatever its logit (partials that
    #: may be merged with others need them; the oracle's own answers do not)
    logits: bool = True
    #: a slot without any sample of positive weight gets an empty partial instead of a refusal
    #: (a gang's shard: whether the posterior is empty is decided after the merge)
    keep_empty: bool = False


@dataclass
class Coef:
    """Per-slot float64 tensors derived from the path coefficients (shape (S,))."""

    alpha: torch.Tensor
    sigma: torch.Tensor
    c: torch.Tensor  # alpha / sigma^2
    half: torch.Tensor  # alpha^2 / (2 sigma^2)
    inv2s2: torch.Tensor  # 1 / (2 sigma^2)

    @classmethod
    def build(cls, alpha: torch.Tensor, sigma: torch.Tensor) -> Coef:
        inv2s2 = 0.5 / (sigma * sigma)
        c = 2.0 * alpha * inv2s2
        return cls(alpha, sigma, c, alpha * alpha * inv2s2, inv2s2)

    def take(self, rows: torch.Tensor | slice) -> Coef:
        if isinstance(rows, slice):
            return Coef(self.alpha[rows], self.sigma[rows], self.c[rows], self.half[rows], self.inv2s2[rows])
        return Coef(*(t.index_select(0, rows) for t in (self.alpha, self.sigma, self.c, self.half, self.inv2s2)))


@dataclass
class Group:
    """Slots ``[s0, s1)`` over data rows ``[start, stop)``; ``label`` -1 for the whole set;
    ``max_sq`` the largest ``||x_i||^2`` of those rows (host float, from :class:`DatasetFacts`)."""

    start: int
    stop: int
    s0: int
    s1: int
    label: int = -1
    max_sq: float = math.inf

    @property
    def rows(self) -> int:
        return self.stop - self.start

    @property
    def slots(self) -> slice:
        return slice(self.s0, self.s1)

    @property
    def size(self) -> int:
        return self.s1 - self.s0


@dataclass
class DatasetFacts:
    """Host-side facts about a data set, computed once (each costs a pass and a host read)."""

    xmax: float
    max_abs_logw: float
    #: classes without samples, and classes whose samples all weigh 0 (their posterior is empty)
    empty_classes: frozenset[int]
    dead_classes: frozenset[int]
    #: row range of each class (host copy of ``class_offsets``)
    class_ranges: list[tuple[int, int]]
    #: largest ||x_i||^2 of the whole data set and of each class
    max_sq: float
    class_max_sq: list[float]
    _sq32: torch.Tensor | None = field(default=None, repr=False)
    _range_max_sq: dict[tuple[int, int], float] = field(default_factory=dict, repr=False)

    def sq32(self, ds: Dataset) -> torch.Tensor:
        """(N,) float32 ``||x_i||^2`` for the screening epilogue (converted once)."""
        if self._sq32 is None:
            self._sq32 = ds.sq_norms.to(torch.float32)
        return self._sq32

    def range_max_sq(self, ds: Dataset, start: int, stop: int) -> float:
        """Largest ||x_i||^2 over rows [start, stop) (cached; one host read per new range)."""
        if (start, stop) == (0, ds.num_samples):
            return self.max_sq
        key = (start, stop)
        if key not in self._range_max_sq:
            self._range_max_sq[key] = float(ds.sq_norms[start:stop].max())
        return self._range_max_sq[key]


_FACTS: dict[int, tuple[weakref.ref[Dataset], DatasetFacts]] = {}


def facts(ds: Dataset) -> DatasetFacts:
    """The cached :class:`DatasetFacts` of ``ds`` (dropped when the data set is). For a shard of a
    gang, the extremes, the weights' range and the empty or weightless classes are the whole data
    set's (``ds.shard.facts``), so that refusals and error bounds are those of the whole; row
    ranges are the shard's own."""
    hit = _FACTS.get(id(ds))
    if hit is not None and hit[0]() is ds:
        return hit[1]
    whole = ds.shard.facts if ds.shard is not None else None
    max_abs_logw = 0.0
    dead: set[int] = set()
    empty: set[int] = set()
    if ds.class_offsets is not None:
        empty = {y for y, e in enumerate((ds.class_offsets[1:] == ds.class_offsets[:-1]).tolist()) if e}
    if ds.log_weights is not None:
        finite = torch.isfinite(ds.log_weights)
        max_abs_logw = float(ds.log_weights[finite].abs().max()) if bool(finite.any()) else 0.0
        if ds.class_offsets is not None:
            cs = torch.zeros(ds.num_samples + 1, dtype=torch.int64, device=ds.device)
            cs[1:] = torch.cumsum(finite.to(torch.int64), 0)
            per_class = cs[ds.class_offsets.to(ds.device)]
            dead = {y for y, n in enumerate((per_class[1:] - per_class[:-1]).tolist()) if n == 0} - empty
    ranges: list[tuple[int, int]] = []
    class_max: list[float] = []
    if ds.class_offsets is not None:
        off = ds.class_offsets.tolist()
        ranges = list(zip(off[:-1], off[1:], strict=True))
        class_max = [float(ds.sq_norms[a:b].max()) if b > a else 0.0 for a, b in ranges]
    max_sq = float(ds.sq_norms.max())
    if whole is not None:
        empty = {y for y, n in enumerate(whole.class_counts) if n == 0}
        dead = {y for y, (n, a) in enumerate(zip(whole.class_counts, whole.class_alive, strict=True)) if n and not a}
        class_max, max_sq, max_abs_logw = list(whole.class_max_sq), whole.max_sq, whole.max_abs_logw
    out = DatasetFacts(
        xmax=ds.abs_max(),
        max_abs_logw=max_abs_logw,
        empty_classes=frozenset(empty),
        dead_classes=frozenset(dead),
        class_ranges=ranges,
        max_sq=max_sq,
        class_max_sq=class_max,
    )
    for (a, b), v in zip(ranges, class_max, strict=True):
        out._range_max_sq[(a, b)] = v
    _FACTS[id(ds)] = (weakref.ref(ds), out)
    weakref.finalize(ds, _FACTS.pop, id(ds), None)
    return out


@dataclass
class Batch:
    """Everything the passes of one batch share.

    Attributes:
        ds: the data set.
        cfg: block sizes (per device).
        model: the screening GEMM's precision and bound.
        x: (B, D) queries as sent (any float dtype) on the data's device: the exact values.
        xs: (B, D) queries in the screening dtype (``x`` itself when it already is).
        qnorm: (B,) float64 upper bound of ``||x_t||`` (within (D + 4) u32 of it).
        slot_query: (S,) int64 query of each slot, or None when slot s is query s (S = B).
        coef: per-slot coefficients.
        qnorm_s: (S,) float64 ``qnorm`` per slot.
        exclude: (S,) int64 data row each slot leaves out (-1: none), or None.
        groups: the slots' row ranges.
        want: which sums to produce.
        facts: the data set's cached facts.
        slot_consts: (3, S) float64 per slot: the largest ||x_i||^2 of its rows, its reach
            ``ln(rows) + 37`` and its number of rows (built on the host, one copy).
        slot_start: (S,) int64 first row of each slot's range.
        share_lower: a gang's shard: the gang's largest of every rank's (S,) screening lower
            bounds (a collective, called once per exact batch on every rank), so that each shard
            keeps the candidates within reach of the whole data set's maximum, not of its own
            (None: one process).
        lower_shared: set once the lower bounds were shared: the slots' tails are then relative
            to the gang's largest weight (they add up in the merge).
    """

    ds: Dataset
    cfg: EngineConfig
    model: ScreenModel
    x: torch.Tensor
    xs: torch.Tensor
    qnorm: torch.Tensor
    slot_query: torch.Tensor | None
    coef: Coef
    qnorm_s: torch.Tensor
    exclude: torch.Tensor | None
    groups: list[Group]
    want: Want
    facts: DatasetFacts
    slot_consts: torch.Tensor
    slot_start: torch.Tensor
    share_lower: Callable[[torch.Tensor], torch.Tensor] | None = None
    lower_shared: bool = False

    @staticmethod
    def consts(groups: list[Group], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The (3, S) ``slot_consts`` and (S,) ``slot_start`` of ``groups``."""
        rows = np.array([g.rows for g in groups], dtype=np.float64)
        sizes = [g.size for g in groups]
        per = np.stack([[g.max_sq for g in groups], np.log(np.maximum(rows, 1)) + REACH_MARGIN, rows])
        starts = np.repeat(np.array([g.start for g in groups], dtype=np.int64), sizes)
        return torch.from_numpy(np.repeat(per, sizes, axis=1)).to(device), torch.from_numpy(starts).to(device)

    @property
    def slot_max_sq(self) -> torch.Tensor:
        return self.slot_consts[0]

    @property
    def slot_reach(self) -> torch.Tensor:
        return self.slot_consts[1]

    @property
    def slot_rows(self) -> torch.Tensor:
        return self.slot_consts[2]

    @property
    def slots(self) -> int:
        return int(self.coef.alpha.shape[0])

    @property
    def dim(self) -> int:
        return self.ds.dim

    def queries(self, rows: torch.Tensor | slice, *, screen: bool = False) -> torch.Tensor:
        """Query vectors of the slots ``rows`` (exact values, or screening dtype)."""
        src = self.xs if screen else self.x
        if self.slot_query is None:
            return src[rows] if isinstance(rows, slice) else src.index_select(0, rows)
        q = self.slot_query[rows] if isinstance(rows, slice) else self.slot_query.index_select(0, rows)
        return src.index_select(0, q)

    def excluded(self, rows: torch.Tensor | slice) -> torch.Tensor | None:
        if self.exclude is None:
            return None
        return self.exclude[rows] if isinstance(rows, slice) else self.exclude.index_select(0, rows)


def mask_excluded(logits: torch.Tensor, excluded: torch.Tensor | None, start: int) -> None:
    """In place: set ``logits[b, r - start]`` to -inf for each row ``r`` of ``excluded[b]`` ((B,)
    or (B, m); -1 = none) that lies in the block of columns ``[start, start + n)`` (a fixed
    number of small ops; no host read)."""
    if excluded is None:
        return
    n = logits.shape[1]
    col = (excluded if excluded.ndim == 2 else excluded[:, None]) - start
    inside = (col >= 0) & (col < n)
    col = col.clamp(0, n - 1)
    cur = logits.gather(1, col)
    logits.scatter_(1, col, torch.where(inside, torch.full_like(cur, -math.inf), cur))
