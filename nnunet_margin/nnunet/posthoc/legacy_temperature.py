"""`nnunet-margin fit-temperature` and `export-portable --temperature`: deprecated aliases, kept for one release.

Use `fit-calibration --method temperature` (the logit sample, any trainer) and `export-portable --calibration`
instead. `fit_model_temperatures` reads the probabilities nnU-Net wrote for the fold's validation cases
(fold_X/validation/CASE.npz + CASE.pkl, from `--npz`) against $nnUNet_preprocessed/DATASET/gt_segmentations as
log-probabilities into a `LogitSample`, fits them with the one temperature solver of `fit-calibration` (log p
differs from the logits by a constant per voxel, so on the same voxels both give the same T; docs/methods.md 6), and
writes fold_X/temperature.json with T, the checkpoint it belongs to and the calibration metrics before and after.
It works for any trainer, nnU-Net's own included. `temperatures_for_export` reads temperature.json files, those
written before they named their checkpoint too.

Only probabilities of the fold's current checkpoint_final.pth from a finished validation are used (see
`nnunet_margin.nnunet.provenance`). A temperature at a bound of the search (`TEMPERATURE_BOUNDS`) is no fit: the NLL
still falls beyond it. temperature.json then says so ("at_bound": "lower" or "upper"), a `TemperatureAtBoundWarning`
explains it, and export-portable refuses to fold it in unless told otherwise.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shlex
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...calibration import CalibrationStats
from ...calibration.affine import TEMPERATURE_BOUNDS, AffineCalibration, fit_affine_calibration
from ...calibration.logit_sample import LogitSample, log_probabilities
from .. import layout
from ..case_evaluation import SCOPES, scope_masks
from ..layout import FINAL_CHECKPOINT, PathLike, TrainedModel, fold_of
from ..prediction_folder import DatasetInfo, load_case_files, load_dataset_info
from ..provenance import check_validation_current, file_sha256, record_validation
from .maps import BOUND_MEANINGS, FitScope, check_bound, check_checkpoints_current, write_fit_record

TEMPERATURE_FILE = "temperature.json"
_REPORTED_METRICS = {"ece": "ECE", "classwise_ece": "classwise ECE", "nll": "NLL", "brier": "Brier"}
FIT_TEMPERATURE_DEPRECATION = (
    "fit-temperature is deprecated and will be removed in the next release: use `nnunet-margin fit-calibration "
    "MODEL_FOLDER --method temperature` (fitted on the logit sample, for any trainer) and `export-portable "
    "--calibration`")
EXPORT_TEMPERATURE_DEPRECATION = (
    "export-portable --temperature is deprecated and will be removed in the next release: fit with `nnunet-margin "
    "fit-calibration MODEL_FOLDER --method temperature` and export with --calibration")


@dataclass(frozen=True)
class _Case:
    """One validation case to read (picklable for worker processes)."""

    probabilities: Path  # CASE.npz
    properties: Path  # CASE.pkl
    ground_truth: Path
    info: DatasetInfo
    scope: str


def _scope_voxels(case: _Case) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities (K, V) and labels (V,) of the case's voxels in its scope (see case_evaluation)."""
    loaded = load_case_files(case.probabilities, case.properties, case.ground_truth, case.info)
    counted = scope_masks(loaded.labels, loaded.crop_mask, case.info.ignore_label)[case.scope]
    return loaded.probabilities[:, counted], loaded.labels[counted]


@contextmanager
def _case_reader(num_processes: int) -> Iterator[Callable[[list[_Case]], Iterable]]:
    """Yields map(_scope_voxels, cases), in order, on `num_processes` worker processes if more than one."""
    if num_processes <= 1:
        yield lambda cases: map(_scope_voxels, cases)
        return
    with multiprocessing.get_context("spawn").Pool(num_processes) as pool:
        yield lambda cases: pool.imap(_scope_voxels, cases)


def _console_script(name: str) -> str:
    """The nnU-Net command of this Python environment (works without an activated venv)."""
    beside_python = Path(sys.executable).parent / name
    return str(beside_python) if beside_python.is_file() else name


def refresh_command(model: TrainedModel, fold_folder: Path) -> list[str]:
    """The nnU-Net command that (re)writes a fold's validation probabilities."""
    return ["nnUNetv2_train", model.dataset_name, model.configuration, fold_of(fold_folder), "-tr",
            model.trainer, "-p", model.plans, "--val", "--npz"]


def _ensure_validation_probabilities(model: TrainedModel, fold_folder: Path) -> None:
    """Run nnU-Net's validation with --npz for a fold whose validation folder has no .npz files (and record which
    checkpoint it used); refuse .npz files of another checkpoint or of an unfinished validation."""
    command = refresh_command(model, fold_folder)
    if not layout.probability_cases(layout.validation_folder(fold_folder)):
        _run_validation(model, fold_folder, command)
    check_validation_current(fold_folder, " ".join(command))


def _run_validation(model: TrainedModel, fold_folder: Path, command: list[str]) -> None:
    results = os.environ.get("nnUNet_results")
    if results is None or (Path(results) / model.dataset_name / model.folder.name).resolve() != model.folder:
        raise RuntimeError(f"{layout.validation_folder(fold_folder)} has no .npz probabilities, and nnUNetv2_train "
                           f"--val can only write them if nnUNet_results points at this model's results folder: export "
                           f"nnUNet_results={model.folder.parent.parent} (now {results or 'not set'})")
    command = [_console_script(command[0]), *command[1:], "-device", "cuda" if torch.cuda.is_available() else "cpu"]
    print(f"{fold_folder.name}: no validation probabilities (.npz); running nnU-Net's validation:\n  "
          + " ".join(command), flush=True)
    try:
        returncode = subprocess.run(command).returncode
    except FileNotFoundError:
        raise FileNotFoundError(f"{command[0]} is not installed in this environment: install nnunetv2 beside "
                                f"nnunet-margin (or activate its environment)") from None
    if returncode != 0:
        raise RuntimeError(f"`{' '.join(command)}` failed (see its output above); if nnU-Net cannot find trainer "
                           f"{model.trainer}, set nnUNet_extTrainer as for training")
    if not layout.probability_cases(layout.validation_folder(fold_folder)):
        raise RuntimeError(f"nnU-Net's validation wrote no .npz into {layout.validation_folder(fold_folder)}")
    record_validation(fold_folder, FINAL_CHECKPOINT)


def _validation_cases(fold_folder: Path, gt_folder: Path, info: DatasetInfo, scope: str) -> list[_Case]:
    cases = []
    for name in layout.probability_cases(layout.validation_folder(fold_folder)):
        files = layout.ExportedFiles.of(layout.validation_folder(fold_folder), name, info.file_ending)
        case = _Case(files.probabilities, files.properties, gt_folder / (name + info.file_ending), info, scope)
        for path in (case.properties, case.ground_truth):
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing (needed for validation case {name} of "
                                        f"{fold_folder.name})")
        cases.append(case)
    return cases


class TemperatureAtBoundWarning(UserWarning):
    """A fold's fitted temperature lies at a bound of the search, so it is no fit (see `bound_warning`)."""


def bound_side(temperature: float) -> str | None:
    """The bound of TEMPERATURE_BOUNDS the temperature lies at, "lower" or "upper" (the fit returns the bound itself
    when the NLL still falls beyond it), else None."""
    low, high = TEMPERATURE_BOUNDS
    return "lower" if temperature <= low else "upper" if temperature >= high else None


def bound_warning(fold: str, record: dict[str, Any]) -> str | None:
    """What a fold's temperature at a bound means and what to do (None for a temperature inside the bounds)."""
    side = record.get("at_bound")
    if side is None:
        return None
    return (f"{fold}: T = {record['temperature']:g} is the {side} bound of the search, not a fit: "
            f"{BOUND_MEANINGS[side]} ({record['scope']} scope). Check the model and its validation probabilities; "
            f"export-portable --temperature refuses this T unless given --allow-bound")


def _fit_fold(fold_folder: Path, cases: list[_Case], read_cases: Callable[[list[_Case]], Iterable],
              num_classes: int, scope: str) -> dict[str, Any]:
    """Fit the fold's temperature, measure calibration before and after, write temperature.json; returns it."""
    sample, before, after = LogitSample(), CalibrationStats(num_classes), CalibrationStats(num_classes)
    for case, (probabilities, labels) in zip(cases, read_cases(cases)):
        try:
            sample.update_probabilities(probabilities, labels)
            before.update(probabilities, labels)
        except ValueError as error:
            raise ValueError(f"{case.probabilities}: {error}") from error
    if sample.num_voxels == 0:
        raise ValueError(f"the validation cases of {fold_folder.name} hold no {scope} voxel to fit a temperature to")
    voxels = sample.voxels()
    with warnings.catch_warnings():  # a temperature at a bound is recorded and explained by bound_warning
        warnings.filterwarnings("ignore", message="the NLL keeps decreasing towards the bound", category=UserWarning)
        calibration = fit_affine_calibration(voxels.logits, voxels.labels, "temperature")
    for probabilities, labels in read_cases(cases):
        after.update(torch.softmax(calibration.apply(log_probabilities(probabilities)), dim=0), labels)
    record = {
        "temperature": calibration.info["temperature"],
        "at_bound": calibration.info["at_bound"],
        "scope": scope,
        "num_cases": len(cases),
        "num_voxels": sample.num_voxels,
        "num_voxels_fitted": sample.num_sampled,
        "class_names": cases[0].info.class_names,
        "checkpoint_sha256": file_sha256(fold_folder / FINAL_CHECKPOINT),
        "before": before.compute(),
        "after": after.compute(),
    }
    write_fit_record(fold_folder / TEMPERATURE_FILE, record, "fit-temperature")
    return record


def fit_model_temperatures(model_folder: PathLike, folds: Iterable[str | int] | None = None,
                           scope: str = "foreground", num_processes: int = 1) -> dict[str, dict[str, Any]]:
    """Fit and record one temperature per fold of a trained model; returns {fold folder name: temperature.json}.

    Folds default to every fold_X with checkpoint_final.pth. A fold without validation .npz files gets them from
    `nnUNetv2_train DATASET CONFIGURATION FOLD -tr TRAINER -p PLANS --val --npz` (run as a subprocess, then
    recorded in validation/provenance.json); .npz files of an earlier checkpoint or of an unfinished validation are
    refused with that command as the fix. `scope` is "foreground" (ground truth not background) or "crop" (all
    voxels in nnU-Net's crop box); ignored voxels never count. `num_processes` cases are read in parallel. Besides
    fold_X/temperature.json, only the files of the validation it runs are written into the model folder. A
    temperature at a bound of the search issues a TemperatureAtBoundWarning (see `bound_warning`).
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    model = TrainedModel.load(model_folder)
    preprocessed = os.environ.get("nnUNet_preprocessed")
    gt_folder = layout.gt_segmentations_folder(Path(preprocessed or ".") / model.dataset_name)
    if preprocessed is None or not gt_folder.is_dir():
        raise FileNotFoundError(f"no ground truth folder {gt_folder}: set nnUNet_preprocessed to the folder "
                                f"holding {model.dataset_name}/gt_segmentations (now {preprocessed or 'not set'})")
    fold_folders = model.fold_folders(folds)
    for fold_folder in fold_folders:
        _ensure_validation_probabilities(model, fold_folder)
    info = load_dataset_info(model.folder)

    records = {}
    with _case_reader(num_processes) as read_cases:
        for fold_folder in fold_folders:
            cases = _validation_cases(fold_folder, gt_folder, info, scope)
            records[fold_folder.name] = _fit_fold(fold_folder, cases, read_cases, len(info.class_names), scope)
    for fold, record in records.items():
        message = bound_warning(fold, record)
        if message is not None:
            warnings.warn(message, TemperatureAtBoundWarning, stacklevel=2)
    return records


def _before_after(before: float, after: float) -> str:
    return " -> ".join("n/a" if not math.isfinite(value) else f"{value:.4f}" for value in (before, after))


def temperature_table(records: dict[str, dict[str, Any]]) -> str:
    """Markdown table of `fit_model_temperatures`' result: T and each metric before -> after, per fold."""
    columns = ["fold", "scope", "T", *_REPORTED_METRICS.values()]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for fold, record in records.items():
        bound = "" if record.get("at_bound") is None else f" ({record['at_bound']} bound)"
        cells = [fold, record["scope"], f"{record['temperature']:.4f}{bound}"]
        cells += [_before_after(record["before"][name], record["after"][name]) for name in _REPORTED_METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _read_temperature(model: TrainedModel, fold_folder: Path, num_classes: int, allow_bound: bool
                      ) -> tuple[AffineCalibration, str]:
    """The fold's temperature.json as a map A = I / T, and the SHA-256 of the checkpoint it belongs to; refused if
    missing, corrupt, fitted for another checkpoint, or at a bound (unless allowed)."""
    path = fold_folder / TEMPERATURE_FILE
    checkpoint = fold_folder / FINAL_CHECKPOINT
    fit_command = shlex.join(["nnunet-margin", "fit-temperature", str(model.folder), "-f", fold_of(fold_folder)])
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run {fit_command} first (or export without --temperature)")
    try:
        record = json.loads(path.read_text())
        temperature = float(record["temperature"])
        if not (np.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature {temperature} is not a finite number > 0")
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a valid temperature record ({type(error).__name__}: {error}): it is corrupt "
                         f"or truncated; refit with {fit_command}") from None
    if "checkpoint_sha256" in record:
        sha256 = check_checkpoints_current(model, FitScope("fold", {fold_folder.name: record["checkpoint_sha256"]}),
                                           path, fit_command)[fold_folder.name]
    elif path.stat().st_mtime_ns < checkpoint.stat().st_mtime_ns:
        raise ValueError(f"{path} names no checkpoint (written by nnunet-margin 0.1.0) and is older than "
                         f"{FINAL_CHECKPOINT}: it was fitted for an earlier model of the fold; refit with "
                         f"{fit_command}")
    else:
        sha256 = file_sha256(checkpoint)
    calibration = AffineCalibration.from_temperature(temperature, num_classes,
                                                     {"at_bound": record.get("at_bound", bound_side(temperature))})
    check_bound(calibration, allow_bound, path, "validation probabilities")
    return calibration, sha256


def temperatures_for_export(model: TrainedModel, fold_folders: list[Path], num_classes: int, allow_bound: bool
                            ) -> tuple[dict[str, AffineCalibration], dict[str, Any]]:
    """Each exported fold's temperature as a map, and what export_info.json records of them."""
    read = {fold_folder.name: _read_temperature(model, fold_folder, num_classes, allow_bound)
            for fold_folder in fold_folders}
    calibrations = {fold: calibration for fold, (calibration, _) in read.items()}
    info: dict[str, Any] = {
        "temperatures_folded_in": {fold: calibration.info["temperature"] for fold, calibration in calibrations.items()},
        "calibration_fit_on": "fold",
        "calibration_checkpoints": {fold: sha256 for fold, (_, sha256) in read.items()}}
    at_bound = {fold: calibration.info["at_bound"] for fold, calibration in calibrations.items()
                if calibration.info["at_bound"] is not None}
    if at_bound:
        info["temperatures_at_bound"] = at_bound
    return calibrations, info
