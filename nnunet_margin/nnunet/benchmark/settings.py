"""What a benchmark is: its settings, the checks they pass before any step runs, and the identity that names its
folder.

A benchmark is identified by what its results depend on: dataset, configuration, plans, trainers, folds, post-hoc
calibrators, what they are fitted on (`--post-hoc-fit`, and the calibration set of `images`: only when set, so that
benchmarks of earlier versions keep their names) and the test set (its folders and a fingerprint of every file: name,
size, modification time). Its folder is
$nnUNet_results/DATASET/calibration_benchmarks/NAME, NAME derived from that identity unless `--name` is given, and
benchmark.json records the identity: a run whose identity differs from the folder's is refused with the
differences, so two studies never share a folder. The number of repeats, the baseline and the device are not part
of it: more repeats add steps to the same benchmark, the others change only the report or the hardware.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..layout import (DATASET_FILE, cases_with_suffix, channel_count, gt_segmentations_folder, planned_plans,
                      plans_file, raw_images)

POST_HOC_METHODS = ("temperature", "vector", "matrix")  # fit-calibration --method
POST_HOC_FITS = ("fold", "pooled", "images")  # fit-calibration --fit-on; "fold" is the default
BENCHMARKS_FOLDER = "calibration_benchmarks"  # in $nnUNet_results/DATASET
TRAININGS_FOLDER = "_trainings"  # BENCHMARKS_FOLDER/_trainings/repeat_R: the results roots of repeats 2.., shared
LOCKS_FOLDER = "_locks"  # BENCHMARKS_FOLDER/_locks: locks of model folds that several benchmarks may train
IDENTITY_FILE = "benchmark.json"
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


@dataclass
class BenchmarkSettings:
    """The command line of `nnunet-margin benchmark`."""

    dataset: str
    configuration: str
    trainers: list[str]
    folds: list[str]
    plans: str = "nnUNetPlans"
    baseline: str | None = None
    post_hoc: list[str] = field(default_factory=list)
    post_hoc_fit: str = "fold"
    test_images: Path | None = None
    test_labels: Path | None = None
    calibration_images: Path | None = None  # the calibration set of post_hoc_fit "images"
    calibration_labels: Path | None = None
    repeats: int = 1
    device: str = "cuda"
    gpus: list[str] = field(default_factory=list)
    name: str | None = None
    random_split_folds: bool = False


def file_listing(folder: Path, names: list[str]) -> dict[str, list[int]]:
    """{name: [size, modification time in ns]} of the files `names` in `folder`."""
    listing = {}
    for name in names:
        status = (folder / name).stat()
        listing[name] = [status.st_size, status.st_mtime_ns]
    return listing


@dataclass(frozen=True)
class TestSet:
    """Held-out images (nnU-Net's imagesTs layout) and their reference segmentations, with the fingerprint of every
    file: the test set, or the calibration set of `--post-hoc-fit images`."""

    images: Path
    labels: Path
    cases: tuple[str, ...]
    file_ending: str
    image_files: dict[str, list[int]]
    label_files: dict[str, list[int]]

    @classmethod
    def read(cls, images: Path, labels: Path, file_ending: str, channels: int, kind: str = "test") -> TestSet:
        """The set, checked: every case has each of the dataset's `channels` images and a label, and every label an
        image. `kind` ("test" or "calibration") names the options in the messages (--test-images, ...)."""
        images_option, labels_option = f"--{kind}-images", f"--{kind}-labels"
        for argument, folder in ((images_option, images), (labels_option, labels)):
            if not folder.is_dir():
                raise FileNotFoundError(f"{argument} {folder} is not a folder: pass the folder of the {kind} set's "
                                        f"{'images (imagesTs layout)' if argument == images_option else 'labels'}")
        image_cases = raw_images(images, file_ending)
        label_cases = {case: case + file_ending for case in cases_with_suffix(labels, file_ending)}
        if not image_cases:
            raise FileNotFoundError(f"{images_option} {images} holds no images CASE_XXXX{file_ending}: pass a folder "
                                    f"in nnU-Net's imagesTs layout")
        expected = [f"_{channel:04d}{file_ending}" for channel in range(channels)]
        incomplete = [case for case, names in image_cases.items() if names != [case + end for end in expected]]
        if incomplete:
            raise ValueError(f"{images_option}: case {incomplete[0]} has {image_cases[incomplete[0]]} but the dataset "
                             f"has {channels} channel(s), named {[incomplete[0] + end for end in expected]}: complete "
                             f"or remove {len(incomplete)} such case(s)")
        unlabelled = sorted(set(image_cases) - set(label_cases))
        if unlabelled:
            raise ValueError(f"{labels_option}: no label for {len(unlabelled)} {kind} case(s) {_few(unlabelled)} "
                             f"(expected {labels / (unlabelled[0] + file_ending)}): add their labels, or move those "
                             f"images out of {images}")
        without_image = sorted(set(label_cases) - set(image_cases))
        if without_image:
            raise ValueError(f"{labels_option}: {len(without_image)} label(s) {_few(without_image)} have no image in "
                             f"{images_option} (expected {images / (without_image[0] + expected[0])}): add the "
                             f"images, or move those labels out of {labels}")
        cases = tuple(sorted(image_cases))
        return cls(images.resolve(), labels.resolve(), cases, file_ending,
                   file_listing(images, [name for case in cases for name in image_cases[case]]),
                   file_listing(labels, [label_cases[case] for case in cases]))

    def check_apart_from(self, test_set: TestSet) -> None:
        """Refuse a calibration set that shares a folder or a case with the test set: a map fitted on test cases
        would be measured on the cases it was fitted on."""
        for kind in ("images", "labels"):
            if getattr(self, kind) == getattr(test_set, kind):
                raise ValueError(f"--calibration-{kind} and --test-{kind} are the same folder {getattr(self, kind)}: "
                                 f"the calibrators would be measured on the cases they were fitted on; pass held-out "
                                 f"cases that are not in the test set")
        shared = sorted(set(self.cases) & set(test_set.cases))
        if shared:
            raise ValueError(f"--calibration-images and --test-images share {len(shared)} case(s) {_few(shared)}: "
                             f"the calibrators would be measured on cases they were fitted on; remove those cases "
                             f"from one of the two sets")

    def identity(self) -> dict:
        return {"images": str(self.images), "labels": str(self.labels), "image_files": self.image_files,
                "label_files": self.label_files}


def _few(names: list[str], count: int = 3) -> str:
    return ", ".join(names[:count]) + (", ..." if len(names) > count else "")


def identity_digest(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def identity_differences(old: dict, new: dict) -> list[str]:
    """What differs between two benchmark identities, in words ("folds 0 -> 0 1", "test labels: case_1 modified")."""
    sets = {"test_set": "test", "calibration_set": "calibration"}
    differences = []
    for key in sorted((set(old) | set(new)) - set(sets)):
        if old.get(key) != new.get(key):
            differences.append(f"{key.replace('_', '-')} {_words(old.get(key))} -> {_words(new.get(key))}")
    for key, word in sets.items():
        differences += _set_differences(old.get(key), new.get(key), word)
    return differences


def _set_differences(old: dict | None, new: dict | None, word: str) -> list[str]:
    """What differs between two identities of a set of cases (`TestSet.identity`)."""
    if old is None or new is None:
        return [] if old == new else [f"{word} set " + ("added" if old is None else "removed")]
    differences = []
    for kind in ("images", "labels"):
        if old[kind] != new[kind]:
            differences.append(f"{word} {kind} {old[kind]} -> {new[kind]}")
        old_files, new_files = old[f"{kind[:-1]}_files"], new[f"{kind[:-1]}_files"]
        changes = [f"{name} {'added' if name not in old_files else 'removed' if name not in new_files else 'modified'}"
                   for name in sorted(set(old_files) | set(new_files)) if old_files.get(name) != new_files.get(name)]
        if changes:
            differences.append(f"{word} {kind}: {_few(changes)}")
    return differences


def _words(value) -> str:
    if value is None:
        return "none"
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


@dataclass
class Benchmark:
    """A benchmark's settings, checked and resolved against nnU-Net's folders (see `resolve`)."""

    settings: BenchmarkSettings
    dataset_name: str
    results: Path  # nnUNet_results
    preprocessed: Path  # nnUNet_preprocessed/DATASET
    plugin: dict[str, bool]  # trainer -> is one of this package's trainers (writes its own calibration report)
    test_set: TestSet | None
    name: str
    calibration_set: TestSet | None = None  # of --post-hoc-fit images

    @property
    def root(self) -> Path:
        """The folder of every benchmark of the dataset, and of their shared repeats and locks."""
        return self.results / self.dataset_name / BENCHMARKS_FOLDER

    @property
    def folder(self) -> Path:
        return self.root / self.name

    @property
    def gt_folder(self) -> Path:
        return gt_segmentations_folder(self.preprocessed)

    def results_root(self, repeat: int) -> Path:
        """nnUNet_results of a repeat's trainings: nnU-Net's own for the first, a shared root for the others."""
        return self.results if repeat == 1 else self.root / TRAININGS_FOLDER / f"repeat_{repeat}"

    def identity(self) -> dict:
        """What the results depend on (see the module docstring); empty settings are left out, so that a setting
        added later does not rename existing benchmarks."""
        settings = self.settings
        identity = {"dataset": self.dataset_name, "configuration": settings.configuration, "plans": settings.plans,
                    "trainers": sorted(settings.trainers), "folds": sorted(settings.folds, key=int)}
        if settings.post_hoc:
            identity["post_hoc"] = sorted(settings.post_hoc)
        if settings.post_hoc_fit != "fold":
            identity["post_hoc_fit"] = settings.post_hoc_fit
        if self.test_set is not None:
            identity["test_set"] = self.test_set.identity()
        if self.calibration_set is not None:
            identity["calibration_set"] = self.calibration_set.identity()
        return identity


def default_name(configuration: str, identity: dict) -> str:
    return f"{configuration}-{identity_digest(identity)[:10]}"


def resolve(settings: BenchmarkSettings) -> Benchmark:
    """Check every argument against nnU-Net's folders before any step runs, each error naming the argument and the
    fix; returns the benchmark."""
    results, preprocessed_root = os.environ.get("nnUNet_results"), os.environ.get("nnUNet_preprocessed")
    if not results or not preprocessed_root:
        raise RuntimeError("nnUNet_results and nnUNet_preprocessed must be set, as for nnU-Net")
    _check_arguments(settings)
    dataset_name = _dataset_name(settings.dataset)
    preprocessed = Path(preprocessed_root) / dataset_name
    _check_plans(settings, preprocessed, dataset_name)
    _check_folds(settings, preprocessed)
    plugin = {trainer: _is_plugin_trainer(trainer) for trainer in settings.trainers}
    test_set = calibration_set = None
    if settings.test_images is not None:
        dataset_json = json.loads((preprocessed / DATASET_FILE).read_text())
        file_ending, channels = dataset_json["file_ending"], channel_count(dataset_json)
        test_set = TestSet.read(Path(settings.test_images), Path(settings.test_labels), file_ending, channels)
        if settings.calibration_images is not None:
            calibration_set = TestSet.read(Path(settings.calibration_images), Path(settings.calibration_labels),
                                           file_ending, channels, kind="calibration")
            calibration_set.check_apart_from(test_set)
    benchmark = Benchmark(settings, dataset_name, Path(results), preprocessed, plugin, test_set, "",
                          calibration_set)
    benchmark.name = settings.name or default_name(settings.configuration, benchmark.identity())
    return benchmark


def _check_arguments(settings: BenchmarkSettings) -> None:
    """The checks that need no nnU-Net folder."""
    for argument, values in (("-tr", settings.trainers), ("-f", settings.folds), ("--gpus", settings.gpus),
                             ("--post-hoc", settings.post_hoc)):
        repeated = sorted({value for value in values if values.count(value) > 1})
        if repeated:
            raise ValueError(f"{argument} lists {', '.join(repeated)} more than once: list each once")
    for fold in settings.folds:
        if fold == "all":
            raise ValueError("-f all: fold 'all' trains on every case and has no validation cases to compare; pass "
                             "cross-validation folds, e.g. -f 0 1 2 3 4")
        if not fold.isdigit():
            raise ValueError(f"-f {fold}: folds are numbers of nnU-Net's cross-validation split, e.g. -f 0 1 2 3 4")
    if settings.baseline is not None and settings.baseline not in settings.trainers:
        raise ValueError(f"--baseline {settings.baseline} is not one of the trainers {settings.trainers}: pass one "
                         f"of them (or add it to -tr)")
    if (settings.test_images is None) != (settings.test_labels is None):
        raise ValueError("pass --test-images and --test-labels together")
    _check_post_hoc(settings)
    if settings.name is not None and not _NAME_PATTERN.fullmatch(settings.name):
        raise ValueError(f"--name {settings.name!r}: use letters, digits and . _ + - (starting with a letter or "
                         f"digit), e.g. --name mbls_vs_cals")
    check_gpus(settings.gpus, settings.device)


def _check_post_hoc(settings: BenchmarkSettings) -> None:
    """--post-hoc, --post-hoc-fit and the calibration set go together as fit-calibration needs them."""
    unknown = [method for method in settings.post_hoc if method not in POST_HOC_METHODS]
    if unknown:
        raise ValueError(f"--post-hoc {' '.join(unknown)}: supported are {' '.join(POST_HOC_METHODS)}")
    if settings.post_hoc_fit not in POST_HOC_FITS:
        raise ValueError(f"--post-hoc-fit {settings.post_hoc_fit}: supported are {' '.join(POST_HOC_FITS)}")
    if settings.post_hoc_fit != "fold" and not settings.post_hoc:
        raise ValueError(f"--post-hoc-fit {settings.post_hoc_fit} says what the post-hoc calibrators are fitted on, "
                         f"but none is asked for: add --post-hoc {' '.join(POST_HOC_METHODS)} (any of them), or drop "
                         f"--post-hoc-fit")
    if settings.post_hoc and settings.test_images is None:
        raise ValueError("post-hoc calibration is fitted on the validation cases or a calibration set, and evaluated "
                         "on held-out cases only: pass --test-images and --test-labels")
    if settings.post_hoc_fit == "pooled" and len(settings.folds) < 2:
        raise ValueError(f"--post-hoc-fit pooled fits one map on several folds' validation cases, but -f has only "
                         f"fold {settings.folds[0]}: pass two or more folds, or --post-hoc-fit fold")
    calibration_set = (settings.calibration_images, settings.calibration_labels)
    if settings.post_hoc_fit == "images" and None in calibration_set:
        raise ValueError("--post-hoc-fit images fits each calibrator on the fold ensemble's predictions of a held-out "
                         "calibration set: pass its images and labels with --calibration-images DIR "
                         "--calibration-labels DIR (cases apart from the test set and the training cases)")
    if settings.post_hoc_fit != "images" and calibration_set != (None, None):
        raise ValueError(f"--calibration-images and --calibration-labels are the calibration set of --post-hoc-fit "
                         f"images, but the calibrators are fitted with --post-hoc-fit {settings.post_hoc_fit}: add "
                         f"--post-hoc-fit images, or drop the calibration set")


def check_gpus(gpus: list[str], device: str) -> None:
    """--gpus are indices of the CUDA devices this process sees."""
    if not gpus:
        return
    if device != "cuda":
        raise ValueError(f"--gpus with -device {device}: the GPUs are only used with -device cuda; drop --gpus or "
                         f"-device {device}")
    import torch

    count = torch.cuda.device_count()
    wrong = [gpu for gpu in gpus if not gpu.isdigit() or int(gpu) >= count]
    if wrong:
        seen = f"indices 0-{count - 1}" if count else "none"
        raise ValueError(f"--gpus {' '.join(wrong)}: this machine shows {count} CUDA device(s) ({seen}; "
                         f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): list indices of "
                         f"visible devices")


def gpu_slots(gpus: list[str]) -> list[str | None]:
    """The CUDA_VISIBLE_DEVICES value of each --gpus slot (an index among the visible devices), or one slot that
    leaves it as it is."""
    visible = [part.strip() for part in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if part.strip()]
    return [visible[int(gpu)] if visible else gpu for gpu in gpus] or [None]


def _dataset_name(dataset: str) -> str:
    from .. import _seams

    try:
        return _seams.dataset_name(dataset)
    except (RuntimeError, ValueError) as error:
        raise ValueError(f"DATASET {dataset}: {str(error).splitlines()[0]} Pass a dataset id or name that "
                         f"nnUNetv2_plan_and_preprocess has planned") from None


def _check_plans(settings: BenchmarkSettings, preprocessed: Path, dataset_name: str) -> None:
    from .. import _seams

    path = plans_file(preprocessed, settings.plans)
    if not path.is_file():
        raise FileNotFoundError(f"-p {settings.plans}: there is no {path} (plans of {dataset_name}: "
                                f"{', '.join(planned_plans(preprocessed)) or 'none'}); pass one of them, or plan "
                                f"with nnUNetv2_plan_and_preprocess -d {dataset_name}")
    manager = _seams.PlansManager(str(path))
    if settings.configuration not in manager.available_configurations:
        raise ValueError(f"-c {settings.configuration}: {path.name} has no such configuration (it has "
                         f"{', '.join(manager.available_configurations)}); pass one of them")
    identifier = manager.get_configuration(settings.configuration).data_identifier
    if not (preprocessed / identifier).is_dir():
        raise FileNotFoundError(f"-c {settings.configuration} is planned but not preprocessed (no "
                                f"{preprocessed / identifier}): run nnUNetv2_preprocess -d {dataset_name} -c "
                                f"{settings.configuration} -plans_name {settings.plans}")


def _check_folds(settings: BenchmarkSettings, preprocessed: Path) -> None:
    from .. import _seams

    count = _seams.cross_validation_fold_count(preprocessed)
    outside = [fold for fold in settings.folds if int(fold) >= count]
    if outside and not settings.random_split_folds:
        raise ValueError(f"-f {' '.join(outside)}: nnU-Net's cross-validation of this dataset has {count} folds "
                         f"(0-{count - 1}, splits_final.json), and trains any other fold on a random 80:20 split; "
                         f"pass folds 0-{count - 1}, or --random-split-folds if you mean that")


def _is_plugin_trainer(trainer: str) -> bool:
    from ...trainers import nnUNetTrainerWithCalibration
    from .. import _seams

    try:
        return issubclass(_seams.find_trainer_class(trainer), nnUNetTrainerWithCalibration)
    except RuntimeError:
        raise ValueError(f"-tr {trainer}: nnU-Net cannot find this trainer: check the name, and set "
                         f"nnUNet_extTrainer (`nnunet-margin trainers-path` for this plugin's trainers)") from None
