"""Distribution-aware Margin Calibration (Yu et al., AAAI 2021; IJCV 2022).

Reference: L. Yu, Z. Li, M. Xu, Y. Gao, J. Luo, J. Zhang. "Distribution-aware Margin Calibration for Semantic
Segmentation in Images", IJCV 130(1):95-110, 2022; Z. Li, L. Yu, J. Zhang, "Distribution-aware Margin Calibration for
Medical Image Segmentation", AAAI 2021.
The formulas follow docs/methods.md section 1; the released code's BCE form is the default.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np
import torch

from ._fused import PrecomputedGradient
from ._inputs import FlatInputs, check_finite_number, chunk_voxels
from .base import SegmentationLoss

LOSS_FORMS = ("released", "paper")
EMPTY_CLASS_RULES = ("error", "count_as_one")


class EmptyClassError(ValueError):
    """A class has no voxels, so its margin offsets are undefined."""

    def __init__(self, empty_classes: list[int], message: str):
        super().__init__(message)
        self.empty_classes = empty_classes


class MarginOffsets(NamedTuple):
    """Per-class margin offsets: `rho_k0` where k is the true class, `rho_0k` where it is not."""

    rho_k0: torch.Tensor  # (K,) float64
    rho_0k: torch.Tensor  # (K,) float64


def margin_offsets(counts: Sequence[float] | torch.Tensor, tau: float = 10.0, upsilon: float = 1.0,
                   empty_classes: str = "error") -> MarginOffsets:
    """Margin offsets from per-class voxel counts N_k, background included ("Algorithm 1", docs/methods.md 1a).

        rho_0k = tau * sqrt(N - N_k) / N_k
        mu_k   = p_k * sqrt(N_k) / (upsilon * (N - N_k) - p_k * sqrt(N - N_k)),  p_k = N_k / N
        rho_k0 = mu_k * rho_0k

    `empty_classes` decides what a class with N_k = 0 does: "error" (default) raises `EmptyClassError`;
    "count_as_one" counts it as one voxel, i.e. gives it the largest margin any observed class could get.
    """
    check_finite_number(tau=tau, upsilon=upsilon)
    if tau <= 0 or upsilon <= 0:
        raise ValueError(f"tau and upsilon must be positive, got tau={tau}, upsilon={upsilon}")
    if empty_classes not in EMPTY_CLASS_RULES:
        raise ValueError(f"empty_classes must be one of {EMPTY_CLASS_RULES}, got {empty_classes!r}")
    n_k = np.array(counts.detach().cpu().numpy() if isinstance(counts, torch.Tensor) else counts, dtype=np.float64)
    if n_k.ndim != 1:
        raise ValueError(f"counts must be one voxel count per class (a 1-D sequence), got shape {n_k.shape}")
    if n_k.size < 2:
        raise ValueError(f"need counts for at least 2 classes (background included), got {n_k.size}")
    if not np.all(np.isfinite(n_k) & (n_k >= 0)):
        raise ValueError(f"voxel counts must be finite and non-negative, got {[float(n) for n in n_k]}")
    empty = [int(k) for k in np.flatnonzero(n_k == 0)]
    if empty:
        if empty_classes == "error":
            raise EmptyClassError(empty, f"class(es) {empty} have no voxels, so their margin offsets are undefined "
                                         f"(rho_0k = tau * sqrt(N - N_k) / N_k). Remove the label, use other "
                                         f"training cases, or opt into empty_classes='count_as_one'.")
        n_k = np.maximum(n_k, 1.0)
    total = n_k.sum()
    rest = total - n_k
    rho_0k = tau * np.sqrt(rest) / n_k
    share = n_k / total
    denominator = upsilon * rest - share * np.sqrt(rest)
    if np.any(denominator <= 0):
        raise ValueError(f"margin offsets are undefined for counts {[float(n) for n in n_k]} with upsilon={upsilon}: one class "
                         f"holds (almost) every voxel. Check the label statistics or increase upsilon.")
    mu_k = share * np.sqrt(n_k) / denominator
    rho_k0 = mu_k * rho_0k
    return MarginOffsets(rho_k0=torch.from_numpy(rho_k0), rho_0k=torch.from_numpy(rho_0k))


def _last_index_of(values: torch.Tensor, maximum: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Channel index (B, 1, V) where `values` equals its channel maximum (the last one on ties), using `out` as scratch.

    Written with elementwise ops and amax because argmax/topk over the channel axis are 10-100x slower on the CPU.
    """
    torch.eq(values, maximum, out=out)
    out.mul_(torch.arange(1, values.shape[1] + 1, dtype=out.dtype, device=out.device).view(1, -1, 1))
    return out.amax(1, keepdim=True).sub_(1).long().clamp_min_(0)  # clamp: NaN rows match nothing


def _softplus_sum(values: torch.Tensor) -> torch.Tensor:
    """sum(softplus(values)) over chunks of voxels, so no second logits-sized buffer is needed."""
    return sum(torch.nn.functional.softplus(chunk).sum() for chunk in values.split(chunk_voxels(values), dim=2))


class _MarginCalibrationFunction(PrecomputedGradient):
    """Fused forward and gradient, O(voxels x K) time and one logits-sized buffer.

    a_ik = lambda_ik + rho_0k (k != y_i) or rho_{y_i,0} - lambda_{i,y_i} (k = y_i), with
    lambda_ik = z_ik - max_{j != k} z_ij. The loss is `scale_out * sum_ik w_ik softplus(c * a_ik)`, w = true_weight
    for the true class and 1 otherwise. The gradient is computed in the forward pass into the buffer that held a,
    and the top-2 search reuses that buffer too.
    """

    @staticmethod
    def forward(ctx, logits, target, valid, rho_k0, rho_0k, slope, true_weight, scale_out):
        a = torch.empty_like(logits)
        best = logits.amax(1, keepdim=True)
        winner = _last_index_of(logits, best, out=a)
        a.copy_(logits).scatter_(1, winner, -math.inf)
        second = a.amax(1, keepdim=True)
        runner_up = _last_index_of(a, second, out=a) if ctx.needs_input_grad[0] else None

        # a <- lambda: the largest logit subtracted everywhere except at the winner (the 2nd largest there)
        torch.sub(logits, best, out=a)
        a.scatter_(1, winner, best - second)
        a += rho_0k.view(1, -1, 1)
        # at the true class: rho_y0 - lambda_y = rho_y0 + rho_0y - (lambda_y + rho_0y)
        true_offset = (rho_k0 + rho_0k)[target]
        a.scatter_(1, target, true_offset - a.gather(1, target))
        if slope != 1.0:
            a *= slope
        if valid is not None:
            a.masked_fill_(~valid, -math.inf)  # softplus(-inf) = 0 and sigmoid(-inf) = 0: no loss, no gradient

        loss = _softplus_sum(a) + (true_weight - 1.0) * _softplus_sum(a.gather(1, target))
        loss = loss * scale_out

        if ctx.needs_input_grad[0]:
            grad = a.sigmoid_()
            grad.scatter_(1, target, grad.gather(1, target) * -true_weight)
            # d lambda_ik / d z: +1 at k, -1 at the subtracted logit (winner for k != winner, runner-up at winner)
            at_winner = grad.gather(1, winner)
            grad.scatter_add_(1, winner, at_winner - grad.sum(1, keepdim=True))
            grad.scatter_add_(1, runner_up, -at_winner)
            grad *= scale_out * slope
            PrecomputedGradient.save_gradient(ctx, grad, "MarginCalibrationLoss")
        return loss


class MarginCalibrationLoss(SegmentationLoss):
    """Distribution-aware Margin Calibration loss (Yu et al., AAAI 2021 / IJCV 2022).

    Args:
        rho_k0, rho_0k: per-class margin offsets (K,), e.g. from `margin_offsets(counts)`.
        form: "released" (default; the authors' code: BCE with logits on the calibrated scores against the one-hot
            target, true class weighted by K, mean over voxels x classes, natural log) or "paper" (the rho-calibrated
            log2 loss, summed over classes, mean over voxels; IJCV Eq. 16-18).
        ignore_index: label whose voxels are excluded from the loss (and from M).

    Input: logits (B, K, *spatial) of any float dtype (computed in float32) and integer targets (B, 1, *spatial) or
    (B, *spatial). Inference uses the raw logits: the offsets are a training-time device only.
    """

    def __init__(self, rho_k0: Sequence[float] | torch.Tensor, rho_0k: Sequence[float] | torch.Tensor,
                 form: str = "released", ignore_index: int | None = None):
        super().__init__(ignore_index)
        if form not in LOSS_FORMS:
            raise ValueError(f"form must be one of {LOSS_FORMS}, got {form!r}")
        rho_k0, rho_0k = (np.array(rho.detach().cpu().numpy() if isinstance(rho, torch.Tensor) else rho,
                                   dtype=np.float64)
                          for rho in (rho_k0, rho_0k))
        if rho_k0.ndim != 1 or rho_k0.shape != rho_0k.shape or rho_k0.size < 2:
            raise ValueError(f"rho_k0 and rho_0k must both have one entry per class (K >= 2), got "
                             f"{rho_k0.shape} and {rho_0k.shape}")
        if not (np.isfinite(rho_k0).all() and np.isfinite(rho_0k).all()):
            raise ValueError("margin offsets must be finite; a class without voxels gives infinite offsets "
                             "(see margin_offsets(empty_classes=...))")
        self.form = form
        self.register_buffer("rho_k0", torch.from_numpy(rho_k0))
        self.register_buffer("rho_0k", torch.from_numpy(rho_0k))

    @classmethod
    def from_counts(cls, counts: Sequence[float] | torch.Tensor, tau: float = 10.0, upsilon: float = 1.0,
                    empty_classes: str = "error", form: str = "released",
                    ignore_index: int | None = None) -> "MarginCalibrationLoss":
        """Build the loss from per-class voxel counts (background first), with the offsets of `margin_offsets`."""
        offsets = margin_offsets(counts, tau=tau, upsilon=upsilon, empty_classes=empty_classes)
        return cls(offsets.rho_k0, offsets.rho_0k, form=form, ignore_index=ignore_index)

    @property
    def num_classes(self) -> int:
        return self.rho_0k.numel()

    def check_channels(self, logits: torch.Tensor) -> None:
        if logits.ndim >= 2 and logits.shape[1] != self.num_classes:
            raise ValueError(f"logits have {logits.shape[1]} channels but the margin offsets are for "
                             f"{self.num_classes} classes")

    def compute(self, flat: FlatInputs):
        num_classes = self.num_classes
        divisor = flat.voxel_divisor()
        if self.form == "released":
            slope, true_weight, scale_out = 1.0, float(num_classes), 1.0 / (divisor * num_classes)
        else:
            slope, true_weight, scale_out = math.log(2.0), 1.0, 1.0 / (divisor * math.log(2.0))
        # nnU-Net never moves its loss to the GPU, so the offsets follow the logits here
        rho_k0, rho_0k = (rho.to(device=flat.logits.device, dtype=flat.logits.dtype)
                          for rho in (self.rho_k0, self.rho_0k))
        loss = _MarginCalibrationFunction.apply(flat.logits, flat.target, flat.valid, rho_k0, rho_0k, slope,
                                                true_weight, scale_out)
        return loss, {}

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, form={self.form!r}, ignore_index={self.ignore_index}"
