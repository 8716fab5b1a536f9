"""What the patch oracles (local and equivariant local) share: patch sizes, unfolded patches, the
plan of a batch, the float64 GEMM's logit bound and the exact recomputation of candidates.

Images are (C, H, W), a flat sample read in that (row-major) order. A pixel p's window
``Omega_p`` is the P x P square centred on p (P odd, ``r = (P - 1) / 2``) over all C channels, K =
C P^2 values, **zero-padded** as a CNN pads: positions outside the image hold 0 in the query and
in the data alike. For the local oracle this means the window is clipped to the image (zeros on
both sides add nothing to a distance); for the equivariant one, a data patch centred near the
border carries zeros where its window leaves the image and is compared with the query's patch
value by value. P ranges over the odd numbers 1 .. 2 max(H, W) - 1: with the largest, every
window covers the whole image from every pixel, and a larger P would change nothing.

Logits. For a posterior row (a query x_t and one of its pixels p) and a column (a data patch b,
x_i's window at p for the local oracle, at any q for the equivariant one), with ``a`` the
query's patch at p,

    l = log w_i - ||a - alpha b||^2 / (2 sigma^2)
      = c a . b - (c alpha / 2) ||b||^2 + log w_i  -  ||a||^2 / (2 sigma^2),   c = alpha / sigma^2,

and the last term is the same for every column of the row, so it cancels in the row's softmax.
One float64 GEMM of the augmented rows ``[c a, -c alpha / 2, 1]`` and columns ``[b, ||b||^2,
log w_i]`` gives the rest. The columns of a chunk of images are copied once from a strided view
of the zero-padded chunk (:func:`patch_view`) into the layout the oracle's GEMM wants.

Its error (Higham's model, see :mod:`._bounds`): K + 2 products summed, the row's entries rounded
once or twice (``c``, its products), ``||b||^2`` a float64 sum of K squares, so every term of the
sum carries a relative error below ``1.01 (2 K + 10) u`` and

    |l' - l| <= 1.01 (2 K + 10) u (|c| ||a|| B + |c alpha| B^2 / 2 + max |log w|) + underflow,

``B`` the largest data patch norm the row meets (:func:`dense_logit_error`). Where this bound
exceeds :data:`~._bounds.DENSE_LOGIT_TOL` (late in the path, where 1/sigma^2 is large), the
row's posterior is recomputed exactly (:func:`exact_candidates`): every column whose GEMM logit
lies within ``R + 2 e`` of the row's maximum (``R = ln(columns) + 37``) gets its logit from float64
differences (:func:`~._bounds.pair_logit_error` over K values), and the columns left out weigh
less than ``e^-37`` of the largest exact weight together: each lies below ``m' - R - 2 e``, so
its exact logit is below ``m' - R - e``, and the exact maximum is at least ``m' - e``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from floworacle_server.data import Dataset
from floworacle_server.engine._bounds import TINY64, U64, pair_logit_error
from floworacle_server.engine._partials import Partials

__all__ = [
    "PatchConfig",
    "PatchResult",
    "PatchGroup",
    "image_shape_of",
    "check_patch_size",
    "max_patch_size",
    "patch_sizes",
    "plan_patch_groups",
    "unfold",
    "augmented_queries",
    "patch_view",
    "patch_sq_norms",
    "dense_logit_error",
    "chunk_partials",
    "clamp_tail",
    "EXP_FLOOR",
    "Candidates",
    "exact_candidates",
    "candidate_partials",
]


@dataclass(frozen=True)
class PatchConfig:
    """Block sizes of the patch oracles: ``logit_elements`` float64 logits per block (a CPU wants
    blocks that stay near its caches, a GPU few large kernels)."""

    logit_elements: int

    @staticmethod
    def for_device(device: torch.device) -> PatchConfig:
        # CPU: 8 MiB of logits per block (measured on digits-like shapes at B = 128: 2^20 was best
        # of 2^14 .. 2^24; smaller blocks pay per-GEMM overhead, larger ones leave the caches)
        return PatchConfig(logit_elements=1 << 27) if device.type == "cuda" else PatchConfig(logit_elements=1 << 20)


@dataclass
class PatchResult:
    """The posterior means of B queries under one of the generalising oracles.

    Attributes:
        x1_hat: (B, D) float64, D = C H W in the data's flat order.
        x1_hat_error_bound: (B,) float64, a proven bound on ``max_j |x1_hat_j - exact_j|``.
        patch_size: (B,) int64 patch size of each query (0 for the linear oracle).
        refined: (row, column) logits recomputed from float64 differences.
    """

    x1_hat: torch.Tensor
    x1_hat_error_bound: torch.Tensor
    patch_size: torch.Tensor
    refined: int = 0


def image_shape_of(ds: Dataset) -> tuple[int, int, int]:
    """(C, H, W) of the data set; ValueError with the fix when it declares none."""
    if ds.image_shape is None:
        raise ValueError(
            f"data set {ds.name!r} (sample shape {tuple(ds.sample_shape)}) has no image shape, which the patch "
            "oracles need: serve it with the setting image_shape NAME=C,H,W (--image-shape) or build its index with "
            "`floworacle index build --image-shape C,H,W`"
        )
    c, h, w = ds.image_shape
    return int(c), int(h), int(w)


def max_patch_size(image: tuple[int, int, int]) -> int:
    """The largest useful patch size, 2 max(H, W) - 1: every window then covers the whole image."""
    return 2 * max(image[1], image[2]) - 1


def check_patch_size(p: int, image: tuple[int, int, int]) -> None:
    """ValueError with the fix unless ``p`` is odd and within 1 .. 2 max(H, W) - 1."""
    top = max_patch_size(image)
    if p < 1 or p % 2 == 0:
        raise ValueError(
            f"patch size {p} must be a positive odd number (a window centred on its pixel): use {max(1, p - 1 | 1)} "
            f"or {p + 1 if p % 2 == 0 else 1}"
        )
    if p > top:
        raise ValueError(
            f"patch size {p} exceeds 2 max(H, W) - 1 = {top} for {image[1]} x {image[2]} images; {top} already "
            "covers the whole image from every pixel (the local oracle is then the global one)"
        )


def patch_sizes(
    patch_size: int | Sequence[int] | np.ndarray | torch.Tensor, batch: int, image: tuple[int, int, int]
) -> np.ndarray:
    """(B,) int64 patch sizes from one size or one per query, checked (:func:`check_patch_size`)."""
    if isinstance(patch_size, torch.Tensor):
        sizes = patch_size.detach().cpu().numpy()
    else:
        sizes = np.asarray(patch_size)
    if sizes.ndim == 0:
        sizes = np.full(batch, int(sizes), dtype=np.int64)
    if sizes.shape != (batch,):
        raise ValueError(f"patch_size must be one size or one per query ({batch}), got shape {sizes.shape}")
    if not np.issubdtype(sizes.dtype, np.integer):
        if not np.all(sizes == np.round(sizes)):
            raise ValueError("patch sizes must be integers")
    sizes = sizes.astype(np.int64)
    for p in np.unique(sizes).tolist():
        check_patch_size(int(p), image)
    return sizes


@dataclass(frozen=True)
class PatchGroup:
    """Queries ``queries`` (indices into the batch) that share a patch size and a row range."""

    patch: int
    label: int
    start: int
    stop: int
    queries: np.ndarray


def plan_patch_groups(ds: Dataset, sizes: np.ndarray, labels: np.ndarray | None) -> list[PatchGroup]:
    """Group a batch by (patch size, class); class-conditional queries scan their class's rows.

    Raises:
        ValueError: a label outside the data set's classes, or labels on an unlabelled set.
    """
    b = sizes.shape[0]
    lab = np.full(b, -1, dtype=np.int64) if labels is None else labels.astype(np.int64)
    groups = []
    for p, y in sorted({(int(p), int(y)) for p, y in zip(sizes.tolist(), lab.tolist(), strict=True)}):
        q = np.flatnonzero((sizes == p) & (lab == y))
        if y < 0:
            start, stop = 0, ds.num_samples
        else:
            start, stop = ds.class_rows(y)
            if stop == start:
                raise ValueError(f"class {y} has no samples in data set {ds.name!r}; query a class that has samples")
        groups.append(PatchGroup(p, y, start, stop, q))
    return groups


def patch_sq_norms(xc: torch.Tensor, p: int) -> torch.Tensor:
    """(L, n) squared norms of the zero-padded P x P patches of a chunk (n, C, H, W): the box
    sums of the squared pixels, summed over channels (rows, then columns: 2 P additions per
    value instead of C P^2 products; sums of squares, so any order keeps the relative bound)."""
    n, c, h, w = xc.shape
    r = (p - 1) // 2
    sq = torch.zeros(n, h + 2 * r, w + 2 * r, dtype=torch.float64, device=xc.device)
    torch.sum(xc * xc, dim=1, out=sq[:, r : r + h, r : r + w])
    rows = sq[:, :, 0:w].clone()
    for d in range(1, p):
        rows += sq[:, :, d : d + w]
    box = rows[:, 0:h].clone()
    for d in range(1, p):
        box += rows[:, d : d + h]
    return box.reshape(n, h * w).T


def unfold(x: torch.Tensor, p: int) -> torch.Tensor:
    """(n, C, H, W) -> (n, K, H W) zero-padded P x P patches, K = C P^2 in (c, dy, dx) order;
    patch ``[:, :, h W + w]`` is centred on pixel (h, w)."""
    n, c, h, w = x.shape
    return patch_view(x, p).permute(5, 2, 3, 4, 0, 1).reshape(n, c * p * p, h * w)


def augmented_queries(a: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Rows ``[c a, -c alpha / 2, 1]`` for query patches ``a`` (b, K, L) -> (b, L, K + 2);
    ``alpha``, ``sigma`` (b,) float64."""
    b, k, L = a.shape
    c = alpha / (sigma * sigma)
    out = torch.empty(b, L, k + 2, dtype=torch.float64, device=a.device)
    torch.mul(a.transpose(1, 2), c[:, None, None], out=out[:, :, :k])
    out[:, :, k] = (-0.5 * c * alpha)[:, None]
    out[:, :, k + 1] = 1.0
    return out


def patch_view(xc: torch.Tensor, p: int) -> torch.Tensor:
    """The zero-padded P x P patches of a chunk of images (n, C, H, W) as a strided view of shape
    (H, W, C, P, P, n) over one padded copy with the images last: patch (h, w) of image i is
    ``[h, w, :, :, :, i]``. Copying it into a layout costs one pass with contiguous runs of n."""
    n, c, h, w = xc.shape
    r = (p - 1) // 2
    hp, wp = h + 2 * r, w + 2 * r
    xt = torch.zeros(c, hp, wp, n, dtype=torch.float64, device=xc.device)
    xt[:, r : r + h, r : r + w, :] = xc.permute(1, 2, 3, 0)
    return xt.as_strided((h, w, c, p, p, n), (wp * n, n, hp * wp * n, wp * n, n, 1))


def dense_logit_error(
    k: int, c: torch.Tensor, alpha: torch.Tensor, a_norm: torch.Tensor, b_max: torch.Tensor, max_abs_logw: float
) -> torch.Tensor:
    """Bound on the augmented GEMM's logit error (module docstring), broadcast over ``c``,
    ``alpha`` (per query) against ``a_norm`` (query patch norms) and ``b_max`` (largest data
    patch norm met)."""
    terms = c.abs() * a_norm * b_max + 0.5 * (c * alpha).abs() * b_max * b_max + max_abs_logw
    return 1.01 * (2 * k + 10) * U64 * terms + TINY64 * (k + 4) * (1.0 + terms)


#: Logits more than this many nats below their row's maximum are raised to it before ``exp``:
#: their weights (below e^-700, still normal float64 numbers) then cost what others cost instead
#: of the slow underflow path of a vectorised ``exp`` (ten times slower on a CPU). A row of n
#: columns gains at most n e^-700 of mass against its largest weight 1: the tail of
#: :func:`clamp_tail`, some 280 orders of magnitude below anything else in the bounds.
EXP_FLOOR = 700.0


def clamp_tail(columns: int) -> float:
    """The relative mass the floor of :data:`EXP_FLOOR` can add to a row of ``columns`` columns."""
    return columns * math.exp(-EXP_FLOOR)


def chunk_partials(
    logits: torch.Tensor, values: torch.Tensor, xmax: float, dead: Callable[[torch.Tensor], None] | None = None
) -> Partials:
    """The partials of the rows of ``logits`` ((rows, n), or a batch (G, r, n) with ``values``
    (G, n, C)) over their n columns with values (n, C); a partial over the flattened rows.

    ``logits`` is consumed (turned into weights in place). ``dead`` zeroes, in place, the weights
    of the columns that must weigh exactly 0 (excluded samples, zero sample weights), whose
    logits are -inf: the floor of :data:`EXP_FLOOR` would otherwise give them e^-700.
    """
    m = logits.amax(dim=-1)
    alive = torch.isfinite(m)
    safe = torch.where(alive, m, torch.zeros_like(m))
    e = logits.sub_(safe[..., None]).clamp_(min=-EXP_FLOOR).exp_()
    if dead is not None:
        dead(e)
    if not bool(alive.all()):
        e.masked_fill_(~alive[..., None], 0.0)
    s = e.sum(dim=-1)
    v = _weighted_sum(e, values)
    n = logits.shape[-1]
    c = values.shape[-1]
    rows = m.numel()
    return Partials(
        m=m.reshape(rows),
        s=s.reshape(rows),
        v=v.reshape(rows, c),
        h=None,
        q=None,
        m2=None,
        m2_err=None,
        topk_logits=torch.empty(rows, 0, dtype=torch.float64, device=m.device),
        topk_index=torch.empty(rows, 0, dtype=torch.int64, device=m.device),
        mean_err=_mean_rounding(n, xmax),
        xmax=xmax,
    )


def _weighted_sum(e: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``e @ values`` for weights (rows, n) or (G, r, n) and values (n, C) or (G, n, C). For a few
    channels one pass per channel (a matrix-vector product, or a product and a sum per batch):
    measured on the CPU, a GEMM with C = 1 to 3 output columns runs 2 to 9 times slower."""
    c = values.shape[-1]
    if c > 4:
        return torch.matmul(e, values)
    if e.ndim == 2:
        return torch.stack([torch.mv(e, values[:, k]) for k in range(c)], dim=-1)
    return torch.stack([(e * values[..., k].unsqueeze(-2)).sum(dim=-1) for k in range(c)], dim=-1)


def _mean_rounding(terms: int, xmax: float) -> float:
    # float64 weighted sums of ``terms`` values, their normaliser and one division
    return (1.01 * terms * U64 + (terms + 4) * U64) * xmax + TINY64 * (terms + 4)


@dataclass
class Candidates:
    """Exactly recomputed (row, column) pairs of one block: rows (M,), logits (M,) float64,
    their error bounds (M,), their values (M, C)."""

    rows: torch.Tensor
    logits: torch.Tensor
    errors: torch.Tensor
    values: torch.Tensor


def exact_candidates(
    a: torch.Tensor,
    b: torch.Tensor,
    alpha: torch.Tensor,
    inv2s2: torch.Tensor,
    logw: torch.Tensor | None,
    values: torch.Tensor,
    rows: torch.Tensor,
) -> Candidates:
    """Logits of M (row, column) pairs from float64 differences: query patches ``a`` (M, K), data
    patches ``b`` (M, K), the row's ``alpha`` and ``1 / (2 sigma^2)`` (M,), the column's log
    weight (M,) or None, the column's value (M, C) and the posterior row of each pair (M,)."""
    k = a.shape[1]
    diff = torch.addcmul(a, b, alpha[:, None], value=-1.0)
    d2 = torch.linalg.vecdot(diff, diff)
    logit = -d2 * inv2s2
    if logw is not None:
        logit = logit + logw
    err = pair_logit_error(d2, inv2s2, alpha.abs() * torch.linalg.vector_norm(b, dim=1), logw, k)
    return Candidates(rows, logit, err, values)


def candidate_partials(
    cands: list[Candidates], total_rows: int, channels: int, xmax: float, columns: int, device: torch.device
) -> tuple[Partials, torch.Tensor]:
    """One partial over ``total_rows`` rows from exactly recomputed candidates (scatter sums), and
    the (total_rows,) largest logit error among each row's candidates."""
    f64 = torch.float64
    m = torch.full((total_rows,), -math.inf, dtype=f64, device=device)
    s = torch.zeros(total_rows, dtype=f64, device=device)
    v = torch.zeros(total_rows, channels, dtype=f64, device=device)
    err = torch.zeros(total_rows, dtype=f64, device=device)
    if cands:
        rows = torch.cat([c.rows for c in cands])
        logits = torch.cat([c.logits for c in cands])
        errors = torch.cat([c.errors for c in cands])
        values = torch.cat([c.values for c in cands])
        m.scatter_reduce_(0, rows, logits, reduce="amax")
        err.scatter_reduce_(0, rows, errors, reduce="amax")
        safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        e = torch.exp(logits - safe[rows])
        s.index_add_(0, rows, e)
        v.index_add_(0, rows, e[:, None] * values)
    part = Partials(
        m=m, s=s, v=v, h=None, q=None, m2=None, m2_err=None,
        topk_logits=torch.empty(total_rows, 0, dtype=f64, device=device),
        topk_index=torch.empty(total_rows, 0, dtype=torch.int64, device=device),
        mean_err=_mean_rounding(columns, xmax) + 2 * U64 * xmax, xmax=xmax,
    )  # fmt: skip
    return part, err
