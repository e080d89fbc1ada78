"""Shim for nnU-Net's trainer lookup (nnUNet_extTrainer): only re-exports nnunet_margin.trainers."""

from nnunet_margin.trainers import *  # noqa: F401,F403
from nnunet_margin.trainers import __all__  # noqa: F401
