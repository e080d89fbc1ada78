"""`nnunet-margin predict`: nnU-Net's prediction of a folder of images, plus the uncertainty of its ensemble.

The segmentations (and with --save_probabilities the probabilities) are nnU-Net's own: its predictor preprocesses
each case, runs every fold's sliding window and exports, all through `_seams`. Each member's logits (a fold, or with
--tta-members each test-time mirroring of each fold) are observed as nnU-Net computes them, resampled to the image as
nnU-Net's export resamples the ensemble, and streamed into `MemberStatistics` (no member is stored). After nnU-Net's
export of the case, its maps go into OUT/uncertainty_maps/ in the image's geometry and file format, and its
confidence scores (docs/methods.md 8) into OUT/uncertainty.csv and OUT/uncertainty.json.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import multiprocessing
import os
import tempfile
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .._atomic import atomic_path
from ..calibration.uncertainty import MemberStatistics, case_scores, entropy, most_foreground_slice, plot_case_review
from . import _seams
from .layout import (FINAL_CHECKPOINT, ExportedFiles, TrainedModel, fold_folder_name, fold_of, model_folder_name,
                     spacing)

MAPS = ("entropy", "mutual_information", "std")
MEMBER_MAPS = ("mutual_information", "std")  # these need two or more members
AVERAGES = ("logits", "probabilities")
MAPS_FOLDER = "uncertainty_maps"
SCORES_CSV = "uncertainty.csv"
SCORES_JSON = "uncertainty.json"
NNUNET_FOLDS = ("0", "1", "2", "3", "4")


@dataclass(frozen=True)
class PredictionRequest:
    """What `nnunet-margin predict` is asked to do (its command-line arguments)."""

    input_folder: Path
    output_folder: Path
    model_folder: Path
    folds: tuple[str, ...] = NNUNET_FOLDS
    checkpoint: str = FINAL_CHECKPOINT
    device: str = "cuda"
    disable_tta: bool = False
    save_probabilities: bool = False
    continue_prediction: bool = False
    preprocessing_processes: int = 3
    export_processes: int = 3
    tta_members: bool = False
    average: str = "logits"
    maps: tuple[str, ...] | None = None  # None: every map the members allow
    png: bool = False


def model_folder(dataset: str, trainer: str, plans: str, configuration: str) -> Path:
    """nnUNet_results/DATASET/TRAINER__PLANS__CONFIGURATION, the model nnUNetv2_predict -d -tr -p -c uses."""
    results = os.environ.get("nnUNet_results")
    if not results:
        raise RuntimeError("nnUNet_results is not set: export it as for nnUNetv2_predict, or pass the model folder "
                           "with -m")
    try:
        name = _seams.dataset_name(dataset)
    except RuntimeError:  # nnU-Net's message lists its folders over several lines
        raise FileNotFoundError(f"dataset {dataset} is in none of nnUNet_raw, nnUNet_preprocessed and nnUNet_results: "
                                f"pass its name or id as for nnUNetv2_predict, or the model folder with -m") from None
    folder = Path(results) / name / model_folder_name(trainer, plans, configuration)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist: {name} has no model of trainer {trainer} (-tr, default "
                                f"nnUNetTrainer), plans {plans} (-p) and configuration {configuration} (-c)")
    return folder


def check_request(request: PredictionRequest) -> TrainedModel:
    """The checks that need no network: the model and its folds' checkpoints, the folders, the options."""
    model = TrainedModel.load(request.model_folder)
    missing = [fold for fold in request.folds
               if not (model.folder / fold_folder_name(fold) / request.checkpoint).is_file()]
    if missing:
        checkpoints = model.folder.glob(f"{fold_folder_name('*')}/{request.checkpoint}")
        trained = sorted(fold_of(path.parent) for path in checkpoints)
        raise FileNotFoundError(
            f"fold {missing[0]} has no {request.checkpoint} "
            f"({model.folder / fold_folder_name(missing[0]) / request.checkpoint}): it is not trained or has not "
            f"finished; pass trained folds with -f (trained: {', '.join(trained) or 'none'})")
    input_folder, output_folder = request.input_folder.resolve(), request.output_folder.resolve()
    if not input_folder.is_dir():
        raise FileNotFoundError(f"input folder {request.input_folder} does not exist: pass the folder of images "
                                f"(CASE_0000<file_ending>, one file per channel) with -i")
    if output_folder == input_folder or input_folder in output_folder.parents:
        raise ValueError(f"the output folder {request.output_folder} lies inside the input folder "
                         f"{request.input_folder}, where its files would be taken for images: choose an output "
                         f"folder outside it")
    if request.tta_members and request.disable_tta:
        raise ValueError("--tta-members makes every test-time mirroring a member and --disable_tta switches "
                         "mirroring off: drop one of them")
    if request.average not in AVERAGES:
        raise ValueError(f"--average must be one of {', '.join(AVERAGES)}, got {request.average!r}")
    unknown = sorted(set(request.maps or ()) - set(MAPS))
    if unknown:
        raise ValueError(f"unknown map(s) {', '.join(unknown)}: choose from {', '.join(MAPS)}")
    return model


def torch_device(name: str) -> torch.device:
    """The device, set up as nnUNetv2_predict sets it up (every CPU thread on the CPU, one thread with a GPU)."""
    if name == "cpu":
        torch.set_num_threads(multiprocessing.cpu_count())
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("-device cuda, but torch finds no CUDA GPU: pass -device cpu")
        torch.set_num_threads(1)
        with contextlib.suppress(RuntimeError):  # only possible before any parallel work in this process
            torch.set_num_interop_threads(1)
        return torch.device("cuda")
    if name == "mps":
        return torch.device("mps")
    raise ValueError(f"-device must be cpu, cuda or mps, got {name!r}")


def load_ensemble(model_folder: Path, folds: Sequence[str], checkpoint: str, device: str, mirroring: bool):
    """nnU-Net's predictor of the folds' ensemble, set up as nnUNetv2_predict sets it up on `device` (with
    test-time mirroring if `mirroring`); refused for a model that needs more than its images (a cascade stage) or
    has no softmax over classes (region-based labels)."""
    predictor = _seams.load_predictor(model_folder, folds, checkpoint, torch_device(device), mirroring)
    problem = _seams.unsupported_model(predictor)
    if problem is not None:
        raise ValueError(f"{model_folder}: {problem}")
    return predictor


def member_names(predictor, folds: tuple[str, ...], tta_members: bool) -> list[str]:
    """fold_F for each fold; with --tta-members fold_F/mirror_AXES for each of nnU-Net's test-time mirrorings."""
    if not tta_members:
        return [fold_folder_name(fold) for fold in folds]
    return [f"{fold_folder_name(fold)}/mirror_{'_'.join(map(str, axes)) or 'none'}"
            for fold in folds for axes in _seams.mirrorings(predictor)]


def chosen_maps(requested: tuple[str, ...] | None, members: list[str], tta_members: bool) -> tuple[str, ...]:
    """The maps to write: those requested (default all); one member gives no disagreement, so entropy only."""
    if len(members) > 1:
        return requested or MAPS
    needing_members = [name for name in requested or () if name in MEMBER_MAPS]
    if needing_members:
        hint = ("the model has no test-time mirroring, so --tta-members adds no member; pass several folds with -f"
                if tta_members else "pass several folds with -f, or --tta-members for a model with test-time "
                                    "mirroring")
        raise ValueError(f"--maps {' '.join(needing_members)} needs at least two members to measure their "
                         f"disagreement, but this prediction has one ({members[0]}): {hint}")
    return ("entropy",)


def input_cases(folder: Path, dataset_json: dict) -> dict[str, list[str]]:
    """The input folder's cases with their channel files, checked against the channels the model was trained on."""
    ending = dataset_json["file_ending"]
    cases = _seams.input_case_files(folder, ending)
    if not cases:
        raise FileNotFoundError(f"no images in {folder}: nnU-Net expects one file per case and channel, named "
                                f"CASE_0000{ending}, CASE_0001{ending}, ... (the dataset's file ending {ending})")
    channels = _seams.channel_names(dataset_json)
    for case, files in cases.items():
        if [_seams.channel_number(file, case) for file in files] != list(range(len(channels))):
            trained = ", ".join(f"_{number:04d} {name}" for number, name in enumerate(channels))
            raise ValueError(f"case {case} in {folder} has the files {', '.join(Path(f).name for f in files)}, but "
                             f"the model was trained on {len(channels)} channel(s) ({trained}): give every case "
                             f"exactly the files {', '.join(f'{case}_{n:04d}{ending}' for n in range(len(channels)))}")
    return cases


# --- the files of a case -----------------------------------------------------------------------------------------

def maps_folder(output_folder: Path) -> Path:
    """The maps go into a subfolder: nnU-Net's evaluation, postprocessing and ensembling take every
    CASE<file_ending> of a prediction folder for a segmentation."""
    return output_folder / MAPS_FOLDER


def scores_file(output_folder: Path, case: str) -> Path:
    return maps_folder(output_folder) / f"{case}.json"


def map_file(output_folder: Path, case: str, name: str, ending: str) -> Path:
    return maps_folder(output_folder) / f"{case}_{name}{ending}"


def png_file(output_folder: Path, case: str) -> Path:
    return maps_folder(output_folder) / f"{case}.png"


@dataclass(frozen=True)
class OutputSettings:
    """What is written for every case (picklable for export worker processes)."""

    output_folder: Path
    members: tuple[str, ...]
    average: str
    maps: tuple[str, ...]
    png: bool
    save_probabilities: bool
    file_ending: str
    map_ending: str

    def record(self) -> dict:
        """The settings a case's scores file records; --continue_prediction redoes cases written with others."""
        return {"members": list(self.members), "average": self.average, "maps": list(self.maps), "png": self.png}

    def files(self, case: str) -> list[Path]:
        exported = ExportedFiles.of(self.output_folder, case, self.file_ending)
        files = [exported.segmentation, *((exported.probabilities, exported.properties)
                                          if self.save_probabilities else ())]
        files += [map_file(self.output_folder, case, name, self.map_ending) for name in self.maps]
        return files + ([png_file(self.output_folder, case)] if self.png else [])

    def finished(self, case: str) -> bool:
        """Whether a case is complete with these settings (its scores file is written last)."""
        path = scores_file(self.output_folder, case)
        if not (path.is_file() and all(file.is_file() for file in self.files(case))):
            return False
        with contextlib.suppress(ValueError, KeyError):
            return json.loads(path.read_text())["settings"] == self.record()
        return False


def _write_replacing(folder: Path, name: str, write: Callable[[Path], None]) -> None:
    """Write file `name` (and any side file the writer adds) in a hidden staging folder inside `folder`, then rename
    each into `folder`: an interrupted write leaves the previous file."""
    with tempfile.TemporaryDirectory(dir=folder, prefix=".staging_") as staging:
        write(Path(staging) / name)
        for produced in Path(staging).iterdir():
            os.replace(produced, folder / produced.name)


def _write_json(path: Path, content: dict) -> None:
    """JSON with NaN written as null; atomic."""
    def clean(value):
        if isinstance(value, dict):
            return {key: clean(item) for key, item in value.items()}
        if isinstance(value, list):
            return [clean(item) for item in value]
        return None if isinstance(value, float) and not math.isfinite(value) else value

    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(clean(content), indent=2))


# --- one case's export (in this process or an export worker) --------------------------------------------------

@dataclass
class ExportJob:
    """Everything the export of one case needs; picklable, as nnU-Net hands its export to worker processes."""

    case: str
    logits: np.ndarray  # the ensemble's: network geometry, or the image's (crop box) with --average probabilities
    properties: dict
    statistics: MemberStatistics | None  # None for a single member
    image_files: list[str]
    plans_manager: object
    configuration_manager: object
    dataset_json: dict
    output: OutputSettings


def export_case(job: ExportJob) -> dict:
    """nnU-Net's export of the case (segmentation; with --save_probabilities its probabilities), then the case's maps,
    PNG and scores file; returns the scores."""
    seen: dict[str, torch.Tensor] = {}

    def observe(logits: torch.Tensor) -> None:  # the ensemble's logits, resampled to the image by nnU-Net's export
        seen["entropy"] = entropy(_seams.probabilities(logits, job.plans_manager, job.dataset_json))
        seen["segmentation"] = logits.argmax(0)  # nnU-Net's own segmentation (its arg-max of the logits)

    output_folder = job.output.output_folder
    _seams.export_prediction_observing_logits(observe, job.logits, job.properties, job.configuration_manager,
                                              job.plans_manager, job.dataset_json, str(output_folder / job.case),
                                              job.output.save_probabilities)
    classes = seen["segmentation"].to(torch.uint8 if job.logits.shape[0] <= 256 else torch.int16)
    crop_maps = {"entropy": seen["entropy"]}
    if job.statistics is not None:
        crop_maps["mutual_information"] = job.statistics.mutual_information()
        if "std" in job.output.maps:
            crop_maps["std"] = job.statistics.std(classes)
    image_maps = {name: _seams.to_image_geometry(values.numpy(), job.properties, job.plans_manager)
                  for name, values in crop_maps.items()}
    segmentation = _seams.to_image_geometry(classes.numpy(), job.properties, job.plans_manager)
    for name in job.output.maps:
        _write_map(image_maps[name], map_file(output_folder, job.case, name, job.output.map_ending), job)
    scores = case_scores(segmentation, image_maps["entropy"], spacing(job.properties),
                         _seams.class_names(job.dataset_json), job.statistics, image_maps.get("mutual_information"))
    if job.output.png:
        index = most_foreground_slice(segmentation)
        image = _seams.read_images(job.image_files, job.plans_manager)[0]
        agreement = f"  pairwise Dice {scores['pairwise_dice']:.3f}" if "pairwise_dice" in scores else ""
        plot_case_review(image[index], segmentation[index], image_maps["entropy"][index],
                         f"{job.case}, slice {index} of axis 0:  entropy (foreground) "
                         f"{scores['entropy_foreground']:.3f}{agreement}", png_file(output_folder, job.case))
    _write_json(scores_file(output_folder, job.case),
                {"case": job.case, "settings": job.output.record(), "scores": scores})
    return scores


def _write_map(values: np.ndarray, path: Path, job: ExportJob) -> None:
    if path.suffix == ".npz":  # a file format that holds no floats (see _seams.float_map_ending)
        _write_replacing(path.parent, path.name, lambda target: np.savez_compressed(target, map=values))
    else:
        _write_replacing(path.parent, path.name, lambda target: _seams.write_float_map(values, target, job.properties,
                                                                                        job.plans_manager))


class _Exporter:
    """Runs `export_case` in this process (0 processes) or in spawned worker processes, like nnU-Net's export pool
    (at most two cases waiting beyond the busy workers); `done` gets each case's scores."""

    def __init__(self, processes: int, done: Callable[[str, dict], None]):
        self.pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) \
            if processes > 0 else None
        self.limit = processes + 2
        self.done = done
        self.waiting: deque[tuple[str, Future]] = deque()

    def submit(self, job: ExportJob) -> None:
        if self.pool is None:
            self.done(job.case, export_case(job))
            return
        while len(self.waiting) >= self.limit:
            self._finish_oldest()
        self.waiting.append((job.case, self.pool.submit(export_case, job)))

    def _finish_oldest(self) -> None:
        case, future = self.waiting.popleft()
        try:
            self.done(case, future.result())
        except BrokenProcessPool:
            raise RuntimeError("an export worker process died, most likely killed by the operating system for lack "
                               "of memory: rerun with fewer export processes (-nps) and --continue_prediction") \
                from None

    def __enter__(self) -> _Exporter:
        return self

    def __exit__(self, *exc_info) -> None:
        try:
            while self.waiting and exc_info[0] is None:
                self._finish_oldest()
        finally:
            if self.pool is not None:
                self.pool.shutdown(cancel_futures=exc_info[0] is not None)


# --- the command ----------------------------------------------------------------------------------------------------

def predict_folder(request: PredictionRequest, report: Callable[[str], None] = print) -> dict[str, dict]:
    """Predict every case of the input folder (those not yet finished with --continue_prediction); write the
    summary files; return {case: scores} of every input case."""
    model = check_request(request)
    predictor = load_ensemble(model.folder, request.folds, request.checkpoint, request.device, not request.disable_tta)
    members = member_names(predictor, request.folds, request.tta_members)
    maps = chosen_maps(request.maps, members, request.tta_members)
    if request.average == "probabilities" and not _seams.keeps_image_geometry(predictor.configuration_manager):
        raise ValueError("--average probabilities needs nnU-Net's default resampling of probabilities (the plans "
                         "name another resampling function): use --average logits")
    cases = input_cases(request.input_folder, predictor.dataset_json)
    output_folder = request.output_folder.resolve()
    settings = OutputSettings(output_folder, tuple(members), request.average, maps, request.png,
                              request.save_probabilities, predictor.dataset_json["file_ending"],
                              _seams.float_map_ending(predictor.plans_manager, predictor.dataset_json))
    if len(members) == 1:
        report(f"one member ({members[0]}): members that could disagree are needed for mutual information, member "
               f"spread and pairwise Dice, so only the predictive entropy is written")
    pending = {case: files for case, files in cases.items()
               if not (request.continue_prediction and settings.finished(case))}
    report(f"predicting {len(pending)} of {len(cases)} case(s) with {len(members)} member(s) "
           f"({', '.join(members)}), averaging {request.average}")
    maps_folder(output_folder).mkdir(parents=True, exist_ok=True)
    _seams.write_prediction_metadata(predictor.plans_manager, predictor.dataset_json, output_folder)
    for case in pending:  # a case interrupted while predicted again must not look finished
        scores_file(output_folder, case).unlink(missing_ok=True)

    def done(case: str, scores: dict) -> None:
        agreement = f", mean pairwise Dice {scores['pairwise_dice']:.3f}" if "pairwise_dice" in scores else ""
        report(f"{case}: entropy (foreground) {scores['entropy_foreground']:.3f}{agreement}")

    with _Exporter(request.export_processes, done) as exporter:
        outputs = [str(output_folder / case) for case in pending]
        for output, data, properties in _seams.preprocessed_cases(predictor, list(pending.values()), outputs,
                                                                  request.preprocessing_processes):
            case = Path(output).name
            logits, statistics = predict_members(predictor, data, properties, request, len(members))
            exporter.submit(ExportJob(case, logits, properties, statistics, cases[case], predictor.plans_manager,
                                      predictor.configuration_manager, predictor.dataset_json, settings))
    records = {case: json.loads(scores_file(output_folder, case).read_text()) for case in cases}
    write_summary(output_folder, records, model, request)
    return {case: record["scores"] for case, record in records.items()}


def predict_members(predictor, data: torch.Tensor, properties: dict, request: PredictionRequest,
                    members: int) -> tuple[np.ndarray, MemberStatistics | None]:
    """One preprocessed case through every member: the ensemble's logits for nnU-Net's export and the members'
    statistics in the image's geometry (None for one member)."""
    statistics = MemberStatistics(predictor.label_manager.num_segmentation_heads) if members > 1 else None

    def observe_member(logits: torch.Tensor) -> None:
        if statistics is not None:
            resampled = _seams.resampled_logits(logits, properties, predictor.plans_manager,
                                                predictor.configuration_manager)
            statistics.add(_seams.probabilities(resampled, predictor.plans_manager, predictor.dataset_json))

    run = _seams.mirrored_member_logits if request.tta_members else _seams.ensemble_logits
    logits = run(predictor, data, observe_member)
    if request.average == "probabilities" and statistics is not None:
        # the log of the members' mean probabilities, already in the image's geometry (the export keeps it there)
        logits = statistics.mean.clamp_min(torch.finfo(torch.float32).tiny).log()
    return logits.numpy(), statistics


def write_summary(output_folder: Path, records: dict[str, dict], model: TrainedModel,
                  request: PredictionRequest) -> None:
    """uncertainty.csv (one row per case) and uncertainty.json (the settings and every case's scores)."""
    columns: list[str] = []
    for record in records.values():
        columns += [name for name in record["scores"] if name not in columns]
    with atomic_path(output_folder / SCORES_CSV) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["case", *columns])
        for case, record in records.items():
            values = (record["scores"].get(name) for name in columns)
            writer.writerow([case, *("" if value is None else value for value in values)])
    first = next(iter(records.values()))
    _write_json(output_folder / SCORES_JSON, {
        "model": str(model.folder), "checkpoint": request.checkpoint, **first["settings"],
        "definitions": "docs/methods.md section 8 of nnunet-margin",
        "cases": {case: record["scores"] for case, record in records.items()},
    })
