"""A sharded gang served as a user starts it: ``torchrun --nproc-per-node W floworacle serve``, gloo
ranks on the CPU, one index directory (labels and sample weights) cut into shards.

* Equality: every output of a 2- and a 3-rank gang (velocity, x1_hat, eps_hat, score, top-k with
  the data set's indices, entropy, ESS, variance; plain, class-conditional, guided, leave-one-out)
  and Nearest / posterior-nearest answers equal a single-process server's on the same data within
  1e-12 relative (float64 on the wire); DescribeDataset reports the whole set and its fingerprint.
* Faults: a rank killed mid-traffic or stopped (hung past the collective timeout) turns the
  gang's answers into UNAVAILABLE, never a wrong or partial answer; health goes NOT_SERVING and
  rank 0 exits non-zero. SIGTERM to rank 0 drains in-flight work and stops every rank (exit 0).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from floworacle import OracleClient, OracleError, RetryPolicy
from floworacle_server.data import build_index
from floworacle_server.service.testing import serve_in_thread
from floworacle_server.settings import Settings

N, D, C = 420, 16, 4
TORCHRUN = Path(sys.executable).with_name("torchrun")
pytestmark = pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun comes with torch")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(8)
    labels = rng.integers(0, C, N)
    centers = rng.standard_normal((C, D)) * 2.5
    x = (centers[labels] + rng.standard_normal((N, D))).astype(np.float32)
    weights = rng.uniform(0.3, 1.0, N)
    out = tmp_path_factory.mktemp("gang") / "idx"
    build_index(x, out, labels=labels, weights=weights, name="g", progress=False)
    return out


@dataclass
class Gang:
    """A running gang: rank 0's address, the torchrun process, each rank's pid, its output."""

    address: str
    proc: subprocess.Popen
    pids: dict[int, int]
    lines: list[str]

    @property
    def log(self) -> str:
        return "".join(self.lines)


@contextmanager
def gang(index: Path, world: int, *extra: str, timeout_s: float = 20.0) -> Iterator[Gang]:
    port, master = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWORACLE_")}
    env["FLOWORACLE_GANG_TIMEOUT_S"] = str(timeout_s)
    cmd = [
        str(TORCHRUN), "--nproc-per-node", str(world), "--master-port", str(master), "--max-restarts", "0",
        "-m", "floworacle_server.cli", "serve", "--data", f"g={index}", "--host", "127.0.0.1", "--port", str(port),
        "--metrics-port", "-1", "--max-queue-delay-ms", "0", *extra,
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    pids: dict[int, int] = {}
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            m = re.search(r"as rank (\d+) \(pid (\d+)", line)
            if m:
                pids[int(m.group(1))] = int(m.group(2))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while not any("serving on" in ln for ln in lines) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert any("serving on" in ln for ln in lines), "".join(lines)
    try:
        yield Gang(f"127.0.0.1:{port}", proc, pids, lines)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        reader.join(5)


def _queries(b: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = np.concatenate([np.linspace(0.02, 0.97, b - 1), [0.995]])
    x = rng.standard_normal((b, D)) * 2.0
    labels = np.arange(b) % (C + 1) - 1
    exclude = np.where(np.arange(b) % 3 == 0, rng.integers(0, N, b), -1)
    return x, t, labels, exclude


def _calls(c: OracleClient) -> dict[str, object]:
    x, t, labels, exclude = _queries(20, 1)
    outs = ("velocity", "x1_hat", "eps_hat", "score", "topk", "entropy", "ess", "variance")
    return {
        "plain": c.predict(x, t, outputs=outs, top_k=4),
        "labels": c.predict(x, t, outputs=outs, top_k=4, labels=labels),
        "guided": c.predict(
            x, t, outputs=("velocity", "x1_hat"), labels=labels, guidance=2.0, guidance_interval=(0.2, 0.7)
        ),
        "exclude": c.predict(x, t, outputs=outs, top_k=4, exclude=exclude),
        "nearest": c.nearest(x, k=5, exclude=exclude),
        "posterior": c.nearest(x, k=3, t=t),
    }


def _within_bounds(a: object, b: object, what: str) -> None:
    """Answers whose routes may round in float32 (the engine's split route, which outputs without
    the variance allow) agree within the sum of the two reported bounds."""
    for name, bound in (("velocity", "velocity_error_bound"), ("x1_hat", "x1_hat_error_bound")):
        gap = np.abs(getattr(a, name) - getattr(b, name)).reshape(len(getattr(a, bound)), -1).max(axis=1)
        assert (gap <= getattr(a, bound) + getattr(b, bound) + 1e-12 * np.abs(getattr(b, name)).max()).all(), (
            what,
            name,
        )


def _close(a: object, b: object, what: str) -> None:
    if what == "guided":
        _within_bounds(a, b, what)
        return
    for name, va in vars(a).items():
        vb = getattr(b, name)
        if isinstance(va, np.ndarray):
            if va.dtype.kind in "iu" or name == "topk_weights":
                if name == "topk_indices":  # past e^-37 of the top weight either side may list -1
                    weighty = b.topk_weights > 1e-15
                    assert np.array_equal(va[weighty], vb[weighty]), (what, name)
                elif name == "topk_weights":
                    assert np.abs(va - vb).max() < 1e-12, (what, name)
                else:
                    assert np.array_equal(va, vb), (what, name)
            elif not name.endswith("_error_bound"):  # bounds hold but may be looser in a gang (docs)
                scale = max(np.abs(vb).max(), 1e-300)
                assert np.abs(va - vb).max() / scale < 1e-12, (what, name, np.abs(va - vb).max() / scale)
        elif name in ("fingerprint", "dataset", "approximate"):
            assert va == vb, (what, name)


@pytest.mark.parametrize("world", [2, 3])
def test_a_gang_answers_like_one_process(index: Path, world: int) -> None:
    with serve_in_thread(Settings(device="cpu", metrics_port=-1, data=[f"g={index}"])) as single:
        with OracleClient(single.address, wire_dtype="float64") as c:
            want = _calls(c)
            info = c.describe()
    with gang(index, world) as g:
        assert sorted(g.pids) == list(range(world))
        with OracleClient(g.address, wire_dtype="float64") as c:
            got = _calls(c)
            ginfo = c.describe()
            x, t, _, _ = _queries(4, seed=9)
            for one_process, says in (
                ({"kind": "linear"}, "held in shards by a gang"),
                ({"precision": "knn"}, "shard"),
            ):
                with pytest.raises(OracleError) as err:  # refused before any rank computes
                    c.velocity(x, t, **one_process)  # type: ignore[arg-type]
                assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION and says in err.value.details
            assert _calls(c)["plain"] is not None  # the gang goes on
    assert (ginfo.fingerprint, ginfo.num_samples, ginfo.num_classes) == (info.fingerprint, N, C)
    assert ginfo.has_weights and ginfo.resident_bytes >= info.resident_bytes * 0.99
    for what in want:
        _close(got[what], want[what], what)


def _gone(pid: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as ch:
        try:
            return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
        except grpc.RpcError:
            return -1


@pytest.mark.parametrize("fault", ["kill", "hang"])
def test_a_lost_rank_makes_the_gang_unavailable_never_wrong(index: Path, fault: str) -> None:
    x, t, _, _ = _queries(8, 2)
    with serve_in_thread(Settings(device="cpu", metrics_port=-1, data=[f"g={index}"])) as single:
        with OracleClient(single.address, wire_dtype="float64") as c:
            ref = c.velocity(x, t)
    with gang(index, 3, timeout_s=3.0) as g:
        address, proc, pids = g.address, g.proc, g.pids
        answers: list[object] = []
        stop = threading.Event()

        def traffic() -> None:
            with OracleClient(address, wire_dtype="float64", retry=RetryPolicy(max_attempts=1), timeout=15) as c:
                while not stop.is_set():
                    try:
                        answers.append(c.velocity(x, t))
                    except OracleError as exc:
                        answers.append(exc)
                        if exc.code == grpc.StatusCode.UNAVAILABLE:
                            return

        worker = threading.Thread(target=traffic)
        worker.start()
        time.sleep(1.0)
        os.kill(pids[2], signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
        worker.join(30)
        stop.set()
        assert not worker.is_alive()
        # past the first UNAVAILABLE the gang is never SERVING again: NOT_SERVING, then gone
        assert _health(address) in (health_pb2.HealthCheckResponse.NOT_SERVING, -1)
        if fault == "hang":  # rank 0 leaves on its own; the stopped rank is the orchestrator's to kill
            assert _gone(pids[0], 30), "rank 0 stayed after the gang broke"
            os.kill(pids[2], signal.SIGCONT)
        rc = proc.wait(60)  # torchrun exits non-zero so the orchestrator restarts the group
    ok = [a for a in answers if isinstance(a, np.ndarray)]
    errors = [a for a in answers if not isinstance(a, np.ndarray)]
    assert ok, "the gang answered before the fault"
    for a in ok:  # never a wrong or partial answer
        assert np.abs(a - ref).max() / np.abs(ref).max() < 1e-12
    assert errors and all(e.code == grpc.StatusCode.UNAVAILABLE for e in errors), errors  # type: ignore[attr-defined]
    details = errors[-1].details  # type: ignore[attr-defined]
    assert "gang" in details
    # gloo's internals and the peers' addresses stay in the server's log (the SDK's own text may
    # name the address it dialled; the server's message is what follows "gRPC says:")
    said = details.split("gRPC says:")[-1]
    assert not any(leak in said for leak in ("gloo", "127.0.0.1", "Connection", ".cc:", "[")), said
    assert rc != 0
    assert "the gang broke" in g.log


def test_sigterm_to_rank_0_drains_and_stops_every_rank(index: Path) -> None:
    x, t, _, _ = _queries(8, 3)
    # the request waits 2 s in rank 0's queue, so it is in flight when SIGTERM arrives
    with gang(index, 2, "--max-queue-delay-ms", "2000", "--shutdown-delay-s", "0.2") as g:
        address, proc, pids = g.address, g.proc, g.pids
        with OracleClient(address, retry=RetryPolicy(max_attempts=1)) as c:
            assert c.velocity(x, t).shape == x.shape
            result: list[object] = []
            caller = threading.Thread(target=lambda: result.append(c.predict(x, t, top_k=3)))
            caller.start()
            time.sleep(0.5)
            os.kill(pids[0], signal.SIGTERM)
            caller.join(30)
            assert not caller.is_alive()
        rc = proc.wait(60)
    assert rc == 0, g.log
    assert result and not isinstance(result[0], Exception)
    log = g.log
    assert "draining" in log and "rank 0 stopped the gang" in log


def test_a_broken_gang_says_unavailable_without_its_internals() -> None:
    from floworacle_server.service._gang import GangBroken
    from floworacle_server.service._servicer import _as_failure

    reason = "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [10.4.7.21]:29500"
    failure = _as_failure(GangBroken(reason))
    assert failure.code == grpc.StatusCode.UNAVAILABLE and "retry" in failure.message
    assert not any(leak in failure.message for leak in ("gloo", "10.4.7.21", "29500", "pair.cc")), failure.message
