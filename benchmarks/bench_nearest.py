"""Time nearest-sample search: the exact screening backends (faiss against torch GEMM + topk), and
faiss indexes (IVF-Flat, IVF-PQ) with exact re-ranking against the exact search.

Backends (default section): per k, the raw screen (faiss IndexFlatL2.search and faiss.knn on the
whole set; torch addmm + topk over chunks) and the full exact ``nearest`` call with each backend,
plus the float32 GEMM bound of the machine (2 B N D flops at the measured GEMM rate).

Index section (``--index``): a clustered synthetic set (see :func:`clustered`), exact ``nearest``
with each backend, then IVF-Flat and IVF-PQ built by the server's own code (k-means on a sample)
and searched through ``nearest(..., nprobe=p)`` at several nprobe: recall@k against the exact
answer on held-out queries, time per batch (median and range over repeats) and its ratio to the
faster exact search, build time and index memory.

    python benchmarks/bench_nearest.py              # N=20000 D=1024 B=256, k=10 and 1024
    python benchmarks/bench_nearest.py --n 50000 --k 1 10 100
    python benchmarks/bench_nearest.py --device cuda   # torch path only (no faiss GPU build)
    python benchmarks/bench_nearest.py --index --n 1000000 --d 128 --b 1000 --nlist 4096
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch

from floworacle_server.data import Dataset
from floworacle_server.data._nearest_index import NearestIndex
from floworacle_server.engine import nearest
from floworacle_server.engine._index_build import IndexSpec, _factory, _resolve, train_index
from floworacle_server.engine._space import search_space


def _time(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    """Best wall time of ``repeat`` runs after one warm-up, in seconds."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best


def _times(fn: Callable[[], object], repeat: int) -> list[float]:
    """Wall times (s) of ``repeat`` runs after one warm-up."""
    fn()
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def clustered(n: int, d: int, seed: int, clusters: int = 1000, rank: int = 16) -> np.ndarray:
    """(n, d) float32 samples of a mixture of ``clusters`` low-rank Gaussians.

    Cluster j has a centre c_j ~ N(0, I_d), a random (d, rank) basis A_j with N(0, 1 / d) entries
    scaled by s_j log-uniform in [0.5, 2], and a weight from a Dirichlet(1) draw; a sample is
    ``c_j + s_j A_j z + 0.05 e``, z ~ N(0, I_rank), e ~ N(0, I_d). Held-out queries are fresh
    draws of the same mixture (``seed`` fixes the mixture; queries use the same mixture).
    """
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    bases = (rng.standard_normal((clusters, d, rank)) / np.sqrt(d)).astype(np.float32)
    scales = np.exp(rng.uniform(np.log(0.5), np.log(2.0), clusters)).astype(np.float32)
    weights = rng.dirichlet(np.ones(clusters))
    return _draw(centres, bases, scales, weights, n, np.random.default_rng(seed + 1))


def _draw(centres: np.ndarray, bases: np.ndarray, scales: np.ndarray, weights: np.ndarray, n: int,
          rng: np.random.Generator) -> np.ndarray:  # fmt: skip
    d, rank = bases.shape[1], bases.shape[2]
    out = np.empty((n, d), dtype=np.float32)
    step = 65536
    for s in range(0, n, step):
        m = min(step, n - s)
        j = rng.choice(centres.shape[0], size=m, p=weights)
        z = rng.standard_normal((m, rank)).astype(np.float32)
        sub = max(1, (64 << 20) // (4 * d * rank))  # the gathered (rows, d, rank) bases stay ~64 MB
        for a in range(0, m, sub):
            jj = j[a : a + sub]
            out[s + a : s + a + jj.size] = centres[jj] + scales[jj, None] * np.einsum(
                "mdr,mr->md", bases[jj], z[a : a + sub]
            )
        out[s : s + m] += 0.05 * rng.standard_normal((m, d)).astype(np.float32)
    return out


def _index_bytes(index: object) -> int:
    """Memory of an IVF index: codes and ids in the inverted lists, plus the centroids."""
    import faiss

    ivf = faiss.extract_index_ivf(index)
    lists = ivf.invlists
    ntotal = sum(lists.list_size(i) for i in range(ivf.nlist))
    return int(ntotal * (ivf.code_size + 8) + ivf.nlist * ivf.d * 4)


def _fmt_times(ts: list[float]) -> str:
    ms = sorted(t * 1e3 for t in ts)
    return f"{float(np.median(ms)):9.1f} ms ({ms[0]:.1f}-{ms[-1]:.1f})"


def index_section(args: argparse.Namespace) -> None:
    """Exact search against IVF-Flat / IVF-PQ at several nprobe on a clustered synthetic set."""
    import faiss

    k, b = args.k[0], args.b
    t0 = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    centres_seed = args.seed
    x = clustered(args.n, args.d, centres_seed)
    # held-out queries: the same mixture, other draws
    mix = np.random.default_rng(centres_seed)
    centres = mix.standard_normal((1000, args.d)).astype(np.float32)
    bases = (mix.standard_normal((1000, args.d, 16)) / np.sqrt(args.d)).astype(np.float32)
    scales = np.exp(mix.uniform(np.log(0.5), np.log(2.0), 1000)).astype(np.float32)
    weights = mix.dirichlet(np.ones(1000))
    q = torch.from_numpy(_draw(centres, bases, scales, weights, b, rng)).to(torch.float64)
    ds = Dataset.from_arrays("bench", x)
    print(
        f"clustered synthetic set N={args.n:,} D={args.d} (1000 rank-16 clusters), B={b} held-out queries, k={k}; "
        f"made in {time.perf_counter() - t0:.1f} s; torch {torch.get_num_threads()} threads, faiss "
        f"{faiss.__version__} {faiss.omp_get_max_threads()} threads"
    )
    exact = {}
    for be in ("torch", "faiss"):
        ts = _times(lambda be=be: nearest(ds, q, k, exact=True, backend=be), args.repeat)
        exact[be] = ts
        print(f"exact, {be:5s} screen {_fmt_times(ts)}  (recall 1 by construction: certified)")
    truth = nearest(ds, q, k, exact=True)
    kth = truth.distances[:, k - 1]
    base_name = min(exact, key=lambda n: float(np.median(exact[n])))
    base = float(np.median(exact[base_name]))
    print(f"speed-ups below are against the faster exact search ({base_name}, {base * 1e3:.1f} ms)")
    sp = search_space(ds, "data")
    for kind in args.kinds:
        spec = _resolve(
            IndexSpec(
                kind,
                nlist=args.nlist,
                m=args.m if kind == "ivfpq" else None,
                train=args.train,
                niter=args.niter,
                seed=args.seed,
            ),  # fmt: skip
            args.n,
            args.d,
        )
        tb = time.perf_counter()
        index, facts = train_index(sp, spec, progress=not args.no_progress)
        build = time.perf_counter() - tb
        entry = {"space": "data", "kind": kind, "params": _factory(spec), "nlist": spec.nlist, "default_nprobe": 1,
                 "rerank": spec.rerank, "recall": 0.0, "recall_k": k, "bytes": _index_bytes(index)}  # fmt: skip
        ds.nearest_indexes["data"] = NearestIndex.from_entry(entry, index)
        sec = facts["seconds"]
        print(
            f"\n{_factory(spec)} (rerank {spec.rerank}, k-means on {spec.train:,} samples, {spec.niter} iterations): "
            f"build {build:.1f} s (k-means {sec['kmeans']:.1f}, PQ {sec['pq_train']:.1f}, add {sec['add']:.1f}); "
            f"index memory {entry['bytes'] / 2**20:.1f} MiB (data {x.nbytes / 2**20:.1f} MiB)"
        )
        print(f"{'nprobe':>6}  {'recall@' + str(k):>9}  {'time per batch':>27}  {'speed-up':>8}")
        for nprobe in args.nprobe:
            if nprobe > spec.nlist:
                continue
            res = nearest(ds, q, k, nprobe=nprobe)
            recall = float((res.distances <= kth[:, None]).sum(dim=1).double().mean()) / k
            ts = _times(lambda nprobe=nprobe: nearest(ds, q, k, nprobe=nprobe), args.repeat)
            print(f"{nprobe:6d}  {recall:9.4f}  {_fmt_times(ts):>27}  {base / float(np.median(ts)):7.1f}x")
        del ds.nearest_indexes["data"], index


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--d", type=int, default=1_024)
    parser.add_argument("--b", type=int, default=256)
    parser.add_argument("--k", type=int, nargs="+", default=[10, 1024])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--index", action="store_true", help="the index section (clustered synthetic data)")
    parser.add_argument(
        "--kinds", nargs="*", default=["ivf", "ivfpq"], help="index section: index kinds (none: exact only)"
    )
    parser.add_argument("--nlist", type=int, help="index section: inverted lists (default ~4 sqrt(N))")
    parser.add_argument("--m", type=int, help="index section: PQ sub-quantisers (default from D)")
    parser.add_argument("--train", type=int, help="index section: k-means sample (default 64 nlist)")
    parser.add_argument("--niter", type=int, default=20, help="index section: k-means iterations")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    if args.index:
        index_section(args)
        return
    dev = torch.device(args.device)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.n, args.d), dtype=np.float32)
    q = rng.standard_normal((args.b, args.d), dtype=np.float32)
    ds = Dataset.from_arrays("bench", x, device=dev)
    qt = torch.from_numpy(q).to(dev)

    gemm = _time(lambda: qt @ ds.x.t(), dev, args.repeat)
    flops = 2.0 * args.b * args.n * args.d
    print(
        f"N={args.n} D={args.d} B={args.b} device={dev} torch_threads={torch.get_num_threads()}\n"
        f"float32 GEMM (B x N scores): {gemm * 1e3:.1f} ms = {flops / gemm / 1e9:.0f} GFLOP/s (the bound)"
    )
    faiss_mod = None
    if dev.type == "cpu":
        try:
            import faiss as faiss_mod

            index = faiss_mod.IndexFlatL2(args.d)
            index.add(x)
            print(f"faiss {faiss_mod.__version__}, {faiss_mod.omp_get_max_threads()} OpenMP threads")
        except ImportError:
            print("faiss not installed: torch only")
    for k in args.k:
        chunk = max(4096, (64 << 20) // (4 * args.b))

        def torch_screen(k: int = k, chunk: int = chunk) -> None:
            best_v = torch.empty(args.b, 0, device=dev)
            best_i = torch.empty(args.b, 0, dtype=torch.int64, device=dev)
            for s in range(0, args.n, chunk):
                sc = torch.addmm(ds.sq_norms[s : s + chunk].float()[None], qt, ds.x[s : s + chunk].t(), alpha=-2.0)
                v = torch.cat([best_v, sc], 1)
                i = torch.cat([best_i, torch.arange(s, s + sc.shape[1], device=dev).expand(args.b, -1)], 1)
                best_v, p = torch.topk(v, min(k, v.shape[1]), dim=1, largest=False)
                best_i = torch.gather(i, 1, p)

        t_torch = _time(torch_screen, dev, args.repeat)
        line = f"k={k:5d}  screen: torch {t_torch * 1e3:8.1f} ms"
        if faiss_mod is not None:
            t_flat = _time(lambda k=k: index.search(q, k), dev, args.repeat)
            t_knn = _time(lambda k=k: faiss_mod.knn(q, x, k), dev, args.repeat)
            line += f" | faiss IndexFlatL2 {t_flat * 1e3:8.1f} ms, faiss.knn {t_knn * 1e3:8.1f} ms"
            line += f" | faiss/torch {t_flat / t_torch:5.2f}"
        print(line)
        t_exact_torch = _time(lambda k=k: nearest(ds, qt, k, backend="torch"), dev, args.repeat)
        line = f"         exact nearest(): torch {t_exact_torch * 1e3:8.1f} ms"
        if faiss_mod is not None:
            t_exact_faiss = _time(lambda k=k: nearest(ds, qt, k, backend="faiss"), dev, args.repeat)
            line += f" | faiss {t_exact_faiss * 1e3:8.1f} ms | faiss/torch {t_exact_faiss / t_exact_torch:5.2f}"
        line += f" | torch/GEMM bound {t_exact_torch / gemm:5.2f}"
        print(line)


if __name__ == "__main__":
    main()
