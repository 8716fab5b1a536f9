"""The oracle kinds side by side: samples of each kind's ODE and how many of them copy the data.

Every kind of oracle (global, local, equivariant local, linear; :mod:`floworacle_server.engine`)
is a velocity field ``u = A_t x1_hat + B_t x_t``; integrated from noise with
:func:`floworacle.sampling.integrate` it gives samples. The exact (global) oracle's samples are
copies of training samples (its posterior collapses onto one); the kinds that generalise make
new ones (Kamb & Ganguli 2025: patch mosaics of the training set; the Gaussian's: smooth blends).
For each kind the memorisation test of :mod:`._memorization` (nearest and second-nearest training
sample, a copy when d1 / d2 < 1/3) gives the share of copies.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from floworacle.paths import Path as ProbPath
from floworacle.paths import get_path
from floworacle.sampling import integrate
from floworacle.study import PatchSize, text_table
from floworacle_server.analysis._memorization import DEFAULT_THRESHOLD, MemorizationReport, memorization_report
from floworacle_server.data import Dataset
from floworacle_server.engine import KINDS, PATCH_KINDS, OracleQuery, kind_oracle, patch_schedule

__all__ = ["KindSamples", "kind_velocity", "sample_kinds", "kinds_json", "plot_kind_grid"]


@dataclass
class KindSamples:
    """Samples of one kind's ODE and their memorisation report.

    Attributes:
        kind: the oracle kind.
        samples: (S, D) float64 end points of the ODE.
        report: nearest training samples and copy flags (:func:`memorization_report`).
        seconds: wall time of the sampling.
        evaluations: oracle queries answered (S times the solver's evaluations).
    """

    kind: str
    samples: np.ndarray
    report: MemorizationReport
    seconds: float
    evaluations: int


def kind_velocity(
    ds: Dataset,
    kind: str,
    path: ProbPath,
    *,
    patch_size: PatchSize | None = None,
    labels: np.ndarray | None = None,
) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """``(x_t (B, D), t (B,)) -> u (B, D)``, the oracle velocity of ``kind`` on ``path``, for
    :func:`floworacle.sampling.integrate` (float64 numpy in and out). ``patch_size``: one P or a
    schedule of ``(t_start, P)`` pairs (the patch kinds; per query by its t)."""
    if kind not in KINDS:
        raise ValueError(f"unknown oracle kind {kind!r}; use one of {', '.join(KINDS)}")
    if kind in PATCH_KINDS and patch_size is None:
        raise ValueError(f"kind {kind!r} needs a patch size")
    lab = None if labels is None else torch.from_numpy(np.asarray(labels, dtype=np.int64))

    def velocity(x: np.ndarray, t: np.ndarray) -> np.ndarray:
        b = x.shape[0]
        tt = np.asarray(t, dtype=np.float64).reshape(b)
        q = OracleQuery(
            x_t=torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64).reshape(b, -1)),
            coeffs=path.coefficients(tt),
            labels=lab,
            outputs=("velocity",),
        )
        sizes = None
        if kind in PATCH_KINDS:
            assert patch_size is not None
            sizes = patch_schedule(tt, patch_size)
        u = kind_oracle(ds, q, kind, patch_size=sizes).velocity
        assert u is not None
        return u.cpu().numpy().reshape(x.shape)

    return velocity


def sample_kinds(
    ds: Dataset,
    kinds: Sequence[str] = KINDS,
    *,
    num_samples: int = 32,
    steps: int = 20,
    method: str = "euler",
    shift: float = 1.0,
    path: str = "linear",
    patch_size: PatchSize = 3,
    seed: int = 0,
    threshold: float = DEFAULT_THRESHOLD,
    progress: Callable[[str], Any] | None = None,
) -> dict[str, KindSamples]:
    """Samples of every kind from the same noise, and their memorisation reports.

    Raises:
        ValueError: an unknown kind, a patch kind on data without an image shape, bad sampler
            settings (the messages say how to fix them).
    """
    if num_samples < 1:
        raise ValueError(f"--samples must be >= 1, got {num_samples}")
    prob = get_path(path)
    x0 = np.random.default_rng([seed, 23]).standard_normal((num_samples, ds.dim))
    evals_per = {"euler": 1, "midpoint": 2, "heun": 2}.get(method, 1) * steps
    out: dict[str, KindSamples] = {}
    for kind in kinds:
        if progress is not None:
            progress(kind)
        v = kind_velocity(ds, kind, prob, patch_size=patch_size if kind in PATCH_KINDS else None)
        start = time.perf_counter()
        samples = integrate(v, x0.copy(), steps=steps, method=method, shift=shift)
        seconds = time.perf_counter() - start
        report = memorization_report(ds, samples, threshold)
        out[kind] = KindSamples(kind, np.asarray(samples), report, seconds, evals_per * num_samples)
    return out


def kinds_json(results: dict[str, KindSamples], ds: Dataset, **info: Any) -> dict[str, Any]:
    """The comparison as a JSON-ready dict: per kind the copy share, distances and timing."""
    return {
        "kind": "oracle_kinds",
        "dataset": ds.name,
        "fingerprint": ds.fingerprint,
        "N": ds.num_samples,
        "D": ds.dim,
        **info,
        "kinds": {
            k: {
                "num_samples": int(r.samples.shape[0]),
                "copies": int(r.report.copy.sum()),
                "copy_fraction": r.report.copy_fraction,
                "threshold": r.report.threshold,
                "median_ratio": float(np.median(r.report.ratio)),
                "mean_d1": float(r.report.d1.mean()),
                "seconds": r.seconds,
                "evaluations": r.evaluations,
            }
            for k, r in results.items()
        },
    }


def kinds_table(results: dict[str, KindSamples]) -> str:
    """Plain-text table: kind, samples, copies, copy share, median d1/d2, mean d1, seconds."""
    head = ("kind", "samples", "copies", "copy share", "median d1/d2", "mean d1", "seconds")
    rows = [head]
    for k, r in results.items():
        rows.append(
            (
                k,
                str(r.samples.shape[0]),
                str(int(r.report.copy.sum())),
                f"{r.report.copy_fraction:.3f}",
                f"{float(np.median(r.report.ratio)):.3f}",
                f"{float(r.report.d1.mean()):.3f}",
                f"{r.seconds:.1f}",
            )
        )
    return text_table(rows)


def plot_kind_grid(
    results: dict[str, KindSamples],
    ds: Dataset,
    shape: tuple[int, ...],
    path: str | Path,
    count: int = 10,
    title: str = "",
) -> None:
    """PNG: per kind a row of samples and below it their nearest training samples (red title:
    a copy, d1 / d2 < threshold). ``shape``: (H, W) or (C, H, W)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from floworacle_server.analysis._memorization import training_rows

    kinds = list(results)
    k = min(count, min(r.samples.shape[0] for r in results.values()))
    fig = Figure(figsize=(1.0 * k + 1.2, 2.1 * len(kinds) + 0.6))
    axes = np.asarray(fig.subplots(2 * len(kinds), k, squeeze=False))
    gray = len(shape) == 2 or shape[0] == 1
    for row, kind in enumerate(kinds):
        r = results[kind]
        near = training_rows(ds, r.report.nearest[:k, 0])
        for j in range(k):
            for sub, (img, label) in enumerate(((r.samples[j], kind), (near[j], "nearest"))):
                ax = axes[2 * row + sub, j]
                v = img.reshape(shape)
                lo, hi = -1.0, 1.0
                if float(v.min()) < -1.5 or float(v.max()) > 1.5:  # data not in [-1, 1]: its own range
                    lo, hi = float(v.min()), float(v.max())
                pic = np.clip((v - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
                if len(shape) == 3:
                    pic = pic[0] if shape[0] == 1 else np.transpose(pic, (1, 2, 0))
                ax.imshow(pic, cmap="gray" if gray else None, vmin=0, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
                if j == 0:
                    ax.set_ylabel(label, fontsize=8)
                if sub == 0:
                    color = "#c00000" if r.report.copy[j] else "black"
                    ax.set_title(f"r={r.report.ratio[j]:.2f}", fontsize=7, color=color)
        axes[2 * row, 0].set_ylabel(f"{kind}\n{r.report.copy_fraction:.0%} copies", fontsize=8)
    fig.suptitle(title or f"samples of each oracle kind on {ds.name} (row below: nearest training sample)", fontsize=9)
    fig.tight_layout()
    FigureCanvasAgg(fig)
    fig.savefig(str(path), format="png", dpi=100)
