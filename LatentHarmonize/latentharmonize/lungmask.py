"""Automatic lung segmentation for chest CT, with no learned weights.

Lungs are the large air-filled regions inside the body. The heavy work runs on a copy shrunk to
about 2 mm voxels and reoriented to LPS; the result is brought back to the CT's own grid, where
the boundary is refined at full resolution. Steps:

1. air = HU below ``AIR_HU``; air connected to the in-plane image border is outside the body;
2. the trachea and main bronchi are tracked from the top slice down (a small midline region of
   pure air whose cross-section follows slice to slice) and removed; tracking of a branch stops
   where its cross-section explodes, i.e. where it opens into a lung;
3. components too small to be a lung (bowel gas, air in the table) are dropped;
4. the lungs are split into right (1) and left (2) by physical LPS x (the patient's left is +x);
   lungs that touch are eroded until they separate, then grown back to their nearest seed;
5. each lung is closed with a 12 mm ball and its holes are filled per axial slice, so vessels,
   nodules, consolidation and subpleural fibrosis are part of the mask;
6. back on the CT grid, voxels deep inside the working mask are lung whatever their HU, and in the
   boundary band only air-like voxels are, so the edge is as sharp as the CT.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .errors import InputError, NoLungFoundError
from .grid import box_resampler, mask_box

AIR_HU = -400.0               # between lung (about -850 HU) and fat/soft tissue (-100..+60 HU)
WORK_SPACING_MM = 2.0         # voxel size of the working copy
CLOSING_RADIUS_MM = 12.0      # rolling ball: takes in subpleural consolidation, fibrosis and juxtapleural nodules
MIN_LUNG_ML = 100.0           # less air than this inside the body means no lung in the scan
KEEP_FRACTION = 0.1           # an air component smaller than this fraction of the largest is not lung
TRACHEA_AREA_MM2 = (30.0, 1000.0)  # cross-section of an adult trachea is about 80..700 mm^2
EXPLODE_FACTOR = 3.0          # an airway cross-section growing past this multiple of the trachea's has hit a lung
MAX_SPLIT_EROSIONS = 12
RIGHT, LEFT = 1, 2


def segment_lungs(ct: sitk.Image, min_lung_ml: float = MIN_LUNG_ML) -> sitk.Image:
    """Segment the lungs of a chest CT (HU). Returns UInt8 on the CT's grid: 0 background, 1 right, 2 left.

    Raises :class:`NoLungFoundError` when the scan holds no air-filled region inside the body of at
    least ``min_lung_ml`` mL (e.g. an abdomen-only scan or a phantom without lungs).
    """
    _check_ct(ct)
    if not min_lung_ml > 0:
        raise InputError(f"min_lung_ml must be a positive volume in mL, got {min_lung_ml!r}.")
    work = _work_copy(ct)
    hu = sitk.GetArrayViewFromImage(work)
    spacing = np.array(work.GetSpacing()[::-1])  # (z, y, x) mm
    air = hu < AIR_HU
    outside = outside_air(air)
    midline = _centre_x_index(~outside)
    candidates = air & ~outside
    if not candidates.any():
        raise _no_lung("there is no air inside the body", min_lung_ml)
    candidates &= ~_track_airways(candidates, hu, spacing, midline)
    lungs = _keep_lung_components(candidates, spacing, min_lung_ml)
    sides = _side_map(lungs, work, midline_x=_physical_x(work, midline))
    labels = _fill_each_lung(lungs, sides, spacing)
    return _to_full_resolution(labels, work, ct)


def split_left_right(mask: sitk.Image) -> sitk.Image:
    """Split a binary lung mask (nonzero = lung) into right (1) and left (2) lungs, on its own grid.

    Sides come from physical LPS x; lungs that touch are separated by erosion and grown back.
    A single lung is assigned to the side of the image centre it lies on.
    """
    lung = sitk.GetArrayViewFromImage(mask) != 0
    if not lung.any():
        raise InputError("The lung mask is empty; nonzero voxels must mark the lungs.")
    binary = sitk.GetImageFromArray(lung.view(np.uint8))
    binary.CopyInformation(mask)
    work = sitk.DICOMOrient(sitk.BinShrink(binary, _shrink_factors(binary)), "LPS")  # mean > 0 keeps thin parts
    centre = [(s - 1) / 2.0 for s in mask.GetSize()]
    sides = _side_map(sitk.GetArrayViewFromImage(work) > 0, work,
                      midline_x=mask.TransformContinuousIndexToPhysicalPoint(centre)[0])
    out = np.zeros(lung.shape, np.uint8)
    box = _lung_region(sides, work, mask)
    out[box] = _resample_array(sides, work, mask, box, sitk.sitkNearestNeighbor) * lung[box]
    result = sitk.GetImageFromArray(out)
    result.CopyInformation(mask)
    return result


def lung_volumes_ml(mask: sitk.Image) -> dict:
    """Volume of each lung in mL: ``{"right": ..., "left": ..., "total": ...}`` (labels 1 and 2)."""
    labels = sitk.GetArrayViewFromImage(mask)
    voxel_ml = float(np.prod(mask.GetSpacing())) / 1000.0
    right, left = (np.count_nonzero(labels == side) * voxel_ml for side in (RIGHT, LEFT))
    return {"right": right, "left": left, "total": right + left}


# --- working copy ------------------------------------------------------------------------------


def _check_ct(ct: sitk.Image) -> None:
    if ct.GetDimension() != 3 or ct.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"Lung segmentation needs a 3D scalar CT; got a {ct.GetDimension()}D image with "
                         f"{ct.GetNumberOfComponentsPerPixel()} values per voxel. Read it with io.read_ct.")


def _shrink_factors(image: sitk.Image) -> list:
    return [max(1, int(round(WORK_SPACING_MM / s))) for s in image.GetSpacing()]


def _work_copy(ct: sitk.Image) -> sitk.Image:
    """Average down to about 2 mm (partial-volume averaging also tames noise), then reorient to LPS
    so array axes run (inferior->superior, anterior->posterior, right->left)."""
    return sitk.DICOMOrient(sitk.BinShrink(ct, _shrink_factors(ct)), "LPS")


def _physical_x(image: sitk.Image, x_index: float) -> float:
    centre = [x_index, (image.GetSize()[1] - 1) / 2.0, (image.GetSize()[2] - 1) / 2.0]
    return image.TransformContinuousIndexToPhysicalPoint(centre)[0]


def _centre_x_index(region: np.ndarray) -> float:
    weights = region.sum(axis=(0, 1), dtype=np.float64)
    return float(np.average(np.arange(weights.size), weights=weights)) if weights.sum() else (weights.size - 1) / 2.0


# --- steps on the working copy (arrays are [z, y, x], z running inferior -> superior) ----------


def outside_air(air: np.ndarray) -> np.ndarray:
    """Air connected to the image border within its own axial slice. Connectivity is in-plane only:
    the trachea leaves the volume through the top slice, and in scans reaching the face the airway
    joins the outside air through the nose and mouth; neither may turn the lungs into 'outside'."""
    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    labels, _ = ndimage.label(air, in_plane)
    faces = np.concatenate([labels[:, 0, :].ravel(), labels[:, -1, :].ravel(),
                            labels[:, :, 0].ravel(), labels[:, :, -1].ravel()])
    border_ids = np.unique(faces[faces > 0])
    return np.isin(labels, border_ids)


def _track_airways(candidates: np.ndarray, hu: np.ndarray, spacing: np.ndarray, midline: float) -> np.ndarray:
    """Trachea and main bronchi: follow the airway lumen from the top slice down, slice by slice,
    keeping the 2D lumen components that overlap the airway of the slice above; a component whose
    area explodes past EXPLODE_FACTOR x the trachea's area has opened into a lung and ends its branch.

    The lumen (pure air) is told from lung (air mixed with tissue) by a threshold halfway between
    the trachea's and the lung's median HU, so an airway touching a lung at this resolution stays
    separate. The result is grown by one voxel to take the partial-volume rim of the lumen too.
    """
    pixel_mm2 = spacing[1] * spacing[2]
    airways = np.zeros_like(candidates)
    seed_z, seed = _find_trachea(candidates, pixel_mm2, midline)
    if seed is None:
        return airways  # scan starts below the carina, or no trachea visible: nothing to remove
    lumen = candidates & (hu < (np.median(hu[seed_z][seed]) + np.median(hu[candidates])) / 2.0)
    current = seed & lumen[seed_z]
    limit = EXPLODE_FACTOR * seed.sum()
    airways[seed_z] = current
    for z in range(seed_z - 1, -1, -1):
        labels, _ = ndimage.label(lumen[z])
        touched = np.unique(labels[current & (labels > 0)])
        areas = np.bincount(labels.ravel())
        branch = np.isin(labels, touched[areas[touched] <= limit])
        if not branch.any():
            break
        airways[z], current = branch, branch
    return ndimage.binary_dilation(airways) & candidates


def _find_trachea(candidates: np.ndarray, pixel_mm2: float, midline: float):
    """Topmost slice holding a trachea-sized air region near the body midline (x index ``midline``;
    lung apices are lateral); returns (z, 2D mask) or (None, None). Searches the top quarter of the
    air's extent."""
    slices = np.flatnonzero(candidates.any(axis=(1, 2)))
    if slices.size == 0:
        return None, None
    top, bottom = slices[-1], slices[-1] - max(1, (slices[-1] - slices[0]) // 4)
    half_width = 0.15 * candidates.shape[2]
    for z in range(top, bottom - 1, -1):
        labels, n = ndimage.label(candidates[z])
        if n == 0:
            continue
        areas = np.bincount(labels.ravel())[1:] * pixel_mm2
        centres = np.array(ndimage.center_of_mass(candidates[z], labels, range(1, n + 1)))[:, 1]
        ok = (areas >= TRACHEA_AREA_MM2[0]) & (areas <= TRACHEA_AREA_MM2[1]) & (np.abs(centres - midline) < half_width)
        if ok.any():
            best = 1 + int(np.argmax(np.where(ok, areas, -1)))
            return z, labels == best
    return None, None


def _keep_lung_components(candidates: np.ndarray, spacing: np.ndarray, min_lung_ml: float) -> np.ndarray:
    labels, _ = ndimage.label(candidates)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    volumes = np.bincount(labels.ravel(), minlength=2)[1:] * voxel_ml
    if volumes.max() < min_lung_ml:
        raise _no_lung(f"the largest air region inside the body, airways aside, is {volumes.max():.0f} mL",
                       min_lung_ml)
    keep = 1 + np.flatnonzero(volumes >= KEEP_FRACTION * volumes.max())
    return np.isin(labels, keep)


def _no_lung(found: str, min_lung_ml: float) -> NoLungFoundError:
    return NoLungFoundError(f"No lung found: {found} (a lung holds at least {min_lung_ml:g} mL below {AIR_HU:g} HU). "
                            "Check that this is a chest CT covering the lungs, or give a lung mask.")


def _side_map(lungs: np.ndarray, work: sitk.Image, midline_x: float) -> np.ndarray:
    """Side (1 right, 2 left) of every voxel in the lungs' bounding box (0 outside it): the side of
    the nearest lung seed.

    Seeds are the lungs eroded until two sizeable components appear; with a single lung every
    voxel gets that lung's side, from its centroid against ``midline_x``.
    """
    box = mask_box(lungs)
    offset = [s.start for s in box]
    sides = np.zeros(lungs.shape, np.uint8)
    seeds = _two_seeds(lungs[box])
    if seeds is None:
        sides[box] = LEFT if _centroid_x(lungs[box], work, offset) > midline_x else RIGHT
        return sides
    first, second = seeds
    first_is_right = _centroid_x(first, work, offset) < _centroid_x(second, work, offset)
    seed_labels = np.zeros(first.shape, np.uint8)
    seed_labels[first] = RIGHT if first_is_right else LEFT
    seed_labels[second] = LEFT if first_is_right else RIGHT
    spacing = np.array(work.GetSpacing()[::-1])
    nearest = ndimage.distance_transform_edt(seed_labels == 0, sampling=spacing,
                                             return_distances=False, return_indices=True)
    sides[box] = seed_labels[tuple(nearest)]
    return sides


def _two_seeds(lungs: np.ndarray):
    """Erode until the two largest components each hold >= KEEP_FRACTION of the eroded total."""
    eroded = lungs
    for _ in range(MAX_SPLIT_EROSIONS + 1):
        labels, n = ndimage.label(eroded)
        if n >= 2:
            sizes = np.bincount(labels.ravel())[1:]
            order = np.argsort(sizes)[::-1]
            if sizes[order[1]] >= KEEP_FRACTION * sizes.sum():
                return labels == order[0] + 1, labels == order[1] + 1
        eroded = ndimage.binary_erosion(eroded)
        if not eroded.any():
            return None
    return None


def _centroid_x(region: np.ndarray, work: sitk.Image, offset) -> float:
    """Physical x of the centroid of ``region``, a crop of the working grid starting at ``offset`` (z, y, x)."""
    index = (np.array(ndimage.center_of_mass(region)) + offset)[::-1]  # (x, y, z)
    return work.TransformContinuousIndexToPhysicalPoint(index.tolist())[0]


def _fill_each_lung(lungs: np.ndarray, sides: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Close each lung with a ball of CLOSING_RADIUS_MM and fill its holes per axial slice (a dense
    region enclosed in-plane is lung even where it reaches the next slice's surface); returns labels 0/1/2."""
    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    margin = np.ceil(CLOSING_RADIUS_MM / spacing).astype(int) + 1
    filled = np.zeros(lungs.shape, bool)
    for side in (RIGHT, LEFT):
        lung = lungs & (sides == side)
        if not lung.any():
            continue
        box = mask_box(lung)
        # padding keeps the closing from eroding a lung cut by the volume edge
        padded = np.pad(lung[box], [(m, m) for m in margin])
        closed = _closing(padded, CLOSING_RADIUS_MM, spacing)[tuple(slice(m, -m) for m in margin)]
        filled[box] |= ndimage.binary_fill_holes(closed, in_plane)
    return np.where(filled, sides, 0).astype(np.uint8)


def _closing(mask: np.ndarray, radius_mm: float, spacing: np.ndarray) -> np.ndarray:
    """Closing with a Euclidean ball of ``radius_mm``, via two distance transforms (cost independent of the radius)."""
    dilated = ndimage.distance_transform_edt(~mask, sampling=spacing) <= radius_mm
    return ndimage.distance_transform_edt(dilated, sampling=spacing) > radius_mm


# --- back to the CT grid -------------------------------------------------------------------------


def _to_full_resolution(labels: np.ndarray, work: sitk.Image, ct: sitk.Image) -> sitk.Image:
    """Bring each lung back onto the CT grid. Voxels deep inside the low-resolution lung keep it
    (so dense lesions stay in); in the boundary band (partial overlap after linear interpolation)
    a voxel is lung only if it is air-like in the full-resolution CT, which gives a sharp edge."""
    hu = sitk.GetArrayViewFromImage(ct)
    out = np.zeros(hu.shape, np.uint8)
    for side in (RIGHT, LEFT):  # each lung over its own box only: about half the voxels of a box around both
        lung = labels == side
        if not lung.any():
            continue
        box = _lung_region(lung, work, ct)
        up = _resample_array(lung.view(np.uint8) * 200, work, ct, box, sitk.sitkLinear)
        out[box][(up >= 199) | ((up > 0) & (hu[box] < AIR_HU))] = side  # 200: every interpolation neighbour is inside
    result = sitk.GetImageFromArray(out)
    result.CopyInformation(ct)
    return result


def _resample_array(values: np.ndarray, work: sitk.Image, full: sitk.Image, box: tuple, interpolator) -> np.ndarray:
    """UInt8 ``values`` on the working grid, resampled onto the voxels ``box`` (z, y, x slices) of the grid of
    ``full``; [z, y, x] array."""
    image = sitk.GetImageFromArray(values)
    image.CopyInformation(work)
    resample = box_resampler(full, box, interpolator)
    resample.SetOutputPixelType(sitk.sitkUInt8)
    return sitk.GetArrayFromImage(resample.Execute(image))


def _lung_region(labels: np.ndarray, work: sitk.Image, full: sitk.Image) -> tuple:
    """The part of the full-resolution grid covering the lungs plus one working voxel: numpy slices (z, y, x)."""
    z, y, x = mask_box(labels > 0)
    lo = np.array([x.start, y.start, z.start]) - 1.0
    hi = np.array([x.stop, y.stop, z.stop], float)  # one past the last lung voxel
    corners = [[(lo, hi)[bx][0], (lo, hi)[by][1], (lo, hi)[bz][2]] for bx in (0, 1) for by in (0, 1) for bz in (0, 1)]
    index = np.array([full.TransformPhysicalPointToContinuousIndex(work.TransformContinuousIndexToPhysicalPoint(c))
                      for c in corners])
    size = np.array(full.GetSize())
    start = np.clip(np.floor(index.min(axis=0)).astype(int), 0, size)
    stop = np.clip(np.ceil(index.max(axis=0)).astype(int) + 1, 0, size)
    (x0, y0, z0), (x1, y1, z1) = start.tolist(), stop.tolist()
    return slice(z0, z1), slice(y0, y1), slice(x0, x1)
