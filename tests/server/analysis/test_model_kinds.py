"""The model study's reference kinds: a model that *is* one oracle kind is found closest to that
kind at every t (distance 0 to it, not to the others), the distances equal a float64 numpy
computation, and ClientData passes the kind to the SDK as keywords."""

from __future__ import annotations

import importlib.util
import json
import runpy
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from floworacle.paths import get_path
from floworacle.protocol import patch_schedule
from floworacle.study import ClientData, ModelStudy, StudyConfig, parse_patch_size
from floworacle_server.analysis import EngineData
from floworacle_server.cli import main
from floworacle_server.data import Dataset
from floworacle_server.engine import OracleQuery, kind_oracle

GRID = (0.2, 0.5, 0.8, 0.95)
#: up to 0.8 the kinds differ on every query set; at 0.95 the training queries' posteriors of
#: every kind but the linear one have collapsed onto the query's own sample
SEPARATE = (0.2, 0.5, 0.8)


@pytest.fixture(scope="module")
def sets() -> tuple[Dataset, Dataset]:
    rng = np.random.default_rng(0)
    x = (rng.integers(0, 9, (70, 1, 5, 5)) / 4.0 - 1.0).astype(np.float32)
    return Dataset.from_arrays("tr", x[:50]), Dataset.from_arrays("ho", x[50:])


def _kind_model(ds: Dataset, kind: str, patch: Any) -> Any:
    path = get_path("linear")

    def velocity(x: np.ndarray, t: np.ndarray) -> np.ndarray:
        q = OracleQuery(torch.from_numpy(x.reshape(x.shape[0], -1)), path.coefficients(t), outputs=("velocity",))
        p = None if kind in ("global", "linear") else int(patch_schedule(float(t[0]), patch)[0])
        return kind_oracle(ds, q, kind, patch_size=p).velocity.numpy()

    return velocity


@pytest.mark.parametrize("kind", ["local", "equivariant", "linear", "global"])
def test_a_kind_as_the_model_is_closest_to_itself(sets: tuple[Dataset, Dataset], kind: str) -> None:
    train, held = sets
    patch = [(0.0, 5), (0.6, 3)]
    cfg = StudyConfig(
        t_grid=SEPARATE, queries_per_t=12, num_samples=8, steps=4, kinds=("local", "equivariant", "linear"),
        patch_size=patch, kind_queries=6,
    )  # fmt: skip
    study = ModelStudy(EngineData(train), EngineData(held), cfg)
    report = study.run(_kind_model(train, kind, patch), inputs="numpy")
    for source in ("train", "heldout"):
        d = report.kinds[source]
        assert set(d) == {"global", "local", "equivariant", "linear"}
        assert np.all(d[kind] < 1e-20), d[kind]
        others = [k for k in d if k != kind]
        assert all(np.all(d[k] > 1e-8) for k in others)
        assert report.closest(source) == [kind] * len(SEPARATE)
    js = report.to_json()
    assert js["kinds"]["closest"]["train"] == [kind] * len(SEPARATE) and js["kinds"]["queries"] == 6
    assert "tr:closest" in report.summary()


def test_distances_equal_a_numpy_computation(sets: tuple[Dataset, Dataset]) -> None:
    train, held = sets
    cfg = StudyConfig(t_grid=GRID, queries_per_t=10, num_samples=4, steps=2, kinds=("local", "linear"), kind_queries=5)
    study = ModelStudy(EngineData(train), EngineData(held), cfg)

    def model(x: np.ndarray, t: np.ndarray) -> np.ndarray:
        return 0.3 * x - t.reshape((-1,) + (1,) * (x.ndim - 1))

    report = study.run(model, inputs="numpy")
    path = get_path("linear")
    for source in ("train", "heldout"):
        q = study._queries[source]
        for j, tj in enumerate(GRID):
            c = path.coefficients(np.full(5, tj))
            x = c.alpha[:, None] * q.x1[:5] + c.sigma[:, None] * q.x0[:5]
            for kind in ("local", "linear"):
                ref = kind_oracle(
                    train, OracleQuery(torch.from_numpy(x), c, outputs=("x1_hat",)), kind,
                    patch_size=3 if kind == "local" else None,
                ).x1_hat.numpy()  # fmt: skip
                # the model's x1-prediction: x1 = (u - B x) / A
                x1_m = (model(x, np.full(5, tj)) - c.velocity_xt[:, None] * x) / c.velocity_x1[:, None]
                want = np.mean(np.sum((x1_m - ref) ** 2, axis=1)) / x.shape[1]
                np.testing.assert_allclose(report.kinds[source][kind][j], want, rtol=1e-9)


def test_patch_size_text_and_checks() -> None:
    assert parse_patch_size("5") == 5
    assert parse_patch_size("0:7,0.5:5,0.8:3") == [(0.0, 7), (0.5, 5), (0.8, 3)]
    assert patch_schedule([0.1, 0.5, 0.79, 0.9], [(0.0, 7), (0.5, 5), (0.8, 3)]).tolist() == [7, 5, 5, 3]
    with pytest.raises(ValueError, match="increase from 0"):
        parse_patch_size("0.2:5")
    with pytest.raises(ValueError, match="odd"):
        StudyConfig(kinds=("local",), patch_size=4).validated()
    with pytest.raises(ValueError, match="not reference kinds"):
        StudyConfig(kinds=("global",)).validated()


class _Recorder:
    """The part of OracleClient that ClientData uses, recording the velocity keywords."""

    def __init__(self, x: np.ndarray) -> None:
        self.x = x
        self.calls: list[dict[str, Any]] = []

    def describe(self, dataset: str | None) -> Any:
        from types import SimpleNamespace

        return SimpleNamespace(name="tr", num_samples=len(self.x), dim=self.x.shape[1], sample_shape=(self.x.shape[1],),
                               fingerprint="sha256:x")  # fmt: skip

    def velocity(self, x_t: np.ndarray, t: np.ndarray, **kw: Any) -> np.ndarray:
        self.calls.append(kw)
        return np.zeros_like(x_t)


def test_client_data_passes_the_kind_as_keywords() -> None:
    rec = _Recorder(np.zeros((4, 6)))
    data = ClientData(rec, "tr", rec.x, check_rows=0)
    path = get_path("linear")
    data.velocity(np.zeros((2, 6)), np.full(2, 0.5), path, None)
    data.velocity(np.zeros((2, 6)), np.full(2, 0.5), path, None, kind="equivariant", patch_size=5)
    data.velocity(np.zeros((2, 6)), np.full(2, 0.5), path, None, kind="linear")
    assert "kind" not in rec.calls[0] and "patch_size" not in rec.calls[0]  # today's SDK call, unchanged
    assert rec.calls[1]["kind"] == "equivariant" and rec.calls[1]["patch_size"] == 5
    assert rec.calls[2]["kind"] == "linear" and "patch_size" not in rec.calls[2]


def test_cnn_example_trains_and_is_studied_against_the_kinds(tmp_path: Path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    """examples/digits_cnn.py trains and saves; `analyze model --kinds` studies it (a few steps here)."""
    example = Path(__file__).resolve().parents[3] / "examples" / "digits_cnn.py"
    weights = tmp_path / "cnn.pt"
    monkeypatch.setenv("FLOWORACLE_DIGITS_CNN", str(weights))
    spec = importlib.util.spec_from_file_location("digits_cnn_import", example)
    assert spec is not None and spec.loader is not None
    with pytest.raises(RuntimeError, match="train the model first"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    monkeypatch.setattr(sys, "argv", ["digits_cnn.py", "--steps", "5"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(example), run_name="__main__")
    assert done.value.code == 0 and weights.is_file()
    capsys.readouterr()
    out_json = tmp_path / "cnn.json"
    rc = main(["analyze", "model", "--model", f"{example}:model", "--dataset", "digits", "--holdout", "0.2",
               "--queries-per-t", "4", "--samples", "4", "--steps", "2", "--t-grid", "0.3,0.9", "--no-progress",
               "--kinds", "local,linear", "--patch-size", "0:5,0.5:3", "--kind-queries", "2", "--json", str(out_json)])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert "tr:closest" in capsys.readouterr().out
    rep = json.loads(out_json.read_text())["kinds"]
    assert set(rep["x1"]["train"]) == {"global", "local", "linear"} and len(rep["closest"]["heldout"]) == 2
