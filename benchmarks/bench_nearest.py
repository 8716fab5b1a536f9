"""Time the screening backends of exact nearest-sample search: faiss against torch GEMM + topk.

Prints, per k, the time of the raw screen (faiss IndexFlatL2.search and faiss.knn on the whole
set; torch addmm + topk over chunks) and of the full exact ``nearest`` call with each backend,
plus the float32 GEMM bound of the machine (2 B N D flops at the measured GEMM rate).

    python benchmarks/bench_nearest.py              # N=20000 D=1024 B=256, k=10 and 1024
    python benchmarks/bench_nearest.py --n 50000 --k 1 10 100
    python benchmarks/bench_nearest.py --device cuda   # torch path only (no faiss GPU build)
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch

from floworacle_server.data import Dataset
from floworacle_server.engine._nearest import nearest


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--d", type=int, default=1_024)
    parser.add_argument("--b", type=int, default=256)
    parser.add_argument("--k", type=int, nargs="+", default=[10, 1024])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
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
