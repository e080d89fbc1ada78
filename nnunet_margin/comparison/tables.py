"""The comparison as tables: Markdown (one table, or the report of several), LaTeX (booktabs) and CSV."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from typing import Literal

from .scores import HIGHER, LOWER, metric_label
from .statistics import Comparison

Cell = Literal["mean_std", "mean_ci", "p_value"]
_CELLS = ("mean_std", "mean_ci", "p_value")

_LATEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                   "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    """Text safe in LaTeX's text mode (the ten special characters escaped)."""
    return "".join(_LATEX_SPECIALS.get(character, character) for character in text)


def _markdown_escape(text: str) -> str:
    return text.replace("|", r"\|")


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
