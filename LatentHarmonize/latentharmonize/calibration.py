"""Internal-reference HU calibration: map a scan's HU so that air reads -1000 and fat -100.

Vendors calibrate HU a few tens of HU apart (field notes section 2), about as far as emphysema moves lung density,
so a model that reads absolute density cannot tell the two apart. Densitometry studies correct with references that
every chest CT holds (tracheal air, blood, fat); this does the same with two of them:

- **air**: the air around the body (``outside_air``): voxels below -400 HU connected to the in-plane image border,
  with the lung mask and a 2-pixel rim around it (lungs cut by a cropped field of view touch the border too) and the
  padding outside the reconstruction circle left out, eroded away from the body surface. A level outside
  ``AIR_LEVEL_RANGE_HU`` is no air (lung that the mask of a tightly cropped scan missed). A field of view cut
  left-right through the lungs still shows the air in front of and behind the body, and calibrates to within a few
  HU of the whole scan.

  The air in the trachea and main bronchi (``tracheal_air``: the core of the airway that ``structures.trachea_seed``
  finds, ``TRACHEA_CORE_MM`` in from its wall) is measured too (:func:`reference_levels`) but not used: on the
  phantom it reads as the outside air does, but on real scans 18-40 HU above it and 16 HU apart between the soft
  and sharp kernels of one raw scan, so calibrating on it moved LAA-950 by up to 12 points where not calibrating
  moved it by at most 4 (docs/calibration.md). ``estimate_calibration(..., air_references=...)`` can still use it.

  Scanners store HU from -1024, so air that a vendor calibrates below that is clipped: when more than half the air
  sits at the floor, its level is extrapolated from the upper quartiles of a normal fit (a censored normal);
- **fat** (subcutaneous and mediastinal): the mode of the HU histogram between -200 and -20 HU inside the body and
  away from the lungs, whose fibrotic walls and lines also fall in that range. The mode, not the mean, so that muscle
  and partial-volume voxels do not pull it. Its candidates are the soft tissue voxels (-250..50 HU) one pixel in from
  the edge of their region, so noise speckle inside muscle, whose tails reach the fat range on sharp kernels, does
  not count.

The linear map through both points is applied to the model-grid HU before encoding (``apply``). The references are
found on slices about ``REFERENCE_SLICE_MM`` apart (every ``SLICE_STEP``-th slice at most, as many per mm of scan
whatever the slice thickness): levels of large regions need no more.

``scan_calibration(..., required=False)`` (analyze) does not refuse a scan without usable references (a field of
view cropped to the body on all sides, an air level that is no air): the HU are left as they are and the result
(:class:`CalibrationUnavailable`) carries the warning ``calibration_unavailable``. Training (``required=True``)
refuses such a scan, as it always did.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage, stats

from .errors import InputError
from .lungmask import AIR_HU, PAD_HU, outside_air
from .structures import TRACHEA_AIR_HU, trachea_seed

METHODS = ("air_fat",)
REFERENCE_AIR_HU = -1000.0
REFERENCE_FAT_HU = -100.0
HU_FLOOR = -1024.0
FAT_RANGE_HU = (-200.0, -20.0)
MAX_SCALE_ERROR = 0.15   # |scale - 1| beyond this is no vendor calibration but a failed reference
MAX_OFFSET_HU = 150.0
AIR_LEVEL_RANGE_HU = (-1080.0, -920.0)  # an air reference outside this is no air (vendors: a few tens of HU off)
MIN_VOXELS = 500
SLICE_STEP = 4
REFERENCE_SLICE_MM = 5.0  # thicker slices are all read: a sparse sample of thick slices moved fat by up to 3 HU
SOFT_TISSUE_HU = (-250.0, 50.0)
TRACHEA_CORE_MM = 2.5    # in-plane erosion of the airway lumen: away from its wall's partial volume and overshoot
AIR_REFERENCES = ("outside_air",)  # tried in order; tracheal air reads too high on real scans (docs/calibration.md)
AIR_REFERENCE_NAMES = {"outside_air": "air around the body", "tracheal_air": "tracheal air"}
UNAVAILABLE = "calibration_unavailable"


class CalibrationError(InputError):
    """The scan's HU cannot be calibrated; ``reason`` says why in a few words."""

    def __init__(self, reason: str, advice: str):
        super().__init__(f"Cannot calibrate HU: {reason}. {advice}")
        self.reason = reason


@dataclass(frozen=True)
class HUCalibration:
    """Measured reference levels of one scan and the linear map that puts them at -1000 and -100 HU."""

    air_hu: float
    fat_hu: float
    air_reference: str = "outside_air"

    applied = True
    warning = None

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
        return {"air_hu": round(self.air_hu, 2), "fat_hu": round(self.fat_hu, 2), "scale": round(self.scale, 5),
                "offset": round(self.offset, 2), "air_reference": self.air_reference, "applied": True}


@dataclass(frozen=True)
class CalibrationUnavailable:
    """A scan the bundle asked to calibrate but whose references could not be measured: HU are left as they are."""

    reason: str

    applied = False
    air_reference = None

    @property
    def warning(self) -> dict:
        return {"code": UNAVAILABLE, "message": (
            f"HU calibration was not possible ({self.reason}), so this scan was analysed on its HU as stored, while "
            "the model reads calibrated HU. On the real scans checked, stored lung HU were 0-25 HU from their "
            "calibrated values (LAA-950 up to 4.5 points): lung density, the low-attenuation share and the clusters "
            "may be shifted about as far as mild disease moves them. A field of view that shows some air around the "
            "body is calibrated.")}

    def apply(self, hu: np.ndarray) -> np.ndarray:
        return hu

    def as_dict(self) -> dict:
        return {"applied": False, "air_reference": None, "reason": self.reason}


def air_level(values: np.ndarray, floor: float = HU_FLOOR) -> float:
    """Level of the air peak; values clipped at ``floor`` are treated as censored (normal fit of the upper half)."""
    q50 = np.percentile(values, 50)  # alone: the upper quartiles (clipped air only) cost half as much again
    if q50 > floor + 0.5:
        return float(q50)
    q75, q90 = np.percentile(values, [75, 90])
    if q75 <= floor + 0.5:
        raise InputError(f"More than three quarters of the air sits at the {floor:.0f} HU floor, so its level "
                         "cannot be measured; use a model bundle trained without --calibrate.")
    sigma = (q90 - q75) / (stats.norm.ppf(0.9) - stats.norm.ppf(0.75))
    return float(q75 - stats.norm.ppf(0.75) * sigma)


def fat_level(values: np.ndarray) -> float:
    """Mode of the fat peak (1 HU bins, smoothed over a few HU)."""
    lo, hi = FAT_RANGE_HU
    counts, edges = np.histogram(values, bins=int(hi - lo), range=(lo, hi))  # uniform: binned without a search
    return float(edges[np.argmax(ndimage.gaussian_filter1d(counts.astype(np.float64), 4.0))] + 0.5)


def _axial_up(ct: sitk.Image, lungs: sitk.Image) -> tuple:
    """(hu, lung, (x, y, z) spacing): the CT and its mask as [z, y, x] arrays (views where possible) with z running
    inferior to superior (the trachea is found from the lungs' top slice)."""
    if abs(ct.GetDirection()[8]) < 0.7:  # not an axial stack: reorient (a copy)
        ct, lungs = sitk.DICOMOrient(ct, "LPS"), sitk.DICOMOrient(lungs, "LPS")
    hu, lung = sitk.GetArrayViewFromImage(ct), sitk.GetArrayViewFromImage(lungs)
    if ct.GetDirection()[8] < 0:  # slices stored superior to inferior
        hu, lung = hu[::-1], lung[::-1]
    return hu, lung, ct.GetSpacing()


def tracheal_air(hu: np.ndarray, lung: np.ndarray, step: int, seed: np.ndarray, spacing) -> np.ndarray:
    """Bool [z, y, x] on the full ``hu``: the core of the trachea and main bronchi.

    ``seed`` is ``structures.trachea_seed`` on every ``step``-th slice; around it, every slice is read: the pure air
    (below ``structures.TRACHEA_AIR_HU``) outside the lungs that joins the seed, its noise holes filled slice by
    slice, eroded ``TRACHEA_CORE_MM`` in-plane away from the wall.
    """
    out = np.zeros(hu.shape, bool)
    if not seed.any():
        return out
    z, y, x = np.nonzero(seed)
    z0, pad = int(z.min()), 3
    box = (slice(z0 * step, min((int(z.max()) + 1) * step, hu.shape[0])),
           slice(max(int(y.min()) - pad, 0), int(y.max()) + pad + 1),
           slice(max(int(x.min()) - pad, 0), int(x.max()) + pad + 1))
    labels, _ = ndimage.label((hu[box] < TRACHEA_AIR_HU) & (lung[box] == 0))
    at_seed = np.zeros(labels.shape, bool)
    at_seed[::step] = seed[z0:z0 + at_seed[::step].shape[0], box[1], box[2]]
    airway = np.isin(labels, np.unique(labels[at_seed & (labels > 0)])) & (labels > 0)
    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    airway = ndimage.binary_fill_holes(airway, in_plane)
    core = max(1, int(round(TRACHEA_CORE_MM / min(spacing[:2]))))
    out[box] = ndimage.binary_erosion(airway, in_plane, iterations=core)
    return out


def reference_regions(ct: sitk.Image, lungs: sitk.Image, tracheal: bool = True) -> dict:
    """{"outside_air", "tracheal_air", "fat": float32 HU of the reference voxels} of a chest CT (HU) with its lung
    mask (on the CT's grid). Outside air and fat are read on slices about ``REFERENCE_SLICE_MM`` apart (every
    ``SLICE_STEP``-th at most), tracheal air (a small region) on every slice, and only if ``tracheal`` (otherwise it
    is empty). The order of the voxels is not kept (the levels do not depend on it)."""
    full_hu, full_lung, (sx, sy, sz) = _axial_up(ct, lungs)
    step = max(1, min(SLICE_STEP, int(round(REFERENCE_SLICE_MM / sz))))
    hu = full_hu[::step]
    if not np.can_cast(hu.dtype, np.float32):  # int16 and float32 CTs compare as they are, without a float copy
        hu = hu.astype(np.float32)
    lung = full_lung[::step] > 0
    low = hu < AIR_HU
    box = _reference_box(low, lung)
    hu_box, lung_box = hu[box], lung[box]
    near_lung = _in_plane_dilation(lung_box, 2)
    outside = outside_air(low[box])
    # A field of view cropped to the body cuts the lungs, and cut lungs touch the border too: what the lung mask holds
    # is not air around the body. Lung the mask misses reads as no air (AIR_LEVEL_RANGE_HU). The air is eroded
    # 3 pixels away from the body surface (in the box; beyond it all is air) and from the image edge (the frame).
    air = hu > PAD_HU
    air[:, :3] = air[:, -3:] = air[:, :, :3] = air[:, :, -3:] = False
    air[box] &= ~_in_plane_dilation(~(outside & ~near_lung), 3)
    trachea = (tracheal_air(full_hu, full_lung, step, trachea_seed(hu.astype(np.float32), lung, (sx, sy, sz * step)),
                            (sx, sy, sz)) if tracheal else np.zeros(full_hu.shape, bool))
    body = ~_in_plane_dilation(outside, 2) & ~near_lung
    soft = ~_in_plane_dilation(~(body & (hu_box > SOFT_TISSUE_HU[0]) & (hu_box < SOFT_TISSUE_HU[1])), 1,
                               border=True)
    lo, hi = FAT_RANGE_HU
    soft &= (hu_box > lo) & (hu_box < hi)
    return {"outside_air": hu[air].astype(np.float32), "tracheal_air": full_hu[trachea].astype(np.float32),
            "fat": hu_box[soft].astype(np.float32)}


def _reference_box(low: np.ndarray, lung: np.ndarray) -> tuple:
    """In-plane box of the [z, y, x] slices outside which every voxel is air around the body (``low``: below
    AIR_HU) and no lung, with a margin that the lung's rim and the air's erosion do not cross: the references'
    morphology needs only the box (55-80 % of a chest CT's slice; the table keeps it wide)."""
    keep = ~low | lung
    rows, cols = np.flatnonzero(keep.any(axis=(0, 2))), np.flatnonzero(keep.any(axis=(0, 1)))
    if rows.size == 0:
        return (slice(None),) * 3
    margin = 6  # beyond the 2-pixel lung rim and the 3-pixel air erosion
    return (slice(None), slice(max(int(rows[0]) - margin, 0), int(rows[-1]) + margin + 1),
            slice(max(int(cols[0]) - margin, 0), int(cols[-1]) + margin + 1))


def _in_plane_dilation(mask: np.ndarray, iterations: int, border: bool = False) -> np.ndarray:
    """``mask`` [z, y, x] dilated ``iterations`` times by the in-plane 4-neighbourhood, with ``border`` beyond the
    array (ndimage's binary_dilation with ``border_value``; a fraction of its time). Erosion is its complement's."""
    for _ in range(iterations):
        out = mask.copy()
        out[:, 1:] |= mask[:, :-1]
        out[:, :-1] |= mask[:, 1:]
        out[:, :, 1:] |= mask[:, :, :-1]
        out[:, :, :-1] |= mask[:, :, 1:]
        if border:
            out[:, 0] = out[:, -1] = out[:, :, 0] = out[:, :, -1] = True
        mask = out
    return mask


def reference_levels(ct: sitk.Image, lungs: sitk.Image) -> dict:
    """{reference: (level HU or None, voxels)} of both air references and fat (None: fewer than MIN_VOXELS, or
    air mostly at the floor). For comparing the references; :func:`estimate_calibration` chooses."""
    out = {}
    for name, values in reference_regions(ct, lungs).items():
        n = int(values.size)
        level = None
        if n >= MIN_VOXELS:
            try:
                level = fat_level(values) if name == "fat" else air_level(values)
            except InputError:
                level = None
        out[name] = (level, n)
    return out


def estimate_calibration(ct: sitk.Image, lungs: sitk.Image, air_references=AIR_REFERENCES) -> HUCalibration:
    """Air and fat references of a chest CT (HU) with its lung mask (on the CT's grid): the first air reference of
    ``air_references`` that the scan shows enough of and that gives a plausible map. Raises InputError when there is
    none, or no fat (:class:`CalibrationError`)."""
    regions = reference_regions(ct, lungs, tracheal="tracheal_air" in air_references)
    problems = []
    fat = fat_level(regions["fat"]) if regions["fat"].size >= MIN_VOXELS else None
    if fat is None:
        problems.append("too little fat inside the body (the field of view may be cropped to the lungs)")
    for name in air_references:
        what = AIR_REFERENCE_NAMES[name]
        values = regions[name]
        if values.size < MIN_VOXELS:
            problems.append(f"too little {what} (the field of view may be cropped to the body)")
            continue
        try:
            air = air_level(values)
        except InputError:
            problems.append(f"the {what} sits at the {HU_FLOOR:.0f} HU floor")
            continue
        if not AIR_LEVEL_RANGE_HU[0] <= air <= AIR_LEVEL_RANGE_HU[1]:
            problems.append(f"the {what} reads {air:.0f} HU, not air (lung cut by the field of view?)")
            continue
        if fat is None:
            continue
        calibration = HUCalibration(air, fat, name)
        if abs(calibration.scale - 1.0) <= MAX_SCALE_ERROR and abs(calibration.offset) <= MAX_OFFSET_HU:
            return calibration
        problems.append(f"{what} reads {air:.0f} HU and fat {fat:.0f} HU, too far from -1000 and -100 for a "
                        "scanner's calibration")
    raise CalibrationError("; ".join(problems), "Check that the image is a CT in HU showing the air around the body, "
                           "or use a model bundle trained without --calibrate.")


def scan_calibration(ct: sitk.Image, lungs: sitk.Image, spec, required: bool = True):
    """The spec's calibration of ``ct``: None where the spec has none, else an :class:`HUCalibration` (``apply(hu)``
    maps the scan's HU onto the reference levels).

    With ``required`` a scan that cannot be calibrated is refused (InputError); without, it gets a
    :class:`CalibrationUnavailable`, whose ``apply`` leaves the HU as they are and whose ``warning`` says so.
    """
    if spec.calibration is None:
        return None
    try:
        return estimate_calibration(ct, lungs)
    except CalibrationError as error:
        if required:
            raise
        return CalibrationUnavailable(error.reason)
