"""No host synchronisation in a training step: every registry method's loss (forward, backward and, where it has
one, its validation statistics) and every plugin trainer's train_step make no call that waits for the device, counted
on the CPU by the one detector of the tests (tests/host_sync.py).

nnU-Net's own train_step makes one (`loss.cpu().numpy()`); a plugin trainer must make exactly the calls nnU-Net's
makes.
"""

from __future__ import annotations

import json

import pytest
import torch

from nnunet_margin import methods, trainers

from host_sync import counting_syncs
from loss_checks import check_no_host_synchronisation


@pytest.mark.parametrize("operation, counted", [
    (lambda t: t.sum().item(), "Tensor.item"),
    (lambda t: t.nonzero(), "aten.nonzero"),
    (lambda t: t[t > 0], "aten.index(bool mask)"),
    (lambda t: bool(t.sum() > 0), "Tensor.__bool__"),
    (lambda t: torch.equal(t, t), "aten.equal"),
    (lambda t: t.masked_select(t > 0), "aten.masked_select"),
    (lambda t: float(t.sum()), "Tensor.__float__"),
    (lambda t: t.tolist(), "Tensor.tolist"),
], ids=["item", "nonzero", "mask-index", "bool", "equal", "masked_select", "float", "tolist"])
def test_the_counter_sees_what_it_looks_for(operation, counted):
    with counting_syncs() as calls:
        operation(torch.randn(3, 4))
    assert calls[counted] == 1


@pytest.mark.parametrize("method", methods.METHODS, ids=lambda method: method.name)
def test_loss_forward_backward_and_validation_statistics_make_no_host_synchronisation(method):
    for settings in method.test_settings:
        check_no_host_synchronisation(method, settings)


def one_trainer_per_loss() -> list[str]:
    """The baseline and, per method, a trainer with nnU-Net's Dice (its Dice variant, or the trainer itself where it
    has Dice already), so that every term of every plugin loss is stepped once."""
    chosen = [methods.BASELINE_TRAINER]
    for method in methods.METHODS:
        with_dice = [name for name in method.trainers if getattr(trainers, name).dice_weight
                     and set(method.variants.get(name, {})) <= {"dice_weight"}]
        chosen.append(with_dice[0] if with_dice else method.trainer)
    return chosen


@pytest.fixture(scope="module")
def trainer_inputs(nnunet_env, tmp_path_factory):
    plans = json.loads((nnunet_env.preprocessed / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((nnunet_env.preprocessed / "dataset.json").read_text())
    results = tmp_path_factory.mktemp("sync_results")
    with pytest.MonkeyPatch.context() as patch:
        for variable in ("nnUNet_raw", "nnUNet_preprocessed"):
            patch.setenv(variable, nnunet_env.env[variable])
        patch.setenv("nnUNet_results", str(results))
        yield plans, dataset_json


def batch_for(trainer) -> dict:
    patch = trainer.configuration_manager.patch_size
    generator = torch.Generator().manual_seed(0)
    targets = [torch.randint(0, 4, (2, 1, *[max(1, round(p * s)) for p, s in zip(patch, scale)]),
                             generator=generator).float()
               for scale in trainer._get_deep_supervision_scales()]
    return {"data": torch.randn(2, 1, *patch, generator=generator), "target": targets}


def train_step_calls(trainer):
    trainer.network.train()
    batch = batch_for(trainer)
    with counting_syncs() as calls:
        trainer.train_step(batch)
    return calls


def test_train_step_adds_no_synchronisation_to_nnunets(trainer_inputs):
    plans, dataset_json = trainer_inputs

    def initialized(trainer_class):
        trainer = trainer_class({**plans, "continue_training": False}, "3d_fullres", 0, dataset_json,
                                device=torch.device("cpu"))
        trainer.initialize()
        return trainer

    reference = train_step_calls(initialized(trainers.nnUNetTrainer))
    assert reference == {"Tensor.cpu": 1, "Tensor.numpy": 1}  # nnU-Net's own: l.detach().cpu().numpy()
    baseline, *method_trainers = one_trainer_per_loss()
    trainer = initialized(getattr(trainers, baseline))
    assert train_step_calls(trainer) == reference
    for name in method_trainers:
        # one initialised trainer, switched to each class: their train_step is shared, their losses differ
        trainer.__class__ = getattr(trainers, name)
        trainer.loss, trainer._part_sums = trainer._build_loss(), None
        assert "dice" in trainer.loss.loss.terms, name
        assert train_step_calls(trainer) == reference, name

    # a diverging network still stops training with a clear message, from nnU-Net's own host copy of the loss
    # (last: the step leaves NaN weights behind)
    nan_batch = {**batch_for(trainer), "data": torch.full_like(batch_for(trainer)["data"], float("nan"))}
    with pytest.raises(FloatingPointError, match="the network produced NaN/inf logits"):
        trainer.train_step(nan_batch)
