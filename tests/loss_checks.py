"""Inputs, helpers and the loss contract shared by the loss tests.

The contract is what every method's loss must meet whatever its formula: named parts that add up, gradients that
match finite differences, dtype and target-layout independence, the ignore label, chunking, one backward, clear
errors, any number of spatial axes, autocast. `contract_checks(method)` lists the checks that apply to a registry
`Method`; tests/test_losses.py runs them over `nnunet_margin.methods.METHODS`, tests/test_own_method.py over the
README's own method. `check_no_host_synchronisation` (run by tests/test_host_sync.py) is the GPU-pipeline part.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from nnunet_margin.losses import _inputs as inputs_module
from nnunet_margin.methods import Method

from host_sync import counting_syncs

NUM_CLASSES = 4


def random_inputs(shape=(2, 5, 3, 4, 5), dtype=torch.float64, seed=0, scale=3.0, absent_class=None, ignored=None):
    """Logits (B, K, *spatial) of `scale` standard deviation and uniform labels (B, 1, *spatial); with
    `absent_class`, that class has no voxel in the first image; with `ignored`, a block of voxels and a few scattered
    ones carry that label (`with_ignored_block`)."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=generator, dtype=dtype) * scale
    y = torch.randint(0, shape[1], (shape[0], 1, *shape[2:]), generator=generator)
    if absent_class is not None:
        y[0][y[0] == absent_class] = (absent_class + 1) % shape[1]
    return z, (y if ignored is None else with_ignored_block(y, ignored))


def with_ignored_block(y, ignore_index):
    """Ignore a block of voxels in the first image (and a few scattered voxels everywhere)."""
    y = y.clone()
    y[0, :, :2, 1:3] = ignore_index
    y.view(-1)[::7] = ignore_index
    return y


def value_and_gradient(function, z, *args):
    leaf = z.clone().requires_grad_()
    value = function(leaf, *args)
    value.backward()
    return value.detach(), leaf.grad


def assert_gradient_matches_finite_differences(loss_fn, z, y, seed, directions, rel, eps=1e-6):
    """The autograd gradient's directional derivatives equal central differences along random directions."""
    leaf = z.clone().requires_grad_()
    (gradient,) = torch.autograd.grad(loss_fn(leaf, y), leaf)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(directions):
        direction = torch.randn(z.shape, generator=generator, dtype=z.dtype)
        numeric = (loss_fn(z + eps * direction, y) - loss_fn(z - eps * direction, y)) / (2 * eps)
        assert float((gradient * direction).sum()) == pytest.approx(float(numeric), rel=rel, abs=1e-9)


def example_counts(num_classes: int) -> torch.Tensor:
    """Imbalanced class voxel counts, background first (for losses built from label statistics)."""
    return torch.arange(num_classes, 0, -1).double() ** 3 * 10


def build(method: Method, settings: dict, ignore_index=None, num_classes=NUM_CLASSES):
    """The method's loss with `settings`, built as a trainer builds it (any context it needs made up here)."""
    return method.build(ignore_index=ignore_index, num_classes=num_classes, counts=example_counts(num_classes),
                        **settings)


# --- the contract ---------------------------------------------------------------------------------------------------

def check_parts_are_named_detached_and_add_up(method, settings):
    for ignore_index in (None, 3):
        z, y = random_inputs((2, NUM_CLASSES, 5, 4, 3), seed=30, ignored=ignore_index)
        loss_fn = build(method, settings, ignore_index)
        parts = loss_fn.parts(z.clone().requires_grad_(), y)
        assert list(parts.terms) == (list(method.parts) or ["loss"])
        assert parts.total.requires_grad and not any(term.requires_grad for term in parts.terms.values())
        torch.testing.assert_close(sum(parts.terms.values()), parts.total.detach(), rtol=1e-12, atol=1e-15)
        assert torch.equal(loss_fn(z, y), parts.total.detach())


def check_gradient_matches_finite_differences(method, settings):
    for ignore_index in (None, 3):
        z, y = random_inputs((2, NUM_CLASSES, 3, 4, 5), seed=15, ignored=ignore_index)
        assert_gradient_matches_finite_differences(build(method, settings, ignore_index), z, y, seed=16,
                                                   directions=4, rel=1e-6)


def check_float16_bfloat16_float32_float64_inputs_agree(method, settings):
    z, y = random_inputs((2, NUM_CLASSES, 6, 6, 6), dtype=torch.float32, seed=17)
    z = z.bfloat16().float()  # values representable in every dtype
    loss_fn = build(method, settings)
    values, gradients = {}, {}
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        leaf = z.to(dtype).detach().requires_grad_()
        loss = loss_fn(leaf, y)
        loss.backward()
        assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert leaf.grad.dtype == dtype
        values[dtype], gradients[dtype] = loss.item(), leaf.grad.double()
    for dtype in (torch.float16, torch.bfloat16):  # computed in float32: identical to float32 inputs
        assert values[dtype] == values[torch.float32]
    assert values[torch.float32] == pytest.approx(values[torch.float64], rel=1e-6)
    torch.testing.assert_close(gradients[torch.float32], gradients[torch.float64], rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(gradients[torch.float16], gradients[torch.float64], rtol=1e-2, atol=1e-6)
    torch.testing.assert_close(gradients[torch.bfloat16], gradients[torch.float64], rtol=2e-2, atol=1e-4)


def check_ignored_voxels_get_no_loss_and_no_gradient(method, settings):
    ignore_index = 255
    z, y = random_inputs((2, NUM_CLASSES, 5, 5, 4), seed=18, ignored=ignore_index)
    ignored = (y == ignore_index).expand_as(z)
    loss_fn = build(method, settings, ignore_index)
    value, gradient = value_and_gradient(loss_fn, z, y)
    assert torch.all(gradient[ignored] == 0) and torch.any(gradient[~ignored] != 0)
    changed = torch.where(ignored, z * 5 - 3, z)  # the ignored voxels' logits do not matter
    torch.testing.assert_close(loss_fn(changed, y), value, rtol=1e-12, atol=1e-15)


def check_ignored_slab_equals_the_loss_without_it(method, settings):
    """Losses without neighbourhoods: ignoring a slab is the same as cutting it off."""
    z, y = random_inputs((2, NUM_CLASSES, 6, 5, 4), seed=19)
    ignored = y.clone()
    ignored[:, :, :2] = 7
    value, gradient = value_and_gradient(build(method, settings, 7), z, ignored)
    assert torch.all(gradient[:, :, :2] == 0)
    torch.testing.assert_close(value, build(method, settings)(z[:, :, 2:], y[:, :, 2:]), rtol=1e-12, atol=1e-15)


def check_all_voxels_ignored_gives_zero_loss_and_zero_gradient(method, settings):
    z, y = random_inputs((1, NUM_CLASSES, 3, 3, 3), seed=20)
    value, gradient = value_and_gradient(build(method, settings, 9), z, torch.full_like(y, 9))
    assert value.item() == 0.0
    assert torch.all(gradient == 0)


def check_target_layout_and_dtype_do_not_matter(method, settings):
    z, y = random_inputs((2, NUM_CLASSES, 4, 5, 3), seed=21)
    loss_fn = build(method, settings)
    expected = loss_fn(z, y)
    for target_dtype in (torch.uint8, torch.int16, torch.int32, torch.int64, torch.float32):
        torch.testing.assert_close(loss_fn(z, y.to(target_dtype)), expected, rtol=0, atol=0)
        torch.testing.assert_close(loss_fn(z, y[:, 0].to(target_dtype)), expected, rtol=0, atol=0)


@contextlib.contextmanager
def cpu_chunk_bytes(budget: int):
    previous = inputs_module.CHUNK_BYTES["cpu"]
    inputs_module.CHUNK_BYTES["cpu"] = budget
    try:
        yield
    finally:
        inputs_module.CHUNK_BYTES["cpu"] = previous


def check_chunked_passes_give_the_result_of_one_pass(method, settings):
    z, y = random_inputs((1, NUM_CLASSES, 12, 11, 10), seed=22, scale=8.0, ignored=5)
    results = []
    for budget in (1 << 30, 4096):  # one chunk, then chunks of 128 voxels
        with cpu_chunk_bytes(budget):
            results.append(value_and_gradient(build(method, settings, 5), z, y))
    with cpu_chunk_bytes(4096):
        assert inputs_module.chunk_voxels(z.reshape(1, NUM_CLASSES, -1)) == 128
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-12, atol=1e-15)


def check_second_backward_is_correct_or_refused_clearly(method, settings):
    """A second backward through the same graph accumulates the same gradient again (plain autograd), or is refused
    with a clear error (the fused losses: their gradient is computed once, in the forward pass)."""
    z, y = random_inputs((1, NUM_CLASSES, 3, 3, 3))
    leaf = z.clone().requires_grad_()
    loss = build(method, settings)(leaf, y)
    loss.backward(retain_graph=True)
    first = leaf.grad.clone()
    try:
        loss.backward()
    except RuntimeError as error:
        assert "supports a single backward pass per forward" in str(error)
    else:
        torch.testing.assert_close(leaf.grad, 2 * first)


def check_bad_labels_and_nan_logits_are_clear_errors(method, settings):
    z, y = random_inputs((1, NUM_CLASSES, 3, 3, 3))
    loss_fn = build(method, settings)
    # torch._assert_async: raised at once on the CPU, without a host synchronisation on a GPU
    for bad_label in (NUM_CLASSES, -1):
        with pytest.raises(RuntimeError, match=rf"target holds a label outside \[0, {NUM_CLASSES}\)"):
            loss_fn(z, torch.full_like(y, bad_label))
    with pytest.raises(RuntimeError, match="non-integer"):
        loss_fn(z, y.float() + 0.5)
    broken = z.clone()
    broken[0, 1, 0, 0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="NaN/inf logits"):
        loss_fn(broken, y)


def check_shape_errors_name_both_shapes(method, settings):
    for z_shape, y_shape, message in [((2, NUM_CLASSES, 3, 3), (2, 1, 3, 4), "does not match"),
                                      ((2, NUM_CLASSES, 3, 3), (3, 3, 3), "does not match"),
                                      ((4, NUM_CLASSES), (4,), "at least one spatial axis")]:
        with pytest.raises(ValueError, match=message):
            build(method, settings)(torch.zeros(z_shape), torch.zeros(y_shape, dtype=torch.long))
    # one class: refused when the loss is called, or when it is built (losses with per-class state)
    with pytest.raises(ValueError, match="at least 2 classes|an int >= 2"):
        build(method, settings, num_classes=1)(torch.zeros(2, 1, 3, 3), torch.zeros(2, 1, 3, 3, dtype=torch.long))


def check_one_to_three_spatial_axes(method, settings):
    for shape in [(2, NUM_CLASSES, 7), (2, NUM_CLASSES, 5, 6), (2, NUM_CLASSES, 3, 4, 5)]:
        z, y = random_inputs(shape, seed=24)
        value, gradient = value_and_gradient(build(method, settings), z, y)
        assert torch.isfinite(value) and torch.isfinite(gradient).all() and gradient.abs().sum() > 0, shape


def check_reduced_precision_logits_under_autocast_are_upcast(method, settings):
    """As in nnU-Net's train_step under autocast (bfloat16 on the CPU here, float16 on CUDA)."""
    torch.manual_seed(0)
    network = torch.nn.Conv3d(2, NUM_CLASSES, kernel_size=1)
    image = torch.randn(2, 2, 4, 4, 4) * 3
    target = torch.randint(0, NUM_CLASSES, (2, 1, 4, 4, 4), dtype=torch.int16)
    loss_fn = build(method, settings)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = network(image)
        loss = loss_fn(logits, target)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(loss_fn(logits.detach().float(), target).item(), rel=1e-6)
    loss.backward()
    assert torch.isfinite(network.weight.grad).all() and network.weight.grad.abs().sum() > 0


def check_no_host_synchronisation(method, settings):
    """Forward, backward and validation statistics without and with an ignore label: no synchronising call (as
    the trainers use the losses, `check_inputs = False`); the input checks alone: none either (asynchronous)."""
    for ignore_index in (None, 2):
        z, y = random_inputs((2, NUM_CLASSES, 5, 4, 3), dtype=torch.float32, seed=23, ignored=ignore_index)
        loss = build(method, settings, ignore_index)
        loss.check_inputs = False
        leaf = z.clone().requires_grad_()
        with counting_syncs() as calls:
            loss(leaf, y).backward()
            loss.observe_validation(z, y)
        assert dict(calls) == {}
        assert torch.isfinite(leaf.grad).all()
        loss.check_inputs = True
        with counting_syncs() as calls:
            loss(z, y)
        assert dict(calls) == {}, "the input checks must stay asynchronous"


def contract_checks(method: Method) -> list:
    """The contract checks that apply to the method's loss (each called as check(method, settings))."""
    checks = [check_parts_are_named_detached_and_add_up, check_gradient_matches_finite_differences,
              check_float16_bfloat16_float32_float64_inputs_agree, check_ignored_voxels_get_no_loss_and_no_gradient,
              check_all_voxels_ignored_gives_zero_loss_and_zero_gradient, check_target_layout_and_dtype_do_not_matter,
              check_chunked_passes_give_the_result_of_one_pass, check_second_backward_is_correct_or_refused_clearly,
              check_bad_labels_and_nan_logits_are_clear_errors, check_shape_errors_name_both_shapes,
              check_one_to_three_spatial_axes, check_reduced_precision_logits_under_autocast_are_upcast]
    if not method.neighbourhood:
        checks.append(check_ignored_slab_equals_the_loss_without_it)
    return checks
