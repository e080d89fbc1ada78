"""Comparison of methods over cases in plain NumPy/SciPy/matplotlib (no nnU-Net, no torch needed): the papers' table.

`CaseScores` holds one float per method, case and metric (`scores.py`); `compare_methods` gives means, standard
deviations, ranks and their sum, bootstrap confidence intervals and paired Wilcoxon tests against a baseline
(`statistics.py`), `repeats_as_cases` the same over repeated runs, and `paired_difference` what one method gains
over another on the same cases; `markdown_table`, `markdown_report`, `latex_table` and `csv_table` render a
`Comparison` (`tables.py`), `plot_comparison` draws it (`figure.py`).
Failure detection, how well per-case confidence scores rank cases by their Dice: AURC, E-AURC and failure AUROC of
one method (`failure_detection.py`) and of methods compared (`compare_failure_detection`, `failure_comparison.py`).

Example::

    scores = CaseScores.from_nested({"CE": {"case_1": {"dice": 0.91, "ece": 0.05}, ...}, "MbLS": {...}})
    comparison = compare_methods(scores, baseline="CE")
    print(markdown_table(comparison))
"""

from .failure_comparison import (FailureComparison, FailureScores, compare_failure_detection, failure_csv,
                                 failure_report, failure_table)
from .figure import plot_comparison
from .scores import HIGHER, LOWER, METRIC_DIRECTIONS, METRIC_LABELS, CaseScores, metric_label
from .statistics import (
    PAPER_RANK_METRICS,
    Comparison,
    PairedDifference,
    PairedTest,
    average_ranks,
    bootstrap_mean_ci,
    compare_methods,
    paired_difference,
    paired_wilcoxon,
    repeats_as_cases,
)
from .tables import csv_table, latex_escape, latex_table, markdown_report, markdown_table

__all__ = [
    "HIGHER",
    "LOWER",
    "METRIC_DIRECTIONS",
    "METRIC_LABELS",
    "PAPER_RANK_METRICS",
    "CaseScores",
    "Comparison",
    "FailureComparison",
    "FailureScores",
    "PairedDifference",
    "PairedTest",
    "average_ranks",
    "bootstrap_mean_ci",
    "compare_failure_detection",
    "compare_methods",
    "csv_table",
    "failure_csv",
    "failure_report",
    "failure_table",
    "latex_escape",
    "latex_table",
    "markdown_report",
    "markdown_table",
    "metric_label",
    "paired_difference",
    "paired_wilcoxon",
    "plot_comparison",
    "repeats_as_cases",
]
