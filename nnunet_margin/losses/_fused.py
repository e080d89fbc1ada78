"""What the fused losses share: the backward that only scales a gradient computed in the forward pass, and the
cross-entropy written once.

Every fused loss is a `torch.autograd.Function` subclass of `PrecomputedGradient` whose `forward` returns the total
first (then any detached terms) and, when `ctx.needs_input_grad[0]`, stores d total / d logits with
`save_gradient`. This keeps the buffers of a plain autograd graph (softmax, one-hot, soft targets) out of memory.

The cross-entropy of the losses that contain one (MbLS, ECP, NACL, CALS; label smoothing uses the gradient half)
is `log_softmax_cross_entropy` (log p in one logits-sized buffer, and the mean -log p_y) followed, for the gradient,
by `subtract_target_` on that buffer turned into p (or into whatever the loss adds to p).
"""

from __future__ import annotations

import torch


class PrecomputedGradient(torch.autograd.Function):
    """Base class: backward returns the gradient saved by forward times the incoming gradient of the total."""

    @staticmethod
    def save_gradient(ctx, gradient: torch.Tensor, loss_name: str) -> None:
        ctx.save_for_backward(gradient)
        ctx.loss_name = loss_name
        ctx.gradient_used = False

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total, *unused_term_grads):
        if ctx.gradient_used:
            raise RuntimeError(f"{ctx.loss_name} supports a single backward pass per forward (no retain_graph)")
        ctx.gradient_used = True
        (gradient,) = ctx.saved_tensors
        return (gradient.mul_(grad_total),) + (None,) * (len(ctx.needs_input_grad) - 1)


def voxel_chunks(tensor: torch.Tensor, step: int):
    """Slices of the last (voxel) axis of length `step`."""
    return (slice(start, start + step) for start in range(0, tensor.shape[-1], step))


def log_softmax_cross_entropy(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None,
                              divisor: torch.Tensor, out: torch.Tensor | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """log p = log_softmax(logits) (in `out` if given) and CE = -sum over counted voxels of log p_y / divisor."""
    log_p = torch.log_softmax(logits, dim=1) if out is None else torch.log_softmax(logits, dim=1, out=out)
    picked = log_p.gather(1, target)
    if valid is not None:
        picked = picked * valid
    return log_p, picked.sum().neg() / divisor


def subtract_target_(gradient: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None,
                     divisor: torch.Tensor, target_weight: float = 1.0) -> torch.Tensor:
    """In place: (gradient - target_weight * onehot(y)) on the counted voxels, 0 on the ignored ones, / divisor.
    With gradient = p this is d CE / d logits."""
    gradient.scatter_add_(1, target, torch.full_like(target, -target_weight, dtype=gradient.dtype))
    if valid is not None:
        gradient.masked_fill_(~valid, 0.0)
    return gradient.div_(divisor)
