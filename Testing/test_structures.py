"""Vessels and airways: Hessian vesselness finds tubes (not blobs or sheets), the airway tree grows from the trachea
and stops before leaking into low-attenuation lung, and the CT-resolution refinement follows the CT's own HU."""
from __future__ import annotations

import numpy as np
import pytest

from latentharmonize.structures import (AIRWAY_LABEL, VESSEL_LABEL, airways, hessian_eigenvalues, refine_on_ct,
                                        segment_structures, vessels)

SPACING = (1.25, 1.25, 2.5)  # model grid (x, y, z) mm
SHAPE = (40, 96, 96)         # z, y, x: 100 x 120 x 120 mm


def _coordinates():
    z, y, x = np.meshgrid(*[np.arange(n) * s for n, s in zip(SHAPE, SPACING[::-1])], indexing="ij")
    return z, y, x


def _distance_to_line(points, start, direction):
    d = np.asarray(direction, float) / np.linalg.norm(direction)
    rel = np.stack(points, axis=-1) - np.asarray(start, float)
    return np.linalg.norm(rel - (rel @ d)[..., None] * d, axis=-1)


@pytest.fixture(scope="module")
def chest():
    """A lung box of normal lung (-860 HU, noise) holding an oblique vessel (+40 HU, radius 2 mm), a consolidation
    block (+30 HU, 24 mm), a sheet of dense wall (-100 HU, 2 mm thick); returns hu, lung and the truth masks."""
    rng = np.random.default_rng(5)
    z, y, x = _coordinates()
    hu = rng.normal(-860.0, 25.0, SHAPE).astype(np.float32)
    lung = np.zeros(SHAPE, bool)
    lung[2:-2, 6:-6, 6:-6] = True
    vessel = _distance_to_line((z, y, x), (10.0, 20.0, 20.0), (1.0, 0.6, 1.5)) < 2.0
    block = (np.abs(z - 70) < 12) & (np.abs(y - 85) < 12) & (np.abs(x - 85) < 12)
    sheet = (np.abs(x - 40 - 0.3 * y) < 1.0) & (y > 60) & (z < 50)
    hu[sheet] = -100.0 + rng.normal(0, 25.0, sheet.sum())
    hu[block] = 30.0 + rng.normal(0, 25.0, block.sum())
    hu[vessel] = 40.0 + rng.normal(0, 25.0, vessel.sum())
    return hu, lung, vessel & lung, block & ~vessel, sheet & ~vessel & ~block


def test_hessian_eigenvalues_match_numpy():
    rng = np.random.default_rng(1)
    volume = rng.normal(size=(8, 9, 10))
    at = np.ravel_multi_index(np.nonzero(np.pad(np.ones((6, 7, 8), bool), 1)), volume.shape)
    values = hessian_eigenvalues(volume, at, (1.0, 1.5, 2.0))
    h = np.array([2.0, 1.5, 1.0])
    flat, steps = volume.ravel(), np.array(volume.strides) // volume.itemsize
    hess = np.zeros((at.size, 3, 3))
    for i in range(3):
        for j in range(3):
            if i == j:
                hess[:, i, i] = (flat[at + steps[i]] + flat[at - steps[i]] - 2 * flat[at]) / h[i] ** 2
            else:
                hess[:, i, j] = (flat[at + steps[i] + steps[j]] - flat[at + steps[i] - steps[j]]
                                 - flat[at - steps[i] + steps[j]] + flat[at - steps[i] - steps[j]]) / (4 * h[i] * h[j])
    want = np.linalg.eigvalsh(hess)
    np.testing.assert_allclose(values, np.take_along_axis(want, np.argsort(np.abs(want), axis=1), axis=1),
                               atol=1e-9)


def test_vessels_are_tubes_not_blobs_or_sheets(chest):
    hu, lung, vessel, block, sheet = chest
    found = vessels(hu, lung, SPACING)
    dice = 2 * (found & vessel).sum() / (found.sum() + vessel.sum())
    assert dice > 0.6
    assert found[block].mean() < 0.1     # consolidation stays tissue
    assert found[sheet].mean() < 0.2     # a wall-like sheet is not a vessel
    assert not found[lung & ~vessel & ~block & ~sheet & (hu < -600)].any()  # lung itself never


def _airway_chest(emphysema_hu):
    """Trachea (air, radius 6 mm) from the top of the box down to z = 60 mm outside the lung, a bronchus
    (radius 3 mm, 1.5 mm wall at +40 HU) running on inside the lung, and a 30 mm ball of low-attenuation lung at
    ``emphysema_hu`` touching the bronchus."""
    rng = np.random.default_rng(9)
    z, y, x = _coordinates()
    hu = rng.normal(-860.0, 20.0, SHAPE).astype(np.float32)
    hu[(x < 8) | (x > 112)] = 40.0 + rng.normal(0, 20.0, ((x < 8) | (x > 112)).sum())  # chest wall
    lung = (x > 10) & (x < 110) & (y > 10) & (y < 110) & (z < 90)
    trachea = (np.hypot(y - 60, x - 60) < 6.0) & (z >= 60)
    lung &= ~(np.hypot(y - 60, x - 60) < 9.0) | (z < 60)  # the trachea and its wall lie outside the lung mask
    hu[(np.hypot(y - 60, x - 60) < 8.0) & (z >= 60)] = 40.0
    bronchus_axis = _distance_to_line((z, y, x), (60.0, 60.0, 60.0), (-1.0, 0.0, -0.8))
    below = z < 62
    hu[(bronchus_axis < 4.5) & below] = 40.0
    bronchus = (bronchus_axis < 3.0) & below & lung
    ball = (np.sqrt((z - 30) ** 2 + (y - 60) ** 2 + (x - 30) ** 2) < 15.0) & ~(bronchus_axis < 4.5)
    hu[ball] = emphysema_hu + rng.normal(0, 8.0, ball.sum())
    hu[trachea | bronchus] = -1000.0 + rng.normal(0, 8.0, (trachea | bronchus).sum())
    return hu, lung, bronchus, ball & lung


def test_airways_grow_from_the_trachea_into_the_bronchus():
    hu, lung, bronchus, ball = _airway_chest(-870.0)
    found = airways(hu, lung, SPACING)
    assert found[bronchus].mean() > 0.8
    assert not found[~lung].any()                     # the trachea itself is outside the lung mask
    assert found[~bronchus].sum() < 0.2 * bronchus.sum()


def test_segment_structures_finds_a_trachea_above_the_lungs():
    """The trachea is found on the whole model grid, also where only its part above the lungs lies outside the lung
    mask (a real scan's automatic mask held the rest of it)."""
    hu, lung, bronchus, _ = _airway_chest(-870.0)
    z, y, x = _coordinates()
    lung |= (np.hypot(y - 60, x - 60) < 9.0) & (z < 88)
    labels = segment_structures(hu, lung, SPACING)
    assert np.mean(labels[bronchus] == AIRWAY_LABEL) > 0.8


def test_the_trachea_is_found_where_the_scan_ends_within_the_grid():
    """The grid's margin can run past the scan's top slice; resampled, what lies beyond reads as air and joins the
    trachea to the air outside the body. The slices the scan covers (the grid's ``scan_slices``) keep them apart."""
    hu, lung, bronchus, _ = _airway_chest(-870.0)
    beyond = SHAPE[0] - 3
    hu[beyond:] = -1024.0  # the resampler's default outside the scan
    assert not airways(hu, lung, SPACING).any()
    found = airways(hu, lung, SPACING, scan_slices=(0, beyond - 1))
    assert found[bronchus].mean() > 0.8
    assert found[~bronchus].sum() < 0.2 * bronchus.sum()


def test_a_bronchus_that_doubles_a_trachea_held_in_the_lung_mask_is_not_a_leak():
    """Where the automatic lung mask holds part of the trachea (LIDC-IDRI-0001), the first tree is that part alone,
    and the step into the bronchi, whose lumen partial volume leaves a little above -975 HU, more than doubles it.
    A step that adds so little of the lung is growth, not a leak."""
    hu, lung, bronchus, _ = _airway_chest(-870.0)
    z, y, x = _coordinates()
    held = (np.hypot(y - 60, x - 60) < 9.0) & (z >= 60) & (z < 72)
    lung |= held
    hu[bronchus] += 45.0  # the bronchus's lumen reads about -955 HU
    found = airways(hu, lung, SPACING)
    assert found[bronchus].mean() > 0.8
    assert found[held & (hu < -975.0)].mean() > 0.8
    assert not found[~bronchus & ~held].any()


def test_airway_growth_stops_before_leaking_into_low_attenuation_lung():
    hu, lung, bronchus, ball = _airway_chest(-945.0)  # joins the lumen only once the threshold passes -945 HU
    found = airways(hu, lung, SPACING)
    assert found[bronchus].mean() > 0.8
    assert found[ball].mean() < 0.05


def test_segment_structures_labels_and_determinism(chest):
    hu, lung, vessel, _, _ = chest
    first = segment_structures(hu, lung, SPACING)
    assert first.dtype == np.uint8 and set(np.unique(first)) <= {0, VESSEL_LABEL, AIRWAY_LABEL}
    assert not first[~lung].any()
    np.testing.assert_array_equal(first, segment_structures(hu, lung, SPACING))
    assert not segment_structures(hu, np.zeros_like(lung), SPACING).any()


def test_refinement_follows_the_ct_hu():
    coarse = np.zeros((1, 3, 3), np.uint8)
    coarse[0, 1, 1] = VESSEL_LABEL
    coarse[0, 0, 0] = AIRWAY_LABEL
    index = np.array([4, 4, 3, 8, 0, 0])           # CT voxels and the grid voxel each lies in
    ct_hu = np.array([20.0, -850.0, 10.0, 30.0, -990.0, -600.0])
    # dense voxels in or next to a grid vessel are vessel; air in a grid airway is airway; lung stays tissue (0)
    assert refine_on_ct(coarse, index, ct_hu).tolist() == [VESSEL_LABEL, 0, VESSEL_LABEL, 0, AIRWAY_LABEL, 0]


def test_evaluate_reads_the_parenchyma_that_analyze_encodes(chest, tmp_path):
    """A cohort row's volumes for evaluate: the lung less the vessels found on the model grid (the mask analyze
    encodes), while the scan keeps its whole lung for training."""
    import pandas as pd
    import SimpleITK as sitk

    from latentharmonize.evaluation.encoding import load_volumes
    from latentharmonize.patches import PatchSpec
    from latentharmonize.scans import load_scan
    from latentharmonize.structures import parenchyma

    hu, lung, vessel, _, _ = chest
    row = {"patient": "p", "acquisition": "a"}
    for name, array in (("image", hu.astype(np.int16)), ("mask", lung.astype(np.uint8))):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(SPACING)
        row[name] = str(tmp_path / f"{name}.nrrd")
        sitk.WriteImage(image, row[name])
    row = pd.Series(row)
    scan = load_scan(row, PatchSpec())
    _, read, _, _, _ = load_volumes(row, PatchSpec())
    assert (scan.structures == VESSEL_LABEL).sum() > 0.5 * vessel.sum()  # the grid is the chest's own spacing
    np.testing.assert_array_equal(read, parenchyma(scan.lung, scan.structures))
    assert scan.lung.sum() - read.sum() == np.count_nonzero(scan.structures)
