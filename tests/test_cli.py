"""The `nnunet-margin doctor` and `trainers-path` commands against a real nnU-Net environment."""

from pathlib import Path

import pytest

from conftest import trainers_path

pytestmark = pytest.mark.e2e


def test_doctor_passes_in_a_working_environment(nnunet_env):
    from nnunet_margin.nnunet._seams import SEAMS

    result = nnunet_env.run("nnunet-margin", "doctor")
    assert "all checks passed" in result.stdout
    for name in SEAMS:  # nnU-Net's data formats and trainer hooks as well as its code hooks
        assert f"[ok] nnU-Net seam {name}\n" in result.stdout, name
    assert "[ok] nnU-Net finds nnUNetTrainerMarginCalib (nnunet_margin.trainers)" in result.stdout


def test_doctor_names_each_problem_and_its_fix(nnunet_env, tmp_path):
    result = nnunet_env.run("nnunet-margin", "doctor", check=False, nnUNet_extTrainer="",
                            nnUNet_raw=str(tmp_path / "missing"))
    assert result.returncode == 1
    assert f"fix: export nnUNet_extTrainer={trainers_path()}" in result.stdout
    assert "[FAIL] nnUNet_raw=" in result.stdout and "fix: export nnUNet_raw=" in result.stdout
    assert "[FAIL] nnU-Net's trainer lookup fails" in result.stdout
    assert "3 problem(s) found" in result.stdout


def test_trainers_path_is_the_shim_folder():
    shims = sorted(p.name for p in Path(trainers_path()).glob("*.py"))
    assert shims == ["__init__.py", "nnunet_margin_trainers.py"]
