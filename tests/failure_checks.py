"""Direct computations of the failure-detection metrics (docs/methods.md 8), written from their definitions and not
from nnunet_margin's code, for the unit and end-to-end tests: AURC as the mean over every ordering of the cases by
decreasing confidence (tied cases in every order), the failure AUROC by counting pairs, each case's Dice by counting
voxels."""

from __future__ import annotations

import itertools
import math

import numpy as np


def confidences(values, failure_when: str) -> np.ndarray:
    """Values as confidences: negated where higher means failed; undefined (None/NaN) below all others, tied."""
    values = np.array([math.nan if value is None else value for value in values], dtype=np.float64)
    confidence = -values if failure_when == "higher" else values
    undefined = np.isnan(confidence)
    confidence[undefined] = (np.nanmin(confidence) - 1) if (~undefined).any() else 0
    return confidence


def aurc_by_orderings(confidence, risk) -> float:
    confidence, risk = np.asarray(confidence, float), np.asarray(risk, float)
    orderings = [order for order in itertools.permutations(range(len(risk)))
                 if all(confidence[order[i]] >= confidence[order[i + 1]] for i in range(len(order) - 1))]
    return float(np.mean([np.mean([risk[list(order[:kept])].mean() for kept in range(1, len(risk) + 1)])
                          for order in orderings]))


def excess_aurc_by_orderings(confidence, risk) -> float:
    return aurc_by_orderings(confidence, risk) - aurc_by_orderings(-np.asarray(risk, float), risk)


def auroc_by_pairs(confidence, dice, threshold: float) -> float:
    """The share of (failed, successful) pairs where the failed case is less confident, ties half; NaN without
    both."""
    confidence, dice = np.asarray(confidence, float), np.asarray(dice, float)
    failed, successful = confidence[dice < threshold], confidence[dice >= threshold]
    if not failed.size or not successful.size:
        return math.nan
    return float(np.mean([(f < s) + 0.5 * (f == s) for f in failed for s in successful]))


def mean_foreground_dice(segmentation: np.ndarray, reference: np.ndarray, classes, ignore_label=None) -> float:
    """Mean over the classes present in either map of 2 |P n G| / (|P| + |G|) (ignored voxels left out); 1 if no
    class is present."""
    kept = np.ones(reference.shape, bool) if ignore_label is None else reference != ignore_label
    dice = []
    for label in classes:
        predicted, expected = (segmentation == label) & kept, (reference == label) & kept
        if predicted.sum() + expected.sum():
            dice.append(2 * (predicted & expected).sum() / (predicted.sum() + expected.sum()))
    return float(np.mean(dice)) if dice else 1.0
