"""faiss indexes in index directories: built from the CLI, loaded with the data set, refused when
built for other vectors or changed on disk."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from floworacle_server.cli import main
from floworacle_server.data import build_index, load_dataset, load_index, read_manifest


def _data(seed: int, n: int = 800, d: int = 6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (3.0 * rng.standard_normal((10, d))[rng.integers(0, 10, n)] + rng.standard_normal((n, d))).astype(np.float32)


def test_cli_builds_indexes_and_the_loader_attaches_them(tmp_path: Path, capsys) -> None:
    x = _data(0)
    f = np.random.default_rng(1).standard_normal((800, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "f.npy", f)
    out = tmp_path / "idx"
    rc = main(["index", "build", str(tmp_path / "x.npy"), str(out), "--features", str(tmp_path / "f.npy"),
               "--nearest-index", "ivf:nlist=8,queries=100", "--features-index", "ivfpq:nlist=4,m=2,nbits=4,queries=100",
               "--no-progress"])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "data index IVF8,Flat: recall@10 = " in printed and "features index IVF4,PQ2x4" in printed
    manifest = read_manifest(out)
    entries = {e["space"]: e for e in manifest["nearest_indexes"]}
    assert set(entries) == {"data", "features"}
    assert entries["data"]["fingerprint"] == manifest["data_fingerprint"]
    assert entries["features"]["fingerprint"] == manifest["features"]["fingerprint"]
    for e in entries.values():
        assert (out / e["file"]).stat().st_size == e["bytes"] and e["file_sha256"].startswith("sha256:")
        assert 0.0 < e["recall"] <= 1.0 and e["recall_k"] == 10 and e["build_seconds"]["total"] > 0
    ds = load_dataset(out)
    assert set(ds.nearest_indexes) == {"data", "features"}
    assert ds.nearest_indexes["data"].index.ntotal == 800 and ds.nearest_indexes["data"].device == "cpu"
    # add-nearest replaces the space's index (one per space) and index info shows the entry
    assert main(["index", "add-nearest", str(out), "ivf:nlist=16,queries=50", "--no-progress"]) == 0
    assert "IVF16,Flat" in capsys.readouterr().out
    manifest = read_manifest(out)
    assert [e["params"] for e in manifest["nearest_indexes"] if e["space"] == "data"] == ["IVF16,Flat"]
    assert main(["index", "info", str(out), "--verify"]) == 0
    info = capsys.readouterr().out
    assert "fingerprint verified" in info and '"recall_by_nprobe"' in info
    assert main(["index", "add-nearest", str(out), "flat"]) == 2
    assert "index kind must be one of" in capsys.readouterr().err


def test_an_index_built_for_other_data_is_refused(tmp_path: Path) -> None:
    build_index(_data(0), tmp_path / "a", progress=False)
    build_index(_data(1), tmp_path / "b", progress=False)
    assert main(["index", "add-nearest", str(tmp_path / "a"), "ivf:nlist=8,queries=50", "--no-progress"]) == 0
    # graft a's index into b: same shape, other data
    entry = read_manifest(tmp_path / "a")["nearest_indexes"][0]
    shutil.copy(tmp_path / "a" / entry["file"], tmp_path / "b" / entry["file"])
    mb = read_manifest(tmp_path / "b")
    mb["nearest_indexes"] = [entry]
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(mb))
    for verify in (True, False):  # the fingerprint check is cheap: it runs without verify too
        with pytest.raises(ValueError, match="was built for vectors with fingerprint"):
            load_index(tmp_path / "b", verify=verify)
    load_index(tmp_path / "a")


def test_a_changed_index_file_is_refused(tmp_path: Path) -> None:
    build_index(_data(2), tmp_path / "a", progress=False)
    assert main(["index", "add-nearest", str(tmp_path / "a"), "ivf:nlist=8,queries=50", "--no-progress"]) == 0
    entry = read_manifest(tmp_path / "a")["nearest_indexes"][0]
    path = tmp_path / "a" / entry["file"]
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="does not match its recorded sha256"):
        load_index(tmp_path / "a")
    path.write_bytes(b"not a faiss index")
    with pytest.raises(ValueError, match="cannot read the faiss index"):
        load_index(tmp_path / "a", verify=False)
    path.unlink()
    with pytest.raises(ValueError, match="missing"):
        load_index(tmp_path / "a")


def test_rebuilding_the_data_drops_the_old_index(tmp_path: Path) -> None:
    build_index(_data(3), tmp_path / "a", progress=False)
    assert main(["index", "add-nearest", str(tmp_path / "a"), "ivf:nlist=8,queries=50", "--no-progress"]) == 0
    build_index(_data(4), tmp_path / "a", progress=False, overwrite=True)
    assert "nearest_indexes" not in read_manifest(tmp_path / "a")
    assert load_index(tmp_path / "a").nearest_indexes == {}
