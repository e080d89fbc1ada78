"""Comparison table of segmentation/calibration methods: per-case scores -> mean ± std, ranks, sum of ranks,
bootstrap confidence intervals, paired Wilcoxon tests against a baseline, Markdown/CSV/LaTeX tables and a figure.

The MbLS and NACL papers' tables (docs/methods.md section 5) report DSC, HD95, ASD, ECE and CECE per method as the
mean over test cases and order methods by the sum of their per-metric ranks; this module computes those tables from
one float per method, case and metric.

Input data model (`CaseScores.from_nested`)::

    {method: {case: {metric: value}}}

* ``value`` is a float; NaN (or None, as strict JSON writes it) means undefined for that case, e.g. the HD95 of a
  class that is empty in both prediction and ground truth. A case or metric a method does not list counts as NaN.
  +-inf is rejected: write NaN for "undefined" and a finite penalty value if that is what the table should average.
* ``metric`` is an overall name (``"dice"``, ``"hd95"``, ``"ece"``, ...) or a per-class name ``"<metric>/<class>"``
  (``"dice/liver"``). Every metric needs a direction, "higher" or "lower" is better: `METRIC_DIRECTIONS` holds the
  known ones, looked up by the full name and then by the part before the first "/"; pass ``directions`` for others.

Statistics per method and metric use the cases where the value is defined (their number is reported): mean, sample
standard deviation (ddof = 1), and a percentile-bootstrap confidence interval of the mean over cases.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import matplotlib.style
import numpy as np
from matplotlib.figure import Figure

from .._atomic import atomic_path
from .stats import CalibrationStats

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

# The MbLS/NACL papers' table columns, summed to order methods (docs/methods.md section 5).
PAPER_RANK_METRICS = ("dice", "hd95", "asd", "ece", "classwise_ece")

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

# Bootstrap means computed at once (samples x resamples x cases entries; 8 bytes each, twice: indices and values).
_BOOTSTRAP_CHUNK_ENTRIES = 2**22

Cell = Literal["mean_std", "mean_ci", "p_value"]
_CELLS = ("mean_std", "mean_ci", "p_value")


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


def average_ranks(scores: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """Rank 1 = best; tied scores share the mean of the ranks they span (scipy.stats.rankdata's "average"); NaN
    scores get a NaN rank and are left out of the ranking."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f"scores must be one-dimensional (one per method), got shape {scores.shape}")
    key = -scores if higher_is_better else scores
    defined = ~np.isnan(key)
    ranked = key[defined]
    better = (ranked[None, :] < ranked[:, None]).sum(axis=1)
    tied = (ranked[None, :] == ranked[:, None]).sum(axis=1)  # the score itself included
    ranks = np.full(scores.shape, np.nan)
    ranks[defined] = better + (tied + 1) / 2
    return ranks


def bootstrap_mean_ci(samples: np.ndarray, confidence_level: float = 0.95, n_resamples: int = 10_000,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Percentile-bootstrap confidence interval of the mean of each row of ``samples`` (..., n), all finite.

    The resampled case indices are drawn as ``numpy.random.default_rng(seed).integers(0, n, (n_resamples, n))``,
    the same for every row (common random numbers), and the bounds are the linear-interpolation quantiles
    (1 - confidence_level) / 2 and (1 + confidence_level) / 2 of the resampled means: per row this is
    ``scipy.stats.bootstrap((row,), np.mean, method="percentile", rng=np.random.default_rng(seed))``, which needs
    n >= 2; here n = 1 gives (x, x) and n = 0 gives NaN.
    """
    samples = np.asarray(samples, dtype=np.float64)
    if samples.ndim < 1:
        raise ValueError("samples must have the cases on the last axis, got a scalar")
    if not np.isfinite(samples).all():
        raise ValueError("samples must be finite: drop the cases where the metric is undefined first")
    if not 0 < confidence_level < 1:
        raise ValueError(f"confidence_level must lie in (0, 1), got {confidence_level}")
    if not isinstance(n_resamples, (int, np.integer)) or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive integer, got {n_resamples!r}")
    num_cases = samples.shape[-1]
    if num_cases == 0:
        empty = np.full(samples.shape[:-1], np.nan)
        return empty, empty.copy()

    rng = np.random.default_rng(seed)
    rows = samples.reshape(-1, num_cases)
    means = np.empty((rows.shape[0], n_resamples))
    chunk = max(1, _BOOTSTRAP_CHUNK_ENTRIES // max(1, rows.shape[0] * num_cases))
    for start in range(0, n_resamples, chunk):
        stop = min(start + chunk, n_resamples)
        # Consecutive draws from one generator continue its stream: equal to one draw of all resamples.
        index = rng.integers(0, num_cases, (stop - start, num_cases))
        means[:, start:stop] = rows[:, index].mean(axis=-1)
    alpha = (1 - confidence_level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha], axis=-1)
    return low.reshape(samples.shape[:-1]), high.reshape(samples.shape[:-1])


@dataclass(frozen=True)
class PairedTest:
    """Two-sided paired Wilcoxon signed-rank test; ``note`` says why ``p_value`` is NaN ("" when it is not)."""

    p_value: float
    statistic: float
    num_pairs: int  # cases where both values are defined
    note: str


def paired_wilcoxon(values: np.ndarray, baseline_values: np.ndarray, min_nonzero_pairs: int = 6) -> PairedTest:
    """scipy.stats.wilcoxon (two-sided, zero differences dropped) of values against baseline_values over the cases
    where both are defined (not NaN).

    NaN with a note when every difference is zero (scipy would return p = 1 with a warning) or fewer than
    ``min_nonzero_pairs`` differences are nonzero: with 5 or fewer the smallest possible two-sided p is
    2 / 2**5 = 0.0625, so the default 6 is the fewest that can reach p < 0.05.
    """
    values, baseline_values = np.asarray(values, np.float64), np.asarray(baseline_values, np.float64)
    if not isinstance(min_nonzero_pairs, (int, np.integer)) or min_nonzero_pairs < 1:
        raise ValueError(f"min_nonzero_pairs must be a positive integer, got {min_nonzero_pairs!r}")
    if values.shape != baseline_values.shape or values.ndim != 1:
        raise ValueError(f"values {values.shape} and baseline_values {baseline_values.shape} must be one-dimensional "
                         f"arrays over the same cases")
    both = ~np.isnan(values) & ~np.isnan(baseline_values)
    num_pairs = int(both.sum())
    nonzero = int(np.count_nonzero(values[both] - baseline_values[both]))
    if num_pairs == 0:
        note = "no case where both are defined"
    elif nonzero == 0:
        note = f"all {num_pairs} paired differences are zero"
    elif nonzero < min_nonzero_pairs:
        note = f"only {nonzero} nonzero paired differences (at least {min_nonzero_pairs} needed)"
    else:
        import scipy.stats  # here, not at module level: importing it costs ~0.6 s, and the package is imported
        # by every nnU-Net process that loads the trainers

        result = scipy.stats.wilcoxon(values[both], baseline_values[both])
        return PairedTest(float(result.pvalue), float(result.statistic), num_pairs, "")
    return PairedTest(math.nan, math.nan, num_pairs, note)


@dataclass(frozen=True)
class Comparison:
    """Everything the comparison tables show. Arrays are (methods, metrics), methods sorted by `rank_sum`
    (ascending, undefined last, ties in input order)."""

    methods: tuple[str, ...]
    metrics: tuple[str, ...]
    directions: Mapping[str, str]
    num_cases: np.ndarray  # int64: cases where the metric is defined
    mean: np.ndarray
    std: np.ndarray  # sample standard deviation (ddof = 1); NaN for fewer than 2 cases
    ci_low: np.ndarray
    ci_high: np.ndarray
    confidence_level: float
    rank: np.ndarray  # per metric, 1 = best mean, ties averaged, NaN without a mean
    rank_metrics: tuple[str, ...]
    rank_sum: np.ndarray  # (methods,), NaN if a rank metric has no mean
    baseline: str | None
    p_value: np.ndarray  # paired Wilcoxon against the baseline, NaN with a note where not computed
    num_pairs: np.ndarray  # int64
    p_note: np.ndarray  # str

    @property
    def overall_metrics(self) -> tuple[str, ...]:
        return tuple(metric for metric in self.metrics if "/" not in metric)

    @property
    def per_class_metrics(self) -> tuple[str, ...]:
        return tuple(metric for metric in self.metrics if "/" in metric)

    def column(self, metric: str) -> int:
        if metric not in self.metrics:
            raise ValueError(f"metric '{metric}' is not in the comparison (metrics: {list(self.metrics)})")
        return self.metrics.index(metric)

    def is_best(self, metric: str) -> np.ndarray:
        """Bool per method: its mean is the best of the metric's column (ties all count)."""
        mean = self.mean[:, self.column(metric)]
        if np.isnan(mean).all():
            return np.zeros(mean.shape, dtype=bool)
        best = np.nanmax(mean) if self.directions[metric] == HIGHER else np.nanmin(mean)
        return mean == best


def compare_methods(scores: CaseScores, rank_metrics: Sequence[str] | None = None, baseline: str | None = None,
                    confidence_level: float = 0.95, n_resamples: int = 10_000, seed: int = 0,
                    min_nonzero_pairs: int = 6) -> Comparison:
    """Mean ± std, bootstrap CI, ranks and sum of ranks of every method and metric, and the paired Wilcoxon test
    of each method against ``baseline`` (None: no tests).

    ``rank_metrics`` default to the papers' DSC, HD95, ASD, ECE, CECE that the scores hold (docs/methods.md 5).
    The CIs follow `bootstrap_mean_ci` with the same seed for every method and metric, so a method's interval does
    not depend on which other methods are compared.
    """
    metrics = scores.metrics
    if rank_metrics is None:
        rank_metrics = tuple(metric for metric in PAPER_RANK_METRICS if metric in metrics)
        if not rank_metrics:
            raise ValueError(f"the scores hold none of the papers' rank metrics {list(PAPER_RANK_METRICS)}: pass "
                             f"rank_metrics (a list of {list(metrics)})")
    rank_metrics = tuple(rank_metrics)
    missing = [metric for metric in rank_metrics if metric not in metrics]
    if missing or not rank_metrics:
        raise ValueError(f"rank_metrics {missing or '[]'} must be a non-empty list of the scores' metrics "
                         f"{list(metrics)}")
    if baseline is not None and baseline not in scores.methods:
        raise ValueError(f"baseline '{baseline}' is not one of the methods {list(scores.methods)}")

    values = scores.values
    defined = ~np.isnan(values)
    num_cases = defined.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(defined, values, 0).sum(axis=1) / num_cases
        squared_deviation = np.where(defined, values - mean[:, None, :], 0) ** 2
        std = np.sqrt(squared_deviation.sum(axis=1) / (num_cases - 1))
    std[num_cases < 2] = np.nan

    rank = np.stack([average_ranks(mean[:, k], scores.directions[metric] == HIGHER)
                     for k, metric in enumerate(metrics)], axis=1)
    rank_sum = rank[:, [metrics.index(metric) for metric in rank_metrics]].sum(axis=1)

    ci_low, ci_high = np.full(mean.shape, np.nan), np.full(mean.shape, np.nan)
    columns_by_count: dict[int, list[tuple[int, int]]] = {}
    for m, k in np.ndindex(*mean.shape):
        columns_by_count.setdefault(int(num_cases[m, k]), []).append((m, k))
    for count, columns in columns_by_count.items():
        if count == 0:
            continue
        samples = np.stack([values[m, defined[m, :, k], k] for m, k in columns])
        low, high = bootstrap_mean_ci(samples, confidence_level, n_resamples, seed)
        rows, cols = zip(*columns)
        ci_low[rows, cols], ci_high[rows, cols] = low, high

    p_value = np.full(mean.shape, np.nan)
    num_pairs = np.zeros(mean.shape, dtype=np.int64)
    p_note = np.full(mean.shape, "no baseline", dtype=object)
    if baseline is not None:
        reference = scores.methods.index(baseline)
        for m, k in np.ndindex(*mean.shape):
            if m == reference:
                p_note[m, k] = "baseline"
                continue
            test = paired_wilcoxon(values[m, :, k], values[reference, :, k], min_nonzero_pairs)
            p_value[m, k], num_pairs[m, k], p_note[m, k] = test.p_value, test.num_pairs, test.note

    order = sorted(range(len(scores.methods)), key=lambda m: (np.isnan(rank_sum[m]), np.nan_to_num(rank_sum[m]), m))
    return Comparison(
        methods=tuple(scores.methods[m] for m in order), metrics=metrics, directions=dict(scores.directions),
        num_cases=num_cases[order], mean=mean[order], std=std[order], ci_low=ci_low[order], ci_high=ci_high[order],
        confidence_level=confidence_level, rank=rank[order], rank_metrics=rank_metrics, rank_sum=rank_sum[order],
        baseline=baseline, p_value=p_value[order], num_pairs=num_pairs[order], p_note=p_note[order])


# --- rendering ------------------------------------------------------------------------------------------------------

_LATEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                   "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    """Text safe in LaTeX's text mode (the ten special characters escaped)."""
    return "".join(_LATEX_SPECIALS.get(character, character) for character in text)


def _markdown_escape(text: str) -> str:
    return text.replace("|", r"\|")


def metric_label(metric: str) -> str:
    """Table heading: `METRIC_LABELS` name, with the class in parentheses for per-class metrics."""
    base, _, class_name = metric.partition("/")
    label = METRIC_LABELS.get(base, base)
    return f"{label} ({class_name})" if class_name else label


def _plot_text(text: str) -> str:
    """Text matplotlib shows as written (an even number of "$" would switch to mathtext)."""
    return text.replace("$", r"\$")


def _number(value: float, digits: int) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def _rank_sum_text(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:g}"


def _p_text(value: float, note: str, less_than: str) -> str:
    if note == "baseline":
        return "baseline"
    if math.isnan(value):
        return "n/a"
    return f"{less_than}0.001" if value < 0.001 else f"{value:.3f}"


def _select_metrics(comparison: Comparison, metrics: Sequence[str] | None) -> tuple[str, ...]:
    selected = comparison.overall_metrics if metrics is None else tuple(metrics)
    for metric in selected:
        comparison.column(metric)
    if not selected:
        raise ValueError("no metrics to show: pass metrics (e.g. comparison.per_class_metrics)")
    return selected


def _cells(comparison: Comparison, metrics: Sequence[str], cell: Cell, digits: int, plus_minus: str,
           less_than: str) -> list[list[tuple[str, bool]]]:
    """(text, is best) for every method and metric; plus_minus and less_than in the output format's spelling."""
    if cell not in _CELLS:
        raise ValueError(f"cell must be one of {_CELLS}, got {cell!r}")
    if cell == "p_value" and comparison.baseline is None:
        raise ValueError("the comparison has no baseline to show p-values against: pass baseline to compare_methods")
    rows = []
    for m in range(len(comparison.methods)):
        row = []
        for metric in metrics:
            k = comparison.column(metric)
            mean = _number(comparison.mean[m, k], digits)
            best = cell != "p_value" and bool(comparison.is_best(metric)[m])
            if cell == "p_value":
                text = _p_text(comparison.p_value[m, k], comparison.p_note[m, k], less_than)
            elif math.isnan(comparison.mean[m, k]):
                text = mean
            elif cell == "mean_std":
                std = comparison.std[m, k]
                text = mean if math.isnan(std) else f"{mean}{plus_minus}{_number(std, digits)}"
            else:
                low, high = _number(comparison.ci_low[m, k], digits), _number(comparison.ci_high[m, k], digits)
                text = f"{mean} [{low}, {high}]"
            row.append((text, best))
        rows.append(row)
    return rows


def markdown_table(comparison: Comparison, metrics: Sequence[str] | None = None, cell: Cell = "mean_std",
                   digits: int = 4) -> str:
    """One GitHub Markdown table: rows = methods (by sum of ranks), columns = metrics (default: the overall
    ones) as mean ± std, mean [CI] or the p-value against the baseline; the best mean per column in bold."""
    metrics = _select_metrics(comparison, metrics)
    arrows = {HIGHER: "↑", LOWER: "↓"}
    header = ["method", "sum of ranks"] + [f"{metric_label(metric)} {arrows[comparison.directions[metric]]}"
                                           for metric in metrics]
    lines = ["| " + " | ".join(_markdown_escape(text) for text in header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    cells = _cells(comparison, metrics, cell, digits, " ± ", "<")
    for method, rank_sum, row in zip(comparison.methods, comparison.rank_sum, cells):
        texts = [f"**{text}**" if best else text for text, best in row]
        lines.append("| " + " | ".join([_markdown_escape(method), _rank_sum_text(rank_sum), *texts]) + " |")
    if cell == "p_value":
        notes = [f"- {method}, {metric}: {comparison.p_note[m, comparison.column(metric)]}"
                 for m, method in enumerate(comparison.methods) for metric in metrics
                 if comparison.p_note[m, comparison.column(metric)] not in ("", "baseline")]
        if notes:
            lines += ["", "n/a:", *notes]
    return "\n".join(lines) + "\n"


def markdown_report(comparison: Comparison, digits: int = 4) -> str:
    """Markdown sections: overall metrics as mean ± std, as mean [CI], p-values against the baseline (if any),
    and per-class metrics as mean ± std (if any)."""
    rank_names = ", ".join(metric_label(metric) for metric in comparison.rank_metrics)
    level = f"{comparison.confidence_level:.0%}"
    sections = [f"Methods ordered by the sum of their ranks over {rank_names} (1 = best mean); mean ± sample standard "
                f"deviation over cases, best in bold.\n\n" + markdown_table(comparison, digits=digits),
                f"Mean and {level} percentile-bootstrap confidence interval over cases.\n\n"
                + markdown_table(comparison, cell="mean_ci", digits=digits)]
    if comparison.baseline is not None:
        sections.append(f"Two-sided paired Wilcoxon signed-rank test against {_markdown_escape(comparison.baseline)}"
                        f" (p-values, cases where both are defined).\n\n"
                        + markdown_table(comparison, cell="p_value", digits=digits))
    if comparison.per_class_metrics:
        sections.append("Per class: mean ± standard deviation over cases.\n\n"
                        + markdown_table(comparison, comparison.per_class_metrics, digits=digits))
    return "\n".join(sections)


def latex_table(comparison: Comparison, metrics: Sequence[str] | None = None, cell: Cell = "mean_std",
                digits: int = 3) -> str:
    """A booktabs ``tabular`` (needs ``\\usepackage{booktabs}``) of the same table as `markdown_table`; names are
    escaped, the best mean per column is bold."""
    metrics = _select_metrics(comparison, metrics)
    arrows = {HIGHER: r"$\uparrow$", LOWER: r"$\downarrow$"}
    header = ["Method", "Sum of ranks"] + [f"{latex_escape(metric_label(metric))} "
                                           f"{arrows[comparison.directions[metric]]}" for metric in metrics]
    lines = [r"\begin{tabular}{lr" + "c" * len(metrics) + "}", r"\toprule", " & ".join(header) + r" \\", r"\midrule"]
    cells = _cells(comparison, metrics, cell, digits, r" $\pm$ ", "$<$")
    for method, rank_sum, row in zip(comparison.methods, comparison.rank_sum, cells):
        texts = [rf"\textbf{{{text}}}" if best else text for text, best in row]
        lines.append(" & ".join([latex_escape(method), _rank_sum_text(rank_sum), *texts]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


_CSV_FIELDS = ("n", "mean", "std", "ci_low", "ci_high", "rank", "p_value", "n_pairs", "p_note")


def csv_table(comparison: Comparison, metrics: Sequence[str] | None = None) -> str:
    """CSV, one row per method (by sum of ranks): method, rank_sum, then for every metric (default: all)
    ``<metric>_n, _mean, _std, _ci_low, _ci_high, _rank, _p_value, _n_pairs, _p_note``; full precision, NaN empty."""
    metrics = comparison.metrics if metrics is None else _select_metrics(comparison, metrics)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["method", "rank_sum"] + [f"{metric}_{field}" for metric in metrics for field in _CSV_FIELDS])

    def number(value: float) -> str:
        return "" if math.isnan(value) else repr(float(value))

    for m, method in enumerate(comparison.methods):
        row = [method, number(comparison.rank_sum[m])]
        for metric in metrics:
            k = comparison.column(metric)
            row += [str(comparison.num_cases[m, k]), number(comparison.mean[m, k]), number(comparison.std[m, k]),
                    number(comparison.ci_low[m, k]), number(comparison.ci_high[m, k]), number(comparison.rank[m, k]),
                    number(comparison.p_value[m, k]), str(comparison.num_pairs[m, k]), comparison.p_note[m, k]]
        writer.writerow(row)
    return buffer.getvalue()


# --- figure ---------------------------------------------------------------------------------------------------------

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

    # matplotlib's default style, whatever the process set globally (as in reliability.py)
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
