"""Model grid: lattice alignment across acquisitions, any direction matrix, inverse helpers."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from latentharmonize.errors import NoLungFoundError
from latentharmonize.grid import AIR_HU, ModelGrid, lattice_to_image, to_model_grid, to_reference_geometry


def smooth_hu(points: np.ndarray) -> np.ndarray:
    """A smooth HU field of physical position, so resampled values can be compared across scans."""
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    return -600 + 150 * np.sin(x / 15.0) + 120 * np.cos(y / 20.0) + 100 * np.sin(z / 25.0)


def synthetic_scan(spacing, origin, size=(40, 36, 30), direction=None):
    """CT of the smooth field and an ellipsoid lung mask (centre 0, radii 20/18/25 mm) in physical space."""
    ref = sitk.Image(list(size), sitk.sitkFloat32)
    ref.SetSpacing(spacing)
    ref.SetOrigin(origin)
    if direction is not None:
        ref.SetDirection(direction)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij"), -1)[..., ::-1]  # z,y,x -> x,y,z
    dirm = np.asarray(ref.GetDirection()).reshape(3, 3)
    pts = np.asarray(origin) + (idx * np.asarray(spacing)) @ dirm.T
    ct = sitk.GetImageFromArray(smooth_hu(pts).astype(np.float32))
    lung = sitk.GetImageFromArray((((pts / [20.0, 18.0, 25.0]) ** 2).sum(-1) <= 1).astype(np.uint8))
    for im in (ct, lung):
        im.CopyInformation(ref)
    return ct, lung


def lattice_offsets_are_integer(a: ModelGrid, b: ModelGrid, align=(4, 4, 1)) -> bool:
    steps = (np.asarray(a.origin) - np.asarray(b.origin)) / (np.asarray(a.spacing) * align)
    return bool(np.allclose(steps, np.round(steps), atol=1e-6))


def test_acquisitions_with_different_thickness_share_lattice_points():
    thin_ct, thin_lung = synthetic_scan((1.0, 1.0, 1.0), (-20.3, -18.1, -14.6), size=(42, 38, 32))
    thick_ct, thick_lung = synthetic_scan((1.0, 1.0, 5.0), (-19.7, -18.9, -27.0), size=(40, 38, 12))
    hu_a, lung_a, grid_a = to_model_grid(thin_ct, thin_lung)
    hu_b, lung_b, grid_b = to_model_grid(thick_ct, thick_lung)
    assert grid_a.spacing == grid_b.spacing == (1.25, 1.25, 2.5)
    for grid in (grid_a, grid_b):  # voxel centres at integer multiples of the spacing
        steps = np.asarray(grid.origin) / np.asarray(grid.spacing)
        assert np.allclose(steps, np.round(steps), atol=1e-9)
    assert lattice_offsets_are_integer(grid_a, grid_b)
    # the physical point at the lung centre has the same index-derived position and similar HU in both
    centre = np.array([0.0, 0.0, 0.0])
    ia = np.round((centre - grid_a.origin) / grid_a.spacing).astype(int)[::-1]
    ib = np.round((centre - grid_b.origin) / grid_b.spacing).astype(int)[::-1]
    assert np.allclose(grid_a.index_to_physical(ia), grid_b.index_to_physical(ib))
    assert abs(hu_a[tuple(ia)] - hu_b[tuple(ib)]) < 15.0
    assert lung_a[tuple(ia)] and lung_b[tuple(ib)]
    assert hu_a.dtype == np.float32 and lung_a.dtype == bool


def test_grid_covers_lung_with_margin_and_matches_field():
    ct, lung = synthetic_scan((0.8, 0.8, 2.0), (-22.0, -20.0, -30.0), size=(56, 50, 30))
    hu, mask, grid = to_model_grid(ct, lung, margin_mm=5.0)
    lo = np.asarray(grid.origin)
    hi = lo + (np.asarray(grid.shape[::-1]) - 1) * np.asarray(grid.spacing)
    assert np.all(lo <= np.array([-19, -17, -24]) - 5) and np.all(hi >= np.array([19, 17, 24]) + 5)
    zz, yy, xx = np.nonzero(mask)
    pts = grid.index_to_physical(np.stack([zz, yy, xx], 1))
    assert np.all(((pts / [20.0, 18.0, 25.0]) ** 2).sum(-1) <= 1.3)
    # interpolated HU follows the continuous field inside the scan's field of view
    assert np.abs(hu[zz, yy, xx] - smooth_hu(pts)).mean() < 10.0


@pytest.mark.parametrize("direction", [None, (1.0, 0, 0, 0, 1.0, 0, 0, 0, -1.0)])
def test_scan_slices_are_the_grid_slices_the_scan_covers(direction):
    """The margin runs past the scan's first and last slice (lung to 25 mm from the centre, scan to 29-31 mm,
    margin 12.5 mm): those grid slices hold only the resampler's default, air, and scan_slices leaves them out."""
    origin = (-22.0, -20.0, -30.0 if direction is None else 28.0)
    ct, lung = synthetic_scan((0.8, 0.8, 2.0), origin, size=(56, 50, 30), direction=direction)
    hu, _, grid = to_model_grid(ct, lung)
    first, last = grid.scan_slices
    assert 0 < first < last < grid.shape[0] - 1
    assert (hu[:first] == AIR_HU).all() and (hu[last + 1:] == AIR_HU).all()
    assert all((hu[k] > AIR_HU).any() for k in range(first, last + 1))  # in-plane, the margin passes the field too


def test_any_direction_matrix_gives_same_physical_grid():
    flipped = (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0)  # RAS-like storage of the same patient
    # same voxel centres stored in the opposite order; offsets avoid nearest-neighbour ties
    ct_a, lung_a = synthetic_scan((1.0, 1.0, 2.0), (-20.1, -18.1, -30.1), size=(41, 37, 31))
    ct_b, lung_b = synthetic_scan((1.0, 1.0, 2.0), (19.9, 17.9, -30.1), size=(41, 37, 31), direction=flipped)
    hu_a, m_a, grid_a = to_model_grid(ct_a, lung_a)
    hu_b, m_b, grid_b = to_model_grid(ct_b, lung_b)
    assert grid_a == grid_b
    assert np.array_equal(m_a, m_b)
    assert np.allclose(hu_a, hu_b, atol=1e-3)


def test_empty_mask_is_refused():
    ct, lung = synthetic_scan((1.0, 1.0, 2.0), (-20.0, -18.0, -30.0))
    with pytest.raises(NoLungFoundError, match="empty"):
        to_model_grid(ct, lung * 0)


def test_lattice_image_round_trips_into_ct_geometry():
    ct, lung = synthetic_scan((1.0, 1.0, 2.0), (-20.0, -18.0, -30.0))
    _, mask, grid = to_model_grid(ct, lung)
    image = lattice_to_image(mask.astype(np.uint8), grid)
    assert image.GetSize() == tuple(grid.shape[::-1]) and image.GetOrigin() == grid.origin
    back = sitk.GetArrayFromImage(to_reference_geometry(image, lung))
    truth = sitk.GetArrayFromImage(lung)
    assert (back == truth).mean() > 0.97
    with pytest.raises(ValueError, match="shape"):
        lattice_to_image(mask[:-1], grid)


def test_lowpass_blurs_each_slice_alone_and_keeps_the_mean():
    from latentharmonize.grid import lowpass_in_plane

    rng = np.random.default_rng(0)
    hu = (-800.0 + 50.0 * rng.normal(size=(6, 64, 64))).astype(np.float32)
    assert lowpass_in_plane(hu, 0.0, (1.25, 1.25, 2.5)) is hu
    blurred = lowpass_in_plane(hu, 1.25, (1.25, 1.25, 2.5))
    assert blurred.dtype == np.float32 and blurred.shape == hu.shape
    # white noise under a unit-pixel Gaussian keeps 1 / (2 sqrt(pi)) of its SD in two dimensions
    assert np.std(blurred[:, 8:-8, 8:-8]) == pytest.approx(50.0 / (2 * np.sqrt(np.pi)), rel=0.08)
    assert np.mean(blurred) == pytest.approx(np.mean(hu), abs=0.5)
    impulse = np.zeros((5, 21, 21), np.float32)
    impulse[2, 10, 10] = 1.0
    spread = lowpass_in_plane(impulse, 2.0, (1.0, 1.0, 2.5))
    assert np.all(spread[[0, 1, 3, 4]] == 0) and spread[2].sum() == pytest.approx(1.0, abs=1e-4)
    # anisotropic pixels: the SD is in mm, so the blur reaches as far in mm along x and y
    wide = lowpass_in_plane(impulse, 2.0, (0.5, 1.0, 2.5))[2]
    assert wide[10, 10 + 4] == pytest.approx(wide[10 + 2, 10], rel=1e-3)


def _soft_tissue_block(noise_sd, seed=0, shape=(16, 80, 80)):
    """A 40 HU soft-tissue slab with white noise, lung (-850 HU) in its middle third."""
    rng = np.random.default_rng(seed)
    hu = np.full(shape, 40.0, np.float32)
    hu[:, 27:53, 27:53] = -850.0
    return hu + noise_sd * rng.normal(size=shape).astype(np.float32)


def test_soft_tissue_noise_follows_the_noise_and_needs_soft_tissue():
    from latentharmonize.grid import soft_tissue_noise

    spacing = (1.25, 1.25, 2.5)
    quiet, loud = soft_tissue_noise(_soft_tissue_block(10.0), spacing), soft_tissue_noise(_soft_tissue_block(20.0), spacing)
    assert loud == pytest.approx(2 * quiet, rel=0.05)  # linear in the noise SD
    assert soft_tissue_noise(_soft_tissue_block(20.0), spacing, 1.25) < 0.5 * loud  # the blur takes the fine band out
    lung_only = np.full((16, 80, 80), -850.0, np.float32)
    assert soft_tissue_noise(lung_only, spacing) is None


def test_noise_matched_sigma_blurs_a_noisier_scan_more_down_to_the_target():
    from latentharmonize.grid import LOWPASS_STEP_MM, MAX_LOWPASS_MM, noise_matched_sigma, soft_tissue_noise

    spacing = (1.25, 1.25, 2.5)
    soft, sharp = _soft_tissue_block(8.0), _soft_tissue_block(24.0, seed=1)
    target = soft_tissue_noise(soft, spacing, 1.0)
    s_soft, s_sharp = (noise_matched_sigma(v, spacing, target, 0.5) for v in (soft, sharp))
    assert 0.5 <= s_soft <= 1.0 < s_sharp < MAX_LOWPASS_MM
    # the smallest step that meets the target: one step less does not
    assert soft_tissue_noise(sharp, spacing, s_sharp) <= target < soft_tissue_noise(sharp, spacing, s_sharp - LOWPASS_STEP_MM)
    assert noise_matched_sigma(sharp, spacing, 1e-3, 0.5) == MAX_LOWPASS_MM  # unreachable: the largest blur
    assert noise_matched_sigma(sharp, spacing, 1e-3, 4.0) == 4.0  # a floor above the search keeps the floor
    assert noise_matched_sigma(np.full((16, 80, 80), -850.0, np.float32), spacing, target, 0.75) == 0.75  # no soft tissue
