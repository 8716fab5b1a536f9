"""The equivariant local oracle (Kamb & Ganguli's "ELS machine"): a patch posterior over training
images *and* locations.

For a query x_t and each pixel p, every training image i and every location q offer the patch
``x_i[Omega_q]``:

    gamma_{i,q}(p) ∝ w_i exp(-||x_t[Omega_p] - alpha x_i[Omega_q]||^2 / (2 sigma^2))
    x1_hat[:, p] = sum_{i,q} gamma_{i,q}(p) x_i[:, q]

Border rule: zero padding, as a CNN pads (:mod:`._patches`). Both the query's window and the
data's windows are taken from the zero-padded images, and q runs over all H W pixels: a location
whose window falls off the image offers a patch with zeros where it leaves the image (its centre,
whose value x_i[:, q] the posterior averages, is always inside). The prior over (i, q) is the
sample weight w_i, uniform over locations.

It is the local oracle's pass (:func:`._local.patch_oracle`) with one more axis of columns: the
logits of a block are one GEMM of the queries' unfolded windows (bq H W rows of K + 2 values)
against the data's (n H W columns). Cost per query: N (H W)^2 (K + 2) multiply-adds, K = C P^2,
plus N (H W)^2 exponentials and N (H W)^2 C multiply-adds for the weighted sums.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from floworacle_server.data import Dataset
from floworacle_server.engine._bounds import DENSE_LOGIT_TOL
from floworacle_server.engine._local import patch_oracle
from floworacle_server.engine._patches import PatchConfig, PatchResult, patch_sq_norms, patch_view

__all__ = ["equivariant_oracle", "EquivariantLayout"]


class EquivariantLayout:
    """Logits (bq L, L n): row ``j L + p`` (query j, pixel p), column ``q n + i`` (location q,
    image i); columns (K + 2, L n)."""

    def chunk_images(self, budget: int, bq: int, L: int) -> int:
        return max(1, budget // max(1, bq * L * L))

    def rows(self, qa: torch.Tensor) -> torch.Tensor:
        return qa.reshape(-1, qa.shape[2])  # (bq L, K + 2)

    def columns_of(self, xc: torch.Tensor, p: int, logw: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        n, c, h, w = xc.shape
        k = c * p * p
        out = torch.empty(k + 2, h * w, n, dtype=torch.float64, device=xc.device)
        out[:k].view(c, p, p, h, w, n).copy_(patch_view(xc, p).permute(2, 3, 4, 0, 1, 5))
        sq = patch_sq_norms(xc, p)  # (L, n)
        out[k] = sq
        out[k + 1] = 0.0 if logw is None else logw[None, :]
        return out.view(k + 2, h * w * n), sq

    def logits(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        return rows @ cols

    def values(self, xc: torch.Tensor) -> torch.Tensor:
        n, c, L = xc.shape
        return xc.permute(2, 0, 1).reshape(L * n, c)

    def exclude(
        self, g: torch.Tensor, js: torch.Tensor, images: torch.Tensor, bq: int, L: int, value: float = -math.inf
    ) -> None:
        g.view(bq, L, L, -1)[js, :, :, images] = value

    def drop_columns(self, e: torch.Tensor, images: torch.Tensor, bq: int, L: int) -> None:
        e.view(bq * L, L, -1)[:, :, images] = 0.0

    def flat(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, *t.shape[2:])

    def unflat(self, t: torch.Tensor, bq: int, L: int) -> torch.Tensor:
        return t.reshape(bq, L, *t.shape[1:])

    def row_view(self, t: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return t.view(-1, 1)

    def norm_max(self, sq: torch.Tensor) -> torch.Tensor:
        return sq.max().reshape(1, 1)

    def candidates(
        self, idx: torch.Tensor, aq: torch.Tensor, cols: torch.Tensor, xc: torch.Tensor, bq: int, L: int
    ) -> tuple[torch.Tensor, ...]:
        rows, col = idx.unbind(1)
        n = xc.shape[0]
        k = aq.shape[1]
        j, p = rows // L, rows % L
        q, i = col // n, col % n
        return rows, j, aq[j, :, p], cols[:k, col].T, xc[i, :, q], i

    def columns(self, rows: int, L: int) -> int:
        return rows * L


def equivariant_oracle(
    ds: Dataset,
    x_t: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    patch_size: int | Sequence[int] | np.ndarray | torch.Tensor,
    *,
    labels: torch.Tensor | np.ndarray | None = None,
    exclude: torch.Tensor | np.ndarray | None = None,
    logit_tol: float = DENSE_LOGIT_TOL,
    config: PatchConfig | None = None,
) -> PatchResult:
    """The equivariant local oracle's posterior mean for B queries (module docstring), float64,
    exact; arguments, result and errors as for :func:`._local.local_oracle` (``exclude`` leaves
    every location of that sample out)."""
    return patch_oracle(
        ds, EquivariantLayout(), x_t, alpha, sigma, patch_size, labels=labels, exclude=exclude,
        logit_tol=logit_tol, config=config,
    )  # fmt: skip
