"""Methods compared by failure detection: per confidence score, each method's AURC, excess AURC and failure AUROC
(`failure_detection`, docs/methods.md 8) over the same cases, with percentile-bootstrap confidence intervals, ranks
and tables (Markdown, CSV).

Input per method (`FailureScores`): each case's mean foreground Dice and the values of its confidence scores with
their direction, as `nnunet-margin calibration` records them in calibration.json's "failure_detection" section; a
method without scores (None) or without one of the scores shows n/a there.

The intervals resample the cases: AURC and E-AURC from ``numpy.random.default_rng(seed).integers(0, n, (B, n))``
(the same resamples for every method and score, as `bootstrap_mean_ci`'s), AUROC stratified (the failed and the
successful cases each resampled within themselves, as pROC's default), so every resample keeps both groups. A
resample costs O(n) (`resampled_aurc`, `resampled_auroc`: no sort per resample), so the intervals are always
computed: B = 2000 resamples of 1000 cases take about 0.15 s per method and score (2 shared CPU cores).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .failure_detection import (FAILURE_DIRECTIONS, aurc, auroc_undefined_reason, check_failure_dice,
                                confidence_from_score, excess_aurc, failure_auroc, resample_counts, resampled_auroc,
                                resampled_aurc)
from .scores import HIGHER, LOWER
from .statistics import average_ranks

# The metrics of a score: column heading and which way is better.
FAILURE_METRICS = {"aurc": ("AURC", LOWER), "e_aurc": ("E-AURC", LOWER), "auroc": ("AUROC", HIGHER)}
DEFAULT_RESAMPLES = 2000
# Resamples x cases handled at once.
_CHUNK_ENTRIES = 2**21


@dataclass(frozen=True)
class FailureScores:
    """One method's cases for failure detection: mean foreground Dice per case (1 - the risk), and per confidence
    score its value per case (None or NaN: undefined) and the direction in which it means "more likely failed"."""

    failure_dice: float
    dice: Mapping[str, float]
    values: Mapping[str, Mapping[str, float | None]]
    failure_when: Mapping[str, str]

    def __post_init__(self) -> None:
        check_failure_dice(self.failure_dice)
        if not self.dice or not all(_is_number(dice) and 0 <= dice <= 1 for dice in self.dice.values()):
            raise ValueError("dice must hold one mean foreground Dice in [0, 1] per case")
        cases = set(self.dice)
        for score, per_case in self.values.items():
            if self.failure_when.get(score) not in FAILURE_DIRECTIONS:
                raise ValueError(f"score '{score}' needs a direction: failure_when 'higher' or 'lower', got "
                                 f"{self.failure_when.get(score)!r}")
            if set(per_case) != cases:
                raise ValueError(f"score '{score}' has values for other cases than the Dice: "
                                 f"{_difference(set(per_case), cases)}")
            if not all(value is None or _is_number(value) and not math.isinf(value) for value in per_case.values()):
                raise ValueError(f"score '{score}' must be a finite number per case (None or NaN: undefined)")

    def restricted(self, cases: set[str]) -> FailureScores:
        """The same for the given cases only."""
        return FailureScores(self.failure_dice, {case: value for case, value in self.dice.items() if case in cases},
                             {score: {case: value for case, value in per_case.items() if case in cases}
                              for score, per_case in self.values.items()}, dict(self.failure_when))

    @classmethod
    def combined(cls, parts: Sequence[FailureScores]) -> FailureScores:
        """Disjoint sets of cases of one method (e.g. several reports) as one; the scores all parts have."""
        thresholds = {part.failure_dice for part in parts}
        if len(thresholds) > 1:
            raise ValueError(f"the reports were made with different failure thresholds {sorted(thresholds)}: rerun "
                             f"`nnunet-margin calibration` with one --failure-dice")
        scores = [score for score in parts[0].values if all(score in part.values for part in parts)]
        for score in scores:
            directions = {part.failure_when[score] for part in parts}
            if len(directions) > 1:
                raise ValueError(f"score '{score}' has the directions {sorted(directions)} in different reports")
        return cls(parts[0].failure_dice, {case: dice for part in parts for case, dice in part.dice.items()},
                   {score: {case: value for part in parts for case, value in part.values[score].items()}
                    for score in scores}, {score: parts[0].failure_when[score] for score in scores})


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _difference(have: set[str], expected: set[str]) -> str:
    parts = []
    if expected - have:
        parts.append(f"without {', '.join(sorted(expected - have)[:5])}")
    if have - expected:
        parts.append(f"extra {', '.join(sorted(have - expected)[:5])}")
    return "; ".join(parts)


def bootstrap_failure_metrics(confidence: np.ndarray, dice: np.ndarray, threshold: float, n_resamples: int,
                              seed: int = 0) -> dict[str, np.ndarray]:
    """The AURC, E-AURC and AUROC of `n_resamples` bootstrap resamples of the cases (see the module docstring):
    {metric: (n_resamples,)}; AUROC is NaN throughout where the cases have no failed or no successful case."""
    risk = 1.0 - dice
    failed = dice < threshold
    resampled = {name: np.full(n_resamples, math.nan) for name in FAILURE_METRICS}
    # one generator per resampled set: consecutive draws continue its stream, equal to one draw of all resamples
    rng, rng_failed, rng_successful = (np.random.default_rng(seed_part) for seed_part in (seed, [seed, 1], [seed, 2]))
    chunk = max(1, _CHUNK_ENTRIES // dice.size)
    for start in range(0, n_resamples, chunk):
        size = min(chunk, n_resamples - start)
        rows = slice(start, start + size)
        counts = resample_counts(rng, dice.size, size)
        resampled["aurc"][rows] = resampled_aurc(confidence, risk, counts)
        resampled["e_aurc"][rows] = resampled["aurc"][rows] - resampled_aurc(-risk, risk, counts)
        if failed.any() and not failed.all():
            resampled["auroc"][rows] = resampled_auroc(
                -confidence[failed], -confidence[~failed], resample_counts(rng_failed, int(failed.sum()), size),
                resample_counts(rng_successful, int((~failed).sum()), size))
    return resampled


@dataclass(frozen=True)
class FailureComparison:
    """Everything the failure-detection tables show. Arrays are (methods, scores), methods in input order; NaN where
    a method lacks the score, or (AUROC) where its cases have no failed or no successful case."""

    methods: tuple[str, ...]
    scores: tuple[str, ...]
    failure_when: Mapping[str, str]
    failure_dice: float
    num_cases: np.ndarray  # (methods,), 0 for a method without scores
    num_failed: np.ndarray  # (methods,)
    value: Mapping[str, np.ndarray]  # metric ("aurc", "e_aurc", "auroc") -> (methods, scores)
    ci_low: Mapping[str, np.ndarray]
    ci_high: Mapping[str, np.ndarray]
    rank: Mapping[str, np.ndarray]  # 1 = best among the methods with a value, ties share their mean rank
    has_score: np.ndarray  # (methods, scores) bool
    auroc_note: tuple[str, ...]  # per method: why its AUROC is undefined ("" if it is not)
    confidence_level: float
    n_resamples: int

    def order(self, score: str) -> list[int]:
        """Method indices by their AURC rank for `score` (ties and methods without it in input order, those last)."""
        rank = self.rank["aurc"][:, self.scores.index(score)]
        return sorted(range(len(self.methods)), key=lambda m: (math.isnan(rank[m]), np.nan_to_num(rank[m]), m))


def compare_failure_detection(methods: Mapping[str, FailureScores | None], confidence_level: float = 0.95,
                              n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> FailureComparison:
    """AURC, E-AURC and AUROC of every method and score, their ranks, and with `n_resamples` > 0 the percentile
    bootstrap intervals. The methods with scores must have the same cases and failure threshold."""
    present = {name: scores for name, scores in methods.items() if scores is not None}
    if not present:
        raise ValueError("no method has failure-detection scores: run `nnunet-margin calibration` on folders "
                         "written by `nnunet-margin predict`")
    if not 0 < confidence_level < 1:
        raise ValueError(f"confidence_level must lie in (0, 1), got {confidence_level}")
    if not isinstance(n_resamples, (int, np.integer)) or n_resamples < 0:
        raise ValueError(f"n_resamples must be a non-negative integer (0: no intervals), got {n_resamples!r}")
    first_name, first = next(iter(present.items()))
    for name, scores in present.items():
        if set(scores.dice) != set(first.dice):
            raise ValueError(f"failure detection compares methods on the same cases, but {name} and {first_name} "
                             f"differ: {name} {_difference(set(scores.dice), set(first.dice))}")
        if scores.failure_dice != first.failure_dice:
            raise ValueError(f"{name} counts cases below Dice {scores.failure_dice:g} as failed, {first_name} below "
                             f"{first.failure_dice:g}: rerun `nnunet-margin calibration` with one --failure-dice")
    failure_when: dict[str, str] = {}
    for name, scores in present.items():
        for score, direction in scores.failure_when.items():
            if failure_when.setdefault(score, direction) != direction:
                raise ValueError(f"score '{score}' means failure when '{direction}' for {name} but "
                                 f"'{failure_when[score]}' for another method")
    score_names = tuple(failure_when)
    shape = (len(methods), len(score_names))
    value, ci_low, ci_high = ({metric: np.full(shape, math.nan) for metric in FAILURE_METRICS} for _ in range(3))
    has_score = np.zeros(shape, dtype=bool)
    num_cases, num_failed = np.zeros(len(methods), dtype=np.int64), np.zeros(len(methods), dtype=np.int64)
    notes = []
    cases = sorted(first.dice)
    alpha = (1 - confidence_level) / 2
    for m, scores in enumerate(methods.values()):
        if scores is None:
            notes.append("")
            continue
        dice = np.array([scores.dice[case] for case in cases], dtype=np.float64)
        num_cases[m], num_failed[m] = dice.size, int((dice < scores.failure_dice).sum())
        notes.append(auroc_undefined_reason(dice, scores.failure_dice))
        for s, score in enumerate(score_names):
            if score not in scores.values:
                continue
            has_score[m, s] = True
            confidence = confidence_from_score([scores.values[score][case] for case in cases], failure_when[score])
            value["aurc"][m, s] = aurc(confidence, 1 - dice)
            value["e_aurc"][m, s] = excess_aurc(confidence, 1 - dice)
            value["auroc"][m, s] = failure_auroc(confidence, dice, scores.failure_dice)
            if n_resamples > 0:
                resampled = bootstrap_failure_metrics(confidence, dice, scores.failure_dice, n_resamples, seed)
                for metric, samples in resampled.items():
                    if not np.isnan(samples).any():
                        ci_low[metric][m, s], ci_high[metric][m, s] = np.quantile(samples, [alpha, 1 - alpha])
    rank = {metric: np.full(shape, math.nan) for metric in FAILURE_METRICS}
    for metric, (_, direction) in FAILURE_METRICS.items():
        for s in range(len(score_names)):
            rank[metric][:, s] = average_ranks(value[metric][:, s], direction == HIGHER)
    return FailureComparison(tuple(methods), score_names, failure_when, first.failure_dice, num_cases, num_failed,
                             value, ci_low, ci_high, rank, has_score, tuple(notes), confidence_level, n_resamples)


# --- tables ---------------------------------------------------------------------------------------------------

_ARROWS = {HIGHER: "↑", LOWER: "↓"}


def _cell(comparison: FailureComparison, metric: str, m: int, s: int, digits: int, with_ci: bool) -> str:
    value = comparison.value[metric][m, s]
    if math.isnan(value):
        return "n/a"
    text = f"{value:.{digits}f}"
    if with_ci and not math.isnan(comparison.ci_low[metric][m, s]):
        text += f" [{comparison.ci_low[metric][m, s]:.{digits}f}, {comparison.ci_high[metric][m, s]:.{digits}f}]"
    text += f" ({comparison.rank[metric][m, s]:g})"
    column = comparison.value[metric][:, s]
    best = np.nanmax(column) if FAILURE_METRICS[metric][1] == HIGHER else np.nanmin(column)
    return f"**{text}**" if value == best else text


def _header(columns: Sequence[str], left_aligned: int) -> list[str]:
    """The heading and alignment rows of a table with `columns` and then the metrics."""
    header = [*columns, *(f"{label} {_ARROWS[direction]}" for label, direction in FAILURE_METRICS.values())]
    return ["| " + " | ".join(header) + " |", "|" + "---|" * left_aligned + "---:|" * (len(header) - left_aligned)]


def _escape(text: str) -> str:
    return text.replace("|", r"\|")


def _direction_text(failure_when: str) -> str:
    return f"{failure_when} = more likely failed"


def failure_table(comparison: FailureComparison, digits: int = 4) -> str:
    """One Markdown table of every score and method (rows by score, then AURC rank): AURC, E-AURC and AUROC with the
    method's rank in parentheses, the best of a score in bold; no intervals (for printing)."""
    lines = _header(["score", "method"], 2)
    for s, score in enumerate(comparison.scores):
        for m in comparison.order(score):
            cells = [_cell(comparison, metric, m, s, digits, with_ci=False) for metric in FAILURE_METRICS]
            lines.append("| " + " | ".join([_escape(score), _escape(comparison.methods[m]), *cells]) + " |")
    return "\n".join(lines) + "\n" + _notes(comparison)


def _notes(comparison: FailureComparison) -> str:
    """The reasons for n/a: methods without scores, without a score, with an undefined AUROC."""
    notes = []
    for m, method in enumerate(comparison.methods):
        if comparison.num_cases[m] == 0:
            notes.append(f"- {method}: no confidence scores (its report was not made from an `nnunet-margin predict` "
                         f"folder)")
            continue
        lacking = [score for s, score in enumerate(comparison.scores) if not comparison.has_score[m, s]]
        if lacking:
            notes.append(f"- {method}: no {', '.join(lacking)} (a single member has no disagreement)")
        if comparison.auroc_note[m]:
            notes.append(f"- {method}: AUROC undefined, {comparison.auroc_note[m]}")
    return ("\nn/a:\n" + "\n".join(notes) + "\n") if notes else ""


def failure_report(comparison: FailureComparison, digits: int = 4) -> str:
    """Markdown: how to read, then one table per score (methods by AURC rank; value [bootstrap interval] (rank))."""
    level = f"{comparison.confidence_level:.0%}"
    interval = (f"[{level} percentile-bootstrap interval over cases, {comparison.n_resamples} resamples]"
                if comparison.n_resamples > 0 else "")
    sections = [f"## Failure detection\n\nHow well each per-case confidence score ranks the cases by their risk, "
                f"1 - mean foreground Dice (docs/methods.md 8): AURC (area under the risk-coverage curve, lower is "
                f"better; it also falls with the risk itself), E-AURC (AURC minus that of the best ranking of the "
                f"same cases: 0 is a perfect ranking) and the AUROC of detecting failed cases (mean foreground Dice "
                f"< {comparison.failure_dice:g}; 0.5 is chance, 1 perfect). Cells: value {interval} (rank among "
                f"the methods), best in bold.\n\n" + _notes(comparison).lstrip("\n")]
    for s, score in enumerate(comparison.scores):
        lines = [f"### {_escape(score)} ({_direction_text(comparison.failure_when[score])})", "",
                 *_header(["method", "cases", "failed"], 1)]
        for m in comparison.order(score):
            cells = [_cell(comparison, metric, m, s, digits, with_ci=True) for metric in FAILURE_METRICS]
            count = comparison.num_cases[m]
            lines.append("| " + " | ".join([_escape(comparison.methods[m]), str(count) if count else "n/a",
                                             str(comparison.num_failed[m]) if count else "n/a", *cells]) + " |")
        sections.append("\n".join(lines) + "\n")
    return "\n".join(sections)


def failure_csv(comparison: FailureComparison) -> str:
    """CSV, one row per score and method: score, failure_when, method, n_cases, n_failed, failure_dice, then per
    metric (aurc, e_aurc, auroc) its value, ci_low, ci_high and rank; auroc_note; full precision, NaN empty."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["score", "failure_when", "method", "n_cases", "n_failed", "failure_dice",
                     *(f"{metric}_{field}" for metric in FAILURE_METRICS for field in ("value", "ci_low", "ci_high",
                                                                                         "rank")), "auroc_note"])

    def number(value: float) -> str:
        return "" if math.isnan(value) else repr(float(value))

    for s, score in enumerate(comparison.scores):
        for m in comparison.order(score):
            row = [score, comparison.failure_when[score], comparison.methods[m], str(comparison.num_cases[m]),
                   str(comparison.num_failed[m]), repr(comparison.failure_dice)]
            for metric in FAILURE_METRICS:
                row += [number(array[metric][m, s]) for array in (comparison.value, comparison.ci_low,
                                                                  comparison.ci_high, comparison.rank)]
            writer.writerow([*row, comparison.auroc_note[m]])
    return buffer.getvalue()
