"""The oracle's entry point: a batch of queries becomes slots, slots become partials, partials the outputs.

For queries (x_t, t) and data x_i with log weights log p_i the exact logits are

    l_i = log p_i - ||x_t - alpha x_i||^2 / (2 sigma^2)

and ``x1_hat = sum_i softmax(l)_i x_i``; the outputs follow from it: ``u = A_t x1_hat + B_t x_t``,
``eps_hat = (x_t - alpha x1_hat) / sigma``, ``score = (alpha x1_hat - x_t) / sigma^2``. How the
partials are made exactly and fast is the business of :mod:`._passes`; this module plans the
slots and assembles the answer:

- unconditional queries: one slot each over all rows;
- class-conditional queries (label >= 0): one slot over their class's rows;
- guided queries inside ``[t_lo, t_hi]`` (scale != 1): both, combined as
  ``x1_w = x1(x) + w (x1(x | y) - x1(x))``, which is linear in the same way as the velocity, so
  ``u_w = u(x) + w (u(x | y) - u(x))``; outside the interval the conditional answer. The
  diagnostics of a guided query (top-k, entropy, ESS, variance) are those of its conditional
  posterior, the only one that is a posterior over samples;
- ``exclude``: that sample's logit is -inf in every slot of the query (leave-one-out).

Request rules (shapes, t range, labels, top-k, guidance) are the service's; the engine asserts
its invariants and raises ValueError only for what depends on the data: a posterior left empty
(a class whose samples all weigh 0, or a lone sample excluded) and queries too large for the
float32 screening to stay finite.

Error bounds: ``x1_hat_error_bound`` from the logits' bound, the omitted tail and the partials'
rounding (:func:`._bounds.x1_error`); the velocity's ``|A| x1_err + 4 u (|A| max|x1| + |B| ||x_t||)``
(the rounding of ``A x1 + B x_t``; ``max|x_t| <= ||x_t||``); the variance's
:func:`._bounds.variance_error`. For guided queries ``|1 - w| e_u + |w| e_c``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from floworacle.protocol import OUTPUT_NAMES, Guidance, OracleQuery
from floworacle_server.data import Dataset
from floworacle_server.engine._batch import Batch, Coef, Group, Queries, Slots, Want
from floworacle_server.engine._bounds import REACH_MARGIN, U32, U64, ScreenModel, variance_error, x1_error
from floworacle_server.engine._config import EngineConfig
from floworacle_server.engine._diagnostics import diagnostic_bounds
from floworacle_server.engine._partials import Partials
from floworacle_server.engine._passes import (
    EmptyPosterior,
    NonFiniteScreening,
    SlotPartials,
    exact_partials,
    fast_partials,
)
from floworacle_server.engine._types import OracleResult, as_host, as_host_pair, as_tensor

__all__ = ["global_oracle", "compute_partials", "SlotMerge"]


@dataclass
class _Plan:
    """Slots of one batch, built on the host.

    ``slot_query`` (S,) query of each slot (None: slot b = query b); ``primary`` (B,) the slot
    that answers query b; ``guided`` (G,) guided queries with their unconditional slots
    ``guided_uncond`` and conditional slots ``guided_cond``.
    """

    groups: list[Group]
    slot_query: np.ndarray | None
    primary: np.ndarray | None
    guided: np.ndarray
    guided_uncond: np.ndarray
    guided_cond: np.ndarray
    slot_label: list[int]


def _plan(ds: Dataset, labels: np.ndarray | None, t: np.ndarray | None, g: Guidance | None, b: int) -> _Plan:
    n = ds.num_samples
    none = np.empty(0, dtype=np.int64)
    stats = ds.stats
    whole = (Group(0, n, 0, b, max_sq=stats.max_sq),)
    if labels is None:
        return _Plan(list(whole), None, None, none, none, none, [-1] * b)
    lab = labels.astype(np.int64, copy=False)
    assert lab.shape == (b,), f"labels must have shape ({b},), got {lab.shape}"
    cond = lab >= 0
    if not cond.any():
        return _Plan(list(whole), None, None, none, none, none, [-1] * b)
    assert ds.num_classes > 0, "labels >= 0 need a labelled data set (the service checks this)"
    assert int(lab.max()) < ds.num_classes, "labels must lie in 0..C-1 (the service checks this)"
    guided = np.zeros(b, dtype=bool)
    if g is not None and g.scale != 1.0:
        assert t is not None, "a guidance interval needs t (the service checks this)"
        guided = cond & (t >= g.t_lo) & (t <= g.t_hi)
    dead, empty = stats.dead_classes, stats.empty_classes
    uncond_q = np.flatnonzero(~cond | guided)
    groups: list[Group] = []
    parts: list[np.ndarray] = []
    slot_label: list[int] = []
    if uncond_q.size:
        groups.append(Group(0, n, 0, int(uncond_q.size), max_sq=stats.max_sq))
        parts.append(uncond_q)
        slot_label += [-1] * int(uncond_q.size)
    s0 = int(uncond_q.size)
    for y in np.unique(lab[cond]).tolist():
        if y in empty:
            raise ValueError(
                f"class {y} has no samples in data set {ds.name!r}: its posterior is empty; query a class that has samples"
            )
        if y in dead:
            raise ValueError(
                f"every sample of class {y} in data set {ds.name!r} has weight 0: its posterior is empty; "
                "query another class or load the data set with positive weights for this class"
            )
        qy = np.flatnonzero(lab == y)
        start, stop = ds.class_ranges[int(y)]
        groups.append(Group(start, stop, s0, s0 + int(qy.size), int(y), stats.class_max_sq[int(y)]))
        parts.append(qy)
        slot_label += [int(y)] * int(qy.size)
        s0 += int(qy.size)
    slot_query = np.concatenate(parts)
    slot_of_uncond = np.full(b, -1, dtype=np.int64)
    slot_of_uncond[uncond_q] = np.arange(uncond_q.size)
    primary = np.empty(b, dtype=np.int64)
    cond_slots = np.arange(uncond_q.size, slot_query.size)
    primary[slot_query[cond_slots]] = cond_slots
    primary[~cond] = slot_of_uncond[~cond]
    gq = np.flatnonzero(guided)
    return _Plan(groups, slot_query, primary, gq, slot_of_uncond[gq], primary[gq], slot_label)


def _batch(
    ds: Dataset,
    x: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    plan: _Plan,
    exclude: torch.Tensor | None,
    want: Want,
    cfg: EngineConfig,
    screen: str,
    share_lower: Any = None,
) -> Batch:
    dev = ds.device
    model = ScreenModel.choose(screen, dev, ds.x.dtype, ds.dim)
    xs = x if x.dtype == model.dtype else x.to(model.dtype)
    # an upper bound of ||x_t|| from one float32 pass (the error bounds need no more): rounding x
    # to float32 and the float32 sum of squares are within (D + 4) u32, underflow within sqrt(D) 2^-63
    x32 = xs if xs.dtype == torch.float32 else x.to(torch.float32)
    qnorm = (
        torch.linalg.vector_norm(x32, dim=1)
        .to(torch.float64)
        .mul_(1 + (ds.dim + 4) * U32)
        .add_(math.sqrt(ds.dim) * 2.0**-63)
    )
    ex_rows = None
    if exclude is not None:
        ex = exclude.to(device=dev, dtype=torch.int64)
        ex_rows = torch.where(ex >= 0, ds.rows_of(ex.clamp(min=0)), ex)  # -1: not held here (a shard)
    if plan.slot_query is None:
        slot_query = None
        coef = Coef.build(alpha, sigma)
        qnorm_s = qnorm
    else:
        slot_query = torch.from_numpy(plan.slot_query).to(dev)
        coef = Coef.build(alpha.index_select(0, slot_query), sigma.index_select(0, slot_query))
        qnorm_s = qnorm.index_select(0, slot_query)
        if ex_rows is not None:
            ex_rows = ex_rows.index_select(0, slot_query)
    groups = tuple(plan.groups)
    consts, starts = Slots.constants(groups, dev)
    slots = Slots(slot_query, coef, qnorm_s, ex_rows, groups, consts, starts)
    return Batch(ds, cfg, model, want, Queries(x, xs, qnorm), slots, share_lower)


def _partials(batch: Batch, precision: str, plan: _Plan, exclude: np.ndarray | None) -> SlotPartials:
    """The slots' partials; data-dependent refusals become actionable ValueErrors."""
    try:
        return fast_partials(batch) if precision == "fast" else exact_partials(batch)
    except (NonFiniteScreening, EmptyPosterior) as exc:
        raise _refusal(exc, batch, plan, exclude) from None


def _refusal(
    exc: NonFiniteScreening | EmptyPosterior, batch: Batch, plan: _Plan, exclude: np.ndarray | None
) -> ValueError:
    """The actionable refusal of a slot the engine cannot answer.

    A posterior is empty for a structural reason only when an exclusion took the last sample of
    positive weight of its scope (empty and weightless classes are refused before any pass);
    otherwise every weight underflowed because the logits could not be compared in float64:
    the query's values (or its path coefficients) are too large, and the message says so."""
    b = exc.slot if plan.slot_query is None else int(plan.slot_query[exc.slot])
    if not bool(torch.isfinite(batch.q.x[b]).all()):
        return ValueError(f"x_t[{b}] has a NaN or Inf; send finite values")
    too_large = (
        f"x_t[{b}] is too large for the oracle's logits to stay finite and comparable (|x_t| up to "
        f"{float(batch.q.x[b].abs().max()):.3g} at alpha = {float(batch.s.coef.alpha[exc.slot]):.3g}, sigma = "
        f"{float(batch.s.coef.sigma[exc.slot]):.3g}); send queries scaled to the data's magnitudes (|values| below "
        "~1e15) and ordinary path coefficients"
    )
    if isinstance(exc, NonFiniteScreening):
        return ValueError(too_large)
    y = plan.slot_label[exc.slot]
    alive = batch.stats.alive if y < 0 else batch.stats.class_alive[y]
    if exclude is None or int(exclude[b]) < 0 or alive > 1:
        return ValueError(too_large)
    scope = "the data set" if y < 0 else f"class {y}"
    return ValueError(
        f"query {b}: no sample with positive weight is left in {scope} of data set {batch.ds.name!r} once sample "
        f"{int(exclude[b])} is excluded; its posterior is empty: drop the exclusion or query a larger set"
    )


class SlotMerge(Protocol):
    """The hook through which the partials of a part of the data set (a shard) are merged with the
    other parts' before the outputs are assembled (:class:`._merge.CollectiveMerge`: collectives over
    a process group, called on every member alike)."""

    def share_lower(self, lower: torch.Tensor) -> torch.Tensor:
        """The largest of every part's (S,) screening lower bounds (exact batches, once)."""
        ...

    def __call__(self, sp: SlotPartials | None, refusal: ValueError | None, batch: Batch) -> SlotPartials:
        """The merge of every shard's slot partials, called with this rank's partials, or None and
        the refusal when it could not compute them; returns the merged partials (top-k indices in
        the data set's original order) or raises the refusal the parts agreed on."""
        ...


def _out_of_reach(p: Partials, ds: Dataset, plan: _Plan) -> None:
    """In place: top-k entries more than ``ln n + REACH_MARGIN`` nats below the maximum (n: the
    rows of the slot's range in the whole data set) become empty slots (index -1), as a single
    process never computes them (a shard's own maximum may lie far below the gang's, so its
    candidates reach further down)."""
    counts = ds.stats.class_counts
    n_all = ds.total_samples
    rows = np.array([n_all if y < 0 else counts[y] for y in plan.slot_label], dtype=np.float64)
    reach = torch.from_numpy(np.log(np.maximum(rows, 1)) + REACH_MARGIN).to(p.m.device)
    far = p.topk_logits < (p.m - reach)[:, None]
    p.topk_logits.masked_fill_(far, -math.inf)
    p.topk_index.masked_fill_(far, -1)


def global_oracle(
    ds: Dataset,
    query: OracleQuery,
    *,
    chunk_rows: int | None = None,
    screen: str = "float32",
    config: EngineConfig | None = None,
    merge: SlotMerge | None = None,
) -> OracleResult:
    """The exact (or fast) oracle over the whole data set for a batch of queries: the "global" kind
    (see the module docstrings for the method; :func:`floworacle_server.engine.oracle` is the entry
    point for every kind and precision).

    Labels < 0 mean an unconditional query; labels >= 0 a class-conditional one, or a guided one
    when ``query.guidance`` is set (guided inside [t_lo, t_hi], conditional outside).
    ``config``: block sizes (default: the data device's); ``chunk_rows`` overrides its screening
    chunk. ``merge``: ``ds`` is one part of a data set and every part is called with the same query;
    the parts' partials are merged before the outputs are assembled, so every part returns the
    whole data set's answer. Returns float64 tensors on the data's device; shapes (B, D), (B,), (B, k).

    Raises:
        ValueError: a posterior left empty (all of a class's samples weigh 0, or the only ones
            are excluded), or queries too large for the float32 screening to stay finite.
    """
    dev = ds.device
    x_t = as_tensor(query.x_t, dev)
    assert x_t.ndim >= 2 and x_t.shape[0] > 0, f"x_t must have shape (B, D) with B >= 1, got {tuple(x_t.shape)}"
    b = int(x_t.shape[0])
    d = int(math.prod(x_t.shape[1:]))
    assert d == ds.dim, f"queries have {d} values each; data set {ds.name!r} has D = {ds.dim}"
    assert len(query.coeffs) == b, f"{len(query.coeffs)} path coefficients for {b} queries"
    outputs = set(query.outputs)
    assert outputs <= set(OUTPUT_NAMES), f"unknown outputs {sorted(outputs - set(OUTPUT_NAMES))}"
    top_k = query.top_k if "topk" in outputs else 0
    assert 0 <= query.top_k <= ds.total_samples and ("topk" not in outputs or top_k >= 1), "top_k out of range"
    cfg = (config or EngineConfig.for_device(dev)).with_chunk_rows(chunk_rows)
    x = x_t.reshape(b, d)
    assert x.is_floating_point(), "x_t must be a float tensor"
    c = query.coeffs
    coefs = torch.from_numpy(np.stack([c.alpha, c.sigma, c.velocity_x1, c.velocity_xt]).astype(np.float64)).to(dev)
    alpha, sigma, a_t, b_t = coefs.unbind(0)
    guided = query.guidance is not None and query.guidance.scale != 1.0
    labels, t = as_host_pair(query.labels, query.t if guided else None)  # one device read for both
    plan = _plan(ds, labels, None if t is None else t.astype(np.float64, copy=False), query.guidance, b)
    want = Want(
        entropy="entropy" in outputs,
        ess="ess" in outputs,
        variance="variance" in outputs,
        top_k=top_k,
        logits=merge is not None,  # partials to be merged need their exact logits
        keep_empty=merge is not None,
    )
    exclude = as_tensor(query.exclude, dev, torch.int64) if query.exclude is not None else None
    share = merge.share_lower if merge is not None else None
    batch = _batch(ds, x, alpha, sigma, plan, exclude, want, cfg, screen, share)
    excluded = as_host(query.exclude) if query.exclude is not None else None
    if merge is None:
        sp = _partials(batch, query.precision, plan, excluded)
    else:
        try:
            mine: SlotPartials | None = _partials(batch, query.precision, plan, excluded)
            refusal = None
        except ValueError as exc:
            mine, refusal = None, exc
        sp = merge(mine, refusal, batch)
        empty = (sp.partials.s == 0).nonzero()  # on the whole data set now
        if empty.numel():
            raise _refusal(EmptyPosterior(int(empty[0, 0])), batch, plan, excluded)
        if query.precision == "exact" and top_k:
            _out_of_reach(sp.partials, ds, plan)
    post = sp.partials.finalize(consume=True, unit_normaliser=sp.unit_normaliser)
    xmax = batch.stats.abs_max
    x1_err = x1_error(sp.logit_error, post.mean_err, xmax, sp.tail, sp.partials.s, ds.total_samples)
    ent_err, ess_err = diagnostic_bounds(post.entropy, post.ess, sp.logit_error, sp.tail, ds.total_samples)
    var = var_err = None
    if post.variance is not None and post.variance_rounding is not None:
        var_err = variance_error(post.variance, sp.logit_error, post.variance_rounding, sp.tail, batch.slot_max_sq)
        var = post.variance
    x1 = post.x1_hat
    entropy, ess, tk_i, tk_w = post.entropy, post.ess, post.topk_indices, post.topk_weights
    x1max: torch.Tensor | float = xmax
    if plan.primary is not None:
        p = torch.from_numpy(plan.primary).to(dev)
        x1_slots, err_slots = x1, x1_err
        x1 = x1_slots.index_select(0, p)
        x1_err = err_slots.index_select(0, p)
        entropy = None if entropy is None else entropy.index_select(0, p)
        ess = None if ess is None else ess.index_select(0, p)
        ent_err = None if ent_err is None else ent_err.index_select(0, p)
        ess_err = None if ess_err is None else ess_err.index_select(0, p)
        var = None if var is None else var.index_select(0, p)
        var_err = None if var_err is None else var_err.index_select(0, p)
        tk_i, tk_w = tk_i.index_select(0, p), tk_w.index_select(0, p)
        if plan.guided.size:
            assert query.guidance is not None
            w = float(query.guidance.scale)
            gq = torch.from_numpy(plan.guided).to(dev)
            su = torch.from_numpy(plan.guided_uncond).to(dev)
            sc = torch.from_numpy(plan.guided_cond).to(dev)
            x1.index_copy_(0, gq, torch.lerp(x1_slots.index_select(0, su), x1_slots.index_select(0, sc), w))
            mixed = abs(1 - w) * err_slots.index_select(0, su) + abs(w) * err_slots.index_select(0, sc)
            x1_err.index_copy_(0, gq, mixed)
            x1max = torch.full((b,), xmax, dtype=torch.float64, device=dev)
            x1max.index_fill_(0, gq, (abs(1 - w) + abs(w)) * xmax)
    if tk_i.shape[1] and not sp.topk_original:
        tk_i = torch.where(tk_i >= 0, ds.original_index[tk_i.clamp(min=0)], tk_i)
    velocity = eps_hat = score = None
    # each output is built in its own float64 copy of x_t (exact; converting first and working in
    # place beats mixed-dtype kernels, which convert on the fly, by a factor 2 on CPUs)
    if "velocity" in outputs:  # u = A x1_hat + B x_t
        velocity = _float64_copy(x).mul_(b_t[:, None]).addcmul_(x1, a_t[:, None])
    if "eps_hat" in outputs:  # (x_t - alpha x1_hat) / sigma
        eps_hat = _float64_copy(x).addcmul_(x1, alpha[:, None], value=-1).div_(sigma[:, None])
    if "score" in outputs:  # (alpha x1_hat - x_t) / sigma^2
        score = _float64_copy(x).neg_().addcmul_(x1, alpha[:, None]).div_((sigma * sigma)[:, None])
    v_err = a_t.abs() * x1_err + 4 * U64 * (a_t.abs() * x1max + b_t.abs() * batch.q.norm)
    return OracleResult(
        x1_hat=x1,
        velocity=velocity,
        eps_hat=eps_hat,
        score=score,
        topk_indices=tk_i if top_k else None,
        topk_weights=tk_w if top_k else None,
        entropy=entropy,
        ess=ess,
        variance=var,
        variance_error_bound=var_err,
        x1_hat_error_bound=x1_err,
        velocity_error_bound=v_err,
        refined=sp.refined,
        entropy_error_bound=ent_err,
        ess_error_bound=ess_err,
    )


def _float64_copy(x: torch.Tensor) -> torch.Tensor:
    """A private float64 copy of the queries (never the caller's memory)."""
    return x.to(torch.float64, copy=True)


def compute_partials(
    ds: Dataset,
    xq: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    *,
    rows: tuple[int, int] | None = None,
    top_k: int = 0,
    precision: str = "exact",
    chunk_rows: int | None = None,
    screen: str = "float32",
    config: EngineConfig | None = None,
    exclude: torch.Tensor | None = None,
    variance: bool = False,
) -> tuple[Partials, torch.Tensor, int]:
    """Partials of B queries over the data rows ``rows`` (default: all), for merging.

    Args:
        xq: (B, D) queries (float64, or as sent) on the data's device.
        alpha, sigma: (B,) float64 path coefficients.
        exclude: (B,) int64 original data set indices to leave out (-1: none), or None.
        variance: track the second moment (``m2``) for the posterior variance.
    Returns:
        (partials, logit_error (B,), refined): in EXACT mode the partials use the full logits
        ``log p_i - ||x_t - alpha x_i||^2 / (2 sigma^2)``, so partials of disjoint row ranges
        (chunks, devices, shards) merge exactly; ``topk_index`` holds data rows. logit_error bounds
        the absolute error of every logit that carries weight.
    """
    start, stop = rows if rows is not None else (0, ds.num_samples)
    assert 0 <= start < stop <= ds.num_samples, f"row range [{start}, {stop}) outside the data set's rows"
    b = int(xq.shape[0])
    dev = ds.device
    cfg = (config or EngineConfig.for_device(dev)).with_chunk_rows(chunk_rows)
    group = Group(start, stop, 0, b, max_sq=ds.range_max_sq(start, stop))
    plan = _Plan([group], None, None, *(np.empty(0, dtype=np.int64),) * 3, [-1] * b)
    want = Want(entropy=True, ess=True, variance=variance, top_k=top_k, logits=True)
    a = alpha.to(device=dev, dtype=torch.float64)
    s = sigma.to(device=dev, dtype=torch.float64)
    ex = exclude.to(device=dev, dtype=torch.int64) if exclude is not None else None
    batch = _batch(ds, xq.to(dev), a, s, plan, ex, want, cfg, screen)
    sp = _partials(batch, precision, plan, as_host(exclude) if exclude is not None else None)
    return sp.partials, sp.logit_error, sp.refined
