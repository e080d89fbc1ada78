"""nnU-Net trainers: thin compositions of the losses, the loss assembly and the calibration validation hook.

Hyper-parameters are class attributes, so a variant is a one-line subclass whose name records them (nnU-Net's
convention: the results folder is named after the trainer). Every class overrides only nnU-Net hooks and calls
`super()`, so it combines with other nnU-Net variants by multiple inheritance, e.g.
`class MyTrainer(nnUNetTrainerMbLS, nnUNetTrainerNoMirroring): pass`.
"""

from __future__ import annotations

import numpy as np
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from ._atomic import atomic_path
from .losses import MarginCalibrationLoss, MbLSLoss
from .nnunet.loss_assembly import assemble_loss
from .nnunet.margin_record import (add_record_to_checkpoint, read_record, record_from_checkpoint, shared_fold_record,
                                   write_record)
from .nnunet.validation import measuring_calibration, write_validation_report


class nnUNetTrainerWithCalibration(nnUNetTrainer):
    """nnU-Net's default trainer plus calibration metrics in the final validation (the baseline for comparisons).

    Writes validation/calibration.json and validation/reliability.png; for losses of several terms, it logs each
    term's per-epoch mean and share.
    """

    def _reject_regions(self) -> None:
        if self.label_manager.has_regions:
            raise ValueError(
                f"{type(self).__name__} needs label-based (softmax) training, but dataset.json defines regions "
                f"(sigmoid outputs). Margin calibration, MbLS and the multi-class calibration metrics are not defined "
                f"for overlapping regions; train regions with nnU-Net's own nnUNetTrainer.")

    def initialize(self):
        self._reject_regions()
        super().initialize()

    def train_step(self, batch: dict) -> dict:
        result = super().train_step(batch)
        for name, value in getattr(self.loss, "components", {}).items():
            result[f"loss_part/{name}"] = float(value)
        return result

    def on_train_epoch_end(self, train_outputs: list[dict]):
        super().on_train_epoch_end(train_outputs)
        names = [key for key in train_outputs[0] if key.startswith("loss_part/")] if train_outputs else []
        if len(names) < 2:
            return
        means = {name: float(np.mean([output[name] for output in train_outputs])) for name in names}
        if self.is_ddp:
            import torch.distributed as dist

            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, means)
            means = {name: float(np.mean([g[name] for g in gathered])) for name in names}
        total = sum(means.values())
        logged = self.logger.local_logger.my_fantastic_logging
        for name, value in means.items():
            key = "train_" + name.replace("/", "_")
            # LocalLogger only accepts registered keys; pad epochs logged before this key existed (old checkpoints)
            logged.setdefault(key, [float("nan")] * self.current_epoch)
            self.logger.log(key, value, self.current_epoch)
        self.print_to_log_file("loss parts: " + ", ".join(
            f"{name.removeprefix('loss_part/')} {value:.4f}" + (f" ({100 * value / total:.1f}%)" if total else "")
            for name, value in means.items()))

    def perform_actual_validation(self, save_probabilities: bool = False):
        with measuring_calibration(self) as scratch:
            super().perform_actual_validation(save_probabilities)
        if self.local_rank == 0:
            report = write_validation_report(self, scratch)
            foreground = report["summary"]["foreground"]["pooled"]  # None where no voxel was foreground
            metrics = ", ".join(f"{label} {'n/a' if foreground[key] is None else f'{foreground[key]:.4f}'}"
                                for label, key in (("ECE", "ece"), ("classwise ECE", "classwise_ece"),
                                                   ("Brier", "brier"), ("NLL", "nll")))
            self.print_to_log_file(f"Calibration (foreground, pooled over cases): {metrics}; see "
                                   f"validation/calibration.json and validation/reliability.png",
                                   also_print_to_console=True)


class nnUNetTrainerMarginCalib(nnUNetTrainerWithCalibration):
    """Distribution-aware Margin Calibration (Yu et al., AAAI 2021 / IJCV 2022) as the only loss.

    The offsets come from the class voxel counts of the fold's preprocessed training cases, are written to
    `margin_offsets.json` in the fold folder and stored in every checkpoint; `--c` and `--val` use the recorded ones.
    """

    tau: float = 10.0
    upsilon: float = 1.0
    loss_form: str = "released"
    empty_classes: str = "error"
    dice_weight: float = 0.0
    label_stats_processes: int = 4

    margin_record: dict | None = None

    def _build_loss(self):
        if self.margin_record is None:
            self.margin_record = shared_fold_record(self, tau=self.tau, upsilon=self.upsilon,
                                                    empty_classes=self.empty_classes,
                                                    num_processes=self.label_stats_processes)
        margin_loss = MarginCalibrationLoss(self.margin_record["rho_k0"], self.margin_record["rho_0k"],
                                            form=self.loss_form, ignore_index=self.label_manager.ignore_label)
        terms = {"margin_calibration": (1.0, margin_loss)}
        if self.dice_weight:
            terms["dice"] = (self.dice_weight, None)
        return assemble_loss(self, **terms)

    def on_train_start(self):
        super().on_train_start()
        if self.local_rank == 0:
            write_record(self.output_folder, self.margin_record)
            self.print_to_log_file("Margin offsets (rho_0k, rho_k0) per class: " + ", ".join(
                f"{name} {rho_0k:.4g}/{rho_k0:.3g}" for name, rho_0k, rho_k0 in zip(
                    self.margin_record["class_names"], self.margin_record["rho_0k"], self.margin_record["rho_k0"])))

    def save_checkpoint(self, filename: str) -> None:
        if self.local_rank != 0 or self.disable_checkpointing:
            super().save_checkpoint(filename)  # writes nothing here, but logs as nnU-Net does
            return
        with atomic_path(filename) as temporary:  # nnU-Net's write plus the record, replacing the old file at once
            super().save_checkpoint(str(temporary))
            add_record_to_checkpoint(str(temporary), self.margin_record)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        # Before nnU-Net's load_checkpoint, which initialises the trainer and so builds the loss: --c and --val
        # then use the recorded offsets and never recount labels (the data or the split may have changed since).
        # nnU-Net 2.8 only loads checkpoints given as file names; older ones lack the record: use the fold's JSON.
        recorded = record_from_checkpoint(filename_or_checkpoint) or read_record(self.output_folder)
        rebuild = self.was_initialized and recorded is not None and recorded != self.margin_record
        if recorded is not None:
            self.print_to_log_file("Using the margin offsets recorded with the checkpoint.")
            self.margin_record = recorded
        super().load_checkpoint(filename_or_checkpoint)
        if rebuild:
            self.loss = self._build_loss()


class nnUNetTrainerMarginCalibDice(nnUNetTrainerMarginCalib):
    """Margin calibration + nnU-Net's soft Dice (the AAAI paper's combination), weights 1 and 1."""

    dice_weight = 1.0


class nnUNetTrainerMarginCalib_tau5(nnUNetTrainerMarginCalib):
    tau = 5.0


class nnUNetTrainerMarginCalib_tau20(nnUNetTrainerMarginCalib):
    tau = 20.0


class nnUNetTrainerMarginCalib_paperLoss(nnUNetTrainerMarginCalib):
    """The IJCV paper's rho-calibrated log2 loss instead of the released code's BCE form."""

    loss_form = "paper"


class nnUNetTrainerMarginCalib_emptyAsOne(nnUNetTrainerMarginCalib):
    """Classes absent from the fold's training cases count as one voxel instead of stopping training."""

    empty_classes = "count_as_one"


class nnUNetTrainerMarginCalibDice_tau5(nnUNetTrainerMarginCalibDice):
    tau = 5.0


class nnUNetTrainerMbLS(nnUNetTrainerWithCalibration):
    """Margin-based Label Smoothing (Liu et al., CVPR 2022 / MedIA 2023): CE + alpha * ReLU(logit distance - margin).

    The per-epoch log shows the penalty's share of the loss. Set `mbls_schedule` ("add", "multiply", "step") with
    `mbls_schedule_factor` (and `mbls_schedule_step_size` for "step") in a subclass for the released code's alpha
    schedule (off by default).
    """

    mbls_margin: float = 10.0
    mbls_alpha: float = 0.1
    mbls_schedule: str | None = None
    mbls_schedule_factor: float = 0.0
    mbls_schedule_step_size: int = 100
    mbls_max_alpha: float = 100.0
    dice_weight: float = 0.0

    def _build_loss(self):
        mbls = MbLSLoss(margin=self.mbls_margin, alpha=self.mbls_alpha, ignore_index=self.label_manager.ignore_label,
                        schedule=self.mbls_schedule, schedule_factor=self.mbls_schedule_factor,
                        schedule_step_size=self.mbls_schedule_step_size, max_alpha=self.mbls_max_alpha)
        terms = {"mbls": (1.0, mbls)}
        if self.dice_weight:
            terms["dice"] = (self.dice_weight, None)
        return assemble_loss(self, **terms)

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        if self.mbls_schedule is not None:
            for module in self.loss.modules():
                if isinstance(module, MbLSLoss):
                    self.print_to_log_file(f"MbLS alpha: {module.step_alpha(self.current_epoch):.4g}")


class nnUNetTrainerMbLSDice(nnUNetTrainerMbLS):
    """nnU-Net's default Dice + CE, plus the MbLS margin penalty."""

    dice_weight = 1.0


class nnUNetTrainerMbLS_m5(nnUNetTrainerMbLS):
    mbls_margin = 5.0


class nnUNetTrainerMbLS_m8(nnUNetTrainerMbLS):
    mbls_margin = 8.0


class nnUNetTrainerMbLS_m10(nnUNetTrainerMbLS):
    mbls_margin = 10.0


class nnUNetTrainerMbLS_m10_alpha02(nnUNetTrainerMbLS):
    mbls_alpha = 0.2


class nnUNetTrainerMbLSDice_m5(nnUNetTrainerMbLSDice):
    mbls_margin = 5.0


class nnUNetTrainerMbLSDice_m8(nnUNetTrainerMbLSDice):
    mbls_margin = 8.0


__all__ = [name for name, value in dict(globals()).items()
           if isinstance(value, type) and issubclass(value, nnUNetTrainer) and name.startswith("nnUNetTrainer")
           and name != "nnUNetTrainer"]
