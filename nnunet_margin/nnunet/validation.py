"""Calibration metrics during nnU-Net's final validation, from the full-resolution probabilities of the export.

nnU-Net's `perform_actual_validation` hands every case's logits to `export_prediction_from_logits` in worker
processes, which resample them to full resolution. `measuring_calibration` hands them to `export_and_measure`
instead while the validation runs (seam `validation_export`), which calls nnU-Net's own export once and measures the
resampled logits it passes to the arg-max (seam `export_hook`): calibration statistics against the ground truth,
written per case to a scratch folder and merged into `validation/calibration.json` and `validation/reliability.png`
once all ranks are done. No `.npz` is written unless nnU-Net was asked to (`--npz`), and the statistics need no
more memory than nnU-Net's export itself (softmax over slabs of the resampled logits).
"""

from __future__ import annotations

import functools
import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .._atomic import write_json_atomic
from ..calibration import CalibrationStats
from . import _seams
from ..calibration import boundary_scope
from .calibration_report import (crop_to_preprocessing_frame, evaluate_logits, segmentation_metrics,
                                 write_calibration_report)
from .margin_record import class_names

SCRATCH_FOLDER = ".calibration_cases"


def export_and_measure(predicted_logits, properties: dict, configuration_manager, plans_manager, dataset_json,
                       output_file_truncated: str, save_probabilities: bool = False,
                       num_threads_torch: int = _seams.default_num_processes, *, gt_folder: str,
                       scratch_folder: str) -> None:
    """nnU-Net's own export of one validation case (segmentation, and .npz/.pkl with --npz), plus calibration
    statistics of the resampled logits inside the crop box, where nnU-Net takes its arg-max (softmax over slabs, so
    no full-size probability array is made), and Dice, HD95 and ASD of the segmentation it wrote, all written to the
    scratch folder."""
    reader_writer = plans_manager.image_reader_writer_class()
    case = Path(output_file_truncated).name
    ground_truth, gt_properties = reader_writer.read_seg(str(Path(gt_folder) / (case + dataset_json["file_ending"])))
    ground_truth = ground_truth[0].astype(np.int64)
    spacing = gt_properties["spacing"]
    label_manager = plans_manager.get_label_manager(dataset_json)
    ignore_label = label_manager.ignore_label
    boundary = boundary_scope(ground_truth, spacing, ignore_label=ignore_label)
    transpose = plans_manager.transpose_forward
    cropped_truth = crop_to_preprocessing_frame(ground_truth, properties, transpose)
    cropped_boundary = crop_to_preprocessing_frame(boundary, properties, transpose)
    measured = {}

    def measure(resampled_logits):
        measured.update(evaluate_logits(resampled_logits, cropped_truth, cropped_boundary, ignore_label=ignore_label))

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

    scratch = Path(trainer.output_folder) / "validation" / SCRATCH_FOLDER
    if trainer.local_rank == 0:
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
    if trainer.is_ddp:
        dist.barrier()
    export = functools.partial(export_and_measure,
                               gt_folder=str(Path(trainer.preprocessed_dataset_folder_base) / "gt_segmentations"),
                               scratch_folder=str(scratch))
    with _seams.validation_export_replaced(export):
        yield scratch


def write_validation_report(trainer, scratch: Path) -> dict:
    """Merge the per-case statistics (all ranks) into calibration.json and reliability.png; returns the report."""
    validation_folder = Path(trainer.output_folder) / "validation"
    per_case = {}
    segmentation = {}
    for path in sorted(scratch.glob("*.json")):
        measured = json.loads(path.read_text())
        per_case[path.stem] = {scope: CalibrationStats.from_dict(state) for scope, state in measured["stats"].items()}
        segmentation[path.stem] = measured["segmentation"]
    names = class_names(trainer.dataset_json, trainer.label_manager.num_segmentation_heads)
    report = write_calibration_report(per_case, validation_folder, names, validation_folder / "summary.json",
                                      segmentation)
    shutil.rmtree(scratch, ignore_errors=True)
    return report
