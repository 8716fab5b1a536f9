"""The engine's one rounding-error model: unit roundoffs, GEMM settings and every proven bound.

Model (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., sections 2.2 and 3.1):
each floating-point operation gives ``fl(a op b) = (a op b)(1 + d) + e`` with ``|d| <= u`` and
an underflow term ``|e| <= tiny``. With flush-to-zero and denormals-are-zero turned on (see
:mod:`._flush`), ``tiny`` is the smallest *normal* number (2^-126 in float32, 2^-1022 in float64)
instead of half the smallest subnormal, and every input below it is read as 0, which is again an
absolute error below ``tiny`` times the other factor. Every bound below carries such terms; they
are some 30 orders of magnitude below the weights that matter: a sample within reach of the
maximum logit has weight at least ``e^-(ln N + 37) > 1e-25`` (N < 10^9) relative to the largest,
far above 2^-126 ~ 1.2e-38, so flushing never touches a weight that is kept.

Dot products: with ``gamma_n = n u / (1 - n u)``, any summation order with or without fused
multiply-adds gives ``|fl(x . y) - x . y| <= gamma_n sum_j |x_j y_j| <= gamma_n ||x|| ||y||``
(Cauchy-Schwarz); inputs rounded first (to the screening dtype, or to TF32 / bfloat16 inside a
float32 GEMM, see :func:`float32_gemm_unit_roundoff`) add their unit roundoffs. For ``n u <=
0.01`` we use ``gamma_n <= 1.01 n u``.

Screening logits ``lt_i = fl(G_i - h ||x_i||^2 + log p_i)`` (``G = (c x_t) . x_i`` from the
screening GEMM, the query scaled in float32 first, ``c = alpha / sigma^2``, ``h = alpha^2 / (2
sigma^2)``) differ from the exact
``c x_t . x_i - h ||x_i||^2 + log p_i`` (the exact logit plus the per-query constant
``||x_t||^2 / (2 sigma^2)``) by at most :func:`screen_logit_error`: the GEMM bound
``gamma c ||x_t|| max||x_i||`` plus float32 rounding of ``c``, ``h``, ``||x_i||^2``, the product,
the subtraction and the sum, at most six roundings of each of the three terms (slack 1.02).

Exact logits from differences (:func:`pair_logit_error`): ``d2 = sum_j (x_tj - alpha x_ij)^2`` in
float64 carries ``(k + 5) u d2`` from the squares and their sum, where k is the number of additions
any one square passes through: ``D - 1`` for a sum in an unknown order, about ``2 sqrt(D)`` for
the two-level sum :func:`blocked_sum` (blocks of about sqrt(D) squares, then the block sums; 110
instead of 3,071 at D = 3,072); plus, where ``alpha x_ij`` is
rounded before the subtraction, ``sum_j 2 u |alpha x_ij| |x_tj - alpha x_ij| <= 2 u |alpha|
||x_i|| sqrt(d2)`` and its square (Cauchy-Schwarz); times ``1 / (2 sigma^2)`` (its own rounding is
inside the slack), plus ``u |log p_i|`` for adding the log weight.

Dense float64 logits (:func:`dense_logit_error`): the GEMM gives ``c x_t . x_i`` with
``(D + 1) u c ||x_t|| ||x_i||`` (``c x_t`` rounded first), ``h ||x_i||^2`` carries the error of the
stored ``||x_i||^2`` (a float64 sum of D squares) and two roundings, and the per-query constant
``||x_t||^2 / (2 sigma^2)`` its own float64 sum; all three are below
``(D + 8) u (||x_t|| + alpha max||x_i||)^2 / (2 sigma^2)``.

Posterior mean (:func:`x1_error`): logits off by at most ``e`` change every weight by a factor in
``[e^-2e, e^2e]`` (numerator and normaliser), so with ``w = e^2e - 1``, ``|g'_i - g_i| <= w g_i``.
As ``sum_i (g'_i - g_i) = 0``, for the sample a of the largest computed logit ``x1' - x1 = sum_(i !=
a) (g'_i - g_i) (x_i - x_a)``, so ``|x1' - x1|_j <= w (1 - g_a) 2 max|x|``: a posterior that sits
on one sample has an error far below ``w 2 max|x|``. Its computed weight is ``1 / s`` (``s`` the
normaliser about the maximum), within ``e^2e`` and the sum's rounding of the exact ``g_a``, so
``1 - g_a <= 1 - (1 - (n + 4) u) e^-2e / s``. The samples left out weigh ``tau`` relative to the
kept mass: at most ``e^-37`` (each lies more than ``ln n + 37`` nats below the maximum), and in
the refinement stage at most ``(n - k) e^(lt_(k+1) + err - lower)`` from the best screened logit
left out; a dense pass leaves nothing out. They move the mean by at most ``tau 2 max|x|``.
Float64 rounding of the weighted sums is carried by the partials (``mean_err``, see
:mod:`._partials`); ``exp`` in float64 is within 2 u, which is counted as 2 u more logit error.

Split route (:func:`split_reach`): a slot with many candidates whose weight sits on a few (the
middle of the path) gets exact float64 logits for its *head*, the rows screened within ``R`` nats
of the maximum (``lt >= lower - R - err``), and the screened logits (error ``e_t``, the screening
bound plus the rounding of the weights to float32) for all other rows, whose weights then sum in
float32. Each tail row's exact logit lies below ``lower - R``, so the tail weighs ``tau <= n e^-R``
of the largest weight. With head logits off by ``e_h``, the normaliser moves by at most ``e_h +
tau (e^e_t - 1)``, so the mean is off by at most ``(e^(2 (e_h + tau (e^e_t - 1))) - 1) 2 max|x| +
tau (e^(2 e_t) - 1) 2 max|x|`` plus the float32 sums' rounding, which the merged partials weigh by
the tail's mass. ``R`` is chosen so that both tail terms stay below ``SPLIT_TAIL_TOL``.

Posterior variance (:func:`variance_error`): with perturbed weights ``g'`` and their mean ``x1'``,
``var' = sum g'_i ||x_i - x1||^2 - ||x1' - x1||^2``; ``|sum (g'_i - g_i) ||x_i - x1||^2| <= w var`` and
``||x1' - x1|| <= w sum g_i ||x_i - x1|| <= w sqrt(var)`` (Cauchy-Schwarz), so ``|var' - var| <=
(w + w^2) var <= (w + w^2) var' / (1 - w - w^2)``: relative, however small the variance. The
omitted tail moves it by at most ``tau (4 max ||x_i||^2 + var)`` (a mixture's variance is the
kept part's, the tail's and the squared gap of their means, weighted); rounding is carried by the
partials (``m2_err``).

Entropy (:func:`entropy_error`): with ``g'_i = g_i r_i``, ``r_i`` in ``[e^-2e, e^2e]``, ``H' - H =
-sum g_i (r_i - 1) log g_i - sum g'_i log r_i``, so ``|H' - H| <= w H + 2e`` (``-log g_i >= 0``
sums to H), and ``H <= min(log n, (H' + 2e) / (1 - w))``. The tail, a share ``eps <= tau`` of the
mass with an entropy of its own at most ``log n``: ``|H_full - H_kept| <= eps 2 log n +
eps (1 + log(1 / eps))`` (the mixing term is the binary entropy of eps). Rounding of ``log s - h
/ s``: at most ``1.01 (n + 8) u (1 + log n)`` (``|h| / s = log s - H <= log n``).

Effective sample size (:func:`ess_error`): ``sum g'^2 = sum g^2 r^2`` lies within ``e^(+-4e)`` of
``sum g^2``, so the ESS within a factor ``e^4e``; the tail changes ``sum g^2`` by a factor in
``[(1 - eps)^2, 1 + n eps^2]``; rounding of ``s^2 / q`` a relative ``3.03 (n + 4) u``. With F the
product of the three factors, ``|ESS' - ESS| <= ESS' (F - 1)``. Both bounds are capped by the range
a value can take, ``[0, log n]`` and ``[1, n]``: where the logits' bound is many nats (the fast
mode near t = 1) that range is all that is known.

Fast mode: every row is kept (tau = 0) and ``e`` is the screening bound, so the same three
functions bound its mean, entropy and ESS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "U64",
    "U32",
    "TINY32",
    "TINY64",
    "REACH_MARGIN",
    "DENSE_LOGIT_TOL",
    "SPLIT_TAIL_TOL",
    "split_reach",
    "SCREEN_DTYPES",
    "ScreenModel",
    "float32_gemm_unit_roundoff",
    "screening_error_bound",
    "reach",
    "screen_logit_error",
    "pair_logit_error",
    "dense_logit_error",
    "mean_rounding",
    "x1_error",
    "variance_error",
    "entropy_error",
    "ess_error",
    "blocked_sum",
    "blocked_sum_terms",
]

U64 = 2.0**-53
U32 = 2.0**-24
TINY64 = 2.0**-1022  # smallest normal float64: absolute error of one operation under FTZ / DAZ
TINY32 = 2.0**-126
#: Nats beyond ln(N) below the maximum past which samples are dropped: N e^-(ln N + 37) < 2^-53.
REACH_MARGIN = 37.0
#: Dense float64 logits are used only when their error bound is below this many nats (weights
#: then carry relative errors below 2e-7, far inside the 1e-5 accuracy target); otherwise the
#: candidates are recomputed from differences.
DENSE_LOGIT_TOL = 1e-7
#: The split route leaves the samples more than ``split_reach`` nats below the maximum to their
#: screened logits and float32 sums: their share of the mean's error is at most this times
#: 2 max|x| (see :func:`split_reach`).
SPLIT_TAIL_TOL = 1e-8
#: Unit roundoff of the inputs for each screening precision (the accumulation is float32).
SCREEN_DTYPES: dict[str, tuple[torch.dtype, float]] = {
    "float32": (torch.float32, U32),
    "bfloat16": (torch.bfloat16, 2.0**-8),
    "float16": (torch.float16, 2.0**-11),
}
_TF32 = 2.0**-11
_BF16 = 2.0**-8


def _backend_precision(path: tuple[str, ...]) -> str:
    """``torch.backends.<path>.fp32_precision`` where this torch has it (2.9+), else "none"."""
    obj: object = torch.backends
    for name in path:
        obj = getattr(obj, name, None)
        if obj is None:
            return "none"
    value = getattr(obj, "fp32_precision", "none")
    return value if isinstance(value, str) else "none"


def float32_gemm_unit_roundoff(device: torch.device) -> float:
    """Unit roundoff of a float32 GEMM's *inputs* under the current torch settings, on ``device``.

    ``torch.set_float32_matmul_precision``: "highest" is true float32 (2^-24); "high" allows
    TF32 (10-bit mantissas, 2^-11) or bfloat16x3 (more accurate than TF32); "medium" allows
    bfloat16 (2^-8), on CPUs through oneDNN as well as on GPUs. The per-backend settings of newer
    torch (``torch.backends.cuda.matmul.fp32_precision``, ``torch.backends.mkldnn.matmul.
    fp32_precision``) and ``torch.backends.cuda.matmul.allow_tf32`` can lower it further. The
    bound takes the worst of everything that applies; the accumulation stays float32 (2^-24).
    """
    u = U32
    legacy = torch.get_float32_matmul_precision()
    if legacy == "high":
        u = _TF32
    elif legacy == "medium":
        u = _BF16
    backend = ("cuda", "matmul") if device.type == "cuda" else ("mkldnn", "matmul")
    flag = _backend_precision(backend)
    if flag == "tf32":
        u = max(u, _TF32)
    elif flag == "bf16":
        u = max(u, _BF16)
    if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        u = max(u, _TF32)
    return u


@dataclass(frozen=True)
class ScreenModel:
    """The screening GEMM as it really runs: its dtype and its relative dot-product bound.

    ``|G - x_t . x_i| <= gamma ||x_t|| ||x_i|| + tiny (D + 2) (||x_t||_inf + max|x| + 1)``.
    ``acc_u`` is the unit roundoff of a float32 GEMM's inputs under the current settings (used
    for the fast mode's float32 weighted sums).
    """

    dtype: torch.dtype
    gamma: float
    acc_u: float

    @classmethod
    def choose(cls, screen: str, device: torch.device, storage: torch.dtype, dim: int) -> ScreenModel:
        """The model for screening precision ``screen`` over data stored as ``storage``.

        Half-precision screening is used on CUDA only (half GEMMs are slow on CPUs). The bound
        counts the float32 accumulation ``(D + 2) u32``, the rounding of the query to the
        screening dtype, of the data where it is stored in another dtype, of both inside the GEMM
        (TF32 / bf16 under a float32 matmul precision below "highest") and of the product where
        the GEMM returns a half-precision result; plus 2 u32 for scaling the query by c in
        float32 before it (c rounded, the product rounded).
        """
        if screen not in SCREEN_DTYPES:
            raise ValueError(f"unknown screening precision {screen!r}; use one of {sorted(SCREEN_DTYPES)}")
        dtype, u_in = SCREEN_DTYPES[screen]
        if device.type != "cuda" and dtype != torch.float32:
            dtype, u_in = torch.float32, U32
        g = float32_gemm_unit_roundoff(device)
        if dtype == torch.float32:
            internal = 0.0 if g == U32 else 2 * g  # both operands rounded inside the GEMM
            data_u, out_u = 0.0, 0.0
        else:
            internal = 0.0
            data_u = 0.0 if storage == dtype else u_in
            out_u = u_in
        gamma = ((dim + 4) * U32 + u_in + data_u + internal + out_u) * 1.01 + 4 * U64
        return cls(dtype=dtype, gamma=gamma, acc_u=g)


def reach(rows: int) -> float:
    """Nats below the maximum logit within which samples are kept: ``ln(rows) + 37``."""
    return math.log(max(rows, 1)) + REACH_MARGIN


def screen_logit_error(
    model: ScreenModel,
    c: torch.Tensor,
    h: torch.Tensor,
    qnorm: torch.Tensor,
    max_sq: torch.Tensor,
    max_abs_logw: float,
    dim: int,
) -> torch.Tensor:
    """(B,) bound on ``|lt_i - (c x_t . x_i - h ||x_i||^2 + log p_i)|`` for every row of a range.

    ``c``, ``h``, ``qnorm`` (B,) float64; ``max_sq`` () float64 = max ||x_i||^2 over the range;
    ``max_abs_logw``: max |log p_i| over the weighted rows (0 without weights).
    """
    cq = c * qnorm * max_sq.sqrt()
    err = model.gamma * cq + 6 * U32 * (1.02 * cq + h * max_sq + max_abs_logw)
    # underflow (flush-to-zero) in the GEMM and the epilogue: far below anything above
    return err + TINY32 * (dim + 8) * (c * (qnorm + max_sq.sqrt() + 1.0) + 1.0)


def _block(dim: int) -> int:
    """Block length of :func:`blocked_sum` over ``dim`` values: a divisor of dim within a factor 2
    of sqrt(dim) when there is one (the blocks are then a free view), else ceil(sqrt(dim))."""
    root = math.isqrt(dim)
    for b in sorted(range(max(1, root // 2), 2 * root + 2), key=lambda c: abs(c - math.sqrt(dim))):
        if dim % b == 0:
            return b
    return max(1, root + (root * root < dim))


def blocked_sum_terms(dim: int) -> int:
    """Additions any one value passes through in :func:`blocked_sum` over ``dim`` values (a sum
    in an unknown order: ``dim - 1``): its rounding is at most ``1.01 terms u sum |x|``."""
    if dim <= 2:
        return max(dim - 1, 0)
    b = _block(dim)
    return (b - 1) + (dim // b - 1) + (1 if dim % b else 0)


def blocked_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last dimension in two levels: blocks of about sqrt(D) values, then the block
    sums (and a short remainder), so that each value passes through :func:`blocked_sum_terms`
    additions, about ``2 sqrt(D)`` instead of up to ``D - 1`` in a single sum of unknown order."""
    d = x.shape[-1]
    if d <= 2:
        return x.sum(dim=-1)
    b = _block(d)
    full = d - d % b
    head = x[..., :full] if full < d else x
    total = head.reshape(*x.shape[:-1], full // b, b).sum(dim=-1).sum(dim=-1)
    if full < d:
        total = total + x[..., full:].sum(dim=-1)
    return total


def pair_logit_error(
    d2: torch.Tensor,
    inv2s2: torch.Tensor,
    alpha_xnorm: torch.Tensor,
    logw: torch.Tensor | None,
    dim: int,
    sum_terms: int | None = None,
) -> torch.Tensor:
    """Bound on the error of ``log p_i - d2 / (2 sigma^2)`` from float64 differences (elementwise).

    ``d2`` computed squared distances, ``inv2s2 = 1 / (2 sigma^2)``, ``alpha_xnorm = |alpha|
    ||x_i||`` (broadcast against d2), ``logw`` the log weights of the rows or None; ``sum_terms``
    the additions of the sum of squares (:func:`blocked_sum_terms`; None: ``dim - 1``, any order).
    """
    k = dim - 1 if sum_terms is None else sum_terms
    err = ((k + 5) * U64 * d2 + 2.02 * U64 * alpha_xnorm * d2.sqrt() + 2.0 * U64 * U64 * alpha_xnorm**2) * inv2s2
    err = err + TINY64 * (dim + 4) * (1.0 + 2.0 * d2.sqrt()) * inv2s2
    if logw is not None:
        err = err + U64 * torch.where(torch.isfinite(logw), logw.abs(), torch.zeros_like(logw))
    return err


def dense_logit_error(
    qnorm: torch.Tensor,
    alpha: torch.Tensor,
    max_norm: torch.Tensor,
    inv2s2: torch.Tensor,
    max_abs_logw: float,
    dim: int,
) -> torch.Tensor:
    """(B,) bound on the error of the dense float64 pass's full logits (see module docstring)."""
    total = (qnorm + alpha.abs() * max_norm) ** 2
    return (dim + 8) * U64 * total * inv2s2 + U64 * max_abs_logw + TINY64 * (dim + 8) * (1.0 + total) * inv2s2


def split_reach(err: torch.Tensor, rows: torch.Tensor, acc_rel: float) -> torch.Tensor:
    """(S,) nats below the maximum past which the split route leaves rows to float32: ``R = ln(n)
    + ln(max(e^(2 e_t) - 1, acc_rel) / SPLIT_TAIL_TOL)``, so that ``n e^-R`` times either stays
    below the tolerance (``err`` the tail's logit bound, ``acc_rel`` the float32 sums' relative
    rounding)."""
    worst = torch.expm1(2.0 * err).clamp(min=acc_rel)
    return torch.log(rows) + torch.log(worst / SPLIT_TAIL_TOL)


def mean_rounding(terms: int, xmax: float, acc_u: float = U64) -> float:
    """Bound on the componentwise rounding error of a weighted mean of ``terms`` samples.

    ``v = sum_i p_i x_i`` accumulated in a precision of unit roundoff ``acc_u`` carries
    ``gamma_terms sum p |x| <= 1.01 terms acc_u s max|x|``; ``s`` its own float64 sum; the division
    one more rounding: ``(1.01 terms acc_u + (terms + 4) u64) max|x|``.
    """
    return (1.01 * terms * acc_u + (terms + 4) * U64) * xmax + TINY64 * (terms + 4)


def x1_error(
    logit_err: torch.Tensor,
    mean_err: torch.Tensor | float,
    xmax: float,
    tail: torch.Tensor,
    normaliser: torch.Tensor | None = None,
    rows: int = 1,
) -> torch.Tensor:
    """(B,) bound on ``max_j |x1_hat_j - exact_j|`` from the logits' error bound (B,), the
    partials' rounding bound ``mean_err``, the data's max |x_ij| and ``tail`` (B,), a bound on
    the weight of the samples left out relative to the kept mass.

    ``normaliser`` (B,): the partials' ``s`` (the sum of ``e^(l_i - m)``, so the top weight is
    ``1 / s``) over at most ``rows`` terms; with it the weights' term shrinks by ``1 - g_top``
    (see the module docstring), without it the bound assumes nothing about the weights."""
    spread = 2.0 * xmax
    e2 = 2.0 * (logit_err + 2 * U64)
    weights = torch.expm1(e2) * spread
    if normaliser is not None:
        top_low = (1.0 - 1.01 * (rows + 4) * U64) * torch.exp(-e2) / normaliser
        weights = weights * (1.0 - top_low).clamp(min=0.0, max=1.0)
    return weights + tail * spread + mean_err


def entropy_error(entropy: torch.Tensor, logit_err: torch.Tensor, tail: torch.Tensor, rows: int) -> torch.Tensor:
    """(B,) bound on ``|entropy - exact|`` (nats) of a posterior over at most ``rows`` samples,
    from the logits' error bound (B,) and the left-out weight ``tail`` (B,) relative to the kept
    mass (see the module docstring)."""
    log_n = math.log(max(rows, 1))
    e = logit_err + 2 * U64
    w = torch.expm1(2.0 * e)
    rounding = 1.01 * (rows + 8) * U64 * (1.0 + log_n)
    lifted = (entropy.clamp(min=0.0) + rounding + 2.0 * e) / (1.0 - w).clamp(min=1e-300)
    kept = torch.where(w < 1.0, lifted.clamp(max=log_n), torch.full_like(entropy, log_n))
    eps = tail / (1.0 + tail)
    safe = torch.where(eps > 0, eps, torch.ones_like(eps))
    tail_part = torch.where(eps > 0, eps * (2.0 * log_n + 1.0 - torch.log(safe)), torch.zeros_like(eps))
    bound = w * kept + 2.0 * e + tail_part + rounding
    # an entropy lies in [0, log n] whatever the logits: never claim more than that range allows
    within = torch.maximum(entropy.clamp(min=0.0), log_n - entropy.clamp(max=log_n)) + rounding
    return torch.minimum(bound, within)


def ess_error(ess: torch.Tensor, logit_err: torch.Tensor, tail: torch.Tensor, rows: int) -> torch.Tensor:
    """(B,) bound on ``|ESS - exact|`` of a posterior over at most ``rows`` samples (see the
    module docstring): ``ESS (F - 1)`` with F the weights', the tail's and the rounding's factors."""
    e = logit_err + 2 * U64
    eps = tail / (1.0 + tail)
    tail_rel = torch.maximum(rows * eps * eps, 1.0 / (1.0 - eps).clamp(min=1e-300) ** 2 - 1.0)
    rounding = 3.03 * (rows + 4) * U64
    factor = torch.exp(4.0 * e) * (1.0 + rounding) * (1.0 + tail_rel)
    # an ESS lies in [1, n] whatever the logits
    within = torch.maximum(ess - 1.0, rows - ess).clamp(min=0.0) + rounding * ess
    return torch.minimum(ess * (factor - 1.0), within)


def variance_error(
    var: torch.Tensor,
    logit_err: torch.Tensor,
    m2_err: torch.Tensor,
    tail: torch.Tensor,
    max_sq: torch.Tensor,
) -> torch.Tensor:
    """(B,) bound on ``|variance - exact|`` (see module docstring).

    ``var`` the computed posterior variance, ``m2_err`` the partials' rounding bound of it,
    ``tail`` (B,) the left-out weight relative to the kept mass, ``max_sq`` (B,) the largest
    ``||x_i||^2`` of each query's rows (``||x_i - x_j||^2 <= 4 max_sq``).
    """
    ew = torch.expm1(2.0 * (logit_err + 2 * U64))
    grow = ew + ew * ew
    logits_part = grow * (var + m2_err) / (1.0 - grow).clamp(min=1e-300)
    return logits_part + tail * (4.0 * max_sq + var + m2_err) + m2_err


def screening_error_bound(
    q_norm: torch.Tensor, max_data_norm: float, dim: int, unit_roundoff: float = 2.0**-24
) -> torch.Tensor:
    """Bound on ``|screened - exact|`` squared distance, per query.

    The screen is ``s_i = ||x||^2 + (||x_i||^2 - 2 x . x_i)`` with the dot product (and the
    float32 rounding of x and of ``||x_i||^2``) in float32; faiss computes every term in float32.
    With u the GEMM unit roundoff, any summation order gives ``|fl(q . x_i) - x . x_i| <=
    (u + gamma_D (1 + u)) ||x|| ||x_i||`` (gamma_D = D u / (1 - D u), Cauchy-Schwarz), and the
    norm terms add at most ``(gamma_D + 3u)(||x||^2 + ||x_i||^2)``. Taken together, for D u <= 0.1,

        |s_i - d_i| <= 3 (D + 2) u (||x|| + ||x_i||)^2 + 4 (D + 4) 2^-53 (||x|| + ||x_i||)^2

    (the second term covers the float64 arithmetic). ``||x_i||`` is replaced by its maximum
    over the data, so the bound holds for every sample, screened or not.

    Args:
        q_norm: (B,) float64 query norms ``||x||``.
        max_data_norm: ``max_i ||x_i||`` of the stored data.
        dim: D.
        unit_roundoff: u of the screening arithmetic.

    Returns:
        (B,) float64 bounds.
    """
    c = 3.0 * (dim + 2) * unit_roundoff + 4.0 * (dim + 4) * U64
    return c * (q_norm + max_data_norm) ** 2
