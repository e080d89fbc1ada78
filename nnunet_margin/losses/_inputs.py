"""Input checks and reshaping shared by the losses (plain torch, no nnU-Net)."""

from __future__ import annotations

from typing import NamedTuple

import torch


class FlatInputs(NamedTuple):
    logits: torch.Tensor  # (B, K, V) float32 or float64, contiguous
    target: torch.Tensor  # (B, 1, V) int64, ignored voxels replaced by 0
    valid: torch.Tensor | None  # (B, 1, V) bool, None when nothing is ignored
    num_valid: int  # M, the number of voxels that count


def flatten_inputs(logits: torch.Tensor, target: torch.Tensor, ignore_index: int | None) -> FlatInputs:
    """Check logits (B, K, *spatial) against target (B, 1, *spatial) or (B, *spatial) and flatten both.

    Logits are upcast to at least float32 (mixed precision gives float16); any integer target dtype is accepted.
    """
    if logits.ndim < 3:
        raise ValueError(f"logits must have shape (B, K, *spatial) with at least one spatial axis, got "
                         f"{tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating point tensor, got dtype {logits.dtype}")
    if target.is_floating_point() or target.is_complex():
        if not torch.equal(target, target.round()):
            raise ValueError("target holds non-integer values; pass class indices, not one-hot or soft labels")
    batch, num_classes, *spatial = logits.shape
    if target.ndim == logits.ndim and target.shape[1] == 1:
        target = target[:, 0]
    if tuple(target.shape) != (batch, *spatial):
        raise ValueError(f"target shape {tuple(target.shape)} does not match logits shape {tuple(logits.shape)}: "
                         f"expected (B, 1, *spatial) or (B, *spatial) = {(batch, 1, *spatial)}")
    if num_classes < 2:
        raise ValueError(f"need at least 2 classes (background included), got K={num_classes}")

    flat_target = target.reshape(batch, 1, -1).long()
    valid = None
    if ignore_index is not None:
        valid = flat_target != ignore_index
        flat_target = flat_target.masked_fill(~valid, 0)
    if flat_target.numel():
        low, high = torch.stack(torch.aminmax(flat_target)).tolist()  # one device sync
        if low < 0 or high >= num_classes:
            ignored = "" if ignore_index is None else f" (ignore_index={ignore_index} excluded)"
            raise ValueError(f"target holds label {low if low < 0 else high}{ignored}, outside [0, {num_classes}) "
                             f"for {num_classes} logit channels; check the dataset labels or set ignore_index")
    num_valid = flat_target.numel() if valid is None else int(valid.sum())
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)  # float16/bfloat16 -> float32, float64 stays
    flat_logits = logits.reshape(batch, num_classes, -1).to(compute_dtype).contiguous()
    return FlatInputs(flat_logits, flat_target, valid, num_valid)


def check_finite(loss: torch.Tensor, logits: torch.Tensor, name: str) -> None:
    """Raise a clear error for a non-finite loss, saying whether the logits were already broken."""
    if bool(torch.isfinite(loss)):
        return
    if not bool(torch.isfinite(logits).all()):
        raise FloatingPointError(
            f"{name}: the network produced NaN/inf logits. Typical fixes: lower the learning rate, check the input "
            f"normalisation, or resume from an earlier checkpoint; mixed precision overflow also shows up this way.")
    raise FloatingPointError(f"{name}: the loss is {float(loss)} although the logits are finite; please report this "
                             f"with the logits' range ({float(logits.min())}, {float(logits.max())}).")

