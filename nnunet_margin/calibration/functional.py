"""One-call calibration metrics (torchmetrics style), each a thin wrapper around `CalibrationStats`.

All take probabilities (K, *spatial), integer labels (*spatial) and an optional bool mask (*spatial) of the voxels
that count, as numpy arrays or torch tensors, and return a Python float (NaN when no voxel counts).
"""

from __future__ import annotations

from .stats import ArrayLike, CalibrationStats


def _metric(name: str, probabilities: ArrayLike, labels: ArrayLike, n_bins: int, mask: ArrayLike | None) -> float:
    stats = CalibrationStats(num_classes=int(probabilities.shape[0]), n_bins=n_bins)
    return stats.update(probabilities, labels, mask=mask).compute()[name]


def expected_calibration_error(probabilities: ArrayLike, labels: ArrayLike, n_bins: int = 15,
                               mask: ArrayLike | None = None) -> float:
    """Top-label ECE: sum over bins of bin share * |mean confidence - accuracy|."""
    return _metric("ece", probabilities, labels, n_bins, mask)


def maximum_calibration_error(probabilities: ArrayLike, labels: ArrayLike, n_bins: int = 15,
                              mask: ArrayLike | None = None) -> float:
    """Top-label MCE: the largest |mean confidence - accuracy| over non-empty bins."""
    return _metric("mce", probabilities, labels, n_bins, mask)


def classwise_expected_calibration_error(probabilities: ArrayLike, labels: ArrayLike, n_bins: int = 15,
                                         mask: ArrayLike | None = None) -> float:
    """Classwise ECE: mean over classes k of the ECE of p_k against 1[y == k]."""
    return _metric("classwise_ece", probabilities, labels, n_bins, mask)


def brier_score(probabilities: ArrayLike, labels: ArrayLike, mask: ArrayLike | None = None) -> float:
    """Mean over voxels of sum_k (p_k - 1[y == k])^2."""
    return _metric("brier", probabilities, labels, 1, mask)


def negative_log_likelihood(probabilities: ArrayLike, labels: ArrayLike, mask: ArrayLike | None = None) -> float:
    """Mean over voxels of -log(p_y), with p_y clamped to the smallest normal number of its dtype."""
    return _metric("nll", probabilities, labels, 1, mask)
