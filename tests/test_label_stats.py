"""Label statistics of the preprocessed dataset: counting rules, the cache (reuse, staleness, corruption, atomicity),
folds, and the offsets record's errors."""

import json
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_margin.losses import EmptyClassError
from nnunet_margin.nnunet import label_stats
from nnunet_margin.nnunet._seams import fold_cases
from nnunet_margin.nnunet.label_stats import (LabelSpec, cache_path, case_label_counts, count_labels, total_counts,
                                              user_cache_path)
from nnunet_margin.nnunet.margin_record import offsets_record

IDENTIFIER = "nnUNetPlans_3d_fullres"


@pytest.mark.parametrize("segmentation, labels, expected", [
    (np.array([[-1, 0, 1], [2, 2, -1]]), LabelSpec(3), [3, 1, 2]),  # -1 (outside the nonzero mask): background
    (np.array([0, 1, 3, 3, 1]), LabelSpec(3, ignore_label=3), [1, 2, 0]),  # the ignore label is left out
    (np.zeros((2, 2, 2), dtype=np.int16), LabelSpec(4), [8, 0, 0, 0]),
])
def test_count_labels(segmentation, labels, expected):
    assert count_labels(segmentation, labels).tolist() == expected


@pytest.mark.parametrize("segmentation", [np.array([0, 5]), np.array([0, -2])])
def test_count_labels_rejects_undefined_labels(segmentation):
    with pytest.raises(ValueError, match="case 'x'.*label -?[25].*does not define"):
        count_labels(segmentation, LabelSpec(3), case="x")


@pytest.fixture()
def preprocessed_copy(nnunet_env, tmp_path, monkeypatch):
    """A private copy of the planned dataset's preprocessed folder, so tests may change files in it (and a private
    per-user cache folder)."""
    copy = tmp_path / nnunet_env.preprocessed.name
    shutil.copytree(nnunet_env.preprocessed, copy)
    cache_path(copy, IDENTIFIER).unlink(missing_ok=True)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user_cache"))
    return copy


def raw_counts(nnunet_env, case):
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(nnunet_env.raw / "labelsTr" / f"{case}.nii.gz")))
    return np.bincount(labels.ravel(), minlength=4)


def test_counts_match_the_raw_labels_and_are_cached(nnunet_env, preprocessed_copy, monkeypatch):
    counts = case_label_counts(preprocessed_copy, IDENTIFIER, LabelSpec(4), num_processes=2)
    assert sorted(counts) == [f"case_{i:03d}" for i in range(10)]
    for case, value in counts.items():
        assert value.tolist() == raw_counts(nnunet_env, case).tolist()
    assert cache_path(preprocessed_copy, IDENTIFIER).is_file()

    def must_not_count(*args):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(label_stats, "_count_case", must_not_count)
    again = case_label_counts(preprocessed_copy, IDENTIFIER, LabelSpec(4))
    assert {case: value.tolist() for case, value in again.items()} == \
        {case: value.tolist() for case, value in counts.items()}


def test_stale_entries_are_recounted(preprocessed_copy, monkeypatch):
    case_label_counts(preprocessed_copy, IDENTIFIER, LabelSpec(4))
    seg_file = preprocessed_copy / IDENTIFIER / "case_003_seg.b2nd"
    stat = seg_file.stat()
    os.utime(seg_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # as if nnU-Net rewrote it
    recounted = []
    original = label_stats._count_case

    def spy(folder, case, labels):
        recounted.append(case)
        return original(folder, case, labels)

    monkeypatch.setattr(label_stats, "_count_case", spy)
    case_label_counts(preprocessed_copy, IDENTIFIER, LabelSpec(4))
    assert recounted == ["case_003"]


def test_corrupt_or_foreign_cache_is_rebuilt_with_a_notice(nnunet_env, preprocessed_copy, capsys):
    path = cache_path(preprocessed_copy, IDENTIFIER)
    path.write_text("{ truncated")
    counts = case_label_counts(preprocessed_copy, IDENTIFIER, LabelSpec(4))
    assert "is unreadable" in capsys.readouterr().err
    assert counts["case_000"].tolist() == raw_counts(nnunet_env, "case_000").tolist()
    assert json.loads(path.read_text())["num_classes"] == 4
    case_label_counts(preprocessed_copy, IDENTIFIER, LabelSpec(4, ignore_label=4))
    assert "other labels" in capsys.readouterr().err


def edit_cache(path, edit):
    content = json.loads(path.read_text())
    edit(content)
    path.write_text(json.dumps(content))


def set_counts(content, counts):
    content["cases"]["case_002"]["counts"] = counts


@pytest.mark.parametrize("edit, recounted", [
    (lambda c: set_counts(c, [-5, 1, 2, 3]), ["case_002"]),  # negative
    (lambda c: set_counts(c, [1.5, 1, 2, 3]), ["case_002"]),  # fractional
    (lambda c: set_counts(c, [1, 2, 3]), ["case_002"]),  # wrong length
    (lambda c: c["cases"]["case_002"]["counts"].__setitem__(1, 7), ["case_002"]),  # same fingerprint, other counts
    (lambda c: c["cases"]["case_002"].pop("fingerprint"), ["case_002"]),
    (lambda c: c.__setitem__("cases", list(c["cases"])), [f"case_{i:03d}" for i in range(10)]),  # cases as a list
    (lambda c: c.pop("version"), [f"case_{i:03d}" for i in range(10)]),
])
def test_invalid_cache_entries_are_recounted_with_a_notice(nnunet_env, preprocessed_copy, monkeypatch, capsys,
                                                           edit, recounted):
    """Each of these was trusted (or failed on every rerun) before the cache schema was validated."""
    case_label_counts(preprocessed_copy, IDENTIFIER, LabelSpec(4))
    path = cache_path(preprocessed_copy, IDENTIFIER)
    edit_cache(path, edit)
    capsys.readouterr()
    counted = []
    original = label_stats._count_case
    monkeypatch.setattr(label_stats, "_count_case", lambda *job: counted.append(job[1]) or original(*job))
    counts = case_label_counts(preprocessed_copy, IDENTIFIER, LabelSpec(4))
    assert sorted(counted) == recounted
    assert "nnunet-margin: " in capsys.readouterr().err
    assert counts["case_002"].tolist() == raw_counts(nnunet_env, "case_002").tolist()
    counted.clear()
    case_label_counts(preprocessed_copy, IDENTIFIER, LabelSpec(4))  # repaired: nothing is recounted any more
    assert counted == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_preprocessed_folder_uses_the_user_cache(nnunet_env, preprocessed_copy, monkeypatch, capsys):
    _read_only_preprocessed_folder_uses_the_user_cache(nnunet_env, preprocessed_copy, monkeypatch, capsys)


def test_unwritable_preprocessed_folder_uses_the_user_cache(nnunet_env, preprocessed_copy, monkeypatch, capsys):
    """As a read-only folder looks to root, who may write anywhere: the preprocessed folder's cache write fails."""
    original = label_stats.write_json_atomic

    def refuse_preprocessed(path, content):
        if path.parent == preprocessed_copy:
            raise PermissionError(13, "Permission denied", str(path))
        original(path, content)

    monkeypatch.setattr(label_stats, "write_json_atomic", refuse_preprocessed)
    _read_only_preprocessed_folder_uses_the_user_cache(nnunet_env, preprocessed_copy, monkeypatch, capsys)


def _read_only_preprocessed_folder_uses_the_user_cache(nnunet_env, preprocessed_copy, monkeypatch, capsys):
    before = sorted(p.name for p in preprocessed_copy.iterdir())
    preprocessed_copy.chmod(0o555)
    try:
        counts = case_label_counts(preprocessed_copy, IDENTIFIER, LabelSpec(4))
        assert "cannot write the label-count cache" in capsys.readouterr().err
        assert user_cache_path(preprocessed_copy, IDENTIFIER).is_file()
        assert sorted(p.name for p in preprocessed_copy.iterdir()) == before
        monkeypatch.setattr(label_stats, "_count_case", lambda *job: pytest.fail("the user cache should be used"))
        again = case_label_counts(preprocessed_copy, IDENTIFIER, LabelSpec(4))
        assert capsys.readouterr().err == ""
        assert {c: v.tolist() for c, v in again.items()} == {c: v.tolist() for c, v in counts.items()}
    finally:
        preprocessed_copy.chmod(0o755)


def test_no_writable_cache_keeps_the_counts_in_memory(nnunet_env, preprocessed_copy, monkeypatch, capsys):
    def refuse(path, content):
        raise OSError(30, "Read-only file system", str(path))

    monkeypatch.setattr(label_stats, "write_json_atomic", refuse)
    counts = case_label_counts(preprocessed_copy, IDENTIFIER, LabelSpec(4))
    assert "the counts stay in memory" in capsys.readouterr().err
    assert counts["case_001"].tolist() == raw_counts(nnunet_env, "case_001").tolist()


def test_failed_cache_write_keeps_the_old_file(preprocessed_copy, monkeypatch):
    case_label_counts(preprocessed_copy, IDENTIFIER, LabelSpec(4))
    path = cache_path(preprocessed_copy, IDENTIFIER)
    before = path.read_bytes()
    (preprocessed_copy / IDENTIFIER / "case_009_seg.b2nd").touch()  # stale: forces a rewrite

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("crash mid-write")

    monkeypatch.setattr(json, "dumps", crash)
    with pytest.raises(KeyboardInterrupt):
        case_label_counts(preprocessed_copy, IDENTIFIER, LabelSpec(4))
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}")] == []


def test_nnunet_files_are_only_read(nnunet_env, preprocessed_copy):
    folder = preprocessed_copy / IDENTIFIER
    before = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir()}
    case_label_counts(preprocessed_copy, IDENTIFIER, LabelSpec(4), num_processes=2)
    assert {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir()} == before


def test_missing_configuration_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="run nnUNetv2_plan_and_preprocess"):
        case_label_counts(tmp_path, IDENTIFIER, LabelSpec(4))


def test_total_counts_errors():
    per_case = {"a": np.array([5, 1]), "b": np.array([3, 0])}
    assert total_counts(per_case, ["a", "b"]).tolist() == [8, 1]
    with pytest.raises(ValueError, match="splits_final.json"):
        total_counts(per_case, ["a", "c"])
    with pytest.raises(ValueError, match="no training cases"):
        total_counts(per_case, [])


def test_empty_class_error_names_fold_class_and_fix():
    per_case = {"a": np.array([50, 3, 0]), "b": np.array([40, 2, 0])}
    with pytest.raises(EmptyClassError) as caught:
        offsets_record(per_case, ["a", "b"], ["background", "liver", "tumor"], 10.0, 1.0, "error", "fold 3 of X")
    message = str(caught.value)
    assert "fold 3 of X" in message and "2 (tumor)" in message and "2 training cases" in message
    assert "nnUNetTrainerMarginCalib_emptyAsOne" in message
    record = offsets_record(per_case, ["a", "b"], ["background", "liver", "tumor"], 10.0, 1.0, "count_as_one", "x")
    assert record["counts"] == [90, 5, 0] and all(np.isfinite(record["rho_0k"]))


def test_fold_cases_are_nnunets_split(tmp_path):
    cases = [f"c{i}" for i in range(10)]
    assert fold_cases(tmp_path, cases, None) == (cases, cases)
    assert fold_cases(tmp_path, cases, "all") == (cases, cases)
    train, validation = fold_cases(tmp_path, cases, "1")  # nnU-Net's seeded 5-fold split, computed in memory
    assert len(train) == 8 and sorted(train + validation) == cases and not (tmp_path / "splits_final.json").exists()
    (tmp_path / "splits_final.json").write_text(json.dumps([{"train": ["c1", "c2"], "val": ["c3"]}]))
    assert fold_cases(tmp_path, cases, "0") == (["c1", "c2"], ["c3"])
    # beyond the split file: nnU-Net's seeded 80:20 split (as in nnUNetTrainer.do_split)
    rnd = np.random.RandomState(seed=12345 + 4)
    chosen = rnd.choice(10, 8, replace=False)
    expected_train = [cases[i] for i in chosen]  # the cases are already sorted
    assert fold_cases(tmp_path, cases, "4") == (expected_train, [c for i, c in enumerate(cases) if i not in chosen])
    with pytest.raises(ValueError, match="fold must be a number or 'all'"):
        fold_cases(tmp_path, cases, "x")


def test_label_stats_command(nnunet_env):
    result = nnunet_env.run("nnunet-margin", "label-stats", "987", "-c", "3d_fullres", "-f", "0", "-np", "1")
    lines = result.stdout.splitlines()
    assert lines[0].startswith("fold 0 of Dataset987_MarginDemo (3d_fullres): 8 cases")
    rows = {line.split()[1]: line.split() for line in lines[2:6]}
    assert set(rows) == {"background", "organ", "lesion", "rare_spot"}
    # rarer classes get larger rho_0k
    assert float(rows["rare_spot"][4]) > float(rows["lesion"][4]) > float(rows["organ"][4])
    failed = nnunet_env.run("nnunet-margin", "label-stats", "987", "-f", "one", check=False)
    assert failed.returncode == 2 and "fold must be a number or 'all'" in failed.stderr


def _rank_zero_worker(rank: int, store: str, output: str, fail: bool) -> None:
    """One DDP rank (gloo on the CPU): only rank 0 computes; the others receive its result, or its error."""
    import torch.distributed as dist

    from nnunet_margin.nnunet.distributed import on_rank_zero

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    computed = []

    def compute():
        computed.append(rank)
        if fail:
            raise ValueError("case 'x': label 7 is not defined")
        return {"rho_0k": [1.0, 2.0], "computed_on": rank}

    trainer = type("Trainer", (), {"local_rank": rank, "is_ddp": True})()
    try:
        result = {"record": on_rank_zero(trainer, compute)}
    except ValueError as error:
        result = {"error": str(error)}
    with open(f"{output}.{rank}", "w") as handle:
        json.dump({**result, "computed": computed}, handle)
    dist.destroy_process_group()


@pytest.mark.parametrize("fail", [False, True])
def test_rank_zero_computes_and_every_rank_gets_the_result_or_the_error(tmp_path, fail):
    import torch.multiprocessing

    output = str(tmp_path / "rank")
    torch.multiprocessing.spawn(_rank_zero_worker, args=(str(tmp_path / "store"), output, fail), nprocs=2)
    results = [json.loads(open(f"{output}.{rank}").read()) for rank in (0, 1)]
    assert results[0]["computed"] == [0] and results[1]["computed"] == []
    if fail:
        assert results[0]["error"] == results[1]["error"] == "case 'x': label 7 is not defined"
    else:
        assert results[0]["record"] == results[1]["record"] == {"rho_0k": [1.0, 2.0], "computed_on": 0}
