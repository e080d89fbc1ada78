"""The three affine calibrators, one class each over the shared Newton solver (docs/methods.md 6).

- `TemperatureScaling`: A = beta I (beta = 1 / T), b = 0 (Guo et al., ICML 2017); T is searched within
  `TEMPERATURE_BOUNDS`, and a temperature whose NLL still falls beyond a bound is that bound, marked `at_bound`.
- `VectorScaling`: A = diag(w), b per class (Guo et al.).
- `MatrixScaling`: A = W, a full K x K matrix, with ODIR regularisation (Kull et al., NeurIPS 2019) in the normalised
  form of Kull et al.'s code (reg_norm=True) and of Fiducio 0.2.0's MatrixScaling: mean NLL + lambda_od * mean over
  the K (K - 1) off-diagonal entries of W^2 + lambda_b * mean over the K entries of b^2; the diagonal of W is not
  penalised. (lambda_od, lambda_b) is chosen from a small grid by k-fold cross-validation inside the fit voxels
  (`cross_validation`), then the calibrator is refitted on all of them. Its exact Hessian costs K^4 per voxel, so
  the solver computes it on a subsample of 2**14 voxels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .cross_validation import cross_validate, cross_validation_subsample
from .solver import Parametrisation, mean_gradient, minimise

# (lambda_od, lambda_b) pairs tried by cross-validation; with millions of voxels the weakest usually wins, with the
# minimum number matrix scaling accepts (see below) the stronger ones can.
DEFAULT_ODIR_GRID = ((1e-4, 1e-4), (1e-3, 1e-3), (1e-2, 1e-2), (1e-1, 1e-1))
DEFAULT_FOLDS = 3
# Matrix scaling fits K (K + 1) parameters. Neighbouring voxels are strongly correlated, so a voxel carries far less
# information than an independent sample: matrix scaling is refused below 1000 fit voxels per parameter, and above 32
# classes (1056 parameters), where even millions of voxels from a few validation cases overfit.
MATRIX_MAX_CLASSES = 32
MATRIX_MIN_VOXELS_PER_PARAMETER = 1000
# Cross-validation fits only need held-out NLLs far more precise than their differences between grid points.
_CROSS_VALIDATION_TOLERANCE = 1e-8
# The search interval of a temperature: beyond it the NLL still falling means the model is worse than uniform (T
# upwards) or its probabilities are degenerate (T downwards), not that a temperature fits.
TEMPERATURE_BOUNDS = (1e-2, 1e2)


@dataclass
class Fit:
    """A parametrisation's fitted parameters, how the iterations ended, and its JSON-ready details."""

    parameters: torch.Tensor
    iterations: int
    converged: bool
    info: dict[str, Any] = field(default_factory=dict)


class TemperatureScaling(Parametrisation):
    """softmax(beta z), one parameter beta = 1 / T, fitted within `bounds` on T."""

    method = "temperature"
    num_parameters = 1

    def __init__(self, num_classes: int, bounds: tuple[float, float] = TEMPERATURE_BOUNDS):
        super().__init__(num_classes)
        low, high = (float(bound) for bound in bounds)
        if not 0 < low < high < math.inf:
            raise ValueError(f"temperature bounds must be 0 < low < high < inf, got {bounds}")
        self.bounds = (low, high)

    def identity(self) -> torch.Tensor:
        return torch.ones(1, dtype=torch.float64)

    def weight_and_bias(self, parameters):
        return parameters[0] * torch.eye(self.num_classes, dtype=torch.float64), torch.zeros(self.num_classes).double()

    def calibrated_logits(self, parameters, logits):
        return logits * parameters[0]

    def gradient_sum(self, residual, logits):
        return torch.dot(residual.reshape(-1), logits.reshape(-1)).reshape(1)

    def hessian_sum(self, probabilities, logits):
        weighted = probabilities * logits
        return ((weighted * logits).sum() - weighted.sum(dim=0).square().sum()).reshape(1, 1)

    def fit(self, logits: torch.Tensor, labels: torch.Tensor) -> Fit:
        """The NLL is convex in beta: if it still falls at a bound of the search (rising at the largest T, falling at
        the smallest), the minimum lies beyond it and that bound is returned, marked in info["at_bound"]."""
        low, high = self.bounds
        for temperature, side, sign in ((high, "upper", 1.0), (low, "lower", -1.0)):
            beta = torch.tensor([1 / temperature], dtype=torch.float64)
            if sign * float(mean_gradient(self, beta, logits, labels)[0]) >= 0:
                return Fit(beta, 0, True, {"temperature": temperature, "at_bound": side})
        minimum = minimise(self, logits, labels, self.identity(), self.no_penalty())
        return Fit(minimum.parameters, minimum.iterations, minimum.converged,
                   {"temperature": 1 / float(minimum.parameters[0]), "at_bound": None})


class VectorScaling(Parametrisation):
    """softmax(w * z + b): parameters (w, b), 2 K."""

    method = "vector"

    @property
    def num_parameters(self) -> int:
        return 2 * self.num_classes

    def identity(self) -> torch.Tensor:
        return torch.cat([torch.ones(self.num_classes), torch.zeros(self.num_classes)]).double()

    def weight_and_bias(self, parameters):
        return torch.diag(parameters[:self.num_classes]), parameters[self.num_classes:]

    def calibrated_logits(self, parameters, logits):
        return torch.addcmul(parameters[self.num_classes:, None], parameters[:self.num_classes, None], logits)

    def gradient_sum(self, residual, logits):
        return torch.cat([(residual * logits).sum(dim=1), residual.sum(dim=1)])

    def hessian_sum(self, probabilities, logits):
        """Written as diagonal sums minus one Gram matrix G G^T, so that it costs one matrix product."""
        num_classes = self.num_classes
        index = torch.arange(num_classes)
        weighted = probabilities * logits  # p_k z_k, the w_k column of the per-voxel p^T J
        gram = torch.cat([weighted, probabilities])
        hessian = -(gram @ gram.T)
        hessian[index, index] += (weighted * logits).sum(dim=1)
        cross = weighted.sum(dim=1)
        hessian[index, num_classes + index] += cross
        hessian[num_classes + index, index] += cross
        hessian[num_classes + index, num_classes + index] += probabilities.sum(dim=1)
        return hessian

    def fit(self, logits: torch.Tensor, labels: torch.Tensor) -> Fit:
        minimum = minimise(self, logits, labels, self.identity(), self.no_penalty())
        return Fit(minimum.parameters, minimum.iterations, minimum.converged)


def check_matrix_scaling(num_classes: int, num_fit_voxels: int) -> None:
    """Raise ValueError where matrix scaling would overfit: above MATRIX_MAX_CLASSES classes, or with fewer than
    MATRIX_MIN_VOXELS_PER_PARAMETER fit voxels per parameter (K (K + 1) parameters); vector scaling fits 2 K."""
    parameters = num_classes * (num_classes + 1)
    needed = MATRIX_MIN_VOXELS_PER_PARAMETER * parameters
    if num_classes > MATRIX_MAX_CLASSES or num_fit_voxels < needed:
        raise ValueError(
            f"matrix scaling would overfit here: it fits K (K + 1) = {parameters} parameters for K = {num_classes} "
            f"classes, and is refused above {MATRIX_MAX_CLASSES} classes and below "
            f"{MATRIX_MIN_VOXELS_PER_PARAMETER} fit voxels per parameter ({needed} voxels for K = {num_classes}, got "
            f"{num_fit_voxels}), since neighbouring voxels are strongly correlated. Use vector scaling "
            f"(method='vector', {2 * num_classes} parameters) instead"
            + ("" if num_classes > MATRIX_MAX_CLASSES else ", or sample more voxels"))


def _checked_odir(odir: Sequence[float]) -> tuple[float, float]:
    pair = tuple(float(value) for value in odir)
    if len(pair) != 2 or not all(math.isfinite(value) and value >= 0 for value in pair):
        raise ValueError(f"an ODIR setting must be a pair (lambda_od, lambda_b) of finite numbers >= 0, got {odir!r}")
    return pair


class MatrixScaling(Parametrisation):
    """softmax(W z + b) with ODIR: parameters [W | b] (K, K + 1) flattened by rows.

    `odir` = (lambda_od, lambda_b) fixes the penalty; otherwise it is chosen from `odir_grid` by `folds`-fold
    cross-validation, with `fold_ids` (an integer fold in [0, folds) per voxel) or, if None, random folds from
    `seed`.
    """

    method = "matrix"
    hessian_max_voxels = 2**14

    def __init__(self, num_classes: int, odir: Sequence[float] | None = None,
                 odir_grid: Sequence[Sequence[float]] = DEFAULT_ODIR_GRID, folds: int = DEFAULT_FOLDS,
                 fold_ids: torch.Tensor | None = None, seed: int = 0):
        super().__init__(num_classes)
        self.odir = None if odir is None else _checked_odir(odir)
        self.odir_grid = [_checked_odir(pair) for pair in odir_grid]
        if self.odir is None and not self.odir_grid:
            raise ValueError("odir_grid is empty: give at least one (lambda_od, lambda_b) pair, or odir")
        if self.odir is None and (not isinstance(folds, int) or folds < 2):
            raise ValueError(f"folds must be an integer >= 2, got {folds!r}")
        self.folds, self.fold_ids, self.seed = folds, fold_ids, seed

    @property
    def num_parameters(self) -> int:
        return self.num_classes * (self.num_classes + 1)

    @property
    def hessian_entries_per_voxel(self) -> int:
        return self.num_parameters

    def identity(self) -> torch.Tensor:
        return torch.eye(self.num_classes, self.num_classes + 1, dtype=torch.float64).reshape(-1)

    def _augmented(self, parameters: torch.Tensor) -> torch.Tensor:
        return parameters.reshape(self.num_classes, self.num_classes + 1)

    def weight_and_bias(self, parameters):
        augmented = self._augmented(parameters)
        return augmented[:, :self.num_classes], augmented[:, self.num_classes]

    def calibrated_logits(self, parameters, logits):
        augmented = self._augmented(parameters)
        return torch.addmm(augmented[:, self.num_classes:], augmented[:, :self.num_classes], logits)

    def gradient_sum(self, residual, logits):
        return torch.cat([residual @ logits.T, residual.sum(dim=1, keepdim=True)], dim=1).reshape(-1)

    def hessian_sum(self, probabilities, logits):
        """Diagonal blocks sum_i p_ik x_i x_i^T minus one Gram matrix, x = [z; 1]."""
        num_classes, count = logits.shape
        index = torch.arange(num_classes)
        inputs = torch.cat([logits, torch.ones(1, count, dtype=logits.dtype)])  # x = [z; 1] (K + 1, m)
        weighted = probabilities[:, None, :] * inputs[None]  # p_k x (K, K + 1, m)
        flat = weighted.reshape(num_classes * (num_classes + 1), count)
        hessian = -(flat @ flat.T)
        blocks = hessian.view(num_classes, num_classes + 1, num_classes, num_classes + 1)
        blocks[index, :, index, :] += weighted @ inputs.T  # sum_i p_ik x_i x_i^T on the diagonal blocks
        return hessian

    def penalty(self, odir: tuple[float, float]) -> torch.Tensor:
        """Per-parameter weights c_j of the ODIR penalty sum_j c_j theta_j^2."""
        lambda_od, lambda_b = odir
        penalty = self.no_penalty()
        augmented = penalty.view(self.num_classes, self.num_classes + 1)
        augmented[:, :self.num_classes] = lambda_od / (self.num_classes * (self.num_classes - 1))
        augmented[:, :self.num_classes].fill_diagonal_(0.0)
        augmented[:, self.num_classes] = lambda_b / self.num_classes
        return penalty

    def _checked_fold_ids(self, num_voxels: int) -> torch.Tensor:
        if self.fold_ids is None:
            return torch.randperm(num_voxels, generator=torch.Generator().manual_seed(self.seed)) % self.folds
        fold_ids = torch.as_tensor(self.fold_ids).reshape(-1)
        if fold_ids.numel() != num_voxels or fold_ids.is_floating_point() or fold_ids.dtype == torch.bool or \
                int(fold_ids.min()) < 0 or int(fold_ids.max()) >= self.folds:
            raise ValueError(f"fold_ids must hold one integer fold in [0, {self.folds}) per voxel ({num_voxels}), got "
                             f"dtype {fold_ids.dtype} and {fold_ids.numel()} values")
        return fold_ids

    def fit(self, logits: torch.Tensor, labels: torch.Tensor) -> Fit:
        num_voxels = labels.numel()
        check_matrix_scaling(self.num_classes, num_voxels)
        info: dict[str, Any] = {}
        start, odir = self.identity(), self.odir
        if odir is None:
            fold_ids = self._checked_fold_ids(num_voxels)
            voxels = cross_validation_subsample(num_voxels, 2 * MATRIX_MIN_VOXELS_PER_PARAMETER * self.num_parameters,
                                                self.seed)
            # from the strongest penalty to the weakest (ties go to the stronger)
            penalties = {pair: self.penalty(pair) for pair in sorted(self.odir_grid, reverse=True)}
            held_out_nll, odir, start = cross_validate(self, logits[:, voxels], labels[voxels], fold_ids[voxels],
                                                       self.folds, penalties, _CROSS_VALIDATION_TOLERANCE)
            info["cross_validation"] = [{"lambda_od": pair[0], "lambda_b": pair[1], "held_out_nll": value}
                                        for pair, value in held_out_nll.items()]
            info["folds"] = self.folds
        info["lambda_od"], info["lambda_b"] = odir
        minimum = minimise(self, logits, labels, start, self.penalty(odir))
        return Fit(minimum.parameters, minimum.iterations, minimum.converged, info)


PARAMETRISATIONS = {cls.method: cls for cls in (TemperatureScaling, VectorScaling, MatrixScaling)}
