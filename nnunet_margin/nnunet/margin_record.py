"""The margin offsets of one fold: computed once from the label statistics, recorded, and reused on resume/--val."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .._atomic import write_json_atomic
from ..losses import EmptyClassError, margin_offsets
from . import _seams, layout
from .label_stats import LabelSpec, cache_location, case_label_counts, total_counts, trainer_label_counts

RECORD_FILE = "margin_offsets.json"


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
    per_case = trainer_label_counts(trainer, num_processes)
    labels = label_spec(trainer)
    where = f"fold {trainer.fold} of {trainer.plans_manager.dataset_name} ({trainer.configuration_name})"
    return offsets_record(per_case, _seams.fold_split(trainer)[0], class_names(trainer.dataset_json,
                          labels.num_classes), tau, upsilon, empty_classes, where, labels.ignore_label)


def write_record(output_folder: str, record: dict) -> None:
    write_json_atomic(Path(output_folder) / RECORD_FILE, record)


def read_record(output_folder: str) -> dict | None:
    path = Path(output_folder) / RECORD_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def record_from_checkpoint_extras(extras: dict, output_folder: str) -> dict | None:
    """The record stored with a checkpoint: its `margin_record`, the whole entry for checkpoints of release 0.1
    (which stored the record itself), or the fold's margin_offsets.json for checkpoints without one."""
    if "margin_record" in extras:
        return extras["margin_record"]
    if "rho_0k" in extras:
        return extras
    return read_record(output_folder)


def label_stats_table(dataset: str, configuration: str, fold: str | None, plans_identifier: str, tau: float,
                      upsilon: float, num_processes: int, empty_classes: str = "error") -> str:
    """Counts, fractions and offsets per class as a text table (the `nnunet-margin label-stats` output)."""
    preprocessed = os.environ.get("nnUNet_preprocessed")
    if not preprocessed:
        raise RuntimeError("nnUNet_preprocessed is not set; export it as for nnU-Net")
    name = _seams.dataset_name(dataset)
    folder = Path(preprocessed) / name
    plans_file = layout.plans_file(folder, plans_identifier)
    if not plans_file.is_file():
        raise FileNotFoundError(f"{plans_file} not found; run nnUNetv2_plan_and_preprocess -d {dataset} first")
    plans = _seams.PlansManager(str(plans_file))
    dataset_json = json.loads((folder / layout.DATASET_FILE).read_text())
    manager = plans.get_label_manager(dataset_json)
    if manager.has_regions:
        raise ValueError(f"{name} uses regions; margin offsets are defined for label-based datasets only")
    labels = LabelSpec(manager.num_segmentation_heads, manager.ignore_label)
    data_identifier = plans.get_configuration(configuration).data_identifier
    per_case = case_label_counts(folder, data_identifier, labels, num_processes=num_processes, progress=True)
    train_cases = _seams.fold_cases(folder, sorted(per_case), fold)[0]
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
    lines.append(f"cache: {cache_location(folder, data_identifier)}")
    return "\n".join(lines)
