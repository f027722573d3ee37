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
    values = np.asarray(values).ravel()
    if values.size == 0:
        raise InputError("No lung voxels to measure: densitometry needs a non-empty lung region.")
    low, high = HAA_RANGE_HU
    return {"laa950_pct": 100.0 * np.count_nonzero(values < LAA_THRESHOLD_HU) / values.size,
            "haa700_250_pct": 100.0 * np.count_nonzero((values >= low) & (values <= high)) / values.size,
            "mld_hu": float(values.mean(dtype=np.float64)),
            "perc15_hu": float(np.percentile(values, PERCENTILE))}


def densitometry_table(ct: sitk.Image, lungs: sitk.Image, segments: MaskSegments | None = None) -> pd.DataFrame:
    """One row per region with lung voxels: columns :data:`COLUMNS`. ``lungs``: lung mask (1 right, 2 left, as for
    the composition); ``segments``: the segments of a several-segment mask, one more row each. Same geometry for
    all images."""
    _check_same_grid(lungs, ct, "CT")
    if segments is not None:
        _check_same_grid(lungs, segments.labels, "segment mask")
    box, inside, group = lung_cells(lungs)
    hu = sitk.GetArrayViewFromImage(ct)[box][inside]
    cells = np.arange(9).reshape(3, 3)
    chosen = {region: np.isin(group, cells[REGION_CELLS[region]]) for region in REGIONS}
    if segments is not None:
        code, regions = segment_codes(segments, box, inside)
        chosen.update({region: code == k for k, region in enumerate(regions, 1)})
    voxel_ml = float(np.prod(lungs.GetSpacing())) / 1000.0
    rows = []
    for region, voxels in chosen.items():
        n = int(np.count_nonzero(voxels))
        if n:
            rows.append({"region": region, **density_indices(hu[voxels]), "volume_ml": n * voxel_ml})
    return pd.DataFrame(rows, columns=COLUMNS)
