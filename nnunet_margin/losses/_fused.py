"""Shared backward of the fused losses: the gradient is computed in the forward pass and only scaled in backward.

A fused loss is a `torch.autograd.Function` subclass of `PrecomputedGradient` whose `forward` returns the total
first (then any detached terms) and, when `ctx.needs_input_grad[0]`, stores d total / d logits with
`save_gradient`. This keeps the buffers of a plain autograd graph (softmax, one-hot, soft targets) out of memory.
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
