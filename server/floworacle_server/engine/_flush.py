"""Flush-to-zero for the engine's thread *and* torch's intra-op worker threads.

``exp()`` of very negative float32 logits and the GEMMs on such weights produce denormal numbers,
which many x86 CPUs handle in microcode, tens of times slower than normal numbers (the dense
float32 peer lost a factor 3 to this on a Xeon). Flush-to-zero (FTZ) and denormals-are-zero
(DAZ) are bits of each thread's MXCSR register. ``torch.set_flush_denormal(True)`` sets them for
the *calling* thread only: OpenMP worker threads created before the call keep their own
(measured with torch 2.13: a GEMM split over two threads still returned denormals in the half
the worker computed). Threads created afterwards inherit the creator's setting, so calling this
first thing in a thread, before its first parallel torch op, is enough; to reach a pool that
already exists, :func:`flush_denormals` also runs ``fesetenv`` with the calling thread's
environment on every thread of its OpenMP teams (libgomp's ``GOMP_parallel``, the entry point GCC
compiles ``#pragma omp parallel`` to; every libgomp copy loaded, since wheels such as faiss bring
their own), then checks with a parallel product and a GEMM that no denormal is left.

Why this is safe for the engine's bounds: see :mod:`._bounds` (flushing only ever touches values
below 2^-126, some 30 orders of magnitude below any weight within reach of the maximum).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
from dataclasses import dataclass

import torch

__all__ = ["FlushState", "flush_denormals", "denormals_flushed"]


@dataclass(frozen=True)
class FlushState:
    """What :func:`flush_denormals` achieved.

    ``calling_thread``: torch could set FTZ/DAZ here (False on CPUs without the bits).
    ``workers_reached``: the setting was pushed to the OpenMP team (False: no OpenMP runtime found).
    ``verified``: a parallel product of tiny numbers came back all zeros (or all denormals when
    turning it off).
    """

    calling_thread: bool
    workers_reached: bool
    verified: bool


def _openmp_runtimes() -> list[ctypes.CDLL]:
    """Every OpenMP runtime loaded in this process that has libgomp's ABI (torch's own, and the
    copies other wheels bring, e.g. faiss's): each keeps its own worker pools."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return []
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "/" in line})
    except OSError:
        return []
    out = []
    for path in paths:
        name = path.rsplit("/", 1)[-1]
        if ".so" in name and any(k in name for k in ("libgomp", "libiomp5", "libomp")):
            try:
                lib = ctypes.CDLL(path)
                _ = lib.GOMP_parallel
            except (OSError, AttributeError):
                continue
            out.append(lib)
    return out


def _push_to_workers() -> bool:
    """Run fesetenv(<this thread's environment>) on every thread of this thread's OpenMP teams."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    runtimes = _openmp_runtimes()
    libm_name = ctypes.util.find_library("m")
    if not runtimes or libm_name is None:
        return False
    libm = ctypes.CDLL(libm_name)
    env = ctypes.create_string_buffer(64)  # fenv_t is 32 bytes on x86-64 glibc (x87 state + MXCSR)
    if libm.fegetenv(env) != 0:
        return False
    fn = ctypes.cast(libm.fesetenv, ctypes.c_void_p)
    for omp in runtimes:
        omp.GOMP_parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
        omp.GOMP_parallel.restype = None
        omp.GOMP_parallel(fn, ctypes.cast(env, ctypes.c_void_p), max(1, torch.get_num_threads()), 0)
    return True


def denormals_flushed() -> bool:
    """True when a parallel float32 product and a GEMM that would give denormals give exact zeros
    (on this thread and every intra-op worker it uses)."""
    tiny = torch.full((1 << 21,), 1e-30, dtype=torch.float32)
    product = tiny * 1e-10  # 1e-40 is a float32 denormal
    a = torch.full((256, 256), 1e-20, dtype=torch.float32)
    gemm = a @ a * 1e-1  # 256 * 1e-40 * 0.1: denormal entries, computed by every thread's share
    return not bool(product.any()) and not bool(gemm.any())


def flush_denormals(on: bool = True) -> FlushState:
    """Turn flush-to-zero / denormals-are-zero on (or off) for the calling thread and torch's
    intra-op worker threads; call it first thing in the thread that runs the engine.

    Returns what was reached; ``verified`` is False when a denormal survived (on) or none appeared
    (off), e.g. on a CPU without the bits or where the worker pool could not be reached.
    """
    ok = bool(torch.set_flush_denormal(on))
    reached = _push_to_workers() if ok else False
    flushed = denormals_flushed()
    return FlushState(calling_thread=ok, workers_reached=reached, verified=flushed if on else not flushed)
