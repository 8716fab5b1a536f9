"""Block sizes and strategy switches of the engine, one object per kind of device.

The arithmetic is the same everywhere; what differs is what a block costs. A CPU wants blocks that
stay in its caches and does not mind a host round trip; a GPU wants few, large kernels and no
host synchronisation inside a batch. Tests choose :data:`CUDA` on the CPU to count what a GPU
batch would launch and synchronise.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

__all__ = ["EngineConfig", "CPU", "CUDA"]


@dataclass(frozen=True)
class EngineConfig:
    """Per-device engine settings.

    Attributes:
        chunk_elements: screening chunk size in data elements (rows = this // D, within
            ``chunk_min_rows .. chunk_max_rows``): a chunk's (B, rows) float32 screening logits
            are the largest screening temporary.
        chunk_min_rows, chunk_max_rows: bounds of the screening chunk's rows.
        keep: screened rows kept per query (a running top-``keep`` over all chunks). A query
            with at most ``keep`` candidates takes the sparse path: its candidates are exactly
            these rows, gathered and recomputed in float64 without a second GEMM.
        gather_elements: float64 elements of one block of gathered candidate rows.
        dense_elements: float64 elements of one dense block (a float64 copy of data rows).
        dense_share: on top of that, a dense block's float64 copy may hold this share of the
            data set's bytes (bounds the extra memory on large data sets too).
        early_dense: after the first chunk, queries whose screened logits all lie within half
            the reach of each other (deep navigation) skip the rest of the screening and go to
            the dense pass. Needs one host read in the middle of the batch.
        rescreen_share: queries with more than ``keep`` candidates, but at most this share of
            their rows (an upper bound counted while screening), are screened again where their
            candidates can be and only those are recomputed in float64 (variable sizes: host
            reads); 0 = never: they take the dense float64 pass (when its bound is tight enough).
            Break-even on a CPU: a float64 pair costs about what screening 64 rows does, against
            two float64 GEMMs over every row for the dense pass.
        host_shortcuts: skip exact multiplications by 1 after a host check (CPU only: on a GPU
            the check costs more than the multiplication).
    """

    chunk_elements: int
    chunk_min_rows: int
    chunk_max_rows: int
    keep: int
    gather_elements: int
    dense_elements: int
    dense_share: float
    early_dense: bool
    rescreen_share: float
    host_shortcuts: bool

    def chunk_rows(self, dim: int) -> int:
        """Data rows per screening chunk at dimension ``dim``."""
        return max(self.chunk_min_rows, min(self.chunk_max_rows, self.chunk_elements // max(dim, 1)))

    def gather_rows(self, dim: int) -> int:
        """Candidate rows per gathered float64 block at dimension ``dim``."""
        return max(64, self.gather_elements // max(dim, 1))

    def dense_rows(self, dim: int, data_bytes: int) -> int:
        """Data rows per dense float64 block: ``dense_elements``, or up to ``dense_share`` of the
        data set's bytes when that is more (at least 256 rows, for an efficient GEMM)."""
        budget = max(self.dense_elements, int(data_bytes * self.dense_share) // 8)
        return max(256, budget // max(dim, 1))

    def with_chunk_rows(self, rows: int | None) -> EngineConfig:
        """The same settings with screening chunks of exactly ``rows`` rows (None: unchanged)."""
        if rows is None:
            return self
        if rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {rows}")
        return replace(self, chunk_elements=rows, chunk_min_rows=rows, chunk_max_rows=rows)

    @staticmethod
    def for_device(device: torch.device) -> EngineConfig:
        """The default settings for ``device`` (CUDA for GPUs, CPU otherwise)."""
        return CUDA if device.type == "cuda" else CPU


#: CPUs: 1,024-row screening chunks at D = 1,024 (1 MB of logits per 256 queries), small gather
#: blocks that stay in cache, and host round trips where they save work.
CPU = EngineConfig(
    chunk_elements=1 << 20,
    chunk_min_rows=256,
    chunk_max_rows=1024,
    keep=16,
    gather_elements=1 << 17,
    dense_elements=1 << 18,
    dense_share=1 / 320,
    early_dense=True,
    rescreen_share=1 / 64,
    host_shortcuts=True,
)

#: GPUs: one chunk up to 65,536 rows (2^28 elements), large blocks, no host reads but the routing.
CUDA = EngineConfig(
    chunk_elements=1 << 28,
    chunk_min_rows=4096,
    chunk_max_rows=65536,
    keep=64,
    gather_elements=1 << 24,
    dense_elements=1 << 28,
    dense_share=0.0,
    early_dense=False,
    rescreen_share=0.0,
    host_shortcuts=False,
)
