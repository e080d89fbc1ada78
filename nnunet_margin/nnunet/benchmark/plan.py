"""The steps of a benchmark, as data: what each runs, what it writes, which steps' outputs it reads.

A step is one command line (nnU-Net's own or this package's), or one action of this package (copying a plugin
trainer's calibration report, writing the report), run as its own process with nnUNet_results set for it. `needs`
names the steps whose outputs it reads; `output` says what it writes and how those files are fingerprinted (see
`state`); `settings` holds the choices its outputs depend on besides those outputs and the data sets in `data`.
Nothing in a step's settings or fingerprints is an absolute path, so a results tree copied with `cp -a` is as done as
the original. The plan (plan.json in the benchmark folder) is everything a step's process needs, so a step runs the
same under any executor.

Per repeat R (nnUNet_results for R = 1, a shared root for R > 1; see `settings`), trainer T and fold F:

- `repeat_R/T/fold_F/train`: `nnUNetv2_train D C F -tr T -p P --c` (with `--npz` for nnU-Net's own trainers, whose
  validation `nnunet-margin calibration` reports); only the validation (`--val`) if the fold is trained but its
  validation is not that of its checkpoint_final.pth;
- `repeat_R/T/fold_F/cross-validation`: the fold's calibration report in the benchmark folder (`nnunet-margin
  calibration` of nnU-Net's validation probabilities, or a copy of the plugin trainer's own report).

With a test set, per repeat, trainer T and post-hoc calibrator K (`--post-hoc`: fit-calibration's methods), the
method T+K is T's fold ensemble with K's map folded in:

- `repeat_R/T+K/fold_F/fit` (`--post-hoc-fit fold`, per fold) or `repeat_R/T+K/fit` (`pooled`, `images`: one map for
  the folds' ensemble): `nnunet-margin fit-calibration` of the benchmark's own view of T's model,
  `repeat_R/post_hoc/T+K/D/T__P__C`, whose fold_F/calibration_map.json it writes. The view is a folder of links
  (`Plan.links`, made when the plan is saved) to the model's plans, dataset and checkpoints (and a plugin trainer's
  logit samples), so each calibrator keeps its own maps and nothing is written into the trained model; nnU-Net's
  own trainers have their validation run again into the view for the logit sample (`--revalidate`);
- `repeat_R/T+K/export`: `nnunet-margin export-portable --calibration` of the view into `repeat_R/exports/T+K`.

Per method M (each trainer, and each T+K): `repeat_R/M/predict` (`nnunet-margin predict` of the fold ensemble, its
members kept for the uncertainty scores, into a fresh folder) and `repeat_R/M/test-evaluation` (`nnunet-margin
calibration`, with the failure detection of those scores). Then `report`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..._atomic import write_json_atomic
from ..layout import FINAL_CHECKPOINT, MODEL_FILES, fold_folder_name, model_folder_name, validation_folder
from .settings import LOCKS_FOLDER, Benchmark

PLAN_FILE = "plan.json"
REPORT_FOLDER = "report"
SUMMARY_FILE = "summary.md"  # in REPORT_FOLDER: the main tables, which `benchmark` prints at the end


@dataclass
class Step:
    """One step of a benchmark (see the module docstring)."""

    id: str
    kind: str
    needs: list[str]
    output: dict  # {"type": "fold" | "folder" | "files", ...}: see state.output_fingerprint
    settings: dict
    command: list[str] | None = None
    validate_command: list[str] | None = None  # train: nnU-Net's validation alone, for a trained fold
    action: str | None = None  # "collect" or "report", run by this package
    arguments: dict = field(default_factory=dict)  # the action's files and folders
    results_root: str = ""  # nnUNet_results of the command
    data: list[str] = field(default_factory=list)  # the data sets it reads
    locks: list[str] = field(default_factory=list)  # lock files of shared folders it writes into
    gpu: bool = False  # runs nnU-Net's network

    @property
    def staged(self) -> bool:
        """Whether the step writes a folder of its own, into a fresh folder swapped in when complete."""
        return self.output["type"] == "folder"

    def current_command(self) -> list[str] | None:
        """The command to run now: nnU-Net's validation alone for a training whose fold has its final checkpoint."""
        if self.validate_command is not None and (Path(self.output["folder"]) / FINAL_CHECKPOINT).is_file():
            return self.validate_command
        return self.command

    def display(self, default_results: Path, command: list[str] | None = None) -> str:
        """The command as a shell line, with nnUNet_results= in front where it is not the user's; an action in
        words."""
        command = command or self.command
        if command is None:
            return f"({self.arguments['description']})"
        line = " ".join(shlex.quote(part) for part in command)
        return line if Path(self.results_root) == default_results else \
            f"nnUNet_results={shlex.quote(self.results_root)} {line}"


@dataclass
class Plan:
    """Every step of a benchmark, in an order where each step comes after the steps it needs."""

    folder: Path
    results: Path  # the user's nnUNet_results
    steps: list[Step]
    data: dict[str, dict]  # name -> {"folder": ..., "files": [...]}: a data set the steps read
    links: list[list[str]] = field(default_factory=list)  # [link, target]: the post-hoc views (see the docstring)

    def step(self, step_id: str) -> Step:
        for step in self.steps:
            if step.id == step_id:
                return step
        raise KeyError(f"no step {step_id!r} in {self.folder / PLAN_FILE}; `benchmark --status` lists the steps")

    def log(self, step: Step) -> Path:
        return self.folder / "logs" / f"{step.id}.log"

    def save(self) -> None:
        """Write plan.json and make the links of the post-hoc views."""
        write_json_atomic(self.folder / PLAN_FILE, {"folder": str(self.folder), "results": str(self.results),
                                                     "data": self.data, "steps": [asdict(step) for step in self.steps],
                                                     "links": self.links})
        for link, target in self.links:
            make_link(Path(link), Path(target))

    @classmethod
    def load(cls, folder: Path) -> Plan:
        try:
            content = json.loads((folder / PLAN_FILE).read_text())
            return cls(Path(content["folder"]), Path(content["results"]), [Step(**step) for step in content["steps"]],
                       content["data"], content.get("links", []))
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{folder / PLAN_FILE} is missing or unreadable ({error}): run `nnunet-margin benchmark` "
                             f"with the benchmark's settings, which writes it") from None


def make_link(link: Path, target: Path) -> None:
    """A relative symbolic link (it still points into the tree when the results tree is copied), replacing whatever
    is at `link`; the target need not exist yet (a fold not yet trained)."""
    relative = os.path.relpath(target, link.parent)
    if link.is_symlink() and os.readlink(link) == relative:
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    temporary = link.parent / f".{link.name}.link-{os.getpid()}"
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(relative)
    os.replace(temporary, link)


def build_plan(benchmark: Benchmark) -> Plan:
    """The steps of `benchmark` (see the module docstring)."""
    return _Builder(benchmark).plan()


class _Builder:
    def __init__(self, benchmark: Benchmark):
        # the file names the commands write (their modules import torch, which a step's process does not need)
        from ..calibration_report import REPORT_FILE
        from ..posthoc.maps import CALIBRATION_MAP_FILE
        from ..provenance import PROVENANCE_FILE
        from ..validation import LOGIT_SAMPLE_FILE

        self.benchmark = benchmark
        self.settings = benchmark.settings
        self.folder = benchmark.folder
        self.report_file, self.map_file = REPORT_FILE, CALIBRATION_MAP_FILE
        self.sample_files = (LOGIT_SAMPLE_FILE, PROVENANCE_FILE)  # the plugin's validation writes them in this order

    def plan(self) -> Plan:
        settings = self.settings
        repeats = range(1, settings.repeats + 1)
        pairs = [(repeat, trainer) for repeat in repeats for trainer in settings.trainers]
        folds = [(repeat, trainer, fold) for repeat, trainer in pairs for fold in settings.folds]
        steps = [self.train(*key) for key in folds]
        steps += [self.cross_validation(*key) for key in folds]
        data, links = {}, []
        if self.benchmark.test_set is not None:
            data = {f"test_{kind}": self.data_set(self.benchmark.test_set, kind) for kind in ("images", "labels")}
            if self.benchmark.calibration_set is not None:
                data.update({f"calibration_{kind}": self.data_set(self.benchmark.calibration_set, kind)
                             for kind in ("images", "labels")})
            calibrated = [(repeat, trainer, method) for method in settings.post_hoc for repeat, trainer in pairs]
            for key in calibrated:
                steps += self.fits(*key)
                links += self.view_links(*key)
            steps += [self.export(*key) for key in calibrated]
            methods = [(repeat, trainer, None) for repeat, trainer in pairs] + calibrated
            steps += [self.predict(*method) for method in methods]
            steps += [self.test_evaluation(*method) for method in methods]
        steps.append(self.report(steps))
        return Plan(self.folder, self.benchmark.results, steps, data, links)

    @staticmethod
    def data_set(cases, kind: str) -> dict:
        """A set of cases' images or labels as a data set of the plan (see `settings.TestSet`)."""
        return {"folder": str(getattr(cases, kind)), "files": sorted(getattr(cases, f"{kind[:-1]}_files"))}

    # --- folders ------------------------------------------------------------------------------------------------

    def model_folder(self, trainer: str, repeat: int) -> Path:
        return (self.benchmark.results_root(repeat) / self.benchmark.dataset_name
                / model_folder_name(trainer, self.settings.plans, self.settings.configuration))

    def fold_folder(self, trainer: str, fold: str, repeat: int) -> Path:
        return self.model_folder(trainer, repeat) / fold_folder_name(fold)

    def fold_lock(self, trainer: str, fold: str, repeat: int) -> str:
        """The lock file of a model fold, shared by every benchmark of the dataset that trains it."""
        fold_folder = self.fold_folder(trainer, fold, repeat)
        where = hashlib.sha256(str(fold_folder.relative_to(self.benchmark.results)).encode()).hexdigest()[:12]
        return str(self.benchmark.root / LOCKS_FOLDER / f"{fold_folder.parent.name}.{fold_folder.name}.{where}.lock")

    def repeat_folder(self, repeat: int) -> Path:
        return self.folder / f"repeat_{repeat}"

    @staticmethod
    def method_name(trainer: str, post_hoc: str | None) -> str:
        return trainer if post_hoc is None else f"{trainer}+{post_hoc}"

    def view_root(self, repeat: int, trainer: str, post_hoc: str) -> Path:
        """The nnUNet_results root of the view of `trainer`'s model that calibrator `post_hoc` is fitted in."""
        return self.repeat_folder(repeat) / "post_hoc" / self.method_name(trainer, post_hoc)

    def view_model(self, repeat: int, trainer: str, post_hoc: str) -> Path:
        return self.view_root(repeat, trainer, post_hoc) / self.model_folder(trainer, repeat).relative_to(
            self.benchmark.results_root(repeat))

    def export_folder(self, repeat: int, trainer: str, post_hoc: str) -> Path:
        """The nnUNet_results root of a trainer's export with a calibrator's maps folded in."""
        return self.repeat_folder(repeat) / "exports" / self.method_name(trainer, post_hoc)

    @staticmethod
    def export_name(trainer: str, post_hoc: str) -> str:
        return f"{trainer}_{post_hoc}"

    def test_folder(self, repeat: int, trainer: str, post_hoc: str | None) -> Path:
        return self.repeat_folder(repeat) / "test" / self.method_name(trainer, post_hoc)

    def map_files(self, repeat: int, trainer: str, post_hoc: str, folds: list[str]) -> list[str]:
        view = self.view_model(repeat, trainer, post_hoc)
        return [str(view / fold_folder_name(fold) / self.map_file) for fold in folds]

    def view_links(self, repeat: int, trainer: str, post_hoc: str) -> list[list[str]]:
        """The links of a view: the model's files, each fold's final checkpoint, and where the fit reads them, a
        plugin trainer's logit sample and its provenance record."""
        model, view = self.model_folder(trainer, repeat), self.view_model(repeat, trainer, post_hoc)
        names = list(MODEL_FILES)
        for fold in self.settings.folds:
            fold_name = fold_folder_name(fold)
            names.append(f"{fold_name}/{FINAL_CHECKPOINT}")
            if self.benchmark.plugin[trainer] and self.settings.post_hoc_fit != "images":
                names += [str(validation_folder(fold_name) / name) for name in self.sample_files]
        return [[str(view / name), str(model / name)] for name in names]

    # --- steps --------------------------------------------------------------------------------------------------

    def _step(self, step_id: str, kind: str, needs: list[str], output: dict, settings: dict, repeat: int,
              **fields) -> Step:
        return Step(step_id, kind, needs, output, settings,
                    results_root=str(fields.pop("results_root", self.benchmark.results_root(repeat))), **fields)

    def _fold_id(self, trainer: str, fold: str, repeat: int, kind: str) -> str:
        return f"repeat_{repeat}/{trainer}/fold_{fold}/{kind}"

    def train(self, repeat: int, trainer: str, fold: str) -> Step:
        settings = self.settings
        base = ["nnUNetv2_train", self.benchmark.dataset_name, settings.configuration, fold, "-tr", trainer, "-p",
                settings.plans]
        npz = [] if self.benchmark.plugin[trainer] else ["--npz"]  # nnU-Net's trainers write no calibration report
        device = ["-device", settings.device]
        return self._step(
            self._fold_id(trainer, fold, repeat, "train"), "train", [],
            {"type": "fold", "folder": str(self.fold_folder(trainer, fold, repeat)),
             "calibration_report": self.report_file if self.benchmark.plugin[trainer] else None, "npz": bool(npz)},
            {"dataset": self.benchmark.dataset_name, "configuration": settings.configuration, "plans": settings.plans,
             "trainer": trainer, "fold": fold}, repeat,
            command=base + ["--c", *device, *npz], validate_command=base + ["--val", *device, *npz],
            locks=[self.fold_lock(trainer, fold, repeat)], gpu=True)

    def cross_validation(self, repeat: int, trainer: str, fold: str) -> Step:
        fold_folder = self.fold_folder(trainer, fold, repeat)
        output = validation_folder(self.repeat_folder(repeat) / "cross_validation" / trainer / fold_folder_name(fold))
        common = dict(needs=[self._fold_id(trainer, fold, repeat, "train")],
                      output={"type": "folder", "folder": str(output)})
        step_id = self._fold_id(trainer, fold, repeat, "cross-validation")
        if self.benchmark.plugin[trainer]:
            source = validation_folder(fold_folder) / self.report_file
            return self._step(step_id, "collect", settings={"trainer": trainer, "fold": fold, "report": "trainer's"},
                              repeat=repeat, action="collect", **common, arguments={
                                  "source": str(source), "checkpoint": str(fold_folder / FINAL_CHECKPOINT),
                                  "description": f"copy {source}, the plugin trainer's report of its validation, "
                                                 f"checked against {FINAL_CHECKPOINT}, to {output}"})
        command = ["nnunet-margin", "calibration", str(validation_folder(fold_folder)), str(self.benchmark.gt_folder),
                   "-o", str(output)]
        return self._step(step_id, "evaluate", settings={"trainer": trainer, "fold": fold, "report": "calibration"},
                          repeat=repeat, command=command, **common)

    def fit_id(self, repeat: int, trainer: str, post_hoc: str, fold: str | None) -> str:
        method = self.method_name(trainer, post_hoc)
        return f"repeat_{repeat}/{method}/fit" if fold is None else f"repeat_{repeat}/{method}/fold_{fold}/fit"

    def fits(self, repeat: int, trainer: str, post_hoc: str) -> list[Step]:
        """The fits of a calibrator for a trainer: one per fold (`--post-hoc-fit fold`), or one for the folds."""
        if self.settings.post_hoc_fit == "fold":
            return [self.fit(repeat, trainer, post_hoc, [fold]) for fold in self.settings.folds]
        return [self.fit(repeat, trainer, post_hoc, self.settings.folds)]

    def fit(self, repeat: int, trainer: str, post_hoc: str, folds: list[str]) -> Step:
        settings, fit_on = self.settings, self.settings.post_hoc_fit
        command = ["nnunet-margin", "fit-calibration", str(self.view_model(repeat, trainer, post_hoc)), "--method",
                   post_hoc, "--fit-on", fit_on, "-f", *folds, "-device", settings.device]
        revalidate = fit_on != "images" and not self.benchmark.plugin[trainer]
        if revalidate:  # the view has no logit sample of nnU-Net's trainers: their validation is run into it
            command.append("--revalidate")
        data = []
        if fit_on == "images":
            calibration_set = self.benchmark.calibration_set
            command += ["--images", str(calibration_set.images), "--labels", str(calibration_set.labels)]
            data = ["calibration_images", "calibration_labels"]
        step_id = self.fit_id(repeat, trainer, post_hoc, folds[0] if fit_on == "fold" else None)
        return self._step(
            step_id, "fit", [self._fold_id(trainer, fold, repeat, "train") for fold in folds],
            {"type": "files", "files": self.map_files(repeat, trainer, post_hoc, folds)},
            {"trainer": trainer, "folds": folds, "method": post_hoc, "fit_on": fit_on}, repeat, command=command,
            results_root=self.view_root(repeat, trainer, post_hoc), data=data, gpu=revalidate or fit_on == "images")

    def export(self, repeat: int, trainer: str, post_hoc: str) -> Step:
        folds, fit_on = self.settings.folds, self.settings.post_hoc_fit
        output = self.export_folder(repeat, trainer, post_hoc)
        fits = [self.fit_id(repeat, trainer, post_hoc, fold) for fold in (folds if fit_on == "fold" else [None])]
        needs = [self._fold_id(trainer, fold, repeat, "train") for fold in folds] + fits
        return self._step(
            f"repeat_{repeat}/{self.method_name(trainer, post_hoc)}/export", "export", needs,
            {"type": "folder", "folder": str(output)},
            {"trainer": trainer, "folds": folds, "folded_in": post_hoc, "fit_on": fit_on, "allow_bound": True},
            repeat, command=["nnunet-margin", "export-portable", str(self.view_model(repeat, trainer, post_hoc)),
                             str(output), "--calibration", "--allow-bound", "--name",
                             self.export_name(trainer, post_hoc), "-f", *folds])

    def predict(self, repeat: int, trainer: str, post_hoc: str | None) -> Step:
        settings = self.settings
        method = self.method_name(trainer, post_hoc)
        output = self.test_folder(repeat, trainer, post_hoc) / "predictions"
        if post_hoc is None:
            needs = [self._fold_id(trainer, fold, repeat, "train") for fold in settings.folds]
            results_root, model_trainer = self.benchmark.results_root(repeat), trainer
        else:
            needs = [f"repeat_{repeat}/{method}/export"]
            results_root, model_trainer = self.export_folder(repeat, trainer, post_hoc), \
                self.export_name(trainer, post_hoc)
        command = ["nnunet-margin", "predict", "-i", str(self.benchmark.test_set.images), "-o", str(output), "-d",
                   self.benchmark.dataset_name, "-c", settings.configuration, "-tr", model_trainer, "-p",
                   settings.plans, "-f", *settings.folds, "--save_probabilities", "-device", settings.device]
        return self._step(f"repeat_{repeat}/{method}/predict", "predict", needs,
                          {"type": "folder", "folder": str(output)},
                          {"method": method, "folds": settings.folds, "configuration": settings.configuration,
                           "probabilities": True, "predictor": "nnunet-margin predict"}, repeat,
                          command=command, results_root=results_root, data=["test_images"], gpu=True)

    def test_evaluation(self, repeat: int, trainer: str, post_hoc: str | None) -> Step:
        method = self.method_name(trainer, post_hoc)
        folder = self.test_folder(repeat, trainer, post_hoc)
        command = ["nnunet-margin", "calibration", str(folder / "predictions"),
                   str(self.benchmark.test_set.labels), "-o", str(folder / "evaluation")]
        output = {"type": "folder", "folder": str(folder / "evaluation")}
        needs = [f"repeat_{repeat}/{method}/predict"]
        return self._step(f"repeat_{repeat}/{method}/test-evaluation", "evaluate", needs, output, {"method": method},
                          repeat, command=command, data=["test_labels"])

    def report(self, steps: list[Step]) -> Step:
        settings = self.settings
        repeats = range(1, settings.repeats + 1)
        cross_validation = {str(repeat): {trainer: str(self.repeat_folder(repeat) / "cross_validation" / trainer)
                                          for trainer in settings.trainers} for repeat in repeats}
        test, maps = {}, {}
        if self.benchmark.test_set is not None:
            methods = [(trainer, None) for trainer in settings.trainers]
            methods += [(trainer, post_hoc) for trainer in settings.trainers for post_hoc in settings.post_hoc]
            test = {str(repeat): {self.method_name(*method): str(self.test_folder(repeat, *method) / "evaluation")
                                  for method in methods} for repeat in repeats}
            maps = {str(repeat): {trainer: {post_hoc: self.map_files(repeat, trainer, post_hoc, settings.folds)
                                            for post_hoc in settings.post_hoc} for trainer in settings.trainers}
                    for repeat in repeats} if settings.post_hoc else {}
        needs = [step.id for step in steps if step.kind in ("collect", "evaluate", "fit")]
        return self._step("report", "report", needs, {"type": "folder", "folder": str(self.folder / REPORT_FOLDER)},
                          {"trainers": settings.trainers, "folds": settings.folds, "repeats": settings.repeats,
                           "post_hoc": settings.post_hoc, "post_hoc_fit": settings.post_hoc_fit,
                           "baseline": settings.baseline, "dataset": self.benchmark.dataset_name,
                           "configuration": settings.configuration, "plans": settings.plans}, 1, action="report",
                          arguments={"cross_validation": cross_validation, "test": test, "maps": maps,
                                     "description": f"write the report into {self.folder / REPORT_FOLDER}"})
