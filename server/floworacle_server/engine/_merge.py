"""The merge of a gang's shard partials with collectives: the single process's answer, one batch
at a time, on every rank.

Each rank holds the partials of its shard for the same slots (same queries, same plan). With
``M = max_r m_r`` (all-reduce, max) every rank rescales its partials to M
(:meth:`Partials.rescaled`) and the sums add up (all-reduce, sum): ``s``, ``v``, ``h``, ``q``
``s * mean_err`` (the means' rounding bounds, mass-weighted) and ``s * tail`` (each rank's bound
on the weight it left out is relative to its own kept mass, so the merged one is their
mass-weighted mean). The variance's second moment
about the merged mean ``mu = v / s`` follows the rule of Chan et al. as in
:meth:`Partials.merge_all`: each rank adds its between term ``s_r ||mu_r - mu||^2`` to its own
``m2_r`` and the sum is all-reduced, with its rounding bound. The top-k lists (indices mapped to
the data set's original order first) are all-gathered and cut to the top k. The logit error
bounds all-reduce with max, the refined pair counts with sum.

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

__all__ = ["Collective", "merge_slot_partials"]


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
    dev = p.m.device
    world = comm.world_size
    m = comm.all_reduce(p.m.clone(), "max")
    r = p.rescaled(m)
    one = torch.ones_like(r.s)
    mean_err = per_query(r.mean_err, r.m)
    d = r.v.shape[1]
    scalars = [r.s, r.s * mean_err, r.s * sp.tail]  # tails are relative to each rank's kept mass
    if r.h is not None:
        scalars.append(r.h)
    if r.q is not None:
        scalars.append(r.q)
    packed = torch.cat([torch.stack(scalars, dim=1), r.v], dim=1)  # (S, n + D): one all-reduce
    comm.all_reduce(packed, "sum")
    n = len(scalars)
    s = packed[:, 0].contiguous()
    safe_s = torch.where(s > 0, s, one)
    xmax = batch.facts.xmax  # the whole data set's
    merged_mean_err = packed[:, 1] / safe_s + 16 * U64 * world * xmax
    tail = packed[:, 2] / safe_s
    h = packed[:, 3].contiguous() if r.h is not None else None
    q = packed[:, 3 + (r.h is not None)].contiguous() if r.q is not None else None
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
        every_l = comm.all_gather(tl)  # (W, S, k)
        every_i = comm.all_gather(ti)
        k = tl.shape[1]
        cat_l = every_l.permute(1, 0, 2).reshape(tl.shape[0], world * k)
        cat_i = every_i.permute(1, 0, 2).reshape(tl.shape[0], world * k)
        tl, pick = torch.topk(cat_l, k, dim=1)
        ti = torch.gather(cat_i, 1, pick)
    bounds = sp.logit_error.clone()
    comm.all_reduce(bounds, "max")
    refined = torch.tensor([sp.refined], dtype=torch.int64, device=dev)
    comm.all_reduce(refined, "sum")
    merged = Partials(m, s, v, h, q, m2, m2_err, tl, ti, merged_mean_err, xmax)
    return SlotPartials(merged, bounds, int(refined[0]), unit_normaliser=False, tail=tail, topk_original=True)
