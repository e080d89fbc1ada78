"""The losses: the registry's catalogue, the contract every method's loss meets, each method's math against
docs/methods.md values and independent implementations (naive, autograd-differentiated), and the reference libraries
(MONAI 1.6.1, torch).

The contract (tests/loss_checks.py) runs over every entry of nnunet_margin.methods.METHODS; host synchronisation is
checked in tests/test_host_sync.py.
"""

import importlib
import inspect
import math
import pkgutil

import pytest
import torch
import torch.nn.functional as F

import nnunet_margin.losses as losses_package
from nnunet_margin.losses import (CALSLoss, ConfidencePenaltyLoss, EmptyClassError, FocalLoss, HardL1ACELoss,
                                  LabelSmoothingLoss, MarginCalibrationLoss, MbLSLoss, NACLLoss, SegmentationLoss,
                                  SoftL1ACELoss, SVLSLoss, margin_offsets)
from nnunet_margin.methods import CONTEXT, METHODS

from loss_checks import (assert_gradient_matches_finite_differences, build, contract_checks, random_inputs,
                         value_and_gradient, with_ignored_block)

FLOAT32_EPS = torch.finfo(torch.float32).eps
SHAPES = [(2, 4, 5, 6, 7), (3, 5, 9, 8)]  # 3D and 2D
SHAPE_IDS = ["3d", "2d"]


# --- the registry -----------------------------------------------------------------------------------------------------

def package_losses() -> dict[str, type]:
    """Every public SegmentationLoss subclass defined in nnunet_margin/losses/ (private bases, `_Name`, excluded)."""
    found = {}
    for module_info in pkgutil.iter_modules(losses_package.__path__):
        module = importlib.import_module(f"{losses_package.__name__}.{module_info.name}")
        for name, value in vars(module).items():
            if (inspect.isclass(value) and issubclass(value, SegmentationLoss) and value is not SegmentationLoss
                    and value.__module__ == module.__name__ and not name.startswith("_")):
                found[name] = value
    return found


@pytest.mark.parametrize("name", sorted(package_losses()))
def test_every_loss_of_the_package_is_a_registry_method(name):
    registered = {method.loss for method in METHODS}
    assert package_losses()[name] in registered, (
        f"{name} (nnunet_margin/losses/) is the loss of no method in nnunet_margin/methods.py: add its entry to "
        f"METHODS (or remove the loss)")


@pytest.mark.parametrize("method", METHODS, ids=lambda method: method.name)
def test_registry_entry_matches_its_loss(method):
    assert method.loss.__name__ in losses_package.__all__, f"{method.name}: export {method.loss.__name__}"
    assert method.compared_with, f"{method.name}: say what the tests compare the loss against"
    builder = inspect.signature(method.builder or method.loss)
    arguments = {name: parameter for name, parameter in builder.parameters.items()
                 if parameter.kind is parameter.POSITIONAL_OR_KEYWORD and name != "ignore_index"}
    assert set(arguments) - set(method.context) == set(method.settings), method.name
    assert set(method.context) <= set(CONTEXT)
    for setting, default in method.settings.items():
        assert arguments[setting].default == default, (method.name, setting)
    loss = method.build(num_classes=4, counts=[400, 300, 200, 100])
    assert type(loss) is method.loss and list(loss.parts(*random_inputs((1, 4, 2, 2, 2))).terms) == (
        list(method.parts) or ["loss"])


def test_method_names_terms_and_trainers_are_unique():
    for key in ("name", "trainer"):
        values = [getattr(method, key) for method in METHODS]
        assert len(values) == len(set(values)), key
    trainers = [name for method in METHODS for name in method.trainers]
    assert len(trainers) == len(set(trainers))


# --- the contract, for every method -----------------------------------------------------------------------------------

def case_id(method, settings, check) -> str:
    return "-".join([method.name, *(f"{key}={value}" for key, value in settings.items()),
                     check.__name__.removeprefix("check_")])


CONTRACT_CASES = [pytest.param(check, method, settings, id=case_id(method, settings, check))
                  for method in METHODS for settings in method.test_settings for check in contract_checks(method)]


@pytest.mark.parametrize("check, method, settings", CONTRACT_CASES)
def test_loss_contract(check, method, settings):
    check(method, settings)


@pytest.mark.parametrize("method", METHODS, ids=lambda method: method.name)
def test_the_package_losses_are_fused_and_refuse_a_second_backward(method):
    """Every loss of the package computes its gradient in the forward pass (PrecomputedGradient), so a second
    backward through the same graph is refused clearly instead of returning a wrong gradient."""
    z, y = random_inputs((1, 4, 3, 3, 3))
    loss = build(method, method.test_settings[0])(z.clone().requires_grad_(), y)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=f"{method.loss.__name__} supports a single backward pass per forward"):
        loss.backward()


# --- independent implementations from docs/methods.md -----------------------------------------------------------------

def kept(y, ignore_index):
    labels = y[:, 0]
    return torch.ones_like(labels, dtype=torch.bool) if ignore_index is None else labels != ignore_index


def voxel_rows(z, y, ignore_index=None):
    """(voxels, K) logits and (voxels,) labels of the voxels that count."""
    keep = kept(y, ignore_index)
    return z.movedim(1, -1)[keep], y[:, 0][keep]


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


def naive_focal(z, y, gamma, ignore_index=None):
    logits, labels = voxel_rows(z, y, ignore_index)
    log_p = F.log_softmax(logits, 1).gather(1, labels[:, None])[:, 0]
    return (-(1 - log_p.exp()) ** gamma * log_p).mean()


def naive_confidence_penalty(z, y, beta, ignore_index=None):
    logits, labels = voxel_rows(z, y, ignore_index)
    log_p = F.log_softmax(logits, 1)
    entropy = -(log_p.exp() * log_p).sum(1)
    return F.cross_entropy(logits, labels) - beta * entropy.mean()


def svls_reference_kernel(dims, sigma):
    """docs/methods.md 4d: Gaussian 3^d normalised to 1, centre c replaced by 1 - c, divided by 1 - c."""
    axis = torch.arange(3, dtype=torch.float64) - 1
    grids = torch.meshgrid(*[axis] * dims, indexing="ij")
    kernel = torch.exp(-sum(g ** 2 for g in grids) / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    centre = (1,) * dims
    neighbours = 1 - kernel[centre].item()
    kernel[centre] = neighbours
    return kernel / neighbours


def convolve(x, kernel, padding_mode):
    """Depthwise 'same' convolution of (B, C, *spatial) with one d-dimensional kernel."""
    dims = x.ndim - 2
    radius = kernel.shape[0] // 2
    pad = (radius,) * (2 * dims)
    x = F.pad(x, pad, mode=padding_mode) if padding_mode == "replicate" else F.pad(x, pad)
    conv = {2: F.conv2d, 3: F.conv3d}[dims]
    return conv(x, kernel.to(x.dtype).expand(x.shape[1], 1, *kernel.shape), groups=x.shape[1])


def one_hot_counted(y, num_classes, ignore_index, dtype):
    keep = kept(y, ignore_index)
    labels = torch.where(keep, y[:, 0], 0)
    return F.one_hot(labels, num_classes).movedim(-1, 1).to(dtype) * keep[:, None], keep[:, None].to(dtype)


def naive_svls(z, y, sigma=1.0, ignore_index=None):
    """Soft target = sum of kernel x one-hot over the counted neighbours / their kernel weight (replicate padding);
    with nothing ignored the denominator is the released code's kernel sum."""
    onehot, counted = one_hot_counted(y, z.shape[1], ignore_index, z.dtype)
    kernel = svls_reference_kernel(z.ndim - 2, sigma)
    # clamp: a voxel whose whole neighbourhood is ignored is ignored itself (0/0 would turn its zero gradient to NaN)
    soft = convolve(onehot, kernel, "replicate") / convolve(counted, kernel, "replicate").clamp_min(1e-30)
    per_voxel = -(soft * F.log_softmax(z, 1)).sum(1)
    return per_voxel[kept(y, ignore_index)].mean()


def released_svls_3d(z, y, sigma=1.0):
    """mobarakol/SVLS svls.py as the docs describe it: float32 kernel, replicate pad, divide by the kernel sum."""
    kernel = svls_reference_kernel(3, sigma).float()
    onehot = F.one_hot(y[:, 0], z.shape[1]).movedim(-1, 1).float()
    soft = convolve(onehot, kernel, "replicate") / kernel.sum()
    return (-soft.to(z.dtype) * F.log_softmax(z, 1)).sum(1).mean()


def naive_nacl(z, y, alpha, taps, distance, ignore_index):
    """tau = zero-padded filter of the counted one-hot rows, times S / (S - kernel weight on ignored neighbours)."""
    dims = z.ndim - 2
    taps = torch.as_tensor(taps, dtype=torch.float64)
    kernel = taps
    for _ in range(dims - 1):
        kernel = kernel[..., None] * taps
    onehot, counted = one_hot_counted(y, z.shape[1], ignore_index, z.dtype)
    total = kernel.sum()
    tau = convolve(onehot, kernel, "zeros") * (total / (total - convolve(1 - counted, kernel, "zeros")))
    distances = (tau - z).abs() if distance == "l1" else (tau - z) ** 2
    keep = kept(y, ignore_index)
    logits, labels = voxel_rows(z, y, ignore_index)
    return F.cross_entropy(logits, labels) + alpha * distances.movedim(1, -1)[keep].mean()


def naive_ace(z, y, num_bins=20, soft=False, empty_weight=0.01, ignore_index=None):
    """docs/methods.md 4f with loops over images, classes and bins; autograd through the bin means."""
    batch, num_classes = z.shape[:2]
    probabilities = torch.softmax(z, 1).reshape(batch, num_classes, -1)
    labels = y.reshape(batch, -1)
    edges = torch.linspace(0, 1 + FLOAT32_EPS, num_bins + 1, dtype=torch.float32).to(z.dtype)
    centres = torch.linspace(0, 1 + FLOAT32_EPS, 2 * num_bins + 1, dtype=torch.float32)[1::2].to(z.dtype)
    total = z.new_zeros(())
    for b in range(batch):
        keep = torch.ones_like(labels[b], dtype=torch.bool) if ignore_index is None else labels[b] != ignore_index
        for c in range(num_classes):
            p = probabilities[b, c][keep]
            truth = (labels[b][keep] == c).to(z.dtype)
            if truth.sum() == 0:
                continue  # f_bc = 0, still counted in the mean
            weights = torch.zeros(p.shape[0], num_bins, dtype=z.dtype)
            if not soft:
                for n in range(num_bins):  # bins (edges[n], edges[n + 1]], p = 0 in the first
                    inside = (p > edges[n]) & (p <= edges[n + 1]) if n else p <= edges[1]
                    weights[:, n] = inside.to(z.dtype)
            else:
                weights[:, 0] = torch.where(p <= centres[0], 1.0, 0.0)
                weights[:, -1] = weights[:, -1] + torch.where(p > centres[-1], 1.0, 0.0)
                for n in range(num_bins - 1):
                    between = (p > centres[n]) & (p <= centres[n + 1])
                    span = centres[n + 1] - centres[n]
                    weights[:, n] = weights[:, n] + torch.where(between, (centres[n + 1] - p) / span, 0.0)
                    weights[:, n + 1] = weights[:, n + 1] + torch.where(between, (p - centres[n]) / span, 0.0)
            errors = []
            for n in range(num_bins):
                weight = weights[:, n].sum()
                if (weight >= empty_weight) if soft else (weight > 0):
                    errors.append(((weights[:, n] * p).sum() / weight - (weights[:, n] * truth).sum() / weight).abs())
            total = total + torch.stack(errors).mean()
    return total / (batch * num_classes)


def naive_cals(z, y, lambdas, rhos, margin, ignore_index=None):
    logits, labels = voxel_rows(z, y, ignore_index)
    h = (logits.max(1, keepdim=True).values - logits - margin) / margin
    x = lambdas + rhos * h
    penalty = torch.where(x >= 0, (x ** 2 - lambdas ** 2) / (2 * rhos), -lambdas ** 2 / (2 * rhos))
    return F.cross_entropy(logits, labels) + penalty.mean()


class NaiveCALSMultipliers:
    """docs/methods.md 4g's multiplier updates, one epoch's validation batches at a time."""

    def __init__(self, num_classes, margin):
        self.margin = margin
        self.lambdas = torch.full((num_classes,), 1e-6, dtype=torch.float64)
        self.rhos = torch.ones(num_classes, dtype=torch.float64)
        self.previous = None
        self.epoch = 0

    def finish_epoch(self, batches, ignore_index=None):
        h = torch.cat([(rows.max(1, keepdim=True).values - rows - self.margin) / self.margin
                       for rows, _ in (voxel_rows(z, y, ignore_index) for z, y in batches)])
        x = self.lambdas + self.rhos * h
        derivative = torch.where(x >= 0, x, torch.zeros_like(x)).clamp(1e-6, 1e6)
        self.lambdas = derivative.mean(0).clamp(1e-6, 1e6)
        self.epoch += 1
        mean_h = h.mean(0)
        if self.epoch % 10 == 0 and self.previous is not None:
            self.rhos = torch.where(mean_h > 0.9 * self.previous.clamp(min=0), 1.2 * self.rhos, self.rhos).clamp(1, 10)
        self.previous = mean_h


def assert_matches_naive(loss_fn, naive, z, y, rtol=1e-9, atol=1e-12):
    value, gradient = value_and_gradient(loss_fn, z, y)
    expected_value, expected_gradient = value_and_gradient(naive, z, y)
    torch.testing.assert_close(value, expected_value, rtol=rtol, atol=atol)
    torch.testing.assert_close(gradient, expected_gradient, rtol=rtol, atol=atol)


# --- 1. margin calibration (docs/methods.md 1) ------------------------------------------------------------------------

REFERENCE_COUNTS = [9000, 600, 300, 100]
REFERENCE_RHO_K0 = [0.0030878827, 0.00025280202, 0.0001759167, 0.00010051388]
REFERENCE_RHO_0K = [0.035136418, 1.6158933, 3.2829526, 9.9498744]


def reference_inputs():
    x = torch.arange(216).float()
    z = (torch.linspace(-3, 5, 216) * torch.cos(x)).reshape(2, 4, 3, 3, 3)
    y = (torch.arange(54) % 4).reshape(2, 1, 3, 3, 3)
    return z, y


def reference_offsets():
    return margin_offsets(REFERENCE_COUNTS, tau=10, upsilon=1)


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


def test_margin_calibration_paper_form_gradient_matches_finite_differences():
    z, y = random_inputs((2, 4, 3, 4, 5), seed=1)
    loss_fn = MarginCalibrationLoss(*reference_offsets(), form="paper", ignore_index=1)
    assert_gradient_matches_finite_differences(loss_fn, z, y, seed=2, directions=4, rel=1e-6)


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


# --- 2. MbLS (docs/methods.md 2) --------------------------------------------------------------------------------------

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


# --- 4a-4c. focal loss, label smoothing, ECP --------------------------------------------------------------------------

@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 3.0])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_focal_equals_monai_times_classes(gamma, shape):
    from monai.losses import FocalLoss as MonaiFocalLoss

    z, y = random_inputs(shape, dtype=torch.float32, seed=1)
    ours = FocalLoss(gamma=gamma)(z, y)
    monai = MonaiFocalLoss(use_softmax=True, to_onehot_y=True, gamma=gamma)(z, y)
    torch.testing.assert_close(ours, monai * shape[1], rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("ignore_index", [None, 1])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_focal_matches_naive(gamma, ignore_index, shape):
    z, y = random_inputs(shape, seed=4, scale=5.0, ignored=ignore_index)
    assert_matches_naive(FocalLoss(gamma, ignore_index=ignore_index),
                         lambda leaf, labels: naive_focal(leaf, labels, gamma, ignore_index), z, y)


@pytest.mark.parametrize("epsilon", [0.0, 0.1, 0.2, 0.3, 1.0])
@pytest.mark.parametrize("ignore_index", [None, 2])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_label_smoothing_equals_torch_cross_entropy(epsilon, ignore_index, shape):
    z, y = random_inputs(shape, seed=2, ignored=ignore_index)
    expected = lambda leaf, labels: F.cross_entropy(leaf, labels[:, 0], label_smoothing=epsilon,  # noqa: E731
                                                    ignore_index=-100 if ignore_index is None else ignore_index)
    assert_matches_naive(LabelSmoothingLoss(epsilon, ignore_index=ignore_index), expected, z, y)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("ignore_index", [None, 1])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_confidence_penalty_matches_naive(beta, ignore_index, shape):
    z, y = random_inputs(shape, seed=5, ignored=ignore_index)
    loss_fn = ConfidencePenaltyLoss(beta, ignore_index=ignore_index)
    assert_matches_naive(loss_fn, lambda leaf, labels: naive_confidence_penalty(leaf, labels, beta, ignore_index),
                         z, y)
    parts = loss_fn.parts(z, y)
    logits, labels = voxel_rows(z, y, ignore_index)
    torch.testing.assert_close(parts.terms["ce"], F.cross_entropy(logits, labels))
    torch.testing.assert_close(parts.terms["ce"] + parts.terms["confidence_penalty"], parts.total)


# --- 4d-4e. SVLS and NACL ---------------------------------------------------------------------------------------------

def test_svls_kernel_is_the_released_kernel():
    kernel = svls_reference_kernel(3, 1.0)
    assert kernel[1, 1, 1] == pytest.approx(1.0)
    assert kernel.sum() == pytest.approx(2.0)
    # the released 3D Gaussian before the centre change: exp(-|x - 1|^2 / 2) / sum; ratio corner / face = e^-1
    assert float(kernel[0, 0, 0] / kernel[0, 1, 1]) == pytest.approx(math.exp(-1.0))


@pytest.mark.parametrize("sigma", [1.0, 0.5, 2.0])
def test_svls_equals_released_code(sigma):
    z, y = random_inputs((2, 4, 5, 6, 7), seed=6)
    torch.testing.assert_close(SVLSLoss(sigma)(z, y), released_svls_3d(z, y, sigma), rtol=1e-6, atol=0)


@pytest.mark.parametrize("sigma", [1.0, 0.6])
@pytest.mark.parametrize("ignore_index", [None, 2])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_svls_matches_naive(sigma, ignore_index, shape):
    z, y = random_inputs(shape, seed=7, ignored=ignore_index)
    assert_matches_naive(SVLSLoss(sigma, ignore_index=ignore_index),
                         lambda leaf, labels: naive_svls(leaf, labels, sigma, ignore_index), z, y)


NACL_SETTINGS = [
    dict(),
    dict(distance_type="l2"),
    dict(kernel_ops="gaussian"),
    dict(kernel_ops="gaussian", sigma=0.7, distance_type="l2", alpha=0.3),
    dict(kernel_size=5, alpha=0.5),
    dict(kernel_size=1),
]


@pytest.mark.parametrize("settings", NACL_SETTINGS,
                         ids=lambda settings: "-".join(f"{k}={v}" for k, v in settings.items()) or "default")
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_nacl_equals_monai(settings, shape):
    from monai.losses import NACLLoss as MonaiNACLLoss

    z, y = random_inputs(shape, dtype=torch.float32, seed=3)
    ours = NACLLoss(alpha=settings.get("alpha", 0.1), kernel_size=settings.get("kernel_size", 3),
                    kernel=settings.get("kernel_ops", "mean"), sigma=settings.get("sigma", 1.0),
                    distance=settings.get("distance_type", "l1"))
    monai = MonaiNACLLoss(classes=shape[1], dim=len(shape) - 2, **settings)
    leaf, monai_leaf = z.clone().requires_grad_(), z.clone().requires_grad_()
    value, expected = ours(leaf, y), monai(monai_leaf, y[:, 0])
    torch.testing.assert_close(value, expected, rtol=2e-6, atol=1e-6)
    value.backward()
    expected.backward()
    torch.testing.assert_close(leaf.grad, monai_leaf.grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("settings", [dict(), dict(kernel="gaussian", distance="l2", alpha=0.4),
                                      dict(kernel_size=5, alpha=1.0)], ids=["mean", "gaussian-l2", "mean5"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_nacl_with_ignored_voxels_matches_naive(settings, shape):
    from monai.networks.layers.convutils import gaussian_1d

    ignore_index = 1
    z, y = random_inputs(shape, seed=8, ignored=ignore_index)
    loss_fn = NACLLoss(**settings, ignore_index=ignore_index)
    if loss_fn.kernel == "gaussian":
        taps = gaussian_1d(torch.tensor(loss_fn.sigma), truncated=4.0, approx="erf").double()
    else:
        taps = torch.full((loss_fn.kernel_size,), 1.0 / loss_fn.kernel_size, dtype=torch.float64)
    naive = lambda leaf, labels: naive_nacl(leaf, labels, loss_fn.alpha, taps, loss_fn.distance,  # noqa: E731
                                            ignore_index)
    assert_matches_naive(loss_fn, naive, z, y, rtol=1e-6, atol=1e-9)  # the Gaussian taps: float32 in MONAI
    parts = loss_fn.parts(z, y)
    logits, labels = voxel_rows(z, y, ignore_index)
    torch.testing.assert_close(parts.terms["ce"], F.cross_entropy(logits, labels))
    torch.testing.assert_close(parts.terms["ce"] + parts.terms["neighbour_penalty"], parts.total)


def test_ignored_neighbours_are_no_class_for_the_soft_targets():
    """All counted voxels are class 1: with ignored voxels (labelled 0 underneath) around, SVLS stays plain CE with
    class 1 (its soft targets are one-hot), and NACL's tau stays one-hot away from the image border."""
    z, _ = random_inputs((1, 3, 6, 7, 8), seed=9)
    y = torch.ones((1, 1, 6, 7, 8), dtype=torch.long)
    y[:, :, 2:4, 3:5, 2:6] = 9
    ignore = y == 9
    expected_ce = F.cross_entropy(z, y[:, 0], ignore_index=9)
    torch.testing.assert_close(SVLSLoss(ignore_index=9)(z, y), expected_ce)

    interior = torch.zeros_like(ignore)
    interior[:, :, 1:-1, 1:-1, 1:-1] = True
    interior &= ~ignore
    leaf = z.clone().requires_grad_()
    NACLLoss(alpha=1.0, ignore_index=9)(leaf, y).backward()
    tau_one_hot = F.one_hot(y[:, 0].clamp(max=2), 3).movedim(-1, 1).double()
    # the penalty's gradient is -alpha sign(tau - z) / (M K) + the CE's gradient
    ce_leaf = z.clone().requires_grad_()
    F.cross_entropy(ce_leaf, y[:, 0], ignore_index=9).backward()
    count = (~ignore).sum() * 3
    expected = ce_leaf.grad - torch.sign(tau_one_hot - z) / count
    torch.testing.assert_close(leaf.grad.movedim(1, -1)[interior[:, 0]], expected.movedim(1, -1)[interior[:, 0]])


# --- 4f. mL1-ACE ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("num_bins", [20, 7])
@pytest.mark.parametrize("ignore_index", [None, 2])
@pytest.mark.parametrize("shape", [(2, 4, 5, 6, 3), (2, 3, 8, 9)], ids=SHAPE_IDS)
def test_ace_matches_naive(soft, num_bins, ignore_index, shape):
    z, y = random_inputs(shape, seed=10, scale=2.0, absent_class=1, ignored=ignore_index)
    loss_fn = SoftL1ACELoss(num_bins, ignore_index=ignore_index) if soft else HardL1ACELoss(num_bins,
                                                                                          ignore_index=ignore_index)
    assert_matches_naive(loss_fn, lambda leaf, labels: naive_ace(leaf, labels, num_bins, soft,
                                                                 ignore_index=ignore_index), z, y)


def test_soft_ace_empty_weight_threshold():
    z, y = random_inputs((1, 3, 4, 5, 6), seed=11, scale=4.0)
    for empty_weight in (0.01, 0.5, 3.0):
        value = SoftL1ACELoss(empty_weight=empty_weight)(z, y)
        torch.testing.assert_close(value, naive_ace(z, y, soft=True, empty_weight=empty_weight))
    assert SoftL1ACELoss(empty_weight=3.0)(z, y) != SoftL1ACELoss()(z, y)


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_ace_bins_follow_torch_bucketize_at_the_edges(soft):
    """Probabilities on and next to the bin edges (soft: the bin centres) land where the released code's
    torch.bucketize(p, thresholds, right=False) puts them: (l, r], p = 0 in the first bin."""
    num_bins = 20
    edges = torch.linspace(0, 1 + FLOAT32_EPS, num_bins + 1, dtype=torch.float32)
    thresholds = torch.linspace(0, 1 + FLOAT32_EPS, 2 * num_bins + 1)[1::2] if soft else edges[1:]
    gaps = torch.log(thresholds[:-1].double() / (1 - thresholds[:-1].double())).float()
    gaps = torch.cat([gaps + step * 1e-7 for step in range(-3, 4)])  # two classes: p_1 = sigmoid(gap)
    z = torch.stack([torch.zeros_like(gaps), gaps]).reshape(1, 2, -1, 1)
    y = (torch.arange(gaps.numel()) % 2).reshape(1, 1, -1, 1)
    assert torch.isin(torch.softmax(z, 1), thresholds).sum() >= 10  # many probabilities sit exactly on an edge
    value, gradient = value_and_gradient(SoftL1ACELoss(num_bins) if soft else HardL1ACELoss(num_bins), z, y)
    expected_value, expected_gradient = value_and_gradient(lambda leaf, labels: naive_ace(leaf, labels, num_bins, soft),
                                                           z, y)
    torch.testing.assert_close(value, expected_value, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gradient, expected_gradient, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("num_bins", [1, 2, 7, 20, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ace_bin_index_is_torch_bucketize(num_bins, dtype):
    from nnunet_margin.losses.ace import _CountBelow, bin_edges

    for thresholds in (bin_edges(num_bins)[1:], bin_edges(2 * num_bins)[1::2]):
        table = torch.tensor(thresholds)
        p = torch.cat([torch.rand(20000, generator=torch.Generator().manual_seed(num_bins)), table,
                       table.nextafter(torch.tensor(2.0)), table.nextafter(torch.tensor(-1.0)),
                       torch.tensor([0.0, 1.0])]).clamp(0, 1).to(dtype)
        index = _CountBelow(thresholds, dtype, torch.device("cpu"))(p)
        assert torch.equal(index, torch.bucketize(p, table.to(dtype), right=False))


def test_ace_class_without_ground_truth_counts_as_zero():
    z, y = random_inputs((2, 3, 4, 4, 4), seed=12, scale=2.0)
    y[0][y[0] == 2] = 0
    hard = HardL1ACELoss()
    value = hard(z, y)
    per_image = [HardL1ACELoss()(z[b:b + 1], y[b:b + 1]) for b in range(2)]
    # image 0 has a zero for class 2 in its mean over 3 classes; the batch mean is the mean of the images
    torch.testing.assert_close(value, sum(per_image) / 2)
    torch.testing.assert_close(per_image[0], naive_ace(z[:1], y[:1]))


# --- 4g. CALS ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ignore_index", [None, 3])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_cals_matches_naive_penalty(ignore_index, shape):
    z, y = random_inputs(shape, seed=13, scale=8.0, ignored=ignore_index)
    num_classes = shape[1]
    loss_fn = CALSLoss(num_classes, margin=3.0, ignore_index=ignore_index)
    generator = torch.Generator().manual_seed(0)
    loss_fn.lambdas.copy_(torch.rand(num_classes, generator=generator, dtype=torch.float64) * 2)
    loss_fn.rhos.copy_(1 + torch.rand(num_classes, generator=generator, dtype=torch.float64) * 3)
    naive = lambda leaf, labels: naive_cals(leaf, labels, loss_fn.lambdas, loss_fn.rhos, 3.0,  # noqa: E731
                                            ignore_index)
    assert_matches_naive(loss_fn, naive, z, y)
    parts = loss_fn.parts(z, y)
    logits, labels = voxel_rows(z, y, ignore_index)
    torch.testing.assert_close(parts.terms["ce"], F.cross_entropy(logits, labels))
    torch.testing.assert_close(parts.terms["ce"] + parts.terms["penalty"], parts.total)


def epoch_batches(epoch, num_classes=4):
    """Validation batches of one epoch: class 1's logits rise and class 2's fall over the epochs, so their
    constraints move in opposite directions; two batches of different sizes."""
    batches = []
    for index, spatial in enumerate([(4, 5, 3), (3, 3, 2)]):
        z, y = random_inputs((2, num_classes, *spatial), seed=100 * epoch + index, scale=2.0)
        z[:, 1] += 0.3 * epoch
        z[:, 2] -= 0.3 * epoch
        batches.append((z, y))
    return batches


@pytest.mark.parametrize("ignore_index", [None, 0])
def test_cals_multiplier_updates_match_naive_over_epochs(ignore_index):
    loss_fn = CALSLoss(4, margin=2.0, ignore_index=ignore_index)
    naive = NaiveCALSMultipliers(4, margin=2.0)
    rho_history = []
    for epoch in range(31):
        batches = epoch_batches(epoch)
        if ignore_index is not None:
            batches = [(z, with_ignored_block(y, ignore_index)) for z, y in batches]
        for z, y in batches:
            loss_fn.observe_validation(z, y)
        line = loss_fn.finish_validation()
        naive.finish_epoch(batches, ignore_index)
        torch.testing.assert_close(loss_fn.lambdas, naive.lambdas, rtol=1e-12, atol=0)
        torch.testing.assert_close(loss_fn.rhos, naive.rhos, rtol=1e-12, atol=0)
        torch.testing.assert_close(loss_fn.previous_constraint, naive.previous, rtol=1e-12, atol=0)
        assert f"lambda mean {naive.lambdas.mean().item():.4g} max {naive.lambdas.max().item():.4g}" in line
        assert f"rho mean {naive.rhos.mean().item():.4g}" in line
        rho_history.append(loss_fn.rhos.clone())
    assert int(loss_fn.validations) == 31
    # rho moves only after the 10th, 20th and 30th validation, and not for every class
    changes = [epoch for epoch in range(1, 31) if not torch.equal(rho_history[epoch], rho_history[epoch - 1])]
    assert changes and set(changes) <= {9, 19, 29}
    assert len(set(rho_history[-1].tolist())) > 1


def test_cals_uses_the_multipliers_of_the_last_validation_and_keeps_them_in_the_state_dict():
    z, y = random_inputs((2, 4, 4, 4, 4), seed=14, scale=6.0)
    loss_fn = CALSLoss(4, margin=2.0)
    before = loss_fn(z, y)
    torch.testing.assert_close(before, naive_cals(z, y, torch.full((4,), 1e-6, dtype=torch.float64),
                                                  torch.ones(4, dtype=torch.float64), 2.0))
    loss_fn.observe_validation(z, y)
    loss_fn.finish_validation()
    assert torch.all(loss_fn.lambdas > 1e-6)
    torch.testing.assert_close(loss_fn(z, y), naive_cals(z, y, loss_fn.lambdas, loss_fn.rhos, 2.0))

    state = loss_fn.state_dict()
    assert set(state) == {"lambdas", "rhos", "validations", "previous_constraint"}
    restored = CALSLoss(4, margin=2.0)
    restored.load_state_dict(state)
    torch.testing.assert_close(restored(z, y), loss_fn(z, y))
    assert int(restored.validations) == 1


def test_cals_without_observations_leaves_the_multipliers():
    loss_fn = CALSLoss(3)
    line = loss_fn.finish_validation()
    assert torch.all(loss_fn.lambdas == 1e-6) and torch.all(loss_fn.rhos == 1.0)
    assert "lambda mean 1e-06" in line


def _cals_rank(rank, world_size, store_path, results_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size)
    loss_fn = CALSLoss(4, margin=2.0)
    for z, y in epoch_batches(3)[rank::world_size]:
        loss_fn.observe_validation(z, y)
    loss_fn.finish_validation()
    torch.save(loss_fn.state_dict(), f"{results_path}.{rank}")
    dist.destroy_process_group()


def test_cals_update_pools_the_statistics_of_all_ranks(tmp_path):
    """Two gloo ranks see one validation batch each (of different sizes): both get the pooled means
    (docs/methods.md 4g, "Differs from the released code")."""
    import torch.multiprocessing as mp

    mp.spawn(_cals_rank, args=(2, str(tmp_path / "store"), str(tmp_path / "state")), nprocs=2)
    naive = NaiveCALSMultipliers(4, margin=2.0)
    naive.finish_epoch(epoch_batches(3))
    for rank in range(2):
        state = torch.load(tmp_path / f"state.{rank}")
        torch.testing.assert_close(state["lambdas"], naive.lambdas, rtol=1e-12, atol=0)
        torch.testing.assert_close(state["previous_constraint"], naive.previous, rtol=1e-12, atol=0)
    # the released code's mean of the ranks' means differs here: the two ranks count different numbers of voxels
    per_rank = [NaiveCALSMultipliers(4, margin=2.0) for _ in range(2)]
    for rank, multipliers in enumerate(per_rank):
        multipliers.finish_epoch(epoch_batches(3)[rank::2])
    mean_of_means = (per_rank[0].previous + per_rank[1].previous) / 2
    assert not torch.allclose(mean_of_means, naive.previous, rtol=1e-3, atol=0)


def test_cals_channel_count_must_match():
    z, y = random_inputs((1, 5, 2, 2, 2))
    with pytest.raises(ValueError, match="5 channels but CALSLoss was built for 4 classes"):
        CALSLoss(4)(z, y)
    with pytest.raises(ValueError, match="5 channels"):
        CALSLoss(4).observe_validation(z, y)


# --- constructor checks -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make, message", [
    (lambda: FocalLoss(gamma=-1), "gamma must be >= 0"),
    (lambda: FocalLoss(gamma=float("nan")), "gamma must be a finite number"),
    (lambda: FocalLoss(ignore_index=1.5), "ignore_index must be an int"),
    (lambda: LabelSmoothingLoss(epsilon=1.5), r"epsilon must be in \[0, 1\]"),
    (lambda: LabelSmoothingLoss(epsilon=float("inf")), "epsilon must be a finite number"),
    (lambda: ConfidencePenaltyLoss(beta=-0.1), "beta must be >= 0"),
    (lambda: ConfidencePenaltyLoss(beta="0.1"), "beta must be a finite number"),
    (lambda: SVLSLoss(sigma=0), "sigma must be > 0"),
    (lambda: SVLSLoss(sigma=float("nan")), "sigma must be a finite number"),
    (lambda: NACLLoss(alpha=-1), "alpha must be >= 0"),
    (lambda: NACLLoss(kernel_size=4), "kernel_size must be an odd positive int"),
    (lambda: NACLLoss(kernel_size=3.0), "kernel_size must be an odd positive int"),
    (lambda: NACLLoss(kernel="box"), "kernel must be one of"),
    (lambda: NACLLoss(sigma=-1), "sigma must be > 0"),
    (lambda: NACLLoss(distance="l3"), "distance must be one of"),
    (lambda: HardL1ACELoss(num_bins=0), "num_bins must be a positive int"),
    (lambda: HardL1ACELoss(num_bins=True), "num_bins must be a positive int"),
    (lambda: SoftL1ACELoss(empty_weight=0), "empty_weight must be > 0"),
    (lambda: SoftL1ACELoss(empty_weight=float("nan")), "empty_weight must be a finite number"),
    (lambda: CALSLoss(1), "num_classes must be an int >= 2"),
    (lambda: CALSLoss(4, margin=0), "margin must be > 0"),
    (lambda: CALSLoss(4, lambda_min=0), "0 < lambda_min <= lambda_max"),
    (lambda: CALSLoss(4, lambda_min=2, lambda_max=1), "0 < lambda_min <= lambda_max"),
    (lambda: CALSLoss(4, rho_min=5, rho_max=2), "0 < rho_min <= rho_max"),
    (lambda: CALSLoss(4, rho_step=0), "rho_step must be a positive int"),
    (lambda: CALSLoss(4, rho_growth=0.5), "rho_growth must be >= 1"),
    (lambda: CALSLoss(4, rho_tolerance=-1), "rho_tolerance must be >= 0"),
    (lambda: CALSLoss(4, margin=float("inf")), "margin must be a finite number"),
])
def test_constructor_checks(make, message):
    with pytest.raises(ValueError, match=message):
        make()
