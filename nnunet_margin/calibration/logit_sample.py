"""A bounded, seeded, uniform random sample of labelled voxels' logits, for fitting post-hoc calibrators.

Every counted voxel gets a random key, uniform in [0, 1) and independent of everything else; the sample holds the
`max_voxels` voxels with the smallest keys (a bottom-k sample), which is a uniform random subset of all the voxels
seen, whatever the number and sizes of the `update` calls. Two samples of disjoint voxel streams merge exactly into
the bottom-k sample of the union (the smallest keys of a union lie among the smallest keys of its parts), provided
their keys are independent: each sample must have its own seed. Every voxel also gets a second independent uniform
number, `position`, which splits the sample deterministically into fit and held-out parts, and the fit part into
cross-validation folds, independently of which voxels were kept (docs/methods.md section 6).

Stored probabilities p = softmax(z) enter as logits log p (`update_probabilities`): log p = z - logsumexp(z) differs
from z by one constant per voxel, which no affine calibrator's softmax(A z + b) with A = I / T sees (docs/methods.md
6); probabilities are clamped at the smallest normal number of their dtype before the log, as in the NLL of
`CalibrationStats`.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .._atomic import atomic_path
from .checks import (
    ArrayLike,
    check_label_range,
    check_probability_values,
    check_voxel_arrays,
    probability_sum_tolerance,
)
from .chunks import chunk_voxel_index, true_positions

# 2 * 10**6 voxels: 8 MiB of float32 per class, and a statistical error of fitted calibrators far below that of the
# few validation cases they come from.
DEFAULT_MAX_VOXELS = 2_000_000
# Logit entries (voxels x classes) processed at once.
_CHUNK_ENTRIES = 2**20
_FORMAT_VERSION = 1


def log_probabilities(probabilities: ArrayLike) -> torch.Tensor:
    """log p of probabilities of any float dtype, in at least float32, p clamped at the smallest normal number of its
    dtype (see the module docstring)."""
    probabilities = torch.as_tensor(probabilities)
    tiny = torch.finfo(probabilities.dtype).tiny
    return probabilities.to(torch.promote_types(probabilities.dtype, torch.float32)).clamp_min(tiny).log()


@dataclass(frozen=True)
class LabelledLogits:
    """Voxels as columns: `logits` (K, n) float32, `labels` (n,) int64 and `position` (n,) float64, an independent
    uniform number in [0, 1) per voxel."""

    logits: torch.Tensor
    labels: torch.Tensor
    position: torch.Tensor

    @property
    def num_voxels(self) -> int:
        return int(self.labels.numel())

    def fold_ids(self, folds: int) -> torch.Tensor:
        """Fold number in [0, folds) of every voxel (int64), uniform and independent of logits and labels."""
        if not isinstance(folds, int) or folds < 2:
            raise ValueError(f"folds must be an integer >= 2, got {folds!r}")
        return (self.position * folds).long().clamp_(max=folds - 1)


class LogitSample:
    """Accumulates labelled voxels' logits from any number of cases into a bounded uniform random sample.

    Memory stays near 2 * max_voxels * (4 K + 24) bytes (twice that for a moment while cutting back): voxels are
    added to a buffer that is cut back to the `max_voxels` smallest keys whenever it holds twice that many, and
    voxels whose key cannot make the cut are dropped on arrival.

    Example::

        sample = LogitSample(seed=fold)
        for logits, labels in cases:  # (K, *spatial) logits, (*spatial) labels
            sample.update(logits, labels, mask=labels != ignore_label)
        sample.save("logit_sample.npz")
        fit, held_out = sample.split(held_out_fraction=0.2)
    """

    def __init__(self, max_voxels: int = DEFAULT_MAX_VOXELS, seed: int = 0):
        if not isinstance(max_voxels, int) or max_voxels < 1:
            raise ValueError(f"max_voxels must be a positive integer, got {max_voxels!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.max_voxels = max_voxels
        self.seeds: tuple[int, ...] = (seed,)  # the seeds of every sample merged into this one
        self.num_classes: int | None = None
        self.num_voxels = 0  # voxels seen, sampled or not
        self._generator = torch.Generator().manual_seed(seed)
        self._key_threshold = 1.0  # voxels with a key at or above it can no longer be in the sample
        self._logits: list[torch.Tensor] = []  # (K, n) float32 each
        self._labels: list[torch.Tensor] = []  # (n,) int64
        self._keys: list[torch.Tensor] = []  # (n,) float64 sampling keys
        self._positions: list[torch.Tensor] = []  # (n,) float64 split positions

    @property
    def num_sampled(self) -> int:
        """Voxels held: min(num_voxels, max_voxels)."""
        return min(self.num_voxels, self.max_voxels)

    def update(self, logits: ArrayLike, labels: ArrayLike, mask: ArrayLike | None = None) -> LogitSample:
        """Add voxels: logits (K, *spatial) of any float dtype (held as float32), integer labels (*spatial) in
        [0, K), optional bool mask (*spatial) of the voxels that count. Returns self.

        Values are checked chunk by chunk while they are added, so after a ValueError for bad values part of this
        call's voxels may have been added: start a new sample.
        """
        for chunk_logits, chunk_labels, _ in self._chunks(logits, labels, mask, "logits"):
            self._add_chunk(chunk_logits, chunk_labels)
        return self

    def update_probabilities(self, probabilities: ArrayLike, labels: ArrayLike,
                             mask: ArrayLike | None = None) -> LogitSample:
        """Add voxels of stored probabilities (K, *spatial), as logits log p (see the module docstring). Where the
        mask is True, probabilities must be finite, in [0, 1] and sum to 1 over the classes (the check of
        `CalibrationStats.update`, naming the voxel). Otherwise as `update`."""
        probabilities = torch.as_tensor(probabilities)
        sum_tolerance = probability_sum_tolerance(probabilities.dtype) if probabilities.is_floating_point() else 0.0
        for chunk, chunk_labels, voxel_index in self._chunks(probabilities, labels, mask, "probabilities"):
            check_probability_values(chunk, sum_tolerance, voxel_index)
            self._add_chunk(log_probabilities(chunk), chunk_labels)
        return self

    def _chunks(self, values: ArrayLike, labels: ArrayLike, mask: ArrayLike | None, name: str
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor, Callable[[int], tuple[int, ...]]]]:
        """(values (K, n), labels (n,) int64, voxel index for messages) of the counted voxels, chunk by chunk."""
        values, labels, mask = self._checked_inputs(values, labels, mask, name)
        flat_values = values.reshape(self.num_classes, -1)
        flat_labels = labels.reshape(-1)
        flat_mask = None if mask is None else mask.reshape(-1)
        chunk = max(1, _CHUNK_ENTRIES // self.num_classes)
        for start in range(0, flat_labels.numel(), chunk):
            batch: slice | torch.Tensor = slice(start, start + chunk)
            if flat_mask is not None:
                batch = true_positions(flat_mask[batch]) + start
            yield (flat_values[:, batch], flat_labels[batch].to(torch.int64),
                   chunk_voxel_index(tuple(labels.shape), batch))

    def _checked_inputs(self, values: ArrayLike, labels: ArrayLike, mask: ArrayLike | None, name: str):
        values, labels = torch.as_tensor(values), torch.as_tensor(labels)
        mask = None if mask is None else torch.as_tensor(mask)
        if values.ndim < 2 or values.shape[0] < 2 or not values.is_floating_point():
            raise ValueError(f"{name} must be a floating point array of shape (K >= 2, *spatial), got dtype "
                             f"{values.dtype} and shape {tuple(values.shape)}")
        if self.num_classes is not None and values.shape[0] != self.num_classes:
            raise ValueError(f"{name} have {values.shape[0]} classes, earlier updates had {self.num_classes}")
        check_voxel_arrays(values, labels, mask, name=name)
        self.num_classes = int(values.shape[0])
        return values, labels, mask

    def _add_chunk(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """logits (K, n) and labels (n,) of the voxels that count."""
        count = labels.numel()
        if count == 0:
            return
        check_label_range(labels, self.num_classes)
        if not bool(torch.isfinite(logits).all()):
            raise ValueError("logits hold NaN or inf values")
        # Key and position of every counted voxel, so that the random stream does not depend on which were kept.
        keys, positions = torch.rand(2, count, generator=self._generator, dtype=torch.float64)
        self.num_voxels += count
        sampled = keys < self._key_threshold
        if not bool(sampled.any()):
            return
        self._logits.append(logits[:, sampled].to(torch.float32))
        self._labels.append(labels[sampled])
        self._keys.append(keys[sampled])
        self._positions.append(positions[sampled])
        if sum(len(keys) for keys in self._keys) > 2 * self.max_voxels:
            self._keep_sample()

    def _keep_sample(self) -> None:
        """Reduce the held voxels to the max_voxels with the smallest keys, in increasing key order (so the held
        sample is a function of the voxels and keys alone, whatever the order they came in)."""
        if self.num_classes is None:
            return
        if not self._keys:  # every update so far was masked out
            self._logits = [torch.zeros(self.num_classes, 0)]
            self._labels, self._keys = [torch.zeros(0, dtype=torch.int64)], [torch.zeros(0, dtype=torch.float64)]
            self._positions = [torch.zeros(0, dtype=torch.float64)]
            return
        keys, order = torch.sort(torch.cat(self._keys))
        if len(keys) > self.max_voxels:
            keys, order = keys[:self.max_voxels], order[:self.max_voxels]
            self._key_threshold = float(keys[-1])
        self._logits = [torch.cat(self._logits, dim=1)[:, order]]
        self._labels = [torch.cat(self._labels)[order]]
        self._positions = [torch.cat(self._positions)[order]]
        self._keys = [keys]

    def voxels(self) -> LabelledLogits:
        """All held voxels (in increasing key order, i.e. a random order)."""
        if self.num_classes is None:
            raise ValueError("the sample is empty: update() it with labelled voxels first")
        self._keep_sample()
        return LabelledLogits(self._logits[0], self._labels[0], self._positions[0])

    def split(self, held_out_fraction: float = 0.2) -> tuple[LabelledLogits, LabelledLogits]:
        """(fit, held_out): the voxels whose position is >= held_out_fraction, and the others.

        The split is a deterministic function of each voxel's position, so a voxel stays on its side when the sample
        grows or is merged. Positions are rescaled to [0, 1) within each part, so `fit.fold_ids(k)` gives
        cross-validation folds independent of the split. The split is by voxel, not by case: held-out voxels come
        from the same cases as fitted ones (neighbouring voxels are correlated), so the held-out improvement is an
        optimistic estimate of that on new cases.
        """
        held_out_fraction = float(held_out_fraction)
        if not 0 < held_out_fraction < 1:
            raise ValueError(f"held_out_fraction must lie in (0, 1), got {held_out_fraction}")
        everything = self.voxels()
        held_out = everything.position < held_out_fraction
        fit = ~held_out
        return (LabelledLogits(everything.logits[:, fit], everything.labels[fit],
                               (everything.position[fit] - held_out_fraction) / (1 - held_out_fraction)),
                LabelledLogits(everything.logits[:, held_out], everything.labels[held_out],
                               everything.position[held_out] / held_out_fraction))

    def merge(self, other: LogitSample) -> LogitSample:
        """Merge `other` (the sample of other voxels, from its own seed) into self; returns self.

        The result is exactly the bottom-k sample of the union with k = the smaller max_voxels of the two, and it
        keeps self's random stream for later updates.
        """
        if not isinstance(other, LogitSample):
            raise TypeError(f"can only merge a LogitSample, got {type(other).__name__}")
        shared_seeds = sorted(set(self.seeds) & set(other.seeds))
        if shared_seeds:
            raise ValueError(f"cannot merge samples built with the same seed {shared_seeds}: their keys are not "
                             f"independent. Give each sample its own seed (e.g. the fold or process rank)")
        if None not in (self.num_classes, other.num_classes) and self.num_classes != other.num_classes:
            raise ValueError(f"cannot merge a sample of {other.num_classes} classes into one of "
                             f"{self.num_classes} classes")
        if other.num_classes is not None:
            other._keep_sample()
            self.num_classes = other.num_classes
            self._logits.append(other._logits[0])
            self._labels.append(other._labels[0])
            self._keys.append(other._keys[0])
            self._positions.append(other._positions[0])
        self.max_voxels = min(self.max_voxels, other.max_voxels)
        self._key_threshold = min(self._key_threshold, other._key_threshold)
        self.num_voxels += other.num_voxels
        self.seeds = tuple(sorted(self.seeds + other.seeds))
        self._keep_sample()
        return self

    def save(self, path: str | os.PathLike) -> None:
        """Write the sample and its metadata (seeds, voxels seen, class count, random state) to an .npz file,
        atomically (a crash leaves any earlier file intact)."""
        if self.num_classes is None:
            raise ValueError("the sample is empty: there is nothing to save")
        self._keep_sample()
        arrays = {
            "format_version": np.array(_FORMAT_VERSION),
            "num_classes": np.array(self.num_classes),
            "num_voxels": np.array(self.num_voxels, dtype=np.int64),
            "max_voxels": np.array(self.max_voxels, dtype=np.int64),
            "seeds": np.array(self.seeds, dtype=np.int64),
            "key_threshold": np.array(self._key_threshold, dtype=np.float64),
            "generator_state": self._generator.get_state().numpy(),
            "logits": self._logits[0].numpy(),
            "labels": self._labels[0].numpy(),
            "keys": self._keys[0].numpy(),
            "positions": self._positions[0].numpy(),
        }
        with atomic_path(path) as temporary, open(temporary, "wb") as handle:
            np.savez(handle, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> LogitSample:
        """Inverse of `save`: later updates continue the saved random stream."""
        try:
            with np.load(path, allow_pickle=False) as data:
                version = int(data["format_version"])
                if version != _FORMAT_VERSION:
                    raise ValueError(f"{path} has format version {version}, this code reads {_FORMAT_VERSION}")
                seeds = [int(seed) for seed in data["seeds"]]
                sample = cls(int(data["max_voxels"]), seeds[0])
                sample.seeds = tuple(seeds)
                sample.num_classes = int(data["num_classes"])
                sample.num_voxels = int(data["num_voxels"])
                sample._key_threshold = float(data["key_threshold"])
                sample._generator.set_state(torch.from_numpy(data["generator_state"].copy()))
                logits, labels = torch.from_numpy(data["logits"].copy()), torch.from_numpy(data["labels"].copy())
                keys, positions = torch.from_numpy(data["keys"].copy()), torch.from_numpy(data["positions"].copy())
        except (zipfile.BadZipFile, EOFError, KeyError, IndexError) as error:
            raise ValueError(f"{path} is not a complete logit sample: it is truncated or corrupt "
                             f"({type(error).__name__}: {error})") from None
        held = len(keys)
        if (tuple(logits.shape) != (sample.num_classes, held) or logits.dtype != torch.float32
                or tuple(labels.shape) != (held,) or tuple(positions.shape) != (held,)
                or held != min(sample.num_voxels, sample.max_voxels)):
            raise ValueError(f"{path} is inconsistent: logits {tuple(logits.shape)}, labels {tuple(labels.shape)}, "
                             f"{held} keys for {sample.num_voxels} voxels seen and max_voxels={sample.max_voxels}")
        sample._logits, sample._labels, sample._keys, sample._positions = [logits], [labels], [keys], [positions]
        return sample

    def __repr__(self) -> str:
        return (f"LogitSample(num_classes={self.num_classes}, num_voxels={self.num_voxels}, "
                f"num_sampled={self.num_sampled}, max_voxels={self.max_voxels}, seeds={self.seeds})")
