"""Temperature scaling on stored probabilities, as fit-temperature fits it: the probabilities enter the one sampler
as log-probabilities (`LogitSample.update_probabilities`) and the one temperature solver fits them. Recovery of a
known temperature, the same T as on the logits of the same voxels, optimality against a generic minimiser, the
bounds of the search, and the checks of the probabilities."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar

from nnunet_margin.calibration import LogitSample, fit_affine_calibration, negative_log_likelihood
from nnunet_margin.calibration.logit_sample import log_probabilities


def stratified_voxels(temperature: float, groups: int = 1000, copies: int = 1000, num_classes: int = 4,
                      seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities softmax(z) (K, copies, groups) and labels drawn from softmax(z / temperature).

    Each of `groups` random logit vectors is repeated `copies` times, with labels at the quantiles (j + 0.5) / copies
    of its label distribution (stratified sampling), so the label frequencies match the distribution up to 1/copies
    and the maximum-likelihood temperature is the true one up to that, far below the 1e-3 tested.
    """
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_classes, groups, generator=generator, dtype=torch.float64) * 2.5
    cumulative = torch.softmax(logits / temperature, dim=0).cumsum(dim=0)
    quantiles = (torch.arange(copies, dtype=torch.float64) + 0.5) / copies
    labels = (quantiles[None, :, None] > cumulative[:, None, :]).sum(dim=0).clamp_max(num_classes - 1)
    probabilities = torch.softmax(logits, dim=0)[:, None, :].expand(num_classes, copies, groups)
    return probabilities.to(torch.float32), labels


def random_logits(num_voxels: int, num_classes: int = 3, seed: int = 0, temperature: float = 1.5):
    """Logits z (K, V) float64 and labels sampled i.i.d. from softmax(z / temperature)."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_classes, num_voxels, generator=generator, dtype=torch.float64) * 3
    labels = torch.multinomial(torch.softmax(logits / temperature, dim=0).T, 1, generator=generator)[:, 0]
    return logits, labels


def fitted_temperature(probabilities, labels, mask=None, **options) -> float:
    """fit-temperature's fit: the probabilities' sample, fitted by fit_affine_calibration's temperature."""
    voxels = LogitSample().update_probabilities(probabilities, labels, mask).voxels()
    return fit_affine_calibration(voxels.logits, voxels.labels, "temperature", **options).info["temperature"]


def tempered(probabilities: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(log p / T), independently of the package (no clamping needed for p > 0)."""
    return torch.softmax(probabilities.double().log() / temperature, dim=0)


@pytest.mark.parametrize("true_temperature", [1.7, 0.6])
def test_recovers_the_temperature_the_labels_were_drawn_with(true_temperature):
    probabilities, labels = stratified_voxels(true_temperature, copies=500)
    assert fitted_temperature(probabilities, labels) == pytest.approx(true_temperature, abs=1e-3)


def test_probabilities_give_the_temperature_of_the_logits_of_the_same_voxels():
    """log p = z - logsumexp(z): fit-temperature (probabilities) and fit-calibration --method temperature (logits)
    fit the same T on the same voxels, to the float32 rounding of the stored logits."""
    logits, labels = random_logits(50_000, seed=3)
    from_logits = LogitSample().update(logits, labels).voxels()
    on_logits = fit_affine_calibration(from_logits.logits, from_logits.labels, "temperature").info["temperature"]
    probabilities = torch.softmax(logits, dim=0).to(torch.float32)
    assert fitted_temperature(probabilities, labels) == pytest.approx(on_logits, rel=1e-6)
    assert on_logits == pytest.approx(1.5, rel=0.05)


def test_minimises_the_nll_of_the_scaled_probabilities():
    """The fit agrees with a generic 1-D minimiser of the project's NLL of softmax(log p / T)."""
    logits, labels = random_logits(20_000)
    probabilities = torch.softmax(logits, dim=0)
    # exact zeros, as nnU-Net exports outside its crop box (where the ground truth is background)
    probabilities[:, :50] = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)[:, None]
    labels[:50] = 0

    def nll(temperature: float) -> float:
        return negative_log_likelihood(torch.softmax(log_probabilities(probabilities) / temperature, dim=0), labels)

    reference = minimize_scalar(nll, bounds=(0.1, 10), method="bounded", options={"xatol": 1e-10}).x
    fitted = fitted_temperature(probabilities, labels)
    assert fitted == pytest.approx(reference, rel=1e-5)
    assert nll(fitted) < nll(1.0)


def test_mask_selects_the_voxels_that_count():
    logits, labels = random_logits(20_000)
    probabilities = torch.softmax(logits, dim=0).to(torch.float32)
    mask = labels != 0
    mask[:100] = False
    expected = fitted_temperature(probabilities[:, mask], labels[mask])
    assert fitted_temperature(probabilities.reshape(3, 100, 200), labels.reshape(100, 200),
                              mask.reshape(100, 200)) == pytest.approx(expected, rel=1e-12)
    assert fitted_temperature(probabilities.numpy(), labels.numpy(), mask.numpy()) == pytest.approx(expected,
                                                                                                   rel=1e-12)


def test_fitting_on_rescaled_probabilities_divides_the_temperature():
    """softmax(log softmax(z / 2) / T) = softmax(z / 2T): the fit on probabilities tempered by 2 is T / 2."""
    logits, labels = random_logits(20_000)
    probabilities = torch.softmax(logits, dim=0)
    original = fitted_temperature(probabilities, labels)
    assert fitted_temperature(tempered(probabilities, 2.0), labels) == pytest.approx(original / 2, rel=1e-6)


def test_zero_probability_of_the_true_class_is_clamped_not_nan():
    logits, labels = random_logits(2_000)
    probabilities = torch.softmax(logits, dim=0).to(torch.float32)
    probabilities[:, 0] = torch.tensor([1.0, 0.0, 0.0])
    labels[0] = 2
    temperature = fitted_temperature(probabilities, labels)
    assert np.isfinite(temperature) and temperature > fitted_temperature(probabilities[:, 1:], labels[1:])


@pytest.mark.parametrize("probabilities, labels, side, bound", [
    # every voxel right: sharpening towards 0 and 1 keeps helping, T falls to the lower bound
    (torch.tensor([[0.9, 0.2], [0.1, 0.8]]), torch.tensor([0, 1]), "lower", 0.01),
    # confident and always wrong: flattening towards uniform keeps helping, T rises to the upper bound
    (torch.tensor([[0.9, 0.2], [0.1, 0.8]]), torch.tensor([1, 0]), "upper", 100.0),
])
def test_a_minimum_beyond_a_bound_returns_the_bound_with_a_warning(probabilities, labels, side, bound):
    voxels = LogitSample().update_probabilities(probabilities, labels).voxels()
    with pytest.warns(UserWarning, match=f"keeps decreasing towards the bound T = {bound:g}"):
        calibration = fit_affine_calibration(voxels.logits, voxels.labels, "temperature")
    assert (calibration.info["temperature"], calibration.info["at_bound"]) == (bound, side)
    torch.testing.assert_close(calibration.weight, torch.eye(2, dtype=torch.float64) / bound)
    narrow_bound = 0.5 if side == "lower" else 2.0
    with pytest.warns(UserWarning, match=f"towards the bound T = {narrow_bound:g}"):
        narrower = fit_affine_calibration(voxels.logits, voxels.labels, "temperature", temperature_bounds=(0.5, 2.0))
    assert narrower.info["temperature"] == narrow_bound


def test_an_interior_temperature_is_no_bound():
    logits, labels = random_logits(5_000)
    calibration = fit_affine_calibration(logits, labels, "temperature")
    assert calibration.info["at_bound"] is None and calibration.info["converged"]
    with pytest.raises(ValueError, match="temperature bounds must be 0 < low < high"):
        fit_affine_calibration(logits, labels, "temperature", temperature_bounds=(2.0, 1.0))


@pytest.mark.parametrize("probabilities, labels, mask, message", [
    (torch.full((2, 3), 0.5), torch.zeros(4, dtype=torch.int64), None, "labels shape"),
    (torch.ones(2, 3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64), None, "floating point"),
    (torch.full((1, 3), 1.0), torch.zeros(3, dtype=torch.int64), None, r"K >= 2"),
    (torch.full((2, 3), 0.5), torch.zeros(3), None, "integer array"),
    (torch.full((2, 3), 0.5), torch.tensor([0, 1, 2]), None, r"labels hold the value 2, outside \[0, 2\)"),
    (torch.full((2, 3), 0.5), torch.tensor([0, 1, 1]), torch.ones(3), "bool array"),
    (torch.tensor([[0.5, float("nan"), 0.5]] * 2), torch.tensor([0, 1, 1]), None, "NaN"),
    (torch.tensor([[1.5, 0.5], [-0.5, 0.5]]), torch.tensor([0, 1]), None, "negative"),
    (torch.tensor([[0.5, 0.9], [0.5, 0.9]]), torch.tensor([0, 1]), None, r"sum to 1\.8 .* at voxel \(1,\)"),
])
def test_update_probabilities_rejects_bad_input(probabilities, labels, mask, message):
    with pytest.raises(ValueError, match=message):
        LogitSample().update_probabilities(probabilities, labels, mask)


def test_inconsistent_classes_and_empty_data_are_refused():
    sample = LogitSample().update_probabilities(torch.full((2, 3), 0.5), torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="3 classes, earlier updates had 2"):
        sample.update_probabilities(torch.full((3, 3), 1 / 3), torch.tensor([0, 1, 2]))
    empty = LogitSample().update_probabilities(torch.full((2, 3), 0.5), torch.tensor([0, 1, 1]),
                                               torch.zeros(3, dtype=torch.bool)).voxels()
    with pytest.raises(ValueError, match="no voxels to fit"):
        fit_affine_calibration(empty.logits, empty.labels, "temperature")
