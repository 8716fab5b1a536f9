"""PNG plots of the analysis results, drawn with matplotlib's Agg canvas.

Figures are built with ``matplotlib.figure.Figure`` directly (no pyplot), so plotting neither
needs a display nor changes the caller's matplotlib backend or global state.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from floworacle_server.analysis._memorization import MemorizationReport
from floworacle_server.analysis._transition import TransitionCurve

__all__ = ["plot_transition", "plot_ratio_histogram", "plot_copy_grid"]

_DPI = 100


def _save(fig: Figure, path: str | Path) -> None:
    FigureCanvasAgg(fig)
    fig.savefig(str(path), format="png", dpi=_DPI)


def _logit_axis(ax: Axes, t_min: float, t_max: float) -> None:
    # logit scale spreads out both ends of the path, where the switch sits for high / low D
    ax.set_xscale("logit")
    ax.set_xlim(t_min, t_max)
    ticks = [v for v in (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 0.999) if t_min <= v <= t_max]
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{v:g}" for v in ticks], fontsize=7)
    ax.minorticks_off()
    ax.set_xlabel("t  (0 = noise, 1 = data)")
    ax.grid(True, alpha=0.3)


def plot_transition(curves: Sequence[TransitionCurve], path: str | Path, title: str = "") -> None:
    """Four panels against t: top-1 weight (mean and 10-90% band, switch times marked), entropy,
    effective sample size and the oracle-vs-conditional target gap; one line per curve."""
    if not curves:
        raise ValueError("nothing to plot: no transition curves")
    fig = Figure(figsize=(11, 7.5))
    axes = fig.subplots(2, 2)
    t_lo = min(float(c.t[c.t > 0].min()) for c in curves)
    t_hi = max(float(c.t[c.t < 1].max()) for c in curves)
    colors, styles = _styles(curves)
    marks = len(curves) <= 4  # more switch markers than that only clutter; the legend has the values
    panels = (
        ("top1", "top-1 posterior weight", "linear"),
        ("entropy", "posterior entropy (nats)", "linear"),
        ("ess", "effective sample size 1/sum gamma^2", "log"),
        ("gap", "||u_oracle - u_cond||^2 / D", "log"),
    )
    for ax, (metric, ylabel, yscale) in zip(axes.flat, panels, strict=True):
        for c, color, style in zip(curves, colors, styles, strict=True):
            keep = (c.t > 0) & (c.t < 1)
            t = c.t[keep]
            s = c.stats[metric]
            label = c.name
            if metric == "top1":
                label = (
                    f"{c.name}: t50={_fmt_se(c.t_switch_50, c, 't_switch_50')}, "
                    f"t99={_fmt_se(c.t_switch_99, c, 't_switch_99')}"
                )
            ax.plot(t, s["mean"][keep], color=color, ls=style, lw=1.6, label=label)
            alpha = 0.18 if len(curves) <= 4 else 0.08
            lo, hi = s["q10"][keep], s["q90"][keep]
            if yscale == "log":
                lo, hi = np.maximum(lo, 1e-300), np.maximum(hi, 1e-300)
            ax.fill_between(t, lo, hi, color=color, alpha=alpha, lw=0)
            if metric == "top1" and marks:
                for key, ts, ls in (("t_switch_50", c.t_switch_50, ":"), ("t_switch_99", c.t_switch_99, "--")):
                    if ts is not None and t_lo <= ts <= t_hi:
                        ax.axvline(ts, color=color, ls=ls, lw=0.9)
                        u = c.uncertainty.get(key)
                        if u is not None and u.lo is not None:  # the switch's 95 % interval
                            ax.axvspan(u.lo, u.hi if u.hi is not None else t_hi, color=color, alpha=0.12, lw=0)
        _logit_axis(ax, t_lo, t_hi)
        ax.set_yscale(yscale)
        ax.set_ylabel(ylabel)
        if metric == "top1":
            ax.set_ylim(-0.02, 1.02)
            ax.axhline(0.5, color="0.6", lw=0.6, ls=":")
            ax.axhline(0.99, color="0.6", lw=0.6, ls="--")
            # the lower right is empty: every curve that switches ends at 1 on the data side
            ax.legend(fontsize=6.5 if len(curves) > 4 else 8, loc="lower right")
        if metric == "gap":
            # below ~1e-10 of the peak the gap is float64 round-off, not a signal
            top = max(float(np.max(c.stats["gap"]["q90"])) for c in curves)
            if top > 0:
                ax.set_ylim(bottom=1e-10 * top)
    fig.suptitle(title or "navigation -> refinement: the oracle's posterior along the path (mean, 10-90% band)")
    fig.tight_layout()
    _save(fig, path)


def plot_ratio_histogram(report: MemorizationReport, path: str | Path, title: str = "") -> None:
    """Histogram of d1 / d2 with the copy threshold as a vertical line."""
    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    bins = np.linspace(0.0, 1.0, 51)
    ax.hist(np.clip(report.ratio, 0.0, 1.0), bins=bins.tolist(), color="#4472c4", alpha=0.85)
    ax.axvline(report.threshold, color="#c00000", lw=1.5, ls="--", label=f"threshold {report.threshold:.3g}")
    ax.set_xlabel("d1 / d2  (nearest / second-nearest training distance)")
    ax.set_ylabel("generated samples")
    ax.set_title(title or f"memorisation: {100 * report.copy_fraction:.1f}% of {report.d1.size} samples are copies")
    ax.legend()
    fig.tight_layout()
    _save(fig, path)


def _as_image(v: np.ndarray, shape: tuple[int, ...], lo: float, hi: float) -> np.ndarray:
    img = (v.reshape(shape) - lo) / (hi - lo if hi > lo else 1.0)
    img = np.clip(img, 0.0, 1.0)
    if len(shape) == 3:
        img = img[0] if shape[0] == 1 else np.transpose(img, (1, 2, 0))
    return img


def plot_copy_grid(
    samples: np.ndarray,
    first: np.ndarray,
    second: np.ndarray,
    report: MemorizationReport,
    order: np.ndarray,
    shape: tuple[int, ...],
    path: str | Path,
) -> None:
    """Columns of (generated sample, nearest, second-nearest training image) with d1/d2 on top.

    Args:
        samples, first, second: (K, D) the shown samples and their two nearest training samples.
        report: the report (for ratios and flags); ``order`` (K,) maps columns to sample indices.
        shape: (H, W) or (C, H, W).
    """
    k = samples.shape[0]
    allv = np.concatenate([samples, first, second])
    lo, hi = float(np.quantile(allv, 0.001)), float(np.quantile(allv, 0.999))
    fig = Figure(figsize=(max(4.0, 1.1 * k), 3.9))
    axes = np.asarray(fig.subplots(3, k, squeeze=False))
    gray = len(shape) == 2 or shape[0] == 1
    for j in range(k):
        i = int(order[j])
        for r, (row, who) in enumerate(((samples, f"#{i}"), (first, "nearest"), (second, "2nd"))):
            ax = axes[r, j]
            ax.imshow(_as_image(row[j], shape, lo, hi), cmap="gray" if gray else None, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(("generated", "nearest", "2nd nearest")[r], fontsize=8)
            if r == 0:
                color = "#c00000" if report.copy[i] else "black"
                ax.set_title(f"{who}\nr={report.ratio[i]:.2f}", fontsize=7, color=color)
            elif r == 1:
                ax.set_title(f"d1={report.d1[i]:.2f}", fontsize=6)
    fig.suptitle("generated samples (lowest d1/d2 first; red = copy) and their nearest training samples", fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def _styles(curves: Sequence[TransitionCurve]) -> tuple[list[Any], list[str]]:
    """Colours and line styles: for an (N, D) sweep, colour by D and line style by N; else a palette."""
    from matplotlib import colormaps

    dims = sorted({c.dim for c in curves})
    sizes = sorted({c.num_samples for c in curves})
    tab = colormaps["tab10"]
    pairs = {(c.num_samples, c.dim) for c in curves}
    if len(curves) > 1 and len(pairs) == len(curves) and len(dims) <= 10 and 1 < len(sizes) <= 4:
        lines = ["-", "--", ":", "-."]
        return [tab(dims.index(c.dim)) for c in curves], [lines[sizes.index(c.num_samples)] for c in curves]
    n = len(curves)
    cmap = colormaps["tab10" if n <= 10 else "viridis"]
    colors = [cmap(i) if n <= 10 else cmap(i / max(1, n - 1)) for i in range(n)]
    return colors, ["-"] * n


def _fmt(v: float | None) -> str:
    return "never" if v is None else f"{v:.3f}"


def _fmt_se(v: float | None, curve: TransitionCurve, key: str) -> str:
    u = curve.uncertainty.get(key)
    return _fmt(v) if v is None or u is None or u.se is None else f"{v:.3f}+-{u.se:.3f}"
