"""Shards of a data set for a gang of processes: which rows each rank holds, and the shard itself.

Rows are stored sorted by label (:mod:`._dataset`); a rank holds, of every class, its share of
that class's rows (the r-th of W nearly equal consecutive pieces), so every class has rows on
every shard that can have them and conditional and guided queries need every rank. Unlabelled
data is one class. The shards of a data set partition its rows: together they hold each sample
exactly once, and the softmax partials of disjoint rows merge exactly, so the gang's answer is
the single process's.

A shard remembers the whole data set's facts (size, fingerprint, per-class counts, largest
values and norms, weight normalisation): error bounds and refusals are those of the whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["ShardSpec", "shard_rows", "GlobalFacts"]


@dataclass(frozen=True)
class ShardSpec:
    """Rank ``rank`` of a gang of ``world`` processes."""

    rank: int
    world: int

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is outside a gang of {self.world}")


@dataclass(frozen=True)
class GlobalFacts:
    """What a shard knows of the whole data set.

    Attributes:
        num_samples: N of the whole data set.
        class_counts: (C,) rows per class of the whole set (empty without labels).
        abs_max: max |x_ij| over all stored values.
        max_sq: max ||x_i||^2 over all rows; ``class_max_sq`` per class.
    """

    num_samples: int
    class_counts: tuple[int, ...]
    abs_max: float
    max_sq: float
    class_max_sq: tuple[float, ...]


def shard_rows(labels: np.ndarray | None, num_samples: int, spec: ShardSpec) -> np.ndarray:
    """The original indices of the rows shard ``spec`` holds, in stored order (by label, stable).

    Of each class with n rows the shard takes rows ``floor(r n / W) .. floor((r + 1) n / W)`` of
    that class's stored rows: consecutive, within one row of equal, and every row in exactly one
    shard.
    """
    if labels is None:
        order = np.arange(num_samples, dtype=np.int64)
        bounds = [(0, num_samples)]
    else:
        lab = np.asarray(labels, dtype=np.int64)
        if lab.shape != (num_samples,):
            raise ValueError(f"labels must have shape ({num_samples},), got {lab.shape}")
        order = np.argsort(lab, kind="stable").astype(np.int64)
        counts = np.bincount(lab)
        offsets = np.concatenate([[0], np.cumsum(counts)])
        bounds = list(zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True))
    r, w = spec.rank, spec.world
    pieces = [order[a + ((b - a) * r) // w : a + ((b - a) * (r + 1)) // w] for a, b in bounds]
    return np.concatenate(pieces) if pieces else np.empty(0, dtype=np.int64)


def global_facts(x: torch.Tensor, sq_norms: torch.Tensor, class_offsets: torch.Tensor | None) -> GlobalFacts:
    """The facts of a whole (resident) data set, for its shards."""
    counts: tuple[int, ...] = ()
    class_max: tuple[float, ...] = ()
    if class_offsets is not None:
        off = class_offsets.tolist()
        counts = tuple(b - a for a, b in zip(off[:-1], off[1:], strict=True))
        class_max = tuple(float(sq_norms[a:b].max()) if b > a else 0.0 for a, b in zip(off[:-1], off[1:], strict=True))
    rows = 65536
    abs_max = max(float(x[s : s + rows].abs().max()) for s in range(0, x.shape[0], rows))
    return GlobalFacts(int(x.shape[0]), counts, abs_max, float(sq_norms.max()), class_max)
