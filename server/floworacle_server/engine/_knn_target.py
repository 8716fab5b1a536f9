"""A sublinear estimate of the posterior mean: nearest neighbours plus a uniform tail (Niedoba et al. 2024).

For a query x_t at (alpha, sigma) the exact x1-prediction is ``x1_hat = sum_i gamma_i x_i`` with
``gamma_i ∝ w_i = p_i exp(-||x_t - alpha x_i||^2 / (2 sigma^2))`` over the N samples of the
posterior's support (the data set, or one class of it). The estimate splits the support into

- K: the k samples nearest to ``x_t / alpha`` in posterior order (the largest ``gamma_i``; found
  by :func:`~floworacle_server.engine.posterior_nearest`, exactly or through the data set's faiss
  index), each with its exact float64 weight;
- the rest, R = |support| - |K| samples (minus an excluded one), of which m are drawn uniformly
  without replacement, each standing for R / m of them,

and self-normalises them together:

    x1_est = (sum_K w_i x_i + (R/m) sum_T w_j x_j) / (sum_K w_i + (R/m) sum_T w_j).

Any choice of K that does not depend on the tail draw gives a consistent estimate; the nearest
samples make it good: in the refinement stage they carry all the weight and the tail adds
nothing. With m >= R the tail is the whole rest and the estimate is the exact posterior mean over
the stored values (up to float64 rounding); k = N is the same case.

Per query the estimate reports what it cannot claim (it never claims exactness):

- ``neighbour_share``: the estimated weight on K, ``Z_K / Z``;
- ``variance``: a first-order (delta-method) estimate of ``E ||x1_est - E x1_est||^2`` (summed
  over the D coordinates) from the tail draw: with ``e_j = w_j (x_j - x1_est)`` and their sample
  variance ``s_e^2`` (trace, m - 1 in the denominator), ``(R^2 / m)(1 - m / R) s_e^2 / Z^2``
  (the finite-population correction of a draw without replacement); 0 when the tail is the
  whole rest or dropped (m = 0: nothing is random, the rest is simply left out), +inf when one
  sample cannot estimate it (m = 1 < R). First order: it follows the
  estimator's variance within ~10 % from m = 64 on, and runs low for small tails (about half of
  it at m = 8 on clustered data, where a few tail samples carry most of the weight);
- ``tail_bound``: if K holds the k samples of largest weight, every sample outside it has a logit
  at most that of the k-th neighbour l_k, so the exact posterior's weight outside K is at most
  ``R e^{l_k} / (Z_K + R e^{l_k})``. With the exact search this is a certificate (of
  near-exactness in the refinement stage); through an index it holds where the index found the
  true k nearest (its recall), and it still flags a neighbour set too small for a spread
  posterior, which the tail's share and variance miss when no tail sample lands in the bulk.

Logits are computed from differences in float64, ``l_i = log p_i - ||x_t - alpha x_i||^2 / (2 sigma^2)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from floworacle.protocol import OracleQuery
from floworacle_server.data import Dataset
from floworacle_server.engine._nearest import posterior_nearest
from floworacle_server.engine._types import (
    NearestResult,
    OracleResult,
    as_tensor,
    check_sample_outputs,
    outputs_from_x1,
    per_query,
)

__all__ = ["KnnOracleResult", "KnnTarget", "knn_answer", "knn_oracle", "knn_target"]

_BLOCK_BYTES = 64 << 20  # float64 rows gathered per step (queries x (k + m) x D x 8 bytes)
_KEYS_MAX = 1 << 24  # below this many (query, rest) pairs a tail is drawn by random keys, above by rejection


@dataclass
class KnnTarget:
    """The nearest-neighbour importance-sampling estimate of B posterior means, and its indicators.

    Attributes:
        x1_hat: (B, D) float64 estimate of ``sum_i gamma_i x_i``.
        neighbour_share: (B,) float64 estimated posterior weight on the neighbour set, ``Z_K / Z``.
        variance: (B,) float64 estimated ``E ||x1_est - E x1_est||^2`` over the tail draw (trace;
            delta method; 0 when the tail is the whole rest or m = 0, +inf when m = 1 < R).
        tail_bound: (B,) float64 upper bound on the exact posterior weight outside the neighbour
            set: certified with the exact search; with an index (``approximate``) conditional on
            its having found the k nearest.
        neighbours: (B,) int64 neighbours used (fewer than k for a class-conditional query whose
            global neighbours include other classes).
        tail: (B,) int64 tail samples drawn, m (or R when the rest is smaller).
        population: (B,) int64 R, the size of the rest the tail is drawn from.
        approximate: the neighbours came from a faiss index.
    """

    x1_hat: torch.Tensor
    neighbour_share: torch.Tensor
    variance: torch.Tensor
    tail_bound: torch.Tensor
    neighbours: torch.Tensor
    tail: torch.Tensor
    population: torch.Tensor
    approximate: bool


@dataclass
class KnnOracleResult:
    """:func:`knn_oracle`'s answer.

    Attributes:
        result: the asked outputs (float64; x1_hat, velocity, eps_hat, score as in
            :func:`~floworacle_server.engine.oracle`), with no error bounds: the estimate claims none.
        estimate: the x1-prediction each output derives from and its indicators; for a guided
            query the guided combination, its ``variance`` that of the combination
            ``(1 - w)^2 v(x) + w^2 v(x | y)`` (independent tails), the other indicators those
            of the conditional posterior (as the exact engine reports a guided query's diagnostics).
        velocity_variance: (B,) ``A_t^2 variance``: the estimated variance of the velocity
            ``u = A_t x1_hat + B_t x_t`` (trace over D).
    """

    result: OracleResult
    estimate: KnnTarget
    velocity_variance: torch.Tensor


def _queries(ds: Dataset, x_t: Any) -> torch.Tensor:
    t = x_t if isinstance(x_t, torch.Tensor) else torch.as_tensor(x_t)
    if not t.is_floating_point():
        raise ValueError(f"x_t must be a float tensor, got {t.dtype}")
    d = ds.dim
    if not (t.ndim == 2 and t.shape[1] == d) and not (t.ndim >= 2 and tuple(t.shape[1:]) == ds.sample_shape):
        raise ValueError(f"x_t must have shape (B, {d}) or (B, *{ds.sample_shape}), got {tuple(t.shape)}")
    t = t.reshape(t.shape[0], d).to(device=ds.device, dtype=torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise ValueError("x_t contains NaN or Inf")
    return t


def _support(ds: Dataset, labels: Any | None, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) int64 first and last+1 rows of each query's posterior support (a class is a row range)."""
    n = ds.num_samples
    lo = torch.zeros(b, dtype=torch.int64, device=ds.device)
    hi = torch.full((b,), n, dtype=torch.int64, device=ds.device)
    if labels is None:
        return lo, hi
    lab = torch.as_tensor(labels).to(ds.device)
    if lab.is_floating_point() or lab.shape != (b,):
        raise ValueError(f"labels must be ({b},) integers (-1: unconditional), got {lab.dtype} {tuple(lab.shape)}")
    lab = lab.to(torch.int64)
    cond = lab >= 0
    if bool(cond.any()):
        if ds.class_offsets is None:
            raise ValueError(f"data set {ds.name!r} has no labels; send labels -1 or none")
        if int(lab.min()) < -1 or int(lab.max()) >= ds.num_classes:
            raise ValueError(f"labels must lie in -1..{ds.num_classes - 1}")
        off = ds.class_offsets.to(ds.device)
        y = lab.clamp_min(0)
        lo = torch.where(cond, off[y], lo)
        hi = torch.where(cond, off[y + 1], hi)
    if bool((hi <= lo).any()):
        raise ValueError("a queried class has no samples: its posterior is empty")
    return lo, hi


def _excluded_rows(ds: Dataset, exclude: Any | None, b: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(caller's indices, rows), each (B,) int64 with -1 for none; (None, None) when nothing is excluded."""
    if exclude is None:
        return None, None
    e = torch.as_tensor(exclude)
    if e.is_floating_point() or e.dtype == torch.bool or e.shape != (b,):
        raise ValueError(f"exclude must be ({b},) integer sample indices (-1: none), got {e.dtype} {tuple(e.shape)}")
    e = e.to(device=ds.device, dtype=torch.int64)
    if b and (int(e.min()) < -1 or int(e.max()) >= ds.num_samples):
        raise ValueError(f"exclude holds data set indices 0..{ds.num_samples - 1} or -1 (none)")
    if not bool((e >= 0).any()):
        return None, None
    return e, torch.where(e >= 0, ds.rows_of(e.clamp_min(0)), torch.full_like(e, -1))


def _draw_distinct(size: torch.Tensor, m: int, generator: torch.Generator | None) -> torch.Tensor:
    """(Q, m) int64 positions, m distinct ones per row, uniform among the m-subsets of [0, size_q).

    Needs size_q > m. Small sets: the m smallest of random keys. Large ones: uniform draws whose
    duplicates are drawn again until none is left; the process commutes with any relabelling of
    [0, size_q), so the subset it ends with is uniform too.
    """
    q = int(size.shape[0])
    size_c = size.cpu()
    top = int(size_c.max()) if q else 0
    if q * top <= _KEYS_MAX:
        keys = torch.rand(q, top, generator=generator, dtype=torch.float64)
        keys[torch.arange(top)[None, :] >= size_c[:, None]] = 2.0  # outside the row's set: never among the m smallest
        return keys.topk(m, dim=1, largest=False).indices
    r = size_c.to(torch.float64)[:, None]
    pos = (torch.rand(q, m, generator=generator, dtype=torch.float64) * r).to(torch.int64)
    pos = torch.minimum(pos, size_c[:, None] - 1)
    while True:
        pos, _ = pos.sort(dim=1)
        dup = torch.zeros_like(pos, dtype=torch.bool)
        dup[:, 1:] = pos[:, 1:] == pos[:, :-1]
        if not bool(dup.any()):
            return pos
        rows = dup.nonzero()[:, 0]
        fresh = (torch.rand(rows.numel(), generator=generator, dtype=torch.float64) * r[rows, 0]).to(torch.int64)
        pos[dup] = torch.minimum(fresh, size_c[rows] - 1)


def _tail_rows(
    lo: torch.Tensor,
    hi: torch.Tensor,
    removed: torch.Tensor,
    removed_ok: torch.Tensor,
    tail: int,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw each query's tail from its rest: rows [lo, hi) without its removed rows.

    Args:
        lo, hi: (B,) support ranges.
        removed: (B, r) rows taken out (neighbours, the excluded sample), each inside [lo, hi)
            where ``removed_ok``, distinct per query.
        removed_ok: (B, r) bool.
        tail: m.

    Returns:
        (B, m) int64 rows (0 where unused), (B, m) bool used, (B,) int64 R (the rest's size).
        A query whose rest has at most m samples takes all of them.
    """
    b = lo.shape[0]
    dev = lo.device
    count = removed_ok.sum(dim=1)
    rest = (hi - lo) - count
    rows = torch.zeros(b, tail, dtype=torch.int64, device=dev)
    used = torch.zeros(b, tail, dtype=torch.bool, device=dev)
    if tail == 0 or b == 0:
        return rows, used, rest
    # the j-th row of the rest is lo + j + #{removed s_i : s_i - lo - i <= j} (s sorted): s_i - lo - i
    # counts the rest's rows below s_i
    big = torch.iinfo(torch.int64).max // 4
    s, _ = torch.where(removed_ok, removed, big).sort(dim=1)
    r = s.shape[1]
    adj = torch.where(
        torch.arange(r, device=dev)[None, :] < count[:, None], s - lo[:, None] - torch.arange(r, device=dev), big
    )
    pos = torch.arange(tail, device=dev).expand(b, tail).clone()
    used = pos < rest[:, None]
    sample = rest > tail
    if bool(sample.any()):
        pos[sample] = _draw_distinct(rest[sample], tail, generator).to(dev)
    rows = lo[:, None] + pos + torch.searchsorted(adj.contiguous(), pos.contiguous(), right=True)
    return torch.where(used, rows, 0), used, rest


def knn_target(
    dataset: Dataset,
    x_t: Any,
    alpha: Any,
    sigma: Any,
    *,
    k: int,
    tail: int,
    labels: Any | None = None,
    exclude: Any | None = None,
    exact: bool | None = None,
    nprobe: int | None = None,
    neighbours: NearestResult | None = None,
    generator: torch.Generator | None = None,
    block_bytes: int = _BLOCK_BYTES,
) -> KnnTarget:
    """The k-nearest-neighbour + uniform-tail estimate of the posterior mean of each query.

    Args:
        dataset: the resident data set (one process; a gang's shard holds no index).
        x_t: (B, D) or (B, *sample_shape) queries, any float dtype.
        alpha, sigma: scalars or (B,) path coefficients, alpha >= 0, sigma > 0. At alpha = 0 the
            posterior is uniform and every sample is as near as another: the neighbours are the
            support's first k rows.
        k: neighbours per query (0..N; searched in posterior order, see the module docstring).
        tail: m, uniform samples from the rest per query (>= 0; k + m >= 1). m = 0 drops the rest:
            the estimate is then the neighbours' posterior, its share 1 by construction, and only
            ``tail_bound`` says what was left out.
        labels: (B,) int64 classes (-1: unconditional): the posterior over that class's samples.
            The neighbours are the class's members among the k global ones.
        exclude: (B,) int64 caller's indices (-1: none): that sample is out of the query's
            posterior (leave-one-out).
        exact, nprobe: the neighbour search, as in :func:`~floworacle_server.engine.nearest`
            (None: exact up to ``dataset.exact_nearest_max_samples`` or without an index, else the index).
        neighbours: the neighbours already found (e.g. by a server's ``nearest`` with t), (B, k')
            caller's indices in posterior order; skips the search (``k`` is then ignored).
        generator: the tail draw's random numbers (CPU generator; None: torch's default).
        block_bytes: float64 rows gathered per step.

    Returns:
        KnnTarget: (B, D) float64 estimate and its indicators.

    Raises:
        ValueError: bad shapes or values, an index search where the data set has none, a
            posterior left empty (every weight 0 among the neighbours and the tail).
    """
    ds = dataset
    if ds.shard is not None:
        raise ValueError("the kNN target runs on a whole data set in one process, not on a gang's shard")
    if not isinstance(k, int) or not isinstance(tail, int) or k < 0 or tail < 0 or k + tail < 1:
        raise ValueError(f"k and tail must be integers >= 0 with k + tail >= 1, got k={k!r}, tail={tail!r}")
    xt = _queries(ds, x_t)
    b, n = xt.shape[0], ds.num_samples
    dev = ds.device
    a = torch.from_numpy(per_query(alpha, b, "alpha")).to(dev)
    s = torch.from_numpy(per_query(sigma, b, "sigma")).to(dev)
    if bool((a < 0).any()) or not bool((s > 0).all()):
        raise ValueError("alpha must be >= 0 and sigma > 0 (the kNN target needs a finite sigma_t > 0)")
    lo, hi = _support(ds, labels, b)
    excl_idx, excl_rows = _excluded_rows(ds, exclude, b)

    # -- neighbours, in posterior order; -1 where a query was not searched (alpha = 0)
    searched = a > 0
    approximate = False
    if neighbours is not None:
        idx = neighbours.indices.to(dev, torch.int64)
        if idx.ndim != 2 or idx.shape[0] != b:
            raise ValueError(f"neighbours must hold (B, k) = ({b}, k) indices, got {tuple(idx.shape)}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise ValueError(f"neighbour indices must lie in 0..{n - 1}")
        nb_rows = torch.where(searched[:, None], ds.rows_of(idx), torch.full_like(idx, -1))
        approximate = bool(neighbours.approximate)
    else:
        k_s = min(k, n - (1 if excl_rows is not None else 0))
        nb_rows = torch.full((b, k_s), -1, dtype=torch.int64, device=dev)
        if k_s > 0 and bool(searched.any()):
            sel = searched.nonzero().squeeze(1)
            res = posterior_nearest(
                ds,
                xt[sel],
                a[sel],
                s[sel],
                k=k_s,
                exact=exact,
                nprobe=nprobe,
                exclude=None if excl_idx is None else excl_idx[sel],
            )
            nb_rows[sel] = ds.rows_of(res.indices.to(dev))
            approximate = res.approximate
    kk = nb_rows.shape[1]
    if kk and not bool(searched.all()):
        # alpha = 0: every sample weighs the same, so any k of the support are k nearest
        first = lo[:, None] + torch.arange(kk, device=dev)
        nb_rows = torch.where(searched[:, None], nb_rows, torch.where(first < hi[:, None], first, -1))
    nb_found = nb_rows >= 0
    nb_ok = nb_found & (nb_rows >= lo[:, None]) & (nb_rows < hi[:, None])
    if excl_rows is not None:
        nb_ok &= nb_rows != excl_rows[:, None]

    # -- the tail: the rest is the support without the neighbours used and the excluded sample
    removed, removed_ok = nb_rows, nb_ok
    if excl_rows is not None:
        e_ok = (excl_rows >= lo) & (excl_rows < hi)
        removed = torch.cat([removed, excl_rows[:, None]], dim=1)
        removed_ok = torch.cat([removed_ok, e_ok[:, None]], dim=1)
    t_rows, t_ok, rest = _tail_rows(lo, hi, removed, removed_ok, tail, generator)
    m_b = t_ok.sum(dim=1)
    factor = torch.where(m_b > 0, rest.to(torch.float64) / m_b.clamp_min(1).to(torch.float64), 0.0)

    # -- exact float64 logits of the neighbours (all found ones, for the bound) and the tail, per block
    rows_all = torch.cat([torch.where(nb_found, nb_rows, 0), t_rows], dim=1)
    width = rows_all.shape[1]
    d = ds.dim
    x1 = torch.empty(b, d, dtype=torch.float64, device=dev)
    share = torch.empty(b, dtype=torch.float64, device=dev)
    var = torch.empty(b, dtype=torch.float64, device=dev)
    kth = torch.full((b,), -math.inf, dtype=torch.float64, device=dev)
    z_k_all = torch.empty(b, dtype=torch.float64, device=dev)
    top_all = torch.empty(b, dtype=torch.float64, device=dev)
    step = max(1, block_bytes // max(1, width * d * 8))
    for q0 in range(0, b, step):
        q1 = min(b, q0 + step)
        rr = rows_all[q0:q1]
        c = rr.shape[0]
        xs = torch.index_select(ds.x, 0, rr.reshape(-1)).to(torch.float64).reshape(c, width, d)  # (c, k + m, D)
        a_c = a[q0:q1]
        pos = a_c > 0
        # ||x_t - alpha x_i||^2 = alpha^2 ||x_t / alpha - x_i||^2 from differences (cdist without the GEMM
        # expansion, whose cancellation grows as 1 / sigma^2); at alpha = 0 every sample is ||x_t||^2 away
        y = xt[q0:q1] / torch.where(pos, a_c, 1.0)[:, None]
        dist = torch.cdist(y[:, None, :], xs, compute_mode="donot_use_mm_for_euclid_dist").squeeze(1)
        d2 = torch.where(pos[:, None], (a_c[:, None] * dist) ** 2, (xt[q0:q1] ** 2).sum(dim=1)[:, None])
        logit = -d2 / (2.0 * s[q0:q1, None] ** 2)
        if ds.log_weights is not None:
            logit = logit + ds.log_weights[rr]
        if kk:
            kth[q0:q1] = torch.where(nb_found[q0:q1, kk - 1], logit[:, kk - 1], kth[q0:q1])
        ok = torch.cat([nb_ok[q0:q1], t_ok[q0:q1]], dim=1)
        logit = logit.masked_fill(~ok, -math.inf)
        top = logit.max(dim=1).values
        if not bool(torch.isfinite(top).all()):
            raise ValueError(
                "every neighbour and tail sample of a query weighs 0: its estimated posterior is empty; "
                "raise k or the tail"
            )
        w = torch.exp(logit - top[:, None])
        w_k, w_t = w[:, :kk], w[:, kk:]
        f = factor[q0:q1]
        z_k = w_k.sum(dim=1)
        z = z_k + f * w_t.sum(dim=1)
        wf = torch.cat([w_k, f[:, None] * w_t], dim=1)
        est = torch.bmm(wf[:, None, :], xs).squeeze(1) / z[:, None]
        x1[q0:q1] = est
        share[q0:q1] = z_k / z
        z_k_all[q0:q1] = z_k
        top_all[q0:q1] = top
        # delta method: the ratio's fluctuation is that of (R/m) sum_T e_j / Z, e_j = w_j (x_j - est);
        # sum_j ||e_j - e_mean||^2 = sum_j w_j^2 ||x_j - est||^2 - m ||e_mean||^2 from weighted sums of the rows
        m_c = m_b[q0:q1].to(torch.float64)
        xs_t = xs[:, kk:]
        w2 = w_t * w_t
        s1 = torch.bmm(w_t[:, None, :], xs_t).squeeze(1)  # sum_j w_j x_j
        s2 = torch.bmm(w2[:, None, :], xs_t).squeeze(1)  # sum_j w_j^2 x_j
        sq = ds.sq_norms[rr[:, kk:]]
        sum_e2 = (w2 * sq).sum(dim=1) - 2.0 * (est * s2).sum(dim=1) + (est * est).sum(dim=1) * w2.sum(dim=1)
        e_mean = (s1 - est * w_t.sum(dim=1)[:, None]) / m_c.clamp_min(1.0)[:, None]
        ss = (sum_e2 - m_c * (e_mean * e_mean).sum(dim=1)).clamp_min(0.0)
        r_c = rest[q0:q1].to(torch.float64)
        fpc = 1.0 - m_c / r_c.clamp_min(1.0)
        v = (f * f * m_c * fpc * ss / (m_c - 1.0).clamp_min(1.0)) / (z * z)
        # nothing random when the tail is the whole rest (or the rest is empty) or dropped (m = 0)
        fixed = (m_c >= r_c) | (m_c == 0)
        v = torch.where(fixed, 0.0, torch.where(m_c <= 1.0, math.inf, v))
        var[q0:q1] = v

    # the rest's logits <= the k-th neighbour's: weight outside K <= R e^{l_k} / (Z_K + R e^{l_k})
    mass = rest.to(torch.float64) * torch.exp(kth - top_all)
    bound = mass / (z_k_all + mass)
    bound = torch.where(rest == 0, 0.0, torch.where(torch.isfinite(kth), bound, 1.0))
    tail_bound = torch.nan_to_num(bound, nan=1.0)
    return KnnTarget(
        x1_hat=x1,
        neighbour_share=share,
        variance=var,
        tail_bound=tail_bound,
        neighbours=nb_ok.sum(dim=1),
        tail=m_b,
        population=rest,
        approximate=approximate,
    )


def knn_oracle(
    dataset: Dataset,
    query: OracleQuery,
    *,
    k: int,
    tail: int,
    exact: bool | None = None,
    nprobe: int | None = None,
    generator: torch.Generator | None = None,
) -> KnnOracleResult:
    """The kNN target for a batch of oracle queries: :func:`knn_target`'s x1-prediction, and the
    outputs that derive from it, ``u = A_t x1 + B_t x_t``, ``eps = (x_t - alpha x1) / sigma``,
    ``score = (alpha x1 - x_t) / sigma^2``.

    Labels, exclude and guidance mean what they mean to :func:`~floworacle_server.engine.oracle`:
    a guided query inside its interval (scale != 1) combines an unconditional and a conditional
    estimate, ``x1_w = x1(x) + w (x1(x | y) - x1(x))``. ``query.precision`` is not read.

    Raises:
        ValueError: an output other than the per-sample ones (diagnostics), or what
            :func:`knn_target` raises.
    """
    check_sample_outputs(query.outputs, "the kNN target")
    ds = dataset
    xt = _queries(ds, as_tensor(query.x_t, ds.device))
    labels = None if query.labels is None else as_tensor(query.labels, ds.device, torch.int64)
    exclude = None if query.exclude is None else as_tensor(query.exclude, ds.device, torch.int64)
    c = query.coeffs
    coef = torch.from_numpy(np.stack([c.alpha, c.sigma, c.velocity_x1, c.velocity_xt]).astype(np.float64)).to(ds.device)
    alpha, sigma, a_t = coef[0], coef[1], coef[2]
    est = knn_target(
        ds, xt, alpha, sigma, k=k, tail=tail, labels=labels, exclude=exclude, exact=exact,
        nprobe=nprobe, generator=generator,
    )  # fmt: skip
    g = query.guidance
    if g is not None and g.scale != 1.0 and labels is not None:
        if query.t is None:
            raise ValueError("a guidance interval needs t")
        lab = labels
        tq = as_tensor(query.t, ds.device, torch.float64)
        guided = (lab >= 0) & (tq >= g.t_lo) & (tq <= g.t_hi)
        if bool(guided.any()):
            sel = guided.nonzero().squeeze(1)
            unc = knn_target(
                ds, xt[sel], alpha[sel], sigma[sel], k=k, tail=tail, labels=None,
                exclude=None if exclude is None else exclude[sel],
                exact=exact, nprobe=nprobe, generator=generator,
            )  # fmt: skip
            w = g.scale
            est.x1_hat[sel] = unc.x1_hat + w * (est.x1_hat[sel] - unc.x1_hat)
            est.variance[sel] = (1.0 - w) ** 2 * unc.variance + w**2 * est.variance[sel]
    res = outputs_from_x1(xt, est.x1_hat, None, c, query.outputs)  # no bounds: the estimate claims none
    return KnnOracleResult(result=res, estimate=est, velocity_variance=a_t**2 * est.variance)


def knn_answer(dataset: Dataset, query: OracleQuery) -> OracleResult:
    """The served kNN target (precision "knn"): :func:`knn_oracle` over the data set's faiss index
    with the query's ``knn_k`` and ``knn_tail``, its outputs and its indicators in one result (no
    error bounds: the estimate claims none)."""
    if "data" not in dataset.nearest_indexes:
        raise ValueError(
            f"precision 'knn' searches data set {dataset.name!r}'s faiss index, and it has none; build one with "
            "`floworacle index build ... --nearest-index ivf`"
        )
    answer = knn_oracle(dataset, query, k=query.knn_k, tail=query.knn_tail, exact=False)
    res = answer.result
    est = answer.estimate
    res.knn_weight_share = est.neighbour_share
    res.knn_tail_bound = est.tail_bound
    res.knn_variance = est.variance
    return res
