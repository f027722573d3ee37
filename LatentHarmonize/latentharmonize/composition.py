"""Tissue composition of the lungs: how much of each region every cluster occupies.

Pure function of images (label map, CT, lung mask) so that the Slicer module can recompute the table from a label
map the user edited, with exactly the numbers ``analyze`` reports.

Regions: ``whole`` (both lungs), ``right`` and ``left`` (lung mask values 1 and 2), and ``upper``/``middle``/``lower``:
thirds of the cranio-caudal extent of both lungs together, measured on the physical z axis (LPS, superior = +z) at
voxel centres. ``fraction`` is the share of the region's lung voxels; lung voxels without a known cluster label
(label 0 or a value missing from ``names``, e.g. erased in an editor) are reported as label 0 ``unlabelled`` so that
fractions still sum to 1. Regions without any lung voxel are left out. Labels outside the lung mask are ignored.
A mask with several segments (lobes; :mod:`latentharmonize.segments`) adds one region per segment.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import SimpleITK as sitk

from .errors import InputError
from .grid import mask_box
from .segments import REGIONS, MaskSegments, segment_codes

COLUMNS = ["region", "label", "name", "fraction", "volume_ml", "mean_hu", "sd_hu"]
UNLABELLED = "unlabelled"
RIGHT_LUNG, LEFT_LUNG = 1, 2
_ALL = slice(None)
# (side, zone) cells of each region, indexing an array arranged as [side, zone] (see lung_cells)
REGION_CELLS = {"whole": (_ALL, _ALL), "right": (RIGHT_LUNG, _ALL), "left": (LEFT_LUNG, _ALL),
                "upper": (_ALL, 2), "middle": (_ALL, 1), "lower": (_ALL, 0)}


def _check_same_grid(reference: sitk.Image, other: sitk.Image, what: str) -> None:
    same = (reference.GetSize() == other.GetSize()
            and np.allclose(reference.GetSpacing(), other.GetSpacing(), rtol=1e-4, atol=1e-4)
            and np.allclose(reference.GetOrigin(), other.GetOrigin(), atol=1e-3)
            and np.allclose(reference.GetDirection(), other.GetDirection(), atol=1e-4))
    if not same:
        raise InputError(f"The {what} does not share the label map's geometry (size {other.GetSize()} vs "
                         f"{reference.GetSize()}, spacing, origin or direction differ). Resample it onto the label map first.")


def _physical_z(image: sitk.Image, box: tuple) -> np.ndarray:
    """Physical z (mm) of the voxel centres inside ``box``, float32, broadcastable to the box's [z, y, x] shape:
    an axis along which z does not change (the in-plane axes of an axial scan) keeps length 1."""
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    step = direction[2] * spacing  # z change per index step along x, y, z
    k = np.arange(box[0].start, box[0].stop) if step[2] else np.zeros(1)
    z = (k * step[2] + image.GetOrigin()[2]).astype(np.float32)[:, None, None]
    if step[1]:
        z = z + (np.arange(box[1].start, box[1].stop) * step[1]).astype(np.float32)[None, :, None]
    if step[0]:
        z = z + (np.arange(box[2].start, box[2].stop) * step[0]).astype(np.float32)[None, None, :]
    return z


def _thirds(image: sitk.Image, box: tuple, inside: np.ndarray) -> np.ndarray:
    """Zone of every lung voxel (``inside`` the box): 0 lower, 1 middle, 2 upper third of the lungs' z extent.
    Computed once per distinct z (per slice of an axial scan), then spread over the lung voxels."""
    z = _physical_z(image, box)
    constant = tuple(a for a in range(3) if z.shape[a] == 1)  # axes along which z does not change
    occupied = inside.any(axis=constant, keepdims=True) if constant else inside
    lung_z = z[np.broadcast_to(occupied, z.shape)]
    z_min, z_max = float(lung_z.min()), float(lung_z.max())
    t = (z - z_min) / (z_max - z_min) if z_max > z_min else np.full(z.shape, 0.5, dtype=np.float32)
    zone = (t >= 1.0 / 3.0).astype(np.uint8) + (t >= 2.0 / 3.0)
    return np.broadcast_to(zone, inside.shape)[inside]


def _known_labels(lab: np.ndarray, known: list) -> np.ndarray:
    """UInt8 labels with every value not in ``known`` (labels 1..255) set to 0, unlabelled."""
    if lab.dtype == np.uint8:
        table = np.zeros(256, np.uint8)
        table[known] = known
        return table[lab]
    return np.where(np.isin(lab, known), lab, 0).astype(np.uint8)


def lung_cells(lungs: sitk.Image) -> tuple:
    """``(box, inside, group)``: the lungs' bounding box, which of its voxels are lung, and each lung voxel's cell
    ``3 * side + zone`` (side 1 right, 2 left, 0 any other mask value; zone 0 lower, 1 middle, 2 upper). A region of
    :data:`REGIONS` is the set of cells :data:`REGION_CELLS` picks from the cells arranged as [side, zone]."""
    lung_all = sitk.GetArrayViewFromImage(lungs)
    box = mask_box(lung_all)
    if box is None:
        raise InputError("The lung mask is empty, so there is no lung to measure. Check the mask or segment the lungs again.")
    side = lung_all[box]
    inside = side != 0
    side = side[inside]
    group = _thirds(lungs, box, inside)  # 3 * side + zone, side 0 for other non-zero mask values
    group[side == RIGHT_LUNG] += 3 * RIGHT_LUNG
    group[side == LEFT_LUNG] += 3 * LEFT_LUNG
    return box, inside, group


def composition_table(labels: sitk.Image, ct: sitk.Image, lungs: sitk.Image, names: dict,
                      segments: MaskSegments | None = None, *, cells: tuple | None = None) -> pd.DataFrame:
    """Per region and cluster: fraction of the region's lung, volume (mL), mean and SD of HU.

    ``labels``: cluster label map (integer, 0 = none); ``ct``: HU image; ``lungs``: lung mask (1 right, 2 left; any
    other non-zero value counts for ``whole`` and the zones only); ``names``: ``{label: name}`` of the clusters;
    ``segments``: the segments of a several-segment mask (:mod:`latentharmonize.segments`), one more region each;
    ``cells``: :func:`lung_cells` of ``lungs`` when the caller has it already. All images must share one geometry.
    Returns a DataFrame with columns :data:`COLUMNS`, one row per region and cluster of ``names`` (zero rows
    included), plus an ``unlabelled`` row where some lung voxels carry no cluster.
    """
    if not names:
        raise InputError("No cluster names given: pass {label: name} for the clusters of the label map.")
    if any(int(k) <= 0 or int(k) > 255 for k in names):
        raise InputError(f"Cluster labels must be 1..255, got {sorted(names)}.")
    _check_same_grid(labels, ct, "CT")
    _check_same_grid(labels, lungs, "lung mask")
    if segments is not None:
        _check_same_grid(labels, segments.labels, "segment mask")
    box, inside, group = lung_cells(lungs) if cells is None else cells
    known = sorted(int(k) for k in names)
    lab = _known_labels(sitk.GetArrayViewFromImage(labels)[box][inside], known)
    hu = sitk.GetArrayViewFromImage(ct)[box][inside].astype(np.float64)

    # One set of bincounts over a combined (side, zone, label) cell index gives every region at once: a region is a
    # sum of cells. HU sums are taken about the whole-lung mean, so the variances suffer no cancellation.
    cell = group.astype(np.intp)
    cell *= 256
    cell += lab
    centre = hu.mean()
    hu -= centre
    count, lin, sq = (np.bincount(cell, weights=w, minlength=9 * 256).reshape(3, 3, 256)
                      for w in (None, hu, np.square(hu)))
    sums = {region: [a[REGION_CELLS[region]].reshape(-1, 256).sum(axis=0) for a in (count, lin, sq)]
            for region in REGIONS}
    if segments is not None:  # one more bincount over (segment, label) cells
        code, regions = segment_codes(segments, box, inside)
        cell = code * 256 + lab
        count, lin, sq = (np.bincount(cell, weights=w, minlength=(len(regions) + 1) * 256).reshape(-1, 256)
                          for w in (None, hu, np.square(hu)))
        sums.update({region: [count[k], lin[k], sq[k]] for k, region in enumerate(regions, 1)})
    voxel_ml = float(np.prod(labels.GetSpacing())) / 1000.0
    rows = []
    for region, (n_r, lin_r, sq_r) in sums.items():
        n_region = int(n_r.sum())
        if n_region == 0:
            continue
        shown = known + ([0] if n_r[0] else [])
        for label in shown:
            n = int(n_r[label])
            mean = centre + lin_r[label] / n if n else math.nan
            var = max(sq_r[label] / n - (lin_r[label] / n) ** 2, 0.0) if n else math.nan
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
                        lung_volumes: dict | None = None, densitometry: pd.DataFrame | None = None) -> str:
    """The composition table as JSON text, with cluster names and colours, lung volumes (mL) and the model id.

    Layout: ``{"model_sha256", "clusters": [{label, name, color}], "lung_volumes_ml": {right, left, total},
    "regions": {region: [{label, name, fraction, volume_ml, mean_hu, sd_hu}]}}``, and with ``densitometry`` (the
    table of :func:`latentharmonize.densitometry.densitometry_table`) ``"densitometry": [{region, laa950_pct, ...}]``.
    NaN (empty cluster) is ``null``. Keys are sorted so identical tables give identical bytes.
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
    if densitometry is not None:
        doc["densitometry"] = [{col: _clean(v) for col, v in row.items()} for row in densitometry.to_dict("records")]
    return json.dumps(doc, indent=1, sort_keys=True, allow_nan=False) + "\n"
