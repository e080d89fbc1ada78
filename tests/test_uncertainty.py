"""The ensemble uncertainty functions (docs/methods.md 8) against direct computations written here and hand-computed
values on fixed numbers (failure detection: tests/test_failure_detection.py)."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from nnunet_margin.calibration.uncertainty import (UNCERTAIN_ENTROPY, MemberStatistics, PairwiseDice, case_scores,
                                                   entropy, member_std, most_foreground_slice, mutual_information,
                                                   pairwise_dice, plot_case_review)


def random_members(members: int = 4, classes: int = 4, shape=(6, 7, 5), seed: int = 0) -> torch.Tensor:
    """(M, K, *shape) float32 probabilities, sharp enough that the members' arg-max maps differ in places."""
    generator = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(members, classes, *shape, generator=generator)
    return logits.softmax(1)


def direct_entropy(p: np.ndarray) -> np.ndarray:
    """-sum p ln p / ln K over axis 0 in float64, with 0 ln 0 = 0."""
    p = p.astype(np.float64)
    return -np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(0) / np.log(p.shape[0])


def test_entropy_is_normalised_shannon_entropy():
    p = random_members()[0]
    np.testing.assert_allclose(entropy(p).numpy(), direct_entropy(p.numpy()), atol=1e-6)
    uniform, certain = torch.full((4, 3), 0.25), torch.eye(4)[:, :3]
    np.testing.assert_allclose(entropy(uniform).numpy(), 1.0, atol=1e-6)
    assert (entropy(certain) == 0).all()  # 0 log 0 = 0, no NaN
    # hand value: p = (1/2, 1/2, 0, 0) has entropy ln 2, normalised ln 2 / ln 4 = 1/2
    assert entropy(torch.tensor([[0.5], [0.5], [0.0], [0.0]])).item() == pytest.approx(0.5)


def test_mutual_information_and_member_std_against_direct_computations():
    members = random_members()
    p = members.numpy().astype(np.float64)
    direct_mi = direct_entropy(p.mean(0)) - np.mean([direct_entropy(m) for m in p], axis=0)
    np.testing.assert_allclose(mutual_information(members).numpy(), direct_mi, atol=2e-6)
    classes = members.mean(0).argmax(0)
    chosen = np.take_along_axis(p, classes.numpy()[None, None].repeat(len(p), 0), axis=1)[:, 0]
    np.testing.assert_allclose(member_std(members, classes).numpy(), chosen.std(0), atol=1e-6)
    # identical members: no disagreement at all
    same = members[:1].expand(3, *members.shape[1:])
    assert mutual_information(same).abs().max() < 1e-6 and (member_std(same, classes) == 0).all()


def hand_labels() -> np.ndarray:
    """Three members' labels of six voxels, classes 0..2."""
    return np.array([[0, 1, 1, 2, 0, 0],
                     [0, 1, 0, 2, 2, 0],
                     [1, 1, 1, 0, 0, 0]])


def test_pairwise_dice_by_hand():
    # class 1: sizes 2, 1, 3; intersections (0,1) 1, (0,2) 2, (1,2) 1 -> Dice 2/3, 4/5, 2/4
    # class 2: sizes 1, 2, 0; intersections (0,1) 1, others 0 -> Dice 2/3, 0, 0
    expected = [np.mean([2 / 3, 4 / 5, 2 / 4]), np.mean([2 / 3, 0, 0])]
    np.testing.assert_allclose(pairwise_dice(hand_labels(), 3), expected)
    streaming = PairwiseDice(3)
    for labels in hand_labels():
        streaming.add(torch.as_tensor(labels))
    np.testing.assert_allclose(streaming.per_class(), expected)
    np.testing.assert_array_equal(streaming.member_counts(), [[3, 2, 1], [3, 1, 2], [3, 3, 0]])
    # a class no member predicts: every pair agrees (Dice 1)
    np.testing.assert_allclose(pairwise_dice(hand_labels(), 4)[2], 1.0)
    with pytest.raises(ValueError, match="at least two members"):
        pairwise_dice(hand_labels()[:1], 3)


def test_streaming_statistics_equal_the_direct_forms():
    members = random_members(members=5, classes=3, shape=(9, 8))
    statistics = MemberStatistics(3)
    for member in members:
        statistics.add(member.clone())  # add may overwrite its argument
    assert statistics.members == 5
    np.testing.assert_allclose(statistics.mean.numpy(), members.mean(0).numpy(), atol=1e-6)
    np.testing.assert_allclose(statistics.mutual_information().numpy(), mutual_information(members).numpy(),
                               atol=1e-6)
    classes = statistics.mean.argmax(0)
    np.testing.assert_allclose(statistics.std(classes).numpy(), member_std(members, classes).numpy(), atol=1e-6)
    np.testing.assert_allclose(statistics.pairwise.per_class(), pairwise_dice(members.argmax(1), 3))
    # it crosses to an export worker process as numpy arrays and back
    restored = pickle.loads(pickle.dumps(statistics))
    assert isinstance(restored.mean, torch.Tensor)
    np.testing.assert_array_equal(restored.std(classes).numpy(), statistics.std(classes).numpy())
    with pytest.raises(ValueError, match="member probabilities of shape"):
        statistics.add(torch.rand(3, 9, 7))


def test_identical_members_have_exactly_zero_spread():
    member = random_members(members=1, classes=4)[0]
    statistics = MemberStatistics(4)
    for _ in range(3):
        statistics.add(member.clone())
    classes = member.argmax(0)
    assert (statistics.std(classes) == 0).all()  # Welford: no float32 cancellation of E[p^2] - E[p]^2
    assert (statistics.mutual_information() < 1e-6).all()
    np.testing.assert_allclose(statistics.pairwise.per_class(), 1.0)


def test_case_scores_against_direct_computation():
    rng = np.random.default_rng(3)
    segmentation = np.zeros((12, 10, 9), dtype=np.uint8)
    segmentation[2:8, 3:8, 2:7] = 1
    segmentation[4:6, 4:6, 3:5] = 2
    members = random_members(members=3, classes=3, shape=segmentation.shape, seed=5)
    statistics = MemberStatistics(3)
    for member in members:
        statistics.add(member.clone())
    entropy_map = rng.uniform(0, 1, segmentation.shape).astype(np.float32)
    mi_map = statistics.mutual_information().numpy()
    spacing = (2.0, 0.5, 1.5)
    scores = case_scores(segmentation, entropy_map, spacing, ["organ", "lesion"], statistics, mi_map)

    foreground = segmentation > 0
    assert scores["members"] == 3
    assert scores["entropy_foreground"] == pytest.approx(entropy_map[foreground].mean(dtype=np.float64))
    assert scores["mutual_information_foreground"] == pytest.approx(mi_map[foreground].mean(dtype=np.float64))
    # the boundary band: within 3 mm of a voxel with a face neighbour of another label
    from scipy import ndimage
    differs = np.zeros_like(foreground)
    for axis in range(3):
        step = np.diff(segmentation.astype(int), axis=axis) != 0
        lower = [slice(None)] * 3
        upper = [slice(None)] * 3
        lower[axis], upper[axis] = slice(None, -1), slice(1, None)
        differs[tuple(lower)] |= step
        differs[tuple(upper)] |= step
    band = ndimage.distance_transform_edt(~differs, sampling=spacing) <= 3.0
    assert scores["entropy_boundary"] == pytest.approx(entropy_map[band].mean(dtype=np.float64))
    assert scores["mutual_information_boundary"] == pytest.approx(mi_map[band].mean(dtype=np.float64))
    per_class = pairwise_dice(members.argmax(1), 3)
    assert scores["pairwise_dice_organ"] == pytest.approx(per_class[0])
    assert scores["pairwise_dice"] == pytest.approx(per_class.mean())
    voxel_ml = 2.0 * 0.5 * 1.5 / 1000
    assert scores["volume_ml_organ"] == pytest.approx((segmentation == 1).sum() * voxel_ml)
    assert scores["volume_ml_lesion"] == pytest.approx(8 * voxel_ml)
    member_volumes = [(labels == 2).sum().item() * voxel_ml for labels in members.argmax(1)]
    assert scores["volume_std_ml_lesion"] == pytest.approx(np.std(member_volumes))
    uncertain = entropy_map >= UNCERTAIN_ENTROPY
    assert scores["uncertain_fraction"] == pytest.approx(uncertain.sum() / (uncertain | foreground).sum())


def test_case_scores_of_one_member_and_of_an_empty_prediction():
    segmentation = np.zeros((5, 6), dtype=np.uint8)
    scores = case_scores(segmentation, np.full((5, 6), 0.1, dtype=np.float32), (1.0, 1.0), ["organ"])
    assert scores["members"] == 1 and not any(key.startswith(("mutual", "pairwise", "volume_std")) for key in scores)
    assert math.isnan(scores["entropy_foreground"]) and math.isnan(scores["entropy_boundary"])
    assert scores["volume_ml_organ"] == 0 and scores["uncertain_fraction"] == 0


def test_review_figure_is_written(tmp_path):
    segmentation = np.zeros((4, 10, 10), dtype=np.uint8)
    segmentation[2, 3:7, 3:7] = 1
    assert most_foreground_slice(segmentation) == 2
    path = tmp_path / "case.png"
    plot_case_review(np.random.default_rng(0).normal(size=(10, 10)), segmentation[2], np.zeros((10, 10)), "case",
                     path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and [p.name for p in tmp_path.iterdir()] == ["case.png"]
