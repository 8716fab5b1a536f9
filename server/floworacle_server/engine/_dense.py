"""Dense passes: every row of a range through a streamed softmax, in float64 or (fast mode) as screened.

The navigation stage: when a slot has candidates in most of its rows, a gather would move more
than a GEMM does. The dense float64 pass computes, per block of rows,

    l_i = (c x_t) . x_i - h ||x_i||^2 + log p_i      (c x_t formed once; float64 GEMM)

and absorbs the block into running float64 partials (max, rescale, ``v <- c_a v + p @ x``: the
second GEMM writes straight into the state). The per-query constant ``||x_t||^2 / (2 sigma^2)`` is
taken off the maximum and the top-k logits at the end, so the partials use the full logits
``log p_i - ||x_t - alpha x_i||^2 / (2 sigma^2)`` and merge with any other. Its error bound,
:func:`._bounds.dense_logit_error`, is checked by the caller against ``DENSE_LOGIT_TOL`` *before*
a slot is sent here.

Groups of similar size (the classes of a conditional batch) go through one pass together: slots
are laid out as (G, q_max) and rows as (G, rows) blocks gathered from each group's range, padded
and masked, so the kernels per block are the same few batched GEMMs whatever the number of
labels in the batch.

The variance's second moment uses one reference point per group, the mean ``r`` of the group's
first block of rows: ``A = sum p_i ||x_i - r||^2`` accumulates like s, and at the end ``m2 = A - s
||mu - r||^2`` (exact in exact arithmetic for any r; with r near the data the cancellation stays
mild where dense passes run, and ``m2_err`` bounds it either way).

The fast mode runs the same absorption on the screening logits themselves, with the weighted
sums in float32 (on GPUs in the screening dtype), and reports the screening bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from floworacle_server.engine._batch import Batch, Group, mask_excluded
from floworacle_server.engine._bounds import SCREEN_DTYPES, U32, U64, dense_logit_error, mean_rounding
from floworacle_server.engine._partials import Partials
from floworacle_server.engine._screen import scaled_queries, screen_logits

__all__ = ["dense_passes", "fast_pass", "screened_pass"]


@dataclass
class _Acc:
    """Running float64 sums of one dense pass over G groups of q slots each (R = G q rows).

    ``w`` (G, q, D + e) holds ``v`` in its first D columns and, when the pass appends columns of
    ones (and of ``||x_i - r||^2``) to its rows, ``s`` (and the variance's ``A``) after them: the
    accumulation GEMM then produces them too, with no pass of their own.
    """

    groups: int
    dim: int
    m: torch.Tensor  # (R,)
    w: torch.Tensor  # (G, q, D + e)
    s_sep: torch.Tensor | None  # s when not a column of w
    a_sep: torch.Tensor | None  # A when not a column of w (variance)
    h: torch.Tensor | None
    q: torch.Tensor | None
    tl: torch.Tensor  # (R, k)
    ti: torch.Tensor

    @classmethod
    def start(cls, groups: int, per: int, batch: Batch, extra: int) -> _Acc:
        """``extra``: columns after v in w (0: s and A are kept apart; 1: s; 2: s and A)."""
        dev, f64 = batch.ds.device, torch.float64
        want = batch.want
        r = groups * per

        def zeros() -> torch.Tensor:
            return torch.zeros(r, dtype=f64, device=dev)

        return cls(
            groups=groups,
            dim=batch.dim,
            m=torch.full((r,), -math.inf, dtype=f64, device=dev),
            w=torch.zeros(groups, per, batch.dim + extra, dtype=f64, device=dev),
            s_sep=zeros() if extra == 0 else None,
            a_sep=zeros() if extra == 0 and want.variance else None,
            h=zeros() if want.entropy else None,
            q=zeros() if want.ess else None,
            tl=torch.full((r, want.top_k), -math.inf, dtype=f64, device=dev),
            ti=torch.full((r, want.top_k), -1, dtype=torch.int64, device=dev),
        )

    @property
    def s(self) -> torch.Tensor:
        return self.s_sep if self.s_sep is not None else self.w[:, :, self.dim].reshape(-1)

    @property
    def a(self) -> torch.Tensor | None:
        if self.s_sep is not None:
            return self.a_sep
        return self.w[:, :, self.dim + 1].reshape(-1) if self.w.shape[2] > self.dim + 1 else None

    def absorb(
        self,
        logits: torch.Tensor,
        base: torch.Tensor | int,
        x: torch.Tensor,
        dref: torch.Tensor | None,
        host_check: bool,
    ) -> None:
        """Take in one block: ``logits`` (R, n) float64 (consumed); column j of row r is data row
        ``base[r] + j``; ``x`` (G, n, D + e) the rows in the accumulation dtype (with the columns
        of w, e > 0), or (G, n, D) with ``dref`` (G, n) ``||x_i - r||^2`` kept apart (e = 0).
        ``host_check``: skip the rescale when it is exactly 1 (CPU)."""
        g = self.groups
        r, n = logits.shape
        m_new = torch.maximum(self.m, logits.amax(dim=1))
        # nothing seen yet (-inf): any finite shift will do, exp(-inf - shift) = 0
        safe = m_new.clamp(min=-1e300)
        d_old = self.m - safe  # -inf where the state is still empty, so its rescale is 0
        ca = torch.exp(d_old)
        z = logits.sub_(safe[:, None])
        k = self.tl.shape[1]
        if k:
            bl, bi = z.topk(min(k, n), dim=1)
            bi = torch.where(torch.isfinite(bl), bi + (base if isinstance(base, int) else base[:, None]), -1)
            bl = bl + safe[:, None]
            if bl.shape[1] < k:
                pad = k - bl.shape[1]
                bl = torch.cat([bl, bl.new_full((r, pad), -math.inf)], dim=1)
                bi = torch.cat([bi, bi.new_full((r, pad), -1)], dim=1)
            self.tl, self.ti = Partials.topk_union(self.tl, self.ti, bl, bi)
        p = torch.exp(z) if self.h is not None else z.exp_()
        if self.h is not None:  # before s changes
            d = d_old.clamp(min=-1e300)  # an empty state has s = 0: no -inf * 0
            self.h = ca * (self.h + d * self.s) + torch.linalg.vecdot(p, z.clamp_(min=torch.finfo(z.dtype).min))
        if self.q is not None:
            self.q = self.q * ca * ca + torch.linalg.vecdot(p, p)
        if self.s_sep is not None:
            self.s_sep = self.s_sep * ca + p.sum(dim=1)
        pg = p.view(g, r // g, n)
        if self.a_sep is not None and dref is not None:
            self.a_sep = self.a_sep * ca + torch.bmm(pg, dref[:, :, None]).view(r)
        if not (host_check and bool((ca == 1).all())):  # an exact multiply by 1 is skipped
            self.w.mul_(ca.view(g, r // g, 1))
        if x.dtype == torch.float64:
            self.w.baddbmm_(pg, x)
        else:
            self.w.add_(torch.bmm(pg.to(x.dtype), x))
        self.m = m_new


def _finish(
    batch: Batch,
    acc: _Acc,
    offset: torch.Tensor | None,
    ref: torch.Tensor | None,
    terms: int,
    blocks: int,
    mean_err: float,
) -> Partials:
    """Partials (R rows) from the running sums; ``offset`` (R,) is subtracted from the logits;
    ``ref`` (G, D) the variance's reference points; ``terms`` rows per block."""
    d = batch.dim
    g = acc.groups
    r = acc.m.shape[0]
    m, tl = acc.m, acc.tl
    if offset is not None:
        m = m - offset
        tl = tl - offset[:, None]
    s = acc.s.clone() if acc.s_sep is None else acc.s
    a = acc.a
    v3 = acc.w[:, :, :d]
    m2 = m2_err = None
    if a is not None and ref is not None:
        gap = (v3 / s.view(g, r // g, 1)) - ref[:, None, :]
        g2 = torch.linalg.vecdot(gap, gap).reshape(r)
        between = s * g2
        m2 = (a - between).clamp_(min=0.0)  # >= 0 exactly; clamping never adds error
        m2_err = (
            (d + terms + 4 * blocks + 8) * U64 * (a + between)
            + 2.0 * s * g2.sqrt() * math.sqrt(d) * mean_err
            + 3.0 * s * d * mean_err * mean_err
        )
    v = v3.reshape(r, d) if v3.is_contiguous() else v3.contiguous().view(r, d)
    return Partials(
        m=m,
        s=s,
        v=v,
        h=acc.h,
        q=acc.q,
        m2=m2,
        m2_err=m2_err,
        topk_logits=tl,
        topk_index=acc.ti,
        mean_err=mean_err,
        xmax=batch.stats.abs_max,
    )


def _buckets(work: list[tuple[Group, list[int]]]) -> list[list[tuple[Group, list[int]]]]:
    """Groups of rows within a factor 2 of each other share a padded pass (padding costs at most
    as much as the rows themselves)."""
    order = sorted(work, key=lambda gs: -gs[0].rows)
    out: list[list[tuple[Group, list[int]]]] = []
    for item in order:
        if out and 2 * item[0].rows >= out[-1][0][0].rows:
            out[-1].append(item)
        else:
            out.append([item])
    return out


def _dense_bucket(batch: Batch, bucket: list[tuple[Group, list[int]]]) -> tuple[list[int], Partials, torch.Tensor]:
    ds, cfg, want = batch.ds, batch.cfg, batch.want
    dev, f64 = ds.device, torch.float64
    d = ds.dim
    g = len(bucket)
    per = max(len(s) for _, s in bucket)
    n_max = max(gr.rows for gr, _ in bucket)
    # padded slot layout (g, per): a short group repeats its first slot (dropped at the end)
    pad_slots = [s[i] if i < len(s) else s[0] for _, s in bucket for i in range(per)]
    real = [gi * per + i for gi, (_, s) in enumerate(bucket) for i in range(len(s))]
    idx = torch.tensor(pad_slots, dtype=torch.int64, device=dev)
    co = batch.s.coef.take(idx)
    qn = batch.s.qnorm.index_select(0, idx)
    # rows carry [x_i, 1, (||x_i - r||^2,) ||x_i||^2]; queries [c x_t, 0, (0,) -h]: one GEMM
    # gives the logits, the accumulation GEMM over the first D + e columns v, s (and A)
    extra = 2 if want.variance else 1
    width = d + extra + 1
    xq = torch.zeros(g * per, width, dtype=f64, device=dev)
    xq[:, :d] = batch.queries(idx)
    qn2 = torch.linalg.vecdot(xq[:, :d], xq[:, :d])  # float64: the per-query constant's own sum
    xq[:, :d].mul_(co.c[:, None])
    xq[:, width - 1] = -co.half
    xq = xq.view(g, per, width)
    excl = batch.excluded(idx)
    rows = min(n_max, max(1, cfg.dense_rows(d, ds.x.numel() * ds.x.element_size()) // g))
    buf = torch.empty(g, rows, width, dtype=f64, device=dev)
    buf[:, :, d] = 1.0
    acc = _Acc.start(g, per, batch, extra)
    starts = [gr.start for gr, _ in bucket]
    sizes = [gr.rows for gr, _ in bucket]
    ref: torch.Tensor | None = None
    if g > 1:
        start_t = torch.tensor(starts, dtype=torch.int64, device=dev)
        size_t = torch.tensor(sizes, dtype=torch.int64, device=dev)
        slot_start = start_t.repeat_interleave(per, output_size=g * per)
        cols = torch.arange(rows, device=dev)
    blocks = 0
    for j0 in range(0, n_max, rows):
        nb = min(rows, n_max - j0)
        xb = buf[:, :nb]
        if g == 1:
            sl = slice(starts[0] + j0, starts[0] + j0 + nb)
            xb[0, :, :d].copy_(ds.x[sl])
            xb[0, :, width - 1].copy_(ds.sq_norms[sl])
            logw = None if ds.log_weights is None else ds.log_weights[sl][None, :]
            valid = None
            base: torch.Tensor | int = starts[0] + j0
            ex_cols = None if excl is None else excl - (starts[0] + j0)
        else:
            offs = j0 + cols[:nb]
            valid = offs[None, :] < size_t[:, None]  # (g, nb)
            rows_idx = torch.where(valid, start_t[:, None] + offs[None, :], start_t[:, None]).flatten()
            xb[:, :, :d].copy_(ds.x.index_select(0, rows_idx).view(g, nb, d))
            xb[:, :, width - 1].copy_(ds.sq_norms.index_select(0, rows_idx).view(g, nb))
            logw = None if ds.log_weights is None else ds.log_weights.index_select(0, rows_idx).view(g, nb)
            base = slot_start + j0
            ex_cols = None if excl is None else excl - base
        if want.variance:
            if ref is None:  # the mean of each group's first block of rows
                if valid is None:
                    ref = xb[:, :, :d].mean(dim=1)
                else:
                    wv = valid.to(f64)
                    ref = torch.bmm(wv[:, None, :], xb[:, :, :d]).squeeze(1) / wv.sum(dim=1, keepdim=True)
            xb[:, :, d + 1] = torch.sub(xb[:, :, :d], ref[:, None, :]).square_().sum(dim=2)
        logits = torch.bmm(xq, xb.transpose(1, 2))
        if logw is not None:
            logits.add_(logw[:, None, :])
        if valid is not None and j0 + nb > min(sizes):
            logits.masked_fill_(~valid[:, None, :], -math.inf)
        flat = logits.view(g * per, nb)
        mask_excluded(flat, ex_cols, 0)
        acc.absorb(flat, base, xb[:, :, : d + extra], None, cfg.host_shortcuts)
        blocks += 1
    max_norm = batch.slot_max_sq.index_select(0, idx).sqrt()
    err = dense_logit_error(qn, co.alpha, max_norm, co.inv2s2, batch.stats.max_abs_logw, d)
    xmax = batch.stats.abs_max
    # each block's GEMM adds gamma_rows of its own mass, each rescale and sum 4 u of the total
    mean_err = mean_rounding(rows + 4 * blocks, xmax)
    part = _finish(batch, acc, qn2 * co.inv2s2, ref, rows, blocks, mean_err)
    slots = [s for _, ss in bucket for s in ss]
    if len(real) == g * per:
        return slots, part, err
    keep = torch.tensor(real, dtype=torch.int64, device=dev)
    return slots, part.select(keep), err.index_select(0, keep)


def dense_passes(batch: Batch, work: list[tuple[Group, list[int]]]) -> list[tuple[list[int], Partials, torch.Tensor]]:
    """Float64 dense passes of the slots in ``work`` ((group, global slot ids) pairs).

    Returns, per pass, (its slots, their partials, per-slot logit error bound)."""
    return [_dense_bucket(batch, bucket) for bucket in _buckets(work)]


def screened_pass(
    batch: Batch,
    g: Group,
    slots: torch.Tensor | slice,
    screen_err: torch.Tensor,
    leave_out: torch.Tensor | None = None,
    full_logits: bool = False,
) -> tuple[Partials, torch.Tensor]:
    """The screening logits used directly over g's rows, for the slots ``slots`` (their bound
    ``screen_err`` (q,) is the logit error), float32 weighted sums (GPUs: the screening dtype).

    The fast mode, and the tail of the split route: ``leave_out`` (q, m) data rows to leave out
    (the head, computed exactly elsewhere; -1 = none); ``full_logits`` subtracts the per-query
    constant ``||x_t||^2 / (2 sigma^2)`` (float64) so the partials merge with exact ones;
    otherwise they are in the screening form and merge with fast partials of the same queries
    only. Returns (partials, logit error bound: screening, the weights' rounding to the
    accumulation dtype and, with ``full_logits``, the constant's float64 sum)."""
    ds, cfg = batch.ds, batch.cfg
    f32, f64 = torch.float32, torch.float64
    d = ds.dim
    cuda = ds.device.type == "cuda"
    acc_dtype = batch.model.dtype if cuda else f32
    u_acc = {dt: u for dt, u in SCREEN_DTYPES.values()}.get(acc_dtype, U32)
    co = batch.s.coef.take(slots)
    excl = batch.excluded(slots)
    if leave_out is not None:
        excl = leave_out if excl is None else torch.cat([leave_out, excl[:, None]], dim=1)
    xc, h32 = scaled_queries(batch, slots, g.rows), co.half.to(f32)
    q = co.alpha.shape[0]
    acc = _Acc.start(1, q, batch, 0)
    rows = cfg.chunk_rows(d)
    ref: torch.Tensor | None = None
    blocks = 0
    for s0 in range(g.start, g.stop, rows):
        s1 = min(s0 + rows, g.stop)
        lt = screen_logits(batch, xc, slice(s0, s1), h32, excl)
        chunk = ds.x[s0:s1]
        x_acc = chunk if chunk.dtype == acc_dtype else chunk.to(acc_dtype)
        dref = None
        if batch.want.variance:
            x64 = chunk.to(f64)
            if ref is None:
                ref = x64.mean(dim=0, keepdim=True)
            dref = torch.sub(x64, ref).square_().sum(dim=1)[None, :]
        acc.absorb(lt.to(f64), s0, x_acc[None], dref, cfg.host_shortcuts)
        blocks += 1
    xmax = batch.stats.abs_max
    # weights rounded to the accumulation dtype act like logit errors of u_acc; the data rounded
    # to it (when stored otherwise), the float32 accumulation of a chunk (inputs rounded inside a
    # float32 GEMM below "highest" precision) and a half-precision output add to the mean's error
    data_u = 0.0 if ds.x.dtype == acc_dtype else u_acc
    internal = 2 * batch.model.acc_u if acc_dtype == f32 and batch.model.acc_u > U32 else 0.0
    out_u = u_acc if acc_dtype != f32 else 0.0
    per_chunk = (1.01 * (rows + 2) * U32 + internal + data_u + out_u) * xmax
    mean_err = per_chunk + mean_rounding(4 * blocks, xmax)
    err = screen_err + 1.01 * u_acc
    offset = None
    if full_logits:
        xq = batch.queries(slots).to(f64)
        qn2 = torch.linalg.vecdot(xq, xq)
        offset = qn2 * co.inv2s2
        err = err + (d + 4) * U64 * offset
    return _finish(batch, acc, offset, ref, rows, blocks, mean_err), err


def fast_pass(batch: Batch, g: Group, screen_err: torch.Tensor) -> tuple[Partials, torch.Tensor]:
    """Fast mode for the slots of group ``g`` (see :func:`screened_pass`)."""
    return screened_pass(batch, g, g.slots, screen_err)
