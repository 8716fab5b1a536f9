"""k nearest samples of a batch of points (the data or the feature space), and the posterior-nearest
sample at time t: exact by default, or from a faiss index with an exact re-ranking.

Exact: a float32 GEMM (or faiss) screens the vectors in chunks keeping a running
top-(k + margin) per query; the candidates are then recomputed in float64 from differences, and
a proven bound on the screening error certifies that no sample outside the pool can belong to the
top k. A query whose pool is too small to certify is screened again with a wider pool.

Approximate (``exact=False`` or ``nprobe``, or by default above
``Dataset.exact_nearest_max_samples`` when the space has an index): the index's candidates are
re-ranked with the same float64 keys (:mod:`floworacle_server.engine._ann`); the answer says it
is approximate.

``exclude`` leaves one sample per query out of its answer (leave-one-out): its key is +inf in the
screen and in the recomputation, and one extra candidate is screened so the pool keeps its size.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from floworacle_server.data._dataset import Dataset
from floworacle_server.engine._ann import faiss_blas_kernel, search_index
from floworacle_server.engine._bounds import float32_gemm_unit_roundoff as _gemm_unit_roundoff
from floworacle_server.engine._space import SearchSpace, exclusion_rows, search_space
from floworacle_server.engine._types import NearestResult

__all__ = ["nearest", "posterior_nearest", "NEAREST_BACKENDS", "screening_error_bound"]

#: ``backend`` values: "auto" follows the data set's calibration (see :mod:`floworacle_server.engine._backend`).
NEAREST_BACKENDS = ("auto", "torch", "faiss")

_SCREEN_BYTES = 64 << 20  # (B, chunk) float32 scores per chunk
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


def _choose_backend(backend: str, sp: SearchSpace) -> str:
    """The exact screen: "torch", "faiss", or for "auto" the one the data set's calibration chose.

    "auto" is torch on GPUs and without faiss; on CPU data it is what
    :func:`~floworacle_server.engine.calibrate_nearest_backend` measured faster for this space
    (calibrated on first use when the loader did not).
    """
    if backend not in NEAREST_BACKENDS:
        raise ValueError(f"backend must be one of {NEAREST_BACKENDS}, got {backend!r}")
    if backend == "faiss":
        if _faiss is None:
            raise ValueError("backend='faiss' needs the faiss package (pip install faiss-cpu); or use backend='torch'")
        if sp.device.type != "cpu":
            raise ValueError("backend='faiss' screens CPU data only; use backend='torch' (or 'auto') for GPU data")
        return "faiss"
    if backend == "torch" or sp.device.type != "cpu" or _faiss is None:
        return "torch"
    choice = sp.dataset.nearest_backends.get(sp.name)
    if choice is None:
        from floworacle_server.engine._backend import calibrate_nearest_backend

        choice = calibrate_nearest_backend(sp.dataset, space=sp.name)
    return choice.backend


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
    ci = ci + start
    if best_v.shape[1] == 0:
        return cv, ci
    vals = torch.cat([best_v, cv.to(best_v.dtype)], dim=1)
    idx = torch.cat([best_i, ci], dim=1)
    best_v, pos = torch.topk(vals, min(pool, vals.shape[1]), dim=1, largest=False, sorted=False)
    return best_v, torch.gather(idx, 1, pos)


def _screen_faiss(sp: SearchSpace, q32: torch.Tensor, pool: int, chunk_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """faiss brute-force kNN over chunks (float32 squared distances), merged like the torch path."""
    assert _faiss is not None
    n = sp.num_samples
    qn = q32.numpy()
    best_v = torch.empty(q32.shape[0], 0, dtype=torch.float64)
    best_i = torch.empty(q32.shape[0], 0, dtype=torch.int64)
    with faiss_blas_kernel(sp.dim):
        for start in range(0, n, chunk_rows):
            stop = min(n, start + chunk_rows)
            xc = sp.x[start:stop]
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


def exact_knn(
    sp: SearchSpace,
    y: torch.Tensor,
    k: int,
    *,
    penalty_scale: torch.Tensor | None = None,
    chunk_rows: int | None = None,
    backend: str = "auto",
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
    use = "torch" if penalty is not None else _choose_backend(backend, sp)
    u = _gemm_unit_roundoff(dev) if use == "torch" else 2.0**-24
    exact_screen = dim * u > 0.1  # float32 error bound useless: screen in float64 instead
    q_norm = torch.linalg.vector_norm(y, dim=1)
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


def _as_queries(ds: Dataset, sp: SearchSpace, x: Any, what: str) -> torch.Tensor:
    """(B, D) float64 queries on the data's device, from (B, D) or (B, *sample_shape) (data space only)."""
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(x)
    if not (t.is_floating_point()):
        raise ValueError(f"{what} must be a float tensor, got {t.dtype}")
    d = sp.dim
    shape_ok = t.ndim >= 2 and math.prod(t.shape[1:]) == d
    if sp.name == "data":
        shape_ok = shape_ok and (t.ndim == 2 or tuple(t.shape[1:]) == ds.sample_shape)
    else:
        shape_ok = shape_ok and t.ndim == 2
    if not shape_ok:
        shapes = f"(B, {d})" if sp.name != "data" else f"(B, {d}) or (B, {', '.join(map(str, ds.sample_shape))})"
        raise ValueError(
            f"{what} must have shape {shapes} for the {sp.name} space of {ds.name!r}, got {tuple(t.shape)}"
        )
    t = t.reshape(t.shape[0], d).to(device=ds.device, dtype=torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError(f"{what} contains NaN or Inf")
    return t


def _check_k(n: int, k: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= n:
        raise ValueError(f"k must be an integer in 1..{n} (the data set's size), got {k!r}")


def _use_index(sp: SearchSpace, exact: bool | None, nprobe: int | None) -> bool:
    """Whether the query runs on the space's faiss index (see :func:`nearest`); validates exact / nprobe."""
    if exact is not None and not isinstance(exact, bool):
        raise ValueError(f"exact must be True, False or None, got {exact!r}")
    if nprobe is not None:
        if not isinstance(nprobe, int) or isinstance(nprobe, bool) or nprobe < 1:
            raise ValueError(f"nprobe must be an integer >= 1 (None: the index's default), got {nprobe!r}")
        if exact:
            raise ValueError("nprobe selects an approximate index search; drop exact=True or drop nprobe")
    if exact is False or nprobe is not None:
        if sp.index is None:
            raise ValueError(
                f"the {sp.name} space of {sp.dataset.name!r} has no nearest index, so only exact search is available; "
                "build one with `floworacle index build ... "
                + ("--nearest-index ivf`" if sp.name == "data" else "--features-index ivf`")
                + " or drop exact=False / nprobe"
            )
        if nprobe is not None and nprobe > sp.index.nlist:
            raise ValueError(f"nprobe must be at most the index's {sp.index.nlist} inverted lists, got {nprobe}")
        return True
    if exact is None and sp.index is not None:
        return sp.num_samples > sp.dataset.exact_nearest_max_samples
    return False


def nearest(
    dataset: Dataset,
    x: Any,
    k: int,
    *,
    exact: bool | None = None,
    nprobe: int | None = None,
    space: str = "data",
    exclude: Any | None = None,
    chunk_rows: int | None = None,
    backend: str = "auto",
) -> NearestResult:
    """The k nearest stored samples of each point, in the data space (L2) or the feature space.

    Args:
        dataset: the resident data set.
        x: (B, D) or (B, *sample_shape) points (features space: (B, F) feature vectors), any
            float dtype, any device (moved to the data's).
        k: 1 <= k <= N (N - 1 when a query excludes a sample).
        exact: True: certified brute force. False: the space's faiss index. None (default):
            exact when the data set has at most ``dataset.exact_nearest_max_samples`` samples or
            the space has no index, else the index.
        nprobe: inverted lists an index search probes (1..nlist); implies ``exact=False``.
            None: the index's default (chosen at build time for its recall target).
        space: "data" (the stored samples, L2) or "features" (the feature embeddings, L2 or
            cosine as built).
        exclude: (B,) int64 indices in the caller's original order (the returned indices'
            order): that sample is left out of that query's answer; -1 leaves nothing out.
        chunk_rows: rows screened per step of the exact search (default: ~64 MB of scores).
        backend: exact screen: "auto" (the data set's calibrated choice), "torch" or "faiss" (CPU).

    Returns:
        NearestResult: (B, k) indices in the caller's original order, (B, k) float64 distances
        in increasing order (L2 ``||x_b - x_i||``; cosine: ``||x_b/||x_b|| - f_i/||f_i|| ||``),
        ties broken by index, labels when the data set has labels, cosine similarities for a
        cosine space, and ``approximate``. Exact answers equal a float64 brute force over the
        stored values (float32 screen certified by :func:`screening_error_bound`, candidates
        recomputed in float64 from differences); approximate ones carry exact float64 distances
        of the index's candidates, re-ranked, but may miss a true neighbour.

    Raises:
        ValueError: bad shape, non-finite points, k out of range, unknown backend or space, a
            bad exclude, or an index search where the space has no index.
    """
    sp = search_space(dataset, space)
    _check_k(sp.num_samples, k)
    y = _as_queries(dataset, sp, x, "x")
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    if backend != "auto":  # validate even for an empty batch ("auto" may calibrate, which waits for a query)
        _choose_backend(backend, sp)
    approximate = _use_index(sp, exact, nprobe)
    excluded = exclusion_rows(dataset, exclude, y.shape[0], k)
    if y.shape[0] == 0:
        return sp.result(*_empty(y, k), approximate=approximate)
    ys = sp.queries(y)
    if approximate:
        assert sp.index is not None
        keys, rows = search_index(sp, sp.index, ys, k, nprobe or sp.index.default_nprobe, excluded)
    else:
        keys, rows = exact_knn(sp, ys, k, chunk_rows=chunk_rows, backend=backend, excluded=excluded)
    return sp.result(keys, rows, approximate=approximate)


def _empty(y: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty(0, k, dtype=torch.float64, device=y.device), torch.empty(
        0, k, dtype=torch.int64, device=y.device
    )


def posterior_nearest(
    dataset: Dataset,
    x_t: Any,
    alpha: Any,
    sigma: Any | None = None,
    *,
    k: int = 1,
    exact: bool | None = None,
    nprobe: int | None = None,
    space: str = "data",
    exclude: Any | None = None,
    chunk_rows: int | None = None,
    backend: str = "auto",
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
        exact, nprobe, exclude, chunk_rows, backend: as in :func:`nearest`. An index ranks by
            distance only, so a weighted data set is always searched exactly (exact=False or
            nprobe is an error there).
        space: "data" only: x_t lives in the data space.

    Returns:
        NearestResult with (B, k) indices (caller's order), float64 distances
        ``||x_t / alpha - x_i||``, labels and ``approximate``.

    Raises:
        ValueError: alpha <= 0, sigma missing/negative for a weighted data set, bad shapes,
            another space, an index search on a weighted data set.
    """
    if space != "data":
        raise ValueError(
            f"posterior-nearest queries (with t) search the data space, where x_t lives; got space={space!r}"
        )
    sp = search_space(dataset, "data")
    _check_k(sp.num_samples, k)
    xt = _as_queries(dataset, sp, x_t, "x_t")
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
        if exact is False or nprobe is not None:
            raise ValueError(
                f"data set {dataset.name!r} has sample weights, which enter the posterior ranking but not an index's; "
                "posterior-nearest queries on it are exact only (drop exact=False / nprobe)"
            )
        approximate = False
    else:
        approximate = _use_index(sp, exact, nprobe)
    excluded = exclusion_rows(dataset, exclude, b, k)
    if b == 0:
        return sp.result(*_empty(y, k), approximate=approximate)
    if approximate:
        assert sp.index is not None
        keys, rows = search_index(sp, sp.index, y, k, nprobe or sp.index.default_nprobe, excluded)
    else:
        keys, rows = exact_knn(sp, y, k, penalty_scale=beta, chunk_rows=chunk_rows, backend=backend, excluded=excluded)
    if beta is not None:
        # the ranking key included the weight penalty; the distances returned are the plain ones
        keys = sp.exact_keys(y, rows)
    return sp.result(keys, rows, approximate=approximate)


def _per_query(v: Any, b: int, device: torch.device, what: str) -> torch.Tensor:
    t = torch.as_tensor(v, dtype=torch.float64).to(device)
    if t.ndim == 0:
        t = t.expand(b)
    if t.shape != (b,):
        raise ValueError(f"{what} must be a scalar or have shape ({b},), got {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{what} must be finite")
    return t
