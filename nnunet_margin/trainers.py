"""nnU-Net trainers: a base that builds the loss from named terms, and one line per method of the registry.

A method's trainer is `class nnUNetTrainerX(MethodTrainer): method = methods.X`: its settings become class
attributes, and the registry's named variants (nnunet_margin/methods.py) are made here as subclasses that change
them, so a variant's name records its hyper-parameters (nnU-Net's convention: the results folder is named after the
trainer). Every class overrides only nnU-Net hooks and calls `super()`, so it combines with other nnU-Net variants by
multiple inheritance, e.g. `class MyTrainer(nnUNetTrainerMbLS, nnUNetTrainerNoMirroring): pass`.

A trainer of other losses subclasses `LossTermsTrainer` and returns them from `loss_terms()`; `dice_weight` adds
nnU-Net's soft Dice as a further term.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from . import methods
from .losses import LabelSmoothingLoss, MarginCalibrationLoss, SegmentationLoss
from .losses.base import nonfinite_logits_message, nonfinite_loss_message
from .methods import Method, is_weight
from .nnunet import _seams
from .nnunet._seams import nnUNetTrainer
from .nnunet.distributed import mean_over_ranks, on_rank_zero
from .nnunet.label_stats import trainer_label_counts
from .nnunet.loss_assembly import assemble_loss, check_terms, soft_dice
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

    def loss_terms(self) -> dict[str, tuple[float, SegmentationLoss]]:
        """The method's weighted loss terms {name: (weight > 0, SegmentationLoss)}; subclasses implement it."""
        raise NotImplementedError

    @property
    def ignore_label(self) -> int | None:
        return self.label_manager.ignore_label

    def _build_loss(self):
        name = type(self).__name__
        if not is_weight(self.dice_weight, allow_zero=True):
            raise ValueError(f"{name}.dice_weight = {self.dice_weight!r}: the weight of nnU-Net's soft Dice term "
                             f"must be a finite number >= 0 (0: no Dice term). Set dice_weight in the trainer class to "
                             f"0 or a positive weight.")
        terms = self.loss_terms()
        check_terms(f"{name}.loss_terms()", terms)
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


class MethodTrainer(LossTermsTrainer):
    """The trainer of a registry method (nnunet_margin/methods.py): a subclass only sets `method`.

    The method's settings are class attributes `<prefix>_<setting>` (e.g. `mbls_margin`), filled from the registry's
    defaults on the class that sets `method`; a variant is a subclass that changes some of them (the registry's
    variants are made by `variant_trainers`). The loss is the method's term with the registry's weight, beside a
    plain cross-entropy term where the method has one, plus nnU-Net's soft Dice with `dice_weight` (default: the
    method's).
    """

    method: ClassVar[Method]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        method = cls.__dict__.get("method")
        if method is None:
            return
        for attribute, setting in method.attributes.items():
            if attribute not in cls.__dict__:
                setattr(cls, attribute, method.settings[setting])
        if "dice_weight" not in cls.__dict__:
            cls.dice_weight = method.dice_weight
        if cls.__doc__ is None:
            cls.__doc__ = method.summary

    def method_settings(self) -> dict:
        """The method's settings from this trainer's attributes; a misspelt `<prefix>_...` attribute, or one of an
        earlier release's names, is refused."""
        method = self.method
        former = {name: now for name, now in method.renamed.items() if hasattr(type(self), name)}
        if former:
            raise ValueError(f"{type(self).__name__} sets " + ", ".join(
                f"{name} (now called {now})" for name, now in former.items()) + ": rename the attribute, or it "
                f"would be ignored")
        stray = [name for name in dir(type(self))
                 if name.startswith(f"{method.prefix}_") and name not in method.attributes]
        if stray:
            raise ValueError(f"{type(self).__name__} sets {', '.join(stray)}, which method {method.name!r} does "
                                 f"not know; its settings are {', '.join(method.attributes)} "
                                 f"(nnunet_margin/methods.py). Fix the attribute's name.")
        return {setting: getattr(self, attribute) for attribute, setting in method.attributes.items()}

    def build_method_loss(self) -> SegmentationLoss:
        """The method's loss from this trainer's settings."""
        try:
            return self.method.build(ignore_index=self.ignore_label,
                                     num_classes=self.label_manager.num_segmentation_heads, **self.method_settings())
        except ValueError as error:
            raise ValueError(f"{type(self).__name__} (settings from its attributes {self.method.prefix}_*): "
                             f"{error}") from error

    def loss_terms(self):
        method = self.method
        terms = {}
        if method.cross_entropy_weight:
            terms["ce"] = (method.cross_entropy_weight, LabelSmoothingLoss(epsilon=0.0, ignore_index=self.ignore_label))
        terms[method.term] = (method.weight, self.build_method_loss())
        return terms


def variant_trainers(base: type[MethodTrainer]) -> dict[str, type[MethodTrainer]]:
    """The registry's named variants of a method's trainer: one subclass each, setting the variant's attributes."""
    return {name: type(name, (base,), {**attributes, "__module__": base.__module__, "__qualname__": name,
                                       "__doc__": f"{base.__name__} with " + ", ".join(
                                           f"{key} = {value!r}" for key, value in attributes.items()) + "."})
            for name, attributes in base.method.variants.items()}


class nnUNetTrainerMarginCalib(MethodTrainer):
    """Distribution-aware Margin Calibration (Yu et al., AAAI 2021 / IJCV 2022) as the only loss.

    The offsets come from the class voxel counts of the fold's preprocessed training cases (the registry's builder,
    `MarginCalibrationLoss.from_counts`, computed once per fold), are written to `margin_offsets.json` in the fold
    folder and stored in every checkpoint; `--c` and `--val` use the recorded ones.
    """

    method = methods.MARGIN_CALIBRATION
    fold_offsets: dict | None = None  # counts, settings and offsets of the fold (margin_offsets.json)

    def build_method_loss(self):
        settings = self.method_settings()
        if self.fold_offsets is None:
            self.fold_offsets = on_rank_zero(self, lambda: compute_fold_record(
                self, tau=settings["tau"], upsilon=settings["upsilon"], empty_classes=settings["empty_classes"],
                num_processes=self.label_stats_processes))
        return MarginCalibrationLoss(self.fold_offsets["rho_k0"], self.fold_offsets["rho_0k"], form=settings["form"],
                                     ignore_index=self.ignore_label)

    def on_train_start(self):
        super().on_train_start()
        if self.local_rank == 0:
            write_record(self.output_folder, self.fold_offsets)
            self.print_to_log_file("Margin offsets (rho_0k, rho_k0) per class: " + ", ".join(
                f"{name} {rho_0k:.4g}/{rho_k0:.3g}" for name, rho_0k, rho_k0 in zip(
                    self.fold_offsets["class_names"], self.fold_offsets["rho_0k"], self.fold_offsets["rho_k0"])))

    def checkpoint_extras(self) -> dict:
        return {**super().checkpoint_extras(), "margin_record": self.fold_offsets}

    def before_loading_checkpoint(self, extras: dict) -> None:
        # Before nnU-Net's load_checkpoint, which initialises the trainer and so builds the loss: --c and --val then
        # use the recorded offsets and never recount labels (the data or the split may have changed since).
        recorded = record_from_checkpoint_extras(extras, self.output_folder)
        if recorded is None:
            return
        self.print_to_log_file("Using the margin offsets recorded with the checkpoint.")
        rebuild = self.was_initialized and recorded != self.fold_offsets
        self.fold_offsets = recorded
        if rebuild:
            self.loss = self._build_loss()


# One line per method: the trainer of each registry entry (methods.py holds its settings, terms and variants).
class nnUNetTrainerMbLS(MethodTrainer): method = methods.MBLS
class nnUNetTrainerFocal(MethodTrainer): method = methods.FOCAL
class nnUNetTrainerLS(MethodTrainer): method = methods.LABEL_SMOOTHING
class nnUNetTrainerECP(MethodTrainer): method = methods.ECP
class nnUNetTrainerSVLS(MethodTrainer): method = methods.SVLS
class nnUNetTrainerNACL(MethodTrainer): method = methods.NACL
class nnUNetTrainerHardL1ACE(MethodTrainer): method = methods.HARD_L1ACE
class nnUNetTrainerSoftL1ACE(MethodTrainer): method = methods.SOFT_L1ACE
class nnUNetTrainerCALS(MethodTrainer): method = methods.CALS


for _method in methods.METHODS:
    globals().update(variant_trainers(globals()[_method.trainer]))
del _method

__all__ = [name for name, value in dict(globals()).items()
           if isinstance(value, type) and issubclass(value, nnUNetTrainer) and name.startswith("nnUNetTrainer")
           and name != "nnUNetTrainer"]
