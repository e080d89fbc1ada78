"""Every trainer builds the loss its name promises: the terms, their weights and the hyper-parameters (the named
variants are one-line subclasses, so this covers them without training each)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from nnunet_margin import losses, trainers

# trainer -> (dice weight, {term: (weight, loss class, {attribute: value})})
EXPECTED = {
    "nnUNetTrainerMbLS": (0.0, {"mbls": (1.0, losses.MbLSLoss, {"margin": 10.0, "alpha": 0.1})}),
    "nnUNetTrainerMbLSDice_m5": (1.0, {"mbls": (1.0, losses.MbLSLoss, {"margin": 5.0})}),
    "nnUNetTrainerMbLS_m10_alpha02": (0.0, {"mbls": (1.0, losses.MbLSLoss, {"margin": 10.0, "alpha": 0.2})}),
    "nnUNetTrainerFocal": (0.0, {"focal": (1.0, losses.FocalLoss, {"gamma": 2.0})}),
    "nnUNetTrainerFocal_g1": (0.0, {"focal": (1.0, losses.FocalLoss, {"gamma": 1.0})}),
    "nnUNetTrainerFocal_g3": (0.0, {"focal": (1.0, losses.FocalLoss, {"gamma": 3.0})}),
    "nnUNetTrainerFocalDice": (1.0, {"focal": (1.0, losses.FocalLoss, {"gamma": 2.0})}),
    "nnUNetTrainerLS": (0.0, {"label_smoothing": (1.0, losses.LabelSmoothingLoss, {"epsilon": 0.1})}),
    "nnUNetTrainerLS_e02": (0.0, {"label_smoothing": (1.0, losses.LabelSmoothingLoss, {"epsilon": 0.2})}),
    "nnUNetTrainerLS_e03": (0.0, {"label_smoothing": (1.0, losses.LabelSmoothingLoss, {"epsilon": 0.3})}),
    "nnUNetTrainerLSDice": (1.0, {"label_smoothing": (1.0, losses.LabelSmoothingLoss, {"epsilon": 0.1})}),
    "nnUNetTrainerECP": (0.0, {"ecp": (1.0, losses.ConfidencePenaltyLoss, {"beta": 0.1})}),
    "nnUNetTrainerECP_b02": (0.0, {"ecp": (1.0, losses.ConfidencePenaltyLoss, {"beta": 0.2})}),
    "nnUNetTrainerECP_b03": (0.0, {"ecp": (1.0, losses.ConfidencePenaltyLoss, {"beta": 0.3})}),
    "nnUNetTrainerECPDice": (1.0, {"ecp": (1.0, losses.ConfidencePenaltyLoss, {"beta": 0.1})}),
    "nnUNetTrainerSVLS": (0.0, {"svls": (1.0, losses.SVLSLoss, {})}),
    "nnUNetTrainerSVLSDice": (1.0, {"svls": (1.0, losses.SVLSLoss, {})}),
    "nnUNetTrainerNACL": (0.0, {"nacl": (1.0, losses.NACLLoss, {"alpha": 0.1})}),
    "nnUNetTrainerNACLDice": (1.0, {"nacl": (1.0, losses.NACLLoss, {"alpha": 0.1})}),
    "nnUNetTrainerHardL1ACE": (1 / 3, {"ce": (1 / 3, losses.LabelSmoothingLoss, {"epsilon": 0.0}),
                                       "ace": (1 / 3, losses.HardL1ACELoss, {})}),
    "nnUNetTrainerSoftL1ACE": (1 / 3, {"ce": (1 / 3, losses.LabelSmoothingLoss, {"epsilon": 0.0}),
                                       "ace": (1 / 3, losses.SoftL1ACELoss, {})}),
    "nnUNetTrainerCALS": (0.0, {"cals": (1.0, losses.CALSLoss, {"margin": 20.0, "num_classes": 4})}),
    "nnUNetTrainerCALS_m10": (0.0, {"cals": (1.0, losses.CALSLoss, {"margin": 10.0})}),
    "nnUNetTrainerCALSDice": (1.0, {"cals": (1.0, losses.CALSLoss, {"margin": 20.0})}),
}


def loss_terms_of(name: str, ignore_label=None):
    """The trainer's loss_terms() without building a trainer: only its label manager is needed."""
    trainer = object.__new__(getattr(trainers, name))
    trainer.label_manager = SimpleNamespace(ignore_label=ignore_label, num_segmentation_heads=4)
    return trainer, trainer.loss_terms()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_trainer_builds_the_loss_its_name_says(name):
    dice_weight, expected_terms = EXPECTED[name]
    trainer, terms = loss_terms_of(name, ignore_label=5)
    assert trainer.dice_weight == pytest.approx(dice_weight)
    assert list(terms) == list(expected_terms)
    for term, (weight, loss_class, attributes) in expected_terms.items():
        actual_weight, loss = terms[term]
        assert actual_weight == pytest.approx(weight)
        assert type(loss) is loss_class
        assert loss.ignore_index == 5
        for attribute, value in attributes.items():
            assert getattr(loss, attribute) == pytest.approx(value), (term, attribute)


def test_every_plugin_loss_trainer_is_listed_here_or_is_margin_calibration():
    loss_trainers = {name for name in trainers.__all__ if issubclass(getattr(trainers, name), trainers.LossTermsTrainer)}
    margin = {name for name in loss_trainers if name.startswith("nnUNetTrainerMarginCalib")}
    assert loss_trainers - margin - {"nnUNetTrainerMbLSDice", "nnUNetTrainerMbLS_m5", "nnUNetTrainerMbLS_m8",
                                     "nnUNetTrainerMbLS_m10", "nnUNetTrainerMbLSDice_m8"} == set(EXPECTED)


def test_trainers_shim_exports_every_trainer():
    from nnunet_margin.ext_trainers import nnunet_margin_trainers as shim

    assert set(shim.__all__) == set(trainers.__all__) and "LossTermsTrainer" not in shim.__all__
