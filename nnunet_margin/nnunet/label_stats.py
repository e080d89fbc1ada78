"""Per-case, per-class voxel counts of nnU-Net's preprocessed segmentations, cached as JSON.

The cache lives in the preprocessed dataset folder (`nnunet_margin_label_counts_<data_identifier>.json`), records the
size and modification time of every case's segmentation file, and is rebuilt for any case whose file changed. nnU-Net's
own files are only read. The preprocessed arrays cover nnU-Net's crop box; voxels outside the nonzero mask (-1 there)
count as background; the ignore label is excluded.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .._atomic import write_json_atomic

CACHE_VERSION = 1
# Where nnU-Net's dataset variants keep a case's segmentation, canonical file first (blosc2; numpy: the .npz, which
# training unpacks into _seg.npy; that copy must not make the cache look stale).
SEG_FILE_SUFFIXES = ("_seg.b2nd", ".npz", "_seg.npy")


@dataclass(frozen=True)
class LabelSpec:
    """The labels that count: classes 0..num_classes-1, plus an optional ignore label."""

    num_classes: int
    ignore_label: int | None = None


def cache_path(preprocessed_dataset_folder: str | os.PathLike, data_identifier: str) -> Path:
    return Path(preprocessed_dataset_folder) / f"nnunet_margin_label_counts_{data_identifier}.json"


def _fingerprint(configuration_folder: Path, case: str) -> list[int]:
    """Size and mtime of the file holding a case's segmentation (they change when nnU-Net rewrites it)."""
    for suffix in SEG_FILE_SUFFIXES:
        path = configuration_folder / (case + suffix)
        if path.is_file():
            stat = path.stat()
            return [stat.st_size, stat.st_mtime_ns]
    raise FileNotFoundError(f"no preprocessed segmentation for case {case!r} in {configuration_folder} "
                            f"(looked for {', '.join(case + s for s in SEG_FILE_SUFFIXES)}); run "
                            f"nnUNetv2_plan_and_preprocess (or nnUNetv2_preprocess) for this configuration")


def count_labels(segmentation: np.ndarray, labels: LabelSpec, case: str = "?") -> np.ndarray:
    """Voxel count per class; -1 (outside nnU-Net's crop box) is background, the ignore label is left out."""
    values = np.asarray(segmentation).astype(np.int64, copy=False).ravel() + 1  # -1 -> 0
    size = max(labels.num_classes + 1, (labels.ignore_label or 0) + 2)
    if values.size and (values.min() < 0 or values.max() >= size):
        bad = int(values.min() - 1) if values.min() < 0 else int(values.max() - 1)
        raise ValueError(f"case {case!r}: its preprocessed segmentation holds label {bad}, which dataset.json does "
                         f"not define (classes 0..{labels.num_classes - 1}, ignore={labels.ignore_label})")
    histogram = np.bincount(values, minlength=size)
    counts = histogram[1:labels.num_classes + 1].copy()
    counts[0] += histogram[0]
    return counts


def _count_case(configuration_folder: str, case: str, labels: LabelSpec) -> tuple[str, list[int], list[int]]:
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    folder = Path(configuration_folder)
    fingerprint = _fingerprint(folder, case)
    dataset = infer_dataset_class(configuration_folder)(configuration_folder, [case])
    _, segmentation, _, _ = dataset.load_case(case)
    return case, fingerprint, count_labels(segmentation[:], labels, case).tolist()


def _read_cache(path: Path, labels: LabelSpec) -> dict:
    """Cached cases, or {} for a missing, corrupt or incompatible cache (which is then rebuilt, with a warning)."""
    if not path.is_file():
        return {}
    try:
        content = json.loads(path.read_text())
        if (content["version"] == CACHE_VERSION and content["num_classes"] == labels.num_classes
                and content["ignore_label"] == labels.ignore_label):
            return {case: entry for case, entry in content["cases"].items()
                    if len(entry["counts"]) == labels.num_classes}
        warnings.warn(f"{path} was written for other labels or an older version; rebuilding it", stacklevel=2)
    except (OSError, ValueError, KeyError, TypeError) as error:
        warnings.warn(f"{path} is unreadable ({error!r}); rebuilding it", stacklevel=2)
    return {}


def case_label_counts(preprocessed_dataset_folder: str | os.PathLike, data_identifier: str, labels: LabelSpec,
                      num_processes: int = 1, progress: bool | None = None) -> dict[str, np.ndarray]:
    """Per-case class counts for every case of a configuration, from the cache where it is still valid.

    Stale entries (segmentation file changed), new cases and a corrupt cache are recomputed, in parallel over cases
    with `num_processes`; the cache is then rewritten atomically.
    """
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    configuration_folder = Path(preprocessed_dataset_folder) / data_identifier
    if not configuration_folder.is_dir():
        raise FileNotFoundError(f"{configuration_folder} does not exist; run nnUNetv2_plan_and_preprocess for this "
                                f"configuration first")
    cases = sorted(infer_dataset_class(str(configuration_folder)).get_identifiers(str(configuration_folder)))
    path = cache_path(preprocessed_dataset_folder, data_identifier)
    cached = _read_cache(path, labels)
    valid = {case: cached[case] for case in cases
             if case in cached and cached[case]["fingerprint"] == _fingerprint(configuration_folder, case)}
    todo = [case for case in cases if case not in valid]
    if todo:
        jobs = [(str(configuration_folder), case, labels) for case in todo]
        show_progress = len(todo) >= 50 if progress is None else progress
        if num_processes > 1 and len(todo) > 1:
            with multiprocessing.get_context("spawn").Pool(min(num_processes, len(todo))) as pool:
                results = _with_progress(pool.imap_unordered(_count_case_job, jobs), len(todo), show_progress)
                computed = list(results)
        else:
            computed = list(_with_progress(map(_count_case_job, jobs), len(todo), show_progress))
        for case, fingerprint, counts in computed:
            valid[case] = {"fingerprint": fingerprint, "counts": counts}
    if todo or len(valid) != len(cached):
        write_json_atomic(path, {"version": CACHE_VERSION, "num_classes": labels.num_classes,
                                 "ignore_label": labels.ignore_label,
                                 "cases": {case: valid[case] for case in sorted(valid)}})
    return {case: np.asarray(valid[case]["counts"], dtype=np.int64) for case in cases}


def _count_case_job(job: tuple) -> tuple[str, list[int], list[int]]:
    return _count_case(*job)


def _with_progress(iterable, total: int, enabled: bool):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc="Counting labels", unit="case")


def total_counts(per_case: dict[str, np.ndarray], cases: Sequence[str]) -> np.ndarray:
    """Summed class counts over `cases`; every case must be present in `per_case`."""
    missing = [case for case in cases if case not in per_case]
    if missing:
        raise KeyError(f"{len(missing)} training case(s) have no preprocessed segmentation, e.g. {missing[:3]}; "
                       f"the split (splits_final.json) does not match the preprocessed data")
    if not cases:
        raise ValueError("no training cases: cannot derive label statistics from an empty fold")
    return np.sum([per_case[case] for case in cases], axis=0)
