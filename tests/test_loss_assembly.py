"""Loss assembly against nnU-Net's own implementations of the same pieces."""

import numpy as np
import pytest
import torch
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

from nnunet_margin.losses import MbLSLoss
from nnunet_margin.nnunet.loss_assembly import DeepSupervisedLoss, LossTerms, SoftDiceLoss, deep_supervision_weights


@pytest.mark.parametrize("num_outputs, is_ddp, compiled, expected", [
    (4, False, False, [1, 0.5, 0.25, 0]),
    (4, True, False, [1, 0.5, 0.25, 1e-6]),  # DDP without compile: tiny weight instead of 0
    (4, True, True, [1, 0.5, 0.25, 0]),
    (2, False, False, [1, 0]),
])
def test_deep_supervision_weights_follow_nnunet(num_outputs, is_ddp, compiled, expected):
    expected = np.array(expected) / np.sum(expected)
    np.testing.assert_allclose(deep_supervision_weights(num_outputs, is_ddp, compiled), expected)


def multiscale_inputs(num_classes=3, ignore_label=None, seed=0):
    generator = torch.Generator().manual_seed(seed)
    outputs, targets = [], []
    for size in (8, 4, 2):
        outputs.append(torch.randn(2, num_classes, size, size, size, generator=generator, dtype=torch.float64))
        target = torch.randint(0, num_classes, (2, 1, size, size, size), generator=generator).to(torch.int16)
        if ignore_label is not None:
            target[:, :, :1] = ignore_label
        targets.append(target)
    return outputs, targets


def nnunet_default_loss(ignore_label):
    return DC_and_CE_loss({"batch_dice": False, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                          weight_dice=1, ignore_label=ignore_label, dice_class=MemoryEfficientSoftDiceLoss)


@pytest.mark.parametrize("ignore_label", [None, 3])
def test_dice_plus_mbls_without_penalty_equals_nnunet_default_loss(ignore_label):
    outputs, targets = multiscale_inputs(ignore_label=ignore_label)
    weights = deep_supervision_weights(3, False, False)
    ours = DeepSupervisedLoss(LossTerms(mbls=(1.0, MbLSLoss(alpha=0.0, ignore_index=ignore_label)),
                                        dice=(1.0, SoftDiceLoss(False, False, ignore_label))), weights)
    reference = DeepSupervisionWrapper(nnunet_default_loss(ignore_label), weights)
    ours_inputs = [o.clone().requires_grad_() for o in outputs]
    reference_inputs = [o.clone().requires_grad_() for o in outputs]
    value = ours(ours_inputs, targets)
    expected = reference(reference_inputs, [t.clone() for t in targets])
    torch.testing.assert_close(value, expected)
    value.backward()
    expected.backward()
    for mine, theirs in zip(ours_inputs, reference_inputs):
        torch.testing.assert_close(mine.grad, theirs.grad)


def test_components_are_weighted_like_the_loss():
    outputs, targets = multiscale_inputs()
    weights = [0.6, 0.4, 0.0]
    terms = LossTerms(mbls=(1.0, MbLSLoss(margin=0.5, alpha=0.3)), dice=(2.0, SoftDiceLoss(False, False)))
    loss = DeepSupervisedLoss(terms, weights)
    total = loss(outputs, targets)
    assert set(loss.components) == {"mbls_ce", "mbls_penalty", "dice"}
    assert float(sum(loss.components.values())) == pytest.approx(float(total), rel=1e-6)  # dice is float32
    expected_penalty = sum(w * MbLSLoss(margin=0.5, alpha=0.3).parts(o, t).terms["penalty"]
                           for w, o, t in zip(weights, outputs, targets))
    assert float(loss.components["mbls_penalty"]) == pytest.approx(float(expected_penalty), rel=1e-12)


def test_plain_tensors_when_deep_supervision_is_off():
    outputs, targets = multiscale_inputs()
    loss = DeepSupervisedLoss(LossTerms(mbls=(1.0, MbLSLoss())), [1.0])
    assert float(loss(outputs[0], targets[0])) == pytest.approx(float(MbLSLoss()(outputs[0], targets[0])))


@pytest.mark.parametrize("weights, message", [([0.0, 0.0], "non-zero")])
def test_deep_supervision_rejects_all_zero_weights(weights, message):
    with pytest.raises(ValueError, match=message):
        DeepSupervisedLoss(LossTerms(mbls=(1.0, MbLSLoss())), weights)


def test_deep_supervision_rejects_more_outputs_than_weights():
    outputs, targets = multiscale_inputs()
    with pytest.raises(ValueError, match="3 outputs and 3 targets for 2"):
        DeepSupervisedLoss(LossTerms(mbls=(1.0, MbLSLoss())), [0.5, 0.5])(outputs, targets)


def test_loss_terms_are_segmentation_losses_only():
    """A raw torch loss would get nnU-Net's (B, 1, ...) target unchecked and no ignore label."""
    with pytest.raises(TypeError, match="term 'ce' a CrossEntropyLoss, which is no nnunet_margin.losses."):
        LossTerms(ce=(1.0, torch.nn.CrossEntropyLoss()))
