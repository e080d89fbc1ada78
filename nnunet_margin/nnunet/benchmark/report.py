"""The benchmark's report, from the calibration reports its steps wrote into the benchmark folder.

Per repeat, `nnunet-margin compare`'s tables of the cross-validation (each trainer's folds of this benchmark) and of
the test set (each method's fold ensemble); the fitted temperatures; with several repeats, the run-to-run spread:
the comparison of the methods' per-repeat means, each repeat counted as one case (mean ± standard deviation over
repeats, confidence intervals and ranks as for cases); and every step's command. Every statistic comes from
`nnunet_margin.comparison`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ...comparison import Comparison, compare_methods, csv_table, markdown_table, repeats_as_cases
from ..compare_reports import compare, printed_table, write_comparison
from .plan import SUMMARY_FILE, Plan, Step
from .settings import IDENTITY_FILE

SPREAD_METRICS = ("dice", "hd95", "ece", "classwise_ece", "nll")
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
    header = (f"# Calibration benchmark: {settings['dataset']}, {settings['configuration']}\n\n"
              f"Trainers: {', '.join(settings['trainers'])}; folds {', '.join(settings['folds'])}; plans "
              f"{settings['plans']}; repeats {settings['repeats']}; post-hoc: "
              f"{', '.join(settings['post_hoc']) or 'none'}; baseline: {settings['baseline'] or 'none'}; benchmark "
              f"{plan.folder.name}.\n\n"
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
    if arguments["temperatures"]:
        sections.append(_temperature_section(arguments["temperatures"]))
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


def _temperature_section(temperatures: dict[str, dict[str, dict[str, str]]]) -> str:
    rows = ["| trainer | repeat | fold | T | at the search bound |", "|---|---|---|---|---|"]
    for repeat, trainers in temperatures.items():
        for trainer, folds in trainers.items():
            for fold, path in folds.items():
                record = json.loads(Path(path).read_text())
                rows.append(f"| {trainer} | {repeat} | {fold} | {record['temperature']:.4g} | "
                            f"{record.get('at_bound') or 'no'} |")
    return ("## Fitted temperatures\n\nOne per fold, on its validation probabilities; a temperature at the search "
            "bound (a model worse than uniform on these voxels, or degenerate probabilities) is folded in all the same "
            "here, so check such models before trusting their +temperature row.\n\n" + "\n".join(rows) + "\n")


def _spread_section(title: str, comparisons: dict[str, Comparison], folder: Path) -> str:
    spread = compare_methods(repeats_as_cases(list(comparisons.values())))
    folder.mkdir(parents=True)
    (folder / "table.csv").write_text(csv_table(spread))
    metrics = [metric for metric in SPREAD_METRICS if metric in spread.metrics]
    return (f"## Run-to-run spread ({title})\n\nEach method's mean per repeat, summarised over the "
            f"{len(comparisons)} repeats: mean ± standard deviation over repeats (all metrics: "
            f"[{folder.parent.name}/{folder.name}/table.csv]({folder.parent.name}/{folder.name}/table.csv)).\n\n"
            + markdown_table(spread, metrics))
