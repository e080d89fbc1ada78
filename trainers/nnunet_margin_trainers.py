"""Shim for nnU-Net's trainer lookup (nnUNet_extTrainer): re-exports the trainers defined in nnunet_margin.trainers.

nnU-Net imports every module of this folder as a top-level module, so nothing but this re-export belongs here.
"""

from nnunet_margin.trainers import *  # noqa: F401,F403
from nnunet_margin.trainers import __all__  # noqa: F401
