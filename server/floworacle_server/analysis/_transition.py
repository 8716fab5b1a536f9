"""The navigation-to-refinement transition of a data set's posterior, measured with the oracle.

Queries ``x_t = alpha_t x1 + sigma_t x0`` are built from M training samples x1 and M fresh noise
draws x0, the same M pairs at every t of a grid (common random numbers keep the curves smooth).
Per t the oracle gives the posterior's top-1 weight, entropy and effective sample size, and the
gap between the oracle velocity and the conditional target; the switch times are where the mean
top-1 weight first reaches 0.5 and 0.99.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from floworacle.paths import Path, PathCoefficients, get_path
from floworacle_server.data import Dataset

__all__ = [
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


def make_queries(dataset: Dataset, num_queries: int, seed: int = 0, label: int | None = None) -> QuerySet:
    """Draw M data samples (without replacement when M <= N) and M noise vectors.

    Args:
        dataset: the data set (its stored rows are the x1).
        num_queries: M >= 1.
        seed: the generator seed; the same seed gives the same queries.
        label: draw x1 from this class only and query the class-conditional oracle.
    """
    if num_queries < 1:
        raise ValueError(f"queries per t must be >= 1, got {num_queries}")
    lo, hi = dataset.class_rows(label) if label is not None else (0, dataset.num_samples)
    rng = np.random.default_rng([seed, 0 if label is None else label + 1])
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

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: name, N, D, label, fingerprint, t, curves, t_switch_50, t_switch_99."""
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
) -> TransitionCurve:
    """Measure the transition curves of ``dataset`` (or of class ``label``) on a t grid.

    Every t uses the same M pairs (x1, x0) from :func:`make_queries`. The query's own x1 is in
    the data set, so these are the *training-set* posteriors (what the closed form describes):
    as sigma_t -> 0 the top-1 weight goes to 1 on x1 itself.

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
        progress: called with 1 after each t (e.g. ``tqdm.update``).
    """
    p = get_path(path, sigma_min) if isinstance(path, str) else path
    t = np.asarray(t_grid, dtype=np.float64)
    if t.ndim != 1 or t.size == 0:
        raise ValueError("t_grid must be a non-empty 1-D sequence")
    p.coefficients(t)  # validate the whole grid before any work
    ev = evaluator if evaluator is not None else engine_evaluator(dataset)
    qs = make_queries(dataset, queries_per_t, seed, label)
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
    )


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
