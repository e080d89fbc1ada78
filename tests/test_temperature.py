"""Temperature scaling on stored probabilities: recovery of a known temperature, optimality, accumulation, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar

from nnunet_margin.calibration import TemperatureFit, apply_temperature, fit_temperature, negative_log_likelihood


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


def random_voxels(num_voxels: int, num_classes: int = 3, seed: int = 0, temperature: float = 1.5):
    """Probabilities softmax(z) (K, V) and labels sampled i.i.d. from softmax(z / temperature)."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_classes, num_voxels, generator=generator, dtype=torch.float64) * 3
    labels = torch.multinomial(torch.softmax(logits / temperature, dim=0).T, 1, generator=generator)[:, 0]
    return torch.softmax(logits, dim=0).to(torch.float32), labels


@pytest.mark.parametrize("true_temperature", [1.7, 0.6])
def test_recovers_the_temperature_the_labels_were_drawn_with(true_temperature):
    probabilities, labels = stratified_voxels(true_temperature)
    assert fit_temperature(probabilities, labels) == pytest.approx(true_temperature, abs=1e-3)


def test_minimises_the_nll_of_the_scaled_probabilities():
    """The fit agrees with a generic 1-D minimiser of the project's NLL of apply_temperature(p, T)."""
    probabilities, labels = random_voxels(20_000)
    # exact zeros, as nnU-Net exports outside its crop box (where the ground truth is background)
    probabilities[:, :50] = torch.tensor([1.0, 0.0, 0.0])[:, None]
    labels[:50] = 0

    def nll(temperature: float) -> float:
        return negative_log_likelihood(apply_temperature(probabilities.double(), temperature), labels)

    reference = minimize_scalar(nll, bounds=(0.1, 10), method="bounded", options={"xatol": 1e-10}).x
    fitted = fit_temperature(probabilities.double(), labels)
    assert fitted == pytest.approx(reference, rel=1e-5)
    assert nll(fitted) < nll(1.0)


def test_cases_fitted_jointly_equal_one_concatenated_fit():
    probabilities, labels = random_voxels(30_000)
    accumulated = TemperatureFit()
    for part in torch.split(torch.arange(30_000), [5_000, 15_000, 10_000]):
        accumulated.update(probabilities[:, part], labels[part])
    assert accumulated.num_voxels == 30_000
    assert accumulated.fit() == pytest.approx(fit_temperature(probabilities, labels), rel=1e-12)


def test_mask_selects_the_voxels_that_count():
    probabilities, labels = random_voxels(20_000)
    mask = labels != 0
    mask[:100] = False
    expected = fit_temperature(probabilities[:, mask], labels[mask])
    assert fit_temperature(probabilities.reshape(3, 100, 200), labels.reshape(100, 200),
                           mask.reshape(100, 200)) == pytest.approx(expected, rel=1e-12)
    assert fit_temperature(probabilities.numpy(), labels.numpy(), mask.numpy()) == pytest.approx(expected, rel=1e-12)


def test_beyond_max_voxels_a_bounded_random_sample_is_fitted():
    probabilities, labels = random_voxels(200_000, seed=1)
    sampled = TemperatureFit(max_voxels=20_000)
    for part in torch.split(torch.arange(200_000), 7_000):
        sampled.update(probabilities[:, part], labels[part])
    assert (sampled.num_voxels, sampled.num_sampled) == (200_000, 20_000)
    assert sum(len(keys) for keys in sampled._keys) <= 2 * 20_000
    full = fit_temperature(probabilities, labels)
    assert sampled.fit() == pytest.approx(full, rel=0.05)
    assert sampled.fit() != full  # a sample, not all voxels


def test_apply_temperature_is_softmax_of_scaled_logits():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6, 5, generator=generator, dtype=torch.float64) * 4
    probabilities = torch.softmax(logits, dim=0)
    for temperature in (0.3, 1.0, 2.5):
        torch.testing.assert_close(apply_temperature(probabilities, temperature),
                                   torch.softmax(logits / temperature, dim=0), rtol=0, atol=1e-12)
    as_numpy = apply_temperature(probabilities.to(torch.float32).numpy(), 2.0)
    assert isinstance(as_numpy, np.ndarray) and as_numpy.dtype == np.float32
    np.testing.assert_allclose(as_numpy.sum(axis=0), 1.0, rtol=1e-6)


def test_fitting_on_rescaled_probabilities_divides_the_temperature():
    """softmax(log softmax(z / 2) / T) = softmax(z / 2T): the fit on probabilities tempered by 2 is T / 2."""
    probabilities, labels = random_voxels(20_000)
    original = fit_temperature(probabilities.double(), labels)
    tempered = fit_temperature(apply_temperature(probabilities.double(), 2.0), labels)
    assert tempered == pytest.approx(original / 2, rel=1e-9)


def test_zero_probability_of_the_true_class_is_clamped_not_nan():
    probabilities, labels = random_voxels(2_000)
    probabilities[:, 0] = torch.tensor([1.0, 0.0, 0.0])
    labels[0] = 2
    temperature = fit_temperature(probabilities, labels)
    assert np.isfinite(temperature) and temperature > fit_temperature(probabilities[:, 1:], labels[1:])


def test_perfectly_separated_voxels_return_the_lower_bound_with_a_warning():
    probabilities = torch.tensor([[0.9, 0.2], [0.1, 0.8]])
    with pytest.warns(UserWarning, match="keeps decreasing towards the bound T = 0.01"):
        assert fit_temperature(probabilities, torch.tensor([0, 1])) == 0.01


@pytest.mark.parametrize("temperature", [0, -1.0, float("nan"), float("inf")])
def test_apply_temperature_rejects_invalid_temperatures(temperature):
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        apply_temperature(torch.full((2, 3), 0.5), temperature)


@pytest.mark.parametrize("probabilities, labels, mask, message", [
    (torch.full((2, 3), 0.5), torch.zeros(4, dtype=torch.int64), None, "labels shape"),
    (torch.ones(2, 3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64), None, "floating point"),
    (torch.full((1, 3), 1.0), torch.zeros(3, dtype=torch.int64), None, r"K >= 2"),
    (torch.full((2, 3), 0.5), torch.zeros(3), None, "integer array"),
    (torch.full((2, 3), 0.5), torch.tensor([0, 1, 2]), None, r"labels hold the value 2, outside \[0, 2\)"),
    (torch.full((2, 3), 0.5), torch.tensor([0, 1, 1]), torch.ones(3), "bool array"),
    (torch.tensor([[0.5, float("nan"), 0.5]] * 2), torch.tensor([0, 1, 1]), None, "NaN"),
    (torch.tensor([[1.5, 0.5], [-0.5, 0.5]]), torch.tensor([0, 1]), None, "negative"),
])
def test_update_rejects_bad_input(probabilities, labels, mask, message):
    with pytest.raises(ValueError, match=message):
        TemperatureFit().update(probabilities, labels, mask)


def test_errors_for_inconsistent_classes_empty_data_and_bad_settings():
    fit = TemperatureFit().update(torch.full((2, 3), 0.5), torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="3 classes, earlier updates had 2"):
        fit.update(torch.full((3, 3), 1 / 3), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="bounds must be"):
        fit.fit(bounds=(2.0, 1.0))
    with pytest.raises(ValueError, match="no voxels to fit"):
        TemperatureFit().update(torch.full((2, 3), 0.5), torch.tensor([0, 1, 1]), torch.zeros(3, dtype=bool)).fit()
    with pytest.raises(ValueError, match="max_voxels must be a positive integer"):
        TemperatureFit(max_voxels=0)
