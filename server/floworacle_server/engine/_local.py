"""The local oracle (Kamb & Ganguli's "L machine") and the streamed pass both patch oracles run.

For a query x_t (an image (C, H, W)) and each pixel p, the posterior over training images i
sees only the P x P window ``Omega_p`` around p (zero padding, see :mod:`._patches`):

    gamma_i(p) ∝ w_i exp(-||x_t[Omega_p] - alpha x_i[Omega_p]||^2 / (2 sigma^2))
    x1_hat[:, p] = sum_i gamma_i(p) x_i[:, p]

Each (query, pixel) pair is a posterior row of its own, streamed over the data in chunks with
the mergeable partials of :mod:`._partials` (running max, sum, weighted sum of the C channel
values), so the answer is exact whatever the chunking. With P = 2 max(H, W) - 1 every window is
the whole image and the local oracle is the global one.

Cost per query: the logits are a batched GEMM over the H W pixels of the query's unfolded
windows (K + 2 values, K = C P^2) against the data's (N columns): about N H W (K + 2)
multiply-adds, then N H W exponentials and N H W C multiply-adds for the weighted sums; on a GPU
the same batched GEMM and elementwise kernels. The equivariant oracle (:mod:`._equivariant`) runs
the same pass with another layout of rows and columns.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from floworacle_server.data import Dataset
from floworacle_server.engine._bounds import DENSE_LOGIT_TOL, REACH_MARGIN, x1_error
from floworacle_server.engine._partials import Partials
from floworacle_server.engine._patches import (
    Candidates,
    PatchConfig,
    PatchGroup,
    PatchResult,
    augmented_queries,
    candidate_partials,
    chunk_partials,
    clamp_tail,
    dense_logit_error,
    exact_candidates,
    image_shape_of,
    patch_sizes,
    patch_sq_norms,
    patch_view,
    plan_patch_groups,
    unfold,
)

__all__ = ["local_oracle", "patch_oracle", "Layout"]


class Layout(Protocol):
    """How one patch oracle arranges its posterior rows (query, pixel) and columns (data patches).

    ``L`` pixels per image; ``bq`` queries in the block; ``n`` images in the data chunk.
    """

    def chunk_images(self, budget: int, bq: int, L: int) -> int:
        """Images per data chunk for ``budget`` logits."""
        ...

    def rows(self, qa: torch.Tensor) -> torch.Tensor:
        """The GEMM's left operand from augmented query rows (bq, L, K + 2)."""
        ...

    def columns_of(self, xc: torch.Tensor, p: int, logw: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(augmented columns ``[b, ||b||^2, log w]`` in this layout, squared norms (L, n)) of a
        chunk of images (n, C, H, W)."""
        ...

    def logits(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """The GEMM: logits of every (row, column) of the block and chunk."""
        ...

    def values(self, xc: torch.Tensor) -> torch.Tensor:
        """Column values for :func:`._patches.chunk_partials` from the chunk (n, C, L)."""
        ...

    def exclude(
        self, g: torch.Tensor, js: torch.Tensor, images: torch.Tensor, bq: int, L: int, value: float = -math.inf
    ) -> None:
        """In place: query ``js[k]`` leaves out image ``images[k]`` (chunk positions): its
        entries become ``value`` (-inf in the logits, 0 in the weights)."""
        ...

    def drop_columns(self, e: torch.Tensor, images: torch.Tensor, bq: int, L: int) -> None:
        """In place: the weights of images ``images`` (chunk positions) become 0 in every row."""
        ...

    def flat(self, t: torch.Tensor) -> torch.Tensor:
        """(bq, L, ...) per-row tensor -> (rows, ...) in the logits' row order."""
        ...

    def unflat(self, t: torch.Tensor, bq: int, L: int) -> torch.Tensor:
        """(rows, ...) -> (bq, L, ...)."""
        ...

    def row_view(self, t: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """(rows,) as a view that broadcasts against the logits ``g``."""
        ...

    def norm_max(self, sq: torch.Tensor) -> torch.Tensor:
        """Largest squared data patch norm each row meets in this chunk (``sq`` (L, n)),
        broadcastable to (bq, L)."""
        ...

    def candidates(
        self, idx: torch.Tensor, aq: torch.Tensor, cols: torch.Tensor, xc: torch.Tensor, bq: int, L: int
    ) -> tuple[torch.Tensor, ...]:
        """For the (M, 2 or 3) index tuples of ``g.nonzero()``: the M pairs' rows (flat order),
        queries j, query patches a (M, K), data patches b (M, K), values (M, C) and images (chunk
        positions), given the block's query patches (bq, K, L), the chunk's columns and its
        values (n, C, L)."""
        ...

    def columns(self, rows: int, L: int) -> int:
        """Columns of one posterior row over ``rows`` images."""
        ...


class LocalLayout:
    """Local oracle: logits (L, bq, n), row ``p bq + j``; a row's columns are the n images at its
    own pixel (a batched GEMM over pixels, columns (L, K + 2, n))."""

    def chunk_images(self, budget: int, bq: int, L: int) -> int:
        return max(1, budget // max(1, bq * L))

    def rows(self, qa: torch.Tensor) -> torch.Tensor:
        return qa.transpose(0, 1).contiguous()  # (L, bq, K + 2)

    def columns_of(self, xc: torch.Tensor, p: int, logw: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        n, c, h, w = xc.shape
        k = c * p * p
        out = torch.empty(h * w, k + 2, n, dtype=torch.float64, device=xc.device)
        out[:, :k].view(h, w, c, p, p, n).copy_(patch_view(xc, p))
        sq = patch_sq_norms(xc, p)  # (L, n)
        out[:, k] = sq
        out[:, k + 1] = 0.0 if logw is None else logw[None, :]
        return out, sq

    def logits(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        return torch.bmm(rows, cols)

    def values(self, xc: torch.Tensor) -> torch.Tensor:
        return xc.permute(2, 0, 1).contiguous()  # (L, n, C)

    def exclude(
        self, g: torch.Tensor, js: torch.Tensor, images: torch.Tensor, bq: int, L: int, value: float = -math.inf
    ) -> None:
        g[:, js, images] = value

    def drop_columns(self, e: torch.Tensor, images: torch.Tensor, bq: int, L: int) -> None:
        e[:, :, images] = 0.0

    def flat(self, t: torch.Tensor) -> torch.Tensor:
        return t.transpose(0, 1).reshape(-1, *t.shape[2:])

    def unflat(self, t: torch.Tensor, bq: int, L: int) -> torch.Tensor:
        return t.reshape(L, bq, *t.shape[1:]).transpose(0, 1)

    def row_view(self, t: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return t.view(g.shape[0], g.shape[1], 1)

    def norm_max(self, sq: torch.Tensor) -> torch.Tensor:
        return sq.amax(dim=1)[None, :]

    def candidates(
        self, idx: torch.Tensor, aq: torch.Tensor, cols: torch.Tensor, xc: torch.Tensor, bq: int, L: int
    ) -> tuple[torch.Tensor, ...]:
        p, j, i = idx.unbind(1)
        k = aq.shape[1]
        return p * bq + j, j, aq[j, :, p], cols[p, :k, i], xc[i, :, p], i

    def columns(self, rows: int, L: int) -> int:
        return rows


@dataclass
class _Block:
    """Pass-one state of a block of queries: their float64 queries, patches and partials."""

    x: torch.Tensor  # (bq, C, H, W)
    alpha: torch.Tensor
    sigma: torch.Tensor
    aq: torch.Tensor  # (bq, K, L)
    qa: torch.Tensor  # (bq, L, K + 2)
    rows: torch.Tensor  # qa in the layout's form
    excl: torch.Tensor | None  # (bq,) data rows left out, -1 none
    partials: Partials
    b2max: torch.Tensor  # largest squared data patch norm met, broadcastable to (bq, L)


def _excluded(excl: torch.Tensor | None, s: int, e: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    if excl is None:
        return None
    inside = (excl >= s) & (excl < e)
    js = inside.nonzero().flatten()
    if js.numel() == 0:
        return None
    return js, excl[js] - s


def _dead(
    layout: Layout,
    hit: tuple[torch.Tensor, torch.Tensor] | None,
    zero: torch.Tensor | None,
    bq: int,
    L: int,
) -> Callable[[torch.Tensor], None] | None:
    """What must weigh exactly 0 in a chunk's weights: excluded (query, image) pairs and images
    of zero sample weight."""
    if hit is None and (zero is None or zero.numel() == 0):
        return None

    def apply(e: torch.Tensor) -> None:
        if hit is not None:
            layout.exclude(e, hit[0], hit[1], bq, L, 0.0)
        if zero is not None and zero.numel():
            layout.drop_columns(e, zero, bq, L)

    return apply


def patch_oracle(
    ds: Dataset,
    layout: Layout,
    x_t: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    patch_size: int | Sequence[int] | np.ndarray | torch.Tensor,
    *,
    labels: torch.Tensor | np.ndarray | None = None,
    exclude: torch.Tensor | np.ndarray | None = None,
    logit_tol: float = DENSE_LOGIT_TOL,
    config: PatchConfig | None = None,
) -> PatchResult:
    """The patch oracle of ``layout`` for B queries (see :func:`local_oracle` for the arguments)."""
    image = image_shape_of(ds)
    if ds.shard is not None:
        raise ValueError(
            f"data set {ds.name!r} is sharded over a gang: the patch oracles do not merge their per-pixel partials "
            "across ranks yet; serve it from one process for kind local / equivariant"
        )
    C, H, W = image
    x = torch.as_tensor(x_t)
    b = int(x.shape[0])
    if x.numel() != b * ds.dim:
        raise ValueError(f"queries have {x.numel() // max(b, 1)} values each; data set {ds.name!r} has D = {ds.dim}")
    dev = ds.device
    x = x.reshape(b, C, H, W).to(device=dev, dtype=torch.float64)
    alpha = torch.as_tensor(alpha, dtype=torch.float64).reshape(b).to(dev)
    sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(b).to(dev)
    if not bool((sigma > 0).all()):
        raise ValueError("the patch oracles need sigma_t > 0 (t < 1)")
    sizes = patch_sizes(patch_size, b, image)
    lab = None if labels is None else np.asarray(torch.as_tensor(labels).cpu().numpy(), dtype=np.int64).reshape(b)
    ex_rows = None
    if exclude is not None:
        ex = torch.as_tensor(exclude, dtype=torch.int64).reshape(b).to(dev)
        if bool(((ex < -1) | (ex >= ds.num_samples)).any()):
            raise ValueError(f"exclude indices must lie in -1 .. {ds.num_samples - 1}")
        ex_rows = torch.where(ex >= 0, ds.rows_of(ex.clamp(min=0)), ex)
    cfg = config or PatchConfig.for_device(dev)
    xmax, max_logw = ds.stats.abs_max, ds.stats.max_abs_logw
    x1 = torch.empty(b, ds.dim, dtype=torch.float64, device=dev)
    bound = torch.empty(b, dtype=torch.float64, device=dev)
    refined = 0
    for group in plan_patch_groups(ds, sizes, lab):
        q = torch.from_numpy(group.queries).to(dev)
        xg, bg, r = _group(ds, layout, group, x, alpha, sigma, ex_rows, q, image, cfg, xmax, max_logw, logit_tol)
        x1.index_copy_(0, q, xg)
        bound.index_copy_(0, q, bg)
        refined += r
    return PatchResult(x1, bound, torch.from_numpy(sizes).to(dev), refined)


def _group(
    ds: Dataset,
    layout: Layout,
    group: PatchGroup,
    x: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    ex_rows: torch.Tensor | None,
    q: torch.Tensor,
    image: tuple[int, int, int],
    cfg: PatchConfig,
    xmax: float,
    max_logw: float,
    logit_tol: float,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(x1_hat (bq, D), bound (bq,), refined) of one group, in query blocks."""
    C, H, W = image
    L = H * W
    p = group.patch
    k = C * p * p
    nq = int(q.numel())
    # a block of queries holds at least one image's logits; at most `budget` logits per chunk
    per_query = max(1, cfg.logit_elements // max(1, layout.columns(1, L) * L))
    xs, bs, refined = [], [], 0
    for s in range(0, nq, per_query):
        qb = q[s : s + per_query]
        xb, bb, r = _block(ds, layout, group, x, alpha, sigma, ex_rows, qb, image, k, cfg, xmax, max_logw, logit_tol)
        xs.append(xb)
        bs.append(bb)
        refined += r
    return torch.cat(xs), torch.cat(bs), refined


def _chunks(ds: Dataset, group: PatchGroup, n: int, image: tuple[int, int, int]):  # type: ignore[no-untyped-def]
    C, H, W = image
    for s in range(group.start, group.stop, n):
        e = min(group.stop, s + n)
        xc = ds.x[s:e].to(torch.float64).reshape(e - s, C, H, W)
        lw = None if ds.log_weights is None else ds.log_weights[s:e]
        yield s, e, xc, lw


def _block(
    ds: Dataset,
    layout: Layout,
    group: PatchGroup,
    x: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    ex_rows: torch.Tensor | None,
    qb: torch.Tensor,
    image: tuple[int, int, int],
    k: int,
    cfg: PatchConfig,
    xmax: float,
    max_logw: float,
    logit_tol: float,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    C, H, W = image
    L = H * W
    bq = int(qb.numel())
    dev = x.device
    xq = x.index_select(0, qb)
    a_, s_ = alpha.index_select(0, qb), sigma.index_select(0, qb)
    aq = unfold(xq, group.patch)
    qa = augmented_queries(aq, a_, s_)
    blk = _Block(
        x=xq, alpha=a_, sigma=s_, aq=aq, qa=qa, rows=layout.rows(qa),
        excl=None if ex_rows is None else ex_rows.index_select(0, qb),
        partials=Partials.empty(bq * L, C, 0, dev, entropy=False, ess=False),
        b2max=torch.zeros(1, 1, dtype=torch.float64, device=dev),
    )  # fmt: skip
    n = layout.chunk_images(cfg.logit_elements, bq, L)
    for s, e, xc, lw in _chunks(ds, group, n, image):
        cols, sq = layout.columns_of(xc, group.patch, lw)
        g = layout.logits(blk.rows, cols)
        hit = _excluded(blk.excl, s, e)
        if hit is not None:
            layout.exclude(g, hit[0], hit[1], bq, L)
        blk.b2max = torch.maximum(blk.b2max, layout.norm_max(sq))
        dead = _dead(layout, hit, None if lw is None else torch.isneginf(lw).nonzero().flatten(), bq, L)
        blk.partials.merge_into(None, chunk_partials(g, layout.values(xc.reshape(e - s, C, L)), xmax, dead))
    m = blk.partials.m
    if not bool(torch.isfinite(m).all()):
        bad = int(qb[layout.unflat(~torch.isfinite(m), bq, L).any(dim=1).nonzero()[0, 0]])
        scope = "the data set" if group.label < 0 else f"class {group.label}"
        raise ValueError(
            f"query {bad}: no sample with positive weight is left in {scope} of data set {ds.name!r} once its "
            "exclusion is applied; its posterior is empty: drop the exclusion or query a larger set"
        )
    c = a_ / (s_ * s_)
    a_norm = torch.linalg.vector_norm(aq, dim=1)  # (bq, L)
    err = layout.flat(dense_logit_error(k, c[:, None], a_[:, None], a_norm, blk.b2max.sqrt(), max_logw))
    post = blk.partials.finalize(consume=True)
    tail = clamp_tail(layout.columns(group.stop - group.start, L))
    row_bound = x1_error(err, post.mean_err, xmax, torch.full_like(err, tail))
    x1 = post.x1_hat
    refined = 0
    redo = layout.unflat(err > logit_tol, bq, L).any(dim=1)
    if bool(redo.any()):
        sel = redo.nonzero().flatten()
        x1_r, bound_r, refined = _exact_rows(ds, layout, group, blk, sel, m, err, image, k, cfg, xmax)
        x1_u = layout.unflat(x1, bq, L).clone()
        rb_u = layout.unflat(row_bound, bq, L).clone()
        x1_u[sel] = x1_r
        rb_u[sel] = bound_r
        x1, row_bound = layout.flat(x1_u), layout.flat(rb_u)
    # (rows, C) -> (bq, L, C) -> (bq, C, L): the flat (C, H, W) order of the samples
    out = layout.unflat(x1, bq, L).permute(0, 2, 1).reshape(bq, C * L)
    return out, layout.unflat(row_bound, bq, L).amax(dim=1), refined


def _exact_rows(
    ds: Dataset,
    layout: Layout,
    group: PatchGroup,
    blk: _Block,
    sel: torch.Tensor,
    m_all: torch.Tensor,
    err_all: torch.Tensor,
    image: tuple[int, int, int],
    k: int,
    cfg: PatchConfig,
    xmax: float,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Queries ``sel`` of the block again, their candidates' logits from float64 differences:
    ((f, L, C) x1, (f, L) bound, pairs recomputed); see :mod:`._patches`."""
    C, H, W = image
    L = H * W
    bq = int(blk.x.shape[0])
    f = int(sel.numel())
    dev = blk.x.device
    m = layout.flat(layout.unflat(m_all, bq, L)[sel])
    err = layout.flat(layout.unflat(err_all, bq, L)[sel])
    columns = layout.columns(group.stop - group.start, L)
    reach = math.log(max(columns, 1)) + REACH_MARGIN
    thr = m - reach - 2.0 * err
    aq = blk.aq[sel]
    rows_op = layout.rows(blk.qa[sel])
    alpha, sigma = blk.alpha[sel], blk.sigma[sel]
    inv2s2 = 0.5 / (sigma * sigma)
    excl = None if blk.excl is None else blk.excl[sel]
    exact = Partials.empty(f * L, C, 0, dev, entropy=False, ess=False)
    worst = torch.zeros(f * L, dtype=torch.float64, device=dev)
    refined = 0
    n = layout.chunk_images(cfg.logit_elements, f, L)
    for s, e, xc, lw in _chunks(ds, group, n, image):
        cols, _ = layout.columns_of(xc, group.patch, lw)
        g = layout.logits(rows_op, cols)
        hit = _excluded(excl, s, e)
        if hit is not None:
            layout.exclude(g, hit[0], hit[1], f, L)
        idx = (g >= layout.row_view(thr, g)).nonzero()
        del g
        parts: list[Candidates] = []
        if idx.shape[0]:
            rows, j, a, bb, vals, img = layout.candidates(idx, aq, cols, xc.reshape(e - s, C, L), f, L)
            logw = None if lw is None else lw[img]
            parts.append(exact_candidates(a, bb, alpha[j], inv2s2[j], logw, vals, rows))
            refined += int(idx.shape[0])
        part, perr = candidate_partials(parts, f * L, C, xmax, columns, dev)
        worst = torch.maximum(worst, perr)
        exact.merge_into(None, part)
    post = exact.finalize(consume=True)
    tail = torch.full_like(worst, math.exp(-REACH_MARGIN) * (1 + 1e-9))
    bound = x1_error(worst, post.mean_err, xmax, tail)
    return layout.unflat(post.x1_hat, f, L), layout.unflat(bound, f, L), refined


def local_oracle(
    ds: Dataset,
    x_t: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    patch_size: int | Sequence[int] | np.ndarray | torch.Tensor,
    *,
    labels: torch.Tensor | np.ndarray | None = None,
    exclude: torch.Tensor | np.ndarray | None = None,
    logit_tol: float = DENSE_LOGIT_TOL,
    config: PatchConfig | None = None,
) -> PatchResult:
    """The local oracle's posterior mean for B queries (module docstring), float64, exact.

    Args:
        ds: a data set with an image shape (C, H, W) (:attr:`Dataset.image_shape`).
        x_t: (B, D) or (B, C, H, W) queries, any float dtype, any device.
        alpha, sigma: (B,) path coefficients (sigma > 0).
        patch_size: P, odd, 1 .. 2 max(H, W) - 1: one for all, or (B,) one per query (e.g. a
            schedule over t applied by the caller, :func:`patch_schedule`).
        labels: (B,) class per query for class-conditional posteriors (-1: unconditional), or None.
        exclude: (B,) the caller's index of a sample each query leaves out (-1: none), or None.
        logit_tol: rows whose GEMM logit bound exceeds this many nats are recomputed exactly
            (0: every row; tests use it to exercise the exact route).
        config: block sizes (default: the data device's).

    Returns:
        x1_hat (B, D), a proven (B,) bound on its max abs error, the patch sizes, and the number
        of pairs recomputed from differences.

    Raises:
        ValueError: no image shape, a bad patch size, unknown or empty classes, or a posterior
            left empty by an exclusion; each message says how to fix it.
    """
    return patch_oracle(
        ds, LocalLayout(), x_t, alpha, sigma, patch_size, labels=labels, exclude=exclude, logit_tol=logit_tol,
        config=config,
    )  # fmt: skip
