"""Faults: `export-portable` and `fit-temperature` interrupted at every write, and unreadable or unwritable files.

An interrupted command must leave no temporary file and no half-written target (every target file absent, the
previous version, or complete), never touch the source model, and a clean rerun must give what an uninterrupted run
gives. Every failure the user can fix is one or two lines naming the file, the problem and the fix (exit code 2, no
traceback). The model here is built without training: nnU-Net's own network for the session dataset's plans with
random weights, and validation probabilities made from the ground truth.
"""

from __future__ import annotations

import json
import os
import pickle
import shlex
import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_margin import cli
from nnunet_margin.calibration.affine import AffineCalibration
from nnunet_margin.calibration.logit_sample import LogitSample
from nnunet_margin.nnunet.compare_reports import load_method
from nnunet_margin.nnunet.layout import TrainedModel
from nnunet_margin.nnunet.portable import EXPORT_INFO_FILE, PlainNetwork, export_portable
from nnunet_margin.nnunet.posthoc import legacy_temperature
from nnunet_margin.nnunet.posthoc.legacy_temperature import TEMPERATURE_FILE, fit_model_temperatures
from nnunet_margin.nnunet.provenance import PROVENANCE_FILE, file_sha256, record_validation

from conftest import DATASET_NAME
from portable_checks import retrain, tree_digest

pytestmark = pytest.mark.e2e  # needs the session's planned dataset

MODEL_NAME = "nnUNetTrainer__nnUNetPlans__3d_fullres"
PORTABLE_NAME = "nnUNetTrainer_portable"
CASES_PER_FOLD = 2


def _probabilities(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Softmax of noisy logits favouring the true class: an imperfect, over-confident model (interior T)."""
    logits = 3.0 * np.eye(4, dtype=np.float32)[labels].transpose(3, 0, 1, 2)
    logits += rng.normal(0.0, 2.0, logits.shape).astype(np.float32)
    exponentials = np.exp(logits - logits.max(axis=0, keepdims=True))
    return (exponentials / exponentials.sum(axis=0, keepdims=True)).astype(np.float32)


def write_validation(env, fold_folder: Path, cases: list[str], seed: int, timestamp: float) -> None:
    """CASE.npz/.pkl as nnUNetv2_train --val --npz writes them, then summary.json (written last by nnU-Net)."""
    validation = fold_folder / "validation"
    validation.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for case in cases:
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(env.preprocessed / "gt_segmentations" / f"{case}.nii.gz")))
        np.savez_compressed(validation / f"{case}.npz", probabilities=_probabilities(labels.astype(np.int64), rng))
        shutil.copyfile(env.preprocessed / "nnUNetPlans_3d_fullres" / f"{case}.pkl", validation / f"{case}.pkl")
        for suffix in (".npz", ".pkl"):
            os.utime(validation / f"{case}{suffix}", (timestamp, timestamp))
    (validation / "summary.json").write_text(json.dumps({"metric_per_case": [{"prediction_file": case}
                                                                             for case in cases]}))
    os.utime(validation / "summary.json", (timestamp + 1, timestamp + 1))


@pytest.fixture(scope="module")
def model_template(nnunet_env, tmp_path_factory) -> Path:
    """A two-fold model of nnU-Net's own trainer (untrained weights), each fold with its validation files. Its plans
    are the dataset's with 2-16 features per stage, so that checkpoints are small and every export is quick."""
    model = tmp_path_factory.mktemp("template") / DATASET_NAME / MODEL_NAME
    model.mkdir(parents=True)
    for source, name in (("dataset.json", "dataset.json"), ("dataset_fingerprint.json", "dataset_fingerprint.json")):
        shutil.copyfile(nnunet_env.preprocessed / source, model / name)
    plans = json.loads((nnunet_env.preprocessed / "nnUNetPlans.json").read_text())
    architecture = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    architecture["features_per_stage"] = [2 ** (stage + 1) for stage in range(architecture["n_stages"])]
    (model / "plans.json").write_text(json.dumps(plans, indent=2))
    network = PlainNetwork.build(TrainedModel.load(model)).network
    cases = sorted(path.name.removesuffix(".nii.gz")
                   for path in (nnunet_env.preprocessed / "gt_segmentations").glob("*.nii.gz"))
    timestamp = 1.7e9
    for fold in (0, 1):
        fold_folder = model / f"fold_{fold}"
        fold_folder.mkdir()
        torch.manual_seed(fold)
        for name in ("checkpoint_final.pth", "checkpoint_best.pth"):
            weights = {key: torch.randn_like(value) if value.is_floating_point() else value
                       for key, value in network.state_dict().items()}
            torch.save({"network_weights": weights, "trainer_name": "nnUNetTrainer",
                        "init_args": {"configuration": "3d_fullres"}}, fold_folder / name)
            os.utime(fold_folder / name, (timestamp, timestamp))
        (fold_folder / "progress.png").write_bytes(b"\x89PNG progress of fold %d" % fold)
        write_validation(nnunet_env, fold_folder, cases[fold * CASES_PER_FOLD:(fold + 1) * CASES_PER_FOLD],
                         seed=fold, timestamp=timestamp + 10)
    return model


@pytest.fixture
def model(model_template, tmp_path) -> Path:
    """A fresh copy of the template (modification times kept, as cp -a does)."""
    copy = tmp_path / "results" / DATASET_NAME / MODEL_NAME
    shutil.copytree(model_template, copy)
    return copy


@contextmanager
def interrupt_nth_call(owner: object, attribute: str, n: int) -> Iterator[Callable[[], bool]]:
    """Replace owner.attribute by a wrapper that raises KeyboardInterrupt at its n-th call (a crash or Ctrl-C
    there); yields a function telling whether that call happened."""
    original = getattr(owner, attribute)
    calls = 0

    def wrapper(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == n:
            raise KeyboardInterrupt(f"interrupted at call {n} of {attribute}")
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(owner, attribute, wrapper)
        yield lambda: calls >= n


def leftovers(folder: Path) -> list[str]:
    """Temporary or staging files and folders anywhere below folder."""
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*")
                  if ".tmp" in path.name or ".partial" in path.name or path.name == ".nnunet_margin_export")


WRITES = [(torch, "save"), (shutil, "copyfile"), (Path, "write_text"), (os, "rename"), (os, "mkdir"), (os, "unlink")]


EXPORTS = {"plain": {}, "tempered": {"temperature": True, "folds": ["0"]}}


@pytest.mark.parametrize("owner, attribute", WRITES, ids=[f"{o.__name__}.{a}" for o, a in WRITES])
def test_interrupted_export_leaves_nothing_half_written(model, tmp_path, owner, attribute):
    for fold in ("fold_0", "fold_1"):
        (model / fold / TEMPERATURE_FILE).write_text(json.dumps({"temperature": 0.75}))
    source = tree_digest(model)
    reference = {name: tree_digest(export_portable(model, tmp_path / f"reference_{name}", **options))
                 for name, options in EXPORTS.items()}

    # A first export, then refreshes switching between the two exports; the n-th write of each is interrupted.
    out = tmp_path / "out"
    target = out / DATASET_NAME / MODEL_NAME
    current = None
    for n in range(1, 100):
        name = "tempered" if current == "plain" else "plain"
        with interrupt_nth_call(owner, attribute, n) as interrupted:
            try:
                export_portable(model, out, overwrite=current is not None, **EXPORTS[name])
            except KeyboardInterrupt:
                pass
        if not interrupted():
            break
        if current is None:
            assert not target.exists()
        elif tree_digest(target) == reference[name]:
            # interrupted while deleting the replaced export: the new one is complete, and the rest of the old one
            # is a hidden folder the next export removes
            assert all(".partial-old-" in path for path in leftovers(out))
        else:
            assert tree_digest(target) == reference[current]  # the previous export, untouched
        if current is None or tree_digest(target) == reference[current]:
            assert not out.exists() or leftovers(out) == []
        assert tree_digest(model) == source
        export_portable(model, out, overwrite=current is not None, **EXPORTS[name])  # the clean rerun
        assert tree_digest(target) == reference[name] and leftovers(out) == []
        current = name
    assert n > 1, f"{attribute} was never called"
    assert tree_digest(target) == reference[name] and tree_digest(model) == source


def test_rerun_removes_the_staging_folder_of_a_killed_export_and_nothing_else(model, tmp_path):
    out = tmp_path / "out"
    parent = out / DATASET_NAME
    killed = parent / f".{MODEL_NAME}.partial-123-abcd"  # a SIGKILL'd export: marker and some files
    (killed / "fold_0").mkdir(parents=True)
    (killed / ".nnunet_margin_export").write_text(json.dumps({"source": str(model)}))
    (killed / "fold_0" / "checkpoint_final.pth").write_bytes(b"half a checkpoint")
    swapped = parent / f".{MODEL_NAME}.partial-old-123-abcd"  # killed between the two renames of a refresh
    swapped.mkdir()
    (swapped / EXPORT_INFO_FILE).write_text(json.dumps({"source": str(model)}))
    foreign = parent / f".{MODEL_NAME}.partial-mine"  # not ours: no marker, no export_info.json
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")

    exported = export_portable(model, out)
    assert not killed.exists() and not swapped.exists()
    assert (foreign / "notes.txt").read_text() == "keep me"
    assert json.loads((exported / EXPORT_INFO_FILE).read_text())["source"] == str(model)


def canonical(record: dict) -> str:
    """A record as comparable text (its metrics hold NaN where undefined, and NaN != NaN)."""
    return json.dumps(record, sort_keys=True)


def fit_outputs(model: Path) -> dict[str, str | None]:
    """Each fold's temperature.json: None if absent, else its content (which must parse: complete)."""
    return {fold.name: canonical(json.loads((fold / TEMPERATURE_FILE).read_text()))
            if (fold / TEMPERATURE_FILE).exists() else None for fold in sorted(model.glob("fold_*"))}


def without_fit_outputs(digest: dict[str, str]) -> dict[str, str]:
    return {path: value for path, value in digest.items() if not path.endswith(TEMPERATURE_FILE)}


FIT_STEPS = [(os, "replace"), (Path, "write_text"), (np, "load"), (pickle, "load")]


@contextmanager
def counting_calls(owner: object, attribute: str) -> Iterator[Callable[[], int]]:
    original = getattr(owner, attribute)
    calls = 0

    def wrapper(*args, **kwargs):
        nonlocal calls
        calls += 1
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(owner, attribute, wrapper)
        yield lambda: calls


def interruption_points(count: int) -> list[int]:
    """Every call of a few, else the first, second, middle and last two."""
    return list(range(1, count + 1)) if count <= 6 else sorted({1, 2, count // 2, count - 1, count})


@pytest.mark.parametrize("owner, attribute", FIT_STEPS, ids=[f"{o.__name__}.{a}" for o, a in FIT_STEPS])
def test_interrupted_fit_temperature_leaves_complete_or_previous_records(model, nnunet_env, monkeypatch, owner,
                                                                          attribute):
    monkeypatch.setenv("nnUNet_preprocessed", str(nnunet_env.root / "preprocessed"))
    with counting_calls(owner, attribute) as calls:
        records = fit_model_temperatures(model)
    assert calls() >= 2, f"{attribute} is not called twice"
    assert all(record["at_bound"] is None for record in records.values())
    reference = {fold: canonical(record) for fold, record in records.items()}
    previous = {fold: canonical({"temperature": 2.0}) for fold in reference}
    for fold, record in previous.items():
        (model / fold / TEMPERATURE_FILE).write_text(record)
    source = without_fit_outputs(tree_digest(model))

    for n in interruption_points(calls()):
        with interrupt_nth_call(owner, attribute, n) as interrupted, pytest.raises(KeyboardInterrupt):
            fit_model_temperatures(model)
        assert interrupted()
        assert all(record in (previous[fold], reference[fold]) for fold, record in fit_outputs(model).items())
        assert leftovers(model) == []
        assert without_fit_outputs(tree_digest(model)) == source
        rerun = fit_model_temperatures(model)  # the clean rerun
        assert {fold: canonical(record) for fold, record in rerun.items()} == reference
        for fold, record in previous.items():
            (model / fold / TEMPERATURE_FILE).write_text(record)


def test_interrupted_nnunet_validation_is_refused_until_refreshed(model, nnunet_env, monkeypatch, capsys):
    """fit-temperature runs nnU-Net's validation for a fold without .npz; interrupted after some cases, the rerun
    must not fit on the partial set, and the refresh command it names repairs it."""
    results = model.parents[1]
    monkeypatch.setenv("nnUNet_preprocessed", str(nnunet_env.root / "preprocessed"))
    monkeypatch.setenv("nnUNet_results", str(results))
    validation = model / "fold_1" / "validation"
    stash = model.parent / "stash"
    shutil.copytree(validation, stash)
    for npz in validation.glob("*.npz"):
        npz.unlink()

    def nnunet_validation(command, **kwargs):
        """Stands in for nnUNetv2_train --val --npz: each case, then summary.json."""
        for case in sorted(stash.glob("*.npz")):
            shutil.copy(case, validation / case.name)
        shutil.copy(stash / "summary.json", validation / "summary.json")
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(legacy_temperature.subprocess, "run", nnunet_validation)
    with interrupt_nth_call(shutil, "copy", 2), pytest.raises(KeyboardInterrupt):  # after the first case
        fit_model_temperatures(model, folds=["1"])
    assert len(list(validation.glob("*.npz"))) == 1 and not (model / "fold_1" / TEMPERATURE_FILE).exists()

    refresh = f"nnUNetv2_train {DATASET_NAME} 3d_fullres 1 -tr nnUNetTrainer -p nnUNetPlans --val --npz"
    assert cli.main(["fit-temperature", str(model), "-f", "1"]) == 2
    error = capsys.readouterr().err
    assert "did not finish" in error and refresh in error and len(error.splitlines()) <= 2
    assert not (model / "fold_1" / TEMPERATURE_FILE).exists()

    nnunet_validation(refresh.split())  # the user runs the refresh command
    assert cli.main(["fit-temperature", str(model), "-f", "1"]) == 0


def _truncate(path: Path) -> None:
    """Cut the file in half, keeping its modification time (as a disk error would)."""
    stat = path.stat()
    path.write_bytes(path.read_bytes()[: stat.st_size // 2])
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def _garble(path: Path) -> None:
    stat = path.stat()
    path.write_text("{ not json")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def _scale_probabilities(path: Path) -> None:
    """Probabilities that sum to 0.9 (a broken export), keeping the file's modification time."""
    stat = path.stat()
    np.savez_compressed(path, probabilities=np.load(path)["probabilities"] * np.float32(0.9))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def _first(pattern: str) -> Callable[[Path], Path]:
    return lambda model: sorted(model.glob(pattern))[0]


# (what to break, how, command line after the model folder, words of the fix that the message must hold)
BROKEN_FILES = {
    "truncated npz": (_first("fold_0/validation/*.npz"), _truncate, ["fit-temperature"], "--npz"),
    "probabilities not summing to 1": (_first("fold_0/validation/*.npz"), _scale_probabilities, ["fit-temperature"],
                                       "probabilities sum to 0.9"),
    "corrupt pkl": (_first("fold_0/validation/*.pkl"), _truncate, ["fit-temperature"], "--save_probabilities"),
    "corrupt dataset.json": (_first("dataset.json"), _garble, ["fit-temperature"], "copy it again"),
    "corrupt plans.json": (_first("plans.json"), _garble, ["fit-temperature"], "restore it"),
    "corrupt provenance.json": (lambda model: model / "fold_0" / "validation" / PROVENANCE_FILE, _garble,
                                ["fit-temperature"], "Refresh them with `nnUNetv2_train"),
    "truncated checkpoint": (_first("fold_0/checkpoint_final.pth"), _truncate, ["export-portable", "OUT"],
                             "train the fold again"),
    "corrupt temperature.json": (lambda model: model / "fold_0" / TEMPERATURE_FILE, _garble,
                                 ["export-portable", "OUT", "--temperature"], "refit with nnunet-margin"),
}


def run_cli(command: str, model: Path, *arguments: str, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = cli.main([command, str(model), *arguments])
    return code, capsys.readouterr().err


def assert_clear_error(code: int, error: str, *words: str) -> None:
    assert code == 2, error
    assert "Traceback" not in error and 1 <= len(error.strip().splitlines()) <= 2, error
    for word in words:
        assert word in error, error


@pytest.mark.parametrize("broken", BROKEN_FILES)
def test_unreadable_files_are_named_with_the_problem_and_the_fix(model, nnunet_env, tmp_path, monkeypatch, capsys,
                                                                  broken):
    monkeypatch.setenv("nnUNet_preprocessed", str(nnunet_env.root / "preprocessed"))
    record_validation(model / "fold_0")  # as a plugin trainer's validation leaves it
    for fold in ("fold_0", "fold_1"):
        (model / fold / TEMPERATURE_FILE).write_text(json.dumps({"temperature": 1.5}))
    locate, damage, (command, *arguments), fix = BROKEN_FILES[broken]
    path = locate(model)
    damage(path)
    arguments = [str(tmp_path / "out") if argument == "OUT" else argument for argument in arguments]
    code, error = run_cli(command, model, *arguments, capsys=capsys)
    assert_clear_error(code, error, str(path), fix)
    assert not (tmp_path / "out").exists() or leftovers(tmp_path / "out") == []


def write_logit_sample(fold_folder: Path, num_classes: int = 4) -> Path:
    """A logit sample as the plugin's validation writes it, then its provenance record (the checkpoint's)."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, num_classes, (5_000,), generator=generator)
    logits = torch.randn(num_classes, 5_000, generator=generator) + 3 * torch.eye(num_classes)[:, labels]
    path = fold_folder / "validation" / "logit_sample.nnunet_margin"
    LogitSample(seed=1).update(logits, labels).save(path)
    record_validation(fold_folder)
    return path


def test_logit_sample_and_map_of_another_class_count_or_truncated_are_named(model, capsys):
    """A truncated sample said "File is not a zip file"; a sample of another class count than dataset.json was
    fitted, and only the export failed ("weight must have the K=5 output channels first")."""
    sample = write_logit_sample(model / "fold_0")
    fit = ["--method", "temperature", "-f", "0"]
    refit = f"nnunet-margin fit-calibration {model} -f 0 --method temperature --scope crop --fit-on fold --revalidate"
    _truncate(sample)
    code, error = run_cli("fit-calibration", model, *fit, capsys=capsys)
    assert_clear_error(code, error, str(sample), "truncated or corrupt", refit)

    write_logit_sample(model / "fold_0", num_classes=5)
    code, error = run_cli("fit-calibration", model, *fit, capsys=capsys)
    assert_clear_error(code, error, str(sample), "logits of 5 classes", "defines 4 (background,", refit)
    assert not (model / "fold_0" / "calibration_map.json").exists()

    calibration = AffineCalibration.from_temperature(1.5, 5)  # a map of 5 classes, fitted before the check existed
    (model / "fold_0" / "calibration_map.json").write_text(json.dumps(
        {"calibration": calibration.to_dict(), "checkpoint_sha256": file_sha256(model / "fold_0" /
                                                                                "checkpoint_final.pth")}))
    code, error = run_cli("export-portable", model, str(model.parents[2] / "out"), "--calibration", "-f", "0",
                          capsys=capsys)
    assert_clear_error(code, error, str(model / "fold_0" / "calibration_map.json"), "maps 5 classes",
                       "network outputs 4", "nnunet-margin fit-calibration")


def test_temperature_of_another_checkpoint_is_not_exported(model, nnunet_env, tmp_path, monkeypatch, capsys):
    """export-portable --temperature folded in a temperature fitted for an earlier checkpoint_final.pth."""
    monkeypatch.setenv("nnUNet_preprocessed", str(nnunet_env.root / "preprocessed"))
    record = fit_model_temperatures(model, folds=["0"])["fold_0"]
    checkpoint = model / "fold_0" / "checkpoint_final.pth"
    assert record["checkpoint_sha256"] == file_sha256(checkpoint)
    retrain(model)
    temperature_file = str(model / "fold_0" / TEMPERATURE_FILE)
    code, error = run_cli("export-portable", model, str(tmp_path / "out"), "--temperature", capsys=capsys)
    assert_clear_error(code, error, temperature_file, "fitted for another checkpoint_final.pth of fold_0",
                       f"nnunet-margin fit-temperature {model} -f 0")

    # a temperature.json of nnunet-margin 0.1.0 names no checkpoint: it must be newer than the checkpoint
    (model / "fold_0" / TEMPERATURE_FILE).write_text(json.dumps({"temperature": 1.5}))
    written = checkpoint.stat().st_mtime
    os.utime(model / "fold_0" / TEMPERATURE_FILE, (written - 10, written - 10))
    code, error = run_cli("export-portable", model, str(tmp_path / "out"), "--temperature", capsys=capsys)
    assert_clear_error(code, error, temperature_file, "older than checkpoint_final.pth", "fit-temperature")
    os.utime(model / "fold_0" / TEMPERATURE_FILE, (written + 10, written + 10))
    code, error = run_cli("export-portable", model, str(tmp_path / "out"), "--temperature", "-f", "0", capsys=capsys)
    assert code == 0 and "export-portable: deprecated: " in error and "--calibration" in error
    info = json.loads((tmp_path / "out" / DATASET_NAME / MODEL_NAME / EXPORT_INFO_FILE).read_text())
    assert info["temperatures_folded_in"] == {"fold_0": 1.5} and info["calibration_fit_on"] == "fold"
    assert info["calibration_checkpoints"] == {"fold_0": file_sha256(checkpoint)}


def test_suggested_prediction_command_is_shell_quoted(model, tmp_path, capsys):
    out = tmp_path / "export's out dir"
    assert cli.main(["export-portable", str(model), str(out), "-f", "0"]) == 0
    command = capsys.readouterr().out.splitlines()[-1]
    words = shlex.split(command)
    assert words[0] == f"nnUNet_results={out}" and words[1:4] == ["nnUNetv2_predict", "-d", DATASET_NAME]
    assert words[words.index("-tr") + 1] == "nnUNetTrainer"


def test_corrupt_calibration_report_is_named(tmp_path, capsys):
    report = tmp_path / "run" / "fold_0" / "validation" / "calibration.json"
    report.parent.mkdir(parents=True)
    report.write_text('{"summary": ')
    code = cli.main(["compare", str(tmp_path / "run")])
    assert_clear_error(code, capsys.readouterr().err, str(report), "nnunet-margin calibration")
    with pytest.raises(ValueError, match=f"{report} is not a readable calibration report"):
        load_method(str(tmp_path / "run"))


def test_truncated_prediction_is_named_by_the_calibration_command(model, nnunet_env, tmp_path, capsys):
    predictions = tmp_path / "predictions"
    shutil.copytree(model / "fold_0" / "validation", predictions)
    for name in ("dataset.json", "plans.json"):
        shutil.copy(model / name, predictions)
    npz = sorted(predictions.glob("*.npz"))[0]
    _truncate(npz)
    code = cli.main(["calibration", str(predictions), str(nnunet_env.preprocessed / "gt_segmentations"),
                     "--allow-missing"])  # one fold's validation cases of all training cases
    assert_clear_error(code, capsys.readouterr().err, str(npz), "truncated or corrupt")


def test_unwritable_outputs_are_named_with_the_fix(model, nnunet_env, tmp_path, monkeypatch, capsys):
    """Paths that cannot be written (a file where a folder must go, a folder where a file must go; the tests run as
    root, so permissions would not stop them)."""
    monkeypatch.setenv("nnUNet_preprocessed", str(nnunet_env.root / "preprocessed"))
    out_file = tmp_path / "out_is_a_file"
    out_file.write_text("")
    code, error = run_cli("export-portable", model, str(out_file), capsys=capsys)
    assert_clear_error(code, error, str(out_file), "pass a folder")

    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / DATASET_NAME).write_text("")  # OUT/DatasetXXX is a file
    code, error = run_cli("export-portable", model, str(blocked), capsys=capsys)
    assert_clear_error(code, error, str(blocked / DATASET_NAME), "OUT folder you can write to")
    assert (blocked / DATASET_NAME).read_text() == ""

    (model / "fold_0" / TEMPERATURE_FILE).mkdir()  # a folder where temperature.json must go
    code, error = run_cli("fit-temperature", model, "-f", "0", capsys=capsys)
    assert_clear_error(code, error, str(model / "fold_0" / TEMPERATURE_FILE), "must be writable")
    assert leftovers(model) == []


def test_fit_and_export_change_nothing_in_the_source_but_temperature_and_validation_files(model, nnunet_env,
                                                                                          tmp_path, monkeypatch):
    """README: the source folder is never modified (fit-temperature writes only fold_X/temperature.json and the
    files of the nnU-Net validation it runs)."""
    monkeypatch.setenv("nnUNet_preprocessed", str(nnunet_env.root / "preprocessed"))
    monkeypatch.setenv("nnUNet_results", str(model.parents[1]))
    validation = model / "fold_1" / "validation"
    stash = tmp_path / "stash"
    shutil.copytree(validation, stash)
    for npz in validation.glob("*.npz"):
        npz.unlink()

    def nnunet_validation(command, **kwargs):
        for path in sorted(stash.glob("*.npz")) + [stash / "summary.json"]:
            shutil.copy(path, validation / path.name)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(legacy_temperature.subprocess, "run", nnunet_validation)
    before = tree_digest(model)
    times = {path: path.stat().st_mtime_ns for path in model.rglob("*") if path.is_file()}
    fit_model_temperatures(model)
    after_fit = tree_digest(model)
    changed = {path for path in before.keys() | after_fit.keys() if before.get(path) != after_fit.get(path)}
    assert changed == {"fold_0/temperature.json", "fold_1/temperature.json", f"fold_1/validation/{PROVENANCE_FILE}",
                       *(f"fold_1/validation/{npz.name}" for npz in stash.glob("*.npz"))}
    assert json.loads((validation / PROVENANCE_FILE).read_text())["sha256"] == file_sha256(
        model / "fold_1" / "checkpoint_final.pth")
    untouched = [path for path in times if str(path.relative_to(model)) not in changed
                 and not path.name == "summary.json"]
    assert all(path.stat().st_mtime_ns == times[path] for path in untouched)

    out = tmp_path / "out"
    export_portable(model, out)
    export_portable(model, out, temperature=True, overwrite=True, allow_bound=True)
    export_portable(model, out, name=PORTABLE_NAME, folds=["1"])
    with pytest.raises(ValueError):
        export_portable(model, out)
    with pytest.raises(ValueError):
        export_portable(model, model.parents[1])
    assert tree_digest(model) == after_fit
