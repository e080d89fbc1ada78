"""Reliability diagrams of a `CalibrationStats` (matplotlib, Agg backend, no display needed)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import matplotlib.style
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .._atomic import atomic_path
from .stats import CalibrationStats, ReliabilityBins


def _draw_panel(ax: Axes, count_ax: Axes, bins: ReliabilityBins, title: str, ece: float) -> None:
    """Accuracy bars per bin with mean confidence markers and the diagonal; the bin counts below (log scale)."""
    width = np.diff(bins.edges)
    ax.bar(bins.edges[:-1], np.nan_to_num(bins.accuracy), width=width, align="edge", color="tab:blue", alpha=0.7,
           edgecolor="white", label="accuracy")
    ax.plot(bins.centers, bins.confidence, "o", color="tab:red", markersize=3, label="mean confidence")
    ax.plot([0, 1], [0, 1], "--", color="gray", linewidth=1)
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title=f"{title}  (ECE {ece:.4f})")
    ax.tick_params(labelbottom=False)

    count_ax.bar(bins.edges[:-1], bins.count, width=width, align="edge", color="gray", edgecolor="white")
    count_ax.set(xlim=(0, 1), xlabel="confidence", ylabel="voxels")
    if bins.count.any():
        count_ax.set_yscale("log")


def plot_reliability_diagram(stats: CalibrationStats, path: str | os.PathLike,
                             class_names: Sequence[str] | None = None,
                             title: str = "Reliability diagram") -> None:
    """Write a PNG with one panel for the top label and one per class (p_k against 1[y == k]); atomic write."""
    names = list(class_names) if class_names is not None else [f"class {k}" for k in range(stats.num_classes)]
    if len(names) != stats.num_classes:
        raise ValueError(f"got {len(names)} class names for {stats.num_classes} classes")
    metrics = stats.compute()
    curves = stats.reliability()
    panels = [(curves["top_label"], "top label", metrics["ece"])]
    panels += [(bins, name, ece) for bins, name, ece in zip(curves["classes"], names, metrics["class_ece"])]

    columns = math.ceil(math.sqrt(len(panels)))  # a roughly square grid, also for K > 100
    rows = math.ceil(len(panels) / columns)
    # matplotlib's default style, whatever the process set globally (nnU-Net's progress plot sets seaborn's)
    with matplotlib.style.context("default"):
        figure = Figure(figsize=(4 * columns, 4.2 * rows), layout="constrained")
        figure.suptitle(f"{title}  ({metrics['num_voxels']} voxels)")
        grid = figure.add_gridspec(2 * rows, columns, height_ratios=[3, 1] * rows)
        for index, (bins, name, ece) in enumerate(panels):
            row, column = divmod(index, columns)
            ax = figure.add_subplot(grid[2 * row, column])
            _draw_panel(ax, figure.add_subplot(grid[2 * row + 1, column], sharex=ax), bins, name, ece)
            if index == 0:
                ax.legend(loc="upper left", fontsize="x-small")
        with atomic_path(path) as temporary:
            figure.savefig(temporary, dpi=100)
