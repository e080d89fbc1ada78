"""The evaluation of one case: calibration statistics in three scopes and nnU-Net's Dice with HD95 and ASD.

Calibration metrics (ECE, MCE, ACE, classwise ECE and ACE, Brier, NLL; docs/methods.md sections 3 and 5) are
accumulated in three scopes:

* ``foreground``: voxels whose ground truth is not background (and not ignored), inside nnU-Net's crop box
  (the metric the MbLS papers report);
* ``crop``: every non-ignored voxel inside the crop box. nnU-Net exports background = 1.0 outside the box, so
  voxels there would only dilute the metrics;
* ``boundary``: the crop-scope voxels within 3 mm of a ground-truth class boundary (image spacing), where
  segmentation probabilities are uncertain.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ..calibration import CalibrationStats, boundary_scope, surface_distances
from ..calibration.boundary import DEFAULT_DISTANCE_MM
from . import _seams

SCOPES = ("foreground", "crop", "boundary")


def scope_masks(labels, crop_mask=None, ignore_label: int | None = None, boundary=None) -> dict:
    """The voxels of each scope (numpy or torch, None for all), all inside the crop box and without the ignore label:
    "foreground" (ground truth not background), "crop" (every voxel) and, given the boundary mask, "boundary"."""
    counted = None if ignore_label is None else labels != ignore_label
    if crop_mask is not None:
        counted = crop_mask if counted is None else counted & crop_mask
    masks = {"foreground": labels != 0 if counted is None else counted & (labels != 0), "crop": counted}
    if boundary is not None:
        masks["boundary"] = boundary if counted is None else counted & boundary
    return masks


def evaluate_logits(logits: np.ndarray | torch.Tensor, segmentation_gt: np.ndarray,
                    boundary: np.ndarray | None = None, ignore_label: int | None = None, n_bins: int = 15,
                    slab_entries: int = 2**22) -> dict[str, CalibrationStats]:
    """`evaluate_case` from logits (K, *spatial) inside the crop box (with the ground truth and boundary scope in the
    same frame): softmax over slabs of the first spatial axis, so the probabilities never exist in full (nnU-Net's
    own export holds only the logits)."""
    logits = torch.as_tensor(logits)
    labels = torch.as_tensor(segmentation_gt)
    if tuple(logits.shape[1:]) != tuple(labels.shape):
        raise ValueError(f"logits shape {tuple(logits.shape)} does not match segmentation shape {tuple(labels.shape)}")
    boundary = None if boundary is None else torch.as_tensor(boundary)
    stats = {scope: CalibrationStats(int(logits.shape[0]), n_bins)
             for scope in (SCOPES if boundary is not None else SCOPES[:2])}
    slab = max(1, slab_entries // max(1, logits[:, 0].numel()))
    for start in range(0, labels.shape[0], slab):
        probabilities = torch.softmax(logits[:, start:start + slab].float(), dim=0)
        part = slice(start, start + slab)
        masks = scope_masks(labels[part], None, ignore_label, None if boundary is None else boundary[part])
        for scope, mask in masks.items():
            stats[scope].update(probabilities, labels[part], mask=mask)
    return stats


def evaluate_case(probabilities: np.ndarray | torch.Tensor, segmentation_gt: np.ndarray | torch.Tensor,
                  crop_mask: np.ndarray | torch.Tensor | None = None, ignore_label: int | None = None,
                  n_bins: int = 15, spacing: Sequence[float] | None = None,
                  boundary_mm: float = DEFAULT_DISTANCE_MM) -> dict[str, CalibrationStats]:
    """Statistics of one case in the scopes "foreground", "crop" and, given the voxel spacing (mm), "boundary" (see
    the module docstring).

    probabilities (K, *spatial); segmentation_gt (*spatial) with class indices (nnU-Net's float reader output is
    accepted if integer-valued); crop_mask (*spatial) bool, None for all voxels.
    """
    device = probabilities.device if isinstance(probabilities, torch.Tensor) else None
    labels = torch.as_tensor(segmentation_gt, device=device)
    if labels.is_floating_point():
        if not torch.equal(labels, labels.round()):
            raise ValueError("segmentation_gt holds non-integer values; pass a label map")
        labels = labels.to(torch.int32)
    if crop_mask is not None:
        crop_mask = torch.as_tensor(crop_mask, device=device)
        if crop_mask.shape != labels.shape:
            raise ValueError(f"crop mask shape {tuple(crop_mask.shape)} does not match segmentation shape "
                             f"{tuple(labels.shape)}")
    boundary = None if spacing is None else torch.as_tensor(
        boundary_scope(labels.cpu().numpy(), spacing, boundary_mm, ignore_label), device=device)
    num_classes = int(probabilities.shape[0])
    return {scope: CalibrationStats(num_classes, n_bins).update(probabilities, labels, mask=mask)
            for scope, mask in scope_masks(labels, crop_mask, ignore_label, boundary).items()}


def segmentation_metrics(segmentation: np.ndarray, reference: np.ndarray, class_names: list[str],
                         spacing: Sequence[float], ignore_label: int | None = None) -> dict[str, dict[str, float]]:
    """Per foreground class: nnU-Net's Dice, HD95 and ASD in mm ({metric: {class: value}}). Ignored voxels count as
    background in both maps for the surface distances; a class in only one map has no surface distance (NaN here;
    its Dice of 0 shows the miss). nnU-Net's readers return integer-valued floats, which are accepted."""
    labels = list(range(1, len(class_names)))
    segmentation, reference = (np.asarray(array).astype(np.int64) for array in (segmentation, reference))
    dice = _seams.dice_per_label(segmentation, reference, labels, ignore_label)
    if ignore_label is not None:
        ignored = reference == ignore_label
        segmentation, reference = np.where(ignored, 0, segmentation), np.where(ignored, 0, reference)
    distances = surface_distances(segmentation, reference, labels, spacing)
    names = class_names[1:]
    return {"dice": dict(zip(names, dice)),
            **{metric: {name: value if math.isfinite(value) else math.nan for name, value in zip(names, values)}
               for metric, values in distances.items()}}
