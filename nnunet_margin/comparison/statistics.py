"""Statistics of a comparison of methods over cases: mean and standard deviation, ranks and the sum of ranks,
percentile-bootstrap confidence intervals of the mean, and paired Wilcoxon tests against a baseline.

The MbLS and NACL papers' tables (docs/methods.md section 5) report DSC, HD95, ASD, ECE and CECE per method as the
mean over test cases and order methods by the sum of their per-metric ranks; `compare_methods` computes those numbers
from one float per method, case and metric (`CaseScores`). Statistics per method and metric use the cases where the
value is defined (their number is reported): mean, sample standard deviation (ddof = 1), and a percentile-bootstrap
confidence interval of the mean over cases. `paired_difference` gives the mean per-case difference of two methods
with a paired-bootstrap interval (what one method gains over another on the same cases). `repeats_as_cases` makes
repeated runs the cases of a comparison: the run-to-run spread.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .scores import HIGHER, CaseScores

# The MbLS/NACL papers' table columns, summed to order methods (docs/methods.md section 5).
PAPER_RANK_METRICS = ("dice", "hd95", "asd", "ece", "classwise_ece")

# Bootstrap means computed at once (samples x resamples x cases entries; 8 bytes each, twice: indices and values).
_BOOTSTRAP_CHUNK_ENTRIES = 2**22


def average_ranks(scores: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """Rank 1 = best; tied scores share the mean of the ranks they span (scipy.stats.rankdata's "average"); NaN
    scores get a NaN rank and are left out of the ranking."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f"scores must be one-dimensional (one per method), got shape {scores.shape}")
    key = -scores if higher_is_better else scores
    defined = ~np.isnan(key)
    ranked = key[defined]
    better = (ranked[None, :] < ranked[:, None]).sum(axis=1)
    tied = (ranked[None, :] == ranked[:, None]).sum(axis=1)  # the score itself included
    ranks = np.full(scores.shape, np.nan)
    ranks[defined] = better + (tied + 1) / 2
    return ranks


def bootstrap_mean_ci(samples: np.ndarray, confidence_level: float = 0.95, n_resamples: int = 10_000,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Percentile-bootstrap confidence interval of the mean of each row of ``samples`` (..., n), all finite.

    The resampled case indices are drawn as ``numpy.random.default_rng(seed).integers(0, n, (n_resamples, n))``,
    the same for every row (common random numbers), and the bounds are the linear-interpolation quantiles
    (1 - confidence_level) / 2 and (1 + confidence_level) / 2 of the resampled means: per row this is
    ``scipy.stats.bootstrap((row,), np.mean, method="percentile", rng=np.random.default_rng(seed))``, which needs
    n >= 2; here n = 1 gives (x, x) and n = 0 gives NaN.
    """
    samples = np.asarray(samples, dtype=np.float64)
    if samples.ndim < 1:
        raise ValueError("samples must have the cases on the last axis, got a scalar")
    if not np.isfinite(samples).all():
        raise ValueError("samples must be finite: drop the cases where the metric is undefined first")
    if not 0 < confidence_level < 1:
        raise ValueError(f"confidence_level must lie in (0, 1), got {confidence_level}")
    if not isinstance(n_resamples, (int, np.integer)) or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive integer, got {n_resamples!r}")
    num_cases = samples.shape[-1]
    if num_cases == 0:
        empty = np.full(samples.shape[:-1], np.nan)
        return empty, empty.copy()

    rng = np.random.default_rng(seed)
    rows = samples.reshape(-1, num_cases)
    means = np.empty((rows.shape[0], n_resamples))
    chunk = max(1, _BOOTSTRAP_CHUNK_ENTRIES // max(1, rows.shape[0] * num_cases))
    for start in range(0, n_resamples, chunk):
        stop = min(start + chunk, n_resamples)
        # Consecutive draws from one generator continue its stream: equal to one draw of all resamples.
        index = rng.integers(0, num_cases, (stop - start, num_cases))
        means[:, start:stop] = rows[:, index].mean(axis=-1)
    alpha = (1 - confidence_level) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha], axis=-1)
    return low.reshape(samples.shape[:-1]), high.reshape(samples.shape[:-1])


@dataclass(frozen=True)
class PairedTest:
    """Two-sided paired Wilcoxon signed-rank test; ``note`` says why ``p_value`` is NaN ("" when it is not)."""

    p_value: float
    statistic: float
    num_pairs: int  # cases where both values are defined
    note: str


def paired_wilcoxon(values: np.ndarray, baseline_values: np.ndarray, min_nonzero_pairs: int = 6) -> PairedTest:
    """scipy.stats.wilcoxon (two-sided, zero differences dropped) of values against baseline_values over the cases
    where both are defined (not NaN).

    NaN with a note when every difference is zero (scipy would return p = 1 with a warning) or fewer than
    ``min_nonzero_pairs`` differences are nonzero: with 5 or fewer the smallest possible two-sided p is
    2 / 2**5 = 0.0625, so the default 6 is the fewest that can reach p < 0.05.
    """
    values, baseline_values = np.asarray(values, np.float64), np.asarray(baseline_values, np.float64)
    if not isinstance(min_nonzero_pairs, (int, np.integer)) or min_nonzero_pairs < 1:
        raise ValueError(f"min_nonzero_pairs must be a positive integer, got {min_nonzero_pairs!r}")
    if values.shape != baseline_values.shape or values.ndim != 1:
        raise ValueError(f"values {values.shape} and baseline_values {baseline_values.shape} must be one-dimensional "
                         f"arrays over the same cases")
    both = ~np.isnan(values) & ~np.isnan(baseline_values)
    num_pairs = int(both.sum())
    nonzero = int(np.count_nonzero(values[both] - baseline_values[both]))
    if num_pairs == 0:
        note = "no case where both are defined"
    elif nonzero == 0:
        note = f"all {num_pairs} paired differences are zero"
    elif nonzero < min_nonzero_pairs:
        note = f"only {nonzero} nonzero paired differences (at least {min_nonzero_pairs} needed)"
    else:
        import scipy.stats  # here, not at module level: importing it costs ~0.6 s, and the package is imported
        # by every nnU-Net process that loads the trainers

        result = scipy.stats.wilcoxon(values[both], baseline_values[both])
        return PairedTest(float(result.pvalue), float(result.statistic), num_pairs, "")
    return PairedTest(math.nan, math.nan, num_pairs, note)


@dataclass(frozen=True)
class PairedDifference:
    """The mean over cases of a method's value minus a reference's, with its paired-bootstrap confidence interval."""

    mean: float
    ci_low: float
    ci_high: float
    num_pairs: int  # cases where both values are defined


def paired_difference(values: np.ndarray, reference_values: np.ndarray, confidence_level: float = 0.95,
                      n_resamples: int = 10_000, seed: int = 0) -> PairedDifference:
    """Mean of the per-case differences ``values - reference_values`` over the cases where both are defined (not
    NaN), and the percentile-bootstrap confidence interval of that mean with the cases resampled in pairs (each
    resample draws cases, and takes both values of each drawn case): `bootstrap_mean_ci` of the differences, i.e.
    ``scipy.stats.bootstrap((values, reference_values), lambda x, y: np.mean(x - y), paired=True,
    method="percentile")``. Pairing removes the variation between cases that both share, so the interval is narrower
    than the two methods' own intervals suggest. NaN without a common case."""
    values, reference_values = np.asarray(values, np.float64), np.asarray(reference_values, np.float64)
    if values.shape != reference_values.shape or values.ndim != 1:
        raise ValueError(f"values {values.shape} and reference_values {reference_values.shape} must be "
                         f"one-dimensional arrays over the same cases")
    both = ~np.isnan(values) & ~np.isnan(reference_values)
    differences = values[both] - reference_values[both]
    if not np.isfinite(differences).all():
        raise ValueError("values must be finite or NaN (undefined); got an infinite value")
    low, high = bootstrap_mean_ci(differences, confidence_level, n_resamples, seed)
    mean = float(differences.mean()) if differences.size else math.nan
    return PairedDifference(mean, float(low), float(high), int(both.sum()))


@dataclass(frozen=True)
class Comparison:
    """Everything the comparison tables show. Arrays are (methods, metrics), methods sorted by `rank_sum`
    (ascending, undefined last, ties in input order)."""

    methods: tuple[str, ...]
    metrics: tuple[str, ...]
    directions: Mapping[str, str]
    num_cases: np.ndarray  # int64: cases where the metric is defined
    mean: np.ndarray
    std: np.ndarray  # sample standard deviation (ddof = 1); NaN for fewer than 2 cases
    ci_low: np.ndarray
    ci_high: np.ndarray
    confidence_level: float
    rank: np.ndarray  # per metric, 1 = best mean, ties averaged, NaN without a mean
    rank_metrics: tuple[str, ...]
    rank_sum: np.ndarray  # (methods,), NaN if a rank metric has no mean
    baseline: str | None
    p_value: np.ndarray  # paired Wilcoxon against the baseline, NaN with a note where not computed
    num_pairs: np.ndarray  # int64
    p_note: np.ndarray  # str

    @property
    def overall_metrics(self) -> tuple[str, ...]:
        return tuple(metric for metric in self.metrics if "/" not in metric)

    @property
    def per_class_metrics(self) -> tuple[str, ...]:
        return tuple(metric for metric in self.metrics if "/" in metric)

    def column(self, metric: str) -> int:
        if metric not in self.metrics:
            raise ValueError(f"metric '{metric}' is not in the comparison (metrics: {list(self.metrics)})")
        return self.metrics.index(metric)

    def is_best(self, metric: str) -> np.ndarray:
        """Bool per method: its mean is the best of the metric's column (ties all count)."""
        mean = self.mean[:, self.column(metric)]
        if np.isnan(mean).all():
            return np.zeros(mean.shape, dtype=bool)
        best = np.nanmax(mean) if self.directions[metric] == HIGHER else np.nanmin(mean)
        return mean == best


def compare_methods(scores: CaseScores, rank_metrics: Sequence[str] | None = None, baseline: str | None = None,
                    confidence_level: float = 0.95, n_resamples: int = 10_000, seed: int = 0,
                    min_nonzero_pairs: int = 6) -> Comparison:
    """Mean ± std, bootstrap CI, ranks and sum of ranks of every method and metric, and the paired Wilcoxon test
    of each method against ``baseline`` (None: no tests).

    ``rank_metrics`` default to the papers' DSC, HD95, ASD, ECE, CECE that the scores hold (docs/methods.md 5).
    The CIs follow `bootstrap_mean_ci` with the same seed for every method and metric, so a method's interval does
    not depend on which other methods are compared.
    """
    metrics = scores.metrics
    if rank_metrics is None:
        rank_metrics = tuple(metric for metric in PAPER_RANK_METRICS if metric in metrics)
        if not rank_metrics:
            raise ValueError(f"the scores hold none of the papers' rank metrics {list(PAPER_RANK_METRICS)}: pass "
                             f"rank_metrics (a list of {list(metrics)})")
    rank_metrics = tuple(rank_metrics)
    missing = [metric for metric in rank_metrics if metric not in metrics]
    if missing or not rank_metrics:
        raise ValueError(f"rank_metrics {missing or '[]'} must be a non-empty list of the scores' metrics "
                         f"{list(metrics)}")
    if baseline is not None and baseline not in scores.methods:
        raise ValueError(f"baseline '{baseline}' is not one of the methods {list(scores.methods)}")

    values = scores.values
    defined = ~np.isnan(values)
    num_cases = defined.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(defined, values, 0).sum(axis=1) / num_cases
        squared_deviation = np.where(defined, values - mean[:, None, :], 0) ** 2
        std = np.sqrt(squared_deviation.sum(axis=1) / (num_cases - 1))
    std[num_cases < 2] = np.nan

    rank = np.stack([average_ranks(mean[:, k], scores.directions[metric] == HIGHER)
                     for k, metric in enumerate(metrics)], axis=1)
    rank_sum = rank[:, [metrics.index(metric) for metric in rank_metrics]].sum(axis=1)

    ci_low, ci_high = np.full(mean.shape, np.nan), np.full(mean.shape, np.nan)
    columns_by_count: dict[int, list[tuple[int, int]]] = {}
    for m, k in np.ndindex(*mean.shape):
        columns_by_count.setdefault(int(num_cases[m, k]), []).append((m, k))
    for count, columns in columns_by_count.items():
        if count == 0:
            continue
        samples = np.stack([values[m, defined[m, :, k], k] for m, k in columns])
        low, high = bootstrap_mean_ci(samples, confidence_level, n_resamples, seed)
        rows, cols = zip(*columns)
        ci_low[rows, cols], ci_high[rows, cols] = low, high

    p_value = np.full(mean.shape, np.nan)
    num_pairs = np.zeros(mean.shape, dtype=np.int64)
    p_note = np.full(mean.shape, "no baseline", dtype=object)
    if baseline is not None:
        reference = scores.methods.index(baseline)
        for m, k in np.ndindex(*mean.shape):
            if m == reference:
                p_note[m, k] = "baseline"
                continue
            test = paired_wilcoxon(values[m, :, k], values[reference, :, k], min_nonzero_pairs)
            p_value[m, k], num_pairs[m, k], p_note[m, k] = test.p_value, test.num_pairs, test.note

    order = sorted(range(len(scores.methods)), key=lambda m: (np.isnan(rank_sum[m]), np.nan_to_num(rank_sum[m]), m))
    return Comparison(
        methods=tuple(scores.methods[m] for m in order), metrics=metrics, directions=dict(scores.directions),
        num_cases=num_cases[order], mean=mean[order], std=std[order], ci_low=ci_low[order], ci_high=ci_high[order],
        confidence_level=confidence_level, rank=rank[order], rank_metrics=rank_metrics, rank_sum=rank_sum[order],
        baseline=baseline, p_value=p_value[order], num_pairs=num_pairs[order], p_note=p_note[order])



def repeats_as_cases(comparisons: Sequence[Comparison]) -> CaseScores:
    """Repeated runs of a comparison (the same methods trained again) as the cases of a new one: ``values[m, r, k]``
    is method m's mean of metric k in repeat r (cases "repeat 1", "repeat 2", ...; NaN where a repeat lacks the
    method or metric, or its mean is undefined). ``compare_methods(repeats_as_cases(comparisons))`` then gives the
    run-to-run spread: its ``mean`` and ``std`` are the mean and sample standard deviation over the repeats, and
    ``markdown_table`` shows them as mean ± sd."""
    if not comparisons:
        raise ValueError("no repeats to compare: pass the Comparison of every repeat")
    methods = tuple(dict.fromkeys(method for comparison in comparisons for method in comparison.methods))
    metrics = tuple(dict.fromkeys(metric for comparison in comparisons for metric in comparison.metrics))
    directions: dict[str, str] = {}
    for comparison in comparisons:
        for metric, direction in comparison.directions.items():
            if directions.setdefault(metric, direction) != direction:
                raise ValueError(f"metric '{metric}' has direction '{direction}' in one repeat and "
                                 f"'{directions[metric]}' in another: compare the same metrics in every repeat")
    values = np.full((len(methods), len(comparisons), len(metrics)), np.nan)
    for repeat, comparison in enumerate(comparisons):
        rows = [methods.index(method) for method in comparison.methods]
        columns = [metrics.index(metric) for metric in comparison.metrics]
        values[np.ix_(rows, [repeat], columns)] = comparison.mean[:, None, :]
    return CaseScores(methods=methods, cases=tuple(f"repeat {repeat + 1}" for repeat in range(len(comparisons))),
                      metrics=metrics, values=values, directions=directions)
