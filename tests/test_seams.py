"""The nnU-Net seams: each one's assumption holds for the installed nnU-Net (one test per seam, failing with the
seam's name), a changed nnU-Net format or hook breaks the seam that names it, an unverified version warns without
breaking the import, and the seams that wrap nnU-Net calls do what they say."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from nnunet_margin.nnunet import _seams, layout


@pytest.mark.parametrize("name", sorted(_seams.SEAMS))
def test_seam_holds_for_the_installed_nnunet(name):
    try:
        _seams.SEAMS[name].check()
    except _seams.SeamError as error:
        pytest.fail(f"seam {name!r} broke: {error}")


def test_every_seam_is_checked_by_doctor():
    problems = _seams.check_all()
    assert set(problems) == set(_seams.SEAMS) and len(problems) >= 22
    assert all(problem is None for problem in problems.values()), problems


def test_a_broken_seam_is_named(monkeypatch):
    monkeypatch.delattr(_seams._trainer_module, "export_prediction_from_logits")
    with pytest.raises(_seams.SeamError, match="seam 'validation_export' is broken with nnunetv2"):
        _seams.SEAMS["validation_export"].check()
    assert "validation_export" in _seams.check_all()["validation_export"]


def _changed_reader_tolerance(arrays):
    return all(a.shape == arrays[0].shape for a in arrays)  # no np.allclose: another tolerance


# Per seam of nnU-Net's files and trainer hooks: a change of nnU-Net (or of what the plugin assumes) it must catch.
CHANGES = {
    "checkpoint_schema": lambda patch: patch.setattr(layout, "CHECKPOINT_KEYS_READ", ("weights", "trainer_name")),
    "summary_json": lambda patch: patch.setattr(layout, "SUMMARY_FILE", "dice.json"),
    "preprocessing_properties": lambda patch: patch.setattr(
        layout, "PROPERTIES_KEYS_READ", (*layout.PROPERTIES_KEYS_READ, "crop_box")),
    "image_geometry": lambda patch: patch.setattr(
        "nnunetv2.imageio.base_reader_writer.BaseReaderWriter._check_all_same_array",
        staticmethod(_changed_reader_tolerance)),
    "preprocessed_files": lambda patch: patch.setattr(layout, "PREPROCESSED_SEGMENTATION_SUFFIXES", ("_labels.b2nd",)),
    "results_layout": lambda patch: patch.setattr(layout, "FOLD_PREFIX", "split_"),
    "prediction_files": lambda patch: patch.setattr(layout, "PROBABILITIES_KEY", "softmax"),
    "model_export": lambda patch: patch.setattr(layout, "MODEL_FILES", (*layout.MODEL_FILES, "model.json")),
    "train_step_result": lambda patch: patch.setattr(_seams.nnUNetTrainer, "train_step",
                                                     lambda self, batch: {"loss": batch}),
    "build_loss_hook": lambda patch: patch.setattr(_seams.nnUNetTrainer, "initialize", lambda self: None),
    "validation_step_loss": lambda patch: patch.setattr(_seams.nnUNetTrainer, "validation_step",
                                                        lambda self, batch: {"loss": batch}),
}


@pytest.mark.parametrize("name", sorted(CHANGES))
def test_a_changed_nnunet_format_or_hook_breaks_its_seam(monkeypatch, name):
    CHANGES[name](monkeypatch)
    with pytest.raises(_seams.SeamError, match=f"seam '{name}' is broken"):
        _seams.SEAMS[name].check()


def test_same_geometry_is_nnunets_tolerance():
    spacing = np.array([1.0, 0.8, 0.8])
    assert _seams.same_geometry(spacing * (1 + 1e-7), spacing)  # np.allclose: rtol 1e-5, atol 1e-8
    assert not _seams.same_geometry(spacing * (1 + 1e-4), spacing)
    assert not _seams.same_geometry(spacing[:2], spacing)


def test_train_step_loss_is_nnunets_host_copy():
    loss = np.float32(0.25)
    assert _seams.train_step_loss({"loss": loss}) is loss


def test_an_unverified_nnunet_version_warns_once_and_the_lookup_still_works():
    script = (
        "import warnings, importlib.metadata as metadata\n"
        "real = metadata.version\n"
        "metadata.version = lambda name: '2.9.0' if name == 'nnunetv2' else real(name)\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import nnunet_margin.trainers\n"
        "messages = [str(w.message) for w in caught if 'verified with nnunetv2' in str(w.message)]\n"
        "assert len(messages) == 1, messages\n"
        "assert 'this is 2.9.0' in messages[0] and 'validation_export' in messages[0], messages[0]\n"
        "print(nnunet_margin.trainers.nnUNetTrainerMbLS.__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("nnUNetTrainerMbLS")


def test_load_checkpoint_once_hands_the_dict_to_nnunet_and_restores_torch_load(tmp_path):
    checkpoint = {"weights": torch.ones(2)}
    seen = []
    _seams.load_checkpoint_once(lambda name: seen.append(torch.load(name, weights_only=False)), checkpoint, "x.pth")
    assert seen == [checkpoint]
    path = tmp_path / "other.pth"
    torch.save({"a": 1}, path)
    assert torch.load(path, weights_only=False) == {"a": 1}  # the real torch.load is back


def test_save_checkpoint_with_adds_keys_in_one_atomic_write(tmp_path):
    target = tmp_path / "checkpoint.pth"
    torch.save({"old": True}, target)

    def nnunet_save(filename):
        torch.save({"network_weights": {"w": torch.zeros(1)}}, filename)

    _seams.save_checkpoint_with(nnunet_save, str(target), {"nnunet_margin": {"x": 1}})
    loaded = torch.load(target, weights_only=False)
    assert loaded["nnunet_margin"] == {"x": 1} and "network_weights" in loaded
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]

    def crashing_save(filename):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _seams.save_checkpoint_with(crashing_save, str(target), {})
    assert torch.load(target, weights_only=False)["nnunet_margin"] == {"x": 1}  # the old file survives
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pth"]
