"""Inputs and checks shared by the loss tests."""

from __future__ import annotations

import pytest
import torch


def random_inputs(shape=(2, 5, 3, 4, 5), dtype=torch.float64, seed=0, scale=3.0, absent_class=None):
    """Logits (B, K, *spatial) of `scale` standard deviation and uniform labels (B, 1, *spatial); with
    `absent_class`, that class has no voxel in the first image."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=generator, dtype=dtype) * scale
    y = torch.randint(0, shape[1], (shape[0], 1, *shape[2:]), generator=generator)
    if absent_class is not None:
        y[0][y[0] == absent_class] = (absent_class + 1) % shape[1]
    return z, y


def assert_gradient_matches_finite_differences(loss_fn, z, y, seed, directions, rel, eps=1e-6):
    """The autograd gradient's directional derivatives equal central differences along random directions."""
    leaf = z.clone().requires_grad_()
    (gradient,) = torch.autograd.grad(loss_fn(leaf, y), leaf)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(directions):
        direction = torch.randn(z.shape, generator=generator, dtype=z.dtype)
        numeric = (loss_fn(z + eps * direction, y) - loss_fn(z - eps * direction, y)) / (2 * eps)
        assert float((gradient * direction).sum()) == pytest.approx(float(numeric), rel=rel, abs=1e-9)
