"""Calibration metrics for segmentation in plain PyTorch/NumPy (no nnU-Net needed).

`CalibrationStats` accumulates per-bin sums over voxels, volumes and processes; the functions compute one metric
in one call; `plot_reliability_diagram` draws the reliability curves.
"""

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
    "CalibrationStats",
    "ReliabilityBins",
    "TemperatureFit",
    "apply_temperature",
    "brier_score",
    "classwise_expected_calibration_error",
    "expected_calibration_error",
    "fit_temperature",
    "maximum_calibration_error",
    "negative_log_likelihood",
    "plot_reliability_diagram",
]
