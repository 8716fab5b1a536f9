"""Index directories: build + load equals the source, fingerprints are stable and sensitive,
tampering is refused, and the CLI builds and describes an index."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from floworacle_server.cli import main
from floworacle_server.data import Dataset, build_index, fingerprint_arrays, load_dataset, load_index, read_manifest


@pytest.fixture
def src(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((70, 2, 4, 4)).astype(np.float32)
    y = rng.integers(0, 4, 70)
    w = rng.uniform(0.5, 1.5, 70)
    np.savez(tmp_path / "src.npz", x=x, labels=y, weights=w)
    return tmp_path / "src.npz", x, y, w


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_build_then_load_equals_source(tmp_path: Path, src, dtype: str) -> None:
    path, x, y, w = src
    manifest = build_index(path, tmp_path / "idx", scale_factor=0.25, dtype=dtype, progress=False)
    ds = load_index(tmp_path / "idx")
    ref = Dataset.from_arrays("ref", x, y, w, scale_factor=0.25, dtype=dtype)
    assert ds.fingerprint == manifest["fingerprint"] == ref.fingerprint
    assert torch.equal(ds.x, ref.x) and ds.x.dtype == ref.x.dtype
    assert torch.equal(ds.labels, ref.labels)  # type: ignore[arg-type]
    assert torch.allclose(ds.log_weights, ref.log_weights, rtol=0, atol=0)  # type: ignore[arg-type]
    assert torch.equal(ds.original_index, ref.original_index)
    assert ds.sample_shape == (2, 4, 4) and ds.scale_factor == 0.25
    assert manifest["num_classes"] == int(y.max()) + 1 and manifest["has_labels"] and manifest["has_weights"]
    # the stored values are the source scaled and rounded (float64 reference in the caller's order)
    back = ds.x[torch.argsort(ds.original_index)].double().numpy()
    tol = {"float32": 1e-7, "float16": 1e-3, "bfloat16": 8e-3}[dtype]
    np.testing.assert_allclose(back, 0.25 * x.reshape(70, -1).astype(np.float64), rtol=tol, atol=tol * 1e-2)


def test_fingerprint_is_stable_and_sensitive() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((50, 6)).astype(np.float32)
    y = rng.integers(0, 3, 50)
    w = rng.uniform(0.5, 1.0, 50)
    base = fingerprint_arrays(x, y, w)
    assert base == fingerprint_arrays(x.copy(), y.copy(), w.copy())
    assert base == fingerprint_arrays(x, y, w, chunk_rows=7)  # chunking does not change the digest
    x2 = x.copy()
    x2[31, 4] = np.nextafter(x2[31, 4], np.float32(np.inf))  # one ulp of one value
    y2 = y.copy()
    y2[0] = (y2[0] + 1) % 3
    w2 = w.copy()
    w2[49] *= 1 + 1e-12
    variants = [
        fingerprint_arrays(x2, y, w),
        fingerprint_arrays(x, y2, w),
        fingerprint_arrays(x, y, w2),
        fingerprint_arrays(x, None, w),
        fingerprint_arrays(x, y, None),
        fingerprint_arrays(x.reshape(50, 2, 3), y, w),
        fingerprint_arrays(x, y, w, dtype_name="float16"),
    ]
    assert len({base, *variants}) == len(variants) + 1


def _flip_byte(path: Path, offset_from_end: int) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("target", ["data.npy", "labels.npy", "weights.npy"])
def test_tampered_index_refuses_to_load(tmp_path: Path, src, target: str) -> None:
    path, *_ = src
    build_index(path, tmp_path / "idx", progress=False)
    _flip_byte(tmp_path / "idx" / target, 3)  # a high byte of the last value
    with pytest.raises(ValueError, match="do not match the manifest fingerprint|label file does not match"):
        load_index(tmp_path / "idx")
    if target == "labels.npy":
        # even unverified, a label file out of the manifest's class range is refused
        with pytest.raises(ValueError, match="label file does not match"):
            load_index(tmp_path / "idx", verify=False)
    else:
        ds = load_index(tmp_path / "idx", verify=False)  # an explicit opt-out still loads
        assert ds.num_samples == 70


def test_flipped_low_bit_of_a_label_is_caught_by_the_fingerprint(tmp_path: Path, src) -> None:
    path, *_ = src
    build_index(path, tmp_path / "idx", progress=False)
    lab_path = tmp_path / "idx" / "labels.npy"
    labels = np.load(lab_path)
    i = int(np.flatnonzero(labels == 1)[0])
    labels[i] = 2  # still a valid class: only the fingerprint can notice
    np.save(lab_path, labels)
    with pytest.raises(ValueError, match="do not match the manifest fingerprint"):
        load_index(tmp_path / "idx")


def test_manifest_mismatch_and_versions(tmp_path: Path, src) -> None:
    path, *_ = src
    build_index(path, tmp_path / "idx", progress=False)
    mpath = tmp_path / "idx" / "manifest.json"
    manifest = json.loads(mpath.read_text())
    manifest["num_samples"] = 71
    mpath.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="manifest says"):
        load_index(tmp_path / "idx", verify=False)
    manifest["num_samples"] = 70
    manifest["format_version"] = 99
    mpath.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="format version 99"):
        read_manifest(tmp_path / "idx")


def test_build_refuses_existing_and_bad_input(tmp_path: Path, src) -> None:
    path, x, *_ = src
    build_index(path, tmp_path / "idx", progress=False)
    with pytest.raises(ValueError, match="not empty"):
        build_index(path, tmp_path / "idx", progress=False)
    build_index(path, tmp_path / "idx", progress=False, overwrite=True, name="again")
    assert read_manifest(tmp_path / "idx")["name"] == "again"
    with pytest.raises(ValueError, match="storage dtype"):
        build_index(path, tmp_path / "i2", dtype="int8", progress=False)
    with pytest.raises(ValueError, match="overflows float16"):
        build_index(x * 1e5, tmp_path / "i3", dtype="float16", progress=False)
    with pytest.raises(ValueError, match="labels must be >= 0"):
        build_index(x, tmp_path / "i4", labels=-np.ones(70, dtype=np.int64), progress=False)


def test_load_dataset_accepts_an_index(tmp_path: Path, src) -> None:
    path, *_ = src
    build_index(path, tmp_path / "idx", name="mine", progress=False)
    ds = load_dataset(tmp_path / "idx")
    assert ds.name == "mine" and ds.num_samples == 70
    with pytest.raises(ValueError, match="fixed at build time"):
        load_dataset(tmp_path / "idx", scale_factor=2.0)


def test_cli_build_and_info(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((30, 3, 4)).astype(np.float32)
    y = rng.integers(0, 2, 30)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    out = tmp_path / "idx"
    rc = main(["index", "build", str(tmp_path / "x.npy"), str(out), "--labels", str(tmp_path / "y.npy"),
               "--dtype", "float16", "--scale-factor", "0.5", "--name", "small", "--no-progress"])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out.strip().splitlines()
    expected = Dataset.from_arrays("x", x, y, scale_factor=0.5, dtype="float16").fingerprint
    assert printed[-1] == expected
    rc = main(["index", "info", str(out), "--verify"])
    assert rc == 0
    info = capsys.readouterr().out
    manifest = json.loads(info[: info.rindex("}") + 1])
    assert manifest["name"] == "small" and manifest["sample_shape"] == [3, 4] and manifest["dtype"] == "float16"
    assert manifest["fingerprint"] == expected and "fingerprint verified" in info
    assert main(["index", "info", str(tmp_path)]) == 2
    assert "not an index directory" in capsys.readouterr().err
