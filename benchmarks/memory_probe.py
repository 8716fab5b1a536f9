"""What hostile callers can make a server hold: resident memory of a `floworacle serve` subprocess
under (a) concurrent health checks carrying a huge service name or unknown-field padding, and
(b) oracle streams that send as fast as flow control lets them and never read an answer.

    python benchmarks/memory_probe.py health --checks 4 --mib 200                  # tokens on: the gRPC port
    python benchmarks/memory_probe.py health --checks 4 --mib 200 --padding        # unknown field 99
    python benchmarks/memory_probe.py health --checks 4 --mib 200 -- --health-port 0   # the open health port
    python benchmarks/memory_probe.py streams --connections 1 --streams 20
    python benchmarks/memory_probe.py streams --connections 8 --streams 20         # 160 streams

The huge checks carry no token (the small ones before and after do). Each run starts its own
server (digits, CPU, tokens on for the health load), warms it, measures its idle RSS, resets the peak
(``/proc/PID/clear_refs``), applies the load, and prints the peak RSS above idle during the load
and the RSS above idle 10 s after the load ended (streams cancelled, checks answered). Figures are
MiB of the server process only; the clients run in this process.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from floworacle.protocol import encode, pb, pb_grpc


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def reset_peak(pid: int) -> None:
    """Start VmHWM afresh from the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


@contextmanager
def server(extra: list[str]) -> Iterator[tuple[int, int]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWORACLE_")}
    cmd = [sys.executable, "-m", "floworacle_server.cli", "serve", "--port", "0", "--metrics-port", "-1",
           "--host", "127.0.0.1", *extra]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        assert proc.stdout is not None
        port = health_port = None
        for line in proc.stdout:
            if m := re.search(r"open health checks on 127\.0\.0\.1:(\d+)", line):
                health_port = int(m.group(1))
            if m := re.search(r"serving on 127\.0\.0\.1:(\d+)", line):
                port = int(m.group(1))
                break
        if port is None:
            raise RuntimeError("the server did not start")
        threading.Thread(target=lambda: [None for _ in proc.stdout or ()], daemon=True).start()  # drain its log
        yield proc.pid, port if health_port is None else health_port
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def settle(pid: int, seconds: float = 2.0) -> float:
    time.sleep(seconds)
    return rss_mib(pid)


def health_load(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tokens = Path(tmp, "tokens")
        tokens.write_text("secret-token\n")
        extra = ["--auth-tokens-file", str(tokens), *args.server_args]
        with server(extra) as (pid, port):
            size = args.mib << 20
            if args.padding:
                # field 99, length-delimited: unknown to HealthCheckRequest, kept by the parser
                body = bytes([0x9A, 0x06]) + _varint(size) + b"\0" * size
                payload = health_pb2.HealthCheckRequest(service="").SerializeToString() + body
            else:
                payload = health_pb2.HealthCheckRequest(service="x" * size).SerializeToString()
            opts = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", 1 << 20)]
            with grpc.insecure_channel(f"127.0.0.1:{port}", options=opts) as ch:
                check = ch.unary_unary("/grpc.health.v1.Health/Check")  # raw bytes in, raw bytes out
                token = (("authorization", "Bearer secret-token"),)  # the small checks are authenticated
                health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=10, metadata=token
                )
                idle = settle(pid)
                reset_peak(pid)
                outcomes: list[str] = []
                t0 = time.perf_counter()

                def one() -> None:
                    try:
                        check(payload, timeout=120)
                        outcomes.append("OK")
                    except grpc.RpcError as e:
                        outcomes.append(f"{e.code().name}: {(e.details() or '')[:90]}")

                threads = [threading.Thread(target=one) for _ in range(args.checks)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                took = time.perf_counter() - t0
                peak = rss_mib(pid, "VmHWM") - idle
                after = settle(pid, 10.0) - idle
                ok = health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=10, metadata=token
                )
        print(f"health: {args.checks} x {args.mib} MiB ({'unknown-field padding' if args.padding else 'service name'})")
        print(f"  outcomes: {sorted(set(outcomes))} in {took:.2f} s; a small check after: {ok.status}")
        print(f"  server RSS: idle {idle:.0f} MiB, peak +{peak:.0f} MiB, 10 s after +{after:.0f} MiB")


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def streams_load(args: argparse.Namespace) -> None:
    with server(args.server_args) as (pid, port):
        x = np.random.default_rng(0).standard_normal((args.rows, 64)).astype(np.float32)
        req = pb.OracleRequest(x_t=encode(x), t=encode(np.full(args.rows, 0.5)))
        channels = [
            # a distinct option per channel: one TCP connection each (no shared subchannel)
            grpc.insecure_channel(
                f"127.0.0.1:{port}",
                options=[("grpc.max_receive_message_length", 1 << 30), ("floworacle.probe.connection", i)],
            )  # fmt: skip
            for i in range(args.connections)
        ]
        try:
            stub = pb_grpc.FlowOracleStub(channels[0])
            assert len(list(stub.OracleStream(iter([req] * 8), timeout=60))) == 8
            idle = settle(pid)
            reset_peak(pid)
            stop = threading.Event()
            sent = [0] * (args.connections * args.streams)

            def send(i: int) -> Iterator[pb.OracleRequest]:
                while not stop.is_set():
                    sent[i] += 1
                    yield req

            calls = [
                pb_grpc.FlowOracleStub(ch).OracleStream(send(c * args.streams + s))
                for c, ch in enumerate(channels)
                for s in range(args.streams)
            ]
            samples = []
            t0 = time.monotonic()
            while time.monotonic() - t0 < args.seconds:
                time.sleep(0.5)
                samples.append(rss_mib(pid) - idle)
            peak = rss_mib(pid, "VmHWM") - idle
            stop.set()
            for c in calls:
                c.cancel()
            after = settle(pid, 10.0) - idle
        finally:
            for ch in channels:
                ch.close()
    n = len(sent)
    print(
        f"streams: {args.connections} connection(s) x {args.streams} never-reading streams = {n}, {args.seconds:.0f} s"
    )
    print(f"  messages pushed per stream: min {min(sent)}, median {int(np.median(sent))}, max {max(sent)} "
          f"({req.ByteSize()} bytes each)")  # fmt: skip
    print(f"  server RSS: idle {idle:.0f} MiB, peak +{peak:.0f} MiB (last sample +{samples[-1]:.0f}), "
          f"10 s after cancelling +{after:.0f} MiB")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="load", required=True)
    h = sub.add_parser("health", help="concurrent health checks with a huge message")
    h.add_argument("--checks", type=int, default=4)
    h.add_argument("--mib", type=int, default=200)
    h.add_argument("--padding", action="store_true", help="an unknown field instead of a long service name")
    s = sub.add_parser("streams", help="oracle streams that never read an answer")
    s.add_argument("--connections", type=int, default=1)
    s.add_argument("--streams", type=int, default=20, help="per connection")
    s.add_argument("--seconds", type=float, default=10.0)
    s.add_argument("--rows", type=int, default=512, help="rows per message (D = 64: 512 rows are 132 KiB)")
    for q in (h, s):
        q.add_argument("server_args", nargs="*", help="extra `floworacle serve` flags (after --)")
    args = p.parse_args(argv)
    (health_load if args.load == "health" else streams_load)(args)


if __name__ == "__main__":
    main()
