"""`make test-matrix`: the built wheel against several Pythons and nnunetv2 releases (not part of CI).

Builds the wheel of this checkout once (from a copy, so the checkout stays clean), then for each cell of the matrix
installs it with its dependencies into a venv of its own under `.matrix/venvs/` (kept, so a rerun downloads nothing
again; the wheel itself is reinstalled every run) and runs the README's workflow there on a small synthetic dataset:
`nnunet-margin trainers-path` and nnU-Net's trainer lookup, every nnU-Net seam check (`_seams.check_all`, as
`nnunet-margin doctor` runs them), `nnUNetv2_plan_and_preprocess`, a one-epoch
`nnUNetv2_train` of a short-schedule plugin trainer on the CPU (with the final validation and its calibration report)
and `nnUNetv2_predict`. Prints one line per cell, writes the table to docs/version-matrix.md and exits 1 if a cell
failed. Full logs of every step: `.matrix/runs/<cell>/logs/`.
"""

from __future__ import annotations

import argparse
import glob
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEMO_TRAINERS = REPO / "demo" / "trainers"  # short-schedule subclasses (not in the wheel), as `make demo` uses them
NEWEST_28 = "nnunetv2>=2.8,<2.9"
DATASET_ID = "987"
PLUGIN_TRAINERS = ("nnUNetTrainerMarginCalib", "nnUNetTrainerMarginCalibDice", "nnUNetTrainerMbLS",
                   "nnUNetTrainerMbLSDice", "nnUNetTrainerWithCalibration")
# Left out of the copy the wheel is built from.
NOT_BUILT = (".git", ".venv", ".matrix", "demo_output", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache")
STEP_TIMEOUT_S = {"install": 3 * 3600}  # downloads of torch and the CUDA libraries: several GB
DEFAULT_TIMEOUT_S = 1800
TAIL_LINES = 25


@dataclass(frozen=True)
class Cell:
    python: str        # "3.11"
    requirement: str   # pip requirement for nnunetv2

    @property
    def name(self) -> str:
        pinned = self.requirement.removeprefix("nnunetv2==")
        return f"py{self.python}-nnunetv2-{'2.8.x' if self.requirement == NEWEST_28 else pinned}"


CELLS = (
    Cell("3.10", NEWEST_28),
    Cell("3.11", "nnunetv2==2.8.0"),
    Cell("3.11", "nnunetv2==2.8.1"),
    Cell("3.12", NEWEST_28),
    Cell("3.13", NEWEST_28),
)


@dataclass
class Result:
    cell: Cell
    status: str = "PASS"                               # PASS / FAIL / SKIP
    versions: dict = field(default_factory=dict)       # python, nnunetv2, torch as installed
    seconds: dict = field(default_factory=dict)        # step -> wall time
    failed_step: str = ""
    detail: str = ""                                   # skip reason, or the failing step's output tail


class StepFailed(Exception):
    def __init__(self, step: str, detail: str):
        super().__init__(step)
        self.step, self.detail = step, detail


def tail(text: str, lines: int = TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def find_python(minor: str) -> Path | None:
    """The newest pyenv CPython `minor`.x (pyenv root, $PYENV_ROOT or ~/.pyenv), else `python<minor>` on PATH."""
    roots = [os.environ.get("PYENV_ROOT"), str(Path.home() / ".pyenv")]
    if shutil.which("pyenv"):
        roots.insert(0, subprocess.run(["pyenv", "root"], capture_output=True, text=True).stdout.strip())
    for root in filter(None, roots):
        found = [Path(p) for p in glob.glob(os.path.join(root, "versions", f"{minor}.*"))
                 if re.fullmatch(rf"{re.escape(minor)}\.\d+", Path(p).name) and Path(p, "bin", "python").is_file()]
        if found:
            newest = max(found, key=lambda p: int(p.name.rsplit(".", 1)[1]))
            return newest / "bin" / "python"
    on_path = shutil.which(f"python{minor}")
    return Path(on_path) if on_path else None


def build_wheel(work: Path) -> Path:
    """`pip wheel --no-deps` of a copy of the checkout (no build/ or egg-info left in it), as tests/test_wheel.py."""
    source, dist = work / "source", work / "dist"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*NOT_BUILT))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                            str(dist), str(source)], capture_output=True, text=True)
    if built.returncode != 0:
        raise SystemExit(f"building the wheel failed:\n{tail(built.stdout + built.stderr)}")
    (wheel,) = dist.glob("nnunet_margin-*.whl")
    return wheel


class CellRun:
    """One cell: its venv (reused between runs), a fresh work folder, and the steps, each logged and timed."""

    def __init__(self, cell: Cell, python: Path, cache: Path, trainer: str):
        self.cell, self.python, self.trainer = cell, python, trainer
        self.venv = cache / "venvs" / cell.name
        self.work = cache / "runs" / cell.name
        self.logs = self.work / "logs"
        self.bin = self.venv / "bin"
        self.env = {key: value for key, value in os.environ.items()
                    if not key.startswith("nnUNet_") and key not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        self.env.update({
            "PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}",
            "VIRTUAL_ENV": str(self.venv),
            "PYTHONUNBUFFERED": "1",
            "nnUNet_raw": str(self.work / "nnUNet_raw"),
            "nnUNet_preprocessed": str(self.work / "nnUNet_preprocessed"),
            "nnUNet_results": str(self.work / "nnUNet_results"),
            "nnUNet_def_n_proc": "1",
            "NNUNET_MARGIN_DEMO_EPOCHS": "1",
            "NNUNET_MARGIN_DEMO_ITERATIONS": "2",
        })

    def command(self, step: str, *command: str, **extra_env: str) -> str:
        """Run `command` in the cell's work folder (so the checkout is not importable); return its output."""
        log = self.logs / f"{step}.log"
        timeout = STEP_TIMEOUT_S.get(step, DEFAULT_TIMEOUT_S)
        with log.open("a") as out:
            out.write(f"$ {' '.join(command)}\n")
            out.flush()
            try:
                done = subprocess.run(command, cwd=self.work, env={**self.env, **extra_env}, stdout=out,
                                      stderr=subprocess.STDOUT, text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                raise StepFailed(step, f"timed out after {timeout} s\n{tail(log.read_text())}") from None
        output = log.read_text()
        if done.returncode != 0:
            raise StepFailed(step, f"{Path(command[0]).name} exited with {done.returncode} (full log: {log})\n"
                                   f"{tail(output)}")
        return output

    def python_code(self, step: str, code: str, **extra_env: str) -> str:
        return self.command(step, str(self.bin / "python"), "-c", code, **extra_env)

    def check(self, step: str, condition: bool, problem: str) -> None:
        if not condition:
            raise StepFailed(step, f"{problem}\n{tail((self.logs / f'{step}.log').read_text())}")

    def install(self, wheel: Path) -> dict:
        """Create the venv if missing, resolve the wheel with its dependencies, then reinstall this run's wheel."""
        if not (self.bin / "python").is_file():
            shutil.rmtree(self.venv, ignore_errors=True)
            self.command("install", str(self.python), "-m", "venv", str(self.venv))
        pip = (str(self.bin / "python"), "-m", "pip", "install", "--progress-bar", "off")
        self.command("install", *pip, "--upgrade", "--upgrade-strategy", "only-if-needed", str(wheel),
                     self.cell.requirement)
        self.command("install", *pip, "--no-deps", "--force-reinstall", str(wheel))
        printed = self.python_code("install", "import platform, importlib.metadata as m\n"
                                   "print('VERSIONS', platform.python_version(), m.version('nnunetv2'), "
                                   "m.version('torch'))")
        python, nnunetv2, torch = printed.rsplit("VERSIONS ", 1)[1].split()[:3]
        return {"python": python, "nnunetv2": nnunetv2, "torch": torch}

    def trainer_lookup(self) -> None:
        """`nnunet-margin trainers-path` points into the venv; nnU-Net finds the plugin trainers through it."""
        output = self.command("trainers-path", str(self.bin / "nnunet-margin"), "trainers-path")
        folder = Path(output.strip().splitlines()[-1])
        self.check("trainers-path", folder.is_dir() and folder.resolve().is_relative_to(self.venv.resolve()),
                   f"trainers-path printed {folder}, not a folder inside {self.venv}")
        self.env["nnUNet_extTrainer"] = os.pathsep.join([str(folder), str(DEMO_TRAINERS)])
        names = (*PLUGIN_TRAINERS, self.trainer)
        self.python_code("trainer-lookup", (
            "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find\n"
            "import nnunet_margin, os\n"
            f"assert os.path.realpath(nnunet_margin.__file__).startswith({str(self.venv.resolve())!r}), "
            "nnunet_margin.__file__\n"
            f"for name in {names!r}:\n"
            "    trainer = find(name)\n"
            "    assert trainer.__name__ == name, (name, trainer)\n"
            "    print('found', name, 'in module', trainer.__module__)\n"))

    def seams(self) -> None:
        """Every nnU-Net seam's check (as `nnunet-margin doctor` and tests/test_seams.py run them) holds."""
        self.python_code("seams", (
            "from nnunet_margin.nnunet._seams import check_all\n"
            "problems = check_all()\n"
            "for name, problem in problems.items():\n"
            "    print('seam', name, 'ok' if problem is None else 'BROKEN: ' + problem)\n"
            "assert not any(problems.values()), 'broken nnU-Net seams'\n"))

    def dataset(self) -> Path:
        """6 training and 2 test cases of 24^3 (keywords the writer does not take are left to its defaults)."""
        raw = self.work / "nnUNet_raw"
        self.python_code("dataset", (
            "import inspect\n"
            "from nnunet_margin.nnunet.synthetic_dataset import write_synthetic_dataset as write\n"
            "wanted = {'num_training': 6, 'num_test': 2, 'shape': (24, 24, 24)}\n"
            "accepted = inspect.signature(write).parameters\n"
            f"print(write({str(raw)!r}, dataset_id={DATASET_ID}, "
            "**{k: v for k, v in wanted.items() if k in accepted}))\n"))
        (folder,) = raw.glob(f"Dataset{DATASET_ID}_*")
        return folder

    def run(self, wheel: Path) -> Result:
        result = Result(self.cell)
        shutil.rmtree(self.work, ignore_errors=True)
        self.logs.mkdir(parents=True)
        started = time.monotonic()

        def timed(step, action, *args):
            print(f"  {self.cell.name}: {step} ...", flush=True)
            begin = time.monotonic()
            try:
                return action(*args)
            finally:
                result.seconds[step] = time.monotonic() - begin

        try:
            result.versions = timed("install", self.install, wheel)
            timed("trainer-lookup", self.trainer_lookup)
            timed("seams", self.seams)
            raw = timed("dataset", self.dataset)
            timed("plan", self.command, "plan", str(self.bin / "nnUNetv2_plan_and_preprocess"),
                  "-d", DATASET_ID, "-c", "3d_fullres", "-np", "2", "-npfp", "2")
            timed("train", self.train)
            timed("predict", self.predict, raw)
        except StepFailed as failure:
            result.status, result.failed_step, result.detail = "FAIL", failure.step, failure.detail
        result.seconds["total"] = time.monotonic() - started
        return result

    def train(self) -> None:
        self.command("train", str(self.bin / "nnUNetv2_train"), DATASET_ID, "3d_fullres", "0", "-tr", self.trainer,
                     "-device", "cpu", nnUNet_n_proc_DA="0")  # for training only: planning needs a positive count
        folds = list((self.work / "nnUNet_results").glob(
            f"Dataset{DATASET_ID}_*/{self.trainer}__nnUNetPlans__3d_fullres/fold_0"))
        self.check("train", len(folds) == 1 and (folds[0] / "checkpoint_final.pth").is_file(),
                   "no fold_0/checkpoint_final.pth in nnUNet_results")
        self.check("train", (folds[0] / "validation" / "calibration.json").is_file(),
                   f"no calibration report: {folds[0] / 'validation' / 'calibration.json'} is missing")

    def predict(self, raw: Path) -> None:
        output = self.work / "predicted"
        self.command("predict", str(self.bin / "nnUNetv2_predict"), "-i", str(raw / "imagesTs"), "-o", str(output),
                     "-d", DATASET_ID, "-c", "3d_fullres", "-f", "0", "-tr", self.trainer, "-device", "cpu",
                     "-npp", "0", "-nps", "0")
        cases = sorted(path.name.removesuffix("_0000.nii.gz") for path in (raw / "imagesTs").glob("*_0000.nii.gz"))
        missing = [case for case in cases if not (output / f"{case}.nii.gz").is_file()]
        self.check("predict", cases and not missing, f"no prediction for {missing or 'any case'} in {output}")


def summary_line(result: Result) -> str:
    if result.status == "SKIP":
        return f"SKIP {result.cell.name}: {result.detail}"
    versions = result.versions
    line = (f"{result.status} {result.cell.name}: Python {versions.get('python', result.cell.python)}, "
            f"nnunetv2 {versions.get('nnunetv2', '?')}, torch {versions.get('torch', '?')}")
    line += f" ({result.seconds['total']:.0f} s)"
    if result.status == "FAIL":
        line += f" at step {result.failed_step}:\n" + "\n".join(f"    {text}" for text in result.detail.splitlines())
    return line


def git_revision() -> str:
    described = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty", "--abbrev=12"],
                               capture_output=True, text=True)
    return described.stdout.strip() or "unknown"


def markdown(results: list[Result], trainer: str, date: str) -> str:
    def seconds(result: Result, step: str) -> str:
        return f"{result.seconds[step]:.0f}" if step in result.seconds else ""

    rows = ["| Python | nnunetv2 asked | nnunetv2 | torch | result | install s | plan s | train s | predict s "
            "| total s |", "| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for result in results:
        versions = result.versions
        status = result.status + (f" ({result.failed_step})" if result.failed_step else "")
        if result.status == "SKIP":
            status += f": {result.detail}"
        rows.append(f"| {versions.get('python', result.cell.python)} | `{result.cell.requirement}` "
                    f"| {versions.get('nnunetv2', '')} | {versions.get('torch', '')} | {status} "
                    + " ".join(f"| {seconds(result, step)}" for step in ("install", "plan", "train", "predict",
                                                                          "total")) + " |")
    failures = [f"### {r.cell.name}: step `{r.failed_step}`\n\n```\n{r.detail}\n```\n" for r in results
                if r.status == "FAIL"]
    return "\n".join([
        "# Version matrix",
        "",
        "Written by `make test-matrix` (`tests/matrix/run_matrix.py`; not in CI, since the other Pythons download",
        "torch). Each cell installs the wheel of the checkout with its dependencies into a venv of its own and runs",
        "`nnunet-margin trainers-path` with nnU-Net's trainer lookup of the plugin trainers and every nnU-Net seam",
        "check (`nnunet_margin.nnunet._seams.check_all`, as `nnunet-margin doctor` runs them), then, on a synthetic",
        "dataset (6 training and 2 test cases of 24^3), `nnUNetv2_plan_and_preprocess`, a one-epoch `nnUNetv2_train`",
        f"of `{trainer}` on the CPU (2 iterations; its final validation must write `validation/calibration.json`)",
        "and `nnUNetv2_predict` of the test images. The venvs stay in `.matrix/venvs/`, so `install s` is large only on",
        "a cell's first run (downloads); wall-clock seconds on 2 shared cores, indicative only. Full logs of each step:",
        "`.matrix/runs/<cell>/logs/`.",
        "",
        f"Run started: {date}  ",
        f"Checkout: {git_revision()}  ",
        f"Platform: {platform.platform()}",
        "",
        *rows,
        "",
        *(["## Failures", "", *failures] if failures else []),
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", nargs="+", metavar="NAME",
                        help=f"only these cells (default: all of {', '.join(c.name for c in CELLS)})")
    parser.add_argument("--cache", type=Path, default=REPO / ".matrix",
                        help="folder for the venvs and the work folders (default: .matrix/ in the checkout)")
    parser.add_argument("--trainer", default="nnUNetTrainerMarginCalib_demo",
                        help="short-schedule trainer of demo/trainers to train (default: %(default)s)")
    parser.add_argument("--output", default=str(REPO / "docs" / "version-matrix.md"),
                        help="Markdown file for the results table; '' writes none (default: %(default)s)")
    args = parser.parse_args(argv)
    known = {cell.name: cell for cell in CELLS}
    unknown = sorted(set(args.cells or ()) - set(known))
    if unknown:
        parser.error(f"unknown cell(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    cells = [known[name] for name in args.cells] if args.cells else list(CELLS)
    date = subprocess.run(["date", "-u"], capture_output=True, text=True, check=True).stdout.strip()

    cache = args.cache.resolve()
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix="wheel-") as build:
        wheel = build_wheel(Path(build))
        print(f"built {wheel.name}", flush=True)
        results = []
        for cell in cells:
            python = find_python(cell.python)
            if python is None:
                result = Result(cell, status="SKIP", detail=f"no Python {cell.python}: install it with "
                                f"`pyenv install {cell.python}` or put python{cell.python} on PATH")
            else:
                result = CellRun(cell, python, cache, args.trainer).run(wheel)
            results.append(result)
            print(summary_line(result), flush=True)

    print("\n" + "\n".join(summary_line(result).splitlines()[0] for result in results))
    if args.output:
        Path(args.output).write_text(markdown(results, args.trainer, date))
        print(f"table written to {args.output}")
    return 1 if any(result.status == "FAIL" for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
