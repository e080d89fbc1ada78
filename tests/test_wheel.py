"""A wheel built from the repo, installed in a fresh venv, finds the trainers through `nnunet-margin trainers-path`."""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.e2e


def test_wheel_ships_the_trainer_shims(tmp_path):
    source = tmp_path / "source"  # a copy, so the build leaves no build/ or egg-info in the repo
    source.mkdir()
    for item in ("pyproject.toml", "README.md", "nnunet_margin", "trainers"):
        if (REPO / item).is_dir():
            shutil.copytree(REPO / item, source / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / item, source / item)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("nnunet_margin-*.whl")
    packed = set(zipfile.ZipFile(wheel).namelist())
    packages = [str(init.relative_to(REPO)) for init in (REPO / "nnunet_margin").rglob("__init__.py")]
    assert [package for package in packages if package not in packed] == [], "add them to pyproject.toml's packages"

    # A fresh venv: its own site-packages first, the test venv's dependencies (torch, nnunetv2) behind it, but not
    # the editable install of this repo (its .pth files are not processed from a path entry).
    fresh = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(fresh)], check=True)
    fresh_python = fresh / "bin" / "python"
    fresh_site = subprocess.run([str(fresh_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                check=True, capture_output=True, text=True).stdout.strip()
    (Path(fresh_site) / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(fresh_python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True)

    env = {key: value for key, value in os.environ.items() if not key.startswith("nnUNet_")}
    printed = subprocess.run([str(fresh / "bin" / "nnunet-margin"), "trainers-path"], check=True, capture_output=True,
                             text=True, env=env, cwd=tmp_path).stdout.strip()
    folder = Path(printed)
    assert folder.is_relative_to(fresh), f"{folder} is not inside the fresh venv"
    assert (folder / "nnunet_margin_trainers.py").is_file()

    lookup = ("from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as find\n"
              "import nnunet_margin, sys\n"
              "for name in ('nnUNetTrainerMarginCalib', 'nnUNetTrainerMarginCalibDice', 'nnUNetTrainerMbLS',\n"
              "             'nnUNetTrainerMbLSDice', 'nnUNetTrainerMbLS_m5', 'nnUNetTrainerMarginCalib_tau5'):\n"
              "    assert find(name).__name__ == name\n"
              "print(nnunet_margin.__file__)\n")
    found = subprocess.run([str(fresh_python), "-c", lookup], capture_output=True, text=True, cwd=tmp_path,
                           env={**env, "nnUNet_extTrainer": printed})
    assert found.returncode == 0, found.stderr[-3000:]
    assert Path(found.stdout.strip().splitlines()[-1]).is_relative_to(fresh)
