"""Slurm jobs through the standard commands: submit a command with sbatch, read job states, cancel jobs.

The layer under the benchmark's Slurm executor (issue 19). Each job runs a job script written by `submit`: it sources
the setup file (module loads, conda activate), exports the step's environment, runs the command and, as it exits,
writes its exit code to a status file next to the script. Job states need no accounting (`sacct`): `squeue
--states=all` answers while the controller remembers a job (MinJobAge after its end, 300 s by default); after that
the job's status file tells completed from failed, and a job with neither has vanished (it never ran, or its node
died). Only the Python standard library and the Slurm commands on PATH are used (submitit was not: it tracks jobs
with sacct, and runs pickled Python functions where the benchmark's steps are commands).
"""

from __future__ import annotations

import enum
import json
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from nnunet_margin._atomic import atomic_path

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
_JOB_ID = re.compile(r"[0-9]+")
_ENVIRONMENT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_COMMAND_TIMEOUT_S = 300  # each Slurm command retries an unresponsive controller for a while, then fails

# squeue's job states (Slurm 22.05) grouped by what they mean for a step.
_WAITING = {"PENDING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESV_DEL_HOLD", "SPECIAL_EXIT"}
_ACTIVE = {"RUNNING", "COMPLETING", "CONFIGURING", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "SUSPENDED"}
_UNSUCCESSFUL = {"FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
_NEVER_SATISFIED = "DependencyNeverSatisfied"
# sbatch options that `submit` sets itself (long and short form): in `extra` they would break the job's records.
_RESERVED = {"--job-name": "-J", "--output": "-o", "--error": "-e", "--dependency": "-d", "--array": "-a",
             "--parsable": None, "--wrap": None}

# As it exits, a job writes its exit code to its status file (atomically). Slurm ends a job (scancel, time limit)
# with SIGTERM to all its processes, which bash would otherwise report as exit code 0.
_SCRIPT_HEAD = r"""#!/bin/bash
# nnunet-margin job {name}, submitted with sbatch by nnunet_margin.nnunet.slurm.
status={status}
write_status() {{
    printf '{{"job_id": "%s", "exit_code": %d}}\n' "$SLURM_JOB_ID" "$1" > "$status.tmp" && mv -f "$status.tmp" "$status"
}}
trap 'write_status $?' EXIT
trap 'exit 143' TERM"""


class SlurmError(RuntimeError):
    """A Slurm command is missing, refused or failed; the message names the command and Slurm's answer."""


class JobState(str, enum.Enum):
    PENDING = "pending"
    BLOCKED = "blocked"  # pending, but a job it depends on failed: Slurm will never start it
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    VANISHED = "vanished"  # Slurm forgot the job and it wrote no status file


@dataclass(frozen=True)
class SlurmOptions:
    """The sbatch options shared by every job of a run (the benchmark's --slurm-* options)."""

    partition: str | None = None
    gpus_per_job: int = 1
    time: str | None = None  # Slurm's formats: minutes, HH:MM:SS, D-HH:MM:SS
    mem: str | None = None  # per node, e.g. 32G
    account: str | None = None
    extra: tuple[str, ...] = ()  # further sbatch arguments, after ours (so they win), e.g. shlex.split(--slurm-extra)
    setup: Path | None = None  # a bash file sourced at the top of every job

    def __post_init__(self):
        if self.gpus_per_job < 0:
            raise ValueError(f"--slurm-gpus-per-job must be 0 or more, got {self.gpus_per_job}")
        if self.setup is not None:
            setup = Path(self.setup).expanduser().absolute()
            if not setup.is_file():
                raise ValueError(f"the Slurm setup file {setup} does not exist: give a bash file (module loads, conda "
                                 "activate) on a file system that the compute nodes see")
            object.__setattr__(self, "setup", setup)
        object.__setattr__(self, "extra", tuple(self.extra))
        for argument in self.extra:
            for long, short in _RESERVED.items():
                if argument.split("=", 1)[0] == long or (short and argument.startswith(short)):
                    raise ValueError(f"--slurm-extra {argument}: nnunet-margin sets {long} of every job itself (its "
                                     "name, log, dependencies); leave it out")

    def sbatch_arguments(self) -> list[str]:
        named = {"--partition": self.partition, "--time": self.time, "--mem": self.mem, "--account": self.account}
        arguments = [f"{option}={value}" for option, value in named.items() if value]
        if self.gpus_per_job:
            arguments.append(f"--gres=gpu:{self.gpus_per_job}")
        if not any(argument.startswith("--kill-on-invalid-dep") for argument in self.extra):
            arguments.append("--kill-on-invalid-dep=yes")  # jobs after a failed one end instead of waiting forever
        return arguments + list(self.extra)


@dataclass(frozen=True)
class SlurmJob:
    """A submitted job: what to record to find its state again after the user logged out."""

    job_id: str
    name: str
    script: Path
    log: Path

    @property
    def status_file(self) -> Path:
        """Written by the job script as it exits: {"job_id": ..., "exit_code": ...}."""
        return _status_file(self.script.parent, self.name, self.job_id)

    def to_json(self) -> dict:
        return {"job_id": self.job_id, "name": self.name, "script": str(self.script), "log": str(self.log)}

    @classmethod
    def from_json(cls, record: Mapping) -> SlurmJob:
        return cls(str(record["job_id"]), record["name"], Path(record["script"]), Path(record["log"]))


@dataclass(frozen=True)
class JobStatus:
    job: SlurmJob
    state: JobState
    detail: str  # Slurm's state and reason, or where the answer came from
    exit_code: int | None = None

    def describe(self) -> str:
        """One line for a status table, e.g. 'failed (job 7): FAILED (NonZeroExitCode), exit code 3, log /b/x.log'."""
        parts = [self.detail] + ([f"exit code {self.exit_code}"] if self.exit_code is not None else [])
        if self.state in (JobState.FAILED, JobState.CANCELLED, JobState.VANISHED):
            parts.append(f"log {self.job.log}")
        return f"{self.state.value} (job {self.job.job_id}): " + ", ".join(parts)


def submit(command: Sequence[str], *, name: str, job_folder: Path, log: Path, options: SlurmOptions,
           environment: Mapping[str, str] | None = None, after: Sequence[str] = ()) -> SlurmJob:
    """Submit `command` as a job that starts once every job in `after` completed successfully; returns the job.

    The job script goes to job_folder/NAME.sbatch (replacing an earlier one), its output to `log`; both folders must
    be on a file system that the compute nodes share. Slurm cancels a job whose dependency failed
    (--kill-on-invalid-dep=yes, unless options.extra says otherwise).
    """
    if not _NAME.fullmatch(name):
        raise ValueError(f"job name {name!r}: use letters, digits and . _ + - only (it names the job's files)")
    if "%" in str(log):
        raise ValueError(f"log path {log}: no '%' (sbatch would expand it as a pattern)")
    environment = dict(environment or {})
    for variable in environment:
        if not _ENVIRONMENT_NAME.fullmatch(variable):
            raise ValueError(f"environment variable name {variable!r} is not a valid shell name")
    for job_id in after:
        if not _JOB_ID.fullmatch(str(job_id)):
            raise ValueError(f"dependency {job_id!r} is not a Slurm job id")
    job_folder, log = Path(job_folder).absolute(), Path(log).absolute()
    log.parent.mkdir(parents=True, exist_ok=True)  # sbatch does not create it: the job would run without output
    script = job_folder / f"{name}.sbatch"
    arguments = ["sbatch", "--parsable", f"--job-name={name}", f"--output={log}", *options.sbatch_arguments()]
    if after:
        arguments.append("--dependency=afterok:" + ":".join(str(job_id) for job_id in after))
    with atomic_path(script) as temporary:
        temporary.write_text(_job_script(command, name, job_folder, environment, options.setup))
    answer = _run([*arguments, str(script)]).stdout.strip()
    job_id = answer.split(";")[0]  # "ID" or "ID;CLUSTER"
    if not _JOB_ID.fullmatch(job_id):
        raise SlurmError(f"{shlex.join(arguments)} answered {answer!r}, not a job id")
    return SlurmJob(job_id=job_id, name=name, script=script, log=log)


def job_states(jobs: Sequence[SlurmJob]) -> dict[str, JobStatus]:
    """The state of each job, by job id: from squeue while the controller remembers the job, else its status file."""
    if not jobs:
        return {}
    ids = ",".join(job.job_id for job in jobs)
    result = _run(["squeue", "--noheader", "--states=all", f"--jobs={ids}", "--format=%i|%T|%r"], check=False)
    # squeue refuses a single id it does not know, but lists nothing for several.
    if result.returncode != 0 and "Invalid job id specified" not in result.stderr:
        _raise_failed(result)
    known = {}
    for line in result.stdout.splitlines() if result.returncode == 0 else []:
        job_id, state, reason = line.strip().split("|", 2)
        known[job_id] = (state, reason)
    return {job.job_id: (_from_squeue(job, *known[job.job_id]) if job.job_id in known else _from_status_file(job))
            for job in jobs}


def cancel(jobs: Sequence[SlurmJob]) -> None:
    """Cancel jobs; ones that already ended or that Slurm forgot are left alone."""
    if jobs:
        _run(["scancel", "--quiet", *(job.job_id for job in jobs)])


def _status_file(job_folder: Path, name: str, job_id: str) -> Path:
    return job_folder / f"{name}.{job_id}.status"


def _job_script(command: Sequence[str], name: str, job_folder: Path, environment: Mapping[str, str],
                setup: Path | None) -> str:
    status = shlex.quote(str(job_folder / name)) + '."$SLURM_JOB_ID".status'  # as _status_file, at run time
    lines = [_SCRIPT_HEAD.format(name=name, status=status)]
    if setup is not None:
        failed = shlex.quote(f"nnunet-margin: sourcing the Slurm setup file {setup} failed")
        lines.append(f"source {shlex.quote(str(setup))} || {{ echo {failed} >&2; exit 1; }}")
    lines += [f"export {variable}={shlex.quote(value)}" for variable, value in environment.items()]
    lines.append(shlex.join(command))
    return "\n".join(lines) + "\n"


def _from_squeue(job: SlurmJob, state: str, reason: str) -> JobStatus:
    detail = state if reason in ("None", "") else f"{state} ({reason})"
    if state in _WAITING:
        return JobStatus(job, JobState.BLOCKED if reason == _NEVER_SATISFIED else JobState.PENDING, detail)
    if state in _ACTIVE:
        return JobStatus(job, JobState.RUNNING, detail)
    exit_code = _status_exit_code(job)
    if state == "COMPLETED":
        return JobStatus(job, JobState.COMPLETED, detail, exit_code)
    if state.startswith("CANCELLED"):  # "CANCELLED by UID" in some versions
        return JobStatus(job, JobState.CANCELLED, detail, exit_code)
    if state in _UNSUCCESSFUL:
        return JobStatus(job, JobState.FAILED, detail, exit_code)
    raise SlurmError(f"squeue reports job {job.job_id} in state {state!r}, which nnunet-margin does not know yet: "
                     "please report it")


def _from_status_file(job: SlurmJob) -> JobStatus:
    exit_code = _status_exit_code(job)
    if exit_code is None:
        return JobStatus(job, JobState.VANISHED, "Slurm no longer knows the job and it wrote no status file (it never "
                                                 "ran, or its node failed)")
    state = JobState.COMPLETED if exit_code == 0 else JobState.FAILED
    return JobStatus(job, state, f"from its status file {job.status_file} (Slurm no longer knows the job)", exit_code)


def _status_exit_code(job: SlurmJob) -> int | None:
    try:
        record = json.loads(job.status_file.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return int(record["exit_code"]) if str(record.get("job_id")) == job.job_id else None


def check_commands(*commands: str) -> None:
    """Raise SlurmError naming the first of the Slurm `commands` that is not on PATH."""
    for command in commands:
        if shutil.which(command) is None:
            raise SlurmError(f"{command} not found on PATH: run on a machine with the Slurm commands (a login node), "
                             "or make them available first (e.g. `module load slurm`)")


def _run(arguments: list[str], check: bool = True) -> subprocess.CompletedProcess:
    check_commands(arguments[0])
    try:
        result = subprocess.run(arguments, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{shlex.join(arguments)} gave no answer in {_COMMAND_TIMEOUT_S} s: is the Slurm controller "
                         "reachable (try `sinfo`)?") from None
    if check and result.returncode != 0:
        _raise_failed(result)
    return result


def _raise_failed(result: subprocess.CompletedProcess):
    answer = (result.stderr.strip() or result.stdout.strip() or "no message").replace("\n", " ")
    raise SlurmError(f"{shlex.join(result.args)} failed (exit {result.returncode}): {answer}")
