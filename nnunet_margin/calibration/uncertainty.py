"""Ensemble uncertainty of a segmentation from its members' probabilities (docs/methods.md 8), plain PyTorch/NumPy.

The members are networks predicting the same image (nnU-Net's folds, optionally each test-time mirroring of each).
`MemberStatistics` takes them one at a time, so memory stays O(voxels x classes) whatever their number (plus one
byte per voxel and member: the arg-max maps pairwise Dice needs), and gives the maps; the direct functions
(`entropy`, `mutual_information`, `member_std`, `pairwise_dice`) take all members at once and are the definitions
the streaming form is tested against. `case_scores` aggregates the maps into the per-case confidence scores and
`plot_case_review` draws a case's review figure.

Conventions: probabilities have the class axis first, (K, *spatial) for one member and (M, K, *spatial) for M
members; entropies and mutual information are normalised by log K (so they lie in [0, 1]); the standard deviation
over members is the population one (ddof 0).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import matplotlib.style
import numpy as np
import torch
from matplotlib.figure import Figure

from .._atomic import atomic_path
from .boundary import boundary_scope
from .surface import checked_spacing

# A voxel is uncertain when its normalised predictive entropy reaches this (for K = 4: an even split between two
# classes; for K = 2: a top probability of 0.89 or less).
UNCERTAIN_ENTROPY = 0.5
# The boundary band: voxels within this distance (mm) of a class boundary of the predicted segmentation.
BOUNDARY_BAND_MM = 3.0
# The case scores that rank cases for failure detection (docs/methods.md 8), each with the direction in which it means
# "more likely failed"; the volumes describe the segmentation and rank nothing.
FAILURE_SCORES = {"pairwise_dice": "lower", "mutual_information_foreground": "higher",
                  "mutual_information_boundary": "higher", "entropy_foreground": "higher", "entropy_boundary": "higher",
                  "uncertain_fraction": "higher"}


def entropy(probabilities: torch.Tensor) -> torch.Tensor:
    """Shannon entropy over the class axis (axis 0; 0 log 0 = 0), divided by log K: (*spatial), in [0, 1]."""
    num_classes = probabilities.shape[0]
    if num_classes < 2:
        raise ValueError(f"entropy needs at least two classes on axis 0, got shape {tuple(probabilities.shape)}")
    return torch.special.xlogy(probabilities, probabilities).sum(0).div_(-math.log(num_classes))


def mutual_information(member_probabilities: torch.Tensor) -> torch.Tensor:
    """(M, K, *spatial) -> the entropy of the members' mean minus the members' mean entropy (the members'
    disagreement; zero where they agree), normalised by log K, clamped at 0 against rounding: (*spatial)."""
    mean_entropy = torch.stack([entropy(member) for member in member_probabilities]).mean(0)
    return (entropy(member_probabilities.mean(0)) - mean_entropy).clamp_min_(0)


def member_std(member_probabilities: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """(M, K, *spatial), classes (*spatial) -> the standard deviation over members (ddof 0) of each voxel's probability
    of its class in `classes` (the predicted class): (*spatial)."""
    index = classes.long()[None, None].expand(member_probabilities.shape[0], 1, *classes.shape)
    return member_probabilities.gather(1, index)[:, 0].std(0, correction=0)


def _dice(intersection: np.ndarray, size_a: np.ndarray, size_b: np.ndarray) -> np.ndarray:
    """2 |A n B| / (|A| + |B|) per class; 1 where both are empty (the two agree that the class is absent)."""
    total = size_a + size_b
    return np.where(total > 0, 2 * intersection / np.maximum(total, 1), 1.0)


def pairwise_dice(member_labels: np.ndarray | torch.Tensor, num_classes: int) -> np.ndarray:
    """(M, *spatial) arg-max maps of M >= 2 members -> for each foreground class 1..K-1 the mean over the M (M - 1) / 2
    member pairs of their Dice (1 for a pair where both lack the class): (K - 1,)."""
    labels = torch.as_tensor(member_labels).long()
    if labels.shape[0] < 2:
        raise ValueError(f"pairwise Dice needs at least two members, got {labels.shape[0]}")
    masks = [[labels[m] == k for k in range(1, num_classes)] for m in range(labels.shape[0])]
    scores = []
    for first in range(len(masks)):
        for second in range(first + 1, len(masks)):
            intersection = np.array([(a & b).sum().item() for a, b in zip(masks[first], masks[second])])
            scores.append(_dice(intersection, np.array([a.sum().item() for a in masks[first]]),
                                np.array([b.sum().item() for b in masks[second]])))
    return np.mean(scores, axis=0)


def _label_dtype(num_classes: int) -> torch.dtype:
    return torch.uint8 if num_classes <= 256 else torch.int16


class PairwiseDice:
    """Streaming form of `pairwise_dice`: members' arg-max maps added one at a time. It keeps each map (one byte per
    voxel) to intersect with the later ones, each member's voxel count per class and each pair's intersections."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self._labels: list[torch.Tensor] = []
        self._counts: list[np.ndarray] = []
        self._intersections: list[np.ndarray] = []  # per pair, in the order (0, 1), (0, 2), (1, 2), (0, 3), ...

    def add(self, labels: torch.Tensor) -> None:
        labels = labels.to(_label_dtype(self.num_classes)).flatten()
        self._counts.append(torch.bincount(labels.long(), minlength=self.num_classes).numpy())
        for earlier in self._labels:
            # the class of every voxel where the two agree; K stands for "they disagree"
            agreed = torch.where(labels == earlier, labels.long(), self.num_classes)
            self._intersections.append(torch.bincount(agreed, minlength=self.num_classes + 1)[:-1].numpy())
        self._labels.append(labels)

    @property
    def members(self) -> int:
        return len(self._labels)

    def member_counts(self) -> np.ndarray:
        """(M, K) voxels of each class in each member's arg-max map."""
        return np.stack(self._counts)

    def per_class(self) -> np.ndarray:
        """(K - 1,) mean pairwise Dice of each foreground class, as `pairwise_dice`."""
        if self.members < 2:
            raise ValueError(f"pairwise Dice needs at least two members, got {self.members}")
        pairs = [(first, second) for second in range(self.members) for first in range(second)]
        return np.mean([_dice(intersection[1:], self._counts[first][1:], self._counts[second][1:])
                        for (first, second), intersection in zip(pairs, self._intersections)], axis=0)


class MemberStatistics:
    """The members' probabilities of one image, accumulated one member at a time: the running mean and sum of
    squared deviations of each class probability (Welford's update, exact zero spread for identical members), the
    sum of the members' entropies and the members' arg-max maps (`PairwiseDice`).

    Pickles its tensors as numpy arrays, so it can be handed to an export worker process.
    """

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.members = 0
        self.mean: torch.Tensor | None = None
        self._squared_deviations: torch.Tensor | None = None
        self._entropy_sum: torch.Tensor | None = None
        self.pairwise = PairwiseDice(num_classes)

    def add(self, probabilities: torch.Tensor) -> None:
        """Add one member's probabilities (K, *spatial), float32; the tensor may be overwritten."""
        if probabilities.shape[0] != self.num_classes or (self.mean is not None and
                                                          probabilities.shape != self.mean.shape):
            expected = (self.num_classes, *(() if self.mean is None else self.mean.shape[1:]))
            raise ValueError(f"member probabilities of shape {tuple(probabilities.shape)}, expected {expected}")
        self.pairwise.add(probabilities.argmax(0))
        member_entropy = entropy(probabilities)
        self.members += 1
        if self.mean is None:
            self.mean = probabilities.clone()
            self._squared_deviations = torch.zeros_like(probabilities)
            self._entropy_sum = member_entropy
            return
        self._entropy_sum += member_entropy
        deviation = probabilities - self.mean
        self.mean.add_(deviation, alpha=1.0 / self.members)
        self._squared_deviations.addcmul_(deviation, probabilities.sub_(self.mean))

    def mutual_information(self) -> torch.Tensor:
        """`mutual_information` of the members added: (*spatial)."""
        return (entropy(self.mean) - self._entropy_sum / self.members).clamp_min_(0)

    def std(self, classes: torch.Tensor) -> torch.Tensor:
        """`member_std` of the members added, for the class map `classes` (*spatial)."""
        return self._squared_deviations.gather(0, classes.long()[None])[0].div_(self.members).sqrt_()

    def __getstate__(self) -> dict:
        return {key: value.numpy() if isinstance(value, torch.Tensor) else value
                for key, value in self.__dict__.items()}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update({key: torch.from_numpy(value) if isinstance(value, np.ndarray) else value
                              for key, value in state.items()})


def _masked_mean(values: np.ndarray, mask: np.ndarray) -> float:
    return float(values[mask].mean(dtype=np.float64)) if mask.any() else float("nan")


def case_scores(segmentation: np.ndarray, entropy_map: np.ndarray, spacing: Sequence[float],
                class_names: Sequence[str], statistics: MemberStatistics | None = None,
                mutual_information_map: np.ndarray | None = None) -> dict[str, float | int]:
    """A case's confidence scores (docs/methods.md 8) from its segmentation (*spatial, classes 0..K-1, 0 the
    background), its normalised predictive entropy map and, for two or more members, their statistics and the
    normalised mutual information map. `spacing` is in mm per array axis, `class_names` names the foreground classes
    1..K-1. Means over an empty region are NaN.

    The scores: mean entropy (and mutual information) over the predicted foreground and over the boundary band (the
    voxels within BOUNDARY_BAND_MM of a class boundary of the segmentation); the mean pairwise Dice of the members'
    segmentations per class and over classes; each class's volume in ml and its standard deviation over the members;
    the fraction of uncertain voxels (normalised entropy >= UNCERTAIN_ENTROPY) among the voxels that are predicted
    foreground or uncertain (0 if there are none).
    """
    spacing = checked_spacing(spacing, segmentation.ndim)
    foreground = segmentation > 0
    band = boundary_scope(segmentation, spacing, BOUNDARY_BAND_MM)
    uncertain = entropy_map >= UNCERTAIN_ENTROPY
    flagged = np.count_nonzero(foreground | uncertain)
    scores: dict[str, float | int] = {
        "members": 1 if statistics is None else statistics.members,
        "entropy_foreground": _masked_mean(entropy_map, foreground),
        "entropy_boundary": _masked_mean(entropy_map, band),
    }
    if statistics is not None:
        scores["mutual_information_foreground"] = _masked_mean(mutual_information_map, foreground)
        scores["mutual_information_boundary"] = _masked_mean(mutual_information_map, band)
        per_class = statistics.pairwise.per_class()
        scores["pairwise_dice"] = float(per_class.mean())
        scores.update({f"pairwise_dice_{name}": float(value) for name, value in zip(class_names, per_class)})
    millilitres_per_voxel = math.prod(spacing) / 1000.0
    counts = np.bincount(segmentation.ravel(), minlength=len(class_names) + 1)
    scores.update({f"volume_ml_{name}": float(counts[k + 1] * millilitres_per_voxel)
                   for k, name in enumerate(class_names)})
    if statistics is not None:
        member_volumes = statistics.pairwise.member_counts()[:, 1:] * millilitres_per_voxel
        scores.update({f"volume_std_ml_{name}": float(spread)
                       for name, spread in zip(class_names, member_volumes.std(0))})
    scores["uncertain_fraction"] = np.count_nonzero(uncertain) / flagged if flagged else 0.0
    return scores


def most_foreground_slice(segmentation: np.ndarray) -> int:
    """Index along axis 0 of the slice with the most foreground voxels (the first such slice; 0 without any)."""
    return int(np.argmax((segmentation > 0).reshape(segmentation.shape[0], -1).sum(1)))


def plot_case_review(image: np.ndarray, segmentation: np.ndarray, entropy_map: np.ndarray, title: str,
                     path: str | os.PathLike) -> None:
    """Write a PNG of one 2D slice: the image, the image with the segmentation's class contours, the normalised
    predictive entropy (0 to 1) with a colour bar; atomic write."""
    with matplotlib.style.context("default"):
        figure = Figure(figsize=(10.5, 3.6), layout="constrained")
        axes = figure.subplots(1, 3)
        for ax in axes:
            ax.imshow(image, cmap="gray", interpolation="nearest")
            ax.set_axis_off()
        axes[0].set_title("image")
        labels = np.unique(segmentation[segmentation > 0])
        for index, label in enumerate(labels):
            axes[1].contour(segmentation == label, levels=[0.5], colors=[f"C{index % 10}"], linewidths=1.0)
        axes[1].set_title("segmentation" if labels.size else "segmentation (empty)")
        shown = axes[2].imshow(entropy_map, cmap="magma", vmin=0.0, vmax=1.0, interpolation="nearest")
        axes[2].set_title("predictive entropy / log K")
        figure.colorbar(shown, ax=axes[2], shrink=0.8)
        figure.suptitle(title, fontsize="small")
        with atomic_path(path) as temporary:
            figure.savefig(temporary, dpi=80)
