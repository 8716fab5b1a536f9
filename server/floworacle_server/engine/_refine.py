"""Float64 refinement: exact logits from differences for the candidates of each slot.

For a slot (query x_t, path coefficients) and candidate rows x_i the logits

    l_i = log p_i - ||x_t - alpha x_i||^2 / (2 sigma^2)

are computed from the differences in float64 (:func:`._bounds.pair_logit_error` bounds each; the
squares are summed in two levels, :func:`._bounds.blocked_sum`, so that the proven rounding of a
logit grows like 2 sqrt(D) rather than D: near t = 1 a logit is millions of nats, and its bound is
what the velocity's bound is made of), never from a GEMM's ``||x_t||^2 - 2 alpha x_t . x_i + ...`` whose cancellation near t = 1 loses the
gaps between competing samples. Candidates come in a fixed-width layout: (b, w) data rows per
block of b slots, -1 where a slot has fewer than w, so a block is a handful of kernels whatever
its contents. The posterior variance's second moment is formed about the block's own mean from
the same gathered rows (two-pass, exact to a few ulps however sharply the weights collapse).

A slot with a single candidate has weight 1 whatever its logit: its row is its mean, exactly.
The logit itself is computed only when the partial may be merged with others (``Want.logits``).
"""

from __future__ import annotations

import math

import torch

from floworacle_server.engine._batch import Batch
from floworacle_server.engine._bounds import U64, blocked_sum, blocked_sum_terms, mean_rounding, pair_logit_error
from floworacle_server.engine._partials import Partials, per_query

__all__ = ["exact_single", "exact_rows", "refine", "stack"]


def _topk_columns(logits: torch.Tensor, rows: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, top_k) top logits and their data rows (-inf / -1 where fewer exist)."""
    b, w = logits.shape
    k = min(top_k, w)
    tl, ti = logits.topk(k, dim=1)
    idx = rows.gather(1, ti)
    idx = torch.where(torch.isfinite(tl), idx, torch.full_like(idx, -1))
    if k < top_k:
        tl = torch.cat([tl, tl.new_full((b, top_k - k), -math.inf)], dim=1)
        idx = torch.cat([idx, idx.new_full((b, top_k - k), -1)], dim=1)
    return tl, idx


def exact_single(batch: Batch, slots: torch.Tensor | slice, rows: torch.Tensor) -> tuple[Partials, torch.Tensor]:
    """Partials of slots that have exactly one candidate each (``rows`` (b,) data rows).

    The weighted sum is the row itself (weight exp(l - l) = 1), converted once to float64. Returns
    (partials, per-slot logit error bound: 0 where the logit was not needed)."""
    ds, want = batch.ds, batch.want
    dev, f64 = ds.device, torch.float64
    b = rows.shape[0]
    v = ds.x.index_select(0, rows).to(f64)
    zeros = torch.zeros(b, dtype=f64, device=dev)
    if want.logits:
        co = batch.s.coef.take(slots)
        diff = torch.addcmul(batch.queries(slots), co.alpha[:, None], v, value=-1)
        d2 = blocked_sum(diff.square_())
        del diff
        logw = None if ds.log_weights is None else ds.log_weights.index_select(0, rows)
        m = -d2 * co.inv2s2
        if logw is not None:
            m = m + logw
        ax = co.alpha.abs() * ds.sq_norms.index_select(0, rows).sqrt()
        err = pair_logit_error(d2, co.inv2s2, ax, logw, ds.dim, blocked_sum_terms(ds.dim))
    else:
        m, err = zeros, zeros
    ones = torch.ones(b, dtype=f64, device=dev)
    k = want.top_k
    tl = torch.full((b, k), -math.inf, dtype=f64, device=dev)
    ti = torch.full((b, k), -1, dtype=torch.int64, device=dev)
    if k:
        tl[:, 0], ti[:, 0] = m, rows
    part = Partials(
        m=m,
        s=ones,
        v=v,
        h=zeros if want.entropy else None,
        q=ones if want.ess else None,
        m2=zeros if want.variance else None,
        m2_err=zeros if want.variance else None,
        topk_logits=tl,
        topk_index=ti,
        mean_err=0.0,  # float32 / float16 / bfloat16 -> float64 is exact
        xmax=batch.stats.abs_max,
    )
    return part, err


def exact_rows(batch: Batch, slots: torch.Tensor, rows: torch.Tensor) -> tuple[Partials, torch.Tensor]:
    """Partials of b slots over their candidate rows ``rows`` (b, w) (-1 = none; every slot has
    at least one), with exact float64 logits from differences. Returns (partials, per-slot max
    logit error bound over its candidates)."""
    ds, want = batch.ds, batch.want
    f64 = torch.float64
    b, w = rows.shape
    d = ds.dim
    valid = rows >= 0
    r = rows.clamp(min=0)
    flat = r.flatten()
    xr = ds.x.index_select(0, flat).to(f64).view(b, w, d)
    co = batch.s.coef.take(slots)
    diff = torch.addcmul(batch.queries(slots)[:, None, :], co.alpha[:, None, None], xr, value=-1)
    d2 = blocked_sum(diff.square_())
    inv = co.inv2s2[:, None]
    logits = -d2 * inv
    logw = None
    if ds.log_weights is not None:
        logw = ds.log_weights.index_select(0, flat).view(b, w)
        logits = logits + logw
    neg_inf = torch.full_like(logits, -math.inf)
    logits = torch.where(valid, logits, neg_inf)
    ax = co.alpha.abs()[:, None] * ds.sq_norms.index_select(0, flat).view(b, w).sqrt()
    pe = pair_logit_error(d2, inv, ax, logw, d, blocked_sum_terms(d))
    err = torch.where(valid, pe, torch.zeros_like(pe)).amax(dim=1)
    m = logits.max(dim=1).values
    z = logits - m[:, None]
    p = torch.exp(z)
    s = p.sum(dim=1)
    v = torch.bmm(p[:, None, :], xr).squeeze(1)
    h = q = m2 = m2_err = None
    if want.entropy:
        h = torch.linalg.vecdot(p, z.clamp(min=torch.finfo(f64).min), dim=1)
    if want.ess:
        q = torch.linalg.vecdot(p, p, dim=1)
    xmax = batch.stats.abs_max
    mean_err = mean_rounding(w, xmax)
    if want.variance:
        mu = v / s[:, None]
        dev = torch.sub(xr, mu[:, None, :], out=diff)
        m2 = torch.linalg.vecdot(p, dev.square_().sum(dim=2), dim=1)
        # rounding of the squares and sums (D + w terms), of s in var = m2 / s, and the mean's
        # own error, which can only add s ||mu - mu_hat||^2 (the first moment about mu is 0)
        m2_err = (d + w + 8) * U64 * m2 + s * d * mean_err * mean_err
    tl, ti = _topk_columns(logits, rows, want.top_k)
    part = Partials(m, s, v, h, q, m2, m2_err, tl, ti, mean_err, xmax)
    return part, err


def refine(batch: Batch, slots: torch.Tensor, rows: torch.Tensor, widths: list[int]) -> tuple[Partials, torch.Tensor]:
    """:func:`exact_rows` for many slots: (n,) slot ids, (n, w) rows (-1 padded) and the host's
    list of each slot's width, tiled into blocks of at most ``gather_elements`` float64 values
    (over slots of similar width, and over columns for very wide slots, whose tiles are merged).
    The result is in the order of ``slots``."""
    n = rows.shape[0]
    d = batch.dim
    budget = batch.cfg.gather_elements // 2  # two (b, w, D) float64 buffers per block
    parts: list[Partials] = []
    errs: list[torch.Tensor] = []
    b0 = 0
    while b0 < n:
        wb = widths[b0]
        if wb * d > budget:  # one slot, its columns in tiles
            cols = max(1, budget // d)
            acc: Partials | None = None
            err: torch.Tensor | None = None
            for c0 in range(0, wb, cols):
                part, e = exact_rows(batch, slots[b0 : b0 + 1], rows[b0 : b0 + 1, c0 : min(wb, c0 + cols)])
                acc = part if acc is None else acc.merge(part)
                err = e if err is None else torch.maximum(err, e)
            assert acc is not None and err is not None
            parts.append(acc)
            errs.append(err)
            b0 += 1
            continue
        b1 = b0 + 1
        while b1 < n and b1 - b0 < budget // (d * max(wb, widths[b1])):
            wb = max(wb, widths[b1])
            b1 += 1
        part, err = exact_rows(batch, slots[b0:b1], rows[b0:b1, :wb])
        parts.append(part)
        errs.append(err)
        b0 = b1
    if len(parts) == 1:
        return parts[0], errs[0]
    return stack(parts), torch.cat(errs)


def stack(parts: list[Partials]) -> Partials:
    """Partials of disjoint query sets stacked along the queries."""

    def cat(name: str) -> torch.Tensor | None:
        items = [getattr(p, name) for p in parts]
        return None if items[0] is None else torch.cat(items)

    return Partials(
        m=torch.cat([p.m for p in parts]),
        s=torch.cat([p.s for p in parts]),
        v=torch.cat([p.v for p in parts]),
        h=cat("h"),
        q=cat("q"),
        m2=cat("m2"),
        m2_err=cat("m2_err"),
        topk_logits=torch.cat([p.topk_logits for p in parts]),
        topk_index=torch.cat([p.topk_index for p in parts]),
        mean_err=torch.cat([per_query(p.mean_err, p.m) for p in parts]),
        xmax=max(p.xmax for p in parts),
    )
