"""The calibration report of an nnU-Net prediction folder: reading the folder, writing calibration.json and
reliability.png.

Works on folders written by `nnUNetv2_predict --save_probabilities` and on validation folders written with `--npz`
(per case CASE.npz, CASE.pkl and the segmentation CASE<file_ending>; `layout.ExportedFiles`), against a folder of
ground truths (CASE<file_ending>). Before anything is evaluated, every predicted case needs its ground truth, and
every expected ground-truth case its prediction (the fold's validation cases for a fold's validation folder against
nnUNet_preprocessed/DATASET/gt_segmentations, else every case of the ground-truth folder). Each case's ground truth
must lie on the prediction's image grid: shape, and spacing, origin and direction (or affine) within nnU-Net's own
tolerance. The report is `calibration_report.build_report`'s; both files are written atomically. A folder written by
`nnunet-margin predict` (with its per-case confidence scores, uncertainty.json) also gets the report's failure-detection
section and risk_coverage.png (`failure_report`).
"""

from __future__ import annotations

import json
import multiprocessing
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._atomic import atomic_path
from ..calibration import CalibrationStats, plot_reliability_diagram
from ..comparison.failure_detection import DEFAULT_FAILURE_DICE, check_failure_dice
from . import _seams, failure_report, layout
from .calibration_report import PLOT_FILE, REPORT_FILE, build_report
from .case_evaluation import evaluate_case, segmentation_metrics
from .geometry import crop_mask, geometry_differences

PathLike = str | os.PathLike


def write_calibration_report(per_case: dict[str, dict[str, CalibrationStats]], output_folder: PathLike,
                             class_names: list[str],
                             segmentation: dict[str, dict[str, dict[str, float]]] | None = None,
                             nnunet_dice: dict[str, Any] | None = None, missing_predictions: list[str] = (),
                             failure_detection: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write `calibration.json` (`build_report` of the arguments), `reliability.png` (foreground scope, pooled) and
    with a failure-detection section `risk_coverage.png` (else remove one) into output_folder, atomically; returns
    the report."""
    report = build_report(per_case, class_names, segmentation, nnunet_dice, missing_predictions, failure_detection)
    output_folder = Path(output_folder)
    with atomic_path(output_folder / REPORT_FILE) as temporary, open(temporary, "w") as handle:
        json.dump(report, handle, indent=2, allow_nan=False)
    if "foreground" in report["pooled_state"]:
        plot_reliability_diagram(CalibrationStats.from_dict(report["pooled_state"]["foreground"]),
                                 output_folder / PLOT_FILE, class_names,
                                 title=f"Foreground, {len(per_case)} cases pooled")
    if failure_detection is None:  # a figure of an earlier report of other predictions would pass for this one's
        (output_folder / failure_report.FIGURE_FILE).unlink(missing_ok=True)
    else:
        failure_report.write_risk_coverage(failure_detection, output_folder)
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
    raise FileNotFoundError(f"no {name} in {pred_folder} or its two parent folders: copy {layout.DATASET_FILE} and "
                            f"{layout.PLANS_FILE} from the trained model folder (nnUNet_results/DatasetXXX/"
                            f"TRAINER__PLANS__CONF) into {pred_folder}")


def load_dataset_info(pred_folder: Path) -> DatasetInfo:
    def corrupt(path: Path, error: ValueError) -> ValueError:
        return ValueError(f"{path} is not valid JSON ({error}): it is corrupt or truncated; copy it again from the "
                          f"trained model folder (nnUNet_results/DatasetXXX/TRAINER__PLANS__CONF)")

    dataset_file = _find_model_file(pred_folder, layout.DATASET_FILE)
    plans_file = _find_model_file(pred_folder, layout.PLANS_FILE)
    try:
        dataset_json = json.loads(dataset_file.read_text())
    except ValueError as error:
        raise corrupt(dataset_file, error) from None
    try:
        plans_manager = _seams.PlansManager(str(plans_file))
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


@dataclass
class LoadedCase:
    """One exported case with its ground truth, checked against each other and dataset.json."""

    probabilities: np.ndarray  # (K, *spatial)
    labels: np.ndarray  # (*spatial) int64, the ground truth
    crop_mask: np.ndarray  # (*spatial) bool, nnU-Net's crop box
    properties: dict[str, Any]  # of the prediction (CASE.pkl)


def read_ground_truth(gt_file: Path, info: DatasetInfo) -> tuple[np.ndarray, dict[str, Any]]:
    """A ground truth (*spatial) as nnU-Net's reader returns it, and the reader's properties."""
    try:
        segmentation, properties = info.reader_class().read_seg(str(gt_file))
    except (RuntimeError, OSError, EOFError, ValueError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"cannot read ground truth {gt_file} ({message}): it is truncated or corrupt; restore it "
                         f"(validation: nnUNet_preprocessed/DatasetXXX/gt_segmentations is copied from labelsTr)"
                         ) from None
    return segmentation[0], properties


def check_label_values(segmentation: np.ndarray, gt_file: Path, info: DatasetInfo) -> None:
    """Refuse a ground truth holding values that are not labels of dataset.json."""
    unknown = np.setdiff1d(np.unique(segmentation), info.label_values)
    if unknown.size:
        values = ", ".join(f"{value:g}" for value in unknown)
        raise ValueError(f"ground truth {gt_file} holds values {values} that are not labels of dataset.json "
                         f"({info.label_values}); is the GT folder the one of this dataset?")


def load_case_files(npz_file: Path, pkl_file: Path, gt_file: Path, info: DatasetInfo) -> LoadedCase:
    """Probabilities, integer ground truth and crop mask of one exported case, with both properties, checked against
    each other and dataset.json."""
    probabilities = layout.read_probabilities(npz_file)
    properties = layout.read_properties(pkl_file)
    segmentation = read_ground_truth(gt_file, info)[0]
    if probabilities.shape[0] != len(info.class_names):
        raise ValueError(f"{npz_file} has {probabilities.shape[0]} probability channels but dataset.json lists "
                         f"{len(info.class_names)} labels {info.class_names}")
    if probabilities.shape[1:] != segmentation.shape:
        raise ValueError(f"probabilities shape {probabilities.shape} of {npz_file} does not match ground truth shape "
                         f"{segmentation.shape} of {gt_file}: is the GT folder the one of this dataset?")
    check_label_values(segmentation, gt_file, info)
    try:
        mask = crop_mask(layout.CropBox.from_properties(properties), info.transpose_backward)
    except ValueError as error:
        raise ValueError(f"{pkl_file}: {error}") from None
    return LoadedCase(probabilities, segmentation.astype(np.int64), mask, properties)


def _evaluate_files(files: layout.ExportedFiles, gt_file: Path, info: DatasetInfo
                    ) -> tuple[dict[str, CalibrationStats], dict[str, dict[str, float]] | None]:
    """Calibration statistics of one exported case and, if its segmentation file is there, its segmentation
    metrics (its geometry is checked before, by `check_ground_truth_grids`)."""
    case = load_case_files(files.probabilities, files.properties, gt_file, info)
    spacing = layout.spacing(case.properties)
    try:
        stats = evaluate_case(case.probabilities, case.labels, crop_mask=case.crop_mask,
                              ignore_label=info.ignore_label, spacing=spacing)
    except ValueError as error:
        raise ValueError(f"{files.probabilities}: {error}") from None
    if not files.segmentation.is_file():
        return stats, None
    segmentation = info.reader_class().read_seg(str(files.segmentation))[0][0]
    if segmentation.shape != case.labels.shape:
        raise ValueError(f"segmentation {files.segmentation} has shape {segmentation.shape}, its ground truth "
                         f"{gt_file} {case.labels.shape}: rewrite the prediction folder with nnUNetv2_predict")
    return stats, segmentation_metrics(segmentation, case.labels, info.class_names, spacing, info.ignore_label)


def check_ground_truth_grids(jobs: list[tuple[layout.ExportedFiles, Path, DatasetInfo]]) -> None:
    """Refuse, before any case is evaluated, a ground truth on another image grid than its prediction (the
    properties nnU-Net exported with the prediction against those of nnU-Net's reader of the ground truth)."""
    for files, gt_file, info in jobs:
        differences = geometry_differences(layout.read_properties(files.properties),
                                           read_ground_truth(gt_file, info)[1])
        if differences:
            raise ValueError(f"case {files.case}: its ground truth {gt_file} lies on another image grid than the "
                             f"prediction ({'; '.join(differences)}), beyond nnU-Net's tolerance (np.allclose): pass "
                             f"the ground truth of the predicted images")


def expected_cases(pred_folder: Path, gt_folder: Path, gt_cases: list[str]) -> tuple[list[str], str]:
    """The ground-truth cases a prediction folder must cover, and what they are (for messages): the fold's
    validation cases for a fold's validation folder against nnU-Net's gt_segmentations, else every case of the
    ground-truth folder."""
    fold = layout.validation_fold(pred_folder)
    if fold is not None and layout.is_gt_segmentations_folder(gt_folder):
        validation_cases = _seams.fold_cases(gt_folder.resolve().parent, gt_cases, fold)[1]
        return sorted(set(validation_cases) & set(gt_cases)), f"fold {fold}'s validation cases"
    return gt_cases, f"the ground-truth cases of {gt_folder}"


def calibrate_prediction_folder(pred_folder: PathLike, gt_folder: PathLike, output_folder: PathLike | None = None,
                                num_processes: int = 1, allow_missing: bool = False,
                                failure_dice: float = DEFAULT_FAILURE_DICE) -> dict[str, Any]:
    """Evaluate every case of pred_folder against gt_folder/CASE<file_ending> and write the report
    (calibration.json, reliability.png; risk_coverage.png for a folder of `nnunet-margin predict`) into output_folder
    (default: pred_folder); returns the report.

    dataset.json and plans.json are taken from pred_folder (or, for a validation folder, the model folder above it)
    for the file ending, labels, reader and transpose. Each case's segmentation gives Dice, HD95 and ASD;
    pred_folder/summary.json, if present, adds nnU-Net's Dice. Expected ground-truth cases without a prediction are
    refused, or with `allow_missing` listed in the report (see the module docstring). With uncertainty.json, cases
    whose mean foreground Dice is below `failure_dice` count as failed.
    """
    check_failure_dice(failure_dice)
    pred_folder, gt_folder = Path(pred_folder), Path(gt_folder)
    for folder, role in ((pred_folder, "prediction"), (gt_folder, "ground truth")):
        if not folder.is_dir():
            raise FileNotFoundError(f"{role} folder {folder} does not exist")
    cases = layout.probability_cases(pred_folder)
    scores = failure_report.read_prediction_scores(pred_folder)
    if not cases:
        raise FileNotFoundError(f"no {layout.PROBABILITIES_SUFFIX} probability files in {pred_folder}: run "
                                f"{'nnunet-margin predict' if scores else 'nnUNetv2_predict'} with "
                                f"--save_probabilities (for validation: nnUNetv2_train ... --val --npz)")
    info = load_dataset_info(pred_folder)
    expected, which = expected_cases(pred_folder, gt_folder, layout.cases_with_suffix(gt_folder, info.file_ending))
    missing = sorted(set(expected) - set(cases))
    if missing and not allow_missing:
        raise FileNotFoundError(f"{len(missing)} of {which} have no prediction in {pred_folder}: "
                                f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; predict them, or pass "
                                f"--allow-missing to report the predicted cases only (the report then lists these)")
    jobs = []
    for case in cases:
        files = layout.ExportedFiles.of(pred_folder, case, info.file_ending)
        gt_file = gt_folder / f"{case}{info.file_ending}"
        if not files.properties.is_file():
            raise FileNotFoundError(f"{files.properties} is missing: nnU-Net writes it beside "
                                    f"{files.probabilities.name} with --save_probabilities; it holds the crop box "
                                    f"needed for the 'crop' scope")
        if not gt_file.is_file():
            raise FileNotFoundError(f"no ground truth {gt_file} for case {case}: pass the folder with the reference "
                                    f"segmentations (labelsTr/labelsTs, or nnUNet_preprocessed/DatasetXXX/"
                                    f"gt_segmentations for validation)")
        jobs.append((files, gt_file, info))
    check_ground_truth_grids(jobs)
    if scores is not None:
        failure_report.check_scored_cases(scores, {files.case: files.segmentation for files, _, _ in jobs},
                                          pred_folder)

    if num_processes > 1 and len(jobs) > 1:
        with multiprocessing.get_context("spawn").Pool(min(num_processes, len(jobs))) as pool:
            results = pool.starmap(_evaluate_files, jobs)
    else:
        results = [_evaluate_files(*job) for job in jobs]
    segmentation = {case: metrics for case, (_, metrics) in zip(cases, results) if metrics is not None}
    summary_file = pred_folder / layout.SUMMARY_FILE
    nnunet_dice = layout.read_summary_dice(summary_file, info.class_names, info.file_ending) \
        if summary_file.is_file() else None
    failure = None if scores is None else failure_report.failure_section(scores, segmentation, failure_dice,
                                                                         pred_folder)
    return write_calibration_report({case: stats for case, (stats, _) in zip(cases, results)},
                                    output_folder or pred_folder, info.class_names, segmentation, nnunet_dice,
                                    missing, failure)
