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


def test_sample_oracle_writes_copies_of_training_samples(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The README's memorisation walk-through: oracle samples are (near) copies of the data."""
    import numpy as np

    from floworacle_server.data import load_digits

    spec = importlib.util.spec_from_file_location("sample_oracle", EXAMPLE.parent / "sample_oracle.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "generated.npy"
    with serve_in_thread(Settings(device="cpu", metrics_port=-1)) as srv:
        assert mod.main(["--address", srv.address, "--n", "8", "--steps", "20", "--out", str(out)]) == 0
    samples = np.load(out)
    assert samples.shape == (8, 64) and "wrote" in capsys.readouterr().out
    data = load_digits().x.double().numpy()
    d = np.sqrt(((samples[:, None, :].astype(np.float64) - data[None]) ** 2).sum(-1))
    d.sort(axis=1)
    assert (d[:, 0] / d[:, 1] < 1 / 3).mean() >= 0.75  # copies by the d1/d2 test
