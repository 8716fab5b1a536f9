"""Screening: the fast GEMM over the data in chunks, and the proven set of candidates it leaves.

For the slots of one row range, chunk by chunk, the screening logits

    lt_i = (c x_t) . x_i - h ||x_i||^2 + log p_i          (c = alpha / sigma^2, h = alpha^2 / (2 sigma^2))

come from a GEMM in the screening precision (the query scaled by c once where the rows
outnumber D, so a chunk costs the GEMM and one pass); :func:`._bounds.screen_logit_error` bounds their error ``err`` by the same
amount for every row of the range. Kept per slot: a proven lower bound ``lower = max_i lt_i -
err`` of the largest exact logit (up to the per-query constant, which cancels). A row is a
*candidate* when its exact logit can lie within ``reach = ln(rows) + 37`` nats of the maximum, i.e.
when ``lt_i >= lower - reach - err`` (rounded down in float32): every other row weighs less than
``e^-reach`` of the largest, all of them together less than ``e^-37`` of the kept mass.

Kept per slot: the running top ``keep + 1`` screened logits over all chunks and their rows (fixed
shapes, no host read), and the largest screened logit of each chunk. When the ``(keep + 1)``-th
kept logit is below the threshold, the kept rows hold every candidate: the refinement stage,
where no second GEMM is needed; otherwise the chunk maxima say where the candidates can be. (A
top-k per chunk costs a seventh of the GEMM on a CPU at ``keep = 8``, twice that from ``keep = 16``
on; collecting every row above the running threshold instead costs more in the middle of the
path, where that threshold rises late.)

Left-out samples (leave-one-out) get -inf before anything is kept, so they neither count towards
``lower`` nor become candidates.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from floworacle_server.engine._batch import Batch, Group, mask_excluded
from floworacle_server.engine._bounds import REACH_MARGIN

__all__ = ["Screened", "ScreenQueries", "screen", "screen_logits", "scaled_queries", "float32_floor"]


@dataclass
class Screened:
    """Screening of every slot of a batch (first dimension S = the slots).

    Attributes:
        lower: (S,) float64 proven lower bound of the largest logit (screening form).
        err: (S,) float64 screening error bound, valid for every row of the slot's range.
        early: (S,) bool, slots sent to the dense pass after their first chunk, or None.
        starts: per group, the first row of each chunk.
        chunk_rows: rows per chunk.
        kept_v: (S, keep + 1) float32 screened logits, descending (-inf where fewer rows exist).
        kept_i: (S, keep + 1) int64 data rows of ``kept_v`` (-1 where empty).
        chunk_max: per group, (q, chunks) float32 largest screened logit of each chunk (None for
            a group of one chunk).
        rest_max: (S,) float32 largest screened logit of the chunks whose top-k was skipped
            because none of their rows could be a candidate (CPU), or None.
    """

    lower: torch.Tensor
    err: torch.Tensor
    early: torch.Tensor | None
    starts: list[list[int]]
    chunk_rows: int
    kept_v: torch.Tensor
    kept_i: torch.Tensor
    chunk_max: list[torch.Tensor | None]
    rest_max: torch.Tensor | None = None

    def threshold(self, reach_s: torch.Tensor) -> torch.Tensor:
        """(S,) float64 candidate threshold ``lower - reach - err``, rounded down."""
        thr = self.lower - reach_s - self.err
        return thr - thr.abs() * 2.0**-40  # never lose a candidate to float64 rounding


def float32_floor(x: torch.Tensor) -> torch.Tensor:
    """``x`` (float64) rounded to float32 downwards, never up (so no candidate is lost)."""
    return (x - x.abs() * 2.0**-22).to(torch.float32)


@dataclass
class ScreenQueries:
    """Queries ready for the screening GEMM: ``x`` in the screening dtype, scaled by ``c``
    already when ``scaled`` (one (q, D) pass instead of one (q, n) pass per chunk: worth it when
    the rows outnumber D), else ``c32`` (q,) multiplies the GEMM's output."""

    x: torch.Tensor
    c32: torch.Tensor
    scaled: bool

    def take(self, rows: torch.Tensor) -> ScreenQueries:
        return ScreenQueries(self.x.index_select(0, rows), self.c32.index_select(0, rows), self.scaled)


def scaled_queries(
    batch: Batch, slots: torch.Tensor | slice, rows: int, c32: torch.Tensor | None = None
) -> ScreenQueries:
    """The slots' queries for screening ``rows`` data rows (see :class:`ScreenQueries`); scaled
    in float32 from the screening copy and rounded once to the screening dtype. ``c32``: the
    slots' c in float32 when the caller has it."""
    xs = batch.queries(slots, screen=True)
    if c32 is None:
        c = batch.s.coef.c[slots] if isinstance(slots, slice) else batch.s.coef.c.index_select(0, slots)
        c32 = c.to(torch.float32)
    if rows <= batch.dim:
        return ScreenQueries(xs, c32, False)
    scaled = (xs if xs.dtype == torch.float32 else xs.to(torch.float32)) * c32[:, None]
    return ScreenQueries(scaled if scaled.dtype == batch.model.dtype else scaled.to(batch.model.dtype), c32, True)


def screen_logits(
    batch: Batch, xc: ScreenQueries, rows: slice, h32: torch.Tensor, excluded: torch.Tensor | None
) -> torch.Tensor:
    """(q, n) float32 screening logits of queries ``xc`` (:func:`scaled_queries`) over data
    ``rows``; ``h32`` (q,) float32 ``alpha^2 / (2 sigma^2)``."""
    ds = batch.ds
    chunk = ds.x[rows]
    dtype = batch.model.dtype
    lt = xc.x @ (chunk if chunk.dtype == dtype else chunk.to(dtype)).T
    if lt.dtype != torch.float32:
        lt = lt.to(torch.float32)
    if not xc.scaled:
        lt.mul_(xc.c32[:, None])
    lt.addr_(h32, ds.sq_norms32[rows], alpha=-1)
    if ds.log_weights is not None:
        lt.add_(ds.log_weights[rows].to(torch.float32)[None, :])
    start = rows.start if rows.start is not None else 0
    mask_excluded(lt, excluded, start)
    return lt


def _merge_live(
    lt: torch.Tensor,
    kv: torch.Tensor,
    ki: torch.Tensor,
    rest: torch.Tensor,
    chunk_max: torch.Tensor,
    offset: int,
    margin: torch.Tensor,
) -> None:
    """CPU: merge one chunk's screened logits ``lt`` (q, n) into the kept top ``kv`` / ``ki``
    (views, in place), running the top-k only on the rows that can hold a candidate.

    A row whose chunk maximum lies below the running threshold ``max(best so far, chunk max) -
    margin`` (``margin = reach + 2 err``, the threshold only rises) has no candidate there; the
    kept top-k of the other rows still holds every candidate and tells whether more than k exist
    (every row at or above the final threshold is in a chunk that was merged), and the skipped
    chunks' maxima go to ``rest`` for the bound on the weight left out. A top-k costs a seventh
    of the chunk's GEMM on a CPU; in the refinement stage most chunks are skipped."""
    mx = lt.amax(dim=1)
    chunk_max.copy_(mx)
    best = torch.maximum(kv[:, 0], mx).to(torch.float64)
    live = mx >= float32_floor(best - margin)
    n_live = int(live.sum())
    if n_live < live.shape[0]:
        torch.maximum(rest, torch.where(live, torch.full_like(mx, -math.inf), mx), out=rest)
    if n_live == 0:
        return
    keep = kv.shape[1]
    width = min(keep, lt.shape[1])
    rows = None if n_live == live.shape[0] else live.nonzero().flatten()
    sub = lt if rows is None else lt.index_select(0, rows)
    tv, ti = sub.topk(width, dim=1)
    kv0 = kv if rows is None else kv.index_select(0, rows)
    ki0 = ki if rows is None else ki.index_select(0, rows)
    v, pos = torch.cat([kv0, tv], dim=1).topk(keep, dim=1)
    i = torch.cat([ki0, ti + offset], dim=1).gather(1, pos)
    if rows is None:
        kv.copy_(v)
        ki.copy_(i)
    else:
        kv.index_copy_(0, rows, v)
        ki.index_copy_(0, rows, i)


def _reach(g: Group) -> float:
    return math.log(max(g.rows, 1)) + REACH_MARGIN


def screen(batch: Batch, err: torch.Tensor, dense_tight: Callable[[], torch.Tensor] | None) -> Screened:
    """Screen every slot of ``batch`` over its group's rows (see module docstring).

    ``err`` (S,): the screening error bound of each slot; ``dense_tight()`` gives (S,) bool, the
    slots whose dense float64 bound is tight enough for the dense pass (only those may leave the
    screening after the first chunk); None: never leave early.
    """
    ds, cfg = batch.ds, batch.cfg
    dev = ds.device
    f32, f64, s_total = torch.float32, torch.float64, batch.slots
    keep = cfg.keep + 1
    rows_c = cfg.chunk_rows(ds.dim)
    kept_v = torch.full((s_total, keep), -math.inf, dtype=f32, device=dev)
    # rows relative to the slot's group start while screening (one add for all at the end)
    kept_i = torch.full((s_total, keep), -1, dtype=torch.int64, device=dev)
    leave = cfg.early_dense and dense_tight is not None
    early_all: torch.Tensor | None = None  # set when some slot leaves early (the host knows)
    h32_all = batch.s.coef.half.to(f32)
    c32_all = batch.s.coef.c.to(f32)
    # CPU: the best screened logit of the chunks skipped for lack of candidates (the tail bound)
    rest = torch.full((s_total,), -math.inf, dtype=f32, device=dev) if cfg.host_shortcuts else None
    chunk_maxes: list[torch.Tensor | None] = []
    all_starts: list[list[int]] = []
    for g in batch.s.groups:
        sl = g.slots
        starts = list(range(g.start, g.stop, rows_c))
        all_starts.append(starts)
        nch = len(starts)
        xc = scaled_queries(batch, sl, g.rows, c32_all[sl])
        excl = batch.excluded(sl)
        h32 = h32_all[sl]
        kv_g, ki_g = kept_v[sl], kept_i[sl]  # views: written in place
        # the chunk maxima (which chunks hold candidates) matter only past one chunk
        chunk_max = torch.full((g.size, nch), -math.inf, dtype=f32, device=dev) if nch > 1 else None
        rch = _reach(g)
        act: torch.Tensor | None = None  # None: every slot of the group is still screened
        for k, s0 in enumerate(starts):
            s1 = min(s0 + rows_c, g.stop)
            width = min(keep, s1 - s0)
            if act is None:
                lt = screen_logits(batch, xc, slice(s0, s1), h32, excl)
                if k == 0:  # straight into the kept buffers
                    outs = (kv_g, ki_g) if width == keep else (kv_g[:, :width], ki_g[:, :width])
                    torch.topk(lt, width, dim=1, out=outs)
                    if chunk_max is not None:
                        chunk_max[:, 0] = kv_g[:, 0]
                elif cfg.host_shortcuts:
                    assert chunk_max is not None and rest is not None
                    _merge_live(lt, kv_g, ki_g, rest[sl], chunk_max[:, k], s0 - g.start, 2 * err[sl] + rch)
                else:
                    tv, ti = lt.topk(width, dim=1)
                    kv, pos = torch.cat([kv_g, tv], dim=1).topk(keep, dim=1)
                    kv_g.copy_(kv)
                    ki_g.copy_(torch.cat([ki_g, ti + (s0 - g.start)], dim=1).gather(1, pos))
                    assert chunk_max is not None
                    chunk_max[:, k] = tv[:, 0]
            else:
                sub_excl = None if excl is None else excl[act]
                lt = screen_logits(batch, xc.take(act), slice(s0, s1), h32[act], sub_excl)
                tv, ti = lt.topk(width, dim=1)
                kv, pos = torch.cat([kv_g[act], tv], dim=1).topk(keep, dim=1)
                kv_g[act] = kv
                ki_g[act] = torch.cat([ki_g[act], ti + (s0 - g.start)], dim=1).gather(1, pos)
                assert chunk_max is not None
                chunk_max[act, k] = tv[:, 0]
            if k == 0 and nch > 1 and leave and dense_tight is not None:
                # navigation: the first chunk's logits all lie within (a share of) the reach of
                # each other, so most samples are candidates; such slots go to the dense pass
                # without screening the rest (a speed choice only: that pass is exact too)
                spread = (kv_g[:, 0] - lt.amin(dim=1)).to(f64) + 2 * err[sl]
                early = (spread < cfg.early_spread * rch) & dense_tight()[sl]
                if bool(early.any()):
                    if early_all is None:
                        early_all = torch.zeros(s_total, dtype=torch.bool, device=dev)
                    early_all[sl] = early
                    act = (~early).nonzero().flatten()
                    if act.numel() == 0:
                        break
            del lt
        chunk_maxes.append(chunk_max)
    # the best kept logit is the best over all chunks: the proven lower bound of the maximum
    lower = kept_v[:, 0].to(f64) - err
    if any(g.start for g in batch.s.groups):
        kept_i = torch.where(kept_i >= 0, kept_i + batch.s.start[:, None], kept_i)
    return Screened(lower, err, early_all, all_starts, rows_c, kept_v, kept_i, chunk_maxes, rest)
