"""calibration_map.json: a fitted post-hoc calibration, what it was fitted on, and the checkpoints it belongs to.

Every fold folded with a map holds it in fold_X/calibration_map.json. The map's scope (`fit_on`) says what it
calibrates (docs/methods.md 6):
- "fold": the fold's own network, fitted on its validation cases; the record names that fold's checkpoint;
- "pooled": one map fitted on the out-of-fold samples of several folds and folded identically into each of them;
  every one of those folds holds the same record, naming all their checkpoints;
- "images": one map fitted on the fold ensemble's own logits of a held-out calibration set, recorded like "pooled",
  with the calibration set (folders, cases, a fingerprint of its files) and the ensemble's mirroring in `fitted_on`.

A record names the SHA-256 of each checkpoint_final.pth it was fitted for (`checkpoints`); `calibrations_for_export`
refuses maps of a changed checkpoint, maps of different scopes in one export, a shared map exported with other folds
than it was fitted for, and a temperature at a bound of its search (unless allowed), each with the command that
fits a usable map. Records written before scopes existed (format 1: `checkpoint_sha256`, no `fit_on`) read as
scope "fold".
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..._atomic import write_json_atomic
from ...calibration.affine import AffineCalibration
from ..layout import FINAL_CHECKPOINT, TrainedModel, fold_of
from ..provenance import file_sha256

CALIBRATION_MAP_FILE = "calibration_map.json"
FORMAT_VERSION = 2
FIT_ON = ("fold", "pooled", "images")
# What a temperature at each bound of its search means (the NLL still falls beyond it).
BOUND_MEANINGS = {
    "upper": "the NLL kept falling as T grew, so flattening the probabilities towards uniform helps: the model is "
             "worse than uniform on these voxels",
    "lower": "the NLL kept falling as T shrank, so the probabilities are degenerate for a fit: (nearly) every "
             "voxel's most likely class is right, and sharpening them towards 0 and 1 keeps helping",
}


@dataclass(frozen=True)
class FitScope:
    """What a map was fitted for: `fit_on` (see the module docstring) and, per fold folder name it is folded into,
    the SHA-256 of the checkpoint_final.pth it was fitted for."""

    fit_on: str
    checkpoints: dict[str, str]

    @property
    def folds(self) -> list[str]:
        return [fold_of(Path(name)) for name in self.checkpoints]

    def describe(self) -> str:
        folds = ", ".join(self.folds)
        return "per fold" if self.fit_on == "fold" else f"{self.fit_on} over folds {folds}"


def fit_command(model: TrainedModel, folds: list[str], method: str, fit_on: str,
                fitted_on: dict[str, Any] | None = None) -> str:
    """The fit-calibration command that fits a map of this scope for these folds (for "images", on the calibration
    set an earlier fit recorded in `fitted_on`, else on placeholders)."""
    command = ["nnunet-margin", "fit-calibration", str(model.folder), "-f", *folds, "--method", method,
               "--fit-on", fit_on]
    if fit_on == "images":
        fitted_on = fitted_on or {}
        command += ["--images", fitted_on.get("images", "IMAGES"), "--labels", fitted_on.get("labels", "LABELS")]
        command += [] if fitted_on.get("mirroring", True) else ["--disable_tta"]
    return shlex.join(command)


def write_fit_record(path: Path, record: dict[str, Any], command: str) -> None:
    """Write a fit's record atomically, naming the fix if the model folder cannot be written."""
    try:
        write_json_atomic(path, record)
    except OSError as error:
        raise OSError(f"cannot write {path} ({error.strerror or error}): {command} records its fit in the model "
                      f"folder, so it must be writable (or fit a copy of the model folder)") from None


def write_map(fold_folders: list[Path], record: dict[str, Any]) -> None:
    """Write the record into each fold's calibration_map.json (atomically, one file after the other: an
    interrupted write of a shared map leaves folds with different records, which the export refuses)."""
    for fold_folder in fold_folders:
        write_fit_record(fold_folder / CALIBRATION_MAP_FILE, record, "fit-calibration")


@dataclass(frozen=True)
class MapRecord:
    """A fold's calibration_map.json as read."""

    path: Path
    calibration: AffineCalibration
    scope: FitScope
    fitted_on: dict[str, Any]

    def fit_command(self, model: TrainedModel, folds: list[str], fit_on: str | None = None) -> str:
        """The command that fits this record's kind of map (or one of `fit_on`) again, for `folds`."""
        return fit_command(model, folds, self.calibration.method, fit_on or self.scope.fit_on, self.fitted_on)


def read_map(fold_folder: Path, model: TrainedModel) -> MapRecord:
    """The fold's calibration_map.json, refused if missing or unreadable (naming the command that fits it)."""
    path = fold_folder / CALIBRATION_MAP_FILE
    command = fit_command(model, [fold_of(fold_folder)], "vector", "fold")
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: fit it first, e.g. `{command}` (or --method temperature, "
                                f"matrix; --fit-on pooled or images), or export without --calibration")
    try:
        record = json.loads(path.read_text())
        calibration = AffineCalibration.from_dict(record["calibration"])
        if "fit_on" in record:
            scope = FitScope(record["fit_on"], {str(fold): str(sha) for fold, sha in record["checkpoints"].items()})
        else:  # format 1
            scope = FitScope("fold", {fold_folder.name: str(record["checkpoint_sha256"])})
        if scope.fit_on not in FIT_ON:
            raise ValueError(f"unknown fit_on {scope.fit_on!r}")
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{path} is not a valid calibration map ({error}); fit it again with `{command}`") \
            from None
    return MapRecord(path, calibration, scope, dict(record.get("fitted_on", {})))


def _check_one_scope(records: dict[str, MapRecord], model: TrainedModel) -> FitScope:
    """The scope all the exported folds' maps share, refusing maps of different scopes or of different fits."""
    exported = [fold_of(Path(name)) for name in records]
    first = next(iter(records.values()))
    scopes = {record.scope.fit_on for record in records.values()}
    if len(scopes) > 1:
        listed = "; ".join(f"{name}: {record.calibration.method} {record.scope.describe()}"
                           for name, record in records.items())
        on_images = [record for record in records.values() if record.scope.fit_on == "images"]
        command = on_images[0].fit_command(model, exported) if on_images else \
            fit_command(model, exported, first.calibration.method, "pooled")
        raise ValueError(f"the folds' calibration maps were fitted with different scopes ({listed}), and one export "
                         f"folds one kind of map into every fold: fit them together, e.g. `{command}`")
    if first.scope.fit_on == "fold":
        return first.scope
    command = first.fit_command(model, exported)
    for record in records.values():
        same_map = record.calibration.weight.equal(first.calibration.weight) and \
            record.calibration.bias.equal(first.calibration.bias)
        if record.scope != first.scope or record.fitted_on != first.fitted_on or not same_map:
            raise ValueError(f"{record.path} and {first.path} hold maps of two different {first.scope.fit_on} fits "
                             f"(one fit was interrupted, or run for other folds or data): fit them together with `{command}`")
    if sorted(first.scope.folds) != sorted(exported):
        if len(exported) == 1 and first.scope.fit_on == "pooled":
            command = first.fit_command(model, exported, "fold")
        raise ValueError(f"{first.path} is one map {first.scope.describe()}, fitted for the ensemble of exactly "
                         f"those folds, but the export has folds {', '.join(exported)}: export with -f "
                         f"{' '.join(first.scope.folds)}, or fit a map for the exported folds with `{command}`")
    return first.scope


def check_checkpoints_current(model: TrainedModel, scope: FitScope, where: Path, command: str) -> dict[str, str]:
    """The SHA-256 of each fold's current checkpoint_final.pth, refusing (naming `where` and the refit `command`)
    a scope fitted for another one."""
    current = {}
    for name, fitted_for in scope.checkpoints.items():
        checkpoint = model.folder / name / FINAL_CHECKPOINT
        current[name] = file_sha256(checkpoint) if checkpoint.is_file() else "missing"
        if current[name] != fitted_for:
            raise ValueError(f"{where} was fitted for another {FINAL_CHECKPOINT} of {name} than the current one (the "
                             f"fold was trained again): fit it again with `{command}`")
    return current


def check_classes(calibration: AffineCalibration, num_classes: int, where: Path, command: str) -> None:
    """Refuse a map of another number of classes than the network's outputs."""
    if calibration.num_classes != num_classes:
        raise ValueError(f"{where} maps {calibration.num_classes} classes, but the model's network outputs "
                         f"{num_classes}: it was fitted for another dataset or label set; fit it again with "
                         f"`{command}`")


def check_bound(calibration: AffineCalibration, allow_bound: bool, where: Path, what: str) -> str | None:
    """The bound a temperature lies at ("lower" or "upper", else None), refused unless `allow_bound`."""
    side = calibration.info.get("at_bound") if calibration.method == "temperature" else None
    if side is not None and not allow_bound:
        raise ValueError(f"{where}: T = {calibration.info['temperature']:g} is the {side} bound of the temperature "
                         f"search, not a fit ({BOUND_MEANINGS[side]}): check the model and its {what}, or pass "
                         f"--allow-bound to fold it in anyway")
    return side


def calibrations_for_export(model: TrainedModel, fold_folders: list[Path], num_classes: int, allow_bound: bool
                            ) -> tuple[dict[str, AffineCalibration], dict[str, Any]]:
    """Each exported fold's map from fit-calibration, checked (see the module docstring), and what export_info.json
    records of them."""
    records = {fold_folder.name: read_map(fold_folder, model) for fold_folder in fold_folders}
    scope = _check_one_scope(records, model)
    # a shared map names every fold's checkpoint: checked once
    checked = list(records.values()) if scope.fit_on == "fold" else [next(iter(records.values()))]
    checkpoints, at_bound = {}, {}
    for record in checked:
        command = record.fit_command(model, record.scope.folds)
        checkpoints.update(check_checkpoints_current(model, record.scope, record.path, command))
        check_classes(record.calibration, num_classes, record.path, command)
        side = check_bound(record.calibration, allow_bound, record.path,
                           "calibration set" if scope.fit_on == "images" else "logit sample")
        if side is not None:
            at_bound.update({name: side for name in record.scope.checkpoints})
    calibrations = {name: record.calibration for name, record in records.items()}
    info = {"calibration_fit_on": scope.fit_on, "calibration_checkpoints": checkpoints,
            "calibrations_fitted_on": {name: record.fitted_on for name, record in records.items()},
            "calibrations_folded_in": {name: {"method": calibration.method, "weight": calibration.weight.tolist(),
                                              "bias": calibration.bias.tolist()}
                                       for name, calibration in calibrations.items()}}
    if at_bound:
        info["temperatures_at_bound"] = at_bound
    return calibrations, info
