"""Calibration metrics during nnU-Net's final validation, from the full-resolution probabilities of the export.

nnU-Net's `perform_actual_validation` hands every case's logits to `export_prediction_from_logits` in worker
processes, which resample them to full resolution. `measuring_calibration` swaps that function (a module global of
nnUNetTrainer.py) for `export_and_measure` while the validation runs: the same export, plus calibration statistics
against the ground truth, written per case to a scratch folder and merged into `validation/calibration.json` and
`validation/reliability.png` once all ranks are done. No `.npz` is written unless nnU-Net was asked to (`--npz`),
and the statistics need no more memory than nnU-Net's export itself (softmax over slabs of the resampled logits).
"""

from __future__ import annotations

import functools
import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from nnunetv2.configuration import default_num_processes

from .._atomic import write_json_atomic
from ..calibration import CalibrationStats
from .calibration_report import (crop_mask_from_properties, crop_to_preprocessing_frame, evaluate_case,
                                 evaluate_logits, write_calibration_report)

SCRATCH_FOLDER = ".calibration_cases"


def export_and_measure(predicted_logits, properties: dict, configuration_manager, plans_manager, dataset_json,
                       output_file_truncated: str, save_probabilities: bool = False,
                       num_threads_torch: int = default_num_processes, *, gt_folder: str, scratch_folder: str) -> None:
    """nnU-Net's export (segmentation, and .npz/.pkl when asked) plus per-case calibration statistics.

    Without `save_probabilities` the statistics come from the resampled logits inside the crop box, where nnU-Net
    takes its arg-max, so no full-size probability array is made; with it, from the probabilities nnU-Net exports.
    """
    from batchgenerators.utilities.file_and_folder_operations import save_pickle
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

    label_manager = plans_manager.get_label_manager(dataset_json)
    reader_writer = plans_manager.image_reader_writer_class()
    case = Path(output_file_truncated).name
    ground_truth = reader_writer.read_seg(str(Path(gt_folder) / (case + dataset_json["file_ending"])))[0][0]
    ground_truth = ground_truth.astype(np.int64)
    ignore_label = label_manager.ignore_label
    if save_probabilities:
        segmentation, probabilities = convert_predicted_logits_to_segmentation_with_correct_shape(
            predicted_logits, plans_manager, configuration_manager, label_manager, properties,
            return_probabilities=True, num_threads_torch=num_threads_torch)
        np.savez_compressed(output_file_truncated + ".npz", probabilities=probabilities)
        save_pickle(properties, output_file_truncated + ".pkl")
        crop_mask = crop_mask_from_properties(properties, plans_manager.transpose_backward)
        stats = evaluate_case(probabilities, ground_truth, crop_mask=crop_mask, ignore_label=ignore_label)
    else:
        cropped_truth = crop_to_preprocessing_frame(ground_truth, properties, plans_manager.transpose_forward)
        segment = label_manager.convert_logits_to_segmentation
        measured = {}

        def measure_then_segment(resampled_logits):
            measured.update(evaluate_logits(resampled_logits, cropped_truth, ignore_label=ignore_label))
            return segment(resampled_logits)

        label_manager.convert_logits_to_segmentation = measure_then_segment  # this call's own label manager
        segmentation = convert_predicted_logits_to_segmentation_with_correct_shape(
            predicted_logits, plans_manager, configuration_manager, label_manager, properties,
            return_probabilities=False, num_threads_torch=num_threads_torch)
        stats = measured
    del predicted_logits
    reader_writer.write_seg(segmentation, output_file_truncated + dataset_json["file_ending"], properties)
    write_json_atomic(Path(scratch_folder) / f"{case}.json", {scope: s.to_dict() for scope, s in stats.items()})


@contextmanager
def measuring_calibration(trainer):
    """Within the block, nnU-Net's validation export also measures calibration (see the module docstring)."""
    import torch.distributed as dist
    from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as trainer_module

    scratch = Path(trainer.output_folder) / "validation" / SCRATCH_FOLDER
    if trainer.local_rank == 0:
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
    if trainer.is_ddp:
        dist.barrier()
    original = trainer_module.export_prediction_from_logits
    trainer_module.export_prediction_from_logits = functools.partial(
        export_and_measure, gt_folder=str(Path(trainer.preprocessed_dataset_folder_base) / "gt_segmentations"),
        scratch_folder=str(scratch))
    try:
        yield scratch
    finally:
        trainer_module.export_prediction_from_logits = original


def write_validation_report(trainer, scratch: Path) -> dict:
    """Merge the per-case statistics (all ranks) into calibration.json and reliability.png; returns the report."""
    from .margin_record import class_names

    validation_folder = Path(trainer.output_folder) / "validation"
    per_case = {}
    for path in sorted(scratch.glob("*.json")):
        per_case[path.stem] = {scope: CalibrationStats.from_dict(state)
                               for scope, state in json.loads(path.read_text()).items()}
    names = class_names(trainer.dataset_json, trainer.label_manager.num_segmentation_heads)
    report = write_calibration_report(per_case, validation_folder, names, validation_folder / "summary.json")
    shutil.rmtree(scratch, ignore_errors=True)
    return report
