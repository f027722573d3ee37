"""Automatic lung mask on synthetic chests built here (known truth), on the phantom and its scan variants, and on a
real chest CT (the shared real-ct folder); plausibility warnings of a lung mask."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from latentharmonize.errors import InputError, NoLungFoundError
from latentharmonize.lungmask import (_IN_PLANE, PAD_HU, assess_mask, lung_volumes_ml, outside_air, segment_lungs,
                                      segment_lungs_detailed, split_left_right)

# CI keeps the shared data next to the repository; elsewhere point LATENTHARMONIZE_REAL_CT at the folder
REAL_CT = Path(os.environ.get("LATENTHARMONIZE_REAL_CT",
                              Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real-ct"))


def synthetic_chest(size=(200, 200, 64), spacing=(1.25, 1.25, 3.0), seed=0, touching=False):
    """A chest CT (HU) and its truth, LPS with identity direction, centred on the origin.

    Body ellipse (40 HU) in air; two lung ellipsoids (-850 HU) holding a +30 HU vessel (right) and a
    0 HU consolidation blob (left); a trachea (-1000 HU) from the top slice splits into two bronchi
    that enter the lungs. Returns (ct, truth, parts) with truth 1 right / 2 left lung, and parts a
    dict of boolean arrays [z, y, x] (airways outside the lungs, trachea above the carina, vessel,
    consolidation).
    """
    nx, ny, nz = size
    z, y, x = np.meshgrid(*[(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip((nz, ny, nx), spacing[::-1])],
                          indexing="ij", sparse=True)
    half_z = nz * spacing[2] / 2.0
    lung_x = 50.0 if touching else 60.0
    semi = (52.0 if touching else 42.0, 55.0, 0.8 * half_z)
    shape = (nz, ny, nx)
    body = np.broadcast_to((x / 115.0) ** 2 + (y / 85.0) ** 2 <= 1.0, shape)
    right = ((x + lung_x) / semi[0]) ** 2 + ((y - 5) / semi[1]) ** 2 + (z / semi[2]) ** 2 <= 1.0
    left = ((x - lung_x) / semi[0]) ** 2 + ((y - 5) / semi[1]) ** 2 + (z / semi[2]) ** 2 <= 1.0
    left &= ~right
    carina = 0.3 * half_z
    trachea = np.broadcast_to((x ** 2 + (y + 20) ** 2 <= 9.0 ** 2) & (z >= carina), shape)
    for sign in (-1, 1):  # bronchi run from the carina down and out to each lung's medial surface
        t = np.clip((sign * x) / lung_x, 0, 1)
        centre_z = carina - t * lung_x  # 45 degrees, as main bronchi run
        trachea = trachea | ((x * sign >= 0) & (sign * x <= lung_x) &
                    ((y + 20 - t * 25) ** 2 + (z - centre_z) ** 2 <= 6.0 ** 2))
    vessel = right & ((x + lung_x) ** 2 + (y - 5) ** 2 <= 4.0 ** 2) & (np.abs(z) <= 0.5 * half_z)
    consolidation = left & ((x - lung_x) ** 2 + (y - 5) ** 2 + (z + 0.2 * half_z) ** 2 <= 14.0 ** 2)
    hu = np.full(shape, -1000.0, np.float32)
    hu[body] = 40.0
    hu[right | left] = -850.0
    hu[trachea] = -1000.0
    hu[vessel] = 30.0
    hu[consolidation] = 0.0
    hu += np.random.default_rng(seed).normal(0.0, 20.0, hu.shape).astype(np.float32)
    truth = np.zeros(shape, np.uint8)
    truth[right] = 1
    truth[left] = 2
    ct = _image(np.round(hu).astype(np.int16), spacing)
    parts = {"airways": trachea & ~(right | left), "trachea": trachea & (z >= carina + 10.0),
             "vessel": vessel, "consolidation": consolidation}
    return ct, _image(truth, spacing), parts


def _image(array, spacing):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin([-(n - 1) / 2.0 * s for n, s in zip(image.GetSize(), spacing)])
    return image


def dice(a, b):
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def _arr(image):
    return sitk.GetArrayFromImage(image)


@pytest.fixture(scope="module")
def chest():
    return synthetic_chest()


def _check_segmentation(mask, truth, parts):
    labels, true = _arr(mask), _arr(truth)
    assert mask.GetPixelID() == sitk.sitkUInt8 and mask.GetSize() == truth.GetSize()
    assert dice(labels > 0, true > 0) > 0.95
    assert dice(labels == 1, true == 1) > 0.95, "right lung (label 1) is the patient's right, LPS -x"
    assert dice(labels == 2, true == 2) > 0.95
    assert np.all(labels[parts["vessel"]] > 0), "a vessel inside the lung belongs to the lung"
    assert np.all(labels[parts["consolidation"]] > 0), "0 HU consolidation inside the lung belongs to the lung"
    assert parts["trachea"].any() and not np.any(labels[parts["trachea"]]), "the trachea is not lung"
    assert np.mean(labels[parts["airways"]] > 0) < 0.15, "extrapulmonary airways are mostly excluded"


def test_segments_synthetic_chest(chest):
    ct, truth, parts = chest
    mask = segment_lungs(ct)
    assert mask.GetOrigin() == ct.GetOrigin() and mask.GetDirection() == ct.GetDirection()
    _check_segmentation(mask, truth, parts)


@pytest.mark.parametrize("orientation", ["RAS", "RPI", "LSP"])
def test_any_direction_matrix(chest, orientation):
    """The same anatomy stored flipped or with permuted axes gives the same mask in physical space."""
    ct, truth, parts = chest
    ct_o, truth_o = sitk.DICOMOrient(ct, orientation), sitk.DICOMOrient(truth, orientation)
    assert ct_o.GetDirection() != ct.GetDirection()
    parts_o = {k: _arr(sitk.DICOMOrient(_as_image(v, ct), orientation)).astype(bool) for k, v in parts.items()}
    mask = segment_lungs(ct_o)
    assert mask.GetDirection() == ct_o.GetDirection()
    _check_segmentation(mask, truth_o, parts_o)


def test_oblique_direction(chest):
    """The chest resampled onto a grid rotated 25 degrees about z (an oblique direction matrix)."""
    ct, truth, parts = chest
    grid = sitk.Image(ct.GetSize(), sitk.sitkUInt8)
    grid.SetSpacing(ct.GetSpacing())
    grid.SetDirection(sitk.VersorTransform((0, 0, 1), np.deg2rad(25.0)).GetMatrix())
    centre = [(s - 1) / 2.0 for s in ct.GetSize()]
    shift = np.subtract(ct.TransformContinuousIndexToPhysicalPoint(centre),
                        grid.TransformContinuousIndexToPhysicalPoint(centre))
    grid.SetOrigin(tuple(np.add(grid.GetOrigin(), shift)))

    def onto_grid(image, interpolator, default, pixel):
        return sitk.Resample(image, grid, sitk.Transform(), interpolator, default, pixel)

    ct_o = onto_grid(ct, sitk.sitkLinear, -1000, sitk.sitkInt16)
    truth_o = onto_grid(truth, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    parts_o = {k: _arr(onto_grid(_as_image(v, ct), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)).astype(bool)
               for k, v in parts.items()}
    _check_segmentation(segment_lungs(ct_o), truth_o, parts_o)


def _as_image(array, reference):
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.CopyInformation(reference)
    return image


def test_airway_open_to_outside_air(chest):
    """In scans reaching the face the airway joins the outside air (nose, mouth); the lungs stay inside."""
    ct, truth, parts = chest
    hu = _arr(ct)
    nz, ny, nx = hu.shape
    hu[-3:, : ny // 2, nx // 2 - 3: nx // 2 + 4] = -1000  # top slices: channel from the trachea to the front
    opened = sitk.GetImageFromArray(hu)
    opened.CopyInformation(ct)
    _check_segmentation(segment_lungs(opened), truth, parts)


def test_a_trachea_that_widens_below_the_larynx_is_followed(chest):
    """A scan that starts at the larynx finds its airway narrow in the top slices. Below, the trachea widens to more
    than three times that first cross-section, gradually: that is not an airway opening into a lung, and the whole
    trachea stays out of the mask (LIDC-IDRI-0001 kept its trachea as lung before)."""
    ct, truth, parts = chest
    hu = _arr(ct)
    nz, ny, nx = hu.shape
    spacing = ct.GetSpacing()
    y, x = np.meshgrid((np.arange(ny) - (ny - 1) / 2.0) * spacing[1], (np.arange(nx) - (nx - 1) / 2.0) * spacing[0],
                       indexing="ij")
    radius2 = x ** 2 + (y + 20) ** 2
    z = (np.arange(nz) - (nz - 1) / 2.0) * spacing[2]
    upper = z >= 0.3 * nz * spacing[2] / 2.0 + 10.0  # the trachea above the carina, 12 mm wide instead of 9
    hu[upper] = np.where(radius2 <= 12.0 ** 2, -1000, hu[upper])
    for k, radius in enumerate((4.5, 7.0, 9.5)):  # the top three slices narrow towards the larynx
        hu[nz - 1 - k][(radius2 > radius ** 2) & (radius2 <= 12.0 ** 2)] = 40
    narrowed = sitk.GetImageFromArray(hu)
    narrowed.CopyInformation(ct)
    mask = segment_lungs(narrowed)
    assert not _arr(mask)[upper[:, None, None] & (radius2 <= 11.0 ** 2)[None]].any(), "the trachea is not lung"
    _check_segmentation(mask, truth, parts)


def test_touching_lungs_are_split():
    ct, truth, _ = synthetic_chest(seed=1, touching=True)
    true = _arr(truth)
    assert ndimage_components(true > 0) == 1, "test setup: the lungs must touch"
    labels = _arr(segment_lungs(ct))
    assert dice(labels == 1, true == 1) > 0.93 and dice(labels == 2, true == 2) > 0.93


def test_thin_dense_lines_at_the_lung_edge_stay_lung_and_the_chest_wall_does_not():
    """Subpleural reticulation: dense lines one voxel wide between the lung's air, running into the lateral edge of
    each lung, are lung up to the edge, while the chest wall beside them, as dense, stays out."""
    spacing = (1.25, 1.25, 3.0)
    ct, truth, _ = synthetic_chest(spacing=spacing, seed=4)
    hu, lung = _arr(ct), _arr(truth) > 0
    depth = ndimage.distance_transform_edt(lung, sampling=spacing[::-1])
    x_mm = np.abs(_physical_x(truth))
    rows = np.zeros(lung.shape, bool)
    rows[:, ::3] = True  # lines along x, two voxels of air between them
    lines = lung & rows & (depth <= 4.0) & (x_mm > 60.0)  # the lateral half of each lung, within 4 mm of its edge
    hu[lines] = 0
    labels = _arr(segment_lungs(_image(hu, spacing)))
    inner = lines & (depth > spacing[0])  # a line's last voxel merges with the chest wall: either side is right
    assert inner.sum() > 500
    assert np.mean(labels[inner] > 0) > 0.99, "reticular lines at the lung's edge belong to the lung"
    assert not np.any(labels[~lung & (hu >= -400)]), "no chest wall is taken in"


def ndimage_components(binary):
    from scipy import ndimage
    return ndimage.label(binary)[1]


def test_no_lung_found_in_abdomen(chest):
    ct, truth, parts = chest
    abdomen = np.where((_arr(truth) > 0) | parts["airways"], 40, _arr(ct)).astype(np.int16)
    abdomen[28:31, 95:105, 95:105] = -1000  # a few mL of bowel gas
    image = sitk.GetImageFromArray(abdomen)
    image.CopyInformation(ct)
    with pytest.raises(NoLungFoundError, match="No lung found: the largest air region .* is [0-9]+ mL"):
        segment_lungs(image)


def test_no_lung_found_without_air(chest):
    ct, _, _ = chest
    water = sitk.Cast(ct * 0, sitk.sitkInt16)  # a water phantom filling the field of view
    with pytest.raises(NoLungFoundError, match="no air inside the body"):
        segment_lungs(water)


def test_rejects_bad_arguments(chest):
    ct, _, _ = chest
    with pytest.raises(InputError, match="min_lung_ml"):
        segment_lungs(ct, min_lung_ml=0)
    with pytest.raises(InputError, match="3D scalar CT"):
        segment_lungs(ct[:, :, 10])


def test_split_left_right_on_touching_mask():
    _, truth, _ = synthetic_chest(seed=2, touching=True)
    binary = sitk.Cast(truth > 0, sitk.sitkUInt8)
    sides = _arr(split_left_right(binary))
    true = _arr(truth)
    assert set(np.unique(sides)) == {0, 1, 2}
    assert np.array_equal(sides > 0, true > 0), "splitting never changes which voxels are lung"
    assert dice(sides == 1, true == 1) > 0.97 and dice(sides == 2, true == 2) > 0.97


def test_split_single_lung_uses_side_of_centre(chest):
    _, truth, _ = chest
    left_only = sitk.Cast(truth == 2, sitk.sitkUInt8)
    sides = _arr(split_left_right(left_only))
    assert set(np.unique(sides)) == {0, 2}


def test_tiny_mask_is_refused_not_a_traceback(chest):
    """A mask of one voxel vanishes on the working grid; it gets the 'too small' refusal, not a TypeError."""
    _, truth, _ = chest
    tiny = np.zeros(_arr(truth).shape, np.uint8)
    tiny[30, 100, 60] = 1
    with pytest.raises(NoLungFoundError, match="too small"):
        split_left_right(_as_image(tiny, truth))


def test_split_rejects_empty_mask(chest):
    _, truth, _ = chest
    with pytest.raises(InputError, match="empty"):
        split_left_right(truth * 0)


def test_lung_volumes_match_ellipsoid_volume(chest):
    _, truth, _ = chest
    volumes = lung_volumes_ml(truth)
    half_z = truth.GetSize()[2] * truth.GetSpacing()[2] / 2.0
    ellipsoid_ml = 4.0 / 3.0 * np.pi * 42.0 * 55.0 * 0.8 * half_z / 1000.0
    assert volumes["right"] == pytest.approx(ellipsoid_ml, rel=0.02)
    assert volumes["left"] == pytest.approx(ellipsoid_ml, rel=0.02)
    assert volumes["total"] == pytest.approx(volumes["right"] + volumes["left"])


@pytest.mark.slow
def test_full_size_accuracy():
    """512 x 512 x 300 at 0.7 x 0.7 x 1 mm (its time is printed; `latentharmonize bench` times the mask stage)."""
    ct, truth, parts = synthetic_chest(size=(512, 512, 300), spacing=(0.7, 0.7, 1.0), seed=3)
    start = time.perf_counter()
    mask = segment_lungs(ct)
    elapsed = time.perf_counter() - start
    print(f"segment_lungs on 512x512x300: {elapsed:.2f} s")
    _check_segmentation(mask, truth, parts)


@pytest.mark.parametrize("patient_index", [0, 2])  # healthy, fibrosis (dense subpleural tissue)
def test_phantom_lungs_match_truth(patient_index):
    phantom = pytest.importorskip("latentharmonize.phantom")
    patient = phantom.make_patient(patient_index, seed=0)
    thick = next(a for a in phantom.DEFAULT_ACQUISITIONS if a.thickness_mm >= 2.5)
    for ct in phantom.acquire_all(patient, [phantom.DEFAULT_ACQUISITIONS[0], thick]):
        truth = sitk.Resample(patient.truth, ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        mask = segment_lungs(ct)
        labels, lung = _arr(mask), _arr(truth) > 0
        volume_error = lung_volumes_ml(mask)["total"] - np.count_nonzero(lung) * np.prod(ct.GetSpacing()) / 1000.0
        print(f"phantom patient {patient_index}, {ct.GetSpacing()[2]} mm slices: Dice {dice(labels > 0, lung):.4f}, "
              f"volume error {volume_error:+.1f} mL")
        assert dice(labels > 0, lung) > 0.95
        assert abs(volume_error) < 0.06 * np.count_nonzero(lung) * np.prod(ct.GetSpacing()) / 1000.0
        x = _physical_x(mask)
        assert np.mean(x[labels == 1] < 0) > 0.95 and np.mean(x[labels == 2] > 0) > 0.95, "right is -x, left +x"


def _physical_x(image):
    """LPS x (mm) of every voxel, [z, y, x] array (the phantom has an identity direction)."""
    assert image.GetDirection() == (1, 0, 0, 0, 1, 0, 0, 0, 1)
    x = image.GetOrigin()[0] + image.GetSpacing()[0] * np.arange(image.GetSize()[0])
    return np.broadcast_to(x, image.GetSize()[::-1])


# --- field of view, gas and plausibility on the synthetic chest ------------------------------------------------------

def _crop(image, box):
    z, y, x = box
    return image[x, y, z]


def _warning_codes(mask, ct, excluded=0.0):
    return [w["code"] for w in assess_mask(mask, ct, excluded).warnings]


def test_whole_chest_has_no_warnings(chest):
    ct, _, _ = chest
    found = segment_lungs_detailed(ct)
    assert found.excluded_air_ml == 0
    assessment = assess_mask(found.lungs, ct, found.excluded_air_ml)
    assert assessment.warnings == [] and assessment.fov_cut_slices == []
    assert 0.05 < assessment.body_fraction < 0.75


def test_lungs_cut_by_the_image_border_are_kept(chest):
    """A field of view narrower than the chest cuts both lungs: they are lung, not air around the body."""
    ct, truth, _ = chest
    box = (slice(None), slice(None), slice(40, 160))  # x: the lungs span about 15..185
    part, true = _crop(ct, box), _arr(_crop(truth, box))
    found = segment_lungs_detailed(part)
    labels = _arr(found.lungs)
    assert dice(labels == 1, true == 1) > 0.95 and dice(labels == 2, true == 2) > 0.95
    assessment = assess_mask(found.lungs, part, found.excluded_air_ml)
    assert [w["code"] for w in assessment.warnings] == ["fov_cut"]
    cut = np.flatnonzero((true[:, :, 0] > 0).any(axis=1) | (true[:, :, -1] > 0).any(axis=1))
    assert set(assessment.fov_cut_slices) <= set(cut.tolist()) and len(assessment.fov_cut_slices) > 0.8 * len(cut)


def test_lungs_cut_by_the_reconstruction_circle_are_kept(chest):
    """Scanners pad outside the reconstruction circle (-2000 HU here); a circle cutting the lungs does not lose them."""
    ct, truth, _ = chest
    hu = _arr(ct)
    ny, nx = hu.shape[1:]
    yy, xx = np.mgrid[:ny, :nx]
    hu[:, (yy - (ny - 1) / 2) ** 2 + (xx - (nx - 1) / 2) ** 2 > 75.0 ** 2] = -2000  # 94 mm: through both lungs
    padded = sitk.GetImageFromArray(hu.astype(np.int16))
    padded.CopyInformation(ct)
    true = _arr(truth) * ((yy - (ny - 1) / 2) ** 2 + (xx - (nx - 1) / 2) ** 2 <= 75.0 ** 2)
    labels = _arr(segment_lungs(padded))
    assert dice(labels > 0, true > 0) > 0.95
    assert not np.any(labels[hu <= PAD_HU]), "padding is never lung"
    assert "fov_cut" in _warning_codes(segment_lungs(padded), padded)


def test_gas_below_the_lungs_is_not_lung(chest):
    """A pocket of pure air inside the body, as big as a lung base, apart from the lungs: gas, left out and reported."""
    ct, truth, _ = chest
    hu = _arr(ct)
    gas = np.zeros(hu.shape, bool)
    gas[:8, 60:140, 70:130] = True  # 8 slices of 3 mm under the lungs, 100 x 75 mm: 144 mL
    hu[gas] = np.round(-1000 + np.random.default_rng(5).normal(0, 20, gas.sum()))
    image = sitk.GetImageFromArray(hu)
    image.CopyInformation(ct)
    found = segment_lungs_detailed(image)
    labels = _arr(found.lungs)
    assert not np.any(labels[gas]), "no gas voxel is lung"
    assert dice(labels > 0, _arr(truth) > 0) > 0.95
    assert found.excluded_air_ml == pytest.approx(gas.sum() * np.prod(ct.GetSpacing()) / 1000.0, rel=0.05)
    assert _warning_codes(found.lungs, image, found.excluded_air_ml) == ["air_excluded"]


def test_the_dome_of_an_organ_under_a_lung_is_not_lung(chest):
    """The top of the liver bulges up into the right lung's base: in the slices that cut the dome it is ringed by
    lung, like a nodule, but carries on into the abdomen below. It stays out of the mask; the 0 HU consolidation
    ringed by lung in 3D stays in."""
    ct, truth, parts = chest
    hu, true = _arr(ct), _arr(truth)
    nz, ny, nx = hu.shape
    sx, sy, sz = ct.GetSpacing()
    z, y, x = np.meshgrid(*[(np.arange(n) - (n - 1) / 2.0) * s for n, s in ((nz, sz), (ny, sy), (nx, sx))],
                          indexing="ij", sparse=True)
    liver = np.broadcast_to(z <= -40.0 - ((x + 60.0) ** 2 + (y - 5.0) ** 2) / 40.0, hu.shape) & (true == 1)
    hu[liver] = np.round(50 + np.random.default_rng(6).normal(0, 20, liver.sum()))
    ringed = [k for k in range(nz) if liver[k].any() and not np.any(liver[k] & ndimage.binary_dilation(true[k] != 1))]
    assert len(ringed) >= 3, "the dome is ringed by lung in several slices"
    image = sitk.GetImageFromArray(hu)
    image.CopyInformation(ct)
    labels = _arr(segment_lungs(image))
    assert np.mean(labels[liver] > 0) < 0.05
    assert np.all(labels[parts["consolidation"]] > 0)
    assert dice(labels > 0, (true > 0) & ~liver) > 0.95


def test_implausible_unequal_and_cut_lungs_are_reported(chest):
    ct, truth, _ = chest
    labels = _arr(truth)
    labels[labels == 2] *= (np.arange(labels.shape[0]) > 40)[:, None, None].repeat(labels.shape[1], 1).repeat(
        labels.shape[2], 2)[labels == 2]  # most of the left lung is missing
    assert "unequal_lungs" in _warning_codes(_as_image(labels, truth), ct)
    top = (slice(0, 40), slice(None), slice(None))  # the scan stops mid-lung
    assert _warning_codes(_crop(truth, top), _crop(ct, top)) == ["incomplete_coverage"]
    x = np.arange(labels.shape[2])
    thin = _arr(truth) * ((np.abs(x - 52) < 2) | (np.abs(x - 148) < 2))  # 5 mm of each lung: 2 % of the body
    assert _warning_codes(_as_image(thin.astype(np.uint8), truth), ct) == ["implausible_volume"]


def test_impossible_masks_are_refused(chest):
    ct, truth, parts = chest
    with pytest.raises(InputError, match="median .* HU, not air-filled lung"):
        assess_mask(_as_image((_arr(truth) == 0) & (_arr(ct) > -200), truth), ct)  # the body wall, not the lungs
    big = sitk.Image([200, 200, 64], sitk.sitkUInt8) + 1
    big.SetSpacing((2.0, 2.0, 3.0))
    air = sitk.Cast(big * 0, sitk.sitkInt16) - 1000
    with pytest.raises(InputError, match="more than any lung"):
        assess_mask(big, air)


# --- phantom scan variants: gas below the diaphragm, cropped field of view, abdomen with the lung bases -------------

@pytest.mark.parametrize("variant", ["gas", "cropped", "abdomen"])
@pytest.mark.parametrize("patient_index", [0, 1])  # healthy, emphysema (parenchyma closest to gas)
def test_phantom_variants(variant, patient_index):
    phantom = pytest.importorskip("latentharmonize.phantom")
    patient = phantom.make_patient(patient_index, seed=0, variant=variant)
    expected = {"gas": ["air_excluded"], "cropped": ["fov_cut", "air_excluded"],
                "abdomen": ["incomplete_coverage", "air_excluded"]}[variant]
    thick = next(a for a in phantom.DEFAULT_ACQUISITIONS if a.thickness_mm >= 2.5)
    for ct in phantom.acquire_all(patient, [phantom.DEFAULT_ACQUISITIONS[0], thick]):
        on_ct = [_arr(sitk.Resample(image, ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)) > 0
                 for image in (patient.truth, patient.gas)]
        lung, gas = on_ct
        found = segment_lungs_detailed(ct)
        labels = _arr(found.lungs)
        voxel_ml = np.prod(ct.GetSpacing()) / 1000.0
        print(f"phantom {variant}, patient {patient_index}, {ct.GetSpacing()[2]} mm: "
              f"Dice {dice(labels > 0, lung):.4f}, "
              f"lung {lung.sum() * voxel_ml:.0f} mL, gas {gas.sum() * voxel_ml:.0f} mL, "
              f"excluded {found.excluded_air_ml:.0f} mL")
        assert gas.sum() * voxel_ml > 40, "test setup: the variant holds gas"
        assert not np.any(labels[gas]), "no gas voxel is lung"
        assert dice(labels > 0, lung) >= 0.97
        assert found.excluded_air_ml == pytest.approx(gas.sum() * voxel_ml, rel=0.15)
        assert _warning_codes(found.lungs, ct, found.excluded_air_ml) == expected


def test_too_little_lung_in_view_is_refused():
    """An abdominal scan reaching only the bottom of the lung bases: refused, and the gas is named, never taken."""
    phantom = pytest.importorskip("latentharmonize.phantom")
    patient = phantom.make_patient(0, seed=0, variant="abdomen")
    ct = phantom.acquire(patient, phantom.DEFAULT_ACQUISITIONS[0])
    lung = _arr(patient.truth) > 0
    lowest = int(np.flatnonzero(lung.any(axis=(1, 2)))[0])
    part = ct[:, :, : lowest + 12]  # 15 mm of lung bases
    assert np.count_nonzero(lung[: lowest + 12]) * np.prod(ct.GetSpacing()) / 1000.0 < 100
    with pytest.raises(NoLungFoundError, match=r"No lung found: .* mL of pure air, stomach or bowel gas, is not lung"):
        segment_lungs(part)


# --- a real chest CT ---------------------------------------------------------------------------------------------

@pytest.mark.skipif(not REAL_CT.is_dir(), reason=f"no real CT folder at {REAL_CT}")
def test_real_chest_ct_mask_and_sides():
    """Chest Imaging Platform case, 4 mm: whole lung against its reference, and each side against the reference's
    lung thirds (regions 9-11 left, 12-14 right in the low byte of cip-lm-64)."""
    ct = sitk.ReadImage(str(REAL_CT / "cip-ct-64.nrrd"))
    whole = _arr(sitk.ReadImage(str(REAL_CT / "cip-wholeLung-64.nrrd"))) > 0
    region = _arr(sitk.ReadImage(str(REAL_CT / "cip-lm-64.nrrd"))) & 255
    found = segment_lungs_detailed(ct)
    labels = _arr(found.lungs)
    right, left = (region >= 12) & (region <= 14), (region >= 9) & (region <= 11)
    print(f"real CT: Dice {dice(labels > 0, whole):.4f}, right {dice(labels == 1, right):.4f}, "
          f"left {dice(labels == 2, left):.4f}")
    assert dice(labels > 0, whole) >= 0.98
    assert dice(labels == 1, right) >= 0.97 and dice(labels == 2, left) >= 0.97
    codes = _warning_codes(found.lungs, ct, found.excluded_air_ml)
    assert not {"implausible_volume", "unequal_lungs", "fov_cut"} & set(codes)


# --- the warnings reach analysis.json, the CLI summary and the report --------------------------------------------

def test_analyze_publishes_warnings(tmp_path, capsys):
    """A scan whose field of view cuts the lungs still gets its results, with the warnings in analysis.json, the CLI
    summary and report.html; a clean scan gets an empty list."""
    import json

    from latentharmonize.cli import main
    from latentharmonize.phantom import DEFAULT_ACQUISITIONS, acquire, make_patient

    for variant in ("cropped", "chest"):
        scan = tmp_path / f"{variant}.nrrd"
        sitk.WriteImage(acquire(make_patient(0, seed=0, variant=variant), DEFAULT_ACQUISITIONS[0]), str(scan), True)
        assert main(["analyze", str(scan), "--out", str(tmp_path / variant), "--device", "cpu"]) == 0
        printed = capsys.readouterr().out
        record = json.loads((tmp_path / variant / "analysis.json").read_text())
        report = (tmp_path / variant / "report.html").read_text()
        codes = [w["code"] for w in record["warnings"]]
        if variant == "chest":
            assert codes == [] and "Warning" not in printed and "Check before use" not in report
            # a mask that marks the body wall instead of the lungs is refused: exit 2, a message, nothing written
            ct = sitk.ReadImage(str(scan))
            wall = _as_image((_arr(ct) > -200) & (sitk.GetArrayFromImage(sitk.ReadImage(
                str(tmp_path / variant / "chest_lungs.nrrd"))) == 0), ct)
            sitk.WriteImage(wall, str(tmp_path / "wall.nrrd"))
            code = main(["analyze", str(scan), "--out", str(tmp_path / "refused"),
                         "--mask", str(tmp_path / "wall.nrrd"), "--device", "cpu"])
            assert code == 2 and "not air-filled lung" in capsys.readouterr().err
            assert not (tmp_path / "refused").exists()
            continue
        assert codes == ["fov_cut", "air_excluded"]
        assert record["lung_mask"]["fov_cut_slices"] and record["lung_mask"]["excluded_air_ml"] > 40
        for warning in record["warnings"]:
            assert set(warning) == {"code", "message"} and warning["message"].endswith(".")
            assert f"Warning ({warning['code']}): {warning['message']}" in printed
            assert warning["code"] in report and "Check before use" in report


def test_outside_air_is_the_air_labels_touching_the_border():
    """The label lookup marks exactly the in-plane air components that reach a side of their slice."""
    rng = np.random.default_rng(7)
    for shape, share in (((4, 20, 30), 0.3), ((3, 25, 25), 0.55), ((2, 1, 9), 0.5), ((2, 6, 6), 0.0)):
        air = rng.random(shape) < share
        labels, _ = ndimage.label(air, _IN_PLANE)
        faces = np.concatenate([labels[:, 0, :].ravel(), labels[:, -1, :].ravel(),
                                labels[:, :, 0].ravel(), labels[:, :, -1].ravel()])
        assert np.array_equal(outside_air(air), np.isin(labels, faces[faces > 0]))
