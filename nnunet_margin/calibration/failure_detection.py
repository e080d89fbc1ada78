"""Failure detection: how well a per-case confidence score ranks segmentations by their quality (docs/methods.md 8).

Inputs are one confidence per case (higher = more confident; pass an uncertainty such as the mean entropy negated)
and one risk per case, 1 - the case's mean foreground Dice (`case_risk`). The risk-coverage curve (Geifman &
El-Yaniv) keeps the k most confident cases; AURC is the mean of its selective risks, excess AURC subtracts the AURC
of the best possible ranking (0 for a perfect ranking), and `failure_auroc` is the AUROC of the uncertainty
separating failed cases (Dice below a threshold) from the others.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import matplotlib.style
import numpy as np
from matplotlib.figure import Figure
from scipy.stats import rankdata

from .._atomic import atomic_path

DEFAULT_FAILURE_DICE = 0.5


def case_risk(dice_per_class: Sequence[float]) -> float:
    """1 - the mean Dice over the foreground classes; classes with NaN Dice (absent from both prediction and
    reference) are left out, and a case without any defined class has risk 0."""
    values = np.asarray(dice_per_class, dtype=np.float64)
    defined = values[~np.isnan(values)]
    return float(1.0 - defined.mean()) if defined.size else 0.0


def _checked(confidence: Sequence[float], risk: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    confidence = np.asarray(confidence, dtype=np.float64)
    risk = np.asarray(risk, dtype=np.float64)
    if confidence.ndim != 1 or confidence.shape != risk.shape or confidence.size == 0:
        raise ValueError(f"confidence and risk must be 1-D with one value per case, got shapes {confidence.shape} "
                         f"and {risk.shape}")
    if not (np.isfinite(confidence).all() and np.isfinite(risk).all()):
        raise ValueError("confidence and risk must be finite: give cases without a score a value of their own "
                         "(e.g. the lowest confidence) or leave them out")
    return confidence, risk


def risk_coverage_curve(confidence: Sequence[float], risk: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(coverage, selective risk) for keeping the k = 1..n most confident cases: coverage k / n and the mean risk of
    those k cases. Among cases of equal confidence the order is undefined, so the selective risk there is its
    expectation over their orderings (the tied cases enter with their mean risk)."""
    confidence, risk = _checked(confidence, risk)
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
    selective = (risk_before[start] + (kept - start) * group_mean[group]) / kept
    return kept / count, selective


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
    n_failed, n_successful = int(failed.sum()), int((~failed).sum())
    if n_failed == 0 or n_successful == 0:
        return float("nan")
    ranks = rankdata(-confidence)  # average ranks of the uncertainty, ties averaged
    u_failed = ranks[failed].sum() - n_failed * (n_failed + 1) / 2
    return float(u_failed / (n_failed * n_successful))


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
