"""Every trainer belongs to the method registry and builds the loss its entry and its name promise (the named variants
are one-line subclasses, so this covers them without training each); bad weights and settings are refused when the
loss is built, naming the trainer, the attribute and the fix."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

from nnunet_margin import losses, methods, trainers

from trainer_checks import check_trainer_builds_its_loss, trainer_of


def unregistered_trainers(registry: tuple[methods.Method, ...]) -> list[str]:
    """The plugin's trainers that the registry does not list."""
    return sorted(set(trainers.__all__) - set(methods.trainer_names(registry)))


@pytest.mark.parametrize("name", trainers.__all__)
def test_every_plugin_trainer_is_in_the_registry(name):
    method = getattr(getattr(trainers, name), "method", None)
    assert name not in unregistered_trainers(methods.METHODS), (
        f"{name} (method {method.name if method else None!r}) is not in the method registry: add it to its entry's "
        f"trainer or variants in nnunet_margin/methods.py")


def test_removing_a_method_from_the_registry_leaves_its_trainer_unregistered():
    without_mbls = tuple(method for method in methods.METHODS if method is not methods.MBLS)
    assert {"nnUNetTrainerMbLS", "nnUNetTrainerMbLSDice_m5"} <= set(unregistered_trainers(without_mbls))


@pytest.mark.parametrize("name", methods.trainer_names())
def test_every_registry_trainer_exists_with_its_method(name):
    assert name in trainers.__all__, f"the registry lists {name}, which nnunet_margin/trainers.py does not define"
    trainer_class = getattr(trainers, name)
    if name == methods.BASELINE_TRAINER:
        assert not issubclass(trainer_class, trainers.MethodTrainer)
        return
    method = methods.method_of(name)
    assert trainer_class.method is method
    assert issubclass(trainer_class, getattr(trainers, method.trainer))


@pytest.mark.parametrize("name", methods.trainer_names()[1:])
def test_trainer_builds_the_loss_of_its_registry_entry(name):
    method = methods.method_of(name)
    changed = method.variants.get(name, {})
    settings = {**method.settings, **{method.attributes[key]: value for key, value in changed.items()
                                      if key != "dice_weight"}}
    check_trainer_builds_its_loss(getattr(trainers, name), method, settings,
                                  changed.get("dice_weight", method.dice_weight))


# The defaults docs/methods.md gives (sections 1a, 1c, 2, 4a-4g): what each method's base trainer trains with.
DOCUMENTED_DEFAULTS = {
    "margin_calibration": {"tau": 10.0, "upsilon": 1.0, "empty_classes": "error", "form": "released"},
    "mbls": {"margin": 10.0, "alpha": 0.1, "schedule": None},
    "focal": {"gamma": 2.0},
    "label_smoothing": {"epsilon": 0.1},
    "ecp": {"beta": 0.1},
    "svls": {"sigma": 1.0},
    "nacl": {"alpha": 0.1, "kernel_size": 3, "kernel": "mean", "distance": "l1"},
    "hard_l1ace": {"num_bins": 20},
    "soft_l1ace": {"num_bins": 20, "empty_weight": 0.01},
    "cals": {"margin": 20.0, "lambda_min": 1e-6, "lambda_max": 1e6, "rho_min": 1.0, "rho_max": 10.0, "rho_step": 10,
             "rho_growth": 1.2, "rho_tolerance": 0.9},
}


@pytest.mark.parametrize("method", methods.METHODS, ids=lambda method: method.name)
def test_base_trainers_train_with_the_documented_defaults(method):
    settings = trainer_of(getattr(trainers, method.trainer)).method_settings()
    assert {key: settings[key] for key in DOCUMENTED_DEFAULTS[method.name]} == DOCUMENTED_DEFAULTS[method.name]
    # mL1-ACE: nnU-Net's Dice, CE and the ACE term a third each (docs/methods.md 4f); every other base: no Dice
    ace = method.name.endswith("l1ace")
    assert getattr(trainers, method.trainer).dice_weight == pytest.approx(1 / 3 if ace else 0.0)
    assert (method.weight, method.cross_entropy_weight) == ((1 / 3, 1 / 3) if ace else (1.0, 0.0))


# A variant's name records what it changes: "Dice" after the base name, then "_<token><number>" per setting, with
# "0" first meaning a decimal point after it ("e02" = epsilon 0.2); or a word for a setting's named value.
ABBREVIATIONS = {"m": "margin", "alpha": "alpha", "g": "gamma", "e": "epsilon", "b": "beta", "tau": "tau"}
WORDS = {"paperLoss": ("form", "paper"), "emptyAsOne": ("empty_classes", "count_as_one")}


def settings_named_by(name: str, base: str) -> dict:
    rest = name.removeprefix(base)
    named = {}
    if rest.startswith("Dice"):
        named["dice_weight"], rest = 1.0, rest.removeprefix("Dice")
    for token in filter(None, rest.split("_")):
        if token in WORDS:
            setting, value = WORDS[token]
        else:
            abbreviation, digits = re.fullmatch(r"([a-z]+)(\d+)", token).groups()
            setting = ABBREVIATIONS[abbreviation]
            value = float(f"0.{digits[1:]}") if digits.startswith("0") else float(digits)
        named[setting] = value
    return named


@pytest.mark.parametrize("name", [name for method in methods.METHODS for name in method.variants])
def test_variant_names_record_what_they_change(name):
    method = methods.method_of(name)
    assert name.startswith(method.trainer), f"{name} must start with its method's trainer {method.trainer}"
    named = settings_named_by(name, method.trainer)
    trainer = trainer_of(getattr(trainers, name))
    effective = {**trainer.method_settings(), "dice_weight": trainer.dice_weight}
    assert {setting: effective[setting] for setting in named} == named
    changed = {method.attributes.get(key, key) for key in method.variants[name]}
    assert changed <= set(named), f"{name} changes {sorted(changed - set(named))} without saying so in its name"


def test_trainers_shim_exports_every_trainer():
    from nnunet_margin.ext_trainers import nnunet_margin_trainers as shim

    assert set(shim.__all__) == set(trainers.__all__) and "LossTermsTrainer" not in shim.__all__


# --- refused before the first epoch -----------------------------------------------------------------------------------

def subclass(base: type, name: str, **attributes) -> type:
    return type(name, (base,), attributes)


@pytest.mark.parametrize("dice_weight", [-1.0, float("nan"), float("inf"), "1"])
def test_a_bad_dice_weight_is_refused_naming_the_trainer_and_the_fix(dice_weight):
    trainer = trainer_of(trainers.nnUNetTrainerMbLS)
    trainer.__class__ = subclass(trainers.nnUNetTrainerMbLS, "nnUNetTrainerMbLS_badDice", dice_weight=dice_weight)
    with pytest.raises(ValueError, match=re.escape(f"nnUNetTrainerMbLS_badDice.dice_weight = {dice_weight!r}: ") +
                       r".* must be a finite number >= 0 \(0: no Dice term\)\. Set dice_weight in the trainer class"):
        trainer._build_loss()


class OwnTermsTrainer(trainers.LossTermsTrainer):
    terms: dict = {}

    def loss_terms(self):
        return dict(self.terms)


@pytest.mark.parametrize("terms, error, message", [
    ({"x": (-1.0, losses.FocalLoss())}, ValueError,
     "term 'x' the weight -1.0; a term weight must be a finite number > 0"),
    ({"x": (float("nan"), losses.FocalLoss())}, ValueError, "term 'x' the weight nan"),
    ({"x": (0.0, losses.FocalLoss())}, ValueError, "leave the term out to drop it"),
    ({"x": (1.0, nn.CrossEntropyLoss())}, TypeError,
     "term 'x' a CrossEntropyLoss, which is no nnunet_margin.losses.SegmentationLoss"),
    ({"x": losses.FocalLoss()}, TypeError, "each term is a pair"),
    ({}, TypeError, "the loss terms are a non-empty dict"),
])
def test_loss_terms_other_than_weighted_segmentation_losses_are_refused(terms, error, message):
    trainer = trainer_of(trainers.nnUNetTrainerMbLS)
    trainer.__class__ = subclass(OwnTermsTrainer, "nnUNetTrainerOwn_test", terms=terms)
    with pytest.raises(error, match=re.escape("nnUNetTrainerOwn_test.loss_terms() gives ") + ".*" +
                       re.escape(message)):
        trainer._build_loss()


def test_a_misspelt_setting_is_refused_naming_the_attribute():
    trainer = trainer_of(trainers.nnUNetTrainerMbLS)
    trainer.__class__ = subclass(trainers.nnUNetTrainerMbLS, "nnUNetTrainerMbLS_typo", mbls_margn=5.0)
    with pytest.raises(ValueError, match="nnUNetTrainerMbLS_typo sets mbls_margn, which method 'mbls' does not "
                                         "know; its settings are mbls_margin, mbls_alpha"):
        trainer.loss_terms()


def test_a_setting_under_its_former_name_is_refused_naming_the_new_one():
    trainer = trainer_of(trainers.nnUNetTrainerMarginCalib)
    trainer.__class__ = subclass(trainers.nnUNetTrainerMarginCalib, "nnUNetTrainerMarginCalib_old", tau=5.0)
    with pytest.raises(ValueError, match=r"nnUNetTrainerMarginCalib_old sets tau \(now called margin_tau\)"):
        trainer.method_settings()


def test_a_bad_setting_is_refused_naming_the_trainer():
    trainer = trainer_of(trainers.nnUNetTrainerMbLS)
    trainer.__class__ = subclass(trainers.nnUNetTrainerMbLS, "nnUNetTrainerMbLS_negative", mbls_margin=-1.0)
    with pytest.raises(ValueError, match=r"nnUNetTrainerMbLS_negative \(settings from its attributes mbls_\*\): "
                                         r"margin must be >= 0, got -1.0"):
        trainer.loss_terms()


def test_nnunet_initialize_refuses_a_bad_dice_weight_before_the_first_epoch(nnunet_env, tmp_path, monkeypatch):
    """Issue 16.11 on the generated dataset: initialize(), which nnU-Net's on_train_start calls before any epoch,
    builds the loss and refuses dice_weight = -1 (which trained against Dice before) and nan."""
    for variable in ("nnUNet_raw", "nnUNet_preprocessed"):
        monkeypatch.setenv(variable, nnunet_env.env[variable])
    monkeypatch.setenv("nnUNet_results", str(tmp_path))
    plans = json.loads((nnunet_env.preprocessed / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((nnunet_env.preprocessed / "dataset.json").read_text())
    for dice_weight in (-1.0, float("nan")):
        trainer_class = subclass(trainers.nnUNetTrainerMbLSDice, "nnUNetTrainerMbLSDice_bad", dice_weight=dice_weight)
        trainer = trainer_class({**plans, "continue_training": False}, "3d_fullres", 0, dataset_json,
                                device=torch.device("cpu"))
        with pytest.raises(ValueError, match=r"nnUNetTrainerMbLSDice_bad\.dice_weight = (-1\.0|nan): "):
            trainer.initialize()
        assert not trainer.was_initialized
