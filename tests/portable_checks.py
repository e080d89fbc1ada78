"""Helpers of the tests that export models and predict with plain nnU-Net (test_portable_e2e, test_posthoc_e2e,
test_faults): running nnU-Net without the plugin, reading predictions, the plugin model's own logits."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

PREDICT_FLAGS = ("--save_probabilities", "-device", "cpu", "-npp", "0", "-nps", "0", "--disable_tta")
# Runs an nnU-Net console script (argv[1] = "module:function") with the plugin unimportable.
PLAIN_NNUNET = """
import importlib, sys
sys.modules["nnunet_margin"] = None
module, function = sys.argv[1].split(":")
sys.argv = sys.argv[1:]
sys.exit(getattr(importlib.import_module(module), function)())
"""


def run_plain_nnunet(env, command: str, *arguments: str, **variables: str) -> None:
    """Run an nnU-Net command as plain nnU-Net: no nnUNet_extTrainer, and the plugin cannot be imported."""
    (entry_point,) = entry_points(group="console_scripts", name=command)
    environment = {name: value for name, value in env.env.items() if name != "nnUNet_extTrainer"} | variables
    result = subprocess.run([sys.executable, "-c", PLAIN_NNUNET, entry_point.value, *arguments], env=environment,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def read_prediction(folder: Path, case: str) -> tuple[np.ndarray, np.ndarray]:
    segmentation = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"{case}.nii.gz")))
    return segmentation, np.load(folder / f"{case}.npz")["probabilities"]


def retrain(model: Path, fold: str = "0") -> None:
    """Stands in for retraining a fold: a new checkpoint_final.pth (other weights)."""
    path = model / f"fold_{fold}" / "checkpoint_final.pth"
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["network_weights"] = {key: value + 1 if value.is_floating_point() else value
                                     for key, value in checkpoint["network_weights"].items()}
    torch.save(checkpoint, path)


def plugin_logits(model: Path, images: Path, folds: tuple[int, ...] = (0,)) -> torch.Tensor:
    """The plugin model's logits of the one test image in `images` (see `ensemble_logits`)."""
    return ensemble_logits(model, [next(images.iterdir())], folds)[0]


def ensemble_logits(model: Path, image_files: list[Path], folds: tuple[int, ...] = (0,),
                    mirroring: bool = False) -> list[torch.Tensor]:
    """A model's logits of single-channel images (the mean over `folds`, as nnU-Net ensembles them; with or without
    test-time mirroring), float64, computed independently with nnU-Net's predictor (the synthetic images need no crop
    and no resampling, so nnU-Net's preprocessed grid is the image's)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                                perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model), use_folds=folds, checkpoint_name="checkpoint_final.pth")
    logits = []
    for image in image_files:
        data, _, properties = DefaultPreprocessor(verbose=False).run_case(
            [str(image)], None, predictor.plans_manager, predictor.configuration_manager, predictor.dataset_json)
        assert list(properties["bbox_used_for_cropping"]) == [[0, s] for s in data.shape[1:]], "needs uncropped cases"
        logits.append(predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data)).double())
    return logits


def interior(shape: tuple[int, ...], margin: int = 8) -> np.ndarray:
    """Voxels at least `margin` from the border: nnU-Net sums the sliding-window logits in float16, and near the
    patch border the Gaussian weights underflow it."""
    inside = np.zeros(shape, dtype=bool)
    inside[tuple(slice(margin, -margin) for _ in shape)] = True
    return inside


def assert_close_to_float16_accumulation(probabilities: np.ndarray, expected: np.ndarray) -> None:
    """Plain nnU-Net's probabilities (K, *spatial) equal the expected ones in the interior up to its float16 sum of
    the sliding-window logits: within 2e-3 for all but 0.1 % of the entries, and within 5e-3 everywhere."""
    inside = interior(probabilities.shape[1:])
    deviation = np.abs(probabilities[:, inside] - expected[:, inside])
    assert np.quantile(deviation, 0.999) <= 2e-3 and deviation.max() <= 5e-3, \
        f"99.9 % quantile {np.quantile(deviation, 0.999):.2e}, max {deviation.max():.2e}"
