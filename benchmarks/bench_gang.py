"""A gang's speed-up over one process: the same batches over the same data set, answered by one
process and by W gloo ranks on the CPU that each hold 1/W of it (the path ``torchrun ...
floworacle serve`` runs: rank 0 broadcasts each batch, every rank computes its shard, collectives
merge the partials; ``Gang.oracle`` and the other ranks' ``serve_commands`` loop).

Printed per t mix: the time per batch of one process at T threads, of one process at W x T
threads (the same cores as the gang), and of the gang at T threads per rank; the speed-up of the
gang over one process at T threads (target >= 1.7x for W = 2 on two cores), the machine's own
ceiling for it (W float32 GEMM pairs over 1/W of the rows each, run at once, against one over all
of them: what W cores that share caches and memory bandwidth give), and the share of the
gang's time that rank 0 spends in collectives (the broadcast of the batch, the agreement round,
the merge; waiting there for a slower shard included), with the number of collectives per batch.
Every gang answer is checked against the single process's (within the reported bounds). Rank 0
times the three alternately, batch by batch (the median of ``--repeat``), so that a load that
comes and goes on a shared machine hits them alike.

    .venv/bin/python benchmarks/bench_gang.py                     # N=40,000, D=1,024, B=256, W=2
    .venv/bin/python benchmarks/bench_gang.py --world 2 --n 100000 --repeat 5

Still, run it on a quiet machine: one rank descheduled stalls the whole gang.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.multiprocessing as mp

from floworacle.paths import get_path
from floworacle_server.data import Dataset, DatasetStore, ShardSpec, make_shard
from floworacle_server.engine import OracleQuery, flush_denormals, oracle

MIXES = {"uniform": None, "t=0.05": 0.05, "t=0.5": 0.5, "t=0.9": 0.9}


def _data(n: int, d: int, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    k = 64
    centers = rng.standard_normal((k, d)).astype(np.float32)
    labels = rng.integers(0, k, n)
    x = centers[labels] + 0.5 * rng.standard_normal((n, d), dtype=np.float32)
    return Dataset.from_arrays("bench", x.astype(np.float32), labels % 10)


def _query(ds: Dataset, b: int, mix: float | None, seed: int) -> OracleQuery:
    rng = np.random.default_rng(seed)
    t = rng.uniform(0.0, 1.0, b) if mix is None else np.full(b, mix)
    rows = torch.from_numpy(rng.integers(0, ds.num_samples, b))
    x1 = ds.x[rows].double().numpy()
    xt = t[:, None] * x1 + (1 - t[:, None]) * rng.standard_normal(x1.shape)
    return OracleQuery(
        x_t=torch.from_numpy(xt.astype(np.float32)),
        coeffs=get_path("linear").coefficients(t),
        t=torch.from_numpy(t),
        outputs=("velocity",),
    )


def _gemm_pair(x: torch.Tensor, q: torch.Tensor) -> float:
    """Seconds of the two float32 GEMMs of a dense oracle over rows ``x`` (the roofline)."""
    t0 = time.perf_counter()
    logits = q @ x.T
    _ = logits @ x
    return time.perf_counter() - t0


class _Clock:
    """Seconds and calls inside the gang's collectives (every one goes through ``Gang._guard``)."""

    def __init__(self, gang: Any) -> None:
        self.s, self.calls = 0.0, 0
        inner = gang._guard

        def guard(fn: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return inner(fn)
            finally:
                self.s += time.perf_counter() - t0
                self.calls += 1

        gang._guard = guard


def _rank(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    """Every rank: join, build the whole set and cut its shard; the GEMM ceiling (rank 0 alone
    over every row, then every rank at once over its shard); then rank 0 alternates one process
    (the whole set, at T and at W x T threads, while the others wait) with the gang, batch by
    batch, so that a load that comes and goes hits all three alike."""
    from floworacle_server.service._gang import Gang, GangSpec

    try:
        torch.set_num_threads(args.threads)
        flush_denormals()
        gang = Gang(GangSpec(rank, world, rank, "127.0.0.1", port, 600.0, "gloo"), torch.device("cpu"))
        gang.join()
        barrier = torch.distributed.barrier
        full = _data(args.n, args.dim, args.seed)
        shard = make_shard(full, ShardSpec(rank, world))
        queries = [_query(full, args.batch, mix, args.seed + i) for i, mix in enumerate(MIXES.values())]
        g = torch.randn(args.batch, args.dim)
        alone, together = [], []
        for _ in range(args.repeat + 1):  # the first of each is a warm-up
            barrier()
            if rank == 0:
                alone.append(_gemm_pair(full.x, g))
            barrier()
            together.append(_gemm_pair(shard.x, g))
        if rank:
            del full
            gang.serve_commands(DatasetStore([shard]), None, "float32")
            gang.leave()
            return
        clock = _Clock(gang)
        res: dict[str, Any] = {
            "gemm_alone": float(np.median(alone[1:])),
            "gemm_together": float(np.median(together[1:])),
        }
        with torch.no_grad():
            for name, q in zip(MIXES, queries, strict=True):
                one, same, gang_s, coll, calls = [], [], [], [], []
                for _ in range(args.repeat + 1):
                    t0 = time.perf_counter()
                    ref = oracle(full, q)
                    one.append(time.perf_counter() - t0)
                    torch.set_num_threads(args.threads * world)
                    t0 = time.perf_counter()
                    oracle(full, q)
                    same.append(time.perf_counter() - t0)
                    torch.set_num_threads(args.threads)
                    clock.s, clock.calls = 0.0, 0
                    t0 = time.perf_counter()
                    got = gang.oracle(shard, q, None, "float32")
                    gang_s.append(time.perf_counter() - t0)
                    coll.append(clock.s)
                    calls.append(clock.calls)
                med = lambda v: float(np.median(v[1:]))  # noqa: E731
                gap = (got.velocity - ref.velocity).abs().amax(dim=1)
                slack = got.velocity_error_bound + ref.velocity_error_bound + 1e-12 * ref.velocity.abs().max()
                res[name] = {
                    "one_s": med(one),
                    "same_s": med(same),
                    "gang_s": med(gang_s),
                    "collective_s": med(coll),
                    "collectives": calls[-1],
                    "agrees": bool((gap <= slack).all()),
                }
        gang.stop_workers()
        torch.save(res, out)
        gang.leave()
    except Exception:
        Path(f"{out}.{rank}.err").write_text(traceback.format_exc())
        raise


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=40_000)
    ap.add_argument("--dim", type=int, default=1_024)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="threads per process (per rank)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(
        f"N={args.n:,} D={args.dim:,} B={args.batch} W={args.world}, {args.threads} thread(s) per rank; "
        f"{os.cpu_count()} CPUs ({cpu}); torch {torch.__version__}",
        file=sys.stderr,
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "gang.pt")
        mp.spawn(_rank, args=(args.world, _free_port(), args, out), nprocs=args.world, join=True)
        res = torch.load(out, weights_only=False)

    rows = []
    for name in MIXES:
        r = res[name]
        rows.append(
            {
                "mix": name,
                "one_ms": 1e3 * r["one_s"],
                "one_same_cores_ms": 1e3 * r["same_s"],
                "gang_ms": 1e3 * r["gang_s"],
                "speedup": r["one_s"] / r["gang_s"],
                "speedup_same_cores": r["same_s"] / r["gang_s"],
                "collective_share": r["collective_s"] / r["gang_s"],
                "collectives": r["collectives"],
                "agrees": r["agrees"],
            }
        )
    ceiling = res["gemm_alone"] / res["gemm_together"]  # W concurrent GEMM pairs over 1/W of the rows each
    if args.json:
        print(json.dumps({"rows": rows, "gemm_ceiling": ceiling}, indent=1))
        return
    t = args.threads
    print(
        f"| t | 1 process, {t} thr (ms) | 1 process, {t * args.world} thr (ms) | gang {args.world} x {t} thr (ms) "
        f"| speed-up | vs same cores | collectives (share, calls) | agrees |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['mix']} | {r['one_ms']:.1f} | {r['one_same_cores_ms']:.1f} | {r['gang_ms']:.1f} | "
            f"**{r['speedup']:.2f}x** | {r['speedup_same_cores']:.2f}x | {100 * r['collective_share']:.0f} %, "
            f"{r['collectives']} | {'yes' if r['agrees'] else 'NO'} |"
        )
    geo = math.exp(np.mean([math.log(r["speedup"]) for r in rows]))
    print(
        f"\ngeometric mean speed-up over one process at {t} thread(s): {geo:.2f}x (target >= 1.7x for W = 2)\n"
        f"the machine's own ceiling: {args.world} concurrent float32 GEMM pairs over 1/{args.world} of the rows "
        f"each run {ceiling:.2f}x faster than one over all of them ({1e3 * res['gemm_alone']:.0f} -> "
        f"{1e3 * res['gemm_together']:.0f} ms); the gang reaches {geo / ceiling:.2f} of that"
    )


if __name__ == "__main__":
    main()
