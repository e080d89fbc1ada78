"""Calibration metrics for segmentation in plain PyTorch/NumPy (no nnU-Net needed).

`CalibrationStats` accumulates per-bin sums over voxels, volumes and processes; the functions compute one metric
in one call; `plot_reliability_diagram` draws the reliability curves. `TemperatureFit` fits a temperature to stored
probabilities; `LogitSample` and `fit_affine_calibration` fit temperature, vector or matrix scaling to logits, which
`fold_affine_calibration` folds into the network's last layer.
"""

from .affine import (
    AffineCalibration,
    check_matrix_scaling,
    evaluate_affine_calibrations,
    fit_affine_calibration,
    fold_affine_calibration,
    logit_calibration_metrics,
)
from .functional import (
    brier_score,
    classwise_expected_calibration_error,
    expected_calibration_error,
    maximum_calibration_error,
    negative_log_likelihood,
)
from .logit_sample import LabelledLogits, LogitSample
from .reliability import plot_reliability_diagram
from .stats import CalibrationStats, ReliabilityBins
from .temperature import TemperatureFit, apply_temperature, fit_temperature

__all__ = [
    "AffineCalibration",
    "CalibrationStats",
    "LabelledLogits",
    "LogitSample",
    "ReliabilityBins",
    "TemperatureFit",
    "apply_temperature",
    "brier_score",
    "check_matrix_scaling",
    "classwise_expected_calibration_error",
    "evaluate_affine_calibrations",
    "expected_calibration_error",
    "fit_affine_calibration",
    "fit_temperature",
    "fold_affine_calibration",
    "logit_calibration_metrics",
    "maximum_calibration_error",
    "negative_log_likelihood",
    "plot_reliability_diagram",
]
