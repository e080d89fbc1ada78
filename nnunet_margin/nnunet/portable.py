"""Portable copies of trained models, which plain nnU-Net loads without this plugin (e.g. for challenge submissions).

nnU-Net rebuilds a model's network with the trainer class named in its checkpoints, so a model trained with a plugin
trainer needs the plugin at inference. The plugin's trainers change the loss and the validation, never the network,
so the copy names nnU-Net's base trainer `nnUNetTrainer` instead, after checking that this is safe: the trainer must
not override `build_network_architecture`, and the weights must load into nnU-Net's own network built from the
plans. With `calibration=True`, each fold's map from fit-calibration (fold_X/calibration_map.json: A z + b, see
`nnunet_margin.nnunet.posthoc.maps`) is folded into the final segmentation layer: the final 1x1(x1) convolution
z = V f + c becomes V' = A V, c' = A c + b (docs/methods.md 6), so nnU-Net's fold ensemble averages calibrated
logits; a map shared by the folds (fitted `pooled`) makes the ensemble exactly softmax(A mean_f(z_f) + b). With
`temperature=True` (deprecated), each fold's temperature.json from fit-temperature is folded in as A = I / T.

Output convention: OUT is an nnUNet_results-style root. The copy goes to OUT/DATASET/NAME__PLANS__CONFIGURATION
with NAME = nnUNetTrainer unless chosen (`name`), so with nnUNet_results=OUT the usual commands work:
`nnUNetv2_predict -d DATASET -c CONFIGURATION -p PLANS -tr NAME ...` and
`nnUNetv2_export_model_to_zip -d DATASET -c CONFIGURATION -p PLANS -tr NAME ...`, as does
`nnUNetv2_predict_from_modelfolder -m OUT/DATASET/NAME__PLANS__CONFIGURATION ...` with any nnUNet_results. nnU-Net
uses `-tr` only to find the folder; it rebuilds the network with the class its checkpoints name, which is always
nnUNetTrainer here. So several portable models of one dataset sit side by side under different names (e.g.
nnUNetTrainer_mbls_T), each loaded by plain nnU-Net with `-tr` and its name.

Safety: the source folder is only read. An export never writes into an existing folder unless that folder is an
earlier export of the same source (its export_info.json names it) and `overwrite` is given; OUT may not lie inside
the source or contain it, and an existing target in the nnUNet_results nnU-Net is using is never touched. The copy
is written into a hidden staging folder beside the target (.NAME__PLANS__CONFIGURATION.partial-XXXX, holding a
marker file that names the source) and renamed into place when complete, so the target is always either absent,
the previous export, or the complete new one; a refreshed export keeps nothing of the old one (e.g. its folds).
An interrupted export removes its staging folder; one left by a killed process (recognised by its name and its
marker or export_info.json) is removed by the next export to that target. One export per target at a time.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shutil
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..calibration.affine import AffineCalibration, fold_affine_calibration
from . import _seams, layout
from .layout import BEST_CHECKPOINT, FINAL_CHECKPOINT, PathLike, TrainedModel
from .posthoc.legacy_temperature import temperatures_for_export
from .posthoc.maps import calibrations_for_export

BASE_TRAINER = "nnUNetTrainer"
EXPORT_INFO_FILE = "export_info.json"
STAGING_MARKER = ".nnunet_margin_export"  # first file of a staging folder; removed before it becomes the target
# A folder name nnU-Net can split back into TRAINER__PLANS__CONFIGURATION: no "__", no leading/trailing separator.
_NAME_PATTERN = re.compile(r"[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*")


@dataclass
class PlainNetwork:
    """nnU-Net's own network for a model's plans (as nnUNetTrainer builds it for inference)."""

    network: torch.nn.Module
    num_input_channels: int
    probe_shape: tuple[int, ...]  # smallest spatial input with more than one voxel at the bottleneck

    @classmethod
    def build(cls, model: TrainedModel) -> PlainNetwork:
        plans_manager = _seams.PlansManager(str(model.folder / layout.PLANS_FILE))
        dataset_json = json.loads((model.folder / layout.DATASET_FILE).read_text())
        network, num_inputs = _seams.plain_network(plans_manager, model.configuration, dataset_json)
        configuration = plans_manager.get_configuration(model.configuration)
        total_stride = np.prod(np.array(configuration.pool_op_kernel_sizes), axis=0)
        return cls(network, num_inputs, tuple(int(2 * stride) for stride in total_stride))

    def check_weights(self, weights: dict[str, torch.Tensor], where: str) -> None:
        """Refuse weights that do not load (strictly) into this network."""
        try:
            self.network.load_state_dict(weights)
        except RuntimeError as error:
            raise ValueError(f"{where}: the weights do not fit nnU-Net's own network built from plans.json, so the "
                             f"trainer changed the architecture and plain nnU-Net cannot load the model "
                             f"({str(error).splitlines()[0]})") from None

    @property
    def num_classes(self) -> int:
        return self.network.state_dict()[self.final_layer_prefix() + "weight"].shape[0]

    def final_layer_prefix(self) -> str:
        """State-dict prefix of the layer that computes the full-resolution logits, e.g. 'decoder.seg_layers.4.'."""
        return _seams.final_layer_prefix(self.network)

    def fold_calibration(self, weights: dict[str, torch.Tensor], calibration: AffineCalibration
                         ) -> dict[str, torch.Tensor]:
        """Weights whose network outputs A z + b for the original logits z (the final 1x1(x1) convolution's weight
        V and bias c become A V and A c + b), checked on a random input in float64."""
        prefix = self.final_layer_prefix()
        folded = dict(weights)
        folded[prefix + "weight"], folded[prefix + "bias"] = fold_affine_calibration(
            weights[prefix + "weight"], weights.get(prefix + "bias"), calibration)
        probe = copy.deepcopy(self.network).double().eval()
        generator = torch.Generator().manual_seed(0)
        image = torch.randn((1, self.num_input_channels, *self.probe_shape), generator=generator,
                            dtype=torch.float64)
        with torch.no_grad():
            probe.load_state_dict(weights)
            expected = calibration.apply(probe(image), class_dim=1)
            probe.load_state_dict(folded)
            deviation = float((probe(image) - expected).abs().max())
        # float32 rounding of the stored weights is the only expected difference
        if not deviation <= 1e-5 * float(expected.abs().max()):
            raise RuntimeError(f"folding the {calibration.method} calibration into {prefix}weight and bias did not "
                               f"give the calibrated logits (max deviation {deviation:.3g}); export without it")
        return folded


@functools.cache
def check_trainer_keeps_network(trainer_name: str) -> None:
    """Refuse a trainer that nnU-Net cannot find, or one that overrides build_network_architecture."""
    try:
        trainer_class = _seams.find_trainer_class(trainer_name)
    except RuntimeError:
        raise RuntimeError(f"nnU-Net cannot find trainer {trainer_name}, so it cannot be checked to keep nnU-Net's "
                           f"network: export where the model was trained, with nnUNet_extTrainer naming the folder "
                           f"with {trainer_name} (for this plugin's trainers: `nnunet-margin trainers-path`)") from None
    owner = next(cls for cls in trainer_class.__mro__ if "build_network_architecture" in vars(cls))
    if owner is not _seams.nnUNetTrainer:
        raise ValueError(f"{trainer_name} builds its own network ({owner.__module__}.{owner.__name__} overrides "
                         f"build_network_architecture), so plain nnU-Net's {BASE_TRAINER} may not rebuild it: a "
                         f"portable copy is only valid for trainers that keep nnU-Net's network")


def _load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        missing = set(layout.CHECKPOINT_KEYS_READ) - set(checkpoint)
        if missing:
            raise KeyError(f"no {' and no '.join(sorted(missing))}")
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, TypeError) as error:
        message = str(error).splitlines()[0].split(". ")[0] if str(error) else type(error).__name__
        raise ValueError(f"cannot read checkpoint {path} ({message}): it is truncated or not an nnU-Net checkpoint; "
                         f"restore it, or train the fold again") from None
    return checkpoint


def _export_checkpoint(source: Path, destination: Path, network: PlainNetwork,
                       calibration: AffineCalibration | None) -> str:
    """Copy one checkpoint with trainer_name nnUNetTrainer (and the calibration folded in); returns the source's
    trainer name."""
    checkpoint = _load_checkpoint(source)
    trainer_name = checkpoint[layout.CHECKPOINT_TRAINER]
    check_trainer_keeps_network(trainer_name)
    network.check_weights(checkpoint[layout.CHECKPOINT_WEIGHTS], str(source))
    if calibration is not None:
        checkpoint[layout.CHECKPOINT_WEIGHTS] = network.fold_calibration(checkpoint[layout.CHECKPOINT_WEIGHTS],
                                                                         calibration)
    checkpoint[layout.CHECKPOINT_TRAINER] = BASE_TRAINER
    torch.save(checkpoint, destination)
    return trainer_name


def check_export_name(name: str) -> None:
    """Refuse a trainer folder name nnU-Net cannot split back into TRAINER__PLANS__CONFIGURATION."""
    if not _NAME_PATTERN.fullmatch(name):
        raise ValueError(f"--name {name!r} is not a usable trainer folder name: use letters and digits, joined by "
                         f"single '_', '.' or '-' (e.g. nnUNetTrainer_mbls_T), since nnU-Net splits model folder names "
                         f"at '__'")


def _export_source(folder: Path) -> str | None:
    """The source recorded in folder/export_info.json, or None if the folder is no complete export."""
    try:
        source = json.loads((folder / EXPORT_INFO_FILE).read_text())["source"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return source if isinstance(source, str) else None


def _check_locations(model: TrainedModel, out: Path, destination: Path, overwrite: bool) -> None:
    """Refuse an OUT inside the source or containing it, and any existing target that is not an earlier export of
    the same source being refreshed with `overwrite` outside the nnUNet_results nnU-Net is using."""
    if out == model.folder or model.folder in out.parents:
        raise ValueError(f"OUT {out} lies inside the model folder {model.folder}: the export would write a copy into "
                         f"the model itself; choose an OUT outside it")
    if out in model.folder.parents:
        raise ValueError(f"OUT {out} contains the model folder {model.folder}, i.e. it is the results tree the model "
                         f"was trained in, whose model folders an export must not touch: choose a separate OUT, e.g. "
                         f"an empty folder")
    if out.exists() and not out.is_dir():
        raise ValueError(f"OUT {out} is a file: pass a folder (an nnUNet_results-style root, created if missing)")
    if destination.is_symlink() or destination.exists() and not destination.is_dir():
        raise ValueError(f"{destination} exists and is not a folder: move it away, or choose another OUT or --name")
    if not destination.exists() or not any(destination.iterdir()):
        return
    live_results = os.environ.get("nnUNet_results")
    if live_results and Path(live_results).resolve() == out:
        raise ValueError(f"{destination} exists in the nnUNet_results nnU-Net is using ({live_results}), and an export "
                         f"never writes into an existing model folder there: choose another OUT or --name")
    source = _export_source(destination)
    if source is None:
        raise ValueError(f"{destination} exists and is no export of nnunet-margin (no valid {EXPORT_INFO_FILE}): it "
                         f"may be a trained model; choose another OUT or --name (nothing was written)")
    if source != str(model.folder):
        raise ValueError(f"{destination} holds the export of another model ({source}); writing into it would mix the "
                         f"two models' folds: choose another OUT or --name (nothing was written)")
    if not overwrite:
        raise ValueError(f"{destination} already holds an export of this model: pass --overwrite to replace it "
                         f"(nothing was written)")


def _remove_own_folder(folder: Path) -> None:
    """Delete a staging or replaced export folder, its marker last, so that an interrupted deletion leaves a folder
    that the next export still recognises as its own."""
    marker = folder / STAGING_MARKER
    if not folder.is_dir():
        return
    marker.touch()
    for child in folder.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        elif child != marker:
            child.unlink()
    marker.unlink()
    folder.rmdir()


def _staging_folders(destination: Path) -> list[Path]:
    """Staging folders of exports to `destination` that a killed process left (ours: marker or export_info.json)."""
    if not destination.parent.is_dir():
        return []
    return [folder for folder in destination.parent.glob(f".{destination.name}.partial-*")
            if folder.is_dir() and not folder.is_symlink()
            and ((folder / STAGING_MARKER).is_file() or (folder / EXPORT_INFO_FILE).is_file()
                 or not any(folder.iterdir()))]


def _write_export(model: TrainedModel, network: PlainNetwork, staging: Path, fold_folders: list[Path],
                  calibrations: dict[str, AffineCalibration], info: dict[str, Any]) -> None:
    """Write the complete export into the staging folder, export_info.json (`info` and the sources) last."""
    source_trainers = set()
    for fold_folder in fold_folders:
        target = staging / fold_folder.name
        layout.validation_folder(target).mkdir(parents=True)
        checkpoints = [FINAL_CHECKPOINT] if calibrations else [FINAL_CHECKPOINT, BEST_CHECKPOINT]
        for name in checkpoints:
            if (fold_folder / name).is_file():
                source_trainers.add(_export_checkpoint(fold_folder / name, target / name, network,
                                                       calibrations.get(fold_folder.name)))
        for name in layout.EXPORTED_FOLD_FILES:
            if (fold_folder / name).is_file():
                shutil.copyfile(fold_folder / name, target / name)
        if not any(layout.validation_folder(target).iterdir()):
            layout.validation_folder(target).rmdir()
    for name in layout.MODEL_FILES:
        if (model.folder / name).is_file():
            shutil.copyfile(model.folder / name, staging / name)
    info = {"source": str(model.folder), "source_trainers": sorted(source_trainers),
            "folds": [fold.name for fold in fold_folders], **info}
    (staging / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2))
    (staging / STAGING_MARKER).unlink()


def _sibling(destination: Path, kind: str) -> Path:
    """A fresh hidden name beside `destination`: .NAME.KIND-PID-RANDOM."""
    return destination.parent / f".{destination.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _move_into_place(staging: Path, destination: Path) -> None:
    """Rename the complete staging folder to `destination`, replacing an earlier export there."""
    if not destination.exists():
        os.rename(staging, destination)
        return
    if not any(destination.iterdir()):
        destination.rmdir()
        os.rename(staging, destination)
        return
    previous = _sibling(destination, "partial-old")
    os.rename(destination, previous)
    try:
        os.rename(staging, destination)
    except BaseException:
        os.rename(previous, destination)
        raise
    try:
        _remove_own_folder(previous)
    except OSError:
        pass  # the new export is in place; the next export to this target removes the rest


def export_portable(model_folder: PathLike, out_folder: PathLike, temperature: bool = False,
                    folds: list[str | int] | None = None, name: str = BASE_TRAINER, overwrite: bool = False,
                    allow_bound: bool = False, calibration: bool = False) -> Path:
    """Write a copy of the model that plain nnU-Net loads to OUT/DATASET/NAME__PLANS__CONFIGURATION (see the module
    docstring for the naming and the safety rules) and return that folder.

    Copies plans.json, dataset.json, dataset_fingerprint.json and per fold checkpoint_final.pth, checkpoint_best.pth,
    progress.png and validation/summary.json (those present), and records the source in export_info.json. With
    `calibration`, each fold's map from `nnunet-margin fit-calibration` (calibration_map.json) is folded into
    checkpoint_final.pth, and checkpoint_best.pth is left out, since the map was fitted for checkpoint_final.pth;
    maps of another checkpoint, of different scopes, or shared by other folds than the exported ones are refused
    (`posthoc.maps.calibrations_for_export`), and export_info.json records the scope. `temperature` (deprecated)
    folds in each fold's temperature.json from fit-temperature instead, with the same checks. A temperature at a
    bound of its search is refused unless `allow_bound`. Folds default to every fold_X with checkpoint_final.pth.
    `overwrite` replaces an earlier export of the same source (entirely: nothing of it is kept).
    """
    if temperature and calibration:
        raise ValueError("pass --temperature or --calibration, not both: one map is folded into the network (a "
                         "calibration map fitted with --method temperature is a temperature too)")
    check_export_name(name)
    model = TrainedModel.load(model_folder)
    out = Path(out_folder).resolve()
    destination = out / model.dataset_name / layout.model_folder_name(name, model.plans, model.configuration)
    _check_locations(model, out, destination, overwrite)
    fold_folders = model.fold_folders(folds)
    network = PlainNetwork.build(model)
    calibrations: dict[str, AffineCalibration] = {}
    info: dict[str, Any] = {"temperatures_folded_in": {}}
    if temperature or calibration:
        read = temperatures_for_export if temperature else calibrations_for_export
        calibrations, folded = read(model, fold_folders, network.num_classes, allow_bound)
        info.update(folded)

    created = [folder for folder in (destination.parent, out) if not folder.exists()]
    staging = _sibling(destination, "partial")
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        for leftover in _staging_folders(destination):
            _remove_own_folder(leftover)
        staging.mkdir()
        (staging / STAGING_MARKER).write_text(json.dumps({"source": str(model.folder)}))
        _write_export(model, network, staging, fold_folders, calibrations, info)
        _move_into_place(staging, destination)
    except BaseException as error:
        try:
            _remove_own_folder(staging)
            for folder in created:  # the folders this call created, if still empty
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
        except OSError:
            pass  # the error below matters; the next export to this target removes the staging folder
        if isinstance(error, OSError):
            where = f": {error.filename}" if error.filename else ""
            raise OSError(f"cannot write the export {destination} ({error.strerror or error}{where}): pass an OUT "
                          f"folder you can write to, with room for the copy (OUT is unchanged)") from None
        raise
    return destination
