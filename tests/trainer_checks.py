"""Trainer checks shared by tests/test_trainers.py and tests/test_own_method.py: a trainer object without nnU-Net's
construction, and the check that it builds the loss of its registry entry."""

from __future__ import annotations

from types import SimpleNamespace

from nnunet_margin import losses, trainers
from nnunet_margin.losses import margin_offsets
from nnunet_margin.methods import Method


def trainer_of(trainer_class: type, ignore_label=None, num_classes=4):
    """A trainer object without nnU-Net's construction: loss_terms() needs only its label manager (and margin
    calibration its fold's offsets, set here as if counted)."""
    trainer = object.__new__(trainer_class)
    trainer.label_manager = SimpleNamespace(ignore_label=ignore_label, num_segmentation_heads=num_classes)
    if isinstance(trainer, trainers.nnUNetTrainerMarginCalib):
        settings = trainer.method_settings()
        offsets = margin_offsets([500, 300, 150, 50], tau=settings["tau"], upsilon=settings["upsilon"])
        trainer.fold_offsets = {"rho_k0": offsets.rho_k0.tolist(), "rho_0k": offsets.rho_0k.tolist()}
    return trainer


def check_trainer_builds_its_loss(trainer_class: type, method: Method, settings: dict, dice_weight: float) -> None:
    """The trainer trains `method` with `settings` and `dice_weight`: its loss terms are the method's term (beside a
    plain cross-entropy where the method has one), of the method's loss class, weights and settings."""
    trainer = trainer_of(trainer_class, ignore_label=5)
    assert trainer_class.method is method
    assert trainer.method_settings() == settings
    assert trainer.dice_weight == dice_weight
    terms = trainer.loss_terms()
    assert list(terms) == (["ce"] if method.cross_entropy_weight else []) + [method.term]
    weight, loss = terms[method.term]
    assert weight == method.weight and type(loss) is method.loss and loss.ignore_index == 5
    for setting, value in settings.items():
        if hasattr(loss, setting):  # margin calibration's tau, upsilon, empty_classes shape its offsets instead
            assert getattr(loss, setting) == value, setting
    if method.cross_entropy_weight:
        weight, cross_entropy = terms["ce"]
        assert weight == method.cross_entropy_weight
        assert type(cross_entropy) is losses.LabelSmoothingLoss and cross_entropy.epsilon == 0.0
    if "num_classes" in method.context:
        assert loss.num_classes == 4
