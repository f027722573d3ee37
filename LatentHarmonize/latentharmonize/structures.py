"""Vessels and airways inside the lungs, as structures of their own (no learned weights).

Clinical texture tools segment vessels and airways first and classify only the parenchyma (field notes section 5):
a vessel at +40 HU or a bronchus is normal anatomy, not a tissue pattern. Both are found on the model grid
(1.25 x 1.25 x 2.5 mm, the lung box only), then refined on the CT's own grid where the edge is as sharp as the CT.

- **Vessels**: bright tubes. Multi-scale Hessian vesselness (Frangi's measure, as ITK's ``ObjectnessMeasure``
  for 1-D bright objects, on the HU smoothed at ``VESSEL_SCALES_MM`` and scale-normalised by sigma^2) above
  ``VESSELNESS_MIN``, on voxels denser than ``VESSEL_GRID_HU``. The measure is high only where the HU curves
  across two directions and not along the third, so reticular or honeycomb walls (sheets) are not vessels. Where
  the dense voxels are thick (consolidation, masses, large vessels), only the large scales ``BULK_SCALES_MM`` count,
  with the stricter ``BULK_VESSELNESS_MIN``: a thin patch of consolidation curves like a thick vessel, and
  disease taken for a vessel would vanish from the tissue composition (docs/structures.md has the trade-off).
- **Airways**: the air-filled tree grown from the trachea. The trachea is the largest air region outside the lungs
  that reaches the lungs' top slice without touching the model grid's sides (the automatic lung mask leaves it
  out; the grid beyond the scan's ends, which reads as air, is not searched). From it, air below a threshold is
  grown into the lungs; the threshold rises from ``AIRWAY_THRESHOLDS_HU[0]`` while the grown volume stays plausible
  (leak control): a step that more than ``AIRWAY_LEAK_FACTOR``-folds a tree of at least ``AIRWAY_MIN_CHECKED_ML``
  and adds more than ``AIRWAY_MIN_LEAK_LUNG_FRACTION`` of the lung, or a tree above ``AIRWAY_MAX_LUNG_FRACTION`` of
  the lung, has leaked into the parenchyma, and the last tree before it is kept. Low-attenuation lung (emphysema)
  next to a bronchus is what makes a step leak.

On the CT grid (:func:`refine_on_ct`), a lung voxel is vessel where the (one-voxel dilated) grid vessels reach it and
its own HU is above ``VESSEL_CT_HU`` (halfway between lung, -850, and blood, +40), and airway where the grid airways
reach it and its HU is below ``AIRWAY_CT_HU``.

Label values (``VESSEL_LABEL`` 200, ``AIRWAY_LABEL`` 201) are those of the analyze label map and segmentation; tissue
clusters use 1..K, K < 200.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy import ndimage

from .grid import mask_box

VESSEL_LABEL = 200
AIRWAY_LABEL = 201
STRUCTURE_NAMES = {VESSEL_LABEL: "vessels", AIRWAY_LABEL: "airways"}
# red and pale blue, the usual colours of vessels and airways, apart from the tissue palette
STRUCTURE_COLORS = {VESSEL_LABEL: (0.80, 0.12, 0.15), AIRWAY_LABEL: (0.70, 0.90, 1.00)}
STRUCTURE_KINDS = {VESSEL_LABEL: "vessel", AIRWAY_LABEL: "airway"}  # their terminology (writers.terminology)

VESSEL_SCALES_MM = (1.5, 2.5)        # Gaussian sigmas of thin vessels (below the 2.5 mm slices, noise reads as tubes)
VESSELNESS_MIN = 0.2                 # vesselness (0..1) above which a dense voxel is a vessel
VESSEL_GRID_HU = -600.0              # on the model grid, partial volume lowers thin vessels' HU
VESSEL_CT_HU = -400.0                # halfway between lung (-850) and blood (+40)
VESSEL_REACH_STEPS = 1               # model-grid voxels around a found vessel whose dense CT voxels join it
BULK_OPENING_STEPS = 1               # dense voxels surviving an opening this deep are thick
BULK_SCALES_MM = (4.0,)              # Gaussian sigma of thick vessels
BULK_VESSELNESS_MIN = 0.7
VESSELNESS_GAMMA = 80.0              # Frobenius-norm scale of the scale-normalised Hessian (HU): below it, noise
AIRWAY_THRESHOLDS_HU = (-975.0, -950.0, -925.0, -900.0)
AIRWAY_LEAK_FACTOR = 2.0
AIRWAY_MIN_CHECKED_ML = 1.0          # growth from a smaller tree is not a leak
AIRWAY_MIN_LEAK_LUNG_FRACTION = 0.005  # nor is a step that adds less of the lung, however it multiplies the tree
AIRWAY_MAX_LUNG_FRACTION = 0.04      # intrapulmonary airway lumen is about 1-2 % of the lung
AIRWAY_CT_HU = -700.0
TRACHEA_AIR_HU = -900.0
TRACHEA_MIN_ML = 0.2                 # what of the trachea lies above the lungs' top slice may be short
SEED_BRIDGE_STEPS = 2                # grid voxels from the trachea across the rim into the lung mask


def segment_structures(hu: np.ndarray, lung: np.ndarray, spacing, scan_slices=None) -> np.ndarray:
    """Vessels and airways of a model-grid volume: UInt8 [z, y, x], ``VESSEL_LABEL``/``AIRWAY_LABEL`` inside the
    lung, 0 elsewhere. ``hu``: float HU [z, y, x]; ``lung``: bool [z, y, x]; ``spacing``: (x, y, z) mm;
    ``scan_slices``: the grid's ``scan_slices``, the slices the scan covers (None: all)."""
    out = np.zeros(hu.shape, np.uint8)
    box = mask_box(lung)
    if box is None:
        return out
    # the airways are traced in a worker thread while this one finds the vessels (scipy and numpy release the GIL)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="latentharmonize-airways") as pool:
        # the whole grid: the trachea may lie above the lungs' box
        airway = pool.submit(airways, hu, lung, spacing, scan_slices)
        out[box][vessels(hu[box], lung[box], spacing)] = VESSEL_LABEL
        out[airway.result()] = AIRWAY_LABEL
    return out


def parenchyma(lung: np.ndarray, structures: np.ndarray) -> np.ndarray:
    """The lung without its vessels and airways: what ``analyze`` and ``evaluate`` cut patches from, so that tissue
    clusters describe the parenchyma. (Training reads whole-lung patches: docs/training.md says why.)"""
    return lung & (structures == 0)


def hessian_eigenvalues(smooth: np.ndarray, at: np.ndarray, spacing) -> np.ndarray:
    """Eigenvalues [n, 3] of the Hessian of ``smooth`` [z, y, x] at flat indices ``at`` (not on the border),
    sorted by magnitude, from central differences (``spacing`` (x, y, z) mm). Closed form for symmetric 3 x 3
    matrices (Smith 1961), several times faster than a batched ``eigvalsh``."""
    flat = smooth.ravel()
    steps = np.array(smooth.strides) // smooth.itemsize  # flat offset of one voxel along z, y, x
    h = np.asarray(spacing, dtype=np.float64)[::-1]
    centre = flat[at].astype(np.float64)
    d = [(flat[at + steps[i]] + flat[at - steps[i]] - 2.0 * centre) / h[i] ** 2 for i in range(3)]
    o = {(i, j): (flat[at + steps[i] + steps[j]] - flat[at + steps[i] - steps[j]] - flat[at - steps[i] + steps[j]]
                  + flat[at - steps[i] - steps[j]]) / (4.0 * h[i] * h[j]) for i, j in ((0, 1), (0, 2), (1, 2))}
    q = (d[0] + d[1] + d[2]) / 3.0
    off = o[0, 1] ** 2 + o[0, 2] ** 2 + o[1, 2] ** 2
    p = np.sqrt(((d[0] - q) ** 2 + (d[1] - q) ** 2 + (d[2] - q) ** 2 + 2.0 * off) / 6.0)
    safe = np.where(p > 0, p, 1.0)
    b0, b1, b2 = ((d[i] - q) / safe for i in range(3))
    det = (b0 * (b1 * b2 - (o[1, 2] / safe) ** 2) - (o[0, 1] / safe) * ((o[0, 1] / safe) * b2 - (o[1, 2] / safe)
           * (o[0, 2] / safe)) + (o[0, 2] / safe) * ((o[0, 1] / safe) * (o[1, 2] / safe) - b1 * (o[0, 2] / safe)))
    phi = np.arccos(np.clip(det / 2.0, -1.0, 1.0)) / 3.0
    first = q + 2.0 * p * np.cos(phi)
    last = q + 2.0 * p * np.cos(phi + 2.0 * np.pi / 3.0)
    values = np.stack([first, 3.0 * q - first - last, last], axis=1)
    order = np.argsort(np.abs(values), axis=1)
    return np.take_along_axis(values, order, axis=1)


def vesselness(hu: np.ndarray, at: np.ndarray, spacing, scales=VESSEL_SCALES_MM) -> np.ndarray:
    """Frangi vesselness of bright tubes (0..1) at flat indices ``at`` of ``hu`` [z, y, x]: the maximum over
    ``scales`` (mm) of the measure on the HU smoothed at that sigma, scale-normalised by sigma^2.

    The same measure as ITK's ``ObjectnessMeasure`` (alpha = beta = 0.5, one-dimensional bright objects), evaluated
    only at the candidate voxels: over the whole lung box ITK's filter takes about 2 s per scale on a full-size scan,
    more than the whole analysis may.
    """
    spacing = np.asarray(spacing, dtype=np.float64)
    best = np.zeros(at.size)
    if at.size == 0:
        return best
    # smooth only the box around the points (with the filter's reach): the thick points of a scan are few
    points = np.unravel_index(at, hu.shape)
    reach = np.ceil(4.0 * max(scales) / spacing[::-1]).astype(int) + 1
    box = tuple(slice(max(int(p.min()) - r, 0), min(int(p.max()) + r + 1, n))
                for p, r, n in zip(points, reach, hu.shape))
    crop = np.asarray(hu[box], dtype=np.float32)
    at = np.ravel_multi_index(tuple(p - b.start for p, b in zip(points, box)), crop.shape)
    for sigma in scales:
        smooth = ndimage.gaussian_filter(crop, sigma / spacing[::-1], mode="nearest")
        l1, l2, l3 = (sigma * sigma * hessian_eigenvalues(smooth, at, spacing)).T
        ra2 = (l2 / np.where(l3 == 0, 1.0, l3)) ** 2
        rb2 = l1 ** 2 / np.maximum(np.abs(l2 * l3), 1e-12)
        structure2 = l1 ** 2 + l2 ** 2 + l3 ** 2
        measure = ((1.0 - np.exp(-ra2 / (2 * 0.5 ** 2))) * np.exp(-rb2 / (2 * 0.5 ** 2))
                   * (1.0 - np.exp(-structure2 / (2 * VESSELNESS_GAMMA ** 2))))
        best = np.maximum(best, np.where((l2 < 0) & (l3 < 0), measure, 0.0))
    return best


def vessels(hu: np.ndarray, lung: np.ndarray, spacing) -> np.ndarray:
    """Bool [z, y, x]: lung voxels denser than ``VESSEL_GRID_HU`` whose vesselness exceeds ``VESSELNESS_MIN``.

    Where the dense voxels are thick (they survive an opening by ``BULK_OPENING_STEPS`` voxel steps: large vessels,
    consolidation, masses), noise on the plateau makes tube-like curvature at small scales, so there only the large
    scales ``BULK_SCALES_MM`` count: a large vessel is a tube at its own scale, consolidation is not.
    """
    inner = np.zeros(hu.shape, bool)
    inner[1:-1, 1:-1, 1:-1] = True  # central differences need both neighbours
    at = np.flatnonzero(lung & inner & (hu > VESSEL_GRID_HU))
    thick = ndimage.binary_opening(hu > VESSEL_CT_HU, iterations=BULK_OPENING_STEPS).ravel()[at]
    out = np.zeros(hu.shape, bool)
    for where, scales, minimum in ((at[~thick], VESSEL_SCALES_MM, VESSELNESS_MIN),
                                   (at[thick], BULK_SCALES_MM, BULK_VESSELNESS_MIN)):
        out.ravel()[where[vesselness(hu, where, spacing, scales) > minimum]] = True
    return out


def trachea_seed(hu: np.ndarray, lung: np.ndarray, spacing, scan_slices=None) -> np.ndarray:
    """Bool [z, y, x]: the trachea (or what of it the box holds), or nothing when none is found.

    The largest air region outside the lung mask that reaches the top slice holding lung and does not touch the
    box's sides (air there is outside the body). Slices outside ``scan_slices`` (first, last) are not air: where a
    scan ends within the grid's margin, the grid beyond it reads as air, which would join the trachea to the air
    outside the body.
    """
    air = (hu < TRACHEA_AIR_HU) & ~lung
    if scan_slices is not None:
        air[:scan_slices[0]] = air[scan_slices[1] + 1:] = False
    labels, n = ndimage.label(air)
    if n == 0:
        return np.zeros(hu.shape, bool)
    outside = np.unique(np.concatenate([labels[:, [0, -1], :].ravel(), labels[:, :, [0, -1]].ravel()]))
    top = np.flatnonzero(lung.any(axis=(1, 2)))[-1]  # the model grid is axial with z up: the lungs' top slice
    reaching = np.setdiff1d(np.unique(labels[top:]), np.append(outside, 0))
    if reaching.size == 0:
        return np.zeros(hu.shape, bool)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    best = int(reaching[np.argmax(sizes[reaching])])
    if sizes[best] * float(np.prod(spacing)) / 1000.0 < TRACHEA_MIN_ML:
        return np.zeros(hu.shape, bool)
    return labels == best


def airways(hu: np.ndarray, lung: np.ndarray, spacing, scan_slices=None) -> np.ndarray:
    """Bool [z, y, x]: the intrapulmonary airway lumen connected to the trachea, with leak control
    (``scan_slices``: see :func:`trachea_seed`)."""
    seed = trachea_seed(hu, lung, spacing, scan_slices)
    if not seed.any():
        return np.zeros(hu.shape, bool)
    # across the partial-volume rim where the main bronchi enter the lung mask
    seed = ndimage.binary_dilation(seed, iterations=SEED_BRIDGE_STEPS, mask=~lung & (hu < AIRWAY_CT_HU)) | seed
    lung_voxels = np.count_nonzero(lung)
    limit = AIRWAY_MAX_LUNG_FRACTION * lung_voxels
    min_checked = AIRWAY_MIN_CHECKED_ML * 1000.0 / float(np.prod(spacing))  # noise fragments the first, tiny trees
    # where the lung mask holds the trachea, the first tree is the trachea alone, and the next step into the main
    # bronchi more than doubles it: only a step that also adds a share of the lung is taken for a leak
    min_leak = AIRWAY_MIN_LEAK_LUNG_FRACTION * lung_voxels
    kept = np.zeros(hu.shape, bool)
    kept_volume = 0
    for threshold in AIRWAY_THRESHOLDS_HU:
        labels, _ = ndimage.label(lung & (hu < threshold) | seed)
        grown = np.isin(labels, np.unique(labels[seed])) & lung
        volume = np.count_nonzero(grown)
        if volume > limit or (kept_volume >= min_checked and volume > AIRWAY_LEAK_FACTOR * kept_volume
                              and volume - kept_volume > min_leak):
            break
        kept, kept_volume = grown, volume
    return kept


def refine_on_ct(coarse: np.ndarray, grid_index: np.ndarray, ct_hu: np.ndarray) -> np.ndarray:
    """Structure label of CT lung voxels at the CT's resolution.

    ``coarse``: :func:`segment_structures` output on the model grid; ``grid_index``: flat model-grid index of each
    CT lung voxel (nearest grid voxel); ``ct_hu``: the CT HU of those voxels. Returns UInt8 per voxel (0 = neither).
    """
    grown_vessels = ndimage.binary_dilation(coarse == VESSEL_LABEL, iterations=VESSEL_REACH_STEPS).ravel()[grid_index]
    out = np.zeros(grid_index.shape, np.uint8)
    out[grown_vessels & (ct_hu > VESSEL_CT_HU)] = VESSEL_LABEL
    out[(coarse.ravel()[grid_index] == AIRWAY_LABEL) & (ct_hu < AIRWAY_CT_HU)] = AIRWAY_LABEL
    return out
