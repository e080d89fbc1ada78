"""Calibration report of nnU-Net predictions: calibration.json + reliability.png beside nnU-Net's summary.json.

Works on folders written by `nnUNetv2_predict --save_probabilities` and on validation folders written with
`--npz` (CASE.npz with key `probabilities`, CASE.pkl with the properties). Calibration metrics (ECE, MCE, ACE,
classwise ECE and ACE, Brier, NLL; docs/methods.md sections 3 and 5) are reported in three scopes:

* ``foreground``: voxels whose ground truth is not background (and not ignored), inside nnU-Net's crop box
  (the metric the MbLS papers report);
* ``crop``: every non-ignored voxel inside the crop box. nnU-Net exports background = 1.0 outside the box, so
  voxels there would only dilute the metrics;
* ``boundary``: the crop-scope voxels within 3 mm of a ground-truth class boundary (image spacing), where
  segmentation probabilities are uncertain.

Each scope has a pooled value (one accumulator over all voxels) and a mean over cases (the papers' convention).
Per case and foreground class the report also holds nnU-Net's Dice, HD95 and ASD in mm.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import pickle
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import reduce
from operator import add
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._atomic import atomic_path
from ..calibration import CalibrationStats, boundary_scope, plot_reliability_diagram, surface_distances
from ..calibration.boundary import DEFAULT_DISTANCE_MM
from . import _seams

REPORT_FILE = "calibration.json"
PLOT_FILE = "reliability.png"
SCOPES = ("foreground", "crop", "boundary")
_SCALAR_METRICS = ("ece", "mce", "ace", "classwise_ece", "classwise_ace", "brier", "nll")

PathLike = str | os.PathLike


def crop_mask_from_properties(properties: dict, transpose_backward: list[int]) -> np.ndarray:
    """Bool mask of nnU-Net's crop box in the exported (original) orientation.

    nnU-Net transposes, then crops; `bbox_used_for_cropping` ([lo, hi) per axis) and `shape_before_cropping` are in
    transposed coordinates, so the box is drawn there and transposed back with the plans' `transpose_backward`.
    """
    shape = tuple(int(size) for size in properties["shape_before_cropping"])
    bbox = properties["bbox_used_for_cropping"]
    if len(bbox) != len(shape) or sorted(transpose_backward) != list(range(len(shape))):
        raise ValueError(f"crop box {bbox} and transpose_backward {list(transpose_backward)} do not fit "
                         f"shape_before_cropping {shape}")
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(int(low), int(high)) for low, high in bbox)] = True
    return mask.transpose(transpose_backward)


def crop_to_preprocessing_frame(segmentation: np.ndarray, properties: dict, transpose_forward: list[int]
                                ) -> np.ndarray:
    """The ground truth (exported orientation) in the frame of nnU-Net's resampled logits: transposed, then cropped."""
    transposed = segmentation.transpose(transpose_forward)
    cropped = transposed[tuple(slice(int(low), int(high)) for low, high in properties["bbox_used_for_cropping"])]
    expected = tuple(int(size) for size in properties["shape_after_cropping_and_before_resampling"])
    if cropped.shape != expected:
        raise ValueError(f"the ground truth cropped to nnU-Net's box has shape {cropped.shape}, but the prediction "
                         f"has {expected}: is gt_segmentations the one of this dataset?")
    return cropped


def evaluate_logits(logits: np.ndarray | torch.Tensor, segmentation_gt: np.ndarray,
                    boundary: np.ndarray | None = None, ignore_label: int | None = None, n_bins: int = 15,
                    slab_entries: int = 2**22) -> dict[str, CalibrationStats]:
    """`evaluate_case` from logits (K, *spatial) inside the crop box (with the ground truth and boundary scope in the
    same frame): softmax over slabs of the first spatial axis, so the probabilities never exist in full (nnU-Net's
    own export holds only the logits)."""
    logits = torch.as_tensor(logits)
    labels = torch.as_tensor(segmentation_gt)
    if tuple(logits.shape[1:]) != tuple(labels.shape):
        raise ValueError(f"logits shape {tuple(logits.shape)} does not match segmentation shape {tuple(labels.shape)}")
    boundary = None if boundary is None else torch.as_tensor(boundary)
    stats = {scope: CalibrationStats(int(logits.shape[0]), n_bins)
             for scope in (SCOPES if boundary is not None else SCOPES[:2])}
    slab = max(1, slab_entries // max(1, logits[:, 0].numel()))
    for start in range(0, labels.shape[0], slab):
        probabilities = torch.softmax(logits[:, start:start + slab].float(), dim=0)
        part = slice(start, start + slab)
        masks = scope_masks(labels[part], None, ignore_label, None if boundary is None else boundary[part])
        for scope, mask in masks.items():
            stats[scope].update(probabilities, labels[part], mask=mask)
    return stats


def evaluate_case(probabilities: np.ndarray | torch.Tensor, segmentation_gt: np.ndarray | torch.Tensor,
                  crop_mask: np.ndarray | torch.Tensor | None = None, ignore_label: int | None = None,
                  n_bins: int = 15, spacing: Sequence[float] | None = None,
                  boundary_mm: float = DEFAULT_DISTANCE_MM) -> dict[str, CalibrationStats]:
    """Statistics of one case in the scopes "foreground", "crop" and, given the voxel spacing (mm), "boundary" (see
    the module docstring).

    probabilities (K, *spatial); segmentation_gt (*spatial) with class indices (nnU-Net's float reader output is
    accepted if integer-valued); crop_mask (*spatial) bool, None for all voxels.
    """
    device = probabilities.device if isinstance(probabilities, torch.Tensor) else None
    labels = torch.as_tensor(segmentation_gt, device=device)
    if labels.is_floating_point():
        if not torch.equal(labels, labels.round()):
            raise ValueError("segmentation_gt holds non-integer values; pass a label map")
        labels = labels.to(torch.int32)
    if crop_mask is not None:
        crop_mask = torch.as_tensor(crop_mask, device=device)
        if crop_mask.shape != labels.shape:
            raise ValueError(f"crop mask shape {tuple(crop_mask.shape)} does not match segmentation shape "
                             f"{tuple(labels.shape)}")
    boundary = None if spacing is None else torch.as_tensor(
        boundary_scope(labels.cpu().numpy(), spacing, boundary_mm, ignore_label), device=device)
    num_classes = int(probabilities.shape[0])
    return {scope: CalibrationStats(num_classes, n_bins).update(probabilities, labels, mask=mask)
            for scope, mask in scope_masks(labels, crop_mask, ignore_label, boundary).items()}


def scope_masks(labels, crop_mask=None, ignore_label: int | None = None, boundary=None) -> dict:
    """The voxels of each scope (numpy or torch, None for all), all inside the crop box and without the ignore label:
    "foreground" (ground truth not background), "crop" (every voxel) and, given the boundary mask, "boundary"."""
    counted = None if ignore_label is None else labels != ignore_label
    if crop_mask is not None:
        counted = crop_mask if counted is None else counted & crop_mask
    masks = {"foreground": labels != 0 if counted is None else counted & (labels != 0), "crop": counted}
    if boundary is not None:
        masks["boundary"] = boundary if counted is None else counted & boundary
    return masks


def segmentation_metrics(segmentation: np.ndarray, reference: np.ndarray, class_names: list[str],
                         spacing: Sequence[float], ignore_label: int | None = None) -> dict[str, dict[str, float]]:
    """Per foreground class: nnU-Net's Dice, HD95 and ASD in mm ({metric: {class: value}}). Ignored voxels count as
    background in both maps for the surface distances; a class in only one map has no surface distance (NaN here;
    its Dice of 0 shows the miss). nnU-Net's readers return integer-valued floats, which are accepted."""
    labels = list(range(1, len(class_names)))
    segmentation, reference = (np.asarray(array).astype(np.int64) for array in (segmentation, reference))
    dice = _seams.dice_per_label(segmentation, reference, labels, ignore_label)
    if ignore_label is not None:
        ignored = reference == ignore_label
        segmentation, reference = np.where(ignored, 0, segmentation), np.where(ignored, 0, reference)
    distances = surface_distances(segmentation, reference, labels, spacing)
    names = class_names[1:]
    return {"dice": dict(zip(names, dice)),
            **{metric: {name: value if math.isfinite(value) else math.nan for name, value in zip(names, values)}
               for metric, values in distances.items()}}


def json_value(value: Any) -> Any:
    """NaN/inf -> None (strict JSON); lists are converted element-wise."""
    if isinstance(value, list):
        return [json_value(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _json_metrics(stats: CalibrationStats) -> dict[str, Any]:
    return {name: json_value(value) for name, value in stats.compute().items()}


def _nanmean(values: list[float | None]) -> float | None:
    finite = [value for value in values if value is not None]
    return sum(finite) / len(finite) if finite else None


def _mean_over_cases(case_metrics: list[dict[str, Any]], num_classes: int) -> dict[str, Any]:
    """Mean over the cases that have voxels in the scope (cases without any are NaN and skipped)."""
    mean = {name: _nanmean([metrics[name] for metrics in case_metrics]) for name in _SCALAR_METRICS}
    mean["class_ece"] = [_nanmean([metrics["class_ece"][k] for metrics in case_metrics]) for k in range(num_classes)]
    mean["num_cases"] = sum(metrics["num_voxels"] > 0 for metrics in case_metrics)
    return mean


def _segmentation_means(per_case: list[dict[str, dict[str, float | None]]]) -> dict[str, dict[str, float | None]]:
    """{metric: {class: mean over the cases where it is defined}} of the per-case segmentation metrics."""
    metrics = {metric: list(values) for metric, values in per_case[0].items()}
    return {metric: {name: _nanmean([case[metric][name] for case in per_case]) for name in names}
            for metric, names in metrics.items()}


def _dice_from_summary(summary_json: Path, class_names: list[str]) -> dict[str, Any]:
    """Per-class and foreground-mean Dice of nnU-Net's summary.json (keys are label values as strings)."""
    summary = json.loads(summary_json.read_text())
    per_class = {class_names[int(key)]: json_value(metrics.get("Dice"))
                 for key, metrics in summary.get("mean", {}).items() if key.isdigit() and int(key) < len(class_names)}
    return {"source": str(summary_json), "per_class": per_class,
            "foreground_mean": json_value(summary.get("foreground_mean", {}).get("Dice"))}


def write_calibration_report(per_case: dict[str, dict[str, CalibrationStats]], output_folder: PathLike,
                             class_names: list[str], dice_summary_json: PathLike | None = None,
                             segmentation: dict[str, dict[str, dict[str, float]]] | None = None) -> dict[str, Any]:
    """Write `calibration.json` and `reliability.png` (foreground scope, pooled) into output_folder; return the
    report written to calibration.json.

    The report holds per-case metrics per scope and, from `segmentation` ({case: `segmentation_metrics`}), per-case
    Dice, HD95 and ASD per class; a summary per scope (pooled and mean over cases) and of the segmentation metrics
    (mean over cases); the pooled accumulator state (so reports can be merged with `CalibrationStats.from_dict`)
    and, if `dice_summary_json` (nnU-Net's summary.json) exists, its per-class and foreground-mean Dice. Both files
    are written atomically; NaN is written as null.
    """
    if not per_case:
        raise ValueError("no cases to report")
    scopes = list(next(iter(per_case.values())))
    pooled = {scope: reduce(add, (case_stats[scope] for case_stats in per_case.values())) for scope in scopes}
    num_classes = pooled[scopes[0]].num_classes
    if len(class_names) != num_classes:
        raise ValueError(f"got {len(class_names)} class names for {num_classes} probability channels")
    metric_per_case = {case: {scope: _json_metrics(stats) for scope, stats in case_stats.items()}
                       for case, case_stats in per_case.items()}
    summary = {scope: {"pooled": _json_metrics(pooled[scope]),
                       "mean_over_cases": _mean_over_cases([case[scope] for case in metric_per_case.values()],
                                                           num_classes)}
               for scope in scopes}
    if segmentation:
        for case, metrics in segmentation.items():
            metric_per_case[case]["segmentation"] = {metric: {name: json_value(value) for name, value in
                                                              values.items()} for metric, values in metrics.items()}
        summary["segmentation"] = _segmentation_means([metric_per_case[case]["segmentation"]
                                                       for case in segmentation])
    report: dict[str, Any] = {
        "class_names": list(class_names),
        "n_bins": pooled[scopes[0]].n_bins,
        "boundary_mm": DEFAULT_DISTANCE_MM if "boundary" in scopes else None,
        "num_cases": len(per_case),
        "summary": summary,
        "metric_per_case": metric_per_case,
        "pooled_state": {scope: stats.to_dict() for scope, stats in pooled.items()},
    }
    if dice_summary_json is not None and Path(dice_summary_json).is_file():
        report["dice"] = _dice_from_summary(Path(dice_summary_json), list(class_names))

    output_folder = Path(output_folder)
    with atomic_path(output_folder / REPORT_FILE) as temporary, open(temporary, "w") as handle:
        json.dump(report, handle, indent=2, allow_nan=False)
    if "foreground" in pooled:
        plot_reliability_diagram(pooled["foreground"], output_folder / PLOT_FILE, class_names,
                                 title=f"Foreground, {len(per_case)} cases pooled")
    return report


@dataclass(frozen=True)
class DatasetInfo:
    """What evaluating a case needs from dataset.json and plans.json (picklable for worker processes)."""

    file_ending: str
    class_names: list[str]
    label_values: list[int]  # every value allowed in the ground truth, the ignore label included
    ignore_label: int | None
    transpose_backward: list[int]
    reader_class: type


def _find_model_file(pred_folder: Path, name: str) -> Path:
    """dataset.json / plans.json: nnUNetv2_predict writes them into its output folder; a validation folder
    (TRAINER/fold_X/validation) has them two levels up."""
    for folder in (pred_folder, pred_folder.parent, pred_folder.parent.parent):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"no {name} in {pred_folder} or its two parent folders: copy dataset.json and "
                            f"plans.json from the trained model folder (nnUNet_results/DatasetXXX/TRAINER__PLANS__CONF)"
                            f" into {pred_folder}")


def load_dataset_info(pred_folder: Path) -> DatasetInfo:
    from ._seams import PlansManager

    def corrupt(path: Path, error: ValueError) -> ValueError:
        return ValueError(f"{path} is not valid JSON ({error}): it is corrupt or truncated; copy it again from the "
                          f"trained model folder (nnUNet_results/DatasetXXX/TRAINER__PLANS__CONF)")

    dataset_file = _find_model_file(pred_folder, "dataset.json")
    plans_file = _find_model_file(pred_folder, "plans.json")
    try:
        dataset_json = json.loads(dataset_file.read_text())
    except ValueError as error:
        raise corrupt(dataset_file, error) from None
    try:
        plans_manager = PlansManager(str(plans_file))
    except ValueError as error:
        raise corrupt(plans_file, error) from None
    label_manager = plans_manager.get_label_manager(dataset_json)
    if label_manager.has_regions:
        raise ValueError("region-based datasets predict independent sigmoid probabilities, not one categorical "
                         "distribution per voxel; the calibration metrics here need softmax outputs")
    labels = {name: int(value) for name, value in dataset_json["labels"].items() if name != "ignore"}
    class_names = sorted(labels, key=labels.get)
    if sorted(labels.values()) != list(range(len(labels))):
        raise ValueError(f"dataset.json labels must be consecutive integers from 0, got {dataset_json['labels']}")
    ignore_label = label_manager.ignore_label
    return DatasetInfo(
        file_ending=dataset_json["file_ending"],
        class_names=class_names,
        label_values=sorted(labels.values()) + ([] if ignore_label is None else [int(ignore_label)]),
        ignore_label=ignore_label,
        transpose_backward=list(plans_manager.transpose_backward),
        reader_class=plans_manager.image_reader_writer_class,
    )


def load_case_files(npz_file: Path, pkl_file: Path, gt_file: Path, info: DatasetInfo
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Probabilities (K, *spatial), integer ground truth (*spatial) and crop mask of one exported case, checked
    against each other and dataset.json."""
    rewrite = ("rewrite it with nnUNetv2_predict --save_probabilities (a validation folder: nnUNetv2_train DATASET "
               "CONFIGURATION FOLD -tr TRAINER -p PLANS --val --npz)")
    try:
        with np.load(npz_file) as data:
            arrays = {name: data[name] for name in data.files if name == "probabilities"}
            keys = data.files
    except (EOFError, ValueError, zipfile.BadZipFile, zlib.error) as error:
        raise ValueError(f"cannot read {npz_file} ({type(error).__name__}: {error}): it is truncated or corrupt; "
                         f"{rewrite}") from None
    if "probabilities" not in arrays:
        raise ValueError(f"{npz_file} has no 'probabilities' array (keys: {keys}); it is not an nnU-Net probability "
                         f"export")
    probabilities = arrays["probabilities"]
    try:
        with open(pkl_file, "rb") as handle:
            properties = pickle.load(handle)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError,
            KeyError) as error:
        raise ValueError(f"cannot read {pkl_file} ({type(error).__name__}: {error}): it is truncated or corrupt; "
                         f"{rewrite}") from None
    try:
        segmentation, _ = info.reader_class().read_seg(str(gt_file))
    except (RuntimeError, OSError, EOFError, ValueError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"cannot read ground truth {gt_file} ({message}): it is truncated or corrupt; restore it "
                         f"(validation: nnUNet_preprocessed/DatasetXXX/gt_segmentations is copied from labelsTr)"
                         ) from None
    segmentation = segmentation[0]
    if probabilities.shape[0] != len(info.class_names):
        raise ValueError(f"{npz_file} has {probabilities.shape[0]} probability channels but dataset.json lists "
                         f"{len(info.class_names)} labels {info.class_names}")
    if probabilities.shape[1:] != segmentation.shape:
        raise ValueError(f"probabilities shape {probabilities.shape} of {npz_file} does not match ground truth shape "
                         f"{segmentation.shape} of {gt_file}: is the GT folder the one of this dataset?")
    unknown = np.setdiff1d(np.unique(segmentation), info.label_values)
    if unknown.size:
        values = ", ".join(f"{value:g}" for value in unknown)
        raise ValueError(f"ground truth {gt_file} holds values {values} that are not labels of dataset.json "
                         f"({info.label_values}); is the GT folder the one of this dataset?")
    return (probabilities, segmentation.astype(np.int64),
            crop_mask_from_properties(properties, info.transpose_backward))


def _evaluate_files(npz_file: Path, pkl_file: Path, gt_file: Path, info: DatasetInfo
                    ) -> tuple[dict[str, CalibrationStats], dict[str, dict[str, float]] | None]:
    """Calibration statistics of one exported case and, if its segmentation file is there, its segmentation
    metrics."""
    probabilities, labels, crop_mask = load_case_files(npz_file, pkl_file, gt_file, info)
    with open(pkl_file, "rb") as handle:
        spacing = pickle.load(handle)["spacing"]
    stats = evaluate_case(probabilities, labels, crop_mask=crop_mask, ignore_label=info.ignore_label,
                          spacing=spacing)
    segmentation_file = npz_file.with_name(npz_file.name[: -len(".npz")] + info.file_ending)
    if not segmentation_file.is_file():
        return stats, None
    segmentation = info.reader_class().read_seg(str(segmentation_file))[0][0]
    return stats, segmentation_metrics(segmentation, labels, info.class_names, spacing, info.ignore_label)


def calibrate_prediction_folder(pred_folder: PathLike, gt_folder: PathLike, output_folder: PathLike | None = None,
                                num_processes: int = 1) -> dict[str, Any]:
    """Evaluate every CASE.npz/CASE.pkl in pred_folder against gt_folder/CASE<file_ending> and write the report
    (calibration.json, reliability.png) into output_folder (default: pred_folder); returns the report.

    dataset.json and plans.json are taken from pred_folder (or, for a validation folder, the model folder above it)
    for the file ending, labels, reader and transpose. Each case's segmentation (CASE<file_ending>, written by
    nnU-Net beside the .npz) gives Dice, HD95 and ASD; pred_folder/summary.json, if present, adds nnU-Net's
    dataset-level Dice.
    """
    pred_folder, gt_folder = Path(pred_folder), Path(gt_folder)
    for folder, role in ((pred_folder, "prediction"), (gt_folder, "ground truth")):
        if not folder.is_dir():
            raise FileNotFoundError(f"{role} folder {folder} does not exist")
    cases = sorted(path.name[: -len(".npz")] for path in pred_folder.glob("*.npz"))
    if not cases:
        raise FileNotFoundError(f"no .npz probability files in {pred_folder}: run nnUNetv2_predict with "
                                f"--save_probabilities (for validation: nnUNetv2_train ... --val --npz)")
    info = load_dataset_info(pred_folder)
    jobs = []
    for case in cases:
        pkl_file, gt_file = pred_folder / f"{case}.pkl", gt_folder / f"{case}{info.file_ending}"
        if not pkl_file.is_file():
            raise FileNotFoundError(f"{pkl_file} is missing: nnU-Net writes it beside {case}.npz with "
                                    f"--save_probabilities; it holds the crop box needed for the 'crop' scope")
        if not gt_file.is_file():
            raise FileNotFoundError(f"no ground truth {gt_file} for case {case}: pass the folder with the reference "
                                    f"segmentations (labelsTr/labelsTs, or nnUNet_preprocessed/DatasetXXX/"
                                    f"gt_segmentations for validation)")
        jobs.append((pred_folder / f"{case}.npz", pkl_file, gt_file, info))

    if num_processes > 1 and len(jobs) > 1:
        with multiprocessing.get_context("spawn").Pool(min(num_processes, len(jobs))) as pool:
            results = pool.starmap(_evaluate_files, jobs)
    else:
        results = [_evaluate_files(*job) for job in jobs]
    segmentation = {case: metrics for case, (_, metrics) in zip(cases, results) if metrics is not None}
    dice_summary = pred_folder / "summary.json"
    return write_calibration_report({case: stats for case, (stats, _) in zip(cases, results)},
                                    output_folder or pred_folder, info.class_names,
                                    dice_summary if dice_summary.is_file() else None, segmentation)


def summary_lines(report: dict[str, Any]) -> list[str]:
    """One line per scope (the metrics' mean over cases) and per segmentation metric (its mean per class)."""
    lines = [f"{scope} (mean over {summary['mean_over_cases']['num_cases']} cases): "
             + ", ".join(f"{name} {_format(summary['mean_over_cases'][name], missing='n/a')}"
                         for name in _SCALAR_METRICS)
             for scope, summary in report["summary"].items() if scope in SCOPES]
    for metric, per_class in report["summary"].get("segmentation", {}).items():
        lines.append(f"{metric} per class (mean over cases): "
                     + ", ".join(f"{name} {_format(value, missing='n/a')}" for name, value in per_class.items()))
    return lines


def _format(value: Any, missing: str = "") -> str:
    if value is None:
        return missing
    return f"{value:.4f}" if isinstance(value, float) else str(value)
