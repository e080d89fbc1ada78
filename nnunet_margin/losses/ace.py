"""Marginal L1 average calibration error losses, mL1-ACE (Barfoot et al., MICCAI 2024; arXiv 2506.03942).

Released code: cai4cai/Average-Calibration-Losses 5ad8418, src/losses/hardl1ace.py and softl1ace.py; formulas in
docs/methods.md 4f. These are the ACE term only (the papers train with 0.33 ACE + 0.33 Dice + 0.33 CE; the trainer
adds nnU-Net's own Dice and CE).

For each image b and class c (background included), with p = softmax(z) and y = onehot:

    f_bc = mean over non-empty bins n of |mean_n p - mean_n y|,   loss = mean over b and c of f_bc

and f_bc = 0 where class c has no ground-truth voxel in image b (such pairs stay in the mean). Bins as the released
code computes them: `torch.bucketize(p, edges[1:], right=False)` with edges = linspace(0, 1 + eps_float32, bins + 1)
in float32, i.e. bin n holds edges[n] < p <= edges[n + 1] (p = 0 in the first bin). Hard: a bin is empty without
voxels. Soft: each voxel's weight is split linearly between the two nearest bin centres (all of it below the first /
above the last centre), means are weighted, a bin with summed weight < empty_weight is empty. The gradient is that
of the released code under autograd: through the bin means (and, soft, through the weights), not through the bin
assignment, the empty-bin rule or the ground-truth presence.

Vectorised over images x classes x bins: statistics are scatter-added into (B, K, bins) tables in chunks of voxels
(float64 totals), then a second pass writes the gradient. Ignored voxels are left out of every bin and of the
ground-truth presence. One logits-sized buffer (softmax, then the gradient).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._fused import PrecomputedGradient, voxel_chunks
from ._inputs import FlatInputs, check_finite_number, chunk_voxels
from .base import SegmentationLoss

_FLOAT32_EPS = torch.finfo(torch.float32).eps


def bin_edges(num_bins: int) -> tuple[float, ...]:
    """The released code's bin edges: float32 linspace(0, 1 + eps_float32, num_bins + 1)."""
    edges = torch.linspace(0.0, 1.0 + _FLOAT32_EPS, num_bins + 1, dtype=torch.float32)  # a CPU tensor
    return tuple(float(edge) for edge in edges.numpy())


class _Binning(NamedTuple):
    """Host-side tables of one binning. Every value p gets an index r = #{thresholds t_j < p}
    (`torch.bucketize(p, thresholds, right=False)`): hard, the bin itself (thresholds = the inner edges); soft, the
    number of bin centres below p, in [0, bins], with p's weight split between bins left[r] and right[r] as
    (1 - w, w), w = (p - base[r]) * inverse_span[r] (w = 0 below the first and above the last centre)."""

    soft: bool
    thresholds: tuple[float, ...]  # one per bin
    left: tuple[int, ...]  # one per index r
    right: tuple[int, ...]
    base: tuple[float, ...]
    inverse_span: tuple[float, ...]

    @staticmethod
    def for_hard(num_bins: int) -> "_Binning":
        inner = bin_edges(num_bins)[1:]
        bins = tuple(range(num_bins))
        return _Binning(False, inner, bins, bins, (0.0,) * num_bins, (0.0,) * num_bins)

    @staticmethod
    def for_soft(num_bins: int) -> "_Binning":
        centres = bin_edges(2 * num_bins)[1::2]
        indices = range(num_bins + 1)
        interior = [0 < r < num_bins for r in indices]
        return _Binning(True, centres, tuple(max(r - 1, 0) for r in indices),
                        tuple(min(r, num_bins - 1) for r in indices),
                        tuple(centres[r - 1] if inside else 0.0 for r, inside in zip(indices, interior)),
                        tuple(1.0 / (centres[r] - centres[r - 1]) if inside else 0.0
                              for r, inside in zip(indices, interior)))


def _lookup(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table[index] for a 1-D table (gather on the expanded table: several times faster than take on the CPU)."""
    return table.expand(*index.shape[:-1], table.numel()).gather(-1, index)


class _CountBelow:
    """`torch.bucketize(p, thresholds, right=False)` (the number of thresholds below p) for p in [0, 1] and equally
    spaced (up to rounding) thresholds: find the nearest threshold arithmetically, then compare p with it exactly;
    every other threshold is at least half a spacing away. (bucketize's binary search is about 20x slower on the
    CPU.)"""

    def __init__(self, thresholds: tuple[float, ...], dtype: torch.dtype, device: torch.device):
        self.thresholds = torch.tensor(thresholds, dtype=dtype, device=device)
        spacing = (thresholds[-1] - thresholds[0]) / (len(thresholds) - 1) if len(thresholds) > 1 else 1.0
        self.scale = 1.0 / spacing
        self.offset = 0.5 - thresholds[0] / spacing  # nearest = floor((p - t_0) / spacing + 0.5), clamped
        self.last = len(thresholds) - 1

    def __call__(self, p: torch.Tensor) -> torch.Tensor:
        nearest = p.mul(self.scale)
        if self.offset != 0.0:
            nearest.add_(self.offset)
        nearest = nearest.long().clamp_(0, self.last)  # truncation = floor here: values below 0 end up at 0
        return nearest.add_(p > _lookup(self.thresholds, nearest))


class _BinnedACEFunction(PrecomputedGradient):
    """Hard or soft binned marginal L1-ACE (see the module docstring).

    The first pass stores each value's index r (uint8) and scatter-adds per (image, class, r) the count and the sums
    of d = p - base[r] (and, soft, of d^2): within one index the soft weight w = d * inverse_span[r] is affine in p,
    so these sums give every bin's weight W, sum of p (P) and, from the label voxels' count and sum of d per
    (image, label, r), of y (Y); d keeps the float32 chunk sums well conditioned. The second pass writes the gradient
    d loss / d p = G0[r] + G1[r] (2 p - y) through the softmax.
    """

    @staticmethod
    def forward(ctx, logits, target, valid, binning, empty_weight):
        batch, num_classes, voxels = logits.shape
        dtype, device = logits.dtype, logits.device
        soft = binning.soft
        num_bins, num_indices = len(binning.thresholds), len(binning.left)
        count_below = _CountBelow(binning.thresholds, dtype, device)
        left = torch.tensor(binning.left, device=device)
        right = torch.tensor(binning.right, device=device)
        base = torch.tensor(binning.base, dtype=torch.float64, device=device)
        inverse_span = torch.tensor(binning.inverse_span, dtype=torch.float64, device=device)
        base_in_dtype = base.to(dtype)
        table_shape = (batch, num_classes, num_indices)
        sums = torch.zeros((3 if soft else 2, *table_shape), dtype=torch.float64, device=device)
        truth_sums = torch.zeros((2, *table_shape), dtype=torch.float64, device=device)

        buffer = torch.softmax(logits, dim=1)
        indices = torch.empty(logits.shape, dtype=torch.uint8 if num_indices <= 256 else torch.int64, device=device)
        step = chunk_voxels(buffer)
        one = buffer.new_ones(())
        for part in voxel_chunks(buffer, step):
            p = buffer[:, :, part]
            labels = target[:, :, part]
            index = count_below(p)
            indices[:, :, part] = index
            offset = p  # hard: base = 0
            if soft:
                base_at = _lookup(base_in_dtype, index)
                offset = torch.sub(p, base_at, out=base_at)
            if valid is None:
                counted = one.expand_as(p)
            else:
                counted = valid[:, :, part].to(dtype).expand_as(p)
                offset = offset * counted
            chunk = torch.zeros_like(sums, dtype=dtype)
            chunk[0].scatter_add_(2, index, counted)
            chunk[1].scatter_add_(2, index, offset)
            truth_index = labels * num_indices + index.gather(1, labels)
            truth_chunk = torch.zeros_like(truth_sums, dtype=dtype)
            for table, value in zip(truth_chunk, (counted, offset)):
                table.view(batch, 1, -1).scatter_add_(2, truth_index, value.gather(1, labels))
            if soft:
                chunk[2].scatter_add_(2, index, offset.square_())
            sums += chunk
            truth_sums += truth_chunk
            del index, offset, counted, truth_index, p  # free this chunk's scratch before the next one's

        def to_bins(at_index, weighted_at_index):
            """Per-index sums -> per-bin sums: weight 1 - w to the left bin, w to the right bin."""
            bins = torch.zeros((batch, num_classes, num_bins), dtype=torch.float64, device=device)
            return bins.index_add_(2, left, at_index - weighted_at_index).index_add_(2, right, weighted_at_index)

        count, offset_sum = sums[0], sums[1]
        p_at_index = offset_sum + count * base
        weight_sum = to_bins(count, offset_sum * inverse_span)  # sum of w = inverse_span * sum of d
        p_weighted = (sums[2] + base * offset_sum) * inverse_span if soft else torch.zeros_like(count)
        p_sum = to_bins(p_at_index, p_weighted)  # sum of w p = inverse_span * (sum of d^2 + base * sum of d)
        y_sum = to_bins(truth_sums[0], truth_sums[1] * inverse_span)
        non_empty = weight_sum >= empty_weight if soft else weight_sum > 0
        weight_sum = torch.where(non_empty, weight_sum, 1.0)
        difference = p_sum - y_sum
        has_truth = (y_sum.sum(2) > 0.5).double()
        # f_bc = sum over non-empty bins of |D| / W, divided by their number; loss = mean over B*K
        share = (has_truth / (non_empty.sum(2).clamp_min(1) * (batch * num_classes)))[:, :, None]
        per_bin = torch.where(non_empty, difference.abs() / weight_sum, 0.0)
        loss = (per_bin * share).sum().to(dtype)

        if ctx.needs_input_grad[0]:
            # d loss / d P_n = sign(D_n) / W_n and d loss / d W_n = -|D_n| / W_n^2 (times the share); with
            # P_n = sum (1-w) p + ..., W_n = sum (1-w) + ..., dw/dp = inverse_span: dL/dp = G0[r] + G1[r] (2p - y)
            slope_p = torch.where(non_empty, difference.sign() / weight_sum, 0.0) * share
            slope_weight = per_bin / weight_sum * share
            at_left, at_right = slope_p.index_select(2, left), slope_p.index_select(2, right)
            gap = at_right - at_left
            g0 = at_left + (slope_weight.index_select(2, left) - slope_weight.index_select(2, right)
                            - gap * base) * inverse_span
            g1 = (gap * inverse_span).to(dtype)
            g0 = g0.to(dtype)
            for part in voxel_chunks(buffer, step):
                p = buffer[:, :, part]
                labels = target[:, :, part]
                index = indices[:, :, part].long()
                grad_p = g0.gather(2, index)
                if soft:
                    slope = g1.gather(2, index)
                    grad_p.addcmul_(slope, p, value=2.0)
                    grad_p.scatter_add_(1, labels, slope.gather(1, labels).neg_())
                    del slope
                if valid is not None:
                    grad_p.mul_(valid[:, :, part])
                # softmax backward: p g - p sum_k p_k g_k, written over p
                grad_p.mul_(p)
                p.mul_(grad_p.sum(1, keepdim=True)).neg_().add_(grad_p)
                del index, grad_p
            PrecomputedGradient.save_gradient(ctx, buffer, "SoftL1ACELoss" if soft else "HardL1ACELoss")
        return loss


class _BinnedACELoss(SegmentationLoss):
    """Constructor check and `compute` shared by the hard (empty bin: no voxel) and soft ACE losses."""

    soft = False

    def __init__(self, num_bins: int = 20, empty_weight: float = 0.0, ignore_index: int | None = None):
        super().__init__(ignore_index)
        if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
            raise ValueError(f"num_bins must be a positive int, got {num_bins!r}")
        self.num_bins = num_bins
        self.empty_weight = float(empty_weight)
        self.binning = _Binning.for_soft(num_bins) if self.soft else _Binning.for_hard(num_bins)

    def compute(self, flat: FlatInputs):
        return _BinnedACEFunction.apply(flat.logits, flat.target, flat.valid, self.binning, self.empty_weight), {}


class HardL1ACELoss(_BinnedACELoss):
    """Hard-binned marginal L1 average calibration error loss, hL1-ACE (Barfoot, Garcia-Peraza-Herrera, Glocker,
    Vercauteren, MICCAI 2024; with Akcay, arXiv 2506.03942), as released (cai4cai/Average-Calibration-Losses,
    hardl1ace.py).

    docs/methods.md 4f and the module docstring: `num_bins` equal-width bins over [0, 1 + eps]; empty bins are left
    out of each image's and class's mean. The ACE term only.
    """

    def __init__(self, num_bins: int = 20, ignore_index: int | None = None):
        super().__init__(num_bins, ignore_index=ignore_index)

    def extra_repr(self) -> str:
        return f"num_bins={self.num_bins}, ignore_index={self.ignore_index}"


class SoftL1ACELoss(_BinnedACELoss):
    """Soft-binned marginal L1 average calibration error loss, sL1-ACE (Barfoot et al., MICCAI 2024 and
    arXiv 2506.03942), as released (cai4cai/Average-Calibration-Losses, softl1ace.py).

    docs/methods.md 4f and the module docstring: each voxel's weight is split linearly between the two nearest of
    `num_bins` bin centres; a bin whose summed weight is below `empty_weight` (released default 0.01) is empty.
    The ACE term only.
    """

    soft = True

    def __init__(self, num_bins: int = 20, empty_weight: float = 0.01, ignore_index: int | None = None):
        check_finite_number(empty_weight=empty_weight)
        if empty_weight <= 0:
            raise ValueError(f"empty_weight must be > 0 (the summed voxel weight below which a bin is empty), got "
                             f"{empty_weight}")
        super().__init__(num_bins, empty_weight, ignore_index)

    def extra_repr(self) -> str:
        return f"num_bins={self.num_bins}, empty_weight={self.empty_weight}, ignore_index={self.ignore_index}"
