"""Screening: the fast GEMM over the data in chunks, and the proven set of candidates it leaves.

For the slots of one row range, chunk by chunk, the screening logits

    lt_i = c x_t . x_i - h ||x_i||^2 + log p_i          (c = alpha / sigma^2, h = alpha^2 / (2 sigma^2))

come from a GEMM in the screening precision; :func:`._bounds.screen_logit_error` bounds their
error ``err`` by the same amount for every row of the range. Kept per slot: the running top
``keep + 1`` screened logits and their rows, and a proven lower bound ``lower = max_i lt_i - err``
of the largest exact logit (up to the per-query constant, which cancels). A row is a *candidate*
when its exact logit can lie within ``reach = ln(rows) + 37`` nats of the maximum, i.e. when
``lt_i >= lower - reach - err`` (rounded down in float32): every other row weighs less than
``e^-reach`` of the largest, all of them together less than ``e^-37`` of the kept mass. When the
``(keep + 1)``-th kept logit is below that threshold, the kept rows hold every candidate: the
refinement stage, where no second GEMM is needed.

Left-out samples (leave-one-out) get -inf before anything is kept, so they neither count towards
``lower`` nor become candidates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from floworacle_server.engine._batch import Batch, mask_excluded
from floworacle_server.engine._bounds import REACH_MARGIN

__all__ = ["Screened", "screen", "screen_logits", "float32_floor"]


@dataclass
class Screened:
    """Screening of every slot of a batch (first dimension S = the slots).

    Attributes:
        kept_v: (S, keep + 1) float32 screened logits, descending (-inf where fewer rows exist).
        kept_i: (S, keep + 1) int64 data rows of ``kept_v`` (-1 where empty).
        lower: (S,) float64 proven lower bound of the largest logit (screening form).
        err: (S,) float64 screening error bound, valid for every row of the slot's range.
        count: (S,) int64 upper bound of the candidates (counted against the running
            threshold), or None where not counted.
        chunk_max: per group, (q, chunks) float32 largest screened logit per chunk, or None.
        early: (S,) bool, slots sent to the dense pass after their first chunk, or None.
        starts: per group, the first row of each chunk.
        chunk_rows: rows per chunk.
    """

    kept_v: torch.Tensor
    kept_i: torch.Tensor
    lower: torch.Tensor
    err: torch.Tensor
    count: torch.Tensor | None
    chunk_max: list[torch.Tensor | None]
    early: torch.Tensor | None
    starts: list[list[int]]
    chunk_rows: int

    def threshold(self, reach_s: torch.Tensor) -> torch.Tensor:
        """(S,) float64 candidate threshold ``lower - reach - err``, rounded down."""
        thr = self.lower - reach_s - self.err
        return thr - thr.abs() * 2.0**-40  # never lose a candidate to float64 rounding


def float32_floor(x: torch.Tensor) -> torch.Tensor:
    """``x`` (float64) rounded to float32 downwards, never up (so no candidate is lost)."""
    return (x - x.abs() * 2.0**-22).to(torch.float32)


def screen_logits(
    batch: Batch, xs: torch.Tensor, rows: slice, c32: torch.Tensor, h32: torch.Tensor, excluded: torch.Tensor | None
) -> torch.Tensor:
    """(q, n) float32 screening logits of queries ``xs`` (screening dtype) over data ``rows``."""
    ds = batch.ds
    chunk = ds.x[rows]
    dtype = batch.model.dtype
    lt = xs @ (chunk if chunk.dtype == dtype else chunk.to(dtype)).T
    if lt.dtype != torch.float32:
        lt = lt.to(torch.float32)
    lt.mul_(c32[:, None]).addr_(h32, ds.sq_norms[rows].to(torch.float32), alpha=-1)
    if ds.log_weights is not None:
        lt.add_(ds.log_weights[rows].to(torch.float32)[None, :])
    start = rows.start if rows.start is not None else 0
    mask_excluded(lt, excluded, start)
    return lt


def screen(batch: Batch, err: torch.Tensor, dense_tight: torch.Tensor | None) -> Screened:
    """Screen every slot of ``batch`` over its group's rows (see module docstring).

    ``err`` (S,): the screening error bound of each slot; ``dense_tight`` (S,) bool: slots whose
    dense float64 bound is tight enough for the dense pass (only those may leave the screening
    after the first chunk), or None to never leave early.
    """
    ds, cfg = batch.ds, batch.cfg
    dev = ds.device
    f32, f64, s_total = torch.float32, torch.float64, batch.slots
    keep = cfg.keep + 1
    rows_c = cfg.chunk_rows(ds.dim)
    counting = cfg.rescreen_share > 0
    kept_v = torch.full((s_total, keep), -math.inf, dtype=f32, device=dev)
    kept_i = torch.full((s_total, keep), -1, dtype=torch.int64, device=dev)
    lower = torch.empty(s_total, dtype=f64, device=dev)
    count = torch.zeros(s_total, dtype=torch.int64, device=dev) if counting else None
    early_all = (
        torch.zeros(s_total, dtype=torch.bool, device=dev) if cfg.early_dense and dense_tight is not None else None
    )
    c32_all, h32_all = batch.coef.c.to(f32), batch.coef.half.to(f32)
    chunk_maxes: list[torch.Tensor | None] = []
    all_starts: list[list[int]] = []
    for g in batch.groups:
        sl = g.slots
        starts = list(range(g.start, g.stop, rows_c))
        all_starts.append(starts)
        nch = len(starts)
        q = g.size
        xs = batch.queries(sl, screen=True)
        excl = batch.excluded(sl)
        e_g, c32, h32 = err[sl], c32_all[sl], h32_all[sl]
        kv_g, ki_g, lo_g = kept_v[sl], kept_i[sl], lower[sl]  # views: written in place
        cnt_g = count[sl] if count is not None else None
        chunk_max = torch.full((q, nch), -math.inf, dtype=f32, device=dev) if counting and nch > 1 else None
        rch = math.log(max(g.rows, 1)) + REACH_MARGIN
        act: torch.Tensor | None = None  # None: every slot of the group is still screened
        for k, s0 in enumerate(starts):
            s1 = min(s0 + rows_c, g.stop)
            if act is None:
                lt = screen_logits(batch, xs, slice(s0, s1), c32, h32, excl)
                e_act = e_g
            else:
                lt = screen_logits(
                    batch,
                    xs.index_select(0, act),
                    slice(s0, s1),
                    c32[act],
                    h32[act],
                    None if excl is None else excl[act],
                )
                e_act = e_g[act]
            tv, ti = lt.topk(min(keep, s1 - s0), dim=1)
            ti += s0
            if k == 0:
                kv, ki = tv, ti
                lo = tv[:, 0].to(f64) - e_act
            else:
                kv0 = kv_g if act is None else kv_g[act]
                ki0 = ki_g if act is None else ki_g[act]
                kv, pos = torch.cat([kv0, tv], dim=1).topk(keep, dim=1)
                ki = torch.cat([ki0, ti], dim=1).gather(1, pos)
                lo = torch.maximum(lo_g if act is None else lo_g[act], tv[:, 0].to(f64) - e_act)
            width = kv.shape[1]
            if act is None:
                kv_g[:, :width], ki_g[:, :width] = kv, ki
                lo_g.copy_(lo)
            else:
                kv_g[act, :width], ki_g[act, :width], lo_g[act] = kv, ki, lo
            if chunk_max is not None:
                if act is None:
                    chunk_max[:, k] = tv[:, 0]
                else:
                    chunk_max[act, k] = tv[:, 0]
            if cnt_g is not None:
                running = float32_floor(lo - rch - e_act)
                got = (lt >= running[:, None]).sum(dim=1)
                if act is None:
                    cnt_g += got
                else:
                    cnt_g[act] += got
            if k == 0 and nch > 1 and early_all is not None and dense_tight is not None:
                # deep navigation: the first chunk's logits all lie within half the reach of
                # each other, so (almost) every sample is a candidate; such slots go to the dense
                # pass without screening the rest (a speed choice only: that pass is exact too)
                spread = (tv[:, 0] - lt.min(dim=1).values).to(f64) + 2 * e_g
                early = (spread < rch / 2) & dense_tight[sl]
                if bool(early.any()):
                    early_all[sl] = early
                    act = (~early).nonzero().flatten()
                    if act.numel() == 0:
                        break
            del lt
        chunk_maxes.append(chunk_max)
    return Screened(kept_v, kept_i, lower, err, count, chunk_maxes, early_all, all_starts, rows_c)
