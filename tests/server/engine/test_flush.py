"""flush_denormals() reaches the calling thread and torch's intra-op workers, also once their pool exists.

Each case runs in a fresh interpreter (the setting is per thread and sticks to the worker pool),
on a new thread as the server's engine worker is, with two intra-op threads.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

SCRIPT = textwrap.dedent(
    """
    import json, sys, threading
    import torch
    torch.set_num_threads(2)
    from floworacle_server.engine import flush_denormals
    from floworacle_server.engine._flush import denormals_flushed

    def count():
        a = torch.full((512, 256), 1e-20)
        b = torch.full((256, 512), 1e-22) / 256
        gemm = a @ b  # entries ~1e-42: float32 denormals, each thread computing its share
        prod = torch.full((1 << 21,), 1e-30) * 1e-10
        return int((gemm != 0).sum()), int((prod != 0).sum())

    out = {}
    def worker():
        mode = sys.argv[1]
        if mode == "pool-first":
            count()  # the worker pool exists before the call
        out["before"] = count()
        if mode != "off":
            state = flush_denormals()
            out["state"] = [state.calling_thread, state.workers_reached, state.verified]
        out["after"] = count()
        out["checked"] = denormals_flushed()
        if mode == "toggle":
            flush_denormals(False)
            out["off_again"] = count()
    th = threading.Thread(target=worker)
    th.start(); th.join()
    print(json.dumps(out))
    """
)


def _run(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not torch.backends.cpu.get_cpu_capability().startswith("AVX"), reason="x86 FTZ/DAZ bits")
@pytest.mark.parametrize("mode", ["fresh", "pool-first", "toggle"])
def test_denormals_are_flushed_in_a_matmul_on_the_engine_thread(mode: str) -> None:
    res = _run(mode)
    assert res["before"][0] > 0 and res["before"][1] > 0  # the matmul really makes denormals
    assert res["after"] == [0, 0]  # on every thread's share of the work
    assert res["state"] == [True, True, True] and res["checked"]
    if mode == "toggle":
        assert res["off_again"][0] > 0 and res["off_again"][1] > 0


@pytest.mark.skipif(not torch.backends.cpu.get_cpu_capability().startswith("AVX"), reason="x86 FTZ/DAZ bits")
def test_torch_alone_misses_an_existing_worker_pool() -> None:
    # why flush_denormals pushes the setting to the workers: torch.set_flush_denormal sets it
    # for the calling thread only, and a worker created earlier keeps computing denormals
    script = SCRIPT.replace("state = flush_denormals()", "torch.set_flush_denormal(True); state = None").replace(
        'out["state"] = [state.calling_thread, state.workers_reached, state.verified]', "pass"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, "pool-first"], capture_output=True, text=True, timeout=120, check=True
    )
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["after"][0] > 0 or res["after"][1] > 0
