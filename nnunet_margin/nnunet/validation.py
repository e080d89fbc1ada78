"""Calibration metrics during nnU-Net's final validation, from the full-resolution probabilities of the export.

nnU-Net's `perform_actual_validation` hands every case's logits to `export_prediction_from_logits` in worker
processes, which resample them to full resolution. `measuring_calibration` swaps that function (a module global of
nnUNetTrainer.py) for `export_and_measure` while the validation runs: the same export, plus calibration statistics
against the ground truth, written per case to a scratch folder and merged into `validation/calibration.json` and
`validation/reliability.png` once all ranks are done. No `.npz` is written unless nnU-Net was asked to (`--npz`).
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
from .calibration_report import crop_mask_from_properties, evaluate_case, write_calibration_report

SCRATCH_FOLDER = ".calibration_cases"


def export_and_measure(predicted_logits, properties: dict, configuration_manager, plans_manager, dataset_json,
                       output_file_truncated: str, save_probabilities: bool = False, num_threads_torch: int = 1, *,
                       gt_folder: str, scratch_folder: str) -> None:
    """nnU-Net's export (segmentation, and .npz/.pkl when asked) plus per-case calibration statistics."""
    from batchgenerators.utilities.file_and_folder_operations import save_pickle
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

    label_manager = plans_manager.get_label_manager(dataset_json)
    segmentation, probabilities = convert_predicted_logits_to_segmentation_with_correct_shape(
        predicted_logits, plans_manager, configuration_manager, label_manager, properties,
        return_probabilities=True, num_threads_torch=num_threads_torch)
    del predicted_logits
    if save_probabilities:
        np.savez_compressed(output_file_truncated + ".npz", probabilities=probabilities)
        save_pickle(properties, output_file_truncated + ".pkl")
    reader_writer = plans_manager.image_reader_writer_class()
    reader_writer.write_seg(segmentation, output_file_truncated + dataset_json["file_ending"], properties)

    case = Path(output_file_truncated).name
    ground_truth, _ = reader_writer.read_seg(str(Path(gt_folder) / (case + dataset_json["file_ending"])))
    crop_mask = crop_mask_from_properties(properties, plans_manager.transpose_backward)
    stats = evaluate_case(probabilities, ground_truth[0], crop_mask=crop_mask, ignore_label=label_manager.ignore_label)
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
