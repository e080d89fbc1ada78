"""Which checkpoint produced a fold's validation probabilities, so that stale ones are never fitted or reported.

When a fold's validation writes files that later steps read (the `.npz` probabilities with `--npz`, the logit sample
of the calibration hook), `record_validation` writes `validation/provenance.json` with the checkpoint the network
came from and its SHA-256. `check_validation_current` refuses files whose checkpoint has changed since, e.g. after
retraining the fold without `--npz`, when the previous model's `.npz` files stay behind. Validation folders written
without this plugin have no record; their `.npz` files then count as current only if every one is newer than the
checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .._atomic import write_json_atomic

PROVENANCE_FILE = "provenance.json"
FINAL_CHECKPOINT = "checkpoint_final.pth"


class StaleValidationError(RuntimeError):
    """A fold's validation files were written by another checkpoint than the current one."""


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
    write_json_atomic(fold_folder / "validation" / PROVENANCE_FILE,
                      {"checkpoint": checkpoint_name, "sha256": file_sha256(checkpoint)})


def check_validation_current(fold_folder: str | Path, refresh_command: str) -> None:
    """Raise StaleValidationError, naming `refresh_command`, unless fold_folder/validation's probabilities come
    from the fold's current checkpoint_final.pth."""
    fold_folder = Path(fold_folder)
    validation = fold_folder / "validation"
    checkpoint = fold_folder / FINAL_CHECKPOINT
    record_file = validation / PROVENANCE_FILE
    if record_file.is_file():
        try:
            record = json.loads(record_file.read_text())
            current = record["checkpoint"] == FINAL_CHECKPOINT and record["sha256"] == file_sha256(checkpoint)
        except (ValueError, KeyError, TypeError):
            current = False
        if current:
            return
        reason = f"{record_file} names another checkpoint than the current {checkpoint.name}"
    else:
        written_before = [npz.name for npz in validation.glob("*.npz")
                          if npz.stat().st_mtime_ns < checkpoint.stat().st_mtime_ns]
        if not written_before:
            return
        reason = (f"{len(written_before)} .npz file(s) in {validation} (e.g. {written_before[0]}) are older than "
                  f"{checkpoint.name}")
    raise StaleValidationError(f"{reason}: they were written by an earlier model of this fold. Refresh them with "
                               f"`{refresh_command}`")
