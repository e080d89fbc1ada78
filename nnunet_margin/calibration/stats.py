"""The streaming accumulator of calibration statistics: ECE, MCE, ACE, classwise ECE/ACE, Brier score and NLL from
per-bin sums.

Definitions follow docs/methods.md sections 3 and 5. With the default equal-width binning, confidences fall into
`n_bins` bins (lower, upper] whose edges are b / n_bins rounded to the probabilities' dtype; a confidence of exactly 0
falls into the first bin, exactly 1 into the last. With equal-mass binning (Nixon et al. 2019) the state is a fine
histogram and the bins are formed from it at compute time (see `CalibrationStats`). The per-bin sums are computed by
`binning.py` (int64 counts and float64 sums, exact beyond 2**24 voxels per bin), the inputs checked by `checks.py`.
Memory beyond the inputs is bounded by one chunk of voxels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .binning import (
    BINNINGS,
    CHUNK_ENTRIES,
    EQUAL_MASS_FINE_BINS,
    Binned,
    chunk_state,
    equal_mass_groups,
    equal_width_bins,
    fine_edges,
    log_odds_bins,
    state_layout,
)
from .checks import (
    ArrayLike,
    Volume,
    as_tensor,
    check_label_range,
    check_probability_values,
    is_batch,
    probability_sum_tolerance,
    split_volumes,
)
from .chunks import chunk_voxel_index, voxel_chunks


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


class CalibrationStats:
    """Streaming accumulator of calibration statistics over any number of voxels, volumes and processes.

    Args:
        num_classes: K, the number of probability channels (background included).
        n_bins: number of confidence bins.
        binning: "equal_width" (default): bins (lower, upper] of width 1 / n_bins. "equal_mass": adaptive bins that
            each hold about the same number of voxels (Nixon et al. 2019), for the top label and for every class
            separately: the voxel of rank r of N (ascending value) belongs to bin floor(n_bins * r / N). The state
            then is a fine histogram (`EQUAL_MASS_FINE_BINS` bins of equal width in log-odds, see the constants
            of `binning.py`), still exact and summed elementwise when merged; the bins are formed from consecutive fine
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
                      for name, (shape, dtype) in state_layout(num_classes, self._stored_bins).items()}

    @property
    def _stored_bins(self) -> int:
        return self.n_bins if self.binning == "equal_width" else EQUAL_MASS_FINE_BINS

    @property
    def num_voxels(self) -> int:
        return int(self.state["top_count"].sum())

    def update(self, probabilities: ArrayLike, labels: ArrayLike, mask: ArrayLike | None = None) -> CalibrationStats:
        """Add voxels of one volume: probabilities (K, *spatial) of any float dtype, integer labels (*spatial),
        optional bool mask (*spatial) of the voxels that count; or of a batch: probabilities (B, K, *spatial), labels
        and mask (B, 1, *spatial) (the rule: `checks.is_batch`), which adds exactly what updates with its volumes in
        turn add to an empty accumulator. Where the mask is True, labels must lie in [0, K) and probabilities be
        finite, in [0, 1] and sum to 1 over the classes within `probability_sum_tolerance` (so logits or sigmoid
        outputs are rejected); no voxel (empty arrays or mask) adds nothing. On error the accumulator is left
        unchanged. Returns self."""
        probabilities = as_tensor(probabilities, "probabilities")
        labels = as_tensor(labels, "labels")
        mask = None if mask is None else as_tensor(mask, "mask")
        delta = CalibrationStats(self.num_classes, self.n_bins, self.binning)
        for volume in self._checked_volumes(probabilities, labels, mask):
            delta.merge(self._volume_statistics(volume))
        return self.merge(delta)

    def _volume_statistics(self, volume: Volume) -> CalibrationStats:
        """The statistics of one volume's counted voxels, in a new accumulator."""
        probabilities, labels, mask = volume.probabilities, volume.labels, volume.mask
        # Visit voxels in memory order (the sums do not depend on it), so that a transposed export, as nnU-Net
        # writes for non-identity transposes, flattens without copying the probabilities.
        order = sorted(range(labels.ndim), key=lambda axis: -probabilities.stride(axis + 1))
        flat_probabilities = probabilities.permute(0, *(axis + 1 for axis in order)).reshape(self.num_classes, -1)
        flat_labels = labels.permute(order).reshape(-1)
        flat_mask = None if mask is None else mask.permute(order).reshape(-1)
        compute_dtype = torch.promote_types(probabilities.dtype, torch.float32)
        sum_tolerance = probability_sum_tolerance(probabilities.dtype)
        bins_of = equal_width_bins if self.binning == "equal_width" else log_odds_bins

        delta = CalibrationStats(self.num_classes, self.n_bins, self.binning)
        chunk = max(1, CHUNK_ENTRIES // self.num_classes)
        for positions in voxel_chunks(flat_labels.numel(), chunk, flat_mask):
            if isinstance(positions, slice):
                chunk_probabilities, chunk_labels = flat_probabilities[:, positions], flat_labels[positions]
            else:
                chunk_probabilities = flat_probabilities.index_select(1, positions)
                chunk_labels = flat_labels.index_select(0, positions)
            chunk_probabilities = chunk_probabilities.to(compute_dtype).contiguous()
            chunk_labels = chunk_labels.to(torch.int64)
            self._check_labels(chunk_labels)
            check_probability_values(chunk_probabilities, sum_tolerance,
                                     chunk_voxel_index(tuple(labels.shape), positions, order, volume.index))
            sums = chunk_state(chunk_probabilities, chunk_labels, self._stored_bins, bins_of)
            for name, value in sums.items():
                delta.state[name] += value.reshape(delta.state[name].shape).cpu()
        return delta

    def _checked_volumes(self, probabilities: torch.Tensor, labels: torch.Tensor,
                         mask: torch.Tensor | None) -> list[Volume]:
        class_axis = 1 if is_batch(probabilities, labels) else 0
        if probabilities.ndim <= class_axis or probabilities.shape[class_axis] != self.num_classes:
            raise ValueError(f"probabilities must have shape (K={self.num_classes}, *spatial), or (B, "
                             f"K={self.num_classes}, *spatial) with labels (B, 1, *spatial), got "
                             f"{tuple(probabilities.shape)}; the accumulator was built for num_classes="
                             f"{self.num_classes}")
        return split_volumes(probabilities, labels, mask)

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

    def _binned(self) -> Binned:
        """The n_bins bins of the top label (row 0) and of every class (rows 1..K)."""
        state = self.state
        count = torch.cat([state["top_count"][None], state["class_count"]])
        hits = torch.cat([state["top_correct"][None], state["class_positive"]])
        probability = torch.cat([state["top_confidence"][None], state["class_probability"]])
        if self.binning == "equal_width":
            edges = (torch.arange(self.n_bins + 1, dtype=torch.float64) / self.n_bins).expand(len(count), -1)
            return Binned(edges=edges, count=count, hits=hits, probability=probability)
        groups = equal_mass_groups(count, self.n_bins)

        def grouped(values: torch.Tensor) -> torch.Tensor:
            return torch.zeros(len(values), self.n_bins, dtype=values.dtype).scatter_add_(1, groups, values)

        first_fine_bin = torch.searchsorted(groups, torch.arange(self.n_bins).expand(len(count), -1).contiguous())
        edges = torch.cat([fine_edges()[first_fine_bin], torch.ones(len(count), 1, dtype=torch.float64)], dim=1)
        return Binned(edges=edges, count=grouped(count), hits=grouped(hits), probability=grouped(probability))

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
