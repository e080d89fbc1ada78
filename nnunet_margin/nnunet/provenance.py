"""Which checkpoint produced a fold's validation probabilities, so that stale ones are never fitted or reported.

When a fold's validation writes files that later steps read (the `.npz` probabilities with `--npz`, the logit sample
of the calibration hook), `record_validation` writes `validation/provenance.json` with the checkpoint the network
came from and its SHA-256. `check_validation_current` refuses validation files that another model or an unfinished
validation left behind:

- `.npz` files older than checkpoint_final.pth were written by an earlier model of the fold, e.g. after retraining
  without `--npz`, when the previous model's `.npz` stay behind (the new validation, and its record, then cover only
  the segmentations);
- a record written after every `.npz` whose checkpoint differs from the current one (a record older than some `.npz`
  describes an earlier validation: a later one by a trainer without this plugin wrote no record);
- `.npz` files newer than `validation/summary.json`, which nnU-Net writes when a validation has exported every case:
  that validation was interrupted, so the cases are a mix or incomplete (nnU-Net's order of writing, checked by the
  seam `summary_json`).

A model folder copied without its modification times (plain `cp -r`) can therefore look stale; copy with `cp -a`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .._atomic import write_json_atomic
from .layout import FINAL_CHECKPOINT, PROBABILITIES_SUFFIX, SUMMARY_FILE, validation_folder

PROVENANCE_FILE = "provenance.json"


class StaleValidationError(RuntimeError):
    """A fold's validation files were written by another checkpoint than the current one, or are incomplete."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def record_validation(fold_folder: str | Path, checkpoint_name: str = FINAL_CHECKPOINT) -> None:
    """Record that the files now in fold_folder/validation come from `checkpoint_name` as it is now."""
    fold_folder = Path(fold_folder)
    checkpoint = fold_folder / checkpoint_name
    write_json_atomic(validation_folder(fold_folder) / PROVENANCE_FILE,
                      {"checkpoint": checkpoint_name, "sha256": file_sha256(checkpoint)})


def _record_problem(record_file: Path, checkpoint: Path) -> str | None:
    """Why record_file does not vouch for `checkpoint` (None if it does)."""
    try:
        record = json.loads(record_file.read_text())
        if record["checkpoint"] == FINAL_CHECKPOINT and record["sha256"] == file_sha256(checkpoint):
            return None
    except (ValueError, KeyError, TypeError):
        return f"{record_file} is unreadable (corrupt), so the validation files cannot be traced to {checkpoint.name}"
    return (f"{record_file} names another checkpoint than the current {checkpoint.name}: the validation files were "
            f"written by another model")


def _stale_reason(validation: Path, checkpoint: Path) -> str | None:
    """Why the validation files are not those of `checkpoint`'s complete validation (None if they are)."""
    record_file = validation / PROVENANCE_FILE
    npz_times = {npz.name: npz.stat().st_mtime_ns for npz in sorted(validation.glob(f"*{PROBABILITIES_SUFFIX}"))}
    if not npz_times:
        return _record_problem(record_file, checkpoint) if record_file.is_file() else None
    written_before = [name for name, time in npz_times.items() if time < checkpoint.stat().st_mtime_ns]
    if written_before:
        return (f"{len(written_before)} .npz file(s) in {validation} (e.g. {written_before[0]}) are older than "
                f"{checkpoint.name}: they were written by an earlier model of this fold")
    if record_file.is_file() and max(npz_times.values()) <= record_file.stat().st_mtime_ns:
        problem = _record_problem(record_file, checkpoint)
        if problem is not None:
            return problem
    summary = validation / SUMMARY_FILE
    if not summary.is_file():
        return (f"{summary} is missing, which nnU-Net writes when a validation has exported every case: the "
                f"validation that wrote the .npz files did not finish")
    written_after = [name for name, time in npz_times.items() if time > summary.stat().st_mtime_ns]
    if written_after:
        return (f"{len(written_after)} .npz file(s) in {validation} (e.g. {written_after[0]}) are newer than "
                f"{summary.name}, which nnU-Net writes when a validation has exported every case: the validation "
                f"that wrote them did not finish, so the cases are incomplete or a mix of two validations")
    return None


def check_sample_current(fold_folder: str | Path, sample_file: Path, refresh_command: str) -> None:
    """Raise StaleValidationError, naming `refresh_command`, unless the logit sample comes from a complete
    validation of the fold's current checkpoint_final.pth: the plugin's validation writes the sample, then the
    record, so a current record at least as new as the sample vouches for it."""
    fold_folder = Path(fold_folder)
    record_file = validation_folder(fold_folder) / PROVENANCE_FILE
    checkpoint = fold_folder / FINAL_CHECKPOINT
    if not record_file.is_file() or record_file.stat().st_mtime_ns < sample_file.stat().st_mtime_ns:
        reason = f"{record_file} is missing or older than {sample_file.name}: the validation that wrote it did not finish"
    else:
        reason = _record_problem(record_file, checkpoint)
    if reason is not None:
        raise StaleValidationError(f"{reason}. Refresh it with `{refresh_command}`")


def check_validation_current(fold_folder: str | Path, refresh_command: str) -> None:
    """Raise StaleValidationError, naming `refresh_command`, unless fold_folder/validation's probabilities come
    from a complete validation of the fold's current checkpoint_final.pth (see the module docstring)."""
    fold_folder = Path(fold_folder)
    reason = _stale_reason(validation_folder(fold_folder), fold_folder / FINAL_CHECKPOINT)
    if reason is not None:
        raise StaleValidationError(f"{reason}. Refresh them with `{refresh_command}`")
