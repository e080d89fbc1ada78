"""Running steps: one step in its own process (`run_step`, what every executor starts), and the local executor.

A step's process (`python -m nnunet_margin.nnunet.benchmark FOLDER STEP`) takes the step's lock and the
locks of the shared folders it writes, checks that the steps it needs are done and that it is not done itself, runs
its command (or action) with nnUNet_results set, output into its log, and records its inputs and outputs. A step that
writes a folder of its own writes into a fresh hidden folder beside it that is swapped in only when complete, so an
interrupted step leaves the previous outputs and their record, and is redone by the next run; nothing is continued.

Process groups: the command runs in a process group of its own, and the step's process is its guardian: on SIGTERM,
SIGINT or SIGHUP it terminates the whole group (nnU-Net's data-augmentation and export workers included), and it
removes whatever the command leaves running. Each step's process gets SIGTERM when its executor dies (Linux
PR_SET_PDEATHSIG, also when the executor is killed with SIGKILL), and each command when its step's process dies.

The local executor (`LocalExecutor`) holds the benchmark's lock (passed on to every step's process and command, so an
orphaned step keeps the benchmark locked), starts each step whose needs are done in a slot (one per `--gpus` entry,
or one), and passes SIGINT, SIGTERM and SIGHUP on to the steps, which stop before it exits. Actions of this package
(copying a report, writing the report) need no process of their own: it runs them itself, the same way.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

from ..._atomic import write_json_atomic
from .plan import Plan, Step
from .state import (Hasher, Lock, StepState, describe_holder, evaluate, failure_path, holder_info, lock_holder,
                    output_fingerprint, step_lock_path, write_record)

EXECUTOR_PID = "NNUNET_MARGIN_BENCHMARK_EXECUTOR"  # the pid a step's process dies with
BENCHMARK_MARKER = "NNUNET_MARGIN_BENCHMARK"  # the benchmark folder, in the environment of every process of a step
EXIT_ALREADY_RUNNING = 75
TERMINATION_GRACE_S = 20.0  # from SIGTERM to SIGKILL of a step's command
_PR_SET_PDEATHSIG = 1


class Interrupted(KeyboardInterrupt):
    """SIGTERM, SIGINT or SIGHUP arrived."""


def die_with_parent(parent_pid: int) -> None:
    """Ask Linux to send this process SIGTERM when its parent dies (no-op elsewhere); exit if it already has."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGTERM)


def console_script(name: str) -> str:
    """The command of this Python environment (works without an activated venv)."""
    beside_python = Path(sys.executable).parent / name
    return str(beside_python) if beside_python.is_file() else name


def _signal_group(group: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, signum)


# --- one step -------------------------------------------------------------------------------------------------------

class _StepProcess:
    """Runs one step in this process (see the module docstring); its output is this process's stdout."""

    def __init__(self, plan: Plan, step: Step):
        self.plan, self.step = plan, step
        self.child: subprocess.Popen | None = None
        self.terminating_since: float | None = None
        self.termination_signal = signal.SIGTERM

    def run(self) -> int:
        step, plan = self.step, self.plan
        lock = Lock.try_acquire(step_lock_path(plan, step), holder_info(step=step.id, log=str(plan.log(step))))
        if lock is None:
            print(f"{step.id} is already running: {describe_holder(lock_holder(step_lock_path(plan, step)) or {})}")
            return EXIT_ALREADY_RUNNING
        locks = [lock] + [self._shared_lock(Path(path)) for path in step.locks]
        try:
            return self._run_locked([held.fd for held in locks] + _inherited_lock_fds())
        finally:
            for held in reversed(locks):
                held.release()

    def _shared_lock(self, path: Path) -> Lock:
        """A lock of a folder other benchmarks may write too (a model fold); waits for it."""
        info = holder_info(step=self.step.id, benchmark=str(self.plan.folder))
        lock = Lock.try_acquire(path, info)
        if lock is None:
            holder = lock_holder(path) or {}
            print(f"waiting for {holder.get('step', 'a step')} of benchmark {holder.get('benchmark', '?')} "
                  f"({describe_holder(holder)}), which writes into the same model fold", flush=True)
            lock = Lock.try_acquire(path, info, wait=True)
        return lock

    def _run_locked(self, lock_fds: list[int]) -> int:
        step, plan = self.step, self.plan
        hasher = Hasher()
        state = evaluate(plan, hasher)[step.id]
        if state.done:
            print(f"{step.id} is done already")
            return 0
        if state.inputs is None:
            return self._fail(f"{step.id} {state.reason}: run those steps first", 1)
        started = time.time()
        target = Path(step.output["folder"]) if step.staged else None
        staging = target.parent / f".{target.name}.partial-{os.getpid()}-{secrets.token_hex(4)}" if target else None
        try:
            code = self._execute(staging, lock_fds)
            if code != 0:
                return self._fail(f"{step.id} failed with exit code {code}", code)
            outputs = output_fingerprint(step, hasher, staging)
            if outputs.fingerprint is None:
                return self._fail(f"{step.id} finished, but {outputs.reason}", 1)
            if target is not None:
                _swap_in(staging, target)
            write_record(plan, step, state.inputs, outputs, started)
            print(f"{step.id} done in {time.time() - started:.0f} s", flush=True)
            return 0
        except Interrupted as interruption:
            print(f"{step.id} interrupted; it will be redone", flush=True)
            return 128 + interruption.args[0]
        finally:
            if staging is not None and staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    def _fail(self, message: str, code: int) -> int:
        print(message, flush=True)
        write_json_atomic(failure_path(self.plan, self.step),
                          {"step": self.step.id, "exit_code": code, "message": message,
                           "log": str(self.plan.log(self.step)), "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
        return code

    def _execute(self, staging: Path | None, lock_fds: list[int]) -> int:
        """Run the step's command (or action) into `staging` (for a staged step); returns its exit code."""
        if staging is not None:
            staging.parent.mkdir(parents=True, exist_ok=True)
        if self.step.action is not None:
            return self._action(staging)
        command = [str(staging) if staging is not None and part == self.step.output["folder"] else part
                   for part in self.step.current_command()]
        print(f"$ {self.step.display(self.plan.results, command)}", flush=True)
        environment = {**os.environ, "nnUNet_results": self.step.results_root, "PYTHONUNBUFFERED": "1"}
        guardian = os.getpid()
        self.child = subprocess.Popen([console_script(command[0]), *command[1:]], env=environment,
                                      pass_fds=lock_fds, stdin=subprocess.DEVNULL,
                                      preexec_fn=lambda: (os.setpgid(0, 0), die_with_parent(guardian)))
        return self._wait_for_child()

    def _wait_for_child(self) -> int:
        """Wait for the command, escalating to SIGKILL after a termination request; then remove whatever is left of
        its process group (the exited command keeps its pid, the group's id, until it is reaped here)."""
        child = self.child
        while os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is None:
            if self.terminating_since is not None and time.time() - self.terminating_since > TERMINATION_GRACE_S:
                _signal_group(child.pid, signal.SIGKILL)
            time.sleep(0.2)
        _signal_group(child.pid, signal.SIGKILL)
        code = child.wait()
        self.child = None
        if self.terminating_since is not None:
            raise Interrupted(self.termination_signal)
        return code

    def terminate(self, signum: int, frame) -> None:
        """Signal handler: stop the command's whole group, or the action running in this process."""
        if self.child is None:
            raise Interrupted(signum)
        if self.terminating_since is None:
            self.terminating_since, self.termination_signal = time.time(), signum
            _signal_group(self.child.pid, signal.SIGTERM)

    def _action(self, staging: Path) -> int:
        print(f"$ {self.step.display(self.plan.results)}", flush=True)
        try:
            if self.step.action == "collect":
                staging.mkdir()
                shutil.copy2(self.step.arguments["source"], staging / Path(self.step.arguments["source"]).name)
            else:
                from .report import write_report

                write_report(self.plan, self.step, staging)
        except Exception:  # the step fails with the traceback in its log, the runner goes on
            traceback.print_exc(file=sys.stdout)
            return 1
        return 0


def _inherited_lock_fds() -> list[int]:
    """The benchmark's lock, passed on by the executor (see `LocalExecutor`)."""
    value = os.environ.get(LocalExecutor.LOCK_FD, "")
    return [int(value)] if value.isdigit() else []


def _swap_in(staging: Path, target: Path) -> None:
    """Put the complete `staging` folder in place of `target` (the previous outputs are removed after)."""
    if not target.exists():
        os.rename(staging, target)
        return
    previous = target.parent / f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(target, previous)
    os.rename(staging, target)
    shutil.rmtree(previous, ignore_errors=True)


def remove_leftovers(plan: Plan, running: set[str] = frozenset()) -> None:
    """Staging and replaced folders that killed steps left beside their outputs (only while the benchmark's lock is
    held), except those of steps in `running` (Slurm jobs) or whose lock is held (a step's process still runs)."""
    for step in plan.steps:
        if not step.staged or step.id in running or lock_holder(step_lock_path(plan, step)) is not None:
            continue
        target = Path(step.output["folder"])
        for pattern in (f".{target.name}.partial-*", f".{target.name}.old-*"):
            for path in sorted(target.parent.glob(pattern)):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)


def step_process(plan: Plan, step: Step) -> list[str]:
    """The command line of the step's own process (see `run_step`), as every executor starts it."""
    return [sys.executable, "-m", __package__, str(plan.folder), step.id]


def log_command(plan: Plan, step: Step) -> None:
    """Add the command the step runs now to commands.log (every command an executor started)."""
    with open(plan.folder / "commands.log", "a") as commands:
        commands.write(step.display(plan.results, step.current_command()) + "\n")


def run_step(folder: Path, step_id: str) -> int:
    """Run one step of the benchmark in `folder` (its plan.json) in this process; returns the exit code."""
    plan = Plan.load(folder)
    process = _StepProcess(plan, plan.step(step_id))
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, process.terminate)
    executor = os.environ.get(EXECUTOR_PID, "")
    try:
        if executor.isdigit():
            die_with_parent(int(executor))
        return process.run()
    except Interrupted as interruption:
        return 128 + interruption.args[0]


# --- the local executor ---------------------------------------------------------------------------------------------

class LocalExecutor:
    """Runs the plan's pending steps on this machine, each in its own process (see the module docstring)."""

    LOCK_FD = "NNUNET_MARGIN_BENCHMARK_LOCK_FD"

    def __init__(self, plan: Plan, slots: list[str | None], lock: Lock):
        self.plan, self.slots, self.lock = plan, slots, lock
        self.hasher = Hasher()
        self.running: dict[str | None, tuple[Step, subprocess.Popen, float]] = {}
        self.attempted: set[str] = set()
        self.finished_here: list[tuple[Step, int, float]] = []  # actions run in this process, not yet reported
        self.failed: dict[str, str] = {}
        self.finished = 0

    def run(self) -> None:
        """Run every pending step whose needs are done, until none is left; raise naming the failed steps."""
        previous = {signum: signal.signal(signum, self._interrupt) for signum in (signal.SIGTERM, signal.SIGHUP)}
        try:
            states = evaluate(self.plan, self.hasher)
            while True:
                started = self._start_ready(states)
                if self.running:
                    self._wait_for_one()
                elif not started:
                    break
                states = evaluate(self.plan, self.hasher)
                self._report_finished(states)
        except KeyboardInterrupt:
            self._stop_all()
            raise
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        self._raise_failures(states)

    @staticmethod
    def _interrupt(signum, frame) -> None:
        raise Interrupted(signum)

    def _total(self, states: dict[str, StepState]) -> int:
        return self.finished + sum(not state.done for state in states.values())

    def _start_ready(self, states: dict[str, StepState]) -> bool:
        """Start the steps whose needs are done in the plan's order, one per free slot (an action runs here once
        the commands before it have ended); whether any started."""
        ready = [step for step in self.plan.steps if not states[step.id].done and not states[step.id].waits_for
                 and step.id not in self.attempted]
        free = [slot for slot in self.slots if slot not in self.running]
        started = False
        for step in ready:
            if step.action is None and free:
                self._start(step, free.pop(0), states)
            elif step.action is not None and not self.running:
                self._run_here(step, states)
            else:
                break
            started = True
        return started

    def _announce(self, step: Step, slot: str | None, states: dict[str, StepState]) -> Path:
        """Log the command and print that it runs; returns its log."""
        self.attempted.add(step.id)
        log = self.plan.log(step)
        log.parent.mkdir(parents=True, exist_ok=True)
        log_command(self.plan, step)
        where = f" (GPU {slot})" if slot is not None else ""
        print(f"[{self.finished + len(self.running) + 1}/{self._total(states)}] {step.id}{where}: running, log {log}",
              flush=True)
        return log

    def _start(self, step: Step, slot: str | None, states: dict[str, StepState]) -> None:
        """Start the step's process (see `run_step`) with the benchmark's lock."""
        log = self._announce(step, slot, states)
        environment = {**os.environ, EXECUTOR_PID: str(os.getpid()), BENCHMARK_MARKER: str(self.plan.folder),
                       self.LOCK_FD: str(self.lock.fd)}
        if slot is not None:
            environment["CUDA_VISIBLE_DEVICES"] = slot
        with open(log, "w") as output:
            process = subprocess.Popen(step_process(self.plan, step),
                                       env=environment, stdout=output, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, pass_fds=(self.lock.fd,), start_new_session=True)
        self.running[slot] = (step, process, time.time())

    def _run_here(self, step: Step, states: dict[str, StepState]) -> None:
        """Run an action of this package (a copy, the report) in this process, which has its imports already."""
        log = self._announce(step, None, states)
        started = time.time()
        with open(log, "w") as output, contextlib.redirect_stdout(output):
            code = _StepProcess(self.plan, step).run()
        self.finished_here.append((step, code, started))

    def _wait_for_one(self) -> None:
        while all(process.poll() is None for _, process, _ in self.running.values()):
            time.sleep(0.2)

    def _report_finished(self, states: dict[str, StepState]) -> None:
        """Print the steps that ended since the last call, done or failed (with the log)."""
        ended, self.finished_here = self.finished_here, []
        for slot, (step, process, started) in list(self.running.items()):
            if process.returncode is not None:
                del self.running[slot]
                ended.append((step, process.returncode, started))
        for step, code, started in ended:
            self.finished += 1
            if code == 0 and states[step.id].done:
                status = f"done in {time.time() - started:.0f} s"
            else:
                reason = f"exit code {code}" if code else states[step.id].reason
                status = f"FAILED ({reason}; see {self.plan.log(step)})"
                self.failed[step.id] = status
            print(f"[{self.finished}/{self._total(states)}] {step.id}: {status}", flush=True)

    def _stop_all(self) -> None:
        """Stop every running step (each stops its command's process group) and wait for them."""
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)
        for step, process, _ in self.running.values():
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        deadline = time.time() + TERMINATION_GRACE_S + 10
        for step, process, _ in self.running.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            print(f"{step.id}: stopped; it will be redone", flush=True)

    def _raise_failures(self, states: dict[str, StepState]) -> None:
        if not self.failed:
            return
        blocked = [step_id for step_id, state in states.items() if not state.done and step_id not in self.failed]
        lines = [f"{step_id}: {status}" for step_id, status in self.failed.items()]
        raise RuntimeError(f"{len(self.failed)} step(s) failed, {len(blocked)} step(s) not run because they need "
                           f"them; finished steps are kept, rerun `benchmark` after fixing:\n  " + "\n  ".join(lines))
