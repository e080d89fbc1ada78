"""Loss assembly for nnU-Net trainers, written once: weighted named terms (every one a `SegmentationLoss`, nnU-Net's
soft Dice included), checked when the loss is built, and nnU-Net's deep supervision."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..losses import SegmentationLoss
from ..losses._inputs import FlatInputs
from ..methods import is_weight
from . import _seams


def deep_supervision_weights(num_outputs: int, is_ddp: bool, compiled: bool) -> np.ndarray:
    """nnU-Net's weights: 1/2^i per output, the lowest resolution off (1e-6 under DDP without torch.compile, where a
    zero weight makes DDP complain about unused parameters), normalised to sum to 1."""
    weights = np.array([1 / (2 ** i) for i in range(num_outputs)])
    weights[-1] = 1e-6 if is_ddp and not compiled else 0.0
    return weights / weights.sum()


class SoftDiceLoss(SegmentationLoss):
    """nnU-Net's soft Dice (its MemoryEfficientSoftDiceLoss: softmax, background excluded), as a term of the
    plugin's losses; ignored voxels are left out through nnU-Net's own `loss_mask`."""

    def __init__(self, batch_dice: bool, ddp: bool, ignore_index: int | None = None):
        super().__init__(ignore_index)
        self.dice = _seams.soft_dice_loss(batch_dice=batch_dice, ddp=ddp)

    def compute(self, flat: FlatInputs):
        return self.dice(flat.logits, flat.target, loss_mask=flat.valid), {}


def check_terms(source: str, terms) -> None:
    """Refuse loss terms that are not {name: (weight > 0, SegmentationLoss)}, naming their `source` (e.g.
    "nnUNetTrainerX.loss_terms()") and the term: a plain torch loss would get nnU-Net's (B, 1, ...) target as it is
    and no ignore label."""
    if not isinstance(terms, dict) or not terms:
        raise TypeError(f"{source} gives {terms!r}; the loss terms are a non-empty dict "
                        f"{{name: (weight, SegmentationLoss)}}")
    for name, term in terms.items():
        if not (isinstance(term, tuple) and len(term) == 2):
            raise TypeError(f"{source} gives term {name!r} as {term!r}; each term is a pair "
                            f"(weight, SegmentationLoss)")
        weight, loss = term
        if not isinstance(loss, SegmentationLoss):
            raise TypeError(f"{source} gives term {name!r} a {type(loss).__name__}, which is no "
                            f"nnunet_margin.losses.SegmentationLoss: it would get nnU-Net's target unchecked and no "
                            f"ignore label. Write the loss as a SegmentationLoss subclass (implement compute(flat); "
                            f"README, 'Your own method').")
        if not is_weight(weight, allow_zero=False):
            raise ValueError(f"{source} gives term {name!r} the weight {weight!r}; a term weight must be "
                             f"a finite number > 0. Fix the weight there, or leave the term out to drop it.")


class LossTerms(nn.Module):
    """Weighted sum of named `SegmentationLoss` terms that keeps each term's detached, weighted contribution in
    `components`: a term with several parts contributes `<name>_<part>` entries (e.g. `mbls_ce`, `mbls_penalty`),
    a single-part term `<name>`."""

    def __init__(self, **terms: tuple[float, SegmentationLoss]):
        super().__init__()
        check_terms("LossTerms(...)", terms)
        self.weights = {name: float(weight) for name, (weight, _) in terms.items()}
        self.terms = nn.ModuleDict({name: module for name, (_, module) in terms.items()})
        self.components: dict[str, torch.Tensor] = {}

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = 0.0
        components = {}
        for name, term in self.terms.items():
            weight = self.weights[name]
            value, parts = term.parts(logits, target)
            if len(parts) == 1:
                components[name] = weight * next(iter(parts.values()))
            else:
                components.update({f"{name}_{part}": weight * part_value for part, part_value in parts.items()})
            total = total + weight * value
        self.components = components
        return total

    def segmentation_losses(self) -> list[SegmentationLoss]:
        return list(self.terms.values())


class DeepSupervisedLoss(nn.Module):
    """Applies `LossTerms` to every deep-supervision output with fixed weights (zero weights skipped).

    Accepts plain tensors too (deep supervision disabled). Keeps, as device tensors (no host synchronisation), the
    weighted sum of the terms' `components` and `outputs_finite` (all network outputs finite), which the trainers
    read once per epoch or only when the loss value is not finite. While `observing` is set (nnU-Net's per-epoch
    validation), the full-resolution output is passed to each term's `observe_validation`.
    """

    def __init__(self, loss: LossTerms, weights: np.ndarray | list[float]):
        super().__init__()
        weights = [float(w) for w in weights]
        if not any(w != 0 for w in weights):
            raise ValueError("at least one deep supervision weight must be non-zero")
        self.loss = loss
        self.weights = weights
        self.observing = False
        self.components: dict[str, torch.Tensor] = {}
        self.outputs_finite: torch.Tensor | None = None

    def forward(self, outputs, targets) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            outputs, targets, weights = [outputs], [targets], [1.0]
        else:
            weights = self.weights
            if len(outputs) != len(targets) or len(outputs) > len(weights):
                raise ValueError(f"got {len(outputs)} outputs and {len(targets)} targets for {len(weights)} "
                                 f"deep supervision weights")
        if self.observing:
            with torch.no_grad():
                for term in self.loss.segmentation_losses():
                    term.observe_validation(outputs[0], targets[0])
        total = 0.0
        components: dict[str, torch.Tensor] = {}
        finite = []
        for weight, output, target in zip(weights, outputs, targets):
            if weight == 0:
                continue
            total = total + weight * self.loss(output, target)
            for name, value in self.loss.components.items():
                components[name] = components.get(name, 0.0) + weight * value
            finite.append(torch.isfinite(output).all())
        self.components = components
        self.outputs_finite = torch.stack(finite).all()
        return total

    def segmentation_losses(self) -> list[SegmentationLoss]:
        return self.loss.segmentation_losses()


def assemble_loss(trainer, terms: dict[str, tuple[float, SegmentationLoss]]) -> DeepSupervisedLoss:
    """The trainer's loss from named weighted terms (checked by `check_terms`), with nnU-Net's deep supervision when
    it is enabled.

    The terms' own value checks are switched off: the trainer checks labels once before training and the loss value
    that nnU-Net copies to the host every step.
    """
    loss = LossTerms(**terms)
    for term in loss.segmentation_losses():
        term.check_inputs = False
    if not trainer.enable_deep_supervision:
        return DeepSupervisedLoss(loss, [1.0])
    num_outputs = _seams.deep_supervision_output_count(trainer)
    return DeepSupervisedLoss(loss, deep_supervision_weights(num_outputs, trainer.is_ddp,
                                                             _seams.uses_torch_compile(trainer)))


def soft_dice(trainer) -> SoftDiceLoss:
    """nnU-Net's soft Dice configured like the default trainer's."""
    return SoftDiceLoss(batch_dice=trainer.configuration_manager.batch_dice, ddp=trainer.is_ddp,
                        ignore_index=trainer.label_manager.ignore_label)
