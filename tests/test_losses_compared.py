"""The compared methods' losses (docs/methods.md section 4) against MONAI 1.6.1, torch's own label smoothing and
straightforward implementations written here from docs/methods.md (loops, convolutions, autograd)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from nnunet_margin.losses import (CALSLoss, ConfidencePenaltyLoss, FocalLoss, HardL1ACELoss, LabelSmoothingLoss,
                                  NACLLoss, SoftL1ACELoss, SVLSLoss)
from nnunet_margin.losses import _inputs as inputs_module

from loss_checks import assert_gradient_matches_finite_differences, random_inputs

FLOAT32_EPS = torch.finfo(torch.float32).eps
SHAPES = [(2, 4, 5, 6, 7), (3, 5, 9, 8)]  # 3D and 2D
SHAPE_IDS = ["3d", "2d"]



def with_ignored_block(y, ignore_index):
    """Ignore a block of voxels in the first image (and a few scattered voxels everywhere)."""
    y = y.clone()
    y[0, :, :2, 1:3] = ignore_index
    y.view(-1)[::7] = ignore_index
    return y


def kept(y, ignore_index):
    labels = y[:, 0]
    return torch.ones_like(labels, dtype=torch.bool) if ignore_index is None else labels != ignore_index


def voxel_rows(z, y, ignore_index=None):
    """(voxels, K) logits and (voxels,) labels of the voxels that count."""
    keep = kept(y, ignore_index)
    return z.movedim(1, -1)[keep], y[:, 0][keep]


# --- straightforward references from docs/methods.md ------------------------------------------------------------------

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


def value_and_gradient(function, z, *args):
    leaf = z.clone().requires_grad_()
    value = function(leaf, *args)
    value.backward()
    return value.detach(), leaf.grad


def assert_matches_naive(loss_fn, naive, z, y, rtol=1e-9, atol=1e-12):
    value, gradient = value_and_gradient(loss_fn, z, y)
    expected_value, expected_gradient = value_and_gradient(naive, z, y)
    torch.testing.assert_close(value, expected_value, rtol=rtol, atol=atol)
    torch.testing.assert_close(gradient, expected_gradient, rtol=rtol, atol=atol)


# --- reference libraries ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 3.0])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_focal_equals_monai_times_classes(gamma, shape):
    from monai.losses import FocalLoss as MonaiFocalLoss

    z, y = random_inputs(shape, dtype=torch.float32, seed=1)
    ours = FocalLoss(gamma=gamma)(z, y)
    monai = MonaiFocalLoss(use_softmax=True, to_onehot_y=True, gamma=gamma)(z, y)
    torch.testing.assert_close(ours, monai * shape[1], rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("epsilon", [0.0, 0.1, 0.2, 0.3, 1.0])
@pytest.mark.parametrize("ignore_index", [None, 2])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_label_smoothing_equals_torch_cross_entropy(epsilon, ignore_index, shape):
    z, y = random_inputs(shape, seed=2)
    if ignore_index is not None:
        y = with_ignored_block(y, ignore_index)
    expected = lambda leaf, labels: F.cross_entropy(leaf, labels[:, 0], label_smoothing=epsilon,  # noqa: E731
                                                    ignore_index=-100 if ignore_index is None else ignore_index)
    assert_matches_naive(LabelSmoothingLoss(epsilon, ignore_index=ignore_index), expected, z, y)


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


# --- straightforward implementations ----------------------------------------------------------------------------------

@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("ignore_index", [None, 1])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_focal_matches_naive(gamma, ignore_index, shape):
    z, y = random_inputs(shape, seed=4, scale=5.0)
    if ignore_index is not None:
        y = with_ignored_block(y, ignore_index)
    assert_matches_naive(FocalLoss(gamma, ignore_index=ignore_index),
                         lambda leaf, labels: naive_focal(leaf, labels, gamma, ignore_index), z, y)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("ignore_index", [None, 1])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_confidence_penalty_matches_naive(beta, ignore_index, shape):
    z, y = random_inputs(shape, seed=5)
    if ignore_index is not None:
        y = with_ignored_block(y, ignore_index)
    loss_fn = ConfidencePenaltyLoss(beta, ignore_index=ignore_index)
    assert_matches_naive(loss_fn, lambda leaf, labels: naive_confidence_penalty(leaf, labels, beta, ignore_index),
                         z, y)
    parts = loss_fn.parts(z, y)
    logits, labels = voxel_rows(z, y, ignore_index)
    torch.testing.assert_close(parts.terms["ce"], F.cross_entropy(logits, labels))
    torch.testing.assert_close(parts.terms["ce"] + parts.terms["confidence_penalty"], parts.total)


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
    z, y = random_inputs(shape, seed=7)
    if ignore_index is not None:
        y = with_ignored_block(y, ignore_index)
    assert_matches_naive(SVLSLoss(sigma, ignore_index=ignore_index),
                         lambda leaf, labels: naive_svls(leaf, labels, sigma, ignore_index), z, y)


@pytest.mark.parametrize("settings", [dict(), dict(kernel="gaussian", distance="l2", alpha=0.4),
                                      dict(kernel_size=5, alpha=1.0)], ids=["mean", "gaussian-l2", "mean5"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_nacl_with_ignored_voxels_matches_naive(settings, shape):
    from monai.networks.layers.convutils import gaussian_1d

    z, y = random_inputs(shape, seed=8)
    ignore_index = 1
    y = with_ignored_block(y, ignore_index)
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


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("num_bins", [20, 7])
@pytest.mark.parametrize("ignore_index", [None, 2])
@pytest.mark.parametrize("shape", [(2, 4, 5, 6, 3), (2, 3, 8, 9)], ids=SHAPE_IDS)
def test_ace_matches_naive(soft, num_bins, ignore_index, shape):
    z, y = random_inputs(shape, seed=10, scale=2.0, absent_class=1)
    if ignore_index is not None:
        y = with_ignored_block(y, ignore_index)
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


@pytest.mark.parametrize("ignore_index", [None, 3])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_cals_matches_naive_penalty(ignore_index, shape):
    z, y = random_inputs(shape, seed=13, scale=8.0)
    if ignore_index is not None:
        y = with_ignored_block(y, ignore_index)
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
    """Two gloo ranks see one validation batch each (of different sizes): both get the pooled means."""
    import torch.multiprocessing as mp

    mp.spawn(_cals_rank, args=(2, str(tmp_path / "store"), str(tmp_path / "state")), nprocs=2)
    naive = NaiveCALSMultipliers(4, margin=2.0)
    naive.finish_epoch(epoch_batches(3))
    for rank in range(2):
        state = torch.load(tmp_path / f"state.{rank}")
        torch.testing.assert_close(state["lambdas"], naive.lambdas, rtol=1e-12, atol=0)
        torch.testing.assert_close(state["previous_constraint"], naive.previous, rtol=1e-12, atol=0)


# --- gradients, dtypes, ignore index, edge cases ----------------------------------------------------------------------

ALL_LOSSES = {
    "focal": lambda ignore: FocalLoss(2.0, ignore_index=ignore),
    "label_smoothing": lambda ignore: LabelSmoothingLoss(0.2, ignore_index=ignore),
    "confidence_penalty": lambda ignore: ConfidencePenaltyLoss(0.3, ignore_index=ignore),
    "svls": lambda ignore: SVLSLoss(ignore_index=ignore),
    "nacl": lambda ignore: NACLLoss(alpha=0.5, ignore_index=ignore),
    "nacl_gaussian_l2": lambda ignore: NACLLoss(alpha=0.5, kernel="gaussian", distance="l2", ignore_index=ignore),
    "hard_ace": lambda ignore: HardL1ACELoss(ignore_index=ignore),
    "soft_ace": lambda ignore: SoftL1ACELoss(ignore_index=ignore),
    "cals": lambda ignore: CALSLoss(4, margin=2.0, ignore_index=ignore),
}
SMOOTH_LOSSES = ["focal", "label_smoothing", "confidence_penalty", "svls", "nacl_gaussian_l2", "soft_ace", "cals"]


@pytest.mark.parametrize("name", SMOOTH_LOSSES)
@pytest.mark.parametrize("ignore_index", [None, 3])
def test_gradient_matches_finite_differences(name, ignore_index):
    z, y = random_inputs((2, 4, 3, 4, 5), seed=15)
    if ignore_index is not None:
        y = with_ignored_block(y, ignore_index)
    loss_fn = ALL_LOSSES[name](ignore_index)
    assert_gradient_matches_finite_differences(loss_fn, z, y, seed=16, directions=3, rel=1e-5)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_float16_bfloat16_float32_float64_inputs_agree(name):
    z, y = random_inputs((2, 4, 6, 6, 6), dtype=torch.float32, seed=17)
    z = z.bfloat16().float()  # values representable in every dtype
    loss_fn = ALL_LOSSES[name](None)
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
    assert values[torch.float32] == pytest.approx(values[torch.float64], rel=1e-5)
    torch.testing.assert_close(gradients[torch.float32], gradients[torch.float64], rtol=1e-3, atol=1e-7)
    torch.testing.assert_close(gradients[torch.float16], gradients[torch.float64], rtol=1e-2, atol=1e-5)
    torch.testing.assert_close(gradients[torch.bfloat16], gradients[torch.float64], rtol=2e-2, atol=1e-4)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_ignored_voxels_get_no_loss_and_no_gradient(name):
    z, y = random_inputs((2, 4, 5, 5, 4), seed=18)
    ignore_index = 255
    y = with_ignored_block(y, ignore_index)
    ignored = (y == ignore_index).expand_as(z)
    loss_fn = ALL_LOSSES[name](ignore_index)
    leaf = z.clone().requires_grad_()
    loss = loss_fn(leaf, y)
    loss.backward()
    assert torch.all(leaf.grad[ignored] == 0) and torch.any(leaf.grad[~ignored] != 0)
    changed = torch.where(ignored, z * 5 - 3, z)  # the ignored voxels' logits do not matter
    torch.testing.assert_close(loss_fn(changed, y), loss, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", ["focal", "label_smoothing", "confidence_penalty", "hard_ace", "soft_ace", "cals"])
def test_ignored_slab_equals_the_loss_without_it(name):
    """Per-voxel (and per-image binned) losses: ignoring a slab is the same as cutting it off."""
    z, y = random_inputs((2, 4, 6, 5, 4), seed=19)
    ignored = y.clone()
    ignored[:, :, :2] = 7
    value = ALL_LOSSES[name](7)(z, ignored)
    torch.testing.assert_close(value, ALL_LOSSES[name](None)(z[:, :, 2:], y[:, :, 2:]), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_all_voxels_ignored_gives_zero_loss_and_zero_gradient(name):
    z, y = random_inputs((1, 4, 3, 3, 3), seed=20)
    leaf = z.clone().requires_grad_()
    loss = ALL_LOSSES[name](9)(leaf, torch.full_like(y, 9))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(leaf.grad == 0)


@pytest.mark.parametrize("name", ALL_LOSSES)
@pytest.mark.parametrize("target_dtype", [torch.uint8, torch.int16, torch.int32, torch.float32])
def test_target_layout_and_dtype_do_not_matter(name, target_dtype):
    z, y = random_inputs((2, 4, 4, 5, 3), seed=21)
    loss_fn = ALL_LOSSES[name](None)
    expected = loss_fn(z, y)
    torch.testing.assert_close(loss_fn(z, y.to(target_dtype)), expected, rtol=0, atol=0)
    torch.testing.assert_close(loss_fn(z, y[:, 0].to(target_dtype)), expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["confidence_penalty", "svls", "nacl", "nacl_gaussian_l2", "hard_ace", "soft_ace",
                                  "cals"])
def test_chunked_passes_give_the_result_of_one_pass(name, monkeypatch):
    z, y = random_inputs((1, 4, 12, 11, 10), seed=22)
    y = with_ignored_block(y, 5)
    results = []
    for budget in (1 << 30, 4096):  # one chunk, then chunks of 128 voxels
        monkeypatch.setitem(inputs_module.CHUNK_BYTES, "cpu", budget)
        results.append(value_and_gradient(ALL_LOSSES[name](5), z, y))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-10, atol=1e-15)


def test_second_backward_is_refused_clearly():
    z, y = random_inputs((1, 4, 3, 3, 3))
    for name, make in ALL_LOSSES.items():
        leaf = z.clone().requires_grad_()
        loss = make(None)(leaf, y)
        loss.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="single backward"):
            loss.backward()


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


def test_cals_channel_count_must_match():
    z, y = random_inputs((1, 5, 2, 2, 2))
    with pytest.raises(ValueError, match="5 channels but CALSLoss was built for 4 classes"):
        CALSLoss(4)(z, y)
    with pytest.raises(ValueError, match="5 channels"):
        CALSLoss(4).observe_validation(z, y)


def test_bad_labels_are_clear_errors():
    z, y = random_inputs((1, 4, 3, 3, 3))
    for make in ALL_LOSSES.values():
        with pytest.raises(RuntimeError, match=r"target holds a label outside \[0, 4\)"):
            make(None)(z, torch.full_like(y, 4))


# --- no host synchronisation ------------------------------------------------------------------------------------------

class FailOnHostSync(TorchDispatchMode):
    """Fails on the operators that read tensor values on the host or need a data-dependent output shape."""

    FORBIDDEN = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
                 torch.ops.aten.masked_select.default, torch.ops.aten.equal.default,
                 torch.ops.aten.is_nonzero.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.FORBIDDEN:
            raise AssertionError(f"host synchronisation: {func}")
        if func is torch.ops.aten.index.Tensor and any(
                index is not None and index.dtype == torch.bool for index in args[1]):
            raise AssertionError("boolean-mask indexing")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("operation", [
    lambda t: t.sum().item(), lambda t: t.nonzero(), lambda t: t[t > 0], lambda t: bool(t.sum() > 0),
    lambda t: torch.equal(t, t), lambda t: t.masked_select(t > 0), lambda t: float(t.sum()),
], ids=["item", "nonzero", "mask-index", "bool", "equal", "masked_select", "float"])
def test_the_host_sync_detector_detects(operation):
    with pytest.raises(AssertionError, match="host synchronisation|boolean-mask"):
        with FailOnHostSync():
            operation(torch.randn(3, 4))


@pytest.mark.parametrize("name", ALL_LOSSES)
@pytest.mark.parametrize("ignore_index", [None, 2])
def test_forward_and_backward_need_no_host_synchronisation(name, ignore_index):
    z, y = random_inputs((2, 4, 5, 4, 3), dtype=torch.float32, seed=23)
    if ignore_index is not None:
        y = with_ignored_block(y, ignore_index)
    loss_fn = ALL_LOSSES[name](ignore_index)
    loss_fn.check_inputs = False  # the asynchronous asserts are allowed, but read values on the CPU
    leaf = z.clone().requires_grad_()
    with FailOnHostSync():
        parts = loss_fn.parts(leaf, y)
        parts.total.backward()
        if isinstance(loss_fn, CALSLoss):
            loss_fn.observe_validation(z, y)
    assert torch.isfinite(leaf.grad).all()


def test_all_losses_are_exported_and_listed():
    import nnunet_margin.losses as losses

    for name in ("FocalLoss", "LabelSmoothingLoss", "ConfidencePenaltyLoss", "SVLSLoss", "NACLLoss",
                 "HardL1ACELoss", "SoftL1ACELoss", "CALSLoss"):
        assert name in losses.__all__ and isinstance(getattr(losses, name)(*([4] if name == "CALSLoss" else [])),
                                                     losses.SegmentationLoss)


def test_every_loss_supports_one_to_three_spatial_axes():
    for shape in [(2, 4, 7), (2, 4, 5, 6), (2, 4, 3, 4, 5)]:
        z, y = random_inputs(shape, seed=24)
        for name, make in ALL_LOSSES.items():
            value, gradient = value_and_gradient(make(None), z, y)
            assert torch.isfinite(value) and torch.isfinite(gradient).all(), (name, shape)
