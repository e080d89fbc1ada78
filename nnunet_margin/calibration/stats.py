"""Streaming calibration statistics: ECE, MCE, ACE, classwise ECE/ACE, Brier score and NLL from per-bin sums.

Definitions follow docs/methods.md sections 3 and 5. With the default equal-width binning, confidences fall into
`n_bins` bins (lower, upper] whose edges are b / n_bins rounded to the probabilities' dtype; a confidence of exactly 0
falls into the first bin, exactly 1 into the last. With equal-mass binning (Nixon et al. 2019) the state is a fine
histogram and the bins are formed from it at compute time (see `CalibrationStats`). Counts are int64 and probability
sums float64, so a bin holding more than 2**24 voxels (one CT volume can do that) stays exact. Memory beyond the
inputs is bounded by one chunk of voxels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

ArrayLike = torch.Tensor | np.ndarray

# Probability entries (voxels x classes) processed at once; the temporaries take ~32 bytes per entry (~32 MiB).
# Measured on 2 quiet cores, 2**20 was fastest: larger chunks pay for fresh memory pages on every chunk.
_CHUNK_ENTRIES = 2**20
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
# Allowed |sum_k p_k - 1| of a voxel; float16 and bfloat16 inputs get their dtype's epsilon where that is larger.
PROBABILITY_SUM_TOLERANCE = 1e-3


@dataclass(frozen=True)
class ReliabilityBins:
    """Per-bin statistics of one reliability curve; `accuracy` and `confidence` are NaN in empty bins."""

    edges: np.ndarray  # (n_bins + 1,)
    count: np.ndarray  # (n_bins,) int64
    accuracy: np.ndarray  # observed frequency of the event (correct top label, or y == k)
    confidence: np.ndarray  # mean predicted probability of the event

    @property
    def centers(self) -> np.ndarray:
        return (self.edges[:-1] + self.edges[1:]) / 2


def _state_layout(num_classes: int, n_bins: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
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


def _as_tensor(array: ArrayLike, name: str) -> torch.Tensor:
    if isinstance(array, torch.Tensor):
        return array
    if isinstance(array, np.ndarray):
        return torch.as_tensor(array)  # shares memory, no copy
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(array).__name__}")


def check_voxel_arrays(values: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None,
                       name: str = "probabilities") -> None:
    """Dtypes and shapes of `name` (K, *spatial) floats (probabilities or logits), integer labels (*spatial) and an
    optional bool mask."""
    if not values.is_floating_point():
        raise ValueError(f"{name} must be floating point, got dtype {values.dtype}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer array of class indices, got dtype {labels.dtype}")
    if tuple(labels.shape) != tuple(values.shape[1:]):
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match {name} shape "
                         f"{tuple(values.shape)}: expected labels of shape {tuple(values.shape[1:])}")
    if mask is not None:
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool array, got dtype {mask.dtype}")
        if tuple(mask.shape) != tuple(labels.shape):
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match labels shape {tuple(labels.shape)}")


def check_label_range(labels: torch.Tensor, num_classes: int) -> None:
    """Every label (of the voxels that count) is a class index in [0, num_classes)."""
    if labels.numel() == 0:
        return
    low, high = (int(value) for value in torch.aminmax(labels))
    if low < 0 or high >= num_classes:
        raise ValueError(f"labels hold the value {low if low < 0 else high}, outside [0, {num_classes}) for "
                         f"{num_classes} channels; mask out ignored voxels")


def probability_sum_tolerance(dtype: torch.dtype) -> float:
    """Allowed |sum_k p_k - 1| for probabilities stored in `dtype`: rounding K probabilities that sum to 1 moves
    the sum by at most half the dtype's epsilon, so max(PROBABILITY_SUM_TOLERANCE, eps) never rejects a softmax."""
    return max(PROBABILITY_SUM_TOLERANCE, torch.finfo(dtype).eps)


def check_probability_values(probabilities: torch.Tensor, sum_tolerance: float,
                             voxel_index: Callable[[int], Any] = lambda column: column) -> None:
    """Raise ValueError unless every entry of probabilities (K, n) is finite, every voxel's sum over the K classes
    lies within `sum_tolerance` of 1 and every entry is in [0, 1] (checked in this order). Every entry is checked
    (three passes over the chunk, ~10% of the binning's time). `voxel_index(column)` names the voxel in the message
    (e.g. its spatial index)."""
    if probabilities.numel() == 0:
        return
    if probabilities.dtype not in (torch.float32, torch.float64):
        probabilities = probabilities.float()
    low, high = (float(value) for value in torch.aminmax(probabilities))  # NaN propagates
    if not (math.isfinite(low) and math.isfinite(high)):
        column = int(torch.isfinite(probabilities).all(dim=0).logical_not_().nonzero()[0, 0])
        raise ValueError(f"probabilities hold NaN or inf values, e.g. at voxel {voxel_index(column)}: "
                         f"{probabilities[:, column].tolist()}")
    # rounding error below K * eps: far below the tolerance in float32 for up to 256 classes
    sums = probabilities.sum(dim=0, dtype=torch.float64 if probabilities.shape[0] > 256 else None)
    low_sum, high_sum = (float(value) for value in torch.aminmax(sums))
    if max(1 - low_sum, high_sum - 1) > sum_tolerance:
        column = int((sums - 1).abs_().argmax())
        raise ValueError(f"probabilities sum to {float(sums[column]):.6g} over the {probabilities.shape[0]} classes "
                         f"at voxel {voxel_index(column)}, expected 1 within {sum_tolerance:g}: pass softmax "
                         f"probabilities over the class axis (apply a softmax to logits first; one-vs-rest sigmoid "
                         f"outputs are not a categorical distribution)")
    if low < 0 or high > 1:
        bad, kind = (low, "the negative value") if low < 0 else (high, "the value")
        column = int(((probabilities == bad).any(dim=0)).nonzero()[0, 0])
        raise ValueError(f"probabilities hold {kind} {bad:.6g} at voxel {voxel_index(column)}, outside [0, 1]: pass "
                         f"class probabilities (apply a softmax over the class axis to logits first)")


def true_positions(mask: torch.Tensor) -> torch.Tensor:
    """Indices (int64) of the True entries of a 1-D bool mask; on the CPU via numpy, whose flatnonzero is about 8x
    faster than torch.nonzero."""
    if mask.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(mask.numpy()))
    return mask.nonzero()[:, 0]


def _voxel_batches(num_voxels: int, chunk: int, flat_mask: torch.Tensor | None) -> Iterator[slice | torch.Tensor]:
    """Batches of at most `chunk` voxels in visiting order: slices of all voxels without a mask, else the int64
    positions of the masked voxels, gathered over as many mask blocks as it takes to fill a batch (a sparse mask
    then still gives full batches, not many small ones that pay every operation's fixed cost)."""
    if flat_mask is None:
        yield from (slice(start, start + chunk) for start in range(0, num_voxels, chunk))
        return
    pending: list[torch.Tensor] = []
    num_pending = 0
    for start in range(0, num_voxels, chunk):
        positions = true_positions(flat_mask[start:start + chunk]) + start
        pending.append(positions)
        num_pending += len(positions)
        while num_pending >= chunk:
            joined = torch.cat(pending)
            yield joined[:chunk]
            pending, num_pending = [joined[chunk:]], num_pending - chunk
    if num_pending:
        yield torch.cat(pending)


def chunk_voxel_index(spatial_shape: tuple[int, ...], batch: slice | torch.Tensor,
                      order: list[int] | None = None) -> Callable[[int], tuple[int, ...]]:
    """For error messages: maps a column of a chunk to its index into the (*spatial) array. The chunk holds the
    voxels at the flat positions `batch` (a slice, or int64 positions) in the order that visits the axes `order`
    (default: C order)."""
    order = list(range(len(spatial_shape))) if order is None else order

    def voxel_index(column: int) -> tuple[int, ...]:
        position = batch.start + column if isinstance(batch, slice) else int(batch[column])
        index = [0] * len(spatial_shape)
        for axis, value in zip(order, np.unravel_index(position, [spatial_shape[axis] for axis in order])):
            index[axis] = int(value)
        return tuple(index)

    return voxel_index


def _lane_offsets(num_rows: int, length: int, size: int, device: torch.device) -> torch.Tensor:
    """(num_rows, length) int64 offsets row * size + (column % _LANES) * num_rows * size: added to per-row bin
    indices in [0, size), they give a flat index into _LANES copies of num_rows * size bins (see `_lane_sums`).
    Cached (a few shapes: each accumulator uses two), as most chunks have the same shape."""
    key = (num_rows, size, device)
    offsets = _LANE_OFFSETS.get(key)
    if offsets is None or offsets.shape[1] < length:
        row = torch.arange(num_rows, device=device)[:, None] * size
        lane = (torch.arange(max(length, _CHUNK_ENTRIES // num_rows), device=device) % _LANES) * (num_rows * size)
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


def _equal_width_bins(values: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Bin b (as a float tensor) of every entry of values in [0, 1]: edges[b] < x <= edges[b + 1] with the edges
    b / n_bins rounded to the values' dtype; 0 falls in bin 0.

    Arithmetic instead of torch.bucketize, which is several times slower on the CPU: c = ceil(x * n_bins) is off by
    at most one next to an edge, so the bin is c - 2 + [x > edges[c - 1]] + [x > edges[c]].
    """
    candidate = (values * n_bins).ceil_().clamp_(1, n_bins)
    above_lower = torch.gt(values, (candidate - 1).div_(n_bins), out=torch.empty_like(values))  # 0 / 1 as floats,
    above_upper = torch.gt(values, candidate / n_bins, out=torch.empty_like(values))  # cheaper than bools
    return candidate.add_(above_lower).add_(above_upper).sub_(2).clamp_(0, n_bins - 1)


def _log_odds_bins(values: torch.Tensor, n_bins: int) -> torch.Tensor:
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


def _chunk_state(probabilities: torch.Tensor, labels: torch.Tensor, n_bins: int,
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


def _equal_mass_groups(count: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Bin of every fine bin of count (rows, R): the voxels of rank r = 0 .. N-1 (ascending value) belong to bin
    floor(n_bins * r / N); a fine bin goes whole to the bin of its first voxel, an empty one to the bin of the next
    voxel (the last bin after the last voxel)."""
    total = count.sum(dim=1, keepdim=True)
    before = count.cumsum(dim=1) - count
    return torch.div(n_bins * before, total.clamp_min(1), rounding_mode="floor").clamp_(max=n_bins - 1)


def _fine_edges() -> torch.Tensor:
    """The R + 1 edges of the fine equal-mass grid in probability: 0, sigmoid(t_1), ..., sigmoid(t_{R-1}), 1."""
    log_odds = torch.linspace(-EQUAL_MASS_LOGIT_LIMIT, EQUAL_MASS_LOGIT_LIMIT, EQUAL_MASS_FINE_BINS + 1,
                              dtype=torch.float64)
    edges = torch.sigmoid(log_odds)
    edges[0], edges[-1] = 0.0, 1.0
    return edges


@dataclass(frozen=True)
class _Binned:
    """Per-bin sums of rows of reliability curves (row 0 the top label, rows 1.. the classes)."""

    edges: torch.Tensor  # (rows, n_bins + 1) float64
    count: torch.Tensor  # (rows, n_bins) int64
    hits: torch.Tensor  # (rows, n_bins) int64: correct top label, or y == k
    probability: torch.Tensor  # (rows, n_bins) float64: summed confidence, or summed p_k


class CalibrationStats:
    """Streaming accumulator of calibration statistics over any number of voxels, volumes and processes.

    Args:
        num_classes: K, the number of probability channels (background included).
        n_bins: number of confidence bins.
        binning: "equal_width" (default): bins (lower, upper] of width 1 / n_bins. "equal_mass": adaptive bins that
            each hold about the same number of voxels (Nixon et al. 2019), for the top label and for every class
            separately: the voxel of rank r of N (ascending value) belongs to bin floor(n_bins * r / N). The state
            then is a fine histogram (`EQUAL_MASS_FINE_BINS` bins of equal width in log-odds, see the module's
            constants), still exact and summed elementwise when merged; the bins are formed from consecutive fine
            bins at compute time, so voxels in one fine bin share a bin and a fine bin holding more than N / n_bins
            voxels leaves some bins empty (metrics use the non-empty bins).

    Metrics (`compute`), per bin b of n_b voxels with mean confidence conf_b and accuracy acc_b (docs/methods.md 3
    and 5): ECE = sum_b n_b / N |acc_b - conf_b|; MCE = max over non-empty bins; ACE (average calibration error) =
    unweighted mean over non-empty bins. The classwise forms bin p_k against 1[y == k] per class and average over
    classes. Nixon et al. call equal-mass classwise ECE "adaptive calibration error" (also ACE): here ACE always
    means the unweighted bin mean of MONAI and Barfoot et al.

    Bin edges differ from MONAI 1.6.1's `CalibrationErrorMetric` (20 bins by default, edges
    linspace(0, 1 + float32 eps, n_bins + 1), `torch.bucketize(right=False)`, which puts a value equal to an edge
    into the lower bin although MONAI's docstring says [left, right)): so MONAI's bins are (lower, upper] too, on
    edges shifted up by b / n_bins * eps, and only the one or two float32 values just above an edge b / n_bins land
    one bin lower there than here. MONAI also works per image and channel (one-hot y: our classwise metrics per
    image; a single channel of the top confidence against correctness gives our top-label ones) and sums in
    float32, which in a bin of millions of voxels is off in the third digit.

    Example::

        stats = CalibrationStats(num_classes=4)
        for probabilities, labels in cases:  # (K, *spatial), (*spatial)
            stats.update(probabilities, labels, mask=labels != 0)
        stats.compute()["ece"]
    """

    def __init__(self, num_classes: int, n_bins: int = 15, binning: str = "equal_width"):
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        if not isinstance(n_bins, int) or n_bins < 1:
            raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
        if binning not in BINNINGS:
            raise ValueError(f"binning must be one of {BINNINGS}, got {binning!r}")
        if binning == "equal_mass" and n_bins > EQUAL_MASS_FINE_BINS:
            raise ValueError(f"equal-mass binning forms at most {EQUAL_MASS_FINE_BINS} bins from its fine histogram, "
                             f"got n_bins={n_bins}; use fewer bins")
        self.num_classes = num_classes
        self.n_bins = n_bins
        self.binning = binning
        self.state = {name: torch.zeros(shape, dtype=dtype)
                      for name, (shape, dtype) in _state_layout(num_classes, self._stored_bins).items()}

    @property
    def _stored_bins(self) -> int:
        return self.n_bins if self.binning == "equal_width" else EQUAL_MASS_FINE_BINS

    @property
    def num_voxels(self) -> int:
        return int(self.state["top_count"].sum())

    def update(self, probabilities: ArrayLike, labels: ArrayLike, mask: ArrayLike | None = None) -> CalibrationStats:
        """Add voxels: probabilities (K, *spatial) of any float dtype, integer labels (*spatial), optional bool mask
        (*spatial) of the voxels that count. Where the mask is True, labels must lie in [0, K) and probabilities be
        finite, in [0, 1] and sum to 1 over the classes within `probability_sum_tolerance` (so logits or sigmoid
        outputs are rejected); no voxel (empty arrays or mask) adds nothing. On error the accumulator is left
        unchanged. Returns self."""
        probabilities = _as_tensor(probabilities, "probabilities")
        labels = _as_tensor(labels, "labels")
        mask = None if mask is None else _as_tensor(mask, "mask")
        self._check_inputs(probabilities, labels, mask)
        # Visit voxels in memory order (the sums do not depend on it), so that a transposed export, as nnU-Net
        # writes for non-identity transposes, flattens without copying the probabilities.
        order = sorted(range(labels.ndim), key=lambda axis: -probabilities.stride(axis + 1))
        flat_probabilities = probabilities.permute(0, *(axis + 1 for axis in order)).reshape(self.num_classes, -1)
        flat_labels = labels.permute(order).reshape(-1)
        flat_mask = None if mask is None else mask.permute(order).reshape(-1)
        compute_dtype = torch.promote_types(probabilities.dtype, torch.float32)
        sum_tolerance = probability_sum_tolerance(probabilities.dtype)
        bins_of = _equal_width_bins if self.binning == "equal_width" else _log_odds_bins

        delta = CalibrationStats(self.num_classes, self.n_bins, self.binning)
        chunk = max(1, _CHUNK_ENTRIES // self.num_classes)
        for batch in _voxel_batches(flat_labels.numel(), chunk, flat_mask):
            if isinstance(batch, slice):
                chunk_probabilities, chunk_labels = flat_probabilities[:, batch], flat_labels[batch]
            else:
                chunk_probabilities = flat_probabilities.index_select(1, batch)
                chunk_labels = flat_labels.index_select(0, batch)
            chunk_probabilities = chunk_probabilities.to(compute_dtype).contiguous()
            chunk_labels = chunk_labels.to(torch.int64)
            self._check_labels(chunk_labels)
            check_probability_values(chunk_probabilities, sum_tolerance,
                                     chunk_voxel_index(tuple(labels.shape), batch, order))
            chunk_state = _chunk_state(chunk_probabilities, chunk_labels, self._stored_bins, bins_of)
            for name, value in chunk_state.items():
                delta.state[name] += value.reshape(delta.state[name].shape).cpu()
        return self.merge(delta)

    def _check_inputs(self, probabilities: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None) -> None:
        if probabilities.ndim < 1 or probabilities.shape[0] != self.num_classes:
            raise ValueError(f"probabilities must have shape (K={self.num_classes}, *spatial), got "
                             f"{tuple(probabilities.shape)}; the accumulator was built for num_classes="
                             f"{self.num_classes}")
        check_voxel_arrays(probabilities, labels, mask)

    def _check_labels(self, labels: torch.Tensor) -> None:
        check_label_range(labels, self.num_classes)

    def _check_compatible(self, other: Any) -> None:
        if not isinstance(other, CalibrationStats):
            raise TypeError(f"can only merge CalibrationStats, got {type(other).__name__}")
        if (other.num_classes, other.n_bins, other.binning) != (self.num_classes, self.n_bins, self.binning):
            raise ValueError(f"cannot merge statistics with num_classes={other.num_classes}, n_bins={other.n_bins}, "
                             f"binning={other.binning!r} into num_classes={self.num_classes}, n_bins={self.n_bins}, "
                             f"binning={self.binning!r}")

    def merge(self, other: CalibrationStats) -> CalibrationStats:
        """Add the statistics of `other` (same num_classes, n_bins and binning) into self; returns self."""
        self._check_compatible(other)
        for name, value in other.state.items():
            self.state[name] += value
        return self

    def __add__(self, other: CalibrationStats) -> CalibrationStats:
        """A new accumulator holding both; the operands are unchanged."""
        self._check_compatible(other)
        return CalibrationStats(self.num_classes, self.n_bins, self.binning).merge(self).merge(other)

    def all_reduce(self) -> CalibrationStats:
        """Sum the statistics over all torch.distributed processes (no-op if not initialised); returns self."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        for name, value in self.state.items():
            reduced = value.to(device) if device is not None else value
            dist.all_reduce(reduced)
            self.state[name] = reduced.cpu()
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (Python ints and floats, so the round trip is exact)."""
        return {"num_classes": self.num_classes, "n_bins": self.n_bins, "binning": self.binning,
                "state": {name: value.tolist() for name, value in self.state.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CalibrationStats:
        """Inverse of `to_dict`; a dict without "binning" (written before equal-mass binning existed) is
        equal-width."""
        stats = cls(int(data["num_classes"]), int(data["n_bins"]), data.get("binning", "equal_width"))
        for name, value in stats.state.items():
            loaded = torch.tensor(data["state"][name], dtype=value.dtype)
            if loaded.shape != value.shape:
                raise ValueError(f"state '{name}' has shape {tuple(loaded.shape)}, expected {tuple(value.shape)}")
            stats.state[name] = loaded
        return stats

    def _binned(self) -> _Binned:
        """The n_bins bins of the top label (row 0) and of every class (rows 1..K)."""
        state = self.state
        count = torch.cat([state["top_count"][None], state["class_count"]])
        hits = torch.cat([state["top_correct"][None], state["class_positive"]])
        probability = torch.cat([state["top_confidence"][None], state["class_probability"]])
        if self.binning == "equal_width":
            edges = (torch.arange(self.n_bins + 1, dtype=torch.float64) / self.n_bins).expand(len(count), -1)
            return _Binned(edges=edges, count=count, hits=hits, probability=probability)
        groups = _equal_mass_groups(count, self.n_bins)

        def grouped(values: torch.Tensor) -> torch.Tensor:
            return torch.zeros(len(values), self.n_bins, dtype=values.dtype).scatter_add_(1, groups, values)

        first_fine_bin = torch.searchsorted(groups, torch.arange(self.n_bins).expand(len(count), -1).contiguous())
        edges = torch.cat([_fine_edges()[first_fine_bin], torch.ones(len(count), 1, dtype=torch.float64)], dim=1)
        return _Binned(edges=edges, count=grouped(count), hits=grouped(hits), probability=grouped(probability))

    def compute(self) -> dict[str, Any]:
        """Metrics as Python floats: `ece`, `mce` and `ace` of the top label; `classwise_ece` and `classwise_ace`
        (means of `class_ece` and `class_ace`, one value per class); `brier` (mean over voxels of the sum over
        classes), `nll` (mean) and `num_voxels`; NaN when empty. See the class docstring for the definitions."""
        num_voxels = self.num_voxels
        if num_voxels == 0:
            nan = float("nan")
            return {"ece": nan, "mce": nan, "ace": nan, "classwise_ece": nan, "class_ece": [nan] * self.num_classes,
                    "classwise_ace": nan, "class_ace": [nan] * self.num_classes, "brier": nan, "nll": nan,
                    "num_voxels": 0}
        binned = self._binned()
        gap = (binned.probability - binned.hits).abs()  # |sum confidence - sum hits| per bin
        occupied = binned.count > 0
        bin_gap = torch.where(occupied, gap / binned.count.clamp_min(1), 0.0)  # |conf_b - acc_b|, 0 where empty
        ece = gap.sum(dim=1) / num_voxels
        ace = bin_gap.sum(dim=1) / occupied.sum(dim=1)
        return {
            "ece": float(ece[0]),
            "mce": float(bin_gap[0].max()),
            "ace": float(ace[0]),
            "classwise_ece": float(ece[1:].mean()),
            "class_ece": ece[1:].tolist(),
            "classwise_ace": float(ace[1:].mean()),
            "class_ace": ace[1:].tolist(),
            "brier": float(self.state["brier_sum"] / num_voxels),
            "nll": float(self.state["nll_sum"] / num_voxels),
            "num_voxels": num_voxels,
        }

    def reliability(self) -> dict[str, Any]:
        """Reliability curves for plotting: {"top_label": ReliabilityBins, "classes": [ReliabilityBins] * K}."""
        binned = self._binned()

        def curve(row: int) -> ReliabilityBins:
            count = binned.count[row].numpy()
            with np.errstate(invalid="ignore", divide="ignore"):
                accuracy = np.where(count > 0, binned.hits[row].numpy() / count, np.nan)
                confidence = np.where(count > 0, binned.probability[row].numpy() / count, np.nan)
            return ReliabilityBins(edges=binned.edges[row].numpy().copy(), count=count.copy(), accuracy=accuracy,
                                   confidence=confidence)

        return {"top_label": curve(0), "classes": [curve(k + 1) for k in range(self.num_classes)]}

    def __repr__(self) -> str:
        return (f"CalibrationStats(num_classes={self.num_classes}, n_bins={self.n_bins}, binning={self.binning!r}, "
                f"num_voxels={self.num_voxels})")
