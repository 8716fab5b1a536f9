"""PNG histogram of the feature-space memorisation test: generated samples beside the train-to-train baseline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from floworacle_server.analysis._memorization import FeatureMemorizationReport
from floworacle_server.analysis._plots import _save

__all__ = ["plot_feature_histogram"]


def plot_feature_histogram(report: FeatureMemorizationReport, path: str | Path, title: str = "") -> None:
    """Top-1 similarity (cosine) or feature d1/d2 (l2) of generated samples and of the baseline, as densities."""
    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    if report.metric == "cosine":
        gen, base = report.score, report.baseline_score
        lo = float(min(gen.min(initial=1.0), base.min(initial=1.0), report.threshold))
        bins = np.linspace(max(-1.0, lo - 0.02), 1.0, 61)
        xlabel = "top-1 cosine similarity to the training features"
    else:
        gen, base = report.ratio, report.baseline_ratio
        bins = np.linspace(0.0, 1.0, 51)
        xlabel = "d1 / d2 in the feature space"
    ax.hist(np.clip(base, bins[0], bins[-1]), bins=bins.tolist(), density=True, color="#a5a5a5", alpha=0.7,
            label=f"train-to-train baseline ({base.size})")  # fmt: skip
    ax.hist(np.clip(gen, bins[0], bins[-1]), bins=bins.tolist(), density=True, color="#4472c4", alpha=0.7,
            label=f"generated ({gen.size})")  # fmt: skip
    ax.axvline(report.threshold, color="#c00000", lw=1.5, ls="--", label=f"threshold {report.threshold:.3g}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    share = 100 * float(report.flagged.mean()) if report.flagged.size else 0.0
    base_share = 100 * float(report.baseline_flagged.mean()) if report.baseline_flagged.size else 0.0
    ax.set_title(title or f"{report.rule}: {share:.1f}% of generated, {base_share:.1f}% of the baseline")
    ax.legend()
    fig.tight_layout()
    _save(fig, path)
