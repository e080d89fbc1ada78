"""nnU-Net's results layout, read in one place: model folders TRAINER__PLANS__CONFIGURATION, their fold_X folders and
checkpoint file names.

Every module that needs to know how nnU-Net names and arranges its results goes through this module (and `_seams`
for nnU-Net's code), so a change of nnU-Net's layout is one edit here.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

FINAL_CHECKPOINT = "checkpoint_final.pth"
BEST_CHECKPOINT = "checkpoint_best.pth"
MODEL_FOLDER_SEPARATOR = "__"

PathLike = str | os.PathLike


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
    return f"fold_{fold}"


def fold_of(fold_folder: Path) -> str:
    """The fold of a fold_X folder ("0", ..., "all")."""
    return fold_folder.name.removeprefix("fold_")


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
        for name in ("plans.json", "dataset.json"):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder / name} is missing: pass a trained nnU-Net model folder "
                                        f"(nnUNet_results/DatasetXXX_Name/TRAINER__PLANS__CONFIGURATION)")
        parts = split_model_folder_name(folder.name)
        if parts is None:
            raise ValueError(f"model folder name {folder.name!r} is not TRAINER__PLANS__CONFIGURATION as nnU-Net "
                             f"writes it; pass the folder nnUNetv2_train trained into")
        try:
            dataset_name = json.loads((folder / "plans.json").read_text())["dataset_name"]
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{folder / 'plans.json'} is not a valid nnU-Net plans file ({type(error).__name__}: "
                             f"{error}): it is corrupt or truncated; restore it from "
                             f"nnUNet_preprocessed/{folder.parent.name}/{parts[1]}.json") from None
        return cls(folder, dataset_name, *parts)

    def fold_folders(self, folds: Iterable[str | int] | None = None) -> list[Path]:
        """fold_X folders holding checkpoint_final.pth: those of `folds`, or every trained one."""
        if folds is None:
            found = sorted(path.parent for path in self.folder.glob(f"fold_*/{FINAL_CHECKPOINT}"))
            if not found:
                raise FileNotFoundError(f"no fold_X/{FINAL_CHECKPOINT} in {self.folder}: train the model first")
            return found
        folders = [self.folder / fold_folder_name(fold) for fold in folds]
        for folder in folders:
            if not (folder / FINAL_CHECKPOINT).is_file():
                raise FileNotFoundError(f"{folder / FINAL_CHECKPOINT} is missing: fold {fold_of(folder)} is not "
                                        f"trained (or has not finished)")
        return folders


# --- nnU-Net's raw and preprocessed dataset files -------------------------------------------------------------------

def plans_file(preprocessed_dataset_folder: Path, plans: str) -> Path:
    """The plans nnUNetv2_plan_and_preprocess wrote: nnUNet_preprocessed/DATASET/PLANS.json."""
    return preprocessed_dataset_folder / f"{plans}.json"


def planned_plans(preprocessed_dataset_folder: Path) -> list[str]:
    """The plans identifiers of a preprocessed dataset (every PLANS.json beside dataset.json)."""
    reserved = {"dataset.json", "dataset_fingerprint.json", "splits_final.json"}
    return sorted(path.stem for path in preprocessed_dataset_folder.glob("*.json")
                  if path.name not in reserved and not path.name.startswith("nnunet_margin"))


def channel_count(dataset_json: dict) -> int:
    """Input channels of a dataset (dataset.json's channel_names, or modality in older files)."""
    return len(dataset_json.get("channel_names") or dataset_json.get("modality") or {})


def raw_images(folder: Path, file_ending: str) -> dict[str, list[str]]:
    """The cases of an imagesTr/imagesTs folder as nnU-Net names them, CASE_XXXX<file_ending> with XXXX the
    channel: {case: [its file names, by channel]}."""
    pattern = re.compile(r"(.+)_(\d{4})" + re.escape(file_ending))
    cases: dict[str, list[str]] = {}
    for path in sorted(folder.iterdir()):
        match = pattern.fullmatch(path.name)
        if match:
            cases.setdefault(match.group(1), []).append(path.name)
    return cases


def raw_labels(folder: Path, file_ending: str) -> dict[str, str]:
    """The cases of a labelsTr/labelsTs folder, CASE<file_ending>: {case: file name}."""
    return {path.name[: -len(file_ending)]: path.name for path in sorted(folder.iterdir())
            if path.name.endswith(file_ending) and len(path.name) > len(file_ending)}
