"""Loss assembly for nnU-Net trainers, written once: weighted terms, nnU-Net's soft Dice, deep supervision."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..losses import MbLSLoss


def deep_supervision_weights(num_outputs: int, is_ddp: bool, compiled: bool) -> np.ndarray:
    """nnU-Net's weights: 1/2^i per output, the lowest resolution off (1e-6 under DDP without torch.compile, where a
    zero weight makes DDP complain about unused parameters), normalised to sum to 1."""
    weights = np.array([1 / (2 ** i) for i in range(num_outputs)])
    weights[-1] = 1e-6 if is_ddp and not compiled else 0.0
    return weights / weights.sum()


class LossTerms(nn.Module):
    """Weighted sum of named loss terms that remembers each term's detached contribution for logging.

    An `MbLSLoss` term contributes two entries, `<name>_ce` and `<name>_penalty` (alpha times the penalty).
    """

    def __init__(self, **terms: tuple[float, nn.Module]):
        super().__init__()
        if not terms:
            raise ValueError("LossTerms needs at least one term")
        self.weights = {name: float(weight) for name, (weight, _) in terms.items()}
        self.terms = nn.ModuleDict({name: module for name, (_, module) in terms.items()})
        self.components: dict[str, torch.Tensor] = {}

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = 0.0
        components = {}
        for name, term in self.terms.items():
            weight = self.weights[name]
            if isinstance(term, MbLSLoss):
                parts = term.parts(logits, target)
                value = parts.total
                components[f"{name}_ce"] = weight * parts.ce
                components[f"{name}_penalty"] = weight * term.alpha * parts.penalty
            else:
                value = term(logits, target)
                components[name] = weight * value.detach()
            total = total + weight * value
        self.components = components
        return total


class MaskedSoftDice(nn.Module):
    """nnU-Net's MemoryEfficientSoftDiceLoss (softmax, no background) with its ignore-label handling."""

    def __init__(self, batch_dice: bool, ddp: bool, ignore_label: int | None):
        super().__init__()
        from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
        from nnunetv2.utilities.helpers import softmax_helper_dim1

        self.ignore_label = ignore_label
        self.dice = MemoryEfficientSoftDiceLoss(apply_nonlin=softmax_helper_dim1, batch_dice=batch_dice,
                                                do_bg=False, smooth=1e-5, ddp=ddp)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.ignore_label is None:
            return self.dice(logits, target)
        mask = target != self.ignore_label
        return self.dice(logits, torch.where(mask, target, 0), loss_mask=mask)


class DeepSupervisedLoss(nn.Module):
    """Applies a loss to every deep-supervision output with fixed weights (zero weights skipped).

    Accepts plain tensors too (deep supervision disabled). Keeps the weighted sum of the inner loss's `components`.
    """

    def __init__(self, loss: nn.Module, weights: np.ndarray | list[float]):
        super().__init__()
        weights = [float(w) for w in weights]
        if not any(w != 0 for w in weights):
            raise ValueError("at least one deep supervision weight must be non-zero")
        self.loss = loss
        self.weights = weights
        self.components: dict[str, torch.Tensor] = {}

    def forward(self, outputs, targets) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            total = self.loss(outputs, targets)
            self.components = dict(getattr(self.loss, "components", {}))
            return total
        if len(outputs) != len(targets) or len(outputs) > len(self.weights):
            raise ValueError(f"got {len(outputs)} outputs and {len(targets)} targets for {len(self.weights)} "
                             f"deep supervision weights")
        total = 0.0
        components: dict[str, torch.Tensor] = {}
        for weight, output, target in zip(self.weights, outputs, targets):
            if weight == 0:
                continue
            total = total + weight * self.loss(output, target)
            for name, value in getattr(self.loss, "components", {}).items():
                components[name] = components.get(name, 0.0) + weight * value
        self.components = components
        return total


def assemble_loss(trainer, **terms: tuple[float, nn.Module]) -> nn.Module:
    """The trainer's loss from named weighted terms, with nnU-Net's deep supervision when it is enabled.

    Pass `dice=(weight, None)` for nnU-Net's soft Dice configured like the default trainer's.
    """
    resolved = {}
    for name, (weight, module) in terms.items():
        if name == "dice" and module is None:
            module = MaskedSoftDice(batch_dice=trainer.configuration_manager.batch_dice, ddp=trainer.is_ddp,
                                    ignore_label=trainer.label_manager.ignore_label)
        resolved[name] = (weight, module)
    loss = LossTerms(**resolved)
    if not trainer.enable_deep_supervision:
        return DeepSupervisedLoss(loss, [1.0])
    num_outputs = len(trainer._get_deep_supervision_scales())
    return DeepSupervisedLoss(loss, deep_supervision_weights(num_outputs, trainer.is_ddp, trainer._do_i_compile()))
