"""What a data set knows of its values, computed once: the extremes and class counts that error
bounds, refusals and limits need, and a gang shard's place.

A whole data set measures its own :class:`DataStats` on first use. A shard of a gang measures its
rows at load time with the whole set's class counts, and the gang merges the shards' stats into
the whole set's at start-up (:meth:`DataStats.packed` / :meth:`DataStats.from_packed`: extremes
with max, rows of positive weight with sum), so every shard's bounds and refusals are the whole's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["ShardSpec", "ShardOf", "DataStats", "measure_stats"]

_ROWS = 65536  # rows per block of a pass over the data


@dataclass(frozen=True)
class ShardSpec:
    """Rank ``rank`` of a gang of ``world`` processes."""

    rank: int
    world: int

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is outside a gang of {self.world}")


@dataclass
class ShardOf:
    """What makes a data set a shard: its place in the gang, and the bytes the whole gang holds of
    it (set by the gang at start-up; 0 until then)."""

    spec: ShardSpec
    resident_bytes: int = 0


@dataclass(frozen=True)
class DataStats:
    """Facts of a data set's stored values (of the whole data set, also on a shard).

    Attributes:
        num_samples: N of the whole data set.
        class_counts: rows per class (empty without labels).
        class_alive: rows of positive weight per class (equal to ``class_counts`` without weights).
        abs_max: max |x_ij| over all stored values.
        max_sq: max ||x_i||^2 over all rows; ``class_max_sq`` per class.
        max_abs_logw: max |log p_i| over the rows of positive weight (0 without weights).
        alive: rows of positive weight in the whole data set.
    """

    num_samples: int
    class_counts: tuple[int, ...]
    class_alive: tuple[int, ...]
    abs_max: float
    max_sq: float
    class_max_sq: tuple[float, ...]
    max_abs_logw: float = 0.0
    alive: int = 0

    @property
    def empty_classes(self) -> frozenset[int]:
        """Classes without samples (their posterior is empty)."""
        return frozenset(y for y, n in enumerate(self.class_counts) if n == 0)

    @property
    def dead_classes(self) -> frozenset[int]:
        """Classes with samples that all weigh 0 (their posterior is empty too)."""
        pairs = zip(self.class_counts, self.class_alive, strict=True)
        return frozenset(y for y, (n, a) in enumerate(pairs) if n and not a)

    def packed(self) -> tuple[np.ndarray, np.ndarray]:
        """(maxima to merge with max: abs_max, max_sq, max_abs_logw, class_max_sq...; counts to merge
        with sum: alive, class_alive...)."""
        maxima = np.array([self.abs_max, self.max_sq, self.max_abs_logw, *self.class_max_sq], dtype=np.float64)
        return maxima, np.array([self.alive, *self.class_alive], dtype=np.int64)

    @classmethod
    def from_packed(
        cls, num_samples: int, class_counts: tuple[int, ...], maxima: np.ndarray, alive: np.ndarray
    ) -> DataStats:
        """The stats of merged :meth:`packed` arrays."""
        return cls(
            num_samples=num_samples,
            class_counts=class_counts,
            class_alive=tuple(int(a) for a in alive[1:]),
            abs_max=float(maxima[0]),
            max_sq=float(maxima[1]),
            class_max_sq=tuple(float(m) for m in maxima[3:]),
            max_abs_logw=float(maxima[2]),
            alive=int(alive[0]),
        )


def measure_stats(
    x: torch.Tensor,
    sq_norms: torch.Tensor,
    log_weights: torch.Tensor | None,
    class_offsets: torch.Tensor | None,
    num_samples: int,
    class_counts: tuple[int, ...],
) -> DataStats:
    """The stats of the rows held (x (n, D), their float64 squared norms, log weights (-inf: weight
    0), class row offsets); ``num_samples`` and ``class_counts`` are the whole data set's."""
    n = int(x.shape[0])
    abs_max = max((float(x[s : s + _ROWS].abs().max()) for s in range(0, n, _ROWS)), default=0.0)
    logw = 0.0
    alive_rows = n
    if log_weights is not None:
        finite = torch.isfinite(log_weights)
        logw = float(log_weights[finite].abs().max()) if bool(finite.any()) else 0.0
        alive_rows = int(finite.sum())
    class_max: list[float] = []
    alive: list[int] = []
    if class_offsets is not None:
        off = class_offsets.tolist()
        for a, b in zip(off[:-1], off[1:], strict=True):
            class_max.append(float(sq_norms[a:b].max()) if b > a else 0.0)
            w = log_weights[a:b] if log_weights is not None else None
            alive.append(int(torch.isfinite(w).sum()) if w is not None else b - a)
    return DataStats(
        num_samples=num_samples,
        class_counts=class_counts,
        class_alive=tuple(alive),
        abs_max=abs_max,
        max_sq=float(sq_norms.max()) if n else 0.0,
        class_max_sq=tuple(class_max),
        max_abs_logw=logw,
        alive=alive_rows,
    )
