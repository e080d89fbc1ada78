"""Portable copies of trained models, which plain nnU-Net loads without this plugin (e.g. for challenge submissions).

nnU-Net rebuilds a model's network with the trainer class named in its checkpoints, so a model trained with a plugin
trainer needs the plugin at inference. The plugin's trainers change the loss and the validation, never the network,
so the copy names nnU-Net's base trainer `nnUNetTrainer` instead, after checking that this is safe: the trainer must
not override `build_network_architecture`, and the weights must load into nnU-Net's own network built from the
plans. With `temperature=True`, each fold's fitted temperature (fold_X/temperature.json, see
`nnunet_margin.nnunet.temperature`) is folded into the final segmentation layer: its weight and bias are divided by
T, so the network outputs logits / T and nnU-Net's probabilities become softmax(logits / T).

Output convention: OUT is an nnUNet_results-style root. The copy goes to
OUT/DATASET/nnUNetTrainer__PLANS__CONFIGURATION, so with nnUNet_results=OUT the usual commands work:
`nnUNetv2_predict -d DATASET -c CONFIGURATION -p PLANS -tr nnUNetTrainer ...` and
`nnUNetv2_export_model_to_zip -d DATASET -c CONFIGURATION -p PLANS -tr nnUNetTrainer ...`, as does
`nnUNetv2_predict_from_modelfolder -m OUT/DATASET/nnUNetTrainer__PLANS__CONFIGURATION ...` with any nnUNet_results.
The source folder is only read.
"""

from __future__ import annotations

import copy
import functools
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._atomic import atomic_path, write_json_atomic
from . import _seams
from .temperature import FINAL_CHECKPOINT, TEMPERATURE_FILE, PathLike, TrainedModel

BASE_TRAINER = "nnUNetTrainer"
BEST_CHECKPOINT = "checkpoint_best.pth"
EXPORT_INFO_FILE = "export_info.json"
MODEL_FILES = ("plans.json", "dataset.json", "dataset_fingerprint.json")
# Per fold, besides the checkpoints: what nnUNetv2_export_model_to_zip packs.
FOLD_FILES = ("progress.png", "validation/summary.json")


@dataclass
class PlainNetwork:
    """nnU-Net's own network for a model's plans (as nnUNetTrainer builds it for inference)."""

    network: torch.nn.Module
    num_input_channels: int
    probe_shape: tuple[int, ...]  # smallest spatial input with more than one voxel at the bottleneck

    @classmethod
    def build(cls, model: TrainedModel) -> PlainNetwork:
        plans_manager = _seams.PlansManager(str(model.folder / "plans.json"))
        dataset_json = json.loads((model.folder / "dataset.json").read_text())
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

    def final_layer_prefix(self) -> str:
        """State-dict prefix of the layer that computes the full-resolution logits, e.g. 'decoder.seg_layers.4.'."""
        return _seams.final_layer_prefix(self.network)

    def fold_temperature(self, weights: dict[str, torch.Tensor], temperature: float) -> dict[str, torch.Tensor]:
        """Weights whose network outputs the original logits / T (final layer's weight and bias divided by T),
        checked on a random input (in float64)."""
        prefix = self.final_layer_prefix()
        scaled = {name: value / temperature if name in (prefix + "weight", prefix + "bias") else value
                  for name, value in weights.items()}
        probe = copy.deepcopy(self.network).double().eval()
        generator = torch.Generator().manual_seed(0)
        image = torch.randn((1, self.num_input_channels, *self.probe_shape), generator=generator,
                            dtype=torch.float64)
        with torch.no_grad():
            probe.load_state_dict(weights)
            expected = probe(image) / temperature
            probe.load_state_dict(scaled)
            deviation = float((probe(image) - expected).abs().max())
        # float32 rounding of the stored weights is the only expected difference
        if not deviation <= 1e-5 * float(expected.abs().max()):
            raise RuntimeError(f"dividing {prefix}weight and bias by T = {temperature} did not divide the logits by "
                               f"T (max deviation {deviation:.3g}); export without --temperature")
        return scaled


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


def _read_temperature(fold_folder: Path) -> float:
    path = fold_folder / TEMPERATURE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run nnunet-margin fit-temperature {fold_folder.parent} -f "
                                f"{fold_folder.name.removeprefix('fold_')} first (or export without --temperature)")
    return float(json.loads(path.read_text())["temperature"])


def _copy_file(source: Path, destination: Path) -> None:
    with atomic_path(destination) as temporary:
        shutil.copyfile(source, temporary)


def _export_checkpoint(source: Path, destination: Path, network: PlainNetwork, temperature: float | None) -> str:
    """Copy one checkpoint with trainer_name nnUNetTrainer (and T folded in); returns the source's trainer name."""
    checkpoint = torch.load(source, map_location="cpu", weights_only=False)
    trainer_name = checkpoint["trainer_name"]
    check_trainer_keeps_network(trainer_name)
    network.check_weights(checkpoint["network_weights"], str(source))
    if temperature is not None:
        checkpoint["network_weights"] = network.fold_temperature(checkpoint["network_weights"], temperature)
    checkpoint["trainer_name"] = BASE_TRAINER
    with atomic_path(destination) as temporary:
        torch.save(checkpoint, temporary)
    return trainer_name


def export_portable(model_folder: PathLike, out_folder: PathLike, temperature: bool = False,
                    folds: list[str | int] | None = None) -> Path:
    """Write a copy of the model that plain nnU-Net loads to OUT/DATASET/nnUNetTrainer__PLANS__CONFIGURATION (see
    the module docstring) and return that folder.

    Copies plans.json, dataset.json, dataset_fingerprint.json and per fold checkpoint_final.pth, checkpoint_best.pth,
    progress.png and validation/summary.json (those present), and records the source in export_info.json. With
    `temperature`, checkpoint_best.pth is left out (and removed from an earlier export), since the temperature was
    fitted to checkpoint_final.pth's validation predictions. Folds default to every fold_X with checkpoint_final.pth.
    """
    model = TrainedModel.load(model_folder)
    destination = Path(out_folder) / model.dataset_name / f"{BASE_TRAINER}__{model.plans}__{model.configuration}"
    if destination.resolve() == model.folder:
        raise ValueError(f"the portable copy would overwrite the model itself ({model.folder}): choose another OUT")
    fold_folders = model.fold_folders(folds)
    temperatures = {fold.name: _read_temperature(fold) for fold in fold_folders} if temperature else {}
    network = PlainNetwork.build(model)

    source_trainers = set()
    for fold_folder in fold_folders:
        target = destination / fold_folder.name
        checkpoints = [FINAL_CHECKPOINT] if temperature else [FINAL_CHECKPOINT, BEST_CHECKPOINT]
        for name in checkpoints:
            if (fold_folder / name).is_file():
                source_trainers.add(_export_checkpoint(fold_folder / name, target / name, network,
                                                       temperatures.get(fold_folder.name)))
        if temperature:
            (target / BEST_CHECKPOINT).unlink(missing_ok=True)
        for name in FOLD_FILES:
            if (fold_folder / name).is_file():
                _copy_file(fold_folder / name, target / name)
    for name in MODEL_FILES:
        if (model.folder / name).is_file():
            _copy_file(model.folder / name, destination / name)
    info: dict[str, Any] = {"source": str(model.folder), "source_trainers": sorted(source_trainers),
                            "folds": [fold.name for fold in fold_folders], "temperatures_folded_in": temperatures}
    write_json_atomic(destination / EXPORT_INFO_FILE, info)
    return destination
