"""nnU-Net trainers: a base that builds the loss from named terms, then a few lines per method.

Hyper-parameters are class attributes, so a variant is a one-line subclass whose name records them (nnU-Net's
convention: the results folder is named after the trainer). Every class overrides only nnU-Net hooks and calls
`super()`, so it combines with other nnU-Net variants by multiple inheritance, e.g.
`class MyTrainer(nnUNetTrainerMbLS, nnUNetTrainerNoMirroring): pass`.

A new method is one `SegmentationLoss` in `nnunet_margin.losses` and a subclass of `LossTermsTrainer` whose
`loss_terms()` returns it; `dice_weight = 1.0` adds nnU-Net's soft Dice as a further term.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from .losses.base import nonfinite_logits_message, nonfinite_loss_message
from .losses import (CALSLoss, ConfidencePenaltyLoss, FocalLoss, HardL1ACELoss, LabelSmoothingLoss, MarginCalibrationLoss,
                     MbLSLoss, NACLLoss, SoftL1ACELoss, SVLSLoss)
from .nnunet import _seams
from .nnunet._seams import nnUNetTrainer
from .nnunet.distributed import mean_over_ranks, on_rank_zero
from .nnunet.label_stats import trainer_label_counts
from .nnunet.loss_assembly import assemble_loss, soft_dice
from .nnunet.margin_record import compute_fold_record, record_from_checkpoint_extras, write_record
from .nnunet.layout import FINAL_CHECKPOINT, PLUGIN_CHECKPOINT_KEY
from .nnunet.provenance import record_validation
from .nnunet.validation import measuring_calibration, write_validation_report


class nnUNetTrainerWithCalibration(nnUNetTrainer):
    """nnU-Net's default trainer plus calibration metrics in the final validation (the baseline for comparisons).

    Writes validation/calibration.json, validation/reliability.png, validation/logit_sample.nnunet_margin (the
    sample post-hoc calibrators are fitted on) and validation/provenance.json (the checkpoint the validated network came from). The plugin's additions to a checkpoint go under the key `nnunet_margin`;
    checkpoints are read once and written once, atomically.
    """

    network_checkpoint: str | None = FINAL_CHECKPOINT  # the file the network's weights came from (see load_checkpoint)
    logit_sample_voxels: int = 2_000_000  # validation/logit_sample.nnunet_margin for fit-calibration (0: none)

    def initialize(self):
        if self.label_manager.has_regions:
            raise ValueError(
                f"{type(self).__name__} needs label-based (softmax) training, but dataset.json defines regions "
                f"(sigmoid outputs). The calibration losses and the multi-class calibration metrics are not defined "
                f"for overlapping regions; train regions with nnU-Net's own nnUNetTrainer.")
        super().initialize()

    def perform_actual_validation(self, save_probabilities: bool = False):
        with measuring_calibration(self) as scratch:
            super().perform_actual_validation(save_probabilities)
        if self.local_rank == 0:
            report = write_validation_report(self, scratch)
            if self.network_checkpoint is not None and (Path(self.output_folder) / self.network_checkpoint).is_file():
                record_validation(self.output_folder, self.network_checkpoint)  # after every file it vouches for
            foreground = report["summary"]["foreground"]["pooled"]  # None where no voxel was foreground
            metrics = ", ".join(f"{label} {'n/a' if foreground[key] is None else f'{foreground[key]:.4f}'}"
                                for label, key in (("ECE", "ece"), ("classwise ECE", "classwise_ece"),
                                                   ("Brier", "brier"), ("NLL", "nll")))
            self.print_to_log_file(f"Calibration (foreground, pooled over cases): {metrics}; see "
                                   f"validation/calibration.json and validation/reliability.png",
                                   also_print_to_console=True)

    def on_train_end(self):
        super().on_train_end()  # saves checkpoint_final.pth from the network in memory
        self.network_checkpoint = FINAL_CHECKPOINT

    def checkpoint_extras(self) -> dict:
        """What the plugin adds to every checkpoint (under the key `nnunet_margin`)."""
        return {}

    def restore_checkpoint_extras(self, extras: dict) -> None:
        """Called after nnU-Net's load_checkpoint with what `checkpoint_extras` stored (empty for old checkpoints)."""

    def before_loading_checkpoint(self, extras: dict) -> None:
        """Called with the checkpoint's extras before nnU-Net's load_checkpoint, which may build the loss."""

    def save_checkpoint(self, filename: str) -> None:
        if self.local_rank != 0 or self.disable_checkpointing:
            super().save_checkpoint(filename)  # writes nothing here, but logs as nnU-Net does
            return
        _seams.save_checkpoint_with(super().save_checkpoint, filename,
                                    {PLUGIN_CHECKPOINT_KEY: self.checkpoint_extras()})

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        if isinstance(filename_or_checkpoint, dict):
            checkpoint, name = filename_or_checkpoint, None
        else:
            checkpoint = torch.load(filename_or_checkpoint, map_location=self.device, weights_only=False)
            name = Path(filename_or_checkpoint).name
        extras = checkpoint.get(PLUGIN_CHECKPOINT_KEY) or {}
        self.before_loading_checkpoint(extras)
        _seams.load_checkpoint_once(super().load_checkpoint, checkpoint, name or "(dict)")
        self.restore_checkpoint_extras(extras)
        self.network_checkpoint = name


class LossTermsTrainer(nnUNetTrainerWithCalibration):
    """Base of the plugin's loss trainers: the loss is `loss_terms()` plus nnU-Net's soft Dice (`dice_weight`),
    with nnU-Net's deep supervision.

    Labels are checked once before training (cached label statistics; a bad label names its case), the loss value
    every step from the host copy nnU-Net makes anyway, and each term's per-epoch mean is logged as
    `train_loss_part_<term>` when the loss has several terms; nothing here synchronises with the GPU per step.
    Training state of the losses (their buffers, e.g. CALS multipliers) is kept in every checkpoint.
    """

    dice_weight: float = 0.0
    label_stats_processes: int = 4

    _part_names: list[str] | None = None
    _part_sums: torch.Tensor | None = None
    _part_steps: int = 0

    def loss_terms(self) -> dict[str, tuple[float, nn.Module]]:
        """The method's weighted loss terms {name: (weight, loss)}; subclasses implement it."""
        raise NotImplementedError

    @property
    def ignore_label(self) -> int | None:
        return self.label_manager.ignore_label

    def _build_loss(self):
        terms = self.loss_terms()
        if self.dice_weight:
            terms["dice"] = (self.dice_weight, soft_dice(self))
        return assemble_loss(self, terms)

    def on_train_start(self):
        super().on_train_start()
        on_rank_zero(self, lambda: trainer_label_counts(self, self.label_stats_processes))

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        for term in self.loss.segmentation_losses():
            self._log_line(term.start_epoch(self.current_epoch))

    def train_step(self, batch: dict) -> dict:
        result = super().train_step(batch)
        if not np.isfinite(_seams.train_step_loss(result)):  # nnU-Net's host copy: no extra synchronisation
            self._raise_nonfinite_loss()
        components = self.loss.components
        if len(components) > 1:
            stacked = torch.stack([value.float() for value in components.values()])
            if self._part_sums is None:
                self._part_names, self._part_sums, self._part_steps = list(components), stacked, 0
            else:
                self._part_sums = self._part_sums + stacked
            self._part_steps += 1
        return result

    def _raise_nonfinite_loss(self):
        where = f"{type(self).__name__}, epoch {self.current_epoch}"
        outputs_finite = bool(self.loss.outputs_finite)  # error path only
        raise FloatingPointError(nonfinite_loss_message(where) if outputs_finite else nonfinite_logits_message(where))

    def on_train_epoch_end(self, train_outputs: list[dict]):
        super().on_train_epoch_end(train_outputs)
        if self._part_sums is None:
            return
        means = dict(zip(self._part_names, (self._part_sums / self._part_steps).tolist()))  # once per epoch
        self._part_sums = None
        means = mean_over_ranks(self, means)
        total = sum(means.values())
        for name, value in means.items():
            key = f"train_loss_part_{name}"
            _seams.register_log_key(self, key)
            self.logger.log(key, value, self.current_epoch)
        self.print_to_log_file("loss parts: " + ", ".join(
            f"{name} {value:.4f}" + (f" ({100 * value / total:.1f}%)" if total else "")
            for name, value in means.items()))

    def on_validation_epoch_start(self):
        super().on_validation_epoch_start()
        self.loss.observing = True

    def on_validation_epoch_end(self, val_outputs: list[dict]):
        super().on_validation_epoch_end(val_outputs)
        self.loss.observing = False
        for term in self.loss.segmentation_losses():
            self._log_line(term.finish_validation())

    def _log_line(self, line: str | None) -> None:
        if line is not None:
            self.print_to_log_file(line)

    def checkpoint_extras(self) -> dict:
        return {**super().checkpoint_extras(),
                "loss_state": {name: value.cpu() for name, value in self.loss.state_dict().items()}}

    def restore_checkpoint_extras(self, extras: dict) -> None:
        super().restore_checkpoint_extras(extras)
        if "loss_state" in extras:
            self.loss.load_state_dict(extras["loss_state"])


class nnUNetTrainerMarginCalib(LossTermsTrainer):
    """Distribution-aware Margin Calibration (Yu et al., AAAI 2021 / IJCV 2022) as the only loss.

    The offsets come from the class voxel counts of the fold's preprocessed training cases, are written to
    `margin_offsets.json` in the fold folder and stored in every checkpoint; `--c` and `--val` use the recorded ones.
    """

    tau: float = 10.0
    upsilon: float = 1.0
    loss_form: str = "released"
    empty_classes: str = "error"

    margin_record: dict | None = None

    def loss_terms(self):
        if self.margin_record is None:
            self.margin_record = on_rank_zero(self, lambda: compute_fold_record(
                self, tau=self.tau, upsilon=self.upsilon, empty_classes=self.empty_classes,
                num_processes=self.label_stats_processes))
        loss = MarginCalibrationLoss(self.margin_record["rho_k0"], self.margin_record["rho_0k"],
                                     form=self.loss_form, ignore_index=self.ignore_label)
        return {"margin_calibration": (1.0, loss)}

    def on_train_start(self):
        super().on_train_start()
        if self.local_rank == 0:
            write_record(self.output_folder, self.margin_record)
            self.print_to_log_file("Margin offsets (rho_0k, rho_k0) per class: " + ", ".join(
                f"{name} {rho_0k:.4g}/{rho_k0:.3g}" for name, rho_0k, rho_k0 in zip(
                    self.margin_record["class_names"], self.margin_record["rho_0k"], self.margin_record["rho_k0"])))

    def checkpoint_extras(self) -> dict:
        return {**super().checkpoint_extras(), "margin_record": self.margin_record}

    def before_loading_checkpoint(self, extras: dict) -> None:
        # Before nnU-Net's load_checkpoint, which initialises the trainer and so builds the loss: --c and --val then
        # use the recorded offsets and never recount labels (the data or the split may have changed since).
        recorded = record_from_checkpoint_extras(extras, self.output_folder)
        if recorded is None:
            return
        self.print_to_log_file("Using the margin offsets recorded with the checkpoint.")
        rebuild = self.was_initialized and recorded != self.margin_record
        self.margin_record = recorded
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


class nnUNetTrainerMbLS(LossTermsTrainer):
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

    def loss_terms(self):
        return {"mbls": (1.0, MbLSLoss(margin=self.mbls_margin, alpha=self.mbls_alpha, ignore_index=self.ignore_label,
                                       schedule=self.mbls_schedule, schedule_factor=self.mbls_schedule_factor,
                                       schedule_step_size=self.mbls_schedule_step_size,
                                       max_alpha=self.mbls_max_alpha))}


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

class nnUNetTrainerFocal(LossTermsTrainer):
    """Focal loss (Lin et al., ICCV 2017): mean -(1 - p_y)^gamma log p_y, gamma 2 (docs/methods.md 4a)."""

    focal_gamma: float = 2.0

    def loss_terms(self):
        return {"focal": (1.0, FocalLoss(gamma=self.focal_gamma, ignore_index=self.ignore_label))}


class nnUNetTrainerFocalDice(nnUNetTrainerFocal):
    dice_weight = 1.0


class nnUNetTrainerFocal_g1(nnUNetTrainerFocal):
    focal_gamma = 1.0


class nnUNetTrainerFocal_g3(nnUNetTrainerFocal):
    focal_gamma = 3.0


class nnUNetTrainerLS(LossTermsTrainer):
    """Label smoothing: CE against (1 - eps) onehot + eps / K, eps 0.1 (docs/methods.md 4b)."""

    ls_epsilon: float = 0.1

    def loss_terms(self):
        return {"label_smoothing": (1.0, LabelSmoothingLoss(epsilon=self.ls_epsilon, ignore_index=self.ignore_label))}


class nnUNetTrainerLSDice(nnUNetTrainerLS):
    dice_weight = 1.0


class nnUNetTrainerLS_e02(nnUNetTrainerLS):
    ls_epsilon = 0.2


class nnUNetTrainerLS_e03(nnUNetTrainerLS):
    ls_epsilon = 0.3


class nnUNetTrainerECP(LossTermsTrainer):
    """Explicit confidence penalty (Pereyra et al., 2017): CE - beta * mean entropy, beta 0.1 (docs/methods.md 4c)."""

    ecp_beta: float = 0.1

    def loss_terms(self):
        return {"ecp": (1.0, ConfidencePenaltyLoss(beta=self.ecp_beta, ignore_index=self.ignore_label))}


class nnUNetTrainerECPDice(nnUNetTrainerECP):
    dice_weight = 1.0


class nnUNetTrainerECP_b02(nnUNetTrainerECP):
    ecp_beta = 0.2


class nnUNetTrainerECP_b03(nnUNetTrainerECP):
    ecp_beta = 0.3


class nnUNetTrainerSVLS(LossTermsTrainer):
    """Spatially varying label smoothing (Islam & Glocker, IPMI 2021): CE against the one-hot target smoothed by a
    3^d Gaussian kernel, sigma 1 (docs/methods.md 4d)."""

    svls_sigma: float = 1.0

    def loss_terms(self):
        return {"svls": (1.0, SVLSLoss(sigma=self.svls_sigma, ignore_index=self.ignore_label))}


class nnUNetTrainerSVLSDice(nnUNetTrainerSVLS):
    dice_weight = 1.0


class nnUNetTrainerNACL(LossTermsTrainer):
    """Neighbor-aware calibration loss (Murugesan et al., MICCAI 2023): CE + alpha * mean |tau - z| with tau the
    one-hot target under a 3^d mean filter, alpha 0.1 (docs/methods.md 4e)."""

    nacl_alpha: float = 0.1
    nacl_kernel_size: int = 3
    nacl_kernel: str = "mean"
    nacl_distance: str = "l1"

    def loss_terms(self):
        return {"nacl": (1.0, NACLLoss(alpha=self.nacl_alpha, kernel_size=self.nacl_kernel_size,
                                       kernel=self.nacl_kernel, distance=self.nacl_distance,
                                       ignore_index=self.ignore_label))}


class nnUNetTrainerNACLDice(nnUNetTrainerNACL):
    dice_weight = 1.0


class nnUNetTrainerHardL1ACE(LossTermsTrainer):
    """Marginal L1 average calibration error loss (Barfoot et al., MICCAI 2024), hard binning, 20 bins: nnU-Net's
    Dice + CE + mL1-ACE, a third each (docs/methods.md 4f)."""

    dice_weight = 1 / 3
    ace_bins: int = 20
    ace_loss = HardL1ACELoss

    def loss_terms(self):
        return {"ce": (1 / 3, LabelSmoothingLoss(epsilon=0.0, ignore_index=self.ignore_label)),  # plain CE
                "ace": (1 / 3, self.ace_loss(num_bins=self.ace_bins, ignore_index=self.ignore_label))}


class nnUNetTrainerSoftL1ACE(nnUNetTrainerHardL1ACE):
    """As nnUNetTrainerHardL1ACE with soft (interpolated) binning."""

    ace_loss = SoftL1ACELoss


class nnUNetTrainerCALS(LossTermsTrainer):
    """Class-adaptive label smoothing (Liu et al., CVPR 2023): CE + an augmented-Lagrangian margin penalty with one
    multiplier per class, updated from each epoch's validation logits, margin 20 (docs/methods.md 4g). The
    multipliers are kept in the checkpoints (`--c` resumes them), averaged over DDP ranks, and their mean and max
    are logged every epoch."""

    cals_margin: float = 20.0

    def loss_terms(self):
        return {"cals": (1.0, CALSLoss(self.label_manager.num_segmentation_heads, margin=self.cals_margin,
                                       ignore_index=self.ignore_label))}


class nnUNetTrainerCALSDice(nnUNetTrainerCALS):
    dice_weight = 1.0


class nnUNetTrainerCALS_m10(nnUNetTrainerCALS):
    cals_margin = 10.0


__all__ = [name for name, value in dict(globals()).items()
           if isinstance(value, type) and issubclass(value, nnUNetTrainer) and name.startswith("nnUNetTrainer")
           and name != "nnUNetTrainer"]
