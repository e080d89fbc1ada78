"""Boundary scope and surface distances (docs/methods.md 5) against brute-force numpy and MONAI 1.6.1."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage

from nnunet_margin.calibration import boundary_scope, boundary_voxels, surface_distances

SPACINGS = [(0.7, 1.3, 2.5), (1.0, 1.0, 1.0), (3.0, 0.45, 0.8)]


def random_label_map(shape: tuple[int, ...], num_classes: int, seed: int, smoothing: float = 1.5) -> np.ndarray:
    """Blobs: the arg-max over classes of smoothed noise (uint8)."""
    rng = np.random.default_rng(seed)
    noise = np.stack([ndimage.gaussian_filter(rng.standard_normal(shape), smoothing) for _ in range(num_classes)])
    return noise.argmax(0).astype(np.uint8)


def perturbed(labels: np.ndarray, num_classes: int, seed: int, fraction: float = 0.05) -> np.ndarray:
    """A "prediction": the label map shifted by one voxel along axis 0 with a fraction of voxels relabelled."""
    rng = np.random.default_rng(seed)
    prediction = np.roll(labels, 1, axis=0)
    flip = rng.random(labels.shape) < fraction
    prediction[flip] = rng.integers(0, num_classes, int(flip.sum()))
    return prediction


def face_neighbours(index: tuple[int, ...], shape: tuple[int, ...]):
    """The 2 * ndim face neighbours of index, None for those outside the array."""
    for axis, step in itertools.product(range(len(shape)), (-1, 1)):
        neighbour = list(index)
        neighbour[axis] += step
        yield tuple(neighbour) if 0 <= neighbour[axis] < shape[axis] else None


def brute_boundary(labels: np.ndarray, ignore_label: int | None) -> np.ndarray:
    boundary = np.zeros(labels.shape, dtype=bool)
    for index in np.ndindex(labels.shape):
        if labels[index] == ignore_label:
            continue
        boundary[index] = any(neighbour is not None and labels[neighbour] != ignore_label
                              and labels[neighbour] != labels[index]
                              for neighbour in face_neighbours(index, labels.shape))
    return boundary


def brute_distances(sources: np.ndarray, targets: np.ndarray, spacing) -> np.ndarray:
    """For every True voxel of sources (C order), the Euclidean distance in mm to the nearest True voxel of targets."""
    source_points = np.argwhere(sources) * np.asarray(spacing)
    target_points = np.argwhere(targets) * np.asarray(spacing)
    return np.sqrt(((source_points[:, None, :] - target_points[None, :, :]) ** 2).sum(-1)).min(axis=1)


# --- boundary voxels and boundary scope -------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("ignore_label", [None, 3])
def test_boundary_voxels_match_brute_force(seed, ignore_label):
    labels = random_label_map((7, 6, 5), 4, seed, smoothing=0.8)
    np.testing.assert_array_equal(boundary_voxels(labels, ignore_label), brute_boundary(labels, ignore_label))


@pytest.mark.parametrize("seed, spacing", list(enumerate(SPACINGS)))
@pytest.mark.parametrize("distance_mm", [0.0, 1.2, 3.0, 4.7])
@pytest.mark.parametrize("ignore_label", [None, 2])
def test_boundary_scope_matches_brute_force(seed, spacing, distance_mm, ignore_label):
    labels = random_label_map((11, 9, 8), 3, seed)
    labels[:3] = 0  # a region without boundaries: the crop to the boundary's box must not lose voxels
    scope = boundary_scope(torch.as_tensor(labels), spacing, distance_mm, ignore_label)
    everywhere = np.ones(labels.shape, dtype=bool)
    distance = brute_distances(everywhere, brute_boundary(labels, ignore_label), spacing).reshape(labels.shape)
    expected = distance <= distance_mm
    if ignore_label is not None:
        expected &= labels != ignore_label
    undecided = (np.abs(distance - distance_mm) < 1e-9) & (distance > 0)  # sqrt's rounding at exactly distance_mm
    assert undecided.sum() < 0.05 * labels.size
    np.testing.assert_array_equal(scope[~undecided], expected[~undecided])
    assert scope.dtype == bool and scope.shape == labels.shape


def test_boundary_scope_is_anisotropic_and_inclusive():
    """A plane interface between x = 4 and x = 5 along axis 0: both are boundary voxels. With 2 mm along x, within
    4 mm are x = 2 .. 7 (4 mm away: inclusive), not x = 1 or 8 (6 mm); with 0.5 mm, within 0.9 mm are x = 3 .. 6."""
    labels = np.zeros((10, 4, 4), dtype=np.int64)
    labels[5:] = 1
    scope = boundary_scope(labels, spacing=(2.0, 0.5, 0.5), distance_mm=4.0)
    np.testing.assert_array_equal(np.flatnonzero(scope[:, 0, 0]), [2, 3, 4, 5, 6, 7])
    assert scope[2:8].all() and not scope[:2].any() and not scope[8:].any()
    np.testing.assert_array_equal(np.flatnonzero(boundary_scope(labels, (0.5, 2.0, 2.0), 0.9)[:, 0, 0]),
                                  [3, 4, 5, 6])


def test_ignored_voxels_are_neither_boundary_nor_in_scope():
    """Class 1 meets the ignore label (9) and class 2: only the 1|2 interface is a boundary."""
    labels = np.zeros((1, 12), dtype=np.int64)
    labels[0, :4], labels[0, 4:8], labels[0, 8:] = 9, 1, 2
    np.testing.assert_array_equal(np.flatnonzero(boundary_voxels(labels, ignore_label=9)[0]), [7, 8])
    np.testing.assert_array_equal(np.flatnonzero(boundary_voxels(labels)[0]), [3, 4, 7, 8])
    scope = boundary_scope(labels, (1.0, 1.0), distance_mm=5.0, ignore_label=9)
    np.testing.assert_array_equal(np.flatnonzero(scope[0]), range(4, 12))  # 2 .. 3 are within 5 mm but ignored


@pytest.mark.parametrize("labels", [np.zeros((4, 5, 6), np.uint8), np.full((3, 3), 9, np.int32)])
def test_no_boundary_gives_an_empty_scope(labels):
    assert not boundary_scope(labels, [1.0] * labels.ndim, ignore_label=9).any()


@pytest.mark.parametrize("spacing, distance_mm, labels, message", [
    ((1.0, 1.0), 3.0, np.zeros((3, 3, 3), np.uint8), "3 positive finite numbers"),
    ((1.0, 0.0, 1.0), 3.0, np.zeros((3, 3, 3), np.uint8), "positive finite"),
    (2.0, 3.0, np.zeros((3, 3, 3), np.uint8), "sequence of 3 numbers"),
    ("1,1,1", 3.0, np.zeros((3, 3, 3), np.uint8), "sequence of 3 numbers"),
    ((1.0, 1.0, 1.0), -1.0, np.zeros((3, 3, 3), np.uint8), "distance_mm must be a number >= 0"),
    ((1.0, 1.0, 1.0), 3.0, np.zeros((3, 3, 3), np.float32), "integer label map"),
])
def test_boundary_scope_rejects_bad_arguments(spacing, distance_mm, labels, message):
    with pytest.raises(ValueError, match=message):
        boundary_scope(labels, spacing, distance_mm)


# --- surface distances ------------------------------------------------------------------------------------------------

def brute_surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of mask with a face neighbour outside the mask or outside the array."""
    surface = np.zeros(mask.shape, dtype=bool)
    for index in zip(*np.nonzero(mask)):
        surface[index] = any(neighbour is None or not mask[neighbour]
                             for neighbour in face_neighbours(index, mask.shape))
    return surface


def brute_surface_distances(prediction, reference, label, spacing) -> tuple[float, float]:
    predicted, expected = brute_surface(prediction == label), brute_surface(reference == label)
    if not predicted.any() or not expected.any():
        return (math.nan, math.nan) if not (predicted.any() or expected.any()) else (math.inf, math.inf)
    forward, backward = brute_distances(predicted, expected, spacing), brute_distances(expected, predicted, spacing)
    hd95 = max(np.percentile(forward, 95), np.percentile(backward, 95))
    return float(hd95), float(np.concatenate([forward, backward]).mean())


def monai_surface_distances(prediction, reference, num_classes, spacing) -> dict[str, list[float]]:
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    def onehot(labels):
        return torch.nn.functional.one_hot(torch.as_tensor(labels).long(), num_classes).movedim(-1, 0)[None]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns on empty masks
        hd95 = compute_hausdorff_distance(onehot(prediction), onehot(reference), include_background=True,
                                          percentile=95, spacing=list(spacing))
        asd = compute_average_surface_distance(onehot(prediction), onehot(reference), include_background=True,
                                               symmetric=True, spacing=list(spacing))
    return {"hd95": hd95[0].double().tolist(), "asd": asd[0].double().tolist()}


def empty_class_cases(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class 1 only in the reference, class 2 only in the prediction, class 3 in neither, class 4 fills the border."""
    reference = random_label_map((12, 10, 9), 5, seed)
    prediction = perturbed(reference, 5, seed)
    reference[reference == 2], prediction[prediction == 1] = 0, 0
    reference[reference == 3], prediction[prediction == 3] = 0, 0
    return prediction, reference


@pytest.mark.parametrize("seed, spacing", list(enumerate(SPACINGS)))
def test_surface_distances_match_brute_force(seed, spacing):
    prediction, reference = empty_class_cases(seed)
    result = surface_distances(prediction, reference, range(5), spacing)
    for label in range(5):
        hd95, asd = brute_surface_distances(prediction, reference, label, spacing)
        assert result["hd95"][label] == pytest.approx(hd95, rel=1e-12, nan_ok=True), label
        assert result["asd"][label] == pytest.approx(asd, rel=1e-12, nan_ok=True), label
    assert math.isinf(result["hd95"][1]) and math.isinf(result["asd"][2]) and math.isnan(result["hd95"][3])
    assert all(type(value) is float for values in result.values() for value in values)


@pytest.mark.parametrize("seed, spacing", list(enumerate(SPACINGS + [(0.6, 0.6, 4.0)])))
def test_surface_distances_match_monai(seed, spacing):
    """MONAI 1.6.1 compute_hausdorff_distance(percentile=95) and compute_average_surface_distance(symmetric=True)
    with spacing, on larger random anisotropic volumes. Empty classes: both NaN where both masks are empty; where
    one is, MONAI's ASD (and its plain HD) is inf as ours, but its HD95 is NaN (torch.quantile interpolates
    inf - inf), ours inf."""
    prediction, reference = empty_class_cases(seed + 10)
    prediction, reference = (np.pad(array, ((0, 14), (3, 9), (0, 5)), mode="wrap") for array in (prediction, reference))
    ours = surface_distances(torch.as_tensor(prediction), reference, range(5), spacing)
    monai = monai_surface_distances(prediction, reference, 5, spacing)
    present = [0, 4]  # classes 1 and 2 are in one map only, class 3 in neither
    # MONAI's distances are float32, and torch.quantile's float32 position 0.95 * (n - 1) shifts the interpolation
    for name, tolerance in (("hd95", 1e-5), ("asd", 1e-6)):
        np.testing.assert_allclose([ours[name][k] for k in present], [monai[name][k] for k in present],
                                   rtol=tolerance)
        assert math.isnan(ours[name][3]) and math.isnan(monai[name][3])
    assert [ours["asd"][k] for k in (1, 2)] == [monai["asd"][k] for k in (1, 2)] == [math.inf, math.inf]
    assert [ours["hd95"][k] for k in (1, 2)] == [math.inf, math.inf]
    assert all(math.isnan(monai["hd95"][k]) for k in (1, 2))


def test_surface_distances_of_identical_and_shifted_masks():
    labels = np.zeros((20, 20, 20), dtype=np.int64)
    labels[5:15, 5:15, 5:15] = 1
    assert surface_distances(labels, labels, [1], (0.5, 1.0, 2.0)) == {"hd95": [0.0], "asd": [0.0]}
    shifted = np.roll(labels, 2, axis=2)  # 2 voxels of 2 mm
    result = surface_distances(shifted, labels, [1, 0], (0.5, 1.0, 2.0))
    assert result["hd95"][0] == pytest.approx(4.0)


@pytest.mark.parametrize("prediction, reference, spacing, message", [
    (np.zeros((3, 4), np.uint8), np.zeros((3, 5), np.uint8), (1.0, 1.0), r"shape \(3, 4\) does not match"),
    (np.zeros((3, 4), np.float32), np.zeros((3, 4), np.uint8), (1.0, 1.0), "integer label map"),
    (np.zeros((3, 4), np.uint8), np.zeros((3, 4), np.uint8), (1.0, 1.0, 1.0), "2 positive finite numbers"),
    (np.zeros((3, 4), np.uint8), np.zeros((3, 4), np.uint8), (1.0, float("nan")), "positive finite"),
])
def test_surface_distances_reject_bad_arguments(prediction, reference, spacing, message):
    with pytest.raises(ValueError, match=message):
        surface_distances(prediction, reference, [1], spacing)
