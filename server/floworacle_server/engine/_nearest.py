"""Exact L2 nearest training samples of a batch of points, and the posterior-nearest sample at time t.

A float32 GEMM (or faiss) screens the data in chunks keeping a running top-(k + margin) per
query; the candidates are then recomputed in float64 from differences, and a proven bound on
the screening error certifies that no sample outside the pool can belong to the top k. A query
whose pool is too small to certify is screened again with a wider pool.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from floworacle_server.data._dataset import Dataset
from floworacle_server.engine._bounds import float32_gemm_unit_roundoff as _gemm_unit_roundoff
from floworacle_server.engine._types import NearestResult

__all__ = ["nearest", "posterior_nearest", "NEAREST_BACKENDS", "screening_error_bound"]

#: ``backend`` values: "auto" picks by device and k (see :func:`_choose_backend`).
NEAREST_BACKENDS = ("auto", "torch", "faiss")

_SCREEN_BYTES = 64 << 20  # (B, chunk) float32 scores per chunk
_REFINE_BYTES_CPU = 4 << 20  # (b, L, D) float64 differences per query block
_REFINE_BYTES_GPU = 256 << 20
_F64_EPS = 2.0**-53

_faiss: Any
try:  # faiss is optional: the torch path is always available
    import faiss as _faiss
except ImportError:  # pragma: no cover - faiss-cpu is a server dependency
    _faiss = None


def screening_error_bound(
    q_norm: torch.Tensor, max_data_norm: float, dim: int, unit_roundoff: float = 2.0**-24
) -> torch.Tensor:
    """Bound on ``|screened - exact|`` squared distance, per query.

    The screen is ``s_i = ||x||^2 + (||x_i||^2 - 2 x . x_i)`` with the dot product (and the
    float32 rounding of x and of ``||x_i||^2``) in float32; faiss computes every term in float32.
    With u the GEMM unit roundoff, any summation order gives ``|fl(q . x_i) - x . x_i| <=
    (u + gamma_D (1 + u)) ||x|| ||x_i||`` (gamma_D = D u / (1 - D u), Cauchy-Schwarz), and the
    norm terms add at most ``(gamma_D + 3u)(||x||^2 + ||x_i||^2)``. Taken together, for D u <= 0.1,

        |s_i - d_i| <= 3 (D + 2) u (||x|| + ||x_i||)^2 + 4 (D + 4) 2^-53 (||x|| + ||x_i||)^2

    (the second term covers the float64 arithmetic). ``||x_i||`` is replaced by its maximum
    over the data, so the bound holds for every sample, screened or not.

    Args:
        q_norm: (B,) float64 query norms ``||x||``.
        max_data_norm: ``max_i ||x_i||`` of the stored data.
        dim: D.
        unit_roundoff: u of the screening arithmetic.

    Returns:
        (B,) float64 bounds.
    """
    c = 3.0 * (dim + 2) * unit_roundoff + 4.0 * (dim + 4) * _F64_EPS
    return c * (q_norm + max_data_norm) ** 2


def _choose_backend(backend: str, device: torch.device, k: int) -> str:
    """Pick the screening backend: "auto" is torch GEMM + topk on every device.

    faiss (IndexFlatL2 / faiss.knn, CPU only; no faiss GPU build is assumed) was measured
    against torch with benchmarks/bench_nearest.py (N = 20,000, D = 1,024, B = 256): see docs/data.md.
    """
    if backend not in NEAREST_BACKENDS:
        raise ValueError(f"backend must be one of {NEAREST_BACKENDS}, got {backend!r}")
    if backend == "faiss":
        if _faiss is None:
            raise ValueError("backend='faiss' needs the faiss package (pip install faiss-cpu); or use backend='torch'")
        if device.type != "cpu":
            raise ValueError("backend='faiss' screens CPU data only; use backend='torch' (or 'auto') for GPU data")
        return "faiss"
    if backend == "torch":
        return "torch"
    # measured (docs/data.md): on 16 cores the exact call is 1.5-4x faster with torch than with
    # faiss screening; on 2 cores faiss screens 10-20% faster. The large win decides: torch.
    return "torch"


def _default_chunk_rows(b: int, pool: int, n: int) -> int:
    rows = max(4096, _SCREEN_BYTES // (4 * max(1, b)))
    return max(1, min(n, max(rows, pool)))


def _screen_torch(
    ds: Dataset,
    q32: torch.Tensor,
    penalty: _Penalty | None,
    pool: int,
    chunk_rows: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Running top-``pool`` of ``||x_i||^2 - 2 q . x_i (+ penalty)`` over chunks; (B, pool) values and rows.

    Only (B, pool + chunk) scores exist at any time; the merge is exact because topk of the
    union of the running best and a chunk's scores is the running best of the union.
    """
    n = ds.num_samples
    b = q32.shape[0]
    best_v = torch.empty(b, 0, dtype=torch.float64 if penalty is not None else torch.float32, device=q32.device)
    # (B, 0) start: the first chunk's top-pool becomes the running best
    best_i = torch.empty(b, 0, dtype=torch.int64, device=q32.device)
    for start in range(0, n, chunk_rows):
        stop = min(n, start + chunk_rows)
        xc = ds.x[start:stop].to(torch.float32)
        sn = ds.sq_norms[start:stop].to(torch.float32)
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
    ci = ci + start
    if best_v.shape[1] == 0:
        return cv, ci
    vals = torch.cat([best_v, cv.to(best_v.dtype)], dim=1)
    idx = torch.cat([best_i, ci], dim=1)
    best_v, pos = torch.topk(vals, min(pool, vals.shape[1]), dim=1, largest=False, sorted=False)
    return best_v, torch.gather(idx, 1, pos)


def _screen_faiss(ds: Dataset, q32: torch.Tensor, pool: int, chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """faiss brute-force kNN over chunks (float32 squared distances), merged like the torch path."""
    assert _faiss is not None
    n = ds.num_samples
    qn = q32.numpy()
    best_v = torch.empty(q32.shape[0], 0, dtype=torch.float64)
    best_i = torch.empty(q32.shape[0], 0, dtype=torch.int64)
    for start in range(0, n, chunk_rows):
        stop = min(n, start + chunk_rows)
        xc = ds.x[start:stop]
        xc_np = (xc if xc.dtype == torch.float32 else xc.to(torch.float32)).contiguous().numpy()
        d, i = _faiss.knn(qn, xc_np, min(pool, stop - start))
        cv, ci = torch.from_numpy(d).to(torch.float64), torch.from_numpy(i).to(torch.int64) + start
        if best_v.shape[1] == 0:
            best_v, best_i = cv, ci
            continue
        vals, idx = torch.cat([best_v, cv], dim=1), torch.cat([best_i, ci], dim=1)
        best_v, pos = torch.topk(vals, min(pool, vals.shape[1]), dim=1, largest=False, sorted=False)
        best_i = torch.gather(idx, 1, pos)
    return best_v, best_i


def _exact_sq_distances(ds: Dataset, y64: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(B, L) float64 ``||y_b - x_rows[b, l]||^2`` from differences, in query blocks."""
    b, length = rows.shape
    d = ds.dim
    out = torch.empty(b, length, dtype=torch.float64, device=y64.device)
    # small blocks stay in a CPU's cache (10x faster than large ones, measured); a GPU wants few launches
    budget = _REFINE_BYTES_CPU if y64.device.type == "cpu" else _REFINE_BYTES_GPU
    step = max(1, budget // (8 * max(1, length) * d))
    for s in range(0, b, step):
        r = rows[s : s + step]
        diff = torch.index_select(ds.x, 0, r.reshape(-1)).to(torch.float64).view(r.shape[0], length, d)
        diff.sub_(y64[s : s + step, None, :])
        out[s : s + step] = diff.pow_(2).sum(dim=2)
    return out


def _knn(
    ds: Dataset,
    y64: torch.Tensor,
    k: int,
    penalty_scale: torch.Tensor | None,
    chunk_rows: int | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k rows by ``key_i = ||y - x_i||^2 + beta_b * (-log p_i)``; (B, k) float64 squared distances, rows.

    ``penalty_scale`` is beta (B,) or None (pure distance). Ties: by key, then original index.
    """
    n, dim = ds.num_samples, ds.dim
    b = y64.shape[0]
    dev = ds.device
    penalty: _Penalty | None = None
    if penalty_scale is not None and ds.log_weights is not None:
        penalty = _Penalty(penalty_scale, -ds.log_weights)
    use = "torch" if penalty is not None else _choose_backend(backend, dev, k)
    u = _gemm_unit_roundoff(dev) if use == "torch" else 2.0**-24
    exact_screen = dim * u > 0.1  # float32 error bound useless: screen in float64 instead
    q_norm = torch.linalg.vector_norm(y64, dim=1)
    qn2 = q_norm**2
    max_norm = float(ds.sq_norms.max().sqrt())
    bound = screening_error_bound(q_norm, max_norm, dim, 2.0**-53 if exact_screen else u)
    q32 = y64.to(torch.float32)

    pool = min(n, k + max(16, k // 8))
    todo = torch.arange(b, device=dev)
    out_d = torch.empty(b, k, dtype=torch.float64, device=dev)
    out_r = torch.empty(b, k, dtype=torch.int64, device=dev)
    while todo.numel() > 0:
        sub_y, sub_q = y64[todo], q32[todo]
        sub_pen = penalty.take(todo) if penalty is not None else None
        rows_c = chunk_rows or _default_chunk_rows(todo.numel(), pool, n)
        if exact_screen:
            vals, rows = _screen_exact(ds, sub_y, sub_pen, pool, rows_c)
        elif use == "faiss":
            vals, rows = _screen_faiss(ds, sub_q, pool, rows_c)
            vals = vals - qn2[todo, None]  # faiss includes ||q||^2; the rest of the code does not
        else:
            vals, rows = _screen_torch(ds, sub_q, sub_pen, pool, rows_c)
        vals, order = torch.sort(vals, dim=1)
        rows = torch.gather(rows, 1, order)
        sub_bound = bound[todo]
        # only candidates screened within 2 * bound of the k-th can beat the k-th's true key
        kth = vals[:, k - 1 : k]
        sub_qn2 = qn2[todo]
        # 2^-49 (...) covers the float64 roundings of the keys (penalty added, ||x||^2 added)
        reach = kth + 2.0 * sub_bound[:, None] + 2.0**-49 * (sub_qn2[:, None] + kth.abs())
        length = int((vals <= reach).sum(dim=1).max()) if vals.shape[1] > k else vals.shape[1]
        length = max(k, length)
        cand = rows[:, :length]
        exact = _exact_sq_distances(ds, sub_y, cand)
        key = exact if sub_pen is None else exact + sub_pen.rows(cand)
        # ties by key, then by the caller's index: stable sort on index first, then on key
        orig = ds.original_index[cand]
        o1 = torch.argsort(orig, dim=1, stable=True)
        key1, cand1, exact1 = torch.gather(key, 1, o1), torch.gather(cand, 1, o1), torch.gather(exact, 1, o1)
        o2 = torch.argsort(key1, dim=1, stable=True)[:, :k]
        top_key = torch.gather(key1, 1, o2)
        # certified when every unscreened sample's true key exceeds the k-th exact key
        if pool >= n:
            ok = torch.ones(todo.numel(), dtype=torch.bool, device=dev)
        else:
            last = vals[:, -1]
            floor = sub_qn2 + last - sub_bound - 2.0**-49 * (sub_qn2 + last.abs())
            ok = floor > top_key[:, -1]
        done = todo[ok]
        out_d[done] = torch.gather(exact1, 1, o2)[ok]
        out_r[done] = torch.gather(cand1, 1, o2)[ok]
        todo = todo[~ok]
        pool = min(n, pool * 4)
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
    ds: Dataset, y64: torch.Tensor, penalty: _Penalty | None, pool: int, chunk_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 screen, used when the float32 GEMM's unit roundoff (TF32/bf16 modes) makes its bound useless."""
    n = ds.num_samples
    b = y64.shape[0]
    best_v = torch.empty(b, 0, dtype=torch.float64, device=y64.device)
    best_i = torch.empty(b, 0, dtype=torch.int64, device=y64.device)
    for start in range(0, n, chunk_rows):
        stop = min(n, start + chunk_rows)
        xc = ds.x[start:stop].to(torch.float64)
        scores = torch.addmm(ds.sq_norms[start:stop].unsqueeze(0), y64, xc.t(), beta=1.0, alpha=-2.0)
        if penalty is not None:
            scores = scores + penalty.block(start, stop)
        best_v, best_i = _merge_topk(best_v, best_i, scores, start, pool)
    return best_v, best_i


def _as_queries(ds: Dataset, x: Any, what: str) -> torch.Tensor:
    """(B, D) float64 queries on the data's device, from (B, D) or (B, *sample_shape)."""
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(x)
    if not (t.is_floating_point()):
        raise ValueError(f"{what} must be a float tensor, got {t.dtype}")
    d = ds.dim
    if t.ndim >= 2 and math.prod(t.shape[1:]) == d and (t.ndim == 2 or tuple(t.shape[1:]) == ds.sample_shape):
        t = t.reshape(t.shape[0], d)
    else:
        raise ValueError(
            f"{what} must have shape (B, {d}) or (B, {', '.join(map(str, ds.sample_shape))}) for data set "
            f"{ds.name!r}, got {tuple(t.shape)}"
        )
    t = t.to(device=ds.device, dtype=torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError(f"{what} contains NaN or Inf")
    return t


def _check_k(ds: Dataset, k: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= ds.num_samples:
        raise ValueError(f"k must be an integer in 1..{ds.num_samples} (the data set's size), got {k!r}")


def _result(ds: Dataset, sq: torch.Tensor, rows: torch.Tensor) -> NearestResult:
    return NearestResult(
        indices=ds.original_index[rows],
        distances=sq.clamp_min(0.0).sqrt(),
        labels=ds.labels[rows] if ds.labels is not None else None,
    )


def nearest(
    dataset: Dataset,
    x: Any,
    k: int,
    *,
    chunk_rows: int | None = None,
    backend: str = "auto",
) -> NearestResult:
    """Exact k nearest stored samples (L2) of each point.

    Args:
        dataset: the resident data set.
        x: (B, D) or (B, *sample_shape) points, any float dtype, any device (moved to the data's).
        k: 1 <= k <= N.
        chunk_rows: data rows screened per step (default: ~64 MB of float32 scores).
        backend: "auto" (= "torch"), "torch" (GEMM + topk, any device) or "faiss" (CPU data).

    Returns:
        NearestResult: (B, k) indices in the caller's original order, (B, k) float64 L2
        distances ``||x_b - x_i||`` (not squared) in increasing order, ties broken by index, and
        (B, k) labels when the data set has labels. Exact against the stored values: a float32
        screen is certified by :func:`screening_error_bound` and candidates are recomputed in
        float64 from differences.

    Raises:
        ValueError: bad shape, non-finite points, k out of range, unknown backend.
    """
    _check_k(dataset, k)
    y = _as_queries(dataset, x, "x")
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    _choose_backend(backend, dataset.device, k)  # validate even for an empty batch
    if y.shape[0] == 0:
        return _result(dataset, torch.empty(0, k, dtype=torch.float64, device=y.device), _empty_rows(y, k))
    sq, rows = _knn(dataset, y, k, None, chunk_rows, backend)
    return _result(dataset, sq, rows)


def _empty_rows(y: torch.Tensor, k: int) -> torch.Tensor:
    return torch.empty(0, k, dtype=torch.int64, device=y.device)


def posterior_nearest(
    dataset: Dataset,
    x_t: Any,
    alpha: Any,
    sigma: Any | None = None,
    *,
    k: int = 1,
    chunk_rows: int | None = None,
) -> NearestResult:
    """The samples with the largest posterior weight ``gamma_i`` at time t (top-k, default the argmax).

    ``log gamma_i = log p_i - ||x_t - alpha x_i||^2 / (2 sigma^2) + const
    = log p_i - alpha^2 ||x_t / alpha - x_i||^2 / (2 sigma^2) + const``. With uniform weights
    the ranking is the L2 nearest to ``x_t / alpha`` and sigma is not needed. With sample
    weights it is the smallest ``||x_t / alpha - x_i||^2 + (2 sigma^2 / alpha^2)(-log p_i)``,
    which needs sigma.

    Args:
        dataset: the resident data set.
        x_t: (B, D) or (B, *sample_shape) points on the path.
        alpha: alpha_t > 0, a scalar or (B,).
        sigma: sigma_t >= 0, a scalar or (B,); required when the data set has weights.
        k: how many samples per query, by decreasing posterior weight.

    Returns:
        NearestResult with (B, k) indices (caller's order), float64 distances
        ``||x_t / alpha - x_i||`` and labels.

    Raises:
        ValueError: alpha <= 0, sigma missing/negative for a weighted data set, bad shapes.
    """
    _check_k(dataset, k)
    xt = _as_queries(dataset, x_t, "x_t")
    b = xt.shape[0]
    a = _per_query(alpha, b, xt.device, "alpha")
    if not (a > 0).all():
        raise ValueError("alpha must be > 0: at alpha_t = 0 (pure noise) no sample is nearer than another")
    y = xt / a[:, None]
    beta: torch.Tensor | None = None
    if dataset.log_weights is not None:
        if sigma is None:
            raise ValueError(
                f"data set {dataset.name!r} has sample weights: pass sigma so that log p_i enters the ranking"
            )
        s = _per_query(sigma, b, xt.device, "sigma")
        if (s < 0).any():
            raise ValueError("sigma must be >= 0")
        beta = 2.0 * s**2 / a**2
    if b == 0:
        return _result(dataset, torch.empty(0, k, dtype=torch.float64, device=y.device), _empty_rows(y, k))
    sq, rows = _knn(dataset, y, k, beta, chunk_rows, "torch" if beta is not None else "auto")
    return _result(dataset, sq, rows)


def _per_query(v: Any, b: int, device: torch.device, what: str) -> torch.Tensor:
    t = torch.as_tensor(v, dtype=torch.float64).to(device)
    if t.ndim == 0:
        t = t.expand(b)
    if t.shape != (b,):
        raise ValueError(f"{what} must be a scalar or have shape ({b},), got {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{what} must be finite")
    return t
