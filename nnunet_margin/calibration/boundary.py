"""Boundary scope (docs/methods.md 5): the voxels within a distance in mm of a ground-truth class boundary, where
segmentation probabilities are uncertain and foreground ECE hides little. Use the mask as `CalibrationStats.update`'s
mask (alone, or combined with a foreground mask).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from .surface import ArrayLike, bounding_box, checked_spacing, label_array

DEFAULT_DISTANCE_MM = 3.0


def boundary_voxels(labels: ArrayLike, ignore_label: int | None = None) -> np.ndarray:
    """Bool mask (*spatial) of the class boundary of a label map (numpy or torch): the voxels with at least one face
    neighbour (+-1 along one axis) of a different label, on both sides of every interface.

    Only interfaces between two voxels that are not `ignore_label` count (an ignored region's content is unknown, so
    its border is no class boundary), and the image border is no boundary either (the label beyond is unknown).
    """
    labels = label_array(labels, "labels")
    valid = None if ignore_label is None else labels != ignore_label
    boundary = np.zeros(labels.shape, dtype=bool)
    for axis in range(labels.ndim):
        lower = tuple(slice(None, -1) if other == axis else slice(None) for other in range(labels.ndim))
        upper = tuple(slice(1, None) if other == axis else slice(None) for other in range(labels.ndim))
        differs = labels[lower] != labels[upper]
        if valid is not None:
            differs &= valid[lower] & valid[upper]
        boundary[lower] |= differs
        boundary[upper] |= differs
    return boundary


def boundary_scope(labels: ArrayLike, spacing: Sequence[float], distance_mm: float = DEFAULT_DISTANCE_MM,
                   ignore_label: int | None = None) -> np.ndarray:
    """Bool mask (*spatial) of the voxels whose centre lies within `distance_mm` (inclusive) of the centre of a
    `boundary_voxels` voxel, Euclidean with the voxel spacing in mm per axis (anisotropic). Boundary voxels themselves
    (distance 0) belong to it; voxels with `ignore_label` never do (distances are measured straight through them).
    A label map without any boundary gives an all-False mask.

    The distance transform runs on the bounding box of the boundary widened by distance_mm, so memory (~20 bytes per
    box voxel) follows the structures' extent.
    """
    labels = label_array(labels, "labels")
    spacing = checked_spacing(spacing, labels.ndim)
    distance_mm = float(distance_mm)
    if not distance_mm >= 0:
        raise ValueError(f"distance_mm must be a number >= 0 (mm), got {distance_mm}")
    boundary = boundary_voxels(labels, ignore_label)
    scope = np.zeros(labels.shape, dtype=bool)
    # a voxel farther than distance_mm / spacing steps along one axis is out of reach (one more against rounding)
    box = bounding_box(boundary, margin=[int(distance_mm // step) + 1 for step in spacing])
    if box is None:
        return scope
    scope[box] = ndimage.distance_transform_edt(~boundary[box], sampling=spacing) <= distance_mm
    if ignore_label is not None:
        scope &= labels != ignore_label
    return scope
