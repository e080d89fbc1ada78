"""Calibration metrics for segmentation in plain PyTorch/NumPy (no nnU-Net needed).

`CalibrationStats` accumulates per-bin sums over voxels, volumes and processes; the functions compute one metric
in one call; `plot_reliability_diagram` draws the reliability curves; `compare_methods` and the table and figure
functions of `comparison` build the papers' comparison table of methods from per-case scores.
"""

from .comparison import (
    METRIC_DIRECTIONS,
    CaseScores,
    Comparison,
    compare_methods,
    csv_table,
    latex_table,
    markdown_report,
    markdown_table,
    plot_comparison,
)
from .functional import (
    brier_score,
    classwise_expected_calibration_error,
    expected_calibration_error,
    maximum_calibration_error,
    negative_log_likelihood,
)
from .reliability import plot_reliability_diagram
from .stats import CalibrationStats, ReliabilityBins
from .temperature import TemperatureFit, apply_temperature, fit_temperature

__all__ = [
    "METRIC_DIRECTIONS",
    "CalibrationStats",
    "CaseScores",
    "Comparison",
    "ReliabilityBins",
    "TemperatureFit",
    "apply_temperature",
    "brier_score",
    "classwise_expected_calibration_error",
    "compare_methods",
    "csv_table",
    "expected_calibration_error",
    "fit_temperature",
    "latex_table",
    "markdown_report",
    "markdown_table",
    "maximum_calibration_error",
    "negative_log_likelihood",
    "plot_comparison",
    "plot_reliability_diagram",
]
