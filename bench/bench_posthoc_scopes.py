"""Measurement: does a post-hoc map fitted for the fold ensemble (`--post-hoc-fit images`) calibrate the ensemble
better on a test set than per-fold maps (`fold`) or a map fitted on the folds' pooled validation cases (`pooled`)?

A synthetic dataset (`write_synthetic_dataset`: 32^3 volumes, 4 classes, an organ, a lesion and a tiny rare spot)
made harder by extra Gaussian noise on every image (`--noise`; without it the task is so easy that the ensemble is
calibrated to ECE 0.004 and no calibrator has anything to fix), with few training cases, and two sets drawn the
same way with other seeds: a calibration set and a test set (their cases renamed cal_XXX and test_XXX, so that the
benchmark can check they are apart). nnU-Net's `2d` configuration,
nnU-Net's default trainer (`nnUNetTrainer_demo`: nnUNetTrainer with EPOCHS x ITERATIONS iterations and no test-time
mirroring), folds 0 and 1 of nnU-Net's 5-fold split, trained long enough on few cases to become over-confident.
Then one `nnunet-margin benchmark --post-hoc temperature vector --post-hoc-fit SCOPE` per scope on the test set: the
trainings are shared, each benchmark fits, exports, predicts and reports its own calibrated ensembles. Printed:
test-set ECE, NLL and Dice (foreground scope, mean over the test cases) of the fold ensemble without calibration and
with each calibrator per scope, and what each calibrator gains per test case with its paired-bootstrap interval
(the benchmark's report/repeat_1/test/post_hoc_gains.csv).

Run (about 20 minutes of CPU on 2 shared cores with the defaults; resumable: the benchmarks keep finished steps):
    .venv/bin/python bench/bench_posthoc_scopes.py [--root DIR] [--epochs 30] [--iterations 40] [--scopes fold images]
nnU-Net does not seed its training, so the trained networks (and the numbers) differ from run to run; the datasets
are the same (seeds 0, 1, 2; noise seeds 10, 11, 12). Results go to ROOT/results.json and are printed as Markdown,
with each other scope's calibrated ensemble minus the per-fold maps' per test case (paired-bootstrap intervals).

Measured here (2 CPU cores shared with other jobs; fold 318 s with both trainings, pooled 124 s, images 90 s): test
ECE / NLL of the ensemble 0.0450 / 0.2929 uncalibrated; temperature 0.0239 / 0.2354 per fold, 0.0248 / 0.2368
pooled, 0.0235 / 0.2350 images; vector 0.0255 / 0.2313 per fold, 0.0262 / 0.2324 pooled, 0.0211 / 0.2145 images
(images minus per fold: ECE -0.0043 [-0.0057, -0.0032], NLL -0.0168 [-0.0210, -0.0123]); see README "Choosing a
method".
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DATASET_ID, DATASET_NAME = 983, "Dataset983_PosthocScopes"
TRAINER, CONFIGURATION, FOLDS = "nnUNetTrainer_demo", "2d", ("0", "1")
CALIBRATORS = ("temperature", "vector")
METRICS = ("ece", "nll", "dice")


def run(env: dict, *command: str) -> str:
    """Run an installed console script; its output, or exit with its end."""
    result = subprocess.run([str(BIN / command[0]), *command[1:]], env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result.stdout


def add_noise(images: Path, sd: float, seed: int) -> None:
    """Add Gaussian noise of standard deviation `sd` to every image in the folder (the harder variant)."""
    import numpy as np
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    for path in sorted(images.glob("*_0000.nii.gz")):
        image = sitk.ReadImage(str(path))
        array = sitk.GetArrayFromImage(image)
        noisy = sitk.GetImageFromArray((array + rng.normal(0.0, sd, array.shape)).astype(np.float32))
        noisy.CopyInformation(image)
        sitk.WriteImage(noisy, str(path))


def held_out_set(root: Path, prefix: str, cases: int, seed: int, noise: float) -> tuple[Path, Path]:
    """`cases` synthetic cases drawn with `seed` (noise with seed + 10), as ROOT/PREFIX/images and labels, named
    PREFIX_XXX."""
    from nnunet_margin.nnunet.synthetic_dataset import write_synthetic_dataset

    images, labels = root / prefix / "images", root / prefix / "labels"
    if labels.is_dir():
        return images, labels
    with tempfile.TemporaryDirectory(dir=root) as temporary:
        written = write_synthetic_dataset(temporary, dataset_id=999, num_training=0, num_test=cases, seed=seed)
        add_noise(written / "imagesTs", noise, seed + 10)
        for source, target in ((written / "imagesTs", images), (written / "labelsTs", labels)):
            target.mkdir(parents=True)
            for path in source.iterdir():
                shutil.move(str(path), target / path.name.replace("case_", f"{prefix}_"))
    return images, labels


def prepare(root: Path, env: dict, train_cases: int, noise: float) -> None:
    """Write the training dataset and plan and preprocess it for the 2d configuration (once)."""
    from nnunet_margin.nnunet.synthetic_dataset import write_synthetic_dataset

    if (root / "preprocessed" / DATASET_NAME / "nnUNetPlans_2d").is_dir():
        return
    written = write_synthetic_dataset(root / "raw", dataset_id=DATASET_ID, name="PosthocScopes",
                                      num_training=train_cases, num_test=0, seed=0)
    add_noise(written / "imagesTr", noise, 10)
    run(env, "nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", CONFIGURATION, "-np", "2", "-npfp", "2")


def benchmark(env: dict, scope: str, test: tuple[Path, Path], calibration: tuple[Path, Path]) -> tuple[Path, float]:
    """Run the benchmark of one scope; its folder and wall time."""
    command = ["nnunet-margin", "benchmark", str(DATASET_ID), "-c", CONFIGURATION, "-tr", TRAINER, "-f", *FOLDS,
               "-device", "cpu", "--post-hoc", *CALIBRATORS, "--post-hoc-fit", scope,
               "--test-images", str(test[0]), "--test-labels", str(test[1])]
    if scope == "images":
        command += ["--calibration-images", str(calibration[0]), "--calibration-labels", str(calibration[1])]
    log = Path(env["nnUNet_results"]).parent / f"benchmark_{scope}.log"  # its progress, while it runs
    started = time.time()
    with log.open("w") as output:
        code = subprocess.run([str(BIN / command[0]), *command[1:]], env=env, stdout=output, stderr=subprocess.STDOUT)
    lines = log.read_text().splitlines()
    if code.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n" + "\n".join(lines[-40:]))
    folder = next(Path(line.rsplit("results in ", 1)[1]) for line in lines if "results in " in line)
    return folder, time.time() - started


def read_results(folder: Path) -> dict:
    """Test-set means per method and the gains per calibrator, from the benchmark's report."""
    test = folder / "report" / "repeat_1" / "test"
    rows = {row["method"]: row for row in csv.DictReader((test / "table.csv").open())}
    means = {method: {metric: float(row[f"{metric}_mean"]) for metric in METRICS} for method, row in rows.items()}
    gains = {f"{row['calibrator']} {row['metric']}": [float(row[key]) for key in ("difference", "ci_low", "ci_high")]
             for row in csv.DictReader((test / "post_hoc_gains.csv").open())}
    maps = [line for line in (folder / "report" / "report.md").read_text().split("## Fitted maps")[1].splitlines()
            if line.startswith(f"| {TRAINER} |")]
    return {"means": means, "gains": gains, "maps": maps}


def scope_differences(scopes: dict) -> dict:
    """Per calibrator and other scope: the paired difference over the test cases of that scope's calibrated ensemble
    minus the per-fold maps' (ECE, NLL), with its paired-bootstrap interval."""
    import numpy as np

    from nnunet_margin.comparison import paired_difference
    from nnunet_margin.nnunet.compare_reports import load_method

    differences = {}
    for scope in (scope for scope in scopes if scope != "fold" and "fold" in scopes):
        for calibrator in CALIBRATORS:
            method = f"{TRAINER}+{calibrator}"
            this, per_fold = (load_method(str(Path(scopes[name]["folder"]) / "repeat_1" / "test" / method /
                                              "evaluation")).scores for name in (scope, "fold"))
            cases = sorted(set(this) & set(per_fold))
            for metric in ("ece", "nll"):
                d = paired_difference(np.array([this[case][metric] for case in cases]),
                                      np.array([per_fold[case][metric] for case in cases]))
                differences[f"{calibrator} {scope} {metric}"] = [d.mean, d.ci_low, d.ci_high, d.num_pairs]
    return differences


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "nnunet_margin_posthoc_scopes")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--iterations", type=int, default=40, help="training iterations per epoch")
    parser.add_argument("--train-cases", type=int, default=6)
    parser.add_argument("--calibration-cases", type=int, default=6)
    parser.add_argument("--test-cases", type=int, default=10)
    parser.add_argument("--noise", type=float, default=1.0,
                        help="standard deviation of the Gaussian noise added to every image (the generator's own is "
                             "0.35 around class means 0, 1, 2.2, 3.5): ambiguous voxels, where over-confidence shows")
    parser.add_argument("--scopes", nargs="+", default=["fold", "pooled", "images"],
                        choices=["fold", "pooled", "images"])
    args = parser.parse_args()
    root = args.root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    from nnunet_margin.cli import trainers_path

    env = {**os.environ, "nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "preprocessed"),
           "nnUNet_results": str(root / "results"), "nnUNet_def_n_proc": "1", "PYTHONUNBUFFERED": "1",
           "nnUNet_extTrainer": os.pathsep.join([str(trainers_path()), str(REPO / "demo" / "trainers")])}
    prepare(root, env, args.train_cases, args.noise)
    calibration = held_out_set(root, "cal", args.calibration_cases, 1, args.noise)
    test = held_out_set(root, "test", args.test_cases, 2, args.noise)
    env.update({"nnUNet_n_proc_DA": "0", "nnUNet_npp": "0", "nnUNet_nps": "0",
                "NNUNET_MARGIN_DEMO_EPOCHS": str(args.epochs), "NNUNET_MARGIN_DEMO_ITERATIONS": str(args.iterations)})
    results = {"setup": {**{key: value for key, value in vars(args).items() if key not in ("root", "scopes")},
                         "configuration": CONFIGURATION, "trainer": TRAINER, "folds": FOLDS,
                         "dataset_seeds": {"training": 0, "calibration": 1, "test": 2},
                         "noise_seeds": {"training": 10, "calibration": 11, "test": 12}}, "scopes": {}}
    results_file = root / "results.json"
    if results_file.is_file():
        results["scopes"] = json.loads(results_file.read_text()).get("scopes", {})
    for scope in args.scopes:
        folder, seconds = benchmark(env, scope, test, calibration)
        results["scopes"][scope] = {"folder": str(folder), "seconds": round(seconds, 1), **read_results(folder)}
        results_file.write_text(json.dumps(results, indent=1))
        print(f"{scope}: {seconds:.0f} s, {folder}", flush=True)
    results["scope_differences"] = scope_differences(results["scopes"])
    results_file.write_text(json.dumps(results, indent=1))
    print(markdown(results))


def markdown(results: dict) -> str:
    """The test-set table: the uncalibrated ensemble, then each calibrator per scope."""
    lines = ["| fold ensemble | test ECE | test NLL | test Dice |", "|---|---|---|---|"]
    scopes = results["scopes"]
    first = next(iter(scopes.values()))
    lines.append("| no calibration | " + " | ".join(f"{first['means'][TRAINER][m]:.4f}" for m in METRICS) + " |")
    for scope, result in scopes.items():
        for calibrator in CALIBRATORS:
            means = result["means"][f"{TRAINER}+{calibrator}"]
            lines.append(f"| {calibrator}, --post-hoc-fit {scope} | "
                         + " | ".join(f"{means[m]:.4f}" for m in METRICS) + " |")
    lines += ["", "| calibrator, scope | ΔECE [95 % paired CI] | ΔNLL [95 % paired CI] |", "|---|---|---|"]
    for scope, result in scopes.items():
        for calibrator in CALIBRATORS:
            cells = [result["gains"][f"{calibrator} {metric}"] for metric in ("ece", "nll")]
            lines.append(f"| {calibrator}, {scope} | "
                         + " | ".join(f"{d:+.4f} [{low:+.4f}, {high:+.4f}]" for d, low, high in cells) + " |")
    lines += ["", "| calibrator, scope minus per-fold maps | ΔECE [95 % paired CI] | ΔNLL [95 % paired CI] |",
              "|---|---|---|"]
    for key in dict.fromkeys(key.rsplit(" ", 1)[0] for key in results.get("scope_differences", {})):
        cells = [results["scope_differences"][f"{key} {metric}"][:3] for metric in ("ece", "nll")]
        lines.append(f"| {key.replace(' ', ', ')} | "
                     + " | ".join(f"{d:+.4f} [{low:+.4f}, {high:+.4f}]" for d, low, high in cells) + " |")
    lines += ["", "Fitted maps:"] + [line for result in scopes.values() for line in result["maps"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
