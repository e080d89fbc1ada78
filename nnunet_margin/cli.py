"""The `nnunet-margin` command: every argument parser and the one error policy of the command line.

A failure the user can fix (a missing file, bad input, a refused operation: the OSError, ValueError and RuntimeError
that the modules raise with a message naming the problem and the fix) is printed as one or two lines with exit code
2 and the hint that `--debug` shows the traceback. Any other exception is a bug of nnunet-margin: it is printed with
its traceback and exit code 3. This file only formats them.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import traceback
from pathlib import Path

from . import __version__

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 3


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
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the seams are checked one by one below
        from .nnunet import _seams
    verified = nnunet_version in _seams.VERIFIED_VERSIONS
    report(verified, f"nnunetv2 {nnunet_version} (verified: {', '.join(_seams.VERIFIED_VERSIONS)})",
           f"pip install 'nnunetv2=={_seams.VERIFIED_VERSIONS[-1]}', or check the seams below")
    for name, problem in _seams.check_all().items():
        report(problem is None, f"nnU-Net seam {name}" + ("" if problem is None else f": {problem}"))
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
        found = _seams.find_trainer_class("nnUNetTrainerMarginCalib")
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


def _calibration_command(args: argparse.Namespace) -> int:
    from .nnunet.calibration_report import PLOT_FILE, REPORT_FILE, summary_lines
    from .nnunet.failure_report import FIGURE_FILE, SECTION
    from .nnunet.prediction_folder import calibrate_prediction_folder

    report = calibrate_prediction_folder(args.pred_folder, args.gt_folder, args.output_folder, args.num_processes,
                                         args.allow_missing, args.failure_dice)
    print("\n".join(summary_lines(report)))
    output = Path(args.output_folder or args.pred_folder)
    written = [str(output / name) for name in (REPORT_FILE, PLOT_FILE, FIGURE_FILE)
               if name != FIGURE_FILE or SECTION in report]
    print(f"wrote {', '.join(written[:-1])} and {written[-1]}")
    return 0


def _compare_command(args: argparse.Namespace) -> int:
    from ._atomic import atomic_path
    from .comparison import csv_table
    from .nnunet.compare_reports import (FAILURE_CSV, common_cases_note, compare, printed_failure_table,
                                         printed_table, write_comparison)

    comparison, methods = compare(args.methods, args.baseline, args.common_cases)
    print(printed_table(comparison), end="")
    failure_table = printed_failure_table(methods)
    if failure_table:
        print(f"\n{failure_table}", end="")
    note = common_cases_note(methods)
    if note:
        print(note)
    if args.output_folder:
        write_comparison(comparison, methods, args.output_folder)
        print(f"wrote report.md, table.csv, table.tex, compare.png{f' and {FAILURE_CSV}' if failure_table else ''} "
              f"into {args.output_folder}")
    if args.csv:
        with atomic_path(args.csv) as temporary:
            temporary.write_text(csv_table(comparison))
    return 0


def _fit_temperature_command(args: argparse.Namespace) -> int:
    import warnings

    from .nnunet.posthoc.legacy_temperature import (FIT_TEMPERATURE_DEPRECATION, TEMPERATURE_FILE,
                                                    TemperatureAtBoundWarning, bound_warning, fit_model_temperatures,
                                                    temperature_table)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TemperatureAtBoundWarning)  # printed below, after the table
        records = fit_model_temperatures(args.model_folder, args.folds, args.scope, args.num_processes)
    print(temperature_table(records), end="")
    print(f"wrote {TEMPERATURE_FILE} into " + ", ".join(str(Path(args.model_folder) / fold) for fold in records))
    for fold, record in records.items():
        message = bound_warning(fold, record)
        if message is not None:
            print(f"nnunet-margin fit-temperature: warning: {message}", file=sys.stderr)
    print(f"nnunet-margin fit-temperature: deprecated: {FIT_TEMPERATURE_DEPRECATION}", file=sys.stderr)
    return 0


def _export_portable_command(args: argparse.Namespace) -> int:
    import shlex

    from .nnunet.layout import TrainedModel
    from .nnunet.portable import export_portable
    from .nnunet.posthoc.legacy_temperature import EXPORT_TEMPERATURE_DEPRECATION

    exported = TrainedModel.load(export_portable(args.model_folder, args.out, args.temperature, args.folds,
                                                 args.name, args.overwrite, args.allow_bound, args.calibration))
    predict = shlex.join(["nnUNetv2_predict", "-d", exported.dataset_name, "-c", exported.configuration, "-p",
                          exported.plans, "-tr", exported.trainer, "-i", "INPUT", "-o", "OUTPUT"])
    print(f"wrote {exported.folder}\npredict with plain nnU-Net:\n  "
          f"nnUNet_results={shlex.quote(str(Path(args.out).resolve()))} {predict}")
    if args.temperature:
        print(f"nnunet-margin export-portable: deprecated: {EXPORT_TEMPERATURE_DEPRECATION}", file=sys.stderr)
    return 0


def _fit_calibration_command(args: argparse.Namespace) -> int:
    from .nnunet.posthoc.fit import calibration_table, fit_model_calibration
    from .nnunet.posthoc.images import ImagesRequest
    from .nnunet.posthoc.maps import CALIBRATION_MAP_FILE

    images = None
    if args.images or args.labels or args.disable_tta:
        images = ImagesRequest(Path(args.images) if args.images else None,
                               Path(args.labels) if args.labels else None, not args.disable_tta, args.npp)
    records = fit_model_calibration(args.model_folder, args.method, args.folds, args.scope, args.held_out,
                                    args.revalidate, args.device, args.fit_on, images)
    print(calibration_table(records), end="")
    print(f"held-out voxels: metrics on the part of the sample the fit did not see; wrote {CALIBRATION_MAP_FILE} "
          f"into " + ", ".join(str(Path(args.model_folder) / fold) for fold in records))
    return 0


def _optional_path(value: str | None) -> Path | None:
    return Path(value) if value else None


def _benchmark_command(args: argparse.Namespace) -> int:
    from .nnunet.benchmark import BenchmarkSettings, run_benchmark

    # The compute nodes of a cluster have the GPUs that the machine submitting the jobs may lack.
    device = args.device or ("cuda" if args.gpus or args.executor == "slurm" else _default_device())
    settings = BenchmarkSettings(
        dataset=args.dataset, configuration=args.configuration, trainers=args.trainers, folds=args.folds,
        plans=args.plans, baseline=args.baseline, post_hoc=args.post_hoc, post_hoc_fit=args.post_hoc_fit,
        test_images=_optional_path(args.test_images), test_labels=_optional_path(args.test_labels),
        calibration_images=_optional_path(args.calibration_images),
        calibration_labels=_optional_path(args.calibration_labels), repeats=args.repeats, device=device,
        gpus=args.gpus, name=args.name, random_split_folds=args.random_split_folds)
    run_benchmark(settings, dry_run=args.dry_run, status=args.status, slurm=_slurm_options(args, device))
    return 0


def _slurm_options(args: argparse.Namespace, device: str):
    """The Slurm options of `benchmark --executor slurm` (None for the local executor), checked."""
    import shlex

    from .nnunet.slurm import SlurmOptions

    given = [f"--{name.replace('_', '-')}" for name, value in vars(args).items()
             if name.startswith("slurm_") and value is not None]
    if args.executor != "slurm":
        if given:
            raise ValueError(f"{' '.join(given)} apply to Slurm jobs: add --executor slurm, or leave them out")
        return None
    if args.gpus:
        raise ValueError("--gpus picks GPUs of this machine for the local executor; with --executor slurm each job "
                         "gets its GPUs from Slurm (--slurm-gpus-per-job)")
    if device == "cpu" and args.slurm_gpus_per_job:
        raise ValueError(f"--slurm-gpus-per-job {args.slurm_gpus_per_job} with -device cpu: nnU-Net would not use the "
                         f"GPUs; drop one of the two")
    gpus_per_job = args.slurm_gpus_per_job if args.slurm_gpus_per_job is not None else int(device == "cuda")
    try:
        extra = shlex.split(args.slurm_extra or "")
    except ValueError as error:
        raise ValueError(f"--slurm-extra {args.slurm_extra!r}: {error}; quote it as for a shell") from None
    return SlurmOptions(partition=args.slurm_partition, gpus_per_job=gpus_per_job, time=args.slurm_time,
                        mem=args.slurm_mem, account=args.slurm_account, extra=extra,
                        setup=Path(args.slurm_setup) if args.slurm_setup else None)


def _predict_command(args: argparse.Namespace) -> int:
    from .nnunet.predict import SCORES_CSV, SCORES_JSON, PredictionRequest, maps_folder, model_folder, predict_folder

    if (args.m is None) == (args.d is None or args.c is None):
        raise ValueError("pass the model either as -d DATASET -c CONFIGURATION (with -tr and -p, as for "
                         "nnUNetv2_predict) or as -m MODEL_FOLDER")
    request = PredictionRequest(
        input_folder=Path(args.i), output_folder=Path(args.o),
        model_folder=Path(args.m) if args.m else model_folder(args.d, args.tr, args.p, args.c),
        folds=tuple(args.f), checkpoint=args.chk, device=args.device, disable_tta=args.disable_tta,
        save_probabilities=args.save_probabilities, continue_prediction=args.continue_prediction,
        preprocessing_processes=args.npp, export_processes=args.nps, tta_members=args.tta_members,
        average=args.average, maps=tuple(args.maps) if args.maps else None, png=args.png)
    predict_folder(request)
    output = Path(args.o)
    print(f"wrote the segmentations into {output}, the maps into {maps_folder(output)}, the scores into "
          f"{output / SCORES_CSV} and {output / SCORES_JSON}")
    return 0


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _environment_int(variable: str, default: int) -> int:
    """An integer default from the environment, as nnUNetv2_predict reads nnUNet_npp and nnUNet_nps."""
    try:
        return int(os.environ.get(variable) or default)
    except ValueError:
        return default


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nnunet-margin", description="Calibration toolkit for nnU-Net v2")
    parser.add_argument("--version", action="version", version=f"nnunet-margin {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True)

    sub = commands.add_parser("trainers-path", help="print the folder to put in nnUNet_extTrainer")
    sub.set_defaults(func=_trainers_path_command)

    sub = commands.add_parser("doctor", help="check nnU-Net's version and seams, its environment and the trainer "
                                             "lookup")
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

    sub = commands.add_parser("calibration", help="calibration report of an nnU-Net prediction folder (needs "
                                                  "--save_probabilities)")
    sub.add_argument("pred_folder", help="folder of nnUNetv2_predict or nnunet-margin predict with "
                                         "--save_probabilities, or a validation folder written with --npz")
    sub.add_argument("gt_folder", help="folder with the ground-truth segmentations (CASE<file_ending>)")
    sub.add_argument("-o", "--output-folder", dest="output_folder", default=None,
                     help="where calibration.json, reliability.png (and risk_coverage.png) go (default: PRED_FOLDER)")
    sub.add_argument("-np", "--num-processes", dest="num_processes", type=int, default=1,
                     help="cases evaluated in parallel (default: 1)")
    sub.add_argument("--allow-missing", dest="allow_missing", action="store_true",
                     help="report the predicted cases only when ground-truth cases have no prediction (refused "
                          "otherwise); calibration.json lists those left out")
    sub.add_argument("--failure-dice", dest="failure_dice", type=float, default=0.5, metavar="DICE",
                     help="for a folder of `nnunet-margin predict`: a case counts as failed when its mean foreground "
                          "Dice is below this, for the AUROC of each confidence score (default: 0.5)")
    sub.set_defaults(func=_calibration_command)

    sub = commands.add_parser("compare", help="the papers' comparison table of methods: mean ± std, sum of ranks, "
                                              "bootstrap CIs, Wilcoxon tests against a baseline, figure")
    sub.add_argument("methods", nargs="+", metavar="[NAME=]FOLDER",
                     help="a model folder (its folds' validation/calibration.json), a fold, validation or prediction "
                          "folder with calibration.json; NAME= names the method (default: the trainer)")
    sub.add_argument("--baseline", default=None, metavar="NAME",
                     help="method the others are tested against (paired Wilcoxon signed-rank test per metric)")
    sub.add_argument("-o", "--output-folder", dest="output_folder", default=None,
                     help="write report.md, table.csv, table.tex, compare.png (and failure_detection.csv) there")
    sub.add_argument("--csv", default=None, metavar="FILE",
                     help="also write the table as CSV (failure detection goes to -o's failure_detection.csv)")
    sub.add_argument("--common-cases", dest="common_cases", action="store_true",
                     help="compare methods evaluated on different cases on the cases all of them have (refused "
                          "otherwise); the report names those left out")
    sub.set_defaults(func=_compare_command)

    sub = commands.add_parser("fit-temperature", help="deprecated (use fit-calibration --method temperature): fit a "
                                                      "post-hoc temperature per fold on its validation probabilities "
                                                      "(writes fold_X/temperature.json)")
    sub.add_argument("model_folder", help="trained model folder nnUNet_results/DatasetXXX/TRAINER__PLANS__CONF")
    sub.add_argument("-f", "--folds", nargs="+", default=None,
                     help="folds to fit (default: every fold_X with checkpoint_final.pth)")
    sub.add_argument("--scope", choices=("foreground", "crop"), default="foreground",
                     help="voxels the temperature is fitted and measured on (default: foreground)")
    sub.add_argument("-np", "--num-processes", dest="num_processes", type=int, default=1,
                     help="cases read in parallel (default: 1)")
    sub.set_defaults(func=_fit_temperature_command)

    sub = commands.add_parser("export-portable", help="copy a trained model so that plain nnU-Net (without this "
                                                      "plugin) loads it, as trainer nnUNetTrainer")
    sub.add_argument("model_folder", help="trained model folder nnUNet_results/DatasetXXX/TRAINER__PLANS__CONF")
    sub.add_argument("out", help="an nnUNet_results-style root outside the model's results tree: the copy goes to "
                                 "OUT/DatasetXXX/NAME__PLANS__CONF")
    sub.add_argument("--temperature", action="store_true",
                     help="deprecated (use --calibration): fold each fold's fitted temperature "
                          "(fold_X/temperature.json from fit-temperature) into its final layer")
    sub.add_argument("-f", "--folds", nargs="+", default=None,
                     help="folds to export (default: every fold_X with checkpoint_final.pth)")
    sub.add_argument("--name", default="nnUNetTrainer", metavar="TRAINER_FOLDER_NAME",
                     help="trainer part of the copy's folder name (default nnUNetTrainer), e.g. nnUNetTrainer_mbls_T "
                          "to keep several copies of one dataset side by side; plain nnU-Net loads it with "
                          "-tr TRAINER_FOLDER_NAME (the checkpoints name nnUNetTrainer either way)")
    sub.add_argument("--overwrite", action="store_true",
                     help="replace an earlier export of the same model in that folder (never any other folder)")
    sub.add_argument("--allow-bound", dest="allow_bound", action="store_true",
                     help="fold in a temperature at a bound of its search too")
    sub.add_argument("--calibration", action="store_true",
                     help="fold each fold's map from fit-calibration (fold_X/calibration_map.json) into its final "
                          "layer; the folds' maps must be of one scope (per fold, or one pooled or images map for "
                          "exactly the exported folds) and fitted for their current checkpoints")
    sub.set_defaults(func=_export_portable_command)

    sub = commands.add_parser("fit-calibration", help="fit a post-hoc calibrator (temperature, vector or matrix "
                                                      "scaling) per fold or pooled over the folds on their validation "
                                                      "logit samples, or for the fold ensemble on a calibration set, "
                                                      "measured on a held-out part (writes "
                                                      "fold_X/calibration_map.json)")
    sub.add_argument("model_folder", help="trained model folder nnUNet_results/DatasetXXX/TRAINER__PLANS__CONF")
    sub.add_argument("--method", required=True, choices=["temperature", "vector", "matrix"],
                     help="softmax(z / T), softmax(w * z + b) per class, or softmax(W z + b) with ODIR")
    sub.add_argument("-f", "--folds", nargs="+", default=None,
                     help="folds to fit (default: every fold_X with checkpoint_final.pth)")
    sub.add_argument("--scope", choices=("foreground", "crop"), default="crop",
                     help="voxels fitted on (default: crop, every voxel in nnU-Net's crop box; foreground only for "
                          "temperature); held-out metrics are reported in both")
    sub.add_argument("--fit-on", dest="fit_on", choices=("fold", "pooled", "images"), default="fold",
                     help="fold: one map per fold from its own validation cases (default); pooled: one map from all "
                          "chosen folds' validation cases, folded identically into each of them (the map of their "
                          "ensemble, approximately); images: one map fitted on the chosen folds' ensemble's own "
                          "predictions of a held-out calibration set (--images, --labels), folded identically into "
                          "each of them (the exact calibration of that ensemble)")
    sub.add_argument("--images", default=None, metavar="DIR",
                     help="--fit-on images: the calibration images, CASE_0000<file_ending> (one file per channel), "
                          "none of them a training case of the chosen folds")
    sub.add_argument("--labels", default=None, metavar="DIR", help="--fit-on images: their labels, CASE<file_ending>")
    sub.add_argument("--disable_tta", action="store_true",
                     help="--fit-on images: predict without test-time mirroring (as nnUNetv2_predict --disable_tta); "
                          "fit with mirroring (the default) if you deploy with it")
    sub.add_argument("-npp", type=int, default=_environment_int("nnUNet_npp", 3),
                     help="--fit-on images: preprocessing processes (default $nnUNet_npp or 3, as nnUNetv2_predict; "
                          "0: in this process)")
    sub.add_argument("--held-out", dest="held_out", type=float, default=0.2,
                     help="fraction of the sample kept out of the fit to measure it (default 0.2)")
    sub.add_argument("--revalidate", action="store_true",
                     help="run the fold's validation again with the calibration hook first (also done where the "
                          "logit sample is missing)")
    sub.add_argument("-device", "--device", default=None, choices=["cuda", "cpu"],
                     help="device for a validation run or the calibration set's prediction (default: cuda if "
                          "available)")
    sub.set_defaults(func=_fit_calibration_command)

    sub = commands.add_parser("benchmark", help="train, validate, (post-hoc calibrate, test) and compare several "
                                                "methods on the same folds; resumable; --dry-run lists the steps in "
                                                "order, --status shows them")
    sub.add_argument("dataset", help="dataset name or id")
    sub.add_argument("-c", "--configuration", required=True, help="nnU-Net configuration, e.g. 3d_fullres")
    sub.add_argument("-tr", "--trainers", nargs="+", required=True, metavar="TRAINER",
                     help="trainers to compare (plugin trainers and nnU-Net's own, e.g. nnUNetTrainer)")
    sub.add_argument("-f", "--folds", nargs="+", default=["0", "1", "2", "3", "4"],
                     help="cross-validation folds (default 0-4; those of splits_final.json)")
    sub.add_argument("--random-split-folds", dest="random_split_folds", action="store_true",
                     help="allow folds beyond nnU-Net's split, which it trains on a random 80:20 split")
    sub.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    sub.add_argument("--baseline", default=None, metavar="TRAINER", help="trainer the others are tested against")
    sub.add_argument("--post-hoc", dest="post_hoc", nargs="+", default=[], choices=["temperature", "vector", "matrix"],
                     metavar="METHOD", help="post-hoc calibrators (fit-calibration --method: any of temperature, "
                                            "vector, matrix), each folded into every trainer's folds and evaluated "
                                            "on the test set")
    sub.add_argument("--post-hoc-fit", dest="post_hoc_fit", default="fold", choices=["fold", "pooled", "images"],
                     help="what each calibrator is fitted on (fit-calibration --fit-on): fold, one map per fold from "
                          "its validation cases (default); pooled, one map from the folds' validation cases; images, "
                          "one map fitted on the fold ensemble's predictions of --calibration-images")
    sub.add_argument("--test-images", default=None, metavar="DIR", help="held-out images (imagesTs layout)")
    sub.add_argument("--test-labels", default=None, metavar="DIR", help="their reference segmentations")
    sub.add_argument("--calibration-images", dest="calibration_images", default=None, metavar="DIR",
                     help="--post-hoc-fit images: held-out calibration images (imagesTs layout), apart from the test "
                          "set and the training cases")
    sub.add_argument("--calibration-labels", dest="calibration_labels", default=None, metavar="DIR",
                     help="their reference segmentations")
    sub.add_argument("--repeats", type=_positive_int, default=1,
                     help="train everything N times (repeats 2.. in results roots shared by the dataset's "
                          "benchmarks) for the run-to-run spread")
    sub.add_argument("--gpus", nargs="+", default=[], metavar="GPU",
                     help="run one step per listed GPU at a time (indices among the visible devices)")
    sub.add_argument("-device", "--device", default=None, choices=["cuda", "cpu"],
                     help="device for nnU-Net (default: cuda if available)")
    sub.add_argument("--name", default=None,
                     help="the benchmark's folder in $nnUNet_results/DATASET/calibration_benchmarks (default: derived "
                          "from the settings, so other settings never reuse a benchmark's folder)")
    sub.add_argument("--executor", choices=["local", "slurm"], default="local",
                     help="run the steps on this machine (local, the default), or submit each as a Slurm job after "
                          "the jobs it needs (slurm; run the command again once they ended to collect them and the "
                          "report)")
    cluster = sub.add_argument_group("Slurm jobs (--executor slurm)")
    cluster.add_argument("--slurm-partition", default=None, metavar="PARTITION", help="sbatch --partition")
    cluster.add_argument("--slurm-gpus-per-job", type=_non_negative_int, default=None, metavar="N",
                         help="GPUs of each job that runs nnU-Net's network: trainings, predictions, and fits that "
                              "revalidate or predict the calibration set (default 1, 0 with -device cpu); the other "
                              "steps ask for none")
    cluster.add_argument("--slurm-time", default=None, metavar="TIME",
                         help="time limit of every job (sbatch --time, e.g. 1-12:00:00); a training it stops "
                              "continues from its latest checkpoint when the next run submits it again")
    cluster.add_argument("--slurm-mem", default=None, metavar="MEM", help="memory per job (sbatch --mem, e.g. 64G)")
    cluster.add_argument("--slurm-account", default=None, metavar="ACCOUNT", help="sbatch --account")
    cluster.add_argument("--slurm-extra", default=None, metavar='"OPTIONS"',
                         help='further sbatch options for every job, e.g. "--qos=long --constraint=a100"')
    cluster.add_argument("--slurm-setup", default=None, metavar="FILE",
                         help="bash file sourced at the top of every job (module load, conda activate)")
    mode = sub.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true",
                      help="print the pending steps in order, each with the steps it waits for, and stop")
    mode.add_argument("--status", action="store_true",
                      help="print every step: done, running, failed (with its log) or pending, and stop")
    sub.set_defaults(func=_benchmark_command)

    sub = commands.add_parser("predict", help="nnU-Net's prediction of a folder (nnUNetv2_predict's arguments) plus "
                                              "the ensemble members' uncertainty maps and per-case confidence scores")
    sub.add_argument("-i", required=True, help="input folder: CASE_0000<file_ending>, one file per channel")
    sub.add_argument("-o", required=True, help="output folder (not inside the input folder)")
    sub.add_argument("-d", default=None, help="dataset name or id (with -c, -tr, -p; or pass -m)")
    sub.add_argument("-c", default=None, help="configuration, e.g. 3d_fullres")
    sub.add_argument("-tr", default="nnUNetTrainer", help="trainer (default nnUNetTrainer)")
    sub.add_argument("-p", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    sub.add_argument("-m", default=None, metavar="MODEL_FOLDER",
                     help="the trained model folder TRAINER__PLANS__CONFIGURATION instead of -d -c -tr -p")
    sub.add_argument("-f", nargs="+", default=["0", "1", "2", "3", "4"],
                     help="folds of the ensemble, each a member (default 0 1 2 3 4)")
    sub.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint name (default checkpoint_final.pth)")
    sub.add_argument("-device", default="cuda", choices=["cuda", "cpu", "mps"], help="as nnUNetv2_predict (default "
                                                                                      "cuda)")
    sub.add_argument("-npp", type=int, default=_environment_int("nnUNet_npp", 3),
                     help="preprocessing processes (default $nnUNet_npp or 3, as nnUNetv2_predict; 0: in this process)")
    sub.add_argument("-nps", type=int, default=_environment_int("nnUNet_nps", 3),
                     help="export processes (default $nnUNet_nps or 3; 0: in this process)")
    sub.add_argument("--disable_tta", action="store_true", help="no test-time mirroring (as nnUNetv2_predict)")
    sub.add_argument("--save_probabilities", action="store_true", help="also write CASE.npz and CASE.pkl, as "
                                                                         "nnUNetv2_predict")
    sub.add_argument("--continue_prediction", action="store_true",
                     help="keep the cases already finished with the same members and maps")
    sub.add_argument("--tta-members", dest="tta_members", action="store_true",
                     help="every test-time mirroring of every fold is a member (default: each fold is one)")
    sub.add_argument("--average", choices=["logits", "probabilities"], default="logits",
                     help="how the members are combined into the segmentation (default logits, as nnU-Net)")
    sub.add_argument("--maps", nargs="+", choices=["entropy", "mutual_information", "std"], default=None,
                     help="maps to write into OUT/uncertainty_maps (default: all; entropy only for one member)")
    sub.add_argument("--png", action="store_true", help="a review PNG per case: the slice with the most predicted "
                                                        "foreground, image, contours and entropy")
    sub.set_defaults(func=_predict_command)
    return parser


# Errors the modules raise with a message for the user (naming the file, the problem and the fix). Anything else is
# a programming error of nnunet-margin: it is shown with its traceback.
USER_ERRORS = (OSError, ValueError, RuntimeError)
INTERNAL_ERRORS = (NotImplementedError, RecursionError)  # RuntimeError subclasses that are programming errors
DEBUG_HINT = "(--debug before the command shows the traceback)"


def is_user_error(error: BaseException) -> bool:
    return isinstance(error, USER_ERRORS) and not isinstance(error, INTERNAL_ERRORS)


def format_error(command: str, error: BaseException) -> str:
    """One or two lines: what went wrong (the message names the file and the fix), for OS errors the path, and the
    hint that --debug shows the traceback."""
    message = str(error) if str(error) else type(error).__name__
    if isinstance(error, OSError) and error.filename is not None and str(error.filename) not in message:
        message = f"{message} ({error.filename})"
    return f"nnunet-margin {command}: error: {message} {DEBUG_HINT}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print(f"nnunet-margin {args.command}: interrupted; finished files are complete, nothing is half-written",
              file=sys.stderr)
        return 130
    except Exception as error:  # the policy: a failure the user can fix is one or two lines, a bug its traceback
        if args.debug:
            raise
        if not is_user_error(error):
            traceback.print_exc()
            print(f"nnunet-margin {args.command}: internal error ({type(error).__name__}): this is a bug in "
                  f"nnunet-margin; please report it with the traceback above", file=sys.stderr)
            return EXIT_INTERNAL_ERROR
        print(format_error(args.command, error), file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
