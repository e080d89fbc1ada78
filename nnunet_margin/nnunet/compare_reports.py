"""`nnunet-margin compare`: the papers' table of methods from the calibration reports (calibration.json) in folders.

A method is a folder: a trained model folder TRAINER__PLANS__CONFIGURATION (the cases of every
fold_X/validation/calibration.json: its cross-validation), a fold or validation folder, or a prediction folder with
a calibration.json (`nnunet-margin calibration`). `NAME=FOLDER` names it; otherwise it is named after its trainer,
or the folder. Per case, the report's scores become one value per metric (docs/methods.md 5):

* segmentation: `dice`, `hd95`, `asd` (mean over the foreground classes defined for the case) and per class
  (`dice/<class>`, ...);
* calibration in the foreground scope (the papers' convention): `ece`, `classwise_ece`, `ace`, `classwise_ace`,
  `mce`, `brier`, `nll`, and `classwise_ece/<class>`; in the boundary and crop scopes the same with the prefix
  `boundary_` or `crop_`.

Methods must be evaluated on the same cases, per metric family (the calibration metrics: every case of the
reports; the segmentation metrics: the cases with a segmentation): otherwise their means are not comparable and
`compare` refuses, naming the methods and cases, unless `common_cases` restricts every method to the cases all of
them have (the report then says which cases were left out). `nnunet_margin.comparison` turns the scores into
means, standard deviations, ranks, bootstrap confidence intervals and Wilcoxon tests; `write_comparison` writes
report.md, table.csv, table.tex and compare.png. Reports with a failure-detection section (prediction folders of
`nnunet-margin predict`) add the methods' failure detection per confidence score: a section of report.md and
failure_detection.csv (`failure_comparison`); methods without scores show n/a there.
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
from ..calibration import CalibrationStats
from ..comparison import (METRIC_DIRECTIONS, CaseScores, Comparison, FailureComparison, FailureScores,
                          compare_failure_detection, compare_methods, csv_table, failure_csv, failure_report,
                          failure_table, latex_table, markdown_report, markdown_table, plot_comparison)
from .calibration_report import REPORT_FILE
from .failure_report import read_failure_scores
from .layout import VALIDATION_FOLDER, split_model_folder_name

CALIBRATION_METRICS = ("ece", "classwise_ece", "ace", "classwise_ace", "mce", "brier", "nll")
SEGMENTATION_METRICS = ("dice", "hd95", "asd")
SCOPE_PREFIXES = {"foreground": "", "boundary": "boundary_", "crop": "crop_"}
# The metric families whose cases must agree between methods, and how messages name them.
FAMILIES = {"calibration": "cases", "segmentation": "cases with segmentation metrics (Dice, HD95, ASD)"}
# The columns of the printed table (all metrics go to table.csv).
TABLE_METRICS = ("dice", "hd95", "asd", "ece", "classwise_ece", "ace", "classwise_ace", "boundary_ece",
                 "boundary_classwise_ece", "brier", "nll")
FAILURE_CSV = "failure_detection.csv"

PathLike = str | os.PathLike


@dataclass
class MethodReports:
    """The calibration reports of one method, their per-case scores and the cases of each metric family."""

    name: str
    reports: list[Path]
    scores: dict[str, dict[str, float | None]] = field(default_factory=dict)
    cases: dict[str, set[str]] = field(default_factory=lambda: {family: set() for family in FAMILIES})
    left_out: dict[str, list[str]] = field(default_factory=dict)  # family -> cases dropped by `common_cases`
    pooled: CalibrationStats | None = None  # foreground scope, for the reliability curves
    failure: FailureScores | None = None  # None unless every report has a failure-detection section


def find_reports(folder: Path) -> list[Path]:
    """calibration.json of a folder, or of every validation folder below it."""
    if (folder / REPORT_FILE).is_file():
        return [folder / REPORT_FILE]
    found = sorted(folder.glob(f"**/{VALIDATION_FOLDER}/{REPORT_FILE}"))
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


def _is_value(value: Any) -> bool:
    return value is None or isinstance(value, (int, float)) and not isinstance(value, bool)


def _report_problem(report: Any) -> str | None:
    """What makes `report` no calibration report (None if its structure is one)."""
    if not isinstance(report, dict):
        return f"it holds a JSON {type(report).__name__}, not an object"
    names = report.get("class_names")
    if not isinstance(names, list) or not names or not all(isinstance(name, str) for name in names):
        return "'class_names' is not a list of class names"
    cases = report.get("metric_per_case")
    if not isinstance(cases, dict) or not cases:
        return "'metric_per_case' is not an object of cases"
    for case, entry in cases.items():
        if not isinstance(entry, dict):
            return f"case {case!r} is a {type(entry).__name__}, not an object"
        for scope in SCOPE_PREFIXES:
            metrics = entry.get(scope, {})
            if not isinstance(metrics, dict) or not all(_is_value(metrics.get(name)) for name in CALIBRATION_METRICS):
                return f"case {case!r}: the {scope} metrics are not numbers"
        class_ece = entry.get("foreground", {}).get("class_ece", [None] * len(names))
        if not isinstance(class_ece, list) or len(class_ece) != len(names) or not all(map(_is_value, class_ece)):
            return f"case {case!r}: 'class_ece' is not one number per class"
        segmentation = entry.get("segmentation", {})
        if not isinstance(segmentation, dict) or not all(
                isinstance(per_class, dict) and all(map(_is_value, per_class.values()))
                for per_class in segmentation.values()):
            return f"case {case!r}: 'segmentation' is not {{metric: {{class: value}}}}"
    if not isinstance(report.get("pooled_state", {}), dict):
        return "'pooled_state' is not an object"
    return None


def read_report(path: Path) -> dict[str, Any]:
    """A calibration report, refused with a message naming the file and what is wrong with it."""
    fix = "rerun the validation or `nnunet-margin calibration` that wrote it"
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable calibration report ({type(error).__name__}: {error}): it is "
                         f"truncated or corrupt; {fix}") from None
    problem = _report_problem(report)
    if problem is not None:
        raise ValueError(f"{path} is not a readable calibration report: {problem}; {fix}")
    return report


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


def _pooled_foreground(path: Path, report: dict[str, Any]) -> CalibrationStats | None:
    state = report.get("pooled_state", {}).get("foreground")
    if state is None:
        return None
    try:
        return CalibrationStats.from_dict(state)
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{path} is not a readable calibration report: its pooled foreground statistics are "
                         f"invalid ({type(error).__name__}: {error}); rerun the validation or `nnunet-margin "
                         f"calibration` that wrote it") from None


def load_method(argument: str) -> MethodReports:
    """`FOLDER` or `NAME=FOLDER` -> its reports, per-case scores, case sets and pooled foreground statistics."""
    name, separator, folder = argument.rpartition("=")
    folder = Path(folder if separator else argument)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: pass a model, fold, validation or prediction folder")
    method = MethodReports(name if separator else method_name(folder), find_reports(folder))
    pooled, failure = [], []
    for path in method.reports:
        report = read_report(path)
        overlap = set(method.scores) & set(report["metric_per_case"])
        if overlap:
            raise ValueError(f"{path} repeats case(s) {sorted(overlap)[:3]} of another report of {method.name}; pass "
                             f"each fold's or test set's folder once")
        method.scores.update(case_scores(report))
        method.cases["calibration"].update(report["metric_per_case"])
        method.cases["segmentation"].update(case for case, entry in report["metric_per_case"].items()
                                            if entry.get("segmentation"))
        pooled.append(_pooled_foreground(path, report))
        failure.append(read_failure_scores(path, report))
    method.pooled = reduce(add, pooled) if pooled and None not in pooled else None
    method.failure = FailureScores.combined(failure) if None not in failure else None
    return method


def _case_list(cases: list[str], limit: int = 5) -> str:
    return ", ".join(cases[:limit]) + (f" and {len(cases) - limit} more" if len(cases) > limit else "")


def case_set_differences(methods: list[MethodReports]) -> list[str]:
    """Per metric family whose cases differ between the methods, which method lacks which cases (empty if every
    method has the same cases)."""
    differences = []
    for family, label in FAMILIES.items():
        union = set().union(*(method.cases[family] for method in methods))
        lacking = [f"{method.name} lacks {_case_list(sorted(union - method.cases[family]))}" for method in methods
                   if union - method.cases[family]]
        if lacking:
            differences.append(f"{label}: " + ", ".join(lacking))
    return differences


def restrict_to_common_cases(methods: list[MethodReports]) -> None:
    """Drop from every method the cases (per metric family) that not all methods have, recording them in
    `left_out`; a method that lost cases loses its reliability curve (it pools every case of its reports), and its
    failure detection is recomputed on the cases kept."""
    for family in FAMILIES:
        if family == "segmentation":
            for method in methods:
                method.cases[family] &= method.cases["calibration"]
        common = set.intersection(*(method.cases[family] for method in methods))
        for method in methods:
            dropped = sorted(method.cases[family] - common)
            if not dropped:
                continue
            method.left_out[family] = dropped
            method.cases[family] = set(common)
            if family == "calibration" and method.failure is not None:
                method.failure = method.failure.restricted(common)
            for case in dropped:
                if family == "calibration":
                    del method.scores[case]
                    method.pooled = None
                else:
                    method.scores[case] = {metric: value for metric, value in method.scores[case].items()
                                           if metric.split("/", 1)[0] not in SEGMENTATION_METRICS}


def common_cases_note(methods: list[MethodReports]) -> str:
    """What `restrict_to_common_cases` left out, for the report ("" if nothing)."""
    left_out = [f"{method.name}: " + "; ".join(f"{_case_list(cases)} ({FAMILIES[family]})"
                                               for family, cases in method.left_out.items())
                for method in methods if method.left_out]
    if not left_out:
        return ""
    curves = [method.name for method in methods if "calibration" in method.left_out]
    return ("Compared on the cases all methods have (--common-cases); left out: " + ". ".join(left_out) + "."
            + (f" No reliability curve for {', '.join(curves)} (it would pool the left-out cases)." if curves else ""))


def metric_directions(metrics) -> dict[str, str]:
    """Directions of the scope-prefixed metrics (those of the plain metric)."""
    directions = {}
    for metric in metrics:
        for prefix in SCOPE_PREFIXES.values():
            base = metric.split("/", 1)[0]
            if prefix and base.startswith(prefix) and base[len(prefix):] in METRIC_DIRECTIONS:
                directions[metric] = METRIC_DIRECTIONS[base[len(prefix):]]
    return directions


def compare(arguments: list[str], baseline: str | None = None, common_cases: bool = False
            ) -> tuple[Comparison, list[MethodReports]]:
    """The comparison of the methods named by `arguments` (FOLDER or NAME=FOLDER each), on the same cases: methods
    evaluated on different cases are refused, or with `common_cases` restricted to the cases all of them have."""
    methods = [load_method(argument) for argument in arguments]
    names = [method.name for method in methods]
    if len(set(names)) != len(names):
        raise ValueError(f"two methods are called the same ({names}): name them with NAME=FOLDER")
    differences = case_set_differences(methods)
    if differences and not common_cases:
        raise ValueError(f"the methods were evaluated on different cases, so their means are not comparable ("
                         f"{'; '.join(differences)}): evaluate them on the same cases, or pass --common-cases to "
                         f"compare them on the cases all of them have")
    if differences:
        restrict_to_common_cases(methods)
        if not methods[0].cases["calibration"]:
            raise ValueError(f"the methods have no case in common ({'; '.join(differences)}): evaluate them on the "
                             f"same cases")
    nested = {method.name: method.scores for method in methods}
    metrics = {metric for scores in nested.values() for case in scores.values() for metric in case}
    scores = CaseScores.from_nested(nested, metric_directions(metrics))
    return compare_methods(scores, baseline=baseline), methods


def table_metrics(comparison: Comparison) -> list[str]:
    return [metric for metric in TABLE_METRICS if metric in comparison.metrics]


def failure_comparison(methods: list[MethodReports], n_resamples: int | None = None) -> FailureComparison | None:
    """The methods' failure detection (None if no method has scores); `n_resamples` 0 leaves out the intervals."""
    if all(method.failure is None for method in methods):
        return None
    options = {} if n_resamples is None else {"n_resamples": n_resamples}
    return compare_failure_detection({method.name: method.failure for method in methods}, **options)


def write_comparison(comparison: Comparison, methods: list[MethodReports], output_folder: PathLike,
                     preamble: str = "") -> None:
    """report.md (tables with their sources, and the cases left out by --common-cases), table.csv (every metric),
    table.tex and compare.png, and where methods have confidence scores the failure-detection section of report.md
    and failure_detection.csv (removed when none has), atomically."""
    output_folder = Path(output_folder)
    sources = "\n".join(f"- {method.name}: " + ", ".join(str(path) for path in method.reports) for method in methods)
    note = common_cases_note(methods)
    head = preamble + (f"{note}\n\n" if note else "")
    failure = failure_comparison(methods)
    files = {
        "report.md": f"{head}{markdown_report(comparison)}\n"
                     + ("" if failure is None else f"{failure_report(failure)}\n") + f"Sources:\n{sources}\n",
        "table.csv": csv_table(comparison),
        "table.tex": latex_table(comparison, table_metrics(comparison)),
    }
    if failure is None:
        (output_folder / FAILURE_CSV).unlink(missing_ok=True)
    else:
        files[FAILURE_CSV] = failure_csv(failure)
    for name, content in files.items():
        with atomic_path(output_folder / name) as temporary:
            temporary.write_text(content)
    if "dice" in comparison.metrics and "ece" in comparison.metrics:
        plot_comparison(comparison, output_folder / "compare.png",
                        {method.name: method.pooled for method in methods if method.pooled is not None})


def printed_table(comparison: Comparison) -> str:
    return markdown_table(comparison, table_metrics(comparison))


def printed_failure_table(methods: list[MethodReports]) -> str:
    """The methods' failure detection as one table without intervals ("" if no method has scores)."""
    failure = failure_comparison(methods, n_resamples=0)
    return "" if failure is None else (f"Failure detection (risk = 1 - mean foreground Dice; failed: Dice < "
                                       f"{failure.failure_dice:g}; rank in parentheses):\n" + failure_table(failure))
