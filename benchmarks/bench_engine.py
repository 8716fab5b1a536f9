"""Engine speed as a ratio to this machine's own GEMM roofline, beside a plain dense implementation.

For B queries over N samples of dimension D a dense oracle does two GEMMs (4 B N D flops). The
roofline time is the measured time of exactly those two float32 GEMMs on this machine, in this
run, alternating with each timed call (a shared machine's load then hits both alike); a ratio
of 1.0 means "as fast as the two bare GEMMs". The exact engine screens with one
GEMM and recomputes only the candidates in float64, so in the refinement stage it can beat the
dense roofline; in the navigation stage (all samples within reach) it runs two float64 GEMMs, so
the float64 GEMM pair of the same run is printed beside the roofline: it is that stage's floor.

Flush-to-zero (``floworacle_server.engine.flush_denormals``, as the server's engine thread runs)
is on for every engine timing; the dense float32 baseline is timed with it off and on (exp() of
very negative float32 logits makes denormals, which many CPUs handle slowly). The per-call fixed
cost is timed on a one-sample data set at B = 256, D = 3,072 (float32 queries, as the service
passes them).

    python benchmarks/bench_engine.py                 # N=20,000, D=1,024 and the CIFAR-size case
    python benchmarks/bench_engine.py --case small --repeat 5
    python benchmarks/bench_engine.py --device cuda   # on a GPU (adds bf16 / TF32 GEMM pairs)
    python benchmarks/bench_engine.py --kinds --case none   # the local / equivariant oracles only

``--kinds`` adds the patch oracles' table (``bench_patch.py``): each against the bare float32 and
float64 GEMMs of its own shapes, alternated in the same run.

Peak extra memory (CPU) is the rise of the process's resident high-water mark during the call
(reset through /proc/self/clear_refs), measured in a child process whose glibc mmap threshold is
pinned so freed blocks are returned, as a share of the data set's size.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

from floworacle import tune_allocator
from floworacle.paths import get_path
from floworacle_server.data import Dataset
from floworacle_server.engine import OracleQuery, flush_denormals, oracle

CASES = {"small": (20_000, 1_024), "cifar": (50_000, 3_072), "imagenet": (1_281_167, 4_096)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    fn()  # warm-up
    _sync(device)
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def paired_ratio(
    fn: Callable[[], object], roof: Callable[[], object], device: torch.device, repeat: int
) -> tuple[float, float]:
    """(best time of ``fn``, best roofline / best ``fn``) from runs alternating with the roofline's
    GEMMs, so that a load that comes and goes on a shared machine hits both alike."""
    fn()
    best_f = best_r = math.inf
    for _ in range(repeat):
        for which, f in (("r", roof), ("f", fn)):
            _sync(device)
            t0 = time.perf_counter()
            f()
            _sync(device)
            dt = time.perf_counter() - t0
            if which == "r":
                best_r = min(best_r, dt)
            else:
                best_f = min(best_f, dt)
    return best_f, best_r / best_f


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def peak_extra_bytes(fn: Callable[[], object]) -> int | None:
    """Rise of the resident high-water mark during fn() (CPU only; None where not supported)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so the rise is real use
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    before = _rss_kb("VmRSS")
    fn()
    return max(0, _rss_kb("VmHWM") - before) * 1024


def dense_baseline(x: torch.Tensor, sq: torch.Tensor, xt: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor):
    """The plain implementation: one B x N float32 logit matrix, softmax, one matmul."""
    c = (alpha / sigma**2)[:, None]
    logits = c * (xt @ x.T) - (alpha**2 / (2 * sigma**2))[:, None] * sq[None, :]
    return torch.softmax(logits, dim=1) @ x


def regimes(b: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "uniform[0,1)": rng.uniform(0.0, 0.999, b),
        "0.05 (nav)": np.full(b, 0.05),
        "0.3": np.full(b, 0.3),
        "0.9 (refine)": np.full(b, 0.9),
    }


def memory_in_child(n: int, d: int, b: int, regime: str, mode: str, dtype: str, screen: str) -> int | None:
    """Peak extra bytes of one call, measured in a fresh process whose glibc mmap threshold is
    pinned (freed blocks go back to the OS, so the high-water mark counts live memory; pinning it
    in the timed process would slow every allocation down)."""
    spec = json.dumps(dict(n=n, d=d, b=b, regime=regime, mode=mode, dtype=dtype, screen=screen))
    out = subprocess.run([sys.executable, __file__, "--memory-child", spec], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    value = json.loads(out.stdout.strip().splitlines()[-1])
    return None if value is None else int(value)


def _memory_child(spec: dict) -> None:
    ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    flush_denormals()
    torch.manual_seed(0)
    ds = Dataset.from_arrays("bench", torch.randn(spec["n"], spec["d"]), dtype=spec["dtype"], fingerprint="sha256:b")
    rng = np.random.default_rng(0)
    xt, coeffs = make_queries(ds, regimes(spec["b"], rng)[spec["regime"]], rng)
    if spec["mode"] == "dense":
        x, sq = ds.x.float(), ds.sq_norms.float()
        alpha = torch.from_numpy(coeffs.alpha).float()
        sigma = torch.from_numpy(coeffs.sigma).float()
        xt32 = xt.float()

        def fn() -> object:
            return dense_baseline(x, sq, xt32, alpha, sigma)
    else:
        q = OracleQuery(x_t=xt, coeffs=coeffs, precision=spec["mode"])

        def fn() -> object:
            return oracle(ds, q, screen=spec["screen"])

    fn()  # warm-up
    print(json.dumps(peak_extra_bytes(fn)))


def make_queries(ds: Dataset, t: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, object]:
    c = get_path("linear").coefficients(t)
    idx = torch.from_numpy(rng.integers(0, ds.num_samples, len(t)))
    x1 = ds.x[idx.to(ds.device)].to(torch.float64)
    x0 = torch.randn(x1.shape, dtype=torch.float64, device=ds.device)
    a = torch.from_numpy(c.alpha).to(ds.device)[:, None]
    s = torch.from_numpy(c.sigma).to(ds.device)[:, None]
    return (a * x1 + s * x0), c


def run_case(
    n: int, d: int, b: int, device: torch.device, repeat: int, rng: np.random.Generator, dtype: str, screen: str
) -> dict[str, float]:
    """Print one case's table; returns the exact mode's ratios by regime."""
    torch.manual_seed(0)
    x = torch.randn(n, d, device=device)
    ds = Dataset.from_arrays("bench", x, device=device, dtype=dtype, fingerprint="sha256:bench")
    if dtype != "float32":
        x = ds.x.float()
    data_bytes = ds.x.numel() * ds.x.element_size()
    q32 = torch.randn(b, d, device=device)
    p32 = torch.rand(b, n, device=device)
    t_g1 = best_time(lambda: q32 @ x.T, device, repeat)
    t_g2 = best_time(lambda: p32 @ x, device, repeat)
    roof = t_g1 + t_g2
    rate = 4 * b * n * d / roof / 1e9
    print(f"\n== N={n:,} D={d:,} B={b} on {device}: float32 GEMM roofline {roof * 1e3:.1f} ms ({rate:.0f} GFLOP/s)")
    if device.type == "cuda":
        for name, dt in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            xa, qa, pa = x.to(dt), q32.to(dt), p32.to(dt)
            tr = best_time(lambda xa=xa, qa=qa, pa=pa: (qa @ xa.T, pa @ xa), device, repeat)
            print(f"   {name} GEMM pair {tr * 1e3:.2f} ms ({4 * b * n * d / tr / 1e12:.0f} TFLOP/s)")
        torch.backends.cuda.matmul.allow_tf32 = True
        tr = best_time(lambda: (q32 @ x.T, p32 @ x), device, repeat)
        torch.backends.cuda.matmul.allow_tf32 = False
        print(f"   tf32 GEMM pair {tr * 1e3:.2f} ms ({4 * b * n * d / tr / 1e12:.0f} TFLOP/s)")

    def roof_fn() -> object:
        return q32 @ x.T, p32 @ x

    t_f64, floor = _float64_pair(x, q32, p32, roof_fn, device, repeat)
    print(f"   float64 GEMM pair {t_f64 * 1e3:.1f} ms (roofline / float64 pair = {floor:.2f}: the navigation floor)")
    print(f"{'t':>14} {'mode':>12} {'ms':>9} {'ratio':>7} {'f64 pairs/BN':>13} {'extra mem':>10}")
    ratios: dict[str, float] = {}
    for label, t in regimes(b, rng).items():
        xt, coeffs = make_queries(ds, t, rng)
        alpha = torch.from_numpy(coeffs.alpha).to(device)
        sigma = torch.from_numpy(coeffs.sigma).to(device)
        xt32 = xt.float()
        for ftz in (False, True):
            flush_denormals(ftz)
            base, base_ratio = paired_ratio(
                lambda xt32=xt32, alpha=alpha, sigma=sigma: dense_baseline(
                    x, ds.sq_norms.float(), xt32, alpha.float(), sigma.float()
                ),
                roof_fn,
                device,
                repeat,
            )
            mem = memory_in_child(n, d, b, label, "dense", dtype, screen) if device.type == "cpu" and ftz else None
            mode = f"dense {'ftz' if ftz else 'noftz'}"
            mem_s = _fmt_mem(mem, data_bytes) if ftz else "-"
            print(f"{label:>14} {mode:>12} {base * 1e3:9.1f} {base_ratio:7.2f} {'-':>13} {mem_s:>10}")
        for prec in ("exact", "fast"):
            q = OracleQuery(x_t=xt, coeffs=coeffs, precision=prec)
            res = oracle(ds, q, screen=screen)
            te, ratio = paired_ratio(lambda q=q: oracle(ds, q, screen=screen), roof_fn, device, repeat)
            mem = memory_in_child(n, d, b, label, prec, dtype, screen) if device.type == "cpu" else None
            frac = res.refined / (b * n)
            if prec == "exact":
                ratios[label] = ratio
            print(f"{label:>14} {prec:>12} {te * 1e3:9.1f} {ratio:7.2f} {frac:13.4f} {_fmt_mem(mem, data_bytes):>10}")
    print(
        "   exact / roofline: "
        + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items())
        + f" (flush-to-zero on; navigation floor = float64 pair {floor:.2f})"
    )
    return ratios


def _float64_pair(
    x: torch.Tensor, q: torch.Tensor, p: torch.Tensor, roof: Callable[[], object], device: torch.device, repeat: int
) -> tuple[float, float]:
    """Time of the same two GEMMs in float64 and the roofline's ratio to it (the navigation
    stage's floor); the float64 copies live only here."""
    x64, q64, p64 = x.double(), q.double(), p.double()
    return paired_ratio(lambda: (q64 @ x64.T, p64 @ x64), roof, device, repeat)


def fixed_cost(device: torch.device, repeat: int, b: int = 256, d: int = 3072) -> None:
    """Engine time of a batch over a one-sample data set: the per-call cost without the GEMMs."""
    rng = np.random.default_rng(1)
    ds = Dataset.from_arrays("one", rng.standard_normal((1, d)).astype(np.float32), device=device)
    t = rng.uniform(0.05, 0.95, b)
    c = get_path("linear").coefficients(t)
    xt = torch.from_numpy(rng.standard_normal((b, d))).to(device)
    for name, x in (("float32", xt.float()), ("float64", xt)):
        q = OracleQuery(x_t=x, coeffs=c)
        tm = best_time(lambda q=q: oracle(ds, q), device, max(repeat, 10))
        print(f"   fixed cost (N = 1, B = {b}, D = {d:,}, {name} queries, velocity): {tm * 1e3:.2f} ms")


def _fmt_mem(mem: int | None, data_bytes: int) -> str:
    return "-" if mem is None else f"{100 * mem / data_bytes:.1f}%"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=[*CASES, "all", "none"], default="all", help="all = small and cifar")
    ap.add_argument("--kinds", action="store_true", help="also time the local and equivariant oracles")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dtype", default="float32", help="storage dtype: float32, float16, bfloat16")
    ap.add_argument("--screen", default="float32", help="screening GEMM precision: float32, bfloat16, float16")
    ap.add_argument(
        "--no-tune-allocator",
        action="store_true",
        help="time with glibc's default malloc thresholds (floworacle serve pins them at start-up)",
    )
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        _memory_child(json.loads(args.memory_child))
        return
    # Timed as the server runs the engine: `floworacle serve` pins the allocator's thresholds
    # (floworacle.tune_allocator); the memory is measured in children with their own settings.
    # Flush-to-zero as the server's engine thread turns it on (first thing in the thread).
    ftz = flush_denormals()
    tuned = False if args.no_tune_allocator else tune_allocator()
    device = torch.device(args.device)
    rng = np.random.default_rng(0)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, allocator thresholds pinned: {tuned}, "
        f"flush-to-zero verified on all threads: {ftz.verified}"
    )
    for name, (n, d) in CASES.items():
        if args.case == name or (args.case == "all" and name != "imagenet"):
            run_case(n, d, args.batch, device, args.repeat, rng, args.dtype, args.screen)
    flush_denormals()
    if args.case != "none":
        fixed_cost(device, args.repeat)
    if args.kinds:
        from bench_patch import report  # this folder is on sys.path when the script runs

        report(device, args.repeat)


if __name__ == "__main__":
    main()
