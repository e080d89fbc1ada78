"""Binning kernels of `CalibrationStats`: the per-bin sums of one chunk of voxels (equal-width bins, or the fine
log-odds histogram of equal-mass binning), and the equal-mass bins formed from that histogram at compute time.

Counts are int64 and probability sums float64, so a bin holding more than 2**24 voxels (one CT volume can do that)
stays exact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# Probability entries (voxels x classes) processed at once; the temporaries take ~32 bytes per entry (~32 MiB).
# Measured on 2 quiet cores, 2**20 was fastest: larger chunks pay for fresh memory pages on every chunk.
CHUNK_ENTRIES = 2**20
# Copies of every histogram that `_lane_sums` spreads consecutive entries over (8 halved its time on the CPU).
_LANES = 8
_LANE_OFFSETS: dict[tuple[int, int, torch.device], torch.Tensor] = {}
_CACHED_LANE_OFFSETS = 4

BINNINGS = ("equal_width", "equal_mass")
# Equal-mass binning keeps a fine histogram with bins of equal width in log-odds t = log(p / (1 - p)): 2048 bins
# over t in [-16, 16] (width 1/64; the first and last also take everything beyond). A fine bin is ~0.004 wide at
# p = 0.5, ~1.5e-4 at p = 0.99 and ~1.6e-6 at p = 0.9999: segmentation confidences crowd next to 0 and 1, where an
# equal-width fine grid could not split them.
EQUAL_MASS_FINE_BINS = 2048
EQUAL_MASS_LOGIT_LIMIT = 16.0


def state_layout(num_classes: int, n_bins: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of every summed state tensor; n_bins is the number of stored (fine) bins."""
    per_class = (num_classes, n_bins)
    return {
        "top_count": ((n_bins,), torch.int64),
        "top_confidence": ((n_bins,), torch.float64),
        "top_correct": ((n_bins,), torch.int64),
        "class_count": (per_class, torch.int64),
        "class_probability": (per_class, torch.float64),
        "class_positive": (per_class, torch.int64),
        "brier_sum": ((), torch.float64),
        "nll_sum": ((), torch.float64),
    }


def _lane_offsets(num_rows: int, length: int, size: int, device: torch.device) -> torch.Tensor:
    """(num_rows, length) int64 offsets row * size + (column % _LANES) * num_rows * size: added to per-row bin
    indices in [0, size), they give a flat index into _LANES copies of num_rows * size bins (see `_lane_sums`).
    Cached (a few shapes: each accumulator uses two), as most chunks have the same shape."""
    key = (num_rows, size, device)
    offsets = _LANE_OFFSETS.get(key)
    if offsets is None or offsets.shape[1] < length:
        row = torch.arange(num_rows, device=device)[:, None] * size
        lane = (torch.arange(max(length, CHUNK_ENTRIES // num_rows), device=device) % _LANES) * (num_rows * size)
        offsets = row + lane
        if len(_LANE_OFFSETS) >= _CACHED_LANE_OFFSETS:  # memory stays bounded by a few chunks
            del _LANE_OFFSETS[next(iter(_LANE_OFFSETS))]
        _LANE_OFFSETS[key] = offsets
    return offsets[:, :length]


def _lane_sums(lane_index: torch.Tensor, size: int, *weights: torch.Tensor | None) -> list[torch.Tensor]:
    """For each of `weights`, the per-bin sum over a flat index into _LANES copies of `size` bins (`_lane_offsets`):
    an int64 count for None, else the sum of the (float64 or int64) weights.

    scatter_add_ is several times faster than torch.bincount on the CPU (which adds min/max passes); the copies
    (entry j goes to copy j % _LANES) keep additions into the same few crowded bins (p near 0 or 1) from waiting on
    each other.
    """
    sums = []
    for weight in weights:
        if weight is None:
            weight = torch.ones(1, dtype=torch.int64, device=lane_index.device).expand(lane_index.numel())
        lanes = torch.zeros(_LANES * size, dtype=weight.dtype, device=lane_index.device)
        sums.append(lanes.scatter_add_(0, lane_index, weight).view(_LANES, size).sum(dim=0))
    return sums


def equal_width_bins(values: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Bin b (as a float tensor) of every entry of values in [0, 1]: edges[b] < x <= edges[b + 1] with the edges
    b / n_bins rounded to the values' dtype; 0 falls in bin 0.

    Arithmetic instead of torch.bucketize, which is several times slower on the CPU: c = ceil(x * n_bins) is off by
    at most one next to an edge, so the bin is c - 2 + [x > edges[c - 1]] + [x > edges[c]].
    """
    candidate = (values * n_bins).ceil_().clamp_(1, n_bins)
    above_lower = torch.gt(values, (candidate - 1).div_(n_bins), out=torch.empty_like(values))  # 0 / 1 as floats,
    above_upper = torch.gt(values, candidate / n_bins, out=torch.empty_like(values))  # cheaper than bools
    return candidate.add_(above_lower).add_(above_upper).sub_(2).clamp_(0, n_bins - 1)


def log_odds_bins(values: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Bin b (as a float tensor) of every entry of values in [0, 1] on the fine log-odds grid of equal-mass binning:
    t_b < log(x / (1 - x)) <= t_{b+1}, t_b = L * (2 b / n_bins - 1), with the log-odds computed in the values' dtype
    (so a value within rounding of an edge may land on either side); 0 falls in bin 0, 1 in the last."""
    scale = n_bins / (2 * EQUAL_MASS_LOGIT_LIMIT)
    log_odds = values.log().sub_(torch.log1p(-values))
    return log_odds.add_(EQUAL_MASS_LOGIT_LIMIT).mul_(scale).ceil_().clamp_(1, n_bins).sub_(1)


def _first_arg_max(probabilities: torch.Tensor, confidence: torch.Tensor) -> torch.Tensor:
    """The first k with p_k == max p (torch.max's choice among ties) as min over k of k + K * [p_k < max p]: in uint8
    (up to 128 classes) this is several times faster than max(dim=0) on the CPU."""
    num_classes = probabilities.shape[0]
    below = probabilities < confidence
    dtype = torch.uint8 if num_classes <= 128 else torch.int32
    below = below.view(dtype) if dtype == torch.uint8 else below.to(dtype)
    rows = torch.arange(num_classes, dtype=dtype, device=probabilities.device)[:, None]
    return torch.add(rows, below, alpha=num_classes).amin(dim=0)


def chunk_state(probabilities: torch.Tensor, labels: torch.Tensor, n_bins: int,
                 bins_of: Callable[[torch.Tensor, int], torch.Tensor]) -> dict[str, torch.Tensor]:
    """State sums of one chunk: probabilities (K, V) float32/float64 contiguous, labels (V,) int64 in [0, K)."""
    num_classes, num_voxels = probabilities.shape
    device = probabilities.device
    labels_row = labels[None]
    bins = bins_of(probabilities, n_bins)
    top_bin = bins.amax(dim=0).long()  # the binning is monotone: the top confidence has the largest bin
    # Classwise bins as one flat index (lane * K + k) * n_bins + b, so one binned sum covers all classes.
    class_bin = bins.long().add_(_lane_offsets(num_classes, num_voxels, n_bins, device))
    confidence = probabilities.amax(dim=0)
    correct = _first_arg_max(probabilities, confidence) == labels

    probabilities64 = probabilities.to(torch.float64)  # sums are taken in the weights' dtype
    true_probability = probabilities64.gather(0, labels_row)[0]
    flat64 = probabilities64.view(-1)
    tiny = torch.finfo(probabilities.dtype).tiny
    # Top label: count and correct count from one binned count of 2 * bin + correct.
    top_index = (2 * top_bin + correct).add_(_lane_offsets(1, num_voxels, 2 * n_bins, device)[0])
    top_count_correct, top_confidence = _lane_sums(top_index, 2 * n_bins, None, confidence.to(torch.float64))
    num_entries = num_classes * n_bins
    class_count, class_probability = _lane_sums(class_bin.view(-1), num_entries, None, flat64)
    class_positive, = _lane_sums(class_bin.gather(0, labels_row)[0], num_entries, None)
    return {
        "top_count": top_count_correct.view(n_bins, 2).sum(dim=1),
        "top_confidence": top_confidence.view(n_bins, 2).sum(dim=1),
        "top_correct": top_count_correct.view(n_bins, 2)[:, 1],
        "class_count": class_count,
        "class_probability": class_probability,
        "class_positive": class_positive,
        # sum_k (p_k - 1[y = k])^2 = sum_k p_k^2 - 2 p_y + 1, in float64
        "brier_sum": torch.dot(flat64, flat64) - 2 * true_probability.sum() + labels.numel(),
        "nll_sum": -true_probability.clamp_min(tiny).log().sum(),
    }


def equal_mass_groups(count: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Bin of every fine bin of count (rows, R): the voxels of rank r = 0 .. N-1 (ascending value) belong to bin
    floor(n_bins * r / N); a fine bin goes whole to the bin of its first voxel, an empty one to the bin of the next
    voxel (the last bin after the last voxel)."""
    total = count.sum(dim=1, keepdim=True)
    before = count.cumsum(dim=1) - count
    return torch.div(n_bins * before, total.clamp_min(1), rounding_mode="floor").clamp_(max=n_bins - 1)


def fine_edges() -> torch.Tensor:
    """The R + 1 edges of the fine equal-mass grid in probability: 0, sigmoid(t_1), ..., sigmoid(t_{R-1}), 1."""
    log_odds = torch.linspace(-EQUAL_MASS_LOGIT_LIMIT, EQUAL_MASS_LOGIT_LIMIT, EQUAL_MASS_FINE_BINS + 1,
                              dtype=torch.float64)
    edges = torch.sigmoid(log_odds)
    edges[0], edges[-1] = 0.0, 1.0
    return edges


@dataclass(frozen=True)
class Binned:
    """Per-bin sums of rows of reliability curves (row 0 the top label, rows 1.. the classes)."""

    edges: torch.Tensor  # (rows, n_bins + 1) float64
    count: torch.Tensor  # (rows, n_bins) int64
    hits: torch.Tensor  # (rows, n_bins) int64: correct top label, or y == k
    probability: torch.Tensor  # (rows, n_bins) float64: summed confidence, or summed p_k

