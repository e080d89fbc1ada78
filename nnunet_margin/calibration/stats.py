"""Streaming calibration statistics: ECE, MCE, classwise ECE, Brier score and NLL from per-bin sums.

Definitions follow docs/methods.md section 3. Confidences are binned into `n_bins` equal-width bins (lower, upper]
whose edges are b / n_bins rounded to the probabilities' dtype; a confidence of exactly 0 falls into the first bin,
exactly 1 into the last. Counts are int64 and probability sums float64, so a bin holding more than 2**24 voxels
(one CT volume can do that) stays exact. Memory beyond the inputs is bounded by one chunk of voxels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

ArrayLike = torch.Tensor | np.ndarray

# Probability entries (voxels x classes) processed at once; the temporaries take ~32 bytes per entry (~32 MiB).
# Measured on 2 quiet cores, 2**20 was fastest: larger chunks pay for fresh memory pages on every chunk.
_CHUNK_ENTRIES = 2**20


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
    """Name -> (shape, dtype) of every summed state tensor."""
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


def check_voxel_arrays(probabilities: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None) -> None:
    """Dtypes and shapes of probabilities (K, *spatial), integer labels (*spatial) and an optional bool mask."""
    if not probabilities.is_floating_point():
        raise ValueError(f"probabilities must be floating point, got dtype {probabilities.dtype}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer array of class indices, got dtype {labels.dtype}")
    if tuple(labels.shape) != tuple(probabilities.shape[1:]):
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match probabilities shape "
                         f"{tuple(probabilities.shape)}: expected labels of shape {tuple(probabilities.shape[1:])}")
    if mask is not None:
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool array, got dtype {mask.dtype}")
        if tuple(mask.shape) != tuple(labels.shape):
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match labels shape {tuple(labels.shape)}")


def _binned_sum(index: torch.Tensor, size: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per-bin count (int64) or sum of float64 weights; like torch.bincount, but several times faster on CPU
    (scatter_add_ skips bincount's min/max passes over the index)."""
    if weights is None:
        weights = torch.ones(1, dtype=torch.int64, device=index.device).expand(index.numel())
    return torch.zeros(size, dtype=weights.dtype, device=index.device).scatter_add_(0, index, weights)


def _flat_bin_index(values: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Index row * n_bins + b of every entry of values (rows, V): bin b holds edges[b] < x <= edges[b + 1] with the
    edges b / n_bins rounded to the values' dtype; 0 (and below) falls in bin 0, 1 (and above, NaN) in the last.

    Arithmetic instead of torch.bucketize, which is about twice as slow on the CPU: ceil(x * n_bins) is off by at
    most one next to an edge, and one comparison with each of the bin's rounded edges corrects it.
    """
    candidate = (values * n_bins).ceil_().clamp_(1, n_bins).nan_to_num_(nan=float(n_bins))  # bin + 1
    step_down = values <= (candidate - 1).div_(n_bins)
    step_up = values > candidate / n_bins
    candidate += step_up
    candidate.sub_(step_down.to(values.dtype))
    candidate.clamp_(1, n_bins).sub_(1)
    candidate += torch.arange(0, values.shape[0] * n_bins, n_bins, dtype=values.dtype, device=values.device)[:, None]
    return candidate.long()


def _chunk_state(probabilities: torch.Tensor, labels: torch.Tensor, n_bins: int) -> dict[str, torch.Tensor]:
    """State sums of one chunk: probabilities (K, V) float32/float64 contiguous, labels (V,) int64 in [0, K)."""
    num_classes = probabilities.shape[0]
    labels_row = labels[None]

    # Classwise bins as one flat index k * n_bins + b, so one binned sum covers all classes.
    class_bin = _flat_bin_index(probabilities, n_bins)
    flat_class_bin = class_bin.view(-1)
    num_entries = num_classes * n_bins
    confidence, prediction = probabilities.max(dim=0)
    top_bin = class_bin.gather(0, prediction[None])[0] - prediction * n_bins  # the predicted class's bin
    # Top-label count and correct count from one binned count of 2 * bin + correct.
    top_bin_correct = _binned_sum(2 * top_bin + (prediction == labels), 2 * n_bins).view(n_bins, 2)

    probabilities64 = probabilities.to(torch.float64)  # sums are taken in the weights' dtype
    true_probability = probabilities64.gather(0, labels_row)[0]
    flat64 = probabilities64.view(-1)
    tiny = torch.finfo(probabilities.dtype).tiny
    return {
        "top_count": top_bin_correct.sum(dim=1),
        "top_confidence": _binned_sum(top_bin, n_bins, confidence.to(torch.float64)),
        "top_correct": top_bin_correct[:, 1],
        "class_count": _binned_sum(flat_class_bin, num_entries),
        "class_probability": _binned_sum(flat_class_bin, num_entries, flat64),
        "class_positive": _binned_sum(class_bin.gather(0, labels_row)[0], num_entries),
        # sum_k (p_k - 1[y = k])^2 = sum_k p_k^2 - 2 p_y + 1, in float64
        "brier_sum": torch.dot(flat64, flat64) - 2 * true_probability.sum() + labels.numel(),
        "nll_sum": -true_probability.clamp_min(tiny).log().sum(),
    }


class CalibrationStats:
    """Streaming accumulator of calibration statistics over any number of voxels, volumes and processes.

    Args:
        num_classes: K, the number of probability channels (background included).
        n_bins: number of equal-width confidence bins.

    Example::

        stats = CalibrationStats(num_classes=4)
        for probabilities, labels in cases:  # (K, *spatial), (*spatial)
            stats.update(probabilities, labels, mask=labels != 0)
        stats.compute()["ece"]
    """

    def __init__(self, num_classes: int, n_bins: int = 15):
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        if not isinstance(n_bins, int) or n_bins < 1:
            raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
        self.num_classes = num_classes
        self.n_bins = n_bins
        self.state = {name: torch.zeros(shape, dtype=dtype)
                      for name, (shape, dtype) in _state_layout(num_classes, n_bins).items()}

    @property
    def num_voxels(self) -> int:
        return int(self.state["top_count"].sum())

    def update(self, probabilities: ArrayLike, labels: ArrayLike, mask: ArrayLike | None = None) -> CalibrationStats:
        """Add voxels: probabilities (K, *spatial) of any float dtype, integer labels (*spatial), optional bool mask
        (*spatial) of the voxels that count. Labels and probabilities are only checked where the mask is True.
        On error the accumulator is left unchanged. Returns self."""
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

        delta = CalibrationStats(self.num_classes, self.n_bins)
        chunk = max(1, _CHUNK_ENTRIES // self.num_classes)
        for start in range(0, flat_labels.numel(), chunk):
            part = slice(start, start + chunk)
            chunk_probabilities, chunk_labels = flat_probabilities[:, part], flat_labels[part]
            if flat_mask is not None:
                keep = flat_mask[part]
                chunk_probabilities, chunk_labels = chunk_probabilities[:, keep], chunk_labels[keep]
            chunk_probabilities = chunk_probabilities.to(compute_dtype).contiguous()
            chunk_labels = chunk_labels.to(torch.int64)
            self._check_labels(chunk_labels)
            chunk_state = _chunk_state(chunk_probabilities, chunk_labels, self.n_bins)
            # Every probability is summed into class_probability, so NaN/inf anywhere shows there.
            if not bool(torch.isfinite(chunk_state["class_probability"]).all()):
                raise ValueError("probabilities hold NaN or inf values")
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
        if labels.numel() == 0:
            return
        low, high = (int(value) for value in torch.aminmax(labels))
        if low < 0 or high >= self.num_classes:
            raise ValueError(f"labels hold the value {low if low < 0 else high}, outside [0, {self.num_classes}) for "
                             f"{self.num_classes} probability channels; mask out ignored voxels")

    def _check_compatible(self, other: Any) -> None:
        if not isinstance(other, CalibrationStats):
            raise TypeError(f"can only merge CalibrationStats, got {type(other).__name__}")
        if (other.num_classes, other.n_bins) != (self.num_classes, self.n_bins):
            raise ValueError(f"cannot merge statistics with num_classes={other.num_classes}, n_bins={other.n_bins} "
                             f"into num_classes={self.num_classes}, n_bins={self.n_bins}")

    def merge(self, other: CalibrationStats) -> CalibrationStats:
        """Add the statistics of `other` (same num_classes and n_bins) into self; returns self."""
        self._check_compatible(other)
        for name, value in other.state.items():
            self.state[name] += value
        return self

    def __add__(self, other: CalibrationStats) -> CalibrationStats:
        """A new accumulator holding both; the operands are unchanged."""
        self._check_compatible(other)
        return CalibrationStats(self.num_classes, self.n_bins).merge(self).merge(other)

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
        return {"num_classes": self.num_classes, "n_bins": self.n_bins,
                "state": {name: value.tolist() for name, value in self.state.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CalibrationStats:
        """Inverse of `to_dict`."""
        stats = cls(int(data["num_classes"]), int(data["n_bins"]))
        for name, value in stats.state.items():
            loaded = torch.tensor(data["state"][name], dtype=value.dtype)
            if loaded.shape != value.shape:
                raise ValueError(f"state '{name}' has shape {tuple(loaded.shape)}, expected {tuple(value.shape)}")
            stats.state[name] = loaded
        return stats

    def compute(self) -> dict[str, Any]:
        """Metrics as Python floats: `ece`, `mce`, `classwise_ece` (mean of `class_ece`, one per class), `brier`
        (mean over voxels of the sum over classes), `nll` (mean) and `num_voxels`; NaN when empty."""
        num_voxels = self.num_voxels
        if num_voxels == 0:
            nan = float("nan")
            return {"ece": nan, "mce": nan, "classwise_ece": nan, "class_ece": [nan] * self.num_classes,
                    "brier": nan, "nll": nan, "num_voxels": 0}
        state = self.state
        top_gap = (state["top_confidence"] - state["top_correct"]).abs()
        occupied = state["top_count"] > 0
        class_ece = (state["class_probability"] - state["class_positive"]).abs().sum(dim=1) / num_voxels
        return {
            "ece": float(top_gap.sum() / num_voxels),
            "mce": float((top_gap[occupied] / state["top_count"][occupied]).max()),
            "classwise_ece": float(class_ece.mean()),
            "class_ece": class_ece.tolist(),
            "brier": float(state["brier_sum"] / num_voxels),
            "nll": float(state["nll_sum"] / num_voxels),
            "num_voxels": num_voxels,
        }

    def reliability(self) -> dict[str, Any]:
        """Reliability curves for plotting: {"top_label": ReliabilityBins, "classes": [ReliabilityBins] * K}."""
        edges = np.arange(self.n_bins + 1, dtype=np.float64) / self.n_bins

        def curve(count: torch.Tensor, hits: torch.Tensor, probability: torch.Tensor) -> ReliabilityBins:
            count = count.numpy()
            with np.errstate(invalid="ignore", divide="ignore"):
                accuracy = np.where(count > 0, hits.numpy() / count, np.nan)
                confidence = np.where(count > 0, probability.numpy() / count, np.nan)
            return ReliabilityBins(edges=edges, count=count.copy(), accuracy=accuracy, confidence=confidence)

        state = self.state
        return {
            "top_label": curve(state["top_count"], state["top_correct"], state["top_confidence"]),
            "classes": [curve(state["class_count"][k], state["class_positive"][k], state["class_probability"][k])
                        for k in range(self.num_classes)],
        }

    def __repr__(self) -> str:
        return f"CalibrationStats(num_classes={self.num_classes}, n_bins={self.n_bins}, num_voxels={self.num_voxels})"
