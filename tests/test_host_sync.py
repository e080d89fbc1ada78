"""No host synchronisation in a training step: every loss's forward+backward and every plugin trainer's train_step
make no call that waits for the device, counted on the CPU both as Python-level tensor methods and as aten ops.

On a GPU each of these calls (`.item()`, `.tolist()`, `bool()`, `float()`, boolean-mask indexing, `nonzero`, ...)
stalls the pipeline until the device has caught up. nnU-Net's own train_step makes one (`loss.cpu().numpy()`);
a plugin trainer must make exactly the calls nnU-Net's makes.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import nnunet_margin.losses as losses_module
from nnunet_margin import trainers
from nnunet_margin.losses import SegmentationLoss, margin_offsets

SYNC_OPS = {"_local_scalar_dense", "nonzero", "nonzero_static", "masked_select", "equal", "is_nonzero", "item"}
SYNC_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu")


class SyncCounter(TorchDispatchMode):
    """Counts aten ops that synchronise (and indexing with a boolean mask, which calls nonzero)."""

    def __init__(self, calls: collections.Counter):
        super().__init__()
        self.calls = calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in SYNC_OPS:
            self.calls[f"aten.{name}"] += 1
        if name in ("index", "index_put", "index_put_") and any(
                isinstance(index, torch.Tensor) and index.dtype == torch.bool
                for index in (args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else [])):
            self.calls[f"aten.{name}(bool mask)"] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def counting_syncs():
    """Yields a Counter of synchronising calls made inside the block."""
    calls = collections.Counter()
    originals = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}

    def counted(name, original):
        def method(self, *args, **kwargs):
            calls[f"Tensor.{name}"] += 1
            return original(self, *args, **kwargs)
        return method

    for name, original in originals.items():
        setattr(torch.Tensor, name, counted(name, original))
    try:
        with SyncCounter(calls):
            yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def all_losses() -> dict[str, SegmentationLoss]:
    """One instance of every SegmentationLoss the package exports, with an ignore label."""
    made = {}
    for name in losses_module.__all__:
        cls = getattr(losses_module, name)
        if not (inspect.isclass(cls) and issubclass(cls, SegmentationLoss) and cls is not SegmentationLoss):
            continue
        if cls is losses_module.MarginCalibrationLoss:
            made[name] = cls(*margin_offsets([500, 300, 150, 50]), ignore_index=4)
        elif cls is losses_module.CALSLoss:
            made[name] = cls(4, ignore_index=4)
        else:
            made[name] = cls(ignore_index=4)
    return made


def test_the_counter_sees_what_it_looks_for():
    with counting_syncs() as calls:
        x = torch.randn(4)
        float(x.sum())
        x[x > 0]
        x.tolist()
    assert calls["Tensor.__float__"] == 1 and calls["Tensor.tolist"] == 1
    assert calls["aten.index(bool mask)"] == 1


@pytest.mark.parametrize("name", sorted(all_losses()))
def test_loss_forward_and_backward_make_no_host_synchronisation(name):
    loss = all_losses()[name]
    loss.check_inputs = False  # as the trainers use them; the checks are asynchronous asserts otherwise
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 4, 6, 7, 5, generator=generator) * 3).requires_grad_()
    target = torch.randint(0, 5, (2, 1, 6, 7, 5), generator=generator)  # label 4 is the ignore label
    with counting_syncs() as calls:
        loss(logits, target).backward()
    assert dict(calls) == {}
    loss.check_inputs = True
    with counting_syncs() as calls:
        loss(logits.detach(), target)
    assert dict(calls) == {}, "the input checks must stay asynchronous"


# One trainer per loss (the named variants differ only in hyper-parameters), Dice variants for the Dice term.
PLUGIN_TRAINERS = ["nnUNetTrainerWithCalibration", "nnUNetTrainerMarginCalib", "nnUNetTrainerMarginCalibDice",
                   "nnUNetTrainerMbLS", "nnUNetTrainerMbLSDice", "nnUNetTrainerFocal", "nnUNetTrainerLS",
                   "nnUNetTrainerECP", "nnUNetTrainerSVLS", "nnUNetTrainerNACL", "nnUNetTrainerHardL1ACE",
                   "nnUNetTrainerSoftL1ACE", "nnUNetTrainerCALSDice"]


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


def train_step_calls(trainer) -> collections.Counter:
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
    trainer = initialized(trainers.nnUNetTrainerWithCalibration)
    assert train_step_calls(trainer) == reference
    for name in PLUGIN_TRAINERS[1:]:
        # one initialised trainer, switched to each class: their train_step is shared, their losses differ
        trainer.__class__ = getattr(trainers, name)
        trainer.loss, trainer._part_sums = trainer._build_loss(), None
        assert train_step_calls(trainer) == reference, name

    # a diverging network still stops training with a clear message, from nnU-Net's own host copy of the loss
    # (last: the step leaves NaN weights behind)
    nan_batch = {**batch_for(trainer), "data": torch.full_like(batch_for(trainer)["data"], float("nan"))}
    with pytest.raises(FloatingPointError, match="the network produced NaN/inf logits"):
        trainer.train_step(nan_batch)
