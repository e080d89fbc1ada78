"""Input checks of the calibration modules: array types, dtypes and shapes (`CalibrationStats`, `LogitSample`), the
one-volume and batch forms of the metrics (`is_batch`), the label range and the probability values."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch

ArrayLike = torch.Tensor | np.ndarray

# Allowed |sum_k p_k - 1| of a voxel; float16 and bfloat16 inputs get their dtype's epsilon where that is larger.
PROBABILITY_SUM_TOLERANCE = 1e-3


def as_tensor(array: ArrayLike, name: str) -> torch.Tensor:
    """A torch.Tensor sharing the memory of `array` (a tensor or numpy array)."""
    if isinstance(array, torch.Tensor):
        return array
    if isinstance(array, np.ndarray):
        return torch.as_tensor(array)  # shares memory, no copy
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(array).__name__}")


def check_voxel_arrays(values: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None,
                       name: str = "probabilities") -> None:
    """Dtypes and shapes of `name` (K, *spatial) floats (probabilities or logits), integer labels (*spatial) and an
    optional bool mask."""
    if not values.is_floating_point():
        raise ValueError(f"{name} must be floating point, got dtype {values.dtype}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer array of class indices, got dtype {labels.dtype}")
    if tuple(labels.shape) != tuple(values.shape[1:]):
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match {name} shape "
                         f"{tuple(values.shape)}: expected labels of shape {tuple(values.shape[1:])}")
    if mask is not None:
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool array, got dtype {mask.dtype}")
        if tuple(mask.shape) != tuple(labels.shape):
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match labels shape {tuple(labels.shape)}")


class Volume(NamedTuple):
    """One volume of an input, as views: probabilities (K, *spatial), labels (*spatial), mask (*spatial) or None, and
    its place in the input, () for a single volume and (b,) for volume b of a batch (error messages prefix it to the
    voxel's index)."""

    probabilities: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor | None
    index: tuple[int, ...]


def is_batch(probabilities: ArrayLike, labels: ArrayLike) -> bool:
    """The batch rule of the calibration metrics: labels with as many axes as the probabilities, (B, 1, *spatial)
    (the layout of nnU-Net's targets and of the losses'), make the probabilities a batch (B, K, *spatial); labels
    with one axis fewer, (*spatial), make them one volume (K, *spatial)."""
    return labels.ndim == probabilities.ndim >= 2


def split_volumes(probabilities: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None) -> list[Volume]:
    """The volumes of one input (`is_batch`), after checking dtypes and shapes (`check_voxel_arrays`); a mask has
    the labels' shape."""
    single_shape, batch_shape = tuple(probabilities.shape[1:]), (*probabilities.shape[:1], 1, *probabilities.shape[2:])
    if not is_batch(probabilities, labels):
        if tuple(labels.shape) != single_shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} does not match probabilities shape "
                             f"{tuple(probabilities.shape)}: expected labels of shape {single_shape} for one volume "
                             f"(K, *spatial), or {batch_shape} for a batch (B, K, *spatial)")
        check_voxel_arrays(probabilities, labels, mask)
        return [Volume(probabilities, labels, mask, ())]
    if tuple(labels.shape) != batch_shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match the batch of probabilities of shape "
                         f"{tuple(probabilities.shape)} (B, K, *spatial): expected labels of shape {batch_shape}, "
                         f"class indices (not one-hot); labels with one axis fewer than the probabilities are one "
                         f"volume (K, *spatial)")
    if mask is not None and tuple(mask.shape) != batch_shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match labels shape {batch_shape}")
    check_voxel_arrays(probabilities.movedim(1, 0), labels[:, 0], None if mask is None else mask[:, 0])
    return [Volume(probabilities[b], labels[b, 0], None if mask is None else mask[b, 0], (b,))
            for b in range(len(probabilities))]


def check_label_range(labels: torch.Tensor, num_classes: int) -> None:
    """Every label (of the voxels that count) is a class index in [0, num_classes)."""
    if labels.numel() == 0:
        return
    low, high = (int(value) for value in torch.aminmax(labels))
    if low < 0 or high >= num_classes:
        raise ValueError(f"labels hold the value {low if low < 0 else high}, outside [0, {num_classes}) for "
                         f"{num_classes} channels; mask out ignored voxels")


def probability_sum_tolerance(dtype: torch.dtype) -> float:
    """Allowed |sum_k p_k - 1| for probabilities stored in `dtype`: rounding K probabilities that sum to 1 moves
    the sum by at most half the dtype's epsilon, so max(PROBABILITY_SUM_TOLERANCE, eps) never rejects a softmax."""
    return max(PROBABILITY_SUM_TOLERANCE, torch.finfo(dtype).eps)


def check_probability_values(probabilities: torch.Tensor, sum_tolerance: float,
                             voxel_index: Callable[[int], Any] = lambda column: column) -> None:
    """Raise ValueError unless every entry of probabilities (K, n) is finite, every voxel's sum over the K classes
    lies within `sum_tolerance` of 1 and every entry is in [0, 1] (checked in this order). Every entry is checked
    (three passes over the chunk, ~10% of the binning's time). `voxel_index(column)` names the voxel in the message
    (e.g. its spatial index)."""
    if probabilities.numel() == 0:
        return
    if probabilities.dtype not in (torch.float32, torch.float64):
        probabilities = probabilities.float()
    low, high = (float(value) for value in torch.aminmax(probabilities))  # NaN propagates
    if not (math.isfinite(low) and math.isfinite(high)):
        column = int(torch.isfinite(probabilities).all(dim=0).logical_not_().nonzero()[0, 0])
        raise ValueError(f"probabilities hold NaN or inf values, e.g. at voxel {voxel_index(column)}: "
                         f"{probabilities[:, column].tolist()}")
    # rounding error below K * eps: far below the tolerance in float32 for up to 256 classes
    sums = probabilities.sum(dim=0, dtype=torch.float64 if probabilities.shape[0] > 256 else None)
    low_sum, high_sum = (float(value) for value in torch.aminmax(sums))
    if max(1 - low_sum, high_sum - 1) > sum_tolerance:
        column = int((sums - 1).abs_().argmax())
        raise ValueError(f"probabilities sum to {float(sums[column]):.6g} over the {probabilities.shape[0]} classes "
                         f"at voxel {voxel_index(column)}, expected 1 within {sum_tolerance:g}: pass softmax "
                         f"probabilities over the class axis (apply a softmax to logits first; one-vs-rest sigmoid "
                         f"outputs are not a categorical distribution)")
    if low < 0 or high > 1:
        bad, kind = (low, "the negative value") if low < 0 else (high, "the value")
        column = int(((probabilities == bad).any(dim=0)).nonzero()[0, 0])
        raise ValueError(f"probabilities hold {kind} {bad:.6g} at voxel {voxel_index(column)}, outside [0, 1]: pass "
                         f"class probabilities (apply a softmax over the class axis to logits first)")
