"""Failure detection in `nnunet-margin calibration` and `compare` (docs/methods.md 8): the per-case confidence scores
that `nnunet-margin predict` wrote into its output folder (uncertainty.json), related to each case's Dice.

`calibration` reads the scores (`read_prediction_scores`; a folder without them has no failure detection) and, before
evaluating anything, refuses a folder whose scored cases are not the cases it evaluates (`check_scored_cases`).
After the evaluation `failure_section` is calibration.json's "failure_detection" section: the threshold, each case's
mean foreground Dice, and per score its direction, its values per case, AURC, E-AURC and failure AUROC;
`write_risk_coverage` draws its figure and `summary_lines` prints it. `compare` reads the section back
(`read_failure_scores`) and recomputes the metrics from the per-case values, so that they follow the cases compared.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..calibration.uncertainty import FAILURE_SCORES
from ..comparison.failure_comparison import FAILURE_METRICS, FailureScores, compare_failure_detection
from ..comparison.failure_detection import case_risk, confidence_from_score, optimal_aurc, plot_risk_coverage
from .predict import SCORES_CSV, SCORES_JSON

SECTION = "failure_detection"
FIGURE_FILE = "risk_coverage.png"
RISK = ("1 - mean foreground Dice (nnU-Net's Dice per class from the segmentation; classes absent from both "
        "segmentation and ground truth left out, a case without any has risk 0)")


def _rerun_hint(pred_folder: Path) -> str:
    return (f"rerun `nnunet-margin predict ... -o {pred_folder} --save_probabilities --continue_prediction` (it "
            f"rewrites {SCORES_JSON} and {SCORES_CSV})")


def read_prediction_scores(pred_folder: Path) -> dict[str, dict[str, float | None]] | None:
    """{case: {score: value}} from the uncertainty.json of `nnunet-margin predict` in pred_folder; None for a folder
    without one (nnUNetv2_predict's, a validation folder)."""
    path = pred_folder / SCORES_JSON
    if not path.is_file():
        if (pred_folder / SCORES_CSV).is_file():
            raise FileNotFoundError(f"{pred_folder / SCORES_CSV} has no {SCORES_JSON} beside it, which failure "
                                    f"detection reads: {_rerun_hint(pred_folder)}")
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path} is not valid JSON ({error}): it is truncated or corrupt; {_rerun_hint(pred_folder)}"
                         ) from None
    cases = record.get("cases") if isinstance(record, dict) else None
    if not isinstance(cases, dict) or not cases or not all(
            isinstance(scores, dict) and all(value is None or isinstance(value, (int, float))
                                             and not isinstance(value, bool) for value in scores.values())
            for scores in cases.values()):
        raise ValueError(f"{path} is not the scores file of `nnunet-margin predict` (no 'cases' object of numbers "
                         f"per case); {_rerun_hint(pred_folder)}")
    return cases


def _cases_text(cases: list[str], limit: int = 5) -> str:
    return ", ".join(cases[:limit]) + (f" and {len(cases) - limit} more" if len(cases) > limit else "")


def check_scored_cases(scores: Mapping[str, Any], segmentations: Mapping[str, Path], pred_folder: Path) -> None:
    """Refuse scores of other cases than those evaluated ({case: its segmentation file}), and evaluated cases without
    their segmentation (their Dice is the risk), naming the cases."""
    unscored = sorted(set(segmentations) - set(scores))
    unevaluated = sorted(set(scores) - set(segmentations))
    if unscored or unevaluated:
        problems = ([f"{len(unscored)} evaluated case(s) have no scores ({_cases_text(unscored)}: predicted into the "
                     f"folder by another command?)"] if unscored else []) + \
                   ([f"{len(unevaluated)} scored case(s) have no probabilities to evaluate "
                     f"({_cases_text(unevaluated)}: predicted without --save_probabilities?)"] if unevaluated else [])
        raise ValueError(f"{pred_folder / SCORES_JSON} scores other cases than those evaluated: {'; '.join(problems)}; "
                         f"predict every case of the folder in one `nnunet-margin predict --save_probabilities` run "
                         f"(--continue_prediction completes a folder)")
    without_segmentation = sorted(case for case, path in segmentations.items() if not path.is_file())
    if without_segmentation:
        raise FileNotFoundError(f"failure detection needs each scored case's segmentation for its Dice, but "
                                f"{_cases_text(without_segmentation)} in {pred_folder} have none: "
                                f"{_rerun_hint(pred_folder)}")


def failure_section(scores: Mapping[str, Mapping[str, float | None]],
                    segmentation: Mapping[str, Mapping[str, Mapping[str, float]]], failure_dice: float,
                    pred_folder: Path) -> dict[str, Any]:
    """The report's section (see the module docstring) from {case: scores} (read from pred_folder) and the cases'
    segmentation metrics ({case: {"dice": {class: Dice}}}); the scores of `FAILURE_SCORES` that every case has."""
    cases = sorted(scores)
    dice = {case: 1.0 - case_risk([math.nan if value is None else value
                                   for value in segmentation[case]["dice"].values()]) for case in cases}
    failure_when = {name: direction for name, direction in FAILURE_SCORES.items()
                    if all(name in scores[case] for case in cases)}
    values = {name: {case: scores[case][name] for case in cases} for name in failure_when}
    comparison = compare_failure_detection({"": FailureScores(failure_dice, dice, values, failure_when)},
                                           n_resamples=0)
    risk = [1.0 - dice[case] for case in cases]
    return {
        "risk": RISK,
        "failure_dice": failure_dice,
        "source": str(pred_folder / SCORES_JSON),
        "num_cases": len(cases),
        "num_failed": int(comparison.num_failed[0]),
        "auroc_undefined": comparison.auroc_note[0],
        "optimal_aurc": optimal_aurc(risk),
        "random_aurc": sum(risk) / len(risk),
        "dice": dice,
        "scores": {name: {"failure_when": failure_when[name],
                          **{metric: _json_number(comparison.value[metric][0, s]) for metric in FAILURE_METRICS},
                          "values": values[name]}
                   for s, name in enumerate(comparison.scores)},
    }


def _json_number(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def write_risk_coverage(section: Mapping[str, Any], output_folder: Path) -> None:
    """risk_coverage.png of the section's scores."""
    cases = sorted(section["dice"])
    confidences = {name: confidence_from_score([entry["values"][case] for case in cases], entry["failure_when"])
                   for name, entry in section["scores"].items()}
    plot_risk_coverage(confidences, [1.0 - section["dice"][case] for case in cases], output_folder / FIGURE_FILE,
                       title="Failure detection")


def summary_lines(section: Mapping[str, Any]) -> list[str]:
    """The section as printed by `nnunet-margin calibration`: one line per score, and why AUROC is undefined."""
    lines = [f"failure detection ({section['num_cases']} cases, {section['num_failed']} failed: mean foreground Dice "
             f"< {section['failure_dice']:g}; risk = 1 - mean foreground Dice; AURC of the best ranking "
             f"{section['optimal_aurc']:.4f}, of a random one {section['random_aurc']:.4f}):"]
    for name, entry in section["scores"].items():
        lines.append(f"  {name} ({entry['failure_when']} = more likely failed): " + ", ".join(
            f"{label} {'n/a' if entry[metric] is None else format(entry[metric], '.4f')}"
            for metric, (label, _) in FAILURE_METRICS.items()))
    if section["auroc_undefined"]:
        lines.append(f"  AUROC n/a: {section['auroc_undefined']} (--failure-dice sets the threshold)")
    return lines


def read_failure_scores(path: Path, report: Mapping[str, Any]) -> FailureScores | None:
    """The failure-detection cases of a calibration report (None if it has no section), refused with a message
    naming the file when the section is malformed or covers other cases than the report."""
    section = report.get(SECTION)
    if section is None:
        return None
    problem = None
    try:
        scores = FailureScores(section["failure_dice"], section["dice"],
                               {name: entry["values"] for name, entry in section["scores"].items()},
                               {name: entry["failure_when"] for name, entry in section["scores"].items()})
        if set(scores.dice) != set(report["metric_per_case"]):
            problem = "it covers other cases than the report"
    except (KeyError, TypeError, AttributeError, ValueError) as error:
        problem = f"{type(error).__name__}: {error}"
    if problem is not None:
        raise ValueError(f"{path} is not a readable calibration report: its {SECTION} section is invalid ({problem}); "
                         f"rerun the `nnunet-margin calibration` that wrote it")
    return scores
