"""The benchmark's step machinery without nnU-Net: plans of small stand-in commands (Python scripts) run by the real
step processes and local executor, and the plan, identity and report statistics computed from settings.

What the end-to-end tests (tests/test_benchmark_e2e.py) show on nnU-Net's own commands, these show for every path
of the machinery: records and redo on changed inputs, a copied tree, failures, signals and SIGKILL with grandchildren,
the inherited and the shared locks, a training's completeness, the dry run's order, the identity and the spread over
repeats.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from failure_checks import aurc_by_orderings, confidences
from process_checks import alive, descendants

from nnunet_margin.nnunet.benchmark.command import _status_table, settings_record
from nnunet_margin.nnunet.benchmark.plan import Plan, Step, build_plan, make_link
from nnunet_margin.nnunet.benchmark.report import write_report
from nnunet_margin.nnunet.benchmark.runners import BENCHMARK_MARKER, LocalExecutor, run_step
from nnunet_margin.nnunet.benchmark.settings import Benchmark, BenchmarkSettings, default_name, identity_differences
from nnunet_margin.nnunet.benchmark.settings import TestSet as HeldOutSet  # not a test class
from nnunet_margin.nnunet.benchmark.state import (Hasher, Lock, _fold_outputs, describe_holder, evaluate,
                                                  failure_path, holder_info, lock_holder, read_json, record_path,
                                                  step_lock_path)

# Stand-in commands: `copy OUT SOURCE` refuses an existing OUT as export-portable does; `hang OUT PIDS` writes half
# its output, starts a grandchild, writes both pids and waits; `timed OUT SECONDS` records when it ran; `fail`.
SCRIPT = """
import os, subprocess, sys, time
from pathlib import Path
mode, out = sys.argv[1], Path(sys.argv[2])
if mode == "copy":
    if out.exists():
        sys.exit(f"{out} exists")
    out.mkdir(parents=True)
    (out / "result.txt").write_text(Path(sys.argv[3]).read_text())
elif mode == "hang":
    out.mkdir(parents=True)
    (out / "result.txt").write_text("half")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    Path(sys.argv[3]).write_text(f"{os.getpid()} {child.pid}")
    time.sleep(600)
elif mode == "timed":
    out.mkdir(parents=True)
    start = time.time()
    time.sleep(float(sys.argv[3]))
    (out / "result.txt").write_text(f"{start} {time.time()}")
else:
    sys.exit(3)
"""
# Runs a saved plan with the local executor, as `nnunet-margin benchmark` does after its checks.
DRIVER = """
import sys
from pathlib import Path
from nnunet_margin.nnunet.benchmark.plan import Plan
from nnunet_margin.nnunet.benchmark.runners import LocalExecutor
from nnunet_margin.nnunet.benchmark.state import Lock, holder_info
plan = Plan.load(Path(sys.argv[1]))
LocalExecutor(plan, [None], Lock.try_acquire(plan.folder / "lock", holder_info())).run()
"""


def stand_in(root: Path, step_id: str, mode: str, *arguments: str, needs=(), data=(), locks=()) -> Step:
    script = root / "stand_in.py"
    root.mkdir(parents=True, exist_ok=True)
    script.write_text(SCRIPT)
    output = root / "benchmark" / step_id
    return Step(step_id, "stand-in", list(needs), {"type": "folder", "folder": str(output)}, {"mode": mode},
                command=[sys.executable, str(script), mode, str(output), *arguments], results_root=str(root),
                data=list(data), locks=list(locks))


def save_plan(root: Path, steps: list[Step], data: dict | None = None) -> Plan:
    plan = Plan(root / "benchmark", root, steps, data or {})
    plan.folder.mkdir(parents=True, exist_ok=True)
    plan.save()
    return plan


def chain(root: Path) -> Plan:
    """a copies the data file values/x.txt, b copies a's output."""
    (root / "values").mkdir(parents=True, exist_ok=True)
    if not (root / "values" / "x.txt").exists():
        (root / "values" / "x.txt").write_text("first")
    steps = [stand_in(root, "a", "copy", str(root / "values" / "x.txt"), data=["values"]),
             stand_in(root, "b", "copy", str(root / "benchmark" / "a" / "result.txt"), needs=["a"])]
    return save_plan(root, steps, {"values": {"folder": str(root / "values"), "files": ["x.txt"]}})


def execute(plan: Plan) -> None:
    lock = Lock.try_acquire(plan.folder / "lock", holder_info())
    try:
        LocalExecutor(plan, [None], lock).run()
    finally:
        lock.release()


def test_a_step_is_done_while_its_recorded_inputs_and_outputs_are_current(tmp_path):
    plan = chain(tmp_path)
    assert [state.reason for state in evaluate(plan).values()] == [
        f"{tmp_path / 'benchmark' / 'a'} is not written yet", "waits for a"]
    execute(plan)
    assert all(state.done for state in evaluate(plan).values())
    record = read_json(record_path(plan, plan.step("b")))
    assert record["inputs"]["needs"]["a"] == {"files": {"result.txt": list(
        _size_and_time(tmp_path / "benchmark" / "a" / "result.txt"))}}

    (tmp_path / "values" / "x.txt").write_text("second")  # changed data: a is redone, then b
    states = evaluate(plan)
    assert states["a"].reason == "its inputs changed (data values)" and states["b"].waits_for == ["a"]
    execute(plan)  # each copy refuses an existing output folder: every run writes into a fresh one
    assert (tmp_path / "benchmark" / "b" / "result.txt").read_text() == "second"
    assert all(state.done for state in evaluate(plan).values())
    assert sorted(path.name for path in (tmp_path / "benchmark").iterdir()) == [
        "a", "b", "commands.log", "lock", "logs", "plan.json", "state"]

    (tmp_path / "benchmark" / "a" / "result.txt").write_text("edited")  # an output changed after it was recorded
    assert evaluate(plan)["a"].reason == "its outputs changed since it ran"


def _size_and_time(path: Path) -> tuple[int, int]:
    return path.stat().st_size, path.stat().st_mtime_ns


def test_a_copied_tree_is_done_and_its_steps_write_into_fresh_folders(tmp_path):
    """Issue 16.6: fingerprints name no absolute path; a redone step's command never meets the old outputs."""
    execute(chain(tmp_path / "original"))
    subprocess.run(["cp", "-a", str(tmp_path / "original"), str(tmp_path / "copy")], check=True)
    copy = chain(tmp_path / "copy")
    assert all(state.done for state in evaluate(copy).values())
    (tmp_path / "copy" / "values" / "x.txt").write_text("changed in the copy")
    execute(copy)
    assert (tmp_path / "copy" / "benchmark" / "b" / "result.txt").read_text() == "changed in the copy"
    assert (tmp_path / "original" / "benchmark" / "b" / "result.txt").read_text() == "first"


def test_a_failed_step_names_its_log_and_blocks_only_the_steps_that_need_it(tmp_path):
    (tmp_path / "source.txt").write_text("x")
    plan = save_plan(tmp_path, [stand_in(tmp_path, "bad", "fail"),
                                stand_in(tmp_path, "after", "copy", str(tmp_path / "source.txt"), needs=["bad"]),
                                stand_in(tmp_path, "other", "copy", str(tmp_path / "source.txt"))])
    with pytest.raises(RuntimeError) as error:
        execute(plan)
    log = plan.log(plan.step("bad"))
    assert f"bad: FAILED (exit code 3; see {log})" in str(error.value)
    assert "1 step(s) failed, 1 step(s) not run because they need them" in str(error.value)
    assert "bad failed with exit code 3" in log.read_text()
    states = evaluate(plan)
    assert states["other"].done and not states["after"].done and not (tmp_path / "benchmark" / "after").exists()
    assert read_json(failure_path(plan, plan.step("bad")))["exit_code"] == 3

    held = Lock.try_acquire(step_lock_path(plan, plan.step("other")), holder_info(step="other"))
    try:
        table = _status_table(_benchmark(tmp_path), plan, states).splitlines()
        holder = describe_holder(lock_holder(step_lock_path(plan, plan.step("other"))))
    finally:
        held.release()
    assert table[0].endswith(": 1 failed, 1 pending, 1 done")
    assert table[1].startswith("failed   bad  bad failed with exit code 3") and table[1].endswith(f"log {log}")
    assert table[2] == "pending  after  waits for bad" and table[3] == "done     other"
    assert holder.startswith(f"pid {os.getpid()} on")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_the_executors_end_ends_every_process_of_its_steps(tmp_path, signum):
    """Issue 16.1: SIGINT, SIGTERM and SIGKILL of the runner stop the step's command and its child; the half-written
    step is redone."""
    pids = tmp_path / "pids"
    plan = save_plan(tmp_path, [stand_in(tmp_path, "hang", "hang", str(pids))])
    runner = subprocess.Popen([sys.executable, "-c", DRIVER, str(plan.folder)], start_new_session=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while not pids.exists() or len(pids.read_text().split()) < 2:
        assert time.time() < deadline and runner.poll() is None, runner.stdout.read() if runner.poll() else ""
        time.sleep(0.05)
    processes = list(descendants(runner.pid))
    assert len(processes) == 3  # the step's process, the command, its child
    os.kill(runner.pid, signum)
    runner.communicate(timeout=60)
    assert runner.returncode != 0
    while any(map(alive, processes)):
        assert time.time() < deadline, [pid for pid in processes if alive(pid)]
        time.sleep(0.05)
    state = evaluate(plan)["hang"]
    assert not state.done and state.reason.endswith("is not written yet")  # the half-written output was not kept
    assert not any(path.name.startswith(".hang") for path in (tmp_path / "benchmark").iterdir())
    assert lock_holder(plan.folder / "lock") is None and lock_holder(step_lock_path(plan, plan.step("hang"))) is None


def test_an_orphaned_step_keeps_the_runners_lock_and_a_dead_runners_lock_is_taken_over(tmp_path):
    """The runner's lock is inherited by what it starts; the lock of a runner whose processes all died is free."""
    holder = subprocess.run([sys.executable, "-c", (
        "import subprocess, sys\nfrom pathlib import Path\n"
        "from nnunet_margin.nnunet.benchmark.state import Lock, holder_info\n"
        "lock = Lock.try_acquire(Path(sys.argv[1]), holder_info())\n"
        "print(subprocess.Popen(['sleep', '600'], pass_fds=(lock.fd,), stdout=subprocess.DEVNULL, "
        "stderr=subprocess.DEVNULL).pid)"),
        str(tmp_path / "lock")],
        capture_output=True, text=True, check=True)
    orphan = int(holder.stdout)
    try:
        info = lock_holder(tmp_path / "lock")
        assert info is not None and info["pid"] != orphan
        assert describe_holder(info).endswith("(that process has exited; a step it started still holds the lock)")
        assert Lock.try_acquire(tmp_path / "lock", holder_info()) is None
    finally:
        os.kill(orphan, signal.SIGKILL)
    deadline = time.time() + 30
    while alive(orphan):
        assert time.time() < deadline
        time.sleep(0.05)
    lock = Lock.try_acquire(tmp_path / "lock", holder_info(command="taken over"))
    assert lock is not None and lock_holder(tmp_path / "lock") == json.loads((tmp_path / "lock").read_text())
    lock.release()
    assert (tmp_path / "lock").read_text() == ""  # released: no holder described


def test_two_benchmarks_never_write_a_shared_fold_at_once(tmp_path):
    """Issue 16.1: two benchmarks that train the same fold take turns (the fold's lock), the second waiting."""
    shared = str(tmp_path / "fold.lock")
    runners = []
    for name in ("first", "second"):
        root = tmp_path / name
        plan = save_plan(root, [stand_in(root, "train", "timed", "0.5", locks=[shared])])
        runners.append((plan, subprocess.Popen([sys.executable, "-c", DRIVER, str(plan.folder)])))
    intervals = []
    for plan, runner in runners:
        assert runner.wait(timeout=120) == 0
        intervals.append(sorted(map(float, (plan.folder / "train" / "result.txt").read_text().split())))
    (first_start, first_end), (second_start, second_end) = sorted(intervals)
    assert second_start >= first_end
    logs = [plan.log(plan.step("train")).read_text() for plan, _ in runners]
    assert sum("waiting for train of benchmark" in log for log in logs) == 1


def test_a_step_run_twice_at_once_runs_once(tmp_path):
    plan = chain(tmp_path)
    held = Lock.try_acquire(step_lock_path(plan, plan.step("a")), holder_info(step="a"))
    try:
        assert run_step(plan.folder, "a") == 75
    finally:
        held.release()
    assert run_step(plan.folder, "a") == 0 and run_step(plan.folder, "a") == 0  # the second finds it done
    assert run_step(plan.folder, "b") == 0 and evaluate(plan)["b"].done


# --- a training's outputs -----------------------------------------------------------------------------------------

def _fold(tmp_path: Path, plugin: bool) -> Path:
    fold = tmp_path / "fold_0"
    (fold / "validation").mkdir(parents=True)
    (fold / "checkpoint_final.pth").write_bytes(b"weights")
    time.sleep(0.01)
    (fold / "validation" / "case_000.npz").write_bytes(b"p")
    if plugin:
        (fold / "validation" / "calibration.json").write_text("{}")
        (fold / "validation" / "provenance.json").write_text(json.dumps(
            {"checkpoint": "checkpoint_final.pth", "sha256": Hasher().sha256(fold / "checkpoint_final.pth")[0]}))
    (fold / "validation" / "summary.json").write_text("{}")
    return fold


def test_a_training_is_done_when_nnunet_validated_its_final_checkpoint(tmp_path):
    fold = _fold(tmp_path, plugin=True)
    sha = Hasher().sha256(fold / "checkpoint_final.pth")[0]
    assert _fold_outputs(fold, "calibration.json", True, Hasher()).fingerprint == {"checkpoint_final.pth": sha}
    time.sleep(0.01)
    (fold / "checkpoint_final.pth").write_bytes(b"retrained")  # newer than its validation
    assert "the checkpoint is not validated" in _fold_outputs(fold, None, False, Hasher()).reason
    (fold / "validation" / "summary.json").write_text("{}")  # a validation by a trainer without the plugin's record
    assert "does not vouch for calibration.json" in _fold_outputs(fold, "calibration.json", False, Hasher()).reason
    assert "not those of a complete validation" in _fold_outputs(fold, None, True, Hasher()).reason
    assert _fold_outputs(fold, None, False, Hasher()).fingerprint is not None
    (fold / "checkpoint_final.pth").unlink()
    assert _fold_outputs(fold, None, False, Hasher()).reason.endswith("the fold is not trained")


# --- the plan, the identity and the report's statistics -----------------------------------------------------------

def _benchmark(tmp_path: Path, **changes) -> Benchmark:
    options = dict(dataset="1", configuration="3d_fullres", trainers=["A", "B"], folds=["0", "1"],
                   post_hoc=["temperature"], repeats=2, device="cpu")
    options.update(changes)
    settings = BenchmarkSettings(**options)
    test_set = HeldOutSet(tmp_path / "imagesTs", tmp_path / "labelsTs", ("case_1",), ".nii.gz",
                       {"case_1_0000.nii.gz": [10, 1]}, {"case_1.nii.gz": [5, 1]})
    benchmark = Benchmark(settings, "Dataset001_X", tmp_path / "results", tmp_path / "pre" / "Dataset001_X",
                          {"A": True, "B": False}, test_set, "")
    benchmark.name = default_name(settings.configuration, benchmark.identity())
    return benchmark


def test_the_plan_runs_every_step_after_the_steps_it_needs(tmp_path):
    plan = build_plan(_benchmark(tmp_path))
    position = {step.id: index for index, step in enumerate(plan.steps)}
    assert len(position) == len(plan.steps) == 2 * (4 * 3 + 2 + 4 + 4) + 1
    assert all(position[need] < position[step.id] for step in plan.steps for need in step.needs)
    step = plan.step("repeat_2/A+temperature/export")
    assert step.needs == ["repeat_2/A/fold_0/train", "repeat_2/A/fold_1/train", "repeat_2/A+temperature/fold_0/fit",
                          "repeat_2/A+temperature/fold_1/fit"]
    assert plan.step("repeat_2/A+temperature/predict").needs == ["repeat_2/A+temperature/export"]
    assert plan.step("repeat_1/A/fold_0/cross-validation").action == "collect"
    assert plan.step("repeat_1/B/fold_0/cross-validation").command[:2] == ["nnunet-margin", "calibration"]
    assert plan.steps[-1].id == "report" and len(plan.steps[-1].needs) == 2 * (2 * 2 * 2 + 4)
    for step in plan.steps:
        assert str(tmp_path) not in json.dumps(step.settings), step.id  # a copied tree is the same benchmark


def test_post_hoc_calibrators_are_fitted_in_views_of_the_models_and_predicted_from_their_exports(tmp_path):
    """Each calibrator is fitted in the benchmark's own view of the trained model (links to its files), so the
    calibrators' maps never overwrite each other and nothing is written into nnU-Net's model folder; nnU-Net's own
    trainers have no logit sample, so their validation is run again into the view."""
    benchmark = _benchmark(tmp_path, post_hoc=["temperature", "vector"], repeats=1)
    plan = build_plan(benchmark)
    model = tmp_path / "results" / "Dataset001_X" / "A__nnUNetPlans__3d_fullres"
    view_root = benchmark.folder / "repeat_1" / "post_hoc" / "A+vector"
    view = view_root / "Dataset001_X" / "A__nnUNetPlans__3d_fullres"
    fit = plan.step("repeat_1/A+vector/fold_1/fit")
    assert fit.command == ["nnunet-margin", "fit-calibration", str(view), "--method", "vector", "--fit-on", "fold",
                           "-f", "1", "-device", "cpu"]
    assert fit.results_root == str(view_root) and fit.needs == ["repeat_1/A/fold_1/train"]
    assert fit.output == {"type": "files", "files": [str(view / "fold_1" / "calibration_map.json")]}
    assert plan.step("repeat_1/B+vector/fold_1/fit").command[-1] == "--revalidate"
    links = {Path(link).relative_to(benchmark.folder): Path(target) for link, target in plan.links}
    a_view = Path("repeat_1/post_hoc/A+vector/Dataset001_X/A__nnUNetPlans__3d_fullres")
    assert links[a_view / "fold_0" / "checkpoint_final.pth"] == model / "fold_0" / "checkpoint_final.pth"
    assert links[a_view / "plans.json"] == model / "plans.json"
    assert links[a_view / "fold_1/validation/logit_sample.nnunet_margin"] == \
        model / "fold_1/validation/logit_sample.nnunet_margin"
    b_view = Path("repeat_1/post_hoc/B+vector/Dataset001_X/B__nnUNetPlans__3d_fullres")
    assert b_view / "fold_0" / "checkpoint_final.pth" in links
    assert not any("validation" in str(link) for link in links if b_view in link.parents)
    export = plan.step("repeat_1/A+vector/export")
    assert export.command == ["nnunet-margin", "export-portable", str(view),
                              str(benchmark.folder / "repeat_1" / "exports" / "A+vector"), "--calibration",
                              "--allow-bound", "--name", "A_vector", "-f", "0", "1"]
    predict = plan.step("repeat_1/A+vector/predict")
    assert predict.command[:2] == ["nnunet-margin", "predict"] and predict.results_root == export.output["folder"]
    assert predict.command[predict.command.index("-tr") + 1] == "A_vector"
    assert plan.step("repeat_1/A/predict").command[predict.command.index("-tr") + 1] == "A"
    assert "--npz" not in plan.step("repeat_1/A/fold_0/train").command  # fit-calibration reads logit samples


@pytest.mark.parametrize("fit_on", ["pooled", "images"])
def test_a_map_for_the_fold_ensemble_is_one_fit_per_trainer_and_calibrator(tmp_path, fit_on):
    calibration = HeldOutSet(tmp_path / "cal_images", tmp_path / "cal_labels", ("case_7",), ".nii.gz",
                             {"case_7_0000.nii.gz": [10, 1]}, {"case_7.nii.gz": [5, 1]})
    benchmark = _benchmark(tmp_path, post_hoc=["temperature"], repeats=1, post_hoc_fit=fit_on)
    if fit_on == "images":
        benchmark.calibration_set = calibration
    plan = build_plan(benchmark)
    fits = [step for step in plan.steps if step.kind == "fit"]
    assert [step.id for step in fits] == ["repeat_1/A+temperature/fit", "repeat_1/B+temperature/fit"]
    fit = plan.step("repeat_1/B+temperature/fit")
    assert fit.needs == ["repeat_1/B/fold_0/train", "repeat_1/B/fold_1/train"] and len(fit.output["files"]) == 2
    assert fit.command[fit.command.index("-f"):fit.command.index("-f") + 3] == ["-f", "0", "1"]
    assert plan.step("repeat_1/B+temperature/export").needs[-1] == "repeat_1/B+temperature/fit"
    if fit_on == "images":
        assert fit.command[-4:] == ["--images", str(calibration.images), "--labels", str(calibration.labels)]
        assert fit.data == ["calibration_images", "calibration_labels"] and fit.gpu
        assert plan.data["calibration_labels"] == {"folder": str(calibration.labels), "files": ["case_7.nii.gz"]}
        assert not any("validation" in link for link, _ in plan.links)  # no logit sample is read
    else:
        assert fit.command[-1] == "--revalidate" and fit.data == []


def test_saving_the_plan_makes_the_views_relative_links(tmp_path):
    """Relative, so that a results tree copied with `cp -a` has views of its own models; a link whose target moved
    is replaced."""
    benchmark = _benchmark(tmp_path, repeats=1)
    plan = build_plan(benchmark)
    target = tmp_path / "results" / "Dataset001_X" / "A__nnUNetPlans__3d_fullres" / "fold_0" / "checkpoint_final.pth"
    target.parent.mkdir(parents=True)
    target.write_text("weights")
    plan.save()
    link = benchmark.folder / "repeat_1/post_hoc/A+temperature/Dataset001_X/A__nnUNetPlans__3d_fullres/fold_0" \
        / "checkpoint_final.pth"
    assert link.read_text() == "weights" and not Path(os.readlink(link)).is_absolute()
    assert Plan.load(benchmark.folder).links == plan.links
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(tmp_path / "results"), str(copy)], check=True)
    target.write_text("retrained")
    assert (copy / link.relative_to(tmp_path / "results")).read_text() == "weights"
    make_link(link, target.with_name("checkpoint_best.pth"))
    assert (link.parent / os.readlink(link)).resolve() == target.with_name("checkpoint_best.pth").resolve()
    plan.save()
    assert link.read_text() == "retrained"


def test_the_settings_record_holds_every_folder_as_a_string(tmp_path):
    """benchmark.json: the test set's and the calibration set's folders (Paths from the command line) as strings."""
    settings = BenchmarkSettings(dataset="1", configuration="2d", trainers=["A"], folds=["0"], post_hoc=["vector"],
                                 post_hoc_fit="images", test_images=tmp_path / "ti", test_labels=tmp_path / "tl",
                                 calibration_images=tmp_path / "ci", calibration_labels=tmp_path / "cl")
    record = json.loads(json.dumps(settings_record(settings)))
    assert record["calibration_images"] == str(tmp_path / "ci") and record["test_labels"] == str(tmp_path / "tl")
    assert record["post_hoc"] == ["vector"] and record["post_hoc_fit"] == "images"


def test_the_identity_names_the_folder_and_says_what_changed(tmp_path):
    benchmark = _benchmark(tmp_path)
    for same in (dict(repeats=3), dict(baseline="A"), dict(device="cuda", gpus=["0"]), dict(trainers=["B", "A"])):
        assert _benchmark(tmp_path, **same).name == benchmark.name, same
    for other in (dict(trainers=["A"]), dict(folds=["0"]), dict(post_hoc=[]), dict(plans="Other"),
                  dict(post_hoc=["temperature", "vector"]), dict(post_hoc_fit="pooled")):
        assert _benchmark(tmp_path, **other).name != benchmark.name, other
    assert "post_hoc_fit" not in benchmark.identity()  # the default: benchmarks of earlier versions keep their names
    with_calibration_set = _benchmark(tmp_path, post_hoc_fit="images")
    with_calibration_set.calibration_set = with_calibration_set.test_set
    assert identity_differences(_benchmark(tmp_path, post_hoc_fit="images").identity(),
                                with_calibration_set.identity()) == ["calibration set added"]
    changed = _benchmark(tmp_path, folds=["0"], trainers=["A"])
    changed.test_set.label_files["case_1.nii.gz"] = [5, 2]
    assert identity_differences(benchmark.identity(), changed.identity()) == [
        "folds 0 1 -> 0", "trainers A B -> A", "test labels: case_1.nii.gz modified"]
    assert benchmark.name.startswith("3d_fullres-") and benchmark.folder == \
        tmp_path / "results" / "Dataset001_X" / "calibration_benchmarks" / benchmark.name


def _calibration_report(folder: Path, dice: dict[str, float], ece: dict[str, float],
                        entropy: dict[str, float] | None = None) -> None:
    """A calibration.json of the cases in `dice` (one foreground class; NLL and Brier derived from the ECE), with
    the failure-detection section of `nnunet-margin calibration` where a per-case `entropy` score is given."""
    folder.mkdir(parents=True)
    report = {"class_names": ["background", "organ"], "metric_per_case": {
        case: {"foreground": {"ece": ece[case], "classwise_ece": ece[case] / 2, "class_ece": [ece[case], ece[case]],
                              "nll": 3 * ece[case], "brier": ece[case] ** 2},
               "segmentation": {"dice": {"organ": dice[case]}, "hd95": {"organ": 2.0}, "asd": {"organ": 1.0}}}
        for case in dice}}
    if entropy is not None:
        report["failure_detection"] = {"failure_dice": 0.7, "dice": dice, "scores": {
            "entropy_foreground": {"failure_when": "higher", "values": entropy}}}
    (folder / "calibration.json").write_text(json.dumps(report))


def test_the_reports_spread_over_repeats_is_the_comparison_of_the_per_repeat_means(tmp_path):
    """The run-to-run spread comes from the comparison package: mean and sample standard deviation of each method's
    per-repeat means."""
    rng = np.random.default_rng(0)
    cases = ["case_0", "case_1", "case_2"]
    folders, means = {}, {"A": [], "B": []}
    for repeat in ("1", "2", "3"):
        folders[repeat] = {}
        for method in means:
            dice = {case: float(rng.uniform()) for case in cases}
            folders[repeat][method] = str(tmp_path / repeat / method)
            _calibration_report(tmp_path / repeat / method / "fold_0" / "validation", dice,
                                {case: float(rng.uniform(0, 0.2)) for case in cases})
            means[method].append(np.mean(list(dice.values())))
    step = Step("report", "report", [], {"type": "folder", "folder": str(tmp_path / "report")},
                {"dataset": "Dataset001_X", "configuration": "3d_fullres", "plans": "P", "trainers": ["A", "B"],
                 "folds": ["0"], "repeats": 3, "post_hoc": [], "post_hoc_fit": "fold", "baseline": None},
                action="report", arguments={"cross_validation": folders, "test": {}, "maps": {},
                                            "description": "report"})
    plan = save_plan(tmp_path, [step])
    (plan.folder / "benchmark.json").write_text(json.dumps({"versions": {"nnunet-margin": "test"}}))
    write_report(plan, step, tmp_path / "report")
    rows = {row["method"]: row for row in csv.DictReader(
        (tmp_path / "report" / "spread" / "cross-validation" / "table.csv").open())}
    for method, values in means.items():
        assert float(rows[method]["dice_mean"]) == pytest.approx(np.mean(values))
        assert float(rows[method]["dice_std"]) == pytest.approx(np.std(values, ddof=1))
        assert rows[method]["dice_n"] == "3"
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Run-to-run spread (cross-validation)" in report and "mean ± standard deviation over repeats" in report
    assert report.count("## Cross-validation (repeat ") == 3


def _map_record(path: Path, method: str, weight: list, bias: list, folds: list[str], info: dict) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"fit_on": "fold" if len(folds) == 1 else "images",
                                "checkpoints": {f"fold_{fold}": "sha" for fold in folds},
                                "calibration": {"method": method, "weight": weight, "bias": bias, "info": info}}))
    return str(path)


def test_the_report_shows_what_each_calibrator_gains_per_case_and_the_fitted_maps(tmp_path):
    """The gains are the paired differences of T+K and T over the test cases (checked against a direct computation
    of the mean and its paired bootstrap), in the report, the summary and post_hoc_gains.csv; the maps table lists a
    temperature per fold and a shared map once, with the norms of A - I and b."""
    rng = np.random.default_rng(3)
    cases = [f"case_{index}" for index in range(8)]
    dice = {case: float(rng.uniform(0.5, 0.9)) for case in cases}
    ece = {"A": {case: float(rng.uniform(0.1, 0.3)) for case in cases}}
    ece["A+temperature"] = {case: value - 0.05 + float(rng.normal(0, 0.01)) for case, value in ece["A"].items()}
    ece["A+vector"] = {case: value * 0.5 for case, value in ece["A"].items()}
    test = {"1": {}}
    for method, values in ece.items():
        test["1"][method] = str(tmp_path / "test" / method)
        _calibration_report(tmp_path / "test" / method, dice, values, entropy=values)  # ECE as the score
    cross_validation = {"1": {"A": str(tmp_path / "cv" / "A")}}
    _calibration_report(tmp_path / "cv" / "A" / "fold_0" / "validation", dice, ece["A"])
    maps = {"1": {"A": {
        "temperature": [_map_record(tmp_path / f"maps/t/fold_{fold}/calibration_map.json", "temperature",
                                    [[1 / t, 0], [0, 1 / t]], [0, 0], [fold],
                                    {"temperature": t, "at_bound": bound, "converged": True})
                        for fold, t, bound in (("0", 1.5, None), ("1", 100.0, "upper"))],
        "vector": [_map_record(tmp_path / f"maps/v/fold_{fold}/calibration_map.json", "vector", [[2, 0], [0, 1]],
                               [0.3, 0.4], ["0", "1"], {"converged": False}) for fold in ("0", "1")]}}}
    step = Step("report", "report", [], {"type": "folder", "folder": str(tmp_path / "report")},
                {"dataset": "Dataset001_X", "configuration": "3d_fullres", "plans": "P", "trainers": ["A"],
                 "folds": ["0", "1"], "repeats": 1, "post_hoc": ["temperature", "vector"], "post_hoc_fit": "fold",
                 "baseline": "A"}, action="report",
                arguments={"cross_validation": cross_validation, "test": test, "maps": maps, "description": "report"})
    plan = save_plan(tmp_path, [step])
    (plan.folder / "benchmark.json").write_text(json.dumps({"versions": {"nnunet-margin": "test"}}))
    write_report(plan, step, tmp_path / "report")

    rows = {(row["calibrator"], row["metric"]): row for row in
            csv.DictReader((tmp_path / "report/repeat_1/test/post_hoc_gains.csv").open())}
    assert len(rows) == 2 * 5
    for calibrator in ("temperature", "vector"):
        after = np.array([ece[f"A+{calibrator}"][case] for case in cases])
        before = np.array([ece["A"][case] for case in cases])
        for metric, transform in (("ece", lambda x: x), ("nll", lambda x: 3 * x), ("brier", np.square)):
            differences = transform(after) - transform(before)
            index = np.random.default_rng(0).integers(0, len(cases), (10_000, len(cases)))
            low, high = np.quantile(differences[index].mean(axis=1), [0.025, 0.975])
            row = rows[calibrator, metric]
            assert float(row["difference"]) == pytest.approx(differences.mean(), rel=1e-12)
            assert (float(row["ci_low"]), float(row["ci_high"])) == pytest.approx((low, high), rel=1e-12)
            assert row["n"] == "8"
        assert float(rows[calibrator, "dice"]["difference"]) == 0  # the same segmentations here
    report = (tmp_path / "report" / "report.md").read_text()
    summary = (tmp_path / "report" / "summary.md").read_text()
    gains_section = report.split("### What each post-hoc calibrator gains on the test cases (repeat 1)")[1]
    gains_rows = [line for line in gains_section.split("##")[0].splitlines() if line.startswith("| A | ")]
    assert [line.split(" | ")[1] for line in gains_rows] == ["temperature", "vector"]
    assert gains_rows[1].startswith(f"| A | vector | {float(rows['vector', 'ece']['difference']):+.4g} [")
    assert "Post-hoc calibration, T+K minus T per test case (repeat 1):" in summary and gains_rows[1] in summary
    test_table = list(csv.DictReader((tmp_path / "report/repeat_1/test/table.csv").open()))
    assert {row["method"] for row in test_table} == {"A", "A+temperature", "A+vector"}
    # failure detection per method on the test cases, from the comparison package (AURC checked directly)
    failure = {row["method"]: row for row in csv.DictReader((tmp_path / "report/repeat_1/test/failure_detection.csv"
                                                              ).open())}
    assert set(failure) == {"A", "A+temperature", "A+vector"}
    risk = [1 - dice[case] for case in cases]
    for method, values in ece.items():
        expected = aurc_by_orderings(confidences([values[case] for case in cases], "higher"), risk)
        assert float(failure[method]["aurc_value"]) == pytest.approx(expected, rel=1e-12)
    ranks = {method: float(row["aurc_rank"]) for method, row in failure.items()}  # halved ECE: the same ranking
    better = float(failure["A+temperature"]["aurc_value"]) < float(failure["A"]["aurc_value"])
    assert ranks == {"A": 1.5 + better, "A+vector": 1.5 + better, "A+temperature": 1.0 if better else 3.0}
    failure_section = report.split("### Failure detection on the test cases (repeat 1)")[1].split("###")[0]
    assert {line.split(" | ")[1] for line in failure_section.splitlines() if line.startswith("| entropy")} == \
        {"A", "A+temperature", "A+vector"}
    assert "Test set (repeat 1), Failure detection (risk = 1 - mean foreground Dice" in summary
    maps_rows = [line for line in report.split("## Fitted maps")[1].splitlines() if line.startswith("| A |")]
    assert maps_rows == ["| A | temperature | 1 | 0 | T = 1.5 | no | yes |",
                         "| A | temperature | 1 | 1 | T = 100 | upper | yes |",
                         f"| A | vector | 1 | 0, 1 | ‖A − I‖ = 1, ‖b‖ = 0.5 | n/a | no |"]


def test_every_process_of_a_step_is_marked_with_its_benchmark(tmp_path):
    """The end-to-end tests find a benchmark's processes by this variable; the executor sets it."""
    plan = save_plan(tmp_path, [Step("env", "stand-in", [], {"type": "folder", "folder": str(tmp_path / "out")}, {},
                                     command=[sys.executable, "-c", (
                                         "import os, sys, pathlib; p = pathlib.Path(sys.argv[1]); p.mkdir(); "
                                         f"(p / 'marker').write_text(os.environ['{BENCHMARK_MARKER}'])"),
                                         str(tmp_path / "out")], results_root=str(tmp_path))])
    execute(plan)
    assert (tmp_path / "out" / "marker").read_text() == str(plan.folder)
