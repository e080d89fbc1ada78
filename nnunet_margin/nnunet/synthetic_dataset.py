"""A small, imbalanced, learnable 3D dataset in nnU-Net's raw format (for the demo and the tests)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

LABELS = {"background": 0, "organ": 1, "lesion": 2, "rare_spot": 3}


def _case(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """One volume: a large organ, a lesion touching it and a tiny rare spot, each with its own intensity."""
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), axis=-1).astype(np.float32)
    seg = np.zeros(shape, dtype=np.uint8)

    def ball(center, radius):
        return ((grid - np.asarray(center, dtype=np.float32)) ** 2).sum(-1) <= radius**2

    size = np.asarray(shape, dtype=np.float32)
    organ_center = size / 2 + rng.uniform(-2, 2, 3)
    seg[ball(organ_center, min(shape) * rng.uniform(0.28, 0.34))] = LABELS["organ"]
    lesion_center = organ_center + rng.uniform(-4, 4, 3)
    seg[ball(lesion_center, rng.uniform(3.0, 4.5))] = LABELS["lesion"]
    spot_center = rng.uniform(3, size - 4)
    seg[ball(spot_center, rng.uniform(1.5, 2.2))] = LABELS["rare_spot"]

    means = np.array([0.0, 1.0, 2.2, 3.5], dtype=np.float32)
    image = means[seg] + rng.normal(0.0, 0.35, shape).astype(np.float32)
    return image, seg


def write_synthetic_dataset(
    raw_root: str | os.PathLike,
    dataset_id: int = 987,
    name: str = "MarginDemo",
    num_training: int = 10,
    num_test: int = 2,
    shape: tuple[int, int, int] = (32, 32, 32),
    seed: int = 0,
) -> Path:
    """Write DatasetXXX_NAME with imagesTr, labelsTr, imagesTs (+ labelsTs) and dataset.json; return its folder."""
    import SimpleITK as sitk

    folder = Path(raw_root) / f"Dataset{dataset_id:03d}_{name}"
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def save(array: np.ndarray, path: Path) -> None:
        itk = sitk.GetImageFromArray(array)
        itk.SetSpacing((1.0, 1.0, 1.0))
        sitk.WriteImage(itk, str(path))

    for index in range(num_training + num_test):
        image, seg = _case(rng, shape)
        split = "Tr" if index < num_training else "Ts"
        case = f"case_{index:03d}"
        save(image, folder / f"images{split}" / f"{case}_0000.nii.gz")
        save(seg, folder / f"labels{split}" / f"{case}.nii.gz")

    dataset_json = {
        "channel_names": {"0": "synthetic"},
        "labels": LABELS,
        "numTraining": num_training,
        "file_ending": ".nii.gz",
        "name": name,
        "description": "Synthetic imbalanced 3D dataset written by nnunet-margin",
    }
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    return folder
