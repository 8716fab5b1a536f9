"""Pure-function parts of the SDK: retry policy, error translation, target parsing, row split."""

from __future__ import annotations

import pickle
import platform
import random
import subprocess
import sys

import grpc
import numpy as np
import pytest

from floworacle import OracleError, RetryPolicy, tune_allocator
from floworacle._config import make_config
from floworacle._errors import error_from_code, retry_hint_seconds, translate_rpc_error
from floworacle._plans import build_oracle
from floworacle.v1 import oracle_pb2 as pb


def test_retry_policy_backoff_and_hint() -> None:
    p = RetryPolicy(max_attempts=4, initial_backoff=0.1, max_backoff=0.3, multiplier=2.0)
    rng = random.Random(0)
    unavailable = OracleError(grpc.StatusCode.UNAVAILABLE, "down")
    for attempt, cap in ((0, 0.1), (1, 0.2), (2, 0.3)):
        waits = [p.delay(unavailable, attempt, 10.0, rng) for _ in range(200)]
        assert all(w is not None and 0 <= w <= cap for w in waits)
        assert max(w for w in waits if w is not None) > 0.8 * cap  # full jitter spans the range
    assert p.delay(unavailable, 3, 10.0, rng) is None  # attempts used up
    assert p.delay(unavailable, 0, 0.0, rng) is None  # no time left
    full = OracleError(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full", retry_after=0.25)
    assert p.delay(full, 0, 10.0, rng) == pytest.approx(0.25, abs=0.1) and p.delay(full, 0, 10.0, rng) >= 0.25
    assert p.delay(OracleError(grpc.StatusCode.RESOURCE_EXHAUSTED, "too big"), 0, 10.0, rng) is None
    assert p.delay(OracleError(grpc.StatusCode.INVALID_ARGUMENT, "bad"), 0, 10.0, rng) is None
    # a call that a shutting-down server never handed to a handler ends CANCELLED (grpc/grpc#41785)
    assert p.delay(OracleError(grpc.StatusCode.CANCELLED, "CANCELLED"), 0, 10.0, rng) is not None
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)


def test_retry_hints() -> None:
    assert retry_hint_seconds([("grpc-retry-pushback-ms", "150")]) == 0.15
    assert retry_hint_seconds([("retry-after-ms", "20")]) == 0.02
    assert retry_hint_seconds([("retry-after", "2")]) == 2.0
    assert retry_hint_seconds([("other", "1")]) is None
    assert retry_hint_seconds(None) is None


class _FakeRpcError(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.RESOURCE_EXHAUSTED

    def details(self) -> str:
        return "queue full"

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("grpc-retry-pushback-ms", "40"),)


def test_translation_and_pickling() -> None:
    e = translate_rpc_error(_FakeRpcError())
    assert (e.code, e.details, e.retry_after) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full", 0.04)
    assert str(e) == "RESOURCE_EXHAUSTED: queue full"
    back = pickle.loads(pickle.dumps(e))
    assert (back.code, back.details, back.retry_after) == (e.code, e.details, e.retry_after)
    assert error_from_code(3, "bad").code == grpc.StatusCode.INVALID_ARGUMENT
    assert error_from_code(999, "?").code == grpc.StatusCode.UNKNOWN


def _cfg(target: object) -> str:
    return make_config(
        target,  # type: ignore[arg-type]
        dataset=None, fingerprint=None, wire_dtype=None, timeout=1.0, retry=None, max_message_bytes=1 << 20,
        max_request_rows=100, root_certificates=None, private_key=None, certificate_chain=None, secure=False,
        token=None, options=(),
    ).target  # fmt: skip


def test_target_parsing() -> None:
    assert _cfg("h:1") == "h:1"
    # a list of addresses becomes one target of every address, for gRPC's round_robin policy
    assert _cfg("127.0.0.1:1, 127.0.0.2:2") == "ipv4:127.0.0.1:1,127.0.0.2:2"
    assert _cfg(["127.0.0.1:1", "127.0.0.2:2"]) == "ipv4:127.0.0.1:1,127.0.0.2:2"
    assert _cfg(["[::1]:5", "[::1]:6"]) == "ipv6:[::1]:5,[::1]:6"
    assert _cfg("ipv4:1.2.3.4:1,1.2.3.5:1") == "ipv4:1.2.3.4:1,1.2.3.5:1"
    assert _cfg("dns:///svc.ns:50051") == "dns:///svc.ns:50051"
    for bad in ([], "a:1,b", "host.invalid.:1,b.invalid.:2"):
        with pytest.raises(ValueError):
            _cfg(bad)


def test_split_rows_and_pin() -> None:
    # 400 bytes a row, 488 with room for t, labels, exclude and the four coefficients
    x = np.arange(1000, dtype=np.float32).reshape(10, 100)
    limit = 4096 + 1 + 3 * 488 + 10
    plan = build_oracle(x, 0.5, dataset="d", fingerprint="", max_message_bytes=limit, max_request_rows=100)
    # what goes on the wire, read back by plain protobuf
    sent = [pb.OracleRequest.FromString(r.SerializeToString()) for r in plan.requests]
    assert [r.x_t.shape[0] for r in sent] == [3, 3, 3, 1]
    assert b"".join(r.x_t.data for r in sent) == x.tobytes()
    assert [r.t.shape[0] for r in sent] == [3, 3, 3, 1]
    assert all(r.ByteSize() <= limit for r in plan.requests)
    first = pb.OracleResponse(fingerprint="sha256:abc")
    plan.pin(plan.requests[1], first)
    assert pb.OracleRequest.FromString(plan.requests[1].SerializeToString()).fingerprint == "sha256:abc"
    plan = build_oracle(x, 0.5, dataset="d", fingerprint="", max_message_bytes=1 << 20, max_request_rows=4)
    assert [r.x_t.shape[0] for r in plan.requests] == [4, 4, 2]


_MMAP_PROBE = """
import ctypes, sys
from floworacle import tune_allocator

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "tuned":
    assert tune_allocator() is True
before = libc.mallinfo2().hblks
buf = bytearray(3 << 20)  # one request-sized buffer
print(libc.mallinfo2().hblks - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt thresholds are glibc's")
def test_tune_allocator_serves_request_sized_blocks_from_the_heap() -> None:
    # In a child process: the thresholds are process-wide. Untuned, glibc maps a fresh 3 MB block
    # (one more mmapped block); tuned, the block comes from the heap and is reused after free.
    def mmapped_blocks(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", _MMAP_PROBE, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.strip())

    assert mmapped_blocks("default") == 1
    assert mmapped_blocks("tuned") == 0


_ARENA_PROBE = """
import ctypes, re, sys, tempfile, threading
from floworacle import tune_allocator
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.fopen.restype = ctypes.c_void_p
libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
libc.fclose.argtypes = [ctypes.c_void_p]
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
if sys.argv[1] == "capped":
    assert tune_allocator(arena_max=2)
alive = threading.Barrier(7)
def work():
    libc.free(libc.malloc(1000))
    alive.wait()  # all six threads hold their arenas at once
    alive.wait()
threads = [threading.Thread(target=work) for _ in range(6)]
for t in threads:
    t.start()
alive.wait()
with tempfile.NamedTemporaryFile(suffix=".xml") as f:
    fp = libc.fopen(f.name.encode(), b"w")
    libc.malloc_info(0, fp)
    libc.fclose(fp)
    heaps = len(re.findall(r'<heap nr="', open(f.name).read()))
alive.wait()
for t in threads:
    t.join()
print(heaps)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc arenas are glibc's")
def test_tune_allocator_caps_the_malloc_arenas() -> None:
    # what lets a server's memory return after a burst (floworacle serve asks for two)
    def arenas(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", _ARENA_PROBE, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.strip())

    assert arenas("default") >= 4
    assert arenas("capped") <= 2


def test_tune_allocator_refuses_negative_thresholds() -> None:
    assert tune_allocator(mmap_threshold=-1) is False
    assert tune_allocator(arena_max=0) is False
