"""`nnunet-margin predict` end to end on two folds of the session's shared short training: the real command next to
the real `nnUNetv2_predict -f 0 1` (identical segmentations and probabilities), its maps against an independent
computation from each fold's own probabilities (nnU-Net's predictor, one fold at a time), its per-case scores against
a direct computation, its options, and the bad input it refuses before predicting anything; then failure detection:
`nnunet-margin calibration` of its folders against a direct computation from uncertainty.csv and each case's Dice,
and `nnunet-margin compare` of the ensemble, a single fold and a folder of nnUNetv2_predict."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import DATASET_ID
from failure_checks import (aurc_by_orderings, auroc_by_pairs, confidences, excess_aurc_by_orderings,
                            mean_foreground_dice)
from nnunet_margin import cli
from nnunet_margin.calibration.boundary import boundary_scope
from nnunet_margin.nnunet import _seams
from nnunet_margin.nnunet.predict import PredictionRequest, member_names, predict_members

pytestmark = pytest.mark.e2e

TRAINER = "nnUNetTrainer_demo"
CASES = ("case_010", "case_011")
# nnU-Net accumulates each fold's sliding-window logits and their mean in float16: the ensemble's probabilities
# differ from those recomputed from the folds' own probabilities by about 3e-4. Within ~8 voxels of a patch border
# the Gaussian weights underflow float16 and the logits are coarsely quantised, so there any change of float rounding
# (e.g. another number of torch threads) changes them by far more: the maps are compared inside that margin, and only
# loosely at the border.
BORDER = 8


def read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def probabilities(folder: Path, case: str) -> np.ndarray:
    return np.load(folder / f"{case}.npz")["probabilities"].astype(np.float64)


def direct_entropy(p: np.ndarray) -> np.ndarray:
    return -np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(0) / np.log(p.shape[0])


def interior(array: np.ndarray) -> np.ndarray:
    return array[(..., *[slice(BORDER, -BORDER)] * 3)]


def run_cli(*arguments: str) -> int:
    return cli.main(["predict", *arguments, "-device", "cpu", "-npp", "0", "-nps", "0"])


@pytest.fixture(scope="module")
def environment(shared_models):
    """The shared dataset's nnU-Net environment in this process too (for in-process runs of the command), with
    nnU-Net's predictor on one torch thread as in the commands (nnUNet_def_n_proc=1): the same float rounding."""
    from nnunetv2.inference import predict_from_raw_data

    with pytest.MonkeyPatch.context() as patch:
        for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer"):
            patch.setenv(name, shared_models.nnunet.env[name])
        patch.setattr(predict_from_raw_data, "default_num_processes", 1)
        yield shared_models.nnunet


@pytest.fixture(scope="module")
def predicted(shared_models, shared_test_predictions, environment, tmp_path_factory):
    """Folders: `margin` (nnunet-margin predict -f 0 1 with an export worker), `nnunet` (nnUNetv2_predict -f 0 1),
    `one_fold` (nnunet-margin predict -f 0 in this process, the model found by -d -c -tr), and each fold's own
    prediction: folds[0] nnUNetv2_predict -f 0 (the session's shared one), folds[1] nnU-Net's predictor with fold 1
    in this process; all --save_probabilities."""
    model = shared_models.model(TRAINER, ("0", "1"))
    images = environment.raw / "imagesTs"
    root = tmp_path_factory.mktemp("predict")
    common = ("-i", str(images), "-f", "0", "1", "-device", "cpu", "--save_probabilities")
    commands = [("nnunet-margin", "predict", *common, "-o", str(root / "margin"), "-m", str(model), "-npp", "0",
                 "-nps", "1", "--png"),
                ("nnUNetv2_predict", *common, "-o", str(root / "nnunet"), "-d", str(DATASET_ID), "-c", "3d_fullres",
                 "-tr", TRAINER, "-npp", "0", "-nps", "0")]
    with ThreadPoolExecutor(max_workers=2) as pool:
        margin_run, _ = pool.map(lambda command: environment.run(*command), commands)
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model), (1,), "checkpoint_final.pth")
    (root / "fold_1").mkdir()
    predictor.predict_from_files_sequential(str(images), str(root / "fold_1"), save_probabilities=True)
    with contextlib.redirect_stdout(io.StringIO()) as one_fold_output:
        assert run_cli("-i", str(images), "-o", str(root / "one_fold"), "-d", str(DATASET_ID), "-c", "3d_fullres",
                       "-tr", TRAINER, "-f", "0", "--save_probabilities") == 0
    return {"root": root, "model": model, "images": images, "stdout": margin_run.stdout,
            "one_fold_stdout": one_fold_output.getvalue(), "folds": (shared_test_predictions, root / "fold_1")}


def test_segmentations_and_probabilities_are_nnunets_own(predicted):
    margin, nnunet = predicted["root"] / "margin", predicted["root"] / "nnunet"
    for case in CASES:
        np.testing.assert_array_equal(read(margin / f"{case}.nii.gz"), read(nnunet / f"{case}.nii.gz"))
        np.testing.assert_allclose(probabilities(margin, case), probabilities(nnunet, case), atol=1e-6, rtol=0)
        assert (margin / f"{case}.pkl").is_file()
    for name in ("dataset.json", "plans.json"):
        assert json.loads((margin / name).read_text()) == json.loads((nnunet / name).read_text())
    # nnU-Net's tools take every CASE<file_ending> in the folder for a segmentation: only the segmentations are there
    assert sorted(path.name for path in margin.glob("*.nii.gz")) == [f"{case}.nii.gz" for case in CASES]
    assert "predicting 2 of 2 case(s) with 2 member(s) (fold_0, fold_1)" in predicted["stdout"]


def test_maps_equal_an_independent_computation_from_each_folds_probabilities(predicted):
    root = predicted["root"]
    maps = root / "margin" / "uncertainty_maps"
    for case in CASES:
        p0, p1 = (probabilities(folder, case) for folder in predicted["folds"])
        segmentation = read(root / "margin" / f"{case}.nii.gz")
        # the ensemble averages logits: softmax(mean log p) = softmax(mean logits), the log-sum-exp cancelling
        log_mean = (np.log(p0) + np.log(p1)) / 2
        ensemble = np.exp(log_mean - log_mean.max(0))
        ensemble /= ensemble.sum(0)
        entropy = read(maps / f"{case}_entropy.nii.gz")
        assert entropy.dtype == np.float32
        np.testing.assert_allclose(interior(entropy), interior(direct_entropy(ensemble)), atol=2e-3)
        mutual_information = direct_entropy((p0 + p1) / 2) - (direct_entropy(p0) + direct_entropy(p1)) / 2
        spread = np.take_along_axis(np.abs(p0 - p1) / 2, segmentation[None].astype(np.int64), axis=0)[0]
        for name, expected in (("mutual_information", mutual_information), ("std", spread)):
            written = read(maps / f"{case}_{name}.nii.gz")
            np.testing.assert_allclose(interior(written), interior(expected), atol=1e-5)
            np.testing.assert_allclose(written, expected, atol=1e-3)
        assert mutual_information.max() > 1e-3 and spread.max() > 1e-3  # the two folds do disagree somewhere
        reference, written = (sitk.ReadImage(str(root / "margin" / f"{case}.nii.gz")),
                              sitk.ReadImage(str(maps / f"{case}_entropy.nii.gz")))
        assert (written.GetSpacing(), written.GetOrigin(), written.GetDirection()) == \
            (reference.GetSpacing(), reference.GetOrigin(), reference.GetDirection())
        assert (maps / f"{case}.png").read_bytes()[:4] == b"\x89PNG"


def test_scores_equal_a_direct_computation(predicted):
    root = predicted["root"]
    margin, maps = root / "margin", root / "margin" / "uncertainty_maps"
    with open(margin / "uncertainty.csv", newline="") as handle:
        rows = {row["case"]: row for row in csv.DictReader(handle)}
    summary = json.loads((margin / "uncertainty.json").read_text())
    assert summary["members"] == ["fold_0", "fold_1"] and summary["average"] == "logits"
    for case in CASES:
        scores = summary["cases"][case]
        assert scores == json.loads((maps / f"{case}.json").read_text())["scores"]
        assert {name: float(value) for name, value in rows[case].items() if name != "case"} == \
            pytest.approx({name: float("nan") if value is None else value for name, value in scores.items()},
                          nan_ok=True)
        segmentation = read(margin / f"{case}.nii.gz")
        entropy = read(maps / f"{case}_entropy.nii.gz").astype(np.float64)
        mutual_information = read(maps / f"{case}_mutual_information.nii.gz").astype(np.float64)
        spacing = sitk.ReadImage(str(margin / f"{case}.nii.gz")).GetSpacing()[::-1]
        foreground, band = segmentation > 0, boundary_scope(segmentation, spacing, 3.0)
        assert scores["entropy_foreground"] == pytest.approx(entropy[foreground].mean())
        assert scores["entropy_boundary"] == pytest.approx(entropy[band].mean())
        assert scores["mutual_information_foreground"] == pytest.approx(mutual_information[foreground].mean())
        assert scores["mutual_information_boundary"] == pytest.approx(mutual_information[band].mean())
        # the members' segmentations are each fold's own nnU-Net segmentation
        folds = [read(folder / f"{case}.nii.gz") for folder in predicted["folds"]]
        millilitres = np.prod(spacing) / 1000
        dice = []
        for label, name in ((1, "organ"), (2, "lesion"), (3, "rare_spot")):
            first, second = folds[0] == label, folds[1] == label
            size = first.sum() + second.sum()
            dice.append(2 * (first & second).sum() / size if size else 1.0)
            assert scores[f"pairwise_dice_{name}"] == pytest.approx(dice[-1])
            assert scores[f"volume_ml_{name}"] == pytest.approx((segmentation == label).sum() * millilitres)
            assert scores[f"volume_std_ml_{name}"] == pytest.approx(abs(first.sum() - second.sum()) / 2 * millilitres)
        assert scores["pairwise_dice"] == pytest.approx(np.mean(dice))
        uncertain = entropy >= 0.5
        assert scores["uncertain_fraction"] == pytest.approx(uncertain.sum() / (uncertain | foreground).sum())


def test_one_fold_writes_entropy_only(predicted):
    output = predicted["root"] / "one_fold"  # the model found as nnUNetv2_predict finds it (-d -c -tr)
    assert "one member (fold_0)" in predicted["one_fold_stdout"]
    assert sorted(path.name for path in (output / "uncertainty_maps").iterdir()) == \
        sorted(f"{case}{suffix}" for case in CASES for suffix in (".json", "_entropy.nii.gz"))
    fold_0 = predicted["folds"][0]
    for case in CASES:
        np.testing.assert_array_equal(read(output / f"{case}.nii.gz"), read(fold_0 / f"{case}.nii.gz"))
        # one member: the ensemble is the fold itself, so the entropy is the fold's own, everywhere
        np.testing.assert_allclose(read(output / "uncertainty_maps" / f"{case}_entropy.nii.gz"),
                                   direct_entropy(probabilities(fold_0, case)), atol=1e-5)
    header = (output / "uncertainty.csv").read_text().splitlines()[0].split(",")
    assert "entropy_foreground" in header and not [name for name in header if "dice" in name or "mutual" in name]


def test_average_probabilities_is_the_mean_of_the_folds_probabilities(predicted, tmp_path):
    output = tmp_path / "average"
    assert run_cli("-i", str(predicted["images"]), "-o", str(output), "-m", str(predicted["model"]), "-f", "0", "1",
                   "--average", "probabilities", "--maps", "entropy", "--save_probabilities") == 0
    for case in CASES:
        mean = sum(probabilities(folder, case) for folder in predicted["folds"]) / 2
        np.testing.assert_allclose(probabilities(output, case), mean, atol=1e-6)
        segmentation = read(output / f"{case}.nii.gz")
        top_two = np.sort(mean, axis=0)[-2:]
        decided = top_two[1] - top_two[0] > 1e-6  # leave out voxels where float32 rounding may break a tie
        np.testing.assert_array_equal(segmentation[decided], mean.argmax(0)[decided])
        np.testing.assert_allclose(read(output / "uncertainty_maps" / f"{case}_entropy.nii.gz"),
                                   direct_entropy(mean), atol=1e-5)
    assert json.loads((output / "uncertainty.json").read_text())["average"] == "probabilities"


def test_continue_prediction_keeps_finished_cases_and_redoes_others(predicted, tmp_path, capsys):
    output = tmp_path / "continued"
    shutil.copytree(predicted["root"] / "margin", output)
    written = {path: path.stat().st_mtime_ns for path in output.rglob("*") if path.is_file()}
    (output / "uncertainty.csv").unlink()
    arguments = ("-i", str(predicted["images"]), "-o", str(output), "-m", str(predicted["model"]),
                 "--save_probabilities", "--png", "--continue_prediction")
    assert run_cli(*arguments, "-f", "0", "1") == 0
    assert "predicting 0 of 2 case(s)" in capsys.readouterr().out
    assert (output / "uncertainty.csv").read_text() == (predicted["root"] / "margin" / "uncertainty.csv").read_text()
    rewritten = {"uncertainty.csv", "uncertainty.json", "dataset.json", "plans.json"}  # as nnUNetv2_predict does
    assert {path: path.stat().st_mtime_ns for path in written if path.name not in rewritten} == \
        {path: time for path, time in written.items() if path.name not in rewritten}
    # other members: the cases are predicted again
    assert run_cli(*arguments, "-f", "1", "0") == 0
    assert "predicting 2 of 2 case(s)" in capsys.readouterr().out


def test_mirrorings_as_members_average_to_nnunets_mirrored_prediction(predicted, tmp_path):
    """--tta-members' members: each fold's sliding window once per mirroring; their mean equals nnU-Net's own
    test-time mirroring up to float16 rounding. (The demo trainer disables mirroring, so all three axes are enabled
    here by hand.)"""
    predictor = _seams.load_predictor(predicted["model"], ("0",), "checkpoint_final.pth", torch.device("cpu"),
                                      use_mirroring=True)
    predictor.allowed_mirroring_axes = (0, 1, 2)
    assert member_names(predictor, ("0",), tta_members=True)[:2] == ["fold_0/mirror_none", "fold_0/mirror_0"]
    files = _seams.input_case_files(predicted["images"], ".nii.gz")[CASES[0]]
    _, data, properties = next(_seams.preprocessed_cases(predictor, [files], ["unused"], 0))
    request = PredictionRequest(predicted["images"], tmp_path, predicted["model"], ("0",), tta_members=True)
    logits, statistics = predict_members(predictor, data, properties, request, members=8)
    assert statistics.members == len(_seams.mirrorings(predictor)) == 8
    assert statistics.mutual_information().max() > 1e-3  # the mirrorings are members of their own
    nnunet = predictor.predict_logits_from_preprocessed_data(data).float()
    np.testing.assert_allclose(interior(logits), interior(nnunet.numpy()), atol=1e-2)


@pytest.mark.parametrize("writer", ["SimpleITKIO", "NibabelIO", "NibabelIOWithReorient"])
def test_float_maps_keep_their_values_and_the_images_geometry(predicted, tmp_path, writer):
    plans = json.loads((predicted["model"] / "plans.json").read_text())
    plans_manager = _seams.PlansManager({**plans, "image_reader_writer": writer})
    image = predicted["images"] / "case_010_0000.nii.gz"
    data, properties = plans_manager.image_reader_writer_class().read_images([str(image)])
    values = np.random.default_rng(0).uniform(0, 1, data.shape[1:]).astype(np.float32)
    _seams.write_float_map(values, tmp_path / "map.nii.gz", properties, plans_manager)
    read_back, _ = plans_manager.image_reader_writer_class().read_images([str(tmp_path / "map.nii.gz")])
    np.testing.assert_array_equal(read_back[0], values)
    assert _seams.float_map_ending(plans_manager, {"file_ending": ".nii.gz"}) == ".nii.gz"
    png_dataset = _seams.PlansManager({**plans, "image_reader_writer": "NaturalImage2DIO"})
    assert _seams.float_map_ending(png_dataset, {"file_ending": ".png"}) == ".npz"


@pytest.mark.parametrize("problem", ["fold without checkpoint", "maps for one member", "output inside input",
                                     "channels", "mirroring members without mirroring", "no such model"])
def test_bad_input_is_refused_before_any_prediction(predicted, tmp_path, capsys, problem):
    images, model = predicted["images"], str(predicted["model"])
    output = tmp_path / "out"
    arguments = {
        "fold without checkpoint": (["-i", str(images), "-o", str(output), "-m", model, "-f", "0", "3"],
                                    "fold 3 has no checkpoint_final.pth"),
        "maps for one member": (["-i", str(images), "-o", str(output), "-m", model, "-f", "0", "--maps",
                                 "mutual_information"], "needs at least two members"),
        "output inside input": (["-i", str(tmp_path), "-o", str(tmp_path / "predictions"), "-m", model, "-f", "0"],
                                "lies inside the input folder"),
        "channels": (["-i", str(tmp_path / "two_channels"), "-o", str(output), "-m", model, "-f", "0"],
                     "the model was trained on 1 channel(s) (_0000 synthetic)"),
        "mirroring members without mirroring": (["-i", str(images), "-o", str(output), "-m", model, "-f", "0",
                                                 "--tta-members", "--maps", "std"], "no test-time mirroring"),
        "no such model": (["-i", str(images), "-o", str(output), "-d", str(DATASET_ID), "-c", "3d_fullres", "-tr",
                           "nnUNetTrainerNeverTrained"], "has no model of trainer nnUNetTrainerNeverTrained"),
    }
    if problem == "channels":
        (tmp_path / "two_channels").mkdir()
        for channel in ("0000", "0001"):
            shutil.copy(images / "case_010_0000.nii.gz", tmp_path / "two_channels" / f"case_010_{channel}.nii.gz")
    argv, message = arguments[problem]
    assert run_cli(*argv) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") <= 2, error
    assert not output.exists() and not (tmp_path / "predictions").exists()  # nothing predicted, nothing written


# --- failure detection: `nnunet-margin calibration` and `compare` of the folders above -----------------------------

COMPARED = ("ensemble", "fold_0", "nnUNetv2_predict")


@pytest.fixture(scope="module")
def calibrated(predicted, shared_test_predictions, environment):
    """`nnunet-margin calibration` against labelsTs (in this process) of: the ensemble's folder (-f 0 1), the single
    fold's (-f 0) and nnUNetv2_predict's fold 0 (no scores), each into calibration/NAME; `nnunet-margin compare` of
    the three into compare/."""
    root, labels = predicted["root"], environment.raw / "labelsTs"
    printed = {}
    for name, folder in zip(COMPARED, (root / "margin", root / "one_fold", shared_test_predictions)):
        with contextlib.redirect_stdout(io.StringIO()) as output:
            assert cli.main(["calibration", str(folder), str(labels), "-o", str(root / "calibration" / name)]) == 0
        printed[name] = output.getvalue()
    with contextlib.redirect_stdout(io.StringIO()) as output:
        assert cli.main(["compare", *(f"{name}={root / 'calibration' / name}" for name in COMPARED), "-o",
                         str(root / "compare")]) == 0
    return {"calibration": root / "calibration", "labels": labels, "stdout": printed["ensemble"],
            "compare": root / "compare", "compare_stdout": output.getvalue()}


def test_calibration_relates_each_score_to_the_cases_dice(predicted, calibrated):
    """The failure section against uncertainty.csv and each case's Dice counted from the segmentation and labelsTs:
    AURC over every ordering of the cases, the AUROC by counting pairs."""
    for name, folder, scores in (("ensemble", "margin", ("pairwise_dice", "mutual_information_foreground",
                                                          "mutual_information_boundary", "entropy_foreground",
                                                          "entropy_boundary", "uncertain_fraction")),
                                 ("fold_0", "one_fold", ("entropy_foreground", "entropy_boundary",
                                                         "uncertain_fraction"))):
        prediction = predicted["root"] / folder
        with open(prediction / "uncertainty.csv", newline="") as handle:
            rows = {row["case"]: row for row in csv.DictReader(handle)}
        section = json.loads((calibrated["calibration"] / name / "calibration.json").read_text())["failure_detection"]
        dice = [mean_foreground_dice(read(prediction / f"{case}.nii.gz"), read(calibrated["labels"] / f"{case}.nii.gz"),
                                     (1, 2, 3)) for case in CASES]
        assert [section["dice"][case] for case in CASES] == pytest.approx(dice)
        assert list(section["scores"]) == list(scores)
        assert section["num_failed"] == sum(value < 0.5 for value in dice) and section["failure_dice"] == 0.5
        risk = [1 - value for value in dice]
        for score, entry in section["scores"].items():
            values = [float(rows[case][score]) if rows[case][score] else math.nan for case in CASES]
            confidence = confidences(values, entry["failure_when"])
            assert entry["aurc"] == pytest.approx(aurc_by_orderings(confidence, risk))
            assert entry["e_aurc"] == pytest.approx(excess_aurc_by_orderings(confidence, risk), abs=1e-12)
            expected_auroc = auroc_by_pairs(confidence, dice, 0.5)
            assert (entry["auroc"] is None) if math.isnan(expected_auroc) else entry["auroc"] == pytest.approx(
                expected_auroc)
        assert (calibrated["calibration"] / name / "risk_coverage.png").read_bytes()[:4] == b"\x89PNG"
    assert "failure detection (2 cases" in calibrated["stdout"] and "risk_coverage.png" in calibrated["stdout"]
    assert "  pairwise_dice (lower = more likely failed): AURC" in calibrated["stdout"]
    plain = json.loads((calibrated["calibration"] / "nnUNetv2_predict" / "calibration.json").read_text())
    assert "failure_detection" not in plain and not (calibrated["calibration"] / "nnUNetv2_predict" /
                                                     "risk_coverage.png").exists()


def test_compare_shows_each_methods_failure_detection(calibrated):
    rows = {(row["score"], row["method"]): row
            for row in csv.DictReader(io.StringIO((calibrated["compare"] / "failure_detection.csv").read_text()))}
    for name in ("ensemble", "fold_0"):
        section = json.loads((calibrated["calibration"] / name / "calibration.json").read_text())["failure_detection"]
        for score, entry in section["scores"].items():
            row = rows[score, name]
            assert float(row["aurc_value"]) == pytest.approx(entry["aurc"])
            assert float(row["e_aurc_value"]) == pytest.approx(entry["e_aurc"], abs=1e-12)
            assert (row["auroc_value"] == "") if entry["auroc"] is None else float(row["auroc_value"]) == \
                pytest.approx(entry["auroc"])
            assert float(row["aurc_ci_low"]) <= float(row["aurc_ci_high"]) and row["n_cases"] == "2"
            assert f"| {score} | {name} | " in calibrated["compare_stdout"]
    assert rows["pairwise_dice", "fold_0"]["aurc_value"] == "" and rows["pairwise_dice", "nnUNetv2_predict"][
        "n_cases"] == "0"
    assert "- fold_0: no pairwise_dice, mutual_information_foreground" in calibrated["compare_stdout"]
    assert "- nnUNetv2_predict: no confidence scores" in calibrated["compare_stdout"]
    report = (calibrated["compare"] / "report.md").read_text()
    assert "## Failure detection" in report and "### pairwise_dice (lower = more likely failed)" in report
