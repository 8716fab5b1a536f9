"""examples/train_digits.py trains through the SDK against a real server (a few steps)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from floworacle_server.service.testing import serve_in_thread
from floworacle_server.settings import Settings

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_digits.py"


def test_train_digits_runs(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("train_digits", EXAMPLE)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with serve_in_thread(Settings(device="cpu", metrics_port=-1)) as srv:
        rc = mod.main(
            ["--address", srv.address, "--steps", "6", "--batch", "32", "--eval-size", "16", "--buckets", "4"]
        )
    out = capsys.readouterr().out
    assert rc == 0
    assert "server data set 'digits': N = 1797" in out
    assert "step     6" in out
    rows = re.findall(r"^\s+(0\.\d\d)\s+(\d+\.\d+)\s+(\d+\.\d+)\s+(\d+\.\d+)$", out, flags=re.M)
    assert len(rows) == 8  # two tables of four buckets
    floors = [float(r[3]) for r in rows[:4]]
    assert all(float(r[1]) > 0 and float(r[2]) > 0 for r in rows)
    # the oracle itself departs from x1 - x0 early (many samples weigh) and not late (collapse)
    assert floors[0] > 0.1 > 0.01 > floors[-1]
