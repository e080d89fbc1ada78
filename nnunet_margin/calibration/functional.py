"""One-call calibration metrics (torchmetrics style), each a thin wrapper around `CalibrationStats`.

All take probabilities (K, *spatial), integer labels (*spatial) and an optional bool mask (*spatial) of the voxels
that count, as numpy arrays or torch tensors, and return a Python float (NaN when no voxel counts). The binned
metrics take `n_bins` and `binning` ("equal_width" bins (lower, upper], or "equal_mass"); see `CalibrationStats` for
the definitions (docs/methods.md sections 3 and 5).
"""

from __future__ import annotations

from .stats import ArrayLike, CalibrationStats


def _metric(name: str, probabilities: ArrayLike, labels: ArrayLike, mask: ArrayLike | None, n_bins: int = 1,
            binning: str = "equal_width") -> float:
    stats = CalibrationStats(num_classes=int(probabilities.shape[0]), n_bins=n_bins, binning=binning)
    return stats.update(probabilities, labels, mask=mask).compute()[name]


def expected_calibration_error(probabilities: ArrayLike, labels: ArrayLike, n_bins: int = 15,
                               mask: ArrayLike | None = None, binning: str = "equal_width") -> float:
    """Top-label ECE: sum over bins of bin share * |mean confidence - accuracy|."""
    return _metric("ece", probabilities, labels, mask, n_bins, binning)


def maximum_calibration_error(probabilities: ArrayLike, labels: ArrayLike, n_bins: int = 15,
                              mask: ArrayLike | None = None, binning: str = "equal_width") -> float:
    """Top-label MCE: the largest |mean confidence - accuracy| over non-empty bins."""
    return _metric("mce", probabilities, labels, mask, n_bins, binning)


def average_calibration_error(probabilities: ArrayLike, labels: ArrayLike, n_bins: int = 15,
                              mask: ArrayLike | None = None, binning: str = "equal_width") -> float:
    """Top-label ACE: the unweighted mean of |mean confidence - accuracy| over non-empty bins."""
    return _metric("ace", probabilities, labels, mask, n_bins, binning)


def classwise_expected_calibration_error(probabilities: ArrayLike, labels: ArrayLike, n_bins: int = 15,
                                         mask: ArrayLike | None = None, binning: str = "equal_width") -> float:
    """Classwise ECE: mean over classes k of the ECE of p_k against 1[y == k]."""
    return _metric("classwise_ece", probabilities, labels, mask, n_bins, binning)


def classwise_average_calibration_error(probabilities: ArrayLike, labels: ArrayLike, n_bins: int = 15,
                                        mask: ArrayLike | None = None, binning: str = "equal_width") -> float:
    """Classwise ACE: mean over classes k of the ACE of p_k against 1[y == k]."""
    return _metric("classwise_ace", probabilities, labels, mask, n_bins, binning)


def brier_score(probabilities: ArrayLike, labels: ArrayLike, mask: ArrayLike | None = None) -> float:
    """Mean over voxels of sum_k (p_k - 1[y == k])^2."""
    return _metric("brier", probabilities, labels, mask)


def negative_log_likelihood(probabilities: ArrayLike, labels: ArrayLike, mask: ArrayLike | None = None) -> float:
    """Mean over voxels of -log(p_y), with p_y clamped to the smallest normal number of its dtype."""
    return _metric("nll", probabilities, labels, mask)
