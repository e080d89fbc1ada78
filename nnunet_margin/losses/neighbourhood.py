"""Losses whose targets come from each voxel's neighbourhood: SVLS and NACL (docs/methods.md 4d, 4e).

Both are fused autograd Functions; their soft targets never need a gradient (they depend on the labels only).

Ignored voxels (`ignore_index`) get no loss and no gradient, and they are no class for their neighbours: their
one-hot row is zero, and the kernel weight that fell on them is given to the counted neighbours:

- SVLS: soft target = sum over counted neighbours of kernel weight x one-hot / sum of their kernel weights
  (with nothing ignored the denominator is the kernel sum of the released code, 2).
- NACL: tau = (zero-padded filter of the counted one-hot rows) x S / (S - kernel weight on ignored neighbours),
  S the kernel sum; outside the image stays zero as in MONAI, so with nothing ignored tau is MONAI's.
"""

from __future__ import annotations

import functools
import itertools
import math

import torch

from ._fused import PrecomputedGradient, log_softmax_cross_entropy, subtract_target_, voxel_chunks
from ._inputs import FlatInputs, check_finite_number, chunk_voxels
from .base import SegmentationLoss

NACL_KERNELS = ("mean", "gaussian")
NACL_DISTANCES = ("l1", "l2")


@functools.lru_cache(maxsize=None)
def svls_kernel(spatial_dims: int, sigma: float) -> tuple[tuple[tuple[int, ...], float], ...]:
    """The released SVLS kernel (mobarakol/SVLS 77d1fd2, svls.py, `get_svls_filter_3d`) on a 3^d grid as
    ((offset, weight), ...): a Gaussian normalised to sum 1 whose centre weight c is replaced by 1 - c, then divided
    by 1 - c (centre 1, neighbours sum to 1, total 2)."""
    offsets = list(itertools.product((-1, 0, 1), repeat=spatial_dims))
    gaussian = [math.exp(-sum(o * o for o in offset) / (2.0 * sigma * sigma)) for offset in offsets]
    total = sum(gaussian)
    gaussian = [g / total for g in gaussian]
    centre = offsets.index((0,) * spatial_dims)
    neighbours = 1.0 - gaussian[centre]
    gaussian[centre] = neighbours
    return tuple((offset, g / neighbours) for offset, g in zip(offsets, gaussian))


def _replicate_padded(tensor: torch.Tensor) -> torch.Tensor:
    """(B, *spatial) -> (B, *(n + 2)) with edge values repeated (F.pad mode 'replicate' for any dtype)."""
    for axis in range(1, tensor.ndim):
        size = tensor.shape[axis]
        index = torch.arange(-1, size + 1, device=tensor.device).clamp_(0, size - 1)
        tensor = tensor.index_select(axis, index)
    return tensor


def _shifted(padded: torch.Tensor, offset: tuple[int, ...]) -> torch.Tensor:
    """Value at voxel + offset of a replicate-padded (B, *(n + 2)) tensor, as (B, 1, V)."""
    window = tuple(slice(1 + o, 1 + o + size - 2) for o, size in zip(offset, padded.shape[1:]))
    return padded[(slice(None),) + window].reshape(padded.shape[0], 1, -1)


class _SVLSFunction(PrecomputedGradient):
    """mean_i -sum_k t_ik log p_ik with t_i = sum_o w_o(i) onehot(y_{i+o}); w_o(i) = K_o / S without ignored voxels.

    The soft targets (divided by M) are scatter-added into one logits-sized buffer, one neighbour offset at a time
    (the one-hot is never materialised); then, over chunks of voxels, the loss is -sum t log p and the buffer becomes
    the gradient (p - t) / M (t sums to 1 at every counted voxel).
    """

    @staticmethod
    def forward(ctx, logits, target, valid, divisor, kernel, spatial):
        batch = logits.shape[0]
        labels = _replicate_padded(target.view(batch, *spatial))
        if valid is None:
            voxel_scale = 1.0 / divisor
            target_scale = voxel_scale / sum(weight for _, weight in kernel)
        else:
            counted_pad = _replicate_padded(valid.view(batch, *spatial).to(logits.dtype))
            counted_weight = sum(weight * _shifted(counted_pad, offset) for offset, weight in kernel)
            voxel_scale = valid / divisor
            target_scale = torch.where(valid, counted_weight.reciprocal(), 0.0) / divisor
        buffer = torch.zeros_like(logits)
        for offset, weight in kernel:
            neighbour_labels = _shifted(labels, offset)
            weights = weight * target_scale
            if valid is not None:
                weights = weights * _shifted(counted_pad, offset)
            buffer.scatter_add_(1, neighbour_labels, weights.expand_as(neighbour_labels))

        needs_grad = ctx.needs_input_grad[0]
        loss = logits.new_zeros(())
        for part in voxel_chunks(buffer, chunk_voxels(buffer)):
            soft_target = buffer[:, :, part]
            log_p = torch.log_softmax(logits[:, :, part], dim=1)
            loss -= (soft_target * log_p).sum()
            if needs_grad:
                scale = voxel_scale if valid is None else voxel_scale[:, :, part]
                soft_target.neg_().add_(log_p.exp_().mul_(scale))
            del log_p  # before the next chunk's
        if needs_grad:
            PrecomputedGradient.save_gradient(ctx, buffer, "SVLSLoss")
        return loss


class SVLSLoss(SegmentationLoss):
    """Spatially Varying Label Smoothing, SVLS (Islam, Glocker; IPMI 2021), as released (mobarakol/SVLS 77d1fd2).

    docs/methods.md 4d: soft target = conv(onehot, kernel) / kernel sum with replicate padding, kernel from
    `svls_kernel` (3^d, Gaussian of `sigma`, centre weight set to the neighbours' sum); loss = mean over voxels of
    the cross-entropy against the soft target. 2D and 3D (any number of spatial axes). Ignored voxels: see the module
    docstring.
    """

    def __init__(self, sigma: float = 1.0, ignore_index: int | None = None):
        super().__init__(ignore_index)
        check_finite_number(sigma=sigma)
        if sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        self.sigma = float(sigma)

    def compute(self, flat: FlatInputs):
        kernel = svls_kernel(len(flat.spatial), self.sigma)
        return _SVLSFunction.apply(flat.logits, flat.target, flat.valid, flat.voxel_divisor(), kernel,
                                   flat.spatial), {}

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}, ignore_index={self.ignore_index}"


def nacl_taps(kernel: str, kernel_size: int, sigma: float) -> tuple[float, ...]:
    """1-D taps of NACL's separable filter as MONAI 1.6.1 builds them: `MeanFilter(size) / size^d` is 1/size per
    axis; `GaussianFilter(sigma)` uses the erf-interpolated Gaussian truncated at 4 sigma (not normalised), and its
    size does not depend on `kernel_size`."""
    if kernel == "mean":
        return (1.0 / kernel_size,) * kernel_size
    tail = int(max(sigma * 4.0, 0.5) + 0.5)
    scale = 1.0 / (math.sqrt(2.0) * sigma)
    return tuple(max(0.0, 0.5 * (math.erf(scale * (x + 0.5)) - math.erf(scale * (x - 0.5))))
                 for x in range(-tail, tail + 1))


def _correlate_axis(source: torch.Tensor, out: torch.Tensor, axis: int, taps: tuple[float, ...]) -> None:
    """out = source correlated with `taps` along `axis`, zero padding, same size."""
    radius = len(taps) // 2
    size = source.shape[axis]
    torch.mul(source, taps[radius], out=out)
    for index, weight in enumerate(taps):
        shift = index - radius
        if shift == 0 or abs(shift) >= size:
            continue
        length = size - abs(shift)
        out.narrow(axis, max(0, -shift), length).add_(source.narrow(axis, max(0, shift), length), alpha=weight)


def _separable_filter(tensor: torch.Tensor, scratch: torch.Tensor, taps: tuple[float, ...]) -> tuple[torch.Tensor,
                                                                                                     torch.Tensor]:
    """Filter (B, C, *spatial) `tensor` along every spatial axis, ping-ponging with `scratch`; returns
    (result, the other buffer)."""
    for axis in range(2, tensor.ndim):
        _correlate_axis(tensor, scratch, axis, taps)
        tensor, scratch = scratch, tensor
    return tensor, scratch


class _NACLFunction(PrecomputedGradient):
    """CE + alpha * mean_{i,k} dist(tau_ik, z_ik). Two logits-sized buffers: tau (then the penalty's gradient) and
    log p (then the total gradient); the filter's second buffer becomes log p's."""

    @staticmethod
    def forward(ctx, logits, target, valid, divisor, taps, alpha, squared, spatial):
        batch, num_classes = logits.shape[:2]
        onehot = torch.zeros_like(logits)
        onehot.scatter_(1, target, 1.0 if valid is None else valid.to(logits.dtype))
        tau, spare = _separable_filter(onehot.view(batch, num_classes, *spatial),
                                       torch.empty_like(onehot).view(batch, num_classes, *spatial), taps)
        tau, spare = tau.view_as(logits), spare.view_as(logits)
        del onehot
        if valid is not None:
            kernel_sum = sum(taps) ** len(spatial)
            ignored = (~valid).to(logits.dtype).view(batch, 1, *spatial)
            ignored_weight, _ = _separable_filter(ignored, torch.empty_like(ignored), taps)
            tau.mul_(torch.where(valid, kernel_sum / (kernel_sum - ignored_weight.view_as(valid)), 0.0))

        needs_grad = ctx.needs_input_grad[0]
        slope = alpha / (divisor * num_classes)  # 0-d tensor: d term / d distance
        penalty = logits.new_zeros(())
        for part in voxel_chunks(tau, chunk_voxels(tau)):
            difference = tau[:, :, part].sub_(logits[:, :, part])  # tau - z, written over tau
            if valid is not None:
                difference.mul_(valid[:, :, part])
            penalty += difference.square().sum() if squared else difference.abs().sum()
            if needs_grad:
                if squared:
                    difference.mul_(-2.0 * slope)
                else:
                    difference.sign_().mul_(-slope)
        penalty = penalty / (divisor * num_classes)

        log_p, ce = log_softmax_cross_entropy(logits, target, valid, divisor, out=spare)
        if needs_grad:
            gradient = subtract_target_(log_p.exp_(), target, valid, divisor).add_(tau)
            PrecomputedGradient.save_gradient(ctx, gradient, "NACLLoss")
        penalty = alpha * penalty
        ctx.mark_non_differentiable(ce, penalty)
        return ce + penalty, ce, penalty


class NACLLoss(SegmentationLoss):
    """Neighbour-Aware CaLibration loss, NACL (Murugesan, Adiga Vasudeva, Liu, Lombaert, Ben Ayed, Dolz;
    MICCAI 2023 "Trust your neighbours", MedIA 2024).

    docs/methods.md 4e: CE + alpha * mean_{i,k} |tau_ik - z_ik| (distance "l1"; "l2": squared) on the raw logits, with
    tau the one-hot labels filtered per class: kernel "mean" (kernel_size^d box, weights 1/kernel_size^d) or
    "gaussian" (sigma; MONAI's erf kernel truncated at 4 sigma, so kernel_size does not apply), zero padding.
    Equals MONAI 1.6.1 `NACLLoss(classes=K, dim=d, kernel_size, kernel_ops, distance_type, alpha, sigma)`.
    `parts()` names the terms `ce` and `neighbour_penalty` (alpha times the mean distance). Ignored voxels: see the
    module docstring.
    """

    def __init__(self, alpha: float = 0.1, kernel_size: int = 3, kernel: str = "mean", sigma: float = 1.0,
                 distance: str = "l1", ignore_index: int | None = None):
        super().__init__(ignore_index)
        check_finite_number(alpha=alpha, sigma=sigma)
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd positive int (the kernel is centred on the voxel), got "
                             f"{kernel_size!r}")
        if kernel not in NACL_KERNELS:
            raise ValueError(f"kernel must be one of {NACL_KERNELS}, got {kernel!r}")
        if sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        if distance not in NACL_DISTANCES:
            raise ValueError(f"distance must be one of {NACL_DISTANCES}, got {distance!r}")
        self.alpha = float(alpha)
        self.kernel_size = kernel_size
        self.kernel = kernel
        self.sigma = float(sigma)
        self.distance = distance
        self.taps = nacl_taps(kernel, kernel_size, self.sigma)

    def compute(self, flat: FlatInputs):
        total, ce, penalty = _NACLFunction.apply(flat.logits, flat.target, flat.valid, flat.voxel_divisor(),
                                                 self.taps, self.alpha, self.distance == "l2", flat.spatial)
        return total, {"ce": ce, "neighbour_penalty": penalty}

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, kernel={self.kernel!r}, kernel_size={self.kernel_size}, sigma={self.sigma}, "
                f"distance={self.distance!r}, ignore_index={self.ignore_index}")
