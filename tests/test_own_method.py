"""A new method is three pieces: README.md's "Your own method" example, as written (its code block becomes a module
of an nnUNet_extTrainer folder), holds one loss, one registry entry and one trainer line, and that is enough: the
loss contract of the package's losses, the registry's trainer checks and nnU-Net's trainer lookup accept it, and it
trains one short epoch with the real nnUNetv2_train."""

from __future__ import annotations

import importlib
import inspect
import json
import math
import os
import sys

import pytest
import torch

from nnunet_margin import methods
from nnunet_margin.losses import SegmentationLoss
from nnunet_margin.nnunet import _seams
from nnunet_margin.trainers import MethodTrainer

from conftest import DATASET_ID, DEMO_TRAINERS, REPO
from loss_checks import check_no_host_synchronisation, contract_checks
from trainer_checks import check_trainer_builds_its_loss

MODULE = "nnunet_margin_own_method"


def readme_example() -> str:
    """The Python code block of README.md's "Your own method" section."""
    section = (REPO / "README.md").read_text().split("### Your own method", 1)[1]
    return section.split("```python\n", 1)[1].split("```\n", 1)[0]


@pytest.fixture(scope="module")
def own_folder(tmp_path_factory):
    """An nnUNet_extTrainer folder holding the README example as a module."""
    folder = tmp_path_factory.mktemp("own_method")
    (folder / f"{MODULE}.py").write_text(readme_example())
    return folder


@pytest.fixture(scope="module")
def own_module(own_folder):
    sys.path.insert(0, str(own_folder))
    try:
        yield importlib.import_module(MODULE)
    finally:
        sys.path.remove(str(own_folder))
        sys.modules.pop(MODULE, None)


def pieces(module) -> tuple[type, methods.Method, list[type]]:
    """The module's loss, registry entry and trainers (those it defines)."""
    classes = [value for value in vars(module).values()
               if inspect.isclass(value) and value.__module__ == module.__name__]
    [loss] = [value for value in classes if issubclass(value, SegmentationLoss)]
    [method] = [value for value in vars(module).values() if isinstance(value, methods.Method)]
    trainers = [value for value in classes if issubclass(value, MethodTrainer)]
    return loss, method, trainers


def test_the_readme_method_is_a_loss_an_entry_and_a_trainer_line(own_module):
    loss, method, trainers = pieces(own_module)
    assert method.loss is loss
    base = [trainer for trainer in trainers if "method" in vars(trainer)]
    assert [trainer.__name__ for trainer in base] == [method.trainer]
    assert len(inspect.getsource(base[0]).strip().splitlines()) == 1  # one trainer line
    assert base[0].entropy_ce_weight == method.settings["weight"]  # the settings became class attributes


def test_the_readme_method_meets_the_loss_contract(own_module):
    _, method, _ = pieces(own_module)
    for settings in method.test_settings:
        for check in contract_checks(method):
            check(method, settings)
        check_no_host_synchronisation(method, settings)


def test_the_registry_checks_and_nnunets_lookup_accept_the_readme_trainers(own_module, own_folder, monkeypatch):
    _, method, trainers = pieces(own_module)
    registry = methods.METHODS + (method,)
    assert methods.method_of(method.trainer, registry) is method
    for trainer in trainers:
        with_dice = trainer.__name__.endswith("Dice")
        check_trainer_builds_its_loss(trainer, method, dict(method.settings), 1.0 if with_dice else 0.0)
    monkeypatch.setenv("nnUNet_extTrainer", str(own_folder))
    for trainer in trainers:
        found = _seams.find_trainer_class(trainer.__name__)
        assert found.__name__ == trainer.__name__ and issubclass(found, MethodTrainer)


SHORT_TRAINER = '''
from nnunet_margin_demo_trainers import ShortSchedule
from nnunet_margin_own_method import nnUNetTrainerEntropyCEDice


class nnUNetTrainerEntropyCEDice_short(ShortSchedule, nnUNetTrainerEntropyCEDice):
    pass
'''


@pytest.mark.e2e
def test_the_readme_method_trains_one_short_epoch(nnunet_env, own_module, own_folder, tmp_path):
    _, method, _ = pieces(own_module)
    (own_folder / "nnunet_margin_own_method_short.py").write_text(SHORT_TRAINER)
    trainer = "nnUNetTrainerEntropyCEDice_short"
    nnunet_env.run("nnUNetv2_train", str(DATASET_ID), "3d_fullres", "0", "-tr", trainer, "-device", "cpu",
                   nnUNet_results=tmp_path, nnUNet_extTrainer=own_folder, nnUNet_n_proc_DA="0",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(DEMO_TRAINERS), os.environ.get("PYTHONPATH")])))
    fold = tmp_path / nnunet_env.results(trainer).relative_to(nnunet_env.root / "results") / "fold_0"
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == trainer
    logged = checkpoint["logging"]
    terms = method.components(dice_weight=1.0)
    assert terms == ["entropy_ce", "dice"]
    parts = [logged[f"train_loss_part_{term}"][0] for term in terms]
    assert sum(parts) == pytest.approx(logged["train_losses"][0], rel=1e-4)
    report = json.loads((fold / "validation" / "calibration.json").read_text())
    assert all(math.isfinite(report["summary"]["foreground"]["pooled"][name]) for name in ("ece", "nll"))
