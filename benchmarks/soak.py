"""Bounded load and soak test: many concurrent SDK clients against one server on loopback, every
answer checked against a float64 numpy reference written here (independent of the engine).

    python benchmarks/soak.py --requests 2000 --clients 32          # server in a subprocess
    python benchmarks/soak.py --requests 200 --clients 16 --in-process

The server (``floworacle serve`` in a subprocess by default, or ``serve_in_thread`` in this process)
holds a random labelled data set (N x D float32, C classes) and runs with a deliberately small queue
and in-flight row cap, so that some requests are refused with RESOURCE_EXHAUSTED (the only allowed
error; the SDK retries those a few times, a stream does not). Each client thread draws a mix of
unary oracle queries (random t, labels with unconditional rows, guidance with an interval, wire
dtypes float32 / float64 / float16 / bfloat16), oracle streams, nearest and posterior-nearest
queries. It stops after ``--requests`` or ``--time-limit`` seconds, whichever comes first, and
reports requests, errors by code, wrong answers, p50/p99 latency and the server process's resident
memory before and after (after a warm-up). Exit status 1 on any wrong answer, unintended error,
an unclean server shutdown or the time limit.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from floworacle import OracleClient, OracleError, RetryPolicy

# Relative error allowed against the float64 reference (max |got - ref| / max |ref|), by the dtype
# the answer travelled in: the engine is float64-accurate, so this is the output rounding.
TOLERANCE = {"float64": 1e-6, "float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}
WIRE_DTYPES = ("float32", "float64", "float16", "bfloat16")


# -- reference (float64 numpy, written for this script) ------------------------------------------


def to_bfloat16(a: np.ndarray) -> np.ndarray:
    """Round float32 values to bfloat16 (round to nearest even) and widen back to float32."""
    bits = np.ascontiguousarray(a, np.float32).view(np.uint32).astype(np.uint64)
    sixteen = np.uint64(16)
    rounded = ((bits + np.uint64(0x7FFF) + ((bits >> sixteen) & np.uint64(1))) >> sixteen) << sixteen
    return rounded.astype(np.uint32).view(np.float32)


def as_sent(x: np.ndarray, wire: str) -> np.ndarray:
    """The float64 values the server receives for ``x`` sent as ``wire``."""
    if wire == "bfloat16":
        return to_bfloat16(x.astype(np.float32)).astype(np.float64)
    return x.astype(wire).astype(np.float64)


def ref_velocity(
    X: np.ndarray,
    Y: np.ndarray,
    xt: np.ndarray,
    t: np.ndarray,
    labels: np.ndarray | None,
    guidance: float | None,
    interval: tuple[float, float],
) -> np.ndarray:
    """Linear path (alpha = t, sigma = 1 - t): x1_hat = sum_i softmax_i(-|x_t - t x_i|^2 / (2 sigma^2)) x_i
    over all samples, or over the query's class when its label is >= 0; v = (x1_hat - x_t) / sigma.
    Guided: v + w (v(x | y) - v(x)) for t in the interval, v(x | y) outside it. Shapes: X (N, D),
    xt (B, D), t (B,), labels (B,)."""
    d2 = ((xt[:, None, :] - t[:, None, None] * X[None]) ** 2).sum(-1)
    logits = -d2 / (2.0 * (1.0 - t[:, None]) ** 2)

    def velocity(mask: np.ndarray | None) -> np.ndarray:
        lg = logits if mask is None else np.where(mask, logits, -np.inf)
        w = np.exp(lg - lg.max(axis=1, keepdims=True))
        w /= w.sum(axis=1, keepdims=True)
        return (w @ X - xt) / (1.0 - t[:, None])

    if labels is None:
        return velocity(None)
    cls = labels[:, None] == Y[None, :]
    conditional = velocity(np.where(labels[:, None] >= 0, cls, True))
    if guidance is None:
        return conditional
    u = velocity(None)
    inside = (t >= interval[0]) & (t <= interval[1])
    return np.where(inside[:, None], u + guidance * (conditional - u), conditional)


def max_rel(got: Any, ref: np.ndarray) -> float:
    g = np.asarray(got, np.float64)
    if g.shape != ref.shape or not np.isfinite(g).all():
        return float("inf")
    return float(np.max(np.abs(g - ref)) / max(float(np.max(np.abs(ref))), 1e-300))


# -- the load ------------------------------------------------------------------------------------


@dataclass
class Report:
    mode: str = ""
    requests: int = 0
    answers_checked: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    unintended: int = 0
    wrong: int = 0
    worst: float = 0.0  # largest error / tolerance over the answers (<= 1 is right)
    examples: list[str] = field(default_factory=list)
    server_refusals: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    seconds: float = 0.0
    rss_before_mb: float = 0.0
    rss_after_mb: float = 0.0
    timed_out: bool = False
    clean_shutdown: bool = True

    @property
    def ok(self) -> bool:
        return self.wrong == 0 and self.unintended == 0 and not self.timed_out and self.clean_shutdown


class Load:
    """Builds request ``i`` (deterministically from the seed), sends it and checks the answer."""

    def __init__(self, X: np.ndarray, Y: np.ndarray, classes: int, seed: int) -> None:
        self.X, self.Y, self.classes, self.seed = X.astype(np.float64), Y, classes, seed
        self.X32 = X

    def queries(self, rng: np.random.Generator, b: int) -> tuple[np.ndarray, np.ndarray]:
        t = rng.uniform(0.02, 0.97, b)
        x1 = self.X[rng.integers(0, len(self.X), b)]
        return t[:, None] * x1 + (1 - t[:, None]) * rng.standard_normal(x1.shape), t

    def kind(self, i: int) -> str:
        r = np.random.default_rng([self.seed, i]).random()
        return "oracle" if r < 0.45 else "stream" if r < 0.7 else "nearest" if r < 0.9 else "posterior_nearest"

    def run(self, client: OracleClient, i: int, checks: list[tuple[float, str]]) -> None:
        """Send request ``i`` and append (error / tolerance, what) per answer to ``checks``; a
        refusal raises its OracleError (a stream's answers before it are kept)."""
        kind = self.kind(i)
        rng = np.random.default_rng([self.seed, i])
        rng.random()  # the draw that chose the kind
        if kind == "oracle":
            checks.append(self.oracle(client, rng))
        elif kind == "stream":
            self.stream(client, rng, checks)
        else:
            checks.append(self.nearest(client, rng, posterior=kind == "posterior_nearest"))

    def _labels(self, rng: np.random.Generator, b: int, guided: bool) -> np.ndarray | None:
        if not guided and rng.random() < 0.4:
            return None
        labels = rng.integers(0, self.classes, b)
        if not guided:
            labels[rng.random(b) < 0.3] = -1  # unconditional rows inside a labelled batch
        return labels

    def oracle(self, client: OracleClient, rng: np.random.Generator) -> tuple[float, str]:
        b = int(rng.integers(1, 9))
        xt, t = self.queries(rng, b)
        wire = WIRE_DTYPES[int(rng.integers(0, 4))]
        guided = rng.random() < 0.25
        labels = self._labels(rng, b, guided)
        w = float(rng.uniform(0.5, 3.0)) if guided else None
        lo = float(rng.uniform(0.0, 0.5))
        interval = (lo, float(rng.uniform(lo, 1.0)))
        x_in = xt.astype(np.float32) if wire == "bfloat16" else xt.astype(wire)
        got = client.velocity(
            x_in, t, labels=labels, guidance=w, guidance_interval=interval if guided else None,
            wire_dtype="bfloat16" if wire == "bfloat16" else None,
        )  # fmt: skip
        ref = ref_velocity(self.X, self.Y, as_sent(xt, wire), t, labels, w, interval)
        return max_rel(got, ref) / TOLERANCE[wire], f"oracle {wire} b={b} labels={labels is not None} w={w}"

    def stream(self, client: OracleClient, rng: np.random.Generator, out: list[tuple[float, str]]) -> None:
        items, refs = [], []
        for _ in range(int(rng.integers(2, 5))):
            b = int(rng.integers(1, 6))
            xt, t = self.queries(rng, b)
            labels = self._labels(rng, b, False)
            x32 = xt.astype(np.float32)
            items.append((x32, t) if labels is None else (x32, t, labels))
            refs.append(ref_velocity(self.X, self.Y, x32.astype(np.float64), t, labels, None, (0.0, 1.0)))
        refused: OracleError | None = None
        for got, ref in zip(client.velocity_stream(items, return_errors=True), refs, strict=True):
            if isinstance(got, OracleError):
                refused = refused or got  # streams are not retried: a refused item is an error
            else:
                out.append((max_rel(got, ref) / TOLERANCE["float32"], "stream float32"))
        if refused is not None:
            raise refused

    def nearest(self, client: OracleClient, rng: np.random.Generator, posterior: bool) -> tuple[float, str]:
        b, k = int(rng.integers(1, 7)), int(rng.integers(1, 6))
        if posterior:
            xt, t = self.queries(rng, b)
            x = xt.astype(np.float32)
            res = client.nearest(x, k, t=t)
            q = x.astype(np.float64) / t[:, None]  # the posterior's centre: x_t / alpha_t
        else:
            x = (self.X[rng.integers(0, len(self.X), b)] + 0.3 * rng.standard_normal((b, self.X.shape[1]))).astype(
                np.float32
            )
            res = client.nearest(x, k)
            q = x.astype(np.float64)
        d = np.sqrt(((q[:, None, :] - self.X[None]) ** 2).sum(-1))
        ref = np.sort(d, axis=1)[:, :k]
        idx = np.asarray(res.indices)
        dist = np.asarray(res.distances, np.float64)
        if idx.shape != (b, k) or ((idx < 0) | (idx >= len(self.X))).any():
            return float("inf"), f"nearest indices {idx.shape} out of range"
        own = np.take_along_axis(d, idx, axis=1)  # the distances of the samples it named
        err = max(max_rel(dist, ref), max_rel(own, ref)) / 1e-6
        if res.labels is None or not (np.asarray(res.labels) == self.Y[idx]).all():
            err = float("inf")
        return err, f"nearest posterior={posterior} b={b} k={k}"


def run_load(address: str, load: Load, args: argparse.Namespace, report: Report) -> None:
    latencies: list[float] = []
    lock = threading.Lock()
    next_i = iter(range(args.requests))
    start = time.monotonic()
    deadline = start + args.time_limit
    retry = RetryPolicy(max_attempts=args.retries, initial_backoff=0.02, max_backoff=0.2)

    def worker(w: int) -> None:
        with OracleClient(address, retry=retry, timeout=30.0, seed=w) as client:
            while True:
                with lock:
                    if time.monotonic() > deadline:
                        report.timed_out = True
                        return
                    i = next(next_i, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                kind = load.kind(i)
                checks: list[tuple[float, str]] = []
                try:
                    load.run(client, i, checks)
                    code = "OK"
                except OracleError as exc:
                    code = exc.code.name
                except Exception as exc:  # a bug in the SDK or the check: never allowed
                    code = f"{type(exc).__name__}: {exc}"
                ms = (time.perf_counter() - t0) * 1000.0
                with lock:
                    report.requests += 1
                    report.by_kind[kind] = report.by_kind.get(kind, 0) + 1
                    if code != "OK":
                        report.errors[code] = report.errors.get(code, 0) + 1
                        report.errors_by_kind[kind] = report.errors_by_kind.get(kind, 0) + 1
                        if code != "RESOURCE_EXHAUSTED":
                            report.unintended += 1
                            if len(report.examples) < 5:
                                report.examples.append(f"request {i}: {code}")
                    else:
                        latencies.append(ms)
                    for err, what in checks:
                        report.answers_checked += 1
                        report.worst = max(report.worst, err)
                        if not err <= 1.0:
                            report.wrong += 1
                            if len(report.examples) < 5:
                                report.examples.append(f"request {i}: wrong answer ({what}), error {err:.3g} x tol")

    with ThreadPoolExecutor(args.clients) as pool:
        list(pool.map(worker, range(args.clients)))
    report.seconds = time.monotonic() - start
    if latencies:
        report.p50_ms, report.p99_ms = (float(v) for v in np.percentile(latencies, [50, 99]))
        report.max_ms = float(max(latencies))


# -- the server ----------------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    """Resident set size of a process in MiB (Linux /proc; 0 where unavailable)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


@dataclass
class ServerHandle:
    address: str
    pid: int
    metrics_url: str | None


def server_flags(args: argparse.Namespace) -> dict[str, str]:
    return {
        "max-queue-requests": str(args.max_queue_requests),
        "max-inflight-rows": str(args.max_inflight_rows),
        "max-queue-delay-ms": str(args.max_queue_delay_ms),
    }


@contextmanager
def subprocess_server(data: Path, labels: Path, args: argparse.Namespace, report: Report) -> Iterator[ServerHandle]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWORACLE_")}
    cmd = [sys.executable, "-m", "floworacle_server.cli", "serve", "--data", f"soak={data}", "--labels",
           f"soak={labels}", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--device", "cpu",
           "--grace-period-s", "10"]  # fmt: skip
    for k, v in server_flags(args).items():
        cmd += [f"--{k}", v]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        port = None
        metrics = None
        limit = time.monotonic() + 120
        while port is None and time.monotonic() < limit:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"serving on 127\.0\.0\.1:(\d+)(?:, metrics on :(\d+))?", line)
            if m:
                port, metrics = int(m.group(1)), m.group(2)
        if port is None:
            raise RuntimeError("the server did not start:\n" + "".join(lines))
        out = proc.stdout

        def drain() -> None:  # keep reading the log so that the pipe never fills up
            for line in out:
                lines.append(line)

        threading.Thread(target=drain, daemon=True).start()
        yield ServerHandle(f"127.0.0.1:{port}", proc.pid, f"http://127.0.0.1:{metrics}/metrics" if metrics else None)
        proc.send_signal(signal.SIGTERM)
        report.clean_shutdown = proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            report.clean_shutdown = False


@contextmanager
def in_process_server(X: np.ndarray, Y: np.ndarray, args: argparse.Namespace) -> Iterator[ServerHandle]:
    from floworacle_server.data import Dataset, DatasetStore
    from floworacle_server.service.testing import serve_in_thread
    from floworacle_server.settings import Settings

    settings = Settings(
        device="cpu",
        max_queue_requests=args.max_queue_requests,
        max_inflight_rows=args.max_inflight_rows,
        max_queue_delay_ms=args.max_queue_delay_ms,
    )
    with serve_in_thread(settings, DatasetStore([Dataset.from_arrays("soak", X, Y)])) as srv:
        url = f"http://127.0.0.1:{srv.metrics_port}/metrics" if srv.metrics_port else None
        yield ServerHandle(srv.address, os.getpid(), url)


def server_refusals(url: str | None) -> float:
    if url is None:
        return 0.0
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    m = re.search(r'floworacle_rejected_requests_total\{reason="queue_full"\} ([0-9.e+]+)', text)
    return float(m.group(1)) if m else 0.0


def soak(args: argparse.Namespace) -> Report:
    rng = np.random.default_rng(args.seed)
    X = rng.standard_normal((args.n, args.dim)).astype(np.float32)
    Y = rng.integers(0, args.classes, args.n)
    load = Load(X, Y, args.classes, args.seed)
    report = Report(mode="in-process (serve_in_thread)" if args.in_process else "subprocess (floworacle serve)")
    with tempfile.TemporaryDirectory() as tmp:
        if args.in_process:
            server = in_process_server(X, Y, args)
        else:
            np.save(Path(tmp) / "x.npy", X)
            np.save(Path(tmp) / "y.npy", Y)
            server = subprocess_server(Path(tmp) / "x.npy", Path(tmp) / "y.npy", args, report)
        with server as handle:
            warm = argparse.Namespace(**{**vars(args), "requests": min(50, args.requests), "seed": args.seed + 1})
            run_load(handle.address, Load(X, Y, args.classes, warm.seed), warm, Report())  # warm-up, not counted
            report.rss_before_mb = rss_mb(handle.pid)
            run_load(handle.address, load, args, report)
            report.rss_after_mb = rss_mb(handle.pid)
            report.server_refusals = server_refusals(handle.metrics_url)
    return report


def print_report(r: Report, args: argparse.Namespace) -> None:
    print(f"server: {r.mode}; data N = {args.n}, D = {args.dim}, {args.classes} classes; clients {args.clients}")
    print(
        f"limits: max_queue_requests {args.max_queue_requests}, max_inflight_rows {args.max_inflight_rows}, "
        f"SDK attempts {args.retries}"
    )
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(r.by_kind.items()))
    print(f"requests: {r.requests} in {r.seconds:.1f} s ({r.requests / max(r.seconds, 1e-9):.0f}/s): {kinds}")
    print(
        f"answers checked against the float64 reference: {r.answers_checked}; wrong: {r.wrong} "
        f"(largest error {r.worst:.3g} x its tolerance)"
    )
    errs = ", ".join(f"{k} {v}" for k, v in sorted(r.errors.items())) or "none"
    per_kind = ", ".join(f"{k} {v}" for k, v in sorted(r.errors_by_kind.items())) or "none"
    print(f"errors after SDK retries: {errs} (by kind: {per_kind}); unintended: {r.unintended}")
    print(f"RESOURCE_EXHAUSTED refusals counted by the server (incl. retried ones): {r.server_refusals:.0f}")
    print(f"latency of answered requests: p50 {r.p50_ms:.1f} ms, p99 {r.p99_ms:.1f} ms, max {r.max_ms:.1f} ms")
    growth = r.rss_after_mb - r.rss_before_mb
    print(f"server RSS: {r.rss_before_mb:.1f} MiB after warm-up -> {r.rss_after_mb:.1f} MiB ({growth:+.1f} MiB)")
    print(f"server shutdown on SIGTERM: {'exit 0' if r.clean_shutdown else 'NOT clean'}")
    if r.timed_out:
        print(f"TIME LIMIT of {args.time_limit} s reached before {args.requests} requests")
    for line in r.examples:
        print("  " + line)
    print("PASS" if r.ok else "FAIL")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--requests", type=int, default=2000, help="requests to send in all (default 2000)")
    p.add_argument("--clients", type=int, default=32, help="concurrent client threads (default 32)")
    p.add_argument("--time-limit", type=float, default=600.0, help="stop after this many seconds (default 600)")
    p.add_argument("--in-process", action="store_true", help="serve_in_thread here instead of a subprocess")
    p.add_argument("--n", type=int, default=2000, help="data set rows (default 2000)")
    p.add_argument("--dim", type=int, default=32, help="data set dimension (default 32)")
    p.add_argument("--classes", type=int, default=10, help="classes (default 10)")
    p.add_argument("--max-queue-requests", type=int, default=24, help="server queue (default 24: small on purpose)")
    p.add_argument("--max-inflight-rows", type=int, default=256, help="server in-flight row cap (default 256)")
    p.add_argument("--max-queue-delay-ms", type=float, default=2.0, help="batcher wait (default 2)")
    p.add_argument("--retries", type=int, default=8, help="SDK attempts per unary call (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = soak(args)
    print_report(report, args)
    if args.json:
        Path(args.json).write_text(json.dumps({**asdict(report), "ok": report.ok}, indent=2))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
