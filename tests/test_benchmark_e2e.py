"""`nnunet-margin benchmark` end to end on the generated dataset: the cases of issue 16 (items 1-6, 8, 10), each
reproduced and now getting the correct result or a clear error.

The trainings are the cost, so every scenario reuses those of one benchmark run: nnU-Net's own trainer and a plugin
trainer, fold 0, killed with SIGKILL during its first training (no process of it may survive) while a second runner
is refused, then resumed to completion. A second benchmark of the plugin trainer with a test set shares its training;
a `cp -a` copy of the results tree then gets a retrained model. The killed run is the real `nnunet-margin` process;
the other runs, dry runs, refusals and argument checks call the command in this process (`cli.main`), and every
step of a run is its own process running nnU-Net's or this package's command.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import signal
import subprocess
import time
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import BIN, DATASET_NAME
from nnunet_margin import cli
from nnunet_margin.nnunet.benchmark.runners import BENCHMARK_MARKER
from process_checks import alive, descendants, processes_with

pytestmark = pytest.mark.e2e

NNUNET, PLUGIN = "nnUNetTrainer_demo", "nnUNetTrainerMbLS_demo"  # nnU-Net's own trainer and a plugin trainer
TRAINERS = [NNUNET, PLUGIN]
BENCHMARKS = Path(DATASET_NAME) / "calibration_benchmarks"


@dataclass
class Setup:
    env: dict
    results: Path
    images: Path  # a copy of the dataset's test set, which the tests change
    labels: Path

    def arguments(self, *trainers: str, folds: tuple[str, ...] = ("0",), test_set: bool = False) -> list[str]:
        arguments = ["benchmark", DATASET_NAME, "-c", "3d_fullres", "-tr", *trainers, "-f", *folds, "-device", "cpu"]
        return arguments + (["--test-images", str(self.images), "--test-labels", str(self.labels)] if test_set else [])

    def run(self, *arguments: str, results: Path | None = None) -> tuple[int, str, str]:
        """`nnunet-margin ARGUMENTS` in this process, with the dataset's environment (and another nnUNet_results)."""
        out, err = io.StringIO(), io.StringIO()
        with pytest.MonkeyPatch.context() as patch, redirect_stdout(out), redirect_stderr(err):
            for name, value in {**self.env, "nnUNet_results": str(results or self.results)}.items():
                patch.setenv(name, value)
            code = cli.main(list(arguments))
        return code, out.getvalue(), err.getvalue()

    def folder(self, output: str, results: Path | None = None) -> Path:
        """The benchmark folder a run printed ("... results in FOLDER" or "# benchmark FOLDER ...")."""
        for line in output.splitlines():
            if "results in " in line:
                return Path(line.rsplit("results in ", 1)[1])
            if line.startswith("# benchmark "):
                return Path(line.split()[2].rstrip(":"))
        raise AssertionError(f"no benchmark folder in:\n{output}")


@pytest.fixture(scope="module")
def setup(nnunet_env, tmp_path_factory) -> Setup:
    root = tmp_path_factory.mktemp("benchmark")
    for name in ("imagesTs", "labelsTs"):
        shutil.copytree(nnunet_env.raw / name, root / name)  # keeps modification times
    env = {**nnunet_env.env, "nnUNet_n_proc_DA": "0", "nnUNet_npp": "0", "nnUNet_nps": "0"}
    return Setup(env, root / "results", root / "imagesTs", root / "labelsTs")


def planned_steps(dry_run: str) -> list[tuple[str, list[str], str]]:
    """(step, the numbers it waits for, command) of each step a dry run prints."""
    lines = dry_run.strip().splitlines()
    assert lines[0].startswith("# benchmark "), lines[0]
    steps = []
    for title, command in zip(lines[1::2], lines[2::2]):
        number, step, *waits = title.replace("  waits for", "").split()
        assert number == f"[{len(steps) + 1}]" and command.startswith("    "), (title, command)
        steps.append((step, waits, command.strip()))
    return steps


# --- item 8: the dry run's order --------------------------------------------------------------------------------------

def test_dry_run_lists_every_step_after_the_steps_it_waits_for(setup, tmp_path):
    """Issue 16.8: every step, including those that only become pending after earlier ones (the export after a refit),
    each after the steps it waits for, so that submitting each line as a cluster job in order works."""
    code, out, err = setup.run(*setup.arguments(*TRAINERS, test_set=True), "--post-hoc", "temperature", "vector",
                               "--repeats", "2", "--dry-run", results=tmp_path / "results")
    assert code == 0, err
    steps = planned_steps(out)
    numbers = {step: f"[{index}]" for index, (step, _, _) in enumerate(steps, 1)}
    per_repeat = {"train": 2, "cross-validation": 2, "fit": 4, "export": 4, "predict": 6, "test-evaluation": 6}
    kinds = [step.rsplit("/", 1)[-1] for step, _, _ in steps]
    assert {kind: kinds.count(kind) for kind in per_repeat} == {kind: 2 * n for kind, n in per_repeat.items()}
    assert kinds[-1] == "report" and len(steps) == 2 * sum(per_repeat.values()) + 1
    position = {step: index for index, (step, _, _) in enumerate(steps)}
    waits_of = dict((step, waits) for step, waits, _ in steps)
    for step, waits, command in steps:
        assert all(int(wait.strip("[]")) - 1 < position[step] for wait in waits), step
    for repeat in (1, 2):
        for trainer in TRAINERS:
            for calibrator in ("temperature", "vector"):
                method = f"repeat_{repeat}/{trainer}+{calibrator}"
                assert waits_of[f"{method}/fold_0/fit"] == [numbers[f"repeat_{repeat}/{trainer}/fold_0/train"]]
                assert {numbers[f"repeat_{repeat}/{trainer}/fold_0/train"], numbers[f"{method}/fold_0/fit"]} \
                    <= set(waits_of[f"{method}/export"])
                assert waits_of[f"{method}/predict"] == [numbers[f"{method}/export"]]
                assert waits_of[f"{method}/test-evaluation"] == [numbers[f"{method}/predict"]]
    commands = dict((step, command) for step, _, command in steps)
    assert commands[f"repeat_1/{NNUNET}/fold_0/train"] == (
        f"nnUNetv2_train {DATASET_NAME} 3d_fullres 0 -tr nnUNetTrainer_demo -p nnUNetPlans --c -device cpu --npz")
    assert "--npz" not in commands[f"repeat_1/{PLUGIN}/fold_0/train"]  # fit-calibration reads the logit samples
    assert commands["repeat_2/nnUNetTrainer_demo/fold_0/train"].startswith(
        f"nnUNet_results={tmp_path / 'results' / BENCHMARKS / '_trainings' / 'repeat_2'} nnUNetv2_train")
    assert commands[f"repeat_1/{NNUNET}+vector/fold_0/fit"].endswith(
        "--method vector --fit-on fold -f 0 -device cpu --revalidate")  # nnU-Net's trainers write no logit sample
    assert commands[f"repeat_1/{PLUGIN}/predict"].startswith("nnunet-margin predict -i ")
    assert "--continue_prediction" not in out and "--overwrite" not in out
    assert not (tmp_path / "results").exists(), "a dry run writes nothing"


# --- items 1 and 8: one runner; killed and resumed --------------------------------------------------------------------

def _marked_processes(folder: Path) -> list[int]:
    """Processes whose environment names the benchmark folder (every process of its steps has it)."""
    return processes_with(f"{BENCHMARK_MARKER}={folder}\0".encode())


def tree_depth(tree: dict[int, int]) -> int:
    return max(tree.values(), default=0)


@pytest.fixture(scope="module")
def first_benchmark(setup) -> dict:
    """The benchmark of TRAINERS: dry run; a run killed with SIGKILL while nnU-Net's first training and its data-
    augmentation workers run, during which a second runner is refused; the resumed run; a run with nothing to do."""
    arguments = setup.arguments(*TRAINERS) + ["--baseline", "nnUNetTrainer_demo"]
    code, dry_run, err = setup.run(*arguments, "--dry-run")
    assert code == 0, err
    folder = setup.folder(dry_run)
    assert not folder.exists(), "a dry run writes nothing"

    env = {**setup.env, "nnUNet_results": str(setup.results), "nnUNet_n_proc_DA": "1"}  # workers to kill too
    first = subprocess.Popen([str(BIN / "nnunet-margin"), *arguments], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline, output = time.time() + 600, []
    for line in first.stdout:
        output.append(line)
        if line.startswith("[1/") and "running" in line:
            break
        assert time.time() < deadline and first.poll() is None, "".join(output)
    second = setup.run(*arguments)  # quick: the dry run above imported nnU-Net into this process
    previous, tree = {}, {}  # runner > step > nnUNetv2_train > its workers, in two samples (not a passing helper)
    while min(tree_depth(previous), tree_depth(tree)) < 3:
        assert time.time() < deadline and first.poll() is None, "nnU-Net's training started no worker processes"
        time.sleep(0.5)
        previous, tree = tree, descendants(first.pid)
    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=60)
    first.stdout.close()
    deadline = time.time() + 60
    while (_marked_processes(folder) or any(map(alive, tree))) and time.time() < deadline:
        time.sleep(0.2)
    survivors = _marked_processes(folder) + [pid for pid in tree if alive(pid)]
    report_after_kill = (folder / "report" / "report.md").exists()

    resumed = setup.run(*arguments)
    again = setup.run(*arguments)
    return {"folder": folder, "dry_run": dry_run, "second": second, "tree": tree, "killed": first.pid,
            "survivors": survivors, "report_after_kill": report_after_kill, "resumed": resumed, "again": again}


def test_a_second_runner_is_refused_naming_the_first(first_benchmark):
    """Issue 16.1: two runs at once would train the same fold."""
    code, out, err = first_benchmark["second"]
    assert code == 2 and out == ""
    assert "is being run by pid" in err and "one runner per benchmark" in err and str(first_benchmark["folder"]) in err


def test_sigkill_of_the_runner_leaves_no_process_and_no_report(first_benchmark):
    """Issue 16.1: killing the parent left nnUNetv2_train running; now its steps, nnU-Net and nnU-Net's workers die
    with it, and nothing of the killed step is kept."""
    assert max(first_benchmark["tree"].values()) >= 3, first_benchmark["tree"]  # runner > step > nnU-Net > worker
    assert first_benchmark["survivors"] == []
    assert not first_benchmark["report_after_kill"]


def test_the_resumed_benchmark_runs_what_the_dry_run_listed_once_and_reports(first_benchmark):
    folder, (code, resumed, err) = first_benchmark["folder"], first_benchmark["resumed"]
    assert code == 0, resumed[-4000:] + err[-3000:]
    assert "[1/" in resumed and "done" in resumed
    planned = [command for _, _, command in planned_steps(first_benchmark["dry_run"])]
    assert f"nnUNetv2_train {DATASET_NAME} 3d_fullres 0 -tr nnUNetTrainer_demo -p nnUNetPlans --c -device cpu --npz" \
        == planned[0]  # nnU-Net's own trainer exports its validation probabilities
    assert planned[1].startswith(f"nnUNetv2_train {DATASET_NAME} 3d_fullres 0 -tr nnUNetTrainerMbLS_demo")
    executed = list(dict.fromkeys((folder / "commands.log").read_text().splitlines()))  # rerun steps once
    assert executed == planned
    assert f"{NNUNET}/fold_0/train: done" in resumed  # the killed training is redone
    assert f"note: the run of pid {first_benchmark['killed']} on host" in resumed  # its lock is taken over

    for name in ("report/report.md", "report/table.csv", "report/table.tex", "report/compare.png", "benchmark.json"):
        assert (folder / name).stat().st_size > 0, name
    rows = {row["method"]: row for row in csv.DictReader(io.StringIO((folder / "report" / "table.csv").read_text()))}
    assert set(rows) == set(TRAINERS)
    for row in rows.values():
        for metric in ("dice", "ece", "classwise_ece", "ace", "brier", "nll"):
            assert math.isfinite(float(row[f"{metric}_mean"])), (row["method"], metric)
    report = (folder / "report" / "report.md").read_text()
    assert "nnUNetv2_train" in report and "Versions:" in report
    settings = json.loads((folder / "benchmark.json").read_text())
    assert settings["plugin_trainers"] == {"nnUNetTrainerMbLS_demo": True, "nnUNetTrainer_demo": False}
    assert not list(folder.rglob(".*.partial-*")) and not list(folder.rglob(".*.old-*"))

    code, out, err = first_benchmark["again"]
    assert code == 0 and "0 of 5 step(s) to run" in out, err  # nothing is redone
    assert (folder / "commands.log").read_text().splitlines()[-1] == planned[-1]


# --- items 2, 3, 5, 8: other settings -----------------------------------------------------------------------------

def _files(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns)
            for path in folder.rglob("*") if path.is_file() and path.name != "lock"}


@pytest.fixture(scope="module")
def second_benchmark(setup, first_benchmark) -> dict:
    """The plugin trainer alone, fold 0, with the test set, in the same results: its training is the first
    benchmark's, and its model folder has a fold_1 too (a copy of fold_0: a trained fold the benchmark did not ask
    for)."""
    model = setup.results / DATASET_NAME / f"{PLUGIN}__nnUNetPlans__3d_fullres"
    subprocess.run(["cp", "-a", str(model / "fold_0"), str(model / "fold_1")], check=True)
    first_files = _files(first_benchmark["folder"])
    code, out, err = setup.run(*setup.arguments(PLUGIN, test_set=True))
    assert code == 0, out[-3000:] + err[-3000:]
    return {"folder": setup.folder(out), "out": out, "first_files": first_files}


def test_a_second_benchmark_with_other_trainers_keeps_the_first(first_benchmark, second_benchmark):
    """Issue 16.5: a second benchmark of the dataset overwrote the first's report and mixed its test folder in."""
    folder = second_benchmark["folder"]
    assert folder != first_benchmark["folder"] and folder.parent == first_benchmark["folder"].parent
    assert _files(first_benchmark["folder"]) == second_benchmark["first_files"]
    assert "4 of 5 step(s) to run" in second_benchmark["out"] and "/train: running" not in second_benchmark["out"]
    rows = list(csv.DictReader(io.StringIO((folder / "report" / "table.csv").read_text())))
    assert [row["method"] for row in rows] == [PLUGIN]
    test_rows = list(csv.DictReader(io.StringIO((folder / "report/repeat_1/test/table.csv").read_text())))
    assert [row["method"] for row in test_rows] == [PLUGIN] and test_rows[0]["dice_n"] == "2"


def test_the_cross_validation_holds_only_the_folds_asked_for(setup, second_benchmark):
    """Issue 16.3 (shrunk folds): `-f 0` with a fold_1 present put fold 1's cases into the cross-validation table."""
    splits = json.loads((Path(setup.env["nnUNet_preprocessed"]) / DATASET_NAME / "splits_final.json").read_text())
    rows = list(csv.DictReader(io.StringIO((second_benchmark["folder"] / "report" / "table.csv").read_text())))
    assert rows[0]["dice_n"] == str(len(splits[0]["val"]))
    sources = (second_benchmark["folder"] / "report/repeat_1/cross_validation/report.md").read_text()
    assert "fold_0/validation/calibration.json" in sources and "fold_1" not in sources


def test_grown_folds_are_a_new_benchmark_that_predicts_with_every_fold(setup, second_benchmark):
    """Issue 16.3 (grown folds): `-f 0 1` reused the fold-0 export and predictions."""
    code, out, err = setup.run(*setup.arguments(PLUGIN, folds=("0", "1"), test_set=True), "--dry-run")
    assert code == 0, err
    assert setup.folder(out) != second_benchmark["folder"]
    commands = dict((step, command) for step, _, command in planned_steps(out))
    assert " -f 0 1 --save_probabilities" in commands[f"repeat_1/{PLUGIN}/predict"]
    assert {f"repeat_1/{PLUGIN}/fold_1/cross-validation", f"repeat_1/{PLUGIN}/test-evaluation",
            "report"} <= set(commands)


def test_more_repeats_keep_the_first_repeat(setup, second_benchmark):
    """Issue 16.8: `--repeats 2` after a single run re-predicted repeat 1, whose test folder moved."""
    code, out, err = setup.run(*setup.arguments(PLUGIN, test_set=True), "--repeats", "2", "--dry-run")
    assert code == 0, err
    assert setup.folder(out) == second_benchmark["folder"]
    steps = [step for step, _, _ in planned_steps(out)]
    assert steps == [f"repeat_2/{PLUGIN}/fold_0/train", f"repeat_2/{PLUGIN}/fold_0/cross-validation",
                     f"repeat_2/{PLUGIN}/predict", f"repeat_2/{PLUGIN}/test-evaluation", "report"]


def test_a_changed_test_set_is_another_benchmark(setup, second_benchmark, tmp_path):
    """Issue 16.2: other or changed --test-labels and --test-images ran 0 steps and kept the old numbers."""
    arguments = setup.arguments(PLUGIN, test_set=True)
    label = sorted(setup.labels.iterdir())[0]
    original = tmp_path / label.name
    shutil.copy2(label, original)
    try:
        label.write_bytes(label.read_bytes() + b"\0")  # a changed reference segmentation
        code, out, err = setup.run(*arguments, "--dry-run")
        assert code == 0, err
        assert setup.folder(out) != second_benchmark["folder"]
        assert {f"repeat_1/{PLUGIN}/predict", f"repeat_1/{PLUGIN}/test-evaluation"} \
            <= {step for step, _, _ in planned_steps(out)}
        code, out, err = setup.run(*arguments, "--name", second_benchmark["folder"].name)
        assert code == 2 and f"test labels: {label.name} modified" in err and "pass another --name" in err
    finally:
        shutil.copy2(original, label)
    images = tmp_path / "imagesTs"
    shutil.copytree(setup.images, images)
    code, out, err = setup.run(*arguments[:-4], "--test-images", str(images), "--test-labels", str(setup.labels),
                               "--name", second_benchmark["folder"].name)
    assert code == 2 and f"test images {setup.images.resolve()} -> {images.resolve()}" in err
    code, out, err = setup.run(*arguments, "--status")
    assert code == 0 and setup.folder(out) == second_benchmark["folder"] and out.splitlines()[0].endswith("5 done")


# --- items 4 and 6: a copied results tree, a retrained model ------------------------------------------------------

def _probabilities(folder: Path) -> dict[str, np.ndarray]:
    return {path.name: np.load(path)["probabilities"] for path in sorted(folder.glob("*.npz"))}


@pytest.fixture(scope="module")
def copied_and_retrained(setup, second_benchmark) -> dict:
    """The results tree copied with `cp -a`, the second benchmark run there; then fold 0 of its model retrained (its
    weights changed, a newer checkpoint_final.pth) and the benchmark run again."""
    copy = setup.results.parent / "copied results"
    subprocess.run(["cp", "-a", str(setup.results), str(copy)], check=True)
    arguments = setup.arguments(PLUGIN, test_set=True)
    untouched = setup.run(*arguments, results=copy)
    folder = copy / second_benchmark["folder"].relative_to(setup.results)
    predictions = folder / f"repeat_1/test/{PLUGIN}/predictions"
    before = _probabilities(predictions)
    checkpoint_file = copy / DATASET_NAME / f"{PLUGIN}__nnUNetPlans__3d_fullres/fold_0/checkpoint_final.pth"
    checkpoint = torch.load(checkpoint_file, map_location="cpu", weights_only=False)
    generator = torch.Generator().manual_seed(0)
    for weights in checkpoint["network_weights"].values():
        if weights.is_floating_point():
            weights += 0.05 * weights.std().nan_to_num() * torch.randn(weights.shape, generator=generator)
    torch.save(checkpoint, checkpoint_file)
    retrained = setup.run(*arguments, results=copy)
    return {"untouched": untouched, "retrained": retrained, "folder": folder, "before": before,
            "after": _probabilities(predictions)}


def test_a_copied_results_tree_is_done(copied_and_retrained):
    """Issue 16.6: a results tree copied with `cp -a` could never finish; its benchmarks are as done as the original."""
    code, out, err = copied_and_retrained["untouched"]
    assert code == 0 and "0 of 5 step(s) to run" in out, out + err


def test_a_retrained_model_is_validated_and_predicted_again(copied_and_retrained, second_benchmark):
    """Issue 16.4: after a retrain the prediction skipped every case and failed on every rerun; now the new checkpoint
    is validated and predicts the test set again, into the same folder, swapped in complete."""
    code, out, err = copied_and_retrained["retrained"]
    assert code == 0, out[-3000:] + err[-3000:]
    assert "5 of 5 step(s) to run" in out
    folder = copied_and_retrained["folder"]
    commands = (folder / "commands.log").read_text().splitlines()
    assert any(command.endswith(" --val -device cpu") for command in commands)
    assert commands[-3].startswith("nnunet-margin predict") and "--continue_prediction" not in commands[-3]
    before, after = copied_and_retrained["before"], copied_and_retrained["after"]
    assert before.keys() == after.keys() and len(after) == 2
    assert not all(np.allclose(before[name], after[name]) for name in after)
    assert not list(folder.rglob(".*.partial-*")) and not list(folder.rglob(".*.old-*"))
    original = _probabilities(second_benchmark["folder"] / f"repeat_1/test/{PLUGIN}/predictions")
    assert all(np.array_equal(original[name], before[name]) for name in before)  # the original tree is untouched


# --- issues 17.5 and 18.3: the test set predicted by `nnunet-margin predict`; post-hoc calibrators -----------------

def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns)
            for path in folder.rglob("*") if path.is_file()}


@pytest.fixture(scope="module")
def post_hoc_benchmark(setup, first_benchmark) -> dict:
    """The plugin trainer (fold 0, trained by the first benchmark) with temperature and vector scaling fitted per
    fold on its validation logit sample, in the benchmark's views of the model, and tested on the test set; the model
    folder itself stays as it is. (nnU-Net's own trainers, whose validation is run again into the views, cost two
    validations more: bench/bench_posthoc_scopes.py runs them.)"""
    fold = setup.results / DATASET_NAME / f"{PLUGIN}__nnUNetPlans__3d_fullres" / "fold_0"
    before = _listing(fold)
    code, out, err = setup.run(*setup.arguments(PLUGIN, test_set=True), "--post-hoc", "temperature", "vector")
    assert code == 0, out[-4000:] + err[-3000:]
    return {"folder": setup.folder(out), "out": out, "fold": fold, "before": before}


def test_each_calibrator_is_a_row_of_the_test_table_with_its_gain_and_fitted_map(post_hoc_benchmark):
    """Issue 18.3: the fold ensemble before and after each calibrator on the test set, what each gains per test
    case with paired confidence intervals, and the fitted maps; issue 17.5: the failure detection of each."""
    folder = post_hoc_benchmark["folder"]
    assert "12 of 13 step(s) to run" in post_hoc_benchmark["out"] and "/train: running" not in post_hoc_benchmark["out"]
    rows = {row["method"]: row for row in csv.DictReader((folder / "report/repeat_1/test/table.csv").open())}
    assert set(rows) == {PLUGIN, f"{PLUGIN}+temperature", f"{PLUGIN}+vector"}
    for row in rows.values():
        assert row["dice_n"] == "2" and all(math.isfinite(float(row[f"{metric}_mean"])) for metric in ("ece", "nll"))
    assert rows[f"{PLUGIN}+temperature"]["nll_mean"] != rows[PLUGIN]["nll_mean"]  # the map is folded in
    gains = list(csv.DictReader((folder / "report/repeat_1/test/post_hoc_gains.csv").open()))
    assert {(row["calibrator"], row["metric"]) for row in gains} == {
        (calibrator, metric) for calibrator in ("temperature", "vector")
        for metric in ("ece", "classwise_ece", "nll", "brier", "dice")}
    for row in gains:
        assert row["n"] == "2" and float(row["ci_low"]) <= float(row["difference"]) <= float(row["ci_high"]), row
        expected = float(rows[f"{PLUGIN}+{row['calibrator']}"][f"{row['metric']}_mean"]) \
            - float(rows[PLUGIN][f"{row['metric']}_mean"])
        assert float(row["difference"]) == pytest.approx(expected, abs=1e-9)
    report = (folder / "report" / "report.md").read_text()
    view = folder / "repeat_1/post_hoc" / f"{PLUGIN}+temperature" / DATASET_NAME / \
        f"{PLUGIN}__nnUNetPlans__3d_fullres" / "fold_0"
    temperature = json.loads((view / "calibration_map.json").read_text())["calibration"]["info"]["temperature"]
    assert f"| {PLUGIN} | temperature | 1 | 0 | T = {temperature:.4g} |" in report
    assert f"| {PLUGIN} | vector | 1 | 0 | ‖A − I‖ = " in report
    assert "### What each post-hoc calibrator gains on the test cases (repeat 1)" in report
    # issue 17.5: failure detection of every method's ensemble predictions (nnunet-margin predict's scores)
    failure = list(csv.DictReader((folder / "report/repeat_1/test/failure_detection.csv").open()))
    for method in rows:
        section = json.loads((folder / f"repeat_1/test/{method}/evaluation/calibration.json").read_text())[
            "failure_detection"]
        method_rows = {row["score"]: row for row in failure if row["method"] == method}
        assert set(method_rows) == set(section["scores"]) and "entropy_foreground" in method_rows, method
        for score, row in method_rows.items():
            assert row["n_cases"] == "2" and float(row["aurc_value"]) == pytest.approx(section["scores"][score]["aurc"])
    assert "### Failure detection on the test cases (repeat 1)" in report


def test_the_calibrators_are_fitted_beside_the_model_folder_without_writing_into_it(post_hoc_benchmark):
    """The maps are fitted in the benchmark's views (links to the model's files), each calibrator its own, and
    the plugin trainer's logit sample is read through a link; the model folder is unchanged."""
    folder, fold = post_hoc_benchmark["folder"], post_hoc_benchmark["fold"]
    assert _listing(fold) == post_hoc_benchmark["before"]
    for calibrator in ("temperature", "vector"):
        view = folder / "repeat_1/post_hoc" / f"{PLUGIN}+{calibrator}" / fold.relative_to(fold.parents[2])
        assert (view / "checkpoint_final.pth").is_symlink()
        assert json.loads((view / "calibration_map.json").read_text())["calibration"]["method"] == calibrator
        assert (view / "validation" / "logit_sample.nnunet_margin").is_symlink()
    commands = (folder / "commands.log").read_text()
    assert f"nnunet-margin export-portable {folder / 'repeat_1/post_hoc'}" in commands


# --- item 10: arguments checked before any step -------------------------------------------------------------------

def _test_set_variant(setup: Setup, root: Path, drop_label: bool) -> tuple[Path, Path]:
    images, labels = root / "imagesTs", root / "labelsTs"
    shutil.copytree(setup.images, images)
    shutil.copytree(setup.labels, labels)
    if drop_label:
        sorted(labels.iterdir())[0].unlink()
    else:
        shutil.copy2(sorted(labels.iterdir())[0], labels / "case_999.nii.gz")
    return images, labels


@pytest.mark.parametrize("change, expected", [
    (["-tr", "nnUNetTrainer_demo", "nnUNetTrainerMbLS_demo", "nnUNetTrainer_demo"],
     "-tr lists nnUNetTrainer_demo more than once: list each once"),
    (["-f", "x"], "-f x: folds are numbers of nnU-Net's cross-validation split"),
    (["-f", "0", "7"], "-f 7: nnU-Net's cross-validation of this dataset has 5 folds (0-4, splits_final.json), and "
                       "trains any other fold on a random 80:20 split; pass folds 0-4, or --random-split-folds"),
    (["-device", "cuda", "--gpus", "99"], "--gpus 99: this machine shows"),
    (["-c", "3d_lowres_typo"], "-c 3d_lowres_typo: nnUNetPlans.json has no such configuration (it has "),
    (["-p", "nnUNetResEncPlans"], "-p nnUNetResEncPlans: there is no "),
    (["-tr", "nnUNetTrainerNoSuchThing"], "-tr nnUNetTrainerNoSuchThing: nnU-Net cannot find this trainer"),
    ("unlabelled", "--test-labels: no label for 1 test case(s) case_010 "),
    ("label without image", "--test-labels: 1 label(s) case_999 have no image in --test-images"),
])
def test_bad_arguments_are_refused_before_any_step(setup, tmp_path, change, expected):
    """Issue 16.10: these were accepted and failed late, or ran (fold 7: nnU-Net's random split)."""
    arguments = setup.arguments("nnUNetTrainer_demo")
    if isinstance(change, str):
        images, labels = _test_set_variant(setup, tmp_path, change == "unlabelled")
        arguments += ["--test-images", str(images), "--test-labels", str(labels)]
    else:
        position = {"-tr": 4, "-f": 6}.get(change[0])
        arguments = arguments[:position] + change + arguments[position + 2:] if position else arguments + change
    code, out, err = setup.run(*arguments, results=tmp_path / "results")
    assert code == 2 and expected in err, err
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("change, expected", [
    (["--post-hoc-fit", "images"], "--post-hoc-fit images fits each calibrator on the fold ensemble's predictions of a "
                                   "held-out calibration set: pass its images and labels with --calibration-images"),
    (["--post-hoc-fit", "pooled"], "--post-hoc-fit pooled fits one map on several folds' validation cases, but -f has "
                                   "only fold 0: pass two or more folds"),
    ("same as the test set", "--calibration-images and --test-images are the same folder"),
    ("unlabelled", "--calibration-labels: no label for 1 calibration case(s) case_010 "),
    ("a test case", "--calibration-images and --test-images share 1 case(s) case_010: the calibrators would be "
                    "measured on cases they were fitted on"),
])
def test_bad_post_hoc_arguments_are_refused_before_any_step(setup, tmp_path, change, expected):
    """Issue 18.3: the calibration set of --post-hoc-fit images is checked as the test set is, and kept apart from
    it."""
    arguments = setup.arguments("nnUNetTrainer_demo", test_set=True) + ["--post-hoc", "temperature", "vector"]
    if isinstance(change, list):
        arguments += change
    else:
        images, labels = setup.images, setup.labels
        if change != "same as the test set":  # a copy of the test set whose case_011 is renamed (case_010 stays)
            images, labels = tmp_path / "imagesCal", tmp_path / "labelsCal"
            shutil.copytree(setup.images, images)
            shutil.copytree(setup.labels, labels)
            for path in [*images.iterdir(), *labels.iterdir()]:
                if path.name.startswith("case_011"):
                    path.rename(path.with_name(path.name.replace("case_", "calibration_")))
            if change == "unlabelled":
                (labels / "case_010.nii.gz").unlink()
        arguments += ["--post-hoc-fit", "images", "--calibration-images", str(images), "--calibration-labels",
                      str(labels)]
    code, out, err = setup.run(*arguments, results=tmp_path / "results")
    assert code == 2 and expected in err, err
    assert not (tmp_path / "results").exists()
