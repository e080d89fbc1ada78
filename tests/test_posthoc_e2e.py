"""End to end: a post-hoc map pooled over two folds of a plugin model (`fit-calibration --fit-on pooled`), exported
and predicted by plain nnU-Net as the fold ensemble, and the checks an export makes of the folds' maps: one scope,
one fit, the folds it was fitted for, their current checkpoints (docs/methods.md 6).

The model is the session's shared two-fold training of nnUNetTrainerWithCalibration_demo (read-only: copied first).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from nnunet_margin import cli
from nnunet_margin.calibration.affine import AffineCalibration, fit_affine_calibration, logit_calibration_metrics
from nnunet_margin.calibration.logit_sample import LogitSample
from nnunet_margin.nnunet.provenance import file_sha256

from conftest import DATASET_ID, DATASET_NAME
from portable_checks import (PREDICT_FLAGS, assert_close_to_float16_accumulation, interior, plugin_logits,
                             read_prediction, retrain, run_plain_nnunet)

pytestmark = pytest.mark.e2e

TRAINER = "nnUNetTrainerWithCalibration_demo"
SAMPLE = Path("validation") / "logit_sample.nnunet_margin"


@pytest.fixture(scope="module")
def env(shared_models):
    """The shared dataset's environment, also in os.environ for the in-process calls (nnU-Net's predictor looks the
    trainer up by name)."""
    with pytest.MonkeyPatch.context() as patch:
        for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer"):
            patch.setenv(name, shared_models.nnunet.env[name])
        yield shared_models.nnunet


def copy_model(model: Path, root: Path) -> Path:
    """A copy of the model (modification times kept) in a results root of its own."""
    return Path(shutil.copytree(model, root / DATASET_NAME / model.name))


def map_record(model: Path, fold: str) -> dict:
    return json.loads((model / f"fold_{fold}" / "calibration_map.json").read_text())


@pytest.fixture(scope="module")
def pooled(env, shared_models, tmp_path_factory) -> Path:
    """A copy of the two-fold model with one vector-scaling map pooled over both folds, fitted by the command."""
    model = copy_model(shared_models.model(TRAINER, ("0", "1")), tmp_path_factory.mktemp("pooled"))
    assert cli.main(["fit-calibration", str(model), "--method", "vector", "--fit-on", "pooled"]) == 0
    return model


def test_a_pooled_map_is_one_fit_on_the_concatenated_fold_samples(pooled):
    record = map_record(pooled, "0")
    assert record == map_record(pooled, "1")  # one map, recorded in both folds
    assert record["fit_on"] == "pooled" and record["fitted_on"]["logit_samples"] == [
        str(Path(f"fold_{fold}") / SAMPLE) for fold in "01"]
    assert record["checkpoints"] == {f"fold_{fold}": file_sha256(pooled / f"fold_{fold}" / "checkpoint_final.pth")
                                     for fold in "01"}

    parts = [LogitSample.load(pooled / f"fold_{fold}" / SAMPLE).split(record["held_out_fraction"]) for fold in "01"]
    fit_logits = torch.cat([fit.logits for fit, _ in parts], dim=1)
    fit_labels = torch.cat([fit.labels for fit, _ in parts])
    assert record["num_fit_voxels"] == fit_labels.numel() and record["num_sample_voxels"] == sum(
        fit.num_voxels + held_out.num_voxels for fit, held_out in parts)
    expected = fit_affine_calibration(fit_logits, fit_labels, "vector")
    calibration = AffineCalibration.from_dict(record["calibration"])
    torch.testing.assert_close(calibration.weight, expected.weight, rtol=0, atol=1e-8)
    torch.testing.assert_close(calibration.bias, expected.bias, rtol=0, atol=1e-8)
    held_out_logits = torch.cat([held_out.logits for _, held_out in parts], dim=1)
    held_out_labels = torch.cat([held_out.labels for _, held_out in parts])
    for moment, applied in (("before", None), ("after", expected)):
        metrics = logit_calibration_metrics(held_out_logits, held_out_labels, applied)
        assert record["held_out"]["crop"][moment]["nll"] == pytest.approx(metrics["nll"], rel=1e-9)


def test_plain_nnunet_ensemble_of_the_export_is_the_pooled_map_of_the_mean_logits(env, pooled, tmp_path, capsys):
    out = tmp_path / "portable"
    assert cli.main(["export-portable", str(pooled), str(out), "--calibration", "--name", "pooled_vector"]) == 0
    exported = out / DATASET_NAME / "pooled_vector__nnUNetPlans__3d_fullres"
    info = json.loads((exported / "export_info.json").read_text())
    assert info["calibration_fit_on"] == "pooled" and info["calibration_checkpoints"] == map_record(pooled, "0")[
        "checkpoints"]

    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(sorted((env.raw / "imagesTs").iterdir())[0], images)
    prediction = tmp_path / "prediction"
    run_plain_nnunet(env, "nnUNetv2_predict", "-i", str(images), "-o", str(prediction), "-d", str(DATASET_ID),
                     "-c", "3d_fullres", "-f", "0", "1", "-tr", "pooled_vector", *PREDICT_FLAGS,
                     nnUNet_results=str(out))
    _, probabilities = read_prediction(prediction, next(prediction.glob("*.npz")).stem)
    mean_logits = plugin_logits(pooled, images, folds=(0, 1))
    calibration = AffineCalibration.from_dict(map_record(pooled, "0")["calibration"])
    expected = torch.softmax(calibration.apply(mean_logits), dim=0).numpy()
    assert_close_to_float16_accumulation(probabilities, expected)
    inside = interior(probabilities.shape[1:])
    assert np.abs(probabilities - torch.softmax(mean_logits, dim=0).numpy())[:, inside].max() > 0.01


def export_error(model: Path, out: Path, capsys, *arguments: str) -> str:
    """The one-line error of a refused `export-portable --calibration` (nothing written)."""
    capsys.readouterr()
    assert cli.main(["export-portable", str(model), str(out), "--calibration", *arguments]) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and not out.exists(), error
    return error


def test_export_refuses_maps_of_mixed_scopes_other_folds_other_fits_or_other_checkpoints(env, pooled, tmp_path,
                                                                                        capsys):
    model = copy_model(pooled, tmp_path / "results")
    out = tmp_path / "portable"
    refit = f"nnunet-margin fit-calibration {model} -f 0 1 --method vector --fit-on pooled"

    error = export_error(model, out, capsys, "-f", "1")  # the pooled map belongs to the ensemble of folds 0 and 1
    assert "one map pooled over folds 0, 1" in error and "export with -f 0 1" in error
    assert f"nnunet-margin fit-calibration {model} -f 1 --method vector --fit-on fold" in error

    assert cli.main(["fit-calibration", str(model), "-f", "0", "--method", "temperature"]) == 0
    assert map_record(model, "0")["fit_on"] == "fold" and map_record(model, "1")["fit_on"] == "pooled"
    error = export_error(model, out, capsys)
    assert "different scopes (fold_0: temperature per fold; fold_1: vector pooled over folds 0, 1)" in error
    assert cli.main(["export-portable", str(model), str(out), "--calibration", "-f", "0"]) == 0
    info = json.loads((out / DATASET_NAME / "nnUNetTrainer__nnUNetPlans__3d_fullres" / "export_info.json").read_text())
    assert info["calibration_fit_on"] == "fold" and list(info["calibrations_folded_in"]) == ["fold_0"]
    shutil.rmtree(out)

    assert cli.main(["fit-calibration", str(model), "--method", "vector", "--fit-on", "pooled"]) == 0
    record = map_record(model, "1")
    record["calibration"]["bias"][0] += 1e-3  # as if fold 1's map came from another pooled fit
    (model / "fold_1" / "calibration_map.json").write_text(json.dumps(record))
    assert "hold maps of two different pooled fits" in export_error(model, out, capsys)

    assert cli.main(["fit-calibration", str(model), "--method", "vector", "--fit-on", "pooled"]) == 0
    retrain(model, "1")
    error = export_error(model, out, capsys)
    assert "fitted for another checkpoint_final.pth of fold_1" in error and refit in error
    capsys.readouterr()
    assert cli.main(["fit-calibration", str(model), "--method", "vector", "--fit-on", "pooled"]) == 2
    assert "--fit-on pooled --revalidate" in capsys.readouterr().err  # the sample is fold 1's old model's

    assert cli.main(["fit-calibration", str(model), "-f", "0", "--method", "vector", "--fit-on", "pooled"]) == 2
    assert "only fold_0 was chosen" in capsys.readouterr().err
