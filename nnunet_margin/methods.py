"""The method registry: every calibration method the package trains, in one place.

A method is three pieces: a `SegmentationLoss` (a file in `nnunet_margin/losses/`), one `Method` entry in
`METHODS` below, and one trainer line in `trainers.py` (`class nnUNetTrainerX(MethodTrainer): method = methods.X`).
The entry holds what would otherwise be repeated wherever methods are listed: the loss and its default settings
(which become the trainer's class attributes `<prefix>_<setting>`), the names of its terms, the trainer and its
named variants, and what the tests compare it against. The loss tests, the trainer and host-synchronisation tests,
the end-to-end method trainings, the demo trainers (demo/trainers/) and bench/bench_losses.py iterate over
`METHODS`; tests fail, naming the class, when a loss in `losses/` or a trainer exists outside it.

Why trainers are named, not imported: this module needs only `losses` (plain torch), so the loss tests and the loss
benchmark use the registry without importing nnU-Net, and the package's dependencies keep pointing one way
(trainers -> nnunet glue -> methods, losses). The nnU-Net-facing half, turning an entry into trainer classes, is
`trainers.MethodTrainer`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from .losses import (CALSLoss, ConfidencePenaltyLoss, FocalLoss, HardL1ACELoss, LabelSmoothingLoss,
                     MarginCalibrationLoss, MbLSLoss, NACLLoss, SegmentationLoss, SoftL1ACELoss, SVLSLoss)

# What a loss builder may take from the training besides its settings: the number of output channels, and the
# voxel count of every class over the fold's training cases (background first).
CONTEXT = ("num_classes", "counts")
# nnU-Net's own Dice + CE with the calibration report: the baseline trainer, which belongs to no method.
BASELINE_TRAINER = "nnUNetTrainerWithCalibration"


@dataclass(frozen=True, eq=False)
class Method:
    """One calibration method: its loss, settings, terms, trainers and test references."""

    name: str  # identifier (test ids, messages); also the term name and the attribute prefix unless given below
    loss: type[SegmentationLoss]
    settings: Mapping[str, Any]  # the builder's keyword arguments and their defaults (docs/methods.md)
    trainer: str  # the trainer class (trainers.py), which trains with `settings`
    summary: str  # the loss in one line (the trainer's docstring)
    parts: tuple[str, ...] = ()  # the names of loss.parts()' terms; () for a loss of one term
    compared_with: tuple[str, ...] = ()  # what the tests compare the loss against
    variants: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # trainer name -> attributes it sets
    term: str = ""  # the term's name in the trainer's loss (log keys, checkpoint keys); default `name`
    prefix: str = ""  # the trainer attributes are `<prefix>_<setting>`; default `name`
    builder: Callable[..., SegmentationLoss] | None = None  # builds the loss; default the loss class
    context: tuple[str, ...] = ()  # what the builder takes from the training (see CONTEXT)
    weight: float = 1.0  # the term's weight in the trainer's loss
    cross_entropy_weight: float = 0.0  # weight of a plain cross-entropy term "ce" beside it (0: none)
    dice_weight: float = 0.0  # the base trainer's weight of nnU-Net's soft Dice (0: none)
    test_settings: tuple[Mapping[str, Any], ...] = ({},)  # settings under which random logits reach every term
    neighbourhood: bool = False  # a voxel's loss depends on its neighbours' labels (soft targets from them)
    renamed: Mapping[str, str] = field(default_factory=dict)  # former trainer attribute -> its name now (refused)

    def __post_init__(self):
        object.__setattr__(self, "term", self.term or self.name)
        object.__setattr__(self, "prefix", self.prefix or self.name)
        where = f"method {self.name!r}"
        if not (isinstance(self.loss, type) and issubclass(self.loss, SegmentationLoss)):
            raise TypeError(f"{where}: loss must be a SegmentationLoss subclass, got {self.loss!r}")
        if not is_weight(self.weight, allow_zero=False):
            raise ValueError(f"{where}: weight must be a finite number > 0, got {self.weight!r}")
        for name in ("cross_entropy_weight", "dice_weight"):
            if not is_weight(getattr(self, name), allow_zero=True):
                raise ValueError(f"{where}: {name} must be a finite number >= 0 (0: no such term), got "
                                 f"{getattr(self, name)!r}")
        if unknown := set(self.context) - set(CONTEXT):
            raise ValueError(f"{where}: context {sorted(unknown)} is not one of {CONTEXT}")
        for settings in self.test_settings:
            self.check_settings(settings, where + " test_settings")
        for variant, attributes in self.variants.items():
            if unknown := set(attributes) - set(self.attributes) - {"dice_weight"}:
                raise ValueError(f"{where}: variant {variant} sets {sorted(unknown)}, which are no attributes of the "
                                 f"method's trainers ({', '.join(self.attributes)}, dice_weight)")

    @property
    def attributes(self) -> dict[str, str]:
        """Trainer attribute -> setting, e.g. {"mbls_margin": "margin", ...}."""
        return {f"{self.prefix}_{setting}": setting for setting in self.settings}

    @property
    def trainers(self) -> tuple[str, ...]:
        """The trainer and its variants, by class name."""
        return (self.trainer, *self.variants)

    def check_settings(self, settings: Mapping[str, Any], where: str) -> None:
        if unknown := set(settings) - set(self.settings):
            raise ValueError(f"{where}: {sorted(unknown)} are no settings of method {self.name!r} (its settings: "
                             f"{', '.join(self.settings)})")

    def build(self, *, ignore_index: int | None = None, num_classes: int | None = None, counts=None,
              **settings) -> SegmentationLoss:
        """The loss with the default settings updated by `settings`, and what it needs from the training."""
        self.check_settings(settings, "build")
        context = {"num_classes": num_classes, "counts": counts}
        if missing := [name for name in self.context if context[name] is None]:
            raise ValueError(f"method {self.name!r} builds its loss from {', '.join(missing)}; pass it to build()")
        return (self.builder or self.loss)(**{**self.settings, **settings},
                                           **{name: context[name] for name in self.context}, ignore_index=ignore_index)

    def components(self, dice_weight: float) -> list[str]:
        """The names under which a trainer's loss reports its terms (`train_loss_part_<name>`), in order:
        `<term>_<part>` for a term of several parts, else `<term>`; empty when the loss has a single term."""
        own = [f"{self.term}_{part}" for part in self.parts] or [self.term]
        names = (["ce"] if self.cross_entropy_weight else []) + own + (["dice"] if dice_weight else [])
        return names if len(names) > 1 else []


def is_weight(value: Any, allow_zero: bool) -> bool:
    """A finite real number > 0 (>= 0 with allow_zero)."""
    return (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
            and (value >= 0 if allow_zero else value > 0))


MARGIN_CALIBRATION = Method(
    name="margin_calibration", prefix="margin", loss=MarginCalibrationLoss,
    builder=MarginCalibrationLoss.from_counts, context=("counts",),
    settings={"tau": 10.0, "upsilon": 1.0, "empty_classes": "error", "form": "released"},
    parts=(), trainer="nnUNetTrainerMarginCalib",
    summary="Distribution-aware Margin Calibration (Yu et al., AAAI 2021 / IJCV 2022): BCE on margin-calibrated "
            "scores with per-class offsets from the fold's label distribution (docs/methods.md 1).",
    compared_with=("the released code's offsets and loss value (yutao1008/margin_calibration, docs/methods.md 1)",
                   "a naive implementation with autograd"),
    variants={"nnUNetTrainerMarginCalibDice": {"dice_weight": 1.0},
              "nnUNetTrainerMarginCalib_tau5": {"margin_tau": 5.0},
              "nnUNetTrainerMarginCalib_tau20": {"margin_tau": 20.0},
              "nnUNetTrainerMarginCalib_paperLoss": {"margin_form": "paper"},
              "nnUNetTrainerMarginCalib_emptyAsOne": {"margin_empty_classes": "count_as_one"},
              "nnUNetTrainerMarginCalibDice_tau5": {"dice_weight": 1.0, "margin_tau": 5.0}},
    test_settings=({}, {"form": "paper"}),
    renamed={"tau": "margin_tau", "upsilon": "margin_upsilon", "loss_form": "margin_form",
             "empty_classes": "margin_empty_classes"})

MBLS = Method(
    name="mbls", loss=MbLSLoss,
    settings={"margin": 10.0, "alpha": 0.1, "schedule": None, "schedule_factor": 0.0, "schedule_step_size": 100,
              "max_alpha": 100.0},
    parts=("ce", "penalty"), trainer="nnUNetTrainerMbLS",
    summary="Margin-based Label Smoothing (Liu et al., CVPR 2022; Murugesan et al., MedIA 2023): CE + alpha * mean "
            "ReLU(max_j z_j - z_k - margin) (docs/methods.md 2); mbls_schedule sets the released alpha schedule.",
    compared_with=("the released code's values (by-liu/MbLS LogitMarginL1, docs/methods.md 2)",
                   "a naive implementation with autograd"),
    variants={"nnUNetTrainerMbLSDice": {"dice_weight": 1.0},
              "nnUNetTrainerMbLS_m5": {"mbls_margin": 5.0},
              "nnUNetTrainerMbLS_m8": {"mbls_margin": 8.0},
              "nnUNetTrainerMbLS_m10": {"mbls_margin": 10.0},
              "nnUNetTrainerMbLS_m10_alpha02": {"mbls_alpha": 0.2},
              "nnUNetTrainerMbLSDice_m5": {"dice_weight": 1.0, "mbls_margin": 5.0},
              "nnUNetTrainerMbLSDice_m8": {"dice_weight": 1.0, "mbls_margin": 8.0}},
    test_settings=({"margin": 1.0, "alpha": 0.5},))

FOCAL = Method(
    name="focal", loss=FocalLoss, settings={"gamma": 2.0}, parts=(), trainer="nnUNetTrainerFocal",
    summary="Focal loss (Lin et al., ICCV 2017): mean -(1 - p_y)^gamma log p_y (docs/methods.md 4a).",
    compared_with=("MONAI 1.6.1 FocalLoss (times K)", "a naive implementation with autograd"),
    variants={"nnUNetTrainerFocalDice": {"dice_weight": 1.0},
              "nnUNetTrainerFocal_g1": {"focal_gamma": 1.0},
              "nnUNetTrainerFocal_g3": {"focal_gamma": 3.0}})

LABEL_SMOOTHING = Method(
    name="label_smoothing", prefix="ls", loss=LabelSmoothingLoss, settings={"epsilon": 0.1}, parts=(),
    trainer="nnUNetTrainerLS",
    summary="Label smoothing (Szegedy et al., 2016): CE against (1 - eps) onehot + eps / K (docs/methods.md 4b).",
    compared_with=("torch's F.cross_entropy(label_smoothing=eps)",),
    variants={"nnUNetTrainerLSDice": {"dice_weight": 1.0},
              "nnUNetTrainerLS_e02": {"ls_epsilon": 0.2},
              "nnUNetTrainerLS_e03": {"ls_epsilon": 0.3}},
    test_settings=({"epsilon": 0.2},))

ECP = Method(
    name="ecp", loss=ConfidencePenaltyLoss, settings={"beta": 0.1}, parts=("ce", "confidence_penalty"),
    trainer="nnUNetTrainerECP",
    summary="Explicit confidence penalty (Pereyra et al., 2017): CE - beta * mean entropy(p) (docs/methods.md 4c).",
    compared_with=("a naive implementation with autograd",),
    variants={"nnUNetTrainerECPDice": {"dice_weight": 1.0},
              "nnUNetTrainerECP_b02": {"ecp_beta": 0.2},
              "nnUNetTrainerECP_b03": {"ecp_beta": 0.3}},
    test_settings=({"beta": 0.3},))

SVLS = Method(
    name="svls", loss=SVLSLoss, settings={"sigma": 1.0}, parts=(), trainer="nnUNetTrainerSVLS",
    summary="Spatially varying label smoothing (Islam & Glocker, IPMI 2021): CE against the one-hot target smoothed "
            "by a 3^d Gaussian (docs/methods.md 4d).",
    compared_with=("the released code (mobarakol/SVLS, written out in the tests)", "convolutions with autograd"),
    variants={"nnUNetTrainerSVLSDice": {"dice_weight": 1.0}}, neighbourhood=True)

NACL = Method(
    name="nacl", loss=NACLLoss,
    settings={"alpha": 0.1, "kernel_size": 3, "kernel": "mean", "sigma": 1.0, "distance": "l1"},
    parts=("ce", "neighbour_penalty"), trainer="nnUNetTrainerNACL",
    summary="Neighbour-aware calibration (Murugesan et al., MICCAI 2023): CE + alpha * mean |tau - z|, tau the "
            "one-hot target under a 3^d mean filter (docs/methods.md 4e).",
    compared_with=("MONAI 1.6.1 NACLLoss", "convolutions with autograd (ignored voxels)"),
    variants={"nnUNetTrainerNACLDice": {"dice_weight": 1.0}},
    test_settings=({"alpha": 0.5}, {"alpha": 0.5, "kernel": "gaussian", "distance": "l2"}), neighbourhood=True)

# mL1-ACE trains as the papers' bundles: nnU-Net's Dice, CE and the ACE term, a third each (docs/methods.md 4f).
ACE_BUNDLE = {"term": "ace", "prefix": "ace", "weight": 1 / 3, "cross_entropy_weight": 1 / 3, "dice_weight": 1 / 3,
              "compared_with": ("the released code's binning (cai4cai/Average-Calibration-Losses, torch.bucketize)",
                                "loops over images, classes and bins with autograd")}

HARD_L1ACE = Method(
    name="hard_l1ace", loss=HardL1ACELoss, settings={"num_bins": 20}, trainer="nnUNetTrainerHardL1ACE",
    summary="Marginal L1 average calibration error, hard binning (Barfoot et al., MICCAI 2024): nnU-Net's Dice + CE "
            "+ mL1-ACE, a third each (docs/methods.md 4f).", **ACE_BUNDLE)

SOFT_L1ACE = Method(
    name="soft_l1ace", loss=SoftL1ACELoss, settings={"num_bins": 20, "empty_weight": 0.01},
    trainer="nnUNetTrainerSoftL1ACE",
    summary="Marginal L1 average calibration error, soft binning (Barfoot et al., MICCAI 2024): nnU-Net's Dice + CE "
            "+ mL1-ACE, a third each (docs/methods.md 4f).", **ACE_BUNDLE)

CALS = Method(
    name="cals", loss=CALSLoss, context=("num_classes",),
    settings={"margin": 20.0, "lambda_min": 1e-6, "lambda_max": 1e6, "rho_min": 1.0, "rho_max": 10.0, "rho_step": 10,
              "rho_growth": 1.2, "rho_tolerance": 0.9},
    parts=("ce", "penalty"), trainer="nnUNetTrainerCALS",
    summary="Class-adaptive label smoothing (Liu et al., CVPR 2023): CE + an augmented-Lagrangian margin penalty with "
            "one multiplier per class, updated from each epoch's validation logits (pooled over DDP ranks), kept in "
            "the checkpoints (docs/methods.md 4g).",
    compared_with=("a naive implementation of the released penalty and multiplier updates (by-liu/CALS)",),
    variants={"nnUNetTrainerCALSDice": {"dice_weight": 1.0},
              "nnUNetTrainerCALS_m10": {"cals_margin": 10.0}},
    test_settings=({"margin": 2.0},))

METHODS: tuple[Method, ...] = (MARGIN_CALIBRATION, MBLS, FOCAL, LABEL_SMOOTHING, ECP, SVLS, NACL, HARD_L1ACE,
                               SOFT_L1ACE, CALS)


def trainer_names(methods: tuple[Method, ...] = METHODS) -> list[str]:
    """Every plugin trainer: the baseline, then each method's trainer and variants."""
    return [BASELINE_TRAINER] + [name for method in methods for name in method.trainers]


def method_of(trainer_name: str, methods: tuple[Method, ...] = METHODS) -> Method:
    """The method a trainer or variant belongs to; KeyError naming the trainer otherwise."""
    for method in methods:
        if trainer_name in method.trainers:
            return method
    raise KeyError(f"{trainer_name} is no trainer of the method registry (nnunet_margin/methods.py)")
