"""What is done: each step's record of the inputs it consumed and the outputs it wrote, and the locks that keep one
runner per benchmark folder and one writer per model fold.

A step's inputs are its settings, the fingerprints of the data sets it reads (every file's name, size and
modification time) and the current outputs of the steps it needs. Outputs are fingerprinted by type:

- "fold" (a training): the SHA-256 of checkpoint_final.pth, once nnU-Net's training and a validation of that
  checkpoint are complete (plugin trainers: validation/provenance.json names the checkpoint; nnU-Net's trainers, and
  wherever `--npz` is needed: the validation's .npz are newer than the checkpoint and older than summary.json);
- "files": the SHA-256 of each file;
- "folder" (a folder of the benchmark's own, swapped in complete): name, size and modification time of every file.

A step is done when its record (state/STEP.json, written atomically after its outputs) holds the current inputs and
outputs; a training is done when its fold is complete, whoever trained it (trainings in nnUNet_results may be shared
by benchmarks; the records downstream name the checkpoint they used). Hashes are cached in the records by size and
modification time. A step that failed leaves state/STEP.failed.json with its exit code and log.

Locks are `flock`s on a file that holds the holder's pid, host and start time: BENCHMARK/lock for the runner (passed
on to every step's process and command, so an orphaned step still holds it), state/STEP.lock while a step runs, and
one per model fold in calibration_benchmarks/_locks for the steps that write into it. The kernel releases a lock
whose holders all died, so a stale lock is simply taken over.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from ..._atomic import write_json_atomic
from ..layout import FINAL_CHECKPOINT, PROBABILITIES_SUFFIX, SUMMARY_FILE, validation_folder
from ..provenance import PROVENANCE_FILE, file_sha256
from .plan import Plan, Step
from .settings import file_listing

STATE_FOLDER = "state"
LOCK_FILE = "lock"


def record_path(plan: Plan, step: Step) -> Path:
    return plan.folder / STATE_FOLDER / f"{step.id}.json"


def failure_path(plan: Plan, step: Step) -> Path:
    return plan.folder / STATE_FOLDER / f"{step.id}.failed.json"


def step_lock_path(plan: Plan, step: Step) -> Path:
    return plan.folder / STATE_FOLDER / f"{step.id}.lock"


def read_json(path: Path) -> dict | None:
    """A record written by this module, or None if it is missing or unreadable (then the step is redone)."""
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) else None


# --- fingerprints ---------------------------------------------------------------------------------------------------

class Hasher:
    """SHA-256 of files, reusing a recorded hash while the file's size and modification time are unchanged."""

    def __init__(self):
        self.known: dict[tuple[str, int, int], str] = {}

    def remember(self, path: Path, entry: list) -> None:
        """`entry` = [size, mtime_ns, sha256] of `path` as a record saw it."""
        self.known[(str(path), int(entry[0]), int(entry[1]))] = str(entry[2])

    def sha256(self, path: Path) -> tuple[str, list]:
        """The file's hash and its cache entry [size, mtime_ns, sha256]."""
        status = path.stat()
        key = (str(path), status.st_size, status.st_mtime_ns)
        if key not in self.known:
            self.known[key] = file_sha256(path)
        return self.known[key], [status.st_size, status.st_mtime_ns, self.known[key]]


@dataclass
class Outputs:
    """A step's outputs as they are now: the fingerprint (None if incomplete, with the reason) and hash cache
    entries."""

    fingerprint: dict | None
    reason: str = ""
    cache: dict | None = None


def folder_listing(folder: Path) -> dict[str, list[int]]:
    """{relative path: [size, mtime_ns]} of every file below `folder`."""
    names = [str(path.relative_to(folder)) for path in sorted(folder.rglob("*")) if path.is_file()]
    return file_listing(folder, names)


def output_fingerprint(step: Step, hasher: Hasher, location: Path | None = None) -> Outputs:
    """The fingerprint of the step's outputs (see the module docstring), read from `location` instead of the output
    folder if given (a staged folder before it is swapped in)."""
    output = step.output
    if output["type"] == "folder":
        folder = location or Path(output["folder"])
        if not folder.is_dir():
            return Outputs(None, f"{folder} is not written yet")
        return Outputs({"files": folder_listing(folder)})
    if output["type"] == "files":
        fingerprint, cache = {}, {}
        for file in map(Path, output["files"]):
            if not file.is_file():
                return Outputs(None, f"{file} is not written yet")
            fingerprint[file.name], cache[file.name] = hasher.sha256(file)
        return Outputs(fingerprint, cache=cache)
    return _fold_outputs(Path(output["folder"]), output["calibration_report"], output["npz"], hasher)


def _fold_outputs(fold: Path, calibration_report: str | None, npz: bool, hasher: Hasher) -> Outputs:
    """A training's outputs: complete once nnU-Net has trained the fold and validated that checkpoint (and the
    plugin's validation wrote `calibration_report`, or nnU-Net's the probabilities, where asked)."""
    checkpoint = fold / FINAL_CHECKPOINT
    if not checkpoint.is_file():
        return Outputs(None, f"{checkpoint} is not there: the fold is not trained")
    validation = validation_folder(fold)
    summary = validation / SUMMARY_FILE
    if not summary.is_file() or summary.stat().st_mtime_ns < checkpoint.stat().st_mtime_ns:
        return Outputs(None, f"{summary} is missing or older than {FINAL_CHECKPOINT}: the checkpoint is not validated")
    sha, entry = hasher.sha256(checkpoint)
    if calibration_report:
        record = read_json(validation / PROVENANCE_FILE) or {}
        report = validation / calibration_report
        if record.get("sha256") != sha or not report.is_file() or \
                report.stat().st_mtime_ns > (validation / PROVENANCE_FILE).stat().st_mtime_ns:
            return Outputs(None, f"{validation / PROVENANCE_FILE} does not vouch for {report.name} of the current "
                                 f"{FINAL_CHECKPOINT}: its validation is missing, unfinished or of another model")
    if npz:
        written = [path.stat().st_mtime_ns for path in validation.glob(f"*{PROBABILITIES_SUFFIX}")]
        if not written or min(written) < checkpoint.stat().st_mtime_ns or \
                max(written) > summary.stat().st_mtime_ns:
            return Outputs(None, f"the probabilities ({PROBABILITIES_SUFFIX}) in {validation} are missing, older than "
                                 f"{FINAL_CHECKPOINT} or newer than {SUMMARY_FILE}: they are not those of a complete "
                                 f"validation of it")
    return Outputs({FINAL_CHECKPOINT: sha}, cache={FINAL_CHECKPOINT: entry})


def data_fingerprints(plan: Plan) -> dict[str, str]:
    """A digest of each data set's files as they are now (a missing file counts as changed)."""
    digests = {}
    for name, data in plan.data.items():
        folder = Path(data["folder"])
        listing = {file: list(_stat(folder / file)) for file in data["files"]}
        digests[name] = hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()
    return digests


def _stat(path: Path) -> tuple[int, int]:
    try:
        status = path.stat()
    except FileNotFoundError:
        return -1, -1
    return status.st_size, status.st_mtime_ns


# --- step states ----------------------------------------------------------------------------------------------------

@dataclass
class StepState:
    done: bool
    reason: str  # why it is not done
    inputs: dict | None  # None while a step it needs is not done
    outputs: Outputs
    waits_for: list[str]


def evaluate(plan: Plan, hasher: Hasher | None = None) -> dict[str, StepState]:
    """The state of every step, in the plan's order (see the module docstring)."""
    hasher = hasher or Hasher()
    data = data_fingerprints(plan)
    states: dict[str, StepState] = {}
    for step in plan.steps:
        record = read_json(record_path(plan, step))
        for name, entry in ((record or {}).get("cache") or {}).items():
            hasher.remember(_cached_file(step, name), entry)
        outputs = output_fingerprint(step, hasher)
        waits_for = [need for need in step.needs if not states[need].done]
        if waits_for:
            states[step.id] = StepState(False, f"waits for {', '.join(waits_for)}", None, outputs, waits_for)
            continue
        inputs = {"settings": step.settings, "data": {name: data[name] for name in step.data},
                  "needs": {need: states[need].outputs.fingerprint for need in step.needs}}
        if outputs.fingerprint is None:
            reason = outputs.reason
        elif step.output["type"] == "fold":
            reason = ""  # nnU-Net's finished training, whoever ran it
        elif record is None:
            reason = "no record of this benchmark vouches for its outputs"
        elif record.get("inputs") != inputs:
            reason = f"its inputs changed ({', '.join(_changed(record.get('inputs') or {}, inputs))})"
        elif record.get("outputs") != outputs.fingerprint:
            reason = "its outputs changed since it ran"
        else:
            reason = ""
        states[step.id] = StepState(not reason, reason, inputs, outputs, [])
    return states


def _cached_file(step: Step, name: str) -> Path:
    folder = Path(step.output["folder"]) if "folder" in step.output else Path(step.output["files"][0]).parent
    return folder / name


def _changed(old: dict, new: dict) -> list[str]:
    changed = [f"{key} {name}" for key in ("settings", "data", "needs")
               for name in sorted(set(old.get(key) or {}) | set(new.get(key) or {}))
               if (old.get(key) or {}).get(name) != (new.get(key) or {}).get(name)]
    return changed[:3] + (["..."] if len(changed) > 3 else [])


def write_record(plan: Plan, step: Step, inputs: dict, outputs: Outputs, started: float) -> None:
    write_json_atomic(record_path(plan, step), {
        "step": step.id, "inputs": inputs, "outputs": outputs.fingerprint, "cache": outputs.cache,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": round(time.time() - started, 1),
        "host": socket.gethostname()})
    failure_path(plan, step).unlink(missing_ok=True)


def adopt_trainings(plan: Plan, states: dict[str, StepState]) -> None:
    """Record each complete training whose record is missing or names another checkpoint (trained by another
    benchmark, by hand, or again since), so that its checkpoint's hash is cached and the history shows it."""
    for step in plan.steps:
        state = states[step.id]
        record = read_json(record_path(plan, step)) or {}
        if step.output["type"] == "fold" and state.done and record.get("outputs") != state.outputs.fingerprint:
            write_record(plan, step, state.inputs, state.outputs, time.time())


# --- locks ----------------------------------------------------------------------------------------------------------

def holder_info(**extra) -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"), **extra}


class Lock:
    """An exclusive flock on `path`, with the holder's description in the file."""

    def __init__(self, path: Path, fd: int):
        self.path, self.fd = path, fd

    @classmethod
    def try_acquire(cls, path: Path, info: dict, wait: bool = False) -> Lock | None:
        """The lock, or None if another process holds it (with `wait`, block until it is free)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return None
        content = json.dumps(info).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, content, 0)
        return cls(path, fd)

    def release(self) -> None:
        """Release the lock, emptying its description (a lock file that still describes a holder while nobody holds
        it was left by a holder that died)."""
        os.ftruncate(self.fd, 0)
        os.close(self.fd)


def lock_holder(path: Path) -> dict | None:
    """The description of the lock's holder if the lock is held now, else None."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return read_json(path) or {}
    finally:
        os.close(fd)


def describe_holder(holder: dict) -> str:
    """"pid 12 on host h since 2024-01-01 10:00:00", with whether that pid still runs (on this host)."""
    text = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} since {holder.get('started', '?')}"
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) \
            and not pid_alive(holder["pid"]):
        text += " (that process has exited; a step it started still holds the lock)"
    return text


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as error:
        return error.errno == errno.EPERM
    return True
