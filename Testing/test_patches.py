"""Patches: normalisation, lattice validity, paired sampling at one physical point, dense == naive encoding."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from latentharmonize.errors import InputError
from latentharmonize.grid import to_model_grid
from latentharmonize.networks import build_model
from latentharmonize.patches import (DenseLatents, PatchSpec, aggregate_context, densitometry_features, encode_dense,
                                     encode_patches_naive, normalize_hu, patch_lattice, point_keys, threads_beside,
                                     valid_centres)
from latentharmonize.scans import Scan
from latentharmonize.training.augment import training_dataset
from latentharmonize.training.samples import sample_paired_patches

torch.set_num_threads(1)


def texture(points: np.ndarray) -> np.ndarray:
    """A physical HU texture with fine in-plane detail (so unrelated points differ)."""
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    return -800 + 120 * np.sin(x / 3.0) * np.cos(y / 4.0) + 60 * np.sin(z / 9.0 + x / 7.0)


def acquisition(spacing, origin, size, seed=None):
    """One acquisition of a shared patient: ellipsoid lungs (radii 30/25/30 mm) on a texture, optional noise."""
    ref = sitk.Image(list(size), sitk.sitkFloat32)
    ref.SetSpacing(spacing)
    ref.SetOrigin(origin)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij"), -1)[..., ::-1]
    pts = np.asarray(origin) + idx * np.asarray(spacing)
    hu = texture(pts)
    if seed is not None:
        hu = hu + np.random.default_rng(seed).normal(0, 15, hu.shape)
    lung = ((pts / [30.0, 25.0, 30.0]) ** 2).sum(-1) <= 1
    ct, mask = sitk.GetImageFromArray(hu.astype(np.float32)), sitk.GetImageFromArray(lung.astype(np.uint8))
    ct.CopyInformation(ref)
    mask.CopyInformation(ref)
    return ct, mask


def patient_scans(patient="p1"):
    thin = acquisition((0.9, 0.9, 1.0), (-40.3, -35.2, -36.0), (90, 80, 72))
    thick = acquisition((0.8, 0.8, 5.0), (-39.6, -33.6, -37.5), (100, 86, 16), seed=1)
    return [Scan(patient, name, *to_model_grid(ct, lung)) for name, (ct, lung) in (("thin", thin), ("thick", thick))]


def test_normalize_window_and_outside_fill():
    hu = np.array([-2000.0, -1100.0, -400.0, 300.0, 900.0, 0.0], dtype=np.float32)
    lung = np.array([True, True, True, True, True, False])
    out = normalize_hu(hu, lung, PatchSpec())
    np.testing.assert_allclose(out, [0, 0, 0.5, 1, 1, 250 / 1400], atol=1e-6)
    assert out.dtype == np.float32


def test_valid_centres_lie_in_the_lung():
    scan = patient_scans()[0]
    valid = valid_centres(scan.lung)
    lattice = patch_lattice(scan.grid)
    assert valid.shape == lattice.shape and 50 < valid.sum() < valid.size
    pts = lattice.index_to_physical(np.argwhere(valid))
    assert np.all(((pts / [30.0, 25.0, 30.0]) ** 2).sum(-1) <= 1.2)


def test_pairs_are_the_same_physical_point():
    scans = patient_scans()
    samples = sample_paired_patches(scans, per_patient=40, seed=0)
    pairs = samples.pairs()
    assert len(samples) == 80 and len(pairs) == 40
    a, b = pairs[:, 0], pairs[:, 1]
    assert np.all(samples.acquisition[a] != samples.acquisition[b])
    assert np.array_equal(samples.keys[a], samples.keys[b])
    # keys are the physical lattice positions: the texture there agrees between the two acquisitions
    same = [np.corrcoef(samples.patches[i, 1].ravel(), samples.patches[j, 1].ravel())[0, 1] for i, j in pairs]
    other = [np.corrcoef(samples.patches[i, 1].ravel(), samples.patches[j, 1].ravel())[0, 1]
             for i, j in zip(a, np.roll(b, 7))]
    assert np.median(same) > 0.8 and np.median(same) > np.median(other) + 0.3
    centre_hu = texture(samples.keys[a] / 1000.0)
    assert np.abs(samples.stats["mean_hu"][a] - centre_hu).mean() < 120  # stats describe the right place


def test_sampling_is_seeded_and_balanced():
    scans = patient_scans("p1") + patient_scans("p2")
    first = sample_paired_patches(scans, per_patient=10, seed=3)
    again = sample_paired_patches(scans, per_patient=10, seed=3)
    other = sample_paired_patches(scans, per_patient=10, seed=4)
    assert np.array_equal(first.keys, again.keys) and not np.array_equal(first.keys, other.keys)
    _, counts = np.unique(list(zip(first.patient, first.acquisition)), axis=0, return_counts=True)
    assert counts.tolist() == [10, 10, 10, 10]


def d4_images(patch: np.ndarray) -> list:
    """The eight flips/turns of a [3, H, W] patch."""
    turns = [np.rot90(patch, k, axes=(1, 2)) for k in range(4)]
    return turns + [t[:, ::-1] for t in turns]


def test_training_dataset_gives_jointly_augmented_pairs_deterministically():
    samples = sample_paired_patches(patient_scans(), per_patient=6, seed=0)
    first = [training_dataset(samples, seed=5)[i] for i in range(6)]
    again = [training_dataset(samples, seed=5)[i] for i in range(6)]
    for item, rows, twin in zip(first, samples.rows_by_point(), again):
        assert torch.equal(item["x"], twin["x"]) and item["x"].shape == (3, 16, 16)
        x, xp = item["x"].numpy(), item["x_pair"].numpy()
        views = [d4_images(samples.patches[r]) for r in rows]  # both views got the same flip/turn
        assert any(np.allclose(x, va[t]) and np.allclose(xp, vb[t])
                   for va in views for vb in views if va is not vb for t in range(8))


def test_dense_encoding_equals_naive_and_keeps_lung_centres_only():
    scan = patient_scans()[1]
    model = build_model("ae", seed=0, latent_dim=8, width=8)
    dense = encode_dense(model, scan.hu, scan.lung, scan.grid, slabs_per_batch=3)
    naive = encode_patches_naive(model, scan.hu, scan.lung, scan.grid, batch_size=64)
    assert np.array_equal(dense.positions, naive.positions)
    np.testing.assert_allclose(dense.latents, naive.latents, atol=1e-4)
    assert dense.latents.shape == (int(valid_centres(scan.lung).sum()), 8)
    assert dense.lattice == patch_lattice(scan.grid)
    keys = point_keys(dense.lattice, dense.positions) / 1000.0
    assert np.all(((keys / [30.0, 25.0, 30.0]) ** 2).sum(-1) <= 1.2)


def test_densitometry_spec_appends_the_scaled_patch_statistics_on_both_encoding_paths():
    from latentharmonize.densitometry import HU_STATISTIC_NAMES
    from latentharmonize.patches import lattice_hu_statistics

    scan = patient_scans()[1]
    model = build_model("ae", seed=0, latent_dim=4, width=8)
    n = len(HU_STATISTIC_NAMES)
    center, scale = np.linspace(-900.0, 0.1, n), np.linspace(50.0, 0.2, n)
    spec = PatchSpec.from_dict({"context_radius": 0,
                                "densitometry": {"weight": 1.0, "center": center.tolist(), "scale": scale.tolist()}})
    plain = encode_dense(model, scan.hu, scan.lung, scan.grid, PatchSpec(context_radius=0))
    dense = encode_dense(model, scan.hu, scan.lung, scan.grid, spec, slabs_per_batch=3)
    naive = encode_patches_naive(model, scan.hu, scan.lung, scan.grid, spec, batch_size=64)
    np.testing.assert_allclose(dense.latents, naive.latents, atol=1e-4)
    assert dense.latents.shape == (len(plain.latents), 4 + n)
    np.testing.assert_array_equal(dense.latents[:, :4], plain.latents)
    expected = (lattice_hu_statistics(scan.hu, scan.lung, dense.positions, spec) - center) / scale
    np.testing.assert_allclose(dense.latents[:, 4:], expected, rtol=1e-5, atol=1e-5)
    for bad in ({"weight": 1.0, "center": center.tolist()[:-1], "scale": scale.tolist()},
                {"weight": 1.0, "center": center.tolist(), "scale": (-scale).tolist()},
                {"weight": 0.0, "center": center.tolist(), "scale": scale.tolist()},
                {"weight": "1", "center": center.tolist(), "scale": scale.tolist()},
                {"weight": 1.0, "center": ["x"] * n, "scale": scale.tolist()}, "yes"):
        with pytest.raises(InputError, match="densitometry must be null"):
            PatchSpec.from_dict({"densitometry": bad})


def test_core_statistics_read_the_parenchyma_away_from_structures_and_the_lung_edge():
    """Partial volume next to a vessel and along the lung's edge raises unblurred HU; the core (the parenchyma
    eroded by one voxel) leaves it out. A patch with no core reads its parenchyma, one with no parenchyma the lung."""
    from scipy import ndimage

    from latentharmonize.densitometry import HU_STATISTIC_NAMES
    from latentharmonize.patches import core_statistics, lattice_hu_statistics

    hu = np.full((5, 48, 48), 40.0, np.float32)
    lung = np.zeros(hu.shape, bool)
    lung[:, 4:44, 4:44] = True
    hu[lung] = -860.0
    edge = lung & ~ndimage.binary_erosion(lung, border_value=1)
    vessel = np.zeros(hu.shape, bool)
    vessel[:, 18:28, 18:28] = True
    rim = ndimage.binary_dilation(vessel) & ~vessel
    hu[edge | rim], hu[vessel] = -600.0, 40.0
    parenchyma = lung & ~vessel
    spec = PatchSpec()
    positions = np.array([[1, 4, 4], [1, 1, 1]])  # across the vessel; at the lung's corner
    q90 = HU_STATISTIC_NAMES.index("q90")
    plain = lattice_hu_statistics(hu, parenchyma, positions, spec)
    core = core_statistics(hu, parenchyma, positions, spec)
    assert np.all(plain[:, q90] == -600.0) and np.all(core[:, :-1] == np.asarray(
        lattice_hu_statistics(np.full(hu.shape, -860.0, np.float32), parenchyma, positions, spec)))
    assert np.all(core[:, -1] == 0.0)  # the core is -860 HU at every depth: nothing stands above it
    thin = np.zeros(hu.shape, bool)
    thin[:, 20, 4:44] = True  # one voxel thick: no core
    np.testing.assert_array_equal(core_statistics(hu, thin, positions[:1], spec)[:, :-1],
                                  lattice_hu_statistics(hu, thin, positions[:1], spec))
    nothing = np.zeros(hu.shape, bool)
    np.testing.assert_array_equal(core_statistics(hu, nothing, positions, spec, lung=lung)[:, :-1],
                                  lattice_hu_statistics(hu, lung, positions, spec))
    with pytest.raises(InputError, match="holds no lung voxel"):
        core_statistics(hu, nothing, positions, spec)


def test_above_depth_reads_a_patch_against_the_lung_at_its_own_depth():
    """A lung growing denser towards its back (gravity) by 150 HU: a patch of it stands no higher above the lung
    at its depth than anywhere else, while a raised blob stands above its depth by what it adds. Lung denser than
    -700 HU at a depth is disease, not breath: the reference stops there, so a lung all at -600 HU stands 100 HU
    above it."""
    from latentharmonize.patches import CORE_STATISTIC_NAMES, DEPTH_REFERENCE_MAX_HU, core_statistics, depth_reference

    spec = PatchSpec()
    lung = np.zeros((5, 96, 96), bool)
    lung[:, 2:94, 2:94] = True
    rows = np.arange(96, dtype=np.float32)
    hu = np.broadcast_to(-900.0 + 150.0 * rows[None, :, None] / 95.0, lung.shape).astype(np.float32).copy()
    blob = np.zeros(lung.shape, bool)
    blob[:, 60:76, 10:26] = True  # one patch's area, towards the back
    hu[blob] += 200.0
    positions = np.array([[1, 15, 20], [1, 2, 20], [1, 15, 2]])  # back, front; the blob's patch at the back
    above = core_statistics(hu, lung, positions, spec)[:, CORE_STATISTIC_NAMES.index("above_depth")]
    assert abs(above[0]) < 5.0 and abs(above[1]) < 5.0
    assert 150.0 < above[2] < 210.0
    reference = depth_reference(hu, lung, np.array([10, 67]), spec.spacing[1])
    assert reference[1] - reference[0] > 70.0  # the back's lung is denser, as the reference reads
    dense = np.where(lung, -600.0, 40.0).astype(np.float32)
    assert DEPTH_REFERENCE_MAX_HU == -700.0
    np.testing.assert_allclose(core_statistics(dense, lung, positions, spec)[:, -1], 100.0)


def test_smoothed_densitometry_reads_the_statistics_of_the_blurred_lung_only():
    from latentharmonize.densitometry import HU_STATISTIC_NAMES
    from latentharmonize.patches import lattice_hu_statistics
    from latentharmonize.densitometry import smooth_lung

    rng = np.random.default_rng(0)
    hu = np.full((5, 48, 48), 40.0, np.float32)  # chest wall at +40 HU around a noisy -860 HU lung
    lung = np.zeros(hu.shape, bool)
    lung[:, 8:40, 8:40] = True
    hu[lung] = -860.0 + rng.normal(0.0, 60.0, lung.sum())
    smooth = smooth_lung(hu, lung, 2.5, PatchSpec().spacing)
    assert np.array_equal(smooth[~lung], hu[~lung])
    assert np.std(smooth[lung]) < 0.3 * np.std(hu[lung])
    assert abs(np.mean(smooth[lung]) + 860.0) < 3.0 and smooth[lung].max() < -700.0  # no wall bleeding in
    n = len(HU_STATISTIC_NAMES)
    entry = {"weight": 1.0, "center": [0.0] * n, "scale": [1.0] * n, "smooth_mm": 2.5}
    spec = PatchSpec.from_dict({"densitometry": entry})
    positions = np.array([[0, 2, 2], [1, 4, 3]])
    np.testing.assert_allclose(densitometry_features(hu, lung, positions, spec),
                               lattice_hu_statistics(smooth, lung, positions, spec), rtol=1e-5)
    assert densitometry_features(hu, lung, positions, spec)[:, 5].max() == 0.0  # none below -950 once smoothed
    for bad in (-1.0, float("nan"), True):
        with pytest.raises(InputError, match="densitometry must be null"):
            PatchSpec.from_dict({"densitometry": {**entry, "smooth_mm": bad}})


def test_a_total_densitometry_blur_gives_scans_low_passed_differently_one_blur():
    """With ``smooth_total`` the statistics see ``smooth_mm`` in all, the encoder's low-pass included: a scan the
    low-pass blurred more gets less added, so one lung low-passed two ways reads alike; stacked, it does not."""
    from dataclasses import replace

    from latentharmonize.densitometry import HU_STATISTIC_NAMES, smooth_lung
    from latentharmonize.grid import lowpass_in_plane
    from latentharmonize.patches import PatchDensitometry, model_grid_hu

    n = len(HU_STATISTIC_NAMES)
    total = PatchDensitometry(1.0, (0.0,) * n, (1.0,) * n, 2.5, smooth_total=True)
    stacked = replace(total, smooth_total=False)
    assert total.added_smooth_mm(1.5) == pytest.approx(2.0) and total.added_smooth_mm(3.0) == 0.0
    assert stacked.added_smooth_mm(1.5) == 2.5 and replace(total, smooth_mm=None).added_smooth_mm(1.0) == 0.0

    rng = np.random.default_rng(0)
    hu = np.full((5, 96, 96), 40.0, np.float32)
    lung = np.zeros(hu.shape, bool)
    lung[:, 8:88, 8:88] = True
    hu[lung] = -860.0 + rng.normal(0.0, 80.0, lung.sum())
    spacing = PatchSpec().spacing
    positions = np.argwhere(valid_centres(lung, PatchSpec()))
    soft, sharp = (smooth_lung(hu, lung, sigma, spacing) for sigma in (1.8, 0.6))  # one lung, two low-passes

    def gap(entry):
        spec = PatchSpec(densitometry=entry)
        return np.abs(densitometry_features(soft, lung, positions, spec, 1.8)
                      - densitometry_features(sharp, lung, positions, spec, 0.6)).mean()

    assert gap(total) < 0.2 * gap(stacked)

    # both encoding paths hand the densitometry the low-pass they applied
    model = build_model("ae", seed=0, latent_dim=4, width=8).eval()
    ct, mask = acquisition((0.9, 0.9, 1.0), (-40.3, -35.2, -36.0), (90, 80, 72), seed=3)
    spec = PatchSpec(densitometry=total, lowpass_mm=1.0, context_radius=0)
    hu, lung, grid, _ = model_grid_hu(ct, mask, spec)
    for encode in (encode_dense, encode_patches_naive):
        dense = encode(model, hu, lung, grid, spec)
        expected = densitometry_features(lowpass_in_plane(hu, 1.0, grid.spacing), lung, dense.positions, spec, 1.0)
        np.testing.assert_allclose(dense.latents[:, 4:], expected, rtol=1e-5, atol=1e-4)
        assert not np.allclose(dense.latents[:, 4:], densitometry_features(
            lowpass_in_plane(hu, 1.0, grid.spacing), lung, dense.positions, replace(spec, densitometry=stacked), 1.0))
    assert PatchSpec.from_dict(spec.to_dict()).densitometry.smooth_total
    assert "smooth_total" not in replace(spec, densitometry=stacked).to_dict()["densitometry"]  # earlier bundles
    with pytest.raises(InputError, match="densitometry must be null"):
        PatchSpec.from_dict({"densitometry": {**total.to_dict(), "smooth_total": "yes"}})


def slab_scan(thickness: float, field: np.ndarray, fine_mm: float = 0.625):
    """A CT of one lung texture ``field`` (a [z, y, x] grid of ``fine_mm`` voxels, 1 mm in-plane) acquired with
    contiguous slices of ``thickness`` mm: each slice the mean of the fine slices it covers, as a scanner's slab."""
    from latentharmonize.phantom.acquisition import thicker_slices

    fine = sitk.GetImageFromArray(field.astype(np.float32))
    fine.SetSpacing((1.0, 1.0, fine_mm))
    fine.SetOrigin((-40.0, -40.0, -40.0))
    ct = thicker_slices(fine, thickness)  # slab centres over the same fine extent
    lung = sitk.GetImageFromArray(np.ones(sitk.GetArrayViewFromImage(ct).shape, np.uint8))
    lung.CopyInformation(ct)
    return ct, lung


def test_a_through_plane_total_gives_thin_and_thick_slices_one_resolution():
    """With ``z_total_mm`` the statistics see one through-plane blur whatever the slice thickness: a thin scan is
    blurred along z up to it, a 5 mm one (which reaches the model grid at about T/2 = 2.5 mm) not at all, so the
    same lung acquired thin and thick reads closer alike than without it."""
    from dataclasses import replace

    from latentharmonize.densitometry import HU_STATISTIC_NAMES
    from latentharmonize.patches import PatchDensitometry, model_grid_hu

    n = len(HU_STATISTIC_NAMES)
    in_plane = PatchDensitometry(1.0, (0.0,) * n, (1.0,) * n, 2.5, smooth_total=True)
    total = replace(in_plane, z_total_mm=2.5)
    assert total.added_z_mm(5.0) == 0.0 and in_plane.added_z_mm(1.25) == 0.0 and total.added_z_mm(None) == 0.0
    assert total.added_z_mm(1.25) == pytest.approx(np.sqrt(2.5 ** 2 - 0.625 ** 2))

    rng = np.random.default_rng(0)  # lung with structure at a few mm: finer along z than a 5 mm slice
    field = -860.0 + 900.0 * ndimage.gaussian_filter(rng.normal(size=(128, 80, 80)), (3.0, 2.0, 2.0))
    scans = [model_grid_hu(*slab_scan(t, field), PatchSpec()) for t in (1.25, 5.0)]
    assert [grid.scan_z_mm for _, _, grid, _ in scans] == [1.25, 5.0]
    (hu_a, lung_a, grid_a, _), (hu_b, lung_b, grid_b, _) = scans
    # the lattice points both scans hold, as positions in each
    positions = [np.argwhere(valid_centres(lung, PatchSpec())) for lung in (lung_a, lung_b)]
    keys = [dict(zip(map(tuple, point_keys(patch_lattice(grid, PatchSpec()), pos)), pos))
            for grid, pos in zip((grid_a, grid_b), positions)]
    shared = sorted(set(keys[0]) & set(keys[1]))
    assert len(shared) > 50
    pos_a, pos_b = (np.array([k[key] for key in shared]) for k in keys)

    def gap(entry):
        spec = PatchSpec(densitometry=entry)
        a = densitometry_features(hu_a, lung_a, pos_a, spec, 0.0, grid_a.scan_z_mm)
        b = densitometry_features(hu_b, lung_b, pos_b, spec, 0.0, grid_b.scan_z_mm)
        return np.abs(a - b).mean()

    assert gap(total) < 0.5 * gap(in_plane)

    # both encoding paths hand the densitometry the scan's slice spacing
    model = build_model("ae", seed=0, latent_dim=4, width=8).eval()
    spec = PatchSpec(densitometry=total, context_radius=0)
    for encode in (encode_dense, encode_patches_naive):
        dense = encode(model, hu_a, lung_a, grid_a, spec)
        np.testing.assert_allclose(dense.latents[:, 4:], densitometry_features(hu_a, lung_a, dense.positions, spec,
                                                                               dense.lowpass_mm, 1.25),
                                   rtol=1e-5, atol=1e-4)
    assert PatchSpec.from_dict(spec.to_dict()).densitometry.z_total_mm == 2.5
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(InputError, match="densitometry must be null"):
            PatchSpec.from_dict({"densitometry": {**total.to_dict(), "z_total_mm": bad}})


def test_dense_encoding_refuses_mismatched_inputs():
    scan = patient_scans()[1]
    model = build_model("ae", latent_dim=4, width=8)
    with pytest.raises(Exception, match="one shape"):
        encode_dense(model, scan.hu[:-1], scan.lung, scan.grid)


def test_context_averages_valid_in_plane_neighbours_only():
    positions = np.array([[0, 0, 0], [0, 0, 1], [0, 1, 1], [0, 5, 5], [1, 0, 0]])
    latents = np.array([[1.0], [2.0], [6.0], [10.0], [100.0]], np.float32)
    dense = DenseLatents(latents=latents, positions=positions, lattice=None)
    same = aggregate_context(dense, 0)
    assert same is dense
    out = aggregate_context(dense, 1).latents[:, 0]
    # (0,0,0) sees itself and its two valid neighbours; (0,0,1) too; the lone point and the other slice stay put
    np.testing.assert_allclose(out, [3.0, 3.0, 3.0, 10.0, 100.0], rtol=1e-6)
    with pytest.raises(InputError, match="context_radius"):
        PatchSpec.from_dict({"context_radius": -1})


def test_dense_encoding_applies_the_spec_context():
    scan = patient_scans()[1]
    model = build_model("ae", seed=0, latent_dim=8, width=8)
    plain = encode_dense(model, scan.hu, scan.lung, scan.grid, PatchSpec(context_radius=0))
    with_context = encode_dense(model, scan.hu, scan.lung, scan.grid, PatchSpec(context_radius=1))
    np.testing.assert_allclose(with_context.latents, aggregate_context(plain, 1).latents, atol=1e-6)
    assert not np.allclose(with_context.latents, plain.latents)


def test_lattice_hu_statistics_equals_one_sort_per_patch_over_several_blocks():
    """Patches cut a block at a time give bit for bit the statistics of all patches cut at once and each sorted
    whole (NaN outside the lung sorting last), for blob-shaped lungs and patches with one to every voxel lung."""
    from scipy import ndimage

    from latentharmonize.densitometry import HU_STATISTIC_QUANTILES, PATCH_BLOCK
    from latentharmonize.patches import extract_patches, lattice_hu_statistics

    rng = np.random.default_rng(3)
    spec = PatchSpec()
    hu = rng.normal(-750.0, 200.0, (20, 100, 100)).astype(np.float32)
    lung = ndimage.gaussian_filter(rng.random(hu.shape), 3.0) > 0.5
    lung[:, :50, :50] = True
    lung[10, 60, 60] = True  # a lone lung voxel
    zz, yy, xx = np.meshgrid(*(np.arange(k) for k in (18, 22, 22)), indexing="ij")
    every = np.stack([zz.ravel(), yy.ravel(), xx.ravel()], axis=1)
    patches = extract_patches(np.where(lung, hu, np.nan).astype(np.float32), every, spec).reshape(len(every), -1)
    n_lung = np.count_nonzero(~np.isnan(patches), axis=1)
    positions, patches, n_lung = every[n_lung > 0], patches[n_lung > 0], n_lung[n_lung > 0]
    assert len(positions) > 2 * PATCH_BLOCK and n_lung.min() == 1 and n_lung.max() == patches.shape[1]
    ranks = np.rint(np.outer(n_lung - 1, np.asarray(HU_STATISTIC_QUANTILES) / 100.0)).astype(np.int64)
    shares = [np.count_nonzero(test, axis=1) / n_lung for test in (patches < -950, patches > -700, patches > -300)]
    expected = np.column_stack([np.take_along_axis(np.sort(patches, axis=1), ranks, axis=1), *shares])
    assert lattice_hu_statistics(hu, lung, positions, spec).tobytes() == expected.astype(np.float32).tobytes()


def test_the_spec_lowpass_blurs_what_the_encoder_reads_and_not_the_model_grid_hu():
    from latentharmonize.grid import lowpass_in_plane
    from latentharmonize.densitometry import HU_STATISTIC_NAMES
    from latentharmonize.patches import PatchDensitometry, model_grid_hu

    torch.manual_seed(0)
    model = build_model("ae", latent_dim=4, width=8).eval()
    ct, mask = acquisition((0.9, 0.9, 1.0), (-40.3, -35.2, -36.0), (90, 80, 72), seed=3)
    n = len(HU_STATISTIC_NAMES)
    densitometry = PatchDensitometry(1.0, (0.0,) * n, (1.0,) * n)
    plain, blurred = PatchSpec(densitometry=densitometry), PatchSpec(densitometry=densitometry, lowpass_mm=1.0)
    hu, lung, grid, _ = model_grid_hu(ct, mask, blurred)
    np.testing.assert_array_equal(hu, model_grid_hu(ct, mask, plain)[0])  # the vessel filter reads HU as resampled
    smooth = lowpass_in_plane(hu, 1.0, grid.spacing)
    assert np.std(np.diff(smooth, axis=2)) < 0.7 * np.std(np.diff(hu, axis=2))
    expected = encode_dense(model, smooth, lung, grid, plain)
    for encode in (encode_dense, encode_patches_naive):
        got = encode(model, hu, lung, grid, blurred)
        np.testing.assert_array_equal(got.positions, expected.positions)
        np.testing.assert_allclose(got.latents, expected.latents, rtol=1e-4, atol=1e-4)
    assert not np.allclose(encode_dense(model, hu, lung, grid, plain).latents, expected.latents, atol=1e-3)
    scan = Scan("p", "a", hu, lung, grid)
    rows = sample_paired_patches([scan], 20, blurred, seed=0)
    again = sample_paired_patches([Scan("p", "a", smooth, lung, grid)], 20, plain, seed=0)
    np.testing.assert_array_equal(rows.patches, again.patches)  # training patches are the encoder's input too
    assert PatchSpec.from_dict(blurred.to_dict()).lowpass_mm == 1.0
    assert PatchSpec.from_dict({}).lowpass_mm == 0.0  # bundles from before the option read their scans unblurred
    for bad in (-0.5, 11.0, float("nan"), True, "1"):
        with pytest.raises(InputError, match="lowpass_mm"):
            PatchSpec(lowpass_mm=bad)


def test_a_noise_target_raises_the_blur_of_a_noisy_scan_and_the_encoding_says_how_much():
    from latentharmonize.grid import lowpass_in_plane, noise_matched_sigma
    from latentharmonize.patches import encoder_input, model_grid_hu

    torch.manual_seed(0)
    model = build_model("ae", latent_dim=4, width=8).eval()
    ct, mask = acquisition((0.9, 0.9, 1.0), (-40.3, -35.2, -36.0), (90, 80, 72), seed=3)
    fixed, matched = PatchSpec(lowpass_mm=1.0), PatchSpec(lowpass_mm=1.0, lowpass_noise_hu=0.5)
    hu, lung, grid, _ = model_grid_hu(ct, mask, matched)
    chest_wall = 40.0 + 30.0 * np.random.default_rng(0).normal(size=hu.shape)  # noisy soft tissue around the lung
    hu = np.where(lung, hu, chest_wall).astype(np.float32)
    sigma = noise_matched_sigma(hu, grid.spacing, 0.5, 1.0)
    assert sigma > 1.0  # this scan is noisier than the target at the floor
    got, used = encoder_input(hu, matched)
    assert used == sigma and np.array_equal(got, lowpass_in_plane(hu, sigma, grid.spacing))
    assert encoder_input(hu, fixed)[1] == 1.0
    for encode in (encode_dense, encode_patches_naive):
        dense = encode(model, hu, lung, grid, matched)
        plain = encode(model, lowpass_in_plane(hu, sigma, grid.spacing), lung, grid, PatchSpec())
        assert dense.lowpass_mm == sigma and plain.lowpass_mm == 0.0
        np.testing.assert_allclose(dense.latents, plain.latents, rtol=1e-4, atol=1e-4)
    assert PatchSpec.from_dict(matched.to_dict()).lowpass_noise_hu == 0.5
    assert PatchSpec.from_dict({}).lowpass_noise_hu is None  # earlier bundles: the fixed blur
    for bad in (0.0, -1.0, float("nan"), True, "1"):
        with pytest.raises(InputError, match="lowpass_noise_hu"):
            PatchSpec(lowpass_noise_hu=bad)


def test_the_encoder_leaves_the_cores_of_the_threads_beside_it_and_gives_them_back():
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        with threads_beside(1):
            assert torch.get_num_threads() == 3
            with threads_beside(1):  # the core statistics' thread beside the densitometry's
                assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError):
            with threads_beside(9):
                assert torch.get_num_threads() == 1  # never fewer than one
                raise RuntimeError("the encoder failed")
        assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(saved)
