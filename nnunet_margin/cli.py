"""The `nnunet-margin` command."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

from . import __version__


def trainers_path() -> Path:
    """The folder to put in nnUNet_extTrainer (the repo's trainers/, installed as nnunet_margin/ext_trainers)."""
    spec = importlib.util.find_spec("nnunet_margin.ext_trainers")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("nnunet_margin.ext_trainers is missing from this installation; reinstall nnunet-margin")
    return Path(list(spec.submodule_search_locations)[0]).resolve()


def _trainers_path_command(args: argparse.Namespace) -> int:
    print(trainers_path())
    return 0


def _doctor_command(args: argparse.Namespace) -> int:
    """Check the environment and say how to fix what is wrong; exit code 1 if anything is."""
    problems = 0

    def report(ok: bool, message: str, fix: str = "") -> None:
        nonlocal problems
        problems += not ok
        print(f"[{'ok' if ok else 'FAIL'}] {message}" + ("" if ok or not fix else f"\n       fix: {fix}"))

    from importlib.metadata import PackageNotFoundError, version

    try:
        nnunet_version = version("nnunetv2")
    except PackageNotFoundError:
        report(False, "nnunetv2 is not installed", "pip install 'nnunetv2>=2.8,<2.9'")
        return 1
    major_minor = tuple(int(part) for part in nnunet_version.split(".")[:2])
    report(major_minor == (2, 8), f"nnunetv2 {nnunet_version} (nnunet-margin {__version__} needs 2.8.x)",
           "pip install 'nnunetv2>=2.8,<2.9'")
    for variable in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        value = os.environ.get(variable)
        created_later = variable == "nnUNet_results" and bool(value) and not Path(value).exists()
        report(bool(value) and (Path(value).is_dir() or created_later),
               f"{variable}={value or '(not set)'}" + (" (nnU-Net creates it when training)" if created_later else ""),
               f"export {variable}=/path/to/an/existing/folder (see nnU-Net's setting_up_paths.md)")
    expected = trainers_path()
    folders = [Path(p).resolve() for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p.strip()]
    report(expected in folders, f"nnUNet_extTrainer={os.environ.get('nnUNet_extTrainer', '(not set)')}",
           f"export nnUNet_extTrainer={expected}  (append other folders with '{os.pathsep}')")
    try:
        from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

        found = recursive_find_trainer_class_by_name("nnUNetTrainerMarginCalib")
        report(True, f"nnU-Net finds nnUNetTrainerMarginCalib ({found.__module__})")
    except Exception as error:  # any failure of the lookup is what this check reports
        report(False, f"nnU-Net's trainer lookup fails: {error!r}",
               "set nnUNet_extTrainer as above; a broken module in any nnUNet_extTrainer folder breaks every lookup")
    import torch

    print(f"[info] torch {torch.__version__}, CUDA {'available' if torch.cuda.is_available() else 'not available'}")
    print("all checks passed" if not problems else f"{problems} problem(s) found")
    return 1 if problems else 0


def _label_stats_command(args: argparse.Namespace) -> int:
    from .nnunet.margin_record import label_stats_table

    print(label_stats_table(args.dataset, args.configuration, args.fold, args.plans, args.tau, args.upsilon,
                            args.num_processes, args.empty_classes))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .nnunet.calibration_report import add_calibration_parser, add_compare_parser
    from .nnunet.portable import add_export_portable_parser
    from .nnunet.temperature import add_fit_temperature_parser

    parser = argparse.ArgumentParser(prog="nnunet-margin", description="Margin calibration and MbLS for nnU-Net v2")
    parser.add_argument("--version", action="version", version=f"nnunet-margin {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    sub = commands.add_parser("trainers-path", help="print the folder to put in nnUNet_extTrainer")
    sub.set_defaults(func=_trainers_path_command)

    sub = commands.add_parser("doctor", help="check nnU-Net's environment and the trainer lookup")
    sub.set_defaults(func=_doctor_command)

    sub = commands.add_parser("label-stats", help="class voxel counts, fractions and margin offsets of a dataset")
    sub.add_argument("dataset", help="dataset name or id, e.g. 4 or Dataset004_Hippocampus")
    sub.add_argument("-c", "--configuration", default="3d_fullres")
    sub.add_argument("-f", "--fold", default=None, help="count only this fold's training cases (default: all cases)")
    sub.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    sub.add_argument("--tau", type=float, default=10.0)
    sub.add_argument("--upsilon", type=float, default=1.0)
    sub.add_argument("--empty-classes", choices=["error", "count_as_one"], default="error")
    sub.add_argument("-np", "--num-processes", type=int, default=4)
    sub.set_defaults(func=_label_stats_command)

    add_calibration_parser(commands)
    add_compare_parser(commands)
    add_fit_temperature_parser(commands)
    add_export_portable_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as error:
        print(f"nnunet-margin {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
