"""`nnunet-margin benchmark`: check the settings, then run the pending steps here or submit them to Slurm (or print
them, or their status)."""

from __future__ import annotations

import platform
import time
from importlib.metadata import version
from pathlib import Path

from ..._atomic import write_json_atomic
from ..slurm import JobState, JobStatus, SlurmOptions, check_commands
from .plan import REPORT_FOLDER, SUMMARY_FILE, Plan, build_plan
from .runners import LocalExecutor, remove_leftovers
from .settings import IDENTITY_FILE, Benchmark, BenchmarkSettings, gpu_slots, identity_differences, resolve
from .slurm_executor import (LIVE, SlurmExecutor, cancelled_for_dependency, job_detail, live_jobs, recorded_jobs,
                             refuse_live_jobs, submitted_to_slurm)
from .state import (LOCK_FILE, Lock, StepState, adopt_trainings, describe_holder, evaluate, failure_path, holder_info,
                    lock_holder, read_json, step_lock_path)


def run_benchmark(settings: BenchmarkSettings, dry_run: bool = False, status: bool = False,
                  slurm: SlurmOptions | None = None) -> None:
    """Run the benchmark's pending steps and write its report, or with `slurm` submit them as Slurm jobs (the run
    after they ended prints the report); with `dry_run` print them in order, with `status` print every step's state.
    Nothing runs before every argument has been checked."""
    benchmark = resolve(settings)
    _check_identity(benchmark)
    plan = build_plan(benchmark)
    if dry_run or status:
        states = evaluate(plan)
        print(_status_table(benchmark, plan, states) if status else _dry_run(benchmark, plan, states), end="")
        return
    if slurm is not None:
        check_commands("sbatch", "squeue", "scancel")
    if not benchmark.folder.exists():
        _note_other_benchmarks(benchmark)
    benchmark.folder.mkdir(parents=True, exist_ok=True)
    lock_file = benchmark.folder / LOCK_FILE
    previous = read_json(lock_file)
    lock = Lock.try_acquire(lock_file, holder_info(command="nnunet-margin benchmark"))
    if lock is None:
        raise RuntimeError(f"benchmark {benchmark.folder} is being run by "
                           f"{describe_holder(lock_holder(lock_file) or {})}: one runner per benchmark; wait for it "
                           f"(`--status` shows its steps) or stop it first")
    if previous:
        print(f"note: the run of pid {previous.get('pid', '?')} on host {previous.get('host', '?')} (since "
              f"{previous.get('started', '?')}) ended without releasing the benchmark; its unfinished steps are "
              f"redone", flush=True)
    try:
        _run_locked(benchmark, plan, lock, slurm)
    finally:
        lock.release()


def settings_record(settings: BenchmarkSettings) -> dict:
    """The settings as benchmark.json records them (folders as strings)."""
    return {key: str(value) if isinstance(value, Path) else value for key, value in vars(settings).items()}


def _run_locked(benchmark: Benchmark, plan: Plan, lock: Lock, slurm: SlurmOptions | None) -> None:
    settings = benchmark.settings
    write_json_atomic(benchmark.folder / IDENTITY_FILE, {
        "identity": benchmark.identity(), "name": benchmark.name, "settings": settings_record(settings),
        "executor": "slurm" if slurm else "local", "versions": _versions(slurm), "plugin_trainers": benchmark.plugin})
    plan.save()
    states = evaluate(plan)
    adopt_trainings(plan, states)
    jobs = recorded_jobs(plan, states)
    if slurm is None:
        refuse_live_jobs(jobs)
    remove_leftovers(plan, set(live_jobs(jobs)))
    pending = sum(not state.done for state in states.values())
    print(f"benchmark of {', '.join(settings.trainers)} on {benchmark.dataset_name} {settings.configuration}, folds "
          f"{', '.join(settings.folds)}: {pending} of {len(plan.steps)} step(s) to run, results in {benchmark.folder}",
          flush=True)
    if slurm is None:
        LocalExecutor(plan, gpu_slots(settings.gpus), lock).run()
    elif SlurmExecutor(plan, slurm).submit(states, jobs):
        print("the jobs run without this command: `benchmark ... --status` shows them; once they have ended, run "
              "this command again to collect them and print the report (it submits failed steps again, naming "
              "their logs)")
        return
    report = benchmark.folder / REPORT_FOLDER
    print((report / SUMMARY_FILE).read_text(), end="")
    print(f"wrote {report / 'report.md'} (tables: table.csv, table.tex; figure: compare.png)")


def _check_identity(benchmark: Benchmark) -> None:
    """Refuse a folder that holds a benchmark of other settings."""
    recorded = read_json(benchmark.folder / IDENTITY_FILE)
    if recorded is not None and recorded.get("identity") != benchmark.identity():
        differences = identity_differences(recorded.get("identity") or {}, benchmark.identity())
        raise ValueError(f"benchmark {benchmark.folder} was run with other settings ({'; '.join(differences)}); it is "
                         f"kept as it is: pass another --name, or none (the default name follows the settings)")


def _note_other_benchmarks(benchmark: Benchmark) -> None:
    """Say how a new benchmark differs from the others of its dataset and configuration."""
    identity = benchmark.identity()
    for other in sorted(benchmark.root.glob(f"*/{IDENTITY_FILE}")):
        other_identity = (read_json(other) or {}).get("identity")
        if other_identity and other_identity.get("configuration") == identity["configuration"]:
            print(f"note: new benchmark {benchmark.name}; {other.parent.name} differs in "
                  f"{'; '.join(identity_differences(other_identity, identity))}", flush=True)


def _versions(slurm: SlurmOptions | None) -> dict[str, str]:
    """The versions of this environment, and the device of its steps (a Slurm job's, or this machine's GPU)."""
    import torch

    from ... import __version__

    if slurm is not None:
        device = f"Slurm jobs, {slurm.gpus_per_job} GPU(s) per training or prediction" if slurm.gpus_per_job else \
            "Slurm jobs without GPUs"
    else:
        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return {"nnunet-margin": __version__, "nnunetv2": version("nnunetv2"), "torch": torch.__version__,
            "python": platform.python_version(), "device": device}


def _dry_run(benchmark: Benchmark, plan: Plan, states: dict[str, StepState]) -> str:
    """The pending steps in an order that runs each after the steps it waits for, numbered, with the command each
    runs now (steps that may run at once for a scheduler: those whose waits are done)."""
    pending = [step for step in plan.steps if not states[step.id].done]
    numbers = {step.id: index for index, step in enumerate(pending, 1)}
    existing = "existing" if benchmark.folder.exists() else "new"
    lines = [f"# benchmark {benchmark.folder} ({existing}): {len(pending)} of {len(plan.steps)} step(s) to run"]
    for step in pending:
        waits = [f"[{numbers[need]}]" for need in step.needs if need in numbers]
        lines.append(f"[{numbers[step.id]}] {step.id}" + (f"  waits for {' '.join(waits)}" if waits else ""))
        lines.append(f"    {step.display(plan.results, step.current_command())}")
    return "\n".join(lines) + "\n"


def _status_table(benchmark: Benchmark, plan: Plan, states: dict[str, StepState]) -> str:
    """Every step: done, running (who holds its lock, its Slurm job), failed (exit code and log) or pending (why, its
    Slurm job)."""
    rows, counts = [], {}
    jobs = recorded_jobs(plan, states)
    for step in plan.steps:
        state, holder, job = states[step.id], lock_holder(step_lock_path(plan, step)), jobs.get(step.id)
        failure, live = read_json(failure_path(plan, step)), job if job is not None and job.state in LIVE else None
        if state.done:
            status, detail = "done", ""
        elif holder is not None:
            status, detail = "running", f"{describe_holder(holder)}, log {plan.log(step)}"
            detail = f"job {live.job.job_id}, {detail}" if live is not None else detail
        elif live is not None:
            status, detail = live.state.value, job_detail(live)
        elif job is not None and job.state is not JobState.COMPLETED and not state.waits_for \
                and not cancelled_for_dependency(job):
            status, detail = "failed", job_detail(job)
        elif failure is not None and job is None:
            status, detail = "failed", f"{failure.get('message', '')} ({failure.get('finished', '?')}), log " \
                                       f"{failure.get('log', plan.log(step))}"
        else:
            status, detail = "pending", _pending_reason(plan, state, job)
        counts[status] = counts.get(status, 0) + 1
        rows.append(f"{status:8} {step.id}" + (f"  {detail}" if detail else ""))
    runner = lock_holder(benchmark.folder / LOCK_FILE)
    header = f"# benchmark {benchmark.folder}: " + ", ".join(f"{count} {status}" for status, count in counts.items())
    if runner is not None:
        header += f"; run by {describe_holder(runner)}"
    return "\n".join([header, *rows]) + "\n"


def _pending_reason(plan: Plan, state: StepState, job: JobStatus | None) -> str:
    """Why a step without a live job is pending, and what became of its last job."""
    if job is not None:
        return f"{state.reason}; {job_detail(job)}; the next run submits it again"
    return f"not submitted: {state.reason}" if submitted_to_slurm(plan) else state.reason
