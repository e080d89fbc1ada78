"""Post-hoc affine calibrators on logits: temperature, vector and matrix scaling (docs/methods.md section 6).

Each maps a voxel's logits z (K,) to softmax(A z + b): temperature scaling A = I / T, b = 0, and vector scaling
A = diag(w) (Guo et al., ICML 2017); matrix scaling A = W, a full K x K matrix, with ODIR regularisation (Kull et al.,
NeurIPS 2019). The parameters minimise the mean negative log-likelihood (NLL) over the fit voxels, in float64.

- `map`: the fitted `AffineCalibration` (apply, JSON) and `fold_affine_calibration` into a network's last layer;
- `parametrisations`: one class per calibrator (`TemperatureScaling`, `VectorScaling`, `MatrixScaling`);
- `solver`: the Newton solver they share; `cross_validation`: the choice of a penalty (ODIR) by k-fold CV;
- `fitting`: `fit_affine_calibration`, and the metrics of calibrated logits.
"""

from .fitting import evaluate_affine_calibrations, fit_affine_calibration, logit_calibration_metrics
from .map import METHODS, AffineCalibration, fold_affine_calibration
from .parametrisations import (
    DEFAULT_FOLDS,
    DEFAULT_ODIR_GRID,
    MATRIX_MAX_CLASSES,
    MATRIX_MIN_VOXELS_PER_PARAMETER,
    PARAMETRISATIONS,
    TEMPERATURE_BOUNDS,
    MatrixScaling,
    TemperatureScaling,
    VectorScaling,
    check_matrix_scaling,
)

__all__ = [
    "DEFAULT_FOLDS",
    "DEFAULT_ODIR_GRID",
    "MATRIX_MAX_CLASSES",
    "MATRIX_MIN_VOXELS_PER_PARAMETER",
    "METHODS",
    "PARAMETRISATIONS",
    "TEMPERATURE_BOUNDS",
    "AffineCalibration",
    "MatrixScaling",
    "TemperatureScaling",
    "VectorScaling",
    "check_matrix_scaling",
    "evaluate_affine_calibrations",
    "fit_affine_calibration",
    "fold_affine_calibration",
    "logit_calibration_metrics",
]
