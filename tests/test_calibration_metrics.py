"""CalibrationStats and the functional metrics against docs/methods.md 3, torchmetrics and plain numpy references."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from nnunet_margin.calibration import (
    CalibrationStats,
    LogitSample,
    average_calibration_error,
    brier_score,
    classwise_average_calibration_error,
    classwise_expected_calibration_error,
    expected_calibration_error,
    maximum_calibration_error,
    negative_log_likelihood,
    plot_reliability_diagram,
)
from nnunet_margin.calibration import binning
from nnunet_margin.calibration import stats as stats_module

N_BINS = 15


def methods_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """docs/methods.md 2/3: softmax(z) as probabilities (K=4, 54 voxels); the batch axis is treated as voxels."""
    x = torch.arange(216).float()
    z = (torch.linspace(-3, 5, 216) * torch.cos(x)).reshape(2, 4, 3, 3, 3)
    y = (torch.arange(54) % 4).reshape(2, 1, 3, 3, 3)
    probabilities = torch.softmax(z, dim=1).transpose(0, 1).reshape(4, -1)
    return probabilities, y.transpose(0, 1).reshape(-1)


def random_inputs(num_classes: int, num_voxels: int, scale: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities (K, V) float32 of random logits and labels that agree with the arg-max ~half the time."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_classes, num_voxels, generator=generator) * scale
    labels = torch.randint(0, num_classes, (num_voxels,), generator=generator)
    agree = torch.rand(num_voxels, generator=generator) < 0.5
    labels = torch.where(agree, logits.argmax(0), labels)
    return torch.softmax(logits, dim=0), labels


def numpy_reference(probabilities: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS) -> dict:
    """Independent float64 numpy implementation of docs/methods.md 3 and 5 with bins (lower, upper] via np.digitize."""
    p = np.asarray(probabilities, dtype=np.float64).reshape(probabilities.shape[0], -1)
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    num_classes, num_voxels = p.shape
    inner_edges = np.arange(1, n_bins, dtype=np.float64) / n_bins

    def calibration_errors(confidence, hit):
        bins = np.digitize(confidence, inner_edges, right=True)  # edges[i-1] < x <= edges[i]
        return errors_of_bins(confidence, hit, bins, n_bins)

    confidence, prediction = p.max(0), p.argmax(0)
    ece, mce, ace = calibration_errors(confidence, (prediction == y).astype(np.float64))
    onehot = np.eye(num_classes)[y].T
    class_errors = [calibration_errors(p[k], onehot[k]) for k in range(num_classes)]
    class_ece, class_ace = [errors[0] for errors in class_errors], [errors[2] for errors in class_errors]
    return {"ece": ece, "mce": mce, "ace": ace, "classwise_ece": float(np.mean(class_ece)), "class_ece": class_ece,
            "classwise_ace": float(np.mean(class_ace)), "class_ace": class_ace,
            "brier": float(((p - onehot) ** 2).sum(0).mean()),
            "nll": float(-np.log(p[y, np.arange(num_voxels)]).mean()), "num_voxels": num_voxels}


def errors_of_bins(confidence: np.ndarray, hit: np.ndarray, bins: np.ndarray, n_bins: int) -> tuple[float, ...]:
    """(ECE, MCE, ACE) of voxels assigned to bins 0 .. n_bins - 1: share-weighted, largest and plain mean gap."""
    occupied = [b for b in range(n_bins) if (bins == b).any()]
    gaps = [abs(confidence[bins == b].mean() - hit[bins == b].mean()) for b in occupied]
    shares = [(bins == b).sum() / len(confidence) for b in occupied]
    return float(np.dot(gaps, shares)), float(max(gaps)), float(np.mean(gaps))


def test_packages_do_not_import_nnunet():
    """nnunet_margin.comparison needs neither nnU-Net nor torch; nnunet_margin.calibration needs no nnU-Net."""
    code = ("import sys, nnunet_margin.comparison\n"
            "assert not {'torch', 'nnunetv2'} & set(sys.modules), 'comparison imports torch or nnunetv2'\n"
            "import nnunet_margin.calibration\n"
            "assert 'nnunetv2' not in sys.modules, 'calibration imports nnunetv2'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --- docs/methods.md 3 reference values --------------------------------------------------------------------------------

@pytest.mark.parametrize("scope, ece, classwise_ece", [
    ("all", 0.44823033, 0.30144531),
    ("foreground", 0.48271304, 0.31389400),
])
def test_methods_reference_values(scope, ece, classwise_ece):
    probabilities, labels = methods_inputs()
    mask = labels != 0 if scope == "foreground" else None
    metrics = CalibrationStats(4).update(probabilities, labels, mask=mask).compute()
    assert metrics["ece"] == pytest.approx(ece, abs=1e-6)
    assert metrics["classwise_ece"] == pytest.approx(classwise_ece, abs=1e-6)
    assert expected_calibration_error(probabilities, labels, mask=mask) == pytest.approx(ece, abs=1e-6)
    assert classwise_expected_calibration_error(probabilities, labels, mask=mask) == pytest.approx(classwise_ece,
                                                                                                   abs=1e-6)


def test_nll_equals_methods_cross_entropy():
    """docs/methods.md 2: CE of z and y is 2.4961898, which is the NLL of softmax(z)."""
    probabilities, labels = methods_inputs()
    assert negative_log_likelihood(probabilities, labels) == pytest.approx(2.4961898, abs=1e-6)


# --- cross-checks against torchmetrics and numpy --------------------------------------------------------------------

@pytest.mark.parametrize("num_classes, scale, seed", [(2, 1.0, 0), (4, 3.0, 1), (7, 0.5, 2), (5, 5.0, 3)])
def test_matches_torchmetrics(num_classes, scale, seed):
    """On a batch, probabilities (B, K, *spatial) with labels (B, 1, *spatial), which torchmetrics takes as preds
    (N, C, ...) and target (N, ...) and pools over all voxels, as our default reduction does."""
    from torchmetrics.classification import BinaryCalibrationError, MulticlassCalibrationError

    probabilities, labels = random_inputs(num_classes, 20000, scale, seed)
    probabilities = probabilities.reshape(num_classes, 4, 50, 100).movedim(1, 0)  # (B, K, 50, 100), a strided view
    labels = labels.reshape(4, 1, 50, 100)
    # torchmetrics bins [lower, upper) and gives 1.0 a bin of its own: leave out the rare voxels with a value on an
    # edge (our mask, its ignore_index).
    counted = ~torch.isin(probabilities, torch.arange(N_BINS + 1) / N_BINS).any(dim=1, keepdim=True)
    assert (~counted).sum() < 10
    metrics = CalibrationStats(num_classes).update(probabilities, labels, mask=counted).compute()

    target = torch.where(counted, labels, -1)[:, 0]
    for norm, name, function in (("l1", "ece", expected_calibration_error), ("max", "mce", maximum_calibration_error)):
        expected = MulticlassCalibrationError(num_classes=num_classes, n_bins=N_BINS, norm=norm, ignore_index=-1)(
            probabilities, target)
        assert metrics[name] == pytest.approx(float(expected), abs=2e-5)
        assert function(probabilities, labels, mask=counted) == metrics[name]
    per_class = [float(BinaryCalibrationError(n_bins=N_BINS, norm="l1", ignore_index=-1)(
        probabilities[:, k], torch.where(counted[:, 0], (labels[:, 0] == k).long(), -1))) for k in range(num_classes)]
    assert metrics["class_ece"] == pytest.approx(per_class, abs=2e-5)
    assert metrics["classwise_ece"] == pytest.approx(np.mean(per_class), abs=2e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("as_numpy", [False, True])
def test_matches_numpy_reference(dtype, as_numpy):
    probabilities, labels = random_inputs(3, 4 * 5 * 6, 2.0, seed=4)
    probabilities = probabilities.to(dtype).reshape(3, 4, 5, 6)
    labels = labels.to(torch.uint8).reshape(4, 5, 6)
    expected = numpy_reference(probabilities.double().numpy(), labels.numpy())
    if as_numpy:
        if dtype == torch.bfloat16:
            pytest.skip("numpy has no bfloat16")
        probabilities, labels = probabilities.numpy(), labels.numpy()
    original = probabilities.copy() if as_numpy else probabilities.clone()
    metrics = CalibrationStats(3).update(probabilities, labels).compute()
    assert (original == probabilities).all()  # inputs are not modified
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name
    functional = {"ece": expected_calibration_error, "mce": maximum_calibration_error,
                  "ace": average_calibration_error, "classwise_ace": classwise_average_calibration_error,
                  "classwise_ece": classwise_expected_calibration_error, "brier": brier_score,
                  "nll": negative_log_likelihood}
    for name, function in functional.items():
        assert function(probabilities, labels) == pytest.approx(expected[name], rel=1e-9, abs=1e-12), name


def test_reliability_matches_numpy_bins():
    probabilities, labels = random_inputs(3, 500, 2.0, seed=5)
    curves = CalibrationStats(3, n_bins=10).update(probabilities, labels).reliability()
    p, y = probabilities.double().numpy(), labels.numpy()
    bins = np.digitize(p[1], np.arange(1, 10) / 10, right=True)
    class_1 = curves["classes"][1]
    np.testing.assert_array_equal(class_1.count, np.bincount(bins, minlength=10))
    for b in range(10):
        in_bin = bins == b
        if in_bin.any():
            assert class_1.confidence[b] == pytest.approx(p[1][in_bin].mean(), rel=1e-12)
            assert class_1.accuracy[b] == pytest.approx((y[in_bin] == 1).mean(), rel=1e-12)
        else:
            assert np.isnan(class_1.confidence[b]) and np.isnan(class_1.accuracy[b])
    top = curves["top_label"]
    assert top.count.sum() == 500 and np.isnan(top.accuracy[:3]).all()  # top confidence >= 1/3
    np.testing.assert_allclose(top.centers, np.arange(10) / 10 + 0.05)


# --- streaming: merge, chunking, serialisation ----------------------------------------------------------------------

def assert_same_state(a: CalibrationStats, b: CalibrationStats) -> None:
    for name, value in a.state.items():
        if value.dtype == torch.int64:
            assert torch.equal(value, b.state[name]), name
        else:
            torch.testing.assert_close(value, b.state[name], rtol=1e-12, atol=1e-12)


def test_merge_equals_all_at_once():
    probabilities, labels = random_inputs(4, 10000, 2.0, seed=6)
    whole = CalibrationStats(4).update(probabilities, labels)
    parts = [CalibrationStats(4).update(probabilities[:, lo:hi], labels[lo:hi])
             for lo, hi in ((0, 1), (1, 3333), (3333, 10000))]
    merged = CalibrationStats(4)
    for part in parts:
        merged.merge(part)
    assert_same_state(merged, whole)
    before = parts[0].to_dict()
    summed = parts[0] + parts[1] + parts[2]
    assert_same_state(summed, whole)
    assert parts[0].to_dict() == before  # + leaves its operands unchanged
    assert summed.compute()["ece"] == pytest.approx(whole.compute()["ece"], rel=1e-12)


def test_chunk_size_does_not_change_the_result(monkeypatch):
    probabilities, labels = random_inputs(4, 3001, 2.0, seed=7)
    mask = torch.rand(3001, generator=torch.Generator().manual_seed(0)) < 0.7
    whole = CalibrationStats(4).update(probabilities, labels, mask=mask)
    monkeypatch.setattr(stats_module, "CHUNK_ENTRIES", 4 * 37)  # 37 voxels per chunk, 82 chunks
    assert_same_state(CalibrationStats(4).update(probabilities, labels, mask=mask), whole)


def test_transposed_inputs_give_the_same_state():
    probabilities, labels = random_inputs(3, 4 * 5 * 6, 2.0, seed=14)
    probabilities, labels = probabilities.reshape(3, 4, 5, 6), labels.reshape(4, 5, 6)
    mask = labels != 1
    whole = CalibrationStats(3).update(probabilities, labels, mask=mask)
    transposed = CalibrationStats(3).update(probabilities.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1),
                                            labels.numpy().transpose(2, 0, 1).copy().transpose(1, 2, 0), mask=mask)
    assert_same_state(transposed, whole)


def test_dict_round_trip_is_exact_through_json():
    probabilities, labels = random_inputs(5, 2000, 3.0, seed=8)
    stats = CalibrationStats(5, n_bins=20).update(probabilities, labels)
    restored = CalibrationStats.from_dict(json.loads(json.dumps(stats.to_dict())))
    assert (restored.num_classes, restored.n_bins) == (5, 20)
    for name, value in stats.state.items():
        assert restored.state[name].dtype == value.dtype and torch.equal(restored.state[name], value), name
    assert restored.compute() == stats.compute()


def test_from_dict_rejects_wrong_shapes():
    data = CalibrationStats(3).to_dict()
    data["num_classes"] = 4
    with pytest.raises(ValueError, match="class_count"):
        CalibrationStats.from_dict(data)


def _all_reduce_worker(rank: int, store: str, output: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    probabilities, labels = random_inputs(3, 1000, 2.0, seed=9)
    half = slice(0, 400) if rank == 0 else slice(400, 1000)
    stats = CalibrationStats(3).update(probabilities[:, half], labels[half]).all_reduce()
    if rank == 0:
        with open(output, "w") as handle:
            json.dump(stats.to_dict(), handle)
    dist.destroy_process_group()


def test_all_reduce_sums_over_processes(tmp_path):
    torch.multiprocessing.spawn(_all_reduce_worker, args=(str(tmp_path / "store"), str(tmp_path / "out.json")),
                                nprocs=2)
    reduced = CalibrationStats.from_dict(json.loads((tmp_path / "out.json").read_text()))
    assert_same_state(reduced, CalibrationStats(3).update(*random_inputs(3, 1000, 2.0, seed=9)))


def test_all_reduce_without_distributed_is_a_no_op():
    probabilities, labels = random_inputs(3, 100, 2.0, seed=10)
    stats = CalibrationStats(3).update(probabilities, labels)
    before = stats.to_dict()
    assert stats.all_reduce().to_dict() == before


# --- bin edges, exactness, masks ------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, dtype, n_bins, expected_bin", [
    (0.0, torch.float32, 15, 0),
    (1.0, torch.float32, 15, 14),
    (1.0, torch.float64, 15, 14),
    (2 / 15, torch.float64, 15, 1),  # exactly on an edge: the lower bin (lower, upper]
    (2 / 15, torch.float32, 15, 1),  # edges are b / n_bins rounded to the probabilities' dtype
    (2 / 15 + 1e-12, torch.float64, 15, 2),
    (1 / 15, torch.float64, 15, 0),
    (0.5, torch.float32, 2, 0),
    (0.5000001, torch.float32, 2, 1),
    (1e-30, torch.float32, 15, 0),
])
def test_bin_edges(value, dtype, n_bins, expected_bin):
    probabilities = torch.tensor([[value], [1.0 - value]], dtype=dtype)
    stats = CalibrationStats(2, n_bins=n_bins).update(probabilities, torch.tensor([1]))
    expected = torch.zeros(n_bins, dtype=torch.int64)
    expected[expected_bin] = 1
    assert torch.equal(stats.state["class_count"][0], expected)


@pytest.mark.parametrize("num_classes", [3, 130])  # uint8 and int32 paths of the first arg-max
def test_ties_count_the_first_maximal_class_as_the_prediction(num_classes):
    """As torch.max / numpy.argmax: among equal top probabilities the lowest class index is the prediction."""
    probabilities = torch.full((num_classes, 4), 0.2 / (num_classes - 2), dtype=torch.float64)
    probabilities[:2] = 0.4  # classes 0 and 1 tie at the top
    probabilities[:, 3] = 1 / num_classes  # all classes tie
    labels = torch.tensor([0, 1, 2, 0])
    stats = CalibrationStats(num_classes).update(probabilities, labels)
    assert int(stats.state["top_correct"].sum()) == 2  # voxels 0 and 3
    expected = numpy_reference(probabilities.numpy(), labels.numpy())
    assert stats.compute()["ece"] == pytest.approx(expected["ece"], rel=1e-12)


def test_interleaved_accumulators_of_different_shapes():
    """Accumulators of several class and bin numbers in turn (the cached lane offsets are shared and evicted)."""
    settings = [(3, 15, "equal_width"), (5, 10, "equal_width"), (3, 20, "equal_mass"), (7, 15, "equal_width"),
                (4, 15, "equal_mass"), (2, 3, "equal_width")]
    inputs = {k: random_inputs(k, 3000, 2.0, seed=k) for k, _, _ in settings}
    fresh = {setting: CalibrationStats(setting[0], setting[1], setting[2]).update(*inputs[setting[0]]).to_dict()
             for setting in settings}
    interleaved = {setting: CalibrationStats(setting[0], setting[1], setting[2]) for setting in settings}
    for part in (slice(0, 1000), slice(1000, 3000)):
        for setting, stats in interleaved.items():
            probabilities, labels = inputs[setting[0]]
            stats.update(probabilities[:, part], labels[part])
    for setting, stats in interleaved.items():
        assert stats.to_dict()["state"]["class_count"] == fresh[setting]["state"]["class_count"], setting
        assert stats.compute()["ece"] == pytest.approx(CalibrationStats.from_dict(fresh[setting]).compute()["ece"],
                                                       rel=1e-12)


def test_one_hot_correct_predictions_are_perfectly_calibrated():
    labels = torch.tensor([0, 2, 1, 2])
    probabilities = torch.nn.functional.one_hot(labels, 3).T.float()
    stats = CalibrationStats(3).update(probabilities, labels)
    metrics = stats.compute()
    assert metrics["ece"] == metrics["mce"] == metrics["classwise_ece"] == metrics["brier"] == metrics["nll"] == 0.0
    assert stats.state["top_count"].tolist() == [0] * 14 + [4]
    assert stats.state["class_count"][:, 0].tolist() == [3, 3, 2]  # zeros land in bin 0


def test_zero_probability_of_the_true_class_gives_finite_nll():
    probabilities = torch.tensor([[1.0], [0.0]])
    nll = negative_log_likelihood(probabilities, torch.tensor([1]))
    assert nll == pytest.approx(-np.log(np.finfo(np.float32).tiny))


def test_counts_above_two_to_the_24_are_exact():
    """One bin gets 2**24 + 3 voxels (an expanded tensor: no memory), then twice that after merging; float32 counts
    would round both."""
    num_voxels = 2**24 + 3
    probabilities = torch.tensor([[0.75], [0.25]]).expand(2, num_voxels)
    labels = torch.zeros(1, dtype=torch.uint8).expand(num_voxels)
    stats = CalibrationStats(2).update(probabilities, labels)
    assert stats.state["top_count"][11].item() == num_voxels  # 0.75 in (11/15, 12/15]
    assert stats.state["top_correct"][11].item() == num_voxels
    doubled = stats + stats
    assert doubled.num_voxels == 2 * num_voxels
    assert doubled.state["class_positive"][0, 11].item() == 2 * num_voxels
    metrics = doubled.compute()
    assert metrics["ece"] == 0.25 and metrics["mce"] == 0.25
    assert metrics["brier"] == pytest.approx(2 * 0.25**2, rel=1e-12)


def test_mask_equals_selecting_voxels():
    probabilities, labels = random_inputs(4, 1000, 2.0, seed=11)
    mask = labels != 0
    labels_with_ignored = labels.masked_fill(~mask & (torch.arange(1000) % 2 == 0), 255)  # invalid where masked
    masked = CalibrationStats(4).update(probabilities, labels_with_ignored, mask=mask)
    assert_same_state(masked, CalibrationStats(4).update(probabilities[:, mask], labels[mask]))
    assert masked.num_voxels == int(mask.sum())


@pytest.mark.parametrize("make_empty", [
    lambda: CalibrationStats(3),
    lambda: CalibrationStats(3).update(torch.full((3, 5), 1 / 3), torch.zeros(5, dtype=torch.long),
                                       mask=torch.zeros(5, dtype=torch.bool)),
    lambda: CalibrationStats(3).update(torch.zeros(3, 0), torch.zeros(0, dtype=torch.long)),
    lambda: CalibrationStats(3, binning="equal_mass").update(np.zeros((3, 4, 0, 2), np.float32),
                                                             np.zeros((4, 0, 2), np.uint8)),
])
def test_empty_gives_nan(make_empty):
    metrics = make_empty().compute()
    assert metrics["num_voxels"] == 0
    for name in ("ece", "mce", "ace", "classwise_ece", "classwise_ace", "brier", "nll"):
        assert np.isnan(metrics[name]), name
    assert np.isnan(metrics["class_ece"]).all() and np.isnan(metrics["class_ace"]).all()


# --- errors ---------------------------------------------------------------------------------------------------------

def _probabilities(*shape):
    return torch.full(shape, 1.0 / shape[0])


@pytest.mark.parametrize("probabilities, labels, mask, message", [
    (_probabilities(3, 4, 5), torch.zeros(4, 6, dtype=torch.long), None, r"labels shape \(4, 6\).*\(3, 4, 5\)"),
    (_probabilities(4, 5), torch.zeros(5, dtype=torch.long), None, r"num_classes=3"),
    (_probabilities(3, 5), torch.tensor([0, 1, 3, 0, 0]), None, r"value 3, outside \[0, 3\)"),
    (_probabilities(3, 5), torch.tensor([0, -1, 2, 0, 0]), None, r"value -1"),
    (_probabilities(3, 5).index_put((torch.tensor([1]), torch.tensor([2])), torch.tensor(float("nan"))),
     torch.zeros(5, dtype=torch.long), None, "NaN or inf"),
    (_probabilities(3, 5).index_put((torch.tensor([0]), torch.tensor([0])), torch.tensor(float("inf"))),
     torch.zeros(5, dtype=torch.long), None, "NaN or inf"),
    (torch.ones(3, 5, dtype=torch.long), torch.zeros(5, dtype=torch.long), None, "floating point"),
    (_probabilities(3, 5), torch.zeros(5), None, "integer"),
    (_probabilities(3, 5), torch.zeros(5, dtype=torch.long), torch.ones(5, dtype=torch.uint8), "bool"),
    (_probabilities(3, 5), torch.zeros(5, dtype=torch.long), torch.ones(4, dtype=torch.bool), r"mask shape \(4,\)"),
])
def test_update_rejects_bad_inputs(probabilities, labels, mask, message):
    with pytest.raises(ValueError, match=message):
        CalibrationStats(3).update(probabilities, labels, mask=mask)


def test_failed_update_leaves_the_accumulator_unchanged(monkeypatch):
    monkeypatch.setattr(stats_module, "CHUNK_ENTRIES", 3 * 10)
    probabilities, labels = random_inputs(3, 100, 2.0, seed=12)
    stats = CalibrationStats(3).update(probabilities, labels)
    before = stats.to_dict()
    broken = probabilities.clone()
    broken[0, 95] = float("nan")  # in the last chunk, after nine good ones
    with pytest.raises(ValueError, match="NaN"):
        stats.update(broken, labels)
    assert stats.to_dict() == before


@pytest.mark.parametrize("other", [CalibrationStats(4), CalibrationStats(3, n_bins=10)])
def test_merge_rejects_mismatched_accumulators(other):
    with pytest.raises(ValueError, match="cannot merge"):
        CalibrationStats(3).merge(other)
    with pytest.raises(ValueError, match="cannot merge"):
        _ = CalibrationStats(3) + other


@pytest.mark.parametrize("num_classes, n_bins", [(0, 15), (3, 0), (3, 1.5)])
def test_constructor_rejects_bad_arguments(num_classes, n_bins):
    with pytest.raises(ValueError):
        CalibrationStats(num_classes, n_bins)


# --- reliability diagram --------------------------------------------------------------------------------------------

def test_plot_reliability_diagram_writes_png(tmp_path):
    probabilities, labels = random_inputs(3, 1000, 2.0, seed=13)
    stats = CalibrationStats(3).update(probabilities, labels)
    path = tmp_path / "sub" / "reliability.png"
    plot_reliability_diagram(stats, path, class_names=["background", "organ", "lesion"], title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["reliability.png"]  # no temporary file left
    plot_reliability_diagram(CalibrationStats(3), tmp_path / "empty.png")  # empty bins only: still a figure
    with pytest.raises(ValueError, match="2 class names for 3 classes"):
        plot_reliability_diagram(stats, path, class_names=["a", "b"])


# --- ACE, ECE and MCE against MONAI 1.6.1 CalibrationErrorMetric ------------------------------------------------------

def _away_from_edges(probabilities: torch.Tensor, labels: torch.Tensor, n_bins: int):
    """Drop voxels with a probability within 1e-6 of an edge b / n_bins: MONAI's edges linspace(0, 1 + float32 eps)
    with torch.bucketize(right=False) and ours (lower, upper] on b / n_bins differ only there."""
    edges = torch.arange(n_bins + 1, dtype=torch.float64) / n_bins
    near = ((probabilities.double()[..., None] - edges).abs() < 1e-6).any(dim=-1).any(dim=0)
    near &= (probabilities > 0).all(dim=0) & (probabilities < 1).all(dim=0)  # 0 and 1 land alike in both
    return probabilities[:, ~near], labels[~near]


def _monai(reduction: str, probabilities: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MONAI's calibration error per image and channel: probabilities and target (B, C, V), 20 bins."""
    from monai.metrics import CalibrationErrorMetric

    metric = CalibrationErrorMetric(calibration_reduction=reduction, metric_reduction="none")
    metric(y_pred=probabilities, y=target)
    return metric.aggregate()


@pytest.mark.parametrize("num_classes, scale, seed", [(2, 1.0, 20), (4, 3.0, 21), (6, 0.7, 22)])
def test_matches_monai_calibration_error(num_classes, scale, seed):
    """Classwise ECE/ACE per class = MONAI's channels with one-hot y; top-label ECE/ACE/MCE = MONAI on one channel of
    the top confidence against correctness. Two images, also as one batch (B, K, V) with labels (B, 1, V): MONAI's
    values per image = our reduction "none", its mean over images (and channels) = our reduction "mean"."""
    images = [_away_from_edges(*random_inputs(num_classes, 6000, scale, seed + image), 20) for image in range(2)]
    size = min(len(labels) for _, labels in images)
    images = [(probabilities[:, :size], labels[:size]) for probabilities, labels in images]
    ours = [CalibrationStats(num_classes, n_bins=20).update(*image).compute() for image in images]

    probabilities = torch.stack([image[0] for image in images])  # (B, K, V)
    labels = torch.stack([image[1] for image in images])[:, None]  # (B, 1, V)
    onehot = torch.nn.functional.one_hot(labels[:, 0], num_classes).movedim(-1, 1).float()
    confidence, prediction = probabilities.max(dim=1, keepdim=True)
    correct = (prediction == labels).float()
    for reduction, name, function in (("expected", "class_ece", classwise_expected_calibration_error),
                                      ("average", "class_ace", classwise_average_calibration_error)):
        expected = _monai(reduction, probabilities, onehot).double()
        np.testing.assert_allclose([metrics[name] for metrics in ours], expected, rtol=0, atol=2e-6)
        np.testing.assert_allclose(function(probabilities, labels, n_bins=20, reduction="none"), expected.mean(dim=1),
                                   rtol=0, atol=2e-6)
    for reduction, name, function in (("expected", "ece", expected_calibration_error),
                                      ("average", "ace", average_calibration_error),
                                      ("maximum", "mce", maximum_calibration_error)):
        expected = _monai(reduction, confidence, correct)[:, 0].double()
        np.testing.assert_allclose([metrics[name] for metrics in ours], expected, rtol=0, atol=2e-6)
        np.testing.assert_allclose(function(probabilities, labels, n_bins=20, reduction="none"), expected, rtol=0,
                                   atol=2e-6)
    from monai.metrics import CalibrationErrorMetric

    metric = CalibrationErrorMetric(calibration_reduction="average")  # mean over images and channels
    metric(y_pred=probabilities, y=onehot)
    assert classwise_average_calibration_error(probabilities, labels, n_bins=20, reduction="mean") == pytest.approx(
        float(metric.aggregate()), abs=2e-6)


def test_monai_bins_values_on_an_edge_like_ours():
    """MONAI's docstring says right=False gives [left, right), but torch.bucketize(right=False) puts a value equal to
    an edge into the lower bin; with edges linspace(0, 1 + eps) a float32 b / n_bins lands in the lower bin there as
    here (lower, upper]: 0.25 with 4 bins is bin 0 in both, a gap of 0.25 vs a gap of 0.75 with [lower, upper)."""
    probabilities = torch.tensor([[0.25, 0.25], [0.75, 0.75]])[None]  # (1, 2 classes, 2 voxels)
    target = torch.tensor([[0.0, 0.0], [1.0, 1.0]])[None]
    from monai.metrics import CalibrationErrorMetric

    metric = CalibrationErrorMetric(num_bins=4, calibration_reduction="expected", metric_reduction="none")
    metric(y_pred=probabilities, y=target)
    ours = CalibrationStats(2, n_bins=4).update(probabilities[0], torch.tensor([1, 1])).compute()
    np.testing.assert_allclose(metric.aggregate()[0].double(), ours["class_ece"], atol=1e-7)
    assert ours["class_ece"] == [0.25, 0.25]


# --- batches (B, K, *spatial) with labels (B, 1, *spatial) -----------------------------------------------------------

FUNCTIONAL = {"ece": expected_calibration_error, "mce": maximum_calibration_error, "ace": average_calibration_error,
              "classwise_ece": classwise_expected_calibration_error,
              "classwise_ace": classwise_average_calibration_error, "brier": brier_score,
              "nll": negative_log_likelihood}


def random_batch(batch_size: int, num_classes: int, spatial: tuple[int, ...], scale: float, seed: int):
    """Probabilities (B, K, *spatial) and labels (B, 1, *spatial) of `random_inputs`, volume by volume."""
    volumes = [random_inputs(num_classes, int(np.prod(spatial)), scale, seed + b) for b in range(batch_size)]
    probabilities = torch.stack([p.reshape(num_classes, *spatial) for p, _ in volumes])
    labels = torch.stack([y.reshape(1, *spatial) for _, y in volumes])
    return probabilities, labels


@pytest.mark.parametrize("binning", ["equal_width", "equal_mass"])
@pytest.mark.parametrize("as_numpy", [False, True])
def test_batch_equals_its_volumes_in_turn(binning, as_numpy):
    """A batch adds exactly (bit for bit) what its volumes add one after the other, with and without a mask."""
    probabilities, labels = random_batch(3, 4, (5, 6, 7), 2.0, seed=50)
    mask = torch.rand(labels.shape, generator=torch.Generator().manual_seed(50)) < 0.6
    for volume_mask in (None, mask):
        per_volume = CalibrationStats(4, 10, binning)
        for b in range(3):
            per_volume.update(probabilities[b], labels[b, 0], mask=None if volume_mask is None else volume_mask[b, 0])
        inputs = (probabilities, labels, volume_mask)
        if as_numpy:
            inputs = tuple(None if array is None else array.numpy() for array in inputs)
        batched = CalibrationStats(4, 10, binning).update(inputs[0], inputs[1], mask=inputs[2])
        for name, value in per_volume.state.items():
            assert torch.equal(batched.state[name], value), name
        assert batched.num_voxels == (labels.numel() if volume_mask is None else int(mask.sum()))


def test_functional_reductions_of_a_batch():
    """pooled = `CalibrationStats` of the whole batch; none = each volume alone; mean = their mean; one volume is a
    batch of one."""
    probabilities, labels = random_batch(3, 3, (4, 9), 1.5, seed=51)
    mask = labels != 0
    mask[1] = False  # volume 1 counts no voxel: NaN, left out of the mean
    pooled = CalibrationStats(3, 15).update(probabilities, labels, mask=mask).compute()
    for name, function in FUNCTIONAL.items():
        assert function(probabilities, labels, mask=mask) == pooled[name], name
        alone = [function(probabilities[b], labels[b, 0], mask=mask[b, 0]) for b in range(3)]
        per_volume = function(probabilities, labels, mask=mask, reduction="none")
        assert per_volume[0] == alone[0] and per_volume[2] == alone[2] and np.isnan(per_volume[1]), name
        assert function(probabilities, labels, mask=mask, reduction="mean") == pytest.approx(
            (alone[0] + alone[2]) / 2, rel=1e-15), name
        assert function(probabilities[0], labels[0, 0], reduction="none") == [function(probabilities[0], labels[0, 0])]
    assert np.isnan(expected_calibration_error(probabilities, labels, mask=torch.zeros_like(mask), reduction="mean"))
    with pytest.raises(ValueError, match="reduction must be one of"):
        expected_calibration_error(probabilities, labels, reduction="sum")


@pytest.mark.parametrize("labels, mask, message", [
    (torch.zeros(2, 3, 4, 5, dtype=torch.long), None, r"expected labels of shape \(2, 1, 4, 5\), class indices "
                                                      r"\(not one-hot\)"),
    (torch.zeros(3, 1, 4, 5, dtype=torch.long), None, r"labels shape \(3, 1, 4, 5\) does not match the batch"),
    # torchmetrics' target layout (B, *spatial) is one volume here: the accumulator (K = 3) and the functional form
    # (K = 2 from the first axis) both name the batch form
    (torch.zeros(2, 4, 5, dtype=torch.long), None, r"with labels \(B, 1, \*spatial\), got \(2, 3, 4, 5\)|expected "
                                                   r"labels of shape \(3, 4, 5\) for one volume .*, or \(2, 1, 4, 5\) "
                                                   r"for a batch"),
    (torch.zeros(2, 1, 4, 5, dtype=torch.long), torch.ones(2, 4, 5, dtype=torch.bool), r"mask shape \(2, 4, 5\)"),
    (torch.zeros(2, 1, 4, 5, dtype=torch.long), torch.ones(2, 1, 4, 5), "mask must be a bool array"),
    (torch.zeros(2, 1, 4, 5), None, "labels must be an integer array"),
])
def test_batch_rejects_bad_inputs(labels, mask, message):
    probabilities = _probabilities(3, 2, 4, 5).movedim(0, 1)  # (B=2, K=3, 4, 5)
    with pytest.raises(ValueError, match=message):
        CalibrationStats(3).update(probabilities, labels, mask=mask)
    with pytest.raises(ValueError, match=message):
        expected_calibration_error(probabilities, labels, mask=mask, reduction="none")


def test_batch_errors_name_the_volume_and_voxel():
    probabilities, labels = random_batch(3, 3, (4, 5), 1.0, seed=54)
    with pytest.raises(ValueError, match="sum to"):  # torchmetrics' labels (B, *spatial) with B = K: one volume
        expected_calibration_error(probabilities, labels[:, 0])
    probabilities[2, :, 1, 3] = torch.tensor([0.5, 0.5, 0.5])
    stats = CalibrationStats(3).update(probabilities[0], labels[0, 0])
    before = stats.to_dict()
    with pytest.raises(ValueError, match=r"sum to 1\.5 over the 3 classes at voxel \(2, 1, 3\)"):
        stats.update(probabilities, labels)
    assert stats.to_dict() == before  # volumes 0 and 1 were fine, but nothing of the batch was added
    labels[1, 0, 0, 4] = 3
    with pytest.raises(ValueError, match=r"value 3, outside \[0, 3\)"):
        CalibrationStats(3).update(probabilities[:2], labels[:2])
    with pytest.raises(ValueError, match=r"\(B, K=4, \*spatial\) with labels \(B, 1, \*spatial\), got \(3, 3, 4, 5\)"):
        CalibrationStats(4).update(probabilities, labels)


# --- equal-mass bins --------------------------------------------------------------------------------------------------

def equal_mass_reference(values: np.ndarray, hit: np.ndarray, n_bins: int) -> tuple[float, ...]:
    """(ECE, MCE, ACE) with equal-mass bins: the voxel of rank r of N (ascending value) goes to bin
    floor(n_bins * r / N); equal values share the bin of the first of them."""
    first_rank = np.searchsorted(np.sort(values), values, side="left")
    return errors_of_bins(values, hit, n_bins * first_rank // len(values), n_bins)


def binary_inputs_on_fine_bin_centres(num_voxels: int, seed: int, num_fine_bins: int | None = None):
    """K = 2 voxels whose probabilities sit at centres of bins of the fine log-odds grid, spread over
    [0.5, 1 - 1e-6] like segmentation confidences: each in a fine bin of its own (num_fine_bins None), or drawn with
    repeats from num_fine_bins fine bins (so several voxels share one)."""
    rng = np.random.default_rng(seed)
    limit, fine = binning.EQUAL_MASS_LOGIT_LIMIT, binning.EQUAL_MASS_FINE_BINS
    width = 2 * limit / fine
    upper_half = np.arange(fine // 2, fine - 12)  # log-odds 0 .. ~14
    if num_fine_bins is None:
        chosen = rng.choice(upper_half, size=num_voxels, replace=False)
    else:
        chosen = rng.choice(rng.choice(upper_half, size=num_fine_bins, replace=False), size=num_voxels)
    probability_1 = 1 / (1 + np.exp(-(-limit + (chosen + 0.5) * width)))
    flip = rng.random(num_voxels) < 0.5  # class 0 or class 1 confident
    p1 = np.where(flip, 1 - probability_1, probability_1)
    probabilities = torch.tensor(np.stack([1 - p1, p1]))  # float64
    labels = torch.tensor((rng.random(num_voxels) < p1).astype(np.int64))
    return probabilities, labels


@pytest.mark.parametrize("num_voxels, n_bins, num_fine_bins", [
    (300, 15, None), (301, 15, None), (64, 10, None), (50, 1, None), (300, 15, 40), (997, 7, 23),
])
def test_equal_mass_bins_match_ranks(num_voxels, n_bins, num_fine_bins):
    probabilities, labels = binary_inputs_on_fine_bin_centres(num_voxels, num_voxels, num_fine_bins)
    stats = CalibrationStats(2, n_bins, binning="equal_mass").update(probabilities, labels)
    metrics = stats.compute()
    p, y = probabilities.numpy(), labels.numpy()
    ece, mce, ace = equal_mass_reference(p.max(0), (p.argmax(0) == y).astype(float), n_bins)
    assert (metrics["ece"], metrics["mce"], metrics["ace"]) == pytest.approx((ece, mce, ace), rel=1e-12)
    class_errors = [equal_mass_reference(p[k], (y == k).astype(float), n_bins) for k in range(2)]
    assert metrics["class_ece"] == pytest.approx([errors[0] for errors in class_errors], rel=1e-12)
    assert metrics["class_ace"] == pytest.approx([errors[2] for errors in class_errors], rel=1e-12)
    top = stats.reliability()["top_label"]
    assert top.edges[0] == 0 and top.edges[-1] == 1 and (np.diff(top.edges) >= 0).all()
    if num_fine_bins is None:  # exact equal mass: bin sizes differ by at most one, edges between the ranks
        np.testing.assert_array_equal(top.count, np.diff(-(-np.arange(n_bins + 1) * num_voxels // n_bins)))
        sorted_confidence = np.sort(p.max(0))
        boundaries = -(-np.arange(1, n_bins) * num_voxels // n_bins)  # first rank of each later bin
        assert (sorted_confidence[boundaries - 1] <= top.edges[1:-1]).all()
        assert (top.edges[1:-1] < sorted_confidence[boundaries]).all()


def test_equal_mass_splits_confidences_next_to_one():
    """Segmentation-like confidences (mostly above 0.996): an equal-width fine grid could not split them. On the
    log-odds grid every bin holds N / n_bins voxels up to the largest fine bin's count, which is small."""
    probabilities, labels = random_inputs(3, 30000, 1.0, seed=30)
    logits = probabilities.log() + 8 * torch.nn.functional.one_hot(labels, 3).T
    probabilities = torch.softmax(logits, dim=0)
    stats = CalibrationStats(3, 15, binning="equal_mass").update(probabilities, labels)
    curves = stats.reliability()
    assert curves["top_label"].edges[1] > 0.996 and curves["top_label"].count.sum() == 30000
    fine_counts = [stats.state["top_count"]] + list(stats.state["class_count"])
    for curve, fine_count in zip([curves["top_label"]] + curves["classes"], fine_counts):
        largest_fine_bin = int(fine_count.max())
        assert largest_fine_bin < 0.2 * 30000 / 15
        assert np.abs(curve.count - 30000 / 15).max() < largest_fine_bin


def test_equal_mass_single_bin_equals_equal_width_single_bin():
    probabilities, labels = random_inputs(4, 5000, 2.0, seed=31)
    equal_mass = CalibrationStats(4, 1, binning="equal_mass").update(probabilities, labels).compute()
    equal_width = CalibrationStats(4, 1).update(probabilities, labels).compute()
    for name, value in equal_width.items():
        assert equal_mass[name] == pytest.approx(value, rel=1e-12), name
    assert equal_width["ece"] == equal_width["mce"] == equal_width["ace"]


def test_equal_mass_ties_share_a_bin():
    """Identical voxels cannot be split: one non-empty bin, ECE = ACE = MCE = |confidence - accuracy|."""
    probabilities = torch.tensor([[0.7], [0.3]]).expand(2, 90)
    labels = (torch.arange(90) % 3 == 0).long()  # the predicted class 0 is right on 60 of 90 voxels
    stats = CalibrationStats(2, 15, binning="equal_mass").update(probabilities, labels)
    metrics = stats.compute()
    gap = abs(0.7 - 60 / 90)
    assert metrics["ece"] == metrics["ace"] == metrics["mce"] == pytest.approx(gap, rel=1e-6)  # float32 0.7
    assert (stats.reliability()["top_label"].count > 0).sum() == 1


def test_equal_mass_state_streams_merges_and_serialises():
    probabilities, labels = random_inputs(4, 9000, 3.0, seed=32)
    whole = CalibrationStats(4, 10, binning="equal_mass").update(probabilities, labels)
    merged = CalibrationStats(4, 10, binning="equal_mass")
    for lo, hi in ((0, 1), (1, 4000), (4000, 9000)):
        merged.merge(CalibrationStats(4, 10, binning="equal_mass").update(probabilities[:, lo:hi], labels[lo:hi]))
    assert_same_state(merged, whole)
    restored = CalibrationStats.from_dict(json.loads(json.dumps(whole.to_dict())))
    assert restored.binning == "equal_mass" and restored.compute() == whole.compute()
    assert whole.state["class_count"].shape == (4, binning.EQUAL_MASS_FINE_BINS)
    with pytest.raises(ValueError, match="binning='equal_width'"):
        whole.merge(CalibrationStats(4, 10))


def test_from_dict_loads_a_dict_written_before_binning_existed():
    probabilities, labels = random_inputs(3, 500, 2.0, seed=33)
    stats = CalibrationStats(3).update(probabilities, labels)
    old = stats.to_dict()
    del old["binning"]
    restored = CalibrationStats.from_dict(old)
    assert restored.binning == "equal_width" and restored.compute() == stats.compute()


@pytest.mark.parametrize("kwargs, message", [
    ({"binning": "quantile"}, "binning must be one of"),
    ({"binning": "equal_mass", "n_bins": 4096}, "at most 2048 bins"),
])
def test_constructor_rejects_bad_binning(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CalibrationStats(3, **kwargs)


# --- probability checks -----------------------------------------------------------------------------------------------

def test_probabilities_summing_to_two_are_rejected():
    """Without the check, probabilities summing to 2 went through silently (doubled confident ones, above 1, even
    gave a negative NLL)."""
    probabilities, labels = random_inputs(3, 1000, 0.1, seed=40)
    doubled = 2 * probabilities
    assert doubled.max() <= 1
    with pytest.raises(ValueError, match=r"probabilities sum to 2 over the 3 classes at voxel \(\d+,\).*softmax"):
        CalibrationStats(3).update(doubled, labels)
    for function in (expected_calibration_error, negative_log_likelihood, LogitSample().update_probabilities):
        with pytest.raises(ValueError, match="sum to 2"):
            function(doubled, labels)
    confident, labels = random_inputs(3, 1000, 3.0, seed=40)
    with pytest.raises(ValueError, match="sum to 2"):
        CalibrationStats(3).update(2 * confident, labels)


@pytest.mark.parametrize("make_bad, message", [
    (lambda p: p.log(), r"sum to -[0-9.]+ over the 4 classes.*softmax to logits"),
    (lambda p: torch.sigmoid(p), r"sum to .*sigmoid"),
    (lambda p: p / 2, r"sum to 0\.5 "),
    (lambda p: torch.cat([p[:1] + p[1:2] + 0.25, torch.full_like(p[1:2], -0.25), p[2:]]),
     r"negative value -0\.25 .* outside \[0, 1\]"),
])
def test_logits_and_unnormalised_scores_are_rejected(make_bad, message):
    probabilities, labels = random_inputs(4, 200, 2.0, seed=41)
    with pytest.raises(ValueError, match=message):
        CalibrationStats(4).update(make_bad(probabilities), labels)
    with pytest.raises(ValueError, match=message):
        LogitSample().update_probabilities(make_bad(probabilities), labels)


@pytest.mark.parametrize("bad_voxel, message", [
    ([float("nan"), 1 / 3, 1 / 3], "NaN or inf values"),
    ([1 / 3, float("inf"), 1 / 3], "NaN or inf values"),
    ([0.9, 1 / 3, 1 / 3], "sum to 1.56667"),
    ([1.5, -0.5, 0.0], "negative value -0.5"),
])
def test_error_names_the_spatial_voxel(bad_voxel, message, monkeypatch):
    """One bad voxel at (2, 1, 3) of a (4, 3, 5) volume, stored as is and transposed, under a mask, in the 5th of
    several chunks."""
    monkeypatch.setattr(stats_module, "CHUNK_ENTRIES", 3 * 7)
    probabilities = torch.full((3, 4, 3, 5), 1 / 3)
    probabilities[:, 2, 1, 3] = torch.tensor(bad_voxel)
    transposed = probabilities.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    labels = torch.zeros(4, 3, 5, dtype=torch.long)
    mask = torch.rand(4, 3, 5, generator=torch.Generator().manual_seed(0)) < 0.6
    mask[2, 1, 3] = True
    for update in (CalibrationStats(3).update, LogitSample().update_probabilities):
        for inputs in (probabilities, transposed):
            with pytest.raises(ValueError, match=rf"{message}.* at voxel \(2, 1, 3\)|at voxel \(2, 1, 3\).*{message}"):
                update(inputs, labels, mask=mask)


def test_bad_voxels_outside_the_mask_are_not_checked():
    probabilities, labels = random_inputs(3, 100, 2.0, seed=42)
    probabilities[:, 10] = torch.tensor([2.0, -1.0, float("nan")])
    mask = torch.ones(100, dtype=torch.bool)
    mask[10] = False
    expected = CalibrationStats(3).update(probabilities[:, mask], labels[mask])
    assert_same_state(CalibrationStats(3).update(probabilities, labels, mask=mask), expected)


@pytest.mark.parametrize("dtype, deviation, accepted", [
    (torch.float32, 9e-4, True), (torch.float32, 2e-3, False), (torch.float64, 9e-4, True),
    (torch.float16, 9e-4, True), (torch.bfloat16, 7e-3, True), (torch.bfloat16, 2e-2, False),
])
def test_sum_tolerance(dtype, deviation, accepted):
    probabilities = torch.tensor([[0.5 + deviation], [0.5]], dtype=dtype)
    stats = CalibrationStats(2)
    if accepted:
        assert stats.update(probabilities, torch.tensor([0])).num_voxels == 1
    else:
        with pytest.raises(ValueError, match="sum to"):
            stats.update(probabilities, torch.tensor([0]))


def test_low_precision_softmax_is_accepted():
    logits = torch.randn(8, 20000, generator=torch.Generator().manual_seed(43)) * 4
    labels = torch.zeros(20000, dtype=torch.long)
    for dtype in (torch.float16, torch.bfloat16):
        assert CalibrationStats(8).update(torch.softmax(logits, 0).to(dtype), labels).num_voxels == 20000


def test_empty_inputs_leave_the_accumulators_empty():
    stats = CalibrationStats(3).update(*random_inputs(3, 10, 2.0, seed=44))
    before = stats.to_dict()
    stats.update(np.zeros((3, 0), np.float32), np.zeros(0, np.int64))
    assert stats.to_dict() == before
    assert np.isnan(expected_calibration_error(torch.zeros(3, 0), torch.zeros(0, dtype=torch.long)))
    assert np.isnan(brier_score(torch.zeros(3, 2, 0), torch.zeros(2, 0, dtype=torch.long)))
    sample = LogitSample().update_probabilities(torch.zeros(3, 0), torch.zeros(0, dtype=torch.long))
    assert sample.num_voxels == 0 and sample.voxels().num_voxels == 0
