"""Cheaper targets measured against the exact one: the squared bias and the variance, per t, of the
conditional target, minibatch self-normalised targets and the nearest-neighbour estimate.

Every target below has the form ``u = A_t x1_est + B_t x_t`` (``A_t = d_alpha - alpha d_sigma /
sigma``, ``B_t = d_sigma / sigma``), so it is an estimate x1_est of the posterior mean
``x1_hat = sum_i gamma_i x_i``, ``gamma_i ∝ exp(-||x_t - alpha x_i||^2 / (2 sigma^2))`` over the
N training samples:

- **conditional**: x1_est = x1, the sample x_t was made from; ``A x1 + B x_t = d_alpha x1 +
  d_sigma x0``. Given x_t, x1 is a draw of the posterior: unbiased, variance ``A^2 sum_i gamma_i
  ||x_i - x1_hat||^2``.
- **STF** (Stable Target Field, Xu et al. 2023), reference batch of n: the query's own x1 plus
  n - 1 other distinct samples drawn uniformly; x1_est = the softmax-weighted mean over the batch.
  Given x_t this is *exactly* unbiased: the batch's law is uniform over batches times
  ``sum_k e^{l_k} / (n mean_i e^{l_i})`` (one of its members is a posterior draw), and that factor
  cancels the self-normalisation, so ``E[x1_est | x_t] = sum_i e^{l_i} x_i / sum_i e^{l_i}``.
  Its price is variance.
- **minibatch** (closed-form FM training, Bertrand et al. 2025), n fresh distinct samples: the
  self-normalised importance-sampling estimate with a uniform proposal, biased by O(1/n) (and
  badly so late in t, where the own sample is what carries the weight).
- **kNN** (Niedoba et al. 2024): the k samples of largest posterior weight (exact search, or the
  data set's faiss index) with their exact weights plus m uniform samples of the rest, each
  standing for (N - k) / m of them (:func:`floworacle_server.engine.knn_target`).

Measurement. Per t of a grid, M queries ``x_t = alpha x1 + sigma x0`` from training samples and
fresh noise (the same M pairs at every t, as ``analyze transition`` makes them). For each query
every estimator is drawn R times afresh *given x_t*: the conditional and STF targets' own x1 is
drawn from the exact posterior (its weights computed here in float64), so the replicates have the
law the training loss sees. With ``e_r = x1_est,r - x1_hat`` (x1_hat from the exact engine):

- variance ``v = sum_r ||e_r - mean e||^2 / (R - 1)`` (trace),
- squared bias ``||mean e||^2 - v / R`` (unbiased; a small negative value is noise around 0),

both times ``A_t^2`` (velocity space) and divided by D: per dimension. The report divides them by
the exact target's own spread at that t, ``S(t) = mean_q ||u_q - mean_q u_q||^2 / D`` (the
per-dimension variance of the exact velocity over the M queries): ``rel_bias2 = bias2 / S``,
``rel_variance = variance / S``, each averaged over the queries.

Cost, as a fraction of the exact pass (which reads all N samples per query): rows read per query
over N: conditional 0, minibatch and STF n / N, kNN (k + m) / N plus its search (exact: N more
rows, i.e. above 1; an IVF index: nlist centroids and nprobe lists of N / nlist rows). Times are
not reported here: this module computes small reference batches through one GEMM over the whole
data set where that is cheaper, so its timings say nothing of the estimators' own cost
(``benchmarks/bench_knn_target.py`` times the served kNN target against the exact engine).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path as FilePath
from typing import Any, Protocol

import numpy as np
import torch

from floworacle.paths import Path, PathCoefficients, get_path
from floworacle.study import text_table
from floworacle_server.analysis._transition import make_queries
from floworacle_server.data import Dataset
from floworacle_server.engine import NearestResult

__all__ = [
    "DEFAULT_ESTIMATOR_GRID",
    "DEFAULT_SPECS",
    "ESTIMATOR_KINDS",
    "EstimatorCurve",
    "EstimatorReport",
    "EstimatorSpec",
    "ExactAnswer",
    "ExactSource",
    "client_source",
    "default_specs",
    "engine_source",
    "estimator_study",
    "fresh_rows",
    "plot_estimators",
    "posterior_draws",
    "self_normalised_mean",
    "stf_rows",
]

#: Estimator kinds: "conditional", "stf", "minibatch" (fresh reference batch), "knn".
ESTIMATOR_KINDS = ("conditional", "stf", "minibatch", "knn")
#: Default t grid: 21 points uniform in logit(t) on [-5, 5] (t from 0.0067 to 0.9933).
DEFAULT_ESTIMATOR_GRID = "logit:-5:5:21"

_BLOCK_BYTES = 64 << 20


@dataclass(frozen=True)
class EstimatorSpec:
    """One estimator: its kind, reference batch size n (stf, minibatch), neighbours k and tail m (knn)."""

    kind: str
    n: int = 0
    k: int = 0
    tail: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ESTIMATOR_KINDS:
            raise ValueError(f"estimator kind must be one of {ESTIMATOR_KINDS}, got {self.kind!r}")
        if self.kind in ("stf", "minibatch") and self.n < 1:
            raise ValueError(f"a {self.kind} estimator needs a reference batch n >= 1, got {self.n}")
        if self.kind == "knn" and (self.k < 0 or self.tail < 0 or self.k + self.tail < 1):
            raise ValueError(f"a knn estimator needs k, m >= 0 with k + m >= 1, got k={self.k}, m={self.tail}")

    @property
    def name(self) -> str:
        if self.kind == "conditional":
            return "conditional"
        if self.kind == "knn":
            return f"knn k={self.k} m={self.tail}"
        return f"{self.kind} n={self.n}"

    def cost(self, num_samples: int, search: str, nlist: int = 0, nprobe: int = 0) -> float:
        """Rows read per query over N (see the module docstring); ``search`` "exact" or "index"."""
        n = num_samples
        if self.kind == "conditional":
            return 0.0
        if self.kind != "knn":
            return self.n / n
        if search == "exact":
            return 1.0 + (self.k + self.tail) / n
        return (nlist + nprobe * n / max(1, nlist) + self.k + self.tail) / n


def default_specs(
    batch_sizes: Sequence[int] = (64, 256, 1024), knn: Sequence[int] = (16, 128), tail: int = 128
) -> list[EstimatorSpec]:
    """conditional; STF and minibatch at each n; kNN at each k with tail m."""
    out = [EstimatorSpec("conditional")]
    out += [EstimatorSpec("stf", n=n) for n in batch_sizes]
    out += [EstimatorSpec("minibatch", n=n) for n in batch_sizes]
    out += [EstimatorSpec("knn", k=k, tail=tail) for k in knn]
    return out


DEFAULT_SPECS = tuple(default_specs())


# -- the estimators -----------------------------------------------------------------------


def self_normalised_mean(
    x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, refs: torch.Tensor
) -> torch.Tensor:
    """Posterior mean over a reference batch per query: ``sum_j softmax_j(l_j) r_j``,
    ``l_j = -||x_t - alpha r_j||^2 / (2 sigma^2)`` (from differences, float64).

    Args:
        x_t: (Q, D) queries; alpha, sigma: (Q,).
        refs: (Q, n, D) each query's reference samples.

    Returns:
        (Q, D) float64.
    """
    x_t, refs = x_t.to(torch.float64), refs.to(torch.float64)
    diff = x_t[:, None, :] - alpha.to(torch.float64)[:, None, None] * refs
    logit = -(diff * diff).sum(dim=2) / (2.0 * sigma.to(torch.float64)[:, None] ** 2)
    w = torch.softmax(logit, dim=1)
    return torch.bmm(w[:, None, :], refs).squeeze(1)


def _distinct(count: int, n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """(count, n) int64 rows, n distinct uniform ones per row from [0, size)."""
    if n > size:
        raise ValueError(f"a reference batch of n = {n} needs n <= N = {size} distinct samples")
    if n * 4 >= size or count * size <= 1 << 22:
        keys = torch.rand(count, size, generator=generator, dtype=torch.float64)
        return keys.topk(n, dim=1, largest=False).indices
    pos = torch.randint(0, size, (count, n), generator=generator)
    while True:  # redraw duplicates until none is left: uniform over n-subsets (relabelling symmetry)
        pos, _ = pos.sort(dim=1)
        dup = torch.zeros_like(pos, dtype=torch.bool)
        dup[:, 1:] = pos[:, 1:] == pos[:, :-1]
        if not bool(dup.any()):
            return pos
        pos[dup] = torch.randint(0, size, (int(dup.sum()),), generator=generator)


def fresh_rows(count: int, n: int, num_samples: int, generator: torch.Generator) -> torch.Tensor:
    """(count, n) rows of fresh reference batches: n distinct samples drawn uniformly."""
    return _distinct(count, n, num_samples, generator)


def stf_rows(own: torch.Tensor, n: int, num_samples: int, generator: torch.Generator) -> torch.Tensor:
    """(Q, n) rows of STF reference batches: column 0 the query's own row ``own`` (Q,), then n - 1
    distinct others drawn uniformly from the other N - 1 samples."""
    q = own.shape[0]
    if n == 1:
        return own[:, None].clone()
    others = _distinct(q, n - 1, num_samples - 1, generator)
    others = others + (others >= own[:, None]).to(torch.int64)  # skip the own row: uniform over the others
    return torch.cat([own[:, None], others], dim=1)


def posterior_draws(
    dataset: Dataset,
    x_t: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    draws: int,
    generator: torch.Generator,
    chunk_rows: int = 8192,
) -> torch.Tensor:
    """(Q, R) rows drawn from each query's exact posterior ``gamma_i ∝ p_i exp(-||x_t - alpha x_i||^2 / (2 sigma^2))``.

    Two passes over the data in chunks: the running max and sum of the weights, then the inverse
    of the cumulative weights at R sorted uniforms per query. Logits are float64 from
    ``(alpha x_t . x_i - alpha^2 ||x_i||^2 / 2) / sigma^2`` (``||x_t||^2`` cancels), which is
    accurate far beyond what the draw needs.
    """
    ds = dataset
    xt = x_t.to(ds.device, torch.float64)
    a = alpha.to(ds.device, torch.float64)
    s2 = sigma.to(ds.device, torch.float64) ** 2
    q, n = xt.shape[0], ds.num_samples
    logw = ds.log_weights

    def logits(lo: int, hi: int) -> torch.Tensor:
        xc = ds.x[lo:hi].to(torch.float64)
        g = (a[:, None] * (xt @ xc.T) - 0.5 * a[:, None] ** 2 * ds.sq_norms[lo:hi][None, :]) / s2[:, None]
        return g if logw is None else g + logw[lo:hi][None, :]

    top = torch.full((q,), -math.inf, dtype=torch.float64, device=ds.device)
    total = torch.zeros(q, dtype=torch.float64, device=ds.device)
    for lo in range(0, n, chunk_rows):
        g = logits(lo, min(n, lo + chunk_rows))
        m = torch.maximum(top, g.max(dim=1).values)
        total = total * torch.exp(top - m) + torch.exp(g - m[:, None]).sum(dim=1)
        top = m
    u = torch.rand(q, draws, generator=generator, dtype=torch.float64).to(ds.device) * total[:, None]
    out = torch.full((q, draws), n - 1, dtype=torch.int64, device=ds.device)
    done = torch.zeros(q, draws, dtype=torch.bool, device=ds.device)
    offset = torch.zeros(q, dtype=torch.float64, device=ds.device)
    for lo in range(0, n, chunk_rows):
        hi = min(n, lo + chunk_rows)
        cum = offset[:, None] + torch.cumsum(torch.exp(logits(lo, hi) - top[:, None]), dim=1)
        j = torch.searchsorted(cum, u)
        hit = (j < hi - lo) & ~done
        out = torch.where(hit, lo + j.clamp_max(hi - lo - 1), out)
        done |= hit
        offset = cum[:, -1]
    return out


# -- where the exact answers come from ----------------------------------------------------


@dataclass(frozen=True)
class ExactAnswer:
    """The exact oracle at M queries: (M, D) float64 x1_hat and velocity, (M,) posterior variance
    ``sum_i gamma_i ||x_i - x1_hat||^2``."""

    x1_hat: np.ndarray
    velocity: np.ndarray
    variance: np.ndarray


class ExactSource(Protocol):
    """The exact oracle and the posterior-nearest search, in-process or through a server."""

    def exact(self, x_t: np.ndarray, t: np.ndarray, coeffs: PathCoefficients) -> ExactAnswer: ...

    def neighbours(
        self, x_t: np.ndarray, t: np.ndarray, coeffs: PathCoefficients, k: int, exact: bool | None, nprobe: int | None
    ) -> NearestResult: ...


class _EngineSource:
    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def exact(self, x_t: np.ndarray, t: np.ndarray, coeffs: PathCoefficients) -> ExactAnswer:
        from floworacle_server.engine import OracleQuery, oracle

        q = OracleQuery(x_t=torch.from_numpy(x_t), coeffs=coeffs, outputs=("velocity", "x1_hat", "variance"))
        r = oracle(self.dataset, q)
        assert r.velocity is not None and r.variance is not None
        return ExactAnswer(r.x1_hat.cpu().numpy(), r.velocity.cpu().numpy(), r.variance.cpu().numpy())

    def neighbours(
        self, x_t: np.ndarray, t: np.ndarray, coeffs: PathCoefficients, k: int, exact: bool | None, nprobe: int | None
    ) -> NearestResult:
        from floworacle_server.engine import posterior_nearest

        return posterior_nearest(
            self.dataset, torch.from_numpy(x_t), torch.from_numpy(coeffs.alpha), torch.from_numpy(coeffs.sigma),
            k=k, exact=exact, nprobe=nprobe,
        )  # fmt: skip


def engine_source(dataset: Dataset) -> ExactSource:
    """The exact engine and search in this process."""
    return _EngineSource(dataset)


class _ClientSource:
    def __init__(self, client: Any, dataset: str | None, path: str, sigma_min: float, fingerprint: str | None) -> None:
        self.client, self.name, self.path, self.sigma_min, self.fingerprint = (
            client, dataset, path, sigma_min, fingerprint,
        )  # fmt: skip

    def exact(self, x_t: np.ndarray, t: np.ndarray, coeffs: PathCoefficients) -> ExactAnswer:
        p = self.client.predict(
            x_t, t, outputs=("velocity", "x1_hat", "variance"), dataset=self.name, path=self.path,
            sigma_min=self.sigma_min, fingerprint=self.fingerprint,
        )  # fmt: skip
        m = x_t.shape[0]
        return ExactAnswer(
            np.asarray(p.x1_hat, dtype=np.float64).reshape(m, -1),
            np.asarray(p.velocity, dtype=np.float64).reshape(m, -1),
            np.asarray(p.variance, dtype=np.float64).reshape(m),
        )

    def neighbours(
        self, x_t: np.ndarray, t: np.ndarray, coeffs: PathCoefficients, k: int, exact: bool | None, nprobe: int | None
    ) -> NearestResult:
        nb = self.client.nearest(
            x_t, k, t=t, dataset=self.name, path=self.path, sigma_min=self.sigma_min, exact=exact,
            nprobe=nprobe or 0, fingerprint=self.fingerprint,
        )  # fmt: skip
        return NearestResult(
            indices=torch.from_numpy(np.asarray(nb.indices, dtype=np.int64)),
            distances=torch.from_numpy(np.asarray(nb.distances, dtype=np.float64)),
            approximate=bool(nb.approximate),
        )


def client_source(
    client: Any, dataset: str | None, *, path: str = "linear", sigma_min: float = 0.0, fingerprint: str | None = None
) -> ExactSource:
    """The exact oracle and the posterior-nearest search of a running server (``floworacle.OracleClient``);
    ``fingerprint`` pins the data set so that other data under that name fail the call."""
    return _ClientSource(client, dataset, path, sigma_min, fingerprint)


# -- the study ------------------------------------------------------------------------------


def _no_bias(c: EstimatorCurve) -> np.ndarray:
    """(T,) bool: a squared bias within three standard errors of 0, or below float64 rounding
    (1e-20 of the spread: a relative error of 1e-10), i.e. no bias seen with these draws."""
    return np.asarray((np.abs(c.bias2) <= 3.0 * c.bias2_se) | (np.abs(c.rel_bias2) < 1e-20))


def _floats(a: np.ndarray) -> list[float | None]:
    """JSON numbers, None where not finite (JSON has no NaN or Inf)."""
    return [float(v) if math.isfinite(v) else None for v in np.asarray(a, dtype=np.float64)]


@dataclass
class EstimatorCurve:
    """One estimator's figures on the grid.

    Attributes:
        spec: the estimator.
        cost: rows read per query over N (see the module docstring).
        bias2, variance: (T,) per-dimension squared bias and variance in velocity space, means
            over the queries (bias2 unbiased: may be slightly negative around 0).
        bias2_se: (T,) standard error of bias2 over the queries: a bias2 within 3 of them is
            indistinguishable from 0 with these draws.
        rel_bias2, rel_variance: (T,) the same over the exact target's spread S(t).
        neighbour_share: (T,) mean estimated weight on the neighbours (knn), else None.
    """

    spec: EstimatorSpec
    cost: float
    bias2: np.ndarray
    bias2_se: np.ndarray
    variance: np.ndarray
    rel_bias2: np.ndarray
    rel_variance: np.ndarray
    neighbour_share: np.ndarray | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.spec.name,
            "kind": self.spec.kind,
            "n": self.spec.n,
            "k": self.spec.k,
            "tail": self.spec.tail,
            "cost": self.cost,
        }
        for key in ("bias2", "bias2_se", "variance", "rel_bias2", "rel_variance"):
            out[key] = _floats(getattr(self, key))
        if self.neighbour_share is not None:
            out["neighbour_share"] = _floats(self.neighbour_share)
        return out


@dataclass
class EstimatorReport:
    """The study's result: the grid, the exact target's spread, each estimator's curves.

    Attributes:
        name, num_samples, dim, fingerprint: the data set.
        path, t: the path and the (T,) grid.
        spread: (T,) ``S(t) = mean_q ||u_q - mean u||^2 / D`` of the exact velocity.
        a2: (T,) ``A_t^2`` (velocity = A_t x1 + B_t x_t).
        posterior_variance: (T,) ``A_t^2 mean_q sum_i gamma_i ||x_i - x1_hat||^2 / D`` from the
            exact engine: the conditional target's variance in closed form (a check of its measured one).
        curves: one :class:`EstimatorCurve` per estimator.
        info: queries, replicates, seed, search, source.
    """

    name: str
    num_samples: int
    dim: int
    fingerprint: str
    path: str
    t: np.ndarray
    spread: np.ndarray
    a2: np.ndarray
    posterior_variance: np.ndarray
    curves: list[EstimatorCurve]
    info: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "estimators",
            "dataset": self.name,
            "N": self.num_samples,
            "D": self.dim,
            "fingerprint": self.fingerprint,
            "path": self.path,
            **self.info,
            "t": [float(v) for v in self.t],
            "spread": [float(v) for v in self.spread],
            "A2": [float(v) for v in self.a2],
            "conditional_variance_closed_form": [float(v) for v in self.posterior_variance],
            "estimators": [c.to_json() for c in self.curves],
            "definitions": DEFINITIONS,
        }

    def table(self, key: str = "rel_bias2") -> str:
        """A text table: one row per t, one column per estimator, the values of ``key``; a cost row last."""
        names = [c.spec.name for c in self.curves]
        head = ["t", *names]
        rows = [head]
        for j, tj in enumerate(self.t):
            rows.append([f"{tj:.4f}", *(self._cell(c, key, j) for c in self.curves)])
        rows.append(["cost", *(f"{c.cost:.3g}" for c in self.curves)])
        return text_table(rows, rules_before=(1, -1))

    def _cell(self, c: EstimatorCurve, key: str, j: int) -> str:
        v = float(getattr(c, key)[j])
        if key in ("bias2", "rel_bias2") and _no_bias(c)[j]:
            return f"~{v:.1e}"
        return f"{v:.2e}"

    def summary(self) -> str:
        """Both tables (relative squared bias, relative variance) with their definitions."""
        return "\n".join(
            [
                f"{self.name} (N = {self.num_samples}, D = {self.dim}), {self.path} path, "
                f"{self.info.get('queries_per_t')} queries x {self.info.get('replicates')} draws per t",
                "",
                "squared bias / S(t)  (S = the exact velocity's per-dimension variance over the queries at t)",
                self.table("rel_bias2"),
                "",
                "variance / S(t)",
                self.table("rel_variance"),
                "",
                "~: within three standard errors of 0 or below 1e-20 (no bias seen with these draws); cost: rows read "
                "per query / N (the exact pass reads N)",
            ]
        )


DEFINITIONS = {
    "queries": "x_t = alpha_t x1 + sigma_t x0 from M training samples x1 and fresh noise x0, the same pairs at every t",
    "draws": "each estimator drawn R times given x_t; the conditional and STF targets' own x1 drawn from the exact "
    "posterior",
    "variance": "A_t^2 sum_r ||x1_est,r - mean_r x1_est||^2 / ((R - 1) D), mean over the queries (velocity space, "
    "per dimension)",
    "bias2": "A_t^2 (||mean_r x1_est - x1_hat||^2 - variance_x1 / R) / D, mean over the queries (unbiased; may dip "
    "below 0 by noise)",
    "bias2_se": "standard error of bias2 over the queries (a bias2 within 3 of them is indistinguishable from 0)",
    "spread": "S(t) = mean_q ||u_q - mean_q u_q||^2 / D of the exact velocity u",
    "rel_bias2, rel_variance": "bias2 / S(t), variance / S(t)",
    "cost": "rows read per query / N: conditional 0, stf and minibatch n / N, knn (k + m) / N plus the search "
    "(exact: 1; index: (nlist + nprobe N / nlist) / N)",
    "conditional_variance_closed_form": "A_t^2 mean_q sum_i gamma_i ||x_i - x1_hat||^2 / D from the exact engine",
}


def _blocks(width: int, dim: int) -> int:
    return max(1, _BLOCK_BYTES // max(1, width * dim * 8))


def _minibatch(ds: Dataset, xt: torch.Tensor, a: torch.Tensor, s: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(Q, D) self-normalised means over the reference rows (Q, n), in blocks of queries.

    A small data set (N <= 8 n, N D <= 2^25) takes the dense route: every query's dot products
    with all N samples (one GEMM), the batch's logits gathered from them, and the mean as a (Q, N)
    weight matrix times the data; the logits then come from ``(alpha x_t . x_j - alpha^2 ||x_j||^2
    / 2) / sigma^2`` (float64; cancellation below 1e-10 nats on the default grid's last t for
    digits). Otherwise the batch's rows are gathered and :func:`self_normalised_mean` works from
    differences.
    """
    q, n = xt.shape[0], rows.shape[1]
    out = torch.empty(q, ds.dim, dtype=torch.float64)
    if ds.num_samples <= 8 * n and ds.num_samples * ds.dim <= 1 << 25:
        x = ds.x.to(torch.float64).cpu()
        sq = ds.sq_norms.cpu()
        step = max(1, _BLOCK_BYTES // (8 * ds.num_samples))
        for q0 in range(0, q, step):
            q1 = min(q, q0 + step)
            a_c, s2 = a[q0:q1, None], s[q0:q1, None] ** 2
            logits = (a_c * (xt[q0:q1] @ x.T) - 0.5 * a_c**2 * sq[None, :]) / s2
            w = torch.softmax(torch.gather(logits, 1, rows[q0:q1]), dim=1)
            dense = torch.zeros_like(logits).scatter_add_(1, rows[q0:q1], w)
            out[q0:q1] = dense @ x
        return out
    step = _blocks(n, ds.dim)
    for q0 in range(0, q, step):
        q1 = min(q, q0 + step)
        refs = ds.x[rows[q0:q1].to(ds.device)].to(torch.float64).cpu()
        out[q0:q1] = self_normalised_mean(xt[q0:q1], a[q0:q1], s[q0:q1], refs)
    return out


def estimator_study(
    dataset: Dataset,
    t_grid: Sequence[float] | np.ndarray,
    *,
    specs: Sequence[EstimatorSpec] = DEFAULT_SPECS,
    path: str | Path = "linear",
    sigma_min: float = 0.0,
    queries_per_t: int = 256,
    replicates: int = 16,
    seed: int = 0,
    search: str = "exact",
    nprobe: int | None = None,
    source: ExactSource | None = None,
    progress: Callable[[int], Any] | None = None,
) -> EstimatorReport:
    """Measure each estimator's squared bias and variance against the exact target along t.

    Args:
        dataset: the training set (its samples are the queries' x1, the reference batches and the
            kNN tail; also the posterior the own-x1 draws come from).
        t_grid: (T,) times inside the path's domain, t > 0.
        specs: the estimators (default :data:`DEFAULT_SPECS`; minibatch sizes above N are an error).
        path, sigma_min: the probability path.
        queries_per_t: M.
        replicates: R >= 2 draws of each estimator per query.
        seed: seeds the queries and the draws.
        search: the kNN neighbour search, "exact" or "index" (the data set's faiss index).
        nprobe: inverted lists probed by an index search (None: the index's default).
        source: the exact answers and the neighbour search (default: this process's engine on
            ``dataset``; :func:`client_source` asks a server holding the same data).
        progress: called with 1 after each t.

    Raises:
        ValueError: a weighted data set, R < 2, a grid point at t = 0, n > N, an index search
            without an index.
    """
    ds = dataset
    p = get_path(path, sigma_min) if isinstance(path, str) else path
    t = np.asarray(t_grid, dtype=np.float64)
    if t.ndim != 1 or t.size == 0:
        raise ValueError("t_grid must be a non-empty 1-D sequence")
    p.coefficients(t)
    if ds.log_weights is not None:
        raise ValueError(f"data set {ds.name!r} has sample weights; the estimator study draws reference batches "
                         "uniformly and supports unweighted data sets only")  # fmt: skip
    if replicates < 2:
        raise ValueError(f"replicates must be >= 2 (the variance needs two draws), got {replicates}")
    if queries_per_t < 1:
        raise ValueError(f"queries per t must be >= 1, got {queries_per_t}")
    if search not in ("exact", "index"):
        raise ValueError(f"search must be 'exact' or 'index', got {search!r}")
    n_data = ds.num_samples
    for sp in specs:
        if sp.kind in ("stf", "minibatch") and sp.n > n_data:
            raise ValueError(f"{sp.name}: the reference batch is larger than the data set (N = {n_data})")
    nlist = nprobe_used = 0
    if search == "index" and any(sp.kind == "knn" for sp in specs):
        idx = ds.nearest_indexes.get("data")
        if idx is None:
            raise ValueError(f"data set {ds.name!r} has no faiss index: build one with `floworacle index build "
                             "--nearest-index ivf`, or use --knn-search exact")  # fmt: skip
        nlist, nprobe_used = int(idx.nlist), int(nprobe or idx.default_nprobe)
    in_process = source is None
    src = source if source is not None else engine_source(ds)
    from floworacle_server.engine import knn_target

    qs = make_queries(ds, queries_per_t, seed)
    m, d, r = queries_per_t, ds.dim, replicates
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 7)
    c_all = p.coefficients(t)
    a2 = c_all.velocity_x1**2
    tt = len(t)
    bias2 = {sp: np.empty(tt) for sp in specs}
    bias2_se = {sp: np.empty(tt) for sp in specs}
    var = {sp: np.empty(tt) for sp in specs}
    share = {sp: np.full(tt, np.nan) for sp in specs if sp.kind == "knn"}
    spread = np.empty(tt)
    post_var = np.empty(tt)
    for j, tj in enumerate(t):
        tb = np.full(m, tj)
        c = p.coefficients(tb)
        x_t = qs.at(c)
        ex = src.exact(x_t, tb, c)
        spread[j] = float(((ex.velocity - ex.velocity.mean(axis=0)) ** 2).sum(axis=1).mean()) / d
        post_var[j] = a2[j] * float(ex.variance.mean()) / d
        xt = torch.from_numpy(x_t)
        a = torch.from_numpy(c.alpha)
        s = torch.from_numpy(c.sigma)
        # R replicates side by side: query q, draw r at row q * R + r
        xt_r = xt.repeat_interleave(r, dim=0)
        a_r, s_r = a.repeat_interleave(r), s.repeat_interleave(r)
        own = posterior_draws(ds, xt, a, s, r, gen).reshape(-1).cpu()  # (M R,) rows
        x1_ref = torch.from_numpy(ex.x1_hat)
        for sp in specs:
            if sp.kind == "conditional":
                est = ds.x[own.to(ds.device)].to(torch.float64).cpu()
            elif sp.kind == "stf":
                est = _minibatch(ds, xt_r, a_r, s_r, stf_rows(own, sp.n, n_data, gen))
            elif sp.kind == "minibatch":
                est = _minibatch(ds, xt_r, a_r, s_r, fresh_rows(m * r, sp.n, n_data, gen))
            else:
                nb = None
                if sp.k > 0:  # one search serves the R draws
                    nb = src.neighbours(x_t, tb, c, min(sp.k, n_data), search == "exact", nprobe)
                    nb = NearestResult(
                        indices=nb.indices.repeat_interleave(r, dim=0),
                        distances=nb.distances.repeat_interleave(r, dim=0),
                        approximate=nb.approximate,
                    )
                kt = knn_target(ds, xt_r, a_r, s_r, k=sp.k, tail=sp.tail, neighbours=nb, exact=search == "exact",
                                nprobe=nprobe, generator=gen)  # fmt: skip
                est = kt.x1_hat.cpu()
                share[sp][j] = float(kt.neighbour_share.mean())
            e = (est - x1_ref.repeat_interleave(r, dim=0)).reshape(m, r, d).numpy()
            mean = e.mean(axis=1)
            v = ((e - mean[:, None, :]) ** 2).sum(axis=(1, 2)) / (r - 1)
            b2 = (mean**2).sum(axis=1) - v / r
            bias2[sp][j] = a2[j] * float(b2.mean()) / d
            bias2_se[sp][j] = a2[j] * float(b2.std(ddof=1) / math.sqrt(m)) / d if m > 1 else math.inf
            var[sp][j] = a2[j] * float(v.mean()) / d
        if progress is not None:
            progress(1)
    curves = [
        EstimatorCurve(
            spec=sp,
            cost=sp.cost(n_data, search, nlist, nprobe_used),
            bias2=bias2[sp],
            bias2_se=bias2_se[sp],
            variance=var[sp],
            rel_bias2=bias2[sp] / spread,
            rel_variance=var[sp] / spread,
            neighbour_share=share.get(sp),
        )
        for sp in specs
    ]
    return EstimatorReport(
        name=ds.name,
        num_samples=n_data,
        dim=d,
        fingerprint=ds.fingerprint,
        path=p.name,
        t=t,
        spread=spread,
        a2=a2,
        posterior_variance=post_var,
        curves=curves,
        info={
            "queries_per_t": m,
            "replicates": r,
            "seed": seed,
            "knn_search": search if search == "exact" else f"index (nlist {nlist}, nprobe {nprobe_used})",
            "source": "in-process" if in_process else "server",
        },
    )


def plot_estimators(report: EstimatorReport, path: str | FilePath) -> None:
    """PNG: squared bias / S(t) and variance / S(t) against t (logit axis), one curve per estimator."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 5))
    axes = fig.subplots(1, 2)
    styles = {"conditional": "-", "stf": "--", "minibatch": ":", "knn": "-."}
    floor = 1e-12
    for ax, key, title in (
        (axes[0], "rel_bias2", "squared bias / S(t) (points within 3 s.e. of 0 left out)"),
        (axes[1], "rel_variance", "variance / S(t)"),
    ):
        for i, c in enumerate(report.curves):
            y = np.maximum(getattr(c, key), floor)  # log axis: values at 0 sit on the floor
            if key == "rel_bias2":  # a bias indistinguishable from 0 is not drawn (it would be noise)
                y = np.where(_no_bias(c), np.nan, y)
            ax.plot(report.t, y, styles[c.spec.kind], color=f"C{i % 10}", marker=".", ms=3,
                    label=f"{c.spec.name} (cost {c.cost:.2g})")  # fmt: skip
        ax.set_xscale("logit")
        ax.set_xlim(float(report.t.min()), float(report.t.max()))
        ax.set_yscale("log")
        ax.set_ylim(bottom=floor)
        ax.set_xlabel("t  (0 = noise, 1 = data)")
        ax.set_title(f"{report.name}: {title}", fontsize=10)
        ax.grid(True, alpha=0.3)
    axes[1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    FigureCanvasAgg(fig)
    fig.savefig(str(path), format="png", dpi=100)
