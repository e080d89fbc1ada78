"""nnU-Net's files, read in one place: the results layout (model folders TRAINER__PLANS__CONFIGURATION, fold_X,
validation/, checkpoint names), the checkpoint keys, summary.json, the preprocessing properties of a case (crop box,
shapes, spacing, image geometry), the preprocessed file suffixes, and the CASE.npz/CASE.pkl files of
`--save_probabilities` / `--npz`.

Every module that needs to know how nnU-Net names, arranges or fills its files goes through this module (and
`_seams` for nnU-Net's code); `_seams` checks each of these formats against the installed nnunetv2 (the seams
checkpoint_schema, summary_json, preprocessing_properties, image_geometry, preprocessed_files, results_layout,
prediction_files and model_export), so a change of nnU-Net's files is one edit here and a failing seam check.
This module itself does not import nnunetv2.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

PathLike = str | os.PathLike

# --- results folders ------------------------------------------------------------------------------------------------

FINAL_CHECKPOINT = "checkpoint_final.pth"
BEST_CHECKPOINT = "checkpoint_best.pth"
MODEL_FOLDER_SEPARATOR = "__"
FOLD_PREFIX = "fold_"
VALIDATION_FOLDER = "validation"
SUMMARY_FILE = "summary.json"  # nnU-Net's Dice summary, written after every case of a validation is exported
PLANS_FILE = "plans.json"
DATASET_FILE = "dataset.json"
FINGERPRINT_FILE = "dataset_fingerprint.json"
# What nnUNetv2_export_model_to_zip packs: these files of the model folder and, per fold besides the checkpoints,
# the following ones.
MODEL_FILES = (PLANS_FILE, DATASET_FILE, FINGERPRINT_FILE)
EXPORTED_FOLD_FILES = ("progress.png", f"{VALIDATION_FOLDER}/{SUMMARY_FILE}")

# --- preprocessed dataset folders -------------------------------------------------------------------------------

GT_SEGMENTATIONS_FOLDER = "gt_segmentations"  # copies of labelsTr, the ground truth of nnU-Net's validation
SPLITS_FILE = "splits_final.json"
# Where nnU-Net's dataset variants keep a case's segmentation, canonical file first (blosc2; numpy: the .npz, which
# training unpacks into _seg.npy).
PREPROCESSED_SEGMENTATION_SUFFIXES = ("_seg.b2nd", ".npz", "_seg.npy")


def model_folder_name(trainer: str, plans: str, configuration: str) -> str:
    """nnU-Net's model folder name: TRAINER__PLANS__CONFIGURATION."""
    return MODEL_FOLDER_SEPARATOR.join((trainer, plans, configuration))


def split_model_folder_name(name: str) -> tuple[str, str, str] | None:
    """(trainer, plans, configuration) of a model folder name, or None if it is not one."""
    parts = name.split(MODEL_FOLDER_SEPARATOR)
    if len(parts) != 3 or not all(parts):
        return None
    return parts[0], parts[1], parts[2]


def fold_folder_name(fold: str | int) -> str:
    return f"{FOLD_PREFIX}{fold}"


def fold_of(fold_folder: Path) -> str:
    """The fold of a fold_X folder ("0", ..., "all")."""
    return fold_folder.name.removeprefix(FOLD_PREFIX)


def validation_folder(fold_folder: PathLike) -> Path:
    return Path(fold_folder) / VALIDATION_FOLDER


def validation_fold(folder: PathLike) -> str | None:
    """The fold of a MODEL/fold_X/validation folder (MODEL named TRAINER__PLANS__CONFIGURATION), else None."""
    folder = Path(folder).resolve()
    fold_folder = folder.parent
    if folder.name != VALIDATION_FOLDER or not fold_folder.name.startswith(FOLD_PREFIX) \
            or split_model_folder_name(fold_folder.parent.name) is None:
        return None
    return fold_of(fold_folder)


def gt_segmentations_folder(preprocessed_dataset_folder: PathLike) -> Path:
    return Path(preprocessed_dataset_folder) / GT_SEGMENTATIONS_FOLDER


def is_gt_segmentations_folder(folder: PathLike) -> bool:
    """Whether `folder` is nnUNet_preprocessed/DATASET/gt_segmentations (a dataset.json beside it)."""
    folder = Path(folder).resolve()
    return folder.name == GT_SEGMENTATIONS_FOLDER and (folder.parent / DATASET_FILE).is_file()


def plans_file(preprocessed_dataset_folder: PathLike, plans: str) -> Path:
    return Path(preprocessed_dataset_folder) / f"{plans}.json"


def planned_plans(preprocessed_dataset_folder: PathLike) -> list[str]:
    """The plans identifiers of a preprocessed dataset (every PLANS.json beside dataset.json)."""
    others = {DATASET_FILE, FINGERPRINT_FILE, SPLITS_FILE}
    return sorted(path.stem for path in Path(preprocessed_dataset_folder).glob("*.json")
                  if path.name not in others and not path.name.startswith("nnunet_margin"))


def preprocessed_segmentation_file(configuration_folder: Path, case: str) -> Path:
    """The file holding a case's preprocessed segmentation, whatever nnU-Net's dataset class wrote it."""
    for suffix in PREPROCESSED_SEGMENTATION_SUFFIXES:
        path = configuration_folder / (case + suffix)
        if path.is_file():
            return path
    raise FileNotFoundError(f"no preprocessed segmentation for case {case!r} in {configuration_folder} "
                            f"(looked for {', '.join(case + suffix for suffix in PREPROCESSED_SEGMENTATION_SUFFIXES)}"
                            f"); run nnUNetv2_plan_and_preprocess (or nnUNetv2_preprocess) for this configuration")


def cases_with_suffix(folder: Path, suffix: str) -> list[str]:
    """The case identifiers of the files in `folder` named CASE<suffix>, sorted (none if there is no folder)."""
    if not folder.is_dir():
        return []
    return sorted(path.name[: -len(suffix)] for path in folder.iterdir()
                  if path.name.endswith(suffix) and len(path.name) > len(suffix) and path.is_file())


@dataclass(frozen=True)
class TrainedModel:
    """An nnU-Net model folder DATASET/TRAINER__PLANS__CONFIGURATION (with plans.json and dataset.json)."""

    folder: Path
    dataset_name: str
    trainer: str
    plans: str
    configuration: str

    @classmethod
    def load(cls, folder: PathLike) -> TrainedModel:
        folder = Path(folder).resolve()
        for name in (PLANS_FILE, DATASET_FILE):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder / name} is missing: pass a trained nnU-Net model folder "
                                        f"(nnUNet_results/DatasetXXX_Name/TRAINER__PLANS__CONFIGURATION)")
        parts = split_model_folder_name(folder.name)
        if parts is None:
            raise ValueError(f"model folder name {folder.name!r} is not TRAINER__PLANS__CONFIGURATION as nnU-Net "
                             f"writes it; pass the folder nnUNetv2_train trained into")
        try:
            dataset_name = json.loads((folder / PLANS_FILE).read_text())["dataset_name"]
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{folder / PLANS_FILE} is not a valid nnU-Net plans file ({type(error).__name__}: "
                             f"{error}): it is corrupt or truncated; restore it from "
                             f"nnUNet_preprocessed/{folder.parent.name}/{parts[1]}.json") from None
        return cls(folder, dataset_name, *parts)

    def fold_folders(self, folds: Iterable[str | int] | None = None) -> list[Path]:
        """fold_X folders holding checkpoint_final.pth: those of `folds`, or every trained one."""
        if folds is None:
            found = sorted(path.parent for path in self.folder.glob(f"{FOLD_PREFIX}*/{FINAL_CHECKPOINT}"))
            if not found:
                raise FileNotFoundError(f"no {FOLD_PREFIX}X/{FINAL_CHECKPOINT} in {self.folder}: train the model "
                                        f"first")
            return found
        folders = [self.folder / fold_folder_name(fold) for fold in folds]
        for folder in folders:
            if not (folder / FINAL_CHECKPOINT).is_file():
                raise FileNotFoundError(f"{folder / FINAL_CHECKPOINT} is missing: fold {fold_of(folder)} is not "
                                        f"trained (or has not finished)")
        return folders


# --- checkpoints ------------------------------------------------------------------------------------------------

CHECKPOINT_WEIGHTS = "network_weights"  # the network's state dict
CHECKPOINT_TRAINER = "trainer_name"  # the class nnU-Net's predictor rebuilds the network with
PLUGIN_CHECKPOINT_KEY = "nnunet_margin"  # what the plugin's trainers add (nnU-Net's load_checkpoint ignores it)
CHECKPOINT_KEYS_READ = (CHECKPOINT_WEIGHTS, CHECKPOINT_TRAINER)  # the nnU-Net keys the plugin reads or rewrites


# --- summary.json -------------------------------------------------------------------------------------------------

def read_summary_dice(summary_file: Path, class_names: list[str], file_ending: str) -> dict[str, Any]:
    """Per-class and foreground-mean Dice of nnU-Net's summary.json (its mean metrics are keyed by the label value as
    a string; NaN, which nnU-Net writes for a class absent everywhere, becomes None) and the cases it covers."""
    try:
        summary = json.loads(summary_file.read_text())
        per_class = {class_names[int(key)]: _finite_or_none(metrics.get("Dice"))
                     for key, metrics in summary["mean"].items() if key.isdigit() and int(key) < len(class_names)}
        cases = sorted(Path(entry["prediction_file"]).name.removesuffix(file_ending)
                       for entry in summary["metric_per_case"])
        foreground_mean = _finite_or_none(summary["foreground_mean"].get("Dice"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{summary_file} is not a readable nnU-Net summary ({type(error).__name__}: {error}); "
                         f"delete it, or rerun nnU-Net's evaluation (nnUNetv2_evaluate_folder) that wrote it") from None
    return {"source": str(summary_file), "per_class": per_class, "foreground_mean": foreground_mean, "cases": cases}


def _finite_or_none(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and np.isfinite(value) else None


# --- preprocessing properties of a case (CASE.pkl) ------------------------------------------------------------

SHAPE_BEFORE_CROPPING = "shape_before_cropping"
CROP_BOX = "bbox_used_for_cropping"
SHAPE_AFTER_CROPPING = "shape_after_cropping_and_before_resampling"
SPACING = "spacing"
PROPERTIES_KEYS_READ = (SHAPE_BEFORE_CROPPING, CROP_BOX, SHAPE_AFTER_CROPPING, SPACING)

@dataclass(frozen=True)
class CropBox:
    """Where nnU-Net's preprocessing cropped a case, in its transposed frame (transpose_forward applied):
    the shape before cropping, the box ([low, high) per axis) and the shape of the crop."""

    shape_before_cropping: tuple[int, ...]
    bbox: tuple[tuple[int, int], ...]
    shape_after_cropping: tuple[int, ...]

    @classmethod
    def from_properties(cls, properties: dict[str, Any]) -> CropBox:
        try:
            return cls(tuple(int(size) for size in properties[SHAPE_BEFORE_CROPPING]),
                       tuple((int(low), int(high)) for low, high in properties[CROP_BOX]),
                       tuple(int(size) for size in properties[SHAPE_AFTER_CROPPING]))
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"the case's properties hold no valid crop box ({type(error).__name__}: {error}): they "
                             f"are not those nnU-Net's preprocessing writes") from None

    @property
    def voxels(self) -> int:
        return int(np.prod(self.shape_after_cropping))


def spacing(properties: dict[str, Any]) -> tuple[float, ...]:
    """The voxel spacing (mm) of a case, per axis of its array (nnU-Net's reader order)."""
    return tuple(float(value) for value in properties[SPACING])


def image_geometry(properties: dict[str, Any]) -> dict[str, np.ndarray]:
    """The geometry an image reader recorded for a case, by name: "spacing" always, and "origin" and "direction"
    (SimpleITK readers) or "affine" (nibabel readers) where the reader keeps them."""
    geometry = {SPACING: np.asarray(spacing(properties))}
    sitk = properties.get("sitk_stuff")
    if isinstance(sitk, dict):
        geometry.update(origin=np.asarray(sitk["origin"], dtype=float),
                        direction=np.asarray(sitk["direction"], dtype=float))
    nibabel = properties.get("nibabel_stuff")
    if isinstance(nibabel, dict):
        geometry["affine"] = np.asarray(nibabel["original_affine"], dtype=float)
    return geometry


# --- exported predictions (nnUNetv2_predict --save_probabilities, nnUNetv2_train --val --npz) ---------------------

PROBABILITIES_SUFFIX = ".npz"
PROBABILITIES_KEY = "probabilities"
PROPERTIES_SUFFIX = ".pkl"
_REWRITE = ("rewrite it with nnUNetv2_predict --save_probabilities (a validation folder: nnUNetv2_train DATASET "
            "CONFIGURATION FOLD -tr TRAINER -p PLANS --val --npz)")


@dataclass(frozen=True)
class ExportedFiles:
    """The files nnU-Net's export writes for one case: CASE.npz (probabilities), CASE.pkl (the case's properties)
    and CASE<file_ending> (the segmentation)."""

    case: str
    probabilities: Path
    properties: Path
    segmentation: Path

    @classmethod
    def of(cls, folder: Path, case: str, file_ending: str) -> ExportedFiles:
        return cls(case, folder / f"{case}{PROBABILITIES_SUFFIX}", folder / f"{case}{PROPERTIES_SUFFIX}",
                   folder / f"{case}{file_ending}")


def probability_cases(folder: Path) -> list[str]:
    """The cases of a prediction folder with exported probabilities (CASE.npz)."""
    return cases_with_suffix(folder, PROBABILITIES_SUFFIX)


def read_probabilities(npz_file: Path) -> np.ndarray:
    """The (K, *spatial) probabilities of an exported CASE.npz."""
    try:
        with np.load(npz_file) as data:
            keys = data.files
            if PROBABILITIES_KEY in keys:
                return data[PROBABILITIES_KEY]
    except (EOFError, ValueError, zipfile.BadZipFile, zlib.error) as error:
        raise ValueError(f"cannot read {npz_file} ({type(error).__name__}: {error}): it is truncated or corrupt; "
                         f"{_REWRITE}") from None
    raise ValueError(f"{npz_file} has no '{PROBABILITIES_KEY}' array (keys: {keys}); it is not an nnU-Net "
                     f"probability export")


def read_properties(pkl_file: Path) -> dict[str, Any]:
    """The properties nnU-Net pickled beside an exported case (CASE.pkl)."""
    try:
        with open(pkl_file, "rb") as handle:
            properties = pickle.load(handle)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError,
            KeyError) as error:
        raise ValueError(f"cannot read {pkl_file} ({type(error).__name__}: {error}): it is truncated or corrupt; "
                         f"{_REWRITE}") from None
    if not isinstance(properties, dict):
        raise ValueError(f"{pkl_file} holds a {type(properties).__name__}, not nnU-Net's properties dict; "
                         f"{_REWRITE}")
    return properties


# --- raw dataset folders (imagesTr / imagesTs, labelsTr / labelsTs) -------------------------------------------------

def channel_count(dataset_json: dict) -> int:
    """Input channels of a dataset (dataset.json's channel_names, or modality in older files)."""
    return len(dataset_json.get("channel_names") or dataset_json.get("modality") or {})


def raw_images(folder: Path, file_ending: str) -> dict[str, list[str]]:
    """The cases of an imagesTr/imagesTs folder as nnU-Net names them, CASE_XXXX<file_ending> with XXXX the
    channel: {case: [its file names, by channel]} (labels are CASE<file_ending>: `cases_with_suffix`)."""
    pattern = re.compile(r"(.+)_(\d{4})" + re.escape(file_ending))
    cases: dict[str, list[str]] = {}
    for path in sorted(folder.iterdir()):
        match = pattern.fullmatch(path.name)
        if match:
            cases.setdefault(match.group(1), []).append(path.name)
    return cases
