"""The logit samples post-hoc calibrators are fitted on: each fold's validation/logit_sample.nnunet_margin.

The plugin's final validation writes a fold's sample and then validation/provenance.json, which names the checkpoint
it came from; a sample is used only while that record vouches for the fold's current checkpoint_final.pth. A fold
without a current sample (a model trained before the sample existed, or by nnU-Net's own trainers) has its final
validation run again with the plugin's hook, in this process: nnU-Net's own validation, so it rewrites the fold's
validation/ folder with the same predictions, plus the sample.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ...calibration.logit_sample import LogitSample
from .. import _seams, layout
from ..layout import FINAL_CHECKPOINT, TrainedModel, fold_of
from ..provenance import PROVENANCE_FILE, check_sample_current
from ..validation import LOGIT_SAMPLE_FILE


@dataclass(frozen=True)
class FoldSample:
    """A fold's current logit sample and the SHA-256 of the checkpoint_final.pth it comes from."""

    fold_folder: Path
    path: Path
    sample: LogitSample
    checkpoint_sha256: str


def revalidate(model: TrainedModel, fold_folder: Path, device: torch.device) -> None:
    """Run the fold's final validation again with the plugin's calibration hook (see the module docstring)."""
    from ...trainers import nnUNetTrainerWithCalibration

    results = os.environ.get("nnUNet_results")
    preprocessed = os.environ.get("nnUNet_preprocessed")
    if not results or Path(results).resolve() != model.folder.parent.parent or not preprocessed:
        raise RuntimeError(f"{fold_folder} needs its validation run again with the calibration hook, which nnU-Net "
                           f"can only do with nnUNet_results={model.folder.parent.parent} (now {results or 'not set'}) "
                           f"and nnUNet_preprocessed set (now {preprocessed or 'not set'})")
    trainer_class = _seams.find_trainer_class(model.trainer)
    if not issubclass(trainer_class, nnUNetTrainerWithCalibration):
        # the same name, so nnU-Net's output folder is the model's own
        trainer_class = type(model.trainer, (nnUNetTrainerWithCalibration, trainer_class), {})
    plans = json.loads(layout.plans_file(Path(preprocessed) / model.dataset_name, model.plans).read_text())
    dataset_json = json.loads((Path(preprocessed) / model.dataset_name / layout.DATASET_FILE).read_text())
    print(f"{fold_folder.name}: running nnU-Net's validation again with the calibration hook (no current "
          f"{LOGIT_SAMPLE_FILE})", flush=True)
    trainer = _seams.validation_trainer(trainer_class, plans, model.configuration, fold_of(fold_folder),
                                        dataset_json, device)
    trainer.load_checkpoint(str(fold_folder / FINAL_CHECKPOINT))
    trainer.perform_actual_validation(False)


def fold_sample(model: TrainedModel, fold_folder: Path, revalidate_first: bool, device: torch.device,
                class_names: list[str], refresh: str) -> FoldSample:
    """The fold's current logit sample, running its validation again where it is missing (or when asked); refused
    if it is stale, unreadable, or of another number of classes than the model's dataset.json, naming the command
    `refresh` that writes it again."""
    sample_file = layout.validation_folder(fold_folder) / LOGIT_SAMPLE_FILE
    if revalidate_first or not sample_file.is_file():
        revalidate(model, fold_folder, device)
        if not sample_file.is_file():
            raise RuntimeError(f"the validation of {fold_folder} wrote no {LOGIT_SAMPLE_FILE}: its cases hold no "
                               f"counted voxel")
    check_sample_current(fold_folder, sample_file, refresh)
    try:
        sample = LogitSample.load(sample_file)
    except (OSError, ValueError) as error:
        raise ValueError(f"{error}; write it again with `{refresh}`") from None
    if sample.num_classes != len(class_names):
        raise ValueError(f"{sample_file} holds logits of {sample.num_classes} classes, but the model's dataset.json "
                         f"defines {len(class_names)} ({', '.join(class_names)}): the sample belongs to another "
                         f"dataset or label set; write it again with `{refresh}`")
    sha256 = json.loads((layout.validation_folder(fold_folder) / PROVENANCE_FILE).read_text())["sha256"]
    return FoldSample(fold_folder, sample_file, sample, sha256)
