"""`floworacle index build` writes beside the target and moves the finished index into place: a
build killed midway (SIGKILL) or interrupted (SIGINT, i.e. Ctrl-C) leaves the old index intact (or
nothing), and `--force` replaces an index or an unfinished build's leftover, never other files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from floworacle_server.data import build_index, load_index, read_manifest


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 128 MiB float32 source: long enough to build (1-3 s here) to be caught midway."""
    p = tmp_path_factory.mktemp("src") / "big.npy"
    x = np.lib.format.open_memmap(p, mode="w+", dtype=np.float32, shape=(32768, 1024))
    x[:] = np.random.default_rng(0).standard_normal((32768, 1024), dtype=np.float32)
    x.flush()
    return p


def _partials(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.partial-*"))


def _build_and_stop(src: Path, out: Path, sig: int, *extra: str) -> subprocess.CompletedProcess[str]:
    """Start a build and send ``sig`` once its temporary directory holds data (i.e. midway)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWORACLE_")}
    cmd = [sys.executable, "-m", "floworacle_server.cli", "index", "build", str(src), str(out), "--no-progress", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not any((p / "data.npy").exists() for p in _partials(out)):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the build never started writing"
        time.sleep(0.005)
    proc.send_signal(sig)
    out_text, err_text = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(cmd, proc.returncode, out_text, err_text)


def test_a_killed_first_build_leaves_nothing_and_the_next_build_cleans_up(big: Path, tmp_path: Path) -> None:
    out = tmp_path / "idx"
    done = _build_and_stop(big, out, signal.SIGKILL)
    assert done.returncode == -signal.SIGKILL
    assert not out.exists()  # nothing that could pass for an index
    assert len(_partials(out)) == 1  # the dead build's directory, beside the target
    rng = np.random.default_rng(1)
    build_index(rng.standard_normal((20, 8)).astype(np.float32), out, progress=False)  # no --force needed
    assert _partials(out) == [] and load_index(out).num_samples == 20


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_an_interrupted_forced_rebuild_leaves_the_old_index_intact(big: Path, tmp_path: Path, sig: int) -> None:
    out = tmp_path / "idx"
    old = build_index(np.random.default_rng(2).standard_normal((30, 8)).astype(np.float32), out, progress=False)
    done = _build_and_stop(big, out, sig, "--force")
    if sig == signal.SIGINT:
        assert done.returncode == 130 and "interrupted" in done.stderr and "Traceback" not in done.stderr
        assert _partials(out) == []  # Ctrl-C cleans up after itself
    else:
        assert done.returncode == -signal.SIGKILL
    assert read_manifest(out)["fingerprint"] == old["fingerprint"]
    assert load_index(out, verify=True).num_samples == 30  # every file still the old one
    # and --force then replaces it (the killed build's leftover is removed on the way)
    new = build_index(np.ones((5, 8), np.float32), out, overwrite=True, progress=False)
    assert load_index(out, verify=True).fingerprint == new["fingerprint"] != old["fingerprint"]
    assert _partials(out) == []


def test_force_replaces_an_old_style_leftover_but_never_other_files(tmp_path: Path) -> None:
    x = np.random.default_rng(3).standard_normal((10, 4)).astype(np.float32)
    leftover = tmp_path / "half"
    leftover.mkdir()
    np.save(leftover / "data.npy", x[:3])  # what a pre-atomic build left when killed: no manifest
    with pytest.raises(ValueError, match="leftover of an unfinished build"):
        build_index(x, leftover, progress=False)
    assert build_index(x, leftover, overwrite=True, progress=False)["num_samples"] == 10
    other = tmp_path / "home"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    np.save(other / "data.npy", x)
    with pytest.raises(ValueError, match=r"not part of an index \(thesis\.tex\)"):
        build_index(x, other, overwrite=True, progress=False)
    assert (other / "thesis.tex").read_text() == "precious"
