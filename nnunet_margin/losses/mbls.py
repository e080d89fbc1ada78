"""Margin-based Label Smoothing, MbLS (Liu, Ben Ayed, Galdran, Dolz; CVPR 2022, MedIA 2023).

Reference: B. Liu, I. Ben Ayed, A. Galdran, J. Dolz. "The Devil is in the Margin: Margin-based Label Smoothing for
Network Calibration", CVPR 2022; B. Murugesan, B. Liu, A. Galdran, I. Ben Ayed, J. Dolz, "Calibrating Segmentation
Networks with Margin-based Label Smoothing", MedIA 2023.
The formulas follow docs/methods.md section 2.
"""

from __future__ import annotations

from ._fused import PrecomputedGradient, log_softmax_cross_entropy, subtract_target_, voxel_chunks
from ._inputs import FlatInputs, check_finite_number, chunk_voxels
from .base import SegmentationLoss

SCHEDULES = ("add", "multiply", "step")


class _MbLSFunction(PrecomputedGradient):
    """Fused CE + alpha * mean ReLU(max_j z_j - z_k - margin) with its gradient computed in the forward pass.

    One logits-sized buffer holds log p, then the gradient; the penalty runs over chunks of voxels, so it needs no
    buffer of its own. Returns (total, ce, penalty); only `total` carries a gradient.
    """

    @staticmethod
    def forward(ctx, logits, target, valid, divisor, margin, alpha):
        num_classes = logits.shape[1]
        log_p, ce = log_softmax_cross_entropy(logits, target, valid, divisor)
        needs_grad = ctx.needs_input_grad[0]
        if needs_grad:
            grad = subtract_target_(log_p.exp_(), target, valid, divisor)
        coefficient = alpha / (divisor * num_classes)  # 0-d tensor: d penalty term / d excess

        best, winner = logits.max(dim=1, keepdim=True)
        penalty = logits.new_zeros(())
        for part in voxel_chunks(logits, chunk_voxels(logits)):
            excess = (best[:, :, part] - margin) - logits[:, :, part]  # max(z) - z - m
            excess.clamp_min_(0.0)
            if valid is not None:
                excess.masked_fill_(~valid[:, :, part], 0.0)
            penalty += excess.sum()
            if needs_grad:
                active = excess.gt_(0.0).mul_(coefficient)  # the penalty's slope: -1 at k, +1 at the winner
                grad[:, :, part].sub_(active)
                grad[:, :, part].scatter_add_(1, winner[:, :, part], active.sum(1, keepdim=True))
        penalty /= divisor * num_classes
        total = ce + alpha * penalty

        if needs_grad:
            PrecomputedGradient.save_gradient(ctx, grad, "MbLSLoss")
        ctx.mark_non_differentiable(ce, penalty)
        return total, ce, penalty


class MbLSLoss(SegmentationLoss):
    """Margin-based Label Smoothing: CE(z, y) + alpha * mean_{i,k} ReLU(max_j z_ij - z_ik - margin).

    Both terms are means over the non-ignored voxels (the penalty over voxels x classes). Defaults follow the papers:
    margin 10, alpha 0.1. `parts()` names the terms `ce` and `penalty` (alpha times the mean ReLU).

    The released code's optional alpha schedule is available through `schedule` ("add", "multiply" or "step"; off by
    default): call `step_alpha(epoch)` once per epoch; alpha never exceeds `max_alpha`.
    """

    def __init__(self, margin: float = 10.0, alpha: float = 0.1, ignore_index: int | None = None,
                 schedule: str | None = None, schedule_factor: float = 0.0, schedule_step_size: int = 100,
                 max_alpha: float = 100.0):
        super().__init__(ignore_index)
        check_finite_number(margin=margin, alpha=alpha, max_alpha=max_alpha, schedule_factor=schedule_factor)
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        if schedule is not None and schedule not in SCHEDULES:
            raise ValueError(f"schedule must be None or one of {SCHEDULES}, got {schedule!r}")
        if schedule == "add" and schedule_factor == 0 or schedule in ("multiply", "step") and schedule_factor <= 0:
            raise ValueError(f"schedule {schedule!r} needs a schedule_factor (the per-epoch increment for 'add', a "
                             f"positive multiplier for 'multiply' and 'step'), got {schedule_factor}")
        if max_alpha < alpha:
            raise ValueError(f"max_alpha ({max_alpha}) must be >= alpha ({alpha})")
        if schedule_step_size < 1:
            raise ValueError(f"schedule_step_size must be >= 1, got {schedule_step_size}")
        self.margin = float(margin)
        self.alpha = float(alpha)
        self.initial_alpha = float(alpha)
        self.schedule = schedule
        self.schedule_factor = float(schedule_factor)
        self.schedule_step_size = int(schedule_step_size)
        self.max_alpha = float(max_alpha)

    def step_alpha(self, epoch: int) -> float:
        """Set alpha for `epoch` (0-based) from the schedule, capped at max_alpha; returns the new alpha.

        add: alpha0 + factor * epoch; multiply: alpha0 * factor ** epoch; step: alpha0 * factor ** (epoch // step).
        """
        if self.schedule == "add":
            alpha = self.initial_alpha + self.schedule_factor * epoch
        elif self.schedule == "multiply":
            alpha = self.initial_alpha * self.schedule_factor ** epoch
        elif self.schedule == "step":
            alpha = self.initial_alpha * self.schedule_factor ** (epoch // self.schedule_step_size)
        else:
            alpha = self.initial_alpha
        self.alpha = min(alpha, self.max_alpha)
        return self.alpha

    def start_epoch(self, epoch: int) -> str | None:
        if self.schedule is None:
            return None
        return f"MbLS alpha: {self.step_alpha(epoch):.4g}"

    def compute(self, flat: FlatInputs):
        total, ce, penalty = _MbLSFunction.apply(flat.logits, flat.target, flat.valid, flat.voxel_divisor(),
                                                 self.margin, self.alpha)
        return total, {"ce": ce, "penalty": self.alpha * penalty}

    def extra_repr(self) -> str:
        return f"margin={self.margin}, alpha={self.alpha}, ignore_index={self.ignore_index}, schedule={self.schedule}"
