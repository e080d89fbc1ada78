"""Per-case, per-class voxel counts of nnU-Net's preprocessed segmentations, cached as JSON.

Counting checks every label against dataset.json (a bad label names its case), so the trainers run it once before
training. The preprocessed arrays cover nnU-Net's crop box; voxels outside the nonzero mask (-1 there) count as
background; the ignore label is excluded. nnU-Net's own files are only read.

The cache (`nnunet_margin_label_counts_<data_identifier>.json`) lives in the preprocessed dataset folder when that is
writable, else in a per-user folder (`$XDG_CACHE_HOME/nnunet-margin`, default `~/.cache/nnunet-margin`, one
subfolder per preprocessed folder), else only in memory. Each entry records the size and modification time of the
case's segmentation file and a checksum of itself; an entry that fails the schema (non-negative integer counts, one
per class, a fingerprint, a matching checksum) or whose file changed is recounted, with a one-line notice.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .._atomic import write_json_atomic
from . import _seams
from .layout import preprocessed_segmentation_file

CACHE_VERSION = 2


@dataclass(frozen=True)
class LabelSpec:
    """The labels that count: classes 0..num_classes-1, plus an optional ignore label."""

    num_classes: int
    ignore_label: int | None = None


def notice(message: str) -> None:
    """A one-line notice on stderr (the training log's console shows it too)."""
    print(f"nnunet-margin: {message}", file=sys.stderr, flush=True)


def cache_file_name(data_identifier: str) -> str:
    return f"nnunet_margin_label_counts_{data_identifier}.json"


def cache_path(preprocessed_dataset_folder: str | os.PathLike, data_identifier: str) -> Path:
    """The cache in the preprocessed dataset folder (its first choice)."""
    return Path(preprocessed_dataset_folder) / cache_file_name(data_identifier)


def user_cache_path(preprocessed_dataset_folder: str | os.PathLike, data_identifier: str) -> Path:
    """The fallback cache for a read-only preprocessed folder: one subfolder per (resolved) preprocessed folder."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nnunet-margin"
    folder = Path(preprocessed_dataset_folder).resolve()
    key = hashlib.sha256(str(folder).encode()).hexdigest()[:16]
    return root / f"{folder.name}-{key}" / cache_file_name(data_identifier)


def cache_location(preprocessed_dataset_folder: str | os.PathLike, data_identifier: str) -> str:
    """Where the cache is now, for messages."""
    found = [path for path in (cache_path(preprocessed_dataset_folder, data_identifier),
                               user_cache_path(preprocessed_dataset_folder, data_identifier)) if path.is_file()]
    return str(found[0]) if found else "none (kept in memory)"


def _fingerprint(configuration_folder: Path, case: str) -> list[int]:
    """Size and mtime of the file holding a case's segmentation (they change when nnU-Net rewrites it; the _seg.npy
    that training unpacks from a numpy dataset's .npz is a copy and does not count)."""
    stat = preprocessed_segmentation_file(configuration_folder, case).stat()
    return [stat.st_size, stat.st_mtime_ns]


def count_labels(segmentation: np.ndarray, labels: LabelSpec, case: str = "?") -> np.ndarray:
    """Voxel count per class; -1 (outside nnU-Net's crop box) is background, the ignore label is left out."""
    values = np.asarray(segmentation).astype(np.int64, copy=False).ravel() + 1  # -1 -> 0
    size = max(labels.num_classes + 1, (labels.ignore_label or 0) + 2)
    if values.size and (values.min() < 0 or values.max() >= size):
        bad = int(values.min() - 1) if values.min() < 0 else int(values.max() - 1)
        raise ValueError(f"case {case!r}: its preprocessed segmentation holds label {bad}, which dataset.json does "
                         f"not define (classes 0..{labels.num_classes - 1}, ignore={labels.ignore_label}); fix the "
                         f"label files or dataset.json, then rerun nnUNetv2_plan_and_preprocess")
    histogram = np.bincount(values, minlength=size)
    counts = histogram[1:labels.num_classes + 1].copy()
    counts[0] += histogram[0]
    return counts


def _entry_checksum(fingerprint: list[int], counts: list[int]) -> str:
    return hashlib.sha256(json.dumps([fingerprint, counts]).encode()).hexdigest()[:16]


def _count_case(configuration_folder: str, case: str, labels: LabelSpec) -> tuple[str, dict]:
    folder = Path(configuration_folder)
    fingerprint = _fingerprint(folder, case)
    counts = count_labels(_seams.load_preprocessed_segmentation(folder, case), labels, case).tolist()
    return case, {"fingerprint": fingerprint, "counts": counts, "checksum": _entry_checksum(fingerprint, counts)}


def _valid_entry(entry: Any, labels: LabelSpec) -> bool:
    """Schema of one case's entry: fingerprint [size, mtime_ns] and K non-negative integer counts, checksum intact."""
    def integers(values: Any, length: int) -> bool:
        return (isinstance(values, list) and len(values) == length
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values))

    return (isinstance(entry, dict) and integers(entry.get("fingerprint"), 2)
            and integers(entry.get("counts"), labels.num_classes)
            and entry.get("checksum") == _entry_checksum(entry["fingerprint"], entry["counts"]))


def _read_cache(path: Path, labels: LabelSpec) -> dict[str, dict]:
    """Valid cached entries by case; a missing file gives {}, anything wrong a notice and only the valid entries."""
    if not path.is_file():
        return {}
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        notice(f"{path} is unreadable ({error}); recounting the labels")
        return {}
    if not isinstance(content, dict) or not isinstance(content.get("cases"), dict):
        notice(f"{path} does not hold a label-count cache; recounting the labels")
        return {}
    if (content.get("version"), content.get("num_classes"), content.get("ignore_label")) != (
            CACHE_VERSION, labels.num_classes, labels.ignore_label):
        notice(f"{path} was written for other labels or by another version; recounting the labels")
        return {}
    valid = {case: entry for case, entry in content["cases"].items() if _valid_entry(entry, labels)}
    if len(valid) < len(content["cases"]):
        notice(f"{path}: {len(content['cases']) - len(valid)} invalid entries (e.g. negative or non-integer counts, "
               f"a missing fingerprint or an edited entry); recounting those cases")
    return valid


def _write_cache(candidates: list[Path], content: dict, current: dict[Path, dict]) -> None:
    """Write to the first candidate that accepts it, unless one already holds these entries (the counts stay in
    memory if none accepts)."""
    if any(entries == content["cases"] for entries in current.values()):
        return
    for index, path in enumerate(candidates):
        try:
            write_json_atomic(path, content)
            return
        except OSError as error:
            fallback = f"; using {candidates[index + 1]}" if index + 1 < len(candidates) else \
                "; the counts stay in memory and are recounted next time"
            notice(f"cannot write the label-count cache {path} ({error.strerror or error}){fallback}")


def case_label_counts(preprocessed_dataset_folder: str | os.PathLike, data_identifier: str, labels: LabelSpec,
                      num_processes: int = 1, progress: bool | None = None) -> dict[str, np.ndarray]:
    """Per-case class counts for every case of a configuration, from the cache where it is still valid.

    Stale or invalid entries and new cases are recounted, in parallel over cases with `num_processes`; the cache is
    then rewritten atomically where it can be (see the module docstring).
    """
    configuration_folder = Path(preprocessed_dataset_folder) / data_identifier
    if not configuration_folder.is_dir():
        raise FileNotFoundError(f"{configuration_folder} does not exist; run nnUNetv2_plan_and_preprocess for this "
                                f"configuration first")
    cases = _seams.case_identifiers(configuration_folder)
    candidates = [cache_path(preprocessed_dataset_folder, data_identifier),
                  user_cache_path(preprocessed_dataset_folder, data_identifier)]
    cached = {path: _read_cache(path, labels) for path in candidates if path.is_file()}
    valid = {}
    for case in cases:
        fingerprint = _fingerprint(configuration_folder, case)
        entry = next((found[case] for found in cached.values()
                      if found.get(case, {}).get("fingerprint") == fingerprint), None)
        if entry is not None:
            valid[case] = entry
    todo = [case for case in cases if case not in valid]
    if todo:
        jobs = [(str(configuration_folder), case, labels) for case in todo]
        show_progress = len(todo) >= 50 if progress is None else progress
        if num_processes > 1 and len(todo) > 1:
            with multiprocessing.get_context("spawn").Pool(min(num_processes, len(todo))) as pool:
                computed = list(_with_progress(pool.imap_unordered(_count_case_job, jobs), len(todo), show_progress))
        else:
            computed = list(_with_progress(map(_count_case_job, jobs), len(todo), show_progress))
        valid.update(computed)
    _write_cache(candidates, {"version": CACHE_VERSION, "num_classes": labels.num_classes,
                              "ignore_label": labels.ignore_label,
                              "cases": {case: valid[case] for case in sorted(valid)}}, cached)
    return {case: np.asarray(valid[case]["counts"], dtype=np.int64) for case in cases}


def _count_case_job(job: tuple) -> tuple[str, dict]:
    return _count_case(*job)


def _with_progress(iterable, total: int, enabled: bool):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc="Counting labels", unit="case")


def trainer_label_counts(trainer, num_processes: int) -> dict[str, np.ndarray]:
    """`case_label_counts` of the trainer's preprocessed configuration (checks every case's labels)."""
    manager = trainer.label_manager
    return case_label_counts(trainer.preprocessed_dataset_folder_base, trainer.configuration_manager.data_identifier,
                             LabelSpec(manager.num_segmentation_heads, manager.ignore_label),
                             num_processes=num_processes)


def total_counts(per_case: dict[str, np.ndarray], cases: Sequence[str]) -> np.ndarray:
    """Summed class counts over `cases`; every case must be present in `per_case`."""
    missing = [case for case in cases if case not in per_case]
    if missing:
        raise ValueError(f"{len(missing)} training case(s) have no preprocessed segmentation, e.g. {missing[:3]}; "
                         f"the split (splits_final.json) does not match the preprocessed data")
    if not cases:
        raise ValueError("no training cases: cannot derive label statistics from an empty fold")
    return np.sum([per_case[case] for case in cases], axis=0)
