"""Calibration metrics during nnU-Net's final validation, from the full-resolution probabilities of the export.

nnU-Net's `perform_actual_validation` hands every case's logits to `export_prediction_from_logits` in worker
processes, which resample them to full resolution. `measuring_calibration` hands them to `export_and_measure`
instead while the validation runs (seam `validation_export`), which calls nnU-Net's own export once and measures the
resampled logits it passes to the arg-max (seam `export_hook`): calibration statistics against the ground truth,
written per case to a scratch folder and merged into `validation/calibration.json` and `validation/reliability.png`
once all ranks are done. No `.npz` is written unless nnU-Net was asked to (`--npz`), and the statistics need no
more memory than nnU-Net's export itself (softmax over slabs of the resampled logits).

The same logits also give `validation/logit_sample.nnunet_margin` (an .npz archive), the sample post-hoc
calibrators are fitted on (`nnunet-margin fit-calibration`): a uniform random sample of at most `max_voxels`
(default 2 million) non-ignored voxels of the fold's validation cases inside nnU-Net's crop box, with their labels.
Every voxel is first kept with probability r = min(1, max_voxels / N), N the crop-box voxels of all the fold's
validation cases (from the preprocessing properties), so each case writes about its share; the per-case samples
(`LogitSample`, seeded per fold and case) then merge exactly into the bottom-max_voxels sample of the union, which
is uniform (docs/methods.md 6).
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from .._atomic import write_json_atomic
from ..calibration import CalibrationStats, boundary_scope
from ..calibration.logit_sample import LogitSample
from . import _seams, layout
from .case_evaluation import evaluate_logits, segmentation_metrics
from .geometry import crop_to_preprocessing_frame
from .margin_record import class_names
from .prediction_folder import write_calibration_report

SCRATCH_FOLDER = ".calibration_cases"
# An .npz archive, named so that nnU-Net's tools, which take every validation/*.npz for a case, pass it by.
LOGIT_SAMPLE_FILE = "logit_sample.nnunet_margin"


@functools.cache
def _seed(*parts: str) -> int:
    """A stable 63-bit seed for a fold and case (the per-case samples must have independent keys)."""
    return int.from_bytes(hashlib.sha256("/".join(parts).encode()).digest()[:8], "little") >> 1


def sample_logits(logits: torch.Tensor, labels: np.ndarray, ignore_label: int | None, rate: float, max_voxels: int,
                  fold: str, case: str) -> LogitSample:
    """The case's part of the fold's logit sample: each non-ignored voxel kept with probability `rate`, then a
    bottom-k sample (see the module docstring)."""
    labels = torch.as_tensor(labels)
    generator = torch.Generator().manual_seed(_seed("keep", fold, case))
    kept = torch.rand(labels.shape, generator=generator) < rate
    if ignore_label is not None:
        kept &= labels != ignore_label
    return LogitSample(max_voxels, seed=_seed("sample", fold, case)).update(logits.float(), labels, mask=kept)


def export_and_measure(predicted_logits, properties: dict, configuration_manager, plans_manager, dataset_json,
                       output_file_truncated: str, save_probabilities: bool = False,
                       num_threads_torch: int = _seams.default_num_processes, *, gt_folder: str,
                       scratch_folder: str, sample_rate: float = 0.0, sample_voxels: int = 0, fold: str = "") -> None:
    """nnU-Net's own export of one validation case (segmentation, and .npz/.pkl with --npz), plus calibration
    statistics of the resampled logits inside the crop box, where nnU-Net takes its arg-max (softmax over slabs, so
    no full-size probability array is made), Dice, HD95 and ASD of the segmentation it wrote and, with a
    `sample_rate`, the case's part of the logit sample, all written to the scratch folder."""
    reader_writer = plans_manager.image_reader_writer_class()
    case = Path(output_file_truncated).name
    ground_truth, gt_properties = reader_writer.read_seg(str(Path(gt_folder) / (case + dataset_json["file_ending"])))
    ground_truth = ground_truth[0].astype(np.int64)
    spacing = layout.spacing(gt_properties)
    label_manager = plans_manager.get_label_manager(dataset_json)
    ignore_label = label_manager.ignore_label
    boundary = boundary_scope(ground_truth, spacing, ignore_label=ignore_label)
    box, transpose = layout.CropBox.from_properties(properties), plans_manager.transpose_forward
    cropped_truth = crop_to_preprocessing_frame(ground_truth, box, transpose)
    cropped_boundary = crop_to_preprocessing_frame(boundary, box, transpose)
    measured = {}

    def measure(resampled_logits):
        measured.update(evaluate_logits(resampled_logits, cropped_truth, cropped_boundary, ignore_label=ignore_label))
        if sample_rate > 0:
            sample = sample_logits(resampled_logits, cropped_truth, ignore_label, sample_rate, sample_voxels, fold,
                                   case)
            if sample.num_sampled:
                sample.save(Path(scratch_folder) / f"{case}.sample.npz")

    _seams.export_prediction_observing_logits(measure, predicted_logits, properties, configuration_manager,
                                              plans_manager, dataset_json, output_file_truncated, save_probabilities,
                                              num_threads_torch)
    segmentation = reader_writer.read_seg(output_file_truncated + dataset_json["file_ending"])[0][0]
    names = class_names(dataset_json, label_manager.num_segmentation_heads)
    write_json_atomic(Path(scratch_folder) / f"{case}.json",
                      {"stats": {scope: stats.to_dict() for scope, stats in measured.items()},
                       "segmentation": segmentation_metrics(segmentation, ground_truth, names, spacing, ignore_label)})


@contextmanager
def measuring_calibration(trainer):
    """Within the block, nnU-Net's validation export also measures calibration (see the module docstring)."""
    import torch.distributed as dist

    scratch = layout.validation_folder(trainer.output_folder) / SCRATCH_FOLDER
    if trainer.local_rank == 0:
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
    if trainer.is_ddp:
        dist.barrier()
    export = functools.partial(export_and_measure,
                               gt_folder=str(layout.gt_segmentations_folder(trainer.preprocessed_dataset_folder_base)),
                               scratch_folder=str(scratch), sample_rate=_sample_rate(trainer),
                               sample_voxels=trainer.logit_sample_voxels, fold=str(trainer.fold))
    with _seams.validation_export_replaced(export):
        yield scratch


def _sample_rate(trainer) -> float:
    """min(1, max_voxels / N), N the crop-box voxels of all the fold's validation cases (0: no sample)."""
    if not trainer.logit_sample_voxels:
        return 0.0
    validation_cases = _seams.fold_split(trainer)[1]
    total = sum(layout.CropBox.from_properties(_seams.case_properties(trainer.preprocessed_dataset_folder, case)).voxels
                for case in validation_cases)
    return min(1.0, trainer.logit_sample_voxels / max(total, 1))


def write_validation_report(trainer, scratch: Path) -> dict:
    """Merge the per-case statistics (all ranks) into calibration.json and reliability.png; returns the report."""
    validation_folder = layout.validation_folder(trainer.output_folder)
    per_case = {}
    segmentation = {}
    for path in sorted(scratch.glob("*.json")):
        measured = json.loads(path.read_text())
        per_case[path.stem] = {scope: CalibrationStats.from_dict(state) for scope, state in measured["stats"].items()}
        segmentation[path.stem] = measured["segmentation"]
    names = class_names(trainer.dataset_json, trainer.label_manager.num_segmentation_heads)
    summary_file = validation_folder / layout.SUMMARY_FILE
    nnunet_dice = layout.read_summary_dice(summary_file, names, trainer.dataset_json["file_ending"]) \
        if summary_file.is_file() else None
    report = write_calibration_report(per_case, validation_folder, names, segmentation, nnunet_dice)
    samples = [LogitSample.load(path) for path in sorted(scratch.glob("*.sample.npz"))]
    if samples:
        functools.reduce(LogitSample.merge, samples).save(validation_folder / LOGIT_SAMPLE_FILE)
    shutil.rmtree(scratch, ignore_errors=True)
    return report
