"""Per-batch state shared by the passes: slots, their coefficients, and what to compute.

A *slot* is one posterior to evaluate: a query over one data row range (the whole data set, or
one class's rows). A plain batch has one slot per query; a class-conditional batch one slot per
query over its class's rows; a guided query inside its interval has two (unconditional and
conditional). Slots of one row range are contiguous (a :class:`Group`), so every pass works on
slices of per-slot tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from floworacle_server.data import Dataset, DataStats
from floworacle_server.engine._bounds import REACH_MARGIN, ScreenModel
from floworacle_server.engine._config import EngineConfig

__all__ = ["Coef", "Group", "Want", "Queries", "Slots", "Batch", "mask_excluded"]


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
    #: (partials to be merged: whether the posterior is empty is decided after the merge)
    keep_empty: bool = False


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class Group:
    """Slots ``[s0, s1)`` over data rows ``[start, stop)``; ``label`` -1 for the whole set;
    ``max_sq`` the largest ``||x_i||^2`` of those rows (host float, from the data set's stats)."""

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


@dataclass(frozen=True)
class Queries:
    """The batch's B queries on the data's device.

    Attributes:
        x: (B, D) queries as sent (any float dtype): the exact values.
        xs: (B, D) queries in the screening dtype (``x`` itself when it already is).
        norm: (B,) float64 upper bound of ``||x_t||`` (within (D + 4) u32 of it).
    """

    x: torch.Tensor
    xs: torch.Tensor
    norm: torch.Tensor


@dataclass(frozen=True)
class Slots:
    """The batch's S slots (posteriors to evaluate).

    Attributes:
        query: (S,) int64 query of each slot, or None when slot s is query s (S = B).
        coef: per-slot coefficients.
        qnorm: (S,) float64 ``Queries.norm`` per slot.
        exclude: (S,) int64 data row each slot leaves out (-1: none), or None.
        groups: the slots' row ranges.
        consts: (3, S) float64 per slot: the largest ||x_i||^2 of its rows, its reach
            ``ln(rows) + 37`` and its number of rows (built on the host, one copy).
        start: (S,) int64 first row of each slot's range.
    """

    query: torch.Tensor | None
    coef: Coef
    qnorm: torch.Tensor
    exclude: torch.Tensor | None
    groups: tuple[Group, ...]
    consts: torch.Tensor
    start: torch.Tensor

    @staticmethod
    def constants(groups: tuple[Group, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The (3, S) ``consts`` and (S,) ``start`` of ``groups``."""
        rows = np.array([g.rows for g in groups], dtype=np.float64)
        sizes = [g.size for g in groups]
        per = np.stack([[g.max_sq for g in groups], np.log(np.maximum(rows, 1)) + REACH_MARGIN, rows])
        starts = np.repeat(np.array([g.start for g in groups], dtype=np.int64), sizes)
        return torch.from_numpy(np.repeat(per, sizes, axis=1)).to(device), torch.from_numpy(starts).to(device)


@dataclass(frozen=True)
class Batch:
    """Everything the passes of one batch share; immutable once built.

    Attributes:
        ds: the data set (its :attr:`~floworacle_server.data.Dataset.stats` are the whole set's).
        cfg: block sizes (per device).
        model: the screening GEMM's precision and bound.
        want: which sums to produce.
        q: the queries.
        s: the slots.
        share_lower: a part of a data set whose partials are merged: the largest of every part's
            (S,) screening lower bounds (a collective, called once per exact batch on every part),
            so that each part keeps the candidates within reach of the whole data set's maximum,
            not of its own (None: the whole data set). The exact pass's tails are then relative to
            the whole set's largest
            weight (:attr:`SlotPartials.shared_tail`).
    """

    ds: Dataset
    cfg: EngineConfig
    model: ScreenModel
    want: Want
    q: Queries
    s: Slots
    share_lower: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def slot_max_sq(self) -> torch.Tensor:
        return self.s.consts[0]

    @property
    def slot_reach(self) -> torch.Tensor:
        return self.s.consts[1]

    @property
    def slot_rows(self) -> torch.Tensor:
        return self.s.consts[2]

    @property
    def stats(self) -> DataStats:
        return self.ds.stats

    @property
    def slots(self) -> int:
        return int(self.s.coef.alpha.shape[0])

    @property
    def dim(self) -> int:
        return self.ds.dim

    def queries(self, rows: torch.Tensor | slice, *, screen: bool = False) -> torch.Tensor:
        """Query vectors of the slots ``rows`` (exact values, or screening dtype)."""
        src = self.q.xs if screen else self.q.x
        if self.s.query is None:
            return src[rows] if isinstance(rows, slice) else src.index_select(0, rows)
        q = self.s.query[rows] if isinstance(rows, slice) else self.s.query.index_select(0, rows)
        return src.index_select(0, q)

    def excluded(self, rows: torch.Tensor | slice) -> torch.Tensor | None:
        if self.s.exclude is None:
            return None
        return self.s.exclude[rows] if isinstance(rows, slice) else self.s.exclude.index_select(0, rows)


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
