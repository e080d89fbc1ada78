"""`make demo` and `make demo-benchmark`: the workflow on a synthetic imbalanced 3D dataset, with the real commands.

`make demo` writes Dataset987_MarginDemo, plans and preprocesses it, shows the label statistics and margin offsets,
trains nnUNetTrainerMarginCalib on a short schedule (GPU if present, else CPU) with nnU-Net's final validation plus the
calibration report, predicts the held-out cases, and evaluates them with nnU-Net's own evaluation and the calibration
report. `make demo-benchmark` (`--benchmark`) instead compares nnU-Net's default trainer, MbLS and CALS with
`nnunet-margin benchmark` (one fold, a held-out test set, post-hoc temperature scaling). nnU-Net's epoch lines are
shown as they come. Everything goes to demo_output/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
OUTPUT = REPO / "demo_output"
BIN = Path(sys.executable).parent
DATASET_ID = "987"
TRAINER = "nnUNetTrainerMarginCalib_demo"  # nnUNetTrainerMarginCalib on a short schedule (demo/trainers)
BENCHMARK_TRAINERS = ["nnUNetTrainer_demo", "nnUNetTrainerMbLS_demo", "nnUNetTrainerCALS_demo"]
# nnU-Net's lines worth showing while it trains, validates and predicts
PROGRESS = ("Epoch ", "train_loss", "val_loss", "Pseudo dice", "loss parts", "Mean Validation Dice", "Calibration",
            "Margin offsets", "CALS lambda")


def run(*command: str, env: dict, show_all: bool = False) -> str:
    """Run a console script of this environment, streaming its progress lines; stop the demo if it fails."""
    print(f"\n$ {' '.join(command)}", flush=True)
    process = subprocess.Popen([str(BIN / command[0]), *command[1:]], env=env, text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    output, tail = [], deque(maxlen=60)
    for line in process.stdout:
        output.append(line)
        tail.append(line)
        text = line.split(": ", 1)[-1] if line[:4].isdigit() else line  # nnU-Net's timestamp prefix
        if show_all or text.startswith(PROGRESS):
            print("  " + text.rstrip(), flush=True)
    if process.wait() != 0:
        print("".join(tail))
        raise SystemExit(f"demo step failed: {' '.join(command)}")
    return "".join(output)


def environment() -> dict:
    from nnunet_margin.cli import trainers_path

    return {
        **os.environ,
        "nnUNet_raw": str(OUTPUT / "nnUNet_raw"),
        "nnUNet_preprocessed": str(OUTPUT / "nnUNet_preprocessed"),
        "nnUNet_results": str(OUTPUT / "nnUNet_results"),
        "nnUNet_extTrainer": os.pathsep.join([str(trainers_path()), str(REPO / "demo" / "trainers")]),
        "nnUNet_def_n_proc": "2",
        "NNUNET_MARGIN_DEMO_EPOCHS": os.environ.get("NNUNET_MARGIN_DEMO_EPOCHS", "15"),
        "NNUNET_MARGIN_DEMO_ITERATIONS": os.environ.get("NNUNET_MARGIN_DEMO_ITERATIONS", "20"),
        "PYTHONUNBUFFERED": "1",
    }


def prepare(device: str, num_test: int) -> tuple[Path, dict]:
    from nnunet_margin.nnunet.synthetic_dataset import write_synthetic_dataset

    shutil.rmtree(OUTPUT, ignore_errors=True)
    raw = write_synthetic_dataset(OUTPUT / "nnUNet_raw", dataset_id=int(DATASET_ID), num_training=10,
                                  num_test=num_test)
    env = environment()
    print(f"synthetic dataset: {raw} (organ, lesion and a rare spot), training on {device}")
    run("nnUNetv2_plan_and_preprocess", "-d", DATASET_ID, "-c", "3d_fullres", "-np", "2", "-npfp", "2", env=env)
    return raw, env


def workflow(device: str) -> None:
    raw, env = prepare(device, num_test=3)
    run("nnunet-margin", "label-stats", DATASET_ID, "-c", "3d_fullres", "-f", "0", "-np", "2", env=env, show_all=True)
    run("nnUNetv2_train", DATASET_ID, "3d_fullres", "0", "-tr", TRAINER, "-device", device,
        env={**env, "nnUNet_n_proc_DA": "0"})
    predicted = OUTPUT / "predicted_imagesTs"
    run("nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(predicted), "-d", DATASET_ID, "-c", "3d_fullres",
        "-f", "0", "-tr", TRAINER, "-device", device, "-npp", "0", "-nps", "0", "--save_probabilities", env=env)
    run("nnUNetv2_evaluate_simple", str(raw / "labelsTs"), str(predicted), "-l", "1", "2", "3", "-np", "2", env=env)
    run("nnunet-margin", "calibration", str(predicted), str(raw / "labelsTs"), env=env, show_all=True)

    fold = OUTPUT / "nnUNet_results" / raw.name / f"{TRAINER}__nnUNetPlans__3d_fullres" / "fold_0"
    report = json.loads((fold / "validation" / "calibration.json").read_text())
    foreground = report["summary"]["foreground"]["pooled"]
    print("\nFinal validation (fold 0):")
    print(f"  Dice per class (nnU-Net): {report.get('dice', {}).get('per_class')}")
    print(f"  calibration, foreground voxels: ECE {foreground['ece']:.4f}, classwise ECE "
          f"{foreground['classwise_ece']:.4f}, Brier {foreground['brier']:.4f}, NLL {foreground['nll']:.4f}")
    summary = json.loads((predicted / "summary.json").read_text())
    names = {str(value): name for name, value in json.loads((raw / "dataset.json").read_text())["labels"].items()}
    print("\nHeld-out predictions, nnU-Net's evaluation (summary.json), Dice per class: "
          + ", ".join(f"{names[label]} {metrics['Dice']:.3f}" for label, metrics in summary["mean"].items()))
    print(f"\nResults: {fold}\n  margin_offsets.json, checkpoint_final.pth, validation/summary.json, "
          f"validation/calibration.json, validation/reliability.png\nPredictions: {predicted} (summary.json, "
          f"calibration.json, reliability.png)")


def benchmark(device: str) -> None:
    raw, env = prepare(device, num_test=3)
    run("nnunet-margin", "benchmark", DATASET_ID, "-c", "3d_fullres", "-tr", *BENCHMARK_TRAINERS, "-f", "0",
        "--baseline", "nnUNetTrainer_demo", "--post-hoc", "temperature", "--test-images", str(raw / "imagesTs"),
        "--test-labels", str(raw / "labelsTs"), "-device", device, "--name", "demo",
        env={**env, "nnUNet_n_proc_DA": "0", "NNUNET_MARGIN_DEMO_EPOCHS": os.environ.get(
            "NNUNET_MARGIN_DEMO_EPOCHS", "5"), "NNUNET_MARGIN_DEMO_ITERATIONS": os.environ.get(
            "NNUNET_MARGIN_DEMO_ITERATIONS", "10")}, show_all=True)
    report = OUTPUT / "nnUNet_results" / raw.name / "calibration_benchmarks" / "demo" / "report" / "report.md"
    print(f"\nReport: {report}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmark", action="store_true", help="compare three methods with nnunet-margin benchmark")
    args = parser.parse_args()
    start = time.time()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.benchmark:
        benchmark(device)
    else:
        workflow(device)
    print(f"Demo finished in {time.time() - start:.0f} s. The schedule is short (a full nnU-Net training runs 250,000 "
          f"iterations): on the synthetic data the rare spot is typically not learned yet.")


if __name__ == "__main__":
    main()
