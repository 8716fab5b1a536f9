"""The resident data set: the training samples as one (N, D) tensor on the compute device.

Rows are kept sorted by label (when there are labels) so that a class-conditional query scans
one contiguous row range; ``original_index`` maps rows back to the caller's sample order, and
every index the service returns is in that original order.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from floworacle.protocol import DatasetFacts, SpaceFacts
from floworacle_server.data._facts import DataStats, ShardOf, ShardSpec, measure_stats
from floworacle_server.data._features import FeatureSpace
from floworacle_server.data._formats import STORAGE_DTYPES
from floworacle_server.data._image import ImageShape, resolve_image_shape
from floworacle_server.data._nearest_index import DEFAULT_EXACT_NEAREST_MAX_SAMPLES, BackendChoice, NearestIndex

__all__ = ["Dataset", "fingerprint_arrays", "STORAGE_DTYPES"]


def _as_numpy(a: Any) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        t = a.detach().cpu()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy()  # bytes are what the fingerprint needs
        return t.numpy()
    return np.asarray(a)


def fingerprint_arrays(
    x: Any,
    labels: Any | None = None,
    weights: Any | None = None,
    dtype_name: str = "float32",
    chunk_rows: int = 65536,
) -> str:
    """``sha256:<hex>`` over dtype name, shape, the values' bytes (row-major), labels and weights.

    ``x`` is the data exactly as stored (shape (N, *sample_shape)); labels are hashed as int64
    and weights as float64 little-endian, so the same data set always gives the same digest.
    """
    h = hashlib.sha256()
    shape = tuple(int(s) for s in x.shape)
    h.update(f"floworacle-v1|{dtype_name}|{shape}|".encode())
    n = shape[0] if shape else 0
    for start in range(0, n, chunk_rows):
        block = _as_numpy(x[start : start + chunk_rows])
        h.update(np.ascontiguousarray(block).tobytes())
    h.update(b"|labels|")
    if labels is not None:
        h.update(np.ascontiguousarray(_as_numpy(labels), dtype="<i8").tobytes())
    h.update(b"|weights|")
    if weights is not None:
        h.update(np.ascontiguousarray(_as_numpy(weights), dtype="<f8").tobytes())
    return "sha256:" + h.hexdigest()


@dataclass
class Dataset:
    """A data set resident on one device.

    Attributes:
        name: data set name used in requests.
        x: (N, D) stored samples (float32, float16 or bfloat16), rows sorted by label.
        sq_norms: (N,) float64, ``||x_i||^2`` of the stored values.
        labels: (N,) int64 labels in row order, or None.
        log_weights: (N,) float64 ``log p_i`` normalised to sum(p) = 1, or None (uniform).
        original_index: (N,) int64, the caller's index of each row.
        class_offsets: (num_classes + 1,) int64 on the CPU; rows of class y are
            ``class_offsets[y]:class_offsets[y + 1]``.
        sample_shape: shape of one sample, e.g. (4, 32, 32); prod = D.
        fingerprint: ``sha256:...`` of the data set as given (see :func:`fingerprint_arrays`).
        scale_factor: factor already applied to the stored values (latent scaling).
        features: the feature space (:func:`~floworacle_server.data.attach_features`), or None.
        nearest_indexes: loaded faiss indexes by space ("data", "features").
        nearest_backends: the exact screen chosen per space (the server records the engine's
            calibration here at start-up).
        exact_nearest_max_samples: nearest queries that do not say ``exact`` are exact up to
            this many samples, else they use the space's index when it has one.
        shard: for a shard of a gang (:mod:`._shard`), its place; None for a whole data set.
        image_shape: (C, H, W) each flat sample is read as by the patch oracles (declared where
            the data set is made, :mod:`._image`), or None; ``sample_shape`` is unchanged by it.

    Facts computed once and read by the engine: :attr:`stats` (extremes, class counts and weights
    of the whole data set), :attr:`class_ranges`, :attr:`sq_norms32`, :meth:`range_max_sq`, the
    Gaussian moments of the linear oracle (:mod:`._moments`); and :attr:`facts`, what the request
    rules need.
    """

    name: str
    x: torch.Tensor
    sq_norms: torch.Tensor
    labels: torch.Tensor | None
    log_weights: torch.Tensor | None
    original_index: torch.Tensor
    class_offsets: torch.Tensor | None
    sample_shape: tuple[int, ...]
    fingerprint: str
    scale_factor: float = 1.0
    features: FeatureSpace | None = field(default=None, repr=False, compare=False)
    nearest_indexes: dict[str, NearestIndex] = field(default_factory=dict, repr=False, compare=False)
    nearest_backends: dict[str, BackendChoice] = field(default_factory=dict, repr=False, compare=False)
    exact_nearest_max_samples: int = DEFAULT_EXACT_NEAREST_MAX_SAMPLES
    _row_of: torch.Tensor | None = field(default=None, repr=False, compare=False)
    shard: ShardOf | None = field(default=None, repr=False, compare=False)
    _stats: DataStats | None = field(default=None, repr=False, compare=False)
    _class_ranges: list[tuple[int, int]] | None = field(default=None, repr=False, compare=False)
    _sq32: torch.Tensor | None = field(default=None, repr=False, compare=False)
    _range_max_sq: dict[tuple[int, int], float] = field(default_factory=dict, repr=False, compare=False)
    image_shape: ImageShape | None = None
    #: Gaussian moments by class (-1: all rows), computed once (:mod:`._gaussian`)
    _gaussians: dict[int, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_arrays(
        cls,
        name: str,
        x: Any,
        labels: Any | None = None,
        weights: Any | None = None,
        *,
        sample_shape: tuple[int, ...] | None = None,
        scale_factor: float = 1.0,
        dtype: str = "float32",
        device: str | torch.device = "cpu",
        fingerprint: str | None = None,
        image_shape: str | tuple[int, ...] | None = None,
    ) -> Dataset:
        """Validate and place a data set on ``device``.

        Args:
            x: (N, *sample_shape) samples, numpy or torch (memory-mapped arrays are read once).
            labels: optional (N,) non-negative integer labels.
            weights: optional (N,) non-negative sample weights (not all zero).
            scale_factor: multiplies the samples before storage (latent scaling).
            dtype: storage dtype, "float32" (default), "float16" or "bfloat16"; exactness is
                relative to the stored values.
            fingerprint: a known fingerprint (from an index directory); computed when None.
            image_shape: (C, H, W) or "C,H,W" for the patch oracles (default: the sample shape
                when it is 3-D, else none).

        Raises:
            ValueError: with what is wrong and how to fix it.
        """
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage dtype {dtype!r} is not supported; use one of {sorted(STORAGE_DTYPES)}")
        xt = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
        if xt.ndim < 2 or xt.shape[0] == 0:
            raise ValueError(f"data must have shape (N, ...) with N >= 1, got {tuple(xt.shape)}")
        shape = tuple(int(s) for s in xt.shape[1:])
        if sample_shape is not None and int(np.prod(sample_shape)) != int(np.prod(shape)):
            raise ValueError(f"sample_shape {sample_shape} does not match samples of {shape}")
        sample_shape = tuple(sample_shape) if sample_shape is not None else shape
        image = resolve_image_shape(image_shape, sample_shape, source=f"data set {name!r}")
        n = int(xt.shape[0])
        flat = xt.reshape(n, -1)
        if not flat.is_floating_point():
            flat = flat.to(torch.float64)
        if scale_factor != 1.0:
            flat = flat.to(torch.float64) * float(scale_factor)
        stored = flat.to(STORAGE_DTYPES[dtype]).contiguous()
        if not torch.isfinite(stored).all():
            bad = int((~torch.isfinite(stored)).any(dim=1).nonzero()[0, 0])
            raise ValueError(
                f"sample {bad} has a NaN or Inf (after scaling and conversion to {dtype}); clean the data "
                "or choose a storage dtype with enough range"
            )
        lab: torch.Tensor | None = None
        if labels is not None:
            lab = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
            if lab.shape != (n,):
                raise ValueError(f"labels must have shape ({n},), got {tuple(lab.shape)}")
            if lab.is_floating_point():
                if not torch.equal(lab, lab.round()):
                    raise ValueError("labels must be integers")
            lab = lab.to(torch.int64)
            if (lab < 0).any():
                raise ValueError("labels must be >= 0 (class indices 0..C-1)")
        w: torch.Tensor | None = None
        if weights is not None:
            w = torch.as_tensor(np.asarray(weights, dtype=np.float64))
            if w.shape != (n,):
                raise ValueError(f"weights must have shape ({n},), got {tuple(w.shape)}")
            if not torch.isfinite(w).all() or (w < 0).any() or not (w > 0).any():
                raise ValueError("weights must be finite, >= 0 and not all zero")
        if fingerprint is None:
            fingerprint = fingerprint_arrays(stored.reshape(n, *sample_shape), lab, w, dtype)

        order = torch.arange(n)
        offsets: torch.Tensor | None = None
        if lab is not None:
            order = torch.argsort(lab, stable=True)
            num_classes = int(lab.max()) + 1
            counts = torch.bincount(lab, minlength=num_classes)
            offsets = torch.zeros(num_classes + 1, dtype=torch.int64)
            offsets[1:] = torch.cumsum(counts, 0)
            if not torch.equal(order, torch.arange(n)):
                stored = stored[order]
            lab = lab[order]
        log_w: torch.Tensor | None = None
        if w is not None:
            w = w[order]
            log_w = torch.log(w) - torch.log(w.sum())
        dev = torch.device(device)
        stored = stored.to(dev)
        sq = stored.to(torch.float64).pow(2).sum(dim=1) if stored.numel() < 2**27 else _chunked_sq_norms(stored)
        return cls(
            name=name,
            x=stored,
            sq_norms=sq,
            labels=lab.to(dev) if lab is not None else None,
            log_weights=log_w.to(dev) if log_w is not None else None,
            original_index=order.to(dev),
            class_offsets=offsets,
            sample_shape=sample_shape,
            fingerprint=fingerprint,
            scale_factor=float(scale_factor),
            image_shape=image,
        )

    @property
    def stats(self) -> DataStats:
        """The whole data set's :class:`DataStats` (measured on first use; a shard's are merged by its
        gang at start-up)."""
        if self._stats is None:
            self._stats = measure_stats(
                self.x, self.sq_norms, self.log_weights, self.class_offsets, self.num_samples, self.class_counts
            )
        return self._stats

    def become_shard(self, spec: ShardSpec, num_samples: int, class_counts: tuple[int, ...]) -> None:
        """Make this data set (the rows a rank holds) a shard of one of ``num_samples`` rows with
        ``class_counts`` per class; its stats are its own rows' until :meth:`set_stats`."""
        self.shard = ShardOf(spec)
        self._stats = measure_stats(
            self.x, self.sq_norms, self.log_weights, self.class_offsets, num_samples, class_counts
        )
        self._row_of = None

    def set_stats(self, stats: DataStats) -> None:
        """Give a shard the whole data set's stats (its gang merged them)."""
        if stats.class_counts != self.stats.class_counts or stats.num_samples != self.stats.num_samples:
            raise ValueError("the merged stats describe another data set (sizes or classes differ)")
        self._stats = stats

    @property
    def class_counts(self) -> tuple[int, ...]:
        """Rows per class held here (empty without labels); the whole set's are in :attr:`stats`."""
        return tuple(b - a for a, b in self.class_ranges)

    @property
    def class_ranges(self) -> list[tuple[int, int]]:
        """Row range [start, stop) of each class held here (empty without labels)."""
        if self._class_ranges is None:
            off = self.class_offsets.tolist() if self.class_offsets is not None else []
            self._class_ranges = list(zip(off[:-1], off[1:], strict=True))
        return self._class_ranges

    @property
    def sq_norms32(self) -> torch.Tensor:
        """(N,) float32 ``||x_i||^2`` (the screening GEMM's epilogue; converted once)."""
        if self._sq32 is None:
            self._sq32 = self.sq_norms.to(torch.float32)
        return self._sq32

    def range_max_sq(self, start: int, stop: int) -> float:
        """Largest ``||x_i||^2`` over rows [start, stop) held here (cached; one pass per new range)."""
        if (start, stop) == (0, self.num_samples):
            return float(self.stats.max_sq)
        key = (start, stop)
        if key not in self._range_max_sq:
            self._range_max_sq[key] = float(self.sq_norms[start:stop].max())
        return self._range_max_sq[key]

    @property
    def facts(self) -> DatasetFacts:
        """What the request rules need to know of this data set (the whole set's, on a shard)."""
        spaces = {"data": SpaceFacts(self.dim, self._nlist("data"))}
        if self.features is not None:
            spaces["features"] = SpaceFacts(
                self.features.dim, self._nlist("features"), cosine=self.features.metric == "cosine"
            )
        return DatasetFacts(
            name=self.name,
            num_samples=self.total_samples,
            dim=self.dim,
            sample_shape=self.sample_shape,
            num_classes=self.num_classes,
            spaces=spaces,
            has_weights=self.log_weights is not None,
            sharded=self.shard is not None,
        )

    def _nlist(self, space: str) -> int:
        index = self.nearest_indexes.get(space)
        return int(index.nlist) if index is not None else 0

    @property
    def num_samples(self) -> int:
        """Rows held here (a shard's own)."""
        return int(self.x.shape[0])

    @property
    def total_samples(self) -> int:
        """N of the whole data set (a shard's whole set; what limits and indices refer to)."""
        return self.stats.num_samples if self.shard is not None else self.num_samples

    @property
    def dim(self) -> int:
        return int(self.x.shape[1])

    @property
    def device(self) -> torch.device:
        return self.x.device

    @property
    def storage_dtype(self) -> str:
        return next(k for k, v in STORAGE_DTYPES.items() if v == self.x.dtype)

    @property
    def num_classes(self) -> int:
        return 0 if self.class_offsets is None else int(self.class_offsets.numel() - 1)

    @property
    def resident_bytes(self) -> int:
        total = self.x.numel() * self.x.element_size() + self.sq_norms.numel() * 8 + self.original_index.numel() * 8
        if self.labels is not None:
            total += self.labels.numel() * 8
        if self.log_weights is not None:
            total += self.log_weights.numel() * 8
        if self.features is not None:
            total += self.features.resident_bytes
        return int(total)

    def class_rows(self, label: int) -> tuple[int, int]:
        """Row range [start, stop) of class ``label``; raises ValueError if unknown."""
        if self.class_offsets is None:
            raise ValueError(f"data set {self.name!r} has no labels; send no labels or load it with labels")
        if not 0 <= label < self.num_classes:
            raise ValueError(f"label {label} is outside the data set's classes 0..{self.num_classes - 1}")
        return int(self.class_offsets[label]), int(self.class_offsets[label + 1])

    def rows_of(self, indices: torch.Tensor) -> torch.Tensor:
        """Rows (this object's order) of samples given by the caller's original indices (on the
        data's device); -1 for samples a shard does not hold."""
        if self._row_of is None:
            inv = torch.full((self.total_samples,), -1, dtype=torch.int64, device=self.original_index.device)
            inv[self.original_index] = torch.arange(self.num_samples, device=inv.device)
            self._row_of = inv
        return self._row_of[indices.to(self._row_of.device)]

    @property
    def feature_dim(self) -> int:
        """F of the feature space, 0 when there is none."""
        return 0 if self.features is None else self.features.dim

    @property
    def feature_metric(self) -> str:
        """ "l2" or "cosine", "" when there are no features."""
        return "" if self.features is None else self.features.metric


def _chunked_sq_norms(x: torch.Tensor, rows: int = 65536) -> torch.Tensor:
    out = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    for s in range(0, x.shape[0], rows):
        out[s : s + rows] = x[s : s + rows].to(torch.float64).pow(2).sum(dim=1)
    return out
