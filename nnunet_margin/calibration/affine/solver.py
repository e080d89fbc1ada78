"""The float64 Newton solver shared by every affine parametrisation (docs/methods.md 6).

A `Parametrisation` maps a parameter vector theta to the calibrated logits A z + b and supplies the per-voxel
gradient and Hessian sums of the NLL in theta; `minimise` runs Newton steps with a backtracking (Armijo) line search on
mean NLL + sum_j c_j theta_j^2 (c the quadratic penalty, e.g. ODIR). The gradient is always exact. A parametrisation
whose exact Hessian is too costly per voxel (`hessian_max_voxels`) gets it on a uniform random subsample of that many
voxels, recomputed only after a step that fell short (it had to be shortened, or the Newton decrement fell less than
tenfold); that changes how fast the iterations converge, not where they stop: where the exact gradient vanishes.
Directions of zero curvature (adding a constant to every calibrated logit does not change the softmax) get no step.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

# Entries (voxels x classes, or voxels x parameters for a Hessian) processed at once; on 2 cores, 2**16 (512 KiB
# temporaries) was faster than 2**20 when fitting.
CHUNK_ENTRIES = 2**16
MAX_ITERATIONS = 100
# Newton decrement g^T H^-1 g, about 2 (F - min F): stop when below.
DECREMENT_TOLERANCE = 1e-12
_ARMIJO_FRACTION = 1e-4
_MIN_STEP_FRACTION = 2.0**-30


class Parametrisation(ABC):
    """One affine calibrator's parameters theta (float64) for K classes: what the solver needs of it."""

    method: str
    # Voxels the Hessian is computed on at most (a uniform subsample beyond that); None: always exact.
    hessian_max_voxels: int | None = None

    def __init__(self, num_classes: int):
        self.num_classes = num_classes

    @property
    @abstractmethod
    def num_parameters(self) -> int:
        ...

    @abstractmethod
    def identity(self) -> torch.Tensor:
        """The parameters of the identity map A = I, b = 0."""

    @abstractmethod
    def weight_and_bias(self, parameters: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A (K, K) and b (K,) of the parameters."""

    @abstractmethod
    def calibrated_logits(self, parameters: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """A z + b of logits (K, m) float64, a new tensor."""

    @abstractmethod
    def gradient_sum(self, residual: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Sum over voxels of the NLL gradient, from residual = softmax(A z + b) - onehot(y) (K, m)."""

    @abstractmethod
    def hessian_sum(self, probabilities: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Sum over voxels of the NLL Hessian J^T (diag(p) - p p^T) J, J the Jacobian of A z + b in theta."""

    @property
    def hessian_entries_per_voxel(self) -> int:
        """Temporary entries per voxel of `hessian_sum` (sets the chunk size)."""
        return self.num_classes

    def no_penalty(self) -> torch.Tensor:
        return torch.zeros(self.num_parameters, dtype=torch.float64)


def nll_sums(parametrisation: Parametrisation, parameters: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
             gradient: bool = True, hessian: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Sums over the voxels of logits (K, n) float64 and labels (n,) int64 of the NLL of softmax(A z + b), and
    optionally of its gradient and Hessian in the parameters."""
    num_voxels = labels.numel()
    size = parametrisation.num_parameters
    nll_sum = torch.zeros((), dtype=torch.float64)
    gradient_sum = torch.zeros(size, dtype=torch.float64) if gradient else None
    hessian_sum = torch.zeros(size, size, dtype=torch.float64) if hessian else None
    entries_per_voxel = parametrisation.hessian_entries_per_voxel if hessian else parametrisation.num_classes
    chunk = max(1, CHUNK_ENTRIES // entries_per_voxel)
    minus_one = torch.full((1, 1), -1.0, dtype=torch.float64)
    for start in range(0, num_voxels, chunk):
        chunk_logits = logits[:, start:start + chunk]
        chunk_labels = labels[None, start:start + chunk]
        calibrated = parametrisation.calibrated_logits(parameters, chunk_logits)
        calibrated -= calibrated.amax(dim=0, keepdim=True)
        exponentials = calibrated.exp()
        normaliser = exponentials.sum(dim=0)
        nll_sum += normaliser.log().sum() - calibrated.gather(0, chunk_labels).sum()
        if not gradient:
            continue
        probabilities = exponentials.div_(normaliser)
        if hessian:
            hessian_sum += parametrisation.hessian_sum(probabilities, chunk_logits)
        residual = probabilities.scatter_add_(0, chunk_labels, minus_one.expand(chunk_labels.shape))
        gradient_sum += parametrisation.gradient_sum(residual, chunk_logits)
    return nll_sum, gradient_sum, hessian_sum


def mean_nll(parametrisation: Parametrisation, parameters: torch.Tensor, logits: torch.Tensor,
             labels: torch.Tensor) -> float:
    return float(nll_sums(parametrisation, parameters, logits, labels, gradient=False)[0]) / labels.numel()


def mean_gradient(parametrisation: Parametrisation, parameters: torch.Tensor, logits: torch.Tensor,
                  labels: torch.Tensor) -> torch.Tensor:
    return nll_sums(parametrisation, parameters, logits, labels)[1] / labels.numel()


def _newton_step(hessian: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """-H^+ g, the pseudo-inverse ignoring directions of (numerically) zero curvature."""
    eigenvalues, vectors = torch.linalg.eigh(hessian)
    kept = eigenvalues > 1e-12 * eigenvalues.max().clamp_min(torch.finfo(torch.float64).tiny)
    coefficients = torch.where(kept, (vectors.T @ gradient) / torch.where(kept, eigenvalues, 1.0), 0.0)
    return -(vectors @ coefficients)


@dataclass
class Minimum:
    parameters: torch.Tensor
    objective: float
    iterations: int
    converged: bool


def minimise(parametrisation: Parametrisation, logits: torch.Tensor, labels: torch.Tensor, start: torch.Tensor,
             penalty: torch.Tensor, tolerance: float = DECREMENT_TOLERANCE) -> Minimum:
    """Newton iterations on mean NLL + sum_j penalty_j theta_j^2 from `start` (see the module docstring)."""
    num_voxels = labels.numel()
    limit = parametrisation.hessian_max_voxels
    exact_hessian = limit is None or num_voxels <= limit
    if not exact_hessian:
        subsample = torch.randperm(num_voxels, generator=torch.Generator().manual_seed(0))[:limit]
        subsample_logits, subsample_labels = logits[:, subsample], labels[subsample]

    def evaluate(parameters):
        nll_sum, gradient_sum, hessian_sum = nll_sums(parametrisation, parameters, logits, labels,
                                                      hessian=exact_hessian)
        objective = float(nll_sum) / num_voxels + float((penalty * parameters.square()).sum())
        gradient = gradient_sum / num_voxels + 2 * penalty * parameters
        return objective, gradient, None if hessian_sum is None else hessian_sum / num_voxels

    parameters = start.clone()
    objective, gradient, hessian = evaluate(parameters)
    refresh_hessian, previous_decrement = not exact_hessian, math.inf
    for iteration in range(MAX_ITERATIONS):
        if refresh_hessian:
            hessian = nll_sums(parametrisation, parameters, subsample_logits, subsample_labels, hessian=True)[2]
            hessian /= subsample_labels.numel()
        step = _newton_step(hessian + torch.diag(2 * penalty), gradient)
        decrement = -float(gradient @ step)
        if decrement <= tolerance:
            return Minimum(parameters, objective, iteration, True)
        fraction = 1.0
        while True:
            trial = parameters + fraction * step
            trial_objective, trial_gradient, trial_hessian = evaluate(trial)
            if trial_objective <= objective - _ARMIJO_FRACTION * fraction * decrement:
                break
            fraction /= 2
            if fraction < _MIN_STEP_FRACTION:  # no decrease left that float64 can resolve
                return Minimum(parameters, objective, iteration, decrement <= 1e3 * tolerance)
        parameters, objective, gradient = trial, trial_objective, trial_gradient
        if exact_hessian:
            hessian = trial_hessian
        else:  # keep the subsampled Hessian while the full steps shrink the decrement fast
            refresh_hessian = fraction < 1 or decrement > 0.1 * previous_decrement
        previous_decrement = decrement
    return Minimum(parameters, objective, MAX_ITERATIONS, False)
