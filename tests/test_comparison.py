"""Comparison table (docs/methods.md 5): statistics against hand-computed values, scipy.stats.rankdata, wilcoxon and
bootstrap, and the Markdown/CSV/LaTeX renderings and the figure."""

from __future__ import annotations

import csv
import io
import math
import re
import statistics

import numpy as np
import pytest
import scipy.stats
import torch

from nnunet_margin.calibration import CalibrationStats
from nnunet_margin.comparison import statistics as comparison_statistics
from nnunet_margin.comparison import (
    CaseScores,
    average_ranks,
    bootstrap_mean_ci,
    compare_methods,
    csv_table,
    latex_escape,
    latex_table,
    markdown_report,
    markdown_table,
    paired_difference,
    paired_wilcoxon,
    plot_comparison,
    repeats_as_cases,
)

NAN = float("nan")


def hand_scores() -> dict:
    """Three methods, two cases; the means are exact in binary floating point except where noted.

    dice (higher): B 0.9, A 0.85, C 0.7     -> ranks B 1, A 2, C 3
    hd95 (lower):  C 2, A 5, B 5            -> ranks C 1, A 2.5, B 2.5
    ece (lower):   C 0.05, A 0.1, B 0.15    -> ranks C 1, A 2, B 3
    sums: B 6.5, A 6.5, C 5 -> order C, then B before A (tie, input order)
    """
    return {
        "B": {"case1": {"dice": 0.9, "hd95": 5.0, "ece": 0.2}, "case2": {"dice": 0.9, "hd95": 5.0, "ece": 0.1}},
        "A": {"case1": {"dice": 0.8, "hd95": 4.0, "ece": 0.1}, "case2": {"dice": 0.9, "hd95": 6.0, "ece": 0.1}},
        "C": {"case1": {"dice": 0.7, "hd95": 2.0, "ece": 0.05}, "case2": {"dice": 0.7, "hd95": 2.0, "ece": 0.05}},
    }


def random_scores(num_cases: int = 30, seed: int = 0) -> dict:
    """Four methods with overall and per-class metrics; some undefined values (NaN, None, missing entries)."""
    rng = np.random.default_rng(seed)
    methods = ["nnUNetTrainer_CE", "MbLS_m10", "Focal 50%", "R&D | test"]
    scores = {}
    for index, method in enumerate(methods):
        scores[method] = {}
        for case in range(num_cases):
            entry = {"dice": 0.8 + 0.02 * index + 0.05 * rng.standard_normal(),
                     "hd95": 10.0 - index + rng.standard_normal(),
                     "ece": 0.1 - 0.01 * index + 0.02 * rng.random(),
                     "classwise_ece": 0.05 + 0.01 * rng.random(),
                     "dice/liver": 0.9 + 0.01 * rng.standard_normal(),
                     "hd95/tumor": NAN if case % 7 == 0 else 20 + 5 * rng.standard_normal()}
            if case % 11 == 3:
                entry["ece"] = None
            if case % 13 == 5:
                del entry["classwise_ece"]
            scores[method][f"case_{case:03d}"] = entry
    return scores


# --- input data model -----------------------------------------------------------------------------------------------

def test_case_scores_layout_and_undefined_values():
    scores = CaseScores.from_nested({
        "m1": {"c2": {"ece": 0.1, "dice/b": 0.5, "dice": 0.7}, "c1": {"ece": None, "dice/a": 0.4}},
        "m2": {"c1": {"dice": 0.6}},
    })
    assert scores.methods == ("m1", "m2")
    assert scores.cases == ("c1", "c2")
    assert scores.metrics == ("dice", "ece", "dice/b", "dice/a")  # overall first, METRIC_DIRECTIONS order
    assert scores.directions == {"dice": "higher", "ece": "lower", "dice/b": "higher", "dice/a": "higher"}
    expected = np.full((2, 2, 4), np.nan)
    expected[0, 1] = [0.7, 0.1, 0.5, np.nan]
    expected[0, 0, 3] = 0.4
    expected[1, 0, 0] = 0.6
    np.testing.assert_array_equal(scores.values, expected)


def test_case_scores_rejects_unknown_metrics_and_bad_values():
    with pytest.raises(ValueError, match=r"\['dsc_surface'\] have no known direction"):
        CaseScores.from_nested({"m": {"c": {"dice": 0.5, "dsc_surface": 0.4}}})
    explicit = CaseScores.from_nested({"m": {"c": {"dsc_surface": 0.4, "dice": 0.5, "ece": 0.1}}},
                                      directions={"dsc_surface": "higher", "ece": "higher"})
    assert explicit.metrics == ("dice", "ece", "dsc_surface")
    assert explicit.directions == {"dice": "higher", "ece": "higher", "dsc_surface": "higher"}
    with pytest.raises(ValueError, match="must be 'higher' or 'lower'"):
        CaseScores.from_nested({"m": {"c": {"dice": 0.5}}}, directions={"dice": "up"})
    with pytest.raises(ValueError, match="write NaN for an undefined value"):
        CaseScores.from_nested({"m": {"c": {"hd95": math.inf}}})
    with pytest.raises(ValueError, match="expected a number"):
        CaseScores.from_nested({"m": {"c": {"dice": "0.5"}}})
    with pytest.raises(ValueError, match="no methods"):
        CaseScores.from_nested({})
    with pytest.raises(ValueError, match="has no cases"):
        CaseScores.from_nested({"m": {}})


# --- ranks ----------------------------------------------------------------------------------------------------------

def test_average_ranks_by_hand():
    np.testing.assert_array_equal(average_ranks(np.array([0.9, 0.8, 0.8, NAN, 0.7]), higher_is_better=True),
                                  [1, 2.5, 2.5, NAN, 4])
    np.testing.assert_array_equal(average_ranks(np.array([3.0, 1.0, 1.0, NAN, 2.0]), higher_is_better=False),
                                  [4, 1.5, 1.5, NAN, 3])
    np.testing.assert_array_equal(average_ranks(np.array([5.0, 5.0, 5.0]), higher_is_better=True), [2, 2, 2])
    np.testing.assert_array_equal(average_ranks(np.array([NAN, NAN]), higher_is_better=True), [NAN, NAN])


@pytest.mark.parametrize("seed", range(5))
def test_average_ranks_match_scipy_rankdata(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 4, 12).astype(float)  # many ties
    scores[rng.random(12) < 0.2] = np.nan
    np.testing.assert_array_equal(average_ranks(scores, higher_is_better=False),
                                  scipy.stats.rankdata(scores, method="average", nan_policy="omit"))
    np.testing.assert_array_equal(average_ranks(scores, higher_is_better=True),
                                  scipy.stats.rankdata(-scores, method="average", nan_policy="omit"))


def test_sum_of_ranks_by_hand():
    comparison = compare_methods(CaseScores.from_nested(hand_scores()), n_resamples=100)
    assert comparison.rank_metrics == ("dice", "hd95", "ece")  # the papers' metrics present
    assert comparison.methods == ("C", "B", "A")
    np.testing.assert_array_equal(comparison.rank_sum, [5, 6.5, 6.5])
    np.testing.assert_array_equal(comparison.rank, [[3, 1, 1], [1, 2.5, 3], [2, 2.5, 2]])

    dice_only = compare_methods(CaseScores.from_nested(hand_scores()), rank_metrics=["dice"], n_resamples=100)
    assert dice_only.methods == ("B", "A", "C")


def test_method_without_a_rank_metric_goes_last():
    scores = hand_scores()
    scores["D"] = {"case1": {"dice": 0.99, "hd95": 1.0, "ece": None}, "case2": {"dice": 0.99, "hd95": 1.0}}
    comparison = compare_methods(CaseScores.from_nested(scores), n_resamples=100)
    assert comparison.methods == ("C", "B", "A", "D")
    assert math.isnan(comparison.rank_sum[3])
    np.testing.assert_array_equal(comparison.rank[:, 2], [1, 3, 2, NAN])  # ece: D has no mean, others keep theirs
    np.testing.assert_array_equal(comparison.rank[:, 0], [4, 2, 3, 1])
    assert comparison.num_cases[3].tolist() == [2, 2, 0]


def test_compare_methods_rejects_bad_arguments():
    scores = CaseScores.from_nested(hand_scores())
    with pytest.raises(ValueError, match=r"rank_metrics \['asd'\]"):
        compare_methods(scores, rank_metrics=["dice", "asd"])
    with pytest.raises(ValueError, match="baseline 'E' is not one of the methods"):
        compare_methods(scores, baseline="E")
    with pytest.raises(ValueError, match="pass rank_metrics"):
        compare_methods(CaseScores.from_nested({"m": {"c": {"brier": 0.1}}}))


# --- mean and standard deviation ------------------------------------------------------------------------------------

def test_mean_std_and_counts_match_a_plain_loop():
    nested = random_scores()
    comparison = compare_methods(CaseScores.from_nested(nested), n_resamples=200)
    for m, method in enumerate(comparison.methods):
        for k, metric in enumerate(comparison.metrics):
            defined = [entry[metric] for entry in nested[method].values()
                       if entry.get(metric) is not None and not math.isnan(entry[metric])]
            assert comparison.num_cases[m, k] == len(defined)
            assert comparison.mean[m, k] == pytest.approx(statistics.fmean(defined), rel=1e-12)
            assert comparison.std[m, k] == pytest.approx(statistics.stdev(defined), rel=1e-10)


def test_std_is_nan_for_one_case():
    comparison = compare_methods(CaseScores.from_nested({"m": {"c": {"dice": 0.5}}}), n_resamples=10)
    assert comparison.mean[0, 0] == 0.5 and math.isnan(comparison.std[0, 0])
    assert (comparison.ci_low[0, 0], comparison.ci_high[0, 0]) == (0.5, 0.5)


# --- run-to-run spread: repeats as the cases of a comparison --------------------------------------------------------

def test_repeats_as_cases_give_mean_and_sd_over_repeats():
    """Three repeats of a comparison; method "R&D | test" is missing from the second and one repeat has no
    classwise_ece for a method: mean and sd over the repeats where the mean is defined, as a plain loop gives."""
    repeats = [compare_methods(CaseScores.from_nested(random_scores(num_cases=12, seed=seed)), n_resamples=10)
               for seed in range(3)]
    second = random_scores(num_cases=12, seed=1)
    del second["R&D | test"]
    for entry in second["MbLS_m10"].values():
        entry.pop("classwise_ece", None)
    repeats[1] = compare_methods(CaseScores.from_nested(second), n_resamples=10)
    scores = repeats_as_cases(repeats)
    assert scores.cases == ("repeat 1", "repeat 2", "repeat 3")
    assert set(scores.methods) == set(random_scores(num_cases=1)) and scores.metrics == repeats[0].metrics
    spread = compare_methods(scores, n_resamples=100)
    for m, method in enumerate(spread.methods):
        for k, metric in enumerate(spread.metrics):
            means = [repeat.mean[repeat.methods.index(method), repeat.column(metric)] for repeat in repeats
                     if method in repeat.methods]
            means = [mean for mean in means if not math.isnan(mean)]
            assert spread.num_cases[m, k] == len(means) == (2 if (method, metric) in {
                ("R&D | test", metric), ("MbLS_m10", "classwise_ece")} else 3)
            assert spread.mean[m, k] == pytest.approx(statistics.fmean(means), rel=1e-12)
            assert spread.std[m, k] == pytest.approx(statistics.stdev(means), rel=1e-10)
    row = markdown_table(spread, ["dice"]).splitlines()[2 + spread.methods.index("Focal 50%")]
    m = spread.methods.index("Focal 50%")
    assert f"{spread.mean[m, 0]:.4f} ± {spread.std[m, 0]:.4f}" in row


def test_repeats_as_cases_rejects_no_repeats_and_conflicting_directions():
    with pytest.raises(ValueError, match="no repeats"):
        repeats_as_cases([])
    higher = compare_methods(CaseScores.from_nested({"m": {"c": {"dice": 0.5, "x": 1.0}}}, directions={"x": "higher"}),
                             n_resamples=10)
    lower = compare_methods(CaseScores.from_nested({"m": {"c": {"dice": 0.5, "x": 1.0}}}, directions={"x": "lower"}),
                            n_resamples=10)
    with pytest.raises(ValueError, match="metric 'x' has direction 'lower' in one repeat and 'higher' in another"):
        repeats_as_cases([higher, lower])


# --- bootstrap ------------------------------------------------------------------------------------------------------

def scipy_percentile_ci(values: np.ndarray, n_resamples: int, seed: int, confidence_level: float = 0.95):
    result = scipy.stats.bootstrap((values,), np.mean, method="percentile", n_resamples=n_resamples,
                                   confidence_level=confidence_level, rng=np.random.default_rng(seed))
    return result.confidence_interval.low, result.confidence_interval.high


@pytest.mark.parametrize("num_cases, seed, level", [(2, 0, 0.95), (7, 3, 0.9), (40, 11, 0.95)])
def test_bootstrap_equals_scipy_with_the_same_generator(num_cases, seed, level):
    values = np.random.default_rng(100 + seed).gamma(2.0, 1.0, num_cases)
    low, high = bootstrap_mean_ci(values, confidence_level=level, n_resamples=4000, seed=seed)
    np.testing.assert_allclose([low, high], scipy_percentile_ci(values, 4000, seed, level), rtol=1e-13)


def test_bootstrap_in_chunks_and_rows_equals_one_draw(monkeypatch):
    samples = np.random.default_rng(5).normal(size=(3, 25))
    whole = [bootstrap_mean_ci(row, n_resamples=3000, seed=9) for row in samples]
    monkeypatch.setattr(comparison_statistics, "_BOOTSTRAP_CHUNK_ENTRIES", 1000)  # 13 resamples per chunk
    low, high = bootstrap_mean_ci(samples, n_resamples=3000, seed=9)
    np.testing.assert_allclose(np.stack([low, high], axis=1), whole, rtol=1e-13)
    np.testing.assert_allclose([low[1], high[1]], scipy_percentile_ci(samples[1], 3000, 9), rtol=1e-13)


def test_bootstrap_agrees_with_scipy_and_normal_theory_within_monte_carlo_error():
    """Different generators: the 2.5 % quantile of 10,000 resampled means has a Monte Carlo standard error of
    about 0.03 bootstrap standard errors, so bounds from independent draws differ by far less than 0.2."""
    values = np.random.default_rng(21).normal(3.0, 2.0, 200)
    low, high = bootstrap_mean_ci(values, seed=0)
    bootstrap_se = values.std(ddof=0) / math.sqrt(values.size)
    scipy_low, scipy_high = scipy_percentile_ci(values, 10_000, seed=12345)
    assert abs(low - scipy_low) < 0.2 * bootstrap_se and abs(high - scipy_high) < 0.2 * bootstrap_se
    z = scipy.stats.norm.ppf(0.975)
    assert low == pytest.approx(values.mean() - z * bootstrap_se, abs=0.2 * bootstrap_se)
    assert high == pytest.approx(values.mean() + z * bootstrap_se, abs=0.2 * bootstrap_se)


def test_bootstrap_degenerate_inputs():
    assert bootstrap_mean_ci(np.full(6, 0.25)) == (0.25, 0.25)  # exact: every resample mean is 0.25
    assert bootstrap_mean_ci(np.array([0.7])) == (0.7, 0.7)
    low, high = bootstrap_mean_ci(np.empty(0))
    assert math.isnan(low) and math.isnan(high)
    low, high = bootstrap_mean_ci(np.array([0.0, 1.0]), n_resamples=10_000)
    assert (low, high) == (0.0, 1.0)  # means 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4
    with pytest.raises(ValueError, match="must be finite"):
        bootstrap_mean_ci(np.array([0.5, np.nan]))
    with pytest.raises(ValueError, match="confidence_level"):
        bootstrap_mean_ci(np.array([0.5, 0.6]), confidence_level=95)
    with pytest.raises(ValueError, match="n_resamples"):
        bootstrap_mean_ci(np.array([0.5, 0.6]), n_resamples=0)


def test_paired_difference_is_the_bootstrap_of_the_per_case_differences():
    """Checked against a direct computation (the resampled case indices drawn here, each case's two values taken
    together) and against scipy's paired bootstrap with the same generator; NaN cases are left out of both."""
    rng = np.random.default_rng(8)
    reference = rng.gamma(2.0, 1.0, 30)
    values = reference - 0.3 + rng.normal(0, 0.2, 30)  # correlated with the reference, as a calibrated model is
    values[[3, 17]], reference[25] = np.nan, np.nan
    result = paired_difference(values, reference, n_resamples=3000, seed=5)
    both = ~np.isnan(values) & ~np.isnan(reference)
    x, y = values[both], reference[both]
    index = np.random.default_rng(5).integers(0, x.size, (3000, x.size))
    means = (x[index] - y[index]).mean(axis=1)
    assert result.num_pairs == 27
    assert result.mean == pytest.approx(np.mean(x - y), rel=1e-13)
    np.testing.assert_allclose([result.ci_low, result.ci_high], np.quantile(means, [0.025, 0.975]), rtol=1e-13)
    scipy_result = scipy.stats.bootstrap((x, y), lambda a, b, axis=-1: np.mean(a - b, axis=axis), paired=True,
                                         method="percentile", n_resamples=3000, rng=np.random.default_rng(5))
    np.testing.assert_allclose([result.ci_low, result.ci_high], [scipy_result.confidence_interval.low,
                                                                 scipy_result.confidence_interval.high], rtol=1e-12)
    # pairing: the interval of the difference is far narrower than the reference's own interval
    low, high = bootstrap_mean_ci(y, n_resamples=3000, seed=5)
    assert result.ci_high - result.ci_low < 0.5 * (high - low) and result.ci_high < 0


def test_paired_difference_of_no_common_case_is_nan_and_bad_shapes_are_refused():
    result = paired_difference(np.array([1.0, np.nan]), np.array([np.nan, 2.0]))
    assert result.num_pairs == 0 and all(math.isnan(v) for v in (result.mean, result.ci_low, result.ci_high))
    with pytest.raises(ValueError, match="one-dimensional arrays over the same cases"):
        paired_difference(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="infinite"):
        paired_difference(np.array([np.inf, 1.0]), np.array([0.0, 1.0]))


def test_compare_methods_ci_is_scipy_over_the_defined_cases():
    nested = random_scores()
    comparison = compare_methods(CaseScores.from_nested(nested), n_resamples=2000, seed=4)
    for method in ("MbLS_m10", "Focal 50%"):
        m = comparison.methods.index(method)
        for metric in ("ece", "hd95/tumor", "classwise_ece"):
            values = np.array([entry[metric] for entry in nested[method].values()
                               if entry.get(metric) is not None and not math.isnan(entry[metric])])
            k = comparison.column(metric)
            np.testing.assert_allclose([comparison.ci_low[m, k], comparison.ci_high[m, k]],
                                       scipy_percentile_ci(values, 2000, 4), rtol=1e-13)


# --- paired Wilcoxon ------------------------------------------------------------------------------------------------

def test_wilcoxon_matches_scipy_on_fixed_numbers():
    method = np.array([0.81, 0.77, 0.92, 0.65, 0.88, 0.70, 0.79, 0.85, 0.90, 0.60])
    baseline = np.array([0.78, 0.79, 0.85, 0.61, 0.86, 0.70, 0.71, 0.80, 0.91, 0.52])
    reference = scipy.stats.wilcoxon(method, baseline)
    test = paired_wilcoxon(method, baseline)
    assert (test.p_value, test.statistic, test.num_pairs, test.note) == (reference.pvalue, reference.statistic, 10, "")

    with_undefined = np.concatenate([method, [np.nan, 0.5]]), np.concatenate([baseline, [0.4, np.nan]])
    test = paired_wilcoxon(*with_undefined)
    assert (test.p_value, test.num_pairs) == (reference.pvalue, 10)


def test_wilcoxon_exact_p_by_hand():
    """Six positive differences: the exact two-sided p-value is 2 / 2**6."""
    test = paired_wilcoxon(np.arange(1.0, 7.0), np.zeros(6))
    assert test.p_value == pytest.approx(2 / 64, rel=1e-12) and test.statistic == 0


def test_wilcoxon_undefined_cases_get_a_reason():
    same = paired_wilcoxon(np.array([0.5, 0.6, 0.7]), np.array([0.5, 0.6, 0.7]))
    assert math.isnan(same.p_value) and same.note == "all 3 paired differences are zero"
    few = paired_wilcoxon(np.array([0.5, 0.6, 0.7, 0.8, 0.9, 1.0]), np.array([0.4, 0.6, 0.6, 0.7, 0.8, 0.9]))
    assert math.isnan(few.p_value) and few.note == "only 5 nonzero paired differences (at least 6 needed)"
    assert few.num_pairs == 6
    none = paired_wilcoxon(np.array([0.5, np.nan]), np.array([np.nan, 0.5]))
    assert math.isnan(none.p_value) and none.note == "no case where both are defined" and none.num_pairs == 0
    assert paired_wilcoxon(np.arange(1.0, 6.0), np.zeros(5), min_nonzero_pairs=5).p_value == pytest.approx(2 / 32)
    with pytest.raises(ValueError, match="min_nonzero_pairs"):
        paired_wilcoxon(np.arange(1.0, 6.0), np.zeros(5), min_nonzero_pairs=0)
    with pytest.raises(ValueError, match="same cases"):
        paired_wilcoxon(np.arange(1.0, 6.0), np.zeros(4))


def test_compare_methods_tests_against_the_baseline():
    nested = random_scores()
    comparison = compare_methods(CaseScores.from_nested(nested), baseline="nnUNetTrainer_CE", n_resamples=100)
    base = comparison.methods.index("nnUNetTrainer_CE")
    assert set(comparison.p_note[base]) == {"baseline"}
    m, k = comparison.methods.index("MbLS_m10"), comparison.column("hd95/tumor")
    pairs = [(nested["MbLS_m10"][case]["hd95/tumor"], nested["nnUNetTrainer_CE"][case]["hd95/tumor"])
             for case in nested["MbLS_m10"]]
    pairs = [(a, b) for a, b in pairs if not (math.isnan(a) or math.isnan(b))]
    reference = scipy.stats.wilcoxon(*zip(*pairs))
    assert comparison.p_value[m, k] == reference.pvalue and comparison.num_pairs[m, k] == len(pairs)
    without = compare_methods(CaseScores.from_nested(nested), n_resamples=100)
    assert np.isnan(without.p_value).all() and set(without.p_note.ravel()) == {"no baseline"}
    with pytest.raises(ValueError, match="no baseline"):
        markdown_table(without, cell="p_value")


# --- rendering ------------------------------------------------------------------------------------------------------

def test_markdown_table_and_report():
    comparison = compare_methods(CaseScores.from_nested(hand_scores()), baseline="A", n_resamples=100)
    table = markdown_table(comparison)
    lines = table.splitlines()
    assert lines[0] == "| method | sum of ranks | DSC ↑ | HD95 ↓ | ECE ↓ |"
    assert lines[2] == "| C | 5 | 0.7000 ± 0.0000 | **2.0000 ± 0.0000** | **0.0500 ± 0.0000** |"
    assert lines[3].startswith("| B | 6.5 | **0.9000 ± 0.0000** | 5.0000 ± 0.0000 | 0.1500 ± 0.0707 |")
    assert len(lines) == 5

    ci_lines = markdown_table(comparison, cell="mean_ci", digits=2).splitlines()
    assert ci_lines[2] == "| C | 5 | 0.70 [0.70, 0.70] | **2.00 [2.00, 2.00]** | **0.05 [0.05, 0.05]** |"
    p_table = markdown_table(comparison, cell="p_value")
    assert "| A | 6.5 | baseline | baseline | baseline |" in p_table
    assert "- C, dice: only 2 nonzero paired differences (at least 6 needed)" in p_table
    assert "- B, hd95: only 2 nonzero paired differences" in p_table  # 5 - 4 and 5 - 6

    report = markdown_report(comparison)
    assert "sum of their ranks over DSC, HD95, ECE" in report and "95% percentile-bootstrap" in report
    assert "Wilcoxon signed-rank test against A" in report
    assert "Per class" not in report  # no per-class metrics


def test_markdown_per_class_table_and_escaping():
    comparison = compare_methods(CaseScores.from_nested(random_scores()), n_resamples=100)
    report = markdown_report(comparison)
    assert "| method | sum of ranks | DSC (liver) ↑ | HD95 (tumor) ↓ |" in report
    assert r"| R&D \| test |" in report
    assert "Wilcoxon" not in report
    per_class = markdown_table(comparison, comparison.per_class_metrics)
    assert per_class.count("**") == 4  # one best per column


def test_latex_table_escapes_and_marks_the_best():
    comparison = compare_methods(CaseScores.from_nested(random_scores()), baseline="nnUNetTrainer_CE",
                                 n_resamples=100)
    table = latex_table(comparison)
    lines = table.splitlines()
    assert lines[:2] == [r"\begin{tabular}{lrcccc}", r"\toprule"]
    assert lines[2] == (r"Method & Sum of ranks & DSC $\uparrow$ & HD95 $\downarrow$ & ECE $\downarrow$ & "
                        r"CECE $\downarrow$ \\")
    assert lines[3] == r"\midrule" and lines[-2:] == [r"\bottomrule", r"\end{tabular}"]
    body = lines[4:-2]
    assert len(body) == 4 and all(line.endswith(r" \\") for line in body)
    assert all(len(re.findall(r"(?<!\\)&", line)) == 5 for line in body)  # unescaped column separators
    names = [line.split(" & ")[0] for line in body]
    assert sorted(names) == sorted([r"nnUNetTrainer\_CE", r"MbLS\_m10", r"Focal 50\%", r"R\&D | test"])
    assert table.count(r"\textbf{") == 4
    k = comparison.column("dice")
    best = int(np.nanargmax(comparison.mean[:, k]))
    assert rf"\textbf{{{comparison.mean[best, k]:.3f} $\pm$ {comparison.std[best, k]:.3f}}}" in body[best]

    p_table = latex_table(comparison, cell="p_value", metrics=["hd95", "hd95/tumor"])
    assert r"HD95 $\downarrow$ & HD95 (tumor) $\downarrow$ \\" in p_table and r"\textbf" not in p_table
    for line in p_table.splitlines()[4:-2]:
        method = comparison.methods.index(next(name for name in comparison.methods
                                                if line.startswith(latex_escape(name) + " & ")))
        expected = []
        for k in (comparison.column("hd95"), comparison.column("hd95/tumor")):
            p = comparison.p_value[method, k]
            expected.append("baseline" if comparison.p_note[method, k] == "baseline" else
                            "$<$0.001" if p < 0.001 else f"{p:.3f}")
        assert line.endswith(" & " + " & ".join(expected) + r" \\")
    assert "$<$0.001" in p_table  # hd95 differs by 1 to 3 per method, with noise 1, over 30 cases
    with pytest.raises(ValueError, match="'asd' is not in the comparison"):
        latex_table(comparison, metrics=["asd"])


def test_latex_escape():
    assert latex_escape(r"a_b 5% R&D #1 $x {y} ~ ^ \ ") == (
        r"a\_b 5\% R\&D \#1 \$x \{y\} \textasciitilde{} \textasciicircum{} \textbackslash{} ")


def test_csv_table_round_trips_the_numbers():
    comparison = compare_methods(CaseScores.from_nested(random_scores()), baseline="MbLS_m10", n_resamples=100)
    rows = list(csv.DictReader(io.StringIO(csv_table(comparison))))
    assert [row["method"] for row in rows] == list(comparison.methods)
    assert list(rows[0])[:4] == ["method", "rank_sum", "dice_n", "dice_mean"]
    for m, row in enumerate(rows):
        assert float(row["rank_sum"]) == comparison.rank_sum[m]
        for k, metric in enumerate(comparison.metrics):
            assert int(row[f"{metric}_n"]) == comparison.num_cases[m, k]
            for field, array in (("mean", comparison.mean), ("std", comparison.std), ("ci_low", comparison.ci_low),
                                 ("ci_high", comparison.ci_high), ("rank", comparison.rank),
                                 ("p_value", comparison.p_value)):
                text = row[f"{metric}_{field}"]
                assert (text == "") if math.isnan(array[m, k]) else (float(text) == array[m, k])
            assert row[f"{metric}_p_note"] == comparison.p_note[m, k]
    assert rows[comparison.methods.index("MbLS_m10")]["dice_p_note"] == "baseline"
    only_dice = csv_table(comparison, metrics=["dice"]).splitlines()[0]
    assert only_dice == "method,rank_sum," + ",".join(
        f"dice_{field}" for field in ("n", "mean", "std", "ci_low", "ci_high", "rank", "p_value", "n_pairs", "p_note"))


# --- figure ---------------------------------------------------------------------------------------------------------

def pooled(seed: int, scale: float) -> CalibrationStats:
    generator = torch.Generator().manual_seed(seed)
    probabilities = torch.softmax(torch.randn(3, 2000, generator=generator) * scale, dim=0)
    labels = torch.randint(0, 3, (2000,), generator=generator)
    return CalibrationStats(3).update(probabilities, labels)


def test_plot_comparison_writes_a_png(tmp_path):
    comparison = compare_methods(CaseScores.from_nested(random_scores()), n_resamples=200)
    path = tmp_path / "out" / "compare.png"
    stats = {method: pooled(seed, 1.0 + seed) for seed, method in enumerate(comparison.methods[:3])}
    plot_comparison(comparison, path, pooled_stats=stats)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in path.parent.iterdir()] == ["compare.png"]  # no temporary file left
    plot_comparison(comparison, tmp_path / "no_stats.png", x_metric="hd95", y_metric="classwise_ece")
    assert (tmp_path / "no_stats.png").stat().st_size > 0
    dollar = compare_methods(CaseScores.from_nested({r"m$\notacommand$": random_scores()["MbLS_m10"]}),
                             n_resamples=10)
    plot_comparison(dollar, tmp_path / "dollar.png", pooled_stats={r"m$\notacommand$": pooled(1, 1.0)})
    with pytest.raises(ValueError, match="not methods of the comparison"):
        plot_comparison(comparison, path, pooled_stats={"other": pooled(0, 1.0)})
    with pytest.raises(ValueError, match="'asd' is not in the comparison"):
        plot_comparison(comparison, path, x_metric="asd")
