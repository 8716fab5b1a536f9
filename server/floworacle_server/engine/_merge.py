"""The merge of a gang's shard partials with collectives: the single process's answer, one batch
at a time, on every rank.

Each rank holds the partials of its shard for the same slots (same queries, same plan). In an
exact batch the ranks first share their screening lower bounds (:meth:`CollectiveMerge.share_lower`,
all-reduce, max): every shard then keeps the candidates within reach of the whole set's largest
weight, as one process does, and its bound on what it leaves out is relative to that weight, so
the ranks' tails add up. With ``M = max_r m_r`` (all-reduce, max, together with the logit error
bounds) every rank rescales its partials to M (:meth:`Partials.rescaled`) and the sums add up
(one all-reduce, sum): ``s``, ``v``, ``h``, ``q``, ``s * mean_err`` (the means' rounding bounds,
mass-weighted), the tails (the fast pass's are relative to each rank's kept mass and go in
mass-weighted) and the refined pair counts. The variance's second moment about the merged mean
``mu = v / s`` follows the rule of Chan et al. as in :meth:`Partials.merge_all`: each rank adds
its between term ``s_r ||mu_r - mu||^2`` to its own ``m2_r`` and the sum is all-reduced, with its
rounding bound. The top-k lists (indices mapped to the data set's original order first) are
all-gathered at once and cut to the top k.

Before any of that an agreement round (all-reduce, max, of a refusal flag) makes every rank
refuse a batch that one shard could not compute, with that shard's message, instead of leaving
the others waiting in a collective. This module imports only torch: the collectives are the
caller's (:class:`Collective`, implemented by the service's gang over torch.distributed).
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

from floworacle_server.engine._batch import Batch
from floworacle_server.engine._bounds import U64
from floworacle_server.engine._partials import Partials, per_query
from floworacle_server.engine._passes import SlotPartials

__all__ = ["Collective", "CollectiveMerge", "merge_slot_partials"]


class Collective(Protocol):
    """The collectives a gang offers, each over every rank in the same order."""

    @property
    def world_size(self) -> int: ...

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In place; ``op`` "sum" or "max"."""
        ...

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """(world_size, *t.shape) in rank order."""
        ...

    def agree_or_raise(self, refusal: ValueError | None) -> None:
        """Return when no rank refused; else raise, on every rank, a ValueError with the first
        refusing rank's message."""
        ...


def merge_slot_partials(
    comm: Collective, sp: SlotPartials | None, refusal: ValueError | None, batch: Batch
) -> SlotPartials:
    """The whole data set's slot partials from every rank's ``sp`` (see the module docstring)."""
    comm.agree_or_raise(refusal)
    assert sp is not None
    p = sp.partials
    ds = batch.ds
    world = comm.world_size
    maxima = comm.all_reduce(torch.stack([p.m, sp.logit_error.to(p.m.dtype)]), "max")
    m, bounds = maxima[0].contiguous(), maxima[1].contiguous()
    r = p.rescaled(m)
    one = torch.ones_like(r.s)
    mean_err = per_query(r.mean_err, r.m)
    d = r.v.shape[1]
    # tails relative to the gang's largest weight (lower bounds shared) add up; relative to each
    # rank's own kept mass (the fast pass) they are mass-weighted
    scalars = [r.s, r.s * mean_err, sp.tail if sp.shared_tail else r.s * sp.tail]
    counts = torch.zeros_like(r.s)
    counts[0] = sp.refined  # the refined pairs ride along in slot 0's column (a sum, like the rest)
    scalars.append(counts)
    if r.h is not None:
        scalars.append(r.h)
    if r.q is not None:
        scalars.append(r.q)
    packed = torch.cat([torch.stack(scalars, dim=1), r.v], dim=1)  # (S, n + D): one all-reduce
    comm.all_reduce(packed, "sum")
    n = len(scalars)
    s = packed[:, 0].contiguous()
    safe_s = torch.where(s > 0, s, one)
    xmax = batch.stats.abs_max  # the whole data set's
    merged_mean_err = packed[:, 1] / safe_s + 16 * U64 * world * xmax
    tail = packed[:, 2].clone() if sp.shared_tail else packed[:, 2] / safe_s
    refined = int(packed[0, 3])
    h = packed[:, 4].contiguous() if r.h is not None else None
    q = packed[:, 4 + (r.h is not None)].contiguous() if r.q is not None else None
    v = packed[:, n:].contiguous()
    m2 = m2_err = None
    if r.m2 is not None and r.m2_err is not None:
        mu = v / safe_s[:, None]
        gap = r.v / torch.where(r.s > 0, r.s, one)[:, None] - mu
        between = r.s * torch.linalg.vecdot(gap, gap)
        eps = mean_err + merged_mean_err
        second = torch.stack(
            [
                r.m2 + between,
                r.m2_err + 2.0 * torch.sqrt(r.s * between) * math.sqrt(d) * eps + 3.0 * r.s * d * eps * eps,
            ],
            dim=1,
        )
        comm.all_reduce(second, "sum")
        m2 = second[:, 0].contiguous()
        m2_err = second[:, 1] + (d + 8) * U64 * world * m2
    tl, ti = p.topk_logits, p.topk_index
    if tl.shape[1]:
        ti = torch.where(ti >= 0, ds.original_index[ti.clamp(min=0)], ti)  # rows -> the whole set's indices
        # one gather of logits and indices (indices < 2^53 are exact in float64)
        every = comm.all_gather(torch.stack([tl.to(torch.float64), ti.to(torch.float64)]))  # (W, 2, S, k)
        k = tl.shape[1]
        cat = every.permute(1, 2, 0, 3).reshape(2, tl.shape[0], world * k)
        top, pick = torch.topk(cat[0], k, dim=1)
        tl, ti = top.to(tl.dtype), torch.gather(cat[1], 1, pick).to(torch.int64)
    merged = Partials(m, s, v, h, q, m2, m2_err, tl, ti, merged_mean_err, xmax)
    return SlotPartials(merged, bounds, refined, unit_normaliser=False, tail=tail, topk_original=True)


class CollectiveMerge:
    """What :func:`oracle` needs of a gang (``merge=``): the shared screening lower bounds
    (one all-reduce, max) and the merge of the slot partials."""

    def __init__(self, comm: Collective) -> None:
        self.comm = comm

    def share_lower(self, lower: torch.Tensor) -> torch.Tensor:
        return self.comm.all_reduce(lower.clone(), "max")

    def __call__(self, sp: SlotPartials | None, refusal: ValueError | None, batch: Batch) -> SlotPartials:
        return merge_slot_partials(self.comm, sp, refusal, batch)
