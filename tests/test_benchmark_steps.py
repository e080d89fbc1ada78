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
from process_checks import alive, descendants

from nnunet_margin.nnunet.benchmark.command import _status_table
from nnunet_margin.nnunet.benchmark.plan import Plan, Step, build_plan
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
    assert step.needs == ["repeat_2/A/fold_0/train", "repeat_2/A/fold_1/train", "repeat_2/A/fold_0/fit-temperature",
                          "repeat_2/A/fold_1/fit-temperature"]
    assert plan.step("repeat_2/A+temperature/predict").needs == ["repeat_2/A+temperature/export"]
    assert plan.step("repeat_1/A/fold_0/cross-validation").action == "collect"
    assert plan.step("repeat_1/B/fold_0/cross-validation").command[:2] == ["nnunet-margin", "calibration"]
    assert plan.step("repeat_1/A/fold_1/train").locks == plan.step("repeat_1/A/fold_1/fit-temperature").locks
    assert plan.steps[-1].id == "report" and len(plan.steps[-1].needs) == 2 * (2 * 2 * 2 + 4)
    for step in plan.steps:
        assert str(tmp_path) not in json.dumps(step.settings), step.id  # a copied tree is the same benchmark


def test_the_identity_names_the_folder_and_says_what_changed(tmp_path):
    benchmark = _benchmark(tmp_path)
    for same in (dict(repeats=3), dict(baseline="A"), dict(device="cuda", gpus=["0"]), dict(trainers=["B", "A"])):
        assert _benchmark(tmp_path, **same).name == benchmark.name, same
    for other in (dict(trainers=["A"]), dict(folds=["0"]), dict(post_hoc=[]), dict(plans="Other")):
        assert _benchmark(tmp_path, **other).name != benchmark.name, other
    changed = _benchmark(tmp_path, folds=["0"], trainers=["A"])
    changed.test_set.label_files["case_1.nii.gz"] = [5, 2]
    assert identity_differences(benchmark.identity(), changed.identity()) == [
        "folds 0 1 -> 0", "trainers A B -> A", "test labels: case_1.nii.gz modified"]
    assert benchmark.name.startswith("3d_fullres-") and benchmark.folder == \
        tmp_path / "results" / "Dataset001_X" / "calibration_benchmarks" / benchmark.name


def _calibration_report(folder: Path, dice: dict[str, float], ece: dict[str, float]) -> None:
    """A calibration.json of the cases in `dice` (one foreground class)."""
    folder.mkdir(parents=True)
    (folder / "calibration.json").write_text(json.dumps({"class_names": ["background", "organ"], "metric_per_case": {
        case: {"foreground": {"ece": ece[case], "classwise_ece": ece[case] / 2, "class_ece": [ece[case], ece[case]]},
               "segmentation": {"dice": {"organ": dice[case]}, "hd95": {"organ": 2.0}, "asd": {"organ": 1.0}}}
        for case in dice}}))


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
                 "folds": ["0"], "repeats": 3, "post_hoc": [], "baseline": None}, action="report",
                arguments={"cross_validation": folders, "test": {}, "temperatures": {}, "description": "report"})
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


def test_every_process_of_a_step_is_marked_with_its_benchmark(tmp_path):
    """The end-to-end tests find a benchmark's processes by this variable; the executor sets it."""
    plan = save_plan(tmp_path, [Step("env", "stand-in", [], {"type": "folder", "folder": str(tmp_path / "out")}, {},
                                     command=[sys.executable, "-c", (
                                         "import os, sys, pathlib; p = pathlib.Path(sys.argv[1]); p.mkdir(); "
                                         f"(p / 'marker').write_text(os.environ['{BENCHMARK_MARKER}'])"),
                                         str(tmp_path / "out")], results_root=str(tmp_path))])
    execute(plan)
    assert (tmp_path / "out" / "marker").read_text() == str(plan.folder)
