"""Calibration-aware segmentation losses in plain PyTorch (no nnU-Net needed)."""

from .margin_calibration import EmptyClassError, MarginCalibrationLoss, MarginOffsets, margin_offsets
from .mbls import MbLSLoss, MbLSParts

__all__ = ["EmptyClassError", "MarginCalibrationLoss", "MarginOffsets", "margin_offsets", "MbLSLoss", "MbLSParts"]
