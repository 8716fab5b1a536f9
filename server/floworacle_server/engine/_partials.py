"""Mergeable partial sums of a streamed softmax: the unit that chunks, devices and shards combine.

For B queries and a subset S of the data, with exact logits l_i (i in S):

    m  = max_i l_i                              running maximum, -inf when S is empty
    s  = sum_i exp(l_i - m)                     normaliser
    v  = sum_i exp(l_i - m) x_i                 (B, D) weighted sum; x1_hat = v / s
    h  = sum_i exp(l_i - m) (l_i - m)           entropy = log s - h / s      (optional)
    q  = sum_i exp(2 (l_i - m))                 ESS = s^2 / q                (optional)
    m2 = sum_i exp(l_i - m) ||x_i - v / s||^2   variance = m2 / s            (optional)

Two partials over disjoint subsets merge exactly (up to float64 rounding) into the partial of
the union: with ``m = max(m_a, m_b)``, ``c_a = e^(m_a - m)``, ``c_b = e^(m_b - m)``,
``s = c_a s_a + c_b s_b``, ``v`` alike, ``h = c_a (h_a + (m_a - m) s_a) + c_b (...)``, ``q = c_a^2 q_a
+ c_b^2 q_b``, and the second moment about the mean by the pairwise rule of Chan, Golub and
LeVeque (1979), ``m2 = c_a m2_a + c_b m2_b + w ||mu_a - mu_b||^2`` with ``mu = v / s`` and ``w =
c_a s_a c_b s_b / s``: every term is >= 0, so no cancellation however sharply the posterior
collapses. Top-k logits and indices merge by a top-k of the union.

Rounding is carried along: ``mean_err`` bounds the componentwise error of ``v / s`` (the convex
combination of two means is within the larger of their errors, plus 16 u max|x| for the rounded
rescale factors, products and sums); ``m2_err`` (scaled like s) bounds the error of ``m2``: each
merge adds ``(D + 8) u m2`` for its roundings and, for the means' errors ``e_a + e_b`` in the
between term, ``2 sqrt(w T) sqrt(D) (e_a + e_b) + 3 w D (e_a + e_b)^2`` (``T`` the between term).

A sharded gang merges its shards' partials with collectives in the same way: all-reduce (max)
``m``; each rank rescales to it (:meth:`Partials.rescaled`); all-reduce (sum) ``s``, ``v``, ``h``,
``q``; each rank adds its between term ``c s ||mu_rank - mu||^2`` to ``c m2`` and all-reduces
(sum) that; all-gather the top-k and take its top-k (:meth:`Partials.merge_all` is that recipe
on one process).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from floworacle_server.engine._bounds import U64

__all__ = ["Partials", "Posterior"]


@dataclass
class Posterior:
    """Finalised posterior summaries: x1_hat (B, D), entropy / ess / variance (B,) or None,
    top-k (B, k), and the rounding bounds of the mean (float) and of the variance (B,) or None."""

    x1_hat: torch.Tensor
    entropy: torch.Tensor | None
    ess: torch.Tensor | None
    variance: torch.Tensor | None
    variance_rounding: torch.Tensor | None
    topk_indices: torch.Tensor
    topk_weights: torch.Tensor
    mean_err: float


def _where_alive(alive: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return torch.where(alive, value, torch.zeros_like(value))


@dataclass
class Partials:
    """Streamed softmax state of B queries, all float64 on one device (see module docstring).

    ``topk_logits`` / ``topk_index`` have shape (B, k) (k may be 0); ``topk_index`` holds data
    rows (-1 for empty slots, whose logit is -inf). ``h``, ``q``, ``m2`` / ``m2_err`` are None
    when not tracked. ``mean_err`` bounds ``|v / s - exact|`` componentwise; ``xmax`` is the max
    |x_ij| of the rows covered (for the merges' rounding bounds).
    """

    m: torch.Tensor
    s: torch.Tensor
    v: torch.Tensor
    h: torch.Tensor | None
    q: torch.Tensor | None
    m2: torch.Tensor | None
    m2_err: torch.Tensor | None
    topk_logits: torch.Tensor
    topk_index: torch.Tensor
    mean_err: float = 0.0
    xmax: float = 0.0

    @classmethod
    def empty(
        cls,
        batch: int,
        dim: int,
        top_k: int = 0,
        device: torch.device | str = "cpu",
        *,
        entropy: bool = True,
        ess: bool = True,
        variance: bool = False,
    ) -> Partials:
        f64 = torch.float64

        def zeros() -> torch.Tensor:
            return torch.zeros(batch, dtype=f64, device=device)

        return cls(
            m=torch.full((batch,), -math.inf, dtype=f64, device=device),
            s=zeros(),
            v=torch.zeros(batch, dim, dtype=f64, device=device),
            h=zeros() if entropy else None,
            q=zeros() if ess else None,
            m2=zeros() if variance else None,
            m2_err=zeros() if variance else None,
            topk_logits=torch.full((batch, top_k), -math.inf, dtype=f64, device=device),
            topk_index=torch.full((batch, top_k), -1, dtype=torch.int64, device=device),
        )

    @property
    def batch(self) -> int:
        return int(self.m.shape[0])

    @property
    def top_k(self) -> int:
        return int(self.topk_logits.shape[1])

    # -- building blocks -------------------------------------------------------------------

    @staticmethod
    def factors(ma: torch.Tensor, mb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """m = max(ma, mb), and for each side c = exp(m_side - m), d = m_side - m (0 if empty)."""
        m = torch.maximum(ma, mb)
        safe_m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        out = [m]
        for side in (ma, mb):
            alive = torch.isfinite(side)
            d = _where_alive(alive, side - safe_m)
            out += [_where_alive(alive, torch.exp(d)), d]
        return tuple(out)

    @staticmethod
    def topk_union(
        la: torch.Tensor, ia: torch.Tensor, lb: torch.Tensor, ib: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k (k = width of ``la``) of the union of two top-k lists (logits, indices)."""
        k = la.shape[1]
        if k == 0:
            return la, ia
        tl, ti = torch.topk(torch.cat([la, lb], dim=1), k, dim=1)
        return tl, torch.gather(torch.cat([ia, ib], dim=1), 1, ti)

    def select(self, rows: torch.Tensor | None) -> Partials:
        """The partials of the queries ``rows`` (None: self)."""
        if rows is None:
            return self

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.index_select(0, rows)

        return Partials(
            m=self.m.index_select(0, rows),
            s=self.s.index_select(0, rows),
            v=self.v.index_select(0, rows),
            h=pick(self.h),
            q=pick(self.q),
            m2=pick(self.m2),
            m2_err=pick(self.m2_err),
            topk_logits=self.topk_logits.index_select(0, rows),
            topk_index=self.topk_index.index_select(0, rows),
            mean_err=self.mean_err,
            xmax=self.xmax,
        )

    @staticmethod
    def _combine(a: Partials, b: Partials, v_out: torch.Tensor | None) -> Partials:
        """The merge of ``a`` and ``b`` (same queries); ``v_out``: write the weighted sum there
        (may be ``a.v``, updated in place)."""
        m, ca, da, cb, db = Partials.factors(a.m, b.m)
        s = a.s * ca + b.s * cb
        h = q = m2 = m2_err = None
        if a.h is not None and b.h is not None:
            h = ca * (a.h + da * a.s) + cb * (b.h + db * b.s)
        if a.q is not None and b.q is not None:
            q = a.q * ca * ca + b.q * cb * cb
        mean_err = max(a.mean_err, b.mean_err) + 16 * U64 * max(a.xmax, b.xmax)
        if a.m2 is not None and b.m2 is not None and a.m2_err is not None and b.m2_err is not None:
            sa, sb = a.s * ca, b.s * cb
            both = (sa > 0) & (sb > 0)
            w = _where_alive(both, sa * sb / torch.where(both, s, torch.ones_like(s)))
            one = torch.ones_like(s)
            gap = a.v / torch.where(a.s > 0, a.s, one)[:, None] - b.v / torch.where(b.s > 0, b.s, one)[:, None]
            between = w * torch.linalg.vecdot(gap, gap)
            m2 = a.m2 * ca + b.m2 * cb + between
            d = gap.shape[1]
            eps = a.mean_err + b.mean_err
            m2_err = (
                a.m2_err * ca
                + b.m2_err * cb
                + (d + 8) * U64 * m2
                + 2.0 * torch.sqrt(w * between) * math.sqrt(d) * eps
                + 3.0 * w * d * eps * eps
            )
        if v_out is None:
            v = a.v * ca[:, None]
        else:
            v = v_out.mul_(ca[:, None])
        v.addcmul_(b.v, cb[:, None])
        tl, ti = Partials.topk_union(a.topk_logits, a.topk_index, b.topk_logits, b.topk_index)
        return Partials(m, s, v, h, q, m2, m2_err, tl, ti, mean_err, max(a.xmax, b.xmax))

    # -- public merging --------------------------------------------------------------------

    def merge(self, other: Partials) -> Partials:
        """Exact merge of two partials over disjoint subsets of the data (same queries)."""
        return Partials._combine(self, other, None)

    def merge_into(self, rows: torch.Tensor | None, other: Partials) -> None:
        """In place: the queries ``rows`` (None: all) absorb ``other``, a partial of exactly those
        queries over data disjoint from what they hold."""
        if rows is None:
            out = Partials._combine(self, other, self.v)
            self._assign(out)
            return
        out = Partials._combine(self.select(rows), other, None)
        self.put(rows, out)
        self.mean_err, self.xmax = max(self.mean_err, out.mean_err), out.xmax

    def _assign(self, o: Partials) -> None:
        self.m, self.s, self.v, self.h, self.q = o.m, o.s, o.v, o.h, o.q
        self.m2, self.m2_err, self.topk_logits, self.topk_index = o.m2, o.m2_err, o.topk_logits, o.topk_index
        self.mean_err, self.xmax = o.mean_err, o.xmax

    def put(self, rows: torch.Tensor, part: Partials) -> None:
        """Overwrite the state of the queries ``rows`` with ``part`` (in place)."""
        self.m.index_copy_(0, rows, part.m)
        self.s.index_copy_(0, rows, part.s)
        self.v.index_copy_(0, rows, part.v)
        for name in ("h", "q", "m2", "m2_err"):
            mine, theirs = getattr(self, name), getattr(part, name)
            if mine is not None:
                assert theirs is not None, f"cannot put a partial without {name} into one that tracks it"
                mine.index_copy_(0, rows, theirs)
        self.topk_logits.index_copy_(0, rows, part.topk_logits)
        self.topk_index.index_copy_(0, rows, part.topk_index)
        self.mean_err, self.xmax = max(self.mean_err, part.mean_err), max(self.xmax, part.xmax)

    def rescaled(self, m: torch.Tensor) -> Partials:
        """The same partial expressed against a larger running maximum ``m`` >= self.m (what each
        rank of a gang does after the all-reduce of the maxima): s, v, h, q, m2 scale by e^(m_self
        - m), h gains (m_self - m) s."""
        _, c, d, _, _ = Partials.factors(self.m, m)
        return Partials(
            m=m.clone(),
            s=self.s * c,
            v=self.v * c[:, None],
            h=None if self.h is None else c * (self.h + d * self.s),
            q=None if self.q is None else self.q * c * c,
            m2=None if self.m2 is None else self.m2 * c,
            m2_err=None if self.m2_err is None else self.m2_err * c,
            topk_logits=self.topk_logits,
            topk_index=self.topk_index,
            mean_err=self.mean_err,
            xmax=self.xmax,
        )

    @staticmethod
    def merge_all(parts: list[Partials]) -> Partials:
        """Merge of many partials in the collective pattern of a gang (max, rescale, sums, then
        the variance's between terms against the merged mean, then a top-k of the gathered
        top-k lists): equal to a chain of :meth:`merge` up to rounding."""
        assert parts, "nothing to merge"
        m = parts[0].m
        for p in parts[1:]:
            m = torch.maximum(m, p.m)
        scaled = [p.rescaled(m) for p in parts]
        s = sum((p.s for p in scaled), torch.zeros_like(m))
        v = sum((p.v for p in scaled), torch.zeros_like(parts[0].v))
        h = (
            None
            if any(p.h is None for p in scaled)
            else sum((p.h for p in scaled if p.h is not None), torch.zeros_like(m))
        )
        q = (
            None
            if any(p.q is None for p in scaled)
            else sum((p.q for p in scaled if p.q is not None), torch.zeros_like(m))
        )
        mean_err = max(p.mean_err for p in parts) + 16 * U64 * len(parts) * max(p.xmax for p in parts)
        m2 = m2_err = None
        if all(p.m2 is not None and p.m2_err is not None for p in scaled):
            one = torch.ones_like(s)
            mu = v / torch.where(s > 0, s, one)[:, None]
            m2 = torch.zeros_like(m)
            m2_err = torch.zeros_like(m)
            d = v.shape[1]
            for p in scaled:
                assert p.m2 is not None and p.m2_err is not None
                gap = p.v / torch.where(p.s > 0, p.s, one)[:, None] - mu
                between = p.s * torch.linalg.vecdot(gap, gap)
                eps = p.mean_err + mean_err
                m2 = m2 + p.m2 + between
                m2_err = (
                    m2_err + p.m2_err + 2.0 * torch.sqrt(p.s * between) * math.sqrt(d) * eps + 3.0 * p.s * d * eps * eps
                )
            m2_err = m2_err + (d + 8) * U64 * len(parts) * m2
        tl, ti = parts[0].topk_logits, parts[0].topk_index
        for p in parts[1:]:
            tl, ti = Partials.topk_union(tl, ti, p.topk_logits, p.topk_index)
        return Partials(m.clone(), s, v, h, q, m2, m2_err, tl, ti, mean_err, max(p.xmax for p in parts))

    # -- results ---------------------------------------------------------------------------

    def finalize(self, consume: bool = False, unit_normaliser: bool = False) -> Posterior:
        """x1 = v / s, entropy = log s - h / s, ESS = s^2 / q, variance = m2 / s, top-k weights
        exp(l - m) / s.

        ``consume``: divide v in place (the partial is not used afterwards). ``unit_normaliser``:
        the caller knows s == 1 exactly for every query (one candidate each), so v is x1 as it is.
        """
        if unit_normaliser:
            x1 = self.v if consume else self.v.clone()
        else:
            x1 = self.v.div_(self.s[:, None]) if consume else self.v / self.s[:, None]
        entropy = None if self.h is None else torch.log(self.s) - self.h / self.s
        ess = None if self.q is None else self.s * self.s / self.q
        var = var_err = None
        if self.m2 is not None and self.m2_err is not None:
            var = self.m2 / self.s
            var_err = self.m2_err / self.s + 4 * U64 * var  # the division and s's own rounding share
        w = torch.exp(self.topk_logits - self.m[:, None]) / self.s[:, None]
        return Posterior(
            x1_hat=x1,
            entropy=entropy,
            ess=ess,
            variance=var,
            variance_rounding=var_err,
            topk_indices=self.topk_index,
            topk_weights=w,
            mean_err=self.mean_err,
        )
