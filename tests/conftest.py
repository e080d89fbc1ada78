"""Shared fixtures: a planned synthetic nnU-Net dataset and a runner for the real nnU-Net commands."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from filelock import FileLock

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DATASET_ID = 987
DATASET_NAME = "Dataset987_MarginDemo"
# Short-schedule subclasses used by the end-to-end tests and the demo (not shipped in the wheel).
DEMO_TRAINERS = REPO / "demo" / "trainers"


@dataclass
class NnUNetEnv:
    """Folders and environment of one planned synthetic dataset."""

    root: Path
    env: dict = field(default_factory=dict)

    @property
    def raw(self) -> Path:
        return self.root / "raw" / DATASET_NAME

    @property
    def preprocessed(self) -> Path:
        return self.root / "preprocessed" / DATASET_NAME

    def results(self, trainer: str, configuration: str = "3d_fullres") -> Path:
        return self.root / "results" / DATASET_NAME / f"{trainer}__nnUNetPlans__{configuration}"

    def run(self, *command: str, check: bool = True, timeout: float = 600, **env) -> subprocess.CompletedProcess:
        """Run an installed console script (nnUNetv2_*, nnunet-margin) with this dataset's environment."""
        full_env = {**self.env, **{k: str(v) for k, v in env.items()}}
        executable = str(BIN / command[0])
        result = subprocess.run([executable, *command[1:]], env=full_env, capture_output=True, text=True,
                                timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n"
                                 f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
        return result

    def train(self, trainer: str, fold: str = "0", *extra: str) -> subprocess.CompletedProcess:
        return self.run("nnUNetv2_train", str(DATASET_ID), "3d_fullres", fold, "-tr", trainer, "-device", "cpu",
                        *extra, nnUNet_n_proc_DA="0")


def trainers_path() -> str:
    out = subprocess.run([str(BIN / "nnunet-margin"), "trainers-path"], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def _dataset_env(root: Path) -> NnUNetEnv:
    """The folders and environment of the synthetic dataset under root (as the README sets them up, plus the folder
    with the short-schedule test subclasses)."""
    env = {
        **os.environ,
        "nnUNet_raw": str(root / "raw"),
        "nnUNet_preprocessed": str(root / "preprocessed"),
        "nnUNet_results": str(root / "results"),
        "nnUNet_def_n_proc": "1",
        "nnUNet_extTrainer": os.pathsep.join([trainers_path(), str(DEMO_TRAINERS)]),
        "PYTHONUNBUFFERED": "1",
    }
    return NnUNetEnv(root=root, env=env)


def _plan_dataset(nnunet: NnUNetEnv) -> NnUNetEnv:
    """Write the synthetic dataset into nnunet.root/raw, plan and preprocess it (about 10 s)."""
    from nnunet_margin.nnunet.synthetic_dataset import write_synthetic_dataset

    write_synthetic_dataset(nnunet.root / "raw", dataset_id=DATASET_ID)
    nnunet.run("nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "2", "-npfp", "2")
    return nnunet


@pytest.fixture(scope="session")
def nnunet_env(shared_models, tmp_path_factory) -> NnUNetEnv:
    """A writable copy of the shared planned and preprocessed dataset (no trained models), one per test worker."""
    nnunet = _dataset_env(tmp_path_factory.mktemp("nnunet"))
    for folder in ("raw", "preprocessed"):
        shutil.copytree(shared_models.nnunet.root / folder, nnunet.root / folder)
    return nnunet


@dataclass
class SharedModels:
    """Short trainings shared by every test worker of the session (each trained once, under a lock across workers).

    The dataset and the model folders are read-only for the tests: copy a model (`shutil.copytree`, which keeps
    modification times) before changing anything in it.
    """

    nnunet: NnUNetEnv
    lock: FileLock

    def model(self, trainer: str, folds: tuple[str, ...] = ("0", "1")) -> Path:
        """The model folder of `trainer` (in nnUNet_results of `self.nnunet`) with every fold in `folds` trained."""
        with self.lock:
            for fold in folds:
                if not (self.nnunet.results(trainer) / f"fold_{fold}" / "checkpoint_final.pth").is_file():
                    self.nnunet.train(trainer, fold)
        return self.nnunet.results(trainer)


@pytest.fixture(scope="session")
def shared_models(tmp_path_factory) -> SharedModels:
    """One planned dataset and its short trainings for all test workers of the session (see `SharedModels`)."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if "PYTEST_XDIST_WORKER" in os.environ else base) / "shared_models"
    root.mkdir(exist_ok=True)
    nnunet = _dataset_env(root)
    lock = FileLock(str(root / ".lock"))
    with lock:
        if not (root / ".planned").is_file():
            _plan_dataset(nnunet)
            (root / ".planned").touch()
    return SharedModels(nnunet, lock)


def pytest_collection_modifyitems(items):
    """A test that needs a planned dataset runs nnU-Net's commands: it is marked e2e, so `pytest -m "not e2e"` runs
    the unit tests alone."""
    for item in items:
        if {"nnunet_env", "shared_models"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def shared_test_predictions(shared_models) -> Path:
    """`nnUNetv2_predict --save_probabilities` of the held-out images (imagesTs) by nnUNetTrainer_demo's fold 0, once
    for all test workers (under the shared lock); read-only: copy before changing anything."""
    model = shared_models.model("nnUNetTrainer_demo", ("0",))
    output = shared_models.nnunet.root / "predictions" / model.name
    with shared_models.lock:
        if not (output / ".complete").is_file():
            shared_models.nnunet.run("nnUNetv2_predict", "-i", str(shared_models.nnunet.raw / "imagesTs"), "-o",
                                     str(output), "-d", str(DATASET_ID), "-c", "3d_fullres", "-f", "0", "-tr",
                                     "nnUNetTrainer_demo", "-device", "cpu", "-npp", "0", "-nps", "0",
                                     "--save_probabilities")
            (output / ".complete").touch()
    return output
