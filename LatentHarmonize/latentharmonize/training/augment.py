"""MONAI training dataset of paired patch views (used by ``train`` only, so ``analyze`` never imports MONAI)."""
from __future__ import annotations

import numpy as np
import torch
from monai.data import Dataset
from monai.transforms import Compose, EnsureTyped, MapTransform, RandFlipd, RandomizableTransform, RandRotate90d

from .samples import PairedPatches


class RandAcquisitionPair(RandomizableTransform, MapTransform):
    """Pick two different acquisitions of one sampled point as ``x`` and ``x_pair`` (the same one twice when the
    patient has a single acquisition)."""

    def __init__(self, patches: np.ndarray):
        RandomizableTransform.__init__(self, prob=1.0)
        MapTransform.__init__(self, keys=["rows"])
        self.patches = patches

    def __call__(self, data: dict) -> dict:
        rows = data["rows"]
        a, b = (self.R.choice(len(rows), size=2, replace=False) if len(rows) > 1 else (0, 0))
        return {"x": self.patches[rows[a]], "x_pair": self.patches[rows[b]]}


def training_dataset(samples: PairedPatches, seed: int = 0) -> Dataset:
    """MONAI dataset of paired views with shared random flips / 90-degree turns (tissue has no orientation)."""
    views = ["x", "x_pair"]
    transform = Compose([
        RandAcquisitionPair(samples.patches),
        RandFlipd(views, prob=0.5, spatial_axis=0),
        RandFlipd(views, prob=0.5, spatial_axis=1),
        RandRotate90d(views, prob=0.5, spatial_axes=(0, 1)),
        EnsureTyped(views, data_type="tensor", dtype=torch.float32, track_meta=False),
    ]).set_random_state(seed=seed)
    return Dataset([{"rows": rows} for rows in samples.rows_by_point()], transform=transform)
