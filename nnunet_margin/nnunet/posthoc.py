"""Post-hoc calibration of a trained model beyond one temperature: `nnunet-margin fit-calibration`.

Per fold, a calibrator (temperature, vector or matrix scaling with ODIR; `nnunet_margin.calibration.affine`) is
fitted by NLL on the fit part of the fold's logit sample (validation/logit_sample.nnunet_margin, written by the
plugin's final validation) and measured on its held-out part, so the reported improvement is not the fitted one.
Per-class maps are fitted on every voxel of the crop box (scope "crop"): fitted on foreground voxels alone they
would never see a background label. The held-out metrics are reported in both scopes.
It is written to fold_X/calibration_map.json with the metrics before and after and the checkpoint it belongs to;
`nnunet-margin export-portable --calibration` folds it into the network's last layer.

A fold without a current sample (a model trained before the sample existed, or by nnU-Net's own trainers) has its
final validation run again with the plugin's hook, in this process: nnU-Net's own validation, so it rewrites the
fold's validation/ folder with the same predictions, plus the sample.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from .._atomic import write_json_atomic
from ..calibration.affine import AffineCalibration, fit_affine_calibration, logit_calibration_metrics
from ..calibration.logit_sample import LabelledLogits, LogitSample
from . import _seams, layout
from .calibration_report import json_value
from .layout import FINAL_CHECKPOINT, TrainedModel
from .provenance import PROVENANCE_FILE, check_sample_current
from .validation import LOGIT_SAMPLE_FILE

CALIBRATION_MAP_FILE = "calibration_map.json"
SCOPES = ("foreground", "crop")
REPORTED_METRICS = {"ece": "ECE", "classwise_ece": "classwise ECE", "ace": "ACE", "nll": "NLL", "brier": "Brier"}
CROSS_VALIDATION_FOLDS = 3


def revalidate(model: TrainedModel, fold_folder: Path, device: torch.device) -> None:
    """Run the fold's final validation again with the plugin's calibration hook (see the module docstring)."""
    from ..trainers import nnUNetTrainerWithCalibration

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
    fold = layout.fold_of(fold_folder)
    print(f"{fold_folder.name}: running nnU-Net's validation again with the calibration hook (no current "
          f"{LOGIT_SAMPLE_FILE})", flush=True)
    trainer = _seams.validation_trainer(trainer_class, plans, model.configuration, fold, dataset_json, device)
    trainer.load_checkpoint(str(fold_folder / FINAL_CHECKPOINT))
    trainer.perform_actual_validation(False)


def _refresh_command(model: TrainedModel, fold_folder: Path) -> str:
    return (f"nnunet-margin fit-calibration {model.folder} -f {layout.fold_of(fold_folder)} "
            f"--revalidate")


def fold_sample(model: TrainedModel, fold_folder: Path, revalidate_first: bool, device: torch.device) -> LogitSample:
    """The fold's current logit sample, running its validation again where it is missing (or when asked)."""
    sample_file = layout.validation_folder(fold_folder) / LOGIT_SAMPLE_FILE
    if revalidate_first or not sample_file.is_file():
        revalidate(model, fold_folder, device)
        if not sample_file.is_file():
            raise RuntimeError(f"the validation of {fold_folder} wrote no {LOGIT_SAMPLE_FILE}: its cases hold no "
                               f"counted voxel")
    check_sample_current(fold_folder, sample_file, _refresh_command(model, fold_folder))
    try:
        return LogitSample.load(sample_file)
    except (OSError, ValueError, KeyError, EOFError) as error:
        raise ValueError(f"{sample_file} is unreadable ({error}); write it again with "
                         f"`{_refresh_command(model, fold_folder)}`") from None


def _in_scope(voxels: LabelledLogits, scope: str) -> LabelledLogits:
    if scope == "crop":
        return voxels
    foreground = voxels.labels != 0
    return LabelledLogits(voxels.logits[:, foreground], voxels.labels[foreground], voxels.position[foreground])


def _json_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    return {name: json_value(value) for name, value in metrics.items()}


def fit_fold(fold_folder: Path, sample: LogitSample, method: str, scope: str, held_out_fraction: float,
             class_names: list[str]) -> dict[str, Any]:
    """Fit on the sample's fit part in `scope`, measure on its held-out part in both scopes, write
    calibration_map.json; returns it."""
    fit, held_out = sample.split(held_out_fraction)
    fit = _in_scope(fit, scope)
    if fit.num_voxels == 0 or held_out.num_voxels == 0:
        raise ValueError(f"{fold_folder}: the logit sample has too few {scope} voxels to fit and measure on")
    calibration = fit_affine_calibration(fit.logits, fit.labels, method, folds=CROSS_VALIDATION_FOLDS,
                                         fold_ids=fit.fold_ids(CROSS_VALIDATION_FOLDS))
    measured = {}
    for measured_scope in SCOPES:
        part = _in_scope(held_out, measured_scope)
        measured[measured_scope] = {
            "num_voxels": part.num_voxels,
            "before": _json_metrics(logit_calibration_metrics(part.logits, part.labels)),
            "after": _json_metrics(logit_calibration_metrics(part.logits, part.labels, calibration))}
    record = {
        "method": method,
        "scope": scope,
        "class_names": class_names,
        "held_out_fraction": held_out_fraction,
        "num_sample_voxels": sample.num_sampled,
        "num_fit_voxels": fit.num_voxels,
        "calibration": calibration.to_dict(),
        "held_out": measured,
        "checkpoint_sha256": json.loads((layout.validation_folder(fold_folder) / PROVENANCE_FILE).read_text()
                                        )["sha256"],
    }
    write_json_atomic(fold_folder / CALIBRATION_MAP_FILE, record)
    return record


def fit_model_calibration(model_folder, method: str, folds=None, scope: str = "crop",
                          held_out_fraction: float = 0.2, revalidate_first: bool = False,
                          device: str | None = None) -> dict[str, dict[str, Any]]:
    """Fit and record one calibration map per fold (see the module docstring); returns {fold folder: record}."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if scope == "foreground" and method != "temperature":
        raise ValueError(f"{method} scaling fitted on foreground voxels never sees a background label, so it drives "
                         f"the background logit down everywhere; fit it with --scope crop (the default), which the "
                         f"held-out metrics also report in the foreground scope")
    model = TrainedModel.load(model_folder)
    torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    from .prediction_folder import load_dataset_info

    class_names = load_dataset_info(model.folder).class_names
    records = {}
    for fold_folder in model.fold_folders(folds):
        sample = fold_sample(model, fold_folder, revalidate_first, torch_device)
        records[fold_folder.name] = fit_fold(fold_folder, sample, method, scope, held_out_fraction, class_names)
    return records


def read_calibration_map(fold_folder: Path) -> AffineCalibration:
    """The fold's fitted map, refused if its checkpoint changed since (for export-portable --calibration)."""
    from .provenance import file_sha256

    path = fold_folder / CALIBRATION_MAP_FILE
    fit_command = f"nnunet-margin fit-calibration {fold_folder.parent} -f {layout.fold_of(fold_folder)}"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `{fit_command} --method vector` (or temperature, matrix) "
                                f"first, or export without --calibration")
    try:
        record = json.loads(path.read_text())
        calibration = AffineCalibration.from_dict(record["calibration"])
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a valid calibration map ({error}); fit it again with `{fit_command}`") \
            from None
    if record.get("checkpoint_sha256") != file_sha256(fold_folder / FINAL_CHECKPOINT):
        raise ValueError(f"{path} was fitted for another {FINAL_CHECKPOINT} than the current one (the fold was "
                         f"trained again): fit it again with `{fit_command} --revalidate`")
    return calibration


def _before_after(before: float | None, after: float | None) -> str:
    return " -> ".join("n/a" if value is None or not math.isfinite(value) else f"{value:.4f}"
                       for value in (before, after))


def calibration_table(records: dict[str, dict[str, Any]]) -> str:
    """Markdown table: per fold and scope of the held-out voxels, each metric before -> after."""
    columns = ["fold", "method", "fitted on", "held-out scope", "voxels", *REPORTED_METRICS.values()]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for fold, record in records.items():
        for scope, measured in record["held_out"].items():
            cells = [fold, record["method"], record["scope"], scope, str(measured["num_voxels"])]
            cells += [_before_after(measured["before"][name], measured["after"][name]) for name in REPORTED_METRICS]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
