"""Surface distances per class and case: 95th-percentile Hausdorff distance (HD95) and average symmetric surface
distance (ASD) in mm, as the MbLS and NACL papers report them next to Dice (docs/methods.md 5).

Conventions (those of MONAI 1.6.1 `compute_hausdorff_distance(percentile=95)` and
`compute_average_surface_distance(symmetric=True)` with `spacing`, which these functions equal):

* The surface of a mask is its voxels with at least one face neighbour (+-1 along one axis) outside the mask or
  outside the image (`scipy.ndimage.binary_erosion` with face connectivity and background beyond the border).
* Distances are Euclidean between voxel centres, with the voxel spacing in mm (anisotropic), from every surface voxel
  of one mask to the nearest surface voxel of the other (`scipy.ndimage.distance_transform_edt(sampling=spacing)`).
* HD95 = max(95th percentile of prediction -> reference distances, 95th percentile of reference -> prediction
  distances), percentiles with linear interpolation (`numpy.percentile`'s default, as `torch.quantile`).
* ASD = the mean of both directions' distances pooled (a mean over all surface voxels of both masks, not the mean
  of the two directed means).
* Empty masks: NaN when both prediction and reference lack the class (nothing to compare); inf when exactly one of
  them lacks it (the distance to an empty set), so that a missed or spurious structure cannot drop out of a nan-mean
  unnoticed: decide how to average such cases (e.g. exclude them, or substitute the image diagonal). MONAI agrees
  except for HD95 with one empty mask, which it returns as NaN (torch.quantile interpolating inf - inf).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from scipy import ndimage

ArrayLike = torch.Tensor | np.ndarray

HD_PERCENTILE = 95.0


def checked_spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    """The voxel spacing as a tuple of `ndim` positive finite floats (mm along each array axis)."""
    try:
        values = tuple(float(value) for value in spacing)
    except (TypeError, ValueError):
        raise ValueError(f"spacing must be a sequence of {ndim} numbers (mm per voxel along each axis), "
                         f"got {spacing!r}") from None
    if len(values) != ndim or not all(math.isfinite(value) and value > 0 for value in values):
        raise ValueError(f"spacing must hold {ndim} positive finite numbers (mm per voxel along each axis of the "
                         f"{ndim}D array), got {spacing!r}")
    return values


def label_array(labels: ArrayLike, name: str) -> np.ndarray:
    """A numpy array of integer (or bool) labels from a numpy array or torch tensor."""
    array = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
        raise ValueError(f"{name} must be an integer label map, got dtype {array.dtype}")
    if array.ndim < 1:
        raise ValueError(f"{name} must have at least one spatial axis, got a scalar")
    return array


def bounding_box(mask: np.ndarray, margin: Sequence[int]) -> tuple[slice, ...] | None:
    """Slices of the smallest box holding every True voxel of mask, widened by margin[axis] voxels on each side and
    clipped to the array; None if mask has no True voxel."""
    box = []
    for axis in range(mask.ndim):
        occupied = np.flatnonzero(mask.any(axis=tuple(other for other in range(mask.ndim) if other != axis)))
        if occupied.size == 0:
            return None
        box.append(slice(max(0, occupied[0] - margin[axis]), min(mask.shape[axis], occupied[-1] + 1 + margin[axis])))
    return tuple(box)


def surface_voxels(mask: np.ndarray) -> np.ndarray:
    """Voxels of a bool mask with a face neighbour outside the mask or outside the array."""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def _directed_distances(source: np.ndarray, target: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Distance in mm from every True voxel of source to the nearest True voxel of target (float64), from the
    nearest target voxel's index that the distance transform finds for every voxel: the distances themselves are
    computed only at the source voxels (as scipy computes them, so bit for bit the same), which saves their
    full-array computation (about a third of the time) and its float64 array."""
    nearest = ndimage.distance_transform_edt(~target, sampling=spacing, return_distances=False, return_indices=True)
    points = np.nonzero(source)
    squared = sum(((nearest[axis][points] - points[axis]) * step) ** 2 for axis, step in enumerate(spacing))
    return np.sqrt(squared)


def surface_distances(prediction: ArrayLike, reference: ArrayLike, labels: Iterable[int],
                      spacing: Sequence[float]) -> dict[str, list[float]]:
    """HD95 and ASD (mm) of every class in `labels` between two label maps of the same shape (*spatial), numpy or
    torch, with the voxel spacing in mm per axis. Returns {"hd95": [...], "asd": [...]} as Python floats in the
    order of `labels`; NaN where both maps lack the class, inf where exactly one does (see the module docstring).

    Each class's distance transforms run on the bounding box of prediction | reference (plus one voxel), which holds
    every surface voxel of both, so the cost and the memory (~14 bytes per box voxel) follow the structure's size.
    """
    prediction, reference = label_array(prediction, "prediction"), label_array(reference, "reference")
    if prediction.shape != reference.shape:
        raise ValueError(f"prediction shape {prediction.shape} does not match reference shape {reference.shape}")
    spacing = checked_spacing(spacing, prediction.ndim)
    result: dict[str, list[float]] = {"hd95": [], "asd": []}
    for label in labels:
        predicted, expected = prediction == label, reference == label
        box = bounding_box(predicted | expected, margin=[1] * prediction.ndim)
        if box is None or not (predicted[box].any() and expected[box].any()):
            undefined = math.nan if box is None else math.inf
            result["hd95"].append(undefined)
            result["asd"].append(undefined)
            continue
        predicted_surface, expected_surface = surface_voxels(predicted[box]), surface_voxels(expected[box])
        to_reference = _directed_distances(predicted_surface, expected_surface, spacing)
        to_prediction = _directed_distances(expected_surface, predicted_surface, spacing)
        result["hd95"].append(float(max(np.percentile(to_reference, HD_PERCENTILE),
                                        np.percentile(to_prediction, HD_PERCENTILE))))
        result["asd"].append(float((to_reference.sum() + to_prediction.sum())
                                   / (to_reference.size + to_prediction.size)))
    return result
