"""Calibration metrics for segmentation in plain PyTorch/NumPy/SciPy (no nnU-Net needed).

`CalibrationStats` accumulates per-bin sums over voxels, volumes and processes; the functions compute one metric
in one call; `plot_reliability_diagram` draws the reliability curves; `boundary_scope` selects the voxels near
ground-truth class boundaries; `surface_distances` gives HD95 and ASD per class.
"""

from .boundary import boundary_scope, boundary_voxels
from .functional import (
    average_calibration_error,
    brier_score,
    classwise_average_calibration_error,
    classwise_expected_calibration_error,
    expected_calibration_error,
    maximum_calibration_error,
    negative_log_likelihood,
)
from .reliability import plot_reliability_diagram
from .stats import CalibrationStats, ReliabilityBins
from .surface import surface_distances
from .temperature import TemperatureFit, apply_temperature, fit_temperature

__all__ = [
    "CalibrationStats",
    "ReliabilityBins",
    "TemperatureFit",
    "apply_temperature",
    "average_calibration_error",
    "boundary_scope",
    "boundary_voxels",
    "brier_score",
    "classwise_average_calibration_error",
    "classwise_expected_calibration_error",
    "expected_calibration_error",
    "fit_temperature",
    "maximum_calibration_error",
    "negative_log_likelihood",
    "plot_reliability_diagram",
    "surface_distances",
]
