"""Every place where nnunet-margin relies on nnU-Net beyond its command line: one small function per seam.

Everything else in the package imports nnU-Net through this module. Each seam says what it assumes; `SEAMS` lists
them with a check of that assumption against the installed nnU-Net, which `nnunet-margin doctor` runs and
tests/test_seams.py runs one test each, so a changed nnU-Net fails with the name of the seam that broke.

Verified with nnunetv2 2.8.0 and 2.8.1 (`VERIFIED_VERSIONS`). Importing this module with another version warns once,
naming the seams to re-verify; it never breaks nnU-Net's trainer lookup.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import inspect
import io
import itertools
import json
import tempfile
import textwrap
import warnings
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from nnunetv2.configuration import default_num_processes
from nnunetv2.inference import export_prediction as _export_module
from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as _trainer_module
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.label_handling.label_handling import LabelManager
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from . import layout

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


def _subscript_keys(function: Callable, name: str) -> set[str]:
    """The string keys `function` uses on the variable `name`: in `name[...]` and in a dict literal assigned to it."""
    keys = set()
    for node in ast.walk(ast.parse(textwrap.dedent(_source(function)))):
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == name \
                and isinstance(node.slice, ast.Constant):
            keys.add(node.slice.value)
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict) \
                and any(isinstance(target, ast.Name) and target.id == name for target in node.targets):
            keys.update(key.value for key in node.value.keys if isinstance(key, ast.Constant))
    return keys


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


def train_step_loss(result: dict) -> np.ndarray:
    """The loss in the result of nnU-Net's train_step: the host (numpy) copy nnU-Net makes of it anyway, so reading it
    adds no synchronisation with the GPU."""
    return result["loss"]


@_seam("train_step_result", "nnUNetTrainer.train_step returns {'loss': the loss's host copy as a numpy array}")
def _check_train_step_result() -> None:
    _require("train_step_result", "return {'loss': l.detach().cpu().numpy()}" in _source(nnUNetTrainer.train_step),
             "train_step no longer returns {'loss': l.detach().cpu().numpy()}")


@_seam("build_loss_hook", "nnUNetTrainer.initialize builds the loss by calling self._build_loss(), which the plugin's "
                          "trainers override")
def _check_build_loss_hook() -> None:
    _require("build_loss_hook", "self.loss = self._build_loss()" in _source(nnUNetTrainer.initialize),
             "initialize no longer sets self.loss = self._build_loss()")


@_seam("validation_step_loss", "nnUNetTrainer.validation_step calls self.loss(output, target) on every validation "
                               "batch (CALS observes the validation logits there)")
def _check_validation_step_loss() -> None:
    _require("validation_step_loss", "self.loss(output, target)" in _source(nnUNetTrainer.validation_step),
             "validation_step no longer calls self.loss(output, target)")


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


def fold_cases(preprocessed_dataset_folder: Path, all_cases: list[str], fold: str | None
               ) -> tuple[list[str], list[str]]:
    """The training and validation cases of `fold` as nnU-Net's do_split defines them (every case for no fold or
    "all"), read-only (no splits file is written), for commands that run outside a trainer."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    if fold is None or fold == "all":
        return list(all_cases), list(all_cases)
    if not fold.isdigit():
        raise ValueError(f"fold must be a number or 'all', got {fold!r}")
    splits_file = Path(preprocessed_dataset_folder) / layout.SPLITS_FILE
    splits = json.loads(splits_file.read_text()) if splits_file.is_file() else \
        generate_crossval_split(sorted(all_cases), seed=12345, n_splits=5)
    if int(fold) < len(splits):
        return list(splits[int(fold)]["train"]), list(splits[int(fold)]["val"])
    # nnU-Net's do_split for a fold beyond the split file: a seeded random 80:20 split
    keys = np.sort(all_cases)
    chosen = np.random.RandomState(seed=12345 + int(fold)).choice(len(keys), int(len(keys) * 0.8), replace=False)
    return ([str(keys[index]) for index in chosen],
            [str(key) for index, key in enumerate(keys) if index not in set(chosen.tolist())])


def cross_validation_fold_count(preprocessed_dataset_folder: Path) -> int:
    """The folds of nnU-Net's cross-validation split: those of splits_final.json, else do_split's default 5 (it
    trains any higher fold on a seeded random 80:20 split instead)."""
    splits_file = Path(preprocessed_dataset_folder) / layout.SPLITS_FILE
    return len(json.loads(splits_file.read_text())) if splits_file.is_file() else 5


@_seam("split", "nnUNetTrainer.do_split uses splits_final.json, else a seeded 5-fold split, and a seeded random 80:20 "
                "split for folds beyond the file")
def _check_split() -> None:
    source = _source(nnUNetTrainer.do_split)
    for expected in ("generate_crossval_split(all_keys_sorted, seed=12345, n_splits=5)",
                     "np.random.RandomState(seed=12345 + self.fold)", "int(len(keys) * 0.8)",
                     "idx_val = [i for i in range(len(keys)) if i not in idx_tr]"):
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


# --- nnU-Net's files (read by layout.py) ------------------------------------------------------------------------

def _mentions(source: str, name: str) -> bool:
    """Whether `source` holds the string literal `name` (either quote)."""
    return f"'{name}'" in source or f'"{name}"' in source


def _write_label_map(path: Path, array: np.ndarray, spacing: tuple[float, ...] = (1.0, 1.0, 1.0),
                     origin: tuple[float, ...] = (0.0, 0.0, 0.0)) -> str:
    """A small label map written by SimpleITK (as nnU-Net's SimpleITKIO writes segmentations)."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    sitk.WriteImage(image, str(path))
    return str(path)


@_seam("checkpoint_schema", f"nnUNetTrainer.save_checkpoint writes a dict with '{layout.CHECKPOINT_WEIGHTS}' and "
                            f"'{layout.CHECKPOINT_TRAINER}' and no key '{layout.PLUGIN_CHECKPOINT_KEY}' (the "
                            f"plugin's); "
                            f"nnUNetPredictor rebuilds the network of checkpoint['{layout.CHECKPOINT_TRAINER}'] and "
                            f"loads checkpoint['{layout.CHECKPOINT_WEIGHTS}']")
def _check_checkpoint_schema() -> None:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    written = _subscript_keys(nnUNetTrainer.save_checkpoint, "checkpoint")
    _require("checkpoint_schema", set(layout.CHECKPOINT_KEYS_READ) <= written,
             f"save_checkpoint writes the keys {sorted(written)}, not {list(layout.CHECKPOINT_KEYS_READ)}")
    _require("checkpoint_schema", layout.PLUGIN_CHECKPOINT_KEY not in written,
             f"nnU-Net's checkpoints now have a key '{layout.PLUGIN_CHECKPOINT_KEY}' of their own")
    read = _subscript_keys(nnUNetPredictor.initialize_from_trained_model_folder, "checkpoint")
    _require("checkpoint_schema", set(layout.CHECKPOINT_KEYS_READ) <= read,
             f"nnUNetPredictor reads the checkpoint keys {sorted(read)}, not {list(layout.CHECKPOINT_KEYS_READ)}")


@_seam("summary_json", f"perform_actual_validation writes validation/{layout.SUMMARY_FILE} with "
                       f"compute_metrics_on_folder after every case's export has finished; it holds 'metric_per_case' "
                       f"(each with 'prediction_file'), 'mean' (per label value as a string) and 'foreground_mean', "
                       f"each with the 'Dice'")
def _check_summary_json() -> None:
    from nnunetv2.evaluation import evaluate_predictions as evaluation
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.utilities.json_export import recursive_fix_for_json_export

    source = _source(nnUNetTrainer.perform_actual_validation)
    exports_done, summary_written = source.find("[r.get() for r in results]"), source.find("compute_metrics_on_folder(")
    _require("summary_json", 0 <= exports_done < summary_written,
             "perform_actual_validation no longer writes the summary after waiting for every case's export")
    _require("summary_json", f"join(validation_output_folder, '{layout.SUMMARY_FILE}')" in source,
             f"the validation's summary is no longer validation/{layout.SUMMARY_FILE}")
    _require("summary_json", "{'metric_per_case': results, 'mean': means, 'foreground_mean': foreground_mean}"
             in _source(evaluation.compute_metrics_on_folder), "compute_metrics_on_folder assembles another summary")
    with tempfile.TemporaryDirectory() as folder:
        reference = np.zeros((1, 2, 3), dtype=np.uint8)
        reference[0, 0, :2] = 1
        files = [_write_label_map(Path(folder) / f"{name}.nii.gz", array)
                 for name, array in (("reference", reference), ("case_7", np.minimum(reference, np.eye(2, 3))))]
        case = evaluation.compute_metrics(*files, SimpleITKIO(), [1])
        recursive_fix_for_json_export(case)
        summary = {"metric_per_case": [case], "mean": {1: case["metrics"][1]},
                   "foreground_mean": {"Dice": case["metrics"][1]["Dice"]}}
        evaluation.save_summary_json(summary, str(Path(folder) / layout.SUMMARY_FILE))
        read = layout.read_summary_dice(Path(folder) / layout.SUMMARY_FILE, ["background", "one"], ".nii.gz")
    _require("summary_json", read["cases"] == ["case_7"] and read["foreground_mean"] == read["per_class"]["one"]
             and abs(read["per_class"]["one"] - 2 / 3) < 1e-12, f"summary.json read back as {read}")


@_seam("preprocessing_properties", "DefaultPreprocessor.run_case_npy records the properties keys "
                                   f"{', '.join(layout.PROPERTIES_KEYS_READ[:3])} (the crop box [low, high) per axis "
                                   "in the transposed frame, as insert_crop_into_image pastes it back) beside the "
                                   "reader's 'spacing'; the export reads them back from the same keys")
def _check_preprocessing_properties() -> None:
    from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

    from .geometry import crop_mask

    written = _subscript_keys(DefaultPreprocessor.run_case_npy, "properties")
    read = _subscript_keys(_export_module.convert_predicted_logits_to_segmentation_with_correct_shape,
                           "properties_dict")
    for what, keys in (("run_case_npy uses", written), ("the export reads", read)):
        _require("preprocessing_properties", set(layout.PROPERTIES_KEYS_READ) <= keys,
                 f"{what} the properties keys {sorted(keys)}, not {list(layout.PROPERTIES_KEYS_READ)}")
    box = layout.CropBox((5, 6, 7), ((1, 4), (0, 6), (2, 5)), (3, 6, 3))
    pasted = insert_crop_into_image(np.zeros(box.shape_before_cropping, dtype=bool),
                                    np.ones(box.shape_after_cropping, dtype=bool), [list(b) for b in box.bbox])
    _require("preprocessing_properties", np.array_equal(pasted.transpose(2, 0, 1), crop_mask(box, (2, 0, 1))),
             "insert_crop_into_image no longer pastes the crop at [low, high) of bbox_used_for_cropping")


def same_geometry(value, reference) -> bool:
    """Whether a geometry quantity (spacing, origin, direction, affine) of an image equals a reference's within
    nnU-Net's own tolerance (its readers' check that all images of a case share one geometry)."""
    from nnunetv2.imageio.base_reader_writer import BaseReaderWriter

    return bool(BaseReaderWriter._check_all_same_array([np.asarray(reference, dtype=float),
                                                        np.asarray(value, dtype=float)]))


@_seam("image_geometry", "SimpleITKIO and NibabelIO record the image's 'spacing' (array axis order) and its header "
                         "geometry ('sitk_stuff' origin and direction, 'nibabel_stuff' original_affine); "
                         "BaseReaderWriter._check_all_same_array compares geometries by shape and np.allclose")
def _check_image_geometry() -> None:
    from nnunetv2.imageio.base_reader_writer import BaseReaderWriter
    from nnunetv2.imageio.nibabel_reader_writer import NibabelIO
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    with tempfile.TemporaryDirectory() as folder:
        path = _write_label_map(Path(folder) / "case.nii.gz", np.zeros((2, 3, 4)), (1.0, 2.0, 3.0), (4.0, 5.0, 6.0))
        read_by_sitk = layout.image_geometry(SimpleITKIO().read_seg(path)[1])
        read_by_nibabel = layout.image_geometry(NibabelIO().read_seg(path)[1])
    _require("image_geometry", np.allclose(read_by_sitk["spacing"], (3.0, 2.0, 1.0))
             and np.allclose(read_by_sitk.get("origin", ()), (4.0, 5.0, 6.0))
             and np.allclose(read_by_sitk.get("direction", ()), np.eye(3).ravel()),
             f"SimpleITKIO's properties give the geometry {read_by_sitk}")
    _require("image_geometry", np.allclose(read_by_nibabel["spacing"], (3.0, 2.0, 1.0))
             and read_by_nibabel.get("affine", np.zeros(0)).shape == (4, 4),
             f"NibabelIO's properties give the geometry {read_by_nibabel}")
    _require("image_geometry", "not np.allclose(i, input_list[0])" in _source(BaseReaderWriter._check_all_same_array),
             "_check_all_same_array no longer compares with np.allclose")


@_seam("preprocessed_files", "nnU-Net's preprocessed datasets keep a case's segmentation in CASE_seg.b2nd (blosc2) "
                             "or CASE.npz (numpy, unpacked to CASE_seg.npy), its properties in CASE.pkl")
def _check_preprocessed_files() -> None:
    from nnunetv2.training.dataloading import nnunet_dataset
    from nnunetv2.training.dataloading.utils import _convert_to_npy

    data, segmentation = np.zeros((1, 2, 2, 2), dtype=np.float32), np.zeros((1, 2, 2, 2), dtype=np.int8)
    for dataset_class, options in ((nnunet_dataset.nnUNetDatasetBlosc2, {"chunks": data.shape, "blocks": data.shape}),
                                   (nnunet_dataset.nnUNetDatasetNumpy, {})):
        with tempfile.TemporaryDirectory() as folder:
            dataset_class.save_case(data, segmentation, {}, str(Path(folder) / "case"), **options)
            written = sorted(path.name for path in Path(folder).iterdir())
            _require("preprocessed_files", any(f"case{suffix}" in written
                                               for suffix in layout.PREPROCESSED_SEGMENTATION_SUFFIXES)
                     and f"case{layout.PROPERTIES_SUFFIX}" in written
                     and dataset_class(folder, ["case"]).load_case("case")[3] == {},
                     f"{dataset_class.__name__}.save_case writes {written}")
    _require("preprocessed_files", 'npz_file[:-4] + "_seg.npy"' in _source(_convert_to_npy),
             "nnU-Net unpacks a numpy case's segmentation to another file than CASE_seg.npy")


@_seam("results_layout", "nnU-Net's results are nnUNet_results/DATASET/TRAINER__PLANS__CONFIGURATION/fold_X with "
                         f"{layout.FINAL_CHECKPOINT}, {layout.BEST_CHECKPOINT} and the validation in validation/; "
                         f"the validation's ground truth is nnUNet_preprocessed/DATASET/"
                         f"{layout.GT_SEGMENTATIONS_FOLDER} and the split {layout.SPLITS_FILE} beside it")
def _check_results_layout() -> None:
    from nnunetv2.utilities import file_path_utilities as paths

    name = paths.convert_trainer_plans_config_to_identifier("Trainer", "Plans", "3d_fullres")
    _require("results_layout", name == layout.model_folder_name("Trainer", "Plans", "3d_fullres")
             and tuple(paths.convert_identifier_to_trainer_plans_config(name)) == layout.split_model_folder_name(name),
             f"nnU-Net names model folders like {name!r}")
    original, paths.nnUNet_results = paths.nnUNet_results, "/results"
    try:
        fold_folder = Path(paths.get_output_folder("Dataset001_X", "Trainer", "Plans", "3d_fullres", 3))
    finally:
        paths.nnUNet_results = original
    _require("results_layout", fold_folder == Path("/results/Dataset001_X", name, layout.fold_folder_name(3))
             and layout.fold_of(fold_folder) == "3", f"nnU-Net's fold 3 folder is {fold_folder}")
    for method, names in ((nnUNetTrainer.on_train_end, [layout.FINAL_CHECKPOINT]),
                          (nnUNetTrainer.on_epoch_end, [layout.BEST_CHECKPOINT]),
                          (nnUNetTrainer.perform_actual_validation,
                           [layout.VALIDATION_FOLDER, layout.GT_SEGMENTATIONS_FOLDER]),
                          (nnUNetTrainer.do_split, [layout.SPLITS_FILE])):
        missing = [name for name in names if not _mentions(_source(method), name)]
        _require("results_layout", not missing, f"nnUNetTrainer.{method.__name__} no longer names {missing}")


@_seam("prediction_files", "export_prediction_from_logits writes CASE<file_ending> and, with --save_probabilities or "
                           f"--npz, CASE{layout.PROBABILITIES_SUFFIX} (array '{layout.PROBABILITIES_KEY}', classes "
                           f"first) and CASE{layout.PROPERTIES_SUFFIX} (the case's properties)")
def _check_prediction_files() -> None:
    source = _source(_export_module.export_prediction_from_logits)
    for expected in (f"np.savez_compressed(output_file_truncated + '{layout.PROBABILITIES_SUFFIX}', "
                     f"{layout.PROBABILITIES_KEY}=",
                     f"save_pickle(properties_dict, output_file_truncated + '{layout.PROPERTIES_SUFFIX}')",
                     "output_file_truncated + dataset_json_dict_or_file['file_ending']"):
        _require("prediction_files", expected in source, f"export_prediction_from_logits no longer calls `{expected}`")


@_seam("model_export", f"nnUNetv2_export_model_to_zip packs {', '.join(layout.MODEL_FILES)} and per fold the "
                       f"checkpoints and {', '.join(layout.EXPORTED_FOLD_FILES)}")
def _check_model_export() -> None:
    from nnunetv2.model_sharing.model_export import export_pretrained_model

    source = _source(export_pretrained_model)
    parts = [*layout.MODEL_FILES, *(part for path in layout.EXPORTED_FOLD_FILES for part in path.split("/"))]
    missing = [part for part in parts if not _mentions(source, part)]
    _require("model_export", not missing, f"export_pretrained_model no longer packs {missing}")


# --- prediction -------------------------------------------------------------------------------------------------

def load_predictor(model_folder: str | Path, folds: Sequence[str], checkpoint: str, device: torch.device,
                   use_mirroring: bool):
    """nnU-Net's predictor of `folds` of a trained model folder, set up as nnUNetv2_predict sets it up (Gaussian
    weighting, step size 0.5, test-time mirroring unless disabled, results kept on the device when it is a GPU),
    without progress bars and nnU-Net's messages."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    with contextlib.redirect_stdout(io.StringIO()):
        predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=use_mirroring,
                                    perform_everything_on_device=True, device=device, allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(model_folder), [f if f == "all" else int(f) for f in folds],
                                                       checkpoint_name=checkpoint)
    return predictor


@_seam("predictor", "nnUNetv2_predict builds nnUNetPredictor(tile_step_size=0.5 by default, use_gaussian=True, "
                    "use_mirroring=not --disable_tta, perform_everything_on_device=True) and "
                    "initialize_from_trained_model_folder keeps one state dict per fold in list_of_parameters")
def _check_predictor() -> None:
    from nnunetv2.inference import predict_from_raw_data as module

    entry = _source(module.predict_entry_point)
    for expected in ("'-step_size', type=float, required=False, default=0.5", "use_gaussian=True",
                     "use_mirroring=not args.disable_tta", "perform_everything_on_device=not args.not_on_device"):
        _require("predictor", expected in entry, f"nnUNetv2_predict no longer sets `{expected}`")
    initialise = _source(module.nnUNetPredictor.initialize_from_trained_model_folder)
    _require("predictor", "parameters.append(checkpoint['network_weights'])" in initialise
             and "self.list_of_parameters = parameters" in initialise,
             "initialize_from_trained_model_folder no longer keeps each fold's weights in list_of_parameters")


def unsupported_model(predictor) -> str | None:
    """Why nnunet-margin cannot run this model's ensemble (`predict`, `fit-calibration --fit-on images`): a cascade
    stage, region-based labels; or None."""
    if predictor.configuration_manager.previous_stage_name is not None:
        return (f"the configuration is a cascade stage (it needs the segmentations of "
                f"{predictor.configuration_manager.previous_stage_name}), which nnunet-margin does not run; predict "
                f"it with nnUNetv2_predict -prev_stage_predictions")
    if predictor.label_manager.has_regions:
        return ("the model is region-based (sigmoid outputs): uncertainty maps and calibration maps are defined for "
                "one softmax over classes")
    return None


def class_names(dataset_json: dict) -> list[str]:
    """Names of the foreground classes 1..K-1 of a (not region-based) dataset.json, in class order."""
    by_value = {value: name for name, value in dataset_json["labels"].items() if name != "ignore"}
    return [by_value[value] for value in sorted(by_value) if value != 0]


def channel_names(dataset_json: dict) -> list[str]:
    """The input channels a model was trained on, in file-number order (_0000, _0001, ...)."""
    channels = dataset_json["modality"] if "modality" in dataset_json else dataset_json["channel_names"]
    return [channels[key] for key in sorted(channels, key=int)]


@_seam("dataset_json", "a dataset.json lists the input channels in channel_names (or the older modality) and the "
                       "classes in labels (name -> value, 'ignore' the ignore label)")
def _check_dataset_json() -> None:
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    _require("dataset_json", "len(dataset_json['modality']) if 'modality' in dataset_json.keys() else "
             "len(dataset_json['channel_names'])" in _source(determine_num_input_channels),
             "determine_num_input_channels counts the channels differently")
    _require("dataset_json", "self.label_dict.get('ignore')" in _source(LabelManager._determine_ignore_label),
             "the ignore label is no longer labels['ignore']")


def input_case_files(folder: str | Path, file_ending: str) -> dict[str, list[str]]:
    """The cases of an input folder as nnUNetv2_predict groups them: {case: its files CASE_XXXX<file_ending>, one per
    channel, sorted}."""
    from batchgenerators.utilities.file_and_folder_operations import subfiles
    from nnunetv2.utilities.utils import create_paths_fn, get_identifiers_from_splitted_dataset_folder

    files = subfiles(str(folder), suffix=file_ending, join=False, sort=True)
    return {str(case): create_paths_fn(str(folder), files, file_ending, case)
            for case in get_identifiers_from_splitted_dataset_folder(str(folder), file_ending)}


def channel_number(file: str | Path, case: str) -> int:
    """The channel number XXXX of an input file CASE_XXXX<file_ending>."""
    return int(Path(file).name[len(case) + 1:len(case) + 5])


@_seam("input_files", "nnUNetv2_predict groups the input files CASE_XXXX<file_ending> by case with "
                      "get_identifiers_from_splitted_dataset_folder and create_paths_fn")
def _check_input_files() -> None:
    from nnunetv2.utilities import utils

    identifiers = _source(utils.get_identifiers_from_splitted_dataset_folder)
    _require("input_files", "crop = len(file_ending) + 5" in identifiers,
             "case identifiers are no longer the file names minus _XXXX<file_ending>")
    _require("input_files", r'"_\d\d\d\d" + re.escape(file_ending)' in _source(utils.create_paths_fn),
             "create_paths_fn no longer matches CASE_XXXX<file_ending>")
    _require("input_files", "create_paths_fn" in _source(utils.create_lists_from_splitted_dataset_folder),
             "create_lists_from_splitted_dataset_folder no longer uses create_paths_fn")


def preprocessed_cases(predictor, case_files: list[list[str]], output_files: list[str],
                       num_processes: int) -> Iterator[tuple[str, torch.Tensor, dict]]:
    """Each case preprocessed as nnUNetv2_predict preprocesses it: in this process with num_processes 0 (its
    sequential path, the configuration's preprocessor), else in nnU-Net's background workers; yields (output file
    without ending, data (C, *spatial) float32, properties) in input order."""
    if num_processes == 0:
        preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
        for files, output in zip(case_files, output_files):
            data, _, properties = preprocessor.run_case(files, None, predictor.plans_manager,
                                                        predictor.configuration_manager, predictor.dataset_json)
            yield output, torch.from_numpy(data), properties
        return
    from nnunetv2.inference.data_iterators import preprocessing_iterator_fromfiles

    for item in preprocessing_iterator_fromfiles(case_files, None, output_files, predictor.plans_manager,
                                                 predictor.dataset_json, predictor.configuration_manager,
                                                 num_processes, predictor.device.type == "cuda", False):
        data = item["data"]
        if isinstance(data, str):  # nnU-Net's workers may hand large arrays over as a temporary .npy file
            path, data = data, torch.from_numpy(np.load(data))
            Path(path).unlink()
        yield item["ofile"], data, item["data_properties"]


@_seam("preprocessing", "nnUNetv2_predict preprocesses with configuration_manager.preprocessor_class().run_case "
                        "(sequential) or preprocessing_iterator_fromfiles, whose items hold 'data' (a tensor or a "
                        ".npy file name), 'ofile' and 'data_properties'")
def _check_preprocessing() -> None:
    from nnunetv2.inference import predict_from_raw_data as module

    sequential = _source(module.nnUNetPredictor.predict_from_files_sequential)
    _require("preprocessing", "preprocessor.run_case(" in sequential and "torch.from_numpy(data)" in sequential,
             "predict_from_files_sequential preprocesses differently")
    iterating = _source(module.nnUNetPredictor.predict_from_data_iterator)
    for expected in ("preprocessed['data']", "np.load(data)", "preprocessed['ofile']",
                     "preprocessed['data_properties']"):
        _require("preprocessing", expected in iterating, f"predict_from_data_iterator no longer reads {expected}")


def ensemble_logits(predictor, data: torch.Tensor, observe_member: Callable[[torch.Tensor], None]) -> torch.Tensor:
    """nnU-Net's own ensemble logits of a preprocessed case (predict_logits_from_preprocessed_data: each fold's
    sliding-window logits, added up on the CPU and divided by the number of folds), with observe_member called on each
    fold's logits (CPU, float16) as they come. observe_member must not keep them: nnU-Net adds the later folds into
    the first fold's tensor."""
    sliding_window = predictor.predict_sliding_window_return_logits

    def observed(image: torch.Tensor) -> torch.Tensor:
        logits = sliding_window(image).to("cpu")
        observe_member(logits)
        return logits

    predictor.predict_sliding_window_return_logits = observed
    try:
        return predictor.predict_logits_from_preprocessed_data(data)
    finally:
        del predictor.predict_sliding_window_return_logits


@_seam("ensemble_logits", "predict_logits_from_preprocessed_data loads each fold's weights, adds up "
                          "predict_sliding_window_return_logits(data).to('cpu') and divides by the number of folds")
def _check_ensemble_logits() -> None:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    source = _source(nnUNetPredictor.predict_logits_from_preprocessed_data)
    for expected in ("for params in self.list_of_parameters:", "self.network.load_state_dict(params)",
                     "prediction += self.predict_sliding_window_return_logits(data).to('cpu')",
                     "prediction /= len(self.list_of_parameters)"):
        _require("ensemble_logits", expected in source,
                 f"predict_logits_from_preprocessed_data no longer contains `{expected}`")


def mirrorings(predictor) -> list[tuple[int, ...]]:
    """The mirrorings of nnU-Net's test-time augmentation as spatial axes of the preprocessed array: () (none) first,
    then each combination of the allowed axes in nnU-Net's order; just () when mirroring is off."""
    axes = predictor.allowed_mirroring_axes if predictor.use_mirroring else None
    return [()] + [combination for size in range(len(axes or ())) for combination in
                   itertools.combinations(axes, size + 1)]


class _Mirrored(torch.nn.Module):
    """A network applied to the input flipped along `dims`, its output flipped back (one test-time mirroring)."""

    def __init__(self, network: torch.nn.Module, dims: tuple[int, ...]):
        super().__init__()
        self.network, self.dims = network, dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flip(self.network(torch.flip(x, self.dims)), self.dims)


@torch.inference_mode()
def mirrored_member_logits(predictor, data: torch.Tensor,
                           observe_member: Callable[[torch.Tensor], None]) -> torch.Tensor:
    """Every mirroring of every fold as a member: nnU-Net's sliding window (Gaussian weighting, float16
    accumulation) once per fold and mirroring, with nnU-Net's mirroring off and the network wrapped in that
    mirroring's flips; observe_member is called on each member's logits (CPU). Returns the mean of all members'
    logits (float32): nnU-Net's ensemble logits up to rounding (nnU-Net averages the mirrorings inside each patch)."""
    from nnunetv2.inference import predict_from_raw_data

    network, use_mirroring, threads = predictor.network, predictor.use_mirroring, torch.get_num_threads()
    members = mirrorings(predictor)
    total = None
    # the threads of predict_logits_from_preprocessed_data
    torch.set_num_threads(min(predict_from_raw_data.default_num_processes, threads))
    try:
        predictor.use_mirroring = False
        for parameters in predictor.list_of_parameters:
            getattr(network, "_orig_mod", network).load_state_dict(parameters)
            for axes in members:
                predictor.network = _Mirrored(network, tuple(axis + 2 for axis in axes)) if axes else network
                logits = predictor.predict_sliding_window_return_logits(data).to("cpu")
                observe_member(logits)
                total = logits.float() if total is None else total.add_(logits)
    finally:
        predictor.network, predictor.use_mirroring = network, use_mirroring
        torch.set_num_threads(threads)
    return total.div_(len(predictor.list_of_parameters) * len(members))


@_seam("mirroring", "_internal_maybe_mirror_and_predict adds torch.flip(network(torch.flip(x, axes)), axes) for "
                    "each combination of the allowed axes (+2 for batch and channel) to the plain prediction")
def _check_mirroring() -> None:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    source = _source(nnUNetPredictor._internal_maybe_mirror_and_predict)
    for expected in ("self.allowed_mirroring_axes if self.use_mirroring else None", "prediction = self.network(x)",
                     "mirror_axes = [m + 2 for m in mirror_axes]", "itertools.combinations(mirror_axes, i + 1)",
                     "prediction += torch.flip(self.network(torch.flip(x, axes)), axes)"):
        _require("mirroring", expected in source, f"_internal_maybe_mirror_and_predict no longer contains `{expected}`")


def resampled_logits(logits: torch.Tensor, properties: dict, plans_manager: PlansManager,
                     configuration_manager) -> torch.Tensor:
    """Logits resampled from the network's geometry to the image's (inside the crop box, axes as nnU-Net's
    preprocessing transposed them), exactly as nnU-Net's export resamples the ensemble's logits."""
    spacing = [layout.spacing(properties)[axis] for axis in plans_manager.transpose_forward]
    shape = properties[layout.SHAPE_AFTER_CROPPING]
    network_spacing = configuration_manager.spacing if len(configuration_manager.spacing) == len(shape) else \
        [spacing[0], *configuration_manager.spacing]
    return torch.as_tensor(configuration_manager.resampling_fn_probabilities(logits, shape, network_spacing, spacing))


def probabilities(logits: torch.Tensor, plans_manager: PlansManager, dataset_json: dict) -> torch.Tensor:
    """nnU-Net's probabilities of logits (its label manager's softmax, in float32), as --save_probabilities
    writes them."""
    return plans_manager.get_label_manager(dataset_json).apply_inference_nonlin(logits)


def keeps_image_geometry(configuration_manager) -> bool:
    """Whether the export leaves logits that already have the image's shape (crop box) unchanged: nnU-Net's default
    resampling does (then logits in the image's geometry can go through nnU-Net's export as they are)."""
    return configuration_manager.configuration["resampling_fn_probabilities"] == "resample_data_or_seg_to_shape"


@_seam("export_resampling", "the export resamples the logits with configuration_manager.resampling_fn_probabilities "
                            "to shape_after_cropping_and_before_resampling, from the network's spacing to the image's "
                            "(transposed), then applies the label manager's softmax; the default resampling leaves an "
                            "array of the target shape unchanged")
def _check_export_resampling() -> None:
    from nnunetv2.preprocessing.resampling import default_resampling

    source = _source(_export_module.convert_predicted_logits_to_segmentation_with_correct_shape)
    for expected in ("spacing_transposed = [properties_dict['spacing'][i] for i in plans_manager.transpose_forward]",
                     "[spacing_transposed[0], *configuration_manager.spacing]",
                     "configuration_manager.resampling_fn_probabilities(predicted_logits,\n"
                     "                                            properties_dict['shape_after_cropping_and_before_"
                     "resampling'],",
                     "label_manager.apply_inference_nonlin(predicted_logits)"):
        _require("export_resampling", expected in source, f"the export no longer contains `{expected}`")
    _require("export_resampling", "if np.any(shape != new_shape):" in _source(default_resampling.resample_data_or_seg),
             "resample_data_or_seg may now change arrays that already have the target shape")
    _require("export_resampling", "logits = logits.float()" in _source(LabelManager.apply_inference_nonlin),
             "apply_inference_nonlin no longer computes in float32")


def to_image_geometry(array: np.ndarray, properties: dict, plans_manager: PlansManager) -> np.ndarray:
    """A map of the crop box (axes transposed as nnU-Net's preprocessing) placed into the full image, zero outside
    the crop box, and transposed back: as nnU-Net's export does with the segmentation."""
    full = np.zeros(properties[layout.SHAPE_BEFORE_CROPPING], dtype=array.dtype)
    full = _export_module.insert_crop_into_image(full, array, properties[layout.CROP_BOX])
    return full.transpose(plans_manager.transpose_backward)


@_seam("export_geometry", "the export puts the crop box's segmentation into zeros of shape_before_cropping with "
                          "insert_crop_into_image(..., bbox_used_for_cropping), transposes it by transpose_backward "
                          "and writes it with the plans' reader-writer")
def _check_export_geometry() -> None:
    source = _source(_export_module.convert_predicted_logits_to_segmentation_with_correct_shape)
    for expected in ("np.zeros(properties_dict['shape_before_cropping']",
                     "insert_crop_into_image(segmentation_reverted_cropping, segmentation, "
                     "properties_dict['bbox_used_for_cropping'])",
                     "segmentation_reverted_cropping.transpose(plans_manager.transpose_backward)"):
        _require("export_geometry", expected in source, f"the export no longer contains `{expected}`")
    _require("export_geometry", "rw = plans_manager.image_reader_writer_class()" in _source(
        _export_module.export_prediction_from_logits), "the export no longer writes with the plans' reader-writer")


def read_images(files: list[str], plans_manager: PlansManager) -> np.ndarray:
    """A case's images (C, *spatial) as the dataset's reader-writer reads them (the segmentation's array layout)."""
    return plans_manager.image_reader_writer_class().read_images(files)[0]


# nnU-Net's reader-writers whose write_seg converts with `.astype` only and whose formats hold float32
FLOAT_WRITERS = ("SimpleITKIO", "SimpleITKIOWithReorient", "NibabelIO", "NibabelIOWithReorient", "Tiff3DIO")


class _FloatMap(np.ndarray):
    """An array whose astype keeps float32 (nnU-Net's segmentation writers cast with astype to integers)."""

    def astype(self, dtype, *args, **kwargs):
        return np.asarray(self, dtype=np.float32)


def float_map_ending(plans_manager: PlansManager, dataset_json: dict) -> str:
    """The file ending of float maps: the dataset's own where its reader-writer stores float32, else .npz."""
    return dataset_json["file_ending"] if plans_manager.plans["image_reader_writer"] in FLOAT_WRITERS else ".npz"


def write_float_map(array: np.ndarray, path: str | Path, properties: dict, plans_manager: PlansManager) -> None:
    """Write a map (*spatial, the segmentation's array layout) as float32 with the dataset's reader-writer: the same
    geometry (spacing, origin, direction) and file format as nnU-Net's segmentation (see `float_map_ending`)."""
    writer = plans_manager.image_reader_writer_class()
    writer.write_seg(np.ascontiguousarray(array, dtype=np.float32).view(_FloatMap), str(path), properties)


@_seam("float_maps", "the float-capable reader-writers' write_seg(seg, file, properties) convert the array with "
                     "seg.astype(...) only")
def _check_float_maps() -> None:
    from nnunetv2.imageio.reader_writer_registry import recursive_find_reader_writer_by_name

    for name in FLOAT_WRITERS:
        source = _source(recursive_find_reader_writer_by_name(name).write_seg)
        _require("float_maps", ".astype(" in source and "np.array(" not in source and "np.asarray(" not in source,
                 f"{name}.write_seg no longer converts the array with astype alone")


def write_prediction_metadata(plans_manager: PlansManager, dataset_json: dict, output_folder: Path) -> None:
    """dataset.json and plans.json into a prediction folder, as nnUNetv2_predict writes them (nnU-Net's
    postprocessing and ensembling, and `nnunet-margin calibration`, read them there)."""
    from .._atomic import write_json_atomic

    write_json_atomic(output_folder / layout.DATASET_FILE, dataset_json)
    write_json_atomic(output_folder / layout.PLANS_FILE, plans_manager.plans)


@_seam("prediction_metadata", f"nnUNetv2_predict writes {layout.DATASET_FILE} and {layout.PLANS_FILE} into its output "
                              "folder")
def _check_prediction_metadata() -> None:
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    source = _source(nnUNetPredictor.predict_from_files)
    for name in (layout.DATASET_FILE, layout.PLANS_FILE):
        _require("prediction_metadata", f"join(output_folder, '{name}')" in source,
                 f"predict_from_files no longer writes {name}")


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
