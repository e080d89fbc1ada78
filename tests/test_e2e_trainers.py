"""End to end through the real nnU-Net commands: plan (session fixture), train a short plugin trainer with final
validation, resume and re-validate, predict. nnUNet_extTrainer is set as the README says (see conftest.py)."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_margin.losses import margin_offsets

pytestmark = pytest.mark.e2e


def read_label(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def assert_calibration_report(validation: Path, num_cases: int) -> dict:
    report = json.loads((validation / "calibration.json").read_text())
    assert (validation / "reliability.png").stat().st_size > 1000
    assert len(report["metric_per_case"]) == num_cases
    for scope in ("foreground", "crop"):
        pooled = report["summary"][scope]["pooled"]
        for metric in ("ece", "mce", "classwise_ece", "brier", "nll"):
            assert math.isfinite(pooled[metric]), (scope, metric, pooled)
        assert 0 <= pooled["ece"] <= pooled["mce"] <= 1
    assert not (validation / ".calibration_cases").exists()
    assert not list(validation.glob("*.npz")), "no probabilities are saved unless --npz is given"
    return report


def predict(nnunet_env, trainer: str, output: Path, *extra: str) -> list[Path]:
    nnunet_env.run("nnUNetv2_predict", "-i", str(nnunet_env.raw / "imagesTs"), "-o", str(output), "-d", "987",
                   "-c", "3d_fullres", "-f", "0", "-tr", trainer, "-device", "cpu", "-npp", "0", "-nps", "0", *extra)
    predictions = sorted(output.glob("*.nii.gz"))
    assert [p.name for p in predictions] == sorted(p.name for p in (nnunet_env.raw / "labelsTs").glob("*.nii.gz"))
    for prediction in predictions:
        assert read_label(prediction).shape == read_label(nnunet_env.raw / "labelsTs" / prediction.name).shape
    return predictions


def test_margin_calibration_train_validate_resume_predict(nnunet_env, tmp_path):
    trainer = "nnUNetTrainerMarginCalib_demo"
    nnunet_env.train(trainer)
    fold = nnunet_env.results(trainer) / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file()

    # the recorded offsets come from the raw labels of the fold's training cases (no crop or resampling here)
    record = json.loads((fold / "margin_offsets.json").read_text())
    train_cases = json.loads((nnunet_env.preprocessed / "splits_final.json").read_text())[0]["train"]
    counts = sum(np.bincount(read_label(nnunet_env.raw / "labelsTr" / f"{case}.nii.gz").ravel(), minlength=4)
                 for case in train_cases)
    assert record["counts"] == counts.tolist()
    expected = margin_offsets(counts, tau=10.0, upsilon=1.0)
    np.testing.assert_allclose(record["rho_0k"], expected.rho_0k.numpy(), rtol=1e-12)
    np.testing.assert_allclose(record["rho_k0"], expected.rho_k0.numpy(), rtol=1e-12)
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["nnunet_margin"]["margin_record"] == record
    torch.testing.assert_close(checkpoint["nnunet_margin"]["loss_state"]["loss.terms.margin_calibration.rho_0k"],
                               torch.tensor(record["rho_0k"], dtype=torch.float64))
    assert checkpoint["trainer_name"] == trainer
    assert (nnunet_env.preprocessed / "nnunet_margin_label_counts_nnUNetPlans_3d_fullres.json").is_file()

    report = assert_calibration_report(fold / "validation", num_cases=2)
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    assert report["dice"]["foreground_mean"] == pytest.approx(summary["foreground_mean"]["Dice"])

    # Change the split so that fresh label statistics would differ (--c) or fail (--val: a training case without a
    # preprocessed file): both keep the recorded offsets and never recount.
    splits_file = nnunet_env.preprocessed / "splits_final.json"
    original_splits = splits_file.read_text()
    try:
        for extra, train_cases in ((["--val"], train_cases[:4] + ["case_not_preprocessed"]),
                                   (["--c"], train_cases[:4])):
            splits = json.loads(original_splits)
            splits[0]["train"] = train_cases
            splits_file.write_text(json.dumps(splits))
            result = nnunet_env.train(trainer, "0", *extra)
            assert "Using the margin offsets recorded with the checkpoint" in result.stdout
            assert json.loads((fold / "margin_offsets.json").read_text()) == record
            assert_calibration_report(fold / "validation", num_cases=2)
    finally:
        splits_file.write_text(original_splits)

    predict(nnunet_env, trainer, tmp_path / "predicted")


def test_mbls_train_logs_penalty_share_and_predicts(nnunet_env, tmp_path):
    trainer = "nnUNetTrainerMbLSDice_demo"
    nnunet_env.train(trainer)
    fold = nnunet_env.results(trainer) / "fold_0"
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert "loss parts: mbls_ce" in log and "mbls_penalty" in log and "dice" in log
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    logged = checkpoint["logging"]
    for key in ("train_loss_part_mbls_ce", "train_loss_part_mbls_penalty", "train_loss_part_dice"):
        assert len(logged[key]) == len(logged["train_losses"]) == 1
    # the parts add up to nnU-Net's logged training loss
    parts = sum(logged[key][0] for key in ("train_loss_part_mbls_ce", "train_loss_part_mbls_penalty",
                                          "train_loss_part_dice"))
    assert parts == pytest.approx(logged["train_losses"][0], rel=1e-5)
    assert_calibration_report(fold / "validation", num_cases=2)
    predict(nnunet_env, trainer, tmp_path / "predicted")


def test_calibration_cli_on_nnunet_own_trainer(shared_models, shared_test_predictions, tmp_path):
    """A model trained with nnU-Net's own trainer, predicted with --save_probabilities, reported by the CLI; then
    fit-calibration on a copy of the model (the session's shared training and prediction, read-only)."""
    nnunet = shared_models.nnunet
    output = Path(shutil.copytree(shared_test_predictions, tmp_path / "predicted"))
    result = nnunet.run("nnunet-margin", "calibration", str(output), str(nnunet.raw / "labelsTs"))
    assert "ece" in result.stdout.lower()
    report = json.loads((output / "calibration.json").read_text())
    assert set(report["metric_per_case"]) == {"case_010", "case_011"}
    assert (output / "reliability.png").is_file()

    compared = nnunet.run("nnunet-margin", "compare", str(output))
    assert "ECE" in compared.stdout

    # fit-calibration runs the validation of nnU-Net's own trainer again, with the calibration hook
    trainer = "nnUNetTrainer_demo"
    shared = shared_models.model(trainer, ("0",))
    results = tmp_path / "results"
    model = Path(shutil.copytree(shared, results / shared.parent.name / shared.name))
    assert not (model / "fold_0" / "validation" / "logit_sample.nnunet_margin").exists()
    fitted = nnunet.run("nnunet-margin", "fit-calibration", str(model), "--method", "vector", "-device", "cpu",
                        nnUNet_results=str(results))
    assert "running nnU-Net's validation again with the calibration hook" in fitted.stdout
    record = json.loads((model / "fold_0" / "calibration_map.json").read_text())
    assert record["calibration"]["method"] == "vector" and record["held_out"]["crop"]["num_voxels"] > 0
    assert (model / "fold_0" / "validation" / "calibration.json").is_file()
    checkpoint = torch.load(model / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == trainer  # the model itself is unchanged
    assert not (shared / "fold_0" / "calibration_map.json").exists()  # the shared model was not touched


def test_region_datasets_are_refused_before_training(nnunet_env, tmp_path):
    script = (
        "import json, torch\n"
        "from nnunet_margin.trainers import nnUNetTrainerMbLS\n"
        f"plans = json.load(open({str(nnunet_env.preprocessed / 'nnUNetPlans.json')!r}))\n"
        "plans['continue_training'] = False\n"
        f"dataset = json.load(open({str(nnunet_env.preprocessed / 'dataset.json')!r}))\n"
        "dataset['labels'] = {'background': 0, 'organ': [1, 2, 3], 'lesion': [2, 3]}\n"
        "dataset['regions_class_order'] = [1, 2]\n"
        "trainer = nnUNetTrainerMbLS(plans, '3d_fullres', 0, dataset, torch.device('cpu'))\n"
        "trainer.initialize()\n"
    )
    result = nnunet_env.run("python", "-c", script, check=False, nnUNet_results=str(tmp_path))
    assert result.returncode != 0
    assert "needs label-based (softmax) training, but dataset.json defines regions" in result.stderr
