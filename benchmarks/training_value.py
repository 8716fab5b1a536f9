"""Training study: does an oracle target help a small flow-matching model, and when does it memorise?

One small MLP (same architecture, optimiser, steps and seeds) is trained once per target on the
linear path, all targets in lockstep on the same minibatches (x1, x0, t), so every comparison is
paired:

    conditional   x1 - x0 (standard flow matching)
    oracle        the exact oracle velocity over the training set at x_t
    loo           the oracle over the training set without the minibatch sample's own x1
    nav_oracle    the oracle while t < t_switch_99 of the training set, the conditional target after
    stf           Stable-Target-Field style: the oracle over a reference batch of R samples drawn
                  per step (the minibatch's own x1 and R - B other training samples)

on three data sets: digits (N = 1,797, D = 64, 20 % held out with the split of
``floworacle index build --holdout 0.2 --seed 0``), digits-small (180 of those training digits,
the same held-out digits: the model sees each sample a thousand times) and a synthetic latent set
(10,000 training and 2,000 held-out samples near a union of 8 random 4-dimensional subspaces of
D = 256). With N <= R the STF reference batch is the whole training set (STF = oracle).

Per target (mean and range over the seeds) the study reports

- the gradient variance of the loss across minibatches per t bucket, ``E ||g_k - mean g||^2``
  over K minibatches of B queries with t uniform in the bucket, all targets at one shared
  parameter point (the conditional model's final weights), so only the target differs;
- the final distance of the model to the training-set, held-out and leave-one-out oracles per t
  (the model study of ``floworacle.study``, in x1-prediction space), averaged per bucket;
- the copy share of 1,000 samples (midpoint, 50 steps; d1/d2 < 1/3) beside held-out samples';
- a held-out quality figure: the mean distance of the samples to their nearest held-out sample,
  beside the same for training samples;
- the model's own switch (first t where its distance to the training oracle falls below half
  its distance to the held-out oracle) beside the data set's t_switch_50 / t_switch_99.

Everything runs in-process on the exact engine (no gRPC), on one thread by default (``--threads``
sets the engine's): on the shared 2-core machine two OpenMP threads made the engine's calls up to
10 times and the small models' steps up to 20 times slower than one (spin-waits against other
processes).

    python benchmarks/training_value.py --json training_value.json --plots docs/img --markdown
    python benchmarks/training_value.py --quick          # a smoke run of about a minute
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from floworacle.paths import get_path
from floworacle.study import DEFAULT_T_GRID, ModelStudy, StudyConfig, plot_model_study
from floworacle_server.analysis import EngineData, parse_t_grid, transition_curve
from floworacle_server.data import Dataset, load_digits, split_dataset
from floworacle_server.engine import OracleQuery, flush_denormals, oracle

TARGETS = ("conditional", "oracle", "loo", "nav_oracle", "stf")
DATASETS = ("digits", "digits-small", "subspaces")
PATH = get_path("linear")


@dataclass(frozen=True)
class Settings:
    """The training recipe and the measurement sizes (the same for every target and data set)."""

    steps: int = 1000
    batch: int = 128
    lr: float = 2e-3
    hidden: int = 256
    depth: int = 3
    seeds: tuple[int, ...] = (0, 1)
    t_max: float = 0.99  # training t ~ U(0, t_max): the leave-one-out target grows like 1 / (1 - t)
    grad_clip: float = 1.0
    chunk_steps: int = 32  # steps whose targets are computed in one engine call
    stf_reference: int = 1024
    samples: int = 1000
    sample_steps: int = 50
    queries_per_t: int = 128
    grad_batches: int = 16
    buckets: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    synthetic_train: int = 10_000
    synthetic_heldout: int = 2_000
    small_train: int = 180
    engine_threads: int = 1
    model_threads: int = 1


QUICK = Settings(steps=64, seeds=(0,), samples=100, queries_per_t=16, grad_batches=4, synthetic_train=2000,
                 synthetic_heldout=400, stf_reference=256)  # fmt: skip


class VelocityMLP(nn.Module):
    """v(x_t, t): (B, D), (B,) -> (B, D); t enters through sinusoidal features."""

    def __init__(self, dim: int, hidden: int, depth: int, freqs: int = 8) -> None:
        super().__init__()
        self.freqs: torch.Tensor
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(freqs, dtype=torch.float32) / 2)
        layers: list[nn.Module] = [nn.Linear(dim + 2 * freqs, hidden), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        layers.append(nn.Linear(hidden, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        f = t.to(x.dtype)[:, None] * self.freqs
        return self.net(torch.cat([x, f.sin(), f.cos()], dim=1))


def subspaces(n_train: int, n_heldout: int, dim: int = 256, k: int = 8, rank: int = 4, seed: int = 0):
    """Samples near a union of k random rank-dimensional subspaces: ``x = U_c z + 0.1 e``,
    z ~ N(0, 16 I), e ~ N(0, I_D); (train, heldout) float32, independent draws of one law."""
    rng = np.random.default_rng([seed, dim, k, rank])
    bases = np.linalg.qr(rng.standard_normal((k, dim, rank)))[0]  # (k, D, rank), orthonormal columns
    n = n_train + n_heldout
    c = rng.integers(0, k, n)
    z = 4.0 * rng.standard_normal((n, rank))
    x = np.einsum("ndr,nr->nd", bases[c], z) + 0.1 * rng.standard_normal((n, dim))
    return x[:n_train].astype(np.float32), x[n_train:].astype(np.float32), c[:n_train], c[n_train:]


@dataclass
class Pair:
    """A training / held-out pair with the training set's switch times."""

    name: str
    train: Dataset
    held: Dataset
    x: torch.Tensor  # (N, D) float64 training samples, original order
    t_switch_50: float
    t_switch_99: float


def load_pair(name: str, cfg: Settings) -> Pair:
    if name in ("digits", "digits-small"):
        train, held = split_dataset(load_digits(), 0.2, 0)
        if name == "digits-small":
            keep = np.sort(np.random.default_rng(1).permutation(train.num_samples)[: cfg.small_train])
            rows = train.rows_of(torch.from_numpy(keep))
            assert train.labels is not None
            train = Dataset.from_arrays("digits-small-train", train.x[rows], train.labels[rows])
    else:
        tr, ho, _, _ = subspaces(cfg.synthetic_train, cfg.synthetic_heldout)
        train = Dataset.from_arrays("subspaces-train", tr)
        held = Dataset.from_arrays("subspaces-heldout", ho)
    x = train.x[train.rows_of(torch.arange(train.num_samples))].to(torch.float64)
    with threads(cfg.engine_threads):
        curve = transition_curve(train, parse_t_grid("logit:-6:6:61"), queries_per_t=256, seed=0)
    assert curve.t_switch_50 is not None and curve.t_switch_99 is not None
    return Pair(name, train, held, x, curve.t_switch_50, curve.t_switch_99)


# -- targets ------------------------------------------------------------------------------


@dataclass
class Draw:
    """Q queries: rows of x1, noise, times, and (per query) its minibatch's STF reference set."""

    rows: np.ndarray  # (Q,)
    x0: np.ndarray  # (Q, D) float64
    t: np.ndarray  # (Q,)
    group: np.ndarray  # (Q,) minibatch index
    refs: np.ndarray  # (G, R) reference rows per minibatch


def draw(
    rng: np.random.Generator, pair: Pair, groups: int, cfg: Settings, t_lo: float = 0.0, t_hi: float | None = None
):
    n, d, b = pair.train.num_samples, pair.train.dim, cfg.batch
    t_hi = cfg.t_max if t_hi is None else min(t_hi, cfg.t_max)
    rows = rng.integers(0, n, (groups, b))
    size = min(cfg.stf_reference, n)
    refs = np.empty((groups, size), dtype=np.int64)
    for g in range(groups):
        own = np.unique(rows[g])
        rest = np.setdiff1d(np.arange(n), own, assume_unique=True)
        refs[g] = np.concatenate([own, rng.choice(rest, size - own.size, replace=False)])
    return Draw(
        rows=rows.reshape(-1),
        x0=rng.standard_normal((groups * b, d)),
        t=rng.uniform(t_lo, t_hi, groups * b),
        group=np.repeat(np.arange(groups), b),
        refs=refs,
    )


@contextmanager
def threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def targets(pair: Pair, q: Draw, cfg: Settings) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(x_t, {target: (Q, D)}) float32, every oracle from the exact engine."""
    with threads(cfg.engine_threads):
        return _targets(pair, q)


def _targets(pair: Pair, q: Draw) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x1 = pair.x[torch.from_numpy(q.rows)]
    x0 = torch.from_numpy(q.x0)
    t = torch.from_numpy(q.t)
    x_t = t[:, None] * x1 + (1 - t[:, None]) * x0
    c = PATH.coefficients(q.t)
    orc = oracle(pair.train, OracleQuery(x_t=x_t, coeffs=c)).velocity
    loo = oracle(pair.train, OracleQuery(x_t=x_t, coeffs=c, exclude=torch.from_numpy(q.rows))).velocity
    # STF: one data set of all minibatches' reference sets, labelled by minibatch; the
    # class-conditional oracle of label g is the posterior over minibatch g's references
    g, r = q.refs.shape
    ref = Dataset.from_arrays(
        "stf", pair.x[torch.from_numpy(q.refs.reshape(-1))].float(), np.repeat(np.arange(g), r), fingerprint="stf"
    )
    stf = oracle(ref, OracleQuery(x_t=x_t, coeffs=c, labels=torch.from_numpy(q.group))).velocity
    assert orc is not None and loo is not None and stf is not None
    cond = x1 - x0
    nav = torch.where(t[:, None] < pair.t_switch_99, orc, cond)
    out = {"conditional": cond, "oracle": orc, "loo": loo, "nav_oracle": nav, "stf": stf}
    return x_t.float(), {k: v.float() for k, v in out.items()}


# -- training and measurement -------------------------------------------------------------


def new_model(dim: int, cfg: Settings, seed: int) -> VelocityMLP:
    torch.manual_seed(seed)  # the same initial weights for every target
    return VelocityMLP(dim, cfg.hidden, cfg.depth)


def train_all(pair: Pair, cfg: Settings, seed: int) -> tuple[dict[str, VelocityMLP], dict[str, float]]:
    """Train one model per target in lockstep on one stream of minibatches; (models, seconds spent)."""
    dim = pair.train.dim
    models = {k: new_model(dim, cfg, seed) for k in TARGETS}
    opts = {k: torch.optim.Adam(m.parameters(), lr=cfg.lr) for k, m in models.items()}
    rng = np.random.default_rng([seed, 1])
    spent = {"targets": 0.0, "training": 0.0}
    b = cfg.batch
    for c0 in range(0, cfg.steps, cfg.chunk_steps):
        n_steps = min(cfg.chunk_steps, cfg.steps - c0)
        t0 = time.perf_counter()
        q = draw(rng, pair, n_steps, cfg)
        x_t, tg = targets(pair, q, cfg)
        tt = torch.from_numpy(q.t).float()
        t1 = time.perf_counter()
        for s in range(n_steps):
            sl = slice(s * b, (s + 1) * b)
            for k, m in models.items():
                loss = (m(x_t[sl], tt[sl]) - tg[k][sl]).pow(2).mean()
                opts[k].zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(m.parameters(), cfg.grad_clip)
                opts[k].step()
        spent["targets"] += t1 - t0
        spent["training"] += time.perf_counter() - t1
    return models, spent


def gradient_variance(pair: Pair, cfg: Settings, seed: int, at: VelocityMLP) -> dict[str, list[float]]:
    """Per target and t bucket: ``mean_k ||g_k - mean g||^2`` over K minibatch gradients at ``at``'s weights."""
    rng = np.random.default_rng([seed, 2])
    model = new_model(pair.train.dim, cfg, seed)
    model.load_state_dict(at.state_dict())
    out: dict[str, list[float]] = {k: [] for k in TARGETS}
    b = cfg.batch
    for lo, hi in zip(cfg.buckets[:-1], cfg.buckets[1:], strict=True):
        q = draw(rng, pair, cfg.grad_batches, cfg, lo, hi)
        x_t, tg = targets(pair, q, cfg)
        tt = torch.from_numpy(q.t).float()
        for k in TARGETS:
            grads = []
            for g in range(cfg.grad_batches):
                sl = slice(g * b, (g + 1) * b)
                model.zero_grad(set_to_none=True)
                (model(x_t[sl], tt[sl]) - tg[k][sl]).pow(2).mean().backward()
                grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]))
            gm = torch.stack(grads).double()
            out[k].append(float((gm - gm.mean(0)).pow(2).sum(1).mean()))
    return out


def bucket_means(t: np.ndarray, v: np.ndarray, edges: tuple[float, ...]) -> list[float]:
    return [float(v[(t >= lo) & (t < hi)].mean()) for lo, hi in zip(edges[:-1], edges[1:], strict=True)]


def measure(pair: Pair, study: ModelStudy, model: VelocityMLP, cfg: Settings) -> tuple[dict[str, Any], Any]:
    with threads(cfg.engine_threads):
        rep = study.run(model, name="mlp")
    t = rep.t
    d = rep.x1
    fig = {
        "t": [float(v) for v in t],
        "d_train_trainq": d["train"]["train"].tolist(),
        "d_heldout_trainq": d["train"]["heldout"].tolist(),
        "d_loo_trainq": d["train"]["loo"].tolist(),
        "d_train_heldq": d["heldout"]["train"].tolist(),
        "d_heldout_heldq": d["heldout"]["heldout"].tolist(),
        "fit_ratio": rep.fit_ratio().tolist(),
        "switch_train": rep.switch["train"],
        "switch_heldout": rep.switch["heldout"],
        **{
            f"bucket_{k}": bucket_means(t, np.asarray(v), cfg.buckets)
            for k, v in (
                ("d_train_trainq", d["train"]["train"]),
                ("d_loo_trainq", d["train"]["loo"]),
                ("d_heldout_heldq", d["heldout"]["heldout"]),
                ("d_train_heldq", d["heldout"]["train"]),
            )
        },  # fmt: skip
        **{
            k: rep.samples[k]
            for k in (
                "copy_share",
                "heldout_copy_share",
                "nearest_heldout_mean",
                "train_nearest_heldout_mean",
                "nearest_train_mean",
                "heldout_nearest_train_mean",
            )
        },  # fmt: skip
    }
    return fig, rep


# -- reporting ------------------------------------------------------------------------------


def _agg(values: list[Any]) -> dict[str, Any]:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": a.mean(axis=0).tolist(), "min": a.min(axis=0).tolist(), "max": a.max(axis=0).tolist()}


def _fmt(v: float, lo: float, hi: float, digits: int = 3, ranged: bool = True) -> str:
    s, a, b = f"{v:.{digits}g}", f"{lo:.{digits}g}", f"{hi:.{digits}g}"
    return s + (f" ({a}-{b})" if ranged and a != b else "")


def markdown(result: dict[str, Any], full: bool = True) -> str:
    """The docs' tables: per data set, gradient variance, distances, fit ratio, samples; then the
    conditional model's switch beside the data's. ``full=False`` leaves out the leave-one-out distances."""
    lines: list[str] = []
    edges = result["settings"]["buckets"]
    heads = [f"[{lo:g}, {hi:g})" for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    for ds in result["datasets"]:
        runs = ds["targets"]
        multi = len(result["settings"]["seeds"]) > 1
        lines += [f"### {ds['name']} (N = {ds['N']}, D = {ds['D']}, held out {ds['heldout_N']}; "
                  f"t_switch_50 = {ds['t_switch_50']:.3f}, t_switch_99 = {ds['t_switch_99']:.3f})", ""]  # fmt: skip
        lines += ["Gradient variance across minibatches, relative to the conditional target's, per t bucket:", ""]
        lines += ["| target | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
        base = np.asarray(runs["conditional"]["grad_variance"]["mean"])
        for k in TARGETS:
            per_seed = np.asarray(runs[k]["grad_variance_seeds"]) / np.asarray(
                runs["conditional"]["grad_variance_seeds"]
            )
            cells = [_fmt(per_seed[:, j].mean(), per_seed[:, j].min(), per_seed[:, j].max(), ranged=multi)
                     for j in range(len(heads))]  # fmt: skip
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
        lines += ["", "(conditional, absolute: " + ", ".join(f"{v:.3g}" for v in base) + ")", ""]
        for key, what in (
            ("bucket_d_train_trainq", "distance to the training-set oracle, queries from training samples"),
            ("bucket_d_heldout_heldq", "distance to the held-out oracle, queries from held-out samples"),
            ("bucket_d_loo_trainq", "distance to the leave-one-out oracle, queries from training samples"),
        ):
            if key == "bucket_d_loo_trainq" and not full:
                continue
            lines += [f"Final {what} (mean ||x1_model - x1_oracle||^2 / D per bucket):", ""]
            lines += ["| target | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
            for k in TARGETS:
                a = runs[k][key]
                cells = [_fmt(a["mean"][j], a["min"][j], a["max"][j], ranged=multi) for j in range(len(heads))]
                lines.append(f"| {k} | " + " | ".join(cells) + " |")
            lines.append("")
        lines += ["Fit ratio (the first table over the second, bucket by bucket, means over the seeds):", ""]
        lines += ["| target | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
        for k in TARGETS:
            a, b = runs[k]["bucket_d_train_trainq"]["mean"], runs[k]["bucket_d_heldout_heldq"]["mean"]
            lines.append(f"| {k} | " + " | ".join(f"{x / y:.3f}" for x, y in zip(a, b, strict=True)) + " |")
        lines.append("")
        lines += [f"Samples ({result['settings']['samples']:,} per model) and the model's switch:", ""]
        lines += ["| target | copy share | held-out copy share | nearest held-out (model) | nearest held-out "
                  "(training samples) | nearest training (model) | model switch t |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for k in TARGETS:
            r = runs[k]
            sw = [v for v in r["switch_train_seeds"] if v is not None]
            sw_s = "never" if not sw else _fmt(float(np.mean(sw)), min(sw), max(sw), ranged=multi)
            cells = [_fmt(r[c]["mean"], r[c]["min"], r[c]["max"], ranged=multi) for c in (
                "copy_share", "heldout_copy_share", "nearest_heldout_mean", "train_nearest_heldout_mean",
                "nearest_train_mean")]  # fmt: skip
            lines.append(f"| {k} | " + " | ".join(cells) + f" | {sw_s} |")
        lines.append("")
    lines += ["The conditional model's switch beside the data set's (`analyze transition`):", ""]
    lines += ["| data set | N | D | t_switch_50 | t_switch_99 | model switch (conditional) | minus t_switch_99 |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for ds in result["datasets"]:
        sw = [v for v in ds["targets"]["conditional"]["switch_train_seeds"] if v is not None]
        cell = "never" if not sw else f"{np.mean(sw):.3f} ({min(sw):.3f}-{max(sw):.3f})"
        gap = "-" if not sw else f"{np.mean(sw) - ds['t_switch_99']:+.3f}"
        lines.append(f"| {ds['name']} | {ds['N']} | {ds['D']} | {ds['t_switch_50']:.3f} | {ds['t_switch_99']:.3f} | "
                     f"{cell} | {gap} |")  # fmt: skip
    lines.append("")
    return "\n".join(lines)


def plot(ds: dict[str, Any], settings: dict[str, Any], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(17, 4.2))
    ax = fig.subplots(1, 4)
    runs = ds["targets"]
    edges = settings["buckets"]
    centres = [(lo + hi) / 2 for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    for k in TARGETS:
        ax[0].plot(centres, runs[k]["grad_variance"]["mean"], "o-", label=k)
    ax[0].set_yscale("log")
    ax[0].set_title("gradient variance across minibatches", fontsize=10)
    ax[0].set_xlabel("t bucket centre")
    t = np.asarray(runs["conditional"]["t"])
    for k in TARGETS:
        ax[1].plot(t, runs[k]["d_train_trainq"]["mean"], label=k)
        ax[2].plot(t, runs[k]["d_heldout_heldq"]["mean"], label=k)
    ax[1].set_title("to the training oracle (training-sample queries)", fontsize=10)
    ax[2].set_title("to the held-out oracle (held-out queries)", fontsize=10)
    for a in ax[1:3]:
        a.set_yscale("log")
        a.set_xlabel("t")
        a.set_ylabel("mean ||x1_model - x1_oracle||^2 / D")
        for v, ls in ((ds["t_switch_50"], ":"), (ds["t_switch_99"], "--")):
            a.axvline(v, color="gray", ls=ls, lw=0.8)
    x = np.arange(len(TARGETS))
    ax[3].bar(x - 0.2, [runs[k]["copy_share"]["mean"] for k in TARGETS], 0.4, label="copy share")
    ax[3].bar(x + 0.2, [runs[k]["nearest_heldout_mean"]["mean"] / runs[k]["train_nearest_heldout_mean"]["mean"]
                        for k in TARGETS], 0.4, label="nearest held-out: model / training samples")  # fmt: skip
    ax[3].axhline(runs["conditional"]["heldout_copy_share"]["mean"], color="C0", ls=":", lw=0.8)
    ax[3].axhline(1.0, color="C1", ls=":", lw=0.8)
    ax[3].set_xticks(x)
    ax[3].set_xticklabels(TARGETS, fontsize=8)
    ax[3].set_title("samples", fontsize=10)
    for a in ax:
        a.grid(True, alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle(f"training study on {ds['name']} (N = {ds['N']}, D = {ds['D']}); dotted / dashed: t_switch_50 / 99",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    FigureCanvasAgg(fig)
    fig.savefig(str(path), format="png", dpi=100)


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        return next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "")
    except OSError:
        return platform.processor()


def run(names: list[str], cfg: Settings, plots: Path | None) -> dict[str, Any]:
    start = time.perf_counter()
    result: dict[str, Any] = {"settings": asdict(cfg), "cpu": cpu_name(),
                              "torch": torch.__version__, "datasets": []}  # fmt: skip
    for name in names:
        t0 = time.perf_counter()
        pair = load_pair(name, cfg)
        study = ModelStudy(
            EngineData(pair.train),
            EngineData(pair.held),
            StudyConfig(
                t_grid=DEFAULT_T_GRID,
                queries_per_t=cfg.queries_per_t,
                num_samples=cfg.samples,
                steps=cfg.sample_steps,
                seed=0,
            ),  # fmt: skip
        )
        seeds: dict[str, list[dict[str, Any]]] = {k: [] for k in TARGETS}
        times: dict[str, float] = {"setup": time.perf_counter() - t0, "targets": 0.0, "training": 0.0,
                                   "gradient_variance": 0.0, "study": 0.0}  # fmt: skip
        for seed in cfg.seeds:
            models, spent = train_all(pair, cfg, seed)
            times["targets"] += spent["targets"]
            times["training"] += spent["training"]
            t1 = time.perf_counter()
            gv = gradient_variance(pair, cfg, seed, models["conditional"])
            times["gradient_variance"] += time.perf_counter() - t1
            t1 = time.perf_counter()
            for k, m in models.items():
                fig, rep = measure(pair, study, m, cfg)
                fig["grad_variance"] = gv[k]
                seeds[k].append(fig)
                if plots is not None and k == "conditional" and seed == cfg.seeds[0]:
                    plot_model_study(rep, plots / f"model_study_{name}.png",
                                     data_switch={"t_switch_50": pair.t_switch_50, "t_switch_99": pair.t_switch_99})  # fmt: skip
            times["study"] += time.perf_counter() - t1
            print(f"  {name} seed {seed}: done at {time.perf_counter() - start:.0f} s", flush=True)
        entry: dict[str, Any] = {
            "name": name, "N": pair.train.num_samples, "heldout_N": pair.held.num_samples, "D": pair.train.dim,
            "t_switch_50": pair.t_switch_50, "t_switch_99": pair.t_switch_99, "seconds": times, "targets": {},
        }  # fmt: skip
        for k in TARGETS:
            per = seeds[k]
            agg: dict[str, Any] = {"t": per[0]["t"]}
            for key in per[0]:
                if key in ("t", "switch_train", "switch_heldout"):
                    continue
                agg[key] = _agg([p[key] for p in per])
            agg["grad_variance_seeds"] = [p["grad_variance"] for p in per]
            agg["switch_train_seeds"] = [p["switch_train"] for p in per]
            agg["switch_heldout_seeds"] = [p["switch_heldout"] for p in per]
            entry["targets"][k] = agg
        result["datasets"].append(entry)
        if plots is not None:
            plot(entry, result["settings"], plots / f"training_value_{name}.png")
    result["seconds"] = time.perf_counter() - start
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    ap.add_argument("--seeds", type=int, nargs="+", help="seed set (default 0 1)")
    ap.add_argument("--steps", type=int, help="training steps (default 1000)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: few steps, one seed, small sets")
    ap.add_argument("--threads", type=int, help="torch threads of the engine's calls (default 1)")
    ap.add_argument("--json", help="write the full result here")
    ap.add_argument("--plots", help="directory for the PNGs (training_value_*.png, model_study_*.png)")
    ap.add_argument("--markdown", action="store_true", help="print the docs' tables")
    ap.add_argument("--report", metavar="JSON", help="print the tables (and draw the plots) of a saved result; no run")
    args = ap.parse_args()
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        if args.plots:
            Path(args.plots).mkdir(parents=True, exist_ok=True)
            for ds in saved["datasets"]:
                plot(ds, saved["settings"], Path(args.plots) / f"training_value_{ds['name']}.png")
        print(markdown(saved))
        return
    flush_denormals(True)  # as `floworacle serve` does: denormal arithmetic is microcode-slow on x86
    cfg = QUICK if args.quick else Settings()
    if args.threads:
        cfg = replace(cfg, engine_threads=args.threads)
    torch.set_num_threads(cfg.model_threads)
    if args.seeds:
        cfg = replace(cfg, seeds=tuple(args.seeds))
    if args.steps:
        cfg = replace(cfg, steps=args.steps)
    plots = Path(args.plots) if args.plots else None
    if plots is not None:
        plots.mkdir(parents=True, exist_ok=True)
    print(f"training study: {', '.join(args.datasets)}; {cfg.steps} steps x {len(cfg.seeds)} seeds; CPU "
          f"{cpu_name()!r}, engine {cfg.engine_threads} threads, models {cfg.model_threads}", flush=True)  # fmt: skip
    result = run(args.datasets, cfg, plots)
    for ds in result["datasets"]:
        print(f"{ds['name']}: " + ", ".join(f"{k} {v:.0f} s" for k, v in ds["seconds"].items()))
    print(f"total {result['seconds']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if args.markdown:
        print(markdown(result))


if __name__ == "__main__":
    main()
