"""Calibration metrics for segmentation in plain PyTorch/NumPy/SciPy (no nnU-Net needed).

`CalibrationStats` accumulates per-bin sums over voxels, volumes (one at a time or a batch) and processes; the
functions compute one metric in one call; `plot_reliability_diagram` draws the reliability curves; `boundary_scope`
selects the voxels near ground-truth class boundaries; `surface_distances` gives HD95 and ASD per class. The papers'
comparison table of methods is the separate package `nnunet_margin.comparison`.
`LogitSample` (of logits, or of stored probabilities as log-probabilities) and `fit_affine_calibration` fit
temperature, vector or matrix scaling, which `fold_affine_calibration` folds into the network's last layer.
"""

from .affine import (
    AffineCalibration,
    check_matrix_scaling,
    evaluate_affine_calibrations,
    fit_affine_calibration,
    fold_affine_calibration,
    logit_calibration_metrics,
)
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
from .logit_sample import LabelledLogits, LogitSample
from .reliability import plot_reliability_diagram
from .stats import CalibrationStats, ReliabilityBins
from .surface import surface_distances

__all__ = [
    "AffineCalibration",
    "CalibrationStats",
    "LabelledLogits",
    "LogitSample",
    "ReliabilityBins",
    "average_calibration_error",
    "boundary_scope",
    "boundary_voxels",
    "brier_score",
    "check_matrix_scaling",
    "classwise_average_calibration_error",
    "classwise_expected_calibration_error",
    "evaluate_affine_calibrations",
    "expected_calibration_error",
    "fit_affine_calibration",
    "fold_affine_calibration",
    "logit_calibration_metrics",
    "maximum_calibration_error",
    "negative_log_likelihood",
    "plot_reliability_diagram",
    "surface_distances",
]
