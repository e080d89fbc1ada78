"""`nnunet-margin benchmark` end to end on the generated dataset: a plugin trainer and nnU-Net's own trainer, one
fold. The run is killed during its second step and rerun to completion; `--dry-run` printed exactly the commands that
ran. The held-out test set and post-hoc temperature scaling add steps whose commands are checked from the dry run
(their commands are tested end to end elsewhere: export-portable, nnUNetv2_predict, calibration; `make
demo-benchmark` runs them all)."""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import BIN, DATASET_ID, DATASET_NAME

pytestmark = pytest.mark.e2e

TRAINERS = ["nnUNetTrainerMbLS_demo", "nnUNetTrainer_demo"]


@pytest.fixture(scope="module")
def bench_env(nnunet_env, tmp_path_factory):
    results = tmp_path_factory.mktemp("benchmark_results")
    env = {**nnunet_env.env, "nnUNet_results": str(results), "nnUNet_n_proc_DA": "0"}
    arguments = [str(BIN / "nnunet-margin"), "benchmark", str(DATASET_ID), "-c", "3d_fullres", "-tr", *TRAINERS,
                 "-f", "0", "--baseline", "nnUNetTrainer_demo", "-device", "cpu"]
    test_set = ["--post-hoc", "temperature", "--test-images", str(nnunet_env.raw / "imagesTs"),
                "--test-labels", str(nnunet_env.raw / "labelsTs")]
    return env, arguments, test_set, results / DATASET_NAME / "calibration_benchmark__3d_fullres"


def test_dry_run_of_a_benchmark_with_a_test_set_and_post_hoc_temperature(bench_env):
    env, arguments, test_set, folder = bench_env
    dry_run = subprocess.run(arguments + test_set + ["--dry-run"], env=env, capture_output=True, text=True,
                             timeout=300)
    assert dry_run.returncode == 0, dry_run.stderr[-3000:]
    planned = dry_run.stdout.strip().splitlines()
    steps = [" ".join(itertools.takewhile(lambda word: not word.startswith("/") and word != "-i", line.split()))
             for line in planned]
    exports = folder / "exports" / "repeat_1"
    assert steps == [
        f"nnUNetv2_train {DATASET_NAME} 3d_fullres 0 -tr nnUNetTrainerMbLS_demo -p nnUNetPlans --c -device cpu",
        "nnunet-margin fit-temperature",
        f"nnUNetv2_train {DATASET_NAME} 3d_fullres 0 -tr nnUNetTrainer_demo -p nnUNetPlans --c -device cpu --npz",
        "nnunet-margin calibration", "nnunet-margin fit-temperature",
        "nnunet-margin export-portable", "nnUNetv2_predict", "nnunet-margin calibration",
        f"nnUNet_results={exports} nnUNetv2_predict", "nnunet-margin calibration",
        "nnunet-margin export-portable", "nnUNetv2_predict", "nnunet-margin calibration",
        f"nnUNet_results={exports} nnUNetv2_predict", "nnunet-margin calibration"]
    assert "--temperature --allow-bound --name nnUNetTrainerMbLS_demo_temperature --overwrite -f 0" in planned[5]
    assert "-tr nnUNetTrainerMbLS_demo_temperature" in planned[8] and "--save_probabilities" in planned[8]
    assert planned[9].endswith(f"test/nnUNetTrainerMbLS_demo+temperature {nnunet_env_labels(test_set)}")
    assert not folder.exists(), "a dry run writes nothing"


def nnunet_env_labels(test_set: list[str]) -> str:
    return test_set[test_set.index("--test-labels") + 1]


def test_benchmark_survives_a_kill_and_its_dry_run_lists_the_commands(bench_env):
    env, arguments, _, folder = bench_env
    dry_run = subprocess.run(arguments + ["--dry-run"], env=env, capture_output=True, text=True, timeout=300)
    assert dry_run.returncode == 0, dry_run.stderr[-3000:]
    planned = dry_run.stdout.strip().splitlines()
    assert planned[0].startswith("nnUNetv2_train Dataset987_MarginDemo 3d_fullres 0 -tr nnUNetTrainerMbLS_demo")
    assert f"nnUNetv2_train {DATASET_NAME} 3d_fullres 0 -tr nnUNetTrainer_demo -p nnUNetPlans --c -device cpu --npz" \
        in planned  # nnU-Net's own trainer exports its validation probabilities
    assert planned[1].startswith("nnUNetv2_train")
    assert not folder.exists(), "a dry run writes nothing"

    # the first run is killed (as a cluster job or Ctrl-C would be) while its second step runs
    first = subprocess.Popen(arguments, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    deadline = time.time() + 600
    for line in first.stdout:
        if line.startswith("[2/") and "running" in line:
            time.sleep(3)
            os.killpg(first.pid, signal.SIGTERM)
            break
        assert time.time() < deadline, "the second step never started"
    first.wait(timeout=120)
    assert first.returncode != 0
    assert not (folder / "report.md").exists()

    second = subprocess.run(arguments, env=env, capture_output=True, text=True, timeout=1500)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-3000:]
    assert "[1/" in second.stdout and "done" in second.stdout

    executed = list(dict.fromkeys((folder / "commands.log").read_text().splitlines()))  # rerun steps once
    assert executed == planned

    for name in ("report.md", "table.csv", "table.tex", "compare.png", "benchmark.json"):
        assert (folder / name).stat().st_size > 0, name
    rows = {row["method"]: row for row in csv.DictReader(io.StringIO((folder / "table.csv").read_text()))}
    assert set(rows) == set(TRAINERS)
    for row in rows.values():
        for metric in ("dice", "ece", "classwise_ece", "ace", "brier", "nll"):
            assert math.isfinite(float(row[f"{metric}_mean"])), (row["method"], metric)
    report = (folder / "report.md").read_text()
    assert "nnUNetv2_train" in report and "Versions:" in report
    settings = json.loads((folder / "benchmark.json").read_text())
    assert settings["plugin_trainers"] == {"nnUNetTrainerMbLS_demo": True, "nnUNetTrainer_demo": False}

    again = subprocess.run(arguments, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "0 step(s) to run" in again.stdout  # nothing is redone
    assert Path(folder / "commands.log").read_text().splitlines()[-1] == planned[-1]
