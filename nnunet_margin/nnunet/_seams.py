"""Every place where nnunet-margin relies on nnU-Net beyond its command line: one small function per seam.

Everything else in the package imports nnU-Net through this module. Each seam says what it assumes; `SEAMS` lists
them with a check of that assumption against the installed nnU-Net, which `nnunet-margin doctor` runs and
tests/test_seams.py runs one test each, so a changed nnU-Net fails with the name of the seam that broke.

Verified with nnunetv2 2.8.0 and 2.8.1 (`VERIFIED_VERSIONS`). Importing this module with another version warns once,
naming the seams to re-verify; it never breaks nnU-Net's trainer lookup.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import json
import warnings
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from nnunetv2.configuration import default_num_processes
from nnunetv2.inference import export_prediction as _export_module
from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as _trainer_module
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.label_handling.label_handling import LabelManager
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

VERIFIED_VERSIONS = ("2.8.0", "2.8.1")
NNUNET_VERSION = version("nnunetv2")

__all__ = ["NNUNET_VERSION", "SEAMS", "VERIFIED_VERSIONS", "PlansManager", "default_num_processes", "nnUNetTrainer"]


class SeamError(RuntimeError):
    """nnU-Net no longer behaves as a seam assumes."""

    def __init__(self, seam: str, problem: str):
        super().__init__(f"nnU-Net seam '{seam}' is broken with nnunetv2 {NNUNET_VERSION} (verified: "
                         f"{', '.join(VERIFIED_VERSIONS)}): {problem}. Install nnunetv2 "
                         f"{VERIFIED_VERSIONS[-1]} or report this at nnunet-margin.")
        self.seam = seam


@dataclass(frozen=True)
class Seam:
    name: str
    assumption: str
    check: Callable[[], None]  # raises SeamError when the assumption does not hold


SEAMS: dict[str, Seam] = {}


def _seam(name: str, assumption: str):
    """Register the decorated function as the check of seam `name`."""
    def register(check: Callable[[], None]) -> Callable[[], None]:
        SEAMS[name] = Seam(name, assumption, check)
        return check
    return register


def _require(seam: str, condition: bool, problem: str) -> None:
    if not condition:
        raise SeamError(seam, problem)


def _source(function: Callable) -> str:
    return inspect.getsource(function)


# --- training ----------------------------------------------------------------------------------------------------

def deep_supervision_output_count(trainer: nnUNetTrainer) -> int:
    """Number of network outputs under deep supervision, as nnU-Net's own loss weighting counts them."""
    return len(trainer._get_deep_supervision_scales())


def uses_torch_compile(trainer: nnUNetTrainer) -> bool:
    """Whether nnU-Net compiles this trainer's network (its deep-supervision weights depend on it under DDP)."""
    return trainer._do_i_compile()


@_seam("deep_supervision", "nnUNetTrainer._get_deep_supervision_scales() lists one scale per weighted network output "
                           "and _do_i_compile() says whether torch.compile is used")
def _check_deep_supervision() -> None:
    for method in ("_get_deep_supervision_scales", "_do_i_compile"):
        _require("deep_supervision", callable(getattr(nnUNetTrainer, method, None)), f"nnUNetTrainer.{method} is gone")
    source = _source(nnUNetTrainer._build_loss)
    _require("deep_supervision", "len(deep_supervision_scales)" in source and "weights[-1] = 1e-6" in source,
             "nnUNetTrainer._build_loss weights the deep-supervision outputs differently")


def register_log_key(trainer: nnUNetTrainer, key: str) -> None:
    """Let nnU-Net's logger accept a new per-epoch key; epochs logged before it existed (a resumed checkpoint) get
    NaN, since LocalLogger only logs registered keys and checks the epoch index."""
    logged = trainer.logger.local_logger.my_fantastic_logging
    logged.setdefault(key, [float("nan")] * trainer.current_epoch)


@_seam("logger_keys", "MetaLogger.local_logger.my_fantastic_logging maps each logged key to its per-epoch list")
def _check_logger_keys() -> None:
    from nnunetv2.training.logging.nnunet_logger import LocalLogger

    _require("logger_keys", isinstance(getattr(LocalLogger(), "my_fantastic_logging", None), dict),
             "LocalLogger has no my_fantastic_logging dict")


def fold_split(trainer: nnUNetTrainer) -> tuple[list[str], list[str]]:
    """The fold's training and validation cases, from nnU-Net's own split (which may write splits_final.json, as
    training does)."""
    train, validation = trainer.do_split()
    return list(train), list(validation)


def fold_training_cases(preprocessed_dataset_folder: Path, all_cases: list[str], fold: str | None) -> list[str]:
    """The training cases of `fold` as nnU-Net's do_split defines them, read-only (no splits file is written), for
    commands that run outside a trainer."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    if fold is None or fold == "all":
        return all_cases
    if not fold.isdigit():
        raise ValueError(f"fold must be a number or 'all', got {fold!r}")
    splits_file = preprocessed_dataset_folder / "splits_final.json"
    splits = json.loads(splits_file.read_text()) if splits_file.is_file() else \
        generate_crossval_split(sorted(all_cases), seed=12345, n_splits=5)
    if int(fold) < len(splits):
        return list(splits[int(fold)]["train"])
    # nnU-Net's do_split for a fold beyond the split file: a seeded random 80:20 split
    keys = np.sort(all_cases)
    chosen = np.random.RandomState(seed=12345 + int(fold)).choice(len(keys), int(len(keys) * 0.8), replace=False)
    return [str(keys[index]) for index in chosen]


def cross_validation_fold_count(preprocessed_dataset_folder: Path) -> int:
    """The folds of nnU-Net's cross-validation split: those of splits_final.json, else do_split's default 5 (it
    trains any higher fold on a seeded random 80:20 split instead)."""
    splits_file = preprocessed_dataset_folder / "splits_final.json"
    return len(json.loads(splits_file.read_text())) if splits_file.is_file() else 5


@_seam("split", "nnUNetTrainer.do_split uses splits_final.json, else a seeded 5-fold split, and a seeded random 80:20 "
                "split for folds beyond the file")
def _check_split() -> None:
    source = _source(nnUNetTrainer.do_split)
    for expected in ("generate_crossval_split(all_keys_sorted, seed=12345, n_splits=5)",
                     "np.random.RandomState(seed=12345 + self.fold)", "int(len(keys) * 0.8)"):
        _require("split", expected in source, f"do_split no longer contains `{expected}`")


def validation_trainer(trainer_class: type, plans: dict, configuration: str, fold: str, dataset_json: dict,
                       device: torch.device) -> nnUNetTrainer:
    """A trainer built as `nnUNetv2_train ... --val` builds it (nnU-Net 2.8 passes continue_training in the plans)."""
    return trainer_class(plans={**plans, "continue_training": False}, configuration=configuration,
                         fold=int(fold) if fold.isdigit() else fold, dataset_json=dataset_json, device=device)


@_seam("trainer_construction", "nnUNetv2_train builds a trainer from the preprocessed plans with "
                               "plans['continue_training'] set and keyword arguments plans, configuration, fold, "
                               "dataset_json, device")
def _check_trainer_construction() -> None:
    from nnunetv2.run import run_training

    source = _source(run_training.get_trainer_from_args)
    _require("trainer_construction", 'plans["continue_training"] = continue_training' in source
             and "nnunet_trainer(plans=plans, configuration=configuration, fold=fold" in source,
             "get_trainer_from_args builds trainers differently")


# --- checkpoints ----------------------------------------------------------------------------------------------

def load_checkpoint_once(load: Callable[[str], None], checkpoint: dict, name: str) -> None:
    """Run nnU-Net's `load_checkpoint` on an already loaded checkpoint dict.

    nnU-Net 2.8's load_checkpoint accepts a dict in its signature but only loads file names (its dict branch leaves
    the checkpoint unbound), so it is given a placeholder name and its `torch.load` of that name returns the dict.
    """
    placeholder = f"<checkpoint {name} already loaded by nnunet-margin>"
    original = torch.load

    def load_placeholder(path, *args, **kwargs):
        return checkpoint if path == placeholder else original(path, *args, **kwargs)

    torch.load = load_placeholder
    try:
        load(placeholder)
    finally:
        torch.load = original


def save_checkpoint_with(save: Callable[[str], None], filename: str, extra: dict) -> None:
    """Run nnU-Net's `save_checkpoint(filename)` with `extra` added to the checkpoint dict, in one atomic write."""
    from .._atomic import atomic_path

    original = torch.save
    with atomic_path(filename) as temporary:
        def save_with_extra(obj, path, *args, **kwargs):
            if path == str(temporary) and isinstance(obj, dict):
                obj = {**obj, **extra}
            return original(obj, path, *args, **kwargs)

        torch.save = save_with_extra
        try:
            save(str(temporary))
        finally:
            torch.save = original


@_seam("checkpoint_io", "nnUNetTrainer.save_checkpoint writes one dict with torch.save(checkpoint, filename) and "
                        "load_checkpoint reads a file name with torch.load")
def _check_checkpoint_io() -> None:
    _require("checkpoint_io", "torch.save(checkpoint, filename)" in _source(nnUNetTrainer.save_checkpoint),
             "save_checkpoint no longer calls torch.save(checkpoint, filename)")
    _require("checkpoint_io", "torch.load(filename_or_checkpoint" in _source(nnUNetTrainer.load_checkpoint),
             "load_checkpoint no longer calls torch.load(filename_or_checkpoint, ...)")


# --- validation export --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def validation_export_replaced(export: Callable) -> Iterator[None]:
    """Within the block, nnU-Net's final validation hands every case to `export` (same arguments as
    `export_prediction_from_logits`) instead of nnU-Net's export; the worker processes receive it pickled."""
    original = _trainer_module.export_prediction_from_logits
    _trainer_module.export_prediction_from_logits = export
    try:
        yield
    finally:
        _trainer_module.export_prediction_from_logits = original


@_seam("validation_export", "perform_actual_validation calls the module-level export_prediction_from_logits of "
                            "nnUNetTrainer.py for every case, in worker processes")
def _check_validation_export() -> None:
    _require("validation_export", hasattr(_trainer_module, "export_prediction_from_logits"),
             "nnUNetTrainer.py no longer imports export_prediction_from_logits")
    _require("validation_export", "export_prediction_from_logits, (" in _source(
        nnUNetTrainer.perform_actual_validation), "perform_actual_validation no longer calls it")


def export_prediction_observing_logits(observe: Callable[[torch.Tensor], None], predicted_logits, properties: dict,
                                       configuration_manager, plans_manager: PlansManager, dataset_json: dict,
                                       output_file_truncated: str, save_probabilities: bool = False,
                                       num_threads_torch: int = default_num_processes) -> None:
    """nnU-Net's own `export_prediction_from_logits`, with `observe` called once on the resampled logits
    (K, *spatial, inside the crop box, transposed as nnU-Net's preprocessing) before the arg-max or softmax.

    The export takes its label manager from the plans manager; it gets a copy of both whose label manager calls
    `observe` first in `convert_logits_to_segmentation` (without --npz) or `apply_inference_nonlin` (with it).
    """
    original_label_manager = plans_manager.get_label_manager

    def observing_label_manager(*args, **kwargs) -> LabelManager:
        manager = copy.copy(original_label_manager(*args, **kwargs))
        for method in ("convert_logits_to_segmentation", "apply_inference_nonlin"):
            def observed(logits, _bound=getattr(manager, method)):
                observe(torch.as_tensor(logits))
                return _bound(logits)
            setattr(manager, method, observed)
        return manager

    hooked = copy.copy(plans_manager)
    hooked.get_label_manager = observing_label_manager
    _export_module.export_prediction_from_logits(predicted_logits, properties, configuration_manager, hooked,
                                                 dataset_json, output_file_truncated, save_probabilities,
                                                 num_threads_torch)


@_seam("export_hook", "export_prediction_from_logits gets its label manager from plans_manager.get_label_manager and "
                      "passes the resampled logits to convert_logits_to_segmentation (or apply_inference_nonlin with "
                      "--npz) once")
def _check_export_hook() -> None:
    export_source = _source(_export_module.export_prediction_from_logits)
    _require("export_hook", "plans_manager.get_label_manager(" in export_source,
             "export_prediction_from_logits no longer asks the plans manager for its label manager")
    convert = _source(_export_module.convert_predicted_logits_to_segmentation_with_correct_shape)
    for call in ("label_manager.convert_logits_to_segmentation(predicted_logits)",
                 "label_manager.apply_inference_nonlin(predicted_logits)"):
        _require("export_hook", call in convert, f"the export no longer calls {call}")


# --- datasets, plans, networks ------------------------------------------------------------------------------------

def case_identifiers(configuration_folder: str | Path) -> list[str]:
    """The preprocessed cases of a configuration folder."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    return sorted(infer_dataset_class(str(configuration_folder)).get_identifiers(str(configuration_folder)))


def load_preprocessed_segmentation(configuration_folder: str | Path, case: str) -> np.ndarray:
    """A case's preprocessed segmentation (crop box; -1 outside the nonzero mask), whatever nnU-Net's file format."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    dataset = infer_dataset_class(str(configuration_folder))(str(configuration_folder), [case])
    return np.asarray(dataset.load_case(case)[1][:])


def case_properties(configuration_folder: str | Path, case: str) -> dict:
    """The properties nnU-Net's preprocessing stored for a case (crop box, shapes, spacing)."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    return infer_dataset_class(str(configuration_folder))(str(configuration_folder), [case]).load_case(case)[3]


@_seam("preprocessed_dataset", "infer_dataset_class(folder) gives a class with get_identifiers(folder) and "
                               "load_case(case) -> (data, seg, seg_prev, properties)")
def _check_preprocessed_dataset() -> None:
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class, nnUNetBaseDataset

    _require("preprocessed_dataset", callable(infer_dataset_class), "infer_dataset_class is gone")
    for method in ("get_identifiers", "load_case"):
        _require("preprocessed_dataset", hasattr(nnUNetBaseDataset, method), f"nnUNetBaseDataset.{method} is gone")


def dice_per_label(segmentation: np.ndarray, reference: np.ndarray, labels: list[int],
                   ignore_label: int | None) -> list[float]:
    """nnU-Net's per-case Dice of each label (its evaluate_predictions: NaN where neither map has the label, the
    ignore label's voxels left out), from arrays instead of files."""
    from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn, region_or_label_to_mask

    ignore_mask = reference == ignore_label if ignore_label is not None else None
    dice = []
    for label in labels:
        tp, fp, fn, _ = compute_tp_fp_fn_tn(region_or_label_to_mask(reference, label),
                                            region_or_label_to_mask(segmentation, label), ignore_mask)
        dice.append(float("nan") if tp + fp + fn == 0 else float(2 * tp / (2 * tp + fp + fn)))
    return dice


@_seam("evaluation", "nnunetv2.evaluation.evaluate_predictions computes the per-case Dice from "
                     "compute_tp_fp_fn_tn(mask_ref, mask_pred, ignore_mask) as 2 TP / (2 TP + FP + FN), NaN if empty")
def _check_evaluation() -> None:
    from nnunetv2.evaluation import evaluate_predictions

    source = _source(evaluate_predictions.compute_metrics)
    _require("evaluation", "compute_tp_fp_fn_tn(mask_ref, mask_pred, ignore_mask)" in source
             and "2 * tp / (2 * tp + fp + fn)" in source, "compute_metrics computes Dice differently")


def find_trainer_class(name: str) -> type:
    """nnU-Net's trainer lookup (nnunetv2's own trainers and the folders in nnUNet_extTrainer), without its search
    messages, so that a command's own output (e.g. `benchmark --dry-run`) stays clean; a failed lookup raises
    RuntimeError naming the trainer and nnUNet_extTrainer."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    with contextlib.redirect_stdout(io.StringIO()):
        return recursive_find_trainer_class_by_name(name)


def soft_dice_loss(batch_dice: bool, ddp: bool) -> torch.nn.Module:
    """nnU-Net's default soft Dice (softmax, background excluded), configured as nnUNetTrainer._build_loss does."""
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    from nnunetv2.utilities.helpers import softmax_helper_dim1

    return MemoryEfficientSoftDiceLoss(apply_nonlin=softmax_helper_dim1, batch_dice=batch_dice, do_bg=False,
                                       smooth=1e-5, ddp=ddp)


@_seam("soft_dice", "nnUNetTrainer._build_loss uses MemoryEfficientSoftDiceLoss with smooth 1e-5, no background, "
                    "and a loss_mask for the ignore label")
def _check_soft_dice() -> None:
    source = _source(nnUNetTrainer._build_loss)
    _require("soft_dice", "'smooth': 1e-5, 'do_bg': False" in source and "MemoryEfficientSoftDiceLoss" in source,
             "the default Dice is configured differently")
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    _require("soft_dice", "loss_mask" in inspect.signature(MemoryEfficientSoftDiceLoss.forward).parameters,
             "MemoryEfficientSoftDiceLoss.forward takes no loss_mask")


def plain_network(plans_manager: PlansManager, configuration: str, dataset_json: dict
                  ) -> tuple[torch.nn.Module, int]:
    """nnU-Net's own network for a model's plans, as nnUNetTrainer builds it for inference, and its number of input
    channels."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    configuration_manager = plans_manager.get_configuration(configuration)
    num_inputs = determine_num_input_channels(plans_manager, configuration_manager, dataset_json)
    num_outputs = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    network = nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_inputs, num_outputs,
                                                       enable_deep_supervision=False)
    return network, num_inputs


def final_layer_prefix(network: torch.nn.Module) -> str:
    """State-dict prefix of the 1x1(x1) convolution computing the full-resolution logits, e.g.
    'decoder.seg_layers.4.' (dynamic_network_architectures' U-Nets)."""
    seg_layers = getattr(getattr(network, "decoder", None), "seg_layers", None)
    if not isinstance(seg_layers, torch.nn.ModuleList) or len(seg_layers) == 0:
        raise ValueError(f"{type(network).__name__} has no decoder.seg_layers, so the layer that computes the logits "
                         f"is unknown; a calibration map cannot be folded into it")
    return f"decoder.seg_layers.{len(seg_layers) - 1}."


@_seam("network", "nnUNetTrainer.build_network_architecture is a static method whose U-Nets end in "
                  "decoder.seg_layers[-1], a 1x1(x1) convolution with bias")
def _check_network() -> None:
    _require("network", isinstance(inspect.getattr_static(nnUNetTrainer, "build_network_architecture"), staticmethod),
             "build_network_architecture is no longer a static method")
    from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder

    _require("network", "seg_layers" in _source(UNetDecoder.__init__), "UNetDecoder has no seg_layers")


def check_all() -> dict[str, str | None]:
    """Run every seam's check; returns {seam: None if it holds, else the problem}."""
    problems: dict[str, str | None] = {}
    for name, seam in SEAMS.items():
        try:
            seam.check()
            problems[name] = None
        except Exception as error:  # a check that cannot even run is a broken seam too
            problems[name] = str(error)
    return problems


def _warn_if_unverified() -> None:
    if NNUNET_VERSION not in VERIFIED_VERSIONS:
        broken = [name for name, problem in check_all().items() if problem is not None]
        warnings.warn(f"nnunet-margin was verified with nnunetv2 {', '.join(VERIFIED_VERSIONS)}, this is "
                      f"{NNUNET_VERSION}; seams to re-verify: {', '.join(SEAMS)}"
                      + (f"; these checks fail: {', '.join(broken)}" if broken else "; all checks pass")
                      + ". Run `nnunet-margin doctor` for details.", stacklevel=2)


def dataset_name(dataset: str) -> str:
    """'4' or 'Dataset004_Hippocampus' -> 'Dataset004_Hippocampus'."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    return maybe_convert_to_dataset_name(dataset)


_warn_if_unverified()
