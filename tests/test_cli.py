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


def test_a_user_error_is_one_line_with_the_debug_hint(tmp_path, capsys):
    from nnunet_margin import cli

    code = cli.main(["compare", str(tmp_path / "missing")])
    error = capsys.readouterr().err
    assert code == cli.EXIT_USER_ERROR, error
    assert error.count("\n") == 1 and "Traceback" not in error
    assert "missing is not a folder" in error and "--debug" in error


def test_a_programming_error_shows_its_traceback(monkeypatch, capsys):
    from nnunet_margin import cli

    def broken_command(args):
        return None + 1  # a TypeError: a bug, not a user's mistake

    monkeypatch.setattr(cli, "_trainers_path_command", broken_command)
    code = cli.main(["trainers-path"])
    error = capsys.readouterr().err
    assert code == cli.EXIT_INTERNAL_ERROR
    assert "Traceback" in error and "TypeError" in error and "this is a bug in nnunet-margin" in error
    with pytest.raises(TypeError):
        cli.main(["--debug", "trainers-path"])
