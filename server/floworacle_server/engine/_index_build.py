"""Train a faiss index (IVF-Flat or IVF-PQ) for one space of an index directory and measure its recall.

Build: k-means (faiss) on a random sample of the space's vectors gives ``nlist`` centroids, one
iteration at a time so a progress bar can follow; IVF-PQ then trains its product quantiser on
the residuals; all N vectors are added with the caller's indices as ids.

Recall: Q held-out queries (samples outside the k-means sample, each searched with itself
excluded, i.e. leave-one-out, as a memorisation check searches a near-copy) are answered exactly
(:func:`~floworacle_server.engine._knn.exact_knn`) and through the index at nprobe = 1, 2, 4,
... The served pipeline is measured, re-ranking included: recall@k of a query is the share of its
k answers whose exact distance is at most the true k-th distance (ties count as found). The
default nprobe is the smallest that reaches the target recall (0.99 unless told), or the one
given.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from floworacle_server.data import FAISS, NearestIndex, load_index, space_fingerprint, write_nearest_index
from floworacle_server.engine._ann import faiss_blas_kernel, search_index
from floworacle_server.engine._backend import choose_backend
from floworacle_server.engine._knn import exact_knn
from floworacle_server.engine._space import SearchSpace, search_space

__all__ = ["INDEX_KINDS", "IndexSpec", "build_nearest_index", "parse_index_spec", "train_index"]

#: Index kinds ``--nearest-index`` / ``--features-index`` accept.
INDEX_KINDS = ("ivf", "ivfpq")
_ADD_ROWS = 65536


@dataclass(frozen=True)
class IndexSpec:
    """How to build an index; ``kind[:key=value,...]`` on the command line (None: a default from N and D).

    Attributes:
        kind: "ivf" (IVF-Flat: exact vectors in the lists) or "ivfpq" (product-quantised codes).
        nlist: inverted lists (k-means centroids); default about 4 sqrt(N), a power of two,
            at most N / 39.
        m: PQ sub-quantisers (ivfpq; must divide D); default the largest divisor of D up to
            min(64, D / 4).
        nbits: bits per PQ code (ivfpq).
        train: k-means sample size; default min(N, 64 nlist), for ivfpq at least 64 * 2^nbits.
        niter: k-means iterations.
        nprobe: default nprobe to store; None: the smallest reaching ``recall``.
        recall: recall@k target that picks the default nprobe.
        rerank: candidates per wanted neighbour before the exact re-ranking; default 1 (ivf) or 4 (ivfpq).
        queries: held-out queries for the recall measurement.
        k: the k of recall@k.
        seed: seed of the samples.
    """

    kind: str
    nlist: int | None = None
    m: int | None = None
    nbits: int = 8
    train: int | None = None
    niter: int = 20
    nprobe: int | None = None
    recall: float = 0.99
    rerank: int | None = None
    queries: int = 1000
    k: int = 10
    seed: int = 0


_INT_KEYS = {"nlist", "m", "nbits", "train", "niter", "nprobe", "rerank", "queries", "k", "seed"}


def parse_index_spec(text: str) -> IndexSpec:
    """``ivf``, ``ivfpq``, ``ivf:nlist=1024,nprobe=16``, ``ivfpq:m=16,recall=0.95`` ... as an :class:`IndexSpec`."""
    kind, _, rest = text.partition(":")
    kind = kind.strip().lower()
    if kind not in INDEX_KINDS:
        raise ValueError(f"index kind must be one of {INDEX_KINDS} (e.g. 'ivf:nlist=1024'), got {text!r}")
    spec = IndexSpec(kind)
    known = [f.name for f in fields(IndexSpec) if f.name != "kind"]
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in known:
            raise ValueError(f"index parameter {item!r} in {text!r}: write key=value with key one of {known}")
        try:
            parsed: Any = int(value) if key in _INT_KEYS else float(value)
        except ValueError:
            want = "an integer" if key in _INT_KEYS else "a number"
            raise ValueError(f"index parameter {key}={value!r}: expected {want}") from None
        spec = replace(spec, **{key: parsed})
    return spec


def _default_nlist(n: int) -> int:
    target = 4.0 * math.sqrt(n)
    nlist = 2 ** max(0, round(math.log2(target)))
    return int(max(1, min(nlist, n // 39 or 1)))


def _default_m(d: int) -> int:
    top = max(1, min(64, d // 4))
    return next(m for m in range(top, 0, -1) if d % m == 0)


def _resolve(spec: IndexSpec, n: int, d: int) -> IndexSpec:
    """Fill the defaults and check the parameters against N and D."""
    nlist = spec.nlist if spec.nlist is not None else _default_nlist(n)
    if not 1 <= nlist <= n:
        raise ValueError(f"nlist must lie in 1..N = {n}, got {nlist}")
    # faiss asks for >= 39 training vectors per centroid: the PQ has 2^nbits per sub-quantiser
    floor = 64 * 2**spec.nbits if spec.kind == "ivfpq" else 0
    train = spec.train if spec.train is not None else min(n, max(64 * nlist, floor))
    if not nlist <= train <= n:
        raise ValueError(f"train (the k-means sample) must lie in nlist..N = {nlist}..{n}, got {train}")
    m = spec.m
    if spec.kind == "ivfpq":
        m = m if m is not None else _default_m(d)
        if m < 1 or d % m:
            raise ValueError(f"m (PQ sub-quantisers) must divide D = {d}, got {m}")
        if not 1 <= spec.nbits <= 16:
            raise ValueError(f"nbits must lie in 1..16, got {spec.nbits}")
        if train < 2**spec.nbits:
            raise ValueError(f"the PQ needs at least 2^nbits = {2**spec.nbits} training vectors; raise train")
    rerank = spec.rerank if spec.rerank is not None else (1 if spec.kind == "ivf" else 4)
    if rerank < 1:
        raise ValueError(f"rerank must be >= 1, got {rerank}")
    if spec.niter < 1:
        raise ValueError(f"niter must be >= 1, got {spec.niter}")
    if spec.nprobe is not None and not 1 <= spec.nprobe <= nlist:
        raise ValueError(f"nprobe must lie in 1..nlist = {nlist}, got {spec.nprobe}")
    if not 0.0 < spec.recall <= 1.0:
        raise ValueError(f"recall (the target) must lie in (0, 1], got {spec.recall}")
    if spec.queries < 1 or not 1 <= spec.k <= max(1, n - 1):
        raise ValueError(f"queries must be >= 1 and k in 1..N - 1 = {n - 1}")
    return replace(spec, nlist=nlist, train=train, m=m, rerank=rerank)


def _factory(spec: IndexSpec) -> str:
    if spec.kind == "ivf":
        return f"IVF{spec.nlist},Flat"
    return f"IVF{spec.nlist},PQ{spec.m}x{spec.nbits}"


def _rows_f32(sp: SearchSpace, rows: np.ndarray | slice) -> np.ndarray:
    block = sp.x[rows] if isinstance(rows, slice) else sp.x[torch.from_numpy(rows).to(sp.device)]
    return np.ascontiguousarray(block.to(torch.float32).cpu().numpy())


def _kmeans(sample: np.ndarray, nlist: int, niter: int, seed: int, progress: bool) -> np.ndarray:
    """faiss k-means, one iteration per call (the next starts from the last centroids)."""
    assert FAISS is not None
    d = sample.shape[1]
    centroids: np.ndarray | None = None
    with tqdm(total=niter, desc="k-means", unit="iter", disable=not progress) as bar, faiss_blas_kernel(d):
        for _ in range(niter):
            cl = FAISS.Clustering(d, nlist)
            cl.niter = 1
            cl.seed = seed
            cl.max_points_per_centroid = sample.shape[0]  # the sample is already drawn
            cl.min_points_per_centroid = 1  # the parameters were checked; no faiss warning on stderr
            if centroids is not None:
                FAISS.copy_array_to_vector(centroids.ravel(), cl.centroids)
            cl.train(sample, FAISS.IndexFlatL2(d))
            centroids = FAISS.vector_to_array(cl.centroids).reshape(nlist, d)
            stats = cl.iteration_stats
            bar.set_postfix_str(f"objective {stats.at(stats.size() - 1).obj:.4g}")
            bar.update(1)
    assert centroids is not None
    return centroids


def train_index(sp: SearchSpace, spec: IndexSpec, *, progress: bool = True) -> tuple[Any, dict[str, Any]]:
    """A trained, filled faiss index over ``sp`` (ids: the caller's indices) and its build facts.

    ``spec`` must be resolved (:func:`_resolve` fills its defaults); returns (index, facts).
    """
    if FAISS is None:
        raise ValueError("nearest indexes need the faiss package (pip install faiss-cpu)")
    assert spec.nlist is not None and spec.train is not None
    n, d = sp.num_samples, sp.dim
    rng = np.random.default_rng(spec.seed)
    perm = rng.permutation(n)
    sample_rows = np.sort(perm[: spec.train])
    t0 = time.perf_counter()
    sample = _rows_f32(sp, sample_rows)
    centroids = _kmeans(sample, spec.nlist, spec.niter, spec.seed, progress)
    t_kmeans = time.perf_counter() - t0
    quantizer = FAISS.IndexFlatL2(d)
    quantizer.add(centroids)
    if spec.kind == "ivf":
        index = FAISS.IndexIVFFlat(quantizer, d, spec.nlist, FAISS.METRIC_L2)
    else:
        assert spec.m is not None
        index = FAISS.IndexIVFPQ(quantizer, d, spec.nlist, spec.m, spec.nbits)
    t1 = time.perf_counter()
    with faiss_blas_kernel(d):
        index.train(sample)  # the quantizer has its centroids: this trains the PQ (ivfpq) only
    t_pq = time.perf_counter() - t1
    del sample
    t2 = time.perf_counter()
    ids = sp.dataset.original_index.cpu().numpy().astype(np.int64)
    with tqdm(total=n, desc="add", unit="rows", disable=not progress) as bar, faiss_blas_kernel(d):
        for start in range(0, n, _ADD_ROWS):
            stop = min(n, start + _ADD_ROWS)
            index.add_with_ids(_rows_f32(sp, slice(start, stop)), ids[start:stop])
            bar.update(stop - start)
    facts = {
        "train_rows": int(spec.train),
        "train_sample": perm[: spec.train],
        "seconds": {
            "kmeans": round(t_kmeans, 3),
            "pq_train": round(t_pq, 3),
            "add": round(time.perf_counter() - t2, 3),
        },
    }
    return index, facts


def _recall(sp: SearchSpace, nidx: NearestIndex, y: torch.Tensor, rows: torch.Tensor, exact_kth: torch.Tensor,
            k: int, nprobe: int) -> tuple[float, float]:  # fmt: skip
    """(recall@k, ms per query) of the index pipeline at ``nprobe``."""
    t0 = time.perf_counter()
    keys, _ = search_index(sp, nidx, y, k, nprobe, rows)
    ms = (time.perf_counter() - t0) * 1e3 / max(1, y.shape[0])
    found = (keys <= exact_kth[:, None]).sum(dim=1).to(torch.float64) / k
    return float(found.mean()), ms


def measure_recall(
    sp: SearchSpace, nidx: NearestIndex, spec: IndexSpec, train_sample: np.ndarray, *, progress: bool = True
) -> dict[str, Any]:
    """Recall@k at nprobe = 1, 2, 4, ... (and at ``spec.nprobe``) on held-out leave-one-out queries."""
    n = sp.num_samples
    rng = np.random.default_rng(spec.seed + 1)
    outside = np.setdiff1d(np.arange(n), train_sample, assume_unique=False)
    q = min(spec.queries, n)
    held_out = outside.size >= q
    pick = rng.choice(outside if held_out else np.arange(n), size=q, replace=False)
    rows = torch.from_numpy(np.sort(pick)).to(sp.device)
    y = sp.queries(sp.x[rows].to(torch.float64))
    k = spec.k
    exact_keys, _ = exact_knn(sp, y, k, excluded=rows, backend=choose_backend("auto", sp))
    kth = exact_keys[:, k - 1]
    assert spec.nlist is not None
    ladder = [1 << i for i in range(int(math.log2(spec.nlist)) + 1)]
    if ladder[-1] != spec.nlist:
        ladder.append(spec.nlist)
    if spec.nprobe is not None and spec.nprobe not in ladder:
        ladder = sorted([*ladder, spec.nprobe])
    table: list[dict[str, float]] = []
    chosen: int | None = spec.nprobe
    with tqdm(total=len(ladder), desc="recall", unit="nprobe", disable=not progress) as bar:
        for nprobe in ladder:
            r, ms = _recall(sp, nidx, y, rows, kth, k, nprobe)
            table.append({"nprobe": nprobe, "recall": round(r, 6), "ms_per_query": round(ms, 4)})
            bar.set_postfix_str(f"nprobe {nprobe}: recall {r:.4f}")
            bar.update(1)
            if spec.nprobe is None and chosen is None and r >= spec.recall:
                chosen = nprobe
            if chosen is not None and nprobe >= chosen:
                break
        bar.update(bar.total - bar.n)
    target_met = chosen is not None and any(e["nprobe"] == chosen and e["recall"] >= spec.recall for e in table)
    if chosen is None:  # the target was not reached at any nprobe: the best measured
        chosen = int(max(table, key=lambda e: (e["recall"], -e["nprobe"]))["nprobe"])
    at = next(e for e in table if e["nprobe"] == chosen)
    return {
        "recall": at["recall"],
        "recall_k": k,
        "default_nprobe": chosen,
        "recall_target": spec.recall,
        "recall_target_met": bool(target_met),
        "recall_by_nprobe": table,
        "recall_queries": (
            f"{q} data samples {'outside' if held_out else 'drawn from (N too small to hold any out)'} the k-means "
            "sample, each searched with itself excluded (leave-one-out), against the exact search"
        ),
    }


def build_nearest_index(
    index_dir: str | Path,
    spec: IndexSpec | str,
    *,
    space: str = "data",
    progress: bool = True,
    verify: bool = False,
) -> dict[str, Any]:
    """Train an index for ``space`` of an index directory, measure its recall, store it; its manifest entry.

    Args:
        index_dir: built by :func:`floworacle_server.data.build_index` (with ``features`` for
            the features space).
        spec: an :class:`IndexSpec` or its text (``ivf``, ``ivfpq:nlist=4096,m=16``, ...).
        space: "data" or "features".
        progress: tqdm bars (k-means iterations, adding, recall).
        verify: recompute the directory's fingerprints before building on it.

    Raises:
        ValueError: bad parameters, no faiss, or no features for the features space.
    """
    if isinstance(spec, str):
        spec = parse_index_spec(spec)
    t0 = time.perf_counter()
    ds = load_index(index_dir, verify=verify, with_indexes=False)  # the exact search is the reference
    sp = search_space(ds, space)
    spec = _resolve(spec, sp.num_samples, sp.dim)
    index, facts = train_index(sp, spec, progress=progress)
    entry: dict[str, Any] = {
        "space": space,
        "kind": spec.kind,
        "params": _factory(spec),
        "nlist": spec.nlist,
        "m": spec.m,
        "nbits": spec.nbits if spec.kind == "ivfpq" else None,
        "rerank": spec.rerank,
        "metric": sp.metric,
        "fingerprint": space_fingerprint(ds, space),
        "train_rows": facts["train_rows"],
        "niter": spec.niter,
        "seed": spec.seed,
        "faiss_version": getattr(FAISS, "__version__", "?"),
        # placeholders until measured (the search needs an entry to read its rerank and nlist)
        "default_nprobe": spec.nprobe or 1,
        "recall": 0.0,
        "recall_k": spec.k,
        "bytes": 0,
    }
    nidx = NearestIndex.from_entry(entry, index)
    entry.update(measure_recall(sp, nidx, spec, facts["train_sample"], progress=progress))
    entry["build_seconds"] = {**facts["seconds"], "total": round(time.perf_counter() - t0, 3)}
    return write_nearest_index(index_dir, index, entry)
