"""One-call calibration metrics (torchmetrics style), each a thin wrapper around `CalibrationStats`.

All take one volume, probabilities (K, *spatial) with integer labels (*spatial) and an optional bool mask
(*spatial) of the voxels that count, or a batch, probabilities (B, K, *spatial) with labels and mask
(B, 1, *spatial) (the rule: labels with as many axes as the probabilities make a batch, `checks.is_batch`), as numpy
arrays or torch tensors. The binned metrics take `n_bins` and `binning` ("equal_width" bins (lower, upper], or
"equal_mass"); see `CalibrationStats` for the definitions (docs/methods.md sections 3 and 5).

`reduction` says what a batch gives: "pooled" (default), one float over all its voxels as one set (torchmetrics'
convention, and what `CalibrationStats.update` with the batch accumulates); "mean", the mean of the per-volume values
over the volumes where the metric is defined (MONAI's default, and the papers' per-volume average); "none", the list
of per-volume values. One volume is a batch of one. A metric with no counted voxel is NaN.
"""

from __future__ import annotations

import math

from .checks import ArrayLike, as_tensor, is_batch, split_volumes
from .stats import CalibrationStats

REDUCTIONS = ("pooled", "mean", "none")


def _metric(name: str, probabilities: ArrayLike, labels: ArrayLike, mask: ArrayLike | None, n_bins: int = 1,
            binning: str = "equal_width", reduction: str = "pooled") -> float | list[float]:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    probabilities, labels = as_tensor(probabilities, "probabilities"), as_tensor(labels, "labels")
    mask = None if mask is None else as_tensor(mask, "mask")
    class_axis = 1 if is_batch(probabilities, labels) else 0
    if probabilities.ndim <= class_axis:
        raise ValueError(f"probabilities must have shape (K, *spatial), or (B, K, *spatial) with labels "
                         f"(B, 1, *spatial), got {tuple(probabilities.shape)}")
    num_classes = int(probabilities.shape[class_axis])
    if reduction == "pooled":
        stats = CalibrationStats(num_classes=num_classes, n_bins=n_bins, binning=binning)
        return stats.update(probabilities, labels, mask=mask).compute()[name]
    values = [CalibrationStats(num_classes=num_classes, n_bins=n_bins, binning=binning)
              .update(volume.probabilities, volume.labels, mask=volume.mask).compute()[name]
              for volume in split_volumes(probabilities, labels, mask)]
    if reduction == "none":
        return values
    defined = [value for value in values if not math.isnan(value)]
    return sum(defined) / len(defined) if defined else math.nan


def expected_calibration_error(probabilities: ArrayLike, labels: ArrayLike, n_bins: int = 15,
                               mask: ArrayLike | None = None, binning: str = "equal_width",
                               reduction: str = "pooled") -> float | list[float]:
    """Top-label ECE: sum over bins of bin share * |mean confidence - accuracy|."""
    return _metric("ece", probabilities, labels, mask, n_bins, binning, reduction)


def maximum_calibration_error(probabilities: ArrayLike, labels: ArrayLike, n_bins: int = 15,
                              mask: ArrayLike | None = None, binning: str = "equal_width",
                              reduction: str = "pooled") -> float | list[float]:
    """Top-label MCE: the largest |mean confidence - accuracy| over non-empty bins."""
    return _metric("mce", probabilities, labels, mask, n_bins, binning, reduction)


def average_calibration_error(probabilities: ArrayLike, labels: ArrayLike, n_bins: int = 15,
                              mask: ArrayLike | None = None, binning: str = "equal_width",
                              reduction: str = "pooled") -> float | list[float]:
    """Top-label ACE: the unweighted mean of |mean confidence - accuracy| over non-empty bins."""
    return _metric("ace", probabilities, labels, mask, n_bins, binning, reduction)


def classwise_expected_calibration_error(probabilities: ArrayLike, labels: ArrayLike, n_bins: int = 15,
                                         mask: ArrayLike | None = None, binning: str = "equal_width",
                                         reduction: str = "pooled") -> float | list[float]:
    """Classwise ECE: mean over classes k of the ECE of p_k against 1[y == k]."""
    return _metric("classwise_ece", probabilities, labels, mask, n_bins, binning, reduction)


def classwise_average_calibration_error(probabilities: ArrayLike, labels: ArrayLike, n_bins: int = 15,
                                        mask: ArrayLike | None = None, binning: str = "equal_width",
                                        reduction: str = "pooled") -> float | list[float]:
    """Classwise ACE: mean over classes k of the ACE of p_k against 1[y == k]."""
    return _metric("classwise_ace", probabilities, labels, mask, n_bins, binning, reduction)


def brier_score(probabilities: ArrayLike, labels: ArrayLike, mask: ArrayLike | None = None,
                reduction: str = "pooled") -> float | list[float]:
    """Mean over voxels of sum_k (p_k - 1[y == k])^2."""
    return _metric("brier", probabilities, labels, mask, reduction=reduction)


def negative_log_likelihood(probabilities: ArrayLike, labels: ArrayLike, mask: ArrayLike | None = None,
                            reduction: str = "pooled") -> float | list[float]:
    """Mean over voxels of -log(p_y), with p_y clamped to the smallest normal number of its dtype."""
    return _metric("nll", probabilities, labels, mask, reduction=reduction)
