"""``index build --holdout``: two index directories from one file, deterministic per seed, each
with its own fingerprint, labels / weights / features following their samples; the in-memory
split gives the same parts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from floworacle_server.cli import main
from floworacle_server.data import Dataset, holdout_split, load_dataset, load_index, read_manifest, split_dataset


@pytest.fixture
def src(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((61, 2, 3)).astype(np.float32)
    y = rng.integers(0, 4, 61)
    w = rng.uniform(0.5, 1.5, 61)
    np.savez(tmp_path / "src.npz", x=x, labels=y, weights=w)
    return tmp_path / "src.npz", x, y, w


def test_holdout_split_rows() -> None:
    train, held = holdout_split(101, 0.2, seed=7)
    assert held.size == 20 and train.size == 81  # round(0.2 * 101)
    assert np.array_equal(np.sort(np.concatenate([train, held])), np.arange(101))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(held) > 0)
    again = holdout_split(101, 0.2, seed=7)
    assert np.array_equal(again[1], held)
    assert not np.array_equal(holdout_split(101, 0.2, seed=8)[1], held)
    for bad in (0.0, 1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="strictly between 0 and 1"):
            holdout_split(10, bad, 0)
    with pytest.raises(ValueError, match="no held-out sample"):
        holdout_split(10, 0.01, 0)
    with pytest.raises(ValueError, match="no training sample"):
        holdout_split(10, 0.99, 0)


def test_cli_builds_two_parts(tmp_path: Path, src, capsys) -> None:
    path, x, y, w = src
    feats = np.random.default_rng(1).standard_normal((61, 5)).astype(np.float32)
    np.save(tmp_path / "feats.npy", feats)
    out = tmp_path / "split"
    rc = main(["index", "build", str(path), str(out), "--holdout", "0.25", "--seed", "3", "--no-progress",
               "--features", str(tmp_path / "feats.npy"), "--name", "toy"])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    train_rows, held_rows = holdout_split(61, 0.25, 3)
    fps = {}
    for part, rows in (("train", train_rows), ("heldout", held_rows)):
        d = out / part
        m = read_manifest(d)
        assert m["name"] == f"toy-{part}" and m["num_samples"] == rows.size
        assert np.array_equal(np.load(d / "source_rows.npy"), rows)
        ds = load_index(d)  # verifies the fingerprint
        ref = Dataset.from_arrays("ref", x[rows], y[rows], w[rows])
        assert ds.fingerprint == m["fingerprint"] and m["data_fingerprint"] == ref.fingerprint
        # samples, labels and weights follow their source rows
        back = ds.x[ds.rows_of(torch.arange(rows.size))].double().numpy()
        np.testing.assert_array_equal(back, x[rows].reshape(rows.size, -1).astype(np.float64))
        assert ds.labels is not None and ds.log_weights is not None
        lab = ds.labels[ds.rows_of(torch.arange(rows.size))].numpy()
        assert np.array_equal(lab, y[rows])
        logw = ds.log_weights[ds.rows_of(torch.arange(rows.size))].numpy()
        np.testing.assert_allclose(np.exp(logw), w[rows] / w[rows].sum(), rtol=1e-12)
        assert ds.features is not None
        np.testing.assert_array_equal(np.load(d / "features.npy"), feats[rows])
        fps[part] = m["fingerprint"]
        assert f"{part}: {m['fingerprint']}" in printed
    assert fps["train"] != fps["heldout"]
    for part, other in (("train", "heldout"), ("heldout", "train")):
        sec = read_manifest(out / part)["split"]
        assert sec == {
            "part": part, "fraction": 0.25, "seed": 3, "source": "src.npz", "source_samples": 61,
            "num_samples": int(read_manifest(out / part)["num_samples"]), "source_rows": "source_rows.npy",
            "other_part": other, "other_fingerprint": fps[other],
        }  # fmt: skip

    # the same seed gives the same parts, another seed other parts
    rc = main(["index", "build", str(path), str(tmp_path / "again"), "--holdout", "0.25", "--seed", "3",
               "--no-progress", "--features", str(tmp_path / "feats.npy"), "--name", "toy"])  # fmt: skip
    assert rc == 0
    assert read_manifest(tmp_path / "again" / "heldout")["fingerprint"] == fps["heldout"]
    rc = main(["index", "build", str(path), str(tmp_path / "other"), "--holdout", "0.25", "--seed", "4",
               "--no-progress"])  # fmt: skip
    assert rc == 0
    other_rows = np.load(tmp_path / "other" / "heldout" / "source_rows.npy")
    assert not np.array_equal(other_rows, held_rows)
    assert read_manifest(tmp_path / "other" / "heldout")["name"] == "other-heldout"


def test_cli_split_errors(tmp_path: Path, src, capsys) -> None:
    path, *_ = src
    assert main(["index", "build", str(path), str(tmp_path / "a"), "--seed", "1", "--no-progress"]) == 2
    assert "--seed is the seed of a --holdout split" in capsys.readouterr().err
    assert main(["index", "build", str(path), str(tmp_path / "b"), "--holdout", "1.5", "--no-progress"]) == 2
    assert "strictly between 0 and 1" in capsys.readouterr().err
    assert main(["index", "build", str(path), str(tmp_path / "idx"), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["index", "build", str(path), str(tmp_path / "idx"), "--holdout", "0.2", "--no-progress"]) == 2
    assert "is an index directory; a split writes" in capsys.readouterr().err
    # an existing split is replaced only with --force
    assert main(["index", "build", str(path), str(tmp_path / "s"), "--holdout", "0.2", "--no-progress"]) == 0
    assert main(["index", "build", str(path), str(tmp_path / "s"), "--holdout", "0.2", "--no-progress"]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert main(["index", "build", str(path), str(tmp_path / "s"), "--holdout", "0.2", "--seed", "9",
                 "--no-progress", "--force"]) == 0  # fmt: skip
    assert json.loads((tmp_path / "s" / "train" / "manifest.json").read_text())["split"]["seed"] == 9


def test_in_memory_split_equals_the_file_split(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    x = rng.standard_normal((40, 6)).astype(np.float32)
    y = rng.integers(0, 3, 40)
    np.savez(tmp_path / "s.npz", x=x, labels=y)
    assert main(["index", "build", str(tmp_path / "s.npz"), str(tmp_path / "out"), "--holdout", "0.3",
                 "--seed", "2", "--no-progress"]) == 0  # fmt: skip
    train, held = split_dataset(load_dataset(tmp_path / "s.npz", name="s"), 0.3, 2)
    assert (train.name, held.name) == ("s-train", "s-heldout")
    assert train.fingerprint == read_manifest(tmp_path / "out" / "train")["fingerprint"]
    assert held.fingerprint == read_manifest(tmp_path / "out" / "heldout")["fingerprint"]
