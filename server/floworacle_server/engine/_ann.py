"""Approximate nearest search with a faiss index (IVF-Flat or IVF-PQ), re-ranked exactly.

The index proposes ``rerank * (k + e) + max(16, k / 8)`` candidates per query (e = 1 when the
query excludes a sample); each is recomputed in float64 from differences
(:meth:`SearchSpace.exact_keys`) and the k best are kept, ties by index. So every distance
returned is exact; what the index can get wrong is only which samples are candidates (its
recall, measured at build time). A query whose probed lists hold fewer than k candidates is
searched again with twice the lists.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator

import numpy as np
import torch

from floworacle_server.data import FAISS, NearestIndex
from floworacle_server.engine._space import SearchSpace

__all__ = ["faiss_blas_kernel", "search_index"]

_BLAS_LOCK = threading.Lock()
#: faiss's scalar distance kernel beats its BLAS one only below about this many queries (measured on 2 cores)
_BLAS_MIN_QUERIES = 8


@contextlib.contextmanager
def faiss_blas_kernel(dim: int) -> Iterator[None]:
    """Let faiss's brute-force distances use BLAS from 8 queries on, inside the block.

    faiss 1.15 takes its BLAS kernel only when ``queries * dim >= distance_compute_blas_threshold``
    (128,000 by default), and below that its scalar kernel is 5-10x slower per pair once there are
    more than ~8 queries (measured: 42 ns against 4 ns per pair at 256 queries of D = 256). The
    threshold is a process-wide setting, so it is set and restored under a lock.
    """
    if FAISS is None:
        yield
        return
    with _BLAS_LOCK:
        before = FAISS.cvar.distance_compute_blas_threshold
        FAISS.cvar.distance_compute_blas_threshold = _BLAS_MIN_QUERIES * dim
        try:
            yield
        finally:
            FAISS.cvar.distance_compute_blas_threshold = before


def FAISS_search(nidx: NearestIndex, q: np.ndarray, fetch: int, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
    assert FAISS is not None
    with faiss_blas_kernel(int(nidx.index.d)):  # the coarse quantizer's search is a brute-force one
        if nidx.device == "cpu":
            params = FAISS.SearchParametersIVF(nprobe=nprobe)
            d, i = nidx.index.search(q, fetch, params=params)
        else:  # a faiss GPU index takes nprobe as a setting
            with nidx.lock:
                FAISS.GpuParameterSpace().set_index_parameter(nidx.index, "nprobe", nprobe)
                d, i = nidx.index.search(q, fetch)
    return d, i


def search_index(
    sp: SearchSpace,
    nidx: NearestIndex,
    y: torch.Tensor,
    k: int,
    nprobe: int,
    excluded: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, k) float64 exact keys and rows of the best candidates the index finds for search vectors ``y``.

    Args:
        sp: the space (its rows re-rank the candidates).
        nidx: its faiss index (ids are the caller's sample indices).
        y: (B, D) float64 search vectors (:meth:`SearchSpace.queries`).
        k: neighbours per query.
        nprobe: inverted lists to probe.
        excluded: (B,) rows left out (-1: none), or None.
    """
    n = sp.num_samples
    b = y.shape[0]
    dev = sp.device
    extra = 0 if excluded is None else 1
    fetch = min(n, nidx.rerank * (k + extra) + max(16, k // 8))
    q = np.ascontiguousarray(y.to(torch.float32).cpu().numpy())
    out_k = torch.empty(b, k, dtype=torch.float64, device=dev)
    out_r = torch.empty(b, k, dtype=torch.int64, device=dev)
    todo = torch.arange(b)
    probe = nprobe
    while todo.numel() > 0:
        _, ids_np = FAISS_search(nidx, q[todo.numpy()], fetch, probe)
        ids = torch.from_numpy(ids_np).to(dev)
        valid = ids >= 0  # -1: the probed lists held fewer than `fetch` vectors
        rows = torch.where(valid, sp.dataset.rows_of(ids.clamp_min(0)), torch.zeros_like(ids))
        sub = todo.to(dev)
        if excluded is not None:
            valid &= rows != excluded[sub, None]
        enough = valid.sum(dim=1) >= k
        if bool(enough.any()):
            ok = sub[enough]
            keys = sp.exact_keys(y[ok], rows[enough])
            keys = torch.where(valid[enough], keys, math.inf)
            top_k, top_r = sp.top_k(keys, rows[enough], k)
            out_k[ok], out_r[ok] = top_k, top_r
        todo = todo[~enough.cpu()]
        if todo.numel() and probe >= nidx.nlist:
            raise RuntimeError(f"the {sp.name} index returned fewer than k = {k} candidates with every list probed")
        probe = min(nidx.nlist, probe * 2)
    return out_k, out_r
