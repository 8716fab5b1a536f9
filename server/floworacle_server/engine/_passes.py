"""The passes that produce Partials: screen every group, route each slot once, refine.

1. Every group's slots are screened (:mod:`._screen`).
2. Each slot gets a route from what the screening proved, all slots at once and with **one**
   host read per batch (codes and candidate counts):

   - SPARSE: every candidate is among the kept rows (the refinement stage). They are gathered
     in a fixed-width layout and recomputed in float64 from differences (:mod:`._refine`); a
     lone candidate is its slot's mean as it is.
   - DENSE: more candidates than kept, and the dense float64 pass's logit bound
     (:func:`._bounds.dense_logit_error`, computable before the pass) is below
     ``DENSE_LOGIT_TOL``: the navigation stage, two float64 GEMMs over the slot's rows.
   - RESCREEN: more candidates than kept where the dense bound is too loose (many samples
     within reach late in the path: duplicates, tight clusters), or, on CPUs, where the
     candidates counted while screening are few enough that screening their chunks again and
     gathering them is cheaper than the dense pass. Variable sizes: host reads per chunk; it is
     the one route whose host reads grow with the data.
   - EMPTY / BAD: no sample left with positive weight, or a screening logit that is not finite
     (a query too large for float32): refused with ValueError.

3. The routes' partials are put into one (S,) state in slot order.

The fast mode (``Precision.FAST``) skips 2 and 3: one streamed pass of the screening logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from floworacle_server.engine._batch import Batch
from floworacle_server.engine._bounds import DENSE_LOGIT_TOL, dense_logit_error, screen_logit_error
from floworacle_server.engine._dense import dense_passes, fast_pass
from floworacle_server.engine._partials import Partials
from floworacle_server.engine._refine import exact_single, refine, stack
from floworacle_server.engine._screen import Screened, float32_floor, screen, screen_logits

__all__ = ["SlotPartials", "exact_partials", "fast_partials", "Route", "EmptyPosterior", "NonFiniteScreening"]


class Route:
    """Route codes (int) as read by the host."""

    SPARSE = 0
    DENSE = 1
    RESCREEN = 2
    EMPTY = 3
    BAD = 4


class EmptyPosterior(ValueError):
    """A slot has no sample of positive weight left (``slot`` is the offending slot)."""

    def __init__(self, slot: int) -> None:
        super().__init__(f"slot {slot} has no sample with positive weight")
        self.slot = slot


class NonFiniteScreening(ValueError):
    """A slot's screening logits are not finite (its query is NaN / Inf or too large)."""

    def __init__(self, slot: int) -> None:
        super().__init__(f"slot {slot} has non-finite screening logits")
        self.slot = slot


@dataclass
class SlotPartials:
    """Partials of every slot, in slot order.

    Attributes:
        partials: (S,) partials (full logits in exact mode, screening form in fast mode).
        logit_error: (S,) bound on the absolute error of every logit that carries weight.
        refined: (query, sample) pairs whose logits were computed in float64.
        unit_normaliser: every slot had exactly one candidate (its s is exactly 1).
        tail: (S,) bound on the weight of the samples left out, relative to the kept mass.
    """

    partials: Partials
    logit_error: torch.Tensor
    refined: int
    unit_normaliser: bool
    tail: torch.Tensor


def _routes(batch: Batch, scr: Screened, thr: torch.Tensor, tight: torch.Tensor) -> torch.Tensor:
    """(2, S) int64: route code and kept-candidate count of every slot."""
    f64 = torch.float64
    keep = batch.cfg.keep
    kept = scr.kept_v.to(f64)
    width = (kept >= thr[:, None]).sum(dim=1)
    complete = kept[:, keep] < thr
    lower = scr.lower
    bad = torch.isnan(lower) | (lower == math.inf)
    empty = lower == -math.inf
    rescreen = ~tight
    share = batch.cfg.rescreen_share
    if share > 0 and scr.count is not None:
        limit = (share * batch.slot_rows).clamp(min=keep + 1)
        cheap = scr.count <= limit
        if scr.early is not None:
            cheap &= ~scr.early
        rescreen = rescreen | cheap
    code = torch.where(rescreen, Route.RESCREEN, Route.DENSE)
    code = torch.where(complete, Route.SPARSE, code)
    if scr.early is not None:  # their kept rows stem from the first chunk only
        code = torch.where(scr.early, Route.DENSE, code)
    code = torch.where(empty, Route.EMPTY, code)
    code = torch.where(bad, Route.BAD, code)
    return torch.stack([code, width])


def _rescreen(
    batch: Batch, gi: int, scr: Screened, thr_all: torch.Tensor, slots: list[int]
) -> tuple[Partials, torch.Tensor, int]:
    """Candidates of the slots ``slots`` (all in group ``gi``) found by screening again every
    chunk where they can be, then refined; returns (partials in the order of ``slots``, logit
    errors, pairs)."""
    g = batch.groups[gi]
    dev = batch.ds.device
    gslots = torch.tensor(slots, dtype=torch.int64, device=dev)
    thr = thr_all.index_select(0, gslots)
    starts = scr.starts[gi]
    chunk_max = scr.chunk_max[gi]
    if chunk_max is not None:
        loc = gslots - g.s0
        need = (chunk_max.index_select(0, loc).to(torch.float64) >= thr[:, None]).tolist()
    else:
        need = [[True] * len(starts) for _ in slots]
    co = batch.coef.take(gslots)
    c32, h32 = co.c.to(torch.float32), co.half.to(torch.float32)
    thr32 = float32_floor(thr)
    pair_slot: list[torch.Tensor] = []
    pair_row: list[torch.Tensor] = []
    for k, s0 in enumerate(starts):
        sel = [i for i in range(len(slots)) if need[i][k]]
        if not sel:
            continue
        s1 = min(s0 + scr.chunk_rows, g.stop)
        idx = torch.tensor(sel, dtype=torch.int64, device=dev)
        sub = gslots.index_select(0, idx)
        lt = screen_logits(
            batch, batch.queries(sub, screen=True), slice(s0, s1), c32[idx], h32[idx], batch.excluded(sub)
        )
        hits = (lt >= thr32[idx][:, None]).nonzero()
        pair_slot.append(idx[hits[:, 0]])
        pair_row.append(hits[:, 1] + s0)
    ps = torch.cat(pair_slot)
    pr = torch.cat(pair_row)
    order = torch.argsort(ps, stable=True)
    ps, pr = ps[order], pr[order]
    counts = torch.bincount(ps, minlength=len(slots))
    widths = counts.tolist()
    offsets = torch.cumsum(counts, 0) - counts
    col = torch.arange(ps.shape[0], device=dev) - offsets[ps]
    rows = torch.full((len(slots), max(widths)), -1, dtype=torch.int64, device=dev)
    rows[ps, col] = pr
    # widest first, so blocks hold slots of similar widths
    by_width = sorted(range(len(slots)), key=lambda i: -widths[i])
    perm = torch.tensor(by_width, dtype=torch.int64, device=dev)
    part, err = refine(batch, gslots[perm], rows[perm], [widths[i] for i in by_width])
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.shape[0], device=dev)
    return part.select(inv), err[inv], int(ps.shape[0])


def _slot_errors(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(S,) screening and dense-pass logit error bounds of every slot."""
    co = batch.coef
    model, facts, d = batch.model, batch.facts, batch.dim
    serr = screen_logit_error(model, co.c, co.half, batch.qnorm_s, batch.slot_max_sq, facts.max_abs_logw, d)
    derr = dense_logit_error(batch.qnorm_s, co.alpha, batch.slot_max_sq.sqrt(), co.inv2s2, facts.max_abs_logw, d)
    return serr, derr


def exact_partials(batch: Batch) -> SlotPartials:
    """Exact-mode partials of every slot of ``batch`` (see module docstring)."""
    ds, cfg = batch.ds, batch.cfg
    dev = ds.device
    s_total = batch.slots
    serr, derr = _slot_errors(batch)
    tight = derr <= DENSE_LOGIT_TOL
    scr = screen(batch, serr, tight if cfg.early_dense else None)
    thr = scr.threshold(batch.slot_reach)
    code, width = _routes(batch, scr, thr, tight).tolist()  # the batch's one host read
    for i, c in enumerate(code):
        if c == Route.BAD:
            raise NonFiniteScreening(i)
        if c == Route.EMPTY:
            raise EmptyPosterior(i)
    want = batch.want
    # left-out weight, relative to the kept mass: the refinement stage leaves out exactly the
    # rows screened below the kept candidates, each at most e^(lt + err - lower) of the largest
    wt_all = torch.tensor(width, dtype=torch.int64, device=dev).clamp_(max=cfg.keep)
    below = scr.kept_v.gather(1, wt_all[:, None]).squeeze(1).to(torch.float64)
    tail_sparse = (batch.slot_rows - wt_all) * torch.exp((below + scr.err - scr.lower).clamp(max=0.0))
    tail_rescreen = torch.exp(-batch.slot_reach + torch.log(batch.slot_rows))
    is_dense = torch.tensor([c == Route.DENSE for c in code], device=dev)
    is_again = torch.tensor([c == Route.RESCREEN for c in code], device=dev)
    tail = torch.where(is_dense, 0.0, torch.where(is_again, tail_rescreen, tail_sparse))
    pieces: list[tuple[list[int], Partials, torch.Tensor]] = []
    refined = 0
    single = [i for i in range(s_total) if code[i] == Route.SPARSE and width[i] == 1]
    if single:
        if len(single) == s_total:
            part, err = exact_single(batch, slice(0, s_total), scr.kept_i[:, 0])
        else:
            idx = torch.tensor(single, dtype=torch.int64, device=dev)
            part, err = exact_single(batch, idx, scr.kept_i[:, 0].index_select(0, idx))
        pieces.append((single, part, err))
        refined += len(single) if want.logits else 0
    multi = [i for i in range(s_total) if code[i] == Route.SPARSE and width[i] > 1]
    if multi:
        idx = torch.tensor(multi, dtype=torch.int64, device=dev)
        widths = [width[i] for i in multi]
        wmax = max(widths)
        rows = scr.kept_i.index_select(0, idx)[:, :wmax]
        wt = torch.tensor(widths, dtype=torch.int64, device=dev)
        rows = rows.masked_fill(torch.arange(wmax, device=dev)[None, :] >= wt[:, None], -1)
        part, err = refine(batch, idx, rows, widths)
        pieces.append((multi, part, err))
        refined += sum(widths)
    work = []
    for g in batch.groups:
        dense = [i for i in range(g.s0, g.s1) if code[i] == Route.DENSE]
        if dense:
            work.append((g, dense))
            refined += len(dense) * g.rows
    if work:
        pieces += dense_passes(batch, work)
    for gi, g in enumerate(batch.groups):
        again = [i for i in range(g.s0, g.s1) if code[i] == Route.RESCREEN]
        if again:
            part, err, pairs = _rescreen(batch, gi, scr, thr, again)
            pieces.append((again, part, err))
            refined += pairs
    if len(pieces) == 1 and pieces[0][0] == list(range(s_total)):
        _, state, logit_err = pieces[0]
    else:  # one permutation into slot order
        order = [i for slots, _, _ in pieces for i in slots]
        inv = [0] * s_total
        for pos, i in enumerate(order):
            inv[i] = pos
        back = torch.tensor(inv, dtype=torch.int64, device=dev)
        state = stack([p for _, p, _ in pieces]).select(back)
        logit_err = torch.cat([e for _, _, e in pieces]).index_select(0, back)
    return SlotPartials(state, logit_err, refined, unit_normaliser=len(single) == s_total, tail=tail)


def fast_partials(batch: Batch) -> SlotPartials:
    """Fast-mode partials of every slot: the screening logits used directly (one host read, to
    refuse empty or non-finite posteriors)."""
    serr, _ = _slot_errors(batch)
    parts: list[Partials] = []
    errs: list[torch.Tensor] = []
    for g in batch.groups:
        part, err = fast_pass(batch, g, serr[g.slots])
        parts.append(part)
        errs.append(err)
    if len(parts) == 1:
        state, logit_err = parts[0], errs[0]
    else:
        state, logit_err = stack(parts), torch.cat(errs)
    m = state.m
    bad = torch.isnan(m) | (m == math.inf)
    codes = torch.where(bad, Route.BAD, torch.where(m == -math.inf, Route.EMPTY, Route.SPARSE)).tolist()
    for i, c in enumerate(codes):
        if c == Route.BAD:
            raise NonFiniteScreening(i)
        if c == Route.EMPTY:
            raise EmptyPosterior(i)
    return SlotPartials(state, logit_err, 0, unit_normaliser=False, tail=torch.zeros_like(logit_err))
