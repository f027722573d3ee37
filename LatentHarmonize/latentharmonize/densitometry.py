"""Lung densitometry: the HU indices that SlicerLungCTAnalyzer and the Chest Imaging Platform report, and that
readers compare a tissue composition with first.

- ``laa950_pct``: low-attenuation area, % of the region's lung voxels below -950 HU (emphysema);
- ``haa700_250_pct``: high-attenuation area, % of lung voxels from -700 to -250 HU inclusive (ground glass and
  reticulation; denser consolidation and vessels above -250 HU are left out);
- ``mld_hu``: mean lung density (HU); ``perc15_hu``: the 15th percentile of lung HU (linear interpolation between
  voxels, as ``numpy.percentile``);
- ``volume_ml``: the region's lung volume.

Computed on the CT's own voxels inside the lung mask, with no resampling, per region of
:mod:`latentharmonize.composition` (``whole``, ``right``, ``left``, ``upper``, ``middle``, ``lower``, then one per
mask segment). :func:`density_indices` is the one definition for any set of lung HU values.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import SimpleITK as sitk

from .composition import REGION_CELLS, REGIONS, _check_same_grid, lung_cells
from .errors import InputError
from .segments import MaskSegments, segment_codes

LAA_THRESHOLD_HU = -950.0
HAA_RANGE_HU = (-700.0, -250.0)
PERCENTILE = 15.0
COLUMNS = ["region", "laa950_pct", "haa700_250_pct", "mld_hu", "perc15_hu", "volume_ml"]


def density_indices(values) -> dict:
    """The densitometry of a set of lung voxels' HU values: ``laa950_pct``, ``haa700_250_pct``, ``mld_hu``,
    ``perc15_hu`` (see the module's docstring)."""
    values = np.asarray(values, dtype=np.float64).ravel()  # float32 percentiles would round to float32
    if values.size == 0:
        raise InputError("No lung voxels to measure: densitometry needs a non-empty lung region.")
    low, high = HAA_RANGE_HU
    return {"laa950_pct": 100.0 * (np.count_nonzero(values < LAA_THRESHOLD_HU) / values.size),
            "haa700_250_pct": 100.0 * (np.count_nonzero((values >= low) & (values <= high)) / values.size),
            "mld_hu": float(values.mean()),
            "perc15_hu": float(np.percentile(values, PERCENTILE))}


def _histogram_indices(counts: np.ndarray, lowest: int) -> dict:
    """:func:`density_indices` of the voxels whose HU histogram is ``counts`` (``counts[i]`` voxels at ``lowest + i``
    HU), with the percentile interpolated as ``numpy.percentile`` does between the two order statistics around it."""
    n = int(counts.sum())
    hu = np.arange(lowest, lowest + counts.size, dtype=np.float64)
    position = PERCENTILE / 100.0 * (n - 1)
    k = math.floor(position)
    t = position - k
    a, b = hu[np.searchsorted(np.cumsum(counts), [k, min(k + 1, n - 1)], side="right")]
    low, high = HAA_RANGE_HU
    return {"laa950_pct": 100.0 * (int(counts[hu < LAA_THRESHOLD_HU].sum()) / n),
            "haa700_250_pct": 100.0 * (int(counts[(hu >= low) & (hu <= high)].sum()) / n),
            "mld_hu": float(counts @ hu) / n,
            "perc15_hu": float(b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t)}


def densitometry_table(ct: sitk.Image, lungs: sitk.Image, segments: MaskSegments | None = None, *,
                       cells: tuple | None = None) -> pd.DataFrame:
    """One row per region with lung voxels: columns :data:`COLUMNS`. ``lungs``: lung mask (1 right, 2 left, as for
    the composition); ``segments``: the segments of a several-segment mask, one more row each; ``cells``:
    :func:`latentharmonize.composition.lung_cells` of ``lungs`` when the caller has it already. Same geometry for
    all images.

    An integer CT (the usual Int16) is counted in one HU histogram per (side, zone) cell and per segment, a region
    being a sum of cells: one pass over the lung instead of a percentile per region. A float CT takes the region's
    voxels through :func:`density_indices`.
    """
    _check_same_grid(lungs, ct, "CT")
    if segments is not None:
        _check_same_grid(lungs, segments.labels, "segment mask")
    box, inside, group = lung_cells(lungs) if cells is None else cells
    hu = sitk.GetArrayViewFromImage(ct)[box][inside]
    code, regions = segment_codes(segments, box, inside) if segments is not None else (None, [])
    voxel_ml = float(np.prod(lungs.GetSpacing())) / 1000.0
    rows = []
    if hu.dtype.kind in "iu":
        lowest = int(hu.min())
        span = int(hu.max()) - lowest + 1
        offset = hu.astype(np.intp) - lowest
        cells = np.bincount(group.astype(np.intp) * span + offset, minlength=9 * span).reshape(3, 3, span)
        counts = {region: cells[REGION_CELLS[region]].reshape(-1, span).sum(axis=0) for region in REGIONS}
        if segments is not None:
            per_segment = np.bincount(code * span + offset, minlength=(len(regions) + 1) * span).reshape(-1, span)
            counts.update({region: per_segment[k] for k, region in enumerate(regions, 1)})
        for region, histogram in counts.items():
            n = int(histogram.sum())
            if n:
                rows.append({"region": region, **_histogram_indices(histogram, lowest), "volume_ml": n * voxel_ml})
    else:
        ids = np.arange(9).reshape(3, 3)
        chosen = {region: np.isin(group, ids[REGION_CELLS[region]]) for region in REGIONS}
        chosen.update({region: code == k for k, region in enumerate(regions, 1)})
        for region, voxels in chosen.items():
            n = int(np.count_nonzero(voxels))
            if n:
                rows.append({"region": region, **density_indices(hu[voxels]), "volume_ml": n * voxel_ml})
    return pd.DataFrame(rows, columns=COLUMNS)
