"""Short-schedule variants for the demo and the end-to-end tests (a few iterations on the CPU).

Not shipped in the wheel: the demo puts this folder into nnUNet_extTrainer beside `nnunet-margin trainers-path`.
"""

import os

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_margin.trainers import (nnUNetTrainerMarginCalib, nnUNetTrainerMarginCalibDice, nnUNetTrainerMbLS,
                                    nnUNetTrainerMbLSDice, nnUNetTrainerWithCalibration)


class ShortSchedule:
    """Mixin: `num_epochs` epochs of a few iterations each (set NNUNET_MARGIN_DEMO_EPOCHS to change the count)."""

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = int(os.environ.get("NNUNET_MARGIN_DEMO_EPOCHS", "1"))
        self.num_iterations_per_epoch = int(os.environ.get("NNUNET_MARGIN_DEMO_ITERATIONS", "2"))
        self.num_val_iterations_per_epoch = 1


class nnUNetTrainerMarginCalib_demo(ShortSchedule, nnUNetTrainerMarginCalib):
    pass


class nnUNetTrainerMarginCalibDice_demo(ShortSchedule, nnUNetTrainerMarginCalibDice):
    pass


class nnUNetTrainerMbLS_demo(ShortSchedule, nnUNetTrainerMbLS):
    pass


class nnUNetTrainerMbLSDice_demo(ShortSchedule, nnUNetTrainerMbLSDice):
    pass


class nnUNetTrainerWithCalibration_demo(ShortSchedule, nnUNetTrainerWithCalibration):
    pass


class nnUNetTrainer_demo(ShortSchedule, nnUNetTrainer):
    """nnU-Net's own trainer on the same short schedule (the baseline for `nnunet-margin calibration`)."""
