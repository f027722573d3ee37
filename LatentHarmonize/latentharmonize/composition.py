"""Tissue composition of the lungs: how much of each region every cluster occupies.

Pure function of images (label map, CT, lung mask) so that the Slicer module can recompute the table from a label
map the user edited, with exactly the numbers ``analyze`` reports.

Regions: ``whole`` (both lungs), ``right`` and ``left`` (lung mask values 1 and 2), and ``upper``/``middle``/``lower``:
thirds of the cranio-caudal extent of both lungs together, measured on the physical z axis (LPS, superior = +z) at
voxel centres. ``fraction`` is the share of the region's lung voxels; lung voxels without a known cluster label
(label 0 or a value missing from ``names``, e.g. erased in an editor) are reported as label 0 ``unlabelled`` so that
fractions still sum to 1. Regions without any lung voxel are left out. Labels outside the lung mask are ignored.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import SimpleITK as sitk

from .errors import InputError

REGIONS = ("whole", "right", "left", "upper", "middle", "lower")
COLUMNS = ["region", "label", "name", "fraction", "volume_ml", "mean_hu", "sd_hu"]
UNLABELLED = "unlabelled"
RIGHT_LUNG, LEFT_LUNG = 1, 2


def _check_same_grid(reference: sitk.Image, other: sitk.Image, what: str) -> None:
    same = (reference.GetSize() == other.GetSize()
            and np.allclose(reference.GetSpacing(), other.GetSpacing(), rtol=1e-4, atol=1e-4)
            and np.allclose(reference.GetOrigin(), other.GetOrigin(), atol=1e-3)
            and np.allclose(reference.GetDirection(), other.GetDirection(), atol=1e-4))
    if not same:
        raise InputError(f"The {what} does not share the label map's geometry (size {other.GetSize()} vs "
                         f"{reference.GetSize()}, spacing, origin or direction differ). Resample it onto the label map first.")


def _lung_bounding_box(lung: np.ndarray) -> tuple:
    """Index slices of the smallest box holding every lung voxel (array order z, y, x)."""
    box = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(lung.any(axis=others))
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def _physical_z(image: sitk.Image, box: tuple) -> np.ndarray:
    """Physical z (mm) of every voxel centre inside ``box``, float32 [z, y, x] (any direction matrix)."""
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    step = direction[2] * spacing  # z change per index step along x, y, z
    zi = (np.arange(box[2].start, box[2].stop) * step[0]).astype(np.float32)
    zj = (np.arange(box[1].start, box[1].stop) * step[1]).astype(np.float32)
    zk = (np.arange(box[0].start, box[0].stop) * step[2] + image.GetOrigin()[2]).astype(np.float32)
    return zk[:, None, None] + zj[None, :, None] + zi[None, None, :]


def _region_masks(side: np.ndarray, z: np.ndarray) -> dict:
    """Boolean masks over the lung voxels for each region."""
    z_min, z_max = float(z.min()), float(z.max())
    t = (z - z_min) / (z_max - z_min) if z_max > z_min else np.full(z.shape, 0.5, dtype=np.float32)
    return {
        "whole": np.ones(side.shape, dtype=bool),
        "right": side == RIGHT_LUNG,
        "left": side == LEFT_LUNG,
        "upper": t >= 2.0 / 3.0,
        "middle": (t >= 1.0 / 3.0) & (t < 2.0 / 3.0),
        "lower": t < 1.0 / 3.0,
    }


def composition_table(labels: sitk.Image, ct: sitk.Image, lungs: sitk.Image, names: dict) -> pd.DataFrame:
    """Per region and cluster: fraction of the region's lung, volume (mL), mean and SD of HU.

    ``labels``: cluster label map (integer, 0 = none); ``ct``: HU image; ``lungs``: lung mask (1 right, 2 left; any
    other non-zero value counts for ``whole`` and the zones only); ``names``: ``{label: name}`` of the clusters.
    All three images must share one geometry. Returns a DataFrame with columns :data:`COLUMNS`, one row per region and
    cluster of ``names`` (zero rows included), plus an ``unlabelled`` row where some lung voxels carry no cluster.
    """
    if not names:
        raise InputError("No cluster names given: pass {label: name} for the clusters of the label map.")
    if any(int(k) <= 0 or int(k) > 255 for k in names):
        raise InputError(f"Cluster labels must be 1..255, got {sorted(names)}.")
    _check_same_grid(labels, ct, "CT")
    _check_same_grid(labels, lungs, "lung mask")
    lung_all = sitk.GetArrayViewFromImage(lungs)
    if not lung_all.any():
        raise InputError("The lung mask is empty, so there is no lung to measure. Check the mask or segment the lungs again.")
    box = _lung_bounding_box(lung_all != 0)
    side = np.asarray(lung_all[box])
    inside = side != 0
    side = side[inside]
    lab = np.asarray(sitk.GetArrayViewFromImage(labels)[box])[inside].astype(np.int64)
    hu = np.asarray(sitk.GetArrayViewFromImage(ct)[box])[inside].astype(np.float64)
    z = _physical_z(labels, box)[inside]

    known = sorted(int(k) for k in names)
    lab[~np.isin(lab, known)] = 0  # unlabelled lung voxels keep fractions summing to 1
    voxel_ml = float(np.prod(labels.GetSpacing())) / 1000.0
    rows = []
    for region, mask in _region_masks(side, z).items():
        n_region = int(mask.sum())
        if n_region == 0:
            continue
        lab_r, hu_r = lab[mask], hu[mask]
        count = np.bincount(lab_r, minlength=256)
        total = np.bincount(lab_r, weights=hu_r, minlength=256)
        shift = hu_r - (total.sum() / n_region)  # centred sums avoid cancellation in the variance
        sq = np.bincount(lab_r, weights=shift * shift, minlength=256)
        lin = np.bincount(lab_r, weights=shift, minlength=256)
        shown = known + ([0] if count[0] else [])
        for label in shown:
            n = int(count[label])
            mean = total[label] / n if n else math.nan
            var = max(sq[label] / n - (lin[label] / n) ** 2, 0.0) if n else math.nan
            rows.append((region, label, str(names[label]) if label else UNLABELLED, n / n_region, n * voxel_ml,
                         mean, math.sqrt(var) if n else math.nan))
    return pd.DataFrame(rows, columns=COLUMNS)


def lung_volumes_from_table(table: pd.DataFrame) -> dict:
    """Lung volumes in mL (``right``, ``left``, ``total``) from a composition table."""
    summed = table.groupby("region")["volume_ml"].sum()
    return {"right": float(summed.get("right", 0.0)), "left": float(summed.get("left", 0.0)),
            "total": float(summed.get("whole", 0.0))}


def _clean(value):
    """JSON-safe scalar: NaN becomes null, numpy types become Python types."""
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else round(float(value), 6)
    if isinstance(value, np.integer):
        return int(value)
    return value


def composition_to_json(table: pd.DataFrame, names: dict, colors: dict | None = None, model_id: str | None = None,
                        lung_volumes: dict | None = None) -> str:
    """The composition table as JSON text, with cluster names and colours, lung volumes (mL) and the model id.

    Layout: ``{"model_sha256", "clusters": [{label, name, color}], "lung_volumes_ml": {right, left, total},
    "regions": {region: [{label, name, fraction, volume_ml, mean_hu, sd_hu}]}}``. NaN (empty cluster) is ``null``.
    Keys are sorted so identical tables give identical bytes.
    """
    colors = colors or {}
    clusters = [{"label": int(k), "name": str(names[k]),
                 "color": [round(float(c), 6) for c in colors[k]] if k in colors else None} for k in sorted(names)]
    regions: dict = {}
    for row in table.itertuples(index=False):
        entry = {col: _clean(getattr(row, col)) for col in COLUMNS if col != "region"}
        regions.setdefault(row.region, []).append(entry)
    doc = {
        "model_sha256": model_id,
        "clusters": clusters,
        "lung_volumes_ml": {k: _clean(v) for k, v in (lung_volumes or lung_volumes_from_table(table)).items()},
        "regions": regions,
    }
    return json.dumps(doc, indent=1, sort_keys=True, allow_nan=False) + "\n"
