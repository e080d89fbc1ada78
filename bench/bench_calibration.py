"""Benchmark: the full calibration metric set on a 256^3 x 4-class volume (CPU), CalibrationStats vs torchmetrics.

Both compute ECE, MCE, classwise ECE, Brier score and NLL of the same probabilities:

* ours: one `CalibrationStats.update` + `compute()` (one pass, chunked, int64/float64 per-bin sums);
* torchmetrics: `MulticlassCalibrationError` with norm "l1" (ECE) and "max" (MCE), one `BinaryCalibrationError` per
  class for the classwise ECE (torchmetrics has no classwise ECE), Brier and NLL in plain torch via a one-hot
  target, i.e. how one would write the same set with the existing tools.

The volume looks like a segmentation output: 4 classes (3 balls in background), confident softmax predictions with
some errors, so the most confident bin holds most of the ~16.8 M voxels.

Peak extra memory is measured as the peak of live tensor bytes allocated inside the measured call, with a small
`TorchDispatchMode` that records the storage of every op output and releases it through a `weakref.finalize` on
the tensor. Tensors that exist before the call (the inputs) do not count; views and in-place results of them are
not counted either. This is exact for tensor memory and independent of the allocator, unlike ru_maxrss; it does not
see non-tensor memory (Python objects, numpy arrays), which neither side uses in any quantity.

Timings are the best of 3 interleaved runs. On a machine shared with other jobs, multi-threaded torch ops can
stall on each other's threads (each op waits for its slowest thread), so compare with `--threads 1` there.

Run: .venv/bin/python bench/bench_calibration.py [--threads N]   (about 1-2 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import peak_extra_bytes  # noqa: E402

from nnunet_margin.calibration import CalibrationStats  # noqa: E402

SIZE = 256
NUM_CLASSES = 4
N_BINS = 15
METRICS = ("ece", "mce", "classwise_ece", "brier", "nll")
REPEATS = 3


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


if __name__ == "__main__":
    main()
