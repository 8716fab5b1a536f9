"""Read training samples (and optional labels and weights) from the file formats users have.

Every reader returns :class:`LoadedArrays` without copying more than it must: ``.npy`` files
are memory-mapped, the others are read once. Validation (finite values, lengths, label range)
lives here too so that the index builder and :func:`load_dataset` give the same messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "STORAGE_DTYPES",
    "LoadedArrays",
    "SUPPORTED_SUFFIXES",
    "load_arrays",
    "load_side_array",
    "read_npy",
    "unreadable",
    "validate_arrays",
]

#: Storage dtypes of a resident data set, by name.
STORAGE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

#: File suffixes :func:`load_arrays` understands.
SUPPORTED_SUFFIXES = (".npy", ".npz", ".safetensors", ".pt", ".pth")

_DATA_KEYS = ("x", "data", "arr_0")
_LABEL_KEYS = ("labels", "y")
_WEIGHT_KEYS = ("weights",)
_CHECK_ROWS = 65536  # rows per block when scanning (possibly memory-mapped) data for NaN/Inf


@dataclass
class LoadedArrays:
    """Samples as read from disk.

    Attributes:
        x: (N, *sample_shape) samples, a numpy array (possibly memory-mapped) or a CPU tensor.
        labels: (N,) labels or None.
        weights: (N,) non-negative sample weights or None.
        sample_shape: shape of one sample, e.g. (64,) or (4, 32, 32).
        source: where the samples came from (for messages).
    """

    x: Any
    labels: Any | None
    weights: Any | None
    sample_shape: tuple[int, ...]
    source: str

    @property
    def num_samples(self) -> int:
        return int(self.x.shape[0])


def _pick(mapping: dict[str, Any], keys: tuple[str, ...]) -> Any | None:
    for key in keys:
        if key in mapping:
            return mapping[key]
    return None


_ALL_KEYS = (*_DATA_KEYS, *_LABEL_KEYS, *_WEIGHT_KEYS)


def _from_mapping(mapping: dict[str, Any], found: list[str], path: Path) -> tuple[Any, Any | None, Any | None]:
    """Pick samples, labels and weights out of ``mapping`` (holding only the known keys of ``found``)."""
    x = _pick(mapping, _DATA_KEYS)
    if x is None:
        raise ValueError(
            f"{path}: no samples found; store them under one of the keys {list(_DATA_KEYS)} (found keys {sorted(found)})"
        )
    return x, _pick(mapping, _LABEL_KEYS), _pick(mapping, _WEIGHT_KEYS)


def unreadable(path: Path, exc: BaseException) -> str:
    """Why ``path`` could not be read, in a few words (``exc`` is what reading it raised)."""
    if path.is_symlink() and not path.exists():
        return "it is a link to a file that does not exist"
    if not path.exists():
        return "it does not exist"
    if path.is_dir():
        return "it is a directory"
    if isinstance(exc, EOFError) or path.stat().st_size == 0:
        return "it is empty (0 bytes)"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return f"it is not a valid {path.suffix or 'data'} file ({type(exc).__name__}: {exc})"


def read_npy(path: Path, *, mmap: bool = False) -> np.ndarray:
    """``np.load`` of a .npy file (memory-mapped with ``mmap``), no pickles.

    Raises:
        ValueError: the file cannot be read; the message is :func:`unreadable`'s reason.
    """
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, EOFError, ValueError) as exc:
        raise ValueError(unreadable(path, exc)) from exc


def _read(path: Path) -> tuple[Any, Any | None, Any | None]:
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise ValueError(
            f"{path}: unknown file type {suffix!r}; use one of {', '.join(SUPPORTED_SUFFIXES)} or an index directory"
        )
    try:
        obj, names = _open(path, suffix)
    except Exception as exc:  # whatever a format's reader raises for a broken file: one line that says why
        raise ValueError(f"cannot read {path}: {unreadable(path, exc)}") from exc
    if names is not None:
        return _from_mapping(obj, names, path)
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return obj, None, None
    if isinstance(obj, dict):
        return _from_mapping(obj, [str(k) for k in obj], path)
    raise ValueError(f"{path}: expected a tensor or a dict of tensors, found {type(obj).__name__}")


def _open(path: Path, suffix: str) -> tuple[Any, list[str] | None]:
    """What ``path`` holds: (array, None) for .npy, (the known keys' arrays, every key) for .npz and
    .safetensors, (the loaded object, None) for .pt."""
    if suffix == ".npy":
        return np.load(path, mmap_mode="r", allow_pickle=False), None
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as npz:
            # only the arrays we use are decompressed
            return {k: npz[k] for k in npz.files if k in _ALL_KEYS}, list(npz.files)
    if suffix == ".safetensors":
        from safetensors import safe_open

        # framework="pt" keeps bfloat16 tensors readable (numpy has no bfloat16)
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())
            return {k: f.get_tensor(k) for k in names if k in _ALL_KEYS}, names
    return torch.load(path, map_location="cpu", weights_only=True), None


def load_side_array(path: str | Path, what: str) -> Any:
    """Read a labels or weights array from its own file (.npy, or any format above holding one array)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"cannot read the {what} file {p}: {unreadable(p, OSError())}")
    if p.suffix.lower() == ".npy":
        try:
            return read_npy(p)
        except ValueError as exc:
            raise ValueError(f"cannot read the {what} file {p}: {exc}") from None
    arr, _, _ = _read(p)
    return arr


def load_arrays(
    path: str | Path,
    *,
    labels: Any | None = None,
    weights: Any | None = None,
    validate: bool = True,
) -> LoadedArrays:
    """Read samples from ``path`` (.npy, .npz, .safetensors, .pt/.pth).

    Args:
        path: the data file. ``.npz``/``.safetensors``/``.pt`` dicts hold the samples under
            ``x``, ``data`` or ``arr_0`` and optionally ``labels`` (or ``y``) and ``weights``.
        labels: labels as an array, or a path to a file holding them; overrides stored labels.
        weights: sample weights as an array or a path; overrides stored weights.
        validate: check values and lengths (see :func:`validate_arrays`).

    Returns:
        LoadedArrays with x of shape (N, *sample_shape).

    Raises:
        ValueError: unknown extension, missing key, bad shapes, non-finite values, bad labels.
    """
    p = Path(path)
    if not p.exists():
        raise ValueError(f"data file {p} does not exist")
    if p.is_dir():
        raise ValueError(f"{p} is a directory; load index directories with load_index / load_dataset")
    x, lab, w = _read(p)
    if isinstance(labels, (str, Path)):
        labels = load_side_array(labels, "labels")
    if isinstance(weights, (str, Path)):
        weights = load_side_array(weights, "weights")
    lab = labels if labels is not None else lab
    w = weights if weights is not None else w
    if not isinstance(x, (np.ndarray, torch.Tensor)):
        raise ValueError(f"{p}: samples must be an array or tensor, found {type(x).__name__}")
    if x.ndim < 2:
        raise ValueError(f"{p}: samples must have shape (N, ...) with at least 2 dimensions, got {tuple(x.shape)}")
    loaded = LoadedArrays(x=x, labels=lab, weights=w, sample_shape=tuple(int(s) for s in x.shape[1:]), source=str(p))
    if validate:
        validate_arrays(loaded.x, loaded.labels, loaded.weights, source=loaded.source)
    return loaded


def _is_float_or_int(a: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return a.is_floating_point() or not (a.is_complex() or a.dtype == torch.bool)
    return np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)


def _to_numpy_block(a: Any) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        t = a.detach().cpu()
        return (t.float() if t.dtype in (torch.bfloat16, torch.float16) else t).numpy()
    return np.asarray(a)


def validate_arrays(x: Any, labels: Any | None, weights: Any | None, *, source: str = "data") -> int:
    """Check samples, labels and weights; return the number of classes (0 without labels).

    Samples: (N, ...) with N >= 1, real numbers, all finite (scanned in blocks, so a
    memory-mapped file is never read whole). Labels: (N,), integer values >= 0. Weights: (N,),
    finite, >= 0, not all zero.

    Raises:
        ValueError: naming the first offending sample and how to fix it.
    """
    shape = tuple(int(s) for s in x.shape)
    if len(shape) < 2 or shape[0] == 0:
        raise ValueError(f"{source}: samples must have shape (N, ...) with N >= 1, got {shape}")
    if not _is_float_or_int(x):
        raise ValueError(f"{source}: samples must be real numbers (float or int), got dtype {x.dtype}")
    n = shape[0]
    for start in range(0, n, _CHECK_ROWS):
        block = _to_numpy_block(x[start : start + _CHECK_ROWS]).reshape(min(_CHECK_ROWS, n - start), -1)
        if np.issubdtype(block.dtype, np.floating):
            bad_rows = ~np.isfinite(block).all(axis=1)
            if bad_rows.any():
                raise ValueError(
                    f"{source}: sample {start + int(np.argmax(bad_rows))} has a NaN or Inf; clean or drop it"
                )
    num_classes = 0
    if labels is not None:
        lab = _to_numpy_block(labels)
        if lab.shape != (n,):
            raise ValueError(f"{source}: labels must have shape ({n},) to match {n} samples, got {lab.shape}")
        if np.issubdtype(lab.dtype, np.floating):
            if not np.isfinite(lab).all() or not np.array_equal(lab, np.round(lab)):
                raise ValueError(f"{source}: labels must be integers (class indices 0..C-1), found non-integer values")
        elif not np.issubdtype(lab.dtype, np.integer):
            raise ValueError(f"{source}: labels must be integers (class indices 0..C-1), got dtype {lab.dtype}")
        if (lab < 0).any():
            raise ValueError(f"{source}: labels must be >= 0 (class indices 0..C-1); found {int(lab.min())}")
        num_classes = int(lab.max()) + 1
    if weights is not None:
        w = _to_numpy_block(weights)
        if w.shape != (n,):
            raise ValueError(f"{source}: weights must have shape ({n},) to match {n} samples, got {w.shape}")
        w = w.astype(np.float64)
        if not np.isfinite(w).all() or (w < 0).any() or not (w > 0).any():
            raise ValueError(f"{source}: weights must be finite, >= 0 and not all zero")
    return num_classes
