"""Per-voxel calibration losses the field compares: focal loss, label smoothing, explicit confidence penalty.

Formulas, defaults and reference implementations: docs/methods.md section 4a-4c. Each loss is a fused autograd
Function (gradient computed in the forward pass, one logits-sized buffer that holds log p, then the gradient).
Means are over the M non-ignored voxels; ignored voxels get neither loss nor gradient.
"""

from __future__ import annotations

import torch

from ._fused import PrecomputedGradient, log_softmax_cross_entropy, subtract_target_, voxel_chunks
from ._inputs import FlatInputs, check_finite_number, chunk_voxels
from .base import SegmentationLoss


def _mask(tensor: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    return tensor if valid is None else tensor * valid


class _FocalFunction(PrecomputedGradient):
    """mean_i -(1 - p_iy)^gamma log p_iy; d/dz_k = s_i (delta_ky - p_k) with s = d/d(log p_y) of the voxel's term."""

    @staticmethod
    def forward(ctx, logits, target, valid, divisor, gamma):
        buffer = torch.log_softmax(logits, dim=1)
        log_p = buffer.gather(1, target)
        one_minus_p = torch.expm1(log_p).neg_()  # 1 - p_y, accurate when p_y is close to 1
        modulation = one_minus_p.pow(gamma)
        loss = _mask(modulation * log_p, valid).sum().neg() / divisor
        if ctx.needs_input_grad[0]:
            # d/d(log p) of -(1-p)^g log p = g (1-p)^(g-1) p log p - (1-p)^g; the first part -> 0 as p -> 1 (g > 0)
            first = torch.where(one_minus_p > 0, gamma * modulation * log_p.exp() * log_p / one_minus_p, 0.0)
            slope = _mask(first - modulation, valid) / divisor
            gradient = buffer.exp_().mul_(slope.neg())
            gradient.scatter_add_(1, target, slope)
            PrecomputedGradient.save_gradient(ctx, gradient, "FocalLoss")
        return loss


class FocalLoss(SegmentationLoss):
    """Focal loss (Lin, Goyal, Girshick, He, Dollar; ICCV 2017), softmax form: mean_i -(1 - p_iy)^gamma log p_iy.

    docs/methods.md 4a. gamma = 0 is cross-entropy; the calibration papers use gamma in {1, 2, 3}. MONAI 1.6.1's
    `FocalLoss(use_softmax=True, to_onehot_y=True, gamma=g)` averages over B*K*voxels and returns this value / K.
    """

    def __init__(self, gamma: float = 2.0, ignore_index: int | None = None):
        super().__init__(ignore_index)
        check_finite_number(gamma=gamma)
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0 (0 gives cross-entropy), got {gamma}")
        self.gamma = float(gamma)

    def compute(self, flat: FlatInputs):
        return _FocalFunction.apply(flat.logits, flat.target, flat.valid, flat.voxel_divisor(), self.gamma), {}

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, ignore_index={self.ignore_index}"


class _LabelSmoothingFunction(PrecomputedGradient):
    """mean_i -(1 - eps) log p_iy - eps/K sum_k log p_ik; d/dz_k = p_k - (1 - eps) delta_ky - eps/K."""

    @staticmethod
    def forward(ctx, logits, target, valid, divisor, epsilon):
        num_classes = logits.shape[1]
        buffer = torch.log_softmax(logits, dim=1)
        per_voxel = (1.0 - epsilon) * buffer.gather(1, target) + (epsilon / num_classes) * buffer.sum(1, keepdim=True)
        loss = _mask(per_voxel, valid).sum().neg() / divisor
        if ctx.needs_input_grad[0]:
            gradient = subtract_target_(buffer.exp_().sub_(epsilon / num_classes), target, valid, divisor,
                                        target_weight=1.0 - epsilon)
            PrecomputedGradient.save_gradient(ctx, gradient, "LabelSmoothingLoss")
        return loss


class LabelSmoothingLoss(SegmentationLoss):
    """Label smoothing (Szegedy et al., CVPR 2016; as a calibration method: Mueller, Kornblith, Hinton, NeurIPS 2019):
    cross-entropy against (1 - epsilon) * onehot + epsilon / K.

    docs/methods.md 4b: equals `F.cross_entropy(z, y, label_smoothing=epsilon)` (with `ignore_index`, too); the
    calibration papers use epsilon in {0.1, 0.2, 0.3}.
    """

    def __init__(self, epsilon: float = 0.1, ignore_index: int | None = None):
        super().__init__(ignore_index)
        check_finite_number(epsilon=epsilon)
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"epsilon must be in [0, 1] (0 gives cross-entropy), got {epsilon}")
        self.epsilon = float(epsilon)

    def compute(self, flat: FlatInputs):
        return _LabelSmoothingFunction.apply(flat.logits, flat.target, flat.valid, flat.voxel_divisor(),
                                             self.epsilon), {}

    def extra_repr(self) -> str:
        return f"epsilon={self.epsilon}, ignore_index={self.ignore_index}"


class _ConfidencePenaltyFunction(PrecomputedGradient):
    """CE - beta * mean_i H(p_i). With l = log p and H = -sum_k p_k l_k: dH/dz_k = -p_k (l_k + H), so
    d/dz_k = p_k (1 + beta (l_k + H_i)) - delta_ky. Entropy and gradient run over chunks of voxels in the buffer."""

    @staticmethod
    def forward(ctx, logits, target, valid, divisor, beta):
        buffer, ce = log_softmax_cross_entropy(logits, target, valid, divisor)
        needs_grad = ctx.needs_input_grad[0]
        entropy_sum = logits.new_zeros(())
        for part in voxel_chunks(buffer, chunk_voxels(buffer)):
            log_p = buffer[:, :, part]
            p = log_p.exp()
            entropy = (p * log_p).sum(1, keepdim=True).neg_()
            entropy_sum += _mask(entropy, None if valid is None else valid[:, :, part]).sum()
            if needs_grad:
                log_p.add_(entropy).mul_(beta).add_(1.0).mul_(p)  # p (1 + beta (l + H)), written over l
            del p, entropy  # before the next chunk's
        penalty = entropy_sum.neg() * beta / divisor
        if needs_grad:
            PrecomputedGradient.save_gradient(ctx, subtract_target_(buffer, target, valid, divisor),
                                              "ConfidencePenaltyLoss")
        ctx.mark_non_differentiable(ce, penalty)
        return ce + penalty, ce, penalty


class ConfidencePenaltyLoss(SegmentationLoss):
    """Explicit confidence penalty, ECP (Pereyra, Tucker, Chorowski, Kaiser, Hinton; ICLR workshop 2017):
    CE(z, y) - beta * mean_i H(p_i), H(p) = -sum_k p_k log p_k.

    docs/methods.md 4c; the calibration papers use beta in {0.1, 0.2, 0.3}. `parts()` names the terms `ce` and
    `confidence_penalty` (-beta times the mean entropy, so the terms add up to the total).
    """

    def __init__(self, beta: float = 0.1, ignore_index: int | None = None):
        super().__init__(ignore_index)
        check_finite_number(beta=beta)
        if beta < 0:
            raise ValueError(f"beta must be >= 0 (0 gives cross-entropy), got {beta}")
        self.beta = float(beta)

    def compute(self, flat: FlatInputs):
        total, ce, penalty = _ConfidencePenaltyFunction.apply(flat.logits, flat.target, flat.valid,
                                                              flat.voxel_divisor(), self.beta)
        return total, {"ce": ce, "confidence_penalty": penalty}

    def extra_repr(self) -> str:
        return f"beta={self.beta}, ignore_index={self.ignore_index}"
