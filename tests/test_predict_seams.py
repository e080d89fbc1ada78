"""The prediction seams of `nnunet-margin predict` catch the change of nnU-Net each one assumes away (the checks
themselves pass for the installed nnU-Net in tests/test_seams.py)."""

from __future__ import annotations

import numpy as np
import pytest

from nnunet_margin.nnunet import _seams, layout


def changed_initialisation(self, model_training_output_dir, use_folds, checkpoint_name="checkpoint_final.pth"):
    self.parameters = [checkpoint_name]  # keeps the folds' weights elsewhere


def changed_ignore_label(self):
    return self.label_dict.get("unlabelled")


def changed_paths(folder, files, file_ending, f):
    return [file for file in files if file.startswith(f)]  # no channel number any more


def changed_sequential_prediction(self, list_of_lists_or_source_folder, output_folder_or_list_of_truncated_output_files,
                                  save_probabilities=False, overwrite=True, folder_with_segs_from_prev_stage=None):
    return self.preprocess_everything(list_of_lists_or_source_folder)


def changed_ensemble(self, data):
    return self.predict_sliding_window_return_logits(data)  # one fold only


def changed_mirroring(self, x):
    return self.network(x)


def changed_resampling(data, new_shape, is_seg=False, axis=None, order=3, do_separate_z=False, order_z=0,
                       dtype_out=None):
    return np.resize(data, (data.shape[0], *new_shape))  # resamples even at the target shape


def changed_export(predicted_array_or_file, properties_dict, configuration_manager, plans_manager,
                   dataset_json_dict_or_file, output_file_truncated, save_probabilities=False, num_threads_torch=8):
    np.save(output_file_truncated, predicted_array_or_file)


def changed_writer(self, seg, output_fname, properties):
    np.save(output_fname, np.asarray(seg, dtype=np.uint8))


CHANGES = {
    "predictor": ("nnunetv2.inference.predict_from_raw_data.nnUNetPredictor.initialize_from_trained_model_folder",
                  changed_initialisation),
    "dataset_json": ("nnunetv2.utilities.label_handling.label_handling.LabelManager._determine_ignore_label",
                     changed_ignore_label),
    "input_files": ("nnunetv2.utilities.utils.create_paths_fn", changed_paths),
    "preprocessing": ("nnunetv2.inference.predict_from_raw_data.nnUNetPredictor.predict_from_files_sequential",
                      changed_sequential_prediction),
    "ensemble_logits": ("nnunetv2.inference.predict_from_raw_data.nnUNetPredictor."
                        "predict_logits_from_preprocessed_data", changed_ensemble),
    "mirroring": ("nnunetv2.inference.predict_from_raw_data.nnUNetPredictor._internal_maybe_mirror_and_predict",
                  changed_mirroring),
    "export_resampling": ("nnunetv2.preprocessing.resampling.default_resampling.resample_data_or_seg",
                          changed_resampling),
    "export_geometry": ("nnunetv2.inference.export_prediction.export_prediction_from_logits", changed_export),
    "float_maps": ("nnunetv2.imageio.nibabel_reader_writer.NibabelIO.write_seg", changed_writer),
}


@pytest.mark.parametrize("name", sorted(CHANGES))
def test_a_changed_nnunet_breaks_its_prediction_seam(monkeypatch, name):
    target, replacement = CHANGES[name]
    monkeypatch.setattr(target, replacement)
    with pytest.raises(_seams.SeamError, match=f"seam '{name}' is broken"):
        _seams.SEAMS[name].check()


def test_a_renamed_prediction_metadata_file_breaks_its_seam(monkeypatch):
    monkeypatch.setattr(layout, "PLANS_FILE", "plans_v3.json")
    with pytest.raises(_seams.SeamError, match="seam 'prediction_metadata' is broken"):
        _seams.SEAMS["prediction_metadata"].check()


def test_mirrorings_are_nnunets_axis_combinations():
    class Predictor:
        allowed_mirroring_axes, use_mirroring = (0, 2), True

    assert _seams.mirrorings(Predictor()) == [(), (0,), (2,), (0, 2)]
    Predictor.use_mirroring = False
    assert _seams.mirrorings(Predictor()) == [()]
