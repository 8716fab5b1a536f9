"""k nearest samples of a batch of points (the data or the feature space), and the posterior-nearest
samples at time t: exact by default, or from a faiss index with an exact re-ranking.

The engine's entry is :func:`search`, which takes the protocol's :class:`~floworacle.protocol.NearestQuery`
as it is (checked by its rules against the data set's facts). :func:`nearest` and
:func:`posterior_nearest` are the in-process forms: they build and check such a query.

Exact (:mod:`._knn`): a float32 GEMM (or faiss) screens the vectors in chunks keeping a running pool
per query; the candidates are recomputed in float64 from differences, and a proven bound on the
screening error certifies that no sample outside the pool can belong to the top k.

Approximate (``exact=False`` or ``nprobe``, or by default above
``Dataset.exact_nearest_max_samples`` when the space has an index): the index's candidates are
re-ranked with the same float64 keys (:mod:`._ann`); the answer says it is approximate.

Posterior-nearest (the query has path coefficients): ``log gamma_i = log p_i - alpha^2 ||x_t / alpha
- x_i||^2 / (2 sigma^2) + const``, so with uniform weights the ranking is the L2 nearest to
``x_t / alpha`` (sigma not needed); with sample weights it is the smallest ``||x_t / alpha - x_i||^2
+ (2 sigma^2 / alpha^2)(-log p_i)`` (an index cannot rank by that, so such searches are exact).

``exclude`` leaves one sample per query out of its answer (leave-one-out): its key is +inf in the
screen and in the recomputation, and one extra candidate is screened so the pool keeps its size.

Results of disjoint row sets (a gang's shards) merge with :func:`merge_nearest`, by the search's own
ranking key, ties by index: the same rule as every other top-k merge (:func:`._space.merge_topk`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from floworacle.paths import PathCoefficients
from floworacle.protocol import NearestQuery, rules
from floworacle_server.data import Dataset
from floworacle_server.engine._ann import search_index
from floworacle_server.engine._backend import choose_backend
from floworacle_server.engine._knn import FLOAT32_NORM, exact_knn
from floworacle_server.engine._space import SearchSpace, exclusion_rows, merge_topk, search_space
from floworacle_server.engine._types import NearestResult, as_tensor, per_query

__all__ = ["search", "nearest", "posterior_nearest", "ranking_keys", "merge_nearest"]


def _use_index(sp: SearchSpace, exact: bool | None, nprobe: int) -> bool:
    """Whether the query runs on the space's faiss index (the rules checked that it has one when asked)."""
    if exact is False or nprobe:
        assert sp.index is not None, "an index search on a space without an index (the rules refuse it)"
        return True
    if exact is None and sp.index is not None:
        return sp.num_samples > sp.dataset.exact_nearest_max_samples
    return False


def _penalty_scale(ds: Dataset, q: NearestQuery, dev: torch.device) -> torch.Tensor | None:
    """beta = 2 sigma^2 / alpha^2 of a posterior search on weighted data (None otherwise)."""
    if q.coeffs is None or ds.log_weights is None:
        return None
    alpha = torch.from_numpy(q.coeffs.alpha).to(dev)
    sigma = torch.from_numpy(q.coeffs.sigma).to(dev)
    return 2.0 * sigma**2 / alpha**2


def search(
    dataset: Dataset, query: NearestQuery, *, chunk_rows: int | None = None, backend: str = "auto"
) -> NearestResult:
    """The ``query.k`` nearest samples of each of the query's points (see the module docstring).

    ``query`` must have passed its rules (:meth:`NearestQuery.check` against ``dataset.facts``);
    on a gang's shard ``query.k`` may be at most the rows the shard holds. ``chunk_rows``: rows
    screened per step of the exact search (default: ~64 MB of scores); ``backend``: the exact
    screen, "auto" (the data set's calibrated choice), "torch" or "faiss" (CPU).

    Returns:
        (B, k) indices in the caller's original order, (B, k) float64 distances in increasing
        order (L2 ``||y_b - x_i||`` with ``y = x`` or ``x_t / alpha_t``; cosine: the chordal
        distance of the unit vectors), ties broken by index, labels when the data set has labels,
        cosine similarities for a cosine space, and ``approximate``. Exact answers equal a float64
        brute force over the stored values; approximate ones carry exact float64 distances of the
        index's candidates, re-ranked, but may miss a true neighbour.
    """
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    sp = search_space(dataset, query.space)
    be = choose_backend(backend, sp) if backend != "auto" else backend  # validated even for no rows
    k = query.k
    dev = dataset.device
    b = query.rows
    y = as_tensor(query.x, dev, torch.float64).reshape(b, sp.dim)
    if query.coeffs is not None:
        y = y / torch.from_numpy(query.coeffs.alpha).to(dev)[:, None]
    beta = _penalty_scale(dataset, query, dev)
    approximate = beta is None and _use_index(sp, query.exact, query.nprobe)
    if approximate and b and float(torch.linalg.vector_norm(y, dim=1).max()) > FLOAT32_NORM:
        approximate = False  # an index searches in float32, which such norms overflow: search exactly
    exclude = as_tensor(query.exclude, dev, torch.int64) if query.exclude is not None else None
    excluded = exclusion_rows(dataset, exclude, b, k)
    if b == 0:
        empty = torch.empty(0, k, device=dev)
        return sp.result(empty.to(torch.float64), empty.to(torch.int64), approximate=approximate)
    ys = sp.queries(y)
    if approximate:
        assert sp.index is not None
        keys, rows = search_index(sp, sp.index, ys, k, query.nprobe or sp.index.default_nprobe, excluded)
    else:
        be = choose_backend(be, sp)
        keys, rows = exact_knn(sp, ys, k, penalty_scale=beta, chunk_rows=chunk_rows, backend=be, excluded=excluded)
    if beta is not None:  # the ranking included the weight penalty; the distances returned are plain
        keys = sp.exact_keys(ys, rows)
    return sp.result(keys, rows, approximate=approximate)


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
    """The k nearest stored samples of each point, in-process: :func:`search` of a checked query.

    Args:
        dataset: the resident data set.
        x: (B, D) or (B, *sample_shape) points (features space: (B, F)), any float dtype and device.
        k: 1 <= k <= N (N - 1 when a query excludes a sample).
        exact, nprobe, space, exclude: as the query's (``nprobe`` None: the index's default).
        chunk_rows, backend: as :func:`search`'s.

    Raises:
        ValueError (a :class:`~floworacle.protocol.RequestError`): a broken request rule.
    """
    q = NearestQuery(x=x, k=rules.integer(k, "k"), exact=exact, nprobe=_probes(nprobe), space=space, exclude=exclude)
    return search(dataset, q.check(dataset.facts, max_k=None), chunk_rows=chunk_rows, backend=backend)


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
    """The samples with the largest posterior weight at (x_t, alpha, sigma), in-process.

    ``alpha`` (> 0) and ``sigma`` are scalars or (B,); ``sigma`` is needed when the data set has
    weights (they enter the ranking). Distances are ``||x_t / alpha - x_i||``. Other arguments as
    :func:`nearest`.
    """
    points = x_t if isinstance(x_t, torch.Tensor) else np.asarray(x_t)
    b = int(points.shape[0]) if points.ndim else 0
    a = per_query(alpha, b, "alpha")
    if sigma is None:
        if dataset.log_weights is not None:
            raise ValueError(
                f"data set {dataset.name!r} has sample weights: pass sigma so that log p_i enters the ranking"
            )
        s = np.ones(b)
    else:
        s = per_query(sigma, b, "sigma")
        if (s < 0).any():
            raise ValueError("sigma must be >= 0")
    coeffs = PathCoefficients(a, s, np.zeros(b), np.zeros(b))  # the search needs alpha and sigma only
    q = NearestQuery(
        x=x_t,
        k=rules.integer(k, "k"),
        coeffs=coeffs,
        path="custom",
        exact=exact,
        nprobe=_probes(nprobe),
        space=space,
        exclude=exclude,
    )
    return search(dataset, q.check(dataset.facts, max_k=None), chunk_rows=chunk_rows, backend=backend)


def _probes(nprobe: int | None) -> int:
    """The query's nprobe (0: the index's default) from the in-process form (None: the default)."""
    if nprobe is None:
        return 0
    if isinstance(nprobe, bool) or not isinstance(nprobe, int) or nprobe < 1:
        raise ValueError(f"nprobe must be an integer >= 1 (None: the index's default), got {nprobe!r}")
    return nprobe


def ranking_keys(dataset: Dataset, query: NearestQuery, result: NearestResult) -> torch.Tensor:
    """(B, k) float64 keys by which ``result`` is ranked: squared distances, plus the weight penalty
    ``(2 sigma^2 / alpha^2)(-log p_i)`` in a posterior search on weighted data (what merges must
    compare; empty slots, index -1, are +inf)."""
    key = result.distances.to(torch.float64) ** 2
    beta = _penalty_scale(dataset, query, key.device)
    if beta is not None:
        assert dataset.log_weights is not None
        rows = dataset.rows_of(result.indices.clamp(min=0))
        key = key + beta[:, None] * -dataset.log_weights[rows.clamp(min=0)]
    return torch.where(result.indices >= 0, key, math.inf)


def merge_nearest(parts: Sequence[tuple[torch.Tensor, NearestResult]], k: int) -> NearestResult:
    """The k best of several results for the same points over disjoint samples (a gang's shards),
    each given with its :func:`ranking_keys`: by key, ties by the smaller index; columns of -1 /
    +inf fill a result with fewer than k."""
    keys = torch.cat([key for key, _ in parts], dim=1)
    first = parts[0][1]
    cols = [torch.cat([r.distances.to(torch.float64) for _, r in parts], dim=1)]
    if first.labels is not None:
        cols.append(torch.cat([r.labels for _, r in parts if r.labels is not None], dim=1))
    if first.similarities is not None:
        cols.append(torch.cat([r.similarities for _, r in parts if r.similarities is not None], dim=1))
    index = torch.cat([r.indices for _, r in parts], dim=1)
    # empty slots (-1) last among equal keys: they carry +inf keys and the largest index
    index_order = torch.where(index >= 0, index, torch.iinfo(torch.int64).max)
    _, _, idx, *taken = merge_topk(keys, index_order, k, index, *cols)
    labels = taken[1] if first.labels is not None else None
    sims = taken[-1] if first.similarities is not None else None
    return NearestResult(
        indices=idx,
        distances=taken[0],
        labels=labels,
        approximate=any(r.approximate for _, r in parts),
        similarities=sims,
    )
