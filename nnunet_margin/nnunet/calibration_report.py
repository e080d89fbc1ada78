"""The calibration report (calibration.json) of a set of evaluated cases, and its printed summary.

The report holds per case the calibration metrics of each scope (`case_evaluation`) and, where the case's
segmentation was evaluated, its Dice, HD95 and ASD per class; per scope a pooled value (one accumulator over all
voxels) and the mean over cases (the papers' convention); the mean over cases of the segmentation metrics; the
pooled accumulator state (so reports can be merged with `CalibrationStats.from_dict`); nnU-Net's own Dice from its
summary.json where there is one; and under "coverage" the cases each metric family covers ("calibration",
"segmentation", "nnunet_dice"), so that a metric computed over fewer cases never passes for one over all of them.
Ground-truth cases left without a prediction (`nnunet-margin calibration --allow-missing`) are listed under
"ground_truth_without_prediction". A prediction folder of `nnunet-margin predict` adds the section
"failure_detection" (`failure_report`). NaN is written as null.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import reduce
from operator import add
from typing import Any

from ..calibration import CalibrationStats
from ..calibration.boundary import DEFAULT_DISTANCE_MM
from . import failure_report
from .case_evaluation import SCOPES

REPORT_FILE = "calibration.json"
PLOT_FILE = "reliability.png"
SCALAR_METRICS = ("ece", "mce", "ace", "classwise_ece", "classwise_ace", "brier", "nll")
# The metric families of "coverage" and how the summary names them.
FAMILY_NAMES = {"calibration": "the calibration metrics", "segmentation": "Dice, HD95 and ASD",
                "nnunet_dice": "nnU-Net's summary.json Dice", "failure_detection": "the failure-detection metrics"}


def json_value(value: Any) -> Any:
    """NaN/inf -> None (strict JSON); lists are converted element-wise."""
    if isinstance(value, list):
        return [json_value(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _json_metrics(stats: CalibrationStats) -> dict[str, Any]:
    return {name: json_value(value) for name, value in stats.compute().items()}


def _nanmean(values: list[float | None]) -> float | None:
    finite = [value for value in values if value is not None]
    return sum(finite) / len(finite) if finite else None


def _mean_over_cases(case_metrics: list[dict[str, Any]], num_classes: int) -> dict[str, Any]:
    """Mean over the cases that have voxels in the scope (cases without any are NaN and skipped)."""
    mean = {name: _nanmean([metrics[name] for metrics in case_metrics]) for name in SCALAR_METRICS}
    mean["class_ece"] = [_nanmean([metrics["class_ece"][k] for metrics in case_metrics]) for k in range(num_classes)]
    mean["num_cases"] = sum(metrics["num_voxels"] > 0 for metrics in case_metrics)
    return mean


def _segmentation_means(per_case: list[dict[str, dict[str, float | None]]]) -> dict[str, dict[str, float | None]]:
    """{metric: {class: mean over the cases where it is defined}} of the per-case segmentation metrics."""
    metrics = {metric: list(values) for metric, values in per_case[0].items()}
    return {metric: {name: _nanmean([case[metric][name] for case in per_case]) for name in names}
            for metric, names in metrics.items()}


def build_report(per_case: dict[str, dict[str, CalibrationStats]], class_names: list[str],
                 segmentation: dict[str, dict[str, dict[str, float]]] | None = None,
                 nnunet_dice: dict[str, Any] | None = None, missing_predictions: Sequence[str] = (),
                 failure_detection: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report (see the module docstring) of the cases' statistics per scope, their segmentation metrics
    ({case: `segmentation_metrics`}, for the cases that have a segmentation), nnU-Net's Dice
    (`layout.read_summary_dice`), the ground-truth cases that had no prediction and the failure-detection section
    (`failure_report.failure_section`)."""
    if not per_case:
        raise ValueError("no cases to report")
    scopes = list(next(iter(per_case.values())))
    pooled = {scope: reduce(add, (case_stats[scope] for case_stats in per_case.values())) for scope in scopes}
    num_classes = pooled[scopes[0]].num_classes
    if len(class_names) != num_classes:
        raise ValueError(f"got {len(class_names)} class names for {num_classes} probability channels")
    metric_per_case = {case: {scope: _json_metrics(stats) for scope, stats in case_stats.items()}
                       for case, case_stats in per_case.items()}
    summary = {scope: {"pooled": _json_metrics(pooled[scope]),
                       "mean_over_cases": _mean_over_cases([case[scope] for case in metric_per_case.values()],
                                                           num_classes)}
               for scope in scopes}
    segmentation = segmentation or {}
    for case, metrics in segmentation.items():
        metric_per_case[case]["segmentation"] = {metric: {name: json_value(value) for name, value in values.items()}
                                                 for metric, values in metrics.items()}
    if segmentation:
        summary["segmentation"] = _segmentation_means([metric_per_case[case]["segmentation"]
                                                       for case in segmentation])
    report: dict[str, Any] = {
        "class_names": list(class_names),
        "n_bins": pooled[scopes[0]].n_bins,
        "boundary_mm": DEFAULT_DISTANCE_MM if "boundary" in scopes else None,
        "num_cases": len(per_case),
        "coverage": {"calibration": sorted(per_case), "segmentation": sorted(segmentation)},
        "summary": summary,
        "metric_per_case": metric_per_case,
        "pooled_state": {scope: stats.to_dict() for scope, stats in pooled.items()},
    }
    if nnunet_dice is not None:
        report["dice"] = {name: value for name, value in nnunet_dice.items() if name != "cases"}
        report["coverage"]["nnunet_dice"] = list(nnunet_dice["cases"])
    if missing_predictions:
        report["ground_truth_without_prediction"] = sorted(missing_predictions)
    if failure_detection is not None:
        report[failure_report.SECTION] = failure_detection
        report["coverage"]["failure_detection"] = sorted(failure_detection["dice"])
    return report


def _case_list(cases: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(cases[:limit])
    return shown + (f" and {len(cases) - limit} more" if len(cases) > limit else "")


def coverage_warnings(report: dict[str, Any]) -> list[str]:
    """One line per metric family that covers other cases than the calibration metrics, and one for ground-truth
    cases without a prediction (empty for a report where every metric covers every case)."""
    coverage = report.get("coverage", {})
    cases = coverage.get("calibration", sorted(report.get("metric_per_case", {})))
    lines = []
    for family, covered in coverage.items():
        missing, extra = sorted(set(cases) - set(covered)), sorted(set(covered) - set(cases))
        if missing or extra:
            lines.append(f"warning: {FAMILY_NAMES.get(family, family)} cover {len(covered)} case(s), "
                         f"{FAMILY_NAMES['calibration']} {len(cases)}"
                         + (f"; without: {_case_list(missing)}" if missing else "")
                         + (f"; only there: {_case_list(extra)}" if extra else ""))
    left_out = report.get("ground_truth_without_prediction", [])
    if left_out:
        lines.append(f"warning: {len(left_out)} ground-truth case(s) without a prediction are not in the report: "
                     f"{_case_list(left_out)}")
    return lines


def summary_lines(report: dict[str, Any]) -> list[str]:
    """One line per scope (the metrics' mean over cases) and per segmentation metric (its mean per class), the
    failure-detection metrics of each confidence score, then the coverage warnings."""
    lines = [f"{scope} (mean over {summary['mean_over_cases']['num_cases']} cases): "
             + ", ".join(f"{name} {_format(summary['mean_over_cases'][name], missing='n/a')}"
                         for name in SCALAR_METRICS)
             for scope, summary in report["summary"].items() if scope in SCOPES]
    for metric, per_class in report["summary"].get("segmentation", {}).items():
        lines.append(f"{metric} per class (mean over cases): "
                     + ", ".join(f"{name} {_format(value, missing='n/a')}" for name, value in per_class.items()))
    if failure_report.SECTION in report:
        lines += failure_report.summary_lines(report[failure_report.SECTION])
    return lines + coverage_warnings(report)


def _format(value: Any, missing: str = "") -> str:
    if value is None:
        return missing
    return f"{value:.4f}" if isinstance(value, float) else str(value)
