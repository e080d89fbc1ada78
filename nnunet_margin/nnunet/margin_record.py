"""The margin offsets of one fold: computed once from the label statistics, recorded, and reused on resume/--val."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .._atomic import atomic_path, write_json_atomic
from ..losses import EmptyClassError, margin_offsets
from .label_stats import LabelSpec, cache_path, case_label_counts, total_counts

RECORD_FILE = "margin_offsets.json"
CHECKPOINT_KEY = "nnunet_margin"


def label_spec(trainer) -> LabelSpec:
    manager = trainer.label_manager
    return LabelSpec(num_classes=manager.num_segmentation_heads, ignore_label=manager.ignore_label)


def class_names(dataset_json: dict, num_classes: int) -> list[str]:
    """Label names by value, from dataset.json (e.g. ['background', 'liver', 'tumor'])."""
    by_value = {value: name for name, value in dataset_json["labels"].items() if isinstance(value, int)}
    return [by_value.get(index, str(index)) for index in range(num_classes)]


def offsets_record(per_case: dict, train_cases: list[str], names: list[str], tau: float, upsilon: float,
                   empty_classes: str, where: str, ignore_label: int | None = None) -> dict:
    """Class counts summed over `train_cases` and the resulting offsets, as a JSON-ready record.

    `where` names the data in error messages (e.g. "fold 0 of Dataset001_X (3d_fullres)").
    """
    counts = total_counts(per_case, train_cases)
    try:
        offsets = margin_offsets(counts, tau=tau, upsilon=upsilon, empty_classes=empty_classes)
    except EmptyClassError as error:
        empty = ", ".join(f"{index} ({names[index]})" for index in error.empty_classes)
        raise EmptyClassError(error.empty_classes, (
            f"{where}: class {empty} has no voxels in the {len(train_cases)} training cases, so its margin offset "
            f"(tau*sqrt(N-N_k)/N_k) is infinite. Fix the split (splits_final.json) so every class appears in "
            f"training, remove the unused label from dataset.json, or use a trainer with "
            f"empty_classes='count_as_one' (e.g. nnUNetTrainerMarginCalib_emptyAsOne), which counts such a class "
            f"as one voxel.")) from None
    return {
        "where": where,
        "num_training_cases": len(train_cases),
        "tau": tau,
        "upsilon": upsilon,
        "empty_classes": empty_classes,
        "class_names": names,
        "ignore_label": ignore_label,
        "counts": counts.tolist(),
        "rho_k0": offsets.rho_k0.tolist(),
        "rho_0k": offsets.rho_0k.tolist(),
    }


def compute_fold_record(trainer, tau: float, upsilon: float, empty_classes: str, num_processes: int) -> dict:
    """The record for the trainer's fold, from the cached label statistics of its training cases."""
    labels = label_spec(trainer)
    per_case = case_label_counts(trainer.preprocessed_dataset_folder_base, trainer.configuration_manager.data_identifier,
                                 labels, num_processes=num_processes)
    train_cases, _ = trainer.do_split()
    where = f"fold {trainer.fold} of {trainer.plans_manager.dataset_name} ({trainer.configuration_name})"
    return offsets_record(per_case, list(train_cases), class_names(trainer.dataset_json, labels.num_classes), tau,
                          upsilon, empty_classes, where, labels.ignore_label)


def shared_fold_record(trainer, **kwargs) -> dict:
    """`compute_fold_record` on rank 0 only; under DDP the other ranks receive rank 0's record."""
    import torch.distributed as dist

    record = compute_fold_record(trainer, **kwargs) if trainer.local_rank == 0 else None
    if trainer.is_ddp:
        box = [record]
        dist.broadcast_object_list(box, src=0)
        record = box[0]
    return record


def write_record(output_folder: str, record: dict) -> None:
    write_json_atomic(Path(output_folder) / RECORD_FILE, record)


def read_record(output_folder: str) -> dict | None:
    path = Path(output_folder) / RECORD_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def add_record_to_checkpoint(filename: str, record: dict) -> None:
    """Store the record inside a checkpoint nnU-Net just wrote (rewritten atomically)."""
    checkpoint = torch.load(filename, map_location="cpu", weights_only=False)
    checkpoint[CHECKPOINT_KEY] = record
    with atomic_path(filename) as temporary:
        torch.save(checkpoint, temporary)


def record_from_checkpoint(filename: str) -> dict | None:
    checkpoint = torch.load(filename, map_location="cpu", weights_only=False)
    return checkpoint.get(CHECKPOINT_KEY)


def fold_training_cases(preprocessed_dataset_folder: Path, all_cases: list[str], fold: str | None) -> list[str]:
    """The training cases of `fold` as nnU-Net's do_split defines them (read-only: no splits file is written)."""
    if fold is None or fold == "all":
        return all_cases
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    splits_file = preprocessed_dataset_folder / "splits_final.json"
    splits = json.loads(splits_file.read_text()) if splits_file.is_file() else \
        generate_crossval_split(sorted(all_cases), seed=12345, n_splits=5)
    if not fold.isdigit():
        raise ValueError(f"fold must be a number or 'all', got {fold!r}")
    if int(fold) < len(splits):
        return list(splits[int(fold)]["train"])
    # nnU-Net's do_split for a fold beyond the split file: a seeded random 80:20 split
    keys = np.sort(all_cases)
    chosen = np.random.RandomState(seed=12345 + int(fold)).choice(len(keys), int(len(keys) * 0.8), replace=False)
    return [str(keys[index]) for index in chosen]


def label_stats_table(dataset: str, configuration: str, fold: str | None, plans_identifier: str, tau: float,
                      upsilon: float, num_processes: int, empty_classes: str = "error") -> str:
    """Counts, fractions and offsets per class as a text table (the `nnunet-margin label-stats` output)."""
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    if not nnUNet_preprocessed.is_set():
        raise RuntimeError("nnUNet_preprocessed is not set; export it as for nnU-Net")
    name = maybe_convert_to_dataset_name(dataset)
    folder = Path(nnUNet_preprocessed.get()) / name
    plans_file = folder / f"{plans_identifier}.json"
    if not plans_file.is_file():
        raise FileNotFoundError(f"{plans_file} not found; run nnUNetv2_plan_and_preprocess -d {dataset} first")
    plans = PlansManager(str(plans_file))
    dataset_json = json.loads((folder / "dataset.json").read_text())
    manager = plans.get_label_manager(dataset_json)
    if manager.has_regions:
        raise ValueError(f"{name} uses regions; margin offsets are defined for label-based datasets only")
    labels = LabelSpec(manager.num_segmentation_heads, manager.ignore_label)
    data_identifier = plans.get_configuration(configuration).data_identifier
    per_case = case_label_counts(folder, data_identifier, labels, num_processes=num_processes, progress=True)
    train_cases = fold_training_cases(folder, sorted(per_case), fold)
    names = class_names(dataset_json, labels.num_classes)
    where = f"{'all cases' if fold is None else f'fold {fold}'} of {name} ({configuration})"
    record = offsets_record(per_case, train_cases, names, tau, upsilon, empty_classes, where, labels.ignore_label)
    total = sum(record["counts"])
    lines = [f"{where}: {len(train_cases)} cases, {total} voxels; tau={tau}, upsilon={upsilon}",
             f"{'label':>5}  {'name':20s} {'voxels':>14s} {'fraction':>10s} {'rho_0k':>12s} {'rho_k0':>12s}"]
    for index, (label, count, rho_0k, rho_k0) in enumerate(zip(names, record["counts"], record["rho_0k"],
                                                               record["rho_k0"])):
        lines.append(f"{index:>5}  {label[:20]:20s} {count:>14d} {count / total:>10.6f} {rho_0k:>12.6g} "
                     f"{rho_k0:>12.6g}")
    lines.append(f"cache: {cache_path(folder, data_identifier)}")
    return "\n".join(lines)
