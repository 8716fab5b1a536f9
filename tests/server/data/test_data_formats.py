"""Each file format round-trips samples, labels and weights; bad input gives a clear ValueError."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from floworacle_server.data import Dataset, load_arrays, load_dataset


@pytest.fixture
def arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((40, 4, 3, 2)).astype(np.float32)
    y = rng.integers(0, 5, 40)
    w = rng.uniform(0.1, 2.0, 40)
    return x, y, w


def _write(fmt: str, path: Path, x: np.ndarray, y: np.ndarray, w: np.ndarray) -> Path:
    if fmt == "npy":
        np.save(path / "x.npy", x)
        return path / "x.npy"
    if fmt == "npz":
        np.savez(path / "x.npz", data=x, y=y, weights=w)
        return path / "x.npz"
    if fmt == "safetensors":
        save_file(
            {"x": torch.from_numpy(x), "labels": torch.from_numpy(y), "weights": torch.from_numpy(w)},
            path / "x.safetensors",
        )
        return path / "x.safetensors"
    if fmt == "pt":
        torch.save(
            {"data": torch.from_numpy(x), "labels": torch.from_numpy(y), "weights": torch.from_numpy(w)}, path / "x.pt"
        )
        return path / "x.pt"
    raise AssertionError(fmt)


@pytest.mark.parametrize("fmt", ["npy", "npz", "safetensors", "pt"])
def test_round_trip_keeps_values_and_shape(tmp_path: Path, arrays, fmt: str) -> None:
    x, y, w = arrays
    path = _write(fmt, tmp_path, x, y, w)
    loaded = load_arrays(path)
    assert loaded.sample_shape == (4, 3, 2)
    np.testing.assert_array_equal(np.asarray(loaded.x), x)
    if fmt == "npy":
        assert isinstance(loaded.x, np.memmap)  # memory-mapped, not read whole
        assert loaded.labels is None
    else:
        np.testing.assert_array_equal(np.asarray(loaded.labels), y)
        np.testing.assert_array_equal(np.asarray(loaded.weights), w)
    ds = load_dataset(path)
    assert ds.sample_shape == (4, 3, 2) and ds.dim == 24 and ds.num_samples == 40
    rows = torch.argsort(ds.original_index)  # back to the caller's order
    np.testing.assert_array_equal(ds.x[rows].numpy(), x.reshape(40, -1))


def test_pt_plain_tensor_and_separate_label_file(tmp_path: Path, arrays) -> None:
    x, y, _ = arrays
    torch.save(torch.from_numpy(x), tmp_path / "x.pt")
    np.save(tmp_path / "y.npy", y)
    loaded = load_arrays(tmp_path / "x.pt", labels=tmp_path / "y.npy")
    np.testing.assert_array_equal(loaded.x.numpy(), x)
    np.testing.assert_array_equal(loaded.labels, y)
    ds = load_dataset(tmp_path / "x.pt", labels=tmp_path / "y.npy")
    assert ds.labels is not None and ds.num_classes == int(y.max()) + 1
    np.testing.assert_array_equal(ds.labels.numpy(), y[ds.original_index.numpy()])


def test_bfloat16_safetensors(tmp_path: Path) -> None:
    x = torch.randn(10, 8).to(torch.bfloat16)
    save_file({"x": x}, tmp_path / "b.safetensors")
    ds = load_dataset(tmp_path / "b.safetensors", dtype="bfloat16")
    assert ds.x.dtype == torch.bfloat16 and torch.equal(ds.x, x)


def test_fingerprint_does_not_depend_on_format(tmp_path: Path, arrays) -> None:
    x, y, w = arrays
    fps = {fmt: load_dataset(_write(fmt, tmp_path, x, y, w)).fingerprint for fmt in ["npz", "safetensors", "pt"]}
    assert len(set(fps.values())) == 1
    assert fps["npz"] == Dataset.from_arrays("a", x, y, w).fingerprint


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: (p / "x.csv").write_text("1,2"), "unknown file type"),
        (lambda p: np.savez(p / "x.npz", images=np.zeros((3, 2))), "no samples found"),
        (lambda p: np.save(p / "x.npy", np.array([[1.0, np.nan], [0.0, 1.0]])), "sample 0 has a NaN"),
        (lambda p: np.save(p / "x.npy", np.zeros(5)), "at least 2 dimensions"),
        (lambda p: np.savez(p / "x.npz", x=np.zeros((3, 2)), labels=np.array([0, 1])), "labels must have shape (3,)"),
        (lambda p: np.savez(p / "x.npz", x=np.zeros((3, 2)), labels=np.array([0, 1.5, 2])), "labels must be integers"),
        (lambda p: np.savez(p / "x.npz", x=np.zeros((3, 2)), labels=np.array([0, -1, 2])), "labels must be >= 0"),
        (lambda p: np.savez(p / "x.npz", x=np.zeros((3, 2)), weights=np.array([0.0, 0.0, 0.0])), "not all zero"),
        (lambda p: np.savez(p / "x.npz", x=np.zeros((3, 2)), weights=np.array([1.0, 1.0])), "weights must have shape"),
    ],
)
def test_bad_input_raises_value_error(tmp_path: Path, setup, message: str) -> None:
    setup(tmp_path)
    (path,) = list(tmp_path.iterdir())
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_arrays(path)


def test_missing_file_and_unknown_spec(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not found"):
        load_dataset(tmp_path / "nope.npy")
    with pytest.raises(ValueError, match="without a manifest"):
        load_dataset(tmp_path)
