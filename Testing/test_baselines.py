"""Harmonization baselines: fit on training data, transform NEW data, planted batch shift removed."""
from __future__ import annotations

import contextlib
import io

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression

from latentharmonize.evaluation.harmonizers import ComBatHarmonizer, HarmonyHarmonizer, HistogramMatcher, LeaceHarmonizer
from latentharmonize.errors import InputError

SHIFT = np.array([2.0, -1.5, 0.0, 1.0, 0.0, 0.0])


def _latents(n, seed):
    """Three biological clusters, two acquisitions; acquisition 'sharp' adds SHIFT and 30 % more spread."""
    rng = np.random.default_rng(seed)
    bio = rng.integers(0, 3, n)
    batch = np.where(rng.random(n) < 0.5, "soft", "sharp")
    X = rng.normal(scale=0.4, size=(n, SHIFT.size))
    X[:, :3] += 3.0 * np.eye(3)[bio]
    sharp = batch == "sharp"
    X[sharp] = X[sharp] * 1.3 + SHIFT
    return X, batch, bio


def _batch_gap(X, batch):
    return np.linalg.norm(X[batch == "sharp"].mean(0) - X[batch == "soft"].mean(0))


@pytest.mark.parametrize("make", [ComBatHarmonizer, lambda: HarmonyHarmonizer(n_clusters=6), LeaceHarmonizer],
                         ids=["combat", "harmony", "leace"])
def test_latent_baseline_removes_planted_shift_on_new_data(make):
    X_train, b_train, _ = _latents(600, seed=0)
    X_new, b_new, bio_new = _latents(300, seed=1)
    harmonizer = make().fit(X_train, b_train)
    out = harmonizer.transform(X_new, b_new)
    assert out.shape == X_new.shape
    assert np.all(np.isfinite(out))
    assert _batch_gap(out, b_new) < 0.35 * _batch_gap(X_new, b_new)
    # biology survives: the clusters are still linearly separable
    assert LogisticRegression(max_iter=500).fit(out, bio_new).score(out, bio_new) > 0.9


def test_combat_transform_reproduces_neurocombat_on_training_data():
    from neuroCombat import neuroCombat

    X, batch, _ = _latents(200, seed=2)
    with contextlib.redirect_stdout(io.StringIO()):
        reference = neuroCombat(X.T, pd.DataFrame({"batch": batch}), "batch")["data"].T
    np.testing.assert_allclose(ComBatHarmonizer().fit(X, batch).transform(X, batch), reference, atol=1e-6)


def test_combat_passes_constant_features_and_refuses_bad_input():
    X, batch, _ = _latents(100, seed=3)
    X[:, 4] = 7.0
    combat = ComBatHarmonizer().fit(X, batch)
    assert np.all(combat.transform(X, batch)[:, 4] == 7.0)
    with pytest.raises(InputError, match="transposed"):
        ComBatHarmonizer().fit(X.T, batch)
    with pytest.raises(InputError, match="NaN"):
        ComBatHarmonizer().fit(np.where(X > 3, np.nan, X), batch)
    with pytest.raises(InputError, match="unseen"):
        combat.transform(X[:3], ["soft", "other", "soft"])
    with pytest.raises(NotFittedError):
        ComBatHarmonizer().transform(X, batch)


def test_harmony_recovers_its_own_training_correction():
    X, batch, _ = _latents(400, seed=4)
    harmony = HarmonyHarmonizer(n_clusters=6).fit(X, batch)
    # mapping the training samples as if new lands close to Harmony's own corrected output
    mapped = harmony.transform(X, batch)
    err = np.abs(mapped - harmony.train_corrected_).mean()
    assert err < 0.05 * np.abs(X - harmony.train_corrected_).mean() + 1e-3


def test_leace_leaves_no_linear_acquisition_signal():
    X_train, b_train, _ = _latents(800, seed=5)
    X_new, b_new, _ = _latents(800, seed=6)
    leace = LeaceHarmonizer().fit(X_train, b_train)
    before = LogisticRegression(max_iter=500).fit(X_train, b_train).score(X_new, b_new)
    erased_train, erased_new = leace.transform(X_train), leace.transform(X_new)
    after = LogisticRegression(max_iter=500).fit(erased_train, b_train).score(erased_new, b_new)
    assert before > 0.9
    assert after < 0.65


def _scan(offset, scale, seed):
    rng = np.random.default_rng(seed)
    hu = np.full((6, 24, 24), -1000.0, dtype=np.float32)
    lung = np.zeros(hu.shape, dtype=np.uint8)
    lung[1:5, 4:20, 4:20] = 1
    tissue = rng.normal(-850, 40, size=hu.shape) + (rng.random(hu.shape) < 0.1) * 500
    hu[lung > 0] = (tissue[lung > 0] * scale + offset).astype(np.float32)
    ct, mask = sitk.GetImageFromArray(hu), sitk.GetImageFromArray(lung)
    for image in (ct, mask):
        image.SetSpacing((1.5, 1.5, 3.0))
    return ct, mask


def test_histogram_matching_maps_new_scan_onto_training_reference_within_lung():
    train = [_scan(0, 1.0, s) for s in range(3)]
    matcher = HistogramMatcher(n_reference_voxels=20000).fit([c for c, _ in train], [m for _, m in train])
    ct, lung = _scan(offset=-80, scale=1.2, seed=9)  # a differently calibrated scanner
    out = matcher.transform(ct, lung)
    hu, inside = sitk.GetArrayFromImage(out), sitk.GetArrayFromImage(lung) > 0
    ref = np.concatenate([sitk.GetArrayFromImage(c)[sitk.GetArrayFromImage(m) > 0] for c, m in train])
    before = sitk.GetArrayFromImage(ct)[inside]
    for q in (15, 50, 85):
        assert abs(np.percentile(hu[inside], q) - np.percentile(ref, q)) < 0.25 * abs(np.percentile(before, q) - np.percentile(ref, q)) + 5
    assert np.all(hu[~inside] == sitk.GetArrayFromImage(ct)[~inside])
    assert out.GetSpacing() == ct.GetSpacing()
    as_array = matcher.transform(sitk.GetArrayFromImage(ct), sitk.GetArrayFromImage(lung))  # model-grid volumes
    np.testing.assert_array_equal(as_array, hu)
    with pytest.raises(InputError, match="empty"):
        matcher.transform(ct, sitk.GetImageFromArray(np.zeros((6, 24, 24), np.uint8)))


def test_patch_hu_statistics_summarise_only_the_lung_voxels_of_each_patch():
    from latentharmonize.densitometry import HU_STATISTIC_NAMES
    from latentharmonize.patches import lattice_hu_statistics
    from latentharmonize.patches import PatchSpec

    spec = PatchSpec()
    rng = np.random.default_rng(0)
    hu = rng.uniform(-1000, 0, size=(5, 24, 24)).astype(np.float32)
    lung = np.ones(hu.shape, bool)
    lung[:, :, 12:] = False  # the right half is chest wall: it must not count
    hu[~lung] = 500.0
    positions = np.array([[0, 0, 0], [2, 1, 0]])
    stats = lattice_hu_statistics(hu, lung, positions, spec)
    assert stats.shape == (2, len(HU_STATISTIC_NAMES))
    for row, (k, i, j) in zip(stats, positions):
        box = (slice(k, k + 3), slice(4 * i, 4 * i + 16), slice(4 * j, 4 * j + 16))
        values = np.sort(hu[box][lung[box]])
        expected_q = [values[int(np.rint(q / 100 * (values.size - 1)))] for q in (10, 25, 50, 75, 90)]
        np.testing.assert_allclose(row[:5], expected_q)
        np.testing.assert_allclose(row[5:], [np.mean(values < -950), np.mean(values > -700), np.mean(values > -300)],
                                   rtol=1e-6)
    assert stats[:, 4].max() < 0  # no chest-wall voxel (500 HU) reached the 90 % quantile
    with pytest.raises(InputError, match="no lung voxel"):
        lattice_hu_statistics(hu, np.zeros(hu.shape, bool), positions, spec)
