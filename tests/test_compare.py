"""`nnunet-margin compare` on calibration reports: per-case scores from calibration.json, the papers' table, the
report files, the command line, wrong-typed reports, and methods evaluated on different cases (on reports of real
nnUNetv2_predict output)."""

from __future__ import annotations

import csv
import io
import json
import math
import shutil

import numpy as np
import pytest

from nnunet_margin import cli
from nnunet_margin.calibration import CalibrationStats
from nnunet_margin.nnunet.prediction_folder import write_calibration_report
from nnunet_margin.nnunet.compare_reports import case_scores, compare, load_method, method_name

CLASS_NAMES = ["background", "organ", "lesion"]


def case_stats(seed: int, sharpness: float) -> dict[str, CalibrationStats]:
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, sharpness, (3, 400))
    labels = rng.integers(0, 3, 400)
    probabilities = np.exp(logits) / np.exp(logits).sum(0)
    return {scope: CalibrationStats(3).update(probabilities, labels, mask=mask)
            for scope, mask in (("foreground", labels != 0), ("crop", None), ("boundary", labels < 2))}


def write_method(folder, cases, sharpness, dice, folds=(0,)):
    """A model folder with one validation report per fold (cases split over the folds)."""
    for fold in folds:
        fold_cases = [case for index, case in enumerate(cases) if index % len(folds) == fold]
        per_case = {case: case_stats(int(case[-1]), sharpness) for case in fold_cases}
        segmentation = {case: {"dice": {"organ": dice + 0.01 * int(case[-1]), "lesion": float("nan")},
                               "hd95": {"organ": 3.0, "lesion": float("nan")},
                               "asd": {"organ": 1.0, "lesion": float("nan")}} for case in fold_cases}
        write_calibration_report(per_case, folder / f"fold_{fold}" / "validation", CLASS_NAMES,
                                 segmentation=segmentation)
    return folder


CASES = [f"case_00{i}" for i in range(8)]


def test_case_scores_flatten_every_scope_and_class(tmp_path):
    model = write_method(tmp_path / "nnUNetTrainerMbLS__nnUNetPlans__3d_fullres", CASES[:2], 2.0, 0.8)
    report = json.loads((model / "fold_0" / "validation" / "calibration.json").read_text())
    scores = case_scores(report)["case_001"]
    entry = report["metric_per_case"]["case_001"]
    assert scores["ece"] == entry["foreground"]["ece"] and scores["boundary_ace"] == entry["boundary"]["ace"]
    assert scores["crop_nll"] == entry["crop"]["nll"]
    assert scores["classwise_ece/lesion"] == entry["foreground"]["class_ece"][2]
    assert scores["dice/organ"] == pytest.approx(0.81) and scores["dice/lesion"] is None
    assert scores["dice"] == pytest.approx(0.81)  # the mean over the classes defined for the case
    assert method_name(model / "fold_0" / "validation") == "nnUNetTrainerMbLS"


def test_a_model_folder_pools_its_folds_and_names_repeated_cases(tmp_path):
    model = write_method(tmp_path / "T__P__C", CASES, 2.0, 0.8, folds=(0, 1))
    method = load_method(str(model))
    assert sorted(method.scores) == CASES and method.name == "T" and len(method.reports) == 2
    assert method.pooled.num_voxels == sum(case_stats(int(c[-1]), 2.0)["foreground"].num_voxels for c in CASES)
    write_method(tmp_path / "dup", CASES[:2], 2.0, 0.8)
    write_method(tmp_path / "dup" / "again", CASES[:2], 2.0, 0.8)
    with pytest.raises(ValueError, match="repeats case"):
        load_method(str(tmp_path / "dup" / "again" / ".."))


def test_compare_ranks_methods_and_writes_the_report_files(tmp_path, capsys):
    sharp = write_method(tmp_path / "sharp", CASES, 6.0, 0.9)  # confident random probabilities: worse ECE
    soft = write_method(tmp_path / "soft", CASES, 0.5, 0.7)
    comparison, _ = compare([f"sharp={sharp}", f"soft={soft}"], baseline="sharp")
    ece = comparison.column("ece")
    assert comparison.mean[comparison.methods.index("soft"), ece] < comparison.mean[comparison.methods.index("sharp"),
                                                                                    ece]
    assert "boundary_ece" in comparison.metrics and comparison.directions["boundary_ece"] == "lower"

    output = tmp_path / "out"
    assert cli.main(["compare", f"sharp={sharp}", f"soft={soft}", "--baseline", "sharp", "-o", str(output),
                     "--csv", str(tmp_path / "table.csv")]) == 0
    printed = capsys.readouterr().out
    assert "| method | sum of ranks |" in printed and "ECE" in printed and "wrote report.md" in printed
    for name in ("report.md", "table.csv", "table.tex", "compare.png"):
        assert (output / name).stat().st_size > 0, name
    rows = list(csv.DictReader(io.StringIO((tmp_path / "table.csv").read_text())))
    assert {row["method"] for row in rows} == {"sharp", "soft"}
    assert "Wilcoxon" in (output / "report.md").read_text() and "\\toprule" in (output / "table.tex").read_text()
    soft_row = next(row for row in rows if row["method"] == "soft")
    assert math.isfinite(float(soft_row["ece_p_value"]))


def test_compare_errors_name_the_problem(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli.main(["compare", str(tmp_path / "empty")]) == 2
    assert "no calibration.json" in capsys.readouterr().err
    model = write_method(tmp_path / "m", CASES[:2], 2.0, 0.8)
    (model / "fold_0" / "validation" / "calibration.json").write_text("{ truncated")
    assert cli.main(["compare", str(model)]) == 2
    error = capsys.readouterr().err
    assert "calibration.json is not a readable calibration report" in error and error.count("\n") <= 2
    write_method(tmp_path / "a", CASES[:2], 2.0, 0.8)
    assert cli.main(["compare", f"x={tmp_path / 'a'}", f"x={tmp_path / 'a'}"]) == 2
    assert "called the same" in capsys.readouterr().err


@pytest.mark.parametrize("content, problem", [
    ("[]", "it holds a JSON list, not an object"),
    ('{"class_names": ["a", "b"], "metric_per_case": []}', "'metric_per_case' is not an object of cases"),
    ('{"class_names": "ab", "metric_per_case": {}}', "'class_names' is not a list of class names"),
    ('{"class_names": ["a", "b"], "metric_per_case": {"c": {"foreground": {"ece": "low"}}}}',
     "case 'c': the foreground metrics are not numbers"),
    ('{"class_names": ["a", "b"], "metric_per_case": {"c": {"segmentation": {"dice": [0.5]}}}}',
     "case 'c': 'segmentation' is not {metric: {class: value}}"),
    ('{"class_names": ["a", "b"], "metric_per_case": {"c": {}}, "pooled_state": {"foreground": {"n_bins": 3}}}',
     "its pooled foreground statistics are invalid"),
])
def test_a_wrong_typed_report_is_named_with_what_is_wrong(tmp_path, capsys, content, problem):
    report = tmp_path / "m" / "calibration.json"
    report.parent.mkdir()
    report.write_text(content)
    assert cli.main(["compare", str(report.parent)]) == 2
    error = capsys.readouterr().err
    assert f"{report} is not a readable calibration report" in error and problem in error, error
    assert len(error.strip().splitlines()) <= 2 and "Traceback" not in error


@pytest.fixture(scope="module")
def real_reports(shared_test_predictions, shared_models, tmp_path_factory):
    """Calibration reports of the test set's real predictions: "all" of both cases, "one" without case_011's
    prediction (--allow-missing), "no_segmentation" without case_011's segmentation."""
    root = tmp_path_factory.mktemp("real_reports")
    labels = shared_models.nnunet.raw / "labelsTs"
    for name, removed, extra in (("all", [], []), ("one", ["case_011.npz", "case_011.pkl"], ["--allow-missing"]),
                                 ("no_segmentation", ["case_011.nii.gz"], [])):
        shutil.copytree(shared_test_predictions, root / name)
        for file in removed:
            (root / name / file).unlink()
        assert cli.main(["calibration", str(root / name), str(labels), *extra]) == 0
    return root


def test_methods_on_different_cases_are_refused_naming_methods_and_cases(real_reports, capsys):
    capsys.readouterr()
    assert cli.main(["compare", f"A={real_reports / 'all'}", f"B={real_reports / 'one'}"]) == 2
    error = capsys.readouterr().err
    assert "evaluated on different cases" in error and "B lacks case_011" in error and "--common-cases" in error
    assert cli.main(["compare", f"A={real_reports / 'all'}", f"C={real_reports / 'no_segmentation'}"]) == 2
    error = capsys.readouterr().err
    assert "cases with segmentation metrics (Dice, HD95, ASD): C lacks case_011" in error, error


def test_common_cases_restricts_every_method_and_says_so(real_reports, tmp_path, capsys):
    capsys.readouterr()
    arguments = ["compare", f"A={real_reports / 'all'}", f"B={real_reports / 'one'}",
                 f"C={real_reports / 'no_segmentation'}", "--common-cases", "-o", str(tmp_path / "out")]
    assert cli.main(arguments) == 0
    printed = capsys.readouterr().out
    comparison, methods = compare(arguments[1:4], common_cases=True)
    assert [method.left_out for method in methods] == [{"calibration": ["case_011"]}, {},
                                                       {"calibration": ["case_011"]}]
    assert (comparison.num_cases[:, comparison.column("ece")] == 1).all()  # case_010, the one every method has
    only_case = json.loads((real_reports / "all" / "calibration.json").read_text())["metric_per_case"]["case_010"]
    dice = [value for value in only_case["segmentation"]["dice"].values() if value is not None]
    assert comparison.mean[comparison.methods.index("A"), comparison.column("dice")] == pytest.approx(np.mean(dice))
    note = "Compared on the cases all methods have (--common-cases); left out: A: case_011 (cases)"
    assert note in printed and note in (tmp_path / "out" / "report.md").read_text()
