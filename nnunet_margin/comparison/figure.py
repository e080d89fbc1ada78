"""The comparison as a figure: one metric against another per method, and the methods' reliability curves."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

import matplotlib.style
from matplotlib.figure import Figure

from .._atomic import atomic_path
from .scores import metric_label
from .statistics import Comparison

if TYPE_CHECKING:
    from ..calibration import CalibrationStats


def _plot_text(text: str) -> str:
    """Text matplotlib shows as written (an even number of "$" would switch to mathtext)."""
    return text.replace("$", r"\$")


def plot_comparison(comparison: Comparison, path: str | os.PathLike,
                    pooled_stats: Mapping[str, CalibrationStats] | None = None, x_metric: str = "dice",
                    y_metric: str = "ece", title: str = "Methods compared") -> None:
    """Write a PNG (atomically): left, ``y_metric`` against ``x_metric`` per method (mean over cases) with the
    bootstrap CIs as bars; right, the top-label reliability curves of each method's pooled `CalibrationStats`
    (bins with voxels), with the diagonal. Methods without pooled statistics are left out of the right panel."""
    x_column, y_column = comparison.column(x_metric), comparison.column(y_metric)
    pooled_stats = dict(pooled_stats or {})
    unknown = sorted(set(pooled_stats) - set(comparison.methods))
    if unknown:
        raise ValueError(f"pooled_stats for {unknown}, which are not methods of the comparison "
                         f"{list(comparison.methods)}")

    # matplotlib's default style, whatever the process set globally (as in calibration/reliability.py)
    with matplotlib.style.context("default"):
        figure = Figure(figsize=(11, 5), layout="constrained")
        figure.suptitle(title)
        scatter_ax, reliability_ax = figure.subplots(1, 2)
        for m, method in enumerate(comparison.methods):
            color = f"C{m % 10}"
            x, y = comparison.mean[m, x_column], comparison.mean[m, y_column]
            if not (math.isnan(x) or math.isnan(y)):
                scatter_ax.plot([x], [y], "o", color=color, label=_plot_text(method))
                scatter_ax.hlines(y, comparison.ci_low[m, x_column], comparison.ci_high[m, x_column], color=color)
                scatter_ax.vlines(x, comparison.ci_low[m, y_column], comparison.ci_high[m, y_column], color=color)
            if method in pooled_stats:
                stats = pooled_stats[method]
                bins = stats.reliability()["top_label"]
                occupied = bins.count > 0
                reliability_ax.plot(bins.confidence[occupied], bins.accuracy[occupied], "o-", color=color,
                                    markersize=3, label=f"{_plot_text(method)} (ECE {stats.compute()['ece']:.4f})")
        level = f"{comparison.confidence_level:.0%}"
        scatter_ax.set(xlabel=f"{metric_label(x_metric)} (mean, {level} CI)",
                       ylabel=f"{metric_label(y_metric)} (mean, {level} CI)",
                       title=f"{metric_label(y_metric)} against {metric_label(x_metric)}")
        scatter_ax.grid(alpha=0.3)
        if scatter_ax.lines:
            scatter_ax.legend(fontsize="small")
        reliability_ax.plot([0, 1], [0, 1], "--", color="gray", linewidth=1)
        reliability_ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
                           title="Top-label reliability (pooled)")
        if pooled_stats:
            reliability_ax.legend(fontsize="small", loc="upper left")
        else:
            reliability_ax.text(0.5, 0.5, "no pooled statistics", ha="center", va="center", color="gray")
        with atomic_path(path) as temporary:
            figure.savefig(temporary, dpi=100)
