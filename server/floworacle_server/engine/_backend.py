"""Which exact screen a data set's nearest queries use ("torch" GEMM + topk, or faiss brute force),
chosen by a short measurement on the machine that serves it, and the facts DescribeDataset reports.

The calibration times one exact 10-NN of 256 queries (data rows plus a little noise) over the
first rows of the space, as many as make about 2 GFLOP of screening (at least 4,096, at most N),
with each backend, in eight back-to-back pairs after a warm-up, and keeps the backend with the
smaller best time (ties to torch, which runs on every device). The minimum is what decides
because a shared machine's noise only ever adds time: measured on a loaded 2-core VM, medians of
the same call swung 5x between runs while minima stayed within 30 %. Results are cached per shape (device, storage dtype, D, the
rows measured, threads), so data sets of one shape are calibrated once per process. On a GPU, or
without faiss, the choice is torch without measuring.

Why measure: the same call was 1.5-4x faster with torch on a 16-core host and 1.5-2x faster with
faiss on a 2-core VM (docs/data.md).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, replace

import torch

from floworacle.protocol import SPACES
from floworacle_server.data import FAISS, BackendChoice, Dataset, NearestIndex
from floworacle_server.engine._knn import KNN_BACKENDS, exact_knn
from floworacle_server.engine._space import SearchSpace, search_space

__all__ = ["NEAREST_BACKENDS", "NearestInfo", "calibrate_nearest_backends", "choose_backend", "nearest_info"]

#: ``backend`` values: "auto" follows the data set's calibration.
NEAREST_BACKENDS: tuple[str, ...] = ("auto", *KNN_BACKENDS)

log = logging.getLogger(__name__)

_QUERIES = 256
_K = 10
_FLOPS = 2e9  # screening work per timed call: 2 * queries * rows * D
_MIN_ROWS = 4096
_PAIRS = 8

_cache: dict[tuple[object, ...], BackendChoice] = {}
_cache_lock = threading.Lock()


def _threads() -> tuple[int, int]:
    return torch.get_num_threads(), int(FAISS.omp_get_max_threads()) if FAISS is not None else 0


def _measure(sp: SearchSpace, rows: int, seed: int) -> tuple[float, float]:
    """Best torch and faiss wall times (ms) of an exact k-NN over the first ``rows`` rows of ``sp``."""
    sub = SearchSpace(sp.name, sp.dataset, sp.x[:rows], sp.sq_norms[:rows], sp.metric, None)
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, rows, (_QUERIES,), generator=g)
    base = sub.x[pick].to(torch.float64)
    spread = float(base.std()) if base.numel() > 1 else 1.0
    y = sub.queries(base + 0.1 * (spread or 1.0) * torch.randn(base.shape, generator=g, dtype=torch.float64))
    k = min(_K, rows)
    best = {"torch": math.inf, "faiss": math.inf}
    for be in best:  # warm-up: first-touch of buffers, thread pools
        exact_knn(sub, y, k, backend=be)
    for i in range(_PAIRS):
        for be in ("torch", "faiss") if i % 2 == 0 else ("faiss", "torch"):
            t0 = time.perf_counter()
            exact_knn(sub, y, k, backend=be)
            best[be] = min(best[be], (time.perf_counter() - t0) * 1e3)
    return best["torch"], best["faiss"]


def choose_backend(backend: str, sp: SearchSpace) -> str:
    """The exact screen of a search: "torch", "faiss", or for "auto" the one calibrated for the space.

    "auto" is torch on GPUs and without faiss; on CPU data it is the choice the server recorded in
    ``dataset.nearest_backends`` at start-up, else what :func:`calibrate_nearest_backends` measures
    (once per shape of data and threads in a process).
    """
    if backend not in NEAREST_BACKENDS:
        raise ValueError(f"backend must be one of {NEAREST_BACKENDS}, got {backend!r}")
    if backend == "faiss":
        if FAISS is None:
            raise ValueError("backend='faiss' needs the faiss package (pip install faiss-cpu); or use backend='torch'")
        if sp.device.type != "cpu":
            raise ValueError("backend='faiss' screens CPU data only; use backend='torch' (or 'auto') for GPU data")
        return "faiss"
    if backend == "torch" or sp.device.type != "cpu" or FAISS is None:
        return "torch"
    choice = sp.dataset.nearest_backends.get(sp.name)
    if choice is None:
        choice = calibrate_nearest_backends(sp.dataset, spaces=(sp.name,))[sp.name]
    return choice.backend


def calibrate_nearest_backends(
    dataset: Dataset, *, spaces: tuple[str, ...] | None = None, prefer: str = "auto", force: bool = False
) -> dict[str, BackendChoice]:
    """The exact screen of each space of ``dataset`` (the ones it has, or ``spaces``), logged with why;
    the caller records them (``dataset.nearest_backends.update(...)``: the server does at start-up).

    Args:
        dataset: the resident data set.
        spaces: which spaces ("data", "features"); None: every space the data set has.
        prefer: "auto" (measure), or "torch" / "faiss" to impose one (a server setting).
        force: measure again even when a choice is recorded or cached.

    Raises:
        ValueError: unknown ``prefer`` or space, or "faiss" where it cannot run.
    """
    if prefer not in NEAREST_BACKENDS:
        raise ValueError(f"nearest backend must be one of {NEAREST_BACKENDS}, got {prefer!r}")
    names = spaces if spaces is not None else tuple(s for s in SPACES if s == "data" or dataset.features is not None)
    chosen: dict[str, BackendChoice] = {}
    for name in names:
        sp = search_space(dataset, name)
        recorded = dataset.nearest_backends.get(name)
        if not force and prefer == "auto" and recorded is not None:
            chosen[name] = recorded
            continue
        choice = _choose(sp, prefer, force)
        chosen[name] = choice
        log.info("data set %r, %s space: nearest backend %s (%s)", dataset.name, name, choice.backend, choice.reason)
    return chosen


def _choose(sp: SearchSpace, prefer: str, force: bool) -> BackendChoice:
    if prefer != "auto":
        if prefer == "faiss" and (FAISS is None or sp.device.type != "cpu"):
            raise ValueError("the faiss screen needs the faiss package and data on the CPU; use 'torch' or 'auto'")
        return BackendChoice(prefer, "set by configuration")
    if sp.device.type != "cpu":
        return BackendChoice("torch", f"data on {sp.device.type}: the faiss screen takes CPU data only")
    if FAISS is None:
        return BackendChoice("torch", "faiss is not installed")
    b, n, d = _QUERIES, sp.num_samples, sp.dim
    rows = int(min(n, max(_MIN_ROWS, math.ceil(_FLOPS / (2 * b * d)))))
    threads = _threads()
    key = (sp.device.type, str(sp.x.dtype), d, rows, threads)
    with _cache_lock:
        cached = None if force else _cache.get(key)
    if cached is not None:
        return replace(cached, reason=cached.reason + " (cached for this shape)")
    t_torch, t_faiss = _measure(sp, rows, seed=d)
    ratio = t_torch / max(t_faiss, 1e-9)
    winner = "faiss" if ratio > 1.0 else "torch"
    speedup = ratio if ratio > 1.0 else 1.0 / max(ratio, 1e-9)
    reason = (
        f"calibrated: exact {min(_K, rows)}-NN of {b} queries over {rows:,} rows of D = {d}: torch {t_torch:.1f} ms, "
        f"faiss {t_faiss:.1f} ms (best of {_PAIRS}; {threads[0]} torch / {threads[1]} faiss threads): {winner} "
        f"{speedup:.2f}x faster"
    )
    choice = BackendChoice(winner, reason, t_torch, t_faiss, ratio)
    with _cache_lock:
        _cache[key] = choice
    return choice


@dataclass(frozen=True)
class NearestInfo:
    """What DescribeDataset reports about nearest search (proto ``DatasetInfo`` fields 13-18).

    Attributes:
        backend: exact screen of the data space, "torch" or "faiss" (``nearest_backend``).
        backend_reason: why (``nearest_backend_reason``); names the features space's choice too
            when it differs.
        exact_max_samples: ``exact_nearest_max_samples``.
        indexes: the loaded faiss indexes (``nearest_indexes``; each has space, kind, params,
            recall, recall_k, default_nprobe, device, bytes).
        feature_dim: F, 0 without features (``feature_dim``).
        feature_metric: "l2", "cosine" or "" (``feature_metric``).
    """

    backend: str
    backend_reason: str
    exact_max_samples: int
    indexes: tuple[NearestIndex, ...]
    feature_dim: int
    feature_metric: str


def nearest_info(dataset: Dataset) -> NearestInfo:
    """The data set's nearest-search facts (the recorded screens, or calibrated now if none are)."""
    choices = calibrate_nearest_backends(dataset)
    data = choices["data"]
    reason = data.reason
    feats = choices.get("features")
    if feats is not None and feats.backend != data.backend:
        reason += f"; features space: {feats.backend} ({feats.reason})"
    return NearestInfo(
        backend=data.backend,
        backend_reason=reason,
        exact_max_samples=dataset.exact_nearest_max_samples,
        indexes=tuple(dataset.nearest_indexes[s] for s in SPACES if s in dataset.nearest_indexes),
        feature_dim=dataset.feature_dim,
        feature_metric=dataset.feature_metric,
    )
