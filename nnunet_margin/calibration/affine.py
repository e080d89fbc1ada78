"""Post-hoc affine calibrators on logits: temperature, vector and matrix scaling (docs/methods.md section 6).

Each maps a voxel's logits z (K,) to softmax(A z + b): temperature scaling A = I / T, b = 0, and vector scaling
A = diag(w) (Guo et al., ICML 2017); matrix scaling A = W, a full K x K matrix, with ODIR regularisation (Kull et al.,
NeurIPS 2019). The parameters minimise the mean negative log-likelihood (NLL) over the fit voxels, in float64, by Newton
steps with a backtracking (Armijo) line search. The gradient is always exact. The Hessian is exact for temperature and
vector scaling; for matrix scaling (K (K + 1) parameters, whose exact Hessian costs K^4 per voxel) it is computed on a
uniform random subsample of 2**14 voxels (exact below that) and recomputed only after a step that fell short (it had
to be shortened, or the Newton decrement fell less than tenfold); that changes how fast the iterations converge, not
where they stop: where the exact gradient vanishes. Directions of zero curvature (adding a constant to every
calibrated logit does not change the softmax) get no step, and the bias is reported centred (mean 0).

ODIR, in the normalised form of Kull et al.'s code (reg_norm=True) and of Fiducio 0.2.0's MatrixScaling: the objective
is mean NLL + lambda_od * mean over the K (K - 1) off-diagonal entries of W^2 + lambda_b * mean over the K entries of
b^2; the diagonal of W is not penalised. (lambda_od, lambda_b) is chosen from a small grid by k-fold cross-validation
inside the fit voxels (the unpenalised NLL of each held-out fold; on a uniform subsample of at most 2**19 voxels, or
twice what matrix scaling needs, beyond that), then the calibrator is refitted on all of them.

nnU-Net's last layer is a 1x1(x1) convolution z = V f + c, so every calibrator folds into it exactly:
V' = A V, c' = A c + b (`fold_affine_calibration`).
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from .logit_sample import LogitSample
from .stats import ArrayLike, CalibrationStats

METHODS = ("temperature", "vector", "matrix")
# (lambda_od, lambda_b) pairs tried by cross-validation; with millions of voxels the weakest usually wins, with the
# minimum number matrix scaling accepts (see below) the stronger ones can.
DEFAULT_ODIR_GRID = ((1e-4, 1e-4), (1e-3, 1e-3), (1e-2, 1e-2), (1e-1, 1e-1))
DEFAULT_FOLDS = 3
# Matrix scaling fits K (K + 1) parameters. Neighbouring voxels are strongly correlated, so a voxel carries far less
# information than an independent sample: matrix scaling is refused below 1000 fit voxels per parameter, and above 32
# classes (1056 parameters), where even millions of voxels from a few validation cases overfit.
MATRIX_MAX_CLASSES = 32
MATRIX_MIN_VOXELS_PER_PARAMETER = 1000
_HESSIAN_MAX_VOXELS = 2**14
# Voxels the ODIR cross-validation fits on at most (a uniform subsample of the fit voxels beyond that).
CROSS_VALIDATION_MAX_VOXELS = 2**19
# Entries (voxels x classes, or voxels x K (K + 1) for the matrix-scaling Hessian) processed at once; on 2 cores,
# 2**16 (512 KiB temporaries) was faster than 2**20 when fitting.
_CHUNK_ENTRIES = 2**16
_MAX_ITERATIONS = 100
# Newton decrement g^T H^-1 g, about 2 (F - min F): stop when below; cross-validation fits only need held-out NLLs
# far more precise than their differences between grid points.
_DECREMENT_TOLERANCE = 1e-12
_CROSS_VALIDATION_TOLERANCE = 1e-8
_ARMIJO_FRACTION = 1e-4
_MIN_STEP_FRACTION = 2.0**-30


@dataclass(frozen=True)
class AffineCalibration:
    """The calibration softmax(A z + b) of logits z: `weight` A (K, K) and `bias` b (K,), float64.

    `method` is "temperature" (A = I / T), "vector" (A = diag(w)) or "matrix" (A = W); `info` holds JSON-ready
    details of the fit (voxel count, NLL, iterations, and the temperature or the chosen ODIR lambdas).
    """

    weight: torch.Tensor
    bias: torch.Tensor
    method: str
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        weight = torch.as_tensor(self.weight, dtype=torch.float64).cpu()
        bias = torch.as_tensor(self.bias, dtype=torch.float64).cpu()
        if weight.ndim != 2 or weight.shape[0] != weight.shape[1] or weight.shape[0] < 2 or \
                tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"weight must have shape (K, K) and bias (K,) with K >= 2, got {tuple(weight.shape)} "
                             f"and {tuple(bias.shape)}")
        if not bool(torch.isfinite(weight).all() and torch.isfinite(bias).all()):
            raise ValueError("weight and bias must be finite")
        if self.method != "matrix" and bool((weight != torch.diag(torch.diagonal(weight))).any()):
            raise ValueError(f"a {self.method} calibration has a diagonal weight, got off-diagonal entries")
        object.__setattr__(self, "weight", weight)
        object.__setattr__(self, "bias", bias)

    @property
    def num_classes(self) -> int:
        return int(self.bias.numel())

    def apply(self, logits: ArrayLike, class_dim: int = 0) -> ArrayLike:
        """A z + b along `class_dim` of logits: (K, *spatial) with class_dim 0 (nnU-Net's exported layout), or e.g.
        (N, K, *spatial) with class_dim 1. Returns the same type (numpy or torch), dtype and shape, computed in the
        logits' dtype (at least float32)."""
        tensor = torch.as_tensor(logits)
        if not tensor.is_floating_point() or tensor.ndim < 1:
            raise ValueError(f"logits must be a floating point array, got dtype {tensor.dtype} and shape "
                             f"{tuple(tensor.shape)}")
        if not -tensor.ndim <= class_dim < tensor.ndim or tensor.shape[class_dim] != self.num_classes:
            raise ValueError(f"logits of shape {tuple(tensor.shape)} do not have K={self.num_classes} classes along "
                             f"class_dim={class_dim}")
        compute_dtype = torch.promote_types(tensor.dtype, torch.float32)
        moved = tensor.movedim(class_dim, 0)
        flat = moved.reshape(self.num_classes, -1).to(compute_dtype)
        weight = self.weight.to(compute_dtype).to(tensor.device)
        bias = self.bias.to(compute_dtype).to(tensor.device)[:, None]
        if self.method == "matrix":
            calibrated = torch.addmm(bias, weight, flat)
        else:
            calibrated = torch.addcmul(bias, torch.diagonal(weight)[:, None], flat)
        calibrated = calibrated.reshape(moved.shape).movedim(0, class_dim).to(tensor.dtype).contiguous()
        return calibrated.numpy() if isinstance(logits, np.ndarray) else calibrated

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (Python floats, so the round trip through JSON is exact)."""
        return {"method": self.method, "num_classes": self.num_classes, "weight": self.weight.tolist(),
                "bias": self.bias.tolist(), "info": copy.deepcopy(self.info)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AffineCalibration:
        """Inverse of `to_dict`."""
        calibration = cls(torch.tensor(data["weight"], dtype=torch.float64),
                          torch.tensor(data["bias"], dtype=torch.float64), data["method"], dict(data.get("info", {})))
        if calibration.num_classes != int(data["num_classes"]):
            raise ValueError(f"num_classes {data['num_classes']} does not match the weight's "
                             f"{calibration.num_classes} classes")
        return calibration


def fold_affine_calibration(weight: torch.Tensor, bias: torch.Tensor | None,
                            calibration: AffineCalibration) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight A V and bias A c + b of a layer z = V f + c followed by the calibration z -> A z + b.

    `weight` V has the K output channels first: nn.Linear (K, C) or an nn.Conv1d/2d/3d with groups=1 (K, C, *kernel),
    such as nnU-Net's final 1x1(x1) convolution; `bias` c is (K,) or None (zero). Returns new tensors of the weight's
    dtype and device, to copy into the layer (under torch.no_grad()); the inputs are unchanged.
    """
    weight = torch.as_tensor(weight)
    if weight.ndim < 2 or weight.shape[0] != calibration.num_classes:
        raise ValueError(f"weight must have the K={calibration.num_classes} output channels first, got shape "
                         f"{tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (calibration.num_classes,):
        raise ValueError(f"bias must have shape ({calibration.num_classes},), got {tuple(bias.shape)}")
    matrix = calibration.weight.to(weight.device)
    folded_weight = (matrix @ weight.detach().to(torch.float64).reshape(weight.shape[0], -1)).reshape(weight.shape)
    folded_bias = calibration.bias.to(weight.device)
    if bias is not None:
        folded_bias = folded_bias + matrix @ bias.detach().to(torch.float64)
    return folded_weight.to(weight.dtype), folded_bias.to(weight.dtype)


# ---------------------------------------------------------------------------------------------------- fitting


def _num_parameters(method: str, num_classes: int) -> int:
    return {"temperature": 1, "vector": 2 * num_classes, "matrix": num_classes * (num_classes + 1)}[method]


def _identity_parameters(method: str, num_classes: int) -> torch.Tensor:
    """Parameters of the identity map: beta = 1 / T; (w, b); or [W | b] (K, K + 1) flattened by rows."""
    if method == "temperature":
        return torch.ones(1, dtype=torch.float64)
    if method == "vector":
        return torch.cat([torch.ones(num_classes), torch.zeros(num_classes)]).double()
    return torch.eye(num_classes, num_classes + 1, dtype=torch.float64).reshape(-1)


def _weight_and_bias(method: str, parameters: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    if method == "temperature":
        return parameters[0] * torch.eye(num_classes, dtype=torch.float64), torch.zeros(num_classes).double()
    if method == "vector":
        return torch.diag(parameters[:num_classes]), parameters[num_classes:]
    augmented = parameters.reshape(num_classes, num_classes + 1)
    return augmented[:, :num_classes], augmented[:, num_classes]


def _calibrated_logits(method: str, parameters: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """A z + b of logits (K, m) float64, a new tensor."""
    num_classes = logits.shape[0]
    if method == "temperature":
        return logits * parameters[0]
    if method == "vector":
        return torch.addcmul(parameters[num_classes:, None], parameters[:num_classes, None], logits)
    augmented = parameters.reshape(num_classes, num_classes + 1)
    return torch.addmm(augmented[:, num_classes:], augmented[:, :num_classes], logits)


def _gradient_sum(method: str, residual: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Sum over voxels of the NLL gradient, from residual = softmax(A z + b) - onehot(y) (K, m)."""
    if method == "temperature":
        return torch.dot(residual.reshape(-1), logits.reshape(-1)).reshape(1)
    if method == "vector":
        return torch.cat([(residual * logits).sum(dim=1), residual.sum(dim=1)])
    return torch.cat([residual @ logits.T, residual.sum(dim=1, keepdim=True)], dim=1).reshape(-1)


def _hessian_sum(method: str, probabilities: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Sum over voxels of the NLL Hessian. Per voxel it is J^T (diag(p) - p p^T) J, J the Jacobian of A z + b in the
    parameters; written as diagonal sums minus one Gram matrix G G^T so that it costs one matrix product."""
    num_classes, count = logits.shape
    if method == "temperature":
        weighted = probabilities * logits
        return ((weighted * logits).sum() - weighted.sum(dim=0).square().sum()).reshape(1, 1)
    index = torch.arange(num_classes)
    if method == "vector":
        weighted = probabilities * logits  # p_k z_k, the w_k column of the per-voxel p^T J
        gram = torch.cat([weighted, probabilities])
        hessian = -(gram @ gram.T)
        hessian[index, index] += (weighted * logits).sum(dim=1)
        cross = weighted.sum(dim=1)
        hessian[index, num_classes + index] += cross
        hessian[num_classes + index, index] += cross
        hessian[num_classes + index, num_classes + index] += probabilities.sum(dim=1)
        return hessian
    inputs = torch.cat([logits, torch.ones(1, count, dtype=logits.dtype)])  # x = [z; 1] (K + 1, m)
    weighted = probabilities[:, None, :] * inputs[None]  # p_k x (K, K + 1, m)
    flat = weighted.reshape(num_classes * (num_classes + 1), count)
    hessian = -(flat @ flat.T)
    blocks = hessian.view(num_classes, num_classes + 1, num_classes, num_classes + 1)
    blocks[index, :, index, :] += weighted @ inputs.T  # sum_i p_ik x_i x_i^T on the diagonal blocks
    return hessian


def _nll_sums(method: str, parameters: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
              gradient: bool = True, hessian: bool = False) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                     torch.Tensor | None]:
    """Sums over the voxels of logits (K, n) float64 and labels (n,) int64 of the NLL of softmax(A z + b), and
    optionally of its gradient and Hessian in the parameters."""
    num_classes, num_voxels = logits.shape
    size = _num_parameters(method, num_classes)
    nll_sum = torch.zeros((), dtype=torch.float64)
    gradient_sum = torch.zeros(size, dtype=torch.float64) if gradient else None
    hessian_sum = torch.zeros(size, size, dtype=torch.float64) if hessian else None
    entries_per_voxel = num_classes * (num_classes + 1) if hessian and method == "matrix" else num_classes
    chunk = max(1, _CHUNK_ENTRIES // entries_per_voxel)
    minus_one = torch.full((1, 1), -1.0, dtype=torch.float64)
    for start in range(0, num_voxels, chunk):
        chunk_logits = logits[:, start:start + chunk]
        chunk_labels = labels[None, start:start + chunk]
        calibrated = _calibrated_logits(method, parameters, chunk_logits)
        calibrated -= calibrated.amax(dim=0, keepdim=True)
        exponentials = calibrated.exp()
        normaliser = exponentials.sum(dim=0)
        nll_sum += normaliser.log().sum() - calibrated.gather(0, chunk_labels).sum()
        if not gradient:
            continue
        probabilities = exponentials.div_(normaliser)
        if hessian:
            hessian_sum += _hessian_sum(method, probabilities, chunk_logits)
        residual = probabilities.scatter_add_(0, chunk_labels, minus_one.expand(chunk_labels.shape))
        gradient_sum += _gradient_sum(method, residual, chunk_logits)
    return nll_sum, gradient_sum, hessian_sum


def _odir_penalty(method: str, num_classes: int, odir: tuple[float, float] | None) -> torch.Tensor:
    """Per-parameter weights c_j of the quadratic penalty sum_j c_j theta_j^2 (ODIR for matrix scaling)."""
    penalty = torch.zeros(_num_parameters(method, num_classes), dtype=torch.float64)
    if method == "matrix" and odir is not None:
        lambda_od, lambda_b = odir
        augmented = penalty.view(num_classes, num_classes + 1)
        augmented[:, :num_classes] = lambda_od / (num_classes * (num_classes - 1))
        augmented[:, :num_classes].fill_diagonal_(0.0)
        augmented[:, num_classes] = lambda_b / num_classes
    return penalty


def _newton_step(hessian: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    """-H^+ g, the pseudo-inverse ignoring directions of (numerically) zero curvature."""
    eigenvalues, vectors = torch.linalg.eigh(hessian)
    kept = eigenvalues > 1e-12 * eigenvalues.max().clamp_min(torch.finfo(torch.float64).tiny)
    coefficients = torch.where(kept, (vectors.T @ gradient) / torch.where(kept, eigenvalues, 1.0), 0.0)
    return -(vectors @ coefficients)


@dataclass
class _Minimum:
    parameters: torch.Tensor
    objective: float
    iterations: int
    converged: bool


def _minimise(method: str, logits: torch.Tensor, labels: torch.Tensor, start: torch.Tensor,
              penalty: torch.Tensor, tolerance: float = _DECREMENT_TOLERANCE) -> _Minimum:
    """Newton iterations on mean NLL + sum_j penalty_j theta_j^2 from `start` (see the module docstring)."""
    num_voxels = labels.numel()
    exact_hessian = method != "matrix" or num_voxels <= _HESSIAN_MAX_VOXELS
    if not exact_hessian:
        subsample = torch.randperm(num_voxels, generator=torch.Generator().manual_seed(0))[:_HESSIAN_MAX_VOXELS]
        subsample_logits, subsample_labels = logits[:, subsample], labels[subsample]

    def evaluate(parameters):
        nll_sum, gradient_sum, hessian_sum = _nll_sums(method, parameters, logits, labels, hessian=exact_hessian)
        objective = float(nll_sum) / num_voxels + float((penalty * parameters.square()).sum())
        gradient = gradient_sum / num_voxels + 2 * penalty * parameters
        return objective, gradient, None if hessian_sum is None else hessian_sum / num_voxels

    parameters = start.clone()
    objective, gradient, hessian = evaluate(parameters)
    refresh_hessian, previous_decrement = not exact_hessian, math.inf
    for iteration in range(_MAX_ITERATIONS):
        if refresh_hessian:
            hessian = _nll_sums(method, parameters, subsample_logits, subsample_labels, hessian=True)[2]
            hessian /= subsample_labels.numel()
        step = _newton_step(hessian + torch.diag(2 * penalty), gradient)
        decrement = -float(gradient @ step)
        if decrement <= tolerance:
            return _Minimum(parameters, objective, iteration, True)
        fraction = 1.0
        while True:
            trial = parameters + fraction * step
            trial_objective, trial_gradient, trial_hessian = evaluate(trial)
            if trial_objective <= objective - _ARMIJO_FRACTION * fraction * decrement:
                break
            fraction /= 2
            if fraction < _MIN_STEP_FRACTION:  # no decrease left that float64 can resolve
                return _Minimum(parameters, objective, iteration, decrement <= 1e3 * tolerance)
        parameters, objective, gradient = trial, trial_objective, trial_gradient
        if exact_hessian:
            hessian = trial_hessian
        else:  # keep the subsampled Hessian while the full steps shrink the decrement fast
            refresh_hessian = fraction < 1 or decrement > 0.1 * previous_decrement
        previous_decrement = decrement
    return _Minimum(parameters, objective, _MAX_ITERATIONS, False)


def _cross_validation_subsample(num_classes: int, num_voxels: int, seed: int) -> torch.Tensor | slice:
    """The voxels the ODIR cross-validation uses: all of them, or a uniform random subset of
    max(CROSS_VALIDATION_MAX_VOXELS, twice the voxels matrix scaling needs) when there are more; choosing the penalty
    needs held-out NLL differences between grid points, not the final fit's precision."""
    needed = max(CROSS_VALIDATION_MAX_VOXELS,
                 2 * MATRIX_MIN_VOXELS_PER_PARAMETER * num_classes * (num_classes + 1))
    if num_voxels <= needed:
        return slice(None)
    return torch.randperm(num_voxels, generator=torch.Generator().manual_seed(seed))[:needed].sort().values


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


def _cross_validate_odir(logits: torch.Tensor, labels: torch.Tensor, grid: list[tuple[float, float]],
                         fold_ids: torch.Tensor, folds: int) -> tuple[dict, torch.Tensor]:
    """Mean held-out NLL of every (lambda_od, lambda_b) in grid over the folds, and the mean over the folds of the
    parameters fitted with the best one (a warm start for the final fit). The first fold's fits run from the
    strongest penalty to the weakest, each starting from the previous solution; the other folds' start from the
    first fold's solution with the same penalty."""
    num_classes = logits.shape[0]
    order = sorted(grid, key=lambda pair: pair, reverse=True)
    held_out_nll = {pair: 0.0 for pair in order}
    solutions: dict[tuple[float, float], list[torch.Tensor]] = {pair: [] for pair in order}
    for fold in range(folds):
        held_out = fold_ids == fold
        fitted = ~held_out
        fit_logits, fit_labels = logits[:, fitted], labels[fitted]
        held_out_logits, held_out_labels = logits[:, held_out], labels[held_out]
        parameters = _identity_parameters("matrix", num_classes)
        for pair in order:
            start = parameters if fold == 0 else solutions[pair][0]
            parameters = _minimise("matrix", fit_logits, fit_labels, start, _odir_penalty("matrix", num_classes, pair),
                                   _CROSS_VALIDATION_TOLERANCE).parameters
            held_out_nll[pair] += float(_nll_sums("matrix", parameters, held_out_logits, held_out_labels,
                                                  gradient=False)[0])
            solutions[pair].append(parameters)
    held_out_nll = {pair: value / labels.numel() for pair, value in held_out_nll.items()}
    best = min(order, key=held_out_nll.__getitem__)  # ties: the strongest penalty
    return held_out_nll, torch.stack(solutions[best]).mean(dim=0)


def fit_affine_calibration(logits: ArrayLike, labels: ArrayLike, method: str = "vector", *,
                           odir: Sequence[float] | None = None,
                           odir_grid: Sequence[Sequence[float]] = DEFAULT_ODIR_GRID,
                           folds: int = DEFAULT_FOLDS, fold_ids: ArrayLike | None = None,
                           seed: int = 0) -> AffineCalibration:
    """Fit a calibrator to logits (K, *voxels) of any float dtype and integer labels (*voxels) in [0, K).

    method: "temperature", "vector" or "matrix" (see the module docstring). For matrix scaling, `odir` =
    (lambda_od, lambda_b) fixes the ODIR penalty; otherwise it is chosen from `odir_grid` by `folds`-fold
    cross-validation, with `fold_ids` (an integer fold in [0, folds) per voxel, e.g. `LabelledLogits.fold_ids`) or,
    if None, random folds from `seed`. Matrix scaling raises ValueError where it would overfit
    (`check_matrix_scaling`). Warns if the iterations did not converge or a class has no voxel (its bias then runs
    towards -inf).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    logits, labels = torch.as_tensor(logits), torch.as_tensor(labels)
    if not logits.is_floating_point() or logits.ndim < 2 or logits.shape[0] < 2:
        raise ValueError(f"logits must be a floating point array of shape (K >= 2, *voxels), got dtype "
                         f"{logits.dtype} and shape {tuple(logits.shape)}")
    if labels.is_floating_point() or labels.dtype == torch.bool or tuple(labels.shape) != tuple(logits.shape[1:]):
        raise ValueError(f"labels must be an integer array of shape {tuple(logits.shape[1:])}, got dtype "
                         f"{labels.dtype} and shape {tuple(labels.shape)}")
    num_classes = logits.shape[0]
    logits = logits.reshape(num_classes, -1).to(torch.float64).contiguous()
    labels = labels.reshape(-1).to(torch.int64)
    num_voxels = labels.numel()
    if num_voxels == 0:
        raise ValueError("no voxels to fit a calibration to")
    low, high = (int(value) for value in torch.aminmax(labels))
    if low < 0 or high >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got values from {low} to {high}")
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("logits hold NaN or inf values")
    started = time.perf_counter()
    info: dict[str, Any] = {"num_fit_voxels": num_voxels}
    start = _identity_parameters(method, num_classes)
    penalty = _odir_penalty(method, num_classes, None)
    if method == "matrix":
        check_matrix_scaling(num_classes, num_voxels)
        if odir is None:
            grid = [_checked_odir(pair) for pair in odir_grid]
            if not grid:
                raise ValueError("odir_grid is empty: give at least one (lambda_od, lambda_b) pair, or odir")
            if not isinstance(folds, int) or folds < 2:
                raise ValueError(f"folds must be an integer >= 2, got {folds!r}")
            if fold_ids is None:
                generator = torch.Generator().manual_seed(seed)
                fold_ids = torch.randperm(num_voxels, generator=generator) % folds
            fold_ids = torch.as_tensor(fold_ids).reshape(-1)
            if fold_ids.numel() != num_voxels or fold_ids.is_floating_point() or fold_ids.dtype == torch.bool or \
                    int(fold_ids.min()) < 0 or int(fold_ids.max()) >= folds:
                raise ValueError(f"fold_ids must hold one integer fold in [0, {folds}) per voxel ({num_voxels}), got "
                                 f"dtype {fold_ids.dtype} and {fold_ids.numel()} values")
            cv_voxels = _cross_validation_subsample(num_classes, num_voxels, seed)
            held_out_nll, start = _cross_validate_odir(logits[:, cv_voxels], labels[cv_voxels], grid,
                                                       fold_ids[cv_voxels], folds)
            odir = min(held_out_nll, key=held_out_nll.__getitem__)
            info["cross_validation"] = [{"lambda_od": pair[0], "lambda_b": pair[1], "held_out_nll": value}
                                        for pair, value in held_out_nll.items()]
            info["folds"] = folds
        odir = _checked_odir(odir)
        info["lambda_od"], info["lambda_b"] = odir
        penalty = _odir_penalty(method, num_classes, odir)
    minimum = _minimise(method, logits, labels, start, penalty)
    weight, bias = _weight_and_bias(method, minimum.parameters, num_classes)
    if method == "temperature":
        info["temperature"] = 1 / float(minimum.parameters[0])
    info["fit_nll"] = float(_nll_sums(method, minimum.parameters, logits, labels, gradient=False)[0]) / num_voxels
    info["iterations"], info["converged"] = minimum.iterations, minimum.converged
    info["fit_seconds"] = time.perf_counter() - started
    if not minimum.converged:
        warnings.warn(f"{method} scaling did not converge in {_MAX_ITERATIONS} Newton iterations; the NLL may keep "
                      f"decreasing towards infinite parameters (e.g. labels separable by the logits)", stacklevel=2)
    if method != "temperature":
        absent = torch.bincount(labels, minlength=num_classes) == 0
        if bool(absent.any()):
            warnings.warn(f"classes {absent.nonzero()[:, 0].tolist()} have no fit voxel: their calibrated logits are "
                          f"pushed down as far as the fit allows; fit on data holding every class", stacklevel=2)
    return AffineCalibration(weight, bias - bias.mean(), method, info)


# ---------------------------------------------------------------------------------------------------- evaluation


def logit_calibration_metrics(logits: ArrayLike, labels: ArrayLike, calibration: AffineCalibration | None = None,
                        n_bins: int = 15) -> dict[str, Any]:
    """`CalibrationStats.compute()` of softmax(calibration.apply(logits)) (float64) for logits (K, *voxels) and
    labels (*voxels); without calibration, of softmax(logits)."""
    logits, labels = torch.as_tensor(logits), torch.as_tensor(labels)
    num_classes = logits.shape[0]
    logits, labels = logits.reshape(num_classes, -1), labels.reshape(-1)
    stats = CalibrationStats(num_classes, n_bins)
    chunk = max(1, _CHUNK_ENTRIES // num_classes)
    for start in range(0, labels.numel(), chunk):
        chunk_logits = logits[:, start:start + chunk].to(torch.float64)
        if calibration is not None:
            chunk_logits = calibration.apply(chunk_logits)
        stats.update(torch.softmax(chunk_logits, dim=0), labels[start:start + chunk])
    return stats.compute()


def evaluate_affine_calibrations(sample: LogitSample, methods: Sequence[str] = METHODS, *,
                                 held_out_fraction: float = 0.2, n_bins: int = 15, **fit_options) -> dict[str, Any]:
    """Fit each method on the fit part of `sample` and measure it on the held-out part (`LogitSample.split`).

    Returns {"num_fit_voxels", "num_held_out_voxels", "uncalibrated": metrics, method: {"calibration":
    AffineCalibration, "held_out": metrics}, ...}, metrics as from `logit_calibration_metrics`. `fit_options` go to
    `fit_affine_calibration` (cross-validation folds come from the sample's voxel positions). Raises ValueError where
    matrix scaling would overfit (`check_matrix_scaling`): leave "matrix" out of `methods` there.
    """
    fit, held_out = sample.split(held_out_fraction)
    folds = fit_options.pop("folds", DEFAULT_FOLDS)
    results: dict[str, Any] = {
        "num_fit_voxels": fit.num_voxels,
        "num_held_out_voxels": held_out.num_voxels,
        "uncalibrated": logit_calibration_metrics(held_out.logits, held_out.labels, n_bins=n_bins),
    }
    for method in methods:
        calibration = fit_affine_calibration(fit.logits, fit.labels, method, folds=folds,
                                             fold_ids=fit.fold_ids(folds), **fit_options)
        results[method] = {"calibration": calibration,
                           "held_out": logit_calibration_metrics(held_out.logits, held_out.labels, calibration, n_bins)}
    return results
