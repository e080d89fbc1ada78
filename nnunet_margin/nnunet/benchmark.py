"""`nnunet-margin benchmark`: train several calibration methods on the same folds, evaluate them the papers' way
and compare them, in one resumable command.

Every step is one command line (nnU-Net's own, or this package's), run as a subprocess whose output goes to
logs/; a step is done when the files it writes are there and newer than what it depends on, so the benchmark can be
interrupted at any point and rerun, and `--dry-run` prints exactly the pending commands, for a cluster scheduler.
Per trainer, fold and repeat:

1. `nnUNetv2_train D C F -tr T -p P --c` (resumes an unfinished training; nnU-Net's own trainers also get `--npz`);
   the plugin trainers' final validation writes validation/calibration.json;
2. for nnU-Net's own trainers, `nnunet-margin calibration` on the validation probabilities;
3. with `--post-hoc temperature`: `nnunet-margin fit-temperature` of the fold.

With a test set, per trainer and repeat: `nnUNetv2_predict` with the trainer's fold ensemble and
`nnunet-margin calibration` of the test predictions; with `--post-hoc temperature` also of a portable copy with the
temperatures folded in (`export-portable --temperature`). Then `compare` writes the tables and figures of the
cross-validation (and of the test set) into the benchmark folder $nnUNet_results/DatasetXXX/calibration_benchmark__C.
Repeats (`--repeats N`) train everything again into their own results root (BENCHMARK/repeat_R), which shows the
run-to-run spread.
"""

from __future__ import annotations

import json
import os
import platform
import queue
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Callable

from .._atomic import atomic_path, write_json_atomic
from . import _seams, layout
from .calibration_report import REPORT_FILE
from .compare_reports import compare, printed_table, write_comparison

POST_HOC_METHODS = ("temperature",)


@dataclass
class Step:
    """One command of the benchmark, with the check that tells whether its outputs are already complete."""

    name: str
    command: list[str]
    done: Callable[[], bool]
    results_root: Path  # nnUNet_results for the command
    log: Path

    def printable(self, default_results: Path) -> str:
        """The command as a shell line, with nnUNet_results= in front where it is not the user's."""
        line = " ".join(shlex.quote(part) for part in self.command)
        return line if self.results_root == default_results else \
            f"nnUNet_results={shlex.quote(str(self.results_root))} {line}"


@dataclass
class Chain:
    """Steps that must run in order (one trainer's fold, or one trainer's test set)."""

    steps: list[Step] = field(default_factory=list)


def _newer(path: Path, *than: Path) -> bool:
    """`path` exists and is at least as new as every existing file in `than`."""
    if not path.is_file():
        return False
    return all(path.stat().st_mtime_ns >= other.stat().st_mtime_ns for other in than if other.is_file())


@dataclass
class BenchmarkSettings:
    dataset: str
    configuration: str
    trainers: list[str]
    folds: list[str]
    plans: str = "nnUNetPlans"
    baseline: str | None = None
    post_hoc: list[str] = field(default_factory=list)
    test_images: Path | None = None
    test_labels: Path | None = None
    repeats: int = 1
    device: str = "cuda"
    gpus: list[str] = field(default_factory=list)


class Benchmark:
    """The steps of a benchmark and the folders they use (see the module docstring)."""

    def __init__(self, settings: BenchmarkSettings):
        self.settings = settings
        results = os.environ.get("nnUNet_results")
        preprocessed = os.environ.get("nnUNet_preprocessed")
        if not results or not preprocessed:
            raise RuntimeError("nnUNet_results and nnUNet_preprocessed must be set, as for nnU-Net")
        self.dataset_name = _seams.dataset_name(settings.dataset)
        self.results = Path(results)
        self.gt_folder = layout.gt_segmentations_folder(Path(preprocessed) / self.dataset_name)
        self.folder = self.results / self.dataset_name / f"calibration_benchmark__{settings.configuration}"
        if settings.baseline is not None and settings.baseline not in settings.trainers:
            raise ValueError(f"--baseline {settings.baseline} is not one of the trainers {settings.trainers}")
        unknown = [method for method in settings.post_hoc if method not in POST_HOC_METHODS]
        if unknown:
            raise ValueError(f"--post-hoc {unknown}: supported are {list(POST_HOC_METHODS)}")
        if (settings.test_images is None) != (settings.test_labels is None):
            raise ValueError("pass --test-images and --test-labels together")
        if settings.post_hoc and settings.test_images is None:
            raise ValueError("post-hoc calibration is fitted on the validation cases, so it is evaluated on held-out "
                             "cases only: pass --test-images and --test-labels")
        self.plugin = {trainer: self._is_plugin_trainer(trainer) for trainer in settings.trainers}
        self.test_cases = self._test_cases() if settings.test_images is not None else []

    def _test_cases(self) -> list[str]:
        """Case identifiers of the test images (CASE_XXXX<file_ending>, nnU-Net's raw layout)."""
        dataset_json = Path(os.environ["nnUNet_preprocessed"]) / self.dataset_name / layout.DATASET_FILE
        ending = json.loads(dataset_json.read_text())["file_ending"]
        cases = sorted({path.name[: -len(ending)][:-5] for path in Path(self.settings.test_images).glob(f"*{ending}")})
        if not cases:
            raise FileNotFoundError(f"no images *_XXXX{ending} in {self.settings.test_images}: pass a folder in "
                                    f"nnU-Net's imagesTs layout")
        return cases

    def _predicted(self, folder: Path, checkpoints: list[Path]) -> bool:
        """Every test case has its probabilities (.npz), newer than the checkpoints."""
        return all(_newer(folder / f"{case}{layout.PROBABILITIES_SUFFIX}", *checkpoints) for case in self.test_cases)

    @staticmethod
    def _is_plugin_trainer(trainer: str) -> bool:
        from ..trainers import nnUNetTrainerWithCalibration

        try:
            return issubclass(_seams.find_trainer_class(trainer), nnUNetTrainerWithCalibration)
        except RuntimeError:
            raise ValueError(f"nnU-Net cannot find trainer {trainer}: check the name, and set nnUNet_extTrainer "
                             f"(`nnunet-margin trainers-path` for this plugin's trainers)") from None

    def results_root(self, repeat: int) -> Path:
        return self.results if repeat == 1 else self.folder / f"repeat_{repeat}"

    def model_folder(self, trainer: str, repeat: int) -> Path:
        return (self.results_root(repeat) / self.dataset_name
                / layout.model_folder_name(trainer, self.settings.plans, self.settings.configuration))

    def test_folder(self, method: str, repeat: int) -> Path:
        return self.folder / f"repeat_{repeat}" / "test" / method if self.settings.repeats > 1 else \
            self.folder / "test" / method

    def _step(self, name: str, command: list[str], done: Callable[[], bool], repeat: int) -> Step:
        log = self.folder / "logs" / f"repeat_{repeat}" / (name.replace(" ", "_") + ".log")
        return Step(name, command, done, self.results_root(repeat), log)

    def _fold_chain(self, trainer: str, fold: str, repeat: int) -> Chain:
        settings = self.settings
        fold_folder = self.model_folder(trainer, repeat) / layout.fold_folder_name(fold)
        final = fold_folder / layout.FINAL_CHECKPOINT
        report = layout.validation_folder(fold_folder) / REPORT_FILE
        train = ["nnUNetv2_train", self.dataset_name, settings.configuration, fold, "-tr", trainer, "-p",
                 settings.plans, "--c", "-device", settings.device]
        chain = Chain()
        where = f"{trainer} fold {fold}" + (f" repeat {repeat}" if settings.repeats > 1 else "")
        if self.plugin[trainer]:
            chain.steps.append(self._step(f"train {where}", train, lambda: _newer(report, final), repeat))
        else:
            summary = layout.validation_folder(fold_folder) / layout.SUMMARY_FILE
            chain.steps.append(self._step(f"train {where}", train + ["--npz"], lambda: _newer(summary, final), repeat))
            chain.steps.append(self._step(
                f"report {where}", ["nnunet-margin", "calibration", str(layout.validation_folder(fold_folder)),
                                    str(self.gt_folder)], lambda: _newer(report, final, summary), repeat))
        if "temperature" in settings.post_hoc:
            temperature = fold_folder / "temperature.json"
            chain.steps.append(self._step(
                f"fit-temperature {where}", ["nnunet-margin", "fit-temperature", str(fold_folder.parent), "-f", fold],
                lambda: _newer(temperature, final), repeat))
        return chain

    def _test_chain(self, trainer: str, repeat: int) -> Chain:
        settings = self.settings
        model = self.model_folder(trainer, repeat)
        finals = [model / layout.fold_folder_name(fold) / layout.FINAL_CHECKPOINT for fold in settings.folds]
        chain = Chain()
        methods = [(trainer, model, trainer, finals)]
        if "temperature" in settings.post_hoc:
            export_root = self.folder / "exports" / f"repeat_{repeat}"
            export_name = f"{trainer}_temperature"
            exported = export_root / self.dataset_name / layout.model_folder_name(export_name, settings.plans,
                                                                                  settings.configuration)
            temperatures = [model / layout.fold_folder_name(fold) / "temperature.json" for fold in settings.folds]
            chain.steps.append(self._step(
                f"export {trainer}+temperature repeat {repeat}",
                ["nnunet-margin", "export-portable", str(model), str(export_root), "--temperature", "--allow-bound",
                 "--name", export_name, "--overwrite", "-f", *settings.folds],
                lambda: _newer(exported / "export_info.json", *temperatures), repeat))
            methods.append((f"{trainer}+temperature", exported, export_name,
                            [exported / layout.fold_folder_name(fold) / layout.FINAL_CHECKPOINT
                             for fold in settings.folds]))
        for method, model_folder, trainer_name, checkpoints in methods:
            predictions = self.test_folder(method, repeat)
            report = predictions / REPORT_FILE
            predict = ["nnUNetv2_predict", "-i", str(settings.test_images), "-o", str(predictions), "-d",
                       self.dataset_name, "-c", settings.configuration, "-tr", trainer_name, "-p", settings.plans,
                       "-f", *settings.folds, "--save_probabilities", "--continue_prediction", "-device",
                       settings.device]
            step = self._step(f"predict {method} repeat {repeat}", predict,
                              lambda p=predictions, c=checkpoints: self._predicted(p, c), repeat)
            step.results_root = model_folder.parent.parent
            chain.steps.append(step)
            chain.steps.append(self._step(
                f"test report {method} repeat {repeat}",
                ["nnunet-margin", "calibration", str(predictions), str(settings.test_labels)],
                lambda r=report, c=checkpoints: _newer(r, *c), repeat))
        return chain

    def chains(self) -> tuple[list[Chain], list[Chain]]:
        """Training chains (independent of each other), then test chains (after every training)."""
        settings = self.settings
        training = [self._fold_chain(trainer, fold, repeat) for repeat in range(1, settings.repeats + 1)
                    for trainer in settings.trainers for fold in settings.folds]
        testing = [self._test_chain(trainer, repeat) for repeat in range(1, settings.repeats + 1)
                   for trainer in settings.trainers] if settings.test_images is not None else []
        return training, testing

    def pending(self) -> list[Step]:
        training, testing = self.chains()
        return [step for chain in training + testing for step in chain.steps if not step.done()]


class _Runner:
    """Runs chains of steps, one chain at a time per GPU (or one at a time), with a progress line per step."""

    def __init__(self, benchmark: Benchmark, total: int):
        self.benchmark = benchmark
        self.total = total
        self.finished = 0
        self.lock = threading.Lock()
        self.failure: str | None = None

    def _environment(self, step: Step, gpu: str | None) -> dict[str, str]:
        environment = {**os.environ, "nnUNet_results": str(step.results_root), "PYTHONUNBUFFERED": "1"}
        if gpu is not None:
            environment["CUDA_VISIBLE_DEVICES"] = gpu
        return environment

    def run_step(self, step: Step, gpu: str | None) -> bool:
        if step.done():
            return True
        step.log.parent.mkdir(parents=True, exist_ok=True)
        with self.lock:
            print(f"[{self.finished + 1}/{self.total}] {step.name}" + (f" (GPU {gpu})" if gpu else "")
                  + f": running, log {step.log}", flush=True)
            with open(self.benchmark.folder / "commands.log", "a") as handle:
                handle.write(step.printable(self.benchmark.results) + "\n")
        start = time.time()
        executable = _console_script(step.command[0])
        with open(step.log, "w") as log:
            result = subprocess.run([executable, *step.command[1:]], env=self._environment(step, gpu), stdout=log,
                                    stderr=subprocess.STDOUT)
        ok = result.returncode == 0 and step.done()
        with self.lock:
            self.finished += 1
            status = "done" if ok else f"FAILED (exit code {result.returncode}; see {step.log})"
            print(f"[{self.finished}/{self.total}] {step.name}: {status} in {time.time() - start:.0f} s", flush=True)
            if not ok and self.failure is None:
                self.failure = f"{step.name} failed: see {step.log} (command: {step.printable(self.benchmark.results)})"
        return ok

    def run_chains(self, chains: list[Chain], gpus: list[str]) -> None:
        work: queue.Queue[Chain] = queue.Queue()
        for chain in chains:
            work.put(chain)

        def worker(gpu: str | None) -> None:
            while self.failure is None:
                try:
                    chain = work.get_nowait()
                except queue.Empty:
                    return
                for step in chain.steps:
                    if not self.run_step(step, gpu):
                        break

        threads = [threading.Thread(target=worker, args=(gpu,)) for gpu in (gpus or [None])]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if self.failure is not None:
            raise RuntimeError(self.failure)


def _console_script(name: str) -> str:
    """The command of this Python environment (works without an activated venv)."""
    beside_python = Path(sys.executable).parent / name
    return str(beside_python) if beside_python.is_file() else name


def _versions() -> dict[str, str]:
    import torch

    from .. import __version__

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return {"nnunet-margin": __version__, "nnunetv2": version("nnunetv2"), "torch": torch.__version__,
            "python": platform.python_version(), "device": device}


def run_benchmark(settings: BenchmarkSettings, dry_run: bool = False) -> Path | None:
    """Run (or, with `dry_run`, print) the pending steps, then compare; returns the benchmark folder."""
    benchmark = Benchmark(settings)
    pending = benchmark.pending()
    if dry_run:
        for step in pending:
            print(step.printable(benchmark.results))
        return None
    benchmark.folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(benchmark.folder / "benchmark.json",
                      {"settings": {key: str(value) if isinstance(value, Path) else value
                                    for key, value in vars(settings).items()},
                       "versions": _versions(), "plugin_trainers": benchmark.plugin})
    print(f"benchmark of {', '.join(settings.trainers)} on {benchmark.dataset_name} {settings.configuration}, folds "
          f"{', '.join(settings.folds)}: {len(pending)} step(s) to run, results in {benchmark.folder}", flush=True)
    runner = _Runner(benchmark, len(pending))
    training, testing = benchmark.chains()
    runner.run_chains(training, settings.gpus)
    runner.run_chains(testing, settings.gpus)
    write_benchmark_report(benchmark)
    return benchmark.folder


def _commands_section(benchmark: Benchmark) -> str:
    training, testing = benchmark.chains()
    lines = [step.printable(benchmark.results) for chain in training + testing for step in chain.steps]
    return "Commands (each run in its own process; nnUNet_results as set, repeats in their own root):\n\n```\n" + \
        "\n".join(lines) + "\n```\n"


def write_benchmark_report(benchmark: Benchmark) -> None:
    """Compare the cross-validation (and test set) of every repeat; write report.md and the tables and figures."""
    settings = benchmark.settings
    versions = _versions()
    header = (f"# Calibration benchmark: {benchmark.dataset_name}, {settings.configuration}\n\n"
              f"Trainers: {', '.join(settings.trainers)}; folds {', '.join(settings.folds)}; repeats "
              f"{settings.repeats}; post-hoc: {', '.join(settings.post_hoc) or 'none'}; baseline: "
              f"{settings.baseline or 'none'}.\n\n"
              f"Versions: " + ", ".join(f"{name} {value}" for name, value in versions.items()) + "\n\n"
              "How to read: methods are ordered by the sum of their ranks over DSC, HD95, ASD, ECE and CECE (lower is "
              "better); ± is the standard deviation over cases, the brackets the 95 % bootstrap confidence interval "
              "of the mean; p-values are paired Wilcoxon signed-rank tests against the baseline. Calibration metrics "
              "are on foreground voxels (the papers' convention) unless prefixed `boundary_` (voxels near a class "
              "boundary) or `crop_` (nnU-Net's crop box).\n\n")
    sections = []
    printed = ""
    spread: dict[str, dict[str, list[float]]] = {}
    for repeat in range(1, settings.repeats + 1):
        suffix = f" (repeat {repeat})" if settings.repeats > 1 else ""
        target = benchmark.folder / (f"repeat_{repeat}" if settings.repeats > 1 else "")
        models = [f"{trainer}={benchmark.model_folder(trainer, repeat)}" for trainer in settings.trainers]
        comparison, methods = compare(models, settings.baseline)
        write_comparison(comparison, methods, target / "cross_validation", f"## Cross-validation{suffix}\n\n")
        printed = printed or f"Cross-validation{suffix}:\n{printed_table(comparison)}"
        relative = (target / "cross_validation").relative_to(benchmark.folder)
        sections.append(f"## Cross-validation{suffix}\n\n{printed_table(comparison)}\n"
                        f"![ECE against Dice, and reliability curves]({relative / 'compare.png'})\n\n"
                        f"Every metric, per class, confidence intervals and p-values: [{relative / 'report.md'}]"
                        f"({relative / 'report.md'}).\n")
        for m, method in enumerate(comparison.methods):
            for k, metric in enumerate(comparison.metrics):
                spread.setdefault(method, {}).setdefault(metric, []).append(float(comparison.mean[m, k]))
        if settings.test_images is not None:
            tests = [f"{name}={benchmark.test_folder(name, repeat)}" for trainer in settings.trainers
                     for name in [trainer] + [f"{trainer}+{post}" for post in settings.post_hoc]]
            comparison, methods = compare(tests, settings.baseline)
            write_comparison(comparison, methods, target / "test", f"## Test set{suffix}\n\n")
            relative = (target / "test").relative_to(benchmark.folder)
            sections.append(f"## Test set{suffix}\n\n{printed_table(comparison)}\n"
                            f"![ECE against Dice, and reliability curves]({relative / 'compare.png'})\n\n"
                            f"Every metric: [{relative / 'report.md'}]({relative / 'report.md'}).\n")
    if "temperature" in settings.post_hoc:
        rows = ["| trainer | repeat | fold | T | at the search bound |", "|---|---|---|---|---|"]
        for repeat in range(1, settings.repeats + 1):
            for trainer in settings.trainers:
                for fold in settings.folds:
                    record = json.loads((benchmark.model_folder(trainer, repeat) / layout.fold_folder_name(fold)
                                         / "temperature.json").read_text())
                    rows.append(f"| {trainer} | {repeat} | {fold} | {record['temperature']:.4g} | "
                                f"{record.get('at_bound') or 'no'} |")
        sections.append("## Fitted temperatures\n\nOne per fold, on its validation probabilities; a temperature at the "
                        "search bound (a model worse than uniform on these voxels, or degenerate probabilities) is "
                        "folded in all the same here, so check such models before trusting their +temperature row.\n\n"
                        + "\n".join(rows) + "\n")
    if settings.repeats > 1:
        metrics = ("dice", "ece", "classwise_ece", "hd95")
        rows = ["| method | " + " | ".join(f"{metric} mean ± sd over repeats" for metric in metrics) + " |",
                "|---|" + "---|" * len(metrics)]
        for method, values in spread.items():
            cells = []
            for metric in metrics:
                series = [value for value in values.get(metric, []) if value == value]
                mean = sum(series) / len(series) if series else float("nan")
                sd = (sum((v - mean) ** 2 for v in series) / (len(series) - 1)) ** 0.5 if len(series) > 1 else \
                    float("nan")
                cells.append(f"{mean:.4f} ± {sd:.4f}")
            rows.append(f"| {method} | " + " | ".join(cells) + " |")
        sections.append("## Run-to-run spread (cross-validation means per repeat)\n\n" + "\n".join(rows) + "\n")
    main_report = benchmark.folder / ("repeat_1" if settings.repeats > 1 else "") / "cross_validation"
    for name in ("table.csv", "table.tex", "compare.png"):
        if (main_report / name).is_file():
            with atomic_path(benchmark.folder / name) as temporary:
                temporary.write_bytes((main_report / name).read_bytes())
    content = header + "\n".join(sections) + "\n" + _commands_section(benchmark)
    with atomic_path(benchmark.folder / "report.md") as temporary:
        temporary.write_text(content)
    print(printed, end="")
    print(f"wrote {benchmark.folder / 'report.md'} (tables: table.csv, table.tex; figure: compare.png)")
