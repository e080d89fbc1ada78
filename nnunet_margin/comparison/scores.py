"""The per-case scores of methods to compare, and the metrics they may hold: direction (which way is better) and
table heading.

Input data model (`CaseScores.from_nested`)::

    {method: {case: {metric: value}}}

* ``value`` is a float; NaN (or None, as strict JSON writes it) means undefined for that case, e.g. the HD95 of a
  class that is empty in both prediction and ground truth. A case or metric a method does not list counts as NaN.
  +-inf is rejected: write NaN for "undefined" and a finite penalty value if that is what the table should average.
* ``metric`` is an overall name (``"dice"``, ``"hd95"``, ``"ece"``, ...) or a per-class name ``"<metric>/<class>"``
  (``"dice/liver"``). Every metric needs a direction, "higher" or "lower" is better: `METRIC_DIRECTIONS` holds the
  known ones, looked up by the full name and then by the part before the first "/"; pass ``directions`` for others.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

HIGHER = "higher"
LOWER = "lower"

# Which way is better for the metrics the calibration literature reports (docs/methods.md sections 3 and 5).
METRIC_DIRECTIONS: dict[str, str] = {
    "dice": HIGHER,
    "hd95": LOWER,
    "asd": LOWER,
    "ece": LOWER,
    "classwise_ece": LOWER,
    "ace": LOWER,
    "classwise_ace": LOWER,
    "mce": LOWER,
    "brier": LOWER,
    "nll": LOWER,
}

# Column headings of the Markdown and LaTeX tables (other metrics keep their own name).
METRIC_LABELS: dict[str, str] = {
    "dice": "DSC",
    "hd95": "HD95",
    "asd": "ASD",
    "ece": "ECE",
    "classwise_ece": "CECE",
    "ace": "ACE",
    "classwise_ace": "CACE",
    "mce": "MCE",
    "brier": "Brier",
    "nll": "NLL",
}


def _base_metric(metric: str) -> str:
    return metric.split("/", 1)[0]


def _metric_direction(metric: str, directions: Mapping[str, str]) -> str | None:
    return directions.get(metric, directions.get(_base_metric(metric)))


@dataclass(frozen=True)
class CaseScores:
    """Dense per-case scores: ``values[m, c, k]`` is method m's value of metric k on case c (NaN: undefined).

    Build it with `CaseScores.from_nested`; methods keep the input order, cases are sorted, overall metrics come
    before per-class ones, both in the order of `METRIC_DIRECTIONS` first and then of first appearance.
    """

    methods: tuple[str, ...]
    cases: tuple[str, ...]
    metrics: tuple[str, ...]
    values: np.ndarray  # (methods, cases, metrics) float64
    directions: Mapping[str, str]  # metric -> "higher" | "lower", one entry per metric

    @classmethod
    def from_nested(cls, scores: Mapping[str, Mapping[str, Mapping[str, float | None]]],
                    directions: Mapping[str, str] | None = None) -> CaseScores:
        """From ``{method: {case: {metric: value}}}``; ``directions`` adds to or overrides `METRIC_DIRECTIONS`."""
        known = dict(METRIC_DIRECTIONS)
        for metric, direction in (directions or {}).items():
            if direction not in (HIGHER, LOWER):
                raise ValueError(f"direction of metric '{metric}' must be '{HIGHER}' or '{LOWER}' (is better), "
                                 f"got {direction!r}")
            known[metric] = direction
        if not scores:
            raise ValueError("no methods to compare: pass {method: {case: {metric: value}}}")

        first_seen: dict[str, None] = {}
        cases: set[str] = set()
        for method, per_case in scores.items():
            if not isinstance(method, str) or not method:
                raise ValueError(f"method names must be non-empty strings, got {method!r}")
            if not per_case:
                raise ValueError(f"method '{method}' has no cases")
            for case, per_metric in per_case.items():
                names = [metric for metric in per_metric if not isinstance(metric, str) or not metric]
                if names:
                    raise ValueError(f"metric names must be non-empty strings, got {names} in {method} / {case}")
                cases.add(str(case))
                first_seen.update(dict.fromkeys(per_metric))
        unknown = [metric for metric in first_seen if _metric_direction(metric, known) is None]
        if unknown:
            raise ValueError(f"metrics {unknown} have no known direction; pass directions={{name: 'higher' or "
                             f"'lower'}} (known: {sorted(METRIC_DIRECTIONS)})")
        canonical = list(METRIC_DIRECTIONS)
        appearance = list(first_seen)
        metrics = tuple(sorted(appearance, key=lambda metric: (
            "/" in metric,
            canonical.index(_base_metric(metric)) if _base_metric(metric) in canonical else len(canonical),
            appearance.index(metric))))

        methods = tuple(scores)
        case_names = tuple(sorted(cases))
        case_index = {case: index for index, case in enumerate(case_names)}
        metric_index = {metric: index for index, metric in enumerate(metrics)}
        values = np.full((len(methods), len(case_names), len(metrics)), np.nan)
        for m, method in enumerate(methods):
            for case, per_metric in scores[method].items():
                for metric, value in per_metric.items():
                    values[m, case_index[str(case)], metric_index[metric]] = _case_value(value, method, case, metric)
        return cls(methods=methods, cases=case_names, metrics=metrics, values=values,
                   directions={metric: _metric_direction(metric, known) for metric in metrics})


def _case_value(value: Any, method: str, case: str, metric: str) -> float:
    if value is None:
        return math.nan
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{method} / {case} / {metric}: expected a number (NaN or None for undefined), got "
                         f"{value!r}")
    if math.isinf(value):
        raise ValueError(f"{method} / {case} / {metric} is {value}: write NaN for an undefined value, or a finite "
                         f"penalty (e.g. the image diagonal for a distance) if it should count in the mean")
    return float(value)


def metric_label(metric: str) -> str:
    """Table heading: `METRIC_LABELS` name, with the class in parentheses for per-class metrics."""
    base, _, class_name = metric.partition("/")
    label = METRIC_LABELS.get(base, base)
    return f"{label} ({class_name})" if class_name else label

