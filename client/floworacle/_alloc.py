"""Allocator tuning for processes that move MB-sized tensors many times a second.

Every oracle call makes several fresh buffers of the batch's size (the encoded request, the
received message, the engine's (B, D) float64 work arrays, the decoded answer). glibc serves
blocks above its mmap threshold (128 KiB, raised adaptively up to 32 MiB) with a fresh
``mmap`` and hands memory above the heap's trim threshold back on ``free``; in a process with
several busy threads (gRPC's poller, the event loop, the engine's worker) those blocks were
measured to come back as fresh pages on most calls, and touching 3 MB of fresh pages costs a
page fault per 4 KiB. On the 2-core development VM that was 2-3 ms of a B = 256, D = 3,072
round trip on the client side alone (``benchmarks/bench_e2e.py`` prints the effect).

:func:`tune_allocator` pins both thresholds, so blocks up to ``mmap_threshold`` come from the
heap and freed memory up to ``trim_threshold`` stays mapped for the next call. The price is
resident memory: the process keeps its high-water mark of freed blocks (bounded by
``trim_threshold`` above what it uses). ``floworacle serve`` calls it at start-up (setting
``tune_allocator``); a training job that sends large batches may call it once too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["tune_allocator", "release_free_memory"]

_M_TRIM_THRESHOLD = -1  # from glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

#: glibc's own cap on M_MMAP_THRESHOLD's adaptive growth (32 MiB on 64-bit systems).
DEFAULT_MMAP_THRESHOLD = 32 << 20
DEFAULT_TRIM_THRESHOLD = 256 << 20


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def release_free_memory() -> bool:
    """Hand the heap's free blocks back to the system now (glibc ``malloc_trim(0)``), whatever the
    trim threshold says; for a server whose burst of in-flight data has just ended. Returns True
    when glibc released something, False otherwise or where there is no glibc."""
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return bool(trim(0))


def tune_allocator(
    mmap_threshold: int = DEFAULT_MMAP_THRESHOLD,
    trim_threshold: int = DEFAULT_TRIM_THRESHOLD,
    arena_max: int | None = None,
) -> bool:
    """Pin glibc's mmap and trim thresholds (see the module doc) for this whole process, and with
    ``arena_max`` cap the number of malloc arenas.

    glibc gives each new thread an arena of its own (up to 8 per core); blocks freed in one are
    reused only by the threads on it, and what small live blocks pin in each stays resident after
    a burst, which ``malloc_trim`` cannot hand back. In a gRPC server (poller threads, the event
    loop, the engine's worker, executors) that was 30-85 MiB left resident after a burst of 150-200
    MiB; with two arenas, about 10. The cap applies to threads that start after the call.

    Call it once, early (before the first large allocations and threads). Returns True when every
    value was set; False where there is no glibc ``mallopt`` (macOS, Windows, musl) or glibc
    refused a value, in which case nothing changed or the allocator keeps its defaults for the
    refused one.
    """
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None or mmap_threshold < 0 or trim_threshold < 0 or (arena_max is not None and arena_max < 1):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, int(min(mmap_threshold, 2**31 - 1))) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, int(min(trim_threshold, 2**31 - 1))) == 1 and ok
    if arena_max is not None:
        ok = mallopt(_M_ARENA_MAX, int(min(arena_max, 2**31 - 1))) == 1 and ok
    return ok
