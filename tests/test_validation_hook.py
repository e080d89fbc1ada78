"""The validation export hook: statistics from the cropped logits (default) equal those from nnU-Net's exported
full-size probabilities (--npz), with a real crop box and a non-identity transpose."""

import json
import pickle

import numpy as np
import pytest
import torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_margin.calibration import CalibrationStats
from nnunet_margin.nnunet.validation import export_and_measure


@pytest.fixture()
def exported_case(nnunet_env):
    plans = json.loads((nnunet_env.preprocessed / "nnUNetPlans.json").read_text())
    plans["transpose_forward"], plans["transpose_backward"] = [2, 0, 1], [1, 2, 0]
    plans_manager = PlansManager(plans)
    dataset_json = json.loads((nnunet_env.preprocessed / "dataset.json").read_text())
    with open(nnunet_env.preprocessed / "nnUNetPlans_3d_fullres" / "case_000.pkl", "rb") as handle:
        properties = pickle.load(handle)
    bbox = [[3, 29], [0, 30], [5, 32]]  # in the transposed frame
    properties.update(bbox_used_for_cropping=bbox, shape_before_cropping=(32, 32, 32),
                      shape_after_cropping_and_before_resampling=tuple(high - low for low, high in bbox))
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn((4, *properties["shape_after_cropping_and_before_resampling"]), generator=generator) * 3
    return plans_manager, dataset_json, properties, logits


def run_export(nnunet_env, tmp_path, exported_case, save_probabilities):
    plans_manager, dataset_json, properties, logits = exported_case
    output, scratch = tmp_path / f"out_{save_probabilities}", tmp_path / f"scratch_{save_probabilities}"
    output.mkdir()
    scratch.mkdir()
    export_and_measure(logits.clone(), properties, plans_manager.get_configuration("3d_fullres"), plans_manager,
                       dataset_json, str(output / "case_000"), save_probabilities, 1,
                       gt_folder=str(nnunet_env.preprocessed / "gt_segmentations"), scratch_folder=str(scratch))
    measured = json.loads((scratch / "case_000.json").read_text())
    return output, {scope: CalibrationStats.from_dict(value) for scope, value in measured["stats"].items()}, \
        measured["segmentation"]


def test_cropped_logits_give_the_statistics_of_the_exported_probabilities(nnunet_env, tmp_path, exported_case):
    plain_output, from_logits, plain_segmentation = run_export(nnunet_env, tmp_path, exported_case,
                                                               save_probabilities=False)
    npz_output, from_probabilities, npz_segmentation = run_export(nnunet_env, tmp_path, exported_case,
                                                                  save_probabilities=True)
    assert not list(plain_output.glob("*.npz")) and (npz_output / "case_000.npz").is_file()
    assert plain_segmentation == npz_segmentation and set(plain_segmentation) == {"dice", "hd95", "asd"}
    for scope in ("foreground", "crop", "boundary"):
        ours, reference = from_logits[scope].state, from_probabilities[scope].state
        for name in ("top_count", "top_correct", "class_count", "class_positive"):
            assert torch.equal(ours[name], reference[name]), (scope, name)
        for name in ("top_confidence", "class_probability", "brier_sum", "nll_sum"):
            torch.testing.assert_close(ours[name], reference[name], rtol=1e-6, atol=1e-6)
    crop_voxels = 26 * 30 * 27
    assert from_logits["crop"].num_voxels == crop_voxels  # only the crop box counts
    assert 0 < from_logits["foreground"].num_voxels < crop_voxels
    assert 0 < from_logits["boundary"].num_voxels < crop_voxels
    # both write the same segmentation
    import SimpleITK as sitk

    segmentations = [sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "case_000.nii.gz")))
                     for folder in (plain_output, npz_output)]
    np.testing.assert_array_equal(*segmentations)


def test_ground_truth_of_another_shape_is_a_clear_error(nnunet_env, tmp_path, exported_case):
    plans_manager, dataset_json, properties, logits = exported_case
    properties = {**properties, "shape_after_cropping_and_before_resampling": (5, 5, 5)}
    with pytest.raises(ValueError, match="is gt_segmentations the one of this dataset"):
        run_export(nnunet_env, tmp_path, (plans_manager, dataset_json, properties, logits), save_probabilities=False)
