"""`nnunet-margin benchmark --executor slurm` on the real single-node Slurm cluster of tests/slurm (issue 19).

The machinery first, on plans of small stand-in commands (tests/test_benchmark_steps.py): jobs, dependencies, GPUs,
the job environment, resubmission, the status table. Then the command end to end on the generated dataset: two short
trainings inside Slurm jobs, one fold and a one-case test set, collected by the next run and compared with the local
executor's report on a `cp -a` copy of the same trainings; and a trainer that raises in its own code. The cluster
tests skip, naming the reason, where the cluster cannot start.
"""

from __future__ import annotations

import filecmp
import io
import json
import shutil
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import pytest
from slurm.cluster import start_clusters, wait_until_ended
from test_benchmark_e2e import Setup
from test_benchmark_steps import save_plan, stand_in

from conftest import DATASET_NAME
from nnunet_margin import cli
from nnunet_margin._atomic import write_json_atomic
from nnunet_margin.nnunet.benchmark.command import _status_table
from nnunet_margin.nnunet.benchmark.plan import Plan, Step
from nnunet_margin.nnunet.benchmark.runners import BENCHMARK_MARKER, remove_leftovers
from nnunet_margin.nnunet.benchmark.slurm_executor import (SlurmExecutor, job_record_path, recorded_jobs,
                                                           refuse_live_jobs)
from nnunet_margin.nnunet.benchmark.state import Lock, evaluate, holder_info, read_json, step_lock_path
from nnunet_margin.nnunet.slurm import JobState, SlurmError, SlurmJob, SlurmOptions

NNUNET, PLUGIN = "nnUNetTrainer_demo", "nnUNetTrainerMbLS_demo"
FAILING = "nnUNetTrainer_fails"
FAILING_TRAINER = f'''
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class {FAILING}(nnUNetTrainer):
    def initialize(self):
        raise RuntimeError("{FAILING}: a deliberate error in the trainer's own code")
'''


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A cluster for the module's jobs, reached through SLURM_CONF."""
    (started,) = start_clusters(tmp_path_factory.mktemp("slurm") / "cluster")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLURM_CONF", str(started.conf))
        yield started
    stopped = started.stop()
    assert stopped.returncode == 0, stopped.stderr


def job_records(plan_folder: Path) -> dict[str, SlurmJob]:
    """{step: its latest job} from the benchmark's records."""
    plan = Plan.load(plan_folder)
    records = {step.id: read_json(job_record_path(plan, step)) for step in plan.steps}
    return {step_id: SlurmJob.from_json(record["job"]) for step_id, record in records.items() if record}


def wait_for_jobs(plan_folder: Path, interval: float = 0.2) -> dict:
    """The states of the benchmark's latest jobs once they have ended."""
    return wait_until_ended(list(job_records(plan_folder).values()), 900, interval)


def submit(plan: Plan, options: SlurmOptions) -> tuple[int, str]:
    """The executor's submission, as `benchmark --executor slurm` runs it: (steps with a job, what it printed)."""
    states = evaluate(plan)
    out = io.StringIO()
    with redirect_stdout(out):
        with_jobs = SlurmExecutor(plan, options).submit(states, recorded_jobs(plan, states))
    return with_jobs, out.getvalue()


def status_rows(plan: Plan) -> dict[str, str]:
    """{step: its row of the status table}."""
    rows = _status_table(SimpleNamespace(folder=plan.folder), plan, evaluate(plan)).splitlines()[1:]
    return {row.split()[1]: row for row in rows}


def environment_step(root: Path, step_id: str, names: list[str], needs=()) -> Step:
    """A step that writes the values of the environment variables `names` (or '-') into its output."""
    output = root / "benchmark" / step_id
    script = ("import json, os, pathlib, sys; out = pathlib.Path(sys.argv[1]); out.mkdir(); (out / 'env.json')"
              f".write_text(json.dumps({{name: os.environ.get(name, '-') for name in {names!r}}}))")
    return Step(step_id, "stand-in", list(needs), {"type": "folder", "folder": str(output)}, {},
                command=[sys.executable, "-c", script, str(output)], results_root=str(root))


# --- the executor on stand-in steps -------------------------------------------------------------------------------

def test_each_pending_step_is_a_job_after_the_jobs_it_needs(cluster, tmp_path, monkeypatch):
    """GPUs only for the steps that run nnU-Net's network; the setup file and the nnUNet_* variables in every job;
    a second submission while the jobs wait submits nothing; the local executor refuses steps with live jobs."""
    (tmp_path / "values").mkdir()
    (tmp_path / "values" / "x.txt").write_text("value")
    train = stand_in(tmp_path, "train", "copy", str(tmp_path / "values" / "x.txt"))
    train.gpu = True
    names = ["nnUNet_extTrainer", "nnUNet_results", "FROM_SETUP", BENCHMARK_MARKER, "SLURM_JOB_ID"]
    evaluation = environment_step(tmp_path, "evaluate", names, needs=["train"])
    plan = save_plan(tmp_path, [train, evaluation])
    setup = tmp_path / "setup.sh"
    setup.write_text("export FROM_SETUP='sourced first'\n")
    monkeypatch.setenv("nnUNet_extTrainer", "/trainers a:/trainers b")
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    held = SlurmOptions(gpus_per_job=2, setup=setup, extra=("--hold",))  # pending until released

    with_jobs, out = submit(plan, held)
    jobs = job_records(plan.folder)
    train_job, evaluation_job = jobs["train"].job_id, jobs["evaluate"].job_id
    assert with_jobs == 2 and out.splitlines()[:2] == ["train: job " + train_job,
                                                        f"evaluate: job {evaluation_job} after {train_job}"]
    assert cluster.show_job(train_job)["TresPerNode"] == "gres:gpu:2"
    evaluation_fields = cluster.show_job(evaluation_job)
    assert "TresPerNode" not in evaluation_fields
    assert evaluation_fields["Dependency"] == f"afterok:{train_job}(unfulfilled)"
    assert read_json(job_record_path(plan, plan.step("train")))["gpus"] == 2

    again, out = submit(plan, held)
    assert again == 2 and job_records(plan.folder) == jobs
    assert out == (f"submitted 0 job(s) to Slurm, 2 step(s) already had a pending or running job; job scripts in "
                   f"{plan.folder / 'jobs'}, logs in {plan.folder / 'logs'}\n")
    assert status_rows(plan)["train"] == f"pending  train  job {train_job} PENDING (JobHeldUser)"
    with pytest.raises(RuntimeError, match=rf"2 step\(s\) have a pending or running Slurm job: train \(job "
                                           rf"{train_job}, pending\).*scancel {train_job} {evaluation_job}"):
        refuse_live_jobs(recorded_jobs(plan, evaluate(plan)))

    subprocess.run(["scontrol", "release", f"{train_job},{evaluation_job}"], check=True)
    ended = wait_for_jobs(plan.folder)
    assert {status.state for status in ended.values()} == {JobState.COMPLETED}
    assert all(state.done for state in evaluate(plan).values())
    assert json.loads((plan.folder / "evaluate" / "env.json").read_text()) == {
        "nnUNet_extTrainer": "/trainers a:/trainers b", "nnUNet_results": str(tmp_path),  # the step's results root
        "FROM_SETUP": "sourced first", BENCHMARK_MARKER: str(plan.folder), "SLURM_JOB_ID": evaluation_job}
    assert submit(plan, held) == (0, "")  # nothing left to do


def test_a_failed_job_is_reported_with_its_log_and_submitted_again_with_the_steps_after_it(cluster, tmp_path):
    """The steps that do not need it finish; Slurm cancels those that do; the next submission keeps the failed job's
    log beside the new job's and names it; a job cancelled by hand counts as failed."""
    (tmp_path / "source.txt").write_text("x")
    plan = save_plan(tmp_path, [stand_in(tmp_path, "bad", "fail"),
                                stand_in(tmp_path, "after", "copy", str(tmp_path / "source.txt"), needs=["bad"]),
                                stand_in(tmp_path, "other", "copy", str(tmp_path / "source.txt")),
                                stand_in(tmp_path, "later", "copy", str(tmp_path / "source.txt"))])
    options = SlurmOptions(gpus_per_job=0)
    submit(plan, options)
    later = job_records(plan.folder)["later"]
    subprocess.run(["scancel", later.job_id], check=True)  # cancelled by its user, before or while it ran
    wait_for_jobs(plan.folder)
    jobs = job_records(plan.folder)
    log = plan.log(plan.step("bad"))

    rows = status_rows(plan)
    assert rows["bad"] == f"failed   bad  job {jobs['bad'].job_id} FAILED (NonZeroExitCode), exit code 3, log {log}"
    assert rows["after"] == (f"pending  after  waits for bad; job {jobs['after'].job_id} CANCELLED "
                             f"(DependencyNeverSatisfied); the next run submits it again")
    assert rows["other"] == "done     other"
    assert rows["later"].startswith(f"failed   later  job {later.job_id} CANCELLED")
    assert "bad failed with exit code 3" in log.read_text()

    with_jobs, out = submit(plan, options)
    new = job_records(plan.folder)
    kept = log.with_name(f"bad.job{jobs['bad'].job_id}.log")
    lines = out.splitlines()
    assert with_jobs == 3 and new["other"] == jobs["other"]
    assert lines[0] == (f"bad: job {jobs['bad'].job_id} FAILED (NonZeroExitCode), exit code 3, log {kept}; "
                        f"submitted again as job {new['bad'].job_id}")
    assert lines[1] == (f"after: job {jobs['after'].job_id} CANCELLED (DependencyNeverSatisfied); submitted again as "
                        f"job {new['after'].job_id} after {new['bad'].job_id}")
    assert lines[2].startswith(f"later: job {later.job_id} CANCELLED")
    assert lines[2].endswith(f"submitted again as job {new['later'].job_id}")
    assert "bad failed with exit code 3" in kept.read_text()
    wait_for_jobs(plan.folder)
    assert [step_id for step_id, state in evaluate(plan).items() if state.done] == ["other", "later"]


def test_leftovers_of_steps_that_may_still_run_are_kept(tmp_path):
    """The submitting command clears half-written outputs of killed steps, but not those of steps whose job is
    pending or running, or whose lock a process holds."""
    plan = save_plan(tmp_path, [stand_in(tmp_path, name, "fail") for name in ("killed", "queued", "locked")])
    leftovers = {step.id: plan.folder / f".{step.id}.partial-1-ab" for step in plan.steps}
    for folder in leftovers.values():
        folder.mkdir()
    lock = Lock.try_acquire(step_lock_path(plan, plan.step("locked")), holder_info())
    try:
        remove_leftovers(plan, {"queued"})
    finally:
        lock.release()
    assert {step_id: folder.exists() for step_id, folder in leftovers.items()} == {
        "killed": False, "queued": True, "locked": True}


def test_jobs_whose_state_cannot_be_read_are_named_with_their_records(tmp_path, monkeypatch):
    """Without squeue (another machine), a benchmark with unfinished jobs is not run blindly."""
    plan = save_plan(tmp_path, [stand_in(tmp_path, "train", "fail")])
    job = SlurmJob("7", "train", plan.folder / "jobs" / "train.sbatch", plan.log(plan.step("train")))
    write_json_atomic(job_record_path(plan, plan.step("train")), {"step": "train", "job": job.to_json()})
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SlurmError, match=r"^1 unfinished step\(s\) have Slurm jobs \(train\) whose state is unknown: "
                                         r"squeue not found on PATH.*remove their records .*/state/STEP.job.json$"):
        recorded_jobs(plan, evaluate(plan))


@pytest.mark.parametrize("arguments, expected", [
    (["--slurm-partition", "gpu"], "--slurm-partition apply to Slurm jobs: add --executor slurm"),
    (["--executor", "slurm", "--gpus", "0"], "--gpus picks GPUs of this machine for the local executor"),
    (["--executor", "slurm", "-device", "cpu", "--slurm-gpus-per-job", "1"],
     "--slurm-gpus-per-job 1 with -device cpu: nnU-Net would not use the GPUs"),
    (["--executor", "slurm", "--slurm-extra=--output=x.log"],
     "--slurm-extra --output=x.log: nnunet-margin sets --output of every job itself"),
    (["--executor", "slurm", "--slurm-extra", "--comment 'unclosed"], "--slurm-extra \"--comment 'unclosed\": "
                                                                      "No closing quotation"),
    (["--executor", "slurm", "--slurm-setup", "no_such_setup.sh"], "the Slurm setup file"),
])
def test_slurm_options_are_checked_before_anything_runs(tmp_path, monkeypatch, arguments, expected):
    monkeypatch.chdir(tmp_path)
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        code = cli.main(["benchmark", "1", "-c", "3d_fullres", "-tr", "nnUNetTrainer", *arguments])
    assert code == 2 and expected in err.getvalue(), err.getvalue()


# --- end to end on the generated dataset --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def setup(nnunet_env, cluster, tmp_path_factory) -> Setup:
    """The dataset's environment with a folder holding a trainer that fails in nnUNet_extTrainer, and a test set of
    one case."""
    root = tmp_path_factory.mktemp("slurm_benchmark")
    (root / "trainers").mkdir()
    (root / "trainers" / "failing_trainer.py").write_text(FAILING_TRAINER)
    for name in ("imagesTs", "labelsTs"):
        (root / name).mkdir()
        first = sorted((nnunet_env.raw / name).iterdir())[0]
        shutil.copy2(first, root / name / first.name)
    env = {**nnunet_env.env, "nnUNet_n_proc_DA": "0", "nnUNet_npp": "0", "nnUNet_nps": "0",
           "SLURM_CONF": str(cluster.conf),
           "nnUNet_extTrainer": f"{nnunet_env.env['nnUNet_extTrainer']}:{root / 'trainers'}"}
    (root / "setup.sh").write_text('echo "setup sourced in job $SLURM_JOB_ID"\n')
    return Setup(env, root / "results", root / "imagesTs", root / "labelsTs")


def slurm_arguments(setup: Setup, *trainers: str, test_set: bool = True) -> list[str]:
    return [*setup.arguments(*trainers, test_set=test_set), "--executor", "slurm", "--slurm-setup",
            str(setup.images.parent / "setup.sh")]


@pytest.fixture(scope="module")
def slurm_benchmark(setup, cluster) -> dict:
    """Two short trainers, fold 0 and the test set submitted to Slurm; while the jobs wait: the dependency of an
    evaluation, a second submission, the local executor, the status; then the run that collects the finished jobs."""
    arguments = slurm_arguments(setup, NNUNET, PLUGIN)
    first = setup.run(*arguments)
    assert first[0] == 0, first[1][-3000:] + first[2][-3000:]
    folder = setup.folder(first[1])
    jobs = job_records(folder)
    training = jobs[f"repeat_1/{NNUNET}/fold_0/train"].job_id
    dependency = cluster.show_job(jobs[f"repeat_1/{NNUNET}/fold_0/cross-validation"].job_id)["Dependency"]
    second = setup.run(*arguments)
    jobs_after_second = job_records(folder)
    local = setup.run(*setup.arguments(NNUNET, PLUGIN, test_set=True))
    waiting = setup.run(*arguments, "--status")
    ended = wait_for_jobs(folder)
    collected = setup.run(*arguments)
    return {"folder": folder, "first": first, "jobs": jobs, "training": training, "dependency": dependency,
            "second": second, "jobs_after_second": jobs_after_second, "local": local, "waiting": waiting,
            "ended": ended, "collected": collected, "status": setup.run(*arguments, "--status")}


def test_every_step_is_a_job_after_the_jobs_it_needs(slurm_benchmark):
    out = slurm_benchmark["first"][1]
    assert "9 of 9 step(s) to run" in out and "submitted 9 job(s) to Slurm, 0 step(s) already had" in out
    assert "`benchmark ... --status` shows them" in out
    assert slurm_benchmark["dependency"] == f"afterok:{slurm_benchmark['training']}(unfulfilled)"
    report = slurm_benchmark["jobs"]["report"]
    assert (slurm_benchmark["folder"] / "jobs" / f"{report.name}.sbatch").is_file()
    assert max(map(int, (job.job_id for job in slurm_benchmark["jobs"].values()))) == int(report.job_id)


def test_a_second_run_while_the_jobs_wait_submits_nothing_and_the_local_executor_refuses(slurm_benchmark):
    code, out, err = slurm_benchmark["second"]
    assert code == 0, err
    assert "submitted 0 job(s) to Slurm, 9 step(s) already had a pending or running job" in out
    assert slurm_benchmark["jobs_after_second"] == slurm_benchmark["jobs"]
    code, out, err = slurm_benchmark["local"]
    assert code == 2 and "step(s) have a pending or running Slurm job" in err, err
    assert f"repeat_1/{NNUNET}/fold_0/train (job {slurm_benchmark['training']}, " in err
    code, out, err = slurm_benchmark["waiting"]
    rows = out.splitlines()[1:]
    assert code == 0 and len(rows) == 9 and all(row.split()[0] in ("pending", "running") for row in rows), out
    assert f"job {slurm_benchmark['jobs']['report'].job_id} PENDING (Dependency)" in rows[-1]


def test_the_run_after_the_jobs_collects_them_and_prints_the_report(slurm_benchmark, setup):
    assert {status.state for status in slurm_benchmark["ended"].values()} == {JobState.COMPLETED}
    code, out, err = slurm_benchmark["collected"]
    folder = slurm_benchmark["folder"]
    assert code == 0, err
    assert "0 of 9 step(s) to run" in out and "submitted" not in out
    assert out.endswith(f"wrote {folder / 'report' / 'report.md'} (tables: table.csv, table.tex; figure: "
                        f"compare.png)\n")
    assert (folder / "report" / "summary.md").read_text() in out
    assert slurm_benchmark["status"][1].splitlines()[0].endswith(": 9 done")
    training_log = folder / "logs" / "repeat_1" / NNUNET / "fold_0" / "train.log"
    assert training_log.read_text().startswith(f"setup sourced in job {slurm_benchmark['training']}\n")
    recorded = json.loads((folder / "benchmark.json").read_text())
    assert recorded["executor"] == "slurm" and recorded["versions"]["device"] == "Slurm jobs without GPUs"


@pytest.fixture(scope="module")
def local_copy_and_failure(setup, slurm_benchmark) -> dict:
    """The local executor on a `cp -a` copy of the trained results without the benchmark folder (its trainings are
    adopted; every other step runs here), while a benchmark of the plugin trainer and a trainer that raises runs in
    Slurm; then the failed benchmark's status and its next run."""
    copy = setup.results.parent / "copied_results"
    subprocess.run(["cp", "-a", str(setup.results), str(copy)], check=True)
    shutil.rmtree(copy / DATASET_NAME / "calibration_benchmarks")
    failing_arguments = slurm_arguments(setup, PLUGIN, FAILING, test_set=False)
    failing = setup.run(*failing_arguments)
    assert failing[0] == 0, failing[1][-3000:] + failing[2][-3000:]
    local = setup.run(*setup.arguments(NNUNET, PLUGIN, test_set=True), results=copy)
    failing_folder = setup.folder(failing[1])
    ended = wait_for_jobs(failing_folder)
    status = setup.run(*failing_arguments, "--status")
    # The next run submits the failed training again, held: only its submission is tested, not a second failure.
    return {"copy": copy, "local": local, "failing_folder": failing_folder, "failing": failing,
            "failing_jobs": job_records(failing_folder), "ended": ended, "status": status,
            "next": setup.run(*failing_arguments, "--slurm-extra=--hold")}


def test_the_local_executor_on_the_same_trainings_gives_the_same_report(slurm_benchmark, local_copy_and_failure,
                                                                       setup):
    code, out, err = local_copy_and_failure["local"]
    assert code == 0, out[-3000:] + err[-3000:]
    assert "7 of 9 step(s) to run" in out  # the trainings are adopted
    slurm_report = slurm_benchmark["folder"] / "report"
    local_report = local_copy_and_failure["copy"] / slurm_report.relative_to(setup.results)
    slurm_files = sorted(str(path.relative_to(slurm_report)) for path in slurm_report.rglob("*") if path.is_file())
    local_files = sorted(str(path.relative_to(local_report)) for path in local_report.rglob("*") if path.is_file())
    assert slurm_files == local_files and "table.csv" in slurm_files and "compare.png" in slurm_files
    differing = [name for name in slurm_files if name.endswith("report.md") is False
                 and not filecmp.cmp(slurm_report / name, local_report / name, shallow=False)]
    assert differing == []

    def comparable(report: str, results: Path) -> list[str]:
        return [line for line in report.replace(str(results), "RESULTS").splitlines()
                if not line.startswith("Versions:")]

    for name in (name for name in slurm_files if name.endswith("report.md")):
        assert comparable((slurm_report / name).read_text(), setup.results) == \
            comparable((local_report / name).read_text(), local_copy_and_failure["copy"]), name
    table = (slurm_report / "summary.md").read_text()
    assert table in out and table in slurm_benchmark["collected"][1]  # the same table printed


def test_a_failed_job_is_reported_with_its_log_and_the_other_jobs_results_are_kept(local_copy_and_failure):
    folder = local_copy_and_failure["failing_folder"]
    jobs, ended = local_copy_and_failure["failing_jobs"], local_copy_and_failure["ended"]
    training = jobs[f"repeat_1/{FAILING}/fold_0/train"]
    assert f"repeat_1/{PLUGIN}/fold_0/train" not in jobs  # done already: the first benchmark's training
    assert (ended[training.job_id].state, ended[training.job_id].exit_code) == (JobState.FAILED, 1)
    assert ended[jobs[f"repeat_1/{PLUGIN}/fold_0/cross-validation"].job_id].state is JobState.COMPLETED
    assert ended[jobs["report"].job_id].detail == "CANCELLED (DependencyNeverSatisfied)"
    log = folder / "logs" / "repeat_1" / FAILING / "fold_0" / "train.log"  # kept as train.jobID.log by the next run

    code, out, err = local_copy_and_failure["status"]
    rows = {row.split()[1]: row for row in out.splitlines()[1:]}
    assert code == 0 and out.splitlines()[0].endswith(": 2 done, 1 failed, 2 pending"), out
    assert rows[f"repeat_1/{FAILING}/fold_0/train"] == (
        f"failed   repeat_1/{FAILING}/fold_0/train  job {training.job_id} FAILED (NonZeroExitCode), exit code 1, "
        f"log {log}")
    assert rows["report"].startswith(f"pending  report  waits for repeat_1/{FAILING}/fold_0/cross-validation; job ")

    code, out, err = local_copy_and_failure["next"]
    kept = log.with_name(f"train.job{training.job_id}.log")
    assert code == 0 and "3 of 5 step(s) to run" in out, err
    assert f"repeat_1/{FAILING}/fold_0/train: job {training.job_id} FAILED (NonZeroExitCode), exit code 1, log " \
           f"{kept}; submitted again as job " in out
    assert f"{FAILING}: a deliberate error in the trainer's own code" in kept.read_text()
    assert "submitted 3 job(s)" in out and f"{PLUGIN}/fold_0/cross-validation" not in out  # its result is kept
    resubmitted = job_records(folder)[f"repeat_1/{FAILING}/fold_0/train"]
    assert f"submitted again as job {resubmitted.job_id}" in out and resubmitted.job_id != training.job_id
