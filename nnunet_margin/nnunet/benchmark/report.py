"""The benchmark's report, from the calibration reports its steps wrote into the benchmark folder.

Per repeat, `nnunet-margin compare`'s tables of the cross-validation (each trainer's folds of this benchmark) and of
the test set (each method's fold ensemble: every trainer, and every trainer with each post-hoc calibrator folded in,
T+K), with the failure detection of each method's per-case confidence scores (those of `nnunet-margin predict`);
with post-hoc calibrators, what each gains on the test cases (the paired differences of T+K and T per case,
with paired-bootstrap confidence intervals) and the fitted maps; with several repeats, the run-to-run spread: the
comparison of the methods' per-repeat means, each repeat counted as one case (mean ± standard deviation over
repeats, confidence intervals and ranks as for cases); and every step's command. Every statistic comes from
`nnunet_margin.comparison`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np

from ..._atomic import atomic_path
from ...comparison import (Comparison, PairedDifference, compare_methods, csv_table, markdown_table, metric_label,
                           paired_difference, repeats_as_cases)
from ..compare_reports import (FAILURE_CSV, MethodReports, compare, printed_failure_table, printed_table,
                               write_comparison)
from .plan import SUMMARY_FILE, Plan, Step
from .settings import IDENTITY_FILE

SPREAD_METRICS = ("dice", "hd95", "ece", "classwise_ece", "nll")
GAIN_METRICS = ("ece", "classwise_ece", "nll", "brier", "dice")  # per case, in the foreground scope (Dice: mean)
GAINS_FILE = "post_hoc_gains.csv"  # in report/repeat_R/test
FITS = {"fold": "per fold, on its validation cases", "pooled": "once for the folds, on their pooled validation cases",
        "images": "once for the fold ensemble, on its predictions of the calibration set"}
HOW_TO_READ = (
    "How to read: methods are ordered by the sum of their ranks over DSC, HD95, ASD, ECE and CECE (lower is better); "
    "± is the standard deviation over cases, the brackets the 95 % bootstrap confidence interval of the mean; "
    "p-values are paired Wilcoxon signed-rank tests against the baseline. Calibration metrics are on foreground "
    "voxels (the papers' convention) unless prefixed `boundary_` (voxels near a class boundary) or `crop_` (nnU-Net's "
    "crop box).\n\n")


def write_report(plan: Plan, step: Step, target: Path) -> None:
    """Write report.md, summary.md, table.csv, table.tex, compare.png and the full comparisons into `target`."""
    settings, arguments = step.settings, step.arguments
    record = json.loads((plan.folder / IDENTITY_FILE).read_text())
    versions = record.get("versions", {})
    post_hoc = ", ".join(settings["post_hoc"])
    if post_hoc:
        post_hoc += f" (fitted {FITS[settings['post_hoc_fit']]})"
    header = (f"# Calibration benchmark: {settings['dataset']}, {settings['configuration']}\n\n"
              f"Trainers: {', '.join(settings['trainers'])}; folds {', '.join(settings['folds'])}; plans "
              f"{settings['plans']}; repeats {settings['repeats']}; post-hoc: {post_hoc or 'none'}; baseline: "
              f"{settings['baseline'] or 'none'}; benchmark {plan.folder.name}.\n\n"
              f"Versions: " + ", ".join(f"{name} {value}" for name, value in versions.items()) + "\n\n" + HOW_TO_READ)
    sections, summary = [], []
    per_repeat: dict[str, dict[str, Comparison]] = {"cross-validation": {}, "test set": {}}
    for repeat in map(str, range(1, settings["repeats"] + 1)):
        parts = [("cross-validation", "cross_validation", arguments["cross_validation"][repeat])]
        if arguments["test"]:
            parts.append(("test set", "test", arguments["test"][repeat]))
        for title, folder_name, folders in parts:
            heading = f"{title.capitalize()} (repeat {repeat})"
            comparison, methods = compare([f"{name}={folder}" for name, folder in folders.items()],
                                          settings["baseline"])
            write_comparison(comparison, methods, target / f"repeat_{repeat}" / folder_name, f"## {heading}\n\n")
            per_repeat[title][repeat] = comparison
            relative = Path(f"repeat_{repeat}") / folder_name
            table = printed_table(comparison)
            sections.append(f"## {heading}\n\n{table}\n![ECE against Dice, and reliability curves]"
                            f"({relative / 'compare.png'})\n\nEvery metric, per class, confidence intervals and "
                            f"p-values: [{relative / 'report.md'}]({relative / 'report.md'}).\n")
            if repeat == "1":
                summary.append(f"{heading}:\n{table}")
            failure = printed_failure_table(methods) if title == "test set" else ""
            if failure:  # the test predictions of `nnunet-margin predict` carry per-case confidence scores
                sections.append(f"### Failure detection on the test cases (repeat {repeat})\n\n{failure}\nWith "
                                f"confidence intervals: [{relative / 'report.md'}]({relative / 'report.md'}), "
                                f"`{relative / FAILURE_CSV}`.\n")
                if repeat == "1":
                    summary.append(f"Test set (repeat 1), {failure}")
            if title == "test set" and settings["post_hoc"]:
                gains = _gains_table(methods, settings["trainers"], settings["post_hoc"],
                                     target / relative / GAINS_FILE)
                sections.append(f"### What each post-hoc calibrator gains on the test cases (repeat {repeat})\n\n"
                                f"{GAINS_NOTE}{gains}")
                if repeat == "1":
                    summary.append(f"Post-hoc calibration, T+K minus T per test case (repeat 1):\n{gains}")
    if arguments["maps"]:
        sections.append(_maps_section(arguments["maps"], settings["post_hoc_fit"]))
    if settings["repeats"] > 1:
        for title, comparisons in per_repeat.items():
            if comparisons:
                sections.append(_spread_section(title, comparisons, target / "spread" / title.replace(" ", "_")))
    for name in ("table.csv", "table.tex", "compare.png"):
        source = target / "repeat_1" / "cross_validation" / name
        if source.is_file():
            shutil.copyfile(source, target / name)
    commands = "\n".join(step.display(plan.results) for step in plan.steps)
    (target / "report.md").write_text(header + "\n".join(sections) + "\nCommands (each run in its own process; "
                                      "nnUNet_results as set, repeats in their own root):\n\n```\n" + commands
                                      + "\n```\n")
    (target / SUMMARY_FILE).write_text("\n".join(summary))


GAINS_NOTE = (
    "Each calibrator's fold ensemble (T+K) minus the same trainer's uncalibrated fold ensemble (T), per test case, "
    "averaged over the cases; [a, b] is the 95 % paired-bootstrap confidence interval of that mean (the cases "
    "resampled with both values), n the cases with both values. Negative is better for ECE, CECE, NLL and Brier, "
    "positive for DSC (temperature scaling never changes the segmentation). All metrics per case: "
    f"`repeat_R/test/{GAINS_FILE}`.\n\n")


def _case_values(method: MethodReports, metric: str, cases: list[str]) -> np.ndarray:
    """The method's value of `metric` per case (NaN where undefined or missing)."""
    values = [method.scores.get(case, {}).get(metric) for case in cases]
    return np.array([math.nan if value is None else value for value in values], dtype=np.float64)


def post_hoc_gains(methods: list[MethodReports], trainers: list[str], post_hoc: list[str]
                   ) -> dict[tuple[str, str], dict[str, PairedDifference]]:
    """{(trainer, calibrator): {metric: the paired difference of trainer+calibrator minus trainer}}."""
    by_name = {method.name: method for method in methods}
    gains = {}
    for trainer in trainers:
        for calibrator in post_hoc:
            before, after = by_name[trainer], by_name[f"{trainer}+{calibrator}"]
            cases = sorted(set(before.scores) | set(after.scores))
            gains[trainer, calibrator] = {
                metric: paired_difference(_case_values(after, metric, cases), _case_values(before, metric, cases))
                for metric in GAIN_METRICS}
    return gains


def _gains_table(methods: list[MethodReports], trainers: list[str], post_hoc: list[str], csv_file: Path) -> str:
    """The Markdown table of `post_hoc_gains`; writes them all into `csv_file` too."""
    gains = post_hoc_gains(methods, trainers, post_hoc)
    rows = ["| trainer | calibrator | " + " | ".join(f"Δ{metric_label(metric)}" for metric in GAIN_METRICS)
            + " | n |", "|---|---|" + "---|" * (len(GAIN_METRICS) + 1)]
    output = io.StringIO()
    writer = csv.writer(output)
    writer.writerow(["trainer", "calibrator", "metric", "difference", "ci_low", "ci_high", "n"])
    for (trainer, calibrator), differences in gains.items():
        cells = [f"{d.mean:+.4g} [{d.ci_low:+.3g}, {d.ci_high:+.3g}]" if d.num_pairs else "n/a"
                 for d in differences.values()]
        pairs = max(difference.num_pairs for difference in differences.values())
        rows.append(f"| {trainer} | {calibrator} | " + " | ".join(cells) + f" | {pairs} |")
        for metric, d in differences.items():
            writer.writerow([trainer, calibrator, metric, d.mean, d.ci_low, d.ci_high, d.num_pairs])
    with atomic_path(csv_file) as temporary:
        temporary.write_text(output.getvalue())
    return "\n".join(rows) + "\n"


def fitted_map_row(record: dict) -> list[str]:
    """A calibration_map.json's fitted map in words: T for a temperature, else the Frobenius norm of A - I and the
    norm of b; whether a temperature lies at the bound of its search, and whether the solver converged."""
    calibration = record["calibration"]
    info = calibration.get("info", {})
    weight, bias = np.asarray(calibration["weight"]), np.asarray(calibration["bias"])
    if calibration["method"] == "temperature":
        fitted = f"T = {info['temperature']:.4g}"
        at_bound = info.get("at_bound") or "no"
    else:
        fitted = (f"‖A − I‖ = {np.linalg.norm(weight - np.eye(len(weight))):.4g}, ‖b‖ = "
                  f"{np.linalg.norm(bias):.4g}")
        at_bound = "n/a"
    converged = {True: "yes", False: "no"}.get(info.get("converged"), "n/a")
    return [fitted, at_bound, converged]


def _maps_section(maps: dict[str, dict[str, dict[str, list[str]]]], fit_on: str) -> str:
    """The fitted maps per trainer, calibrator and fit (one per fold, or one shared by the folds)."""
    rows = ["| trainer | calibrator | repeat | folds | fitted map | at the search bound | converged |",
            "|---|---|---|---|---|---|---|"]
    for repeat, trainers in maps.items():
        for trainer, calibrators in trainers.items():
            for calibrator, paths in calibrators.items():
                records = {}  # a map shared by several folds is the same record in each: listed once
                for path in paths:
                    record = json.loads(Path(path).read_text())
                    records.setdefault(", ".join(sorted(record["checkpoints"])), record)
                for folds, record in records.items():
                    cells = [trainer, calibrator, repeat, folds.replace("fold_", ""), *fitted_map_row(record)]
                    rows.append("| " + " | ".join(cells) + " |")
    return (f"## Fitted maps\n\nFitted {FITS[fit_on]} (`nnunet-margin fit-calibration --fit-on {fit_on}`, "
            f"docs/methods.md 6); the maps z -> A z + b, with A = I / T for a temperature. A temperature at the bound "
            f"of its search (a model worse than uniform on these voxels, or degenerate probabilities) is folded in all "
            f"the same here, so check such models before trusting their +temperature rows.\n\n" + "\n".join(rows)
            + "\n")


def _spread_section(title: str, comparisons: dict[str, Comparison], folder: Path) -> str:
    spread = compare_methods(repeats_as_cases(list(comparisons.values())))
    folder.mkdir(parents=True)
    (folder / "table.csv").write_text(csv_table(spread))
    metrics = [metric for metric in SPREAD_METRICS if metric in spread.metrics]
    return (f"## Run-to-run spread ({title})\n\nEach method's mean per repeat, summarised over the "
            f"{len(comparisons)} repeats: mean ± standard deviation over repeats (all metrics: "
            f"[{folder.parent.name}/{folder.name}/table.csv]({folder.parent.name}/{folder.name}/table.csv)).\n\n"
            + markdown_table(spread, metrics))
