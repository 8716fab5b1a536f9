"""``floworacle analyze kinds``: samples of every oracle kind. The local kind's ODE equals an Euler
integration written here over the plain-loop reference; the global oracle's samples are copies,
the other kinds' are not; the command writes its table, JSON, grid and samples."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from floworacle.paths import get_path
from floworacle.sampling import time_grid
from floworacle_server.analysis import kind_velocity, sample_kinds
from floworacle_server.cli import main
from floworacle_server.data import Dataset
from patch_reference import local_reference

SHAPE = (1, 4, 4)


@pytest.fixture(scope="module")
def small() -> Dataset:
    rng = np.random.default_rng(0)
    return Dataset.from_arrays("small", (rng.integers(0, 9, (12, *SHAPE)) / 4.0 - 1).astype(np.float32))


def test_local_samples_equal_an_euler_loop_over_the_reference(small: Dataset) -> None:
    path = get_path("linear")
    got = sample_kinds(small, ["local"], num_samples=3, steps=5, patch_size=3, seed=1)["local"].samples
    # the same noise as sample_kinds draws, integrated here with the reference oracle
    x0 = np.random.default_rng([1, 23]).standard_normal((3, 16))
    data = small.x[small.rows_of(torch.arange(12))].double().numpy()  # the caller's order
    x = x0.copy()
    grid = time_grid(5)
    for t0, t1 in zip(grid[:-1], grid[1:], strict=True):
        c = path.coefficients(np.full(3, t0))
        x1 = np.array([local_reference(data, x[b], c.alpha[b], c.sigma[b], 3, SHAPE) for b in range(3)])
        x = x + (t1 - t0) * (c.velocity_x1[:, None] * x1 + c.velocity_xt[:, None] * x)
    np.testing.assert_allclose(got, x, rtol=0, atol=1e-10)


def test_global_samples_copy_the_data_the_others_do_not(small: Dataset) -> None:
    res = sample_kinds(small, ["global", "local", "linear"], num_samples=6, steps=20, patch_size=1)
    assert res["global"].report.copy_fraction == 1.0
    assert res["linear"].report.copy_fraction < 1.0 and res["local"].report.copy_fraction < 1.0
    v = kind_velocity(small, "linear", get_path("linear"))
    assert v(np.zeros((2, 16)), np.array([0.3, 0.6])).shape == (2, 16)
    with pytest.raises(ValueError, match="needs a patch size"):
        kind_velocity(small, "equivariant", get_path("linear"))


def test_cli_writes_table_json_grid_and_samples(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(2)
    np.save(tmp_path / "x.npy", (rng.integers(0, 9, (10, 16)) / 4.0 - 1).astype(np.float32))
    args = ["analyze", "kinds", "--data", str(tmp_path / "x.npy"), "--samples", "3", "--steps", "4",
            "--json", str(tmp_path / "k.json"), "--plot", str(tmp_path / "k.png"), "--save-samples", str(tmp_path / "s")]  # fmt: skip
    assert main(args) == 2  # flat data: the patch kinds need an image shape
    assert "image_shape NAME=C,H,W" in capsys.readouterr().err
    assert main([*args, "--image-shape", "1,4,4", "--patch-size", "0:3,0.5:1"]) == 0
    out = capsys.readouterr().out
    assert "equivariant" in out and "copy share" in out
    rep = json.loads((tmp_path / "k.json").read_text())
    assert set(rep["kinds"]) == {"global", "local", "equivariant", "linear"}
    assert rep["patch_size"] == [[0.0, 3], [0.5, 1]]
    assert (tmp_path / "k.png").stat().st_size > 0
    assert np.load(tmp_path / "s" / "local.npy").shape == (3, 16)
    assert main(["analyze", "kinds", "--dataset", "digits", "--kinds", "nonlocal"]) == 2
