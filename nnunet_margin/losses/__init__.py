"""Calibration-aware segmentation losses in plain PyTorch (no nnU-Net needed).

Every loss is a `SegmentationLoss`: `loss(logits, target)` returns the total, `loss.parts(logits, target)` the total
and its named terms (see `base.py`). Besides the package's two methods (margin calibration, MbLS) the losses of the
methods the field compares (docs/methods.md section 4) are here: focal loss, label smoothing, the explicit confidence
penalty, SVLS, NACL, the two mL1-ACE losses and CALS.
"""

from .ace import HardL1ACELoss, SoftL1ACELoss
from .base import LossParts, SegmentationLoss
from .cals import CALSLoss
from .margin_calibration import EmptyClassError, MarginCalibrationLoss, MarginOffsets, margin_offsets
from .mbls import MbLSLoss
from .neighbourhood import NACLLoss, SVLSLoss
from .pointwise import ConfidencePenaltyLoss, FocalLoss, LabelSmoothingLoss

__all__ = ["CALSLoss", "ConfidencePenaltyLoss", "EmptyClassError", "FocalLoss", "HardL1ACELoss",
           "LabelSmoothingLoss", "LossParts", "MarginCalibrationLoss", "MarginOffsets", "MbLSLoss", "NACLLoss",
           "SVLSLoss", "SegmentationLoss", "SoftL1ACELoss", "margin_offsets"]
