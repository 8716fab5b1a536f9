"""The passes that produce Partials: screen every group, route each slot once, refine.

1. Every group's slots are screened (:mod:`._screen`).
2. Each slot gets a route from what the screening proved, all slots at once and with **one**
   host read per batch (codes and candidate counts; the CPU settings add a read after the first
   chunk for early navigation, and the split and re-screen routes, which the GPU settings leave
   off, read sizes of their own):

   - SPARSE: every candidate is among the kept rows (the refinement stage). They are gathered
     in a fixed-width layout and recomputed in float64 from differences (:mod:`._refine`); a
     lone candidate is its slot's mean as it is.
   - DENSE: more candidates than kept, and the dense float64 pass's logit bound
     (:func:`._bounds.dense_logit_error`, computable before the pass) is below
     ``DENSE_LOGIT_TOL``: the navigation stage, two float64 GEMMs over the slot's rows.
   - SPLIT (opt-in, ``EngineConfig.split``): more candidates than kept, but those within
     ``split_reach`` nats of the maximum (the head) all among the kept rows (the middle of the
     path: the weight sits on a few samples while thousands are within reach): the head in
     float64 from differences, the rest from its screened logits with float32 sums, one
     screening GEMM and one accumulation GEMM (:func:`._bounds.split_reach` proves the bound,
     within 1e-8 of max|x|: not float64-accurate, hence opt-in; never with the variance, which
     the tail can dominate there, and not on a gang's shards, whose partials merge in float64
     only).
   - RESCREEN: more candidates than kept where the dense bound is too loose (many samples
     within reach late in the path: duplicates, tight clusters) and the split route does not
     apply, or, on CPUs, where the candidates lie in a quarter of the chunks or fewer, so that
     screening those again and gathering the candidates costs less than either pass.
     Variable sizes: host reads per chunk; the one route whose host reads grow with the data.
   - EMPTY / BAD: no sample left with positive weight, or a screening logit that is not finite
     (a query too large for float32): refused with ValueError. A gang's shard
     (``Want.keep_empty``) gives an EMPTY slot an empty partial instead: the posterior is empty
     only if it is on every shard, which the merge tells.

3. The routes' partials are put into one (S,) state in slot order.

The fast mode (``"fast"``) skips 2 and 3: one streamed pass of the screening logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from floworacle_server.engine._batch import Batch, Group, Want
from floworacle_server.engine._bounds import (
    DENSE_LOGIT_TOL,
    SCREEN_DTYPES,
    U32,
    dense_logit_error,
    screen_logit_error,
    split_reach,
)
from floworacle_server.engine._dense import dense_passes, fast_pass, screened_pass
from floworacle_server.engine._partials import Partials
from floworacle_server.engine._refine import exact_single, refine, stack
from floworacle_server.engine._screen import Screened, float32_floor, scaled_queries, screen, screen_logits

__all__ = ["SlotPartials", "exact_partials", "fast_partials", "Route", "EmptyPosterior", "NonFiniteScreening"]


SCREEN_DTYPES_U = {dt: u for dt, u in SCREEN_DTYPES.values()}


class Route:
    """Route codes (int) as read by the host."""

    SPARSE = 0
    DENSE = 1
    RESCREEN = 2
    EMPTY = 3
    BAD = 4
    SPLIT = 5


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
        topk_original: the top-k indices are the data set's original indices already (a gang's
            merged partials), not rows.
        shared_tail: ``tail`` is relative to the gang's largest weight (a shard's exact pass with
            shared screening lower bounds: the ranks' tails add up), not to the kept mass.
    """

    partials: Partials
    logit_error: torch.Tensor
    refined: int
    unit_normaliser: bool
    tail: torch.Tensor
    topk_original: bool = False
    shared_tail: bool = False


@dataclass
class _Candidates:
    """What the routing leaves for the refinement: per slot its route code and candidate count
    (host lists), the weight left out (S,), and the kept rows (S, keep + 1), candidates first."""

    code: list[int]
    width: list[int]
    tail: torch.Tensor
    kept_i: torch.Tensor
    split_mass: torch.Tensor  # (S,) split route: bound on the tail's weight (n e^-R)

    def padded_rows(self, slots: torch.Tensor, widths: list[int]) -> torch.Tensor:
        """(n, max width) candidate rows of ``slots`` (-1 beyond each one's width)."""
        dev = slots.device
        wmax = max(widths)
        cols = torch.arange(wmax, device=dev)[None, :]
        wt = torch.tensor(widths, dtype=torch.int64, device=dev)[:, None]
        return self.kept_i.index_select(0, slots)[:, :wmax].masked_fill(cols >= wt, -1)


def _route(batch: Batch, scr: Screened, thr: torch.Tensor, tight_of: Callable[[], torch.Tensor]) -> _Candidates:
    """Route every slot with the batch's one host read (code and candidate count of each);
    ``tight_of()`` gives the slots whose dense bound is tight enough (computed when needed)."""
    f64 = torch.float64
    cfg = batch.cfg
    keep = cfg.keep
    kept = scr.kept_v.to(f64)
    width = (kept >= thr[:, None]).sum(dim=1)
    many = kept[:, keep] >= thr
    if cfg.host_shortcuts and scr.early is None and not bool(many.any()):
        # every slot sparse (the refinement stage; a CPU's host check is cheaper than the ops)
        return _sparse_only(batch, scr, kept, width)
    tight = tight_of()
    cheap = torch.zeros_like(tight)
    if cfg.rescreen_chunks > 0:  # few chunks hold the candidates: screening them again is cheaper
        relevant = [  # a group of one chunk is never cheaper to screen again
            (cm.to(f64) >= thr[g.slots, None]).sum(dim=1) <= int(cfg.rescreen_chunks * cm.shape[1])
            if cm is not None
            else torch.zeros(g.size, dtype=torch.bool, device=thr.device)
            for g, cm in zip(batch.s.groups, scr.chunk_max, strict=True)
        ]
        cheap = torch.cat(relevant) if len(relevant) > 1 else relevant[0]
    lower = scr.lower
    rows = batch.slot_rows
    code = torch.where(tight, Route.DENSE, Route.RESCREEN)
    split_mass = torch.zeros_like(lower)
    head_w = width
    if cfg.split and not batch.want.variance and not batch.want.keep_empty:  # (parts to be merged: float64 only)
        # the head: rows screened within R nats of the maximum, all among the kept ones?
        r_head = split_reach(scr.err + _split_extra(batch), rows, _split_acc(batch))
        head_thr = lower - r_head - scr.err
        head_thr = head_thr - head_thr.abs() * 2.0**-40
        head_w = (kept >= head_thr[:, None]).sum(dim=1)
        code = torch.where((kept[:, keep] < head_thr) & (head_thr > thr), Route.SPLIT, code)
        split_mass = rows * torch.exp(-r_head)
    code = torch.where(cheap, Route.RESCREEN, code)
    code = torch.where(many, code, Route.SPARSE)
    if scr.early is not None:  # their kept rows stem from the first chunk only
        code = torch.where(scr.early, Route.DENSE, code)
    code = torch.where(lower == -math.inf, Route.EMPTY, code)
    code = torch.where(torch.isnan(lower) | (lower == math.inf), Route.BAD, code)
    # left-out weight relative to the kept mass: the sparse path leaves out the rows screened
    # below its candidates (each at most e^(lt + err - lower) of the largest), a dense or split
    # pass nothing, a re-screen what lies below the threshold (e^-37 at most)
    below = _below(scr, kept, width, keep)
    tail = (rows - width) * torch.exp((below + scr.err - lower).clamp(max=0.0))
    tail = torch.where(code == Route.RESCREEN, torch.exp(-batch.slot_reach) * rows, tail)
    tail = torch.where((code == Route.DENSE) | (code == Route.SPLIT), 0.0, tail)
    width = torch.where(code == Route.SPLIT, head_w, width)
    host = torch.stack([code, width]).tolist()  # the batch's one host read
    return _Candidates(host[0], host[1], tail, scr.kept_i, split_mass)


def _below(scr: Screened, kept: torch.Tensor, width: torch.Tensor, keep: int) -> torch.Tensor:
    """(S,) the largest screened logit of a row left out of the sparse path: the first kept one
    past the candidates, or of a chunk whose top-k was skipped."""
    below = kept.gather(1, width.clamp(max=keep)[:, None]).squeeze(1)
    if scr.rest_max is not None:
        below = torch.maximum(below, scr.rest_max.to(below.dtype))
    return below


def _sparse_only(batch: Batch, scr: Screened, kept: torch.Tensor, width: torch.Tensor) -> _Candidates:
    """:func:`_route` when no slot has more candidates than kept: SPARSE, EMPTY or BAD only."""
    lower = scr.lower
    code = torch.where(lower == -math.inf, Route.EMPTY, Route.SPARSE)
    code = torch.where(torch.isnan(lower) | (lower == math.inf), Route.BAD, code)
    below = _below(scr, kept, width, batch.cfg.keep)
    tail = (batch.slot_rows - width) * torch.exp((below + scr.err - lower).clamp(max=0.0))
    host = torch.stack([code, width]).tolist()  # the batch's one host read
    return _Candidates(host[0], host[1], tail, scr.kept_i, torch.zeros_like(lower))


def _split_extra(batch: Batch) -> float:
    """Logit error of a split route's tail on top of the screening bound: its weights rounded to
    the accumulation dtype (the per-query constant's float64 sum is added per slot)."""
    cuda = batch.ds.device.type == "cuda"
    return 1.01 * (SCREEN_DTYPES_U.get(batch.model.dtype, U32) if cuda else U32)


def _split_acc(batch: Batch) -> float:
    """Relative rounding of a split route's float32 sums over one chunk (see the fast pass)."""
    rows = batch.cfg.chunk_rows(batch.dim)
    internal = 2 * batch.model.acc_u if batch.model.acc_u > U32 else 0.0
    return 1.01 * (rows + 2) * U32 + internal + (2.0**-8 if batch.ds.device.type == "cuda" else 0.0)


def _split(
    batch: Batch, g: Group, slots: list[int], cands: _Candidates, serr: torch.Tensor
) -> tuple[Partials, torch.Tensor, torch.Tensor]:
    """The split route for ``slots`` (all in ``g``): exact head, screened tail, merged. Returns
    (partials in the order of ``slots``, logit error bound, tail term of the mean's bound)."""
    dev = batch.ds.device
    idx = torch.tensor(slots, dtype=torch.int64, device=dev)
    widths = [cands.width[i] for i in slots]
    head_rows = cands.padded_rows(idx, widths)
    head, herr = refine(batch, idx, head_rows, widths)
    rest, terr = screened_pass(batch, g, idx, serr.index_select(0, idx), leave_out=head_rows, full_logits=True)
    part = head.merge(rest)
    tau = cands.split_mass.index_select(0, idx)
    # the normaliser's shift from the tail's errors widens the head's; the tail's own weights
    # are off by e^(2 e_t) at most (see _bounds)
    return part, herr + tau * torch.expm1(terr), tau * torch.expm1(2.0 * terr)


def _rescreen(
    batch: Batch, gi: int, scr: Screened, thr_all: torch.Tensor, slots: list[int]
) -> tuple[Partials, torch.Tensor, int]:
    """Candidates of the slots ``slots`` (all in group ``gi``) found by screening again every
    chunk where they can be, then refined; returns (partials in the order of ``slots``, logit
    errors, pairs)."""
    g = batch.s.groups[gi]
    dev = batch.ds.device
    gslots = torch.tensor(slots, dtype=torch.int64, device=dev)
    thr = thr_all.index_select(0, gslots)
    starts = scr.starts[gi]
    chunk_max = scr.chunk_max[gi]
    if chunk_max is None:  # one chunk: it holds them
        need = [[True] for _ in slots]
    else:
        need = (chunk_max.index_select(0, gslots - g.s0).to(torch.float64) >= thr[:, None]).tolist()
    co = batch.s.coef.take(gslots)
    h32 = co.half.to(torch.float32)
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
        lt = screen_logits(batch, scaled_queries(batch, sub, g.rows), slice(s0, s1), h32[idx], batch.excluded(sub))
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


def _refuse(code: list[int], want: Want) -> None:
    """Raise for the first slot that cannot be answered: a non-finite screening logit, or (unless
    ``want.keep_empty``) a posterior without any sample of positive weight."""
    for i, c in enumerate(code):
        if c == Route.BAD:
            raise NonFiniteScreening(i)
        if c == Route.EMPTY and not want.keep_empty:
            raise EmptyPosterior(i)


def _empty(batch: Batch, n: int) -> Partials:
    """Empty partials (no sample) for ``n`` slots, tracking what the batch's others track."""
    w = batch.want
    return Partials.empty(n, batch.dim, w.top_k, batch.ds.device, entropy=w.entropy, ess=w.ess, variance=w.variance)


def _screen_errors(batch: Batch) -> torch.Tensor:
    """(S,) screening logit error bound of every slot."""
    co, stats = batch.s.coef, batch.stats
    return screen_logit_error(
        batch.model, co.c, co.half, batch.s.qnorm, batch.slot_max_sq, stats.max_abs_logw, batch.dim
    )


def _dense_errors(batch: Batch) -> torch.Tensor:
    """(S,) logit error bound of the dense float64 pass for every slot."""
    co, stats = batch.s.coef, batch.stats
    return dense_logit_error(
        batch.s.qnorm, co.alpha, batch.slot_max_sq.sqrt(), co.inv2s2, stats.max_abs_logw, batch.dim
    )


def _shared_lower(share: Callable[[torch.Tensor], torch.Tensor], lower: torch.Tensor) -> torch.Tensor:
    """The gang's largest lower bound per slot (any rank's bound on its own largest logit bounds
    the whole set's from below); a slot whose bound is NaN or +inf here stays so, for this rank
    to refuse it (the merge's agreement round then refuses it everywhere)."""
    bad = torch.isnan(lower) | (lower == math.inf)
    gang = share(torch.where(bad, -math.inf, lower))
    return torch.where(bad, lower, gang)


def exact_partials(batch: Batch) -> SlotPartials:
    """Exact-mode partials of every slot of ``batch`` (see module docstring)."""
    ds, cfg = batch.ds, batch.cfg
    dev = ds.device
    s_total = batch.slots
    serr = _screen_errors(batch)
    tight_cache: list[torch.Tensor] = []

    def tight_of() -> torch.Tensor:
        """Slots whose dense float64 bound is below DENSE_LOGIT_TOL (computed once, if asked)."""
        if not tight_cache:
            tight_cache.append(_dense_errors(batch) <= DENSE_LOGIT_TOL)
        return tight_cache[0]

    scr = screen(batch, serr, tight_of if cfg.early_dense else None)
    if batch.share_lower is not None:  # a part of the data set: reach from the whole set's maximum
        scr.lower = _shared_lower(batch.share_lower, scr.lower)
    thr = scr.threshold(batch.slot_reach)
    cands = _route(batch, scr, thr, tight_of)
    code, width = cands.code, cands.width
    want = batch.want
    _refuse(code, want)
    pieces: list[tuple[list[int], Partials, torch.Tensor]] = []
    refined = 0
    empty = [i for i in range(s_total) if code[i] == Route.EMPTY]
    # a part of the data set: slots none of whose rows here lie within reach of the whole's maximum
    beyond = [i for i in range(s_total) if code[i] == Route.SPARSE and width[i] == 0]
    if empty or beyond:  # empty partials (keep_empty); what ``beyond`` leaves out is in its tail
        none = empty + beyond
        pieces.append((none, _empty(batch, len(none)), torch.zeros(len(none), dtype=torch.float64, device=dev)))
    single = [i for i in range(s_total) if code[i] == Route.SPARSE and width[i] == 1]
    if single:
        if len(single) == s_total:
            part, err = exact_single(batch, slice(0, s_total), cands.kept_i[:, 0])
        else:
            idx = torch.tensor(single, dtype=torch.int64, device=dev)
            part, err = exact_single(batch, idx, cands.kept_i[:, 0].index_select(0, idx))
        pieces.append((single, part, err))
        refined += len(single) if want.logits else 0
    multi = [i for i in range(s_total) if code[i] == Route.SPARSE and width[i] > 1]
    if multi:
        multi.sort(key=lambda i: -width[i])  # widest first: blocks of similar widths
        idx = torch.tensor(multi, dtype=torch.int64, device=dev)
        widths = [width[i] for i in multi]
        part, err = refine(batch, idx, cands.padded_rows(idx, widths), widths)
        pieces.append((multi, part, err))
        refined += sum(widths)
    work = []
    for g in batch.s.groups:
        dense = [i for i in range(g.s0, g.s1) if code[i] == Route.DENSE]
        if dense:
            work.append((g, dense))
            refined += len(dense) * g.rows
    if work:
        pieces += dense_passes(batch, work)
    split_tail: list[tuple[list[int], torch.Tensor]] = []
    for g in batch.s.groups:
        split = [i for i in range(g.s0, g.s1) if code[i] == Route.SPLIT]
        if split:
            part, err, extra = _split(batch, g, split, cands, serr)
            pieces.append((split, part, err))
            split_tail.append((split, extra))
            refined += sum(width[i] for i in split)
    for gi, g in enumerate(batch.s.groups):
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
    tail = cands.tail
    if empty:  # nothing of weight was left out of an empty slot
        tail = tail.index_fill(0, torch.tensor(empty, dtype=torch.int64, device=dev), 0.0)
    for slots_s, extra in split_tail:
        tail = tail.index_copy(0, torch.tensor(slots_s, dtype=torch.int64, device=dev), extra)
    return SlotPartials(
        state,
        logit_err,
        refined,
        unit_normaliser=len(single) == s_total,
        tail=tail,
        shared_tail=batch.share_lower is not None,
    )


def fast_partials(batch: Batch) -> SlotPartials:
    """Fast-mode partials of every slot: the screening logits used directly (one host read, to
    refuse empty or non-finite posteriors)."""
    serr = _screen_errors(batch)
    parts: list[Partials] = []
    errs: list[torch.Tensor] = []
    for g in batch.s.groups:
        part, err = fast_pass(batch, g, serr[g.slots])
        parts.append(part)
        errs.append(err)
    if len(parts) == 1:
        state, logit_err = parts[0], errs[0]
    else:
        state, logit_err = stack(parts), torch.cat(errs)
    m = state.m
    bad = torch.isnan(m) | (m == math.inf)
    _refuse(torch.where(bad, Route.BAD, torch.where(m == -math.inf, Route.EMPTY, Route.SPARSE)).tolist(), batch.want)
    return SlotPartials(state, logit_err, 0, unit_normaliser=False, tail=torch.zeros_like(logit_err))
