"""`nnunet-margin compare`: the papers' table of methods from their calibration reports (calibration.json).

A method is a folder: a trained model folder TRAINER__PLANS__CONFIGURATION (the cases of every
fold_X/validation/calibration.json: its cross-validation), a fold or validation folder, or a prediction folder with
a calibration.json (`nnunet-margin calibration`). `NAME=FOLDER` names it; otherwise it is named after its trainer,
or the folder. Per case, the report's scores become one value per metric (docs/methods.md 5):

* segmentation: `dice`, `hd95`, `asd` (mean over the foreground classes defined for the case) and per class
  (`dice/<class>`, ...);
* calibration in the foreground scope (the papers' convention): `ece`, `classwise_ece`, `ace`, `classwise_ace`,
  `mce`, `brier`, `nll`, and `classwise_ece/<class>`; in the boundary and crop scopes the same with the prefix
  `boundary_` or `crop_`.

`nnunet_margin.comparison` turns them into means, standard deviations, ranks, bootstrap confidence
intervals and Wilcoxon tests; `write_comparison` writes report.md, table.csv, table.tex and compare.png.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from functools import reduce
from operator import add
from pathlib import Path
from typing import Any

from .._atomic import atomic_path
from .layout import split_model_folder_name
from ..calibration import CalibrationStats
from ..comparison import (METRIC_DIRECTIONS, CaseScores, Comparison, compare_methods, csv_table, latex_table,
                          markdown_report, markdown_table, plot_comparison)

REPORT_FILE = "calibration.json"
CALIBRATION_METRICS = ("ece", "classwise_ece", "ace", "classwise_ace", "mce", "brier", "nll")
SEGMENTATION_METRICS = ("dice", "hd95", "asd")
SCOPE_PREFIXES = {"foreground": "", "boundary": "boundary_", "crop": "crop_"}
# The columns of the printed table (all metrics go to table.csv).
TABLE_METRICS = ("dice", "hd95", "asd", "ece", "classwise_ece", "ace", "classwise_ace", "boundary_ece",
                 "boundary_classwise_ece", "brier", "nll")

PathLike = str | os.PathLike


@dataclass
class MethodReports:
    """The calibration reports of one method and their per-case scores."""

    name: str
    reports: list[Path]
    scores: dict[str, dict[str, float | None]] = field(default_factory=dict)
    pooled: CalibrationStats | None = None  # foreground scope, for the reliability curves


def find_reports(folder: Path) -> list[Path]:
    """calibration.json of a folder, or of every validation folder below it."""
    if (folder / REPORT_FILE).is_file():
        return [folder / REPORT_FILE]
    found = sorted(folder.glob(f"**/validation/{REPORT_FILE}"))
    if not found:
        raise FileNotFoundError(f"no {REPORT_FILE} in {folder} nor in any validation folder below it: train with a "
                                f"plugin trainer, or run `nnunet-margin calibration` on the predictions first")
    return found


def method_name(folder: Path) -> str:
    """The trainer of a model folder (TRAINER__PLANS__CONF), also from its fold and validation folders."""
    for candidate in (folder, folder.parent, folder.parent.parent):
        parts = split_model_folder_name(candidate.name)
        if parts is not None:
            return parts[0]
    return folder.name


def read_report(path: Path) -> dict[str, Any]:
    try:
        report = json.loads(path.read_text())
        report["metric_per_case"], report["class_names"]  # the keys every report has
        return report
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a readable calibration report ({error}); rerun the validation or "
                         f"`nnunet-margin calibration` that wrote it") from None


def _mean_defined(values) -> float | None:
    defined = [value for value in values if value is not None and not math.isnan(value)]
    return sum(defined) / len(defined) if defined else None


def case_scores(report: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """{case: {metric: value}} of one report (see the module docstring for the metric names)."""
    names = report["class_names"]
    scores = {}
    for case, entry in report["metric_per_case"].items():
        values: dict[str, float | None] = {}
        for scope, prefix in SCOPE_PREFIXES.items():
            if scope in entry:
                values.update({prefix + metric: entry[scope].get(metric) for metric in CALIBRATION_METRICS})
        if "foreground" in entry:
            values.update({f"classwise_ece/{name}": value
                           for name, value in zip(names, entry["foreground"]["class_ece"])})
        for metric, per_class in entry.get("segmentation", {}).items():
            values[metric] = _mean_defined(per_class.values())
            values.update({f"{metric}/{name}": value for name, value in per_class.items()})
        scores[case] = values
    return scores


def load_method(argument: str) -> MethodReports:
    """`FOLDER` or `NAME=FOLDER` -> its reports, per-case scores and pooled foreground statistics."""
    name, separator, folder = argument.rpartition("=")
    folder = Path(folder if separator else argument)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: pass a model, fold, validation or prediction folder")
    method = MethodReports(name if separator else method_name(folder), find_reports(folder))
    pooled = []
    for path in method.reports:
        report = read_report(path)
        overlap = set(method.scores) & set(report["metric_per_case"])
        if overlap:
            raise ValueError(f"{path} repeats case(s) {sorted(overlap)[:3]} of another report of {method.name}; pass "
                             f"each fold's or test set's folder once")
        method.scores.update(case_scores(report))
        if "foreground" in report.get("pooled_state", {}):
            pooled.append(CalibrationStats.from_dict(report["pooled_state"]["foreground"]))
    method.pooled = reduce(add, pooled) if pooled else None
    return method


def metric_directions(metrics) -> dict[str, str]:
    """Directions of the scope-prefixed metrics (those of the plain metric)."""
    directions = {}
    for metric in metrics:
        for prefix in SCOPE_PREFIXES.values():
            base = metric.split("/", 1)[0]
            if prefix and base.startswith(prefix) and base[len(prefix):] in METRIC_DIRECTIONS:
                directions[metric] = METRIC_DIRECTIONS[base[len(prefix):]]
    return directions


def compare(arguments: list[str], baseline: str | None = None) -> tuple[Comparison, list[MethodReports]]:
    """The comparison of the methods named by `arguments` (FOLDER or NAME=FOLDER each)."""
    methods = [load_method(argument) for argument in arguments]
    names = [method.name for method in methods]
    if len(set(names)) != len(names):
        raise ValueError(f"two methods are called the same ({names}): name them with NAME=FOLDER")
    nested = {method.name: method.scores for method in methods}
    metrics = {metric for scores in nested.values() for case in scores.values() for metric in case}
    scores = CaseScores.from_nested(nested, metric_directions(metrics))
    return compare_methods(scores, baseline=baseline), methods


def table_metrics(comparison: Comparison) -> list[str]:
    return [metric for metric in TABLE_METRICS if metric in comparison.metrics]


def write_comparison(comparison: Comparison, methods: list[MethodReports], output_folder: PathLike,
                     preamble: str = "") -> None:
    """report.md (tables with their sources), table.csv (every metric), table.tex and compare.png, atomically."""
    output_folder = Path(output_folder)
    sources = "\n".join(f"- {method.name}: " + ", ".join(str(path) for path in method.reports) for method in methods)
    files = {
        "report.md": f"{preamble}{markdown_report(comparison)}\nSources:\n{sources}\n",
        "table.csv": csv_table(comparison),
        "table.tex": latex_table(comparison, table_metrics(comparison)),
    }
    for name, content in files.items():
        with atomic_path(output_folder / name) as temporary:
            temporary.write_text(content)
    if "dice" in comparison.metrics and "ece" in comparison.metrics:
        plot_comparison(comparison, output_folder / "compare.png",
                        {method.name: method.pooled for method in methods if method.pooled is not None})


def printed_table(comparison: Comparison) -> str:
    return markdown_table(comparison, table_metrics(comparison))
