"""End to end: one post-hoc map for two folds of a plugin model, pooled over their validation samples
(`fit-calibration --fit-on pooled`) or fitted on the fold ensemble's own predictions of a held-out calibration set
(`--fit-on images`), exported and predicted by plain nnU-Net as the fold ensemble; the checks of a calibration set
before anything is predicted; and the checks an export makes of the folds' maps: one scope, one fit, the folds it was
fitted for, their current checkpoints (docs/methods.md 6, 6a).

The model is the session's shared two-fold training of nnUNetTrainerWithCalibration_demo (read-only: copied first).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy.optimize import minimize

from nnunet_margin import cli
from nnunet_margin.calibration.affine import AffineCalibration, fit_affine_calibration, logit_calibration_metrics
from nnunet_margin.calibration.logit_sample import LogitSample
from nnunet_margin.nnunet import _seams
from nnunet_margin.nnunet.posthoc.fit import calibration_table
from nnunet_margin.nnunet.posthoc.images import CalibrationSet
from nnunet_margin.nnunet.posthoc.maps import fit_command
from nnunet_margin.nnunet.provenance import file_sha256
from nnunet_margin.nnunet.synthetic_dataset import write_synthetic_dataset

from conftest import DATASET_ID, DATASET_NAME
from portable_checks import (PREDICT_FLAGS, assert_close_to_float16_accumulation, ensemble_logits, interior,
                             plugin_logits, read_prediction, retrain, run_plain_nnunet)

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


# --- --fit-on images ------------------------------------------------------------------------------------------------

CALIBRATION_CASES = ("calibration_000", "calibration_001", "calibration_002")


@pytest.fixture(scope="module")
def calibration_set(tmp_path_factory) -> tuple[Path, Path]:
    """Three synthetic cases of another seed than the training data, named unlike any training case: (images,
    labels) folders."""
    root = tmp_path_factory.mktemp("calibration_set")
    written = write_synthetic_dataset(root / "raw", num_training=0, num_test=len(CALIBRATION_CASES), seed=1)
    folders = root / "images", root / "labels"
    for source, target in zip(("imagesTs", "labelsTs"), folders):
        target.mkdir()
        for path in sorted((written / source).iterdir()):
            path.rename(target / path.name.replace("case_", "calibration_"))
    return folders


def fit_on_images(model: Path, images: Path, labels: Path, *options: str) -> int:
    return cli.main(["fit-calibration", str(model), "--method", "vector", "--fit-on", "images", "--images",
                     str(images), "--labels", str(labels), "-device", "cpu", "-npp", "0", *options])


@pytest.fixture(scope="module")
def on_images(env, shared_models, calibration_set, tmp_path_factory) -> Path:
    """A copy of the two-fold model with one vector-scaling map fitted on the predictions of the calibration set by
    the ensemble of both folds with nnU-Net's test-time mirroring (its default), by the command."""
    model = copy_model(shared_models.model(TRAINER, ("0", "1")), tmp_path_factory.mktemp("on_images"))
    assert fit_on_images(model, *calibration_set) == 0
    return model


def float64_vector_scaling(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(w * z + b) fitted by scipy's L-BFGS to the mean NLL in float64 with its exact gradient (independent
    of the package's Newton solver); returns w and the centred b."""
    z, y = logits.double().numpy(), labels.numpy()
    num_classes, count = z.shape
    one_hot = np.zeros_like(z)
    one_hot[y, np.arange(count)] = 1

    def nll_and_gradient(parameters: np.ndarray) -> tuple[float, np.ndarray]:
        calibrated = parameters[:num_classes, None] * z + parameters[num_classes:, None]
        shifted = calibrated - calibrated.max(axis=0)
        log_normaliser = np.log(np.exp(shifted).sum(axis=0))
        residual = (np.exp(shifted - log_normaliser) - one_hot) / count
        nll = (log_normaliser - shifted[y, np.arange(count)]).mean()
        return nll, np.concatenate([(residual * z).sum(axis=1), residual.sum(axis=1)])

    start = np.concatenate([np.ones(num_classes), np.zeros(num_classes)])
    result = minimize(nll_and_gradient, start, jac=True, method="L-BFGS-B",
                      options={"ftol": 0.0, "gtol": 1e-12, "maxiter": 10_000})
    weight, bias = result.x[:num_classes], result.x[num_classes:]
    return torch.from_numpy(weight), torch.from_numpy(bias - bias.mean())


def test_an_images_map_is_the_float64_fit_of_the_ensembles_logits_of_the_calibration_set(on_images, calibration_set):
    images, labels = calibration_set
    record = map_record(on_images, "0")
    assert record == map_record(on_images, "1")  # one map, recorded in both folds
    assert record["fit_on"] == "images" and record["checkpoints"] == {
        f"fold_{fold}": file_sha256(on_images / f"fold_{fold}" / "checkpoint_final.pth") for fold in "01"}
    fitted_on = record["fitted_on"]
    assert (fitted_on["images"], fitted_on["labels"]) == (str(images.resolve()), str(labels.resolve()))
    assert fitted_on["cases"] == list(CALIBRATION_CASES) and fitted_on["folds"] == ["0", "1"]
    assert fitted_on["mirroring"] is True and len(fitted_on["files_sha256"]) == 64

    # the ensemble's logits of each case, computed here with nnU-Net's predictor (both folds, mirrored), and the
    # sample of them the command draws (its seed, its order of cases)
    logits = ensemble_logits(on_images, [images / f"{case}_0000.nii.gz" for case in CALIBRATION_CASES], (0, 1),
                             mirroring=True)
    sample = LogitSample(seed=fitted_on["sample_seed"])
    for case, case_logits in zip(CALIBRATION_CASES, logits):
        sample.update(case_logits, sitk.GetArrayFromImage(sitk.ReadImage(str(labels / f"{case}.nii.gz"))))
    assert sample.num_voxels == len(CALIBRATION_CASES) * 32**3 == record["num_sample_voxels"]
    fit, held_out = sample.split(record["held_out_fraction"])
    assert record["num_fit_voxels"] == fit.num_voxels

    weight, bias = float64_vector_scaling(fit.logits, fit.labels)
    calibration = AffineCalibration.from_dict(record["calibration"])
    torch.testing.assert_close(torch.diagonal(calibration.weight), weight, rtol=0, atol=1e-5)
    torch.testing.assert_close(calibration.bias, bias, rtol=0, atol=1e-5)
    assert (weight - 1).abs().max() > 0.01, "the map changes the logits"
    held_out_nll = logit_calibration_metrics(held_out.logits, held_out.labels, calibration)["nll"]
    assert record["held_out"]["crop"]["after"]["nll"] == pytest.approx(held_out_nll, rel=1e-6)

    table = calibration_table({"fold_0": record, "fold_1": record})
    assert "| fold_0, fold_1 | vector | images | crop | crop |" in table
    assert (f"fold_0, fold_1: fitted on 3 case(s) of {images.resolve()}, labels {labels.resolve()}, predicted with "
            f"test-time mirroring") in table


def test_plain_nnunet_ensemble_of_the_export_is_the_images_map_of_the_mean_logits(env, on_images, tmp_path):
    out = tmp_path / "portable"
    assert cli.main(["export-portable", str(on_images), str(out), "--calibration", "--name", "images_vector"]) == 0
    info = json.loads((out / DATASET_NAME / "images_vector__nnUNetPlans__3d_fullres" / "export_info.json").read_text())
    record = map_record(on_images, "0")
    assert info["calibration_fit_on"] == "images" and info["calibration_checkpoints"] == record["checkpoints"]
    assert info["calibrations_fitted_on"] == {"fold_0": record["fitted_on"], "fold_1": record["fitted_on"]}

    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(sorted((env.raw / "imagesTs").iterdir())[0], images)
    prediction = tmp_path / "prediction"
    with_mirroring = [flag for flag in PREDICT_FLAGS if flag != "--disable_tta"]  # deployed as the map was fitted
    run_plain_nnunet(env, "nnUNetv2_predict", "-i", str(images), "-o", str(prediction), "-d", str(DATASET_ID),
                     "-c", "3d_fullres", "-f", "0", "1", "-tr", "images_vector", *with_mirroring,
                     nnUNet_results=str(out))
    _, probabilities = read_prediction(prediction, next(prediction.glob("*.npz")).stem)
    mean_logits = ensemble_logits(on_images, [next(images.iterdir())], (0, 1), mirroring=True)[0]
    calibration = AffineCalibration.from_dict(record["calibration"])
    assert_close_to_float16_accumulation(probabilities, torch.softmax(calibration.apply(mean_logits), dim=0).numpy())
    inside = interior(probabilities.shape[1:])
    assert np.abs(probabilities - torch.softmax(mean_logits, dim=0).numpy())[:, inside].max() > 0.01


def one_line_error(capsys, code: int) -> str:
    assert code == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1, error
    return error


def write_label(path: Path, array: np.ndarray, spacing: float = 1.0) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((spacing,) * 3)
    sitk.WriteImage(image, str(path))


def test_fit_on_images_refuses_a_bad_calibration_set_before_predicting(env, on_images, calibration_set, tmp_path,
                                                                       capsys, monkeypatch):
    def predictor_loaded(*arguments, **options):
        raise AssertionError("the ensemble's predictor was loaded before the calibration set was checked")

    monkeypatch.setattr(_seams, "load_predictor", predictor_loaded)
    maps = {fold: map_record(on_images, fold) for fold in "01"}
    images, labels = calibration_set
    capsys.readouterr()

    def variant(name: str) -> tuple[Path, Path]:
        """A copy of the calibration set to break."""
        return (Path(shutil.copytree(images, tmp_path / name / "images")),
                Path(shutil.copytree(labels, tmp_path / name / "labels")))

    error = one_line_error(capsys, cli.main(["fit-calibration", str(on_images), "--method", "vector", "--fit-on",
                                             "images", "--images", str(images)]))
    assert "pass its images and labels with --images DIR --labels DIR" in error
    error = one_line_error(capsys, cli.main(["fit-calibration", str(on_images), "--method", "vector", "--fit-on",
                                             "pooled", "--images", str(images), "--labels", str(labels)]))
    assert "add --fit-on images, or drop those options" in error
    error = one_line_error(capsys, fit_on_images(on_images, images, labels, "-f", "0", "3"))
    assert "fold_3/checkpoint_final.pth is missing: fold 3 is not trained" in error

    error = one_line_error(capsys, fit_on_images(on_images, env.raw / "imagesTr", env.raw / "labelsTr"))
    assert "case_000, case_001, case_002, case_003, case_004 and 5 more" in error and "are training cases of " \
        "fold(s) 0, 1 (nnU-Net's split" in error and "not held out" in error
    with monkeypatch.context() as without_preprocessed:  # a model folder alone: its validation cases
        without_preprocessed.delenv("nnUNet_preprocessed")
        error = one_line_error(capsys, fit_on_images(on_images, env.raw / "imagesTr", env.raw / "labelsTr"))
    validation_cases = sorted(path.name.removesuffix(".nii.gz") for fold in "01"
                              for path in (on_images / f"fold_{fold}" / "validation").glob("*.nii.gz"))
    assert f"case(s) {', '.join(validation_cases)} in" in error and "the validation cases of the model's other " \
        "folds" in error

    broken_images, broken_labels = variant("unlabelled")
    (broken_labels / "calibration_001.nii.gz").unlink()
    error = one_line_error(capsys, fit_on_images(on_images, broken_images, broken_labels))
    assert f"case(s) calibration_001 in {broken_images} have no label CASE.nii.gz in {broken_labels}" in error

    broken_images, broken_labels = variant("without_image")
    (broken_images / "calibration_002_0000.nii.gz").unlink()
    error = one_line_error(capsys, fit_on_images(on_images, broken_images, broken_labels))
    assert f"label(s) calibration_002 in {broken_labels} have no image CASE_0000.nii.gz" in error

    broken_images, broken_labels = variant("channels")
    shutil.copy(broken_images / "calibration_000_0000.nii.gz", broken_images / "calibration_000_0001.nii.gz")
    error = one_line_error(capsys, fit_on_images(on_images, broken_images, broken_labels))
    assert "case calibration_000" in error and "the model was trained on 1 channel(s)" in error

    label = sitk.GetArrayFromImage(sitk.ReadImage(str(labels / "calibration_001.nii.gz")))
    for name, array, spacing, expected in (
            ("spacing", label, 2.0, "(spacing (2, 2, 2) (image: (1, 1, 1))), beyond nnU-Net's tolerance"),
            ("shape", label[:16], 1.0, "has shape (16, 32, 32), its image"),
            ("values", np.where(label == 3, 7, label).astype(label.dtype), 1.0, "holds values 7 that are not labels")):
        broken_images, broken_labels = variant(name)
        write_label(broken_labels / "calibration_001.nii.gz", array, spacing)
        error = one_line_error(capsys, fit_on_images(on_images, broken_images, broken_labels))
        assert "calibration_001" in error and expected in error, error
    assert {fold: map_record(on_images, fold) for fold in "01"} == maps  # nothing written


def test_the_fingerprint_of_a_calibration_set_changes_with_any_file(calibration_set, tmp_path):
    images, labels = (Path(shutil.copytree(folder, tmp_path / folder.name)) for folder in calibration_set)

    def fingerprint() -> str:
        cases = sorted(path.name.removesuffix(".nii.gz") for path in labels.iterdir())
        return CalibrationSet(images, labels, {case: [str(images / f"{case}_0000.nii.gz")] for case in cases},
                              {case: labels / f"{case}.nii.gz" for case in cases}).fingerprint()

    seen = {fingerprint()}
    assert fingerprint() in seen  # the same files
    label = labels / "calibration_000.nii.gz"
    os.utime(label, ns=(label.stat().st_atime_ns, label.stat().st_mtime_ns + 1))
    seen.add(fingerprint())
    image = images / "calibration_001_0000.nii.gz"
    image.write_bytes(image.read_bytes() + b"\0")  # another size
    seen.add(fingerprint())
    (labels / "calibration_002.nii.gz").rename(labels / "calibration_003.nii.gz")
    (images / "calibration_002_0000.nii.gz").rename(images / "calibration_003_0000.nii.gz")
    seen.add(fingerprint())
    assert len(seen) == 4


def test_export_refuses_an_images_map_with_other_folds_other_fits_or_mixed_scopes(env, on_images, tmp_path, capsys):
    model = copy_model(on_images, tmp_path / "results")
    out = tmp_path / "portable"
    fitted_on = map_record(model, "0")["fitted_on"]
    refit = (f"nnunet-margin fit-calibration {model} -f 0 1 --method vector --fit-on images --images "
             f"{fitted_on['images']} --labels {fitted_on['labels']}")

    error = export_error(model, out, capsys, "-f", "1")  # the map belongs to the ensemble of folds 0 and 1
    assert "one map images over folds 0, 1" in error and "export with -f 0 1" in error
    assert refit.replace("-f 0 1", "-f 1") in error

    record = map_record(model, "1")
    record["fitted_on"]["files_sha256"] = "0" * 64  # as if fold 1's map came from a fit on another calibration set
    (model / "fold_1" / "calibration_map.json").write_text(json.dumps(record))
    error = export_error(model, out, capsys)
    assert "hold maps of two different images fits" in error and refit in error

    assert cli.main(["fit-calibration", str(model), "-f", "0", "--method", "temperature"]) == 0
    error = export_error(model, out, capsys)
    assert "different scopes (fold_0: temperature per fold; fold_1: vector images over folds 0, 1)" in error
    assert refit in error


def test_the_refit_command_of_an_images_map_names_its_calibration_set_and_mirroring(tmp_path):
    model = SimpleNamespace(folder=tmp_path / "model")
    fitted_on = {"images": "/data/cal images", "labels": "/data/cal labels", "mirroring": False}
    assert fit_command(model, ["0", "1"], "matrix", "images", fitted_on) == (
        f"nnunet-margin fit-calibration {tmp_path / 'model'} -f 0 1 --method matrix --fit-on images --images "
        f"'/data/cal images' --labels '/data/cal labels' --disable_tta")
    assert fit_command(model, ["0"], "vector", "images").endswith("--images IMAGES --labels LABELS")
