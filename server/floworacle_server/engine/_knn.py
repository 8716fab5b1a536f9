"""The exact k nearest rows of a search space: a float32 (or faiss) screen in chunks keeping a
running pool per query, the pool's candidates recomputed in float64 from differences, and a proven
bound on the screening error (:func:`._bounds.screening_error_bound`) certifying that no sample
outside the pool can belong to the top k; a query whose pool cannot certify is screened again
with a wider one. Ties go to the smaller index, here and in every merge of top-k lists
(:func:`merge_topk`: chunks, devices, a gang's shards).
"""

from __future__ import annotations

import math

import torch

from floworacle_server.data import FAISS
from floworacle_server.engine._ann import faiss_blas_kernel
from floworacle_server.engine._bounds import float32_gemm_unit_roundoff, screening_error_bound
from floworacle_server.engine._space import SearchSpace

__all__ = ["exact_knn", "KNN_BACKENDS", "FLOAT32_NORM"]

#: Screens of the exact search: torch's GEMM + topk (every device) or faiss' brute force (CPU).
KNN_BACKENDS = ("torch", "faiss")

_SCREEN_BYTES = 64 << 20  # (B, chunk) float32 scores per chunk
#: Largest vector norm a float32 screen takes: its squares (and sums of two) stay below float32's max.
FLOAT32_NORM = 2.0**60


def _default_chunk_rows(b: int, pool: int, n: int) -> int:
    rows = max(4096, _SCREEN_BYTES // (4 * max(1, b)))
    return max(1, min(n, max(rows, pool)))


def _screen_torch(
    sp: SearchSpace,
    q32: torch.Tensor,
    penalty: _Penalty | None,
    pool: int,
    chunk_rows: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Running top-``pool`` of ``||x_i||^2 - 2 q . x_i (+ penalty)`` over chunks; (B, pool) values and rows.

    Only (B, pool + chunk) scores exist at any time; the merge is exact because topk of the
    union of the running best and a chunk's scores is the running best of the union.
    """
    n = sp.num_samples
    b = q32.shape[0]
    best_v = torch.empty(b, 0, dtype=torch.float64 if penalty is not None else torch.float32, device=q32.device)
    # (B, 0) start: the first chunk's top-pool becomes the running best
    best_i = torch.empty(b, 0, dtype=torch.int64, device=q32.device)
    for start in range(0, n, chunk_rows):
        stop = min(n, start + chunk_rows)
        xc = sp.x[start:stop].to(torch.float32)
        sn = sp.sq_norms[start:stop].to(torch.float32)
        scores = torch.addmm(sn.unsqueeze(0), q32, xc.t(), beta=1.0, alpha=-2.0)
        if penalty is not None:
            # the penalty is added in float64; only the GEMM part carries float32 error
            scores = scores.to(torch.float64) + penalty.block(start, stop)
        best_v, best_i = _merge_topk(best_v, best_i, scores, start, pool)
    return best_v.to(torch.float64), best_i


def _merge_topk(
    best_v: torch.Tensor, best_i: torch.Tensor, scores: torch.Tensor, start: int, pool: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Running top-``pool`` (smallest) after one more chunk of (B, c) scores for rows start..start+c.

    The chunk is reduced on its own first, so only (B, 2 pool) values are ever concatenated.
    """
    cv, ci = torch.topk(scores, min(pool, scores.shape[1]), dim=1, largest=False, sorted=False)
    return _keep_best(best_v, best_i, cv, ci + start, pool)


def _keep_best(
    best_v: torch.Tensor, best_i: torch.Tensor, cv: torch.Tensor, ci: torch.Tensor, pool: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``pool`` smallest of the running best and a chunk's own best (values, rows)."""
    if best_v.shape[1] == 0:
        return cv, ci
    vals = torch.cat([best_v, cv.to(best_v.dtype)], dim=1)
    idx = torch.cat([best_i, ci], dim=1)
    best_v, pos = torch.topk(vals, min(pool, vals.shape[1]), dim=1, largest=False, sorted=False)
    return best_v, torch.gather(idx, 1, pos)


def _screen_faiss(sp: SearchSpace, q32: torch.Tensor, pool: int, chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """faiss brute-force kNN over chunks (float32 squared distances), merged like the torch path."""
    assert FAISS is not None
    n = sp.num_samples
    qn = q32.numpy()
    best_v = torch.empty(q32.shape[0], 0, dtype=torch.float64)
    best_i = torch.empty(q32.shape[0], 0, dtype=torch.int64)
    with faiss_blas_kernel(sp.dim):
        for start in range(0, n, chunk_rows):
            stop = min(n, start + chunk_rows)
            xc = sp.x[start:stop]
            xc_np = (xc if xc.dtype == torch.float32 else xc.to(torch.float32)).contiguous().numpy()
            d, i = FAISS.knn(qn, xc_np, min(pool, stop - start))
            cv, ci = torch.from_numpy(d).to(torch.float64), torch.from_numpy(i).to(torch.int64) + start
            best_v, best_i = _keep_best(best_v, best_i, cv, ci, pool)
    return best_v, best_i


def exact_knn(
    sp: SearchSpace,
    y: torch.Tensor,
    k: int,
    *,
    penalty_scale: torch.Tensor | None = None,
    chunk_rows: int | None = None,
    backend: str = "torch",
    excluded: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k rows by ``key_i + beta_b * (-log p_i)``; (B, k) float64 keys and rows.

    ``y`` are the (B, D) float64 search vectors (:meth:`SearchSpace.queries`), ``penalty_scale``
    is beta (B,) or None (pure key), ``excluded`` (B,) rows left out (-1: none) or None.
    Ties: by key, then original index.
    """
    n, dim = sp.num_samples, sp.dim
    b = y.shape[0]
    dev = sp.device
    penalty: _Penalty | None = None
    if penalty_scale is not None and sp.dataset.log_weights is not None:
        penalty = _Penalty(penalty_scale, -sp.dataset.log_weights)
    assert backend in KNN_BACKENDS, f"resolve the backend first (._backend.choose_backend), got {backend!r}"
    use = "torch" if penalty is not None or FAISS is None else backend
    u = float32_gemm_unit_roundoff(dev) if use == "torch" else 2.0**-24
    q_norm = torch.linalg.vector_norm(y, dim=1)
    # float64 screen where float32 cannot serve: its error bound would be useless (TF32 / bf16
    # GEMMs), or squared norms would overflow it (norms past 2^60; faiss adds ||q||^2 too)
    big = b > 0 and max(float(q_norm.max()), sp.max_norm()) > FLOAT32_NORM
    exact_screen = dim * u > 0.1 or big
    qn2 = q_norm**2
    bound = screening_error_bound(q_norm, sp.max_norm(), dim, 2.0**-53 if exact_screen else u) + sp.key_slack()
    q32 = y.to(torch.float32)

    extra = 0 if excluded is None else 1  # the excluded row may take one slot of the screened pool
    pool = min(n - extra, k + max(16, k // 8))
    todo = torch.arange(b, device=dev)
    out_d = torch.empty(b, k, dtype=torch.float64, device=dev)
    out_r = torch.empty(b, k, dtype=torch.int64, device=dev)
    while todo.numel() > 0:
        screened = min(n, pool + extra)
        sub_y, sub_q = y[todo], q32[todo]
        sub_pen = penalty.take(todo) if penalty is not None else None
        rows_c = chunk_rows or _default_chunk_rows(todo.numel(), screened, n)
        if exact_screen:
            vals, rows = _screen_exact(sp, sub_y, sub_pen, screened, rows_c)
        elif use == "faiss":
            vals, rows = _screen_faiss(sp, sub_q, screened, rows_c)
            vals = vals - qn2[todo, None]  # faiss includes ||q||^2; the rest of the code does not
        else:
            vals, rows = _screen_torch(sp, sub_q, sub_pen, screened, rows_c)
        sub_ex = excluded[todo, None] if excluded is not None else None
        if sub_ex is not None:
            vals = torch.where(rows == sub_ex, math.inf, vals)
        vals, order = torch.sort(vals, dim=1)
        rows = torch.gather(rows, 1, order)
        everything = screened >= n
        if not everything and extra:
            # rows outside the first `pool` columns screened at least as far as the last kept one, or are excluded
            vals, rows = vals[:, :pool], rows[:, :pool]
        sub_bound = bound[todo]
        # only candidates screened within 2 * bound of the k-th can beat the k-th's true key
        kth = vals[:, k - 1 : k]
        sub_qn2 = qn2[todo]
        # 2^-49 (...) covers the float64 roundings of the keys (penalty added, ||x||^2 added)
        reach = kth + 2.0 * sub_bound[:, None] + 2.0**-49 * (sub_qn2[:, None] + kth.abs())
        length = int((vals <= reach).sum(dim=1).max()) if vals.shape[1] > k else vals.shape[1]
        length = max(k, length)
        cand = rows[:, :length]
        key = sp.exact_keys(sub_y, cand)
        if sub_pen is not None:
            key = key + sub_pen.rows(cand)
        if sub_ex is not None:
            key = torch.where(cand == sub_ex, math.inf, key)
        top_key, top_rows = sp.top_k(key, cand, k)
        # certified when every unscreened sample's true key exceeds the k-th exact key
        if everything:
            ok = torch.ones(todo.numel(), dtype=torch.bool, device=dev)
        else:
            last = vals[:, -1]
            floor = sub_qn2 + last - sub_bound - 2.0**-49 * (sub_qn2 + last.abs())
            ok = floor > top_key[:, -1]
        done = todo[ok]
        out_d[done] = top_key[ok]
        out_r[done] = top_rows[ok]
        todo = todo[~ok]
        pool = min(n - extra, pool * 4)
    return out_d, out_r


class _Penalty:
    """Per-(query, row) key offset ``beta_b * (-log p_i)`` (>= 0), formed one chunk at a time.

    ``p_i = 0`` gives +inf (such a sample never wins while another has weight), also for beta = 0.
    """

    def __init__(self, beta: torch.Tensor, neg_log_p: torch.Tensor) -> None:
        self.beta = beta
        self.neg_log_p = neg_log_p

    def take(self, queries: torch.Tensor) -> _Penalty:
        return _Penalty(self.beta[queries], self.neg_log_p)

    def _combine(self, beta: torch.Tensor, nlp: torch.Tensor) -> torch.Tensor:
        out = beta * nlp
        return torch.where(torch.isinf(nlp), torch.full_like(out, math.inf), out)

    def block(self, start: int, stop: int) -> torch.Tensor:
        return self._combine(self.beta[:, None], self.neg_log_p[None, start:stop])

    def rows(self, rows: torch.Tensor) -> torch.Tensor:
        return self._combine(self.beta[:, None], self.neg_log_p[rows])


def _screen_exact(
    sp: SearchSpace, y64: torch.Tensor, penalty: _Penalty | None, pool: int, chunk_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 screen, used when the float32 GEMM's unit roundoff (TF32/bf16 modes) makes its bound useless."""
    n = sp.num_samples
    b = y64.shape[0]
    best_v = torch.empty(b, 0, dtype=torch.float64, device=y64.device)
    best_i = torch.empty(b, 0, dtype=torch.int64, device=y64.device)
    for start in range(0, n, chunk_rows):
        stop = min(n, start + chunk_rows)
        xc = sp.x[start:stop].to(torch.float64)
        scores = torch.addmm(sp.sq_norms[start:stop].unsqueeze(0), y64, xc.t(), beta=1.0, alpha=-2.0)
        if penalty is not None:
            scores = scores + penalty.block(start, stop)
        best_v, best_i = _merge_topk(best_v, best_i, scores, start, pool)
    return best_v, best_i
