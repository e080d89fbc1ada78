"""Post-hoc affine calibrators (docs/methods.md section 6) and the logit sample they are fitted on: derivatives
against autograd, recovery of known maps, agreement with Fiducio 0.2.0, folding into the last layer, serialisation,
refusal of matrix scaling, uniformity, mergeability and persistence of the sample. Temperature scaling on stored
probabilities: tests/test_temperature.py."""

from __future__ import annotations

import json

import fiducio
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nnunet_margin.calibration import (
    AffineCalibration,
    LogitSample,
    check_matrix_scaling,
    evaluate_affine_calibrations,
    fit_affine_calibration,
    fold_affine_calibration,
)
from nnunet_margin.calibration.affine import PARAMETRISATIONS
from nnunet_margin.calibration.affine.solver import nll_sums

K = 4
TRUE_SCALES = torch.tensor([1.6, 0.7, 1.2, 0.9], dtype=torch.float64)
TRUE_BIASES = torch.tensor([0.5, -0.3, 0.0, 0.8], dtype=torch.float64)
TRUE_MATRIX = torch.tensor([[1.5, 0.3, -0.2, 0.1], [0.2, 0.8, 0.1, 0.0], [-0.3, 0.1, 1.1, 0.2], [0.0, 0.2, 0.3, 0.9]],
                           dtype=torch.float64)


def stratified_logits(weight: torch.Tensor, bias: torch.Tensor, groups: int = 1000, copies: int = 1000,
                      seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Observed logits z (K, copies * groups) and labels drawn from softmax(weight z + bias).

    `groups` random "true" logit vectors t are distorted into z = weight^-1 (t - bias), so the calibration that
    undoes the distortion is (weight, bias). Each is repeated `copies` times with labels at the quantiles
    (j + 0.5) / copies of softmax(t) (stratified sampling): label frequencies match the distribution up to 1 / copies,
    and the maximum-likelihood map is the true one far closer than the 1e-3 tested.
    """
    generator = torch.Generator().manual_seed(seed)
    true = torch.randn(len(bias), groups, generator=generator, dtype=torch.float64) * 2
    observed = torch.linalg.solve(weight, true - bias[:, None])
    cumulative = torch.softmax(true, dim=0).cumsum(dim=0)
    quantiles = (torch.arange(copies, dtype=torch.float64) + 0.5) / copies
    labels = (quantiles[None, :, None] > cumulative[:, None, :]).sum(dim=0).clamp_max(len(bias) - 1)
    return observed[:, None, :].expand(-1, copies, -1).reshape(len(bias), -1), labels.reshape(-1)


def random_logits(num_voxels: int, num_classes: int = K, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Overconfident, biased logits (K, n) float32 and labels drawn i.i.d. from the distorted map's inverse."""
    generator = torch.Generator().manual_seed(seed)
    true = torch.randn(num_classes, num_voxels, generator=generator, dtype=torch.float64) * 2
    labels = torch.multinomial(torch.softmax(true, dim=0).T, 1, generator=generator)[:, 0]
    observed = 1.8 * true + torch.linspace(-1, 1, num_classes, dtype=torch.float64)[:, None]
    return observed.to(torch.float32), labels


def mean_nll(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Independent reference: mean cross-entropy of logits (K, n) in float64."""
    return float(F.cross_entropy(logits.double().T, labels))


# ------------------------------------------------------------------------------------------------- derivatives


@pytest.mark.parametrize("method", ["temperature", "vector", "matrix"])
def test_nll_gradient_and_hessian_match_autograd(method):
    logits, labels = random_logits(500)
    logits = logits.double()
    size = {"temperature": 1, "vector": 2 * K, "matrix": K * (K + 1)}[method]
    parameters = torch.randn(size, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.5

    def reference(theta):
        if method == "temperature":
            calibrated = theta[0] * logits
        elif method == "vector":
            calibrated = theta[:K, None] * logits + theta[K:, None]
        else:
            augmented = theta.reshape(K, K + 1)
            calibrated = augmented[:, :K] @ logits + augmented[:, K:]
        return F.cross_entropy(calibrated.T, labels, reduction="sum")

    nll, gradient, hessian = nll_sums(PARAMETRISATIONS[method](K), parameters, logits, labels, hessian=True)
    assert float(nll) == pytest.approx(float(reference(parameters)), rel=1e-12)
    torch.testing.assert_close(gradient, torch.autograd.functional.jacobian(reference, parameters), rtol=1e-10,
                               atol=1e-9)
    torch.testing.assert_close(hessian, torch.autograd.functional.hessian(reference, parameters), rtol=1e-10,
                               atol=1e-9)


# ------------------------------------------------------------------------------------------------- recovery


def test_vector_scaling_recovers_the_scales_and_biases_that_undo_a_distortion():
    logits, labels = stratified_logits(torch.diag(TRUE_SCALES), TRUE_BIASES)
    calibration = fit_affine_calibration(logits.to(torch.float32), labels, "vector")
    assert calibration.info["converged"]
    torch.testing.assert_close(torch.diagonal(calibration.weight), TRUE_SCALES, rtol=0, atol=1e-3)
    # Adding a constant to every logit does not change the softmax: the bias is identifiable up to its mean.
    torch.testing.assert_close(calibration.bias, TRUE_BIASES - TRUE_BIASES.mean(), rtol=0, atol=1e-3)
    assert torch.equal(calibration.weight, torch.diag(torch.diagonal(calibration.weight)))


def test_matrix_scaling_recovers_the_matrix_that_undoes_a_distortion():
    logits, labels = stratified_logits(TRUE_MATRIX, TRUE_BIASES)
    calibration = fit_affine_calibration(logits, labels, "matrix", odir=(0.0, 0.0))
    # softmax(W z + b) = softmax((W + 1 v^T) z + b + c 1): compare W and b with their column means removed.
    centring = torch.eye(K, dtype=torch.float64) - 1 / K
    torch.testing.assert_close(centring @ calibration.weight, centring @ TRUE_MATRIX, rtol=0, atol=1e-3)
    torch.testing.assert_close(calibration.bias, TRUE_BIASES - TRUE_BIASES.mean(), rtol=0, atol=1e-3)


@pytest.mark.parametrize("true_temperature", [1.7, 0.6])
def test_temperature_recovers_a_known_temperature(true_temperature):
    logits, labels = stratified_logits(torch.eye(K, dtype=torch.float64) / true_temperature, torch.zeros(K).double())
    calibration = fit_affine_calibration(logits, labels, "temperature")
    assert calibration.info["temperature"] == pytest.approx(true_temperature, abs=1e-3)
    torch.testing.assert_close(calibration.weight, torch.eye(K).double() / calibration.info["temperature"])
    assert not calibration.bias.any()


# ------------------------------------------------------------------------------------------------- Fiducio parity


def _fiducio_nll(calibrator, logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, torch.Tensor]:
    calibrator.fit(logits.T.contiguous(), labels)
    calibrated = calibrator.decision_function(logits.T.contiguous()).double().T
    return mean_nll(calibrated, labels), calibrated


@pytest.mark.parametrize("method, reference, optimizer", [
    ("temperature", fiducio.TemperatureScaling, "lbfgs"),
    *((method, reference, optimizer) for method, reference in (("vector", fiducio.VectorScaling),
                                                                ("matrix", fiducio.MatrixScaling))
      for optimizer in ("adam", "lbfgs")),
])
def test_reaches_fiducio_nll(method, reference, optimizer):
    logits, labels = random_logits(40_000, seed=4)
    theirs, _ = _fiducio_nll(reference(optimizer=optimizer, device="cpu"), logits, labels)
    options = {"odir": (0.0, 0.0)} if method == "matrix" else {}
    calibration = fit_affine_calibration(logits, labels, method, **options)
    ours = mean_nll(calibration.apply(logits.double()), labels)
    assert ours <= theirs * (1 + 1e-3)
    assert ours <= theirs + 1e-6  # in fact no worse at all, up to Fiducio's float32 rounding
    assert ours < mean_nll(logits, labels) - 0.05  # and the data were miscalibrated


def test_matrix_scaling_with_odir_minimises_the_regularised_objective_of_kull_and_fiducio():
    """ODIR: lambda_od * mean(W_offdiag^2) + lambda_b * mean(b^2), minimised by an independent float64 L-BFGS here
    and by Fiducio's MatrixScaling(lambda_reg, mu_reg)."""
    lambda_od, lambda_b = 0.5, 0.2
    logits, labels = random_logits(40_000, seed=5)
    off_diagonal = ~torch.eye(K, dtype=torch.bool)

    def objective(weight, bias):
        return (F.cross_entropy((weight @ logits.double() + bias[:, None]).T, labels)
                + lambda_od * weight[off_diagonal].square().mean() + lambda_b * bias.square().mean())

    weight = torch.eye(K, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(K, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([weight, bias], max_iter=1000, tolerance_grad=1e-12, tolerance_change=1e-16,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        value = objective(weight, bias)
        value.backward()
        return value

    optimiser.step(closure)
    calibration = fit_affine_calibration(logits, labels, "matrix", odir=(lambda_od, lambda_b))
    assert calibration.info["lambda_od"] == lambda_od and calibration.info["lambda_b"] == lambda_b
    torch.testing.assert_close(calibration.weight, weight.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(calibration.bias, bias.detach(), rtol=0, atol=1e-6)

    reference = fiducio.MatrixScaling(optimizer="lbfgs", lambda_reg=lambda_od, mu_reg=lambda_b, device="cpu")
    reference.fit(logits.T.contiguous(), labels)
    theirs = float(objective(reference._weight.double(), reference._bias.double()))
    assert float(objective(calibration.weight, calibration.bias)) <= theirs * (1 + 1e-7)


# ------------------------------------------------------------------------------------------------- ODIR selection


def test_cross_validation_reports_each_pairs_held_out_nll_and_refits_with_the_best():
    logits, labels = random_logits(40_000, seed=6)
    fold_ids = torch.arange(labels.numel()) % 2
    grid = ((1.0, 1.0), (1e-3, 1e-3))
    calibration = fit_affine_calibration(logits, labels, "matrix", odir_grid=grid, folds=2, fold_ids=fold_ids)
    reported = {(row["lambda_od"], row["lambda_b"]): row["held_out_nll"]
                for row in calibration.info["cross_validation"]}
    for pair in grid:  # straightforward CV: fit on one fold with the penalty fixed, score the other, average
        total = 0.0
        for fold in range(2):
            held_out = fold_ids == fold
            fitted = fit_affine_calibration(logits[:, ~held_out], labels[~held_out], "matrix", odir=pair)
            total += mean_nll(fitted.apply(logits[:, held_out].double()), labels[held_out]) * int(held_out.sum())
        assert reported[pair] == pytest.approx(total / labels.numel(), rel=1e-6)
    best = min(reported, key=reported.get)
    assert (calibration.info["lambda_od"], calibration.info["lambda_b"]) == best
    refitted = fit_affine_calibration(logits, labels, "matrix", odir=best)
    torch.testing.assert_close(calibration.weight, refitted.weight, rtol=0, atol=1e-5)


def test_matrix_scaling_is_refused_where_it_would_overfit():
    logits, labels = random_logits(10_000)  # K = 4: 20 parameters need 20 000 voxels
    with pytest.raises(ValueError, match=r"would overfit.*K \(K \+ 1\) = 20 parameters.*20000 voxels.*got 10000.*"
                                         r"method='vector'"):
        fit_affine_calibration(logits, labels, "matrix")
    with pytest.raises(ValueError, match=r"refused above 32 classes.*method='vector', 66 parameters"):
        check_matrix_scaling(33, 10**12)
    check_matrix_scaling(32, 1000 * 32 * 33)
    fit_affine_calibration(logits, labels, "vector")  # what the message suggests works


# ------------------------------------------------------------------------------------------------- the map


def _calibrations(num_classes: int = K) -> list[AffineCalibration]:
    generator = torch.Generator().manual_seed(7)
    bias = torch.randn(num_classes, generator=generator, dtype=torch.float64)
    return [AffineCalibration(torch.eye(num_classes, dtype=torch.float64) / 1.7, torch.zeros(num_classes).double(),
                              "temperature", {"temperature": 1.7}),
            AffineCalibration(torch.diag(torch.rand(num_classes, generator=generator, dtype=torch.float64) + 0.5),
                              bias, "vector"),
            AffineCalibration(torch.randn(num_classes, num_classes, generator=generator, dtype=torch.float64),
                              bias, "matrix", {"lambda_od": 1e-3, "lambda_b": 1e-3})]


@pytest.mark.parametrize("calibration", _calibrations(), ids=lambda c: c.method)
def test_apply_on_either_layout_and_type(calibration):
    logits = torch.randn(2, K, 3, 5, 6, dtype=torch.float64)
    expected = torch.einsum("kj,bj...->bk...", calibration.weight, logits) + calibration.bias.view(1, K, 1, 1, 1)
    torch.testing.assert_close(calibration.apply(logits, class_dim=1), expected)
    torch.testing.assert_close(calibration.apply(logits[0]), expected[0])
    applied = calibration.apply(logits[0].numpy().astype(np.float32))
    assert isinstance(applied, np.ndarray) and applied.dtype == np.float32 and applied.shape == (K, 3, 5, 6)
    np.testing.assert_allclose(applied, expected[0].numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="do not have K=4 classes along class_dim=1"):
        calibration.apply(logits[:, :3], class_dim=1)


@pytest.mark.parametrize("calibration", _calibrations(), ids=lambda c: c.method)
@pytest.mark.parametrize("layer", ["conv3d", "conv2d", "conv3d_no_bias", "linear"])
def test_folded_layer_equals_the_layer_then_the_calibration(calibration, layer):
    torch.manual_seed(0)
    module, features, class_dim = {
        "conv3d": (torch.nn.Conv3d(6, K, 1), torch.randn(2, 6, 3, 4, 5), 1),
        "conv2d": (torch.nn.Conv2d(6, K, 1), torch.randn(2, 6, 4, 5), 1),
        "conv3d_no_bias": (torch.nn.Conv3d(6, K, 1, bias=False), torch.randn(2, 6, 3, 4, 5), 1),
        "linear": (torch.nn.Linear(6, K), torch.randn(10, 6), 1),
    }[layer]
    module, features = module.double(), features.double()
    with torch.no_grad():
        expected = calibration.apply(module(features), class_dim=class_dim)
        weight, bias = fold_affine_calibration(module.weight, module.bias, calibration)
        if module.bias is None:
            folded = torch.nn.functional.conv3d(features, weight, bias)
        else:
            module.weight.copy_(weight)
            module.bias.copy_(bias)
            folded = module(features)
    torch.testing.assert_close(folded, expected, rtol=1e-12, atol=1e-12)


def test_fold_keeps_the_layer_dtype_and_rejects_wrong_shapes():
    calibration = _calibrations()[2]
    weight, bias = fold_affine_calibration(torch.randn(K, 8, 1, 1, 1), torch.randn(K), calibration)
    assert weight.dtype == bias.dtype == torch.float32 and weight.shape == (K, 8, 1, 1, 1)
    with pytest.raises(ValueError, match="K=4 output channels first"):
        fold_affine_calibration(torch.randn(8, K, 1, 1), None, calibration)


@pytest.mark.parametrize("calibration", _calibrations(), ids=lambda c: c.method)
def test_json_round_trip_is_exact(calibration):
    restored = AffineCalibration.from_dict(json.loads(json.dumps(calibration.to_dict())))
    assert torch.equal(restored.weight, calibration.weight) and torch.equal(restored.bias, calibration.bias)
    assert (restored.method, restored.info) == (calibration.method, calibration.info)


def test_calibration_arguments_are_checked():
    with pytest.raises(ValueError, match="off-diagonal"):
        AffineCalibration(torch.ones(K, K), torch.zeros(K), "vector")
    with pytest.raises(ValueError, match=r"shape \(K, K\) and bias \(K,\)"):
        AffineCalibration(torch.eye(K), torch.zeros(K + 1), "matrix")
    with pytest.raises(ValueError, match="method must be one of"):
        AffineCalibration(torch.eye(K), torch.zeros(K), "dirichlet")
    logits, labels = random_logits(100)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        fit_affine_calibration(logits, labels + 1, "vector")
    with pytest.raises(ValueError, match="pair"):
        fit_affine_calibration(*random_logits(30_000), "matrix", odir=(-1.0, 0.0))
    with pytest.raises(ValueError, match=r"fold_ids must hold one integer fold in \[0, 3\)"):
        fit_affine_calibration(*random_logits(30_000), "matrix", folds=3, fold_ids=torch.arange(30_000) % 4)


def test_warns_when_a_class_has_no_fit_voxel():
    logits, labels = random_logits(5_000)
    present = labels != 2
    with pytest.warns(UserWarning, match=r"classes \[2\] have no fit voxel"):
        fit_affine_calibration(logits[:, present], labels[present], "vector")


# ------------------------------------------------------------------------------------------------- the sample


def indexed_voxels(num_voxels: int, start: int = 0, num_classes: int = K) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose first row is the voxel's index (exact in float32 below 2**24), labels index mod K."""
    index = torch.arange(start, start + num_voxels)
    logits = torch.zeros(num_classes, num_voxels)
    logits[0] = index.to(torch.float32)
    return logits, index % num_classes


def test_sample_is_uniform_over_voxels_whatever_the_update_sizes():
    sample = LogitSample(max_voxels=6_000, seed=11)
    sizes, start = [50_000] + [1_000] * 10, 0
    for size in sizes:
        sample.update(*indexed_voxels(size, start))
        start += size
    assert (sample.num_voxels, sample.num_sampled) == (60_000, 6_000)
    kept = sample.voxels().logits[0].long()
    assert kept.unique().numel() == 6_000
    counts = torch.bincount(kept // 3_000, minlength=20).double()  # 20 bins of 3000 voxels, 300 expected in each
    chi_square = float(((counts - 300) ** 2 / 300).sum())
    assert chi_square < 43.8  # 99.9% quantile of chi-square with 19 degrees of freedom
    late = int((kept >= 50_000).sum())  # the 10 small updates hold 1/6 of the voxels
    assert abs(late - 1_000) < 4 * (6_000 * (1 / 6) * (5 / 6)) ** 0.5
    assert torch.equal(sample.voxels().labels, kept % K)


def test_sample_counts_only_masked_voxels_and_keeps_class_proportions():
    generator = torch.Generator().manual_seed(2)
    labels = torch.multinomial(torch.tensor([0.7, 0.2, 0.05, 0.05]), 200_000, replacement=True,
                               generator=generator).reshape(400, 500)
    logits = torch.randn(K, 400, 500, generator=generator)
    mask = labels != 3
    sample = LogitSample(max_voxels=20_000).update(logits, labels, mask)
    assert sample.num_voxels == int(mask.sum())
    held = sample.voxels().labels
    assert not bool((held == 3).any())
    population = torch.bincount(labels[mask], minlength=K).double() / sample.num_voxels
    share = torch.bincount(held, minlength=K).double() / held.numel()
    tolerance = 4 * (population * (1 - population) / held.numel()).sqrt() + 1e-12
    assert bool(((share - population).abs() <= tolerance).all())


def test_merged_samples_are_exactly_the_bottom_k_sample_of_the_union():
    parts = [indexed_voxels(30_000), indexed_voxels(12_000, start=30_000)]
    small = [LogitSample(max_voxels=5_000, seed=seed).update(*part) for seed, part in zip((1, 2), parts)]
    complete = [LogitSample(max_voxels=10**6, seed=seed).update(*part) for seed, part in zip((1, 2), parts)]
    merged = small[0].merge(small[1])
    union = complete[0].merge(complete[1])  # every voxel, in increasing key order
    assert union.num_sampled == 42_000 and merged.num_voxels == 42_000 and merged.num_sampled == 5_000
    assert merged.seeds == (1, 2)
    expected = union.voxels()
    got = merged.voxels()
    assert torch.equal(got.logits, expected.logits[:, :5_000])
    assert torch.equal(got.labels, expected.labels[:5_000])
    assert torch.equal(got.position, expected.position[:5_000])
    reversed_merge = LogitSample(max_voxels=5_000, seed=2).update(*parts[1]).merge(
        LogitSample(max_voxels=5_000, seed=1).update(*parts[0]))
    assert torch.equal(reversed_merge.voxels().logits, got.logits)


def test_merge_refuses_dependent_or_incompatible_samples():
    first = LogitSample(seed=3).update(*indexed_voxels(100))
    with pytest.raises(ValueError, match="same seed"):
        first.merge(LogitSample(seed=3).update(*indexed_voxels(100)))
    with pytest.raises(ValueError, match="5 classes"):
        first.merge(LogitSample(seed=4).update(*indexed_voxels(100, num_classes=5)))


def test_saved_sample_loads_identically_and_continues_the_same_random_stream(tmp_path):
    uninterrupted = LogitSample(max_voxels=3_000, seed=5)
    interrupted = LogitSample(max_voxels=3_000, seed=5)
    for start in range(0, 20_000, 5_000):
        uninterrupted.update(*indexed_voxels(5_000, start))
    for start in range(0, 10_000, 5_000):
        interrupted.update(*indexed_voxels(5_000, start))
    path = tmp_path / "sample.npz"
    interrupted.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["sample.npz"]  # no temporary file left
    loaded = LogitSample.load(path)
    assert (loaded.num_voxels, loaded.num_classes, loaded.seeds, loaded.max_voxels) == (10_000, K, (5,), 3_000)
    assert torch.equal(loaded.voxels().logits, interrupted.voxels().logits)
    for start in range(10_000, 20_000, 5_000):
        loaded.update(*indexed_voxels(5_000, start))
    assert torch.equal(loaded.voxels().logits, uninterrupted.voxels().logits)
    assert torch.equal(loaded.voxels().position, uninterrupted.voxels().position)


def test_split_is_deterministic_disjoint_and_stable_as_the_sample_grows():
    sample = LogitSample(max_voxels=8_000, seed=9).update(*indexed_voxels(10_000))
    fit, held_out = sample.split(0.25)
    fit_index, held_out_index = set(fit.logits[0].long().tolist()), set(held_out.logits[0].long().tolist())
    assert not fit_index & held_out_index and len(fit_index | held_out_index) == 8_000
    assert abs(len(held_out_index) - 2_000) < 4 * (8_000 * 0.25 * 0.75) ** 0.5
    assert bool((fit.position >= 0).all() and (fit.position < 1).all())
    folds = torch.bincount(fit.fold_ids(3), minlength=3)
    assert bool(((folds - fit.num_voxels / 3).abs() < 4 * (fit.num_voxels * 2 / 9) ** 0.5).all())
    sample.update(*indexed_voxels(10_000, start=10_000))
    grown_fit, grown_held_out = sample.split(0.25)
    assert set(grown_fit.logits[0].long().tolist()) & held_out_index == set()
    assert set(grown_held_out.logits[0].long().tolist()) & fit_index == set()


def test_sample_checks_its_inputs():
    sample = LogitSample()
    with pytest.raises(ValueError, match=r"labels hold the value 4, outside \[0, 4\)"):
        sample.update(torch.zeros(K, 10), torch.full((10,), 4))
    with pytest.raises(ValueError, match="NaN or inf"):
        LogitSample().update(torch.full((K, 10), float("nan")), torch.zeros(10, dtype=torch.int64))
    with pytest.raises(ValueError, match="does not match logits shape"):
        LogitSample().update(torch.zeros(K, 10), torch.zeros(9, dtype=torch.int64))
    with pytest.raises(ValueError, match="max_voxels must be a positive integer"):
        LogitSample(max_voxels=0)


# ------------------------------------------------------------------------------------------------- end to end


def test_held_out_metrics_improve_and_match_an_independent_nll():
    logits, labels = random_logits(100_000, seed=8)
    sample = LogitSample(max_voxels=80_000, seed=1).update(logits.reshape(K, 200, 500), labels.reshape(200, 500))
    results = evaluate_affine_calibrations(sample, held_out_fraction=0.25)
    assert results["num_fit_voxels"] + results["num_held_out_voxels"] == 80_000
    _, held_out = sample.split(0.25)
    before = results["uncalibrated"]
    assert before["nll"] == pytest.approx(mean_nll(held_out.logits, held_out.labels), rel=1e-9)
    for method in ("temperature", "vector", "matrix"):
        calibration, after = results[method]["calibration"], results[method]["held_out"]
        assert calibration.method == method and calibration.info["converged"]
        assert after["nll"] == pytest.approx(mean_nll(calibration.apply(held_out.logits.double()), held_out.labels),
                                             rel=1e-9)
        assert after["nll"] < before["nll"] - 0.05
        assert after["ece"] < before["ece"] / 2 and after["classwise_ece"] < before["classwise_ece"]
