"""The Slurm executor: every pending step of the plan as a Slurm job (`nnunet_margin.nnunet.slurm`), each running
the step's own process (`runners.run_step`) as the local executor does, once the jobs of the steps it needs have
succeeded (--dependency=afterok); the report is the last job.

The job of every submitted step is recorded in state/STEP.job.json (written atomically as soon as sbatch answered),
so `benchmark` may be run again at any time: a step that is done needs no job; a step whose job is pending or running
is left alone; a step whose job failed, was cancelled or vanished is submitted again, its log kept beside the new one
as STEP.jobID.log and named; the steps Slurm cancelled because a job they waited for failed (--kill-on-invalid-dep)
are submitted again after it. The submitting command holds the benchmark's lock only while it submits; each job takes
its step's lock and its model fold's lock itself (see `state`), so jobs of benchmarks that share a training take
turns on it, on any node.

Each job exports the nnUNet_* variables of the submitting environment (nnUNet_raw, nnUNet_preprocessed,
nnUNet_results, nnUNet_extTrainer, ...) and runs the step with the submitting Python, whose environment, like the
benchmark folder, must be on a file system the compute nodes see. Steps that run nnU-Net's network (trainings,
predictions, fits that revalidate or predict the calibration set) ask for the GPUs of the options, the others for
none. No job arrays: every step has its own
dependencies, record and log, and an array would tie the resubmission of one failed step to its siblings.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import replace
from pathlib import Path

from ..._atomic import write_json_atomic
from ..slurm import JobState, JobStatus, SlurmError, SlurmJob, SlurmOptions, cancel, job_states, submit
from .plan import Plan, Step
from .runners import BENCHMARK_MARKER, log_command, step_process
from .state import STATE_FOLDER, StepState, read_json

JOBS_FOLDER = "jobs"  # in the benchmark folder: the job scripts and the status files the jobs write as they end
LIVE = (JobState.PENDING, JobState.RUNNING)


def job_record_path(plan: Plan, step: Step) -> Path:
    return plan.folder / STATE_FOLDER / f"{step.id}.job.json"


def job_name(step: Step) -> str:
    return step.id.replace("/", ".")


def submitted_to_slurm(plan: Plan) -> bool:
    """Whether any step of the benchmark was ever submitted as a Slurm job."""
    return (plan.folder / JOBS_FOLDER).is_dir()


def recorded_jobs(plan: Plan, states: dict[str, StepState]) -> dict[str, JobStatus]:
    """The state of the latest job of each step that is not done and has one (one squeue call, none without
    records)."""
    jobs = {}
    for step in plan.steps:
        record = read_json(job_record_path(plan, step)) if not states[step.id].done else None
        if record is not None:
            jobs[step.id] = SlurmJob.from_json(record["job"])
    try:
        statuses = job_states(list(jobs.values()))
    except SlurmError as error:
        steps = ", ".join(list(jobs)[:3]) + (", ..." if len(jobs) > 3 else "")
        raise SlurmError(f"{len(jobs)} unfinished step(s) have Slurm jobs ({steps}) whose state is unknown: {error}. "
                         f"Where those jobs have surely ended, remove their records "
                         f"{plan.folder / STATE_FOLDER}/STEP.job.json") from None
    return {step_id: statuses[job.job_id] for step_id, job in jobs.items()}


def live_jobs(jobs: dict[str, JobStatus]) -> dict[str, JobStatus]:
    return {step_id: status for step_id, status in jobs.items() if status.state in LIVE}


def refuse_live_jobs(jobs: dict[str, JobStatus]) -> None:
    """The local executor does not run a step that a Slurm job is about to run."""
    live = live_jobs(jobs)
    if live:
        listed = [f"{step_id} (job {status.job.job_id}, {status.state.value})" for step_id, status in live.items()]
        raise RuntimeError(f"{len(live)} step(s) have a pending or running Slurm job: {', '.join(listed[:3])}"
                           f"{', ...' if len(listed) > 3 else ''}; wait for them (`benchmark --executor slurm` "
                           f"collects them, `--status` shows them) or cancel them (scancel "
                           f"{' '.join(status.job.job_id for status in live.values())}) before running the steps here")


def job_detail(status: JobStatus, log: Path | None = None) -> str:
    """'job 12 FAILED (NonZeroExitCode), exit code 1, log L', with the job's log once it wrote one (or `log`)."""
    text = f"job {status.job.job_id} {status.detail}"
    if status.exit_code is not None:
        text += f", exit code {status.exit_code}"
    log = log or (status.job.log if status.state is not JobState.PENDING and status.job.log.exists() else None)
    return text + (f", log {log}" if log else "")


def cancelled_for_dependency(status: JobStatus) -> bool:
    """Whether Slurm ended (or holds forever) the job because a job it waited for failed."""
    return status.state in (JobState.CANCELLED, JobState.BLOCKED) and "DependencyNeverSatisfied" in status.detail


class SlurmExecutor:
    """Submits the plan's pending steps as Slurm jobs (see the module docstring)."""

    def __init__(self, plan: Plan, options: SlurmOptions):
        self.plan = plan
        self.options, self.cpu_options = options, replace(options, gpus_per_job=0)
        self.environment = {name: value for name, value in os.environ.items() if name.startswith("nnUNet_")}
        self.environment.update({BENCHMARK_MARKER: str(plan.folder), "PYTHONUNBUFFERED": "1"})

    def submit(self, states: dict[str, StepState], jobs: dict[str, JobStatus]) -> int:
        """Submit every step that is not done and has no pending or running job, after the jobs of the steps it
        needs; `jobs` are the steps' recorded jobs (`recorded_jobs`). Returns how many steps still have a job."""
        job_ids = {step_id: status.job.job_id for step_id, status in live_jobs(jobs).items()}
        waiting = len(job_ids)
        for step in self.plan.steps:
            if states[step.id].done or step.id in job_ids:
                continue
            ended = self._retire(step, jobs[step.id]) if step.id in jobs else ""
            after = [job_ids[need] for need in step.needs if not states[need].done]
            job = self._submit(step, after)
            job_ids[step.id] = job.job_id
            print(f"{step.id}: {ended}job {job.job_id}" + (f" after {' '.join(after)}" if after else ""), flush=True)
        submitted = len(job_ids) - waiting
        if job_ids:
            print(f"submitted {submitted} job(s) to Slurm, {waiting} step(s) already had a pending or running job; "
                  f"job scripts in {self.plan.folder / JOBS_FOLDER}, logs in {self.plan.folder / 'logs'}", flush=True)
        return len(job_ids)

    def _retire(self, step: Step, status: JobStatus) -> str:
        """Say what became of the step's previous job (keeping the log of one that ran); cancel one that Slurm holds
        forever. Returns the words that introduce the new job."""
        if status.state is JobState.BLOCKED:
            cancel([status.job])
        if cancelled_for_dependency(status) or not status.job.log.exists():
            return f"job {status.job.job_id} {status.detail}; submitted again as "
        kept = status.job.log.with_name(f"{status.job.log.stem}.job{status.job.job_id}.log")
        os.replace(status.job.log, kept)
        return f"{job_detail(status, kept)}; submitted again as "

    def _submit(self, step: Step, after: list[str]) -> SlurmJob:
        options = self.options if step.gpu else self.cpu_options
        job = submit(step_process(self.plan, step), name=job_name(step), job_folder=self.plan.folder / JOBS_FOLDER,
                     log=self.plan.log(step), options=options, environment=self.environment, after=after)
        write_json_atomic(job_record_path(self.plan, step), {
            "step": step.id, "job": job.to_json(), "after": after, "gpus": options.gpus_per_job,
            "submitted": time.strftime("%Y-%m-%d %H:%M:%S"), "host": socket.gethostname()})
        log_command(self.plan, step)
        return job
