"""Short-schedule variants for the demo and the end-to-end tests (a few iterations on the CPU).

Not shipped in the wheel: the demo puts this folder into nnUNet_extTrainer beside `nnunet-margin trainers-path`.
"""

import os

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_margin import methods, trainers


class ShortSchedule:
    """Mixin: `num_epochs` epochs of a few iterations each (set NNUNET_MARGIN_DEMO_EPOCHS and _ITERATIONS to change
    them), and no test-time mirroring (8x faster validation and prediction on the CPU) unless
    NNUNET_MARGIN_DEMO_MIRRORING=1 keeps nnU-Net's default."""

    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = int(os.environ.get("NNUNET_MARGIN_DEMO_EPOCHS", "1"))
        self.num_iterations_per_epoch = int(os.environ.get("NNUNET_MARGIN_DEMO_ITERATIONS", "2"))
        self.num_val_iterations_per_epoch = 1

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        if os.environ.get("NNUNET_MARGIN_DEMO_MIRRORING") == "1":
            return rotation, dummy_2d, initial_patch_size, mirror_axes
        self.inference_allowed_mirroring_axes = None  # as nnU-Net's nnUNetTrainerNoMirroring
        return rotation, dummy_2d, initial_patch_size, None


def _short(trainer: type) -> type:
    return type(f"{trainer.__name__}_demo", (ShortSchedule, trainer), {"__module__": __name__})


# nnU-Net finds trainers by class name in this module's namespace: nnU-Net's default and every trainer and variant of
# the method registry, each as <name>_demo.
for _trainer in [nnUNetTrainer] + [getattr(trainers, name) for name in methods.trainer_names()]:
    globals()[f"{_trainer.__name__}_demo"] = _short(_trainer)
del _trainer
