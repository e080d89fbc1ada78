"""Benchmark: calibration metrics on a 256^3 x 4-class volume (CPU): CalibrationStats vs torchmetrics and MONAI.

Part 1, all voxels: ECE, MCE, classwise ECE, Brier score and NLL of the same probabilities:

* ours: one `CalibrationStats.update` + `compute()` (one pass, chunked, int64/float64 per-bin sums);
* torchmetrics: `MulticlassCalibrationError` with norm "l1" (ECE) and "max" (MCE), one `BinaryCalibrationError` per
  class for the classwise ECE (torchmetrics has no classwise ECE), Brier and NLL in plain torch via a one-hot
  target, i.e. how one would write the same set with the existing tools.

Part 2, the papers' evaluation (docs/methods.md 5) in two scopes, foreground (ground truth not background) and
boundary (within 3 mm of a ground-truth class boundary, anisotropic spacing 1.5 x 0.8 x 0.8 mm): ECE, MCE, ACE,
classwise ECE and ACE, Brier and NLL, then HD95 and ASD per foreground class of the arg-max prediction:

* ours: `boundary_scope` (timed on its own: both sides use its mask), one `CalibrationStats.update` per scope, and
  `surface_distances` (scipy's Euclidean distance transform);
* MONAI 1.6.1: the scope's voxels selected, `CalibrationErrorMetric` (15 bins) with the reductions "expected",
  "average" and "maximum" on one channel of the top confidence against correctness (top label) and "expected" and
  "average" on the one-hot classes (classwise), Brier and NLL in plain torch; `compute_hausdorff_distance
  (percentile=95)` and `compute_average_surface_distance(symmetric=True)` with the spacing (a KD-tree over the
  surface voxels on the CPU).

The volume looks like a segmentation output: 4 classes (3 balls in background), confident softmax predictions with
some errors, so the most confident bin holds most of the ~16.8 M voxels. The errors are independent per voxel, so
the arg-max prediction has isolated wrong voxels all over the volume: a worst case for surface distances (HD95 far
above a real model's), and for a distance transform, which then spans the whole volume.

Peak extra memory of the calibration metrics is the peak of live tensor bytes allocated inside the measured call,
with a small `TorchDispatchMode` that records the storage of every op output and releases it through a
`weakref.finalize` on the tensor. Tensors that exist before the call (the inputs) do not count; views and in-place
results of them are not counted either. This is exact for tensor memory and independent of the allocator, unlike
ru_maxrss; it does not see non-tensor memory (Python objects, numpy arrays), which neither side uses in any
quantity. The surface distances work in numpy/scipy (ours) and torch/numpy/scipy (MONAI): each runs once in a fresh
process, and its peak extra memory is the rise of the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs after building the inputs).

Timings of the calibration metrics are the best of 3 interleaved runs, surface distances a single run each. On a
machine shared with other jobs, multi-threaded torch ops can stall on each other's threads (each op waits for its
slowest thread), so compare with `--threads 1` there.

Run: .venv/bin/python bench/bench_calibration.py [--threads N]   (about 3-4 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import peak_extra_bytes  # noqa: E402

from nnunet_margin.calibration import CalibrationStats, boundary_scope, surface_distances  # noqa: E402

SIZE = 256
NUM_CLASSES = 4
N_BINS = 15
METRICS = ("ece", "mce", "classwise_ece", "brier", "nll")
REPEATS = 3
SPACING = (1.5, 0.8, 0.8)  # mm along the array axes
BOUNDARY_MM = 3.0
SCOPES = ("foreground", "boundary")
EXTENDED_METRICS = ("ece", "mce", "ace", "classwise_ece", "classwise_ace", "brier", "nll")
FOREGROUND_CLASSES = tuple(range(1, NUM_CLASSES))


def make_volume(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities (1, K, S, S, S) float32 and labels (1, S, S, S) uint8 of a segmentation-like prediction."""
    generator = torch.Generator().manual_seed(seed)
    axis = torch.arange(SIZE, dtype=torch.float32)
    labels = torch.zeros(SIZE, SIZE, SIZE, dtype=torch.uint8)
    for label, (center, radius) in enumerate([((128, 128, 128), 70), ((100, 140, 120), 25), ((180, 90, 60), 12)], 1):
        distance = sum((axis.view(*[-1 if d == i else 1 for d in range(3)]) - c) ** 2 for i, c in enumerate(center))
        labels[distance <= radius**2] = label
    logits = torch.randn(NUM_CLASSES, SIZE, SIZE, SIZE, generator=generator) * 1.5
    logits.scatter_add_(0, labels.long()[None], torch.full((1, SIZE, SIZE, SIZE), 6.0))
    return torch.softmax(logits, dim=0)[None], labels[None]


def ours(probabilities: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    stats = CalibrationStats(NUM_CLASSES, N_BINS).update(probabilities[0], labels[0])
    return {name: stats.compute()[name] for name in METRICS}


def with_torchmetrics(probabilities: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    from torchmetrics.classification import BinaryCalibrationError, MulticlassCalibrationError

    values = {}
    for norm, name in (("l1", "ece"), ("max", "mce")):
        metric = MulticlassCalibrationError(num_classes=NUM_CLASSES, n_bins=N_BINS, norm=norm)
        metric.update(probabilities, labels)
        values[name] = float(metric.compute())
        del metric
    per_class = []
    for k in range(NUM_CLASSES):
        metric = BinaryCalibrationError(n_bins=N_BINS, norm="l1")
        metric.update(probabilities[:, k], (labels == k).to(torch.uint8))
        per_class.append(float(metric.compute()))
        del metric
    values["classwise_ece"] = sum(per_class) / NUM_CLASSES
    target = labels.long()
    onehot = torch.nn.functional.one_hot(target, NUM_CLASSES).movedim(-1, 1)
    values["brier"] = float(((probabilities - onehot) ** 2).sum(dim=1).mean())
    del onehot
    true_probability = probabilities.gather(1, target[:, None]).clamp_min(torch.finfo(torch.float32).tiny)
    values["nll"] = float(-true_probability.log().mean())
    return values


def scope_masks(labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """The two scopes of part 2 as bool masks (S, S, S) of labels (1, S, S, S)."""
    return {"foreground": labels[0] != 0,
            "boundary": torch.from_numpy(boundary_scope(labels[0].numpy(), SPACING, BOUNDARY_MM))}


def ours_extended(probabilities: torch.Tensor, labels: torch.Tensor,
                  masks: dict[str, torch.Tensor]) -> dict[tuple[str, str], float]:
    values = {}
    for scope, mask in masks.items():
        metrics = CalibrationStats(NUM_CLASSES, N_BINS).update(probabilities[0], labels[0], mask=mask).compute()
        values.update({(scope, name): metrics[name] for name in EXTENDED_METRICS})
    return values


def with_monai(probabilities: torch.Tensor, labels: torch.Tensor,
               masks: dict[str, torch.Tensor]) -> dict[tuple[str, str], float]:
    from monai.metrics import CalibrationErrorMetric

    def calibration_error(reduction: str, y_pred: torch.Tensor, y: torch.Tensor) -> float:
        metric = CalibrationErrorMetric(num_bins=N_BINS, calibration_reduction=reduction)
        metric(y_pred=y_pred, y=y)
        return float(metric.aggregate())  # mean over channels

    values = {}
    for scope, mask in masks.items():
        selected = probabilities[0][:, mask][None]  # (1, K, voxels)
        target = labels[0][mask].long()
        onehot = torch.nn.functional.one_hot(target, NUM_CLASSES).T[None].float()
        confidence, prediction = selected.max(dim=1, keepdim=True)
        correct = (prediction[:, 0] == target)[:, None].float()
        for reduction, name in (("expected", "ece"), ("maximum", "mce"), ("average", "ace")):
            values[scope, name] = calibration_error(reduction, confidence, correct)
        for reduction, name in (("expected", "classwise_ece"), ("average", "classwise_ace")):
            values[scope, name] = calibration_error(reduction, selected, onehot)
        values[scope, "brier"] = float(((selected - onehot) ** 2).sum(dim=1).mean())
        true_probability = selected.gather(1, target[None, None]).clamp_min(torch.finfo(torch.float32).tiny)
        values[scope, "nll"] = float(-true_probability.log().mean())
    return values


def ours_surface(prediction: np.ndarray, labels: np.ndarray) -> dict[str, list[float]]:
    return surface_distances(prediction, labels, FOREGROUND_CLASSES, SPACING)


def monai_surface(prediction: np.ndarray, labels: np.ndarray) -> dict[str, list[float]]:
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    def onehot(array: np.ndarray) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.from_numpy(array).long(), NUM_CLASSES).movedim(-1, 0)[None]

    predicted, expected = onehot(prediction), onehot(labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd95 = compute_hausdorff_distance(predicted, expected, percentile=95, spacing=list(SPACING))
        asd = compute_average_surface_distance(predicted, expected, symmetric=True, spacing=list(SPACING))
    return {"hd95": hd95[0].tolist(), "asd": asd[0].tolist()}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def _surface_child(name: str, threads: int | None, results) -> None:
    """In a fresh process: build the inputs, reset the peak resident set, run one surface function."""
    if threads is not None:
        torch.set_num_threads(threads)
    probabilities, labels = make_volume()
    prediction = probabilities[0].argmax(dim=0).to(torch.uint8).numpy()
    labels = labels[0].numpy()
    del probabilities
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # peak resident set := current
    baseline = _status_kib("VmRSS")
    start = time.perf_counter()
    values = {"ours": ours_surface, "MONAI": monai_surface}[name](prediction, labels)
    seconds = time.perf_counter() - start
    results.put((name, seconds, (_status_kib("VmHWM") - baseline) * 1024, values))


def run_surface(threads: int | None) -> dict[str, tuple[float, int, dict[str, list[float]]]]:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    measured = {}
    for name in ("ours", "MONAI"):
        process = context.Process(target=_surface_child, args=(name, threads, results))
        process.start()
        name, seconds, peak, values = results.get()
        process.join()
        measured[name] = (seconds, peak, values)
    return measured


def best_time(functions, inputs, repeats: int) -> list[float]:
    """Best-of-`repeats` wall time of each function, runs interleaved so background load hits all alike."""
    best = [math.inf] * len(functions)
    for _ in range(repeats):
        for index, function in enumerate(functions):
            start = time.perf_counter()
            function(*inputs)
            best[index] = min(best[index], time.perf_counter() - start)
    return best


def float32_bin_sum_error(probabilities: torch.Tensor) -> str:
    """Summed confidence of the fullest top-label bin in float32 scatter_add (as torchmetrics does) vs float64."""
    confidence = probabilities[0].max(dim=0).values.reshape(-1)
    in_last_bin = confidence > (N_BINS - 1) / N_BINS
    count = int(in_last_bin.sum())
    exact = float(confidence[in_last_bin].double().sum())
    index = torch.zeros(count, dtype=torch.int64)
    float32_sum = float(torch.zeros(1).scatter_add_(0, index, confidence[in_last_bin]))
    return (f"fullest bin ({count} voxels): mean confidence {exact / count:.7f} with float64 sums, "
            f"{float32_sum / count:.7f} with a float32 scatter_add")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    if (threads := parser.parse_args().threads) is not None:
        torch.set_num_threads(threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; volume {SIZE}^3 x {NUM_CLASSES} classes "
          f"({SIZE**3 / 1e6:.1f} M voxels, probabilities {SIZE**3 * NUM_CLASSES * 4 / 2**20:.0f} MiB float32)")
    inputs = make_volume()
    ours_values, tm_values = ours(*inputs), with_torchmetrics(*inputs)
    ours_seconds, tm_seconds = best_time((ours, with_torchmetrics), inputs, repeats=REPEATS)
    ours_peak, tm_peak = peak_extra_bytes(ours, *inputs), peak_extra_bytes(with_torchmetrics, *inputs)

    print(f"\n{'':24}{f'best of {REPEATS} (s)':>14}{'peak extra MiB':>16}")
    print(f"{'CalibrationStats':24}{ours_seconds:>14.2f}{ours_peak / 2**20:>16.1f}")
    print(f"{'torchmetrics + torch':24}{tm_seconds:>14.2f}{tm_peak / 2**20:>16.1f}")
    print(f"speedup {tm_seconds / ours_seconds:.1f}x, memory ratio {tm_peak / ours_peak:.0f}x")

    print(f"\n{'metric':16}{'CalibrationStats':>20}{'torchmetrics':>20}{'difference':>14}")
    for name in METRICS:
        difference = tm_values[name] - ours_values[name]
        print(f"{name:16}{ours_values[name]:>20.10f}{tm_values[name]:>20.10f}{difference:>14.2e}")
    assert all(math.isfinite(value) for value in ours_values.values())
    print("\nWhere the difference comes from: " + float32_bin_sum_error(inputs[0]))

    print(f"\n--- the papers' evaluation: foreground and boundary scope ({BOUNDARY_MM:g} mm, spacing {SPACING} mm) ---")
    start = time.perf_counter()
    masks = scope_masks(inputs[1])
    mask_seconds = time.perf_counter() - start
    print("voxels per scope: " + ", ".join(f"{scope} {int(mask.sum())}" for scope, mask in masks.items())
          + f"; boundary_scope took {mask_seconds:.2f} s (the same mask for both sides, not in the times below)")
    extended_inputs = (*inputs, masks)
    ours_extended_values, monai_values = ours_extended(*extended_inputs), with_monai(*extended_inputs)
    ours_seconds, monai_seconds = best_time((ours_extended, with_monai), extended_inputs, repeats=REPEATS)
    ours_peak = peak_extra_bytes(ours_extended, *extended_inputs)
    monai_peak = peak_extra_bytes(with_monai, *extended_inputs)
    surface = run_surface(threads)

    print(f"\n{'':30}{'seconds':>10}{'peak extra MiB':>16}")
    print(f"{'CalibrationStats, 2 scopes':30}{ours_seconds:>10.2f}{ours_peak / 2**20:>16.1f}")
    print(f"{'MONAI + torch, 2 scopes':30}{monai_seconds:>10.2f}{monai_peak / 2**20:>16.1f}")
    print(f"calibration (best of {REPEATS}): ours {monai_seconds / ours_seconds:.1f}x faster than MONAI, "
          f"memory ratio {monai_peak / ours_peak:.1f}x")
    for name, label in (("ours", "surface_distances"), ("MONAI", "MONAI HD95 + ASD")):
        seconds, peak, _ = surface[name]
        print(f"{label:30}{seconds:>10.2f}{peak / 2**20:>16.1f}   (one run, peak resident set)")
    print(f"surface distances: MONAI / ours time {surface['MONAI'][0] / surface['ours'][0]:.2f}")
    total_ours = mask_seconds + ours_seconds + surface["ours"][0]
    total_monai = mask_seconds + monai_seconds + surface["MONAI"][0]
    print(f"whole set incl. the boundary mask: ours {total_ours:.1f} s, MONAI {total_monai:.1f} s")

    print(f"\n{'scope':12}{'metric':16}{'CalibrationStats':>20}{'MONAI (float32)':>20}{'difference':>14}")
    for (scope, name), value in ours_extended_values.items():
        print(f"{scope:12}{name:16}{value:>20.10f}{monai_values[scope, name]:>20.10f}"
              f"{monai_values[scope, name] - value:>14.2e}")
    for metric in ("hd95", "asd"):
        for index, label in enumerate(FOREGROUND_CLASSES):
            ours_value, monai_value = surface["ours"][2][metric][index], surface["MONAI"][2][metric][index]
            print(f"{'class ' + str(label):12}{metric + ' (mm)':16}{ours_value:>20.10f}{monai_value:>20.10f}"
                  f"{monai_value - ours_value:>14.2e}")
    assert all(math.isfinite(value) for value in ours_extended_values.values())
    print("\nMONAI sums the bins in float32 (scatter_add); ours are exact (int64 counts, float64 sums), so the "
          "differences above\nare MONAI's rounding; its distances are float32, ours float64.")


if __name__ == "__main__":
    main()
