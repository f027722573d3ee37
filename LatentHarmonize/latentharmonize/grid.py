"""The model grid: an axial, LPS-aligned lattice shared by every scan of a patient.

A CT is resampled (linear for HU, nearest for the lung mask) onto a lattice with identity direction whose voxel
centres sit at integer multiples of the spacing in physical space, cropped to the lung bounding box plus a margin.
Two acquisitions of one patient (same patient frame, different slice thickness or field of view) therefore land on
the same physical lattice points, which is what makes patches correspond across acquisitions.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .errors import InputError, NoLungFoundError

DEFAULT_SPACING = (1.25, 1.25, 2.5)
DEFAULT_MARGIN_MM = 12.5
AIR_HU = -1024.0
_EPS = 1e-6


@dataclass(frozen=True)
class ModelGrid:
    """Axial lattice with identity direction (LPS mm).

    ``origin`` (x, y, z) is the centre of voxel [0, 0, 0]; ``spacing`` (x, y, z) mm; ``shape`` (z, y, x).
    """

    origin: tuple
    spacing: tuple
    shape: tuple
    scan_z_mm: float | None = None  # through-plane spacing of the scan resampled onto it (through_plane_spacing)
    scan_slices: tuple | None = None  # (first, last) of its slices within that scan's extent (scan_slices); None: all

    def reference_image(self, pixel_type=sitk.sitkUInt8) -> sitk.Image:
        """An empty image with this grid's geometry (for resampling onto or from it)."""
        image = sitk.Image([int(n) for n in self.shape[::-1]], pixel_type)
        image.SetOrigin(tuple(float(v) for v in self.origin))
        image.SetSpacing(tuple(float(v) for v in self.spacing))
        return image

    def index_to_physical(self, indices) -> np.ndarray:
        """Physical (x, y, z) mm of voxel indices given as [n, 3] (z, y, x)."""
        idx = np.asarray(indices, dtype=np.float64).reshape(-1, 3)[:, ::-1]
        return np.asarray(self.origin, dtype=np.float64) + idx * np.asarray(self.spacing, dtype=np.float64)

    def to_dict(self) -> dict:
        scan = {} if self.scan_z_mm is None else {"scan_z_mm": float(self.scan_z_mm)}
        return {"origin": list(map(float, self.origin)), "spacing": list(map(float, self.spacing)),
                "shape": list(map(int, self.shape)), **scan}


def _validate_spacing(spacing) -> tuple:
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise InputError(f"Model grid spacing must be three positive numbers (x, y, z) mm, got {spacing}.")
    return spacing


def mask_box(mask: np.ndarray):
    """Index slices (z, y, x) of the smallest box holding every nonzero voxel of a [z, y, x] array, or None when
    there is none. Numpy projections: a fraction of the cost of a label-statistics filter on a full-size CT."""
    zy = mask.any(axis=2)
    zs, ys = np.flatnonzero(zy.any(axis=1)), np.flatnonzero(zy.any(axis=0))
    if zs.size == 0:
        return None
    z, y = slice(int(zs[0]), int(zs[-1]) + 1), slice(int(ys[0]), int(ys[-1]) + 1)
    xs = np.flatnonzero(mask[z, y].any(axis=(0, 1)))
    return z, y, slice(int(xs[0]), int(xs[-1]) + 1)


def box_resampler(reference: sitk.Image, box: tuple, interpolator) -> sitk.ResampleImageFilter:
    """A resampler onto the voxels ``box`` (z, y, x slices) of ``reference``'s grid. The output geometry is set
    directly, so no voxel of ``reference`` is copied."""
    resample = sitk.ResampleImageFilter()
    resample.SetSize([b.stop - b.start for b in box[::-1]])
    resample.SetOutputOrigin(reference.TransformIndexToPhysicalPoint([b.start for b in box[::-1]]))
    resample.SetOutputSpacing(reference.GetSpacing())
    resample.SetOutputDirection(reference.GetDirection())
    resample.SetInterpolator(interpolator)
    return resample


def lung_voxels(lungs: sitk.Image) -> np.ndarray:
    """Array [z, y, x] whose nonzero voxels are the lung (label > 0): a view of an unsigned mask, no copy.
    The view is only valid while ``lungs`` lives."""
    values = sitk.GetArrayViewFromImage(lungs)
    return values if values.dtype.kind in "ub" else values > 0


def lung_bounding_box_mm(lungs: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Physical (x, y, z) min and max of the lung voxel centres, for any direction matrix."""
    box = mask_box(lung_voxels(lungs))
    if box is None:
        raise NoLungFoundError("The lung mask is empty: no voxel is labelled lung. Check the mask, or let "
                               "LatentHarmonize segment the lungs automatically.")
    lo, hi = [b.start for b in box[::-1]], [b.stop - 1 for b in box[::-1]]  # (x, y, z)
    corners = [(x, y, z) for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])]
    points = np.array([lungs.TransformIndexToPhysicalPoint(c) for c in corners])
    return points.min(axis=0), points.max(axis=0)


def grid_for_box(lo_mm, hi_mm, spacing=DEFAULT_SPACING, margin_mm: float = DEFAULT_MARGIN_MM,
                 align_px=(1, 1, 1)) -> ModelGrid:
    """The lattice covering ``[lo, hi]`` plus ``margin_mm``, snapped to multiples of the spacing.

    ``align_px`` (x, y, z) makes the origin index a multiple of it, so that encoder lattices with that stride
    also coincide across scans.
    """
    spacing = np.asarray(_validate_spacing(spacing))
    align = np.asarray(align_px, dtype=np.int64)
    first = np.floor((np.asarray(lo_mm) - margin_mm) / spacing + _EPS).astype(np.int64)
    first = (first // align) * align
    last = np.ceil((np.asarray(hi_mm) + margin_mm) / spacing - _EPS).astype(np.int64)
    size_xyz = last - first + 1
    origin = tuple(float(v) for v in first * spacing)
    return ModelGrid(origin=origin, spacing=tuple(float(s) for s in spacing),
                     shape=tuple(int(n) for n in size_xyz[::-1]))


def resample_onto(image: sitk.Image, grid: ModelGrid, nearest: bool, default: float) -> np.ndarray:
    """Resample ``image`` onto ``grid``; returns the array [z, y, x]."""
    interp = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    out_type = image.GetPixelID() if nearest else sitk.sitkFloat32
    resampled = sitk.Resample(image, grid.reference_image(), sitk.Transform(), interp, float(default), out_type)
    return sitk.GetArrayFromImage(resampled)


def lowpass_in_plane(hu: np.ndarray, sigma_mm: float, spacing) -> np.ndarray:
    """``hu`` [z, y, x] blurred by an in-plane Gaussian of SD ``sigma_mm`` on a grid of ``spacing`` (x, y, z) mm;
    ``hu`` itself when ``sigma_mm`` is 0. Slices stay apart: the slice thickness is the scan's own."""
    if not sigma_mm:
        return hu
    sigma_px = (0.0, sigma_mm / float(spacing[1]), sigma_mm / float(spacing[0]))
    return ndimage.gaussian_filter(np.asarray(hu, dtype=np.float32), sigma_px, mode="nearest")


# Flat soft tissue (muscle, blood, mediastinum) carries the scanner's noise and none of the lung's texture, so its
# fine band measures what the kernel and the dose add. Few slices suffice: the blur is in-plane.
SOFT_TISSUE_HU = (-50.0, 150.0)
NOISE_SLICES = 12
NOISE_MIN_VOXELS = 2000
MAX_LOWPASS_MM = 3.0
LOWPASS_STEP_MM = 0.125


def _flat_soft_tissue(hu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(slices, flat)``: up to NOISE_SLICES evenly spaced slices of ``hu`` and their flat soft tissue
    (SOFT_TISSUE_HU, eroded 2 px in-plane)."""
    slices = np.asarray(hu[np.unique(np.linspace(0, len(hu) - 1, min(NOISE_SLICES, len(hu))).astype(int))],
                        dtype=np.float32)
    lo, hi = SOFT_TISSUE_HU
    return slices, ndimage.binary_erosion((slices > lo) & (slices < hi), np.ones((1, 5, 5), bool))


def _fine_band(slices: np.ndarray, flat: np.ndarray, spacing, sigma_mm: float) -> float:
    blurred = lowpass_in_plane(slices, sigma_mm, spacing)
    fine = blurred - ndimage.gaussian_filter(blurred, (0, 1, 1), mode="nearest")
    return float(np.median(np.abs(fine[flat])))


def soft_tissue_noise(hu: np.ndarray, spacing, sigma_mm: float = 0.0) -> float | None:
    """Median absolute fine band (the image minus its 1-pixel in-plane Gaussian) of ``hu`` blurred in-plane by
    ``sigma_mm``, over flat soft tissue (SOFT_TISSUE_HU, eroded 2 px in-plane) on up to NOISE_SLICES evenly spaced
    slices; None where fewer than NOISE_MIN_VOXELS such voxels exist."""
    slices, flat = _flat_soft_tissue(hu)
    return _fine_band(slices, flat, spacing, sigma_mm) if flat.sum() >= NOISE_MIN_VOXELS else None


def noise_matched_sigma(hu: np.ndarray, spacing, target_hu: float, min_mm: float) -> float:
    """The smallest in-plane Gaussian SD (mm, ``min_mm`` up to MAX_LOWPASS_MM in LOWPASS_STEP_MM steps) at which
    the scan's soft-tissue noise (:func:`soft_tissue_noise`) is at most ``target_hu``: a sharp or low-dose
    reconstruction is blurred until its noise matches a soft one's. ``min_mm`` where the scan has too little flat
    soft tissue to measure, or where it is MAX_LOWPASS_MM or more; MAX_LOWPASS_MM where no step reaches the target."""
    if min_mm >= MAX_LOWPASS_MM:
        return float(min_mm)
    slices, flat = _flat_soft_tissue(hu)
    if flat.sum() < NOISE_MIN_VOXELS:
        return float(min_mm)
    steps = np.arange(min_mm, MAX_LOWPASS_MM + LOWPASS_STEP_MM / 2, LOWPASS_STEP_MM)
    if _fine_band(slices, flat, spacing, float(steps[0])) <= target_hu:
        return float(min_mm)
    lo, hi = 0, len(steps) - 1  # noise falls as the blur grows: bisect for the first step at or under the target
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _fine_band(slices, flat, spacing, float(steps[mid])) <= target_hu:
            hi = mid
        else:
            lo = mid
    return float(steps[hi])


def to_model_grid(ct: sitk.Image, lungs: sitk.Image, spacing=DEFAULT_SPACING,
                  margin_mm: float = DEFAULT_MARGIN_MM, align_px=(4, 4, 1)):
    """Resample a CT and its lung mask onto the model grid cropped to the lungs.

    Returns ``(hu float32 [z, y, x], lung bool [z, y, x], grid)``. ``align_px`` defaults to the encoder stride
    in-plane so dense latents of two acquisitions of a patient fall on the same physical points.
    """
    if ct.GetDimension() != 3 or lungs.GetDimension() != 3:
        raise InputError("to_model_grid needs a 3D CT and a 3D lung mask.")
    lo, hi = lung_bounding_box_mm(lungs)
    grid = grid_for_box(lo, hi, spacing, margin_mm, align_px)
    # The linear interpolator works in double whatever the input type, so an Int16 CT needs no float copy.
    hu = resample_onto(ct, grid, nearest=False, default=AIR_HU)
    if lungs.GetPixelID() != sitk.sitkUInt8:
        lungs = sitk.Cast(lungs, sitk.sitkUInt8)
    lung = resample_onto(lungs, grid, nearest=True, default=0) > 0
    return hu, lung, replace(grid, scan_z_mm=through_plane_spacing(ct), scan_slices=scan_slices(ct, grid))


def scan_slices(image: sitk.Image, grid: ModelGrid) -> tuple:
    """``(first, last)``: the slices of ``grid`` whose centres lie inside ``image``'s extent along z (ITK's
    half-voxel border; a centre on the border counts as outside, as the resampler reads it). The grid's margin around
    the lungs can run past the scan's first or last slice, and what lies beyond reads as air when resampled; for a
    tilted scan, slices partly outside count as inside."""
    corners = itertools.product(*[(-0.5, n - 0.5) for n in image.GetSize()])
    z = [image.TransformContinuousIndexToPhysicalPoint(c)[2] for c in corners]
    first = math.floor((min(z) - grid.origin[2]) / grid.spacing[2] + _EPS) + 1
    last = math.ceil((max(z) - grid.origin[2]) / grid.spacing[2] - _EPS) - 1
    return max(first, 0), min(last, grid.shape[0] - 1)


def axial_axis(image: sitk.Image) -> int:
    """The image axis (0 x, 1 y, 2 z, SimpleITK order) closest to the patient's cranio-caudal axis."""
    return int(np.argmax(np.abs(np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)[2])))


def through_plane_spacing(image: sitk.Image) -> float:
    """Spacing (mm) of the image axis closest to the patient's z: the slice spacing of an axial scan, which stands for
    its slice thickness (an image file does not carry the thickness; contiguous slices have the two equal)."""
    return float(image.GetSpacing()[axial_axis(image)])


def lattice_to_image(values: np.ndarray, lattice: ModelGrid) -> sitk.Image:
    """Wrap a [z, y, x] array defined on ``lattice`` as an image with that geometry."""
    values = np.asarray(values)
    if tuple(values.shape) != tuple(lattice.shape):
        raise ValueError(f"values have shape {values.shape}, the lattice has shape {tuple(lattice.shape)}")
    image = sitk.GetImageFromArray(values)
    image.SetOrigin(tuple(float(v) for v in lattice.origin))
    image.SetSpacing(tuple(float(v) for v in lattice.spacing))
    return image


def to_reference_geometry(image: sitk.Image, reference: sitk.Image, nearest: bool = True,
                          default: float = 0.0) -> sitk.Image:
    """Resample a model-grid or lattice image back into a CT's geometry (nearest for labels)."""
    interp = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    return sitk.Resample(image, reference, sitk.Transform(), interp, float(default), image.GetPixelID())
