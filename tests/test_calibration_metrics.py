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
    brier_score,
    classwise_expected_calibration_error,
    expected_calibration_error,
    maximum_calibration_error,
    negative_log_likelihood,
    plot_reliability_diagram,
)
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
    """Independent float64 numpy implementation of docs/methods.md 3 with bins (lower, upper] via np.digitize."""
    p = np.asarray(probabilities, dtype=np.float64).reshape(probabilities.shape[0], -1)
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    num_classes, num_voxels = p.shape
    inner_edges = np.arange(1, n_bins, dtype=np.float64) / n_bins

    def calibration_errors(confidence, hit):
        bins = np.digitize(confidence, inner_edges, right=True)  # edges[i-1] < x <= edges[i]
        gaps = [abs(confidence[bins == b].mean() - hit[bins == b].mean()) for b in range(n_bins) if (bins == b).any()]
        shares = [(bins == b).sum() / len(confidence) for b in range(n_bins) if (bins == b).any()]
        return float(np.dot(gaps, shares)), float(max(gaps))

    confidence, prediction = p.max(0), p.argmax(0)
    ece, mce = calibration_errors(confidence, (prediction == y).astype(np.float64))
    onehot = np.eye(num_classes)[y].T
    class_ece = [calibration_errors(p[k], onehot[k])[0] for k in range(num_classes)]
    return {"ece": ece, "mce": mce, "classwise_ece": float(np.mean(class_ece)), "class_ece": class_ece,
            "brier": float(((p - onehot) ** 2).sum(0).mean()),
            "nll": float(-np.log(p[y, np.arange(num_voxels)]).mean()), "num_voxels": num_voxels}


def test_package_does_not_import_nnunet():
    code = ("import sys, nnunet_margin.calibration; "
            "sys.exit(any(name.split('.')[0] == 'nnunetv2' for name in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


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
    from torchmetrics.classification import BinaryCalibrationError, MulticlassCalibrationError

    probabilities, labels = random_inputs(num_classes, 20000, scale, seed)
    # torchmetrics bins [lower, upper) and gives 1.0 a bin of its own: drop the rare voxels with a value on an edge.
    on_edge = torch.isin(probabilities, torch.arange(N_BINS + 1) / N_BINS).any(dim=0)
    assert on_edge.sum() < 10
    probabilities, labels = probabilities[:, ~on_edge], labels[~on_edge]
    metrics = CalibrationStats(num_classes).update(probabilities, labels).compute()

    points = probabilities.T.contiguous()
    for norm, name in (("l1", "ece"), ("max", "mce")):
        expected = MulticlassCalibrationError(num_classes=num_classes, n_bins=N_BINS, norm=norm)(points, labels)
        assert metrics[name] == pytest.approx(float(expected), abs=2e-5)
    per_class = [float(BinaryCalibrationError(n_bins=N_BINS, norm="l1")(probabilities[k], (labels == k).long()))
                 for k in range(num_classes)]
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
    monkeypatch.setattr(stats_module, "_CHUNK_ENTRIES", 4 * 37)  # 37 voxels per chunk, 82 chunks
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
])
def test_empty_gives_nan(make_empty):
    metrics = make_empty().compute()
    assert metrics["num_voxels"] == 0
    for name in ("ece", "mce", "classwise_ece", "brier", "nll"):
        assert np.isnan(metrics[name]), name
    assert np.isnan(metrics["class_ece"]).all()


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
    monkeypatch.setattr(stats_module, "_CHUNK_ENTRIES", 3 * 10)
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
