"""The time to refuse an answer too large to send, against the time to compute and send it.

    python benchmarks/refuse_oversized.py                    # 4,096 rows, 4 float64 outputs
    python benchmarks/refuse_oversized.py --rows 1024 --repeat 9

One in-process server (digits, CPU) with a message limit below the answer's size, one above it;
the same float16 request (x_t at t = 0.5, velocity + x1_hat + eps_hat + score in float64) to
each, alternated, median of ``--repeat`` calls. The server knows the answer's size from the query
(``OracleQuery.answer_bytes``) and refuses it with RESOURCE_EXHAUSTED before any engine call.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import grpc
import numpy as np

from floworacle.protocol import encode, pb, pb_grpc
from floworacle_server.data import load_digits
from floworacle_server.service.testing import serve_in_thread
from floworacle_server.settings import Settings

OUTPUTS = (pb.OUTPUT_VELOCITY, pb.OUTPUT_X1_HAT, pb.OUTPUT_EPS_HAT, pb.OUTPUT_SCORE)


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    except OSError:
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()

    x = load_digits("cpu").x.numpy().astype(np.float64)
    rng = np.random.default_rng(0)
    xt = 0.5 * x[rng.integers(0, len(x), args.rows)] + 0.5 * rng.standard_normal((args.rows, x.shape[1]))
    req = pb.OracleRequest(
        x_t=encode(xt, "float16"),
        t=encode(np.full(args.rows, 0.5)),
        outputs=list(OUTPUTS),
        output_dtype=pb.DTYPE_FLOAT64,
    )
    answer = args.rows * x.shape[1] * 8 * len(OUTPUTS)
    limits = {"refused": max(req.ByteSize() + 1024, answer // 2), "answered": 2 * answer + (1 << 20)}
    print(f"request {req.ByteSize():,} bytes, answer ~{answer:,} bytes; {_cpu()}, {os.cpu_count()} CPUs")
    times: dict[str, list[float]] = {k: [] for k in limits}
    servers = {
        k: serve_in_thread(Settings(device="cpu", metrics_port=-1, max_message_bytes=v)) for k, v in limits.items()
    }
    try:
        running = {k: s.__enter__() for k, s in servers.items()}
        opts = [("grpc.max_receive_message_length", limits["answered"])]
        channels = {k: grpc.insecure_channel(r.address, options=opts) for k, r in running.items()}
        stubs = {k: pb_grpc.FlowOracleStub(ch) for k, ch in channels.items()}
        for i in range(args.repeat + 1):  # the first round warms both up
            for k in limits if i % 2 == 0 else reversed(list(limits)):
                t0 = time.perf_counter()
                try:
                    stubs[k].Oracle(req, timeout=120)
                    got = "OK"
                except grpc.RpcError as exc:
                    got = exc.code().name
                want = "RESOURCE_EXHAUSTED" if k == "refused" else "OK"
                assert got == want, f"{k}: {got}"
                if i:
                    times[k].append((time.perf_counter() - t0) * 1e3)
        for ch in channels.values():
            ch.close()
    finally:
        for s in servers.values():
            s.__exit__(None, None, None)
    refused, answered = (statistics.median(times[k]) for k in ("refused", "answered"))
    print(
        f"refused in {refused:.1f} ms (limit {limits['refused']:,}); computed and sent in {answered:.1f} ms "
        f"(limit {limits['answered']:,}): the refusal takes {refused / answered:.3f} of the answer's time"
    )


if __name__ == "__main__":
    main()
