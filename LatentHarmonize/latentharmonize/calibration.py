"""Internal-reference HU calibration: map a scan's HU so that the air around the body reads -1000 and fat -100.

Vendors calibrate HU a few tens of HU apart (field notes section 2), about as far as emphysema moves lung density,
so a model that reads absolute density cannot tell the two apart. Densitometry studies correct with references that
every chest CT holds (tracheal air, blood, fat); this does the same with two of them:

- **air**: voxels below -400 HU connected to the in-plane image border (outside the body), eroded away from the body
  surface. Scanners store HU from -1024, so air that a vendor calibrates below that is clipped: when more than half
  the air sits at the floor, its level is extrapolated from the upper quartiles of a normal fit (a censored normal);
- **fat** (subcutaneous and mediastinal): the mode of the HU histogram between -200 and -20 HU inside the body and
  away from the lungs, whose fibrotic walls and lines also fall in that range. The mode, not the mean, so that muscle
  and partial-volume voxels do not pull it. Its candidates are the soft tissue voxels (-250..50 HU) one pixel in from
  the edge of their region, so noise speckle inside muscle, whose tails reach the fat range on sharp kernels, does
  not count.

The linear map through both points is applied to the model-grid HU before encoding (``apply``). The references are
found on every ``SLICE_STEP``-th slice: levels of large regions need no more.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage, stats

from .errors import InputError
from .lungmask import AIR_HU, outside_air

METHODS = ("air_fat",)
REFERENCE_AIR_HU = -1000.0
REFERENCE_FAT_HU = -100.0
HU_FLOOR = -1024.0
FAT_RANGE_HU = (-200.0, -20.0)
MAX_SCALE_ERROR = 0.15   # |scale - 1| beyond this is no vendor calibration but a failed reference
MAX_OFFSET_HU = 150.0
MIN_VOXELS = 500
SLICE_STEP = 4
SOFT_TISSUE_HU = (-250.0, 50.0)


@dataclass(frozen=True)
class HUCalibration:
    """Measured reference levels of one scan and the linear map that puts them at -1000 and -100 HU."""

    air_hu: float
    fat_hu: float

    @property
    def scale(self) -> float:
        return (self.fat_hu - self.air_hu) / (REFERENCE_FAT_HU - REFERENCE_AIR_HU)

    @property
    def offset(self) -> float:
        return self.air_hu - self.scale * REFERENCE_AIR_HU

    def apply(self, hu: np.ndarray) -> np.ndarray:
        """Calibrated HU (float32): the inverse of the scan's ``scale * HU + offset``."""
        return (np.asarray(hu, dtype=np.float32) - np.float32(self.offset)) / np.float32(self.scale)

    def as_dict(self) -> dict:
        return {**{k: round(v, 2) for k, v in asdict(self).items()}, "scale": round(self.scale, 5),
                "offset": round(self.offset, 2)}


def air_level(values: np.ndarray, floor: float = HU_FLOOR) -> float:
    """Level of the air peak; values clipped at ``floor`` are treated as censored (normal fit of the upper half)."""
    q50, q75, q90 = np.percentile(values, [50, 75, 90])
    if q50 > floor + 0.5:
        return float(q50)
    if q75 <= floor + 0.5:
        raise InputError(f"More than three quarters of the air around the body sits at the {floor:.0f} HU floor, so "
                         "its level cannot be measured; use a model bundle trained without --calibrate.")
    sigma = (q90 - q75) / (stats.norm.ppf(0.9) - stats.norm.ppf(0.75))
    return float(q75 - stats.norm.ppf(0.75) * sigma)


def fat_level(values: np.ndarray) -> float:
    """Mode of the fat peak (1 HU bins, smoothed over a few HU)."""
    lo, hi = FAT_RANGE_HU
    counts, edges = np.histogram(values, bins=np.arange(lo, hi + 1.0, 1.0))
    return float(edges[np.argmax(ndimage.gaussian_filter1d(counts.astype(np.float64), 4.0))] + 0.5)


def estimate_calibration(ct: sitk.Image, lungs: sitk.Image) -> HUCalibration:
    """Air and fat references of a chest CT (HU) with its lung mask (on the CT's grid). Raises InputError when either
    reference cannot be found."""
    hu = sitk.GetArrayViewFromImage(ct)[::SLICE_STEP].astype(np.float32)
    lung = sitk.GetArrayViewFromImage(lungs)[::SLICE_STEP] > 0
    outside = outside_air(hu < AIR_HU)
    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    air = ndimage.binary_erosion(outside, in_plane, iterations=3)
    body = ~ndimage.binary_dilation(outside, in_plane, iterations=2) & ~ndimage.binary_dilation(lung, in_plane,
                                                                                                 iterations=2)
    soft = ndimage.binary_erosion(body & (hu > SOFT_TISSUE_HU[0]) & (hu < SOFT_TISSUE_HU[1]), in_plane)
    lo, hi = FAT_RANGE_HU
    soft &= (hu > lo) & (hu < hi)
    for what, region in (("air around the body", air), ("fat inside the body", soft)):
        if region.sum() < MIN_VOXELS:
            raise InputError(f"Cannot calibrate HU: the scan shows too little {what} (the field of view may be cropped "
                             "to the lungs); use a model bundle trained without --calibrate.")
    calibration = HUCalibration(air_level(hu[air]), fat_level(hu[soft]))
    if abs(calibration.scale - 1.0) > MAX_SCALE_ERROR or abs(calibration.offset) > MAX_OFFSET_HU:
        raise InputError(f"Cannot calibrate HU: air reads {calibration.air_hu:.0f} HU and fat {calibration.fat_hu:.0f} "
                         "HU, too far from -1000 and -100 for a scanner's calibration; check that the image is a CT in "
                         "HU, or use a model bundle trained without --calibrate.")
    return calibration


def calibrate_grid_hu(hu: np.ndarray, ct: sitk.Image, lungs: sitk.Image, spec) -> tuple:
    """(model-grid HU, calibration or None): the spec's calibration of ``ct`` applied to ``hu``."""
    if spec.calibration is None:
        return hu, None
    calibration = estimate_calibration(ct, lungs)
    return calibration.apply(hu), calibration
