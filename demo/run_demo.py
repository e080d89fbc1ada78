"""`make demo`: the whole workflow on a synthetic imbalanced 3D dataset, with the real nnU-Net commands.

Writes Dataset987_MarginDemo, plans and preprocesses it, shows the label statistics and margin offsets, trains
nnUNetTrainerMarginCalib on a short schedule (GPU if present, else CPU) with nnU-Net's final validation plus the
calibration report, predicts the held-out cases and prints Dice per class. Everything goes to demo_output/.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

REPO = Path(__file__).resolve().parents[1]
OUTPUT = REPO / "demo_output"
BIN = Path(sys.executable).parent
DATASET_ID = "987"
TRAINER = "nnUNetTrainerMarginCalib_demo"  # nnUNetTrainerMarginCalib on a short schedule (demo/trainers)


def run(*command: str, env: dict) -> str:
    print(f"\n$ {' '.join(command)}", flush=True)
    result = subprocess.run([str(BIN / command[0]), *command[1:]], env=env, text=True, capture_output=True)
    if result.returncode != 0:
        print(result.stdout[-5000:], result.stderr[-5000:], sep="\n")
        raise SystemExit(f"demo step failed: {' '.join(command)}")
    return result.stdout


def dice_per_class(prediction: np.ndarray, truth: np.ndarray, labels: dict[str, int]) -> dict[str, float]:
    scores = {}
    for name, value in labels.items():
        if value == 0:
            continue
        predicted, actual = prediction == value, truth == value
        denominator = predicted.sum() + actual.sum()
        scores[name] = float(2 * (predicted & actual).sum() / denominator) if denominator else float("nan")
    return scores


def main() -> None:
    from nnunet_margin.cli import trainers_path
    from nnunet_margin.nnunet.synthetic_dataset import LABELS, write_synthetic_dataset

    start = time.time()
    shutil.rmtree(OUTPUT, ignore_errors=True)
    raw = write_synthetic_dataset(OUTPUT / "nnUNet_raw", dataset_id=int(DATASET_ID), num_training=10, num_test=3)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    env = {
        **os.environ,
        "nnUNet_raw": str(OUTPUT / "nnUNet_raw"),
        "nnUNet_preprocessed": str(OUTPUT / "nnUNet_preprocessed"),
        "nnUNet_results": str(OUTPUT / "nnUNet_results"),
        "nnUNet_extTrainer": os.pathsep.join([str(trainers_path()), str(REPO / "demo" / "trainers")]),
        "nnUNet_def_n_proc": "2",
        "NNUNET_MARGIN_DEMO_EPOCHS": os.environ.get("NNUNET_MARGIN_DEMO_EPOCHS", "15"),
        "NNUNET_MARGIN_DEMO_ITERATIONS": os.environ.get("NNUNET_MARGIN_DEMO_ITERATIONS", "20"),
    }
    print(f"synthetic dataset: {raw} (organ, lesion and a rare spot), training on {device}")
    run("nnUNetv2_plan_and_preprocess", "-d", DATASET_ID, "-c", "3d_fullres", "-np", "2", "-npfp", "2", env=env)
    print(run("nnunet-margin", "label-stats", DATASET_ID, "-c", "3d_fullres", "-f", "0", "-np", "2", env=env))
    run("nnUNetv2_train", DATASET_ID, "3d_fullres", "0", "-tr", TRAINER, "-device", device,
        env={**env, "nnUNet_n_proc_DA": "0"})
    predicted = OUTPUT / "predicted_imagesTs"
    run("nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(predicted), "-d", DATASET_ID, "-c", "3d_fullres",
        "-f", "0", "-tr", TRAINER, "-device", device, "-npp", "0", "-nps", "0", env=env)

    fold = OUTPUT / "nnUNet_results" / raw.name / f"{TRAINER}__nnUNetPlans__3d_fullres" / "fold_0"
    report = json.loads((fold / "validation" / "calibration.json").read_text())
    foreground = report["summary"]["foreground"]["pooled"]
    print("\nFinal validation (fold 0):")
    print(f"  Dice per class: {report.get('dice', {}).get('per_class')}")
    print(f"  calibration, foreground voxels: ECE {foreground['ece']:.4f}, classwise ECE "
          f"{foreground['classwise_ece']:.4f}, Brier {foreground['brier']:.4f}, NLL {foreground['nll']:.4f}")
    print("\nHeld-out predictions, Dice per class:")
    for prediction in sorted(predicted.glob("*.nii.gz")):
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "labelsTs" / prediction.name)))
        scores = dice_per_class(sitk.GetArrayFromImage(sitk.ReadImage(str(prediction))), truth, LABELS)
        print(f"  {prediction.name}: " + ", ".join(f"{name} {score:.3f}" for name, score in scores.items()))
    print(f"\nResults: {fold}\n  margin_offsets.json, checkpoint_final.pth, validation/summary.json, "
          f"validation/calibration.json, validation/reliability.png\nPredictions: {predicted}")
    print(f"Demo finished in {time.time() - start:.0f} s. The schedule is short (300 iterations; a full nnU-Net training "
          f"runs 250,000): the rare spot is typically not learned yet.")


if __name__ == "__main__":
    main()
