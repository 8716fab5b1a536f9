"""The patch oracles (local, equivariant local) against the bare GEMMs of the same shapes.

For B queries over N images of C x H x W and patch size P (K = C P^2):

- local: the patch distances of every (query, pixel, image) are a batched GEMM over the H W
  pixels, (H W, B, K) x (H W, K, N): **B N H W K multiply-adds**;
- equivariant local: every (query, pixel) against every (image, location), one GEMM
  (B H W, K) x (K, N H W): **B N (H W)^2 K multiply-adds**.

The oracle does that GEMM in float64 on augmented patches (K + 2 values), then per logit a
max, an exponential, a sum and a weighted sum of the C values (the streamed softmax), and
copies the data's patches into the GEMM's layout once per chunk (for the local oracle that copy
is (K + 2) / B times the logits: it dominates small batches of large patches). Each oracle call is timed
alternating with the bare float32 GEMM and the bare float64 GEMM of the same shapes (best of
``--repeat`` each, in the same run, so a shared machine's load hits them alike); the ratio
oracle / bare GEMM is what the issue's target (within 2x of the float32 GEMM) refers to.

    python benchmarks/bench_patch.py                  # digits-like and CIFAR-like shapes
    python benchmarks/bench_patch.py --repeat 7 --threads 1 --json patch.json
    python benchmarks/bench_patch.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from collections.abc import Callable

import numpy as np
import torch

from floworacle_server.data import Dataset
from floworacle_server.engine import equivariant_oracle, flush_denormals, local_oracle

#: (name, kind, N, (C, H, W), B, P, t)
CASES = [
    ("digits-like", "local", 1797, (1, 8, 8), 128, 3, 0.5),
    ("digits-like", "local", 1797, (1, 8, 8), 128, 5, 0.5),
    ("digits-like", "local", 1797, (1, 8, 8), 128, 7, 0.5),
    ("digits-like", "local", 1797, (1, 8, 8), 128, 3, 0.999),
    ("cifar-like", "local", 2000, (3, 32, 32), 16, 3, 0.5),
    ("cifar-like", "local", 2000, (3, 32, 32), 16, 5, 0.5),
    ("cifar-like", "local", 2000, (3, 32, 32), 64, 5, 0.5),
    ("digits-like", "equivariant", 1797, (1, 8, 8), 4, 3, 0.5),
    ("digits-like", "equivariant", 1797, (1, 8, 8), 4, 5, 0.5),
    ("cifar-like", "equivariant", 64, (3, 32, 32), 1, 3, 0.5),
    ("cifar-like", "equivariant", 64, (3, 32, 32), 1, 5, 0.5),
]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def alternating(fns: dict[str, Callable[[], object]], device: torch.device, repeat: int) -> dict[str, float]:
    """Best time of each function over ``repeat`` rounds that call them in turn."""
    for f in fns.values():
        f()
    best = dict.fromkeys(fns, math.inf)
    for _ in range(repeat):
        for name, f in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            f()
            _sync(device)
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def run_case(case: tuple, device: torch.device, repeat: int) -> dict:  # type: ignore[type-arg]
    name, kind, n, shape, b, p, t = case
    c, h, w = shape
    L, k = h * w, c * p * p
    rng = np.random.default_rng(0)
    x = (rng.integers(0, 17, (n, *shape)) / 8.0 - 1.0).astype(np.float32)
    ds = Dataset.from_arrays(name, x, device=str(device))
    x1 = x[rng.integers(0, n, b)].reshape(b, -1).astype(np.float64)
    xt = torch.from_numpy(t * x1 + (1 - t) * rng.standard_normal(x1.shape)).to(device)
    alpha = torch.full((b,), t, dtype=torch.float64, device=device)
    sigma = torch.full((b,), 1 - t, dtype=torch.float64, device=device)
    fn = local_oracle if kind == "local" else equivariant_oracle
    if kind == "local":
        madds = b * n * L * k
        a32, b32 = torch.randn(L, b, k, device=device), torch.randn(L, k, n, device=device)

        def gemm32() -> object:
            return torch.bmm(a32, b32)
    else:
        madds = b * n * L * L * k
        a32, b32 = torch.randn(b * L, k, device=device), torch.randn(k, n * L, device=device)

        def gemm32() -> object:
            return a32 @ b32

    a64, b64 = a32.double(), b32.double()

    def gemm64() -> object:
        return torch.bmm(a64, b64) if kind == "local" else a64 @ b64

    res: list = []  # type: ignore[type-arg]

    def run() -> object:
        res[:] = [fn(ds, xt, alpha, sigma, p)]
        return res[0]

    best = alternating({"oracle": run, "gemm32": gemm32, "gemm64": gemm64}, device, repeat)
    return {
        "case": name,
        "kind": kind,
        "N": n,
        "image": list(shape),
        "B": b,
        "P": p,
        "t": t,
        "multiply_adds": madds,
        "oracle_s": best["oracle"],
        "gemm32_s": best["gemm32"],
        "gemm64_s": best["gemm64"],
        "ratio_f32": best["oracle"] / best["gemm32"],
        "ratio_f64": best["oracle"] / best["gemm64"],
        "oracle_gmadds": madds / best["oracle"] / 1e9,
        "refined": int(res[0].refined),
        "max_bound": float(res[0].x1_hat_error_bound.max()),
    }


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), platform.machine())
    except OSError:
        return platform.machine()


def report(device: torch.device, repeat: int, only: str | None = None) -> list[dict]:
    """Time every case (or one kind's) and print the table; returns its rows (``bench_engine.py
    --kinds`` prints the same table beside the global oracle's)."""
    flush_denormals()  # as the server's engine thread runs
    print(f"{_cpu()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    head = f"{'case':12s} {'kind':11s} {'N':>5s} {'image':>8s} {'B':>3s} {'P':>2s} {'t':>5s} {'madds':>9s} "
    head += f"{'oracle ms':>10s} {'f32 GEMM':>9s} {'f64 GEMM':>9s} {'/f32':>6s} {'/f64':>6s} {'Gmadd/s':>8s} {'refined':>8s} {'bound':>8s}"
    print(head)
    rows = []
    for case in CASES:
        if only and case[1] != only:
            continue
        r = run_case(case, device, repeat)
        rows.append(r)
        print(
            f"{r['case']:12s} {r['kind']:11s} {r['N']:5d} {'x'.join(map(str, r['image'])):>8s} {r['B']:3d} {r['P']:2d} "
            f"{r['t']:5.3f} {r['multiply_adds']:9.2e} {r['oracle_s'] * 1e3:10.2f} {r['gemm32_s'] * 1e3:9.2f} "
            f"{r['gemm64_s'] * 1e3:9.2f} {r['ratio_f32']:6.2f} {r['ratio_f64']:6.2f} {r['oracle_gmadds']:8.2f} "
            f"{r['refined']:8d} {r['max_bound']:8.1e}"
        )
    print(
        "madds: B N H W C P^2 (local), B N (H W)^2 C P^2 (equivariant); /f32, /f64: oracle time over the bare GEMM of "
        "the same shapes, alternating, best of each; refined: pairs recomputed from float64 differences"
    )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--only", choices=("local", "equivariant"), help="one kind")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument(
        "--threads",
        type=int,
        help="torch threads (default torch's; 1 on a shared machine keeps other jobs' load "
        "from stalling every parallel region)",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = report(torch.device(args.device), args.repeat, args.only)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
