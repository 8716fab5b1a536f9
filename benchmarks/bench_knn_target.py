"""The served sublinear target against the exact engine: time and error on a large clustered set.

A clustered synthetic set (``bench_nearest.clustered``: 1000 rank-16 Gaussian clusters, N = 1,000,000
samples of D = 256 by default) is written as an index directory with an IVF-Flat index
(``floworacle index build --nearest-index ivf`` does the same) under a cache directory, so a
rerun loads it instead of building it again (about 4 minutes on a 2-vCPU VM). A batch of B = 256
queries ``x_t = t x1 + (1 - t) x0`` (linear path) with t stratified uniform on (0, 1)
(``t_b = (b + 1/2) / B``), x1 training samples and x0 fresh noise, is answered

- exactly by the engine (``oracle``, float64-accurate), and
- by the kNN target (``knn_oracle``: k neighbours through the IVF index plus a uniform tail of m
  samples, self-normalised) for each (k, m) asked,

alternating the two ``--repeat`` times within one run after one warm-up call of each (the machine
is shared; medians and ranges are printed). Then per t bucket: the relative error of the kNN velocity against the exact
one, ``||u_knn - u|| / ||u||`` (median and max), the same for x1_hat, the relative error the
conditional target x1 - x0 has at those queries (what a training job would use instead), and the
indicators the kNN target reports (the neighbour share; the relative standard deviation it
predicts, ``sqrt(variance) / ||x1_hat||``).

    python benchmarks/bench_knn_target.py                                  # N=1e6, D=256, B=256, k:m = 128:128 and 512:512
    python benchmarks/bench_knn_target.py --n 50000 --configs 64:64        # a quick look
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_nearest import clustered

from floworacle.paths import get_path
from floworacle_server.data import build_index, load_index, read_manifest
from floworacle_server.engine import OracleQuery, build_nearest_index, knn_oracle, oracle, posterior_nearest

_CACHE = Path(__file__).resolve().parent / ".cache"


def dataset_dir(args: argparse.Namespace) -> Path:
    """The cached index directory (built on first use: data, then the IVF index)."""
    root = Path(args.cache) / f"clustered_n{args.n}_d{args.d}_s{args.seed}"
    have = root.is_dir() and any(e.get("space") == "data" for e in read_manifest(root).get("nearest_indexes", []))
    if have:
        print(f"cached data set and index: {root}")
        return root
    t0 = time.perf_counter()
    x = clustered(args.n, args.d, args.seed)
    print(f"made the clustered set in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    build_index(x, root, progress=True)
    del x
    print(f"wrote the index directory in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    entry = build_nearest_index(root, args.index, progress=True)
    print(f"built {entry['params']} in {time.perf_counter() - t0:.1f} s (recall@{entry['recall_k']} {entry['recall']:.4f} at "
          f"nprobe {entry['default_nprobe']})")  # fmt: skip
    return root


def _median_range(ts: list[float]) -> str:
    s = sorted(ts)
    return f"{np.median(s):8.3f} s ({s[0]:.3f}-{s[-1]:.3f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--b", type=int, default=256)
    ap.add_argument("--configs", default="128:128,512:512", help="k:m pairs, comma-separated")
    ap.add_argument(
        "--nprobe", type=int, default=None, help="IVF lists probed (default: the index's, set for recall@10 0.99)"
    )
    ap.add_argument("--index", default="ivf", help="index spec for the first build (default ivf)")
    ap.add_argument("--repeat", type=int, default=3, help="alternating timed runs of each (default 3)")
    ap.add_argument("--buckets", type=int, default=8, help="t buckets of the error table")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default=str(_CACHE), help="where the built data set and index are kept")
    args = ap.parse_args()
    configs = [tuple(int(v) for v in c.split(":")) for c in args.configs.split(",")]

    root = dataset_dir(args)
    ds = load_index(root)
    info = ds.nearest_indexes["data"]
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; torch {torch.__version__} with "
          f"{torch.get_num_threads()} threads; N={ds.num_samples:,} D={ds.dim} B={args.b}; index nlist={info.nlist}, "
          f"nprobe={args.nprobe or info.default_nprobe}")  # fmt: skip

    rng = np.random.default_rng([args.seed, 1])
    b = args.b
    t = (np.arange(b) + 0.5) / b
    rows = torch.from_numpy(np.sort(rng.choice(ds.num_samples, b, replace=False)))
    x1 = ds.x[rows].to(torch.float64)
    x0 = torch.from_numpy(rng.standard_normal((b, ds.dim)))
    tt = torch.from_numpy(t)[:, None]
    xt = tt * x1 + (1 - tt) * x0
    coeffs = get_path("linear").coefficients(t)
    query = OracleQuery(x_t=xt, coeffs=coeffs, t=torch.from_numpy(t), outputs=("velocity", "x1_hat"))

    times: dict[str, list[float]] = {"exact": [], **{f"knn {k}:{m}": [] for k, m in configs}}
    search: dict[str, list[float]] = {f"knn {k}:{m}": [] for k, m in configs}
    answers: dict[str, object] = {}
    oracle(ds, query)  # warm-up: first-use costs (allocations, the exact search's calibration) stay out of the times
    for k, m in configs:
        knn_oracle(ds, query, k=k, tail=m, exact=False, nprobe=args.nprobe)
    for r in range(args.repeat):
        t0 = time.perf_counter()
        answers["exact"] = oracle(ds, query)
        times["exact"].append(time.perf_counter() - t0)
        for k, m in configs:
            name = f"knn {k}:{m}"
            t0 = time.perf_counter()
            answers[name] = knn_oracle(ds, query, k=k, tail=m, exact=False, nprobe=args.nprobe,
                                       generator=torch.Generator().manual_seed(r))  # fmt: skip
            times[name].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            posterior_nearest(ds, xt, torch.from_numpy(t), k=k, exact=False, nprobe=args.nprobe)
            search[name].append(time.perf_counter() - t0)
        print(f"run {r + 1}/{args.repeat}: " + ", ".join(f"{n} {v[-1]:.3f} s" for n, v in times.items()), flush=True)

    ex = answers["exact"]
    u = ex.velocity.numpy()  # type: ignore[attr-defined]
    x1_hat = ex.x1_hat.numpy()  # type: ignore[attr-defined]
    t_ex = float(np.median(times["exact"]))
    print()
    print(f"time per batch of {b} (median and range of {args.repeat}, alternating):")
    print(f"  exact engine        {_median_range(times['exact'])}")
    for k, m in configs:
        name = f"knn {k}:{m}"
        tk = float(np.median(times[name]))
        print(f"  kNN k={k:<5d} m={m:<5d} {_median_range(times[name])}  speed-up {t_ex / tk:6.1f}x  "
              f"(its neighbour search alone {np.median(search[name]):.3f} s)")  # fmt: skip

    u_cond = (x1 - x0).numpy()
    norm_u = np.linalg.norm(u, axis=1)
    edges = np.linspace(0.0, 1.0, args.buckets + 1)
    which = np.minimum(np.searchsorted(edges, t, side="right") - 1, args.buckets - 1)
    for k, m in configs:
        name = f"knn {k}:{m}"
        got = answers[name]
        uk = got.result.velocity.numpy()  # type: ignore[attr-defined]
        xk = got.result.x1_hat.numpy()  # type: ignore[attr-defined]
        est = got.estimate  # type: ignore[attr-defined]
        err_u = np.linalg.norm(uk - u, axis=1) / norm_u
        err_x = np.linalg.norm(xk - x1_hat, axis=1) / np.linalg.norm(x1_hat, axis=1)
        err_c = np.linalg.norm(u_cond - u, axis=1) / norm_u
        pred = np.sqrt(est.variance.numpy()) / np.linalg.norm(xk, axis=1)
        share = est.neighbour_share.numpy()
        bound = est.tail_bound.numpy()
        print()
        print(f"kNN k={k}, m={m}: error against the exact answer per t bucket ({b // args.buckets} queries each; "
              "relative L2 per query)")  # fmt: skip
        head = ("t", "u med", "u max", "x1 med", "x1 max", "cond med", "share min", "sd med", "sd max", "bound med")
        rows_out = [head]
        for j in range(args.buckets):
            s = which == j
            rows_out.append((
                f"{edges[j]:.3f}-{edges[j + 1]:.3f}",
                f"{np.median(err_u[s]):.1e}", f"{err_u[s].max():.1e}",
                f"{np.median(err_x[s]):.1e}", f"{err_x[s].max():.1e}",
                f"{np.median(err_c[s]):.1e}",
                f"{share[s].min():.4f}", f"{np.median(pred[s]):.1e}", f"{pred[s].max():.1e}",
                f"{np.median(bound[s]):.1e}",
            ))  # fmt: skip
        widths = [max(len(r[i]) for r in rows_out) for i in range(len(head))]
        for i, r in enumerate(rows_out):
            print("  " + "  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)))
            if i == 0:
                print("  " + "  ".join("-" * w for w in widths))
        # do the indicators flag the queries the estimate gets wrong?
        for level in (1e-3, 1e-6):
            bad = err_x > level
            flagged = (share < 1.0 - level) | (pred > level) | (bound > level)
            print(f"  x1 error > {level:g}: {int(bad.sum())} of {b} queries, {int((bad & flagged).sum())} of them flagged "
                  f"(share < 1 - {level:g}, sd or bound > {level:g}); flagged without such an error: "
                  f"{int((~bad & flagged).sum())}")  # fmt: skip
    print()
    print("u: ||u_knn - u|| / ||u||; x1: the same for x1_hat; cond: ||(x1 - x0) - u|| / ||u||, the conditional target; "
          "share: estimated weight on the neighbours; sd: sqrt(variance) / ||x1_hat||, the relative error the target "
          "predicts for its x1_hat; bound: tail_bound, the most weight outside the neighbours if the index found the "
          "k nearest")  # fmt: skip


if __name__ == "__main__":
    main()
