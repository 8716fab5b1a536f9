"""Mergeable partial sums of a streamed softmax: the unit that chunks, devices and shards combine.

For B queries and a subset S of the data, with exact logits l_i (i in S):

    m = max_i l_i                          running maximum, -inf when S is empty
    s = sum_i exp(l_i - m)                 normaliser
    v = sum_i exp(l_i - m) x_i             (B, D) weighted sum
    h = sum_i exp(l_i - m) (l_i - m)       for the entropy
    q = sum_i exp(2 (l_i - m))             for the effective sample size

Two partials over disjoint subsets merge exactly (up to float64 rounding) into the partial of
the union; ``finalize`` gives x1_hat = v / s, entropy = log s - h / s and ESS = s^2 / q.
Top-k logits and indices are carried along and merged by a top-k of the union.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["Partials", "Posterior"]


@dataclass
class Posterior:
    """Finalised posterior summaries: x1_hat (B, D), entropy (B,), ess (B,), top-k (B, k)."""

    x1_hat: torch.Tensor
    entropy: torch.Tensor
    ess: torch.Tensor
    topk_indices: torch.Tensor
    topk_weights: torch.Tensor


@dataclass
class Partials:
    """Streamed softmax state of B queries; all float64 on one device (see module docstring).

    ``topk_logits`` / ``topk_index`` have shape (B, k) (k may be 0); ``topk_index`` holds data
    set indices (-1 for empty slots, whose logit is -inf).
    """

    m: torch.Tensor
    s: torch.Tensor
    v: torch.Tensor
    h: torch.Tensor
    q: torch.Tensor
    topk_logits: torch.Tensor
    topk_index: torch.Tensor

    @classmethod
    def empty(cls, batch: int, dim: int, top_k: int = 0, device: torch.device | str = "cpu") -> Partials:
        f64 = torch.float64
        return cls(
            m=torch.full((batch,), -math.inf, dtype=f64, device=device),
            s=torch.zeros(batch, dtype=f64, device=device),
            v=torch.zeros(batch, dim, dtype=f64, device=device),
            h=torch.zeros(batch, dtype=f64, device=device),
            q=torch.zeros(batch, dtype=f64, device=device),
            topk_logits=torch.full((batch, top_k), -math.inf, dtype=f64, device=device),
            topk_index=torch.full((batch, top_k), -1, dtype=torch.int64, device=device),
        )

    @classmethod
    def from_logits(cls, logits: torch.Tensor, index: torch.Tensor, top_k: int, x: torch.Tensor) -> Partials:
        """Partials of one dense block: ``logits`` (B, n) with -inf for excluded samples (float64,
        or float32 for the fast mode), ``index`` (n,) data set rows of the columns, ``x`` (n, D) the
        samples (v = P @ x is computed in x's dtype and promoted to float64)."""
        m, p, z = cls.probabilities(logits)
        v = (p.to(x.dtype) @ x).to(torch.float64)
        return cls.assemble(m, p, z, v, logits, index, top_k)

    @staticmethod
    def probabilities(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Row maxima m (B,), p = exp(l - m) and z = l - m (0 weight for -inf entries)."""
        m = logits.max(dim=1).values
        shift = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        z = logits - shift[:, None]
        return m, torch.exp(z), z

    @classmethod
    def assemble(
        cls,
        m: torch.Tensor,
        p: torch.Tensor,
        z: torch.Tensor,
        v: torch.Tensor,
        logits: torch.Tensor,
        index: torch.Tensor,
        top_k: int,
    ) -> Partials:
        """Partials from a block's row maxima m, probabilities p = exp(z), z = l - m (consumed:
        clamped in place), weighted sums v (B, D) float64 and the logits (for the top-k)."""
        f64 = torch.float64
        s = p.sum(dim=1, dtype=f64)
        z.clamp_(min=torch.finfo(z.dtype).min)  # 0 * -inf would be NaN; the weight there is 0
        h = torch.linalg.vecdot(p, z, dim=1).to(f64)
        q = torch.linalg.vecdot(p, p, dim=1).to(f64)
        k = min(top_k, logits.shape[1])
        if k > 0:
            tl, ti = torch.topk(logits, k, dim=1)
            tl = tl.to(f64)
            idx = index.expand_as(logits) if index.ndim == 1 else index
            tidx = torch.gather(idx, 1, ti)
            tidx = torch.where(torch.isfinite(tl), tidx, torch.full_like(tidx, -1))
            if k < top_k:
                pad = top_k - k
                tl = torch.cat([tl, tl.new_full((tl.shape[0], pad), -math.inf)], dim=1)
                tidx = torch.cat([tidx, tidx.new_full((tidx.shape[0], pad), -1)], dim=1)
        else:
            tl = torch.full((logits.shape[0], top_k), -math.inf, dtype=f64, device=logits.device)
            tidx = torch.full((logits.shape[0], top_k), -1, dtype=torch.int64, device=logits.device)
        return cls(m=m.to(f64), s=s, v=v, h=h, q=q, topk_logits=tl, topk_index=tidx)

    @staticmethod
    def _factors(ma: torch.Tensor, mb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """m = max(ma, mb), and for each side c = exp(m_side - m), d = m_side - m (0 if empty)."""
        m = torch.maximum(ma, mb)
        safe_m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        out = [m]
        for side in (ma, mb):
            alive = torch.isfinite(side)
            d = torch.where(alive, side - safe_m, torch.zeros_like(m))
            out += [torch.where(alive, torch.exp(d), torch.zeros_like(m)), d]
        return tuple(out)

    def _merged_scalars(self, other: Partials, rows: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        sm, ss, sh, sq = (t if rows is None else t[rows] for t in (self.m, self.s, self.h, self.q))
        m, ca, da, cb, db = self._factors(sm, other.m)
        s = ss * ca + other.s * cb
        h = ca * (sh + da * ss) + cb * (other.h + db * other.s)
        q = sq * ca * ca + other.q * cb * cb
        return m, s, h, q, ca, cb

    def _merged_topk(self, other: Partials, rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        tl_a = self.topk_logits if rows is None else self.topk_logits[rows]
        ti_a = self.topk_index if rows is None else self.topk_index[rows]
        k = tl_a.shape[1]
        if k == 0:
            return tl_a, ti_a
        tl, ti = torch.topk(torch.cat([tl_a, other.topk_logits], dim=1), k, dim=1)
        return tl, torch.gather(torch.cat([ti_a, other.topk_index], dim=1), 1, ti)

    def merge(self, other: Partials) -> Partials:
        """Exact merge of two partials over disjoint subsets of the data (same queries)."""
        m, s, h, q, ca, cb = self._merged_scalars(other, None)
        v = (self.v * ca[:, None]).addcmul_(other.v, cb[:, None])
        tl, tidx = self._merged_topk(other, None)
        return Partials(m=m, s=s, v=v, h=h, q=q, topk_logits=tl, topk_index=tidx)

    def merge_into(self, rows: torch.Tensor | None, other: Partials) -> None:
        """In place: the queries ``rows`` (None: all) absorb ``other``, a partial of exactly those
        queries over data disjoint from what they hold. Same arithmetic as :meth:`merge`, with one
        (rows, D) temporary at most."""
        m, s, h, q, ca, cb = self._merged_scalars(other, rows)
        tl, tidx = self._merged_topk(other, rows)
        if rows is None:
            self.v.mul_(ca[:, None]).addcmul_(other.v, cb[:, None])
            self.m, self.s, self.h, self.q, self.topk_logits, self.topk_index = m, s, h, q, tl, tidx
            return
        v = self.v.index_select(0, rows).mul_(ca[:, None]).addcmul_(other.v, cb[:, None])
        self.v.index_copy_(0, rows, v)
        self.m[rows], self.s[rows], self.h[rows], self.q[rows] = m, s, h, q
        self.topk_logits[rows], self.topk_index[rows] = tl, tidx

    def absorb_logits(self, logits: torch.Tensor, index: torch.Tensor, x: torch.Tensor) -> None:
        """In place, for all queries: :meth:`merge_into` of ``from_logits(logits, index, k, x)``
        without that block's (B, D) weighted sum: ``v <- c_a v + (c_b p) @ x`` accumulates the
        GEMM straight into v. ``logits`` (B, n) float64 (consumed), ``x`` (n, D) float64."""
        mb, p, z = self.probabilities(logits)
        block = Partials.assemble(mb, p, z, p.new_empty(0), logits, index, self.topk_logits.shape[1])
        m, s, h, q, ca, cb = self._merged_scalars(block, None)
        tl, tidx = self._merged_topk(block, None)
        self.v.mul_(ca[:, None]).addmm_(p.mul_(cb[:, None]), x)
        self.m, self.s, self.h, self.q, self.topk_logits, self.topk_index = m, s, h, q, tl, tidx

    def finalize(self, consume: bool = False) -> Posterior:
        """x1_hat = v / s, entropy = log s - h / s, ESS = s^2 / q, top-k weights exp(l - m) / s.

        ``consume``: divide v in place (the partial is not used afterwards), saving a (B, D) copy.
        """
        if consume and self.v.device.type == "cpu" and bool((self.s == 1).all()):
            # v / 1 == v: one sample per query (the refinement stage), no (B, D) pass; on a GPU
            # the division is cheaper than the host sync of this check
            x1 = self.v
        else:
            x1 = self.v.div_(self.s[:, None]) if consume else self.v / self.s[:, None]
        entropy = torch.log(self.s) - self.h / self.s
        ess = self.s * self.s / self.q
        w = torch.exp(self.topk_logits - self.m[:, None]) / self.s[:, None]
        return Posterior(x1_hat=x1, entropy=entropy, ess=ess, topk_indices=self.topk_index, topk_weights=w)

    def put(self, rows: torch.Tensor, part: Partials) -> None:
        """Overwrite the state of the queries ``rows`` with ``part`` (in place)."""
        self.m[rows] = part.m
        self.s[rows] = part.s
        self.v[rows] = part.v
        self.h[rows] = part.h
        self.q[rows] = part.q
        self.topk_logits[rows] = part.topk_logits
        self.topk_index[rows] = part.topk_index
