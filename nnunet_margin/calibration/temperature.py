"""Post-hoc temperature scaling (Guo et al., ICML 2017) on stored probabilities.

For p = softmax(z), softmax(log p / T) = softmax(z / T): one temperature can be fitted to, and applied on, the
probabilities nnU-Net exports, without the logits. T minimises the mean negative log-likelihood. With
beta = 1 / T and d_ik = log p_ik - log p_iy (y the voxel's label), the NLL of voxel i is logsumexp_k(beta * d_ik),
a convex function of beta whose first and second derivatives are the mean and variance of d_i under
softmax(beta * d_i); `TemperatureFit.fit` finds the root of the first derivative by Newton steps kept inside a
bisection bracket. Probabilities are clamped at the smallest normal number of their dtype before the log, as in
`CalibrationStats`' NLL.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from .checks import (
    ArrayLike,
    check_label_range,
    check_probability_values,
    check_voxel_arrays,
    probability_sum_tolerance,
)
from .chunks import chunk_voxel_index, true_positions

# Voxels whose log-probability differences are held (a uniform random sample beyond that): 2**22 voxels are 16 MiB
# per class in float32, and bound the statistical error of T far below that of any validation set.
DEFAULT_MAX_VOXELS = 2**22
# Probability entries (voxels x classes) processed at once.
_CHUNK_ENTRIES = 2**20
_MAX_ITERATIONS = 100
_RELATIVE_TOLERANCE = 1e-12


def _check_temperature(temperature: float) -> float:
    temperature = float(temperature)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return temperature


def _log_probabilities(probabilities: torch.Tensor) -> torch.Tensor:
    return probabilities.clamp_min(torch.finfo(probabilities.dtype).tiny).log()


def apply_temperature(probabilities: ArrayLike, temperature: float) -> ArrayLike:
    """softmax(log p / T) over axis 0 of probabilities (K, *spatial); same type (numpy or torch) and dtype."""
    temperature = _check_temperature(temperature)
    tensor = torch.as_tensor(probabilities)
    if not tensor.is_floating_point() or tensor.ndim < 1:
        raise ValueError(f"probabilities must be a floating point array of shape (K, *spatial), got dtype "
                         f"{tensor.dtype} and shape {tuple(tensor.shape)}")
    scaled = torch.softmax(_log_probabilities(tensor) / temperature, dim=0)
    return scaled.numpy() if isinstance(probabilities, np.ndarray) else scaled


class TemperatureFit:
    """Accumulates labelled voxels from any number of cases, then fits one temperature to all of them.

    Per voxel it keeps the K differences log p_k - log p_y (float32). Beyond `max_voxels` voxels it keeps a uniform
    random sample of that size (each voxel gets a random key; the smallest keys are kept), so memory stays bounded
    at about 2 * max_voxels * (K + 1) * 4 bytes whatever the number of cases.

    Example::

        fit = TemperatureFit()
        for probabilities, labels in cases:  # (K, *spatial), (*spatial)
            fit.update(probabilities, labels, mask=labels != 0)
        temperature = fit.fit()
    """

    def __init__(self, max_voxels: int = DEFAULT_MAX_VOXELS, seed: int = 0):
        if not isinstance(max_voxels, int) or max_voxels < 1:
            raise ValueError(f"max_voxels must be a positive integer, got {max_voxels!r}")
        self.max_voxels = max_voxels
        self.num_classes: int | None = None
        self.num_voxels = 0  # voxels seen, sampled or not
        self._generator = torch.Generator().manual_seed(seed)
        self._differences: list[torch.Tensor] = []  # (K, n) float32 each
        self._keys: list[torch.Tensor] = []  # (n,) sampling keys in [0, 1)
        self._key_threshold = 1.0  # voxels with a key at or above it can no longer be in the sample

    @property
    def num_sampled(self) -> int:
        """Voxels the fit uses: min(num_voxels, max_voxels)."""
        return min(self.num_voxels, self.max_voxels)

    def update(self, probabilities: ArrayLike, labels: ArrayLike, mask: ArrayLike | None = None) -> TemperatureFit:
        """Add voxels: probabilities (K, *spatial), integer labels (*spatial) in [0, K), optional bool mask
        (*spatial) of the voxels that count; where it is True, probabilities must be finite, in [0, 1] and sum to 1
        over the classes (`CalibrationStats.update`'s check). Returns self.

        Values are checked chunk by chunk while they are added, so after a ValueError for bad values part of this
        call's voxels may have been added: start a new accumulator.
        """
        probabilities, labels, mask = self._checked_inputs(probabilities, labels, mask)
        flat_probabilities = probabilities.reshape(self.num_classes, -1)
        flat_labels = labels.reshape(-1)
        flat_mask = None if mask is None else mask.reshape(-1)
        sum_tolerance = probability_sum_tolerance(probabilities.dtype)
        chunk = max(1, _CHUNK_ENTRIES // self.num_classes)
        for start in range(0, flat_labels.numel(), chunk):
            part = slice(start, start + chunk)
            chunk_probabilities, chunk_labels = flat_probabilities[:, part], flat_labels[part].to(torch.int64)
            counted = None
            if flat_mask is not None:
                counted = true_positions(flat_mask[part])
                chunk_probabilities, chunk_labels = chunk_probabilities.index_select(1, counted), chunk_labels[counted]
            batch = part if counted is None else counted + start
            check_probability_values(chunk_probabilities, sum_tolerance, chunk_voxel_index(tuple(labels.shape), batch))
            self._add_chunk(chunk_probabilities, chunk_labels)
        return self

    def _checked_inputs(self, probabilities: ArrayLike, labels: ArrayLike, mask: ArrayLike | None):
        probabilities, labels = torch.as_tensor(probabilities), torch.as_tensor(labels)
        if probabilities.ndim < 2 or probabilities.shape[0] < 2 or not probabilities.is_floating_point():
            raise ValueError(f"probabilities must be a floating point array of shape (K >= 2, *spatial), got dtype "
                             f"{probabilities.dtype} and shape {tuple(probabilities.shape)}")
        if self.num_classes is not None and probabilities.shape[0] != self.num_classes:
            raise ValueError(f"probabilities have {probabilities.shape[0]} classes, earlier updates had "
                             f"{self.num_classes}")
        mask = None if mask is None else torch.as_tensor(mask)
        check_voxel_arrays(probabilities, labels, mask)
        self.num_classes = int(probabilities.shape[0])
        return probabilities, labels, mask

    def _add_chunk(self, probabilities: torch.Tensor, labels: torch.Tensor) -> None:
        """probabilities (K, n) and labels (n,) of the voxels that count."""
        count = labels.numel()
        if count == 0:
            return
        check_label_range(labels, self.num_classes)
        self.num_voxels += count
        keys = torch.rand(count, generator=self._generator, dtype=torch.float64)
        sampled = keys < self._key_threshold
        if not bool(sampled.any()):
            return
        log_probabilities = _log_probabilities(probabilities[:, sampled])
        differences = log_probabilities - log_probabilities.gather(0, labels[sampled][None])
        self._differences.append(differences.to(torch.float32))
        self._keys.append(keys[sampled])
        if sum(len(keys) for keys in self._keys) > 2 * self.max_voxels:
            self._keep_sample()

    def _keep_sample(self) -> torch.Tensor:
        """Reduce the held voxels to the max_voxels with the smallest keys; returns their differences (K, n)."""
        differences, keys = torch.cat(self._differences, dim=1), torch.cat(self._keys)
        if len(keys) > self.max_voxels:
            keys, kept = torch.topk(keys, self.max_voxels, largest=False, sorted=False)
            differences = differences[:, kept]
            self._key_threshold = float(keys.max())
        self._differences, self._keys = [differences], [keys]
        return differences

    def fit(self, bounds: tuple[float, float] = (1e-2, 1e2)) -> float:
        """The temperature in `bounds` minimising the mean NLL of softmax(log p / T) over the added voxels.

        If the NLL still decreases at a bound (e.g. every voxel predicted correctly pushes T towards 0), that bound
        is returned with a warning.
        """
        low, high = (float(bound) for bound in bounds)
        if not (0 < low < high < math.inf):
            raise ValueError(f"bounds must be 0 < low < high < inf, got {bounds}")
        if self.num_voxels == 0:
            raise ValueError("no voxels to fit a temperature to: update() with labelled voxels first (is the mask "
                             "empty?)")
        differences = self._keep_sample()
        beta_low, beta_high = 1 / high, 1 / low
        # The NLL rising at the largest T, or still falling at the smallest T: the minimum lies beyond that bound.
        for beta, temperature, sign in ((beta_low, high, 1), (beta_high, low, -1)):
            if sign * _nll_derivatives(differences, beta)[0] >= 0:
                warnings.warn(f"the NLL keeps decreasing towards the bound T = {temperature:g}; returning it",
                              stacklevel=2)
                return temperature
        beta = min(max(1.0, beta_low), beta_high)
        for _ in range(_MAX_ITERATIONS):
            slope, curvature = _nll_derivatives(differences, beta)
            if slope < 0:
                beta_low = beta
            else:
                beta_high = beta
            step = -slope / curvature if curvature > 0 else math.nan
            if abs(step) <= _RELATIVE_TOLERANCE * beta:
                return 1 / beta
            beta = beta + step if beta_low < beta + step < beta_high else (beta_low + beta_high) / 2
        return 1 / beta


def _nll_derivatives(differences: torch.Tensor, beta: float) -> tuple[float, float]:
    """First and second derivative in beta of mean_i logsumexp_k(beta * d_ki), for d (K, n)."""
    num_classes, num_voxels = differences.shape
    slope = curvature = 0.0
    chunk = max(1, _CHUNK_ENTRIES // num_classes)
    for start in range(0, num_voxels, chunk):
        d = differences[:, start:start + chunk].to(torch.float64)
        weighted = torch.softmax(beta * d, dim=0).mul_(d)
        mean = weighted.sum(dim=0)
        slope += float(mean.sum())
        curvature += float((weighted.mul_(d).sum(dim=0) - mean.square()).sum())
    return slope / num_voxels, curvature / num_voxels


def fit_temperature(probabilities: ArrayLike, labels: ArrayLike, mask: ArrayLike | None = None,
                    bounds: tuple[float, float] = (1e-2, 1e2), max_voxels: int = DEFAULT_MAX_VOXELS) -> float:
    """One temperature for one array of probabilities (K, *spatial) and labels (*spatial); see `TemperatureFit`."""
    return TemperatureFit(max_voxels).update(probabilities, labels, mask).fit(bounds)
