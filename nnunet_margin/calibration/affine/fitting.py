"""Fitting an affine calibrator to labelled logits, and measuring one (docs/methods.md 6).

`fit_affine_calibration` checks the inputs, fits the parametrisation of the method (`parametrisations`) in float64
by the shared Newton solver (`solver`), and returns an `AffineCalibration` with the bias centred (mean 0: adding a
constant to every calibrated logit does not change the softmax).
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Sequence

import torch

from ..checks import ArrayLike
from ..logit_sample import LogitSample
from ..stats import CalibrationStats
from .map import METHODS, AffineCalibration
from .parametrisations import (
    DEFAULT_FOLDS,
    DEFAULT_ODIR_GRID,
    TEMPERATURE_BOUNDS,
    MatrixScaling,
    TemperatureScaling,
    VectorScaling,
)
from .solver import CHUNK_ENTRIES, MAX_ITERATIONS, Parametrisation, mean_nll


def _checked_voxels(logits: ArrayLike, labels: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (K, n) float64 and labels (n,) int64 from logits (K, *voxels) and integer labels (*voxels)."""
    logits, labels = torch.as_tensor(logits), torch.as_tensor(labels)
    if not logits.is_floating_point() or logits.ndim < 2 or logits.shape[0] < 2:
        raise ValueError(f"logits must be a floating point array of shape (K >= 2, *voxels), got dtype "
                         f"{logits.dtype} and shape {tuple(logits.shape)}")
    if labels.is_floating_point() or labels.dtype == torch.bool or tuple(labels.shape) != tuple(logits.shape[1:]):
        raise ValueError(f"labels must be an integer array of shape {tuple(logits.shape[1:])}, got dtype "
                         f"{labels.dtype} and shape {tuple(labels.shape)}")
    num_classes = logits.shape[0]
    logits = logits.reshape(num_classes, -1).to(torch.float64).contiguous()
    labels = labels.reshape(-1).to(torch.int64)
    if labels.numel() == 0:
        raise ValueError("no voxels to fit a calibration to")
    low, high = (int(value) for value in torch.aminmax(labels))
    if low < 0 or high >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got values from {low} to {high}")
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("logits hold NaN or inf values")
    return logits, labels


def fit_affine_calibration(logits: ArrayLike, labels: ArrayLike, method: str = "vector", *,
                           odir: Sequence[float] | None = None,
                           odir_grid: Sequence[Sequence[float]] = DEFAULT_ODIR_GRID,
                           folds: int = DEFAULT_FOLDS, fold_ids: ArrayLike | None = None,
                           seed: int = 0, temperature_bounds: tuple[float, float] = TEMPERATURE_BOUNDS
                           ) -> AffineCalibration:
    """Fit a calibrator to logits (K, *voxels) of any float dtype and integer labels (*voxels) in [0, K).

    method: "temperature", "vector" or "matrix" (see `parametrisations`). For matrix scaling, `odir` =
    (lambda_od, lambda_b) fixes the ODIR penalty; otherwise it is chosen from `odir_grid` by `folds`-fold
    cross-validation, with `fold_ids` (an integer fold in [0, folds) per voxel, e.g. `LabelledLogits.fold_ids`) or,
    if None, random folds from `seed`. Matrix scaling raises ValueError where it would overfit
    (`check_matrix_scaling`). A temperature is searched within `temperature_bounds`; at a bound, info["at_bound"]
    says which ("lower" or "upper") and a warning explains it. Warns if the iterations did not converge or a class
    has no voxel (its bias then runs towards -inf).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    logits, labels = _checked_voxels(logits, labels)
    num_classes = logits.shape[0]
    started = time.perf_counter()
    parametrisation: Parametrisation
    if method == "temperature":
        parametrisation = TemperatureScaling(num_classes, temperature_bounds)
    elif method == "vector":
        parametrisation = VectorScaling(num_classes)
    else:
        parametrisation = MatrixScaling(num_classes, odir, odir_grid, folds, fold_ids, seed)
    fit = parametrisation.fit(logits, labels)
    info: dict[str, Any] = {"num_fit_voxels": labels.numel(), **fit.info}
    info["fit_nll"] = mean_nll(parametrisation, fit.parameters, logits, labels)
    info["iterations"], info["converged"] = fit.iterations, fit.converged
    info["fit_seconds"] = time.perf_counter() - started
    if not fit.converged:
        warnings.warn(f"{method} scaling did not converge in {MAX_ITERATIONS} Newton iterations; the NLL may keep "
                      f"decreasing towards infinite parameters (e.g. labels separable by the logits)", stacklevel=2)
    if info.get("at_bound") is not None:
        warnings.warn(f"the NLL keeps decreasing towards the bound T = {info['temperature']:g}; returning it",
                      stacklevel=2)
    if method != "temperature":
        absent = torch.bincount(labels, minlength=num_classes) == 0
        if bool(absent.any()):
            warnings.warn(f"classes {absent.nonzero()[:, 0].tolist()} have no fit voxel: their calibrated logits are "
                          f"pushed down as far as the fit allows; fit on data holding every class", stacklevel=2)
    weight, bias = parametrisation.weight_and_bias(fit.parameters)
    return AffineCalibration(weight, bias - bias.mean(), method, info)


def logit_calibration_metrics(logits: ArrayLike, labels: ArrayLike, calibration: AffineCalibration | None = None,
                              n_bins: int = 15) -> dict[str, Any]:
    """`CalibrationStats.compute()` of softmax(calibration.apply(logits)) (float64) for logits (K, *voxels) and
    labels (*voxels); without calibration, of softmax(logits)."""
    logits, labels = torch.as_tensor(logits), torch.as_tensor(labels)
    num_classes = logits.shape[0]
    logits, labels = logits.reshape(num_classes, -1), labels.reshape(-1)
    stats = CalibrationStats(num_classes, n_bins)
    chunk = max(1, CHUNK_ENTRIES // num_classes)
    for start in range(0, labels.numel(), chunk):
        chunk_logits = logits[:, start:start + chunk].to(torch.float64)
        if calibration is not None:
            chunk_logits = calibration.apply(chunk_logits)
        stats.update(torch.softmax(chunk_logits, dim=0), labels[start:start + chunk])
    return stats.compute()


def evaluate_affine_calibrations(sample: LogitSample, methods: Sequence[str] = METHODS, *,
                                 held_out_fraction: float = 0.2, n_bins: int = 15, **fit_options) -> dict[str, Any]:
    """Fit each method on the fit part of `sample` and measure it on the held-out part (`LogitSample.split`).

    Returns {"num_fit_voxels", "num_held_out_voxels", "uncalibrated": metrics, method: {"calibration":
    AffineCalibration, "held_out": metrics}, ...}, metrics as from `logit_calibration_metrics`. `fit_options` go to
    `fit_affine_calibration` (cross-validation folds come from the sample's voxel positions). Raises ValueError where
    matrix scaling would overfit (`check_matrix_scaling`): leave "matrix" out of `methods` there.
    """
    fit, held_out = sample.split(held_out_fraction)
    folds = fit_options.pop("folds", DEFAULT_FOLDS)
    results: dict[str, Any] = {
        "num_fit_voxels": fit.num_voxels,
        "num_held_out_voxels": held_out.num_voxels,
        "uncalibrated": logit_calibration_metrics(held_out.logits, held_out.labels, n_bins=n_bins),
    }
    for method in methods:
        calibration = fit_affine_calibration(fit.logits, fit.labels, method, folds=folds,
                                             fold_ids=fit.fold_ids(folds), **fit_options)
        results[method] = {"calibration": calibration,
                           "held_out": logit_calibration_metrics(held_out.logits, held_out.labels, calibration, n_bins)}
    return results
