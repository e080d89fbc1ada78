"""Failure detection (docs/methods.md 8): AURC, E-AURC and the failure AUROC against hand-computed values on fixed
numbers, scipy.stats.mannwhitneyu and direct computations (tests/failure_checks.py); their bootstrap; the comparison
of methods and its tables; and the failure-detection section of `nnunet-margin calibration` and `compare` on
hand-made prediction folders with the scores of `nnunet-margin predict` (end to end: tests/test_predict_e2e.py)."""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.stats import mannwhitneyu

from failure_checks import (aurc_by_orderings, auroc_by_pairs, confidences, excess_aurc_by_orderings,
                            mean_foreground_dice)
from nnunet_margin import cli
from nnunet_margin.comparison import (FailureScores, compare_failure_detection, failure_csv, failure_report,
                                     failure_table)
from nnunet_margin.comparison.failure_comparison import bootstrap_failure_metrics
from nnunet_margin.comparison.failure_detection import (aurc, case_risk, check_failure_dice, confidence_from_score,
                                                        excess_aurc, failure_auroc, optimal_aurc, plot_risk_coverage,
                                                        resample_counts, resampled_auroc, resampled_aurc,
                                                        risk_coverage_curve)
from nnunet_margin.nnunet.calibration_report import summary_lines
from nnunet_margin.nnunet.prediction_folder import calibrate_prediction_folder
from test_calibration_report import IGNORE, strict_json, write_prediction_folder

CONFIDENCE = [0.9, 0.8, 0.7, 0.6]
RISK = [0.1, 0.4, 0.2, 0.5]


def test_aurc_and_excess_aurc_by_hand():
    coverage, selective = risk_coverage_curve(CONFIDENCE, RISK)
    np.testing.assert_allclose(coverage, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(selective, [0.1, 0.25, 0.7 / 3, 0.3])
    assert aurc(CONFIDENCE, RISK) == pytest.approx((0.1 + 0.25 + 0.7 / 3 + 0.3) / 4)  # 0.2208333
    # best ranking: risks 0.1, 0.2, 0.4, 0.5 -> selective risks 0.1, 0.15, 0.7 / 3, 0.3
    assert optimal_aurc(RISK) == pytest.approx((0.1 + 0.15 + 0.7 / 3 + 0.3) / 4)  # 0.1958333
    assert excess_aurc(CONFIDENCE, RISK) == pytest.approx(0.025)


def test_a_perfect_ranking_has_zero_excess_aurc_and_the_worst_the_largest():
    risk = np.random.default_rng(1).uniform(0, 1, 30)
    assert excess_aurc(-risk, risk) == 0.0
    assert excess_aurc(1 - risk, risk) == 0.0  # any decreasing function of the risk
    random_rankings = [excess_aurc(np.random.default_rng(seed).uniform(size=30), risk) for seed in range(100, 120)]
    assert min(random_rankings) > 0 and excess_aurc(risk, risk) > max(random_rankings)  # riskiest first: the worst


def test_tied_confidences_give_the_mean_over_their_orderings():
    confidence = np.array([0.9, 0.5, 0.5, 0.5, 0.1])
    risk = np.array([0.0, 0.2, 0.9, 0.4, 1.0])
    expected = np.mean([aurc(confidence + 1e-6 * np.array([0, *order, 0]), risk)
                        for order in itertools.permutations([3, 2, 1])], axis=0)
    assert aurc(confidence, risk) == pytest.approx(expected) == pytest.approx(aurc_by_orderings(confidence, risk))
    # all cases tied: every coverage has the overall mean risk
    np.testing.assert_allclose(risk_coverage_curve(np.zeros(5), risk)[1], risk.mean())


def test_failure_auroc_equals_mann_whitney_u_and_a_hand_value():
    dice = 1 - np.array(RISK)  # 0.9, 0.6, 0.8, 0.5
    # failed (Dice < 0.65): cases 2 and 4, uncertainties -0.8, -0.6 against -0.9, -0.7: 3 of 4 pairs ranked right
    assert failure_auroc(CONFIDENCE, dice, 0.65) == pytest.approx(0.75)
    rng = np.random.default_rng(2)
    confidence = np.round(rng.uniform(size=40), 1)  # with ties
    dice = rng.uniform(size=40)
    failed = dice < 0.5
    u = mannwhitneyu(-confidence[failed], -confidence[~failed]).statistic
    assert failure_auroc(confidence, dice) == pytest.approx(u / (failed.sum() * (~failed).sum()))
    assert math.isnan(failure_auroc(confidence, np.ones(40)))  # no failure to detect
    assert math.isnan(failure_auroc(confidence, np.zeros(40)))  # no success to tell apart


def test_case_risk_and_input_checks(tmp_path):
    assert case_risk([0.8, float("nan"), 0.6]) == pytest.approx(0.3)
    assert case_risk([float("nan")]) == 0.0
    with pytest.raises(ValueError, match="finite"):
        aurc([0.5, float("nan")], [0.1, 0.2])
    with pytest.raises(ValueError, match="one value per case"):
        aurc([0.5], [0.1, 0.2])
    for threshold in (0, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"--failure-dice\) must be a Dice in \(0, 1\]"):
            check_failure_dice(threshold)
    path = tmp_path / "risk_coverage.png"
    plot_risk_coverage({"pairwise Dice": CONFIDENCE, "entropy": [-0.1, -0.3, -0.2, -0.4]}, RISK, path)
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_undefined_scores_are_the_least_confident_and_tied():
    np.testing.assert_array_equal(confidence_from_score([0.2, None, 0.5, math.nan], "higher"),
                                  [-0.2, -1.5, -0.5, -1.5])
    np.testing.assert_allclose(confidence_from_score([0.9, None, 0.7], "lower"), [0.9, 0.7 - 1, 0.7])
    np.testing.assert_array_equal(confidence_from_score([None, None], "lower"), [0.0, 0.0])
    with pytest.raises(ValueError, match="failure_when must be one of"):
        confidence_from_score([0.1], "up")


def test_resampled_metrics_equal_those_of_the_explicitly_resampled_cases():
    rng = np.random.default_rng(3)
    confidence, dice = np.round(rng.normal(size=30), 1), np.round(rng.uniform(size=30), 2)  # ties in both
    index = np.random.default_rng(0).integers(0, 30, (40, 30))
    counts = resample_counts(np.random.default_rng(0), 30, 40)
    np.testing.assert_array_equal(counts, [np.bincount(row, minlength=30) for row in index])
    np.testing.assert_allclose(resampled_aurc(confidence, 1 - dice, counts),
                               [aurc(confidence[row], 1 - dice[row]) for row in index], rtol=0, atol=1e-14)
    failed = dice < 0.5
    failed_index, successful_index = (np.random.default_rng(seed).integers(0, size, (40, size))
                                      for seed, size in ((1, failed.sum()), (2, (~failed).sum())))
    expected = [failure_auroc(np.r_[confidence[failed][f], confidence[~failed][s]],
                              np.r_[dice[failed][f], dice[~failed][s]]) for f, s in zip(failed_index, successful_index)]
    np.testing.assert_allclose(resampled_auroc(-confidence[failed], -confidence[~failed],
                                               resample_counts(np.random.default_rng(1), failed.sum(), 40),
                                               resample_counts(np.random.default_rng(2), (~failed).sum(), 40)),
                               expected, rtol=0, atol=1e-14)
    resampled = bootstrap_failure_metrics(confidence, dice, 0.5, 300)
    np.testing.assert_allclose(resampled["e_aurc"], resampled["aurc"] - resampled_aurc(
        -(1 - dice), 1 - dice, resample_counts(np.random.default_rng(0), 30, 300)), atol=1e-14)
    assert (resampled["e_aurc"] >= -1e-12).all() and np.isfinite(resampled["auroc"]).all()
    assert np.isnan(bootstrap_failure_metrics(confidence, np.ones(30), 0.5, 10)["auroc"]).all()


# --- methods compared, on fixed numbers -----------------------------------------------------------------------

DICE = {"c1": 0.9, "c2": 0.6, "c3": 0.8, "c4": 0.4}  # risks 0.1, 0.4, 0.2, 0.6; c4 failed (< 0.5)
# A: pairwise Dice ranks c1 c2 c3 c4: selective risks 0.1, 0.25, 0.7 / 3, 0.325; the entropy ranks c1 c3 c2 c4
#    (c4 undefined: least confident), the best ranking: 0.1, 0.15, 0.7 / 3, 0.325.
# B (one member, no pairwise Dice): entropy ranks {c2, c3} tied, c4, c1: 0.3, 0.3, 0.4, 0.325; AUROC: c4's entropy
#    0.2 above c2's and c3's 0.1, below c1's 0.4: 2 of 3 pairs.
METHOD_A = FailureScores(0.5, DICE, {"pairwise_dice": dict(zip(DICE, [0.9, 0.8, 0.7, 0.6])),
                                     "entropy_foreground": dict(zip(DICE, [0.1, 0.3, 0.2, None]))},
                         {"pairwise_dice": "lower", "entropy_foreground": "higher"})
METHOD_B = FailureScores(0.5, DICE, {"entropy_foreground": dict(zip(DICE, [0.4, 0.1, 0.1, 0.2]))},
                         {"entropy_foreground": "higher"})
BEST = (0.1 + 0.15 + 0.7 / 3 + 0.325) / 4
EXPECTED = {  # (method, score): (AURC, E-AURC, AUROC)
    ("A", "pairwise_dice"): ((0.1 + 0.25 + 0.7 / 3 + 0.325) / 4, 0.025, 1.0),
    ("A", "entropy_foreground"): (BEST, 0.0, 1.0),
    ("B", "entropy_foreground"): ((0.3 + 0.3 + 0.4 + 0.325) / 4, (0.3 + 0.3 + 0.4 + 0.325) / 4 - BEST, 2 / 3),
}


def test_methods_compared_by_hand():
    comparison = compare_failure_detection({"B": METHOD_B, "A": METHOD_A, "C": None}, n_resamples=0)
    assert comparison.methods == ("B", "A", "C") and comparison.scores == ("entropy_foreground", "pairwise_dice")
    for (method, score), expected in EXPECTED.items():
        m, s = comparison.methods.index(method), comparison.scores.index(score)
        assert [comparison.value[metric][m, s] for metric in ("aurc", "e_aurc", "auroc")] == pytest.approx(expected)
    # the hand values are the definitions' (every ordering, every pair)
    for method, scores in (("A", METHOD_A), ("B", METHOD_B)):
        for score, values in scores.values.items():
            confidence = confidences(list(values.values()), scores.failure_when[score])
            risk = [1 - dice for dice in DICE.values()]
            assert EXPECTED[method, score] == pytest.approx((
                aurc_by_orderings(confidence, risk), excess_aurc_by_orderings(confidence, risk),
                auroc_by_pairs(confidence, list(DICE.values()), 0.5)))
    entropy, pairwise = 0, 1
    np.testing.assert_array_equal(comparison.rank["aurc"][:, entropy], [2, 1, math.nan])
    np.testing.assert_array_equal(comparison.rank["auroc"][:, entropy], [2, 1, math.nan])
    np.testing.assert_array_equal(comparison.rank["aurc"][:, pairwise], [math.nan, 1, math.nan])
    assert comparison.order("entropy_foreground") == [1, 0, 2] and comparison.order("pairwise_dice") == [1, 0, 2]
    assert comparison.num_cases.tolist() == [4, 4, 0] and comparison.num_failed.tolist() == [1, 1, 0]
    assert np.isnan(comparison.ci_low["aurc"]).all()  # no resamples, no intervals


def test_intervals_are_the_percentiles_of_the_resampled_metrics_whatever_the_other_methods():
    alone = compare_failure_detection({"A": METHOD_A}, n_resamples=500, seed=4)
    both = compare_failure_detection({"B": METHOD_B, "A": METHOD_A}, n_resamples=500, seed=4)
    confidence = confidences([0.9, 0.8, 0.7, 0.6], "lower")
    resampled = bootstrap_failure_metrics(confidence, np.array(list(DICE.values())), 0.5, 500, seed=4)
    for metric, samples in resampled.items():
        low, high = np.quantile(samples, [0.025, 0.975])
        pairwise = alone.scores.index("pairwise_dice")
        assert (alone.ci_low[metric][0, pairwise], alone.ci_high[metric][0, pairwise]) == (low, high)
        assert both.ci_low[metric][1, both.scores.index("pairwise_dice")] == low
    assert both.ci_low["aurc"][0, 0] < both.value["aurc"][0, 0] < both.ci_high["aurc"][0, 0]


def test_the_tables_show_values_ranks_and_why_a_cell_is_na():
    comparison = compare_failure_detection({"B": METHOD_B, "A": METHOD_A, "C": None}, n_resamples=200)
    printed = failure_table(comparison)
    lines = printed.splitlines()
    assert lines[0] == "| score | method | AURC ↓ | E-AURC ↓ | AUROC ↑ |"
    assert lines[2] == "| entropy_foreground | A | **0.2021 (1)** | **0.0000 (1)** | **1.0000 (1)** |"
    assert lines[3] == "| entropy_foreground | B | 0.3312 (2) | 0.1292 (2) | 0.6667 (2) |"
    assert lines[4] == "| entropy_foreground | C | n/a | n/a | n/a |"
    assert lines[6] == "| pairwise_dice | B | n/a | n/a | n/a |"
    assert "- B: no pairwise_dice" in printed and "- C: no confidence scores" in printed
    report = failure_report(comparison)
    assert "### entropy_foreground (higher = more likely failed)" in report
    assert "### pairwise_dice (lower = more likely failed)" in report
    m, s = 1, comparison.scores.index("pairwise_dice")
    assert (f"| A | 4 | 1 | **0.2271 [{comparison.ci_low['aurc'][m, s]:.4f}, {comparison.ci_high['aurc'][m, s]:.4f}]"
            f" (1)** |") in report
    assert "| C | n/a | n/a | n/a | n/a | n/a |" in report
    rows = list(csv.DictReader(io.StringIO(failure_csv(comparison))))
    assert [(row["score"], row["method"]) for row in rows] == [
        ("entropy_foreground", "A"), ("entropy_foreground", "B"), ("entropy_foreground", "C"),
        ("pairwise_dice", "A"), ("pairwise_dice", "B"), ("pairwise_dice", "C")]
    for row in rows:
        expected = EXPECTED.get((row["method"], row["score"]))
        if expected is None:
            assert row["aurc_value"] == row["auroc_value"] == row["aurc_rank"] == ""
            continue
        assert [float(row[f"{metric}_value"]) for metric in ("aurc", "e_aurc", "auroc")] == pytest.approx(expected)
        assert float(row["aurc_ci_low"]) <= float(row["aurc_ci_high"]) and row["failure_dice"] == "0.5"
    no_failure = FailureScores(0.5, {case: 0.9 for case in DICE}, METHOD_B.values, METHOD_B.failure_when)
    undefined = compare_failure_detection({"B": no_failure})
    assert np.isnan(undefined.value["auroc"]).all() and np.isnan(undefined.ci_low["auroc"]).all()
    assert "- B: AUROC undefined, no case has a mean foreground Dice below 0.5" in failure_table(undefined)


def test_methods_that_cannot_be_compared_are_refused():
    with pytest.raises(ValueError, match="on the same cases, but B and A differ: B without c4"):
        compare_failure_detection({"A": METHOD_A, "B": METHOD_B.restricted({"c1", "c2", "c3"})})
    other_threshold = FailureScores(0.7, DICE, METHOD_B.values, METHOD_B.failure_when)
    with pytest.raises(ValueError, match="one --failure-dice"):
        compare_failure_detection({"A": METHOD_A, "B": other_threshold})
    with pytest.raises(ValueError, match="no method has failure-detection scores"):
        compare_failure_detection({"A": None})
    with pytest.raises(ValueError, match="other cases than the Dice: without c4"):
        FailureScores(0.5, DICE, {"s": {"c1": 1.0, "c2": 1.0, "c3": 1.0}}, {"s": "lower"})
    with pytest.raises(ValueError, match="one mean foreground Dice in"):
        FailureScores(0.5, {"c1": 1.5}, {}, {})
    combined = FailureScores.combined([METHOD_A.restricted({"c1", "c2"}), METHOD_A.restricted({"c3", "c4"})])
    assert combined == METHOD_A
    assert set(FailureScores.combined([METHOD_A, METHOD_B]).values) == {"entropy_foreground"}


# --- `nnunet-margin calibration` and `compare` of prediction folders with scores ------------------------------

CASES = ("case_000", "case_001", "case_002", "case_003")


@pytest.fixture(scope="module")
def scored(tmp_path_factory) -> dict:
    """A prediction folder as `nnunet-margin predict --save_probabilities` writes it (npz, pkl, segmentations,
    uncertainty.json), its ground truth, and each case's mean foreground Dice computed directly."""
    root = tmp_path_factory.mktemp("scored")
    data = write_prediction_folder(root / "pred", root / "gt", CASES)
    dice, scores = {}, {}
    for index, (case, (probabilities, gt)) in enumerate(data.items()):
        segmentation = probabilities.argmax(0).astype(np.uint8)
        sitk.WriteImage(sitk.GetImageFromArray(segmentation), str(root / "pred" / f"{case}.nii.gz"))
        dice[case] = mean_foreground_dice(segmentation, gt, (1, 2), IGNORE)
        scores[case] = {"members": 2, "entropy_foreground": [0.3, 0.1, 0.2, 0.1][index],
                        "entropy_boundary": [0.2, None, 0.4, 0.1][index], "pairwise_dice": [0.7, 0.9, 0.8, 0.6][index],
                        "volume_ml_organ": 1.0}
    (root / "pred" / "uncertainty.json").write_text(json.dumps({"members": ["fold_0", "fold_1"], "cases": scores}))
    (root / "pred" / "uncertainty.csv").write_text("case\n")
    return {"root": root, "dice": dice, "scores": scores}


def copy_of(scored: dict, folder: Path) -> Path:
    shutil.copytree(scored["root"] / "pred", folder)
    return folder


def test_calibration_relates_each_score_to_the_cases_dice(scored, tmp_path):
    threshold = float(np.median(list(scored["dice"].values())))  # two cases fail
    report = calibrate_prediction_folder(scored["root"] / "pred", scored["root"] / "gt", tmp_path,
                                         failure_dice=threshold)
    assert strict_json(tmp_path / "calibration.json") == json.loads(json.dumps(report))
    section = report["failure_detection"]
    assert section["dice"] == pytest.approx(scored["dice"])
    assert (section["num_cases"], section["num_failed"], section["failure_dice"]) == (4, 2, threshold)
    assert list(section["scores"]) == ["pairwise_dice", "entropy_foreground", "entropy_boundary"]  # no volumes
    dice = [scored["dice"][case] for case in CASES]
    risk = [1 - value for value in dice]
    for name, entry in section["scores"].items():
        values = [scored["scores"][case][name] for case in CASES]
        assert entry["values"] == dict(zip(CASES, values))
        confidence = confidences(values, entry["failure_when"])
        assert entry["aurc"] == pytest.approx(aurc_by_orderings(confidence, risk))
        assert entry["e_aurc"] == pytest.approx(excess_aurc_by_orderings(confidence, risk))
        assert entry["auroc"] == pytest.approx(auroc_by_pairs(confidence, dice, threshold))
    assert section["optimal_aurc"] == pytest.approx(aurc_by_orderings(np.negative(risk), risk))
    assert report["coverage"]["failure_detection"] == list(CASES)
    assert (tmp_path / "risk_coverage.png").read_bytes()[:4] == b"\x89PNG"
    lines = summary_lines(report)
    assert lines[-4].startswith(f"failure detection (4 cases, 2 failed: mean foreground Dice < {threshold:g}")
    pairwise = section["scores"]["pairwise_dice"]
    assert lines[-3] == (f"  pairwise_dice (lower = more likely failed): AURC {pairwise['aurc']:.4f}, "
                         f"E-AURC {pairwise['e_aurc']:.4f}, AUROC {pairwise['auroc']:.4f}")


def test_an_undefined_auroc_is_null_and_says_why(scored, tmp_path, capsys):
    assert cli.main(["calibration", str(scored["root"] / "pred"), str(scored["root"] / "gt"), "-o", str(tmp_path),
                     "--failure-dice", "0.01"]) == 0
    out = capsys.readouterr().out
    assert "AUROC n/a: no case has a mean foreground Dice below 0.01, so there is no failure to detect" in out
    assert f"{tmp_path / 'reliability.png'} and {tmp_path / 'risk_coverage.png'}" in out
    section = strict_json(tmp_path / "calibration.json")["failure_detection"]
    assert all(entry["auroc"] is None for entry in section["scores"].values())
    assert section["auroc_undefined"].startswith("no case has a mean foreground Dice below 0.01")


def _drop_probabilities(folder: Path) -> str:  # a case predicted without probabilities (--allow-missing below)
    (folder / "case_001.npz").unlink()
    return "1 scored case(s) have no probabilities to evaluate (case_001: predicted without --save_probabilities?)"


def _add_unscored_case(folder: Path) -> str:
    scores = json.loads((folder / "uncertainty.json").read_text())
    del scores["cases"]["case_002"]
    (folder / "uncertainty.json").write_text(json.dumps(scores))
    return "1 evaluated case(s) have no scores (case_002: predicted into the folder by another command?)"


def _drop_segmentation(folder: Path) -> str:
    (folder / "case_003.nii.gz").unlink()
    return "needs each scored case's segmentation for its Dice, but case_003 in"


def _drop_json(folder: Path) -> str:
    (folder / "uncertainty.json").unlink()
    return "uncertainty.csv has no uncertainty.json beside it"


def _corrupt_json(folder: Path) -> str:
    (folder / "uncertainty.json").write_text('{"cases": {"case_000": {"entropy_foreground": "high"}}}')
    return "is not the scores file of `nnunet-margin predict`"


@pytest.mark.parametrize("break_folder", [_drop_probabilities, _add_unscored_case, _drop_segmentation, _drop_json,
                                          _corrupt_json])
def test_scores_that_do_not_fit_the_evaluated_cases_are_refused_before_evaluating(scored, tmp_path, capsys,
                                                                                   break_folder):
    folder = copy_of(scored, tmp_path / "pred")
    message = break_folder(folder)
    assert cli.main(["calibration", str(folder), str(scored["root"] / "gt"), "--allow-missing"]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") <= 2, error
    assert not (folder / "calibration.json").exists()


def test_a_failure_threshold_outside_0_1_is_refused(scored, tmp_path, capsys):
    assert cli.main(["calibration", str(scored["root"] / "pred"), str(scored["root"] / "gt"), "-o", str(tmp_path),
                     "--failure-dice", "50"]) == 2
    assert "must be a Dice in (0, 1], got 50.0" in capsys.readouterr().err
    assert not (tmp_path / "calibration.json").exists()


@pytest.fixture(scope="module")
def reports(scored, tmp_path_factory) -> dict[str, Path]:
    """calibration.json of: the scored folder; the same without pairwise Dice (one member) and without case_003;
    the folder without scores (nnUNetv2_predict's), into a folder with the risk_coverage.png of an earlier report."""
    root = tmp_path_factory.mktemp("reports")
    one_member = copy_of(scored, root / "predictions" / "one_member")
    record = json.loads((one_member / "uncertainty.json").read_text())
    for case, values in record["cases"].items():
        del values["pairwise_dice"]
        values["entropy_foreground"] = 0.5 - values["entropy_foreground"]
        if case == "case_003":
            for suffix in (".npz", ".pkl", ".nii.gz"):
                (one_member / f"{case}{suffix}").unlink()
    del record["cases"]["case_003"]
    (one_member / "uncertainty.json").write_text(json.dumps(record))
    plain = copy_of(scored, root / "predictions" / "plain")
    (plain / "uncertainty.json").unlink()
    (plain / "uncertainty.csv").unlink()
    folders = {"ensemble": scored["root"] / "pred", "one_member": one_member, "plain": plain}
    (root / "plain").mkdir()
    (root / "plain" / "risk_coverage.png").write_bytes(b"of an earlier report")
    for name, folder in folders.items():
        calibrate_prediction_folder(folder, scored["root"] / "gt", root / name, allow_missing=True)
    return {name: root / name for name in folders}


def test_a_folder_without_scores_is_reported_as_before(reports):
    report = strict_json(reports["plain"] / "calibration.json")
    assert "failure_detection" not in report and "failure_detection" not in report["coverage"]
    assert not (reports["plain"] / "risk_coverage.png").exists()  # the earlier report's is removed
    assert not [line for line in summary_lines(report) if "failure" in line]


def test_compare_ranks_the_methods_by_failure_detection_too(reports, tmp_path, capsys):
    one_member = reports["one_member"]
    shutil.copytree(one_member, tmp_path / "one_member")
    assert cli.main(["compare", f"ensemble={reports['ensemble']}", f"plain={reports['plain']}",
                     f"one={tmp_path / 'one_member'}", "-o", str(tmp_path / "out"), "--common-cases"]) == 0
    out = capsys.readouterr().out
    assert "Failure detection (risk = 1 - mean foreground Dice; failed: Dice < 0.5; rank in parentheses):" in out
    assert "- plain: no confidence scores" in out and "- one: no pairwise_dice" in out
    assert "and failure_detection.csv into" in out
    report = (tmp_path / "out" / "report.md").read_text()
    assert report.index("## Failure detection") < report.index("Sources:")
    assert "### pairwise_dice (lower = more likely failed)" in report
    rows = {(row["score"], row["method"]): row
            for row in csv.DictReader(io.StringIO((tmp_path / "out" / "failure_detection.csv").read_text()))}
    # --common-cases: the ensemble's failure detection on the three cases all methods have, recomputed
    section = strict_json(reports["ensemble"] / "calibration.json")["failure_detection"]
    kept = CASES[:3]
    risk = [1 - section["dice"][case] for case in kept]
    for name, entry in section["scores"].items():
        confidence = confidences([entry["values"][case] for case in kept], entry["failure_when"])
        assert float(rows[name, "ensemble"]["aurc_value"]) == pytest.approx(aurc_by_orderings(confidence, risk))
        assert rows[name, "ensemble"]["n_cases"] == "3" and rows[name, "plain"]["n_cases"] == "0"
        assert rows[name, "plain"]["aurc_value"] == ""
    assert rows["pairwise_dice", "one"]["aurc_value"] == "" and rows["entropy_foreground", "one"]["aurc_value"]
    # without scores in any method, no section and no CSV (a stale one is removed)
    assert cli.main(["compare", f"plain={reports['plain']}", "-o", str(tmp_path / "out")]) == 0
    assert "Failure detection" not in capsys.readouterr().out
    assert not (tmp_path / "out" / "failure_detection.csv").exists()
    assert "## Failure detection" not in (tmp_path / "out" / "report.md").read_text()


def test_compare_refuses_a_malformed_section_and_different_thresholds(reports, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(reports["ensemble"], broken)
    report = json.loads((broken / "calibration.json").read_text())
    report["failure_detection"]["scores"]["pairwise_dice"]["failure_when"] = "up"
    (broken / "calibration.json").write_text(json.dumps(report))
    assert cli.main(["compare", f"a={broken}", f"b={reports['plain']}"]) == 2
    error = capsys.readouterr().err
    assert f"{broken / 'calibration.json'} is not a readable calibration report: its failure_detection section is " \
           f"invalid" in error and "failure_when 'higher' or 'lower'" in error
    report["failure_detection"]["scores"]["pairwise_dice"]["failure_when"] = "lower"
    report["failure_detection"]["failure_dice"] = 0.9
    (broken / "calibration.json").write_text(json.dumps(report))
    assert cli.main(["compare", f"a={reports['ensemble']}", f"b={broken}"]) == 2
    assert "rerun `nnunet-margin calibration` with one --failure-dice" in capsys.readouterr().err
