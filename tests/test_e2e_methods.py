"""Every method of the registry trains one short epoch through the real nnUNetv2_train (two trainings at a time),
with nnU-Net's final validation and the calibration report, logging the terms its registry entry names; CALS keeps
its multipliers in the checkpoint and `--c` restores them exactly. The hyper-parameter variants (e.g. `_g1`, `_e02`)
are covered by tests/test_trainers.py."""

from __future__ import annotations

import json
import math
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from nnunet_margin import methods

from conftest import BIN, DATASET_ID, DATASET_NAME

pytestmark = pytest.mark.e2e

# Methods that tests/test_e2e_trainers.py trains end to end with their own checks (offsets and resume, the log).
TRAINED_IN_TEST_E2E_TRAINERS = {"margin_calibration": "nnUNetTrainerMarginCalib_demo",
                                "mbls": "nnUNetTrainerMbLSDice_demo"}
# Settings under which one short epoch moves what a method learns, by trainer: CALS gets a margin small enough that
# its constraint is active after one epoch, so its multipliers move.
ONE_EPOCH_SETTINGS = {"nnUNetTrainerCALS": {"cals_margin": 0.05}}
TRAINED_HERE = [method for method in methods.METHODS if method.name not in TRAINED_IN_TEST_E2E_TRAINERS]


def trained_trainer(method: methods.Method) -> str:
    """The short-schedule trainer this module trains for the method (demo/trainers/, or one written here)."""
    return f"{method.trainer}_{'e2e' if method.trainer in ONE_EPOCH_SETTINGS else 'demo'}"


def e2e_trainers_module() -> str:
    """Short-schedule trainers with ONE_EPOCH_SETTINGS, as a module for nnUNet_extTrainer."""
    lines = ["from nnunet_margin import trainers", "from nnunet_margin_demo_trainers import ShortSchedule"]
    for trainer, attributes in ONE_EPOCH_SETTINGS.items():
        lines += ["", "", f"class {trainer}_e2e(ShortSchedule, trainers.{trainer}):"]
        lines += [f"    {attribute} = {value!r}" for attribute, value in attributes.items()]
    return "\n".join(lines) + "\n"


def test_the_methods_trained_elsewhere_are_registry_methods():
    for name, trainer in TRAINED_IN_TEST_E2E_TRAINERS.items():
        assert methods.method_of(trainer.removesuffix("_demo")).name == name
    assert {method.trainer for method in methods.METHODS} >= set(ONE_EPOCH_SETTINGS)


@pytest.fixture(scope="module")
def method_env(nnunet_env, tmp_path_factory):
    """The session's dataset with this module's own results folder and its test trainers findable."""
    extra = tmp_path_factory.mktemp("method_trainers")
    (extra / "e2e_test_trainers.py").write_text(e2e_trainers_module())
    demo_trainers = nnunet_env.env["nnUNet_extTrainer"].split(os.pathsep)[-1]
    env = {**nnunet_env.env, "nnUNet_results": str(tmp_path_factory.mktemp("method_results")),
           "nnUNet_extTrainer": os.pathsep.join([nnunet_env.env["nnUNet_extTrainer"], str(extra)]),
           "PYTHONPATH": os.pathsep.join(filter(None, [demo_trainers, os.environ.get("PYTHONPATH")])),
           "nnUNet_n_proc_DA": "0"}
    return nnunet_env, env


def train(env: dict, trainer: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "nnUNetv2_train"), str(DATASET_ID), "3d_fullres", "0", "-tr", trainer,
                           "-device", "cpu", *extra], env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def trained(method_env):
    nnunet_env, env = method_env
    with ThreadPoolExecutor(max_workers=2) as pool:
        names = [trained_trainer(method) for method in TRAINED_HERE]
        results = dict(zip(names, pool.map(lambda trainer: train(env, trainer), names)))
    failed = {name: result.stdout[-2000:] + result.stderr[-2000:] for name, result in results.items()
              if result.returncode != 0}
    assert not failed, failed
    return env


def fold_folder(env: dict, trainer: str) -> Path:
    return Path(env["nnUNet_results"]) / DATASET_NAME / f"{trainer}__nnUNetPlans__3d_fullres" / "fold_0"


@pytest.mark.parametrize("method", TRAINED_HERE, ids=lambda method: method.name)
def test_method_trains_with_its_terms_and_reports_calibration(trained, method):
    trainer = trained_trainer(method)
    fold = fold_folder(trained, trainer)
    report = json.loads((fold / "validation" / "calibration.json").read_text())
    pooled = report["summary"]["foreground"]["pooled"]
    assert all(math.isfinite(pooled[name]) for name in ("ece", "classwise_ece", "brier", "nll")), pooled
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == trainer
    logged = checkpoint["logging"]
    terms = method.components(method.dice_weight)
    if terms:  # several terms: each is logged per epoch and they add up to nnU-Net's training loss
        assert sorted(key for key in logged if key.startswith("train_loss_part_")) == sorted(
            f"train_loss_part_{term}" for term in terms)
        parts = [logged[f"train_loss_part_{term}"][0] for term in terms]
        assert sum(parts) == pytest.approx(logged["train_losses"][0], rel=1e-4)
    else:
        assert not any(key.startswith("train_loss_part_") for key in logged)


def test_cals_multipliers_are_checkpointed_and_restored_by_continue(trained):
    trainer = trained_trainer(methods.CALS)
    checkpoint_file = fold_folder(trained, trainer) / "checkpoint_final.pth"
    before = torch.load(checkpoint_file, map_location="cpu", weights_only=False)["nnunet_margin"]["loss_state"]
    lambdas = before["loss.terms.cals.lambdas"]
    assert float(lambdas.max()) > 1e-6, "the epoch's validation must have moved the multipliers off their start"
    log = next(fold_folder(trained, trainer).glob("training_log_*.txt")).read_text()
    assert "CALS lambda mean" in log

    # --c with nothing left to train: nnU-Net loads checkpoint_final, validates and saves it again; without the
    # restore the multipliers would be back at their start values.
    result = train(trained, trainer, "--c")
    assert result.returncode == 0, result.stderr[-3000:]
    after = torch.load(checkpoint_file, map_location="cpu", weights_only=False)["nnunet_margin"]["loss_state"]
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), name
