"""A deterministic train / held-out split of one data file into two index directories.

``holdout_split(N, fraction, seed)`` draws ``round(fraction N)`` held-out rows with a seeded
generator; both parts keep the source's order (ascending source rows), so labels, weights and
features follow their samples and each part's indices are easy to map back
(``source_rows.npy``). :func:`build_split_index` writes ``OUT/train`` and ``OUT/heldout``, each a
complete index directory with its own fingerprint, named ``NAME-train`` and ``NAME-heldout``.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from floworacle_server.data._dataset import Dataset
from floworacle_server.data._formats import LoadedArrays, load_arrays
from floworacle_server.data._index import build_index, is_index_dir
from floworacle_server.data._manifest import write_manifest

__all__ = ["SPLIT_PARTS", "SOURCE_ROWS_FILE", "holdout_split", "build_split_index", "split_dataset"]

#: Sub-directories of a split build, in this order.
SPLIT_PARTS = ("train", "heldout")
#: (n,) int64 file in each part: the source row of each of its samples.
SOURCE_ROWS_FILE = "source_rows.npy"


def holdout_split(num_samples: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train_rows, heldout_rows)``: disjoint ascending int64 source rows covering 0..N-1.

    The held-out part has ``round(fraction * N)`` rows: the first ones of a permutation given by
    sorting ``numpy.random.default_rng(seed).random(N)``, so the split depends on (N, fraction,
    seed) only.

    Raises:
        ValueError: fraction outside (0, 1), or one that leaves a part empty for this N.
    """
    if not (0.0 < fraction < 1.0) or not math.isfinite(fraction):
        raise ValueError(f"the held-out fraction must lie strictly between 0 and 1, got {fraction}")
    if num_samples < 2:
        raise ValueError(f"a split needs at least 2 samples, the data have {num_samples}")
    count = int(round(fraction * num_samples))
    if not 1 <= count <= num_samples - 1:
        raise ValueError(
            f"a held-out fraction of {fraction} of {num_samples} samples leaves "
            f"{'no held-out' if count < 1 else 'no training'} sample; choose a fraction between "
            f"{1.0 / num_samples:.3g} and {1.0 - 1.0 / num_samples:.3g}"
        )
    keys = np.random.default_rng(seed).random(num_samples)
    order = np.argsort(keys, kind="stable")
    held = np.sort(order[:count]).astype(np.int64)
    train = np.sort(order[count:]).astype(np.int64)
    return train, held


class _Rows:
    """Rows ``rows`` of a (possibly memory-mapped) numpy array, read a block at a time."""

    def __init__(self, x: np.ndarray, rows: np.ndarray) -> None:
        self._x = x
        self._rows = rows
        self.shape = (int(rows.size), *x.shape[1:])
        self.dtype = x.dtype
        self.ndim = x.ndim

    def __getitem__(self, item: slice) -> np.ndarray:
        return np.asarray(self._x[self._rows[item]])


def _take(a: Any, rows: np.ndarray) -> Any:
    if a is None:
        return None
    if isinstance(a, torch.Tensor):
        return a[torch.from_numpy(rows)]
    return np.asarray(a)[rows]


def build_split_index(
    src: str | Path,
    out_dir: str | Path,
    *,
    fraction: float,
    seed: int,
    labels: Any | None = None,
    weights: Any | None = None,
    features: Any | None = None,
    name: str | None = None,
    **build_options: Any,
) -> dict[str, dict[str, Any]]:
    """Split ``src`` and write ``out_dir/train`` and ``out_dir/heldout`` (see :func:`holdout_split`).

    Args:
        src: a data file (any format of :func:`load_arrays`).
        out_dir: parent directory of the two index directories.
        fraction, seed: the held-out share and the split's seed.
        labels, weights, features: as for :func:`build_index` (arrays or paths); rows follow
            their samples.
        name: base name (default: ``out_dir``'s name); the parts are ``NAME-train`` and ``NAME-heldout``.
        build_options: scale_factor, dtype, progress, overwrite, features_metric.

    Each part's manifest gains a ``split`` section: part, fraction, seed, source file, source
    sample count, the part's size, and the other part's fingerprint; ``source_rows.npy`` maps
    its rows to the source's.

    Returns:
        ``{"train": manifest, "heldout": manifest}``.
    """
    loaded = load_arrays(src, labels=labels, weights=weights)
    n = loaded.num_samples
    train_rows, held_rows = holdout_split(n, fraction, seed)
    feats = load_arrays(features, validate=False).x if isinstance(features, (str, Path)) else features
    if feats is not None and int(feats.shape[0]) != n:
        raise ValueError(f"features have {int(feats.shape[0])} rows but the data have {n}; give one row per sample")
    out = Path(out_dir)
    if is_index_dir(out):
        raise ValueError(
            f"{out} is an index directory; a split writes {out}/train and {out}/heldout, choose a new directory"
        )
    base = name or out.resolve().name
    manifests: dict[str, dict[str, Any]] = {}
    for part, rows in zip(SPLIT_PARTS, (train_rows, held_rows), strict=True):
        x = loaded.x[torch.from_numpy(rows)] if isinstance(loaded.x, torch.Tensor) else _Rows(loaded.x, rows)
        sub = LoadedArrays(
            x, _take(loaded.labels, rows), _take(loaded.weights, rows), loaded.sample_shape, loaded.source
        )
        manifests[part] = build_index(
            sub, out / part, features=_take(feats, rows), name=f"{base}-{part}",
            before_commit=functools.partial(_save_source_rows, rows=rows), **build_options,
        )  # fmt: skip
    for part, other in zip(SPLIT_PARTS, reversed(SPLIT_PARTS), strict=True):
        m = manifests[part]
        m["split"] = {
            "part": part,
            "fraction": float(fraction),
            "seed": int(seed),
            "source": Path(str(src)).name,
            "source_samples": n,
            "num_samples": int(m["num_samples"]),
            "source_rows": SOURCE_ROWS_FILE,
            "other_part": other,
            "other_fingerprint": manifests[other]["fingerprint"],
        }
        write_manifest(out / part, m)
    return manifests


def _save_source_rows(index_dir: Path, rows: np.ndarray) -> None:
    """Write a part's row map into its (not yet committed) index directory."""
    np.save(index_dir / SOURCE_ROWS_FILE, rows)


def split_dataset(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """The same split in memory: ``(NAME-train, NAME-heldout)`` from a resident data set.

    Rows are taken in the data set's original order, as :func:`build_split_index` takes them
    from a file, so a file split either way gives the same parts and, without weights, the same
    fingerprints (weights come back normalised, which changes a weighted part's fingerprint).
    """
    n = dataset.num_samples
    train_rows, held_rows = holdout_split(n, fraction, seed)
    order = dataset.rows_of(torch.arange(n))
    parts = []
    for part, rows in zip(SPLIT_PARTS, (train_rows, held_rows), strict=True):
        r = order[torch.from_numpy(rows).to(order.device)]
        labels = None if dataset.labels is None else dataset.labels[r].cpu()
        weights = None if dataset.log_weights is None else dataset.log_weights[r].exp().cpu()
        parts.append(
            Dataset.from_arrays(
                f"{dataset.name}-{part}",
                dataset.x[r].cpu().reshape(rows.size, *dataset.sample_shape),
                labels,
                weights,
                sample_shape=dataset.sample_shape,
                dtype=dataset.storage_dtype,
                device=dataset.device,
                image_shape=dataset.image_shape,
            )
        )
        parts[-1].scale_factor = dataset.scale_factor  # the values are already scaled
    return parts[0], parts[1]
