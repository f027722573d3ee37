"""Automatic lung segmentation for chest CT, with no learned weights.

Lungs are the large air-filled regions inside the body. The heavy work runs on a copy shrunk to
about 2 mm voxels and reoriented to LPS; the result is brought back to the CT's own grid, where
the boundary is refined at full resolution. Steps:

1. air = HU below ``AIR_HU`` (padding outside the reconstruction circle aside); an in-plane air region
   reaching beyond the body outline is outside the body, so lungs cut by the field of view stay inside;
2. the trachea and main bronchi are tracked from the top slice down (a small midline region of
   pure air whose cross-section follows slice to slice) and removed; tracking of a branch stops
   where its cross-section explodes, i.e. where it opens into a lung;
3. gas (stomach, bowel: pure air, near -1000 HU, with no lung tissue) is not lung unless an airway enters
   it; of the rest, components too small to be a lung are dropped;
4. the lungs are split into right (1) and left (2) by physical LPS x (the patient's left is +x);
   lungs that touch are eroded until they separate, then grown back to their nearest seed;
5. each lung is closed with a 12 mm ball and its holes are filled per axial slice, so vessels,
   nodules, consolidation and subpleural fibrosis are part of the mask; a hole that opens onto the outside in the
   next slice (the dome of the liver or spleen) is not filled;
6. back on the CT grid, voxels deep inside the working mask are lung whatever their HU, and in the
   boundary band only air-like voxels are, so the edge is as sharp as the CT, and dense voxels in a narrow gap
   between the lung's air in their slice: reticular lines, septa and honeycomb walls at the lung's edge, which
   the chest wall, thick and with air on one side only, is not.

:func:`assess_mask` checks any lung mask (automatic or given) against the CT: it refuses an impossible mask
and lists plausibility warnings (volume for the slices covered, unequal lungs, lungs cut by the scan's ends or
field of view, air left out as gas).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .errors import InputError, NoLungFoundError
from .grid import box_resampler, mask_box

AIR_HU = -400.0               # between lung (about -850 HU) and fat/soft tissue (-100..+60 HU)
PAD_HU = -1200.0              # below any air: padding outside the reconstruction circle (-2000, -3024 ...)
GAS_MARGIN_HU = 40.0          # air whose core is within this of outside air's level holds no lung tissue: gas
AIR_LEVEL_HU = (-1030.0, -970.0)  # plausible HU of air (vendor calibration); -1000 when no outside air is seen
BODY_PART = 0.2              # a tissue region this share of a slice's largest is body too (the table is smaller)
MIN_JUDGED_ML = 1.0           # smaller air pockets are neither judged nor counted as excluded gas
WORK_SPACING_MM = 2.0         # voxel size of the working copy
CLOSING_RADIUS_MM = 12.0      # rolling ball: takes in subpleural consolidation, fibrosis and juxtapleural nodules
OPEN_HOLE_FRACTION = 0.5      # an in-plane hole touching this much outside across z is an organ's dome, not lung
MIN_LUNG_ML = 100.0           # less air than this inside the body means no lung in the scan
KEEP_FRACTION = 0.1           # an air component smaller than this fraction of the largest is not lung
TRACHEA_AREA_MM2 = (30.0, 1000.0)  # cross-section of an adult trachea is about 80..700 mm^2
THIN_GAP_MM = 1.5             # a dense band voxel with the lung's air this near on both sides is a thin structure
EXPLODE_FACTOR = 3.0          # an airway cross-section growing past this multiple of the trachea's has hit a lung
MAX_SPLIT_EROSIONS = 12
RIGHT, LEFT = 1, 2
_IN_PLANE = np.pad(ndimage.generate_binary_structure(2, 1)[None], ((1, 1), (0, 0), (0, 0)))  # 4-connected, one slice


@dataclass(frozen=True)
class LungSegmentation:
    """What :func:`segment_lungs_detailed` found: the label map, and the air inside the body it left out as gas."""

    lungs: sitk.Image
    excluded_air_ml: float


def segment_lungs(ct: sitk.Image, min_lung_ml: float = MIN_LUNG_ML) -> sitk.Image:
    """Segment the lungs of a chest CT (HU). Returns UInt8 on the CT's grid: 0 background, 1 right, 2 left.

    Raises :class:`NoLungFoundError` when the scan holds no lung-like air region inside the body of at
    least ``min_lung_ml`` mL (e.g. an abdomen-only scan or a phantom without lungs).
    """
    return segment_lungs_detailed(ct, min_lung_ml).lungs


def segment_lungs_detailed(ct: sitk.Image, min_lung_ml: float = MIN_LUNG_ML) -> LungSegmentation:
    """:func:`segment_lungs`, also telling how much air inside the body was left out as stomach or bowel gas."""
    _check_ct(ct)
    if not min_lung_ml > 0:
        raise InputError(f"min_lung_ml must be a positive volume in mL, got {min_lung_ml!r}.")
    work = _work_copy(ct)
    hu = sitk.GetArrayViewFromImage(work)
    spacing = np.array(work.GetSpacing()[::-1])  # (z, y, x) mm
    padding = hu < PAD_HU
    air = (hu < AIR_HU) & ~padding
    outside, air_level = outside_body(air, hu >= AIR_HU, hu, spacing[1] * spacing[2])
    midline = _centre_x_index(~outside & ~padding)
    candidates = air & ~outside
    if not candidates.any():
        raise _no_lung("there is no air inside the body", min_lung_ml)
    airways = _track_airways(candidates, hu, spacing, midline)
    candidates &= ~airways
    lungs, excluded_ml = _keep_lung_components(candidates, hu, spacing, min_lung_ml, air_level,
                                               ndimage.binary_dilation(airways))
    sides = _side_map(lungs, work, midline_x=_physical_x(work, midline))
    labels = _fill_each_lung(lungs, sides, spacing)
    return LungSegmentation(_to_full_resolution(labels, work, ct), excluded_ml)


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
    """Air connected to the image border within its own axial slice (the air around the body where the field of
    view holds the whole body; used as the air reference of HU calibration)."""
    labels, n = ndimage.label(air, _IN_PLANE)
    border = np.zeros(n + 1, bool)  # per label: does it touch the border (a lookup, several times np.isin's speed)
    for face in (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]):
        border[face] = True
    border[0] = False
    return border[labels]


def outside_body(air: np.ndarray, tissue: np.ndarray, hu: np.ndarray, pixel_mm2: float) -> tuple:
    """(outside, air level): the air around the body, and the HU of air in this scan.

    The body of a slice is its largest in-plane region of tissue (the table and blankets lie apart from it), with
    any other at least BODY_PART its size. Its outline holds every pixel with body on both sides of it along its
    row or along its column. An in-plane air region lying wholly inside the outline is inside the body (lungs,
    gas). One reaching beyond it is the air around the body, unless it is a lung cut by the field of view: most of
    its pixels are inside the outline (chest wall in front of and behind the cut, mediastinum beside it) and its
    core (one pixel in from its edge, away from partial volume) covers 1 cm^2 at the density of lung, more than
    GAS_MARGIN_HU above air. Connectivity is in-plane only: the trachea leaves the volume through the top slice,
    and in scans reaching the face the airway joins the outside air through the nose and mouth; neither may turn
    the lungs into 'outside'.
    """
    body = _body_per_slice(tissue)
    labels, n = ndimage.label(air, _IN_PLANE)
    enclosed = air & (_between(body, axis=1) | _between(body, axis=2))
    reaching = air & ~enclosed
    level = -1000.0
    if np.count_nonzero(reaching) >= 1000:  # a field of view cropped to the body shows little air around it
        values = hu[reaching]
        level = float(np.clip(np.median(values[:: max(1, values.size // 200_000)]), *AIR_LEVEL_HU))
    core = air.copy()  # in-plane erosion by one pixel; numpy shifts cost a fraction of ndimage's erosion here
    core[:, 1:] &= air[:, :-1]
    core[:, :-1] &= air[:, 1:]
    core[:, :, 1:] &= air[:, :, :-1]
    core[:, :, :-1] &= air[:, :, 1:]
    counts = np.bincount(labels[core], minlength=n + 1)
    means = np.bincount(labels[core], weights=hu[core], minlength=n + 1) / np.maximum(counts, 1)
    inside_share = np.bincount(labels[enclosed], minlength=n + 1) / np.maximum(np.bincount(labels.ravel()), 1)
    ids = np.unique(labels[reaching])
    cut_lung = ((inside_share[ids] >= 0.5) & (counts[ids] * pixel_mm2 >= 100.0)
                & (means[ids] >= level + GAS_MARGIN_HU))
    ids = ids[(ids > 0) & ~cut_lung]
    return np.isin(labels, ids), level


def _body_per_slice(mask: np.ndarray) -> np.ndarray:
    """The in-plane connected regions of ``mask`` holding at least BODY_PART of the largest one in their slice: the
    body, in one piece or cut in two (bronchi joining both lungs cut by the field of view split the mediastinum
    into a front and a back part), but not the table."""
    labels, n = ndimage.label(mask, _IN_PLANE)
    if n == 0:
        return mask.copy()
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    # labels are numbered slice after slice: those of slice z run up to the running maximum of the slices' labels
    last = np.maximum.accumulate(labels.reshape(labels.shape[0], -1).max(axis=1))
    slice_of = np.searchsorted(last, np.arange(n + 1))
    largest = np.zeros(labels.shape[0] + 1)
    np.maximum.at(largest, slice_of, sizes)
    return (sizes >= BODY_PART * largest[slice_of])[labels] & mask


def _between(mask: np.ndarray, axis: int) -> np.ndarray:
    """Pixels with a ``mask`` pixel on both sides of them (or on them) along ``axis``."""
    before = np.logical_or.accumulate(mask, axis=axis)
    after = np.flip(np.logical_or.accumulate(np.flip(mask, axis=axis), axis=axis), axis=axis)
    return before & after


def _track_airways(candidates: np.ndarray, hu: np.ndarray, spacing: np.ndarray, midline: float) -> np.ndarray:
    """Trachea and main bronchi: follow the airway lumen from the top slice down, slice by slice,
    keeping the 2D lumen components that overlap the airway of the slice above; a component whose
    area explodes past EXPLODE_FACTOR x the trachea's widest (trachea-sized) area so far has opened into a lung and
    ends its branch.

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
    trachea = True
    airways[seed_z] = current
    for z in range(seed_z - 1, -1, -1):
        labels, _ = ndimage.label(lumen[z])
        touched = np.unique(labels[current & (labels > 0)])
        areas = np.bincount(labels.ravel())
        kept = touched[areas[touched] <= limit]
        branch = np.isin(labels, kept)
        if not branch.any():
            break
        # until the carina the limit follows the trachea's widest cross-section (a scan that starts at the larynx
        # sees it widen), read only from trachea-sized sections, so that it stays below three adult tracheas
        trachea = trachea and kept.size == 1
        if trachea and areas[kept[0]] * pixel_mm2 <= TRACHEA_AREA_MM2[1]:
            limit = max(limit, EXPLODE_FACTOR * areas[kept[0]])
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


def _keep_lung_components(candidates: np.ndarray, hu: np.ndarray, spacing: np.ndarray, min_lung_ml: float,
                          air_level: float, near_airways: np.ndarray) -> tuple:
    """The lung components of the air inside the body, and the volume (mL) of the gas left out.

    A component is gas (stomach, bowel) when the median HU of its core (one voxel in from its surface, away
    from partial volume) is within GAS_MARGIN_HU of air: lung holds parenchyma and vessels (about -850 HU),
    gas holds nothing. A component an airway enters is lung whatever its density (bullae). Of the lung-like
    components, those smaller than KEEP_FRACTION of the largest are dropped (air in the table, oesophagus).
    """
    labels, _ = ndimage.label(candidates)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    volumes = np.bincount(labels.ravel(), minlength=2)[1:] * voxel_ml
    aired = np.unique(labels[near_airways & candidates])
    gas = np.zeros(volumes.size, bool)
    for index, box in enumerate(ndimage.find_objects(labels)):
        if box is None or volumes[index] < MIN_JUDGED_ML or index + 1 in aired:
            continue
        component = labels[box] == index + 1
        core = ndimage.binary_erosion(component)
        gas[index] = np.median(hu[box][core if core.any() else component]) < air_level + GAS_MARGIN_HU
    excluded_ml = float(volumes[gas].sum())
    lung_volumes = np.where(gas, 0.0, volumes)
    if lung_volumes.max() < min_lung_ml:
        found = f"the largest air region inside the body, airways aside, is {lung_volumes.max():.0f} mL"
        if excluded_ml:
            found += f" ({excluded_ml:.0f} mL of pure air, stomach or bowel gas, is not lung)"
        raise _no_lung(found, min_lung_ml)
    keep = 1 + np.flatnonzero(lung_volumes >= KEEP_FRACTION * lung_volumes.max())
    return np.isin(labels, keep), excluded_ml


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
    if box is None:  # a mask of a few voxels vanishes on the working grid
        raise NoLungFoundError("The lung mask is too small to hold a single 20 mm patch; check the mask or the scan.")
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
    region enclosed in-plane is lung even where it reaches the next slice's surface); returns labels 0/1/2.
    The two lungs are closed side by side in two threads (scipy releases the GIL)."""
    filled = np.zeros(lungs.shape, bool)
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="latentharmonize-lung") as pool:
        done = [pool.submit(_fill_one_lung, lungs & (sides == side), spacing) for side in (RIGHT, LEFT)]
        for future in done:
            if future.result() is not None:
                box, part = future.result()
                filled[box] |= part
    return np.where(filled, sides, 0).astype(np.uint8)


def _fill_one_lung(lung: np.ndarray, spacing: np.ndarray):
    """``(box, filled)`` of one lung for :func:`_fill_each_lung`, or None when it is empty."""
    if not lung.any():
        return None
    margin = np.ceil(CLOSING_RADIUS_MM / spacing).astype(int) + 1
    box = mask_box(lung)
    # padding keeps the closing from eroding a lung cut by the volume edge
    padded = np.pad(lung[box], [(m, m) for m in margin])
    closed = _closing(padded, CLOSING_RADIUS_MM, spacing)[tuple(slice(m, -m) for m in margin)]
    return box, _fill_enclosed(closed)


def _fill_enclosed(closed: np.ndarray) -> np.ndarray:
    """``closed`` [z, y, x] with its holes per axial slice filled, except holes that open onto the outside across
    the slice above or below over at least ``OPEN_HOLE_FRACTION`` of their largest cross-section.

    A nodule or a consolidation ringed by lung is a hole in each of its slices and is closed above and below by
    lung. The top of the liver or spleen under the diaphragm's dome is also ringed by lung in the slices that cut the
    dome, but carries on into the abdomen in the next slice: on real scans (LIDC-IDRI) such domes put 5-21 mL of
    liver and spleen into the lung. Beyond the lungs' box is outside."""
    filled = ndimage.binary_fill_holes(closed, _IN_PLANE)
    holes, n = ndimage.label(filled & ~closed)
    if n == 0:
        return filled
    outside = np.pad(~filled, ((1, 1), (0, 0), (0, 0)), constant_values=True)
    # per hole: its voxels with outside in the slice below or above, and its largest cross-section
    contact = sum(np.bincount(holes[neighbour & (holes > 0)], minlength=n + 1)
                  for neighbour in (outside[:-2], outside[2:]))
    largest = np.max([np.bincount(holes[z].ravel(), minlength=n + 1) for z in np.flatnonzero(holes.any(axis=(1, 2)))],
                     axis=0)
    opened = np.flatnonzero(contact[1:] >= OPEN_HOLE_FRACTION * largest[1:]) + 1
    return filled & ~np.isin(holes, opened)


def _closing(mask: np.ndarray, radius_mm: float, spacing: np.ndarray) -> np.ndarray:
    """Closing with a Euclidean ball of ``radius_mm``, via two distance transforms (cost independent of the radius)."""
    dilated = ndimage.distance_transform_edt(~mask, sampling=spacing) <= radius_mm
    return ndimage.distance_transform_edt(dilated, sampling=spacing) > radius_mm


# --- back to the CT grid -------------------------------------------------------------------------


def _to_full_resolution(labels: np.ndarray, work: sitk.Image, ct: sitk.Image) -> sitk.Image:
    """Bring each lung back onto the CT grid. Voxels deep inside the low-resolution lung keep it
    (so dense lesions stay in); in the boundary band (partial overlap after linear interpolation)
    a voxel is lung only if it is air-like in the full-resolution CT, which gives a sharp edge, or a thin dense
    structure between the lung's air (:func:`_between_air`), which keeps subpleural reticulation in.
    The two lungs are resampled side by side in two threads, then written right first as before."""
    hu = sitk.GetArrayViewFromImage(ct)
    out = np.zeros(hu.shape, np.uint8)
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="latentharmonize-lung") as pool:
        done = [(side, pool.submit(_lung_on_ct, labels == side, work, ct, hu)) for side in (RIGHT, LEFT)]
        for side, future in done:  # each lung over its own box only: about half the voxels of a box around both
            if future.result() is not None:
                box, inside = future.result()
                np.copyto(out[box], side, where=inside)  # a fraction of the time of boolean indexing
    result = sitk.GetImageFromArray(out)
    result.CopyInformation(ct)
    return result


def _lung_on_ct(lung: np.ndarray, work: sitk.Image, ct: sitk.Image, hu: np.ndarray):
    """``(box, inside)`` of one lung for :func:`_to_full_resolution`, or None when it is empty."""
    if not lung.any():
        return None
    box = _lung_region(lung, work, ct)
    up = _resample_array(lung.view(np.uint8) * 200, work, ct, box, sitk.sitkLinear)
    values = hu[box]
    scanned = values > PAD_HU
    band = up > 0
    lung_air = band & scanned & (values < AIR_HU)  # every air-like voxel the lung keeps: deep ones are in the band too
    inside = (up >= 199) | lung_air  # 200: every interpolation neighbour is inside
    dense_band = band & ~inside & scanned
    spacing = ct.GetSpacing()
    return box, inside | _between_air(dense_band, lung_air, (spacing[1], spacing[0]))


def _between_air(candidates: np.ndarray, air: np.ndarray, pixel_mm: tuple,
                 gap_mm: float = THIN_GAP_MM) -> np.ndarray:
    """The ``candidates`` [z, y, x] that have ``air`` within ``gap_mm`` on both sides along a row, a column or a
    diagonal of their slice: dense structures at most about twice ``gap_mm`` thin lying between air (a reticular
    line, a septum), not the edge of solid tissue with air on one side (the chest wall). ``pixel_mm``: (y, x)
    spacing. Reads only the candidates' neighbours, so a thin band of candidates costs little."""
    z, y, x = np.nonzero(candidates)
    out = np.zeros(candidates.shape, bool)
    if z.size == 0:
        return out
    directions = [(uy, ux, int(max(1, round(gap_mm / np.hypot(uy * pixel_mm[0], ux * pixel_mm[1])))))
                  for uy, ux in ((0, 1), (1, 0), (1, 1), (1, -1))]
    reach = max(steps for _, _, steps in directions)
    padded = np.pad(air, ((0, 0), (reach, reach), (reach, reach)))
    found = np.zeros(z.size, bool)
    for uy, ux, steps in directions:
        before, after = np.zeros(z.size, bool), np.zeros(z.size, bool)
        for k in range(1, steps + 1):
            before |= padded[z, y + reach - k * uy, x + reach - k * ux]
            after |= padded[z, y + reach + k * uy, x + reach + k * ux]
        found |= before & after
    out[z[found], y[found], x[found]] = True
    return out


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


# --- plausibility of a lung mask -----------------------------------------------------------------------------------

MAX_LUNG_ML = 12000.0         # more than any adult's total lung capacity: not a lung mask
MAX_MASK_MEDIAN_HU = -100.0   # a mask whose median is soft tissue does not mark air-filled lung
BODY_FRACTION = (0.03, 0.75)  # share of the body the lungs fill over the slices they span (real chests: 5-37 %)
UNEQUAL_RATIO = 0.5           # smaller lung under this fraction of the larger: one is partly missing
EDGE_AREA_MM2 = 100.0         # lung cross-section on the first or last slice that means the scan cuts the lung
FOV_CONTACT_MM = 5.0          # lung contact with the in-plane edge of the field of view that marks a slice as cut
MIN_EXCLUDED_ML = 20.0        # less gas than this (a small stomach bubble) is not worth a warning
CHECK_SPACING_MM = 4.0        # voxel size of the coarse copy used for the body outline


@dataclass
class MaskAssessment:
    """Plausibility of a lung mask: ``warnings`` ({code, message}), the CT slices (last index) where the lungs touch
    the in-plane edge of the field of view, the share of the body the lungs fill, and the air left out as gas."""

    warnings: list = field(default_factory=list)
    fov_cut_slices: list = field(default_factory=list)
    body_fraction: float = 0.0
    excluded_air_ml: float = 0.0

    def as_dict(self) -> dict:
        return {"fov_cut_slices": list(self.fov_cut_slices), "body_fraction": round(self.body_fraction, 4),
                "excluded_air_ml": round(self.excluded_air_ml, 1)}


def assess_mask(lungs: sitk.Image, ct: sitk.Image, excluded_air_ml: float = 0.0) -> MaskAssessment:
    """Check a lung mask (1 right, 2 left, on the CT's grid) against its CT.

    Raises :class:`InputError` when the mask cannot be a lung mask (more than MAX_LUNG_ML, or it marks soft tissue
    rather than air-filled lung). Otherwise returns the warnings a user must see before trusting the numbers.
    ``excluded_air_ml`` is the gas the automatic segmentation left out (:class:`LungSegmentation`).
    """
    labels = sitk.GetArrayViewFromImage(lungs)
    hu = sitk.GetArrayViewFromImage(ct)
    volumes = lung_volumes_ml(lungs)
    if volumes["total"] == 0:
        raise InputError("The lung mask is empty; nonzero voxels must mark the lungs.")
    if volumes["total"] > MAX_LUNG_ML:
        raise InputError(f"The lung mask holds {volumes['total'] / 1000:.1f} L, more than any lung "
                         f"({MAX_LUNG_ML / 1000:.0f} L): it is not a lung mask of this scan. Check the mask, or "
                         "leave it out for automatic segmentation.")
    z, y, x = mask_box(labels)
    sample = (slice(z.start, z.stop, 2), slice(y.start, y.stop, 2), slice(x.start, x.stop, 2))  # plenty for a median
    median = float(np.median(hu[sample][labels[sample] > 0])) if np.any(labels[sample]) else -1000.0
    if median > MAX_MASK_MEDIAN_HU:
        raise InputError(f"The lung mask marks tissue of median {median:.0f} HU, not air-filled lung (about -850 HU): "
                         "it does not belong to this scan or marks something else. Check the mask.")
    found = MaskAssessment(excluded_air_ml=float(excluded_air_ml))
    coarse_hu, coarse_lung, coarse_mm = _coarse(lungs, ct)
    found.body_fraction = _body_fraction(coarse_hu, coarse_lung)
    found.fov_cut_slices = _fov_cut_slices(labels, coarse_hu, coarse_lung, lungs.GetSpacing(), coarse_mm)
    warn = found.warnings.append
    lo, hi = BODY_FRACTION
    if not lo <= found.body_fraction <= hi or volumes["total"] > 0.8 * MAX_LUNG_ML:
        warn({"code": "implausible_volume", "message": (
            f"The lungs ({volumes['total']:.0f} mL) fill {100 * found.body_fraction:.0f} % of the body over the "
            f"slices they span, where real chests give {100 * lo:.0f}-{100 * hi:.0f} %: the mask probably takes in "
            "air that is not lung or misses lung, so volumes and composition are unreliable.")})
    small, large = sorted((volumes["right"], volumes["left"]))
    if small < UNEQUAL_RATIO * large:
        less = "right" if volumes["right"] < volumes["left"] else "left"
        warn({"code": "unequal_lungs", "message": (
            f"The {less} lung ({small:.0f} mL) is less than half the other ({large:.0f} mL): part of it may be "
            "missing from the mask or the scan (collapse, effusion, resection, field of view), so per-side "
            "figures compare unequal parts.")})
    ends = _cut_ends(labels, lungs.GetSpacing())
    if ends:
        warn({"code": "incomplete_coverage", "message": (
            f"The lungs reach the {' and '.join(ends)} slice of the scan: part of the lung lies outside it, so "
            "volumes are lower than the whole lungs' and the composition describes only the part in view.")})
    if found.fov_cut_slices:
        first, last = found.fov_cut_slices[0], found.fov_cut_slices[-1]
        warn({"code": "fov_cut", "message": (
            f"The lungs touch the edge of the field of view on {len(found.fov_cut_slices)} slices ({first}-{last}): "
            "lung beyond the edge is not in the scan, so volumes are low and the composition misses the periphery "
            "there.")})
    if excluded_air_ml >= MIN_EXCLUDED_ML:
        warn({"code": "air_excluded", "message": (
            f"{excluded_air_ml:.0f} mL of air inside the body was not counted as lung: it is pure air (near "
            "-1000 HU, no lung tissue) apart from the airways, as stomach or bowel gas is. If some of it is lung "
            "(a large bulla), the volumes and composition leave it out.")})
    return found


def _coarse(lungs: sitk.Image, ct: sitk.Image) -> tuple:
    """CT averaged in-plane to about CHECK_SPACING_MM (slices kept) and the lung mask sampled at the centres of its
    pixels: HU and boolean lung [k, j, i] arrays, and the coarse pixel size (i, j) in mm."""
    factors = [max(1, int(round(CHECK_SPACING_MM / s))) for s in ct.GetSpacing()[:2]] + [1]
    hu = sitk.GetArrayFromImage(sitk.BinShrink(ct, factors))
    fi, fj = factors[:2]
    lung = sitk.GetArrayViewFromImage(lungs)[:, fj // 2::fj, fi // 2::fi][:, :hu.shape[1], :hu.shape[2]] > 0
    return hu, lung, [s * f for s, f in zip(ct.GetSpacing()[:2], factors)]


def _body_fraction(hu: np.ndarray, lung: np.ndarray) -> float:
    """Lung volume over body volume, on the slices holding lung. The body of a slice is its tissue and lung with
    their enclosed holes filled (gas included, air around the body not)."""
    slices = lung.any(axis=(1, 2))
    body = ndimage.binary_fill_holes((hu[slices] >= AIR_HU) | lung[slices], _IN_PLANE)
    return float(np.count_nonzero(lung[slices]) / max(1, np.count_nonzero(body)))


def _cut_ends(labels: np.ndarray, spacing) -> list:
    """'first'/'last' when the lungs cover at least EDGE_AREA_MM2 of the first/last slice (last index)."""
    pixel_mm2 = spacing[0] * spacing[1]
    return [name for name, k in (("first", 0), ("last", -1))
            if np.count_nonzero(labels[k]) * pixel_mm2 >= EDGE_AREA_MM2]


def _fov_cut_slices(labels: np.ndarray, coarse_hu: np.ndarray, coarse_lung: np.ndarray, spacing, coarse_mm) -> list:
    """Slices (last index) where the lungs touch the in-plane image border (full resolution) or the padding
    outside the reconstruction circle (coarse copy) along at least FOV_CONTACT_MM."""
    contact = (np.count_nonzero(labels[:, 0, :], axis=1) + np.count_nonzero(labels[:, -1, :], axis=1)) * spacing[0]
    contact = contact + (np.count_nonzero(labels[:, :, 0], axis=1)
                         + np.count_nonzero(labels[:, :, -1], axis=1)) * spacing[1]
    padding = ndimage.binary_dilation(coarse_hu < PAD_HU, _IN_PLANE)
    contact = contact + np.count_nonzero(coarse_lung & padding, axis=(1, 2)) * min(coarse_mm)
    return [int(k) for k in np.flatnonzero(contact >= FOV_CONTACT_MM)]
