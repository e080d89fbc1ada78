"""End to end: train a plugin trainer with --npz, fit temperatures, export portable copies, and predict with plain
nnU-Net (no nnUNet_extTrainer, and `import nnunet_margin` blocked) as challenge submissions do.

nnUNetv2_predict sums the Gaussian-weighted sliding-window logits in float16. Its probabilities from the tempered
copy therefore match softmax(log p / T) of the plugin's to float precision only where that rounding commutes with
the division by T: for T a power of two, and where the Gaussian weight does not underflow float16 (away from the
patch corners). The prediction comparison uses T = 0.5 there; the fitted temperature is checked on the weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy.optimize import minimize_scalar

from nnunet_margin import cli
from nnunet_margin.calibration import CalibrationStats
from nnunet_margin.calibration.affine import AffineCalibration
from nnunet_margin.calibration.logit_sample import LogitSample
from nnunet_margin.nnunet.portable import export_portable
from nnunet_margin.nnunet.posthoc import legacy_temperature
from nnunet_margin.nnunet.posthoc.fit import fit_model_calibration
from nnunet_margin.nnunet.posthoc.legacy_temperature import fit_model_temperatures
from nnunet_margin.nnunet.provenance import PROVENANCE_FILE, file_sha256, record_validation

from conftest import DATASET_ID, DATASET_NAME
from portable_checks import (PREDICT_FLAGS, assert_close_to_float16_accumulation, interior, plugin_logits,
                             read_prediction, retrain, run_plain_nnunet, tree_digest)

pytestmark = pytest.mark.e2e

TRAINER = "nnUNetTrainerMarginCalib_demo"
PORTABLE = "nnUNetTrainer__nnUNetPlans__3d_fullres"
# A portable copy under its own trainer folder name; its checkpoints still name nnUNetTrainer.
NAMED = "nnUNetTrainer_mbls_T"
REFRESH = f"nnUNetv2_train {DATASET_NAME} 3d_fullres 0 -tr {TRAINER} -p nnUNetPlans --val --npz"
FINAL_LAYER = "decoder.seg_layers.2."  # 4 stages in the synthetic dataset's plans: 3 decoder stages


@pytest.fixture(scope="module")
def env(nnunet_env, tmp_path_factory):
    """The session's planned dataset with this module's own nnUNet_results (other modules train the same trainer),
    also set in os.environ for the in-process calls."""
    results = tmp_path_factory.mktemp("portable_results")
    module_env = dataclasses.replace(nnunet_env, env={**nnunet_env.env, "nnUNet_results": str(results)})
    with pytest.MonkeyPatch.context() as patch:
        for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer"):
            patch.setenv(name, module_env.env[name])
        yield module_env


@pytest.fixture(scope="module")
def trained(env) -> Path:
    env.train(TRAINER, "0", "--npz")
    return Path(env.env["nnUNet_results"]) / DATASET_NAME / f"{TRAINER}__nnUNetPlans__3d_fullres"


@pytest.fixture(scope="module")
def images(env, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    shutil.copy(sorted((env.raw / "imagesTs").iterdir())[0], folder)
    return folder


@pytest.fixture(scope="module")
def plugin_prediction(env, trained, images, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("plugin_prediction")
    env.run("nnUNetv2_predict", "-i", str(images), "-o", str(output), "-d", str(DATASET_ID), "-c", "3d_fullres",
            "-f", "0", "-tr", TRAINER, *PREDICT_FLAGS)
    return output


@pytest.fixture(scope="module")
def fitted(trained) -> dict:
    return fit_model_temperatures(trained)["fold_0"]


def copy_model(model: Path, results: Path, name: str | None = None, ignore: tuple[str, ...] = ()) -> Path:
    """A copy of the model folder in another results root, without checkpoint_best.pth and `ignore` patterns."""
    target = results / DATASET_NAME / (name or model.name)
    shutil.copytree(model, target, ignore=shutil.ignore_patterns("checkpoint_best.pth", *ignore))
    return target


def float16_exact_region(model: Path, shape: tuple[int, ...]) -> np.ndarray:
    """Voxels whose Gaussian weight in nnU-Net's sliding window is at least 1e-3 of its maximum (float16 keeps
    their precision); the synthetic cases are exactly one patch, so the weights are one Gaussian."""
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian

    patch_size = json.loads((model / "plans.json").read_text())["configurations"]["3d_fullres"]["patch_size"]
    assert tuple(patch_size) == shape
    gaussian = compute_gaussian(tuple(patch_size), sigma_scale=1 / 8, value_scaling_factor=10,
                                device=torch.device("cpu")).float().numpy()
    return gaussian >= 1e-3 * gaussian.max()


def validation_voxels(fold: Path, gt_folder: Path, scope: str):
    """Per validation case: probabilities, labels and the scope mask, read independently of the plugin (the
    synthetic dataset has no transpose and no ignore label)."""
    assert json.loads((fold.parent / "plans.json").read_text())["transpose_forward"] == [0, 1, 2]
    for npz in sorted((fold / "validation").glob("*.npz")):
        properties = pickle.loads(npz.with_suffix(".pkl").read_bytes())
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(gt_folder / f"{npz.stem}.nii.gz"))).astype(np.int64)
        mask = np.zeros(properties["shape_before_cropping"], dtype=bool)
        mask[tuple(slice(low, high) for low, high in properties["bbox_used_for_cropping"])] = True
        yield np.load(npz)["probabilities"], labels, mask & (labels != 0) if scope == "foreground" else mask


def tempered(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T) in float64, p clamped at float32's smallest normal number (as the NLL clamps)."""
    logits = np.log(np.maximum(probabilities.astype(np.float64), np.finfo(np.float32).tiny)) / temperature
    return torch.softmax(torch.from_numpy(logits), dim=0).numpy()


def assert_record_matches_independent_fit(record: dict, fold: Path, gt_folder: Path, scope: str) -> None:
    """T minimises the NLL of softmax(log p / T) over the scope's voxels (a generic bounded minimiser in float64),
    and the metrics before and after are those of the probabilities and of the tempered ones."""
    cases = list(validation_voxels(fold, gt_folder, scope))
    before = CalibrationStats(4)
    for probabilities, labels, mask in cases:
        before.update(probabilities, labels, mask)

    def stats(temperature: float) -> CalibrationStats:
        result = CalibrationStats(4)
        for probabilities, labels, mask in cases:
            result.update(tempered(probabilities, temperature), labels, mask)
        return result

    def nll(temperature: float) -> float:
        return stats(temperature).compute()["nll"]

    reference = minimize_scalar(nll, bounds=(0.01, 100), method="bounded", options={"xatol": 1e-9}).x
    # a 2-iteration model can be worse than uniform in the crop scope: then the NLL falls up to the bound T = 100
    assert record["temperature"] == pytest.approx(reference, rel=1e-5, abs=1e-6 if reference < 99.99 else 1e-2)
    assert (record["scope"], record["num_cases"], record["num_voxels"]) == (scope, len(cases), before.num_voxels)
    after = stats(record["temperature"]).compute()
    for name in ("ece", "classwise_ece", "nll", "brier"):
        assert record["before"][name] == pytest.approx(before.compute()[name], rel=1e-9)
    # fit-temperature tempers in float32: a voxel within float32 rounding of a bin edge may fall into the next bin
    # (moving an ECE by at most 2 / voxels); the NLL and Brier score move by rounding only
    for name, tolerance in (("ece", 2 / before.num_voxels), ("classwise_ece", 2 / before.num_voxels),
                            ("nll", 1e-6), ("brier", 1e-6)):
        assert record["after"][name] == pytest.approx(after[name], rel=1e-5, abs=tolerance)
    assert nll(record["temperature"]) < record["before"]["nll"]
    assert record["checkpoint_sha256"] == file_sha256(fold / "checkpoint_final.pth")


def test_fit_temperature_minimises_the_validation_nll(env, trained, fitted, capsys):
    gt_folder = env.preprocessed / "gt_segmentations"
    assert_record_matches_independent_fit(fitted, trained / "fold_0", gt_folder, "foreground")
    written = json.loads((trained / "fold_0" / "temperature.json").read_text())
    assert json.dumps(written, sort_keys=True) == json.dumps(fitted, sort_keys=True)  # NaN-safe comparison

    assert cli.main(["fit-temperature", str(trained), "-f", "0"]) == 0
    output = capsys.readouterr()
    table = output.out
    assert "nnunet-margin fit-temperature: deprecated: " in output.err and "--method temperature" in output.err
    # a 2-iteration model may be worse than uniform, with T at the search bound
    bound = "" if fitted["at_bound"] is None else f" ({fitted['at_bound']} bound)"
    assert f"| fold_0 | foreground | {fitted['temperature']:.4f}{bound} |" in table
    assert f"{fitted['before']['nll']:.4f} -> {fitted['after']['nll']:.4f}" in table


def test_fit_temperature_runs_nnunet_validation_when_probabilities_are_missing(env, trained, tmp_path, monkeypatch,
                                                                               capsys):
    model = copy_model(trained, tmp_path, ignore=("*.npz", "temperature.json", PROVENANCE_FILE))
    commands = []
    run_command = subprocess.run

    def nnunet_validation(command, **kwargs):
        """Records the command and runs it: the real nnUNetv2_train --val --npz, in this module's environment."""
        commands.append(command)
        return run_command(command, **kwargs)

    monkeypatch.setattr(legacy_temperature.subprocess, "run", nnunet_validation)
    with pytest.raises(RuntimeError, match="nnUNet_results"):
        fit_model_temperatures(model)
    assert not commands

    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    monkeypatch.setenv("nnUNet_def_n_proc", env.env["nnUNet_def_n_proc"])
    record = fit_model_temperatures(model, scope="crop", num_processes=2)["fold_0"]
    (command,) = commands
    assert Path(command[0]).name == "nnUNetv2_train"
    assert command[1:] == [DATASET_NAME, "3d_fullres", "0", "-tr", TRAINER, "-p", "nnUNetPlans", "--val", "--npz",
                           "-device", "cpu"]
    assert "no validation probabilities (.npz); running nnU-Net's validation" in capsys.readouterr().out
    assert_record_matches_independent_fit(record, model / "fold_0", env.preprocessed / "gt_segmentations", "crop")
    for npz in (trained / "fold_0" / "validation").glob("*.npz"):  # the same checkpoint predicts the same
        rerun = np.load(model / "fold_0" / "validation" / npz.name)["probabilities"]
        np.testing.assert_allclose(rerun, np.load(npz)["probabilities"], atol=1e-6)
    # the validation it ran is recorded as that of the current checkpoint
    provenance = json.loads((model / "fold_0" / "validation" / PROVENANCE_FILE).read_text())
    assert provenance["sha256"] == file_sha256(model / "fold_0" / "checkpoint_final.pth")


def test_export_with_temperature_reproduces_the_tempered_plugin_prediction(env, trained, images, plugin_prediction,
                                                                           tmp_path):
    model = copy_model(trained, tmp_path / "source")
    (model / "fold_0" / "temperature.json").write_text(json.dumps({"temperature": 0.5}))
    source = tree_digest(model)
    out = tmp_path / "portable"
    assert cli.main(["export-portable", str(model), str(out), "--temperature"]) == 0
    assert tree_digest(model) == source
    assert not (out / DATASET_NAME / PORTABLE / "fold_0" / "checkpoint_best.pth").exists()

    prediction = tmp_path / "prediction"
    run_plain_nnunet(env, "nnUNetv2_predict", "-i", str(images), "-o", str(prediction), "-d", str(DATASET_ID),
                     "-c", "3d_fullres", "-f", "0", "-tr", "nnUNetTrainer", *PREDICT_FLAGS, nnUNet_results=str(out))
    case = next(plugin_prediction.glob("*.npz")).stem
    plugin_segmentation, plugin_probabilities = read_prediction(plugin_prediction, case)
    segmentation, probabilities = read_prediction(prediction, case)
    exact = float16_exact_region(model, segmentation.shape)
    expected = tempered(plugin_probabilities, 0.5)
    np.testing.assert_allclose(probabilities[:, exact], expected[:, exact], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(segmentation[exact], plugin_segmentation[exact])
    assert np.mean(segmentation != plugin_segmentation) < 0.01
    assert np.abs(probabilities - plugin_probabilities)[:, exact].max() > 0.01  # the temperature changed them

    archive = tmp_path / "model.zip"
    run_plain_nnunet(env, "nnUNetv2_export_model_to_zip", "-d", str(DATASET_ID), "-c", "3d_fullres", "-f", "0",
                     "-tr", "nnUNetTrainer", "-o", str(archive), nnUNet_results=str(out))
    assert f"{DATASET_NAME}/{PORTABLE}/fold_0/checkpoint_final.pth" in zipfile.ZipFile(archive).namelist()


def test_export_under_its_own_name_reproduces_the_plugin_prediction(env, trained, images, plugin_prediction,
                                                                     tmp_path):
    """--name NAME: plain nnUNetv2_predict finds the folder with -tr NAME and rebuilds the network from the class
    the checkpoints name (nnUNetTrainer), so the name needs no trainer class."""
    source = tree_digest(trained)
    exported = export_portable(trained, tmp_path / "portable", name=NAMED)
    assert tree_digest(trained) == source
    assert exported == tmp_path / "portable" / DATASET_NAME / f"{NAMED}__nnUNetPlans__3d_fullres"
    for name in ("checkpoint_final.pth", "checkpoint_best.pth"):
        original = torch.load(trained / "fold_0" / name, weights_only=False)
        copy = torch.load(exported / "fold_0" / name, weights_only=False)
        assert (original["trainer_name"], copy["trainer_name"]) == (TRAINER, "nnUNetTrainer")
        assert all(torch.equal(copy["network_weights"][key], value)
                   for key, value in original["network_weights"].items())
    info = json.loads((exported / "export_info.json").read_text())
    assert (info["source_trainers"], info["temperatures_folded_in"]) == ([TRAINER], {})

    prediction = tmp_path / "prediction"
    run_plain_nnunet(env, "nnUNetv2_predict", "-i", str(images), "-o", str(prediction), "-d", str(DATASET_ID),
                     "-c", "3d_fullres", "-f", "0", "-tr", NAMED, *PREDICT_FLAGS,
                     nnUNet_results=str(tmp_path / "portable"))
    case = next(plugin_prediction.glob("*.npz")).stem
    for portable_output, plugin_output in zip(read_prediction(prediction, case),
                                              read_prediction(plugin_prediction, case)):
        np.testing.assert_array_equal(portable_output, plugin_output)


def test_export_folds_the_fitted_temperature_into_the_final_layer(trained, fitted, tmp_path):
    source = tree_digest(trained)
    # a 2-iteration model may be worse than uniform (T at the search bound): folding is checked either way
    exported = export_portable(trained, tmp_path, temperature=True, folds=["0"], allow_bound=True)
    assert tree_digest(trained) == source
    original = torch.load(trained / "fold_0" / "checkpoint_final.pth", weights_only=False)["network_weights"]
    scaled = torch.load(exported / "fold_0" / "checkpoint_final.pth", weights_only=False)["network_weights"]
    assert original.keys() == scaled.keys() and f"{FINAL_LAYER}weight" in scaled
    for key, value in original.items():
        expected = value / fitted["temperature"] if key.startswith(FINAL_LAYER) else value
        torch.testing.assert_close(scaled[key], expected, rtol=1e-6, atol=0)
    info = json.loads((exported / "export_info.json").read_text())
    assert info["temperatures_folded_in"] == {"fold_0": fitted["temperature"]}


OWN_NETWORK_TRAINER = '''
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainerOwnNetwork_test(nnUNetTrainer):
    @staticmethod
    def build_network_architecture(*args, **kwargs):
        return nnUNetTrainer.build_network_architecture(*args, **kwargs)
'''


def rename_trainer_in_checkpoint(model: Path, trainer_name: str, drop_weight: str | None = None) -> None:
    path = model / "fold_0" / "checkpoint_final.pth"
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["trainer_name"] = trainer_name
    if drop_weight is not None:
        del checkpoint["network_weights"][drop_weight]
    torch.save(checkpoint, path)


@pytest.mark.parametrize("trainer_name, drop_weight, error, message", [
    ("nnUNetTrainerOwnNetwork_test", None, ValueError,
     "nnUNetTrainerOwnNetwork_test overrides build_network_architecture"),
    ("nnUNetTrainerMissing_test", None, RuntimeError, "nnU-Net cannot find trainer nnUNetTrainerMissing_test"),
    (TRAINER, f"{FINAL_LAYER}bias", ValueError, "the weights do not fit nnU-Net's own network"),
])
def test_export_refuses_models_plain_nnunet_may_not_rebuild(trained, tmp_path, monkeypatch, trainer_name,
                                                            drop_weight, error, message):
    extra_trainers = tmp_path / "ext_trainers"
    extra_trainers.mkdir()
    (extra_trainers / "own_network_trainers.py").write_text(OWN_NETWORK_TRAINER)
    monkeypatch.setenv("nnUNet_extTrainer", str(extra_trainers), prepend=os.pathsep)
    model = copy_model(trained, tmp_path / "source")
    rename_trainer_in_checkpoint(model, trainer_name, drop_weight)
    with pytest.raises(error, match=message):
        export_portable(model, tmp_path / "portable")
    assert not list((tmp_path / "portable").rglob("*.pth"))


def test_export_with_temperature_needs_fitted_temperatures(trained, tmp_path):
    model = copy_model(trained, tmp_path, ignore=("temperature.json",))
    with pytest.raises(FileNotFoundError, match="run nnunet-margin fit-temperature .* -f 0 first"):
        export_portable(model, tmp_path / "portable", temperature=True)


def test_export_never_writes_into_the_source_or_another_model(trained, tmp_path, monkeypatch, capsys):
    """The reported failure: `export-portable MODEL $nnUNet_results` replaced the checkpoints and summary of the
    user's own nnUNetTrainer model there; `export-portable MODEL MODEL` wrote a nested copy into the model."""
    results = tmp_path / "results"
    model = copy_model(trained, results)
    copy_model(trained, results, name=PORTABLE)  # the user's own plain nnUNetTrainer model
    elsewhere = copy_model(trained, tmp_path / "downloaded")
    monkeypatch.setenv("nnUNet_results", str(results))
    before = tree_digest(results)
    refusals = [
        ([str(model), str(results)], "contains the model folder"),
        ([str(model), str(model.parent)], "contains the model folder"),
        ([str(model), str(model)], "lies inside the model folder"),
        ([str(model), str(model / "fold_0")], "lies inside the model folder"),
        ([str(elsewhere), str(results), "--overwrite"], "in the nnUNet_results nnU-Net is using"),
    ]
    for arguments, reason in refusals:
        assert cli.main(["export-portable", *arguments]) == 2, arguments
        error = capsys.readouterr().err
        assert reason in error and "choose" in error and len(error.splitlines()) == 1, error
    monkeypatch.delenv("nnUNet_results")
    assert cli.main(["export-portable", str(elsewhere), str(results), "--overwrite"]) == 2
    assert "is no export of nnunet-margin" in capsys.readouterr().err
    assert tree_digest(results) == before


def test_export_refreshes_only_its_own_export(trained, tmp_path, capsys):
    first = copy_model(trained, tmp_path / "first")
    shutil.copytree(first / "fold_0", first / "fold_1")
    second = copy_model(trained, tmp_path / "second")
    out = tmp_path / "portable"
    exported = export_portable(first, out)
    assert sorted(path.name for path in exported.glob("fold_*")) == ["fold_0", "fold_1"]
    before = tree_digest(out)

    # another model into the same folder would mix folds (nnUNetv2_predict -f 0 1 would ensemble two models)
    assert cli.main(["export-portable", str(second), str(out), "--overwrite"]) == 2
    assert f"holds the export of another model ({first})" in capsys.readouterr().err
    assert cli.main(["export-portable", str(first), str(out)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert tree_digest(out) == before

    assert cli.main(["export-portable", str(first), str(out), "-f", "0", "--overwrite"]) == 0
    assert sorted(path.name for path in exported.glob("fold_*")) == ["fold_0"]  # nothing of the old export is left
    assert json.loads((exported / "export_info.json").read_text())["folds"] == ["fold_0"]
    assert cli.main(["export-portable", str(second), str(out), "--name", NAMED]) == 0
    assert f"-tr {NAMED}" in capsys.readouterr().out
    info = json.loads((out / DATASET_NAME / f"{NAMED}__nnUNetPlans__3d_fullres" / "export_info.json").read_text())
    assert info["source"] == str(second) and (exported / "export_info.json").is_file()
    assert cli.main(["export-portable", str(second), str(out), "--name", "nnUNetTrainer__x"]) == 2
    assert "not a usable trainer folder name" in capsys.readouterr().err


def stale_after_retraining_without_npz(model: Path) -> None:
    """Retrained without --npz: the plugin's final validation records the new checkpoint but writes no .npz, so
    the previous model's stay behind."""
    retrain(model)
    record_validation(model / "fold_0")


def stale_without_record(model: Path) -> None:
    """A model of nnU-Net's own trainer (no provenance record), retrained without --npz."""
    (model / "fold_0" / "validation" / PROVENANCE_FILE).unlink()
    retrain(model)


def interrupted_validation(model: Path) -> None:
    """`--val --npz` interrupted after rewriting one case: that .npz is newer than summary.json."""
    npz = sorted((model / "fold_0" / "validation").glob("*.npz"))[0]
    npz.write_bytes(npz.read_bytes())


@pytest.mark.parametrize("make_stale, reason", [
    (stale_after_retraining_without_npz, "older than checkpoint_final.pth"),
    (stale_without_record, "older than checkpoint_final.pth"),
    (interrupted_validation, "did not finish"),
])
def test_fit_temperature_refuses_stale_or_incomplete_probabilities(trained, tmp_path, capsys, make_stale, reason):
    model = copy_model(trained, tmp_path, ignore=("temperature.json",))
    make_stale(model)
    assert cli.main(["fit-temperature", str(model)]) == 2
    error = capsys.readouterr().err
    assert reason in error and f"Refresh them with `{REFRESH}`" in error and len(error.splitlines()) == 1, error
    assert not (model / "fold_0" / "temperature.json").exists()


def _bound_probabilities(labels: np.ndarray, side: str) -> np.ndarray:
    """'upper': confident and always wrong (worse than uniform); 'lower': always right (T -> 0 keeps helping)."""
    predicted = (labels + 1) % 4 if side == "upper" else labels
    return np.where(np.arange(4)[:, None, None, None] == predicted[None], 0.97, 0.01).astype(np.float32)


@pytest.mark.parametrize("side, meaning", [("upper", "worse than uniform"), ("lower", "degenerate")])
def test_temperature_at_a_bound_is_recorded_explained_and_not_exported_silently(env, trained, tmp_path, capsys,
                                                                                side, meaning):
    model = copy_model(trained, tmp_path / "source", ignore=("temperature.json",))
    validation = model / "fold_0" / "validation"
    for npz in validation.glob("*.npz"):
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(env.preprocessed / "gt_segmentations" /
                                                           f"{npz.stem}.nii.gz"))).astype(np.int64)
        np.savez_compressed(npz, probabilities=_bound_probabilities(labels, side))
    (validation / "summary.json").write_bytes((validation / "summary.json").read_bytes())  # validation finished

    assert cli.main(["fit-temperature", str(model)]) == 0
    output = capsys.readouterr()
    record = json.loads((model / "fold_0" / "temperature.json").read_text())
    assert (record["at_bound"], record["temperature"]) == (side, 100.0 if side == "upper" else 0.01)
    assert f"({side} bound) |" in output.out
    assert "warning: fold_0" in output.err and meaning in output.err and "--allow-bound" in output.err

    out = tmp_path / "portable"
    assert cli.main(["export-portable", str(model), str(out), "--temperature"]) == 2
    error = capsys.readouterr().err
    assert str(model / "fold_0" / "temperature.json") in error and "--allow-bound" in error and meaning in error
    assert not out.exists()
    assert cli.main(["export-portable", str(model), str(out), "--temperature", "--allow-bound"]) == 0
    info = json.loads((out / DATASET_NAME / PORTABLE / "export_info.json").read_text())
    assert info["temperatures_at_bound"] == {"fold_0": side}


# --- post-hoc calibration beyond one temperature (fit-calibration, export-portable --calibration) -------------------

def test_vector_scaling_fitted_on_the_logit_sample_ships_in_a_plain_nnunet_model(env, trained, images, tmp_path,
                                                                                  capsys):
    model = copy_model(trained, tmp_path / "source", ignore=("calibration_map.json",))
    sample = LogitSample.load(model / "fold_0" / "validation" / "logit_sample.nnunet_margin")
    assert 0 < sample.num_sampled <= 2_000_000 and sample.num_classes == 4
    assert cli.main(["fit-calibration", str(model), "--method", "vector", "-f", "0"]) == 0
    assert "held-out scope" in capsys.readouterr().out
    record = json.loads((model / "fold_0" / "calibration_map.json").read_text())
    held_out = record["held_out"]["crop"]
    assert held_out["after"]["nll"] <= held_out["before"]["nll"]  # measured on voxels the fit did not see
    calibration = AffineCalibration.from_dict(record["calibration"])
    assert calibration.method == "vector" and not torch.allclose(calibration.weight, torch.eye(4, dtype=torch.float64))

    source = tree_digest(model)
    out = tmp_path / "portable"
    assert cli.main(["export-portable", str(model), str(out), "--calibration", "--name", "mbls_vector"]) == 0
    assert tree_digest(model) == source
    prediction = tmp_path / "prediction"
    run_plain_nnunet(env, "nnUNetv2_predict", "-i", str(images), "-o", str(prediction), "-d", str(DATASET_ID),
                     "-c", "3d_fullres", "-f", "0", "-tr", "mbls_vector", *PREDICT_FLAGS, nnUNet_results=str(out))
    case = next(prediction.glob("*.npz")).stem
    _, probabilities = read_prediction(prediction, case)
    expected = torch.softmax(calibration.apply(plugin_logits(model, images)), dim=0).numpy()
    assert_close_to_float16_accumulation(probabilities, expected)
    inside = interior(probabilities.shape[1:])
    assert np.abs(probabilities - torch.softmax(plugin_logits(model, images), dim=0).numpy())[:, inside].max() > 0.01


def test_fit_calibration_reruns_the_validation_of_a_model_without_a_sample(env, trained, tmp_path, monkeypatch):
    results = tmp_path / "results"
    model = copy_model(trained, results, ignore=("logit_sample.nnunet_margin", "calibration_map.json"))
    monkeypatch.setenv("nnUNet_results", str(results))
    records = fit_model_calibration(model, "temperature", scope="foreground", device="cpu")
    assert (model / "fold_0" / "validation" / "logit_sample.nnunet_margin").is_file()
    assert records["fold_0"]["calibration"]["method"] == "temperature"
    assert json.loads((model / "fold_0" / "validation" / PROVENANCE_FILE).read_text())["sha256"] == \
        file_sha256(model / "fold_0" / "checkpoint_final.pth")


def test_calibration_map_of_another_checkpoint_is_not_exported(trained, tmp_path):
    model = copy_model(trained, tmp_path / "source")
    assert cli.main(["fit-calibration", str(model), "--method", "temperature", "--scope", "foreground"]) == 0
    retrain(model)
    with pytest.raises(ValueError, match="fitted for another checkpoint_final.pth"):
        export_portable(model, tmp_path / "portable", calibration=True)
    with pytest.raises(ValueError, match="--scope crop"):
        fit_model_calibration(model, "vector", scope="foreground")
