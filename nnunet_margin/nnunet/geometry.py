"""Where a case's voxels lie in nnU-Net's frames, and whether a prediction lies on its ground truth's image grid.

nnU-Net's preprocessing transposes a case (the plans' transpose_forward), then crops it to its nonzero box
(`layout.CropBox`, in the transposed frame); the export resamples the logits inside the box, pastes them into the
uncropped shape (background = 1.0 outside the box) and transposes back (transpose_backward). The calibration report
counts only the voxels inside the box: `crop_mask` draws it in the exported frame, `crop_to_preprocessing_frame`
brings a ground truth into the frame of the resampled logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from . import _seams
from .layout import CropBox, image_geometry


def crop_mask(box: CropBox, transpose_backward: Sequence[int]) -> np.ndarray:
    """Bool mask of nnU-Net's crop box in the exported (original) orientation: drawn in the transposed frame, where
    the box is [low, high) per axis, and transposed back."""
    shape = box.shape_before_cropping
    if len(box.bbox) != len(shape) or sorted(transpose_backward) != list(range(len(shape))):
        raise ValueError(f"crop box {list(box.bbox)} and transpose_backward {list(transpose_backward)} do not fit "
                         f"shape_before_cropping {shape}")
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(low, high) for low, high in box.bbox)] = True
    return mask.transpose(transpose_backward)


def crop_to_preprocessing_frame(array: np.ndarray, box: CropBox, transpose_forward: Sequence[int]) -> np.ndarray:
    """An array of the exported orientation (e.g. the ground truth) in the frame of nnU-Net's resampled logits:
    transposed, then cropped."""
    cropped = array.transpose(transpose_forward)[tuple(slice(low, high) for low, high in box.bbox)]
    if cropped.shape != box.shape_after_cropping:
        raise ValueError(f"the ground truth cropped to nnU-Net's box has shape {cropped.shape}, but the prediction "
                         f"has {box.shape_after_cropping}: is gt_segmentations the one of this dataset?")
    return cropped


def geometry_differences(prediction_properties: dict[str, Any], reference_properties: dict[str, Any],
                         compared: str = "prediction") -> list[str]:
    """How the image geometry of a prediction (the properties nnU-Net exported with it; or of another `compared`
    file, e.g. an image) differs from its reference's (the properties of nnU-Net's reader of the ground truth), beyond
    nnU-Net's own tolerance: one text per quantity (spacing, and origin and direction or the affine where the reader
    keeps them), empty if they agree."""
    prediction, reference = image_geometry(prediction_properties), image_geometry(reference_properties)
    return [f"{name} {_text(reference[name])} ({compared}: {_text(prediction[name])})"
            for name in prediction if name in reference and not _seams.same_geometry(prediction[name], reference[name])]


def _text(values: np.ndarray) -> str:
    return "(" + ", ".join(f"{value:g}" for value in np.asarray(values, dtype=float).ravel()) + ")"
