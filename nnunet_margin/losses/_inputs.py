"""Input checks and reshaping shared by the losses (plain torch, no nnU-Net), free of host synchronisation.

Nothing here reads a tensor value on the host: the label range and finiteness become 0-d bool tensors that
`SegmentationLoss` asserts asynchronously (`torch._assert_async`), so a GPU pipeline never stalls on them.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

# Scratch memory per chunk of the fused losses: large enough for few, large kernels on a GPU, small enough to stay
# in the CPU's caches (measured on 2 cores: 1 MiB chunks are as fast as any; on a GPU 64 MiB keeps kernels large).
CHUNK_BYTES = {"cpu": 1 << 20}
DEFAULT_CHUNK_BYTES = 64 << 20


class FlatInputs(NamedTuple):
    logits: torch.Tensor  # (B, K, V) float32 or float64, contiguous
    target: torch.Tensor  # (B, 1, V) int64, ignored voxels replaced by 0
    valid: torch.Tensor | None  # (B, 1, V) bool, None when nothing is ignored
    num_valid: torch.Tensor  # 0-d, logits' dtype and device: M, the number of voxels that count (may be 0)
    spatial: tuple[int, ...]  # the spatial shape, for losses that need neighbourhoods
    labels_ok: torch.Tensor  # 0-d bool: every counted label is an integer in [0, K)

    @property
    def num_classes(self) -> int:
        return self.logits.shape[1]

    def voxel_divisor(self) -> torch.Tensor:
        """max(M, 1): a mean over no voxels is 0 (every term is masked), not NaN."""
        return self.num_valid.clamp_min(1.0)


def chunk_voxels(logits: torch.Tensor) -> int:
    """Voxels per chunk of a (B, K, V) tensor so that one chunk takes about CHUNK_BYTES of scratch memory."""
    budget = CHUNK_BYTES.get(logits.device.type, DEFAULT_CHUNK_BYTES)
    return max(1, budget // (logits.shape[0] * logits.shape[1] * logits.element_size()))


def check_ignore_index(ignore_index: int | None) -> int | None:
    """Constructor check shared by the losses."""
    if ignore_index is not None and (isinstance(ignore_index, bool) or not isinstance(ignore_index, int)):
        raise ValueError(f"ignore_index must be an int or None, got {ignore_index!r}")
    return ignore_index


def check_finite_number(**values) -> None:
    """Constructor check shared by the losses: every named value is a finite real number."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")


def flatten_inputs(logits: torch.Tensor, target: torch.Tensor, ignore_index: int | None) -> FlatInputs:
    """Check logits (B, K, *spatial) against target (B, 1, *spatial) or (B, *spatial) and flatten both.

    Shapes and dtypes are checked here (they are host metadata); label values only as the `labels_ok` tensor.
    Logits are upcast to at least float32 (mixed precision gives float16); any integer target dtype is accepted,
    and a floating-point target whose values are integers.
    """
    if logits.ndim < 3:
        raise ValueError(f"logits must have shape (B, K, *spatial) with at least one spatial axis, got "
                         f"{tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating point tensor, got dtype {logits.dtype}")
    if target.is_complex() or target.dtype == torch.bool:
        raise ValueError(f"target must hold class indices, got dtype {target.dtype}")
    batch, num_classes, *spatial = logits.shape
    if target.ndim == logits.ndim and target.shape[1] == 1:
        target = target[:, 0]
    if tuple(target.shape) != (batch, *spatial):
        raise ValueError(f"target shape {tuple(target.shape)} does not match logits shape {tuple(logits.shape)}: "
                         f"expected (B, 1, *spatial) or (B, *spatial) = {(batch, 1, *spatial)}")
    if num_classes < 2:
        raise ValueError(f"need at least 2 classes (background included), got K={num_classes}")

    compute_dtype = torch.promote_types(logits.dtype, torch.float32)  # float16/bfloat16 -> float32, float64 stays
    flat_logits = logits.reshape(batch, num_classes, -1).to(compute_dtype).contiguous()
    labels_ok = torch.ones((), dtype=torch.bool, device=logits.device)
    if target.is_floating_point():
        labels_ok = (target == target.round()).all()
    flat_target = target.reshape(batch, 1, -1).long()
    valid = None
    if ignore_index is not None:
        valid = flat_target != ignore_index
        flat_target = flat_target.masked_fill(~valid, 0)
        num_valid = valid.sum().to(compute_dtype)
    else:
        num_valid = flat_logits.new_full((), float(flat_target.numel()))
    if flat_target.numel():
        low, high = torch.aminmax(flat_target)
        labels_ok = labels_ok & (low >= 0) & (high < num_classes)
    return FlatInputs(flat_logits, flat_target, valid, num_valid, tuple(spatial), labels_ok)
