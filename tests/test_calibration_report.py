"""The calibration report: on hand-made prediction folders (npz + pkl + NIfTI ground truth), and the checks of
`nnunet-margin calibration` (geometry, missing predictions and segmentations, bad probabilities) on the real
nnUNetv2_predict output of the generated dataset."""

from __future__ import annotations

import csv
import io
import json
import math
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunet_margin import cli
from nnunet_margin.calibration import CalibrationStats, boundary_scope, surface_distances, classwise_expected_calibration_error, expected_calibration_error
from nnunet_margin.nnunet.case_evaluation import evaluate_case, segmentation_metrics
from nnunet_margin.nnunet.geometry import crop_mask
from nnunet_margin.nnunet.layout import CropBox, read_summary_dice
from nnunet_margin.nnunet.prediction_folder import calibrate_prediction_folder, expected_cases, write_calibration_report

LABELS = {"background": 0, "organ": 1, "lesion": 2, "ignore": 3}
CLASS_NAMES = ["background", "organ", "lesion"]
IGNORE = 3
ORIGINAL_SHAPE = (6, 7, 8)
TRANSPOSE_FORWARD = [2, 0, 1]
TRANSPOSE_BACKWARD = [1, 2, 0]  # argsort of TRANSPOSE_FORWARD
TRANSPOSED_SHAPE = tuple(ORIGINAL_SHAPE[axis] for axis in TRANSPOSE_FORWARD)  # (8, 6, 7)
BBOX = [[1, 7], [0, 5], [2, 7]]  # half-open, transposed coordinates


def nnunet_crop_mask(bbox=BBOX) -> np.ndarray:
    """What nnU-Net's export does with a crop: paste it into zeros of shape_before_cropping, transpose back."""
    from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image

    crop = np.ones([high - low for low, high in bbox], dtype=bool)
    return insert_crop_into_image(np.zeros(TRANSPOSED_SHAPE, dtype=bool), crop, bbox).transpose(TRANSPOSE_BACKWARD)


def make_case(seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Probabilities (3, *ORIGINAL_SHAPE) with background = 1.0 outside the crop box (as nnU-Net exports them),
    ground truth with labels 0-2 and a few ignore voxels, and the properties nnU-Net pickles."""
    rng = np.random.default_rng(seed)
    crop = nnunet_crop_mask()
    logits = rng.normal(0, 2, (3, *ORIGINAL_SHAPE))
    probabilities = np.exp(logits) / np.exp(logits).sum(0)
    probabilities[:, ~crop] = np.array([1.0, 0.0, 0.0])[:, None]
    gt = np.where(crop, rng.integers(0, 3, ORIGINAL_SHAPE), 0)
    gt[rng.random(ORIGINAL_SHAPE) < 0.05] = IGNORE
    return probabilities.astype(np.float32), gt.astype(np.uint8), nnunet_properties()


def nnunet_properties(bbox=BBOX) -> dict:
    """The properties nnU-Net's preprocessing records for a case of ORIGINAL_SHAPE (crop box in the transposed
    frame) with 1 mm spacing."""
    return {"shape_before_cropping": TRANSPOSED_SHAPE, "bbox_used_for_cropping": bbox,
            "shape_after_cropping_and_before_resampling": tuple(high - low for low, high in bbox),
            "spacing": [1.0, 1.0, 1.0]}


def nnunet_summary(path: Path, dice: dict[int, float], cases) -> Path:
    """A summary.json as nnU-Net's evaluation writes it (save_summary_json), with the given mean Dice per label."""
    from nnunetv2.evaluation.evaluate_predictions import save_summary_json

    per_case = [{"reference_file": f"/gt/{case}.nii.gz", "prediction_file": f"/pred/{case}.nii.gz", "metrics": {}}
                for case in cases]
    foreground = float(np.mean(list(dice.values())))
    save_summary_json({"metric_per_case": per_case, "mean": {label: {"Dice": value} for label, value in dice.items()},
                       "foreground_mean": {"Dice": foreground}}, str(path))
    return path


def write_prediction_folder(folder: Path, gt_folder: Path, cases=("case_000", "case_001", "case_002"),
                            model_folder: Path | None = None) -> dict:
    """What nnUNetv2_predict --save_probabilities writes (npz, pkl, dataset.json, plans.json) plus the GT."""
    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    gt_folder.mkdir(parents=True, exist_ok=True)
    model_folder = model_folder or folder
    model_folder.mkdir(parents=True, exist_ok=True)
    (model_folder / "dataset.json").write_text(json.dumps(
        {"labels": LABELS, "file_ending": ".nii.gz", "channel_names": {"0": "ct"}, "numTraining": len(cases)}))
    (model_folder / "plans.json").write_text(json.dumps(
        {"transpose_forward": TRANSPOSE_FORWARD, "transpose_backward": TRANSPOSE_BACKWARD,
         "image_reader_writer": "SimpleITKIO", "configurations": {}}))
    data = {}
    for seed, case in enumerate(cases):
        probabilities, gt, properties = make_case(seed)
        np.savez_compressed(folder / f"{case}.npz", probabilities=probabilities)
        (folder / f"{case}.pkl").write_bytes(pickle.dumps(properties))
        sitk.WriteImage(sitk.GetImageFromArray(gt), str(gt_folder / f"{case}.nii.gz"))
        data[case] = (probabilities, gt)
    return data


def expected_foreground(probabilities: np.ndarray, gt: np.ndarray) -> dict:
    """Foreground-scope metrics computed on the explicitly selected voxels."""
    selected = nnunet_crop_mask() & (gt != 0) & (gt != IGNORE)
    p, y = probabilities[:, selected], gt[selected]
    return {"ece": expected_calibration_error(p, y), "classwise_ece": classwise_expected_calibration_error(p, y),
            "num_voxels": int(selected.sum())}


def strict_json(path: Path) -> dict:
    def reject(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(path.read_text(), parse_constant=reject)


# --- crop mask and evaluate_case ------------------------------------------------------------------------------------

def test_crop_mask_matches_nnunet_export_and_preprocessing():
    mask = crop_mask(CropBox.from_properties(nnunet_properties()), TRANSPOSE_BACKWARD)
    assert mask.shape == ORIGINAL_SHAPE
    np.testing.assert_array_equal(mask, nnunet_crop_mask())
    # Preprocessing: transpose_forward, then crop. The voxels it keeps are exactly those under the mask.
    volume = np.arange(np.prod(ORIGINAL_SHAPE)).reshape(ORIGINAL_SHAPE)
    kept = volume.transpose(TRANSPOSE_FORWARD)[tuple(slice(low, high) for low, high in BBOX)]
    assert sorted(kept.ravel()) == sorted(volume[mask])


def test_crop_mask_rejects_a_transpose_that_does_not_fit():
    with pytest.raises(ValueError, match="transpose_backward"):
        crop_mask(CropBox.from_properties(nnunet_properties()), [0, 1])
    with pytest.raises(ValueError, match="no valid crop box"):
        CropBox.from_properties({"spacing": [1.0, 1.0, 1.0]})


@pytest.mark.parametrize("use_crop, ignore_label", [(True, IGNORE), (False, IGNORE), (True, None), (False, None)])
@pytest.mark.parametrize("as_torch", [False, True])
def test_evaluate_case_scopes(use_crop, ignore_label, as_torch):
    probabilities, gt, _ = make_case(0)
    if ignore_label is None:
        gt[gt == IGNORE] = 2
    crop = nnunet_crop_mask()
    counted = (crop if use_crop else np.ones_like(crop)) & (gt != IGNORE)
    arguments = (torch.from_numpy(probabilities), torch.from_numpy(gt)) if as_torch else (probabilities, gt)
    result = evaluate_case(*arguments, crop_mask=crop if use_crop else None, ignore_label=ignore_label)

    assert set(result) == {"foreground", "crop"}
    for scope, selected in (("foreground", counted & (gt != 0)), ("crop", counted)):
        metrics = result[scope].compute()
        assert metrics["num_voxels"] == int(selected.sum())
        assert metrics["ece"] == pytest.approx(expected_calibration_error(probabilities[:, selected], gt[selected]),
                                               rel=1e-12)
    if not use_crop:  # the crop scope then also sees the exported background = 1.0 outside the box
        assert result["crop"].num_voxels > int((crop & counted).sum())


def test_evaluate_case_label_maps_from_nnunet_reader():
    probabilities, gt, _ = make_case(1)
    as_float = evaluate_case(probabilities, gt.astype(np.float32), ignore_label=IGNORE)  # nnU-Net reads float32
    as_int = evaluate_case(probabilities, gt, ignore_label=IGNORE)
    assert as_float["foreground"].to_dict() == as_int["foreground"].to_dict()
    with pytest.raises(ValueError, match="non-integer"):
        evaluate_case(probabilities, gt + np.float32(0.5), ignore_label=IGNORE)
    with pytest.raises(ValueError, match=r"crop mask shape \(6, 7\)"):
        evaluate_case(probabilities, gt, crop_mask=np.ones((6, 7), dtype=bool))
    with pytest.raises(ValueError, match="outside"):  # the ignore label is not a class unless declared
        evaluate_case(probabilities, gt)


# --- write_calibration_report ---------------------------------------------------------------------------------------

def _per_case(num_cases: int = 3) -> dict[str, dict[str, CalibrationStats]]:
    per_case = {}
    for seed in range(num_cases):
        probabilities, gt, _ = make_case(seed)
        per_case[f"case_{seed:03d}"] = evaluate_case(probabilities, gt, nnunet_crop_mask(), IGNORE)
    return per_case


def test_write_report_contents(tmp_path):
    per_case = _per_case()
    probabilities, gt, _ = make_case(0)
    per_case["no_foreground"] = evaluate_case(probabilities, np.zeros_like(gt), nnunet_crop_mask(), IGNORE)
    summary_json = nnunet_summary(tmp_path / "summary.json", {1: 0.8, 2: 0.6}, per_case)
    report = write_calibration_report(per_case, tmp_path / "out", CLASS_NAMES,
                                      nnunet_dice=read_summary_dice(summary_json, CLASS_NAMES, ".nii.gz"))

    written = strict_json(tmp_path / "out" / "calibration.json")
    assert written == json.loads(json.dumps(report))
    assert (tmp_path / "out" / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert written["class_names"] == CLASS_NAMES and written["num_cases"] == 4
    assert written["dice"]["per_class"] == {"organ": 0.8, "lesion": 0.6}
    assert written["dice"]["foreground_mean"] == pytest.approx(0.7)
    assert written["coverage"] == {"calibration": sorted(per_case), "segmentation": [],
                                   "nnunet_dice": sorted(per_case)}

    per_case_ece = [expected_foreground(*make_case(seed)[:2])["ece"] for seed in range(3)]
    foreground = written["summary"]["foreground"]
    assert written["metric_per_case"]["no_foreground"]["foreground"]["ece"] is None
    assert foreground["mean_over_cases"]["ece"] == pytest.approx(np.mean(per_case_ece), rel=1e-12)
    assert foreground["mean_over_cases"]["num_cases"] == 3
    pooled_voxels = sum(expected_foreground(*make_case(seed)[:2])["num_voxels"] for seed in range(3))
    assert foreground["pooled"]["num_voxels"] == pooled_voxels
    all_probabilities = np.concatenate([make_case(s)[0].reshape(3, -1) for s in range(3)], axis=1)
    all_gt = np.concatenate([make_case(s)[1].ravel() for s in range(3)])
    selected = np.tile(nnunet_crop_mask().ravel(), 3) & (all_gt != 0) & (all_gt != IGNORE)
    assert foreground["pooled"]["ece"] == pytest.approx(
        expected_calibration_error(all_probabilities[:, selected], all_gt[selected]), rel=1e-12)
    restored = CalibrationStats.from_dict(written["pooled_state"]["crop"])
    assert restored.compute()["ece"] == pytest.approx(written["summary"]["crop"]["pooled"]["ece"], rel=1e-15)


def test_write_report_without_dice(tmp_path):
    report = write_calibration_report(_per_case(1), tmp_path, CLASS_NAMES)
    assert "dice" not in report and "nnunet_dice" not in report["coverage"]
    # nnU-Net writes NaN (non-standard JSON) for a class absent everywhere
    summary_json = nnunet_summary(tmp_path / "summary.json", {1: 0.5, 2: float("nan")}, ["case_000"])
    write_calibration_report(_per_case(1), tmp_path, CLASS_NAMES,
                             nnunet_dice=read_summary_dice(summary_json, CLASS_NAMES, ".nii.gz"))
    assert strict_json(tmp_path / "calibration.json")["dice"]["per_class"] == {"organ": 0.5, "lesion": None}
    with pytest.raises(ValueError, match="2 class names for 3"):
        write_calibration_report(_per_case(1), tmp_path, CLASS_NAMES[:2])
    with pytest.raises(ValueError, match="no cases"):
        write_calibration_report({}, tmp_path, CLASS_NAMES)
    summary_json.write_text('{"mean": ')
    with pytest.raises(ValueError, match="summary.json is not a readable nnU-Net summary"):
        read_summary_dice(summary_json, CLASS_NAMES, ".nii.gz")


def _crash_json(obj, handle, **kwargs):
    handle.write('{"half": ')
    raise RuntimeError("crashed")


def _crash_png(self, path, **kwargs):
    Path(path).write_bytes(b"\x89PNG partial")
    raise RuntimeError("crashed")


@pytest.mark.parametrize("target, name, crash", [
    ("json", "dump", _crash_json),
    ("matplotlib.figure.Figure", "savefig", _crash_png),
])
def test_failed_write_leaves_old_files_intact(tmp_path, monkeypatch, target, name, crash):
    write_calibration_report(_per_case(1), tmp_path, CLASS_NAMES)
    old = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    assert sorted(old) == ["calibration.json", "reliability.png"]

    monkeypatch.setattr(f"{target}.{name}", crash)
    with pytest.raises(RuntimeError, match="crashed"):
        write_calibration_report(_per_case(2), tmp_path, CLASS_NAMES)

    new = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    assert sorted(new) == ["calibration.json", "reliability.png"]  # no temporary file left behind
    crashed_file = "calibration.json" if name == "dump" else "reliability.png"
    assert new[crashed_file] == old[crashed_file]
    strict_json(tmp_path / "calibration.json")


# --- calibrate_prediction_folder ------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_processes", [1, 2])
def test_calibrate_prediction_folder(tmp_path, num_processes):
    data = write_prediction_folder(tmp_path / "pred", tmp_path / "gt")
    import SimpleITK as sitk

    # nnU-Net's segmentations sit beside the npz (they are not cases of their own)
    sitk.WriteImage(sitk.GetImageFromArray(data["case_000"][0].argmax(0).astype(np.uint8)),
                    str(tmp_path / "pred" / "case_000.nii.gz"))
    nnunet_summary(tmp_path / "pred" / "summary.json", {1: 0.4, 2: 0.6}, ["case_000"])
    report = calibrate_prediction_folder(tmp_path / "pred", tmp_path / "gt", tmp_path / "out",
                                         num_processes=num_processes)
    assert strict_json(tmp_path / "out" / "calibration.json") == json.loads(json.dumps(report))
    assert (tmp_path / "out" / "reliability.png").is_file()
    assert report["class_names"] == CLASS_NAMES
    assert report["dice"]["foreground_mean"] == pytest.approx(0.5)
    assert report["coverage"] == {"calibration": sorted(data), "segmentation": ["case_000"],
                                  "nnunet_dice": ["case_000"]}
    for case, (probabilities, gt) in data.items():
        expected = expected_foreground(probabilities, gt)
        metrics = report["metric_per_case"][case]["foreground"]
        assert metrics["num_voxels"] == expected["num_voxels"]
        assert metrics["ece"] == pytest.approx(expected["ece"], rel=1e-12)
        assert metrics["classwise_ece"] == pytest.approx(expected["classwise_ece"], rel=1e-12)
        crop_voxels = int((nnunet_crop_mask() & (gt != IGNORE)).sum())
        assert report["metric_per_case"][case]["crop"]["num_voxels"] == crop_voxels


def test_calibrate_validation_folder_writes_beside_the_predictions(tmp_path):
    trainer = tmp_path / "Trainer__nnUNetPlans__3d_fullres"
    write_prediction_folder(trainer / "fold_0" / "validation", tmp_path / "gt", model_folder=trainer)
    calibrate_prediction_folder(trainer / "fold_0" / "validation", tmp_path / "gt")
    assert (trainer / "fold_0" / "validation" / "calibration.json").is_file()


def test_a_validation_folder_against_gt_segmentations_covers_its_folds_validation_cases(tmp_path):
    """nnU-Net's gt_segmentations hold every training case; a fold's validation folder must hold the fold's
    validation cases (splits_final.json beside it), and only those."""
    validation = tmp_path / "results" / "Trainer__nnUNetPlans__3d_fullres" / "fold_1" / "validation"
    preprocessed = tmp_path / "preprocessed" / "Dataset001_X"
    write_prediction_folder(validation, preprocessed / "gt_segmentations", model_folder=validation.parents[1])
    shutil.copy(validation.parents[1] / "dataset.json", preprocessed)
    shutil.copy(preprocessed / "gt_segmentations" / "case_000.nii.gz", preprocessed / "gt_segmentations" / "t.nii.gz")
    splits = [{"train": [], "val": []}, {"train": ["t"], "val": ["case_000", "case_001", "case_002"]}]
    (preprocessed / "splits_final.json").write_text(json.dumps(splits))
    gt_cases = ["case_000", "case_001", "case_002", "t"]
    assert expected_cases(validation, preprocessed / "gt_segmentations", gt_cases)[0] == gt_cases[:3]
    assert expected_cases(tmp_path, preprocessed / "gt_segmentations", gt_cases)[0] == gt_cases  # not a fold's
    assert sorted(calibrate_prediction_folder(validation, preprocessed / "gt_segmentations")["metric_per_case"]) == \
        gt_cases[:3]
    for path in validation.glob("case_001.*"):
        path.unlink()
    with pytest.raises(FileNotFoundError, match="1 of fold 1's validation cases have no prediction .*: case_001"):
        calibrate_prediction_folder(validation, preprocessed / "gt_segmentations")


def _break_no_npz(pred, gt):
    for npz in pred.glob("*.npz"):
        npz.unlink()


def _break_shape(pred, gt):
    np.savez_compressed(pred / "case_001.npz", probabilities=np.full((3, 6, 8, 7), 1 / 3, dtype=np.float32))


def _break_labels(pred, gt):
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.full(ORIGINAL_SHAPE, 7, dtype=np.uint8)), str(gt / "case_002.nii.gz"))


def _break_channels(pred, gt):
    np.savez_compressed(pred / "case_000.npz", probabilities=np.full((2, *ORIGINAL_SHAPE), 0.5, dtype=np.float32))


def _break_key(pred, gt):
    np.savez_compressed(pred / "case_000.npz", softmax=np.full((3, *ORIGINAL_SHAPE), 1 / 3, dtype=np.float32))


def _break_regions(pred, gt):
    dataset = json.loads((pred / "dataset.json").read_text())
    dataset["labels"] = {"background": 0, "whole": [1, 2], "core": 2}
    dataset["regions_class_order"] = [1, 2]
    (pred / "dataset.json").write_text(json.dumps(dataset))


@pytest.mark.parametrize("break_folder, error, message", [
    (_break_no_npz, FileNotFoundError, "--save_probabilities"),
    (lambda pred, gt: (gt / "case_001.nii.gz").unlink(), FileNotFoundError, "no ground truth .*case_001.nii.gz"),
    (lambda pred, gt: (pred / "case_002.pkl").unlink(), FileNotFoundError, "case_002.pkl is missing"),
    (lambda pred, gt: (pred / "plans.json").unlink(), FileNotFoundError, "no plans.json"),
    (_break_shape, ValueError, r"probabilities shape \(3, 6, 8, 7\).*ground truth shape \(6, 7, 8\)"),
    (_break_labels, ValueError, "values 7 that are not labels"),
    (_break_channels, ValueError, "2 probability channels"),
    (_break_key, ValueError, "no 'probabilities' array"),
    (_break_regions, ValueError, "region-based"),
    (lambda pred, gt: shutil.rmtree(gt), FileNotFoundError, "ground truth folder"),
])
def test_calibrate_prediction_folder_errors(tmp_path, break_folder, error, message):
    write_prediction_folder(tmp_path / "pred", tmp_path / "gt")
    break_folder(tmp_path / "pred", tmp_path / "gt")
    with pytest.raises(error, match=message):
        calibrate_prediction_folder(tmp_path / "pred", tmp_path / "gt")
    assert not (tmp_path / "pred" / "calibration.json").exists()


# --- boundary scope and segmentation metrics ------------------------------------------------------------------------

def test_boundary_scope_with_spacing():
    probabilities, gt, _ = make_case(2)
    spacing = (2.0, 1.0, 0.5)
    result = evaluate_case(probabilities, gt, nnunet_crop_mask(), IGNORE, spacing=spacing, boundary_mm=1.5)
    expected = boundary_scope(gt, spacing, 1.5, IGNORE) & nnunet_crop_mask() & (gt != IGNORE)
    assert 0 < expected.sum() < expected.size
    assert result["boundary"].num_voxels == int(expected.sum())
    assert result["boundary"].compute()["ece"] == pytest.approx(
        expected_calibration_error(probabilities[:, expected], gt[expected]), rel=1e-12)
    assert "boundary" not in evaluate_case(probabilities, gt, nnunet_crop_mask(), IGNORE)  # needs the spacing


def test_segmentation_metrics_are_nnunets_dice_and_the_surface_distances():
    from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn

    _, gt, _ = make_case(0)
    prediction = np.where(np.random.default_rng(5).random(gt.shape) < 0.2, 1, gt).astype(np.float32)  # reader dtype
    prediction[gt == IGNORE] = 2
    spacing = (1.0, 2.0, 3.0)
    metrics = segmentation_metrics(prediction, gt.astype(np.float32), CLASS_NAMES, spacing, IGNORE)
    for label, name in ((1, "organ"), (2, "lesion")):
        tp, fp, fn, _ = compute_tp_fp_fn_tn(gt == label, prediction == label, gt == IGNORE)
        assert metrics["dice"][name] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    counted_prediction = np.where(gt == IGNORE, 0, prediction).astype(np.int64)
    counted_gt = np.where(gt == IGNORE, 0, gt).astype(np.int64)
    distances = surface_distances(counted_prediction, counted_gt, [1, 2], spacing)
    assert [metrics["hd95"][name] for name in ("organ", "lesion")] == distances["hd95"]
    assert [metrics["asd"][name] for name in ("organ", "lesion")] == distances["asd"]
    missed = segmentation_metrics(np.zeros_like(gt), gt, CLASS_NAMES, spacing, IGNORE)
    assert missed["dice"]["organ"] == 0 and math.isnan(missed["hd95"]["organ"])  # missed: no surface distance


def test_prediction_folder_report_has_per_case_segmentation_metrics(tmp_path):
    import SimpleITK as sitk

    data = write_prediction_folder(tmp_path / "pred", tmp_path / "gt")
    for case, (probabilities, gt) in data.items():
        if case != "case_002":  # without a segmentation file a case has calibration metrics only
            sitk.WriteImage(sitk.GetImageFromArray(probabilities.argmax(0).astype(np.uint8)),
                            str(tmp_path / "pred" / f"{case}.nii.gz"))
    report = calibrate_prediction_folder(tmp_path / "pred", tmp_path / "gt")
    assert set(report["metric_per_case"]["case_000"]) == {"foreground", "crop", "boundary", "segmentation"}
    assert "segmentation" not in report["metric_per_case"]["case_002"]
    probabilities, gt = data["case_001"]
    expected = segmentation_metrics(probabilities.argmax(0), gt, CLASS_NAMES, (1.0, 1.0, 1.0), IGNORE)
    assert report["metric_per_case"]["case_001"]["segmentation"]["dice"] == expected["dice"]
    summary = report["summary"]["segmentation"]["hd95"]
    assert set(summary) == {"organ", "lesion"}
    assert math.isfinite(report["summary"]["boundary"]["pooled"]["ace"])


def test_command_line(tmp_path, capsys):
    write_prediction_folder(tmp_path / "pred", tmp_path / "gt")
    assert cli.main(["calibration", str(tmp_path / "pred"), str(tmp_path / "gt"), "-o", str(tmp_path / "out"),
                     "-np", "1"]) == 0
    assert "foreground (mean over 3 cases): ece" in capsys.readouterr().out
    assert (tmp_path / "out" / "calibration.json").is_file()



# --- `nnunet-margin calibration` on real nnUNetv2_predict output (generated dataset, nnUNetTrainer_demo fold 0) ------

def _calibration(predictions: Path, labels: Path, capsys, *extra: str) -> tuple[int, str, str]:
    code = cli.main(["calibration", str(predictions), str(labels), *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture()
def real(shared_test_predictions, shared_models, tmp_path):
    """Copies of the test set's predictions and labels, to be changed by the test."""
    shutil.copytree(shared_test_predictions, tmp_path / "predictions")
    shutil.copytree(shared_models.nnunet.raw / "labelsTs", tmp_path / "labels")
    return tmp_path / "predictions", tmp_path / "labels"


def test_real_predictions_are_reported_with_every_metric_on_every_case(real, capsys):
    predictions, labels = real
    code, out, err = _calibration(predictions, labels, capsys)
    assert code == 0, err
    report = json.loads((predictions / "calibration.json").read_text())
    assert report["coverage"] == {"calibration": ["case_010", "case_011"], "segmentation": ["case_010", "case_011"]}
    assert "warning" not in out and "ground_truth_without_prediction" not in report
    properties = pickle.loads((predictions / "case_010.pkl").read_bytes())
    box = CropBox.from_properties(properties)  # the real properties nnU-Net pickled beside the probabilities
    assert report["metric_per_case"]["case_010"]["crop"]["num_voxels"] <= box.voxels


@pytest.mark.parametrize("change, named", [
    (lambda image: image.SetSpacing((1.0, 1.0, 1.5)), r"spacing \(1.5, 1, 1\) \(prediction: \(1, 1, 1\)\)"),
    (lambda image: image.SetOrigin((0.0, 0.0, 2.0)), r"origin \(0, 0, 2\) \(prediction: \(0, 0, 0\)\)"),
])
def test_ground_truth_on_another_grid_is_refused_naming_the_case_and_the_difference(real, capsys, change, named):
    import SimpleITK as sitk

    predictions, labels = real
    image = sitk.ReadImage(str(labels / "case_011.nii.gz"))
    change(image)
    sitk.WriteImage(image, str(labels / "case_011.nii.gz"))
    (predictions / "case_010.npz").write_bytes(b"")  # read first if the cases were evaluated before the check
    code, _, err = _calibration(predictions, labels, capsys)
    assert code == 2 and "case case_011" in err and re.search(named, err), err
    assert "nnU-Net's tolerance" in err and len(err.strip().splitlines()) <= 2
    assert not (predictions / "calibration.json").exists()


def test_ground_truth_without_prediction_is_refused_or_reported(real, capsys):
    predictions, labels = real
    for path in predictions.glob("case_011.*"):
        path.unlink()
    code, _, err = _calibration(predictions, labels, capsys)
    assert code == 2 and "1 of the ground-truth cases" in err and "case_011" in err and "--allow-missing" in err
    assert not (predictions / "calibration.json").exists()
    code, out, err = _calibration(predictions, labels, capsys, "--allow-missing")
    assert code == 0, err
    report = json.loads((predictions / "calibration.json").read_text())
    assert report["ground_truth_without_prediction"] == ["case_011"] and list(report["metric_per_case"]) == ["case_010"]
    assert "warning: 1 ground-truth case(s) without a prediction are not in the report: case_011" in out


def test_a_missing_segmentation_file_is_reported_per_metric_family(real, capsys):
    predictions, labels = real
    (predictions / "case_011.nii.gz").unlink()
    code, out, err = _calibration(predictions, labels, capsys)
    assert code == 0, err
    report = json.loads((predictions / "calibration.json").read_text())
    assert report["coverage"] == {"calibration": ["case_010", "case_011"], "segmentation": ["case_010"]}
    assert "segmentation" not in report["metric_per_case"]["case_011"]
    assert "warning: Dice, HD95 and ASD cover 1 case(s), the calibration metrics 2; without: case_011" in out


def test_probabilities_that_do_not_sum_to_one_name_the_case_file(real, capsys):
    predictions, labels = real
    npz = predictions / "case_010.npz"
    probabilities = np.load(npz)["probabilities"]
    np.savez_compressed(npz, probabilities=probabilities * np.float32(0.9))
    code, _, err = _calibration(predictions, labels, capsys)
    assert code == 2 and f"{npz}: probabilities sum to 0.9" in err, err
