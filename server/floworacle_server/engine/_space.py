"""The vectors a nearest query searches (the data, or the data set's features) and their exact keys.

Every ranking is by a key computed in float64 from differences, ties broken by the caller's index:

- ``l2``: ``key_i = ||y - x_i||^2``, distance ``sqrt(key_i)``;
- ``cosine``: ``key_i = ||y / ||y|| - f_i / ||f_i|| ||^2 = 2 - 2 cos_i``, distance ``sqrt(key_i)``
  (the chordal distance of the unit vectors) and similarity ``cos_i = 1 - key_i / 2``. From
  differences the key keeps its relative accuracy for near-copies (cos_i close to 1).

The exact screen and the index search both rank by ``||y_hat - f_i||^2`` over the stored rows,
which for cosine are unit vectors up to float32 rounding: with ``e = max_i | ||f_i|| - 1 |`` the
two keys differ by at most ``4 e + e^2`` (``||y_hat|| = 1``: ``| ||f||^2 - 1 | <= e (2 + e)`` and
``2 |y_hat . f| |1 - 1/||f||| <= 2 e``), which the exact screen adds to its bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from floworacle.protocol import SPACES
from floworacle_server.data import Dataset, NearestIndex
from floworacle_server.engine._types import NearestResult

__all__ = ["SearchSpace", "search_space", "exclusion_rows", "merge_topk"]

_REFINE_BYTES_CPU = 4 << 20  # (b, L, D) float64 differences per query block
_REFINE_BYTES_GPU = 256 << 20


def merge_topk(keys: torch.Tensor, index: torch.Tensor, k: int, *columns: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The k smallest ``keys`` of each row of (B, m) candidates, ties by the smaller ``index``
    (the order one brute-force pass over the whole set gives), with ``index`` and any further
    (B, m) ``columns`` taken along: (keys, index, *columns), each (B, k). One merge for candidate
    blocks, devices and a gang's shards (faiss' ResultHeap does the same job)."""
    by_index = torch.argsort(index, dim=1, stable=True)
    keys1 = torch.gather(keys, 1, by_index)
    pick = torch.gather(by_index, 1, torch.argsort(keys1, dim=1, stable=True)[:, :k])
    return (torch.gather(keys, 1, pick), torch.gather(index, 1, pick), *(torch.gather(c, 1, pick) for c in columns))


@dataclass
class SearchSpace:
    """One space of a data set as the nearest search sees it.

    Attributes:
        name: "data" or "features".
        dataset: the data set (row order, labels, original indices).
        x: (N, D) stored rows in the data set's row order.
        sq_norms: (N,) float64 ``||x_i||^2``.
        metric: "l2" or "cosine".
        index: the space's faiss index, or None.
    """

    name: str
    dataset: Dataset
    x: torch.Tensor
    sq_norms: torch.Tensor
    metric: str
    index: NearestIndex | None

    @property
    def num_samples(self) -> int:
        return int(self.x.shape[0])

    @property
    def dim(self) -> int:
        return int(self.x.shape[1])

    @property
    def device(self) -> torch.device:
        return self.x.device

    def max_norm(self) -> float:
        """``max_i ||x_i||`` of the stored rows."""
        return float(self.sq_norms.max().sqrt())

    def key_slack(self) -> float:
        """Largest gap between the screened L2 key and the exact key (0 for l2; see the module docstring)."""
        if self.metric != "cosine":
            return 0.0
        e = float((self.sq_norms.sqrt() - 1.0).abs().max())
        # + 2^-48: the float64 roundings of the normalisation and of the norms themselves
        return 4.0 * e + e * e + 2.0**-48

    def queries(self, y64: torch.Tensor) -> torch.Tensor:
        """The search vectors of (B, D) float64 queries: as given (l2) or divided by their norm (cosine)."""
        if self.metric != "cosine":
            return y64
        norms = torch.linalg.vector_norm(y64, dim=1)
        if not (norms > 0).all():
            bad = int((norms <= 0).nonzero()[0, 0])
            raise ValueError(f"query {bad} is zero, which has no cosine similarity to any feature vector")
        return y64 / norms[:, None]

    def exact_keys(self, y: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """(B, L) float64 keys of the search vectors ``y`` (B, D) against rows (B, L), from differences."""
        b, length = rows.shape
        d = self.dim
        out = torch.empty(b, length, dtype=torch.float64, device=y.device)
        # small blocks stay in a CPU's cache (10x faster than large ones, measured); a GPU wants few launches
        budget = _REFINE_BYTES_CPU if y.device.type == "cpu" else _REFINE_BYTES_GPU
        step = max(1, budget // (8 * max(1, length) * d))
        for s in range(0, b, step):
            r = rows[s : s + step].reshape(-1)
            diff = torch.index_select(self.x, 0, r).to(torch.float64)
            if self.metric == "cosine":
                diff.div_(self.sq_norms[r].sqrt()[:, None])
            diff = diff.view(-1, length, d)
            diff.sub_(y[s : s + step, None, :])
            out[s : s + step] = diff.pow_(2).sum(dim=2)
        return out

    def top_k(self, keys: torch.Tensor, rows: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k smallest keys of each query with their rows; ties by key, then the caller's index."""
        top, _, top_rows = merge_topk(keys, self.dataset.original_index[rows], k, rows)
        return top, top_rows

    def result(self, keys: torch.Tensor, rows: torch.Tensor, *, approximate: bool) -> NearestResult:
        ds = self.dataset
        keys = keys.clamp_min(0.0)
        return NearestResult(
            indices=ds.original_index[rows],
            distances=keys.sqrt(),
            labels=ds.labels[rows] if ds.labels is not None else None,
            approximate=approximate,
            similarities=(1.0 - 0.5 * keys) if self.metric == "cosine" else None,
        )


def search_space(ds: Dataset, space: str) -> SearchSpace:
    """The :class:`SearchSpace` of ``space`` ("data" or "features"); ValueError if the data set lacks it."""
    if space not in SPACES:
        raise ValueError(f"space must be one of {list(SPACES)}, got {space!r}")
    index = ds.nearest_indexes.get(space)
    if space == "data":
        return SearchSpace("data", ds, ds.x, ds.sq_norms, "l2", index)
    if ds.features is None:
        raise ValueError(
            f"data set {ds.name!r} has no feature space; build its index with `floworacle index build ... --features "
            "FEATURES.npy` (or attach features in-process)"
        )
    f = ds.features
    return SearchSpace("features", ds, f.x, f.sq_norms, f.metric, index)


def exclusion_rows(ds: Dataset, exclude: torch.Tensor | None, b: int, k: int) -> torch.Tensor | None:
    """(B,) rows to leave out of each query's answer (-1: none, or a sample a shard does not hold)
    from the caller's (B,) int64 indices (the rules checked them); None if there is none."""
    if exclude is None:
        return None
    e = exclude.to(device=ds.device, dtype=torch.int64)
    has = e >= 0
    if not bool(has.any()):
        return None
    return torch.where(has, ds.rows_of(e.clamp_min(0)), torch.full_like(e, -1))
