"""Index directories: a data set converted once to its storage dtype, with a manifest that
describes it and a fingerprint that proves the bytes on disk are the ones that were written.

Layout of a directory::

    manifest.json   format, version, name, N, sample_shape, dtype, scale_factor, labels, fingerprint,
                    and the optional "features" and "nearest_indexes" sections
    data.npy        (N, *sample_shape) stored values (bfloat16 kept as its raw int16 bits)
    labels.npy      (N,) int64, only with labels
    weights.npy     (N,) float64, only with weights
    features.npy    (N, F) float32 feature embeddings, only with features (unit rows for cosine)
    gaussian.npz    the data's Gaussian (mean, eigendecomposed covariance) overall and per class,
                    for the linear oracle (see :mod:`floworacle_server.data._gaussian`)
    nearest-*.faiss faiss indexes (see :mod:`floworacle_server.data._nearest_index`)

``data.npy`` is a plain .npy file, so loading memory-maps it instead of parsing it. With
features, ``fingerprint`` is the combined one and ``data_fingerprint`` the samples' own.

A build writes into a temporary directory beside the target (``.NAME.partial-PID-XXXX``) and
moves it into place when it is complete: an interrupted build (Ctrl-C, SIGKILL, a full disk)
leaves the target as it was, an old index or nothing.
"""

from __future__ import annotations

import ctypes
import errno
import fnmatch
import os
import secrets
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from floworacle_server.data._attach import attach_features
from floworacle_server.data._dataset import Dataset, fingerprint_arrays
from floworacle_server.data._features import (
    combined_fingerprint,
    fingerprint_features,
    prepare_features,
)
from floworacle_server.data._formats import (
    STORAGE_DTYPES,
    LoadedArrays,
    load_arrays,
    load_side_array,
    read_npy,
    validate_arrays,
)
from floworacle_server.data._gaussian import (
    GAUSSIAN_AUTO_MAX_DIM,
    GaussianModel,
    gaussian_from_rows,
    read_gaussians,
    write_gaussians,
)
from floworacle_server.data._image import ImageShape, resolve_image_shape
from floworacle_server.data._manifest import INDEX_FORMAT, INDEX_VERSION, MANIFEST, read_manifest, write_manifest
from floworacle_server.data._nearest_index import DEFAULT_EXACT_NEAREST_MAX_SAMPLES, load_nearest_indexes
from floworacle_server.data._shard import ShardSpec, shard_arrays, shard_rows

__all__ = [
    "INDEX_FORMAT",
    "INDEX_VERSION",
    "MANIFEST",
    "build_index",
    "load_index",
    "read_manifest",
    "write_manifest",
    "is_index_dir",
]

_DATA_FILE = "data.npy"
_LABELS_FILE = "labels.npy"
_WEIGHTS_FILE = "weights.npy"
_FEATURES_FILE = "features.npy"
_GAUSSIAN_FILE = "gaussian.npz"
#: ``linear=None`` writes the Gaussian when D <= GAUSSIAN_AUTO_MAX_DIM and N D^2 is at most this
#: (the covariance's multiply-adds: a minute or two of a CPU)
_GAUSSIAN_AUTO_WORK = 1e12
_CHUNK_BYTES = 64 << 20  # per block when converting and hashing, whatever the row size

#: What an index directory (or a build's leftover of one) may hold: ``--force`` replaces a
#: directory of these files, and refuses one holding anything else.
_INDEX_FILES = ("manifest.json", "manifest.json.tmp", "data.npy", "labels.npy", "weights.npy", "features.npy", "gaussian.npz",
                "source_rows.npy", "nearest-*.faiss", "nearest-*.faiss.tmp")  # fmt: skip
#: Marks a build's temporary directory: ``.<target name>.partial-<pid>-<random>``.
_PARTIAL = ".partial-"

# numpy has no bfloat16: its bytes are stored as int16 and reinterpreted on load
_NUMPY_STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.int16}


class _ProgressRows:
    """Row-sliceable view that advances a progress bar as blocks are read (for hashing)."""

    def __init__(self, arr: np.ndarray, bar: Any) -> None:
        self._arr = arr
        self._bar = bar
        self.shape = arr.shape

    def __getitem__(self, item: slice) -> np.ndarray:
        block = self._arr[item]
        self._bar.update(int(block.shape[0]))
        return block


def is_index_dir(path: str | Path) -> bool:
    """True when ``path`` is a directory with a manifest."""
    p = Path(path)
    return p.is_dir() and (p / MANIFEST).is_file()


def _to_storage(block: Any, scale_factor: float, dtype: str) -> np.ndarray:
    """Convert a block of samples exactly as :meth:`Dataset.from_arrays` does (via float64, then scale)."""
    if isinstance(block, torch.Tensor):
        t = block.detach().cpu().to(torch.float64)
    else:
        t = torch.from_numpy(np.array(block, dtype=np.float64))
    if scale_factor != 1.0:
        t = t * float(scale_factor)
    stored = t.to(STORAGE_DTYPES[dtype])
    if dtype == "bfloat16":
        return stored.view(torch.int16).numpy()
    return stored.numpy()


def _chunk_rows(sample_shape: tuple[int, ...]) -> int:
    return max(1, _CHUNK_BYTES // (8 * max(1, int(np.prod(sample_shape)))))


def _iter_blocks(n: int, rows: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, rows):
        yield start, min(n, start + rows)


def build_index(
    src: str | Path | LoadedArrays | Any,
    out_dir: str | Path,
    *,
    labels: Any | None = None,
    weights: Any | None = None,
    scale_factor: float = 1.0,
    dtype: str = "float32",
    name: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
    features: Any | None = None,
    features_metric: str = "l2",
    before_commit: Callable[[Path], None] | None = None,
    image_shape: str | tuple[int, ...] | None = None,
    linear: bool | None = None,
    linear_rank: int | None = None,
) -> dict[str, Any]:
    """Write ``src`` as an index directory at ``out_dir`` and return its manifest.

    The files are written into a temporary directory beside ``out_dir`` and moved into place
    once complete (atomically replacing an old index with ``overwrite``); an interrupted build
    leaves ``out_dir`` as it was and removes its temporary directory (a killed one's is removed
    by the next build of the same target).

    Args:
        src: a data file (any format of :func:`load_arrays`), loaded arrays, or an (N, ...) array.
        labels, weights: arrays or paths overriding what ``src`` holds.
        scale_factor: multiplies the samples before storage (e.g. a VAE latent scale).
        dtype: storage dtype, "float32", "float16" or "bfloat16".
        name: data set name (default: the output directory's name).
        progress: show a tqdm bar while converting and hashing.
        overwrite: replace an existing index in ``out_dir``, or the leftover of an unfinished
            build there (a directory of index files without a manifest); never other files.
        features: optional (N, F) feature embeddings of the same samples (an array or a file
            in any format of :func:`load_arrays`), searched by ``nearest(..., space="features")``.
        features_metric: "l2" or "cosine" (rows stored normalised).
        before_commit: called with the finished temporary directory before it is moved into
            place (e.g. to train faiss indexes into it, so that they are part of the same commit).
        image_shape: (C, H, W) or "C,H,W" the patch oracles read each sample as (default: the
            sample shape when it is 3-D); stored in the manifest.
        linear: write the data's Gaussian (overall and per class) for the linear oracle; None:
            when D <= 4096 and N D^2 <= 1e12, else it is computed when first queried.
        linear_rank: keep only this many eigenpairs (implies ``linear``).

    faiss indexes are added afterwards by
    :func:`floworacle_server.engine.build_nearest_index` (``--nearest-index`` on the CLI).

    The fingerprint is :func:`fingerprint_arrays` over the stored values (after scaling, in the
    storage dtype, in the caller's order), the labels and the weights; it equals the fingerprint
    :meth:`Dataset.from_arrays` computes for the same input.

    Raises:
        ValueError: bad input (see :func:`validate_arrays`), bad dtype, or a target that may not
            be replaced.
    """
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"storage dtype {dtype!r} is not supported; use one of {sorted(STORAGE_DTYPES)}")
    if not np.isfinite(scale_factor) or scale_factor == 0.0:
        raise ValueError(f"scale_factor must be finite and non-zero, got {scale_factor}")
    out = Path(out_dir)
    _check_target(out, overwrite)  # before reading the input, which may take long
    if isinstance(src, (str, Path)):
        loaded = load_arrays(src, labels=labels, weights=weights)
    elif isinstance(src, LoadedArrays):
        loaded = src
        if labels is not None or weights is not None:
            lab = load_side_array(labels, "labels") if isinstance(labels, (str, Path)) else labels
            w = load_side_array(weights, "weights") if isinstance(weights, (str, Path)) else weights
            loaded = LoadedArrays(
                src.x, lab if lab is not None else src.labels, w if w is not None else src.weights,
                src.sample_shape, src.source,
            )  # fmt: skip
        validate_arrays(loaded.x, loaded.labels, loaded.weights, source=loaded.source)
    else:
        lab = load_side_array(labels, "labels") if isinstance(labels, (str, Path)) else labels
        w = load_side_array(weights, "weights") if isinstance(weights, (str, Path)) else weights
        x = src if isinstance(src, torch.Tensor) else np.asarray(src)
        loaded = LoadedArrays(x, lab, w, tuple(int(s) for s in x.shape[1:]), "data")
        validate_arrays(loaded.x, loaded.labels, loaded.weights, source="data")

    image = resolve_image_shape(image_shape, loaded.sample_shape, source="--image-shape")
    if linear_rank is not None and linear_rank < 1:
        raise ValueError(f"--linear-rank must be >= 1, got {linear_rank}")
    if linear is False and linear_rank is not None:
        raise ValueError("--linear-rank keeps part of the Gaussian that --no-linear skips; give one of them")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out)
    tmp = out.parent / f".{out.name}{_PARTIAL}{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        manifest = _write_index(
            loaded, tmp, name=name or out.resolve().name, scale_factor=scale_factor, dtype=dtype,
            progress=progress, features=features, features_metric=features_metric, image=image, linear=linear,
            linear_rank=linear_rank,
        )  # fmt: skip
        if before_commit is not None:
            before_commit(tmp)
        _commit(tmp, out)
    except BaseException:  # Ctrl-C included: the target stays as it was, the partial build goes
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _write_index(
    loaded: LoadedArrays,
    out: Path,
    *,
    name: str,
    scale_factor: float,
    dtype: str,
    progress: bool,
    features: Any | None,
    features_metric: str,
    image: ImageShape | None = None,
    linear: bool | None = None,
    linear_rank: int | None = None,
) -> dict[str, Any]:
    """Write the index files and, last, the manifest into the (new, empty) directory ``out``."""
    n = loaded.num_samples
    shape = (n, *loaded.sample_shape)
    data = np.lib.format.open_memmap(out / _DATA_FILE, mode="w+", dtype=_NUMPY_STORAGE[dtype], shape=shape)
    rows = _chunk_rows(loaded.sample_shape)
    with tqdm(total=n, desc="write", unit="rows", disable=not progress) as bar:
        for start, stop in _iter_blocks(n, rows):
            block = _to_storage(loaded.x[start:stop], scale_factor, dtype)
            if dtype != "bfloat16" and not np.isfinite(block).all():
                bad = start + int(np.argmax(~np.isfinite(block.reshape(stop - start, -1)).all(axis=1)))
                raise ValueError(f"sample {bad} overflows {dtype} after scaling; use float32 or a smaller scale_factor")
            if dtype == "bfloat16":
                check = torch.from_numpy(block).view(torch.bfloat16)
                if not torch.isfinite(check).all():
                    raise ValueError("a sample overflows bfloat16 after scaling; use a smaller scale_factor")
            data[start:stop] = block
            bar.update(stop - start)
    data.flush()

    lab64: np.ndarray | None = None
    num_classes = 0
    if loaded.labels is not None:
        lab64 = np.asarray(_as_cpu_numpy(loaded.labels)).astype(np.int64)
        np.save(out / _LABELS_FILE, lab64)
        num_classes = int(lab64.max()) + 1
    w64: np.ndarray | None = None
    if loaded.weights is not None:
        w64 = np.asarray(_as_cpu_numpy(loaded.weights)).astype(np.float64)
        np.save(out / _WEIGHTS_FILE, w64)

    with tqdm(total=n, desc="hash", unit="rows", disable=not progress) as bar:
        fingerprint = fingerprint_arrays(_ProgressRows(data, bar), lab64, w64, dtype, chunk_rows=rows)
    del data
    features_section = None
    if features is not None:
        features_section = _write_features(out, features, features_metric, n)
    dim = int(np.prod(loaded.sample_shape))
    if linear is None:
        linear = linear_rank is not None or (
            dim <= GAUSSIAN_AUTO_MAX_DIM and n * float(dim) ** 2 <= _GAUSSIAN_AUTO_WORK
        )
    gaussian_section = None
    if linear:
        gaussian_section = _write_gaussian(out, dtype, lab64, w64, linear_rank, fingerprint, progress)

    manifest: dict[str, Any] = {
        "format": INDEX_FORMAT,
        "format_version": INDEX_VERSION,
        "name": name,
        "num_samples": n,
        "sample_shape": list(loaded.sample_shape),
        "dim": int(np.prod(loaded.sample_shape)),
        "dtype": dtype,
        "scale_factor": float(scale_factor),
        "has_labels": lab64 is not None,
        "num_classes": num_classes,
        "has_weights": w64 is not None,
        "fingerprint": fingerprint,
        "files": {
            "data": _DATA_FILE,
            "labels": _LABELS_FILE if lab64 is not None else None,
            "weights": _WEIGHTS_FILE if w64 is not None else None,
        },
        "source": Path(loaded.source).name,
        "image_shape": list(image) if image is not None else None,
    }
    if gaussian_section is not None:
        manifest["gaussian"] = gaussian_section
    if features_section is not None:
        manifest["data_fingerprint"] = fingerprint
        manifest["fingerprint"] = combined_fingerprint(fingerprint, features_section["fingerprint"])
        manifest["features"] = features_section
    # the manifest is written last: a directory without one is an unfinished build
    write_manifest(out, manifest)
    return manifest


def _is_index_file(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in _INDEX_FILES)


def _check_target(out: Path, overwrite: bool) -> None:
    """Refuse, before any work, a target the build may not replace.

    A new path or an empty directory is always fine; with ``overwrite`` (``--force``) so is a
    directory holding only index files: an index, or what an interrupted build of an older
    version left there. Anything else is never replaced.

    Raises:
        ValueError: the target is a file, or a non-empty directory the build may not replace.
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory; choose another output path")
    if not out.is_dir():
        return
    entries = sorted(e.name for e in out.iterdir())
    if not entries:
        return
    foreign = [e for e in entries if not _is_index_file(e)]
    if overwrite and not foreign:
        return
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise ValueError(
            f"{out} holds files that are not part of an index ({shown}); choose a new directory "
            "(--force replaces only an index or the leftover of one)"
        )
    what = "an index" if is_index_dir(out) else "the leftover of an unfinished build (no manifest.json)"
    raise ValueError(
        f"{out} is not empty ({what}); choose a new directory or pass overwrite=True (--force) to replace it"
    )


def _remove_stale_partials(out: Path) -> None:
    """Delete the temporary directories of builds of ``out`` whose process is gone (SIGKILL, a
    crash): ``.<name>.partial-<pid>-<random>`` beside it."""
    prefix = f".{out.name}{_PARTIAL}"
    for entry in out.parent.glob(f"{prefix}*"):
        pid_text = entry.name[len(prefix) :].split("-", 1)[0]
        if not pid_text.isdigit() or not entry.is_dir():
            continue
        try:
            os.kill(int(pid_text), 0)
            continue  # still running (or not ours to judge): leave it
        except ProcessLookupError:
            shutil.rmtree(entry, ignore_errors=True)
        except PermissionError:
            continue


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 with RENAME_EXCHANGE); False where that is not
    available (another OS, an old kernel or a file system without it)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _commit(tmp: Path, out: Path) -> None:
    """Move the finished build ``tmp`` to ``out``: one rename when ``out`` is absent or empty, an
    atomic exchange when it holds an index (the old one is deleted after), so that a reader or a
    kill at any moment finds the old index or the new one, never a mix."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        os.replace(tmp, out)  # POSIX rename replaces an empty directory atomically
        return
    if _exchange(tmp, out):
        shutil.rmtree(tmp)  # now the old index
        return
    # No atomic exchange: two renames; a kill between them leaves the old index at `old`.
    old = out.parent / f".{out.name}.replaced-{os.getpid()}-{secrets.token_hex(4)}"
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old)


class _StoredRows:
    """Row blocks of the stored data file as torch tensors (bfloat16 bits reinterpreted)."""

    def __init__(self, data: np.ndarray, dtype: str, rows: np.ndarray | None = None) -> None:
        self._data = data
        self._bf16 = dtype == "bfloat16"
        self._rows = rows
        n = data.shape[0] if rows is None else rows.size
        self.shape = (int(n), *data.shape[1:])

    def __getitem__(self, item: slice) -> torch.Tensor:
        block = np.asarray(self._data[item] if self._rows is None else self._data[self._rows[item]])
        t = torch.from_numpy(np.ascontiguousarray(block))
        return t.view(torch.bfloat16) if self._bf16 else t


def _write_gaussian(
    out: Path,
    dtype: str,
    labels: np.ndarray | None,
    weights: np.ndarray | None,
    rank: int | None,
    fingerprint: str,
    progress: bool,
) -> dict[str, Any]:
    """Compute the Gaussian overall and per class from the written data file; the manifest's section."""
    data = np.load(out / _DATA_FILE, mmap_mode="r", allow_pickle=False)
    with np.errstate(divide="ignore"):
        logw = None if weights is None else torch.from_numpy(np.log(weights))
    scopes: list[tuple[int, np.ndarray | None]] = [(-1, None)]
    if labels is not None:
        scopes += [(int(y), np.flatnonzero(labels == y)) for y in range(int(labels.max()) + 1)]
    models: list[GaussianModel] = []
    for label, rows in tqdm(scopes, desc="gaussian", unit="scope", disable=not progress):
        if rows is not None and (rows.size == 0 or (weights is not None and not (weights[rows] > 0).any())):
            continue  # an empty or weightless class has no Gaussian (queries for it are refused)
        lw = None if logw is None else (logw if rows is None else logw[torch.from_numpy(rows)])
        models.append(gaussian_from_rows(_StoredRows(data, dtype, rows), lw, label=label, rank=rank))
    del data
    digest = write_gaussians(out / _GAUSSIAN_FILE, models)
    return {
        "file": _GAUSSIAN_FILE,
        "sha256": digest,
        "rank": rank,
        "classes": sorted(m.label for m in models if m.label >= 0),
        "data_fingerprint": fingerprint,
    }


def _write_features(out: Path, features: Any, metric: str, n: int) -> dict[str, Any]:
    """Validate and write features.npy; the manifest's "features" section."""
    src = load_arrays(features, validate=False).x if isinstance(features, (str, Path)) else features
    shape = tuple(int(s) for s in src.shape)
    if len(shape) != 2:
        raise ValueError(f"features must have shape (N, F), got {shape}")
    stored = np.lib.format.open_memmap(out / _FEATURES_FILE, mode="w+", dtype=np.float32, shape=shape)
    prepare_features(src, n, metric, out=stored)
    stored.flush()
    fp = fingerprint_features(stored, metric)
    del stored
    return {"file": _FEATURES_FILE, "dim": shape[1], "metric": metric, "fingerprint": fp}


def _as_cpu_numpy(a: Any) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def load_index(
    index_dir: str | Path,
    device: str | torch.device = "cpu",
    verify: bool = True,
    *,
    name: str | None = None,
    progress: bool = False,
    exact_nearest_max_samples: int = DEFAULT_EXACT_NEAREST_MAX_SAMPLES,
    with_indexes: bool = True,
    shard: ShardSpec | None = None,
    image_shape: str | tuple[int, ...] | None = None,
) -> Dataset:
    """Load an index directory as a :class:`Dataset` on ``device``, with its features and faiss indexes.

    With ``shard`` only that shard's rows are read from the memory-mapped files (a gang's rank;
    see :mod:`._shard`); faiss indexes, which span the whole set, are not loaded then.

    Args:
        index_dir: directory written by :func:`build_index`.
        device: where the data set lives (a CUDA data set gets faiss GPU indexes when the
            installed faiss has GPU support).
        verify: recompute the sha256 fingerprints (in chunks; features and index files too) and
            refuse to load when one differs from the manifest's; ``False`` trusts the files
            (faster for large sets; an index built for other vectors is refused either way).
        name: overrides the manifest's name.
        exact_nearest_max_samples: see :class:`Dataset`.
        with_indexes: load the faiss indexes the manifest lists (False: the data and features only).
        image_shape: (C, H, W) for the patch oracles when the manifest declares none (one that
            contradicts the manifest's is refused).

    Raises:
        ValueError: not an index, shapes that disagree with the manifest, or a fingerprint
            mismatch (the files changed after the build).
    """
    p = Path(index_dir)
    manifest = read_manifest(p)
    dtype = manifest["dtype"]
    if dtype not in _NUMPY_STORAGE:
        raise ValueError(f"{p}: unknown storage dtype {dtype!r} in the manifest; rebuild the index")
    files = manifest.get("files", {})
    shape = (int(manifest["num_samples"]), *(int(s) for s in manifest["sample_shape"]))
    data = _read_part(p, files.get("data") or _DATA_FILE, "data", mmap=True)
    if tuple(data.shape) != shape or data.dtype != np.dtype(_NUMPY_STORAGE[dtype]):
        raise ValueError(
            f"{p}: data file holds {data.dtype} {tuple(data.shape)} but the manifest says {dtype} {shape}; "
            "the directory was modified, rebuild the index"
        )
    labels = _read_part(p, files["labels"], "labels") if files.get("labels") else None
    weights = _read_part(p, files["weights"], "weights") if files.get("weights") else None
    if bool(manifest.get("has_labels")) != (labels is not None):
        raise ValueError(f"{p}: manifest and label file disagree; rebuild the index")
    # cheap checks that hold even with verify=False: a wrong label file must not allocate 2^60 classes
    if labels is not None and (
        labels.shape != shape[:1] or int(labels.min()) < 0 or int(labels.max()) + 1 != int(manifest["num_classes"])
    ):
        raise ValueError(f"{p}: the label file does not match the manifest (count or class range); rebuild the index")
    if weights is not None and weights.shape != shape[:1]:
        raise ValueError(f"{p}: the weights file does not match the manifest's sample count; rebuild the index")
    image = _image_shape(p, manifest, image_shape, tuple(shape[1:]))
    feat_section = manifest.get("features")
    features = _read_features(p, feat_section, shape[0]) if feat_section else None
    data_fp = str(
        manifest.get("data_fingerprint", manifest["fingerprint"]) if feat_section else manifest["fingerprint"]
    )
    if verify:
        with tqdm(total=shape[0], desc="verify", unit="rows", disable=not progress) as bar:
            rows = _chunk_rows(tuple(shape[1:]))
            found = fingerprint_arrays(_ProgressRows(data, bar), labels, weights, dtype, chunk_rows=rows)
        if feat_section:
            found_f = fingerprint_features(features, str(feat_section["metric"]))
            if found_f != feat_section.get("fingerprint"):
                raise ValueError(
                    f"{p}: the features do not match their fingerprint (expected {feat_section.get('fingerprint')}, "
                    f"found {found_f}); the files were changed or corrupted, rebuild the index"
                )
            found_all = combined_fingerprint(found, found_f)
        else:
            found_all = found
        if found_all != manifest["fingerprint"] or found != data_fp:
            raise ValueError(
                f"{p}: contents do not match the manifest fingerprint (expected {manifest['fingerprint']}, "
                f"found {found_all}); the files were changed or corrupted, rebuild the index"
            )
    if shard is not None:
        held = shard_rows(labels, shape[0], shard)
        x_held = torch.from_numpy(np.asarray(data[held]))  # reads only these rows of the memory map
        if dtype == "bfloat16":  # the file holds the bits
            x_held = x_held.view(torch.bfloat16)
        ds = shard_arrays(
            name or str(manifest["name"]), x_held, held, labels, weights, shard,
            num_samples=shape[0], num_classes=int(manifest.get("num_classes") or 0), sample_shape=tuple(shape[1:]),
            dtype=dtype, device=device, fingerprint=data_fp, scale_factor=float(manifest["scale_factor"]),
            image_shape=image,
        )  # fmt: skip
        _attach_gaussian(p, manifest, ds, data_fp, verify)
        ds.exact_nearest_max_samples = int(exact_nearest_max_samples)
        if feat_section:
            attach_features(
                ds, features, str(feat_section["metric"]), prepared=True, fingerprint=str(feat_section["fingerprint"])
            )
        return ds
    # torch warns on read-only memory maps; the rows are copied when sorted or moved, never written
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        x = torch.from_numpy(data)
    if dtype == "bfloat16":
        x = x.view(torch.bfloat16)
    ds = Dataset.from_arrays(
        name or str(manifest["name"]),
        x,
        labels,
        weights,
        sample_shape=tuple(shape[1:]),
        dtype=dtype,
        device=device,
        fingerprint=data_fp,
        image_shape=image,
    )
    _attach_gaussian(p, manifest, ds, data_fp, verify)
    # the stored values are already scaled; record the factor that was applied
    ds.scale_factor = float(manifest["scale_factor"])
    ds.exact_nearest_max_samples = int(exact_nearest_max_samples)
    if feat_section:
        attach_features(
            ds, features, str(feat_section["metric"]), prepared=True, fingerprint=str(feat_section["fingerprint"])
        )
        if ds.fingerprint != manifest["fingerprint"]:
            raise ValueError(f"{p}: the manifest's fingerprints do not agree with each other; rebuild the index")
    fingerprints = {"data": data_fp}
    dims = {"data": ds.dim}
    if ds.features is not None:
        fingerprints["features"] = ds.features.fingerprint
        dims["features"] = ds.features.dim
    if with_indexes:
        ds.nearest_indexes = load_nearest_indexes(
            p, manifest, fingerprints, ds.num_samples, dims, device=ds.device, verify=verify
        )
    return ds


def _image_shape(
    p: Path, manifest: dict[str, Any], given: str | tuple[int, ...] | None, sample_shape: tuple[int, ...]
) -> ImageShape | None:
    """The manifest's image shape, or the one given at load time; both must agree."""
    stored = manifest.get("image_shape")
    if given is None:
        return resolve_image_shape(stored, sample_shape, source=f"{p} (manifest)")
    image = resolve_image_shape(given, sample_shape, source=f"image shape for {p}")
    if stored is not None and tuple(stored) != image:
        raise ValueError(
            f"{p} declares image shape {tuple(stored)} but {image} was given; drop the image shape setting for this "
            "data set or rebuild the index with --image-shape"
        )
    return image


def _attach_gaussian(p: Path, manifest: dict[str, Any], ds: Dataset, data_fp: str, verify: bool) -> None:
    """Put the index's Gaussian models on ``ds`` (the file's hash checked when ``verify``)."""
    section = manifest.get("gaussian")
    if not section:
        return
    if section.get("data_fingerprint") != data_fp:
        raise ValueError(f"{p}: the Gaussian was computed for other data; rebuild the index")
    ds._gaussians.update(
        read_gaussians(
            p / str(section.get("file", _GAUSSIAN_FILE)),
            ds.dim,
            expect_sha256=str(section["sha256"]) if verify else None,
            device=ds.device,
        )  # fmt: skip
    )


def _read_part(p: Path, name: str, what: str, *, mmap: bool = False) -> np.ndarray:
    """One .npy file of the index directory ``p``.

    Raises:
        ValueError: "<dir>: cannot read the <what> file <name>: <why>; rebuild the index".
    """
    try:
        return read_npy(p / name, mmap=mmap)
    except ValueError as exc:
        raise ValueError(f"{p}: cannot read the {what} file {name}: {exc}; rebuild the index") from None


def _read_features(p: Path, section: dict[str, Any], n: int) -> np.ndarray:
    feats = _read_part(p, str(section.get("file", _FEATURES_FILE)), "features", mmap=True)
    if feats.dtype != np.float32 or feats.shape != (n, int(section["dim"])):
        raise ValueError(
            f"{p}: features file holds {feats.dtype} {feats.shape}, the manifest says float32 ({n}, {section['dim']}); "
            "rebuild the index"
        )
    return feats
