"""The oracle: exact posterior means over a resident data set, streamed in chunks.

For queries (x_t, t) and data x_i with log weights log p_i the exact logits are

    l_i = log p_i - ||x_t - alpha x_i||^2 / (2 sigma^2)

and x1_hat = sum_i softmax(l)_i x_i. The logits scale with 1 / sigma^2, so near the data end a
float32 GEMM loses every digit of the gaps between competing samples. The engine therefore uses
the fast GEMM only to *screen*:

1. Screening logits ``lt_i = log p_i + c x_t . x_i - h ||x_i||^2`` (c = alpha / sigma^2,
   h = alpha^2 / (2 sigma^2); the per-query ``||x_t||^2`` term is dropped) come from a GEMM in
   the screening precision, whose error is bounded by the standard dot-product bound
   ``|fl(x . y) - x . y| <= gamma ||x|| ||y||`` (``_screen_gamma``: (D + 2) u of the float32
   accumulation plus the roundings of the inputs and output), plus float32 rounding of the
   products and sums that form ``lt``.
2. Every sample whose screened logit, plus its bound, can come within ``ln(N) + 37`` nats of a
   proven lower bound of the maximum is a candidate; all the others together weigh less than
   ``N e^(-ln N - 37) = e^-37`` (below float64's epsilon) relative to the maximum.
3. Candidates get exact logits from differences ``||x_t - alpha x_i||^2`` in float64 and are
   merged into float64 partials (:class:`Partials`). In the refinement stage they are among the
   few screened rows kept per chunk in the first pass, so no second GEMM runs. Queries with more
   candidates than a gather is worth (the navigation stage, where sigma is large and the logits
   are benign) take a dense float64 pass instead, whose own logit error bound is checked; if that
   bound is too loose they are recomputed from differences after all.

Only torch is imported; the same code runs on CPU and CUDA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from floworacle.paths import PathCoefficients
from floworacle_server.data._dataset import Dataset
from floworacle_server.engine._partials import Partials
from floworacle_server.engine._types import OUTPUTS, OracleQuery, OracleResult, Precision

__all__ = ["oracle", "compute_partials", "default_chunk_rows", "SCREEN_DTYPES", "REACH_MARGIN"]

#: Nats beyond ln(N) below the maximum past which samples are dropped: N e^-(ln N + 37) < 2^-53.
REACH_MARGIN = 37.0
U64 = 2.0**-53
#: Dense float64 logits are used only when their error bound is below this many nats (weights
#: then carry relative errors below 2e-7, far inside the 1e-5 accuracy target); otherwise the
#: candidates are recomputed from differences.
DENSE_LOGIT_TOL = 1e-7
#: Unit roundoff of the inputs for each screening precision (the accumulation is float32).
SCREEN_DTYPES: dict[str, tuple[torch.dtype, float]] = {
    "float32": (torch.float32, 2.0**-24),
    "bfloat16": (torch.bfloat16, 2.0**-8),
    "float16": (torch.float16, 2.0**-11),
}
_U_ACC = 2.0**-24
#: Element budget of one gathered block of candidate rows (float64): bounds the extra memory on
#: CPUs; GPUs take far larger blocks, since each block costs a dozen kernel launches.
_GATHER_ELEMENTS = {"cpu": 1 << 16, "cuda": 1 << 24}


def _gather_block(dim: int, device: torch.device) -> int:
    return max(64, _GATHER_ELEMENTS.get(device.type, 1 << 16) // dim)


def default_chunk_rows(dim: int, device: torch.device) -> int:
    """Rows per chunk: large enough for an efficient GEMM, small enough that the (B, chunk)
    float64 work tensors and a float64 copy of a chunk stay a few MB on the CPU."""
    if device.type == "cuda":
        return max(4096, min(65536, (1 << 28) // max(dim, 1)))
    return 1024


@dataclass
class _Coef:
    """Per-query float64 tensors derived from the path coefficients (shape (B,))."""

    alpha: torch.Tensor
    c: torch.Tensor  # alpha / sigma^2
    half: torch.Tensor  # alpha^2 / (2 sigma^2)
    inv2s2: torch.Tensor  # 1 / (2 sigma^2)

    @classmethod
    def build(cls, alpha: torch.Tensor, sigma: torch.Tensor) -> _Coef:
        s2 = sigma * sigma
        return cls(alpha, alpha / s2, alpha * alpha / (2 * s2), 1.0 / (2 * s2))

    def take(self, rows: torch.Tensor) -> _Coef:
        return _Coef(self.alpha[rows], self.c[rows], self.half[rows], self.inv2s2[rows])


@dataclass
class _PassResult:
    partials: Partials
    logit_error: torch.Tensor  # (B,) bound on the abs error of the logits that were used
    refined: torch.Tensor  # () int64, (query, sample) pairs whose logit was computed in float64
    overflow: torch.Tensor  # (B,) bool, queries with too many candidates for the sparse path


def _screen_gamma(ds: Dataset, screen: str) -> tuple[torch.dtype, float]:
    """Screening dtype actually used on this device and the relative dot-product error bound.

    The bound counts the accumulation ((D + 2) u_acc, float32 accumulators), the rounding of the
    query to the screening dtype, of the data where it is stored in another dtype, and of the
    product itself where the GEMM returns a half-precision result. A float32 GEMM on CUDA with
    TF32 allowed (``torch.backends.cuda.matmul.allow_tf32`` or a float32 matmul precision below
    "highest") rounds its inputs to 10-bit mantissas; the bound follows that setting.
    """
    if screen not in SCREEN_DTYPES:
        raise ValueError(f"unknown screening precision {screen!r}; use one of {sorted(SCREEN_DTYPES)}")
    dtype, u_in = SCREEN_DTYPES[screen]
    cuda = ds.device.type == "cuda"
    if not cuda and dtype != torch.float32:
        dtype, u_in = torch.float32, 2.0**-24  # half-precision GEMMs are slow on CPUs
    if dtype == torch.float32:
        tf32 = cuda and (torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest")
        u_in = 2.0**-11 if tf32 else 2.0**-24
        data_u = u_in if tf32 else 0.0
        out_u = 0.0
    else:
        data_u = 0.0 if ds.x.dtype == dtype else u_in
        out_u = u_in
    gamma = (ds.dim + 2) * _U_ACC + u_in + data_u + out_u
    return dtype, gamma * 1.01 + 4 * U64


def _screen_chunk(
    ds: Dataset,
    xs: torch.Tensor,
    co: _Coef,
    q: torch.Tensor,
    s0: int,
    s1: int,
    sdtype: torch.dtype,
    gamma: float,
    qnorm: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Screening logits (len(q), n) in float32 for queries ``q`` over rows [s0, s1), and one
    error bound per query valid for the whole chunk.

    ``lt = c G - h ||x_i||^2 (+ log p)``; its error is the GEMM bound ``c gamma ||x_t|| max||x_i||``
    plus float32 rounding of the factors, products and sums, ``6 u (c ||x_t|| max||x_i|| +
    h max||x_i||^2 + max|log p|)`` (each term is rounded at most five times on its way).
    """
    f32 = torch.float32
    chunk = ds.x[s0:s1]
    sq = ds.sq_norms[s0:s1]
    sq_max = sq.max()
    lt = xs @ (chunk if chunk.dtype == sdtype else chunk.to(sdtype)).T
    lt = lt.to(f32) if lt.dtype != f32 else lt
    lt.mul_(co.c[q, None].to(f32)).addr_(co.half[q].to(f32), sq.to(f32), alpha=-1)
    cq = co.c[q] * qnorm * sq_max.sqrt()
    err = gamma * cq + 6 * 2.0**-24 * (1.02 * cq + co.half[q] * sq_max)
    if ds.log_weights is not None:
        logw = ds.log_weights[s0:s1]
        lt.add_(logw.to(f32)[None, :])
        finite_w = logw[torch.isfinite(logw)]
        err = err + 6 * 2.0**-24 * (finite_w.abs().max() if finite_w.numel() else 0.0)
    return lt, err


def _threshold(lower: torch.Tensor, reach: float, err: torch.Tensor) -> torch.Tensor:
    """float32 threshold ``lower - reach - err`` rounded down, never up (so no candidate is lost)."""
    thr = lower - reach - err
    return (thr - thr.abs() * 2.0**-22).to(torch.float32)


#: Screening logits kept per query and chunk in pass 1 (the top ones, plus one to tell whether
#: they hold every candidate of that chunk).
_KEEP = 8


def _exact_pairs(
    ds: Dataset, xq: torch.Tensor, co: _Coef, qi: torch.Tensor, rows: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, Partials, torch.Tensor]:
    """Float64 logits from differences for (query, data row) pairs, as one partial.

    ``qi`` must be sorted (pairs grouped by query). Returns (queries, their partial, per-pair
    logit error bound): logits ``log p_i - ||x_t - alpha x_i||^2 / (2 sigma^2)`` with the error
    of a float64 sum of D squares, ``(D + 4) u ||x_t - alpha x_i||^2 / (2 sigma^2)``, plus that of
    rounding ``alpha x_i`` before the subtraction, ``2 u |alpha| ||x_i|| ||x_t - alpha x_i|| / (2 sigma^2)``.

    Pairs go in blocks of ``_gather_block`` rows, and no (pairs, D) temporary is made: each block's
    rows are converted to float64 once, ``x_t - alpha x_i`` is formed with one fused op and squared
    in place. When every query has a single pair (the refinement stage) its weight is
    exp(l - l) = 1, so the rows themselves are the partial's v: they are converted straight into
    it, and if those queries are a contiguous run of xq the differences are formed in that buffer
    too (no gathered copy of the queries) and the rows converted again afterwards.
    """
    n, d = qi.shape[0], xq.shape[1]
    dev, f64 = xq.device, torch.float64
    uq, local, counts = torch.unique_consecutive(qi, return_inverse=True, return_counts=True)
    width, q0, q_last = torch.stack((counts.max(), qi[0], qi[-1])).tolist()  # one device sync
    single = width == 1
    inplace = single and q_last - q0 == n - 1  # sorted and distinct: queries q0 .. q0 + n - 1
    block = _gather_block(d, dev)
    keep = single or n <= block  # the float64 rows of all pairs stay in xr (else: one block's)
    nb = min(n, block)
    xr = torch.empty(n if keep else nb, d, dtype=f64, device=dev)
    staged = None if ds.x.dtype == f64 else torch.empty(nb, d, dtype=ds.x.dtype, device=dev)

    def gather(p0: int, p1: int) -> torch.Tensor:
        """Rows of pairs [p0, p1) in float64, into their slot of xr."""
        out = xr[p0:p1] if keep else xr[: p1 - p0]
        if staged is None:
            return torch.index_select(ds.x, 0, rows[p0:p1], out=out)
        return out.copy_(torch.index_select(ds.x, 0, rows[p0:p1], out=staged[: p1 - p0]))

    buf = None if inplace else torch.empty(nb, d, dtype=f64, device=dev)
    d2 = torch.empty(n, dtype=f64, device=dev)
    for p0 in range(0, n, block):
        p1 = min(p0 + block, n)
        x_b, a_b = gather(p0, p1), co.alpha[qi[p0:p1], None]
        if buf is None:
            diff = torch.addcmul(xq[q0 + p0 : q0 + p1], a_b, x_b, value=-1, out=x_b)
        else:
            diff = torch.index_select(xq, 0, qi[p0:p1], out=buf[: p1 - p0]).addcmul_(a_b, x_b, value=-1)
        torch.sum(diff.mul_(diff), dim=1, out=d2[p0:p1])
    inv = co.inv2s2[qi]
    val = -d2 * inv
    if ds.log_weights is not None:
        val = val + ds.log_weights[rows]
    # Error of the computed d2: (D + 4) u d2 from rounding the squares and their sum, plus the
    # rounding of alpha x_i before the subtraction where it is not fused (it is absolute, not
    # relative to the difference): sum_j 2 u |alpha x_ij| |c_j| <= 2 u |alpha| ||x_i|| sqrt(d2)
    # by Cauchy-Schwarz, and its square as the second-order term (slack 1.01 for the rest).
    ax = co.alpha[qi].abs() * ds.sq_norms[rows].sqrt()
    pair_err = ((d + 4) * U64 * d2 + 2.02 * U64 * ax * d2.sqrt() + 2.0 * U64 * U64 * ax * ax) * inv
    if single:
        logits, index = val[:, None], rows[:, None]
    else:
        col = torch.arange(n, device=dev) - (torch.cumsum(counts, 0) - counts)[local]
        logits = torch.full((uq.shape[0], width), -math.inf, dtype=f64, device=dev)
        index = torch.full((uq.shape[0], width), -1, dtype=torch.int64, device=dev)
        logits[local, col] = val
        index[local, col] = rows
    m, p, z = Partials.probabilities(logits)
    if single:
        if inplace:  # xr holds the squared differences: convert the rows again
            for p0 in range(0, n, block):
                gather(p0, min(p0 + block, n))
        v = xr
        # a zero weight (-inf logit) or worse: weigh as usual. On a GPU always (exact for
        # p == 1): one small kernel is cheaper than the host sync of the check.
        if dev.type != "cpu" or not bool((p == 1).all()):
            v.mul_(p)
    else:
        pw = p[local, col]
        v = torch.zeros(uq.shape[0], d, dtype=f64, device=dev)
        if keep:
            v.index_add_(0, local, xr.mul_(pw[:, None]))
        else:
            for p0 in range(0, n, block):
                p1 = min(p0 + block, n)
                v.index_add_(0, local[p0:p1], gather(p0, p1).mul_(pw[p0:p1, None]))
    return uq, Partials.assemble(m, p, z, v, logits, index, top_k), pair_err


def _merged(state: Partials | None, part: Partials) -> Partials:
    """``state`` absorbing ``part`` (same queries) in place; no state yet: ``part`` itself, which
    is what merging into an empty partial gives (without its (B, D) zeros)."""
    if state is None:
        return part
    state.merge_into(None, part)
    return state


def _screened_pass(
    ds: Dataset,
    xq: torch.Tensor,
    co: _Coef,
    start: int,
    stop: int,
    top_k: int,
    chunk_rows: int,
    screen: str,
    cap: int | None,
    xs: torch.Tensor | None = None,
) -> _PassResult:
    """Screen with the fast GEMM, recompute the candidates from differences in float64.

    Pass 1 streams the screening GEMM over all chunks and keeps, per query, a proven lower bound
    of the maximum logit and, per chunk, the top ``_KEEP + 1`` screening logits and their rows.
    Then, per (query, chunk): out of reach of the final lower bound -> nothing; in reach and the
    (_KEEP + 1)-th kept logit out of reach -> the candidates are among the kept rows (the
    refinement stage: no second GEMM); otherwise the chunk's screening GEMM is recomputed for
    those queries to find all candidates. ``cap``: most candidates per query for this sparse
    path; queries above it are flagged in ``overflow`` for the dense pass. ``xs``: see
    :func:`_compute_partials`.
    """
    b, d = xq.shape
    dev = xq.device
    reach = math.log(stop - start) + REACH_MARGIN
    sdtype, gamma = _screen_gamma(ds, screen)
    qnorm = xq.norm(dim=1)
    xs = xs if xs is not None and xs.dtype == sdtype else xq.to(sdtype)
    allq = torch.arange(b, device=dev)
    starts = list(range(start, stop, chunk_rows))
    nch = len(starts)
    lower = torch.full((b,), -math.inf, dtype=torch.float64, device=dev)
    kept_v = torch.full((b, nch, _KEEP + 1), -math.inf, dtype=torch.float32, device=dev)
    kept_i = torch.full((b, nch, _KEEP + 1), -1, dtype=torch.int64, device=dev)
    chunk_err = torch.empty(b, nch, dtype=torch.float64, device=dev)
    act = allq  # queries still screened
    early = torch.zeros(b, dtype=torch.bool, device=dev)
    for k, s0 in enumerate(starts):
        s1 = min(s0 + chunk_rows, stop)
        lt, err = _screen_chunk(ds, xs[act] if act is not allq else xs, co, act, s0, s1, sdtype, gamma, qnorm[act])
        kk = min(_KEEP + 1, s1 - s0)
        tv, ti = lt.topk(kk, dim=1)
        kept_v[act, k, :kk] = tv
        kept_i[act, k, :kk] = ti + s0
        chunk_err[act, k] = err
        lower[act] = torch.maximum(lower[act], tv[:, 0].to(torch.float64) - err)
        if k == 0 and cap is not None and nch > 1:
            # deep navigation: the first chunk's logits all lie within half the reach of each
            # other, so (almost) every sample is a candidate; such queries go to the dense pass
            # without screening the rest (a speed choice only: the dense pass is exact anyway)
            spread = (tv[:, 0] - lt.min(dim=1).values).to(torch.float64) + 2 * err
            early = spread < reach / 2
            if bool(early.any()):
                act = allq[~early]
        del lt
    thr = lower[:, None] - reach - chunk_err
    thr = thr - thr.abs() * 2.0**-40  # round down: never lose a candidate to float64 rounding
    relevant = kept_v[:, :, 0].to(torch.float64) >= thr
    complete = kept_v[:, :, _KEEP].to(torch.float64) < thr

    state: Partials | None = None  # allocated by the first merge that does not cover every query
    overflow = early.clone()
    if cap is not None:
        # many chunks in reach means the navigation stage: go dense at once (a speed choice only)
        overflow |= relevant.sum(dim=1) > max(8, nch // 8)
    used = torch.zeros(b, dtype=torch.int64, device=dev)
    logit_err = torch.zeros(b, dtype=torch.float64, device=dev)
    refined = torch.zeros((), dtype=torch.int64, device=dev)

    def absorb(qi: torch.Tensor, rows: torch.Tensor) -> None:
        nonlocal refined, state
        uq, part, pair_err = _exact_pairs(ds, xq, co, qi, rows, top_k)
        logit_err.scatter_reduce_(0, qi, pair_err, reduce="amax", include_self=True)
        refined += qi.shape[0]
        whole = uq.shape[0] == b
        if state is None and whole:
            state = part  # what merging into an empty partial gives, without the (B, D) zeros
            return
        if state is None:
            state = Partials.empty(b, d, top_k, dev)
        state.merge_into(None if whole else uq, part)

    # in reach, and every candidate of the chunk among the kept rows
    sel = (kept_v[:, :, :_KEEP].to(torch.float64) >= thr[:, :, None]) & (relevant & complete)[:, :, None]
    if cap is not None:
        used += sel.sum(dim=(1, 2))
        overflow |= used > cap
        sel &= ~overflow[:, None, None]
    hits = sel.nonzero()
    if hits.shape[0]:
        absorb(hits[:, 0], kept_i[hits[:, 0], hits[:, 1], hits[:, 2]])
    # in reach, with possibly more candidates than were kept: screen that chunk again
    again = relevant & ~complete
    for k in again.any(dim=0).nonzero().flatten().tolist():
        q = (again[:, k] & ~overflow).nonzero().flatten()
        if q.numel() == 0:
            continue
        s0 = starts[k]
        s1 = min(s0 + chunk_rows, stop)
        lt, err = _screen_chunk(ds, xs[q], co, q, s0, s1, sdtype, gamma, qnorm[q])
        cand = lt >= _threshold(lower[q], reach, err)[:, None]
        del lt
        if cap is not None:
            used[q] += cand.sum(dim=1)
            over = used[q] > cap
            overflow[q] |= over
            cand &= ~over[:, None]
        pairs = cand.nonzero()
        if pairs.shape[0]:
            absorb(q[pairs[:, 0]], pairs[:, 1] + s0)
    if state is None:
        state = Partials.empty(b, d, top_k, dev)
    return _PassResult(state, logit_err, refined, overflow)


def _dense_pass(
    ds: Dataset, xq: torch.Tensor, co: _Coef, start: int, stop: int, top_k: int, chunk_rows: int
) -> _PassResult:
    """Plain streamed softmax with float64 GEMMs; returns its logit error bound per query.

    Logits in the same (full) form as the difference path:
    ``log p_i - (||x_t||^2 - 2 alpha x_t . x_i + alpha^2 ||x_i||^2) / (2 sigma^2)``; the float64
    GEMM error bound is ``(D + 3) u (||x_t|| + alpha ||x_i||)^2 / (2 sigma^2)``.
    """
    b, d = xq.shape
    dev = xq.device
    qn2 = (xq * xq).sum(dim=1)
    qnorm = qn2.sqrt()
    state: Partials | None = None
    logit_err = torch.zeros(b, dtype=torch.float64, device=dev)
    # the float64 copy of a chunk is the largest temporary here: on CPUs keep it near 2.5% of the
    # data set (at least 256 rows, for an efficient GEMM)
    budget = max(1 << 18, ds.x.numel() * ds.x.element_size() // 320)
    rows = chunk_rows if dev.type == "cuda" else max(256, min(chunk_rows, budget // d))
    a2 = co.alpha * co.alpha
    for s0 in range(start, stop, rows):
        s1 = min(s0 + rows, stop)
        x64 = ds.x[s0:s1].to(torch.float64)
        sq = ds.sq_norms[s0:s1]
        logits = xq @ x64.T  # becomes the logits in place
        logits.mul_(2 * co.alpha[:, None]).sub_(qn2[:, None]).addr_(a2, sq, alpha=-1).mul_(co.inv2s2[:, None])
        if ds.log_weights is not None:
            logits.add_(ds.log_weights[s0:s1][None, :])
        rmax = sq.max().sqrt()
        logit_err = torch.maximum(logit_err, (d + 3) * U64 * (qnorm + co.alpha * rmax) ** 2 * co.inv2s2)
        index = torch.arange(s0, s1, device=dev)
        if state is None:
            state = Partials.from_logits(logits, index, top_k, x64)
        else:  # the block's weighted sum goes straight into the state (no (B, D) temporary)
            state.absorb_logits(logits, index, x64)
    refined = torch.tensor(b * (stop - start), dtype=torch.int64, device=dev)
    assert state is not None  # the row range is not empty
    return _PassResult(state, logit_err, refined, torch.zeros(b, dtype=torch.bool, device=dev))


def _fast_pass(
    ds: Dataset,
    xq: torch.Tensor,
    co: _Coef,
    start: int,
    stop: int,
    top_k: int,
    chunk_rows: int,
    screen: str,
    xs: torch.Tensor | None = None,
) -> _PassResult:
    """Screening logits used directly, weighted sums in float32 (GPU: the screening precision).

    The reported logit error is the largest per-chunk screening bound; the caller adds the
    accumulation error.
    """
    b, d = xq.shape
    dev = xq.device
    sdtype, gamma = _screen_gamma(ds, screen)
    acc_dtype = sdtype if dev.type == "cuda" else torch.float32
    xs = xs if xs is not None and xs.dtype == sdtype else xq.to(sdtype)
    qnorm = xq.norm(dim=1)
    allq = torch.arange(b, device=dev)
    state: Partials | None = None
    logit_err = torch.zeros(b, dtype=torch.float64, device=dev)
    for s0 in range(start, stop, chunk_rows):
        s1 = min(s0 + chunk_rows, stop)
        lt, err = _screen_chunk(ds, xs, co, allq, s0, s1, sdtype, gamma, qnorm)
        index = torch.arange(s0, s1, device=dev)
        # probabilities in float64, so the top-k weights and their normaliser agree to float64 rounding
        state = _merged(state, Partials.from_logits(lt.to(torch.float64), index, top_k, ds.x[s0:s1].to(acc_dtype)))
        logit_err = torch.maximum(logit_err, err)
    refined = torch.zeros((), dtype=torch.int64, device=dev)
    assert state is not None  # the row range is not empty
    return _PassResult(state, logit_err, refined, torch.zeros(b, dtype=torch.bool, device=dev))


def compute_partials(
    ds: Dataset,
    xq: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    *,
    rows: tuple[int, int] | None = None,
    top_k: int = 0,
    precision: Precision = Precision.EXACT,
    chunk_rows: int | None = None,
    screen: str = "float32",
) -> tuple[Partials, torch.Tensor, int]:
    """Partials of B queries over the data rows ``rows`` (default: all).

    Args:
        xq: (B, D) float64 queries on the data's device.
        alpha, sigma: (B,) float64 path coefficients.
    Returns:
        (partials, logit_error (B,), refined): the partials use the full logits
        ``log p_i - ||x_t - alpha x_i||^2 / (2 sigma^2)`` in EXACT mode, so partials of disjoint
        row ranges (chunks, devices, shards) merge exactly; logit_error bounds the absolute
        error of every logit that carries weight.
    """
    return _compute_partials(ds, xq, alpha, sigma, rows, top_k, precision, chunk_rows, screen, None)


def _compute_partials(
    ds: Dataset,
    xq: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    rows: tuple[int, int] | None,
    top_k: int,
    precision: Precision,
    chunk_rows: int | None,
    screen: str,
    xs: torch.Tensor | None,
) -> tuple[Partials, torch.Tensor, int]:
    """:func:`compute_partials`; ``xs``: the queries as the caller sent them (on the data's
    device), of which ``xq`` is the exact float64 copy, or None. When they already are in the
    screening dtype (float32 queries, float32 screening) they are screened as they are, without
    rounding ``xq`` to a new (B, D) copy."""
    start, stop = rows if rows is not None else (0, ds.num_samples)
    if not 0 <= start < stop <= ds.num_samples:
        raise ValueError(f"row range [{start}, {stop}) is empty or outside the data set's {ds.num_samples} rows")
    n = chunk_rows or default_chunk_rows(ds.dim, ds.device)
    co = _Coef.build(alpha, sigma)
    if precision == Precision.FAST:
        res = _fast_pass(ds, xq, co, start, stop, top_k, n, screen, xs)
        return res.partials, res.logit_error, 0
    cap = max(64, (stop - start) // 16)
    res = _screened_pass(ds, xq, co, start, stop, top_k, n, screen, cap, xs)
    partials, logit_err, refined = res.partials, res.logit_error, int(res.refined)
    over = res.overflow.nonzero().flatten()
    if over.numel():
        sub = co.take(over)
        dense = _dense_pass(ds, xq[over], sub, start, stop, top_k, n)
        refined += int(dense.refined)
        loose = (dense.logit_error > DENSE_LOGIT_TOL).nonzero().flatten()
        if loose.numel():
            exact = _screened_pass(ds, xq[over][loose], sub.take(loose), start, stop, top_k, n, screen, None)
            dense.partials.put(loose, exact.partials)
            dense.logit_error[loose] = exact.logit_error
            refined += int(exact.refined)
        partials.put(over, dense.partials)
        logit_err[over] = dense.logit_error
    return partials, logit_err, refined


@dataclass
class _Posterior:
    x1_hat: torch.Tensor
    x1_err: torch.Tensor
    entropy: torch.Tensor
    ess: torch.Tensor
    topk_indices: torch.Tensor
    topk_weights: torch.Tensor

    @classmethod
    def zeros(cls, b: int, d: int, top_k: int, dev: torch.device) -> _Posterior:
        f = torch.float64
        return cls(
            x1_hat=torch.zeros(b, d, dtype=f, device=dev),
            x1_err=torch.zeros(b, dtype=f, device=dev),
            entropy=torch.zeros(b, dtype=f, device=dev),
            ess=torch.zeros(b, dtype=f, device=dev),
            topk_indices=torch.full((b, top_k), -1, dtype=torch.int64, device=dev),
            topk_weights=torch.zeros(b, top_k, dtype=f, device=dev),
        )


def _posterior(
    ds: Dataset,
    xq: torch.Tensor,
    xs: torch.Tensor | None,
    co_alpha: torch.Tensor,
    co_sigma: torch.Tensor,
    groups: list[tuple[torch.Tensor, tuple[int, int]]],
    top_k: int,
    precision: Precision,
    chunk_rows: int | None,
    screen: str,
) -> tuple[_Posterior, int]:
    """Posterior summaries of the queries in ``groups`` (query rows, data row range); ``xs``: see
    :func:`_compute_partials`."""
    b, d = xq.shape
    dev = xq.device
    out: _Posterior | None = None
    refined = 0
    for qrows, rng in groups:
        whole = len(groups) == 1 and qrows.numel() == b  # the common case: no scatter buffers
        part, lerr, r = _compute_partials(
            ds,
            xq if whole else xq[qrows],
            co_alpha if whole else co_alpha[qrows],
            co_sigma if whole else co_sigma[qrows],
            rng,
            top_k,
            precision,
            chunk_rows,
            screen,
            xs if whole else None,
        )
        refined += r
        post = part.finalize(consume=True)
        del part
        idx = post.topk_indices
        idx = torch.where(idx >= 0, ds.original_index[idx.clamp(min=0)], idx)
        err = _x1_error_bound(ds, rng, lerr, precision, chunk_rows)
        if whole:
            return _Posterior(post.x1_hat, err, post.entropy, post.ess, idx, post.topk_weights), refined
        if out is None:
            out = _Posterior.zeros(b, d, top_k, dev)
        out.x1_hat[qrows] = post.x1_hat
        out.entropy[qrows] = post.entropy
        out.ess[qrows] = post.ess
        out.topk_indices[qrows] = idx
        out.topk_weights[qrows] = post.topk_weights
        out.x1_err[qrows] = err
    if out is None:  # no queries in any group: an all-zero placeholder the caller overrides
        out = _Posterior.zeros(b, d, top_k, dev)
    return out, refined


def _x1_error_bound(
    ds: Dataset,
    rng: tuple[int, int],
    logit_err: torch.Tensor,
    precision: Precision,
    chunk_rows: int | None,
) -> torch.Tensor:
    """Bound on max_j |x1_hat_j - exact_j| per query.

    Logit errors of at most e change every weight by a factor in [e^-2e, e^2e], so the mean moves
    by at most (e^{2e} - 1) * max_i |x_i - x1_hat|_inf <= (e^{2e} - 1) * 2 max|x|. The dropped
    tail weighs below e^-37 relative. Rounding of the sums adds n u max|x| (float64 in EXACT mode;
    the screening precision's accumulation, per chunk, in FAST mode).
    """
    xmax = ds.abs_max()
    spread = 2 * xmax
    bound = torch.expm1(2 * logit_err) * spread + math.exp(-REACH_MARGIN) * spread
    n = rng[1] - rng[0]
    if precision == Precision.FAST:
        rows = min(n, chunk_rows or default_chunk_rows(ds.dim, ds.device))
        bound = bound + (rows + 2) * _U_ACC * xmax * 2
    bound = bound + (n + ds.dim + 4) * U64 * xmax
    return bound


def _validate(ds: Dataset, q: OracleQuery) -> tuple[int, int]:
    if q.x_t.ndim < 2:
        raise ValueError(f"x_t must have shape (B, D) or (B, *sample_shape), got {tuple(q.x_t.shape)}")
    b = int(q.x_t.shape[0])
    d = int(math.prod(q.x_t.shape[1:]))
    if b == 0:
        raise ValueError("empty batch: send at least one query")
    if d != ds.dim:
        raise ValueError(
            f"queries have {d} values each but data set {ds.name!r} has samples of shape "
            f"{ds.sample_shape} (D = {ds.dim}); send x_t of shape (B, {ds.dim}) or (B, *{ds.sample_shape})"
        )
    if len(q.coeffs) != b:
        raise ValueError(f"{len(q.coeffs)} path coefficients for {b} queries; send one per query")
    q.coeffs.validate()
    unknown = set(q.outputs) - set(OUTPUTS)
    if unknown:
        raise ValueError(f"unknown outputs {sorted(unknown)}; choose from {list(OUTPUTS)}")
    if not 0 <= q.top_k <= ds.num_samples:
        raise ValueError(f"top_k = {q.top_k} must lie in 0..{ds.num_samples} (the data set size)")
    if "topk" in q.outputs and q.top_k == 0:
        raise ValueError("the topk output needs top_k >= 1")
    if q.labels is not None and tuple(q.labels.shape) != (b,):
        raise ValueError(f"labels must have shape ({b},), got {tuple(q.labels.shape)}")
    if q.guidance is not None:
        if q.labels is None:
            raise ValueError("guidance needs class labels: send one label per query")
        g = q.guidance
        if not (math.isfinite(g.scale) and math.isfinite(g.t_lo) and math.isfinite(g.t_hi)) or g.t_lo > g.t_hi:
            raise ValueError(f"guidance scale and interval must be finite with t_lo <= t_hi, got {g}")
        if q.t is None:
            raise ValueError("a guidance interval needs t for every query")
    return b, d


def _groups_by_label(
    ds: Dataset, labels: torch.Tensor, rows: torch.Tensor
) -> list[tuple[torch.Tensor, tuple[int, int]]]:
    """Conditional query groups: for each label, (query rows, that class's data rows)."""
    out = []
    lab = labels[rows]
    for y in torch.unique(lab).tolist():
        start, stop = ds.class_rows(int(y))
        if stop == start:
            raise ValueError(f"class {y} has no samples in data set {ds.name!r}")
        if ds.log_weights is not None and not bool(torch.isfinite(ds.log_weights[start:stop]).any()):
            raise ValueError(f"every sample of class {y} in data set {ds.name!r} has weight 0: its posterior is empty")
        out.append((rows[lab == y], (start, stop)))
    return out


def oracle(
    ds: Dataset,
    query: OracleQuery,
    *,
    chunk_rows: int | None = None,
    screen: str = "float32",
) -> OracleResult:
    """Evaluate the oracle for a batch of queries (see module docstring for the method).

    Labels < 0 mean an unconditional query; labels >= 0 a class-conditional one, or a guided one
    when ``query.guidance`` is set (guided inside [t_lo, t_hi], conditional outside).
    Returns float64 tensors on the data's device; shapes (B, D), (B,), (B, k).
    """
    b, d = _validate(ds, query)
    dev = ds.device
    x_in = query.x_t.reshape(b, d)
    xq = x_in.to(device=dev, dtype=torch.float64)
    xs = x_in if x_in.device == xq.device else None  # screened as sent when in the screening dtype
    row_sums = xq.sum(dim=1)  # one pass, no (B, D) temporary: a NaN or Inf anywhere shows here
    if not bool(torch.isfinite(row_sums).all()):
        bad = int((~torch.isfinite(row_sums)).nonzero()[0, 0])
        raise ValueError(f"x_t[{bad}] has a NaN or Inf; send finite queries")
    coeffs = query.coeffs
    alpha = torch.as_tensor(coeffs.alpha, dtype=torch.float64, device=dev)
    sigma = torch.as_tensor(coeffs.sigma, dtype=torch.float64, device=dev)
    labels = query.labels.to(device=dev, dtype=torch.int64) if query.labels is not None else None
    allq = torch.arange(b, device=dev)
    if labels is None:
        labels = torch.full((b,), -1, dtype=torch.int64, device=dev)
    if (labels >= 0).any() and ds.num_classes == 0:
        raise ValueError(f"data set {ds.name!r} has no labels: send no labels (or -1) for unconditional queries")
    if (labels >= ds.num_classes).any() and ds.num_classes:
        bad = int(labels[labels >= ds.num_classes][0])
        raise ValueError(f"label {bad} is outside the data set's classes 0..{ds.num_classes - 1}")
    cond = allq[labels >= 0]
    guided = torch.zeros(b, dtype=torch.bool, device=dev)
    if query.guidance is not None and cond.numel():
        t = query.t.to(device=dev, dtype=torch.float64) if query.t is not None else None
        if t is None or tuple(t.shape) != (b,):
            raise ValueError(f"t must have shape ({b},) for a guidance interval")
        g = query.guidance
        guided = (labels >= 0) & (t >= g.t_lo) & (t <= g.t_hi) & (g.scale != 1.0)
    uncond = allq[(labels < 0) | guided]
    groups: list[tuple[torch.Tensor, tuple[int, int]]] = []
    if uncond.numel():
        groups.append((uncond, (0, ds.num_samples)))
    top_k = query.top_k
    if cond.numel():
        cond_groups = _groups_by_label(ds, labels, cond)
    else:
        cond_groups = []
    # Conditional posteriors are computed into their own buffers so that guided queries keep both.
    post_c, refined_c = (
        _posterior(ds, xq, xs, alpha, sigma, cond_groups, top_k, query.precision, chunk_rows, screen)
        if cond_groups
        else (None, 0)
    )
    post_u, refined_u = _posterior(ds, xq, xs, alpha, sigma, groups, top_k, query.precision, chunk_rows, screen)
    x1 = post_u.x1_hat
    x1_err = post_u.x1_err
    entropy, ess, tk_i, tk_w = post_u.entropy, post_u.ess, post_u.topk_indices, post_u.topk_weights
    if post_c is not None:
        only_c = (labels >= 0) & ~guided
        x1 = torch.where(only_c[:, None], post_c.x1_hat, x1)
        x1_err = torch.where(only_c, post_c.x1_err, x1_err)
        if guided.any():
            w = float(query.guidance.scale)  # type: ignore[union-attr]
            mix = post_u.x1_hat + w * (post_c.x1_hat - post_u.x1_hat)
            x1 = torch.where(guided[:, None], mix, x1)
            x1_err = torch.where(guided, abs(1 - w) * post_u.x1_err + abs(w) * post_c.x1_err, x1_err)
        has_c = labels >= 0
        entropy = torch.where(has_c, post_c.entropy, entropy)
        ess = torch.where(has_c, post_c.ess, ess)
        tk_i = torch.where(has_c[:, None], post_c.topk_indices, tk_i)
        tk_w = torch.where(has_c[:, None], post_c.topk_weights, tk_w)
    # the float64 queries may become the velocity buffer unless they share the caller's memory
    private = xq.untyped_storage().data_ptr() != query.x_t.untyped_storage().data_ptr()
    return _assemble_result(query, coeffs, xq, private, x1, x1_err, entropy, ess, tk_i, tk_w, refined_u + refined_c)


def _abs_max_rows(x: torch.Tensor) -> torch.Tensor:
    """max_j |x_ij| per row without a (B, D) temporary (NaN where a row has one, inf for an inf).

    Two reductions: ``torch.aminmax`` over dim 1 is about ten times slower than amax plus amin
    on CPUs (torch 2.x).
    """
    return torch.maximum(x.amax(dim=1), x.amin(dim=1).neg_())


def _assemble_result(
    query: OracleQuery,
    coeffs: PathCoefficients,
    xq: torch.Tensor,
    xq_private: bool,
    x1: torch.Tensor,
    x1_err: torch.Tensor,
    entropy: torch.Tensor,
    ess: torch.Tensor,
    tk_i: torch.Tensor,
    tk_w: torch.Tensor,
    refined: int,
) -> OracleResult:
    from floworacle.paths import eps_from_x1, score_from_x1

    dev = xq.device
    x1_max = _abs_max_rows(x1)  # also the finiteness check: NaN or inf wherever x1 has one
    bad = ~torch.isfinite(x1_max)
    if bool(bad.any()):  # never hand back a silently wrong answer
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"x_t[{i}] (max |value| {float(xq[i].abs().max()):.3g}) is too large for the oracle's float32 "
            "screening to stay finite; scale queries and data to ordinary magnitudes (|values| below ~1e15)"
        )
    a_t = torch.as_tensor(coeffs.velocity_x1, dtype=torch.float64, device=dev)
    b_t = torch.as_tensor(coeffs.velocity_xt, dtype=torch.float64, device=dev)
    outputs = set(query.outputs)
    # rounding of A x1 + B x_t in float64 on top of the propagated x1_hat bound
    scale = a_t.abs() * x1_max + b_t.abs() * _abs_max_rows(xq)
    v_err = a_t.abs() * x1_err + 4 * U64 * scale
    eps_hat = eps_from_x1(x1, xq, coeffs) if "eps_hat" in outputs else None
    score = score_from_x1(x1, xq, coeffs) if "score" in outputs else None
    velocity = None
    if "velocity" in outputs:  # u = A x1_hat + B x_t, built in one buffer: xq's own when it is private
        velocity = xq.mul_(b_t[:, None]) if xq_private else xq * b_t[:, None]
        velocity.addcmul_(x1, a_t[:, None])
    res = OracleResult(
        x1_hat=x1,
        velocity=velocity,
        eps_hat=eps_hat,
        score=score,
        entropy=entropy if "entropy" in outputs else None,
        ess=ess if "ess" in outputs else None,
        topk_indices=tk_i if "topk" in outputs else None,
        topk_weights=tk_w if "topk" in outputs else None,
        x1_hat_error_bound=x1_err,
        velocity_error_bound=v_err,
        refined=refined,
    )
    return res
