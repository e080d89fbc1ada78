"""Class-Adaptive Label Smoothing, CALS (Liu, Rony, Galdran, Dolz, Ben Ayed; CVPR 2023).

Released code: by-liu/CALS d72b31f, calibrate/lagrangian/ (AugLagrangianClass, penalty "phr"); formulas in
docs/methods.md 4g. The MbLS constraint max_j z_j - z_k <= m with one multiplier per class, solved by an augmented
Lagrangian:

    h_ik = (max_j z_ij - z_ik - m) / m
    P(h, lambda, rho) = ((lambda + rho h)^2 - lambda^2) / (2 rho)  where lambda + rho h >= 0, else -lambda^2 / (2 rho)
    loss = CE(z, y) + mean_{i,k} P(h_ik, lambda_k, rho_k)
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ._fused import PrecomputedGradient, log_softmax_cross_entropy, subtract_target_, voxel_chunks
from ._inputs import FlatInputs, check_finite_number, chunk_voxels, flatten_inputs
from .base import SegmentationLoss


def _constraint(logits: torch.Tensor, best: torch.Tensor, margin: float) -> torch.Tensor:
    """h = (max_j z_j - z - m) / m for a chunk of voxels."""
    return (best - margin - logits).div_(margin)


class _CALSFunction(PrecomputedGradient):
    """CE + mean PHR penalty, fused: log p and then the gradient share one logits-sized buffer; the penalty runs
    over chunks of voxels. With x = lambda + rho h: P = (max(0, x)^2 - lambda^2) / (2 rho) and dP/dh = max(0, x);
    dh_k/dz = (onehot(winner) - onehot(k)) / m."""

    @staticmethod
    def forward(ctx, logits, target, valid, num_valid, lambdas, rhos, margin):
        num_classes = logits.shape[1]
        divisor = num_valid.clamp_min(1.0)
        log_p, ce = log_softmax_cross_entropy(logits, target, valid, divisor)
        needs_grad = ctx.needs_input_grad[0]
        if needs_grad:
            gradient = subtract_target_(log_p.exp_(), target, valid, divisor)
        slope = 1.0 / (margin * divisor * num_classes)  # 0-d tensor: d mean / d(margin * h)

        lambdas, rhos = lambdas.view(1, -1, 1), rhos.view(1, -1, 1)
        best, winner = logits.max(dim=1, keepdim=True)
        active_sum = logits.new_zeros(num_classes)  # per class: sum of max(0, x)^2 over the counted voxels
        for part in voxel_chunks(logits, chunk_voxels(logits)):
            active = _constraint(logits[:, :, part], best[:, :, part], margin).mul_(rhos).add_(lambdas).clamp_min_(0.0)
            if valid is not None:
                active.mul_(valid[:, :, part])
            active_sum += active.square().sum(dim=(0, 2))
            if needs_grad:
                active.mul_(slope)
                gradient[:, :, part].sub_(active)
                gradient[:, :, part].scatter_add_(1, winner[:, :, part], active.sum(1, keepdim=True))
            del active  # before the next chunk's
        # P = (max(0, x)^2 - lambda^2) / (2 rho): every counted entry holds the -lambda_k^2 / (2 rho_k)
        penalty = ((active_sum - num_valid * lambdas.view(-1).square()) / (2.0 * rhos.view(-1))).sum()
        penalty = penalty / (divisor * num_classes)
        if needs_grad:
            PrecomputedGradient.save_gradient(ctx, gradient, "CALSLoss")
        ctx.mark_non_differentiable(ce, penalty)
        return ce + penalty, ce, penalty


def _statistics_device(fallback: torch.device) -> torch.device:
    """Where a rank that saw no validation batch keeps its (zero) statistics: NCCL reduces CUDA tensors only."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return fallback


class CALSLoss(SegmentationLoss):
    """Class-Adaptive Label Smoothing, CALS (Liu, Rony, Galdran, Dolz, Ben Ayed; CVPR 2023), as released
    (by-liu/CALS d72b31f, AugLagrangianClass with the "phr" penalty): CE + mean_{i,k} P(h_ik, lambda_k, rho_k).

    docs/methods.md 4g and the module docstring. Released defaults: margin 20, lambda in [1e-6, 1e6] starting at
    1e-6, rho in [1, 10] starting at 1, every 10 epochs rho_k *= 1.2 where the constraint got no better
    (released names: lambd_min/max, rho_min/max, rho_step, gamma, tao). `parts()` names the terms `ce` and
    `penalty`.

    The multipliers `lambdas` and `rhos` are buffers (in `state_dict`, so checkpoints and resuming keep them), as
    are `validations` (epochs whose validation finished) and `previous_constraint` (the last epoch's mean h per
    class). Timing, as in the released trainer: during epoch e's validation the trainer passes every batch's
    full-resolution logits to `observe_validation` (no host synchronisation: per-class sums stay on the device);
    `finish_validation()` then sets

        lambda_k = clamp(mean_i clamp(max(0, lambda_k + rho_k h_ik), lambda_min, lambda_max), lambda_min, lambda_max)

    from that epoch's statistics (computed with the lambda and rho epoch e trained with), and on every
    `rho_step`-th call (epochs 10, 20, ... counting from 1) rho_k = clamp(rho_growth * rho_k, rho_min, rho_max)
    where mean_i h_ik > rho_tolerance * max(previous epoch's mean h_k, 0). Epoch e + 1 trains with the new values.
    Under torch.distributed the sums and voxel counts are all-reduced first, so every rank gets the means over all
    ranks' voxels (the released code averages per-rank means; docs/methods.md 4g, "Differs from the released code").
    Ignored voxels are left out of the statistics.
    """

    def __init__(self, num_classes: int, margin: float = 20.0, lambda_min: float = 1e-6, lambda_max: float = 1e6,
                 rho_min: float = 1.0, rho_max: float = 10.0, rho_step: int = 10, rho_growth: float = 1.2,
                 rho_tolerance: float = 0.9, ignore_index: int | None = None):
        super().__init__(ignore_index)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2 (background included), got {num_classes!r}")
        check_finite_number(margin=margin, lambda_min=lambda_min, lambda_max=lambda_max, rho_min=rho_min,
                            rho_max=rho_max, rho_growth=rho_growth, rho_tolerance=rho_tolerance)
        if margin <= 0:
            raise ValueError(f"margin must be > 0 (h is divided by it), got {margin}")
        if not 0 < lambda_min <= lambda_max:
            raise ValueError(f"need 0 < lambda_min <= lambda_max, got lambda_min={lambda_min}, lambda_max={lambda_max}")
        if not 0 < rho_min <= rho_max:
            raise ValueError(f"need 0 < rho_min <= rho_max, got rho_min={rho_min}, rho_max={rho_max}")
        if isinstance(rho_step, bool) or not isinstance(rho_step, int) or rho_step < 1:
            raise ValueError(f"rho_step must be a positive int (epochs between rho updates), got {rho_step!r}")
        if rho_growth < 1:
            raise ValueError(f"rho_growth must be >= 1, got {rho_growth}")
        if rho_tolerance < 0:
            raise ValueError(f"rho_tolerance must be >= 0, got {rho_tolerance}")
        self.margin = float(margin)
        self.lambda_min, self.lambda_max = float(lambda_min), float(lambda_max)
        self.rho_min, self.rho_max = float(rho_min), float(rho_max)
        self.rho_step = rho_step
        self.rho_growth = float(rho_growth)
        self.rho_tolerance = float(rho_tolerance)
        self.register_buffer("lambdas", torch.full((num_classes,), self.lambda_min, dtype=torch.float64))
        self.register_buffer("rhos", torch.full((num_classes,), self.rho_min, dtype=torch.float64))
        self.register_buffer("validations", torch.zeros((), dtype=torch.int64))
        self.register_buffer("previous_constraint", torch.zeros(num_classes, dtype=torch.float64))
        self._statistics: torch.Tensor | None = None  # [sum of clamped dP/dh (K), sum of h (K), voxel count]

    @property
    def num_classes(self) -> int:
        return self.lambdas.numel()

    def check_channels(self, logits: torch.Tensor) -> None:
        if logits.ndim >= 2 and logits.shape[1] != self.num_classes:
            raise ValueError(f"logits have {logits.shape[1]} channels but CALSLoss was built for "
                             f"{self.num_classes} classes")

    def _multipliers(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # nnU-Net never moves its loss to the GPU, so the multipliers follow the logits here
        return (self.lambdas.to(device=like.device, dtype=like.dtype),
                self.rhos.to(device=like.device, dtype=like.dtype))

    def compute(self, flat: FlatInputs):
        lambdas, rhos = self._multipliers(flat.logits)
        total, ce, penalty = _CALSFunction.apply(flat.logits, flat.target, flat.valid, flat.num_valid, lambdas,
                                                 rhos, self.margin)
        return total, {"ce": ce, "penalty": penalty}

    @torch.no_grad()
    def observe_validation(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """Add one validation batch's per-class sums of clamp(dP/dh) and h, and its voxel count (on the device)."""
        self.check_channels(logits)
        flat = flatten_inputs(logits.detach(), target, self.ignore_index)
        lambdas, rhos = (value.view(1, -1, 1) for value in self._multipliers(flat.logits))
        best = flat.logits.amax(dim=1, keepdim=True)
        sums = torch.zeros(2 * self.num_classes + 1, dtype=torch.float64, device=flat.logits.device)
        derivative_sum, constraint_sum = sums[:self.num_classes], sums[self.num_classes:-1]
        for part in voxel_chunks(flat.logits, chunk_voxels(flat.logits)):
            constraint = _constraint(flat.logits[:, :, part], best[:, :, part], self.margin)
            derivative = (constraint * rhos).add_(lambdas).clamp_(self.lambda_min, self.lambda_max)
            if flat.valid is not None:
                derivative.mul_(flat.valid[:, :, part])
                constraint.mul_(flat.valid[:, :, part])
            derivative_sum += derivative.sum(dim=(0, 2))  # per chunk in the logits' dtype, float64 across chunks
            constraint_sum += constraint.sum(dim=(0, 2))
        sums[-1] = flat.target[:, 0].numel() if flat.valid is None else flat.valid.sum()  # exact: int64
        self._statistics = sums if self._statistics is None else self._statistics + sums

    @torch.no_grad()
    def finish_validation(self) -> str:
        """Update lambda (and, every rho_step-th epoch, rho) from the observed statistics; returns the log line."""
        num_classes = self.num_classes
        statistics = self._statistics
        if statistics is None:
            statistics = torch.zeros(2 * num_classes + 1, dtype=torch.float64,
                                     device=_statistics_device(self.lambdas.device))
        self._statistics = None
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(statistics)
        statistics = statistics.to(self.lambdas.device)
        count = statistics[-1]
        seen = count > 0
        derivative_mean = statistics[:num_classes] / count.clamp_min(1.0)
        constraint_mean = statistics[num_classes:-1] / count.clamp_min(1.0)

        self.lambdas.copy_(torch.where(seen, derivative_mean.clamp(self.lambda_min, self.lambda_max), self.lambdas))
        epoch = self.validations + 1
        rho_due = seen & (epoch % self.rho_step == 0) & (self.validations > 0)
        grow = rho_due & (constraint_mean > self.previous_constraint.clamp_min(0.0) * self.rho_tolerance)
        self.rhos.copy_(torch.where(grow, self.rhos * self.rho_growth, self.rhos).clamp(self.rho_min, self.rho_max))
        self.previous_constraint.copy_(torch.where(seen, constraint_mean, self.previous_constraint))
        self.validations.copy_(epoch)

        # the one host synchronisation of the epoch's update, for its log line
        lambda_mean, lambda_max, rho_mean, rho_max = torch.stack(
            [self.lambdas.mean(), self.lambdas.max(), self.rhos.mean(), self.rhos.max()]).tolist()
        return (f"CALS lambda mean {lambda_mean:.4g} max {lambda_max:.4g}, rho mean {rho_mean:.4g} "
                f"max {rho_max:.4g}")

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, margin={self.margin}, rho_step={self.rho_step}, "
                f"ignore_index={self.ignore_index}")
