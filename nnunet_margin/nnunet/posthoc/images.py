"""`fit-calibration --fit-on images`: the deployed fold ensemble's logits of a held-out calibration set.

The calibration set is nnU-Net input images (`--images DIR`: CASE_XXXX<file_ending>, one file per channel) and
their reference labels (`--labels DIR`: CASE<file_ending>). Before anything is predicted, `check_calibration_set`
refuses an image without a label and a label without an image, images of other channels than the model's, a label
that is not on its image's grid (shape; spacing, origin, direction within nnU-Net's own tolerance) or that holds
values which are no label of dataset.json, and cases that a chosen fold was trained on (by case name).

`ensemble_sample` then predicts every case as `nnunet-margin predict` and nnUNetv2_predict do: nnU-Net's predictor of
the chosen folds, test-time mirroring unless disabled, the folds' logits averaged by nnU-Net and resampled to the
image as its export resamples them, inside nnU-Net's crop box. Each case's logits go with its label, brought into
the same frame, into one `LogitSample` (the sampler of the other scopes; non-ignored voxels).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...calibration.logit_sample import LogitSample
from .. import _seams, layout
from ..geometry import crop_to_preprocessing_frame, geometry_differences
from ..layout import FINAL_CHECKPOINT, TrainedModel, fold_of
from ..predict import input_cases, load_ensemble
from ..prediction_folder import DatasetInfo, check_label_values, read_ground_truth

# The seed of the sample's random keys: a calibration set gives the same sample, and so the same map, every time.
SAMPLE_SEED = 0


@dataclass(frozen=True)
class ImagesRequest:
    """The calibration set of `--fit-on images` and how the ensemble predicts it (the command-line options; a
    folder not given is None, which `fit_model_calibration` refuses)."""

    images: Path | None
    labels: Path | None
    mirroring: bool = True  # nnU-Net's test-time mirroring (off with --disable_tta)
    preprocessing_processes: int = 3  # 0: in this process


@dataclass(frozen=True)
class CalibrationSet:
    """A checked calibration set: each case's channel files and label file."""

    images: Path
    labels: Path
    image_files: dict[str, list[str]]
    label_files: dict[str, Path]

    def fingerprint(self) -> str:
        """SHA-256 of every file's folder, name, size and modification time: it changes when a file of the set is
        added, removed, renamed or rewritten."""
        digest = hashlib.sha256()
        files = [("images", Path(file)) for files in self.image_files.values() for file in files]
        files += [("labels", path) for path in self.label_files.values()]
        for folder, path in sorted(files):
            status = path.stat()
            digest.update(f"{folder}/{path.name}\t{status.st_size}\t{status.st_mtime_ns}\n".encode())
        return digest.hexdigest()

    def record(self, fold_folders: list[Path], mirroring: bool) -> dict[str, Any]:
        """What calibration_map.json records as `fitted_on`."""
        return {"images": str(self.images), "labels": str(self.labels), "cases": list(self.image_files),
                "files_sha256": self.fingerprint(), "folds": [fold_of(folder) for folder in fold_folders],
                "mirroring": mirroring, "sample_seed": SAMPLE_SEED}


def _listed(cases: Iterable[str], limit: int = 5) -> str:
    cases = sorted(cases)
    return ", ".join(cases[:limit]) + (f" and {len(cases) - limit} more" if len(cases) > limit else "")


def training_cases(model: TrainedModel, fold_folders: list[Path], file_ending: str) -> tuple[set[str], str]:
    """The cases the chosen folds were trained on, and where they come from: nnU-Net's split where
    $nnUNet_preprocessed holds the model's dataset, else the cases the model folder names (every trained fold's
    validation cases are training cases of the other folds)."""
    preprocessed = os.environ.get("nnUNet_preprocessed")
    dataset_folder = Path(preprocessed) / model.dataset_name if preprocessed else None
    if dataset_folder is not None and (dataset_folder / layout.SPLITS_FILE).is_file():
        all_cases = layout.cases_with_suffix(layout.gt_segmentations_folder(dataset_folder), file_ending)
        cases = set().union(*(_seams.fold_cases(dataset_folder, all_cases, fold_of(folder))[0]
                              for folder in fold_folders))
        return cases, f"nnU-Net's split, {dataset_folder / layout.SPLITS_FILE}"
    validation = {folder: layout.cases_with_suffix(layout.validation_folder(folder), file_ending)
                  for folder in model.fold_folders()}
    cases = {case for chosen in fold_folders for folder, named in validation.items() if folder != chosen
             for case in named}
    return cases, (f"the validation cases of the model's other folds; with $nnUNet_preprocessed/{model.dataset_name} "
                   f"the check uses nnU-Net's split")


def _check_pairs(image_cases: list[str], label_cases: list[str], images: Path, labels: Path, ending: str) -> None:
    """Refuse images without a label and labels without an image."""
    unlabelled = set(image_cases) - set(label_cases)
    if unlabelled:
        raise ValueError(f"calibration image case(s) {_listed(unlabelled)} in {images} have no label CASE{ending} in "
                         f"{labels}: add their labels, or move those images out of {images}")
    without_image = set(label_cases) - set(image_cases)
    if without_image:
        raise ValueError(f"label(s) {_listed(without_image)} in {labels} have no image CASE_0000{ending} in {images}: "
                         f"add their images, or move those labels out of {labels} (is it the label folder of these "
                         f"images?)")


def _read_images(files: list[str], info: DatasetInfo) -> tuple[np.ndarray, dict[str, Any]]:
    """A case's images (C, *spatial) and their properties, as nnU-Net's reader of the dataset returns them."""
    try:
        return info.reader_class().read_images(files)
    except (RuntimeError, OSError, EOFError, ValueError, AssertionError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"cannot read the calibration image(s) {', '.join(files)} ({message}): they are corrupt, or "
                         f"the channels of the case lie on different grids; replace them") from None


def _check_label(case: str, image_files: list[str], label_file: Path, info: DatasetInfo) -> None:
    """Refuse a label that is not on its image's grid or holds values that are no label of dataset.json."""
    image, image_properties = _read_images(image_files, info)
    labels, label_properties = read_ground_truth(label_file, info)
    if tuple(image.shape[1:]) != tuple(labels.shape):
        raise ValueError(f"case {case}: its label {label_file} has shape {tuple(labels.shape)}, its image "
                         f"{image_files[0]} {tuple(image.shape[1:])}: pass the label of that image")
    differences = geometry_differences(image_properties, label_properties, "image")
    if differences:
        raise ValueError(f"case {case}: its label {label_file} lies on another image grid than its image "
                         f"{image_files[0]} ({'; '.join(differences)}), beyond nnU-Net's tolerance (np.allclose): "
                         f"pass the label of that image")
    check_label_values(labels, label_file, info)


def check_calibration_set(model: TrainedModel, fold_folders: list[Path], request: ImagesRequest,
                          dataset_json: dict, info: DatasetInfo) -> CalibrationSet:
    """The calibration set of `request`, checked for the ensemble of `fold_folders` (see the module docstring);
    reads every image and label once."""
    images, labels = request.images.resolve(), request.labels.resolve()
    for folder, option, content in ((images, "--images", "CASE_0000" + info.file_ending),
                                    (labels, "--labels", "CASE" + info.file_ending)):
        if not folder.is_dir():
            raise FileNotFoundError(f"{option} {folder} is not a folder: pass the folder of the calibration set's "
                                    f"{content} files")
    image_files = input_cases(images, dataset_json)
    _check_pairs(list(image_files), layout.cases_with_suffix(labels, info.file_ending), images, labels,
                 info.file_ending)
    trained, source = training_cases(model, fold_folders, info.file_ending)
    seen = trained & set(image_files)
    if seen:
        folds = ", ".join(fold_of(folder) for folder in fold_folders)
        raise ValueError(f"calibration case(s) {_listed(seen)} in {images} are training cases of fold(s) {folds} "
                         f"({source}): they are not held out. The ensemble is more confident on cases it was trained "
                         f"on than on new ones, so a map fitted on them miscalibrates it; pass cases none of these "
                         f"folds was trained on (and keep them apart from your test set)")
    label_files = {case: labels / f"{case}{info.file_ending}" for case in image_files}
    for case, files in image_files.items():
        _check_label(case, files, label_files[case], info)
    return CalibrationSet(images, labels, image_files, label_files)


def ensemble_sample(model: TrainedModel, fold_folders: list[Path], calibration_set: CalibrationSet,
                    request: ImagesRequest, device: str, info: DatasetInfo) -> LogitSample:
    """The sample of the ensemble's logits of the calibration set with their labels (see the module docstring)."""
    folds = [fold_of(folder) for folder in fold_folders]
    predictor = load_ensemble(model.folder, folds, FINAL_CHECKPOINT, device, request.mirroring)
    cases = calibration_set.image_files
    print(f"predicting {len(cases)} calibration case(s) with the ensemble of fold(s) {', '.join(folds)} (test-time "
          f"mirroring {'on' if request.mirroring else 'off'})", flush=True)
    sample = LogitSample(seed=SAMPLE_SEED)
    for case, data, properties in _seams.preprocessed_cases(predictor, list(cases.values()), list(cases),
                                                            request.preprocessing_processes):
        logits = _seams.ensemble_logits(predictor, data, lambda member_logits: None)
        logits = _seams.resampled_logits(logits, properties, predictor.plans_manager,
                                         predictor.configuration_manager)
        labels = read_ground_truth(calibration_set.label_files[case], info)[0]
        labels = crop_to_preprocessing_frame(labels, layout.CropBox.from_properties(properties),
                                             predictor.plans_manager.transpose_forward).astype(np.int64)
        sample.update(logits, labels, None if info.ignore_label is None else labels != info.ignore_label)
        print(f"{case}: predicted", flush=True)
    return sample
