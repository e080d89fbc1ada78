"""The losses against docs/methods.md reference values and independent (naive, autograd-differentiated) implementations."""

import math

import pytest
import torch
import torch.nn.functional as F

from nnunet_margin.losses import _inputs as inputs_module
from nnunet_margin.losses import EmptyClassError, MarginCalibrationLoss, MbLSLoss, margin_offsets

from loss_checks import assert_gradient_matches_finite_differences, random_inputs

REFERENCE_COUNTS = [9000, 600, 300, 100]
REFERENCE_RHO_K0 = [0.0030878827, 0.00025280202, 0.0001759167, 0.00010051388]
REFERENCE_RHO_0K = [0.035136418, 1.6158933, 3.2829526, 9.9498744]


def reference_inputs():
    x = torch.arange(216).float()
    z = (torch.linspace(-3, 5, 216) * torch.cos(x)).reshape(2, 4, 3, 3, 3)
    y = (torch.arange(54) % 4).reshape(2, 1, 3, 3, 3)
    return z, y



def voxel_rows(z, y, ignore_index):
    """(voxels, K) logits and (voxels,) labels of the voxels that count."""
    logits = z.movedim(1, -1).reshape(-1, z.shape[1])
    labels = y.reshape(-1)
    if ignore_index is None:
        return logits, labels
    keep = labels != ignore_index
    return logits[keep], labels[keep]


def naive_margin_calibration(z, y, rho_k0, rho_0k, form="released", ignore_index=None):
    """Straight from docs/methods.md 1b/1c: per-class lambda by explicit max over the other classes."""
    num_classes = z.shape[1]
    logits, labels = voxel_rows(z, y, ignore_index)
    lam = torch.stack([logits[:, k] - torch.cat([logits[:, :k], logits[:, k + 1:]], 1).max(1).values
                       for k in range(num_classes)], 1)
    onehot = F.one_hot(labels, num_classes).to(z.dtype)
    rho_k0 = torch.as_tensor(rho_k0, dtype=z.dtype)
    rho_0k = torch.as_tensor(rho_0k, dtype=z.dtype)
    s = torch.where(onehot.bool(), lam - rho_k0[labels][:, None], lam + rho_0k[None])
    if form == "released":
        return F.binary_cross_entropy_with_logits(
            s, onehot, pos_weight=torch.full((num_classes,), float(num_classes), dtype=z.dtype))
    log2_loss = torch.where(onehot.bool(), torch.log2(1 + 2 ** (-s)), torch.log2(1 + 2 ** s))
    return log2_loss.sum(1).mean()


def naive_mbls(z, y, margin, alpha, ignore_index=None):
    logits, labels = voxel_rows(z, y, ignore_index)
    ce = F.cross_entropy(logits, labels)
    distance = logits.max(1, keepdim=True).values - logits
    return ce + alpha * F.relu(distance - margin).mean()


def reference_offsets():
    return margin_offsets(REFERENCE_COUNTS, tau=10, upsilon=1)


# --- margin offsets -------------------------------------------------------------------------------------------------

def test_offsets_match_methods_reference():
    offsets = reference_offsets()
    torch.testing.assert_close(offsets.rho_k0, torch.tensor(REFERENCE_RHO_K0, dtype=torch.float64), rtol=1e-6, atol=0)
    torch.testing.assert_close(offsets.rho_0k, torch.tensor(REFERENCE_RHO_0K, dtype=torch.float64), rtol=1e-6, atol=0)


def test_offsets_follow_corollary_1():
    counts = torch.tensor([5000.0, 800, 70, 3], dtype=torch.float64)
    rho_0k = margin_offsets(counts).rho_0k
    total = counts.sum()
    for i in range(4):
        for j in range(4):
            expected = (counts[j] / counts[i]) * math.sqrt(total - counts[i]) / math.sqrt(total - counts[j])
            assert float(rho_0k[i] / rho_0k[j]) == pytest.approx(float(expected), rel=1e-9)


def test_tau_scales_both_offsets_and_rare_classes_get_larger_margins():
    base, doubled = margin_offsets(REFERENCE_COUNTS, tau=10), margin_offsets(REFERENCE_COUNTS, tau=20)
    torch.testing.assert_close(doubled.rho_0k, 2 * base.rho_0k)
    torch.testing.assert_close(doubled.rho_k0, 2 * base.rho_k0)
    assert torch.all(base.rho_0k[1:] > base.rho_0k[:-1])


def test_empty_class_is_an_error_naming_the_class():
    with pytest.raises(EmptyClassError, match=r"class\(es\) \[2\]") as caught:
        margin_offsets([100, 10, 0, 5])
    assert caught.value.empty_classes == [2]


def test_empty_class_counted_as_one_voxel_when_opted_in():
    opted = margin_offsets([100, 10, 0, 5], empty_classes="count_as_one")
    explicit = margin_offsets([100, 10, 1, 5])
    torch.testing.assert_close(opted.rho_0k, explicit.rho_0k)
    torch.testing.assert_close(opted.rho_k0, explicit.rho_k0)
    assert torch.isfinite(opted.rho_0k).all()


@pytest.mark.parametrize("counts, kwargs, message", [
    ([10], {}, "at least 2 classes"),
    ([10, -1], {}, "non-negative"),
    ([10, float("nan")], {}, "finite"),
    ([10, 5], {"tau": 0}, "positive"),
    ([10, 5], {"upsilon": -1}, "positive"),
    ([10, 5], {"empty_classes": "skip"}, "empty_classes"),
    ([10, 5], {"tau": float("nan")}, "tau must be a finite number"),
    ([[10, 5], [3, 4]], {}, "1-D"),
    ([1_000_000, 1, 0], {"empty_classes": "count_as_one", "upsilon": 1e-6}, "undefined"),
])
def test_offsets_reject_bad_input(counts, kwargs, message):
    with pytest.raises(ValueError, match=message):
        margin_offsets(counts, **kwargs)


# --- margin calibration loss ----------------------------------------------------------------------------------------

def test_margin_calibration_matches_methods_reference():
    z, y = reference_inputs()
    offsets = reference_offsets()
    loss = MarginCalibrationLoss(offsets.rho_k0, offsets.rho_0k)(z, y)
    assert loss.dtype == torch.float32
    assert float(loss) == pytest.approx(4.6068859, rel=1e-6)


@pytest.mark.parametrize("form", ["released", "paper"])
@pytest.mark.parametrize("ignore_index", [None, 2])
@pytest.mark.parametrize("shape", [(2, 5, 3, 4, 5), (3, 4, 6, 7), (1, 2, 9)])
def test_margin_calibration_value_and_gradient_match_naive_implementation(form, ignore_index, shape):
    z, y = random_inputs(shape)
    counts = torch.arange(shape[1], 0, -1).double() ** 3 * 10
    offsets = margin_offsets(counts)
    loss_fn = MarginCalibrationLoss(offsets.rho_k0, offsets.rho_0k, form=form, ignore_index=ignore_index)
    fused_input = z.clone().requires_grad_()
    naive_input = z.clone().requires_grad_()
    fused = loss_fn(fused_input, y)
    naive = naive_margin_calibration(naive_input, y, offsets.rho_k0, offsets.rho_0k, form, ignore_index)
    torch.testing.assert_close(fused, naive, rtol=1e-10, atol=1e-12)
    fused.backward()
    naive.backward()
    torch.testing.assert_close(fused_input.grad, naive_input.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("loss_fn", [
    MarginCalibrationLoss(*reference_offsets()),
    MarginCalibrationLoss(*reference_offsets(), form="paper", ignore_index=1),
    MbLSLoss(margin=1.0, alpha=0.5),
    MbLSLoss(margin=0.5, alpha=1.0, ignore_index=3),
], ids=["mc", "mc-paper-ignore", "mbls", "mbls-ignore"])
def test_gradient_matches_finite_differences(loss_fn):
    z, y = random_inputs((2, 4, 3, 4, 5), seed=1)
    assert_gradient_matches_finite_differences(loss_fn, z, y, seed=2, directions=4, rel=1e-6)


@pytest.mark.parametrize("make_loss", [lambda: MarginCalibrationLoss(*reference_offsets()), lambda: MbLSLoss(2.0, 0.3)],
                         ids=["mc", "mbls"])
def test_float16_float32_float64_inputs_agree(make_loss):
    z, y = random_inputs((2, 4, 6, 6, 6), dtype=torch.float32)
    z = z.half().float()  # values representable in every dtype
    loss_fn = make_loss()
    values, gradients = {}, {}
    for dtype in (torch.float16, torch.float32, torch.float64):
        leaf = z.to(dtype).detach().requires_grad_()
        loss = loss_fn(leaf, y)
        loss.backward()
        assert leaf.grad.dtype == dtype
        values[dtype], gradients[dtype] = loss.item(), leaf.grad.double()
    assert values[torch.float16] == pytest.approx(values[torch.float64], rel=1e-6)
    assert values[torch.float32] == pytest.approx(values[torch.float64], rel=1e-6)
    torch.testing.assert_close(gradients[torch.float32], gradients[torch.float64], rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(gradients[torch.float16], gradients[torch.float64], rtol=1e-2, atol=1e-6)


@pytest.mark.parametrize("make_loss", [lambda: MarginCalibrationLoss(*reference_offsets()), lambda: MbLSLoss(2.0, 0.1)],
                         ids=["mc", "mbls"])
@pytest.mark.parametrize("target_dtype", [torch.int16, torch.int32, torch.int64, torch.uint8, torch.float32])
def test_target_layout_and_dtype_do_not_matter(make_loss, target_dtype):
    z, y = reference_inputs()
    loss_fn = make_loss()
    expected = loss_fn(z, y)
    assert float(loss_fn(z, y.to(target_dtype))) == pytest.approx(float(expected), rel=1e-7)
    assert float(loss_fn(z, y[:, 0].to(target_dtype))) == pytest.approx(float(expected), rel=1e-7)


@pytest.mark.parametrize("make_loss", [lambda ignore: MarginCalibrationLoss(*reference_offsets(), ignore_index=ignore),
                                       lambda ignore: MbLSLoss(2.0, 0.5, ignore_index=ignore)], ids=["mc", "mbls"])
def test_ignored_voxels_get_no_loss_and_no_gradient(make_loss):
    z, y = random_inputs((2, 4, 4, 4, 4), seed=3)
    ignore = 4
    y_ignored = y.clone()
    y_ignored[:, :, :2] = ignore
    leaf = z.clone().requires_grad_()
    loss = make_loss(ignore)(leaf, y_ignored)
    loss.backward()
    assert torch.all(leaf.grad[:, :, :2] == 0)
    # same as the loss on the kept voxels alone
    kept = make_loss(None)(z[:, :, 2:], y[:, :, 2:])
    assert loss.item() == pytest.approx(kept.item(), rel=1e-10)


def test_all_voxels_ignored_gives_zero_loss_with_gradient():
    z, y = random_inputs((1, 4, 2, 2, 2))
    for loss_fn in (MarginCalibrationLoss(*reference_offsets(), ignore_index=7), MbLSLoss(ignore_index=7)):
        leaf = z.clone().requires_grad_()
        loss = loss_fn(leaf, torch.full_like(y, 7))
        assert loss.item() == 0.0
        loss.backward()
        assert leaf.grad is not None and torch.all(leaf.grad == 0)


@pytest.mark.parametrize("z_shape, y_shape, message", [
    ((2, 4, 3, 3), (2, 1, 3, 4), "does not match"),
    ((2, 4, 3, 3), (3, 3, 3), "does not match"),
    ((4, 3), (4,), "at least one spatial axis"),
    ((2, 1, 3, 3), (2, 1, 3, 3), "at least 2 classes"),
])
def test_shape_errors_name_both_shapes(z_shape, y_shape, message):
    loss_fn = MbLSLoss()
    with pytest.raises(ValueError, match=message):
        loss_fn(torch.zeros(z_shape), torch.zeros(y_shape, dtype=torch.long))


@pytest.mark.parametrize("make_loss", [lambda: MarginCalibrationLoss(*reference_offsets()), lambda: MbLSLoss()],
                         ids=["mc", "mbls"])
def test_bad_labels_and_nan_logits_are_clear_errors(make_loss):
    z, y = reference_inputs()
    loss_fn = make_loss()
    # torch._assert_async: raised at once on the CPU, without a host synchronisation on a GPU
    for bad_label in (4, -1):
        with pytest.raises(RuntimeError, match=r"target holds a label outside \[0, 4\)"):
            loss_fn(z, torch.full_like(y, bad_label))
    with pytest.raises(RuntimeError, match="non-integer"):
        loss_fn(z, y.float() + 0.5)
    broken = z.clone()
    broken[0, 1, 0, 0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="NaN/inf logits"):
        loss_fn(broken, y)


def test_margin_calibration_channel_count_must_match_offsets():
    z, y = random_inputs((1, 5, 2, 2, 2))
    with pytest.raises(ValueError, match="5 channels but the margin offsets are for 4 classes"):
        MarginCalibrationLoss(*reference_offsets())(z, y)


@pytest.mark.parametrize("kwargs, message", [
    ({"rho_k0": [0.1, 0.2], "rho_0k": [0.1]}, "one entry per class"),
    ({"rho_k0": [0.1, 0.2], "rho_0k": [0.1, float("inf")]}, "finite"),
    ({"rho_k0": [0.1, 0.2], "rho_0k": [0.1, 0.2], "form": "log10"}, "form"),
])
def test_margin_calibration_constructor_checks(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MarginCalibrationLoss(**kwargs)


def test_from_counts_equals_explicit_offsets():
    z, y = reference_inputs()
    assert float(MarginCalibrationLoss.from_counts(REFERENCE_COUNTS)(z, y)) == pytest.approx(4.6068859, rel=1e-6)


def test_second_backward_is_refused_clearly():
    z, y = reference_inputs()
    leaf = z.clone().requires_grad_()
    loss = MarginCalibrationLoss(*reference_offsets())(leaf, y)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="single backward"):
        loss.backward()


def test_ties_in_the_top_two_give_a_valid_subgradient():
    # two equal maxima: lambda is 0 for both, the loss stays finite and matches the naive form
    z = torch.tensor([[[2.0], [2.0], [-1.0]]], dtype=torch.float64)
    y = torch.tensor([[[1]]])
    offsets = margin_offsets([50, 30, 20])
    leaf = z.clone().requires_grad_()
    loss = MarginCalibrationLoss(*offsets)(leaf, y)
    torch.testing.assert_close(loss, naive_margin_calibration(z, y, *offsets))
    loss.backward()
    assert torch.isfinite(leaf.grad).all()
    assert float(leaf.grad.sum()) == pytest.approx(0.0, abs=1e-12)  # shift invariance of the margins


# --- MbLS -------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scale, total, ce, penalty", [
    (1.0, 2.5837741, 2.4961898, 0.87584317),
    (4.0, 9.1712599, 8.4790239, 6.9223633),
])
def test_mbls_matches_methods_reference(scale, total, ce, penalty):
    z, y = reference_inputs()
    parts = MbLSLoss(margin=2, alpha=0.1).parts(z * scale, y)
    assert float(parts.total) == pytest.approx(total, rel=1e-6)
    assert float(parts.terms["ce"]) == pytest.approx(ce, rel=1e-6)
    assert float(parts.terms["penalty"]) == pytest.approx(0.1 * penalty, rel=1e-6)  # terms are weighted


@pytest.mark.parametrize("margin, alpha", [(10.0, 0.1), (2.0, 0.1), (0.5, 1.0), (0.0, 0.3)])
@pytest.mark.parametrize("ignore_index", [None, 1])
@pytest.mark.parametrize("shape", [(2, 4, 3, 4, 5), (2, 3, 5, 5)])
def test_mbls_value_and_gradient_match_naive_implementation(margin, alpha, ignore_index, shape):
    z, y = random_inputs(shape, seed=4, scale=5.0)
    fused_input = z.clone().requires_grad_()
    naive_input = z.clone().requires_grad_()
    fused = MbLSLoss(margin, alpha, ignore_index=ignore_index)(fused_input, y)
    naive = naive_mbls(naive_input, y, margin, alpha, ignore_index)
    torch.testing.assert_close(fused, naive, rtol=1e-10, atol=1e-12)
    fused.backward()
    naive.backward()
    torch.testing.assert_close(fused_input.grad, naive_input.grad, rtol=1e-9, atol=1e-12)


def test_mbls_without_alpha_is_cross_entropy():
    z, y = random_inputs((2, 4, 3, 3, 3))
    expected = F.cross_entropy(z, y[:, 0])
    assert float(MbLSLoss(alpha=0.0)(z, y)) == pytest.approx(float(expected), rel=1e-12)


@pytest.mark.parametrize("make_loss", [lambda: MarginCalibrationLoss(*reference_offsets()), lambda: MbLSLoss(5.0, 0.2)],
                         ids=["mc", "mbls"])
def test_chunked_passes_give_the_result_of_one_pass(make_loss, monkeypatch):
    z, y = random_inputs((1, 4, 20, 20, 20), dtype=torch.float64, scale=8.0)
    results = []
    for budget in (1 << 30, 4096):  # one chunk, then 8000 voxels in chunks of 128
        monkeypatch.setitem(inputs_module.CHUNK_BYTES, "cpu", budget)
        leaf = z.clone().requires_grad_()
        loss = make_loss()(leaf, y)
        loss.backward()
        results.append((loss.detach(), leaf.grad))
    assert inputs_module.chunk_voxels(z.reshape(1, 4, -1)) == 128
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("schedule, factor, epochs, expected", [
    (None, 0.0, [0, 5], [0.1, 0.1]),
    ("add", 0.05, [0, 1, 4, 1000], [0.1, 0.15, 0.3, 0.5]),
    ("multiply", 2.0, [0, 1, 2, 10], [0.1, 0.2, 0.4, 0.5]),
    ("step", 3.0, [0, 9, 10, 25], [0.1, 0.1, 0.3, 0.5]),
])
def test_alpha_schedule(schedule, factor, epochs, expected):
    loss_fn = MbLSLoss(alpha=0.1, schedule=schedule, schedule_factor=factor, schedule_step_size=10, max_alpha=0.5)
    assert [pytest.approx(loss_fn.step_alpha(epoch)) for epoch in epochs] == expected
    assert loss_fn.alpha == pytest.approx(expected[-1])


@pytest.mark.parametrize("kwargs, message", [
    ({"margin": -1}, "margin"),
    ({"margin": float("nan")}, "margin must be a finite number"),
    ({"alpha": float("inf")}, "alpha must be a finite number"),
    ({"ignore_index": 2.5}, "ignore_index must be an int"),
    ({"alpha": -0.1}, "alpha"),
    ({"schedule": "cosine"}, "schedule"),
    ({"alpha": 1.0, "max_alpha": 0.5}, "max_alpha"),
    ({"schedule_step_size": 0}, "schedule_step_size"),
    ({"schedule": "add"}, "needs a schedule_factor"),
    ({"schedule": "multiply", "schedule_factor": 0.0}, "needs a schedule_factor"),
    ({"schedule": "step", "schedule_factor": -2.0}, "needs a schedule_factor"),
])
def test_mbls_constructor_checks(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MbLSLoss(**kwargs)


@pytest.mark.parametrize("make_loss", [lambda: MarginCalibrationLoss(*reference_offsets()), lambda: MbLSLoss(2.0, 0.3)],
                         ids=["mc", "mbls"])
def test_reduced_precision_logits_under_autocast_are_upcast(make_loss):
    """As in nnU-Net's train_step under autocast (bfloat16 on the CPU here, float16 on CUDA)."""
    torch.manual_seed(0)
    network = torch.nn.Conv3d(2, 4, kernel_size=1)
    image = torch.randn(2, 2, 4, 4, 4) * 3
    target = torch.randint(0, 4, (2, 1, 4, 4, 4), dtype=torch.int16)
    loss_fn = make_loss()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = network(image)
        loss = loss_fn(logits, target)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(loss_fn(logits.detach().float(), target).item(), rel=1e-6)
    loss.backward()
    assert torch.isfinite(network.weight.grad).all() and network.weight.grad.abs().sum() > 0
