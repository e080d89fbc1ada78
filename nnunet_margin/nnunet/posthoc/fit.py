"""`nnunet-margin fit-calibration`: the one post-hoc fitter (temperature, vector or matrix scaling with ODIR).

A calibrator (`nnunet_margin.calibration.affine`) is fitted by NLL on the fit part of a logit sample and measured on
its held-out part, so the reported improvement is not the fitted one. Per-class maps are fitted on every voxel of the
crop box (scope "crop"): fitted on foreground voxels alone they would never see a background label. The held-out
metrics are reported in both scopes. What the sample holds is the fit's scope (`--fit-on`, docs/methods.md 6):
- "fold": each fold's own sample (its validation cases), one map per fold;
- "pooled": the chosen folds' samples merged (`LogitSample.merge`: their union while it holds at most the samples'
  2 million voxels, else a uniform subsample of it), one map folded identically into every one of those folds;
- "images": the sample of the chosen folds' ensemble's own logits of a held-out calibration set (`images`), one map
  folded identically into every one of those folds.
The record goes to fold_X/calibration_map.json (`maps`); `nnunet-margin export-portable --calibration` folds it into
the network's last layer.
"""

from __future__ import annotations

import functools
import json
import math
import shlex
from pathlib import Path
from typing import Any

import torch

from ...calibration.affine import fit_affine_calibration, logit_calibration_metrics
from ...calibration.logit_sample import LabelledLogits, LogitSample
from ..calibration_report import json_value
from ..layout import DATASET_FILE, FINAL_CHECKPOINT, TrainedModel, fold_of
from ..prediction_folder import DatasetInfo, load_dataset_info
from ..provenance import file_sha256
from .images import ImagesRequest, check_calibration_set, ensemble_sample
from .maps import FIT_ON, FORMAT_VERSION, FitScope, write_map
from .samples import FoldSample, fold_sample

SCOPES = ("foreground", "crop")
REPORTED_METRICS = {"ece": "ECE", "classwise_ece": "classwise ECE", "ace": "ACE", "nll": "NLL", "brier": "Brier"}
CROSS_VALIDATION_FOLDS = 3


def _in_scope(voxels: LabelledLogits, scope: str) -> LabelledLogits:
    """The voxels of `scope`: all of them ("crop") or those whose label is not background ("foreground")."""
    if scope == "crop":
        return voxels
    foreground = voxels.labels != 0
    return LabelledLogits(voxels.logits[:, foreground], voxels.labels[foreground], voxels.position[foreground])


def _json_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    return {name: json_value(value) for name, value in metrics.items()}


def fit_record(sample: LogitSample, method: str, scope: str, held_out_fraction: float, class_names: list[str],
               fit_scope: FitScope, fitted_on: dict[str, Any]) -> dict[str, Any]:
    """Fit on the sample's fit part in `scope`, measure on its held-out part in both scopes; returns the
    calibration_map.json record (`fitted_on` describes the sample's data)."""
    fit, held_out = sample.split(held_out_fraction)
    fit = _in_scope(fit, scope)
    if fit.num_voxels == 0 or held_out.num_voxels == 0:
        raise ValueError(f"the logit sample of {', '.join(fit_scope.checkpoints)} has too few {scope} voxels to fit "
                         f"and measure on")
    calibration = fit_affine_calibration(fit.logits, fit.labels, method, folds=CROSS_VALIDATION_FOLDS,
                                         fold_ids=fit.fold_ids(CROSS_VALIDATION_FOLDS))
    measured = {}
    for measured_scope in SCOPES:
        part = _in_scope(held_out, measured_scope)
        measured[measured_scope] = {
            "num_voxels": part.num_voxels,
            "before": _json_metrics(logit_calibration_metrics(part.logits, part.labels)),
            "after": _json_metrics(logit_calibration_metrics(part.logits, part.labels, calibration))}
    return {
        "format_version": FORMAT_VERSION,
        "method": method,
        "scope": scope,
        "fit_on": fit_scope.fit_on,
        "checkpoints": fit_scope.checkpoints,
        "fitted_on": fitted_on,
        "class_names": class_names,
        "held_out_fraction": held_out_fraction,
        "num_sample_voxels": sample.num_sampled,
        "num_fit_voxels": fit.num_voxels,
        "calibration": calibration.to_dict(),
        "held_out": measured,
    }


def _samples_fitted_on(samples: list[FoldSample]) -> dict[str, Any]:
    return {"logit_samples": [str(item.path.relative_to(item.fold_folder.parent)) for item in samples]}


def _images_sample(model: TrainedModel, fold_folders: list[Path], images: ImagesRequest, device: str,
                   info: DatasetInfo) -> tuple[LogitSample, dict[str, str], dict[str, Any]]:
    """The sample of the ensemble's logits of the checked calibration set, the SHA-256 of each fold's checkpoint
    it comes from, and what the record says it was fitted on."""
    dataset_json = json.loads((model.folder / DATASET_FILE).read_text())
    calibration_set = check_calibration_set(model, fold_folders, images, dataset_json, info)
    checkpoints = {folder.name: file_sha256(folder / FINAL_CHECKPOINT) for folder in fold_folders}
    sample = ensemble_sample(model, fold_folders, calibration_set, images, device, info)
    return sample, checkpoints, calibration_set.record(fold_folders, images.mirroring)


def _check_options(method: str, scope: str, fit_on: str, images: ImagesRequest | None,
                   revalidate_first: bool) -> None:
    """Refuse options that do not go together, before anything is read."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if fit_on not in FIT_ON:
        raise ValueError(f"--fit-on must be one of {', '.join(FIT_ON)}, got {fit_on!r}")
    if scope == "foreground" and method != "temperature":
        raise ValueError(f"{method} scaling fitted on foreground voxels never sees a background label, so it drives "
                         f"the background logit down everywhere; fit it with --scope crop (the default), which the "
                         f"held-out metrics also report in the foreground scope")
    if fit_on == "images" and (images is None or images.images is None or images.labels is None):
        raise ValueError("--fit-on images fits the map on the ensemble's predictions of a held-out calibration set: "
                         "pass its images and labels with --images DIR --labels DIR")
    if fit_on != "images" and images is not None:
        raise ValueError(f"--images, --labels and --disable_tta give the calibration set of --fit-on images, but "
                         f"--fit-on {fit_on} fits on the folds' validation logit samples: add --fit-on images, or "
                         f"drop those options")
    if fit_on == "images" and revalidate_first:
        raise ValueError("--revalidate runs the folds' validation again for the logit samples of --fit-on fold and "
                         "pooled; --fit-on images predicts the calibration set instead: drop --revalidate")


def fit_model_calibration(model_folder, method: str, folds=None, scope: str = "crop",
                          held_out_fraction: float = 0.2, revalidate_first: bool = False,
                          device: str | None = None, fit_on: str = "fold", images: ImagesRequest | None = None
                          ) -> dict[str, dict[str, Any]]:
    """Fit and record the calibration map of each chosen fold (see the module docstring); returns {fold folder:
    record} (with `fit_on` "pooled" or "images", every fold's record is the one shared map). `images` gives the
    calibration set of `fit_on` "images"."""
    _check_options(method, scope, fit_on, images, revalidate_first)
    model = TrainedModel.load(model_folder)
    fold_folders = model.fold_folders(folds)
    if fit_on == "pooled" and len(fold_folders) < 2:
        raise ValueError(f"--fit-on pooled fits one map on several folds' validation cases, but only "
                         f"{fold_folders[0].name} was chosen: choose the folds you deploy (-f 0 1 2 3 4, or no -f for "
                         f"every trained fold), or fit this fold alone with --fit-on fold")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    info = load_dataset_info(model.folder)
    class_names = info.class_names
    fit = functools.partial(fit_record, method=method, scope=scope, held_out_fraction=held_out_fraction,
                            class_names=class_names)
    if fit_on == "images":
        sample, checkpoints, fitted_on = _images_sample(model, fold_folders, images, device, info)
    else:
        rerun = ["nnunet-margin", "fit-calibration", str(model.folder), "-f", *map(fold_of, fold_folders),
                 "--method", method, "--scope", scope, "--fit-on", fit_on, "--revalidate"]
        samples = [fold_sample(model, fold_folder, revalidate_first, torch.device(device), class_names,
                               shlex.join(rerun)) for fold_folder in fold_folders]
        if fit_on == "fold":
            records = {}
            for item in samples:
                fit_scope = FitScope("fold", {item.fold_folder.name: item.checkpoint_sha256})
                record = fit(item.sample, fit_scope=fit_scope, fitted_on=_samples_fitted_on([item]))
                write_map([item.fold_folder], record)
                records[item.fold_folder.name] = record
            return records
        sample = functools.reduce(LogitSample.merge, [item.sample for item in samples])
        checkpoints = {item.fold_folder.name: item.checkpoint_sha256 for item in samples}
        fitted_on = _samples_fitted_on(samples)
    record = fit(sample, fit_scope=FitScope(fit_on, checkpoints), fitted_on=fitted_on)
    write_map(fold_folders, record)
    return {fold_folder.name: record for fold_folder in fold_folders}


def _before_after(before: float | None, after: float | None) -> str:
    return " -> ".join("n/a" if value is None or not math.isfinite(value) else f"{value:.4f}"
                       for value in (before, after))


def fitted_on_text(record: dict[str, Any]) -> str:
    """The data a record was fitted on, in a few words: the calibration set, or the folds' validation cases."""
    fitted_on = record["fitted_on"]
    if record["fit_on"] != "images":
        return "validation cases (" + ", ".join(fitted_on["logit_samples"]) + ")"
    mirroring = "with" if fitted_on["mirroring"] else "without"
    return (f"{len(fitted_on['cases'])} case(s) of {fitted_on['images']}, labels {fitted_on['labels']}, predicted "
            f"{mirroring} test-time mirroring")


def calibration_table(records: dict[str, dict[str, Any]]) -> str:
    """Markdown table: per map (a fold's, or one shared by several folds) and scope of the held-out voxels, each
    metric before -> after; then a line per map saying what it was fitted on."""
    columns = ["folds", "method", "fit on", "fitted scope", "held-out scope", "voxels", *REPORTED_METRICS.values()]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    maps = {", ".join(record["checkpoints"]): record for record in records.values()}  # a shared map once
    for folds, record in maps.items():
        for scope, measured in record["held_out"].items():
            cells = [folds, record["method"], record["fit_on"], record["scope"], scope,
                     str(measured["num_voxels"])]
            cells += [_before_after(measured["before"][name], measured["after"][name]) for name in REPORTED_METRICS]
            lines.append("| " + " | ".join(cells) + " |")
    lines += [f"{folds}: fitted on {fitted_on_text(record)}" for folds, record in maps.items()]
    return "\n".join(lines) + "\n"

