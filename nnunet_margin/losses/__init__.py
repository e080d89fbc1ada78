"""Calibration-aware segmentation losses in plain PyTorch (no nnU-Net needed).

Every loss is a `SegmentationLoss`: `loss(logits, target)` returns the total, `loss.parts(logits, target)` the total
and its named terms (see `base.py`).
"""

from .base import LossParts, SegmentationLoss
from .margin_calibration import EmptyClassError, MarginCalibrationLoss, MarginOffsets, margin_offsets
from .mbls import MbLSLoss

__all__ = ["EmptyClassError", "LossParts", "MarginCalibrationLoss", "MarginOffsets", "MbLSLoss", "SegmentationLoss",
           "margin_offsets"]
