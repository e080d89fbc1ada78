"""The sbatch layer (nnunet_margin/nnunet/slurm.py) against a real single-node Slurm cluster (tests/slurm/start.sh).

The cluster tests skip, naming the reason, where the cluster cannot start (no slurm-wlm/munge packages, not root).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from slurm.cluster import process_running, start_clusters, wait_for, wait_until_ended

from nnunet_margin.nnunet.slurm import JobState, SlurmError, SlurmJob, SlurmOptions, cancel, job_states, submit

CPU_ONLY = SlurmOptions(gpus_per_job=0)


@pytest.fixture(scope="module")
def clusters(tmp_path_factory):
    """Two clusters started together: one runs the module's jobs, reached through SLURM_CONF (as users reach theirs);
    test_start_and_stop_leave_no_process stops the other."""
    root = tmp_path_factory.mktemp("slurm")
    started = start_clusters(root / "cluster", root / "stopped_by_test")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLURM_CONF", str(started[0].conf))
        yield started
    stopped = [test_cluster.stop() for test_cluster in started]
    assert [result.returncode for result in stopped] == [0, 0], [result.stderr for result in stopped]


@pytest.fixture(scope="module")
def cluster(clusters):
    return clusters[0]


def shell(script: str) -> list[str]:
    return ["bash", "-c", script]


def test_start_and_stop_leave_no_process(clusters, tmp_path, monkeypatch):
    """stop.sh cancels a running job first (its processes go too), then ends every daemon of the pid files."""
    test_cluster = clusters[1]
    monkeypatch.setenv("SLURM_CONF", str(test_cluster.conf))
    daemons = test_cluster.daemon_pids()
    assert sorted(daemons) == ["munged", "slurmctld", "slurmd"]
    assert all(process_running(pid) for pid in daemons.values())
    job_pid = tmp_path / "job.pid"
    job = submit(shell(f"echo $$ > {job_pid}; exec sleep 600"), name="sleeper", job_folder=tmp_path / "jobs",
                 log=tmp_path / "sleeper.log", options=CPU_ONLY)
    wait_for(lambda: job_pid.exists() and job_pid.read_text().strip(), "the job to start")
    assert job_states([job])[job.job_id].state is JobState.RUNNING

    stopped = test_cluster.stop()

    assert stopped.returncode == 0, stopped.stderr
    assert not process_running(int(job_pid.read_text()))
    assert not [daemon for daemon, pid in daemons.items() if process_running(pid)]


def test_job_runs_the_command_with_setup_environment_and_options(cluster, tmp_path):
    setup = tmp_path / "setup.sh"
    setup.write_text("export FROM_SETUP='set up'\nexport STEP_VALUE='overridden by the step'\n")
    options = SlurmOptions(partition="debug", gpus_per_job=1, time="10", mem="100M", account="lab", setup=setup,
                           extra=("--comment=benchmark-step",))
    log = tmp_path / "logs" / "step.log"  # sbatch does not create the folder: submit must
    job = submit(shell('echo "$FROM_SETUP|$STEP_VALUE|$nnUNet_results"; echo to stderr >&2'), name="step",
                 job_folder=tmp_path / "jobs", log=log, options=options,
                 environment={"STEP_VALUE": "it's a value with spaces", "nnUNet_results": "/results/x y"})

    fields = cluster.show_job(job.job_id)
    assert fields["JobName"] == "step"
    assert (fields["Partition"], fields["TimeLimit"], fields["MinMemoryNode"], fields["Account"]) == (
        "debug", "00:10:00", "100M", "lab")
    assert fields["TresPerNode"] == "gres:gpu:1"
    assert fields["Comment"] == "benchmark-step"
    assert Path(fields["StdOut"]) == log
    status = wait_until_ended([job])[job.job_id]

    assert (status.state, status.exit_code) == (JobState.COMPLETED, 0)
    assert log.read_text() == "set up|it's a value with spaces|/results/x y\nto stderr\n"
    assert job.script == tmp_path / "jobs" / "step.sbatch" and job.status_file.exists()


def test_dependent_job_waits_for_its_parent(cluster, tmp_path):
    parent_output, child_output = tmp_path / "parent.txt", tmp_path / "child.txt"
    parent = submit(shell(f"sleep 1; echo from the parent > {parent_output}"), name="parent",
                    job_folder=tmp_path, log=tmp_path / "parent.log", options=CPU_ONLY)
    child = submit(["cp", str(parent_output), str(child_output)], name="child", job_folder=tmp_path,
                   log=tmp_path / "child.log", options=CPU_ONLY, after=[parent.job_id])

    fields = cluster.show_job(child.job_id)
    assert fields["Dependency"] == f"afterok:{parent.job_id}(unfulfilled)"
    assert (fields["JobState"], fields["Reason"]) == ("PENDING", "Dependency")
    states = job_states([child])
    assert (states[child.job_id].state, states[child.job_id].detail) == (JobState.PENDING, "PENDING (Dependency)")
    ended = wait_until_ended([parent, child])

    assert {status.state for status in ended.values()} == {JobState.COMPLETED}
    assert child_output.read_text() == "from the parent\n"


def test_failed_job_names_its_log_and_its_dependants_never_run(cluster, tmp_path):
    never = tmp_path / "never"
    parent = submit(shell("echo the trainer does not exist >&2; exit 3"), name="failing", job_folder=tmp_path,
                    log=tmp_path / "failing.log", options=CPU_ONLY)
    cancelled = submit(["touch", str(never)], name="cancelled", job_folder=tmp_path, log=tmp_path / "c.log",
                       options=CPU_ONLY, after=[parent.job_id])
    # A cluster or user that keeps such jobs waiting (sbatch's default) gets them reported as blocked.
    kept = SlurmOptions(gpus_per_job=0, extra=("--kill-on-invalid-dep=no",))
    blocked = submit(["touch", str(never)], name="blocked", job_folder=tmp_path, log=tmp_path / "b.log",
                     options=kept, after=[parent.job_id])

    broken_setup = tmp_path / "setup.sh"
    broken_setup.write_text("module load a-module-this-cluster-lacks\n")
    setup_failed = submit(["touch", str(never)], name="setup_fails", job_folder=tmp_path, log=tmp_path / "s.log",
                          options=SlurmOptions(gpus_per_job=0, setup=broken_setup))

    wait_for(lambda: job_states([blocked])[blocked.job_id].state is JobState.BLOCKED, "the dependant to be blocked")
    ended = wait_until_ended([parent, cancelled, setup_failed])
    failed = ended[parent.job_id]

    assert (failed.state, failed.exit_code, failed.job.log) == (JobState.FAILED, 3, tmp_path / "failing.log")
    assert failed.detail == "FAILED (NonZeroExitCode)"
    assert failed.describe() == (f"failed (job {parent.job_id}): FAILED (NonZeroExitCode), exit code 3, "
                                 f"log {tmp_path / 'failing.log'}")
    assert "the trainer does not exist" in failed.job.log.read_text()
    assert job_states([cancelled])[cancelled.job_id].detail == "CANCELLED (DependencyNeverSatisfied)"
    assert job_states([blocked])[blocked.job_id].detail == "PENDING (DependencyNeverSatisfied)"
    assert (ended[setup_failed.job_id].state, ended[setup_failed.job_id].exit_code) == (JobState.FAILED, 1)
    assert f"nnunet-margin: sourcing the Slurm setup file {broken_setup} failed" in setup_failed.log.read_text()
    cancel([blocked, parent])  # the ended parent is left alone
    assert job_states([blocked])[blocked.job_id].state is JobState.CANCELLED
    assert not never.exists()


def test_jobs_the_controller_forgot_are_classified_from_their_status_files(cluster, tmp_path):
    def job(name: str, script: str, **options) -> SlurmJob:
        return submit(shell(script), name=name, job_folder=tmp_path, log=tmp_path / f"{name}.log",
                      options=SlurmOptions(gpus_per_job=0, **options))

    succeeded, failed = job("succeeds", "true"), job("fails", "exit 4")
    never_started = job("never_started", "true", extra=("--begin=now+1hour",))
    killed_pid = tmp_path / "killed.pid"
    killed = job("killed", f"echo $$ > {killed_pid}; exec sleep 600")
    wait_for(killed_pid.exists, "the job to start")
    cancel([never_started, killed])
    jobs = [succeeded, failed, never_started, killed]
    remembered = wait_until_ended(jobs)
    assert [remembered[job.job_id].state for job in jobs] == [
        JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED, JobState.CANCELLED]

    cluster.forget_all_jobs()
    # the records a benchmark keeps in its folder to find its jobs again
    recorded = [SlurmJob.from_json(json.loads(json.dumps(job.to_json()))) for job in jobs]
    forgotten = job_states(recorded)

    assert [(forgotten[job.job_id].state, forgotten[job.job_id].exit_code) for job in jobs] == [
        (JobState.COMPLETED, 0), (JobState.FAILED, 4), (JobState.VANISHED, None), (JobState.FAILED, 143)]
    assert forgotten[failed.job_id].detail.startswith(f"from its status file {failed.status_file}")
    assert forgotten[never_started.job_id].describe().endswith(f"log {never_started.log}")
    # squeue refuses a single unknown id (but not several); the layer reads the status file all the same
    assert job_states([succeeded])[succeeded.job_id].state is JobState.COMPLETED


def test_refusal_names_the_command_and_slurms_answer(cluster, tmp_path):
    with pytest.raises(SlurmError) as refused:
        submit(["true"], name="refused", job_folder=tmp_path, log=tmp_path / "r.log",
               options=SlurmOptions(partition="nosuchpartition", gpus_per_job=0))
    message = str(refused.value)
    assert message.startswith("sbatch --parsable --job-name=refused")
    assert "failed (exit 1): sbatch: error: invalid partition specified: nosuchpartition" in message


def test_missing_slurm_commands_and_setup_file_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SlurmError, match=r"^sbatch not found on PATH: run on a machine with the Slurm commands"):
        submit(["true"], name="x", job_folder=tmp_path, log=tmp_path / "x.log", options=CPU_ONLY)
    with pytest.raises(ValueError, match="the Slurm setup file .*missing.sh does not exist"):
        SlurmOptions(setup=tmp_path / "missing.sh")
    with pytest.raises(ValueError, match="job name 'train fold 0': use letters, digits"):
        submit(["true"], name="train fold 0", job_folder=tmp_path, log=tmp_path / "x.log", options=CPU_ONLY)
