"""Lung densitometry: the HU indices that SlicerLungCTAnalyzer and the Chest Imaging Platform report, and that
readers compare a tissue composition with first.

- ``laa950_pct``: low-attenuation area, % of the region's lung voxels below -950 HU (emphysema);
- ``haa700_250_pct``: high-attenuation area, % of lung voxels from -700 to -250 HU inclusive (ground glass and
  reticulation; denser consolidation and vessels above -250 HU are left out);
- ``mld_hu``: mean lung density (HU); ``perc15_hu``: the 15th percentile of lung HU (linear interpolation between
  voxels, as ``numpy.percentile``);
- ``laa950_matched_pct``, ``perc15_matched_hu``: the same two emphysema indices read *noise-matched*, as the model
  reads the scan (:func:`matched_lung_hu`): HU calibrated on the scan's air and fat where the bundle calibrates, on
  the model grid, blurred in-plane by the scan's noise-matched low-pass (a sharp or low-dose reconstruction until its
  noise is a soft kernel's) and along z to 5 mm slices' resolution. A sharp kernel's noise fills the tail below
  -950 HU; matched, the indices hardly move with the kernel, and the 15th percentile keeps mild emphysema
  (``docs/experiments/2026-12-07-noise-matched-densitometry.md``);
- ``volume_ml``: the region's lung volume.

Computed on the CT's own voxels inside the lung mask, with no resampling (the matched columns: each lung voxel reads
the model-grid voxel nearest to it), per region of
:mod:`latentharmonize.composition` (``whole``, ``right``, ``left``, ``upper``, ``middle``, ``lower``, then one per
mask segment). :func:`density_indices` is the one definition for any set of lung HU values.

The same thresholds summarise single patches (:func:`patch_hu_statistics`, what ``train --densitometry`` appends
to the latents and the ``hu_statistics`` reference reads; :func:`patch_profiles`, what names the clusters) and a
whole lung (:func:`lung_hu_indices`, the evaluation's densitometry baseline). :func:`smooth_lung` is the in-plane
blur read before the patch statistics when a bundle asks for it.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter

from .composition import REGION_CELLS, REGIONS, _check_same_grid, lung_cells
from .errors import InputError
from .segments import MaskSegments, segment_codes

LAA_THRESHOLD_HU = -950.0  # emphysema: the low-attenuation area
HAA_THRESHOLD_HU = -700.0  # ground glass and fibrosis above it
DENSE_THRESHOLD_HU = -300.0  # consolidation and vessels above it
HAA_RANGE_HU = (HAA_THRESHOLD_HU, -250.0)
PERCENTILE = 15.0
COLUMNS = ["region", "laa950_pct", "haa700_250_pct", "mld_hu", "perc15_hu", "laa950_matched_pct", "perc15_matched_hu",
           "volume_ml"]
MATCHED = {"laa950_matched_pct": "laa950_pct", "perc15_matched_hu": "perc15_hu"}  # matched column: the index it reads


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
                       cells: tuple | None = None, matched=None) -> pd.DataFrame:
    """One row per region with lung voxels: columns :data:`COLUMNS`. ``lungs``: lung mask (1 right, 2 left, as for
    the composition); ``segments``: the segments of a several-segment mask, one more row each; ``cells``:
    :func:`latentharmonize.composition.lung_cells` of ``lungs`` when the caller has it already; ``matched``: the
    noise-matched HU of every lung voxel, in the mask's [z, y, x] order (:func:`matched_lung_hu`; a NaN reads the
    voxel's own HU), which the matched columns read (NaN without it). Same geometry for all images.

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
    if matched is not None:
        matched = np.asarray(matched, dtype=np.float64).ravel()
        if matched.size != hu.size:
            raise InputError(f"Got {matched.size} matched HU values for {hu.size} lung voxels; give one per lung "
                             "voxel of this mask.")
        matched = np.rint(np.where(np.isnan(matched), hu, matched))  # no lung near on the grid: the voxel's own HU
        matched = {region: _histogram_indices(histogram, lowest) for region, (histogram, lowest) in
                   _region_histograms(matched.astype(np.int32), group, code, regions).items() if histogram.any()}
    if hu.dtype.kind in "iu":
        for region, (histogram, lowest) in _region_histograms(hu, group, code, regions).items():
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
    for row in rows:
        row.update({column: np.nan if matched is None else matched[row["region"]][index]
                    for column, index in MATCHED.items()})
    return pd.DataFrame(rows, columns=COLUMNS)


def _region_histograms(hu: np.ndarray, group: np.ndarray, code, regions: list) -> dict:
    """``{region: (HU histogram, its lowest HU)}`` of integer lung HU ``hu``: one histogram per (side, zone) cell,
    summed into the regions, and one per segment (``code``: each voxel's segment, 0 for none)."""
    lowest = int(hu.min())
    span = int(hu.max()) - lowest + 1
    offset = hu.astype(np.intp) - lowest
    cells = np.bincount(group.astype(np.intp) * span + offset, minlength=9 * span).reshape(3, 3, span)
    counts = {region: cells[REGION_CELLS[region]].reshape(-1, span).sum(axis=0) for region in REGIONS}
    if code is not None:
        per_segment = np.bincount(code * span + offset, minlength=(len(regions) + 1) * span).reshape(-1, span)
        counts.update({region: per_segment[k] for k, region in enumerate(regions, 1)})
    return {region: (histogram, lowest) for region, histogram in counts.items()}


MATCHED_MIN_WEIGHT = 0.01  # a voxel whose blur holds less lung than this has no matched HU (NaN)


def matched_lung_hu(hu: np.ndarray, lung: np.ndarray, lowpass_mm: float, spacing, sigma_z_mm: float) -> np.ndarray:
    """Model-grid ``hu`` as the noise-matched indices read it: the lung's HU blurred in-plane with the scan's
    noise-matched low-pass SD ``lowpass_mm`` (``patches.encoder_input``) and by ``sigma_z_mm`` along z (to 5 mm
    slices' resolution: ``DensitometryEntry.added_z_mm``), normalised over the lung so that the chest wall and the
    mediastinum do not raise its edge. Voxels just outside the grid's lung read the lung beside them (a CT lung
    voxel at the mask's edge can have its nearest grid voxel there); NaN where no lung is near."""
    blurred, weight = _lung_weighted_blur(hu, lung, lowpass_mm, spacing, sigma_z_mm)
    return np.where(lung | (weight >= MATCHED_MIN_WEIGHT), blurred, np.nan).astype(np.float32)


# ----------------------------------------------------------------------------- lung and patch summaries
def lung_hu_indices(hu, lung) -> dict:
    """Whole-lung densitometry: % voxels below -950 HU, % above -700 HU, mean HU, 15th percentile HU (keys
    ``laa950``, ``haa700``, ``mld``, ``perc15``). HAA here stays "above -700 HU", the evaluation's recorded baseline.

    ``hu`` and ``lung`` are numpy arrays of one shape or SimpleITK images (any non-zero mask value is lung).
    """
    hu = sitk.GetArrayFromImage(hu) if isinstance(hu, sitk.Image) else np.asarray(hu)
    lung = sitk.GetArrayFromImage(lung) if isinstance(lung, sitk.Image) else np.asarray(lung)
    if hu.shape != lung.shape:
        raise InputError(f"CT {hu.shape} and lung mask {lung.shape} differ in size; give the mask made for this CT.")
    values = hu[lung > 0].astype(np.float64)
    if values.size == 0:
        raise InputError("The lung mask is empty; densitometry needs lung voxels.")
    indices = density_indices(values)
    return {
        "laa950": indices["laa950_pct"],
        "haa700": float(100.0 * np.mean(values > HAA_THRESHOLD_HU)),
        "mld": indices["mld_hu"],
        "perc15": indices["perc15_hu"],
    }


# Quantiles (%) and thresholds (HU) of :func:`patch_hu_statistics`: the histogram summaries of lung densitometry.
HU_STATISTIC_QUANTILES = (10, 25, 50, 75, 90)
HU_STATISTIC_NAMES = tuple(f"q{q}" for q in HU_STATISTIC_QUANTILES) + ("below_950", "above_700", "above_300")


PATCH_BLOCK = 2048  # patches per block of :func:`patch_hu_statistics`; a caller cutting patches may cut as many
_SORTED_PART = 512  # the longest row numpy's vectorised sort takes without a slower partitioning pass


def patch_hu_statistics(values: np.ndarray) -> np.ndarray:
    """Per patch: HU quantiles and threshold shares of its lung voxels, float32 [n, 8] (columns
    ``HU_STATISTIC_NAMES``). ``values`` [n, ...] holds each patch's HU with NaN where it is not lung. Quantiles are
    the nearest-rank values of the lung voxels of the patch.

    Rows go in blocks that stay in cache, each row sorted as two parts of at most :data:`_SORTED_PART` voxels
    (numpy's vectorised sort takes such short rows several times faster than one of 768) and each quantile picked
    from the two sorted parts by :func:`_kth_of_two`: the same values as one sort of the whole row."""
    values = values.reshape(len(values), -1)
    blocks = [_block_statistics(values[start:start + PATCH_BLOCK]) for start in range(0, len(values), PATCH_BLOCK)]
    return np.vstack(blocks)


def _block_statistics(values: np.ndarray) -> np.ndarray:
    n_lung = _count_per_row(~np.isnan(values))
    if np.any(n_lung == 0):
        raise InputError("A patch at the given positions holds no lung voxel; pass the positions of valid centres.")
    ranks = np.rint(np.outer(n_lung - 1, np.asarray(HU_STATISTIC_QUANTILES) / 100.0)).astype(np.int64)
    first = np.sort(values[:, :_SORTED_PART], axis=1)  # NaN (not lung) sorts last; every rank is below n_lung
    rest = np.sort(values[:, _SORTED_PART:], axis=1)
    quantiles = _kth_of_two(first, rest, ranks) if rest.shape[1] else np.take_along_axis(first, ranks, axis=1)
    shares = [_count_per_row(test) / n_lung for test in
              (values < LAA_THRESHOLD_HU, values > HAA_THRESHOLD_HU, values > DENSE_THRESHOLD_HU)]
    return np.column_stack([quantiles, *shares]).astype(np.float32)


def _count_per_row(test: np.ndarray) -> np.ndarray:
    """``np.count_nonzero(test, axis=1)`` of a boolean [n, m], summed as bytes (several times faster)."""
    return test.view(np.int8).sum(axis=1, dtype=np.int32)


def _kth_of_two(first: np.ndarray, second: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """Per row, the values of 0-based ``ranks`` [n, m] in the union of the sorted rows of ``first`` [n, a] and
    ``second`` [n, b], NaN counting as above every number: a binary search, all rows at once, for how many of the
    rank + 1 smallest come from ``first``. Each rank must be below the row's count of numbers."""
    a, b = first.shape[1], second.shape[1]
    first, second = first.ravel(), second.ravel()
    at_first = np.arange(len(ranks))[:, None] * a
    at_second = np.arange(len(ranks))[:, None] * b + ranks  # second[row, rank - i] is second[at_second - i]
    lo, hi = np.maximum(ranks + 1 - b, 0), np.minimum(ranks + 1, a)
    while np.any(lo < hi):
        i = (lo + hi) >> 1  # below a and at most rank where lo < hi; elsewhere clipped and not used
        x, y = first[at_first + np.minimum(i, a - 1)], second[at_second - np.minimum(i, ranks)]
        below = (x < y) | (np.isnan(y) & ~np.isnan(x))
        lo = np.where(below & (lo < hi), i + 1, lo)
        hi = np.where(below, hi, i)
    last_first = first[at_first + np.maximum(lo - 1, 0)]
    last_second = second[at_second - np.minimum(lo, ranks)]
    return np.where(lo == 0, last_second, np.where(lo == ranks + 1, last_first, np.maximum(last_first, last_second)))


# Per-patch HU statistics (centre slice) whose cluster means make a cluster's profile; the names use the median,
# the lower quartile (the parenchyma between the structures) and voxel shares, which a bright minority of voxels (a
# vessel or a bronchial wall crossing the patch) barely moves, unlike the mean and SD.
PROFILE_KEYS = ("mean_hu", "sd_hu", "median_hu", "q25_hu", "frac_below_950", "frac_above_700", "frac_above_300")


def patch_profiles(hu_patches) -> dict:
    """Per-patch HU statistics [n] (the keys of ``PROFILE_KEYS``) from HU patches [n, ...], for naming clusters."""
    hu = np.asarray(hu_patches, dtype=np.float64)
    if hu.ndim < 2 or hu.shape[0] == 0:
        raise InputError(f"hu_patches must be an array [n_patches, ...voxels], got shape {hu.shape}.")
    flat = hu.reshape(hu.shape[0], -1)
    return {"mean_hu": flat.mean(axis=1), "sd_hu": flat.std(axis=1), "median_hu": np.median(flat, axis=1),
            "q25_hu": np.percentile(flat, 25, axis=1), "frac_below_950": (flat < LAA_THRESHOLD_HU).mean(axis=1),
            "frac_above_700": (flat > HAA_THRESHOLD_HU).mean(axis=1),
            "frac_above_300": (flat > DENSE_THRESHOLD_HU).mean(axis=1)}


def smooth_lung(hu: np.ndarray, lung: np.ndarray, sigma_mm: float, spacing, sigma_z_mm: float = 0.0) -> np.ndarray:
    """In-plane Gaussian blur (SD ``sigma_mm``; ``sigma_z_mm`` along z) of the lung HU on a grid of ``spacing``
    (x, y, z) mm, normalised over lung voxels so the chest wall does not bleed in; voxels outside the lung keep their
    HU. It removes most of a sharp kernel's extra high-frequency noise, which otherwise fills the tails of the
    histogram (the emphysema index), and keeps regional density."""
    blurred, _ = _lung_weighted_blur(hu, lung, sigma_mm, spacing, sigma_z_mm)
    return np.where(lung, blurred, hu).astype(np.float32)


def _lung_weighted_blur(hu: np.ndarray, lung: np.ndarray, sigma_mm: float, spacing, sigma_z_mm: float) -> tuple:
    """``(blurred, weight)``: the Gaussian blur of the lung's HU divided by that of the lung mask (``weight``), at
    every voxel: inside the lung :func:`smooth_lung`, beside it the lung nearby."""
    sigma = (sigma_z_mm / spacing[2], sigma_mm / spacing[1], sigma_mm / spacing[0])
    weight = gaussian_filter(lung.astype(np.float32), sigma)
    return gaussian_filter(np.where(lung, hu, 0.0).astype(np.float32), sigma) / np.maximum(weight, 1e-6), weight
