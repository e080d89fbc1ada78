"""A fitted affine calibration softmax(A z + b) and its folding into a network's last layer (docs/methods.md 6).

nnU-Net's last layer is a 1x1(x1) convolution z = V f + c, so every affine calibration folds into it exactly:
V' = A V, c' = A c + b (`fold_affine_calibration`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..checks import ArrayLike

METHODS = ("temperature", "vector", "matrix")


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

    @classmethod
    def from_temperature(cls, temperature: float, num_classes: int, info: dict[str, Any] | None = None
                         ) -> AffineCalibration:
        """softmax(z / T) as an affine map: A = I / T, b = 0."""
        return cls(torch.eye(num_classes, dtype=torch.float64) / temperature,
                   torch.zeros(num_classes, dtype=torch.float64), "temperature",
                   {"temperature": temperature, **(info or {})})

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
