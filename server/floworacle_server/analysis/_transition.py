"""The navigation-to-refinement transition of a data set's posterior, measured with the oracle.

Queries ``x_t = alpha_t x1 + sigma_t x0`` are built from M training samples x1 and M fresh noise
draws x0, the same M pairs at every t of a grid (common random numbers keep the curves smooth).
Per t the oracle gives the posterior's top-1 weight, entropy and effective sample size, and the
gap between the oracle velocity and the conditional target; the switch times are where the mean
top-1 weight first reaches 0.5 and 0.99.

A switch time is a statistic of M random queries: near 0.99 the mean top-1 curve is flat and a few
queries (near-duplicate samples) carry it, so it moves with the seed and M. Each switch time comes
with a bootstrap over the queries (:func:`switch_uncertainty`: standard error and 95 % interval),
and :func:`transition_curve` can add queries until the standard error is below a target.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from floworacle.paths import Path, PathCoefficients, get_path
from floworacle_server.data import Dataset

__all__ = [
    "BOOTSTRAP_RESAMPLES",
    "DEFAULT_MAX_QUERIES",
    "DEFAULT_START_QUERIES",
    "DEFAULT_TARGET_SE",
    "SWITCH_LEVELS_TOP1",
    "SwitchUncertainty",
    "switch_times",
    "switch_uncertainty",
    "DEFAULT_T_GRID",
    "METRICS",
    "QUANTILES",
    "Evaluation",
    "Evaluator",
    "QuerySet",
    "TransitionCurve",
    "client_evaluator",
    "engine_evaluator",
    "make_queries",
    "parse_synthetic",
    "parse_t_grid",
    "summarize",
    "switch_time",
    "synthetic_dataset",
    "transition_curve",
]

#: Default grid: uniform in logit(t) = log(t / (1 - t)) on [-6, 6], i.e. uniform in log-SNR for the
#: linear path; dense at both ends, where high-D data switch early and low-D data late.
DEFAULT_T_GRID = "logit:-6:6:61"

#: Per-query quantities, each summarised per t.
METRICS = ("top1", "entropy", "ess", "gap")
#: Quantiles reported besides mean and std (as q10, q50, q90).
QUANTILES = (0.1, 0.5, 0.9)

#: The mean top-1 levels of the two switch times, by name.
SWITCH_LEVELS_TOP1 = {"t_switch_50": 0.5, "t_switch_99": 0.99}
#: Bootstrap resamples of the queries behind a switch time's standard error and interval.
BOOTSTRAP_RESAMPLES = 400
#: Adaptive query count (``analyze transition`` without --queries-per-t): start with this many
#: queries, add queries until each switch time's bootstrap standard error is at most the target,
#: stop at the maximum.
DEFAULT_START_QUERIES = 128
DEFAULT_TARGET_SE = 0.005  # a 95 % interval of about +-0.01 (1.96 se)
DEFAULT_MAX_QUERIES = 4096


def parse_t_grid(spec: str, t_max: float = 1.0) -> np.ndarray:
    """Parse a t grid: ``"0.1,0.2,0.5"``, ``"linspace:LO:HI:COUNT"`` or ``"logit:LO:HI:COUNT"``.

    ``logit:LO:HI:COUNT`` takes COUNT values z uniform in [LO, HI] and t = 1 / (1 + e^-z).

    Returns:
        (T,) float64, sorted, unique, inside [0, t_max].

    Raises:
        ValueError: malformed spec, fewer than two points, or a t outside [0, t_max].
    """
    s = spec.strip()
    try:
        if s.startswith(("linspace:", "logit:")):
            kind, lo, hi, count = s.split(":")
            n = int(count)
            if n < 2:
                raise ValueError
            z = np.linspace(float(lo), float(hi), n)
            t = z if kind == "linspace" else 1.0 / (1.0 + np.exp(-z))
        else:
            t = np.array([float(v) for v in s.split(",") if v.strip()], dtype=np.float64)
    except ValueError:
        raise ValueError(
            f"bad t grid {spec!r}; give comma-separated times (0.05,0.1,0.5), "
            "'linspace:LO:HI:COUNT' or 'logit:LO:HI:COUNT' with COUNT >= 2"
        ) from None
    t = np.unique(np.asarray(t, dtype=np.float64))
    if t.size < 2:
        raise ValueError(f"the t grid {spec!r} needs at least two distinct times")
    if not np.isfinite(t).all() or t[0] < 0.0 or t[-1] > t_max:
        raise ValueError(
            f"the t grid {spec!r} must lie in [0, {t_max:.6g}] for this path (t = 0 noise, t = 1 data; "
            "the data end is excluded where sigma_t < 1e-4)"
        )
    return t


def synthetic_dataset(num_samples: int, dim: int, seed: int = 0, device: str | torch.device = "cpu") -> Dataset:
    """N unit-Gaussian samples in D dimensions, ``x_i ~ N(0, I_D)``, stored in float32.

    The generator is seeded by (seed, N, D), so each (N, D) of a sweep has its own fixed data.
    """
    if num_samples < 1 or dim < 1:
        raise ValueError(f"synthetic data needs N >= 1 and D >= 1, got N={num_samples}, D={dim}")
    rng = np.random.default_rng([seed, num_samples, dim])
    x = rng.standard_normal((num_samples, dim), dtype=np.float32)
    return Dataset.from_arrays(f"gaussian N={num_samples} D={dim}", x, device=device)


@dataclass(frozen=True)
class QuerySet:
    """M fixed (x1, x0) pairs, reused at every t.

    Attributes:
        rows: (M,) int64 rows of ``dataset.x`` that give x1.
        x1: (M, D) float64 data samples (the stored values).
        x0: (M, D) float64 standard normal noise.
        labels: (M,) int64 class labels for the class-conditional oracle, or None (unconditional).
    """

    rows: np.ndarray
    x1: np.ndarray
    x0: np.ndarray
    labels: np.ndarray | None

    def at(self, coeffs: PathCoefficients) -> np.ndarray:
        """(M, D) float64 ``x_t = alpha_t x1 + sigma_t x0`` for scalar coefficients broadcast to M."""
        return coeffs.alpha[:, None] * self.x1 + coeffs.sigma[:, None] * self.x0

    def conditional_velocity(self, coeffs: PathCoefficients) -> np.ndarray:
        """(M, D) float64 conditional target ``u_t(x_t | x1) = d_alpha_t x1 + d_sigma_t x0``."""
        return coeffs.d_alpha[:, None] * self.x1 + coeffs.d_sigma[:, None] * self.x0


def make_queries(
    dataset: Dataset, num_queries: int, seed: int = 0, label: int | None = None, batch: int = 0
) -> QuerySet:
    """Draw M data samples (without replacement when M <= N) and M noise vectors.

    Args:
        dataset: the data set (its stored rows are the x1).
        num_queries: M >= 1.
        seed: the generator seed; the same seed gives the same queries.
        label: draw x1 from this class only and query the class-conditional oracle.
        batch: 0 for the first queries of a measurement; 1, 2, ... for further, independent ones
            that an adaptive measurement adds (each batch draws its own rows and noise).
    """
    if num_queries < 1:
        raise ValueError(f"queries per t must be >= 1, got {num_queries}")
    lo, hi = dataset.class_rows(label) if label is not None else (0, dataset.num_samples)
    key = [seed, 0 if label is None else label + 1]
    rng = np.random.default_rng(key if batch == 0 else [*key, batch])
    count = hi - lo
    rows = lo + rng.choice(count, size=num_queries, replace=num_queries > count)
    rows = np.sort(rows).astype(np.int64)
    x1 = dataset.x[torch.from_numpy(rows).to(dataset.device)].to(torch.float64).cpu().numpy()
    x0 = rng.standard_normal((num_queries, dataset.dim))
    labels = np.full(num_queries, label, dtype=np.int64) if label is not None else None
    return QuerySet(rows=rows, x1=x1, x0=x0, labels=labels)


@dataclass(frozen=True)
class Evaluation:
    """Oracle outputs for B queries: (B,) top-1 weight, entropy, ESS and (B, D) velocity, float64."""

    top1: np.ndarray
    entropy: np.ndarray
    ess: np.ndarray
    velocity: np.ndarray


class Evaluator(Protocol):
    """Evaluates the oracle at B queries ``x_t`` (B, D) at times ``t`` (B,) with their coefficients."""

    def __call__(
        self, x_t: np.ndarray, t: np.ndarray, coeffs: PathCoefficients, labels: np.ndarray | None
    ) -> Evaluation: ...


_OUTPUTS = ("velocity", "topk", "entropy", "ess")


def engine_evaluator(dataset: Dataset) -> Evaluator:
    """Evaluate in-process with the exact engine on ``dataset``."""
    from floworacle_server.engine import OracleQuery, oracle

    def evaluate(x_t: np.ndarray, t: np.ndarray, coeffs: PathCoefficients, labels: np.ndarray | None) -> Evaluation:
        q = OracleQuery(
            x_t=torch.from_numpy(x_t),
            coeffs=coeffs,
            labels=torch.from_numpy(labels) if labels is not None else None,
            outputs=_OUTPUTS,
            top_k=1,
        )
        r = oracle(dataset, q)
        assert r.topk_weights is not None and r.entropy is not None and r.ess is not None
        assert r.velocity is not None
        return Evaluation(
            top1=r.topk_weights[:, 0].cpu().numpy(),
            entropy=r.entropy.cpu().numpy(),
            ess=r.ess.cpu().numpy(),
            velocity=r.velocity.cpu().numpy(),
        )

    return evaluate


def client_evaluator(
    client: Any,
    dataset: str | None,
    *,
    path: str = "linear",
    sigma_min: float = 0.0,
    fingerprint: str | None = None,
) -> Evaluator:
    """Evaluate through a running server with an SDK client (``floworacle.OracleClient``).

    The server computes the coefficients from ``path`` and t; ``fingerprint`` pins the data set so
    that a server holding other data under that name fails the call instead of answering.
    """

    def evaluate(x_t: np.ndarray, t: np.ndarray, coeffs: PathCoefficients, labels: np.ndarray | None) -> Evaluation:
        del coeffs  # the server derives the same ones from (path, t)
        p = client.predict(
            x_t,
            t,
            outputs=_OUTPUTS,
            top_k=1,
            dataset=dataset,
            path=path,
            sigma_min=sigma_min,
            labels=labels,
            fingerprint=fingerprint,
        )
        return Evaluation(
            top1=np.asarray(p.topk_weights, dtype=np.float64)[:, 0],
            entropy=np.asarray(p.entropy, dtype=np.float64),
            ess=np.asarray(p.ess, dtype=np.float64),
            velocity=np.asarray(p.velocity, dtype=np.float64).reshape(x_t.shape[0], -1),
        )

    return evaluate


def summarize(values: np.ndarray) -> dict[str, np.ndarray]:
    """Per-row summary of (T, M) values: mean, std (population) and the :data:`QUANTILES`, each (T,)."""
    out = {"mean": values.mean(axis=1), "std": values.std(axis=1)}
    for q in QUANTILES:
        out[f"q{round(q * 100):02d}"] = np.quantile(values, q, axis=1)
    return out


def switch_time(t: np.ndarray, curve: np.ndarray, level: float) -> float | None:
    """First t where ``curve`` reaches ``level``, linearly interpolated between grid points.

    Returns t[0] if the curve starts at or above the level, None if it never reaches it.
    """
    above = np.flatnonzero(curve >= level)
    if above.size == 0:
        return None
    j = int(above[0])
    if j == 0:
        return float(t[0])
    c0, c1 = float(curve[j - 1]), float(curve[j])
    frac = (level - c0) / (c1 - c0)
    return float(t[j - 1] + frac * (t[j] - t[j - 1]))


def switch_times(t: np.ndarray, curves: np.ndarray, level: float) -> np.ndarray:
    """:func:`switch_time` of each row of ``curves`` (R, T): (R,) times, NaN where a row never
    reaches ``level``."""
    above = curves >= level
    reached = above.any(axis=1)
    j = np.argmax(above, axis=1)
    prev = np.maximum(j - 1, 0)
    rows = np.arange(curves.shape[0])
    c0, c1 = curves[rows, prev], curves[rows, j]
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.where(j > 0, (level - c0) / (c1 - c0), 0.0)
    out = np.where(j > 0, t[prev] + frac * (t[j] - t[prev]), t[0])
    return np.where(reached, out, np.nan)


@dataclass(frozen=True)
class SwitchUncertainty:
    """How much a switch time moves with the queries it was measured on (bootstrap over them).

    Attributes:
        se: standard deviation of the resampled switch times that reached the level (None when
            fewer than two did).
        lo, hi: 2.5 % and 97.5 % quantiles of the resampled switch times (a 95 % interval); a
            resample that never reached the level counts as later than the grid, so ``hi`` is
            None when more than 2.5 % of them did not.
        never: share of the resamples whose mean curve never reached the level.
        resamples: how many resamples.
    """

    se: float | None
    lo: float | None
    hi: float | None
    never: float
    resamples: int

    def to_json(self) -> dict[str, Any]:
        return {"se": self.se, "lo": self.lo, "hi": self.hi, "never": self.never, "resamples": self.resamples}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SwitchUncertainty:
        return cls(d.get("se"), d.get("lo"), d.get("hi"), float(d.get("never", 0.0)), int(d.get("resamples", 0)))


def switch_uncertainty(
    t: np.ndarray, top1: np.ndarray, level: float, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> SwitchUncertainty:
    """Bootstrap of the switch time at ``level`` over the M queries of ``top1`` (T, M).

    Each resample draws M queries with replacement (multinomial counts c, sum M), its mean curve
    is ``top1 @ c / M`` and its switch time :func:`switch_times`' of that curve. The queries are
    M independent draws (data sample and noise), so the spread of the resampled switch times
    estimates how far another seed's measurement with the same M would land (checked against
    re-seeded measurements in the tests).
    """
    m = top1.shape[1]
    rng = np.random.default_rng([seed, 8191, m])
    counts = rng.multinomial(m, np.full(m, 1.0 / m), size=resamples).astype(np.float64)  # (R, M)
    curves = counts @ top1.T / m  # (R, T)
    times = switch_times(np.asarray(t, np.float64), curves, level)
    reached = times[np.isfinite(times)]
    never = 1.0 - reached.size / resamples
    se = float(reached.std(ddof=1)) if reached.size >= 2 else None
    beyond = float(t[-1]) + 1.0  # "never" sorts after every time on the grid
    ordered = np.where(np.isfinite(times), times, beyond)
    lo, hi = (float(v) for v in np.quantile(ordered, (0.025, 0.975), method="inverted_cdf"))
    return SwitchUncertainty(
        se=se,
        lo=lo if lo < beyond else None,
        hi=hi if hi < beyond else None,
        never=float(never),
        resamples=resamples,
    )


@dataclass
class TransitionCurve:
    """Transition curves of one data set (or one class of it).

    Attributes:
        name: data set name (with the class for a per-class curve).
        num_samples: N, the samples the posterior runs over (the class size when conditional).
        dim: D.
        label: the class of a class-conditional curve, else None.
        t: (T,) the grid.
        stats: ``stats[metric][stat]`` (T,) arrays; metrics :data:`METRICS`, stats mean, std,
            q10, q50, q90. ``gap`` is ``||u_oracle - u_cond||^2 / D`` per query.
        t_switch_50, t_switch_99: where the mean top-1 weight first reaches 0.5 / 0.99.
        fingerprint: the data set's fingerprint.
        values: ``values[metric]`` (T, M) per-query values (not written to JSON).
        queries: M, the queries per t the curves are the mean of (0 when unknown: an old JSON).
        uncertainty: per switch name ("t_switch_50", "t_switch_99") its bootstrap
            :class:`SwitchUncertainty`, for the switches that were reached.
    """

    name: str
    num_samples: int
    dim: int
    label: int | None
    t: np.ndarray
    stats: dict[str, dict[str, np.ndarray]]
    t_switch_50: float | None
    t_switch_99: float | None
    fingerprint: str = ""
    values: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    queries: int = 0
    uncertainty: dict[str, SwitchUncertainty] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: name, N, D, label, fingerprint, t, curves, t_switch_50, t_switch_99,
        queries and uncertainty (per switch: se, lo, hi, never, resamples)."""
        return {
            "name": self.name,
            "N": self.num_samples,
            "D": self.dim,
            "label": self.label,
            "fingerprint": self.fingerprint,
            "t": [float(v) for v in self.t],
            "curves": {m: {k: [float(v) for v in arr] for k, arr in s.items()} for m, s in self.stats.items()},
            "t_switch_50": self.t_switch_50,
            "t_switch_99": self.t_switch_99,
            "queries": self.queries,
            "uncertainty": {k: u.to_json() for k, u in self.uncertainty.items()},
        }

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> TransitionCurve:
        """Inverse of :meth:`to_json` (without the per-query values)."""
        try:
            return cls(
                name=str(entry["name"]),
                num_samples=int(entry["N"]),
                dim=int(entry["D"]),
                label=entry.get("label"),
                t=np.asarray(entry["t"], dtype=np.float64),
                stats={
                    m: {k: np.asarray(v, dtype=np.float64) for k, v in s.items()} for m, s in entry["curves"].items()
                },
                t_switch_50=entry.get("t_switch_50"),
                t_switch_99=entry.get("t_switch_99"),
                fingerprint=str(entry.get("fingerprint", "")),
                queries=int(entry.get("queries", 0)),
                uncertainty={k: SwitchUncertainty.from_json(u) for k, u in (entry.get("uncertainty") or {}).items()},
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(
                f"not a transition result entry (missing {exc}); give a JSON written by "
                "`floworacle analyze transition --json`"
            ) from None


def transition_curve(
    dataset: Dataset,
    t_grid: Sequence[float] | np.ndarray,
    *,
    path: str | Path = "linear",
    sigma_min: float = 0.0,
    queries_per_t: int = 256,
    seed: int = 0,
    label: int | None = None,
    evaluator: Evaluator | None = None,
    progress: Callable[[int], Any] | None = None,
    target_se: float | None = None,
    max_queries: int = DEFAULT_MAX_QUERIES,
) -> TransitionCurve:
    """Measure the transition curves of ``dataset`` (or of class ``label``) on a t grid.

    Every t uses the same M pairs (x1, x0) from :func:`make_queries`. The query's own x1 is in
    the data set, so these are the *training-set* posteriors (what the closed form describes):
    as sigma_t -> 0 the top-1 weight goes to 1 on x1 itself.

    Each switch time gets its bootstrap :class:`SwitchUncertainty` over the M queries. With
    ``target_se``, M grows: ``queries_per_t`` queries first, then batches of fresh queries (each
    evaluated at every t) sized by ``se ~ 1 / sqrt(M)`` until every switch time that is reached
    has a standard error <= ``target_se`` (and under 2.5 % of the resamples miss it), or M
    reaches ``max_queries``.

    Per query: top-1 posterior weight ``max_i gamma_i``, entropy ``-sum gamma log gamma`` (nats),
    ESS ``1 / sum gamma^2``, and ``gap = ||u - (d_alpha x1 + d_sigma x0)||^2 / D`` with u the
    oracle velocity (equal to ``A_t^2 ||x1_hat - x1||^2 / D``).

    Args:
        dataset: the data set whose stored rows are both the x1 and the posterior's support.
        t_grid: (T,) times inside the path's domain.
        path: path name or :class:`~floworacle.paths.Path`.
        sigma_min: for the linear path.
        queries_per_t: M.
        seed: query seed.
        label: a class for the class-conditional oracle, or None.
        evaluator: how to run the oracle (default: in-process engine on ``dataset``).
        progress: called with 1 after each t (e.g. ``tqdm.update``), per batch of queries.
        target_se: grow M until each switch time's standard error is at most this (None: M
            stays ``queries_per_t``).
        max_queries: the most queries an adaptive measurement uses.
    """
    p = get_path(path, sigma_min) if isinstance(path, str) else path
    t = np.asarray(t_grid, dtype=np.float64)
    if t.ndim != 1 or t.size == 0:
        raise ValueError("t_grid must be a non-empty 1-D sequence")
    p.coefficients(t)  # validate the whole grid before any work
    if target_se is not None and not target_se > 0:
        raise ValueError(f"the target standard error must be > 0, got {target_se}")
    ev = evaluator if evaluator is not None else engine_evaluator(dataset)
    batches: list[dict[str, np.ndarray]] = []
    size, m = queries_per_t, 0
    while True:
        batches.append(
            _measure_batch(dataset, p, t, ev, make_queries(dataset, size, seed, label, len(batches)), progress)
        )
        m += size
        top1 = np.concatenate([b["top1"] for b in batches], axis=1)
        uncertainty = _uncertainties(t, top1, seed)
        if target_se is None or m >= max_queries:
            break
        worst = _worst_ratio(uncertainty, target_se)
        if worst <= 1.0:
            break
        # se ~ 1 / sqrt(M): the queries the worst switch needs, 10 % over, at least M / 2 more
        size = min(max_queries - m, max(m // 2, math.ceil(m * worst**2 * 1.1) - m))
    vals = {k: np.concatenate([b[k] for b in batches], axis=1) for k in METRICS}
    stats = {k: summarize(v) for k, v in vals.items()}
    mean = stats["top1"]["mean"]
    lo, hi = dataset.class_rows(label) if label is not None else (0, dataset.num_samples)
    return TransitionCurve(
        name=dataset.name if label is None else f"{dataset.name} [class {label}]",
        num_samples=hi - lo,
        dim=dataset.dim,
        label=label,
        t=t,
        stats=stats,
        t_switch_50=switch_time(t, mean, 0.5),
        t_switch_99=switch_time(t, mean, 0.99),
        fingerprint=dataset.fingerprint,
        values=vals,
        queries=m,
        uncertainty=uncertainty,
    )


def _measure_batch(
    dataset: Dataset,
    p: Path,
    t: np.ndarray,
    ev: Evaluator,
    qs: QuerySet,
    progress: Callable[[int], Any] | None,
) -> dict[str, np.ndarray]:
    """``values[metric]`` (T, M) of one batch of queries at every t."""
    m = qs.x1.shape[0]
    vals = {k: np.empty((t.size, m), dtype=np.float64) for k in METRICS}
    for j, tj in enumerate(t):
        tb = np.full(m, tj)
        c = p.coefficients(tb)
        e = ev(qs.at(c), tb, c, qs.labels)
        vals["top1"][j] = e.top1
        vals["entropy"][j] = e.entropy
        vals["ess"][j] = e.ess
        diff = e.velocity - qs.conditional_velocity(c)
        vals["gap"][j] = np.einsum("bd,bd->b", diff, diff) / dataset.dim
        if progress is not None:
            progress(1)
    return vals


def _uncertainties(t: np.ndarray, top1: np.ndarray, seed: int) -> dict[str, SwitchUncertainty]:
    """The bootstrap of each switch time whose mean curve reaches its level."""
    mean = top1.mean(axis=1)
    return {
        name: switch_uncertainty(t, top1, level, seed=seed)
        for name, level in SWITCH_LEVELS_TOP1.items()
        if switch_time(t, mean, level) is not None
    }


def _worst_ratio(uncertainty: dict[str, SwitchUncertainty], target_se: float) -> float:
    """max over the switches of se / target (2 where a resample misses the level too often or
    the spread is unknown: more queries are needed, by an unknown factor)."""
    worst = 0.0
    for u in uncertainty.values():
        if u.se is None or u.never > 0.025:
            worst = max(worst, 2.0)
        else:
            worst = max(worst, u.se / target_se)
    return worst


def parse_synthetic(specs: Iterable[str]) -> list[tuple[int, int]]:
    """Parse ``"N:D"`` strings into (N, D) pairs; raises ValueError with the expected form."""
    out = []
    for s in specs:
        try:
            n_s, d_s = s.split(":")
            n, d = int(n_s), int(d_s)
        except ValueError:
            raise ValueError(f"bad --synthetic {s!r}; write N:D, e.g. 1000:64") from None
        if n < 2 or d < 1:
            raise ValueError(f"--synthetic {s!r} needs N >= 2 and D >= 1")
        out.append((n, d))
    return out
