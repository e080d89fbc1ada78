"""Failure detection: how well a per-case confidence score ranks segmentations by their quality (docs/methods.md 8).

Inputs are one confidence per case (higher = more confident; `confidence_from_score` turns a score such as the mean
entropy, where higher means more likely failed, into one) and one risk per case, 1 - the case's mean foreground Dice
(`case_risk`). The risk-coverage curve (Geifman & El-Yaniv) keeps the k most confident cases; AURC is the mean of its
selective risks, excess AURC subtracts the AURC of the best possible ranking (0 for a perfect ranking), and
`failure_auroc` is the AUROC of the uncertainty separating failed cases (Dice below a threshold) from the others.
`resampled_aurc` and `resampled_auroc` compute the same for many bootstrap resamples of the cases at once
(`failure_comparison`'s intervals).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import matplotlib.style
import numpy as np
from matplotlib.figure import Figure

from .._atomic import atomic_path

DEFAULT_FAILURE_DICE = 0.5
# Which way a score's value points: "higher" means a higher value is more likely a failed segmentation.
FAILURE_DIRECTIONS = ("higher", "lower")


def case_risk(dice_per_class: Sequence[float]) -> float:
    """1 - the mean Dice over the foreground classes; classes with NaN Dice (absent from both prediction and
    reference) are left out, and a case without any defined class has risk 0."""
    values = np.asarray(dice_per_class, dtype=np.float64)
    defined = values[~np.isnan(values)]
    return float(1.0 - defined.mean()) if defined.size else 0.0


def check_failure_dice(threshold: float) -> float:
    """The Dice threshold below which a case counts as failed, checked to lie in (0, 1]."""
    if not (isinstance(threshold, (int, float)) and 0 < threshold <= 1):
        raise ValueError(f"the failure threshold (--failure-dice) must be a Dice in (0, 1], got {threshold!r}: a case "
                         f"counts as failed when its mean foreground Dice is below it (default "
                         f"{DEFAULT_FAILURE_DICE})")
    return float(threshold)


def confidence_from_score(values: Sequence[float | None], failure_when: str) -> np.ndarray:
    """A score's per-case values as confidences (higher = more confident): negated where a higher value means more
    likely failed. A case where the score is undefined (None or NaN, e.g. a mean over an empty predicted foreground)
    is less confident than every case where it is defined, and tied with the other undefined ones."""
    if failure_when not in FAILURE_DIRECTIONS:
        raise ValueError(f"failure_when must be one of {FAILURE_DIRECTIONS} (the direction in which a score means "
                         f"'more likely failed'), got {failure_when!r}")
    values = np.array([math.nan if value is None else value for value in values], dtype=np.float64)
    confidence = -values if failure_when == "higher" else values
    undefined = np.isnan(confidence)
    if undefined.any():
        defined = confidence[~undefined]
        confidence[undefined] = defined.min() - 1.0 if defined.size else 0.0
    return confidence


def _checked(confidence: Sequence[float], risk: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    confidence = np.asarray(confidence, dtype=np.float64)
    risk = np.asarray(risk, dtype=np.float64)
    if confidence.ndim != 1 or confidence.shape != risk.shape or confidence.size == 0:
        raise ValueError(f"confidence and risk must be 1-D with one value per case, got shapes {confidence.shape} "
                         f"and {risk.shape}")
    if not (np.isfinite(confidence).all() and np.isfinite(risk).all()):
        raise ValueError("confidence and risk must be finite: give cases without a score a value of their own "
                         "(`confidence_from_score` makes them the least confident) or leave them out")
    return confidence, risk


def _selective_risks(confidence: np.ndarray, risk: np.ndarray) -> np.ndarray:
    """The selective risks (see `risk_coverage_curve`) of finite 1-D confidences and risks."""
    order = np.argsort(-confidence, kind="stable")
    sorted_confidence, sorted_risk = confidence[order], risk[order]
    count = len(risk)
    risk_before = np.concatenate([[0.0], np.cumsum(sorted_risk)])  # risk_before[i]: sum of the first i risks
    new_group = np.concatenate([[True], sorted_confidence[1:] != sorted_confidence[:-1]])
    starts = np.flatnonzero(new_group)
    ends = np.append(starts[1:], count)
    group = np.cumsum(new_group) - 1  # the tie group of each position
    group_mean = (risk_before[ends] - risk_before[starts]) / (ends - starts)
    kept = np.arange(1, count + 1)
    start = starts[group]
    return (risk_before[start] + (kept - start) * group_mean[group]) / kept


def resample_counts(rng: np.random.Generator, count: int, n_resamples: int) -> np.ndarray:
    """(n_resamples, count): how often each of `count` cases is drawn into each bootstrap resample of `count` cases,
    from ``rng.integers(0, count, (n_resamples, count))`` (the draws of `bootstrap_mean_ci`)."""
    index = rng.integers(0, count, (n_resamples, count)) + count * np.arange(n_resamples)[:, None]
    return np.bincount(index.ravel(), minlength=n_resamples * count).reshape(n_resamples, count)


def resampled_aurc(confidence: np.ndarray, risk: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The AURC of resamples of the cases (finite 1-D confidences and risks), each resample given as how often it
    holds each case (counts (B, n), rows summing to their number of cases): equal to `aurc` of the resampled cases,
    in O(B n) without sorting each resample. Cases tied in confidence form groups in a fixed order (a case drawn
    twice is tied with itself); a group of m cases after p others, with risk sum R and the risk sum A before it, adds
    A (H(p + m) - H(p)) + R / m (m - p (H(p + m) - H(p))) to the sum of the selective risks, H the harmonic numbers."""
    order = np.argsort(-confidence, kind="stable")
    sorted_confidence = confidence[order]
    starts = np.flatnonzero(np.concatenate([[True], sorted_confidence[1:] != sorted_confidence[:-1]]))
    counts = counts[:, order]
    members = np.add.reduceat(counts, starts, axis=1)  # (B, groups)
    risk_sum = np.add.reduceat(counts * risk[order], starts, axis=1)
    before = np.cumsum(members, axis=1) - members
    risk_before = np.cumsum(risk_sum, axis=1) - risk_sum
    total = counts.sum(axis=1)
    harmonic = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, total.max() + 1))])
    harmonic_step = harmonic[before + members] - harmonic[before]
    group_mean = np.divide(risk_sum, members, out=np.zeros(members.shape), where=members > 0)
    return (risk_before * harmonic_step + group_mean * (members - before * harmonic_step)).sum(axis=1) / total


def resampled_auroc(uncertainty_failed: np.ndarray, uncertainty_successful: np.ndarray, failed_counts: np.ndarray,
                    successful_counts: np.ndarray) -> np.ndarray:
    """The failure AUROC of resamples (B,) of failed and successful cases (1-D uncertainties, both non-empty), each
    resample given as how often it holds each case: the weighted share of (failed, successful) pairs where the
    failed case is the more uncertain, ties counting half (Mann-Whitney U / (n_failed n_successful))."""
    order = np.argsort(uncertainty_successful, kind="stable")
    sorted_successful = uncertainty_successful[order]
    cumulative = np.concatenate([np.zeros((len(successful_counts), 1)),
                                 np.cumsum(successful_counts[:, order], axis=1)], axis=1)
    below = cumulative[:, np.searchsorted(sorted_successful, uncertainty_failed, "left")]
    up_to = cumulative[:, np.searchsorted(sorted_successful, uncertainty_failed, "right")]
    pairs = (failed_counts * (below + 0.5 * (up_to - below))).sum(axis=1)
    return pairs / (failed_counts.sum(axis=1) * successful_counts.sum(axis=1))


def risk_coverage_curve(confidence: Sequence[float], risk: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(coverage, selective risk) for keeping the k = 1..n most confident cases: coverage k / n and the mean risk of
    those k cases. Among cases of equal confidence the order is undefined, so the selective risk there is its
    expectation over their orderings (the tied cases enter with their mean risk)."""
    confidence, risk = _checked(confidence, risk)
    return np.arange(1, risk.size + 1) / risk.size, _selective_risks(confidence, risk)


def aurc(confidence: Sequence[float], risk: Sequence[float]) -> float:
    """Area under the risk-coverage curve: the mean of its n selective risks."""
    return float(risk_coverage_curve(confidence, risk)[1].mean())


def optimal_aurc(risk: Sequence[float]) -> float:
    """The AURC of the best ranking of these risks (least risky cases first)."""
    return aurc(-np.asarray(risk, dtype=np.float64), risk)


def excess_aurc(confidence: Sequence[float], risk: Sequence[float]) -> float:
    """AURC minus the optimal AURC for the same risks: 0 for a perfect ranking."""
    return aurc(confidence, risk) - optimal_aurc(risk)


def failure_auroc(confidence: Sequence[float], dice: Sequence[float],
                  threshold: float = DEFAULT_FAILURE_DICE) -> float:
    """AUROC of the uncertainty (-confidence) detecting failed cases (mean foreground Dice < threshold): the
    probability that a failed case is less confident than a successful one, ties counting half (the Mann-Whitney U
    of the failed cases over n_failed * n_successful). NaN if all cases failed or none did."""
    confidence, dice = _checked(confidence, dice)
    failed = dice < threshold
    if failed.all() or not failed.any():
        return math.nan
    return float(resampled_auroc(-confidence[failed], -confidence[~failed], np.ones((1, failed.sum())),
                                 np.ones((1, (~failed).sum())))[0])


def auroc_undefined_reason(dice: Sequence[float], threshold: float) -> str:
    """Why the failure AUROC of these cases is undefined ("" if it is not)."""
    failed = int(np.sum(np.asarray(dice, dtype=np.float64) < threshold))
    if failed == 0:
        return f"no case has a mean foreground Dice below {threshold:g}, so there is no failure to detect"
    if failed == len(dice):
        return f"every case has a mean foreground Dice below {threshold:g}, so there is no success to tell apart"
    return ""


def plot_risk_coverage(confidences: Mapping[str, Sequence[float]], risk: Sequence[float],
                       path: str | os.PathLike, title: str = "Risk-coverage") -> None:
    """Write a PNG of the risk-coverage curve of each named confidence score (AURC in the legend), with the best
    possible ranking and the mean risk (a random ranking) for reference; atomic write."""
    risk = np.asarray(risk, dtype=np.float64)
    with matplotlib.style.context("default"):
        figure = Figure(figsize=(5.5, 4.2), layout="constrained")
        ax = figure.add_subplot()
        for name, confidence in confidences.items():
            coverage, selective = risk_coverage_curve(confidence, risk)
            ax.plot(coverage, selective, drawstyle="steps-post", label=f"{name} (AURC {selective.mean():.4f})")
        coverage, best = risk_coverage_curve(-risk, risk)
        ax.plot(coverage, best, "--", color="gray", label=f"best ranking (AURC {best.mean():.4f})")
        ax.axhline(risk.mean(), linestyle=":", color="black", linewidth=1, label=f"random ({risk.mean():.4f})")
        ax.set(xlim=(0, 1), ylim=(0, max(1e-6, float(risk.max())) * 1.05), xlabel="coverage (cases kept)",
               ylabel="selective risk (1 - mean Dice)", title=f"{title}  ({risk.size} cases)")
        ax.legend(fontsize="x-small")
        with atomic_path(path) as temporary:
            figure.savefig(temporary, dpi=100)
