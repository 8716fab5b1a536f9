"""Broken index directories and data files end in one ValueError that names the file and what to do
(``floworacle serve`` prints it as one line and exits 1), never in a raw traceback: a 0-byte
``data.npy``, a missing or directory ``labels.npy``, a manifest without ``fingerprint`` or
``num_classes``, an unreadable file, ``sample_shape [0]``, N = 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from floworacle_server.data import build_index, load_dataset, read_manifest


@pytest.fixture
def index(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    out = tmp_path / "idx"
    build_index(rng.standard_normal((40, 6)).astype(np.float32), out, labels=rng.integers(0, 3, 40), progress=False)
    return out


def _edit_manifest(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        m = json.loads((d / "manifest.json").read_text())
        change(m)
        (d / "manifest.json").write_text(json.dumps(m))

    return apply


def _empty_set(d: Path) -> None:
    np.save(d / "data.npy", np.zeros((0, 6), np.float32))
    np.save(d / "labels.npy", np.zeros(0, np.int64))
    _edit_manifest(lambda m: m.update(num_samples=0))(d)


def _labels_dir(d: Path) -> None:
    (d / "labels.npy").unlink()
    (d / "labels.npy").mkdir()


def _unreadable(d: Path) -> None:
    # a dangling symlink stands for an unreadable file even where the tests run as root
    (d / "data.npy").unlink()
    os.symlink(d / "gone.npy", d / "data.npy")


CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "empty data.npy": (lambda d: (d / "data.npy").write_bytes(b""), r"data file data\.npy: it is empty"),
    "missing labels.npy": (lambda d: (d / "labels.npy").unlink(), r"labels file labels\.npy: .*does not exist"),
    "labels.npy is a directory": (_labels_dir, r"labels file labels\.npy: it is a directory"),
    "unreadable data.npy": (_unreadable, r"data file data\.npy: .*does not exist"),
    "no fingerprint": (_edit_manifest(lambda m: m.pop("fingerprint")), r"manifest has no 'fingerprint'"),
    "no num_classes": (_edit_manifest(lambda m: m.pop("num_classes")), r"manifest has no 'num_classes'"),
    "sample_shape [0]": (_edit_manifest(lambda m: m.update(sample_shape=[0])), r"'sample_shape' must be"),
    "N = 0": (_empty_set, r"'num_samples' must be an integer >= 1"),
    "manifest not UTF-8": (lambda d: (d / "manifest.json").write_bytes(b"\xff\xfe{"), r"cannot read .*manifest"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_broken_index_is_refused_in_one_actionable_line(index: Path, case: str) -> None:
    corrupt, pattern = CASES[case]
    corrupt(index)
    with pytest.raises(ValueError, match=pattern) as info:
        load_dataset(index, verify=True)
    text = str(info.value)
    assert "\n" not in text and str(index) in text and "rebuild" in text, text


def test_read_manifest_checks_the_fields_it_promises(index: Path) -> None:
    _edit_manifest(lambda m: m.update(dtype="int8"))(index)
    with pytest.raises(ValueError, match="'dtype' must be one of"):
        read_manifest(index)


def test_an_empty_data_file_is_refused_with_its_name(tmp_path: Path) -> None:
    (tmp_path / "empty.npy").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.npy.*is empty"):
        load_dataset(tmp_path / "empty.npy")
    np.save(tmp_path / "x.npy", np.zeros((4, 3), np.float32))
    (tmp_path / "labels.npy").write_bytes(b"")
    with pytest.raises(ValueError, match=r"labels file .*labels\.npy.*is empty"):
        load_dataset(tmp_path / "x.npy", labels=tmp_path / "labels.npy")


def test_serve_prints_one_line_for_a_broken_index(index: Path) -> None:
    (index / "labels.npy").unlink()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWORACLE_")}
    cmd = [sys.executable, "-m", "floworacle_server.cli", "serve", "--port", "0", "--metrics-port", "-1",
           "--data", f"broken={index}"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    text = out.stdout + out.stderr
    assert out.returncode == 1, text
    assert "Traceback" not in text and "labels file labels.npy" in text, text
