"""End-to-end benchmark of the SDK and the service on loopback, with its baselines in the same run.

    python benchmarks/bench_e2e.py            # N = 2,000 random samples, D = 3,072, B = 256
    python benchmarks/bench_e2e.py --in-process   # part 1 with the servers on threads of this process

1. One client, B = 256 queries of D = 3,072, float32 and bfloat16 on the wire, against a
   `floworacle serve` process and, interleaved call by call, a bare grpcio echo server process
   (generic handler, raw bytes, the same message sizes both ways, the same server and client
   channel options): the topology of a deployment, where client and server are processes of
   their own. Transport = the call's time minus the engine's time for the same batch (measured in
   this process on a worker thread, as the server runs it, before and after the calls): SDK
   encode/decode, gRPC, protobuf, the servicer's validation, the batcher, merging the rows and
   encoding the answer. Overhead = transport / echo - 1 (targets: float32 <= 40 %, bfloat16
   <= 80 %). The same against a one-sample data set (compute ~ 0) as a check. With
   ``--in-process`` the servers run on threads of the client's process instead, the engine's time
   then read inside the server for each call (the earlier sessions' setup; its echo is faster
   than a separate process's, its transport not).
2. 16 concurrent clients of B = 4 each, with the dynamic batcher (default settings) and without
   it (max_batch_rows = 4: one request per engine call). Target: batching >= 3x the throughput.
3. What a hand-made zero-copy framing could save at most: both messages of the call from part 1
   built, serialized, parsed and read with protobuf's own code (the path the SDK and the server
   use), beside the least any framing must do (one copy of each payload into the outgoing bytes,
   none on receipt), as a share of the end-to-end call. Custom framing is kept only where this
   share is >= 10 % (it was removed when it was below).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from typing import Any

import grpc
import numpy as np
import torch

from floworacle import AsyncOracleClient, OracleClient, tune_allocator
from floworacle.paths import get_path
from floworacle.protocol import decode, fill, pb, server_options
from floworacle_server.data import Dataset, DatasetStore
from floworacle_server.engine import OracleQuery, oracle
from floworacle_server.service.testing import serve_in_thread
from floworacle_server.settings import Settings

ECHO_METHOD = "/bench.Echo/Echo"


@contextmanager
def echo_server(response: bytes) -> Iterator[str]:
    """A bare grpc.aio server on 127.0.0.1 that answers every request on ECHO_METHOD with
    ``response`` (raw bytes, no protobuf), on its own event loop thread."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop = asyncio.Event()
    box: dict[str, Any] = {}

    async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return response

    async def main() -> None:
        server = grpc.aio.server(options=server_options())
        handler = grpc.method_handlers_generic_handler(
            "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(handle)}
        )
        server.add_generic_rpc_handlers((handler,))
        box["port"] = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        ready.set()
        await stop.wait()
        await server.stop(0)

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    ready.wait(30)
    try:
        yield f"127.0.0.1:{box['port']}"
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()


def timed(fn: Callable[[], Any], reps: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def _process(argv: list[str], port: int, timeout: float = 120.0, pythonpath: str | None = None) -> Iterator[None]:
    """A server process listening on 127.0.0.1:port (waited for), stopped at the end; ``pythonpath``
    runs another checkout's code in it (an A/B against an earlier build)."""
    env = dict(os.environ, PYTHONPATH=pythonpath) if pythonpath else None
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + timeout
    try:
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}")
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.2)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def echo_main(port: int, size: int) -> None:
    """``--echo-server PORT SIZE``: a bare grpc.aio server answering ECHO_METHOD with SIZE bytes."""

    async def main() -> None:
        server = grpc.aio.server(options=server_options())
        response = b"\1" * size

        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return response

        handler = grpc.method_handlers_generic_handler(
            "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(handle)}
        )
        server.add_generic_rpc_handlers((handler,))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


def _engine_ms(ds: Dataset, x_t: np.ndarray, t: np.ndarray, reps: int) -> float:
    """Median ms of the engine on the batch, on a worker thread set up as the server's."""
    from floworacle_server.service._server import engine_thread_setup

    query = OracleQuery(
        x_t=torch.from_numpy(x_t), coeffs=get_path("linear").coefficients(t), t=t, outputs=("velocity",)
    )
    with ThreadPoolExecutor(1, initializer=engine_thread_setup) as pool:
        return 1e3 * med(pool.submit(timed, lambda: oracle(ds, query), reps).result())


def single_client_processes(args: argparse.Namespace, data: np.ndarray, ds: Dataset) -> list[dict[str, float]]:
    """Part 1 against server processes (see the module docstring)."""
    rng = np.random.default_rng(1)
    b, d = args.batch, args.dim
    t = np.full(b, 0.5)
    x_t = (0.5 * ds_rows(ds, rng, b) + 0.5 * rng.standard_normal((b, d))).astype(np.float32)
    tiny = Dataset.from_arrays("tiny", data[:1])
    engine_before = (_engine_ms(ds, x_t, t, args.reps), _engine_ms(tiny, x_t, t, args.reps))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        np.save(f"{tmp}/bench.npy", data)
        np.save(f"{tmp}/tiny.npy", data[:1])
        port = _free_port()
        serve = [sys.executable, "-m", "floworacle_server.cli", "serve", "--data", f"bench={tmp}/bench.npy",
                 "--data", f"tiny={tmp}/tiny.npy", "--device", "cpu", "--port", str(port), "--metrics-port", "-1",
                 "--host", "127.0.0.1"]  # fmt: skip
        with _process(serve, port, pythonpath=args.server_pythonpath):
            for wire in ("float32", "bfloat16"):
                with OracleClient(f"127.0.0.1:{port}", wire_dtype=wire, timeout=120) as client:
                    plan = client._plan_oracle(x_t, t, {"dataset": "bench"}, outputs=("velocity",))
                    req_raw = plan.requests[0].SerializeToString()
                    resp_raw = client._unary("Oracle", plan.requests[0], None, None).SerializeToString()
                    echo_port = _free_port()
                    echo = [sys.executable, __file__, "--echo-server", str(echo_port), str(len(resp_raw))]
                    with (
                        _process(echo, echo_port),
                        grpc.insecure_channel(f"127.0.0.1:{echo_port}", options=list(client._config.options)) as ch,
                    ):
                        call = ch.unary_unary(ECHO_METHOD)
                        steps: list[tuple[str, Callable[[], Any]]] = [
                            ("e2e", partial(client.velocity, x_t, t, dataset="bench")),
                            ("echo", partial(call, req_raw, timeout=60)),
                            ("tiny", partial(client.velocity, x_t, t, dataset="tiny")),
                        ]
                        runs: dict[str, list[float]] = {name: [] for name, _ in steps}
                        for rep in range(args.reps + 3):  # interleaved: outside load hits all alike
                            for name, fn in steps:
                                start = time.perf_counter()
                                fn()
                                if rep >= 3:
                                    runs[name].append(time.perf_counter() - start)
                rows.append({"wire": wire, "req_raw": req_raw, "resp_raw": resp_raw,
                             **{k: 1e3 * med(v) for k, v in runs.items()}})  # fmt: skip
    engine_after = (_engine_ms(ds, x_t, t, args.reps), _engine_ms(tiny, x_t, t, args.reps))
    engine, engine_tiny = ((a + b_) / 2 for a, b_ in zip(engine_before, engine_after, strict=True))
    for r in rows:
        r["engine_ms"], r["tiny_engine_ms"] = engine, engine_tiny
        r["transport_ms"] = r["e2e"] - engine
        r["tiny_transport_ms"] = r["tiny"] - engine_tiny
        r["overhead"] = r["transport_ms"] / r["echo"] - 1.0
        r["tiny_overhead"] = r["tiny_transport_ms"] / r["echo"] - 1.0
        r["engine_spread"] = (engine_before[0], engine_after[0])
    return rows


def single_client(args: argparse.Namespace, store: DatasetStore, ds: Dataset) -> list[dict[str, float]]:
    rng = np.random.default_rng(1)
    b, d = args.batch, args.dim
    t = np.full(b, 0.5)
    x_t = (0.5 * ds_rows(ds, rng, b) + 0.5 * rng.standard_normal((b, d))).astype(np.float32)
    coeffs = get_path("linear").coefficients(t)
    query = OracleQuery(x_t=torch.from_numpy(x_t), coeffs=coeffs, t=torch.from_numpy(t), outputs=("velocity",))
    # The server runs the engine on a worker thread; time it the same way (on this CPU an engine
    # call on the main thread was measured ~10x slower than on a worker thread on a busy 2-core CPU).
    with ThreadPoolExecutor(1) as pool:
        engine = pool.submit(timed, lambda: oracle(ds, query), args.reps).result()
    rows = []
    # The batcher may wait up to max_queue_delay_ms (default 2 ms) for company; a lone caller's
    # key stops waiting after one wait in vain. The last row sets the delay to 0 as a check.
    for wire, delay in (("float32", None), ("bfloat16", None), ("float32", 0.0)):
        settings = Settings(device="cpu", metrics_port=-1)
        if delay is not None:
            settings = Settings(device="cpu", metrics_port=-1, max_queue_delay_ms=delay)
        with serve_in_thread(settings, store) as srv:
            with OracleClient(srv.address, wire_dtype=wire, timeout=120) as client:
                # message sizes of this call, for the echo
                plan = client._plan_oracle(x_t, t, {}, outputs=("velocity",))
                req_raw = plan.requests[0].SerializeToString()
                answer = client._unary("Oracle", plan.requests[0], None, None)
                resp_raw = answer.SerializeToString()
                req_bytes, resp_bytes = len(req_raw), len(resp_raw)

                def sdk_side(client: OracleClient = client, resp_raw: bytes = resp_raw) -> None:
                    # what the SDK does per call besides waiting: encode, serialize, parse, decode
                    pl = client._plan_oracle(x_t, t, {}, outputs=("velocity",))
                    pl.requests[0].SerializeToString()
                    pl.finish([pb.OracleResponse.FromString(resp_raw)])

                sdk = timed(sdk_side, args.reps)
                runner = srv.server._servicer._oracle_runner  # type: ignore[union-attr]
                with (
                    echo_server(b"\1" * resp_bytes) as addr,
                    # the SDK's own channel options (message limits, keepalive, balancing)
                    grpc.insecure_channel(addr, options=list(client._config.options)) as ch,
                ):
                    call = ch.unary_unary(ECHO_METHOD)
                    payload = b"\2" * req_bytes
                    runs: dict[str, list[float]] = {
                        k: [] for k in ("e2e", "runner", "engine", "echo", "tiny", "tiny_runner", "tiny_engine")
                    }
                    steps: list[tuple[str, Callable[[], Any]]] = [
                        ("e2e", partial(client.velocity, x_t, t)),
                        ("echo", partial(call, payload, timeout=60)),
                        # the same bytes against a one-sample data set: compute ~ 0
                        ("tiny", partial(client.velocity, x_t, t, dataset="tiny")),
                    ]
                    # interleaved, so that load from elsewhere on the machine hits all alike
                    for rep in range(args.reps + 2):
                        for name, fn in steps:
                            start = time.perf_counter()
                            fn()
                            took = time.perf_counter() - start
                            if rep >= 2:
                                runs[name].append(took)
                                if name != "echo":
                                    pre = "" if name == "e2e" else "tiny_"
                                    runs[pre + "runner"].append(srv.server.batcher.history[-1].seconds)
                                    runs[pre + "engine"].append(runner.last_engine_seconds)
            # transport: everything but the server's engine call, per call (merging the rows and
            # encoding the response happen in the runner but are ours, so they count as transport)
            per_call = [e - c for e, c in zip(runs["e2e"], runs["engine"], strict=True)]
            transport = med(per_call)
            tiny = med(runs["tiny"])
            echo = med(runs["echo"])
            mb = (req_bytes + resp_bytes) / 1e6
            rows.append(
                {
                    "wire": wire if delay is None else f"{wire}, delay 0",
                    "e2e_ms": 1e3 * med(runs["e2e"]),
                    "engine_ms": 1e3 * med(runs["engine"]),
                    "inproc_ms": 1e3 * med(engine),
                    "runner_ms": 1e3 * med(runs["runner"]),
                    "transport_ms": 1e3 * transport,
                    "echo_ms": 1e3 * echo,
                    "tiny_e2e_ms": 1e3 * tiny,
                    "tiny_runner_ms": 1e3 * med(runs["tiny_runner"]),
                    "tiny_engine_ms": 1e3 * med(runs["tiny_engine"]),
                    "sdk_ms": 1e3 * med(sdk),
                    "mb": mb,
                    "req_raw": req_raw,
                    "resp_raw": resp_raw,
                    "transport_mbps": mb / transport,
                    "echo_mbps": mb / echo,
                    "overhead": transport / echo - 1.0,
                    "tiny_overhead": tiny / echo - 1.0,
                }
            )
    return rows


def codec_costs(req_raw: bytes, resp_raw: bytes, reps: int) -> dict[str, float]:
    """Seconds per call of protobuf's own work on both messages (build + serialize on the sending
    side, parse + read the tensors on the receiving side) and of the least a zero-copy framing
    must do (one copy of each payload into its outgoing bytes; views on receipt)."""
    req = pb.OracleRequest.FromString(req_raw)
    resp = pb.OracleResponse.FromString(resp_raw)
    x = decode(req.x_t, "x_t")
    v = decode(resp.velocity, "velocity")

    def plain() -> None:
        out = pb.OracleRequest(dataset=req.dataset, outputs=req.outputs, t=req.t, path=req.path)
        fill(out.x_t, x)  # the SDK's encoding of x_t
        sent = out.SerializeToString()
        got = pb.OracleRequest.FromString(sent)  # the server's parse and read
        decode(got.x_t, "x_t")
        back = pb.OracleResponse(dataset=resp.dataset, fingerprint=resp.fingerprint)
        fill(back.velocity, v)  # the server's answer
        fill(back.x1_hat_error_bound, decode(resp.x1_hat_error_bound))
        fill(back.velocity_error_bound, decode(resp.velocity_error_bound))
        decode(pb.OracleResponse.FromString(back.SerializeToString()).velocity, "velocity")  # the SDK's read

    def zero_copy() -> None:
        b"".join((b"header", memoryview(x).cast("B")))
        memoryview(req_raw)[-x.nbytes :]
        b"".join((b"header", memoryview(v).cast("B")))
        memoryview(resp_raw)[-v.nbytes :]

    return {"plain": med(timed(plain, reps)), "zero_copy": med(timed(zero_copy, reps))}


def ds_rows(ds: Dataset, rng: np.random.Generator, b: int) -> np.ndarray:
    idx = torch.from_numpy(rng.integers(0, ds.num_samples, size=b))
    return ds.x[idx].to(torch.float32).cpu().numpy()


async def _concurrent(
    address: str, x: np.ndarray, clients: int, calls: int, counter: Callable[[], int]
) -> tuple[float, int]:
    cs = [AsyncOracleClient(address, timeout=120) for _ in range(clients)]
    try:

        async def one(c: AsyncOracleClient) -> None:
            for _ in range(calls):
                await c.velocity(x, 0.5)

        await asyncio.gather(*(c.velocity(x, 0.5) for c in cs))  # connect, warm up
        calls0 = counter()
        start = time.perf_counter()
        await asyncio.gather(*(one(c) for c in cs))
        return time.perf_counter() - start, counter() - calls0
    finally:
        await asyncio.gather(*(c.close() for c in cs))


def concurrent(args: argparse.Namespace, store: DatasetStore) -> list[dict[str, float]]:
    x = np.random.default_rng(2).standard_normal((args.client_batch, args.dim)).astype(np.float32)
    rows = []
    for label, settings in (
        ("batched (default)", Settings(device="cpu", metrics_port=-1)),
        ("unbatched (max_batch_rows=B)", Settings(device="cpu", metrics_port=-1, max_batch_rows=args.client_batch)),
    ):
        with serve_in_thread(settings, store) as srv:
            counter = lambda srv=srv: srv.server.batcher.engine_calls  # noqa: E731
            secs, engine_calls = asyncio.run(_concurrent(srv.address, x, args.clients, args.calls, counter))
            n = args.clients * args.calls
            rows.append(
                {
                    "label": label,
                    "seconds": secs,
                    "queries_per_s": n * args.client_batch / secs,
                    "requests": n,
                    "engine_calls": engine_calls,
                }
            )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2000, help="data set size N (random float32 data)")
    p.add_argument("--dim", type=int, default=3072, help="dimension D")
    p.add_argument("--batch", type=int, default=256, help="queries per call in part 1")
    p.add_argument("--reps", type=int, default=15, help="timed calls per measurement (median reported)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--client-batch", type=int, default=4)
    p.add_argument("--calls", type=int, default=15, help="calls per client in part 2")
    p.add_argument("--in-process", action="store_true", help="part 1 with the servers on threads of this process")
    p.add_argument(
        "--server-pythonpath",
        help="part 1: run the server from another checkout (e.g. OLD/client:OLD/server) for an A/B against it",
    )
    p.add_argument("--echo-server", nargs=2, type=int, metavar=("PORT", "SIZE"), help=argparse.SUPPRESS)
    p.add_argument(
        "--no-tune-allocator",
        action="store_true",
        help="keep glibc's default malloc thresholds (floworacle serve pins them; see floworacle.tune_allocator)",
    )
    args = p.parse_args()
    if args.echo_server:
        echo_main(*args.echo_server)
        return
    # Server and client share this process; `floworacle serve` pins the thresholds at start-up
    # and a training job may call floworacle.tune_allocator() too.
    tuned = False if args.no_tune_allocator else tune_allocator()

    torch.manual_seed(0)
    x = np.random.default_rng(0).standard_normal((args.n, args.dim)).astype(np.float32)
    ds = Dataset.from_arrays("bench", x)
    store = DatasetStore([ds, Dataset.from_arrays("tiny", x[:1])])
    print(
        f"data: N = {args.n}, D = {args.dim} float32 (CPU, torch threads = {torch.get_num_threads()}); "
        f"allocator thresholds pinned (client and server): {'yes' if tuned else 'no'}"
    )

    if not args.in_process:
        print(f"\n1) one client, B = {args.batch}, velocity only, exact mode, servers in processes of their own "
              f"(medians of {args.reps} interleaved calls)")  # fmt: skip
        print(f"  {'wire':>9} {'e2e ms':>8} {'engine':>8} {'transp.':>8} {'echo ms':>8} {'MB/call':>8} {'overhead':>9}"
              f" {'1-sample e2e':>13} {'its transp.':>12} {'overhead':>9}")  # fmt: skip
        rows1 = single_client_processes(args, x, ds)
        for r in rows1:
            mb = (len(r["req_raw"]) + len(r["resp_raw"])) / 1e6
            print(f"  {r['wire']:>9} {r['e2e']:8.2f} {r['engine_ms']:8.2f} {r['transport_ms']:8.2f} {r['echo']:8.2f} "
                  f"{mb:8.2f} {100 * r['overhead']:8.0f}% {r['tiny']:13.2f} {r['tiny_transport_ms']:12.2f} "
                  f"{100 * r['tiny_overhead']:8.0f}%")  # fmt: skip
            r["e2e_ms"], r["tiny_e2e_ms"] = r["e2e"], r["tiny"]
        lo, hi = rows1[0]["engine_spread"]
        print(f"  engine: the same batch in this process, {lo:.1f} ms before and {hi:.1f} ms after the calls (mean "
              f"used); 1-sample data set: engine {rows1[0]['tiny_engine_ms']:.2f} ms")  # fmt: skip
        print(
            "  transport = e2e - engine; overhead = transport / echo - 1 (targets: float32 <= 40 %, bfloat16 <= 80 %)"
        )
    else:
        print(f"\n1) one client, B = {args.batch}, velocity only, exact mode, servers on threads of this process "
              f"(medians of {args.reps} calls)")  # fmt: skip
        print(
            f"  {'wire':>16} {'e2e ms':>8} {'engine':>8} {'runner':>8} {'transp.':>8} {'echo ms':>8} {'MB/call':>8}"
            f" {'ours MB/s':>10} {'echo MB/s':>10} {'overhead':>9}"
        )
        rows1 = single_client(args, store, ds)
        for r in rows1:
            print(
                f"  {r['wire']:>16} {r['e2e_ms']:8.1f} {r['engine_ms']:8.1f} {r['runner_ms']:8.1f} {r['transport_ms']:8.2f} "
                f"{r['echo_ms']:8.2f} {r['mb']:8.2f} {r['transport_mbps']:10.0f} {r['echo_mbps']:10.0f} {100 * r['overhead']:8.0f}%"
            )
        print("  engine: the server's engine call for this request, timed in the server; runner: the same plus merging")
        print("  the rows and encoding the response; transport = e2e - engine, per call (SDK encode/decode, gRPC,")
        print("  servicer, validation, batcher, runner conversions); overhead = transport / echo - 1")
        for r in rows1:
            rest = r["transport_ms"] - r["sdk_ms"] - r["echo_ms"]
            print(
                f"  {r['wire']}: transport {r['transport_ms']:.2f} ms = bare gRPC (echo) {r['echo_ms']:.2f} + SDK encode/decode "
                f"{r['sdk_ms']:.2f} ({100 * r['sdk_ms'] / r['echo_ms']:.0f}% of echo) + server side {rest:.2f} (servicer, "
                f"validation, batcher; runner conversions {r['runner_ms'] - r['engine_ms']:.2f}); engine in-process on the "
                f"float32 batch {r['inproc_ms']:.1f} ms; 1-sample data set: e2e {r['tiny_e2e_ms']:.1f} ms, "
                f"engine {r['tiny_engine_ms']:.1f} ms"
            )

    print("\n3) protobuf's own copies vs the least a zero-copy framing must do, per call (both messages)")
    for r in rows1:
        c = codec_costs(r["req_raw"], r["resp_raw"], args.reps)
        saved = c["plain"] - c["zero_copy"]
        print(
            f"  {r['wire']:>16}: protobuf {1e3 * c['plain']:.2f} ms, zero-copy floor {1e3 * c['zero_copy']:.2f} ms: "
            f"a custom framing could save at most {1e3 * saved:.2f} ms = {100 * saved / (r['e2e_ms'] / 1e3):.1f} % "
            f"of the e2e call ({100 * saved / (r['tiny_e2e_ms'] / 1e3):.1f} % against a 1-sample data set); "
            "kept only at >= 10 %"
        )

    print(f"\n2) {args.clients} concurrent clients of B = {args.client_batch}, {args.calls} calls each")
    rows = concurrent(args, store)
    for r in rows:
        print(
            f"  {r['label']:>30}: {r['queries_per_s']:8.0f} queries/s, {r['requests']} requests in {r['engine_calls']} engine calls"
        )
    print(f"  batching speed-up: {rows[0]['queries_per_s'] / rows[1]['queries_per_s']:.1f}x (target >= 3x)")


if __name__ == "__main__":
    main()
