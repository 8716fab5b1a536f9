"""The Gaussian of a data set: its (weighted) mean and covariance, eigendecomposed once.

The linear oracle (Wiener filter) replaces the data by ``N(mu, Sigma)``; it needs, per data set
and per class, the mean ``mu = sum_i p_i x_i`` and the covariance ``Sigma = sum_i p_i (x_i -
mu)(x_i - mu)^T`` (``p`` the normalised sample weights, uniform without weights) as
``Sigma = U diag(lambda) U^T``. They are facts of the data, so the data room computes them once:
written into an index directory by ``floworacle index build`` (verified on load), otherwise
computed at first use and kept on the data set (:mod:`._moments`).

Everything is float64. Besides the factors a model carries proven bounds on how far they are
from the exact moments of the stored values, so that the engine's error bound holds whatever
the eigensolver's accuracy:

- ``mean_error``: componentwise ``|mu' - mu|``: the weighted sum of n rows, its normaliser and
  the division (``(1.01 n u + (n + 4) u) max|x|``) plus, with weights, ``expm1(4 u) 2 max|x|``
  for the rounding of ``p_i = exp(log p_i)``.
- ``covariance_error``: a bound on ``||U diag(lambda) U^T - Sigma||_2``: the computed covariance
  ``Sigma'`` (centred at ``mu'``: in exact arithmetic ``Sigma + delta delta^T`` with ``delta =
  mu' - mu``, so ``D mean_error^2``; its sums of n products, the centring and the weights:
  ``1.01 (n + 12) u trace(Sigma')`` in the Frobenius norm), plus the measured factorisation
  residual ``||Sigma' - U diag(lambda) U^T||_F`` (negative eigenvalues clamped to 0 are part of
  it) with the rounding of that measurement, ``1.01 (D + 4) u (max lambda ||U||_F^2 + ||Sigma'||_F)``.
- ``orthogonality_error``: a bound on ``||U^T U - I||_2``, measured in the Frobenius norm, plus the
  rounding of ``U^T U``, ``1.01 (D + 2) u ||U||_F^2``.

A model truncated to rank r (``rank=``) keeps the r largest eigenpairs; it is then a model of
its own, ``N(mu', U_r diag(lambda_r) U_r^T)`` with the stored float64 values taken as exact, and
the engine's bound refers to it (its distance to the full covariance is ``lambda_(r+1)``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "GAUSSIAN_AUTO_MAX_DIM",
    "GaussianModel",
    "gaussian_from_rows",
    "write_gaussians",
    "read_gaussians",
]

_U = 2.0**-53
#: ``index build`` writes the Gaussian by default up to this D (its eigenvectors are D^2 float64
#: per class: 72 MiB at D = 3072); above it only when asked (``--linear``, ``--linear-rank``).
GAUSSIAN_AUTO_MAX_DIM = 4096
_ROWS_BYTES = 32 << 20  # rows per block when summing, whatever D


@dataclass(frozen=True)
class GaussianModel:
    """``N(mean, U diag(eigenvalues) U^T)`` of one scope of a data set, float64 on one device.

    Attributes:
        label: the class (-1: all rows).
        count: rows summed (samples of positive weight and zero weight alike).
        mean: (D,) mean.
        eigenvalues: (r,) clamped to >= 0, in decreasing order.
        eigenvectors: (D, r) the matching columns U.
        mean_error: componentwise bound on ``|mean - exact mean|`` of the stored values.
        covariance_error: spectral-norm bound on ``U diag(eigenvalues) U^T - exact covariance``
            (meaningful for the full rank; a truncated model is its own reference).
        u_frobenius: ``||U||_F`` (about sqrt(r); enters the engine's rounding bounds).
        orthogonality_error: bound on ``||U^T U - I||_2`` (a truncation's is at most the full one's).
        full_rank: r == D (the model is the data's Gaussian, not a truncation).
    """

    label: int
    count: int
    mean: torch.Tensor
    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    mean_error: float
    covariance_error: float
    u_frobenius: float
    orthogonality_error: float
    full_rank: bool

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def rank(self) -> int:
        return int(self.eigenvalues.shape[0])

    def truncated(self, rank: int | None) -> GaussianModel:
        """The model of the ``rank`` largest eigenpairs (None or >= r: this model)."""
        if rank is None or rank >= self.rank:
            return self
        if rank < 1:
            raise ValueError(f"the linear oracle's rank must be >= 1, got {rank}")
        u = self.eigenvectors[:, :rank].contiguous()
        return replace(
            self,
            eigenvalues=self.eigenvalues[:rank].contiguous(),
            eigenvectors=u,
            u_frobenius=float(torch.linalg.vector_norm(u)),
            full_rank=False,
        )

    def to(self, device: torch.device | str) -> GaussianModel:
        return replace(
            self, mean=self.mean.to(device), eigenvalues=self.eigenvalues.to(device),
            eigenvectors=self.eigenvectors.to(device),
        )  # fmt: skip


def _blocks(n: int, dim: int) -> Iterator[tuple[int, int]]:
    rows = max(1, _ROWS_BYTES // (8 * max(1, dim)))
    for s in range(0, n, rows):
        yield s, min(n, s + rows)


def gaussian_from_rows(
    x: Any,
    log_weights: torch.Tensor | None,
    *,
    label: int = -1,
    rank: int | None = None,
    device: torch.device | str = "cpu",
    xmax: float | None = None,
) -> GaussianModel:
    """The Gaussian of the rows of ``x`` ((n, D), numpy, memory-mapped or torch, any float dtype).

    Args:
        log_weights: (n,) float64 log weights of the rows (any constant offset), or None.
        rank: keep this many eigenpairs (None: all).
        device: where to compute (the eigendecomposition runs there) and keep the model.
        xmax: ``max |x_ij|`` if known (else measured).

    Raises:
        ValueError: no rows, or rows that all weigh 0.
    """
    n = int(x.shape[0])
    if n == 0:
        raise ValueError("the Gaussian of an empty set of samples is undefined; query a class that has samples")
    dim = int(math.prod(int(s) for s in x.shape[1:]))
    dev = torch.device(device)
    f64 = torch.float64

    def rows(s: int, e: int) -> torch.Tensor:
        block = x[s:e]
        t = block if isinstance(block, torch.Tensor) else torch.from_numpy(np.asarray(block))
        return t.reshape(e - s, dim).to(device=dev, dtype=f64)

    p: torch.Tensor | None = None
    if log_weights is not None:
        lw = log_weights.to(device=dev, dtype=f64)
        p = torch.exp(lw - lw.max())
        if not bool((p > 0).any()):
            raise ValueError("every sample of this scope has weight 0: its Gaussian is undefined")
    total = float(p.sum()) if p is not None else float(n)
    acc = torch.zeros(dim, dtype=f64, device=dev)
    amax = 0.0
    for s, e in _blocks(n, dim):
        r = rows(s, e)
        if xmax is None:
            amax = max(amax, float(r.abs().max()))
        acc += (p[s:e] @ r) if p is not None else r.sum(0)
    xmax = amax if xmax is None else float(xmax)
    mean = acc / total
    cov = torch.zeros(dim, dim, dtype=f64, device=dev)
    for s, e in _blocks(n, dim):
        c = rows(s, e) - mean
        cw = c * p[s:e, None] if p is not None else c
        cov.addmm_(cw.T, c)
    cov /= total
    cov = 0.5 * (cov + cov.T)  # exactly symmetric (each entry's two sums differ in rounding only)
    lam, u = torch.linalg.eigh(cov)
    lam, u = lam.flip(0).clamp(min=0.0), u.flip(1).contiguous()
    recon = (u * lam) @ u.T
    u_fro = float(torch.linalg.vector_norm(u))
    lam_max = float(lam[0]) if lam.numel() else 0.0
    cov_fro = float(torch.linalg.vector_norm(cov))
    residual = float(torch.linalg.vector_norm(cov - recon)) * (1 + (dim * dim + 2) * _U)
    residual += 1.01 * (dim + 4) * _U * (lam_max * u_fro**2 + cov_fro)
    gram = u.T @ u
    gram.diagonal().sub_(1.0)
    ortho = float(torch.linalg.vector_norm(gram)) * (1 + (dim * dim + 2) * _U) + 1.01 * (dim + 2) * _U * u_fro**2
    mean_error = (1.01 * n * _U + (n + 4) * _U) * xmax + (math.expm1(4 * _U) * 2 * xmax if p is not None else 0.0)
    trace = float(torch.diagonal(cov).sum()) * (1 + (dim + 2) * _U)
    sum_error = 1.01 * (n + 12) * _U * trace
    # the spectral norm is at most the Frobenius norm; delta delta^T has norm ||delta||^2 <= D e^2
    cov_error = residual + sum_error + dim * mean_error**2
    model = GaussianModel(
        label=int(label), count=n, mean=mean, eigenvalues=lam, eigenvectors=u, mean_error=mean_error,
        covariance_error=cov_error, u_frobenius=u_fro, orthogonality_error=ortho, full_rank=True,
    )  # fmt: skip
    return model.truncated(rank)


def _key(label: int) -> str:
    return "all" if label < 0 else f"class{label}"


def write_gaussians(path: str | Path, models: list[GaussianModel]) -> str:
    """Write the models into one ``.npz`` file; returns ``sha256:<hex>`` of its bytes."""
    arrays: dict[str, np.ndarray] = {}
    for m in models:
        k = _key(m.label)
        arrays[f"{k}.mean"] = m.mean.cpu().numpy()
        arrays[f"{k}.eigenvalues"] = m.eigenvalues.cpu().numpy()
        arrays[f"{k}.eigenvectors"] = m.eigenvectors.cpu().numpy()
        arrays[f"{k}.facts"] = np.array(
            [m.count, m.mean_error, m.covariance_error, m.u_frobenius, m.orthogonality_error, float(m.full_rank)],
            dtype=np.float64,
        )
    p = Path(path)
    with p.open("wb") as fh:
        np.savez(fh, **arrays)  # type: ignore[arg-type]  # numpy stubs read the first keyword as allow_pickle
    return file_sha256(p)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def read_gaussians(
    path: str | Path, dim: int, *, expect_sha256: str | None, device: torch.device | str
) -> dict[int, GaussianModel]:
    """The models of a file written by :func:`write_gaussians`, by label.

    Raises:
        ValueError: a file whose hash (when ``expect_sha256`` is given) or shapes disagree.
    """
    p = Path(path)
    if expect_sha256 is not None:
        found = file_sha256(p)
        if found != expect_sha256:
            raise ValueError(
                f"{p}: the Gaussian file does not match its fingerprint (expected {expect_sha256}, found {found}); "
                "the files were changed, rebuild the index"
            )
    out: dict[int, GaussianModel] = {}
    with np.load(p, allow_pickle=False) as npz:
        keys = sorted({k.split(".")[0] for k in npz.files})
        for k in keys:
            label = -1 if k == "all" else int(k.removeprefix("class"))
            mean, lam, u = (npz[f"{k}.{f}"] for f in ("mean", "eigenvalues", "eigenvectors"))
            facts = npz[f"{k}.facts"]
            r = lam.shape[0]
            if mean.shape != (dim,) or u.shape != (dim, r) or facts.shape != (6,):
                raise ValueError(f"{p}: the Gaussian of scope {k!r} does not have D = {dim}; rebuild the index")
            out[label] = GaussianModel(
                label=label, count=int(facts[0]), mean=torch.from_numpy(mean).to(device),
                eigenvalues=torch.from_numpy(lam).to(device), eigenvectors=torch.from_numpy(u).to(device),
                mean_error=float(facts[1]), covariance_error=float(facts[2]), u_frobenius=float(facts[3]),
                orthogonality_error=float(facts[4]), full_rank=bool(facts[5]),
            )  # fmt: skip
    return out
