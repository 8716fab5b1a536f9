"""The linear (Gaussian, Wiener) oracle: the optimal denoiser when the data are replaced by a
Gaussian with their mean and covariance.

With ``mu``, ``Sigma = U diag(lambda) U^T`` the (weighted) mean and covariance of the data set or
of one class (:func:`floworacle_server.data.gaussian_model`, computed once and kept),

    x1_hat = mu + U diag(g) U^T (x_t - alpha mu),    g_k = alpha lambda_k / (alpha^2 lambda_k + sigma^2),

which is ``mu + alpha Sigma (alpha^2 Sigma + sigma^2 I)^-1 (x_t - alpha mu)``. Cost per query: two
products with U, 4 D r multiply-adds (r = D, or the rank asked for).

Error bound (per query, proven whatever the eigensolver's accuracy). Write ``f(X) = alpha X
(alpha^2 X + sigma^2 I)^-1 = (I - sigma^2 (alpha^2 X + sigma^2 I)^-1) / alpha`` for a PSD X; for
two PSD matrices ``f(A) - f(B) = sigma^2 alpha M_A^-1 (A - B) M_B^-1`` with ``||M^-1|| <= 1 /
sigma^2``, so ``||f(A) - f(B)|| <= |alpha| ||A - B|| / sigma^2``. Let Q be the orthonormal polar
factor of the computed U (``||U - Q|| <= omega``, the model's ``orthogonality_error``) and
``Sigma_Q = Q diag(lambda) Q^T``. Then, with y' the computed ``x_t - alpha mu'``,

    |x1' - x1|_inf <= e_mu                                   the mean's error
                    + ||z' - U g U^T y'||                     rounding of the two products
                    + 2.1 omega max(g) ||y'||                 U against Q
                    + |alpha| delta ||y'|| / sigma^2          Sigma_Q against Sigma
                    + ||f(Sigma)|| ||y' - y||                 the query's centring
                    + u |x1'|_inf                             the final sum,

``delta = 2.1 omega max(lambda) + covariance_error`` (``||Sigma_Q - Sigma||``), ``||f(Sigma)|| <=
min(1 / |alpha|, |alpha| Lambda / sigma^2)`` with ``Lambda = max(lambda) + delta``, and ``||y' - y||
<= |alpha| sqrt(D) e_mu + 2.02 u (||x_t|| + |alpha| ||mu'||)``. The products: ``w = U^T y'`` is off
by at most ``gamma_(D+2) ||U||_F ||y'||`` (``||(|U|^T |y'|)|| <= ||U||_F ||y'||``), ``g w`` adds 6 u
relative, and ``U (g w)`` ``gamma_(r+2) ||U||_F ||g w||`` plus ``||U||`` times the error carried in.
A model truncated to rank r is its own reference (``e_mu = 0``, ``delta = 2.1 omega
max(lambda)``, see :mod:`floworacle_server.data`). The term in ``1 / sigma^2`` is inherent to the
Wiener filter late in the path (its sensitivity to the covariance): the bound is tight for small D
and loose, but valid, for D in the thousands.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from floworacle_server.data import Dataset, GaussianModel, gaussian_model
from floworacle_server.engine._bounds import U64
from floworacle_server.engine._patches import PatchResult

__all__ = ["linear_oracle", "linear_x1"]


def linear_x1(
    model: GaussianModel, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x1_hat (B, D), bound (B,)) of the Wiener filter of ``model`` for float64 queries ``x``
    (B, D) and coefficients (B,) on the model's device (module docstring)."""
    mu, lam, u = model.mean, model.eigenvalues, model.eigenvectors
    d, r = model.dim, model.rank
    a = alpha[:, None]
    y = torch.addcmul(x, a, mu[None, :], value=-1.0)  # x_t - alpha mu
    w = y @ u  # (B, r)
    g = (a * lam) / (a * a * lam + (sigma * sigma)[:, None])
    gw = g * w
    z = gw @ u.T
    x1 = z.add_(mu)
    # the bound, per query
    nu = model.u_frobenius
    omega = model.orthogonality_error
    lam_max = float(lam[0]) if r else 0.0
    u_norm = math.sqrt(1.0 + omega)
    yn = torch.linalg.vector_norm(y, dim=1)
    gwn = torch.linalg.vector_norm(gw, dim=1)
    gmax = g.abs().amax(dim=1) * (1 + 8 * U64) if r else torch.zeros_like(yn)
    gam_d, gam_r = 1.01 * (d + 2) * U64, 1.01 * (r + 2) * U64
    err_w = gam_d * nu * yn
    err_gw = gmax * err_w + 6 * U64 * gwn  # g itself: five roundings
    e_fwd = gam_r * nu * (gwn + err_gw) + u_norm * err_gw
    e_orth = 2.1 * omega * gmax * yn
    full = model.full_rank
    e_mu = model.mean_error if full else 0.0
    delta = 2.1 * omega * lam_max + (model.covariance_error if full else 0.0)
    s2 = sigma * sigma
    aa = alpha.abs()
    e_cov = aa * delta * yn / s2
    big = lam_max + delta
    f_norm = torch.where(aa > 0, torch.minimum(1.0 / aa.clamp(min=1e-300), aa * big / s2), torch.zeros_like(aa))
    xn = torch.linalg.vector_norm(x, dim=1)
    mun = float(torch.linalg.vector_norm(mu))
    e_y = f_norm * (aa * math.sqrt(d) * e_mu + 2.02 * U64 * (xn + aa * mun))
    bound = e_mu + e_fwd + e_orth + e_cov + e_y + U64 * x1.abs().amax(dim=1)
    return x1, bound * (1 + 1e-12)


def linear_oracle(
    ds: Dataset,
    x_t: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    *,
    labels: torch.Tensor | np.ndarray | None = None,
    exclude: torch.Tensor | np.ndarray | None = None,
    rank: int | None = None,
) -> PatchResult:
    """The linear oracle's posterior mean for B queries (module docstring).

    Args:
        x_t: (B, D) queries, any float dtype and device.
        alpha, sigma: (B,) path coefficients (sigma > 0).
        labels: (B,) class per query (-1: the whole data set's Gaussian), or None.
        exclude: must be None or all -1: the Gaussian's moments are those of the whole set.
        rank: use the ``rank`` largest eigenpairs (None: all); a truncated model is its own
            reference (see :mod:`floworacle_server.data`).

    Raises:
        ValueError: leave-one-out asked for, sigma <= 0, an unknown or empty class, a bad rank.
    """
    x = torch.as_tensor(x_t)
    b = int(x.shape[0])
    dev = ds.device
    x = x.reshape(b, -1).to(device=dev, dtype=torch.float64)
    if x.shape[1] != ds.dim:
        raise ValueError(f"queries have {x.shape[1]} values each; data set {ds.name!r} has D = {ds.dim}")
    if exclude is not None and bool((torch.as_tensor(exclude) >= 0).any()):
        raise ValueError(
            "kind 'linear' has no leave-one-out: the Gaussian's mean and covariance are the whole set's; drop exclude"
        )
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be >= 1 (or None for all eigenpairs), got {rank}")
    alpha = torch.as_tensor(alpha, dtype=torch.float64).reshape(b).to(dev)
    sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(b).to(dev)
    if not bool((sigma > 0).all()):
        raise ValueError("the linear oracle needs sigma_t > 0 (t < 1)")
    lab = (
        np.full(b, -1, dtype=np.int64) if labels is None else np.asarray(torch.as_tensor(labels).cpu(), dtype=np.int64)
    )
    x1 = torch.empty_like(x)
    bound = torch.empty(b, dtype=torch.float64, device=dev)
    for y in np.unique(lab).tolist():
        q = torch.from_numpy(np.flatnonzero(lab == y)).to(dev)
        if y >= 0:
            start, stop = ds.class_rows(int(y))
            if stop == start:
                raise ValueError(f"class {y} has no samples in data set {ds.name!r}; query a class that has samples")
        model = gaussian_model(ds, int(y)).truncated(rank)
        xq, bq = linear_x1(model, x.index_select(0, q), alpha.index_select(0, q), sigma.index_select(0, q))
        x1.index_copy_(0, q, xq)
        bound.index_copy_(0, q, bq)
    return PatchResult(x1, bound, torch.zeros(b, dtype=torch.int64, device=dev), 0)
