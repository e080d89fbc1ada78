"""nnunet-margin: calibration-aware losses and metrics for nnU-Net v2.

`nnunet_margin.losses` and `nnunet_margin.calibration` are plain PyTorch/NumPy and work without
nnU-Net; `nnunet_margin.nnunet` and `nnunet_margin.trainers` plug them into nnU-Net v2.
"""

__version__ = "0.1.0"
