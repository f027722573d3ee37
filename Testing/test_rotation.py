"""LatentRotation: orthogonality, recovery of a planted technical subspace, probe at chance, errors."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.linalg import subspace_angles
from sklearn.exceptions import NotFittedError

from latentharmonize.errors import InputError
from latentharmonize.rotation import LatentRotation, chance_level


def planted_latents(n_locations=150, d=10, k=3, n_acq=4, seed=0, noise=0.05, offset_scale=1.5):
    """Latents of ``n_locations`` patches each seen under ``n_acq`` acquisitions.

    A random orthonormal basis splits R^d into a technical subspace (first ``k`` columns), where each
    acquisition adds an offset and rescales a per-location baseline, and a biological subspace
    holding five tissue clusters that no acquisition touches. Returns X, y, pairs, technical basis
    and the location id of each row.
    """
    rng = np.random.default_rng(seed)
    q = np.linalg.qr(rng.normal(size=(d, d)))[0]
    tech, bio = q[:, :k], q[:, k:]
    centres = rng.normal(scale=3.0, size=(5, d - k))
    biology = centres[rng.integers(0, 5, n_locations)] + rng.normal(scale=0.5, size=(n_locations, d - k))
    baseline = rng.normal(scale=0.5, size=(n_locations, k))
    offsets = rng.normal(scale=offset_scale, size=(n_acq, k))
    gains = rng.uniform(0.5, 2.0, size=(n_acq, k))
    rows, labels = [], []
    for a in range(n_acq):
        t = offsets[a] + gains[a] * baseline
        rows.append(t @ tech.T + biology @ bio.T + rng.normal(scale=noise, size=(n_locations, d)))
        labels.append(np.full(n_locations, a))
    X, y = np.vstack(rows), np.concatenate(labels)
    loc = np.arange(n_locations)
    pairs = np.vstack([np.column_stack([a * n_locations + loc, b * n_locations + loc])
                       for a, b in itertools.combinations(range(n_acq), 2)])
    return X, y, pairs, tech, np.tile(loc, n_acq)


@pytest.fixture(scope="module")
def planted():
    return planted_latents()


@pytest.mark.parametrize("use_pairs", [True, False], ids=["paired", "labels"])
def test_recovers_planted_subspace_and_probe_drops_to_chance(planted, use_pairs):
    X, y, pairs, tech, loc = planted
    rot = LatentRotation().fit(X, y, pairs=pairs if use_pairs else None, groups=None if use_pairs else loc)
    assert rot.method_ == ("paired" if use_pairs else "labels")
    assert rot.n_technical_ == tech.shape[1]  # "auto" finds the planted dimension
    assert np.max(subspace_angles(rot.technical_basis_, tech)) < 0.05
    chance = chance_level(y)
    assert rot.probe_accuracy(X, y, space="entangled", groups=loc) > chance + 0.5
    assert rot.probe_accuracy(X, y, space="technical", groups=loc) > chance + 0.5
    assert abs(rot.probe_accuracy(X, y, space="biological", groups=loc) - chance) < 0.06
    # linear guardedness: every acquisition has the same mean in the biological coordinates
    bio = rot.biological(X)
    spread = max(np.abs(bio[y == a].mean(axis=0)).max() for a in np.unique(y))
    assert spread < 0.05 * bio.std()
    # the probe curve recorded during fit falls from "detectable" to chance at the chosen k
    assert rot.probe_curve_[0] > chance + 0.5 and rot.probe_curve_[-1] <= chance + rot.tolerance
    assert (rot.probe_entangled_, rot.probe_biological_) == (rot.probe_curve_[0], rot.probe_curve_[-1])


def test_leace_finds_nothing_left_to_erase(planted):
    """Cross-check with LEACE (concept-erasure): its erasure is driven by the covariance between the
    features and the one-hot acquisition, which must vanish on the biological coordinates."""
    torch = pytest.importorskip("torch")
    leace = pytest.importorskip("concept_erasure")
    X, y, _, _, loc = planted
    rot = LatentRotation(method="labels").fit(X, y, groups=loc)
    onehot = torch.nn.functional.one_hot(torch.from_numpy(y)).double()
    cross = {space: leace.LeaceFitter.fit(torch.from_numpy(Z), onehot).sigma_xz.abs().max().item()
             for space, Z in (("entangled", X), ("biological", rot.biological(X)))}
    assert cross["entangled"] > 0.1 and cross["biological"] < 1e-9


def test_rotation_is_orthogonal_and_transform_consistent(planted):
    X, y, pairs, _, _ = planted
    rot = LatentRotation(n_technical=2).fit(X, y, pairs=pairs)
    R = rot.rotation_
    d = X.shape[1]
    np.testing.assert_allclose(R.T @ R, np.eye(d), atol=1e-10)
    np.testing.assert_allclose(R @ R.T, np.eye(d), atol=1e-10)
    Z = rot.transform(X)
    np.testing.assert_allclose(Z, (X - X.mean(0)) @ R)
    np.testing.assert_allclose(np.hstack([rot.technical(X), rot.biological(X)]), Z)
    assert rot.technical(X).shape == (len(X), 2) and rot.biological(X).shape == (len(X), d - 2)
    np.testing.assert_allclose(rot.inverse_transform(Z), X, atol=1e-10)
    # biological axes are ordered by variance
    var = rot.biological(X).var(axis=0)
    assert np.all(np.diff(var) <= 1e-9)


def test_auto_keeps_significant_paired_directions_a_probe_cannot_see():
    """Acquisitions that only rescale the technical coordinates leave the means equal (probe at
    chance from the start), yet change every paired latent: auto still removes them."""
    X, y, pairs, tech, loc = planted_latents(offset_scale=0.0, seed=2)
    rot = LatentRotation().fit(X, y, pairs=pairs)
    assert abs(rot.probe_curve_[0] - chance_level(y)) < 0.06
    assert rot.n_technical_ == rot.n_significant_ == 3 and rot.direction_sources_ == ["paired"] * 3
    assert np.max(subspace_angles(rot.technical_basis_, tech)) < 0.05
    assert rot.noise_floor_ < 0.2 * rot.singular_values_[2]


def test_too_few_dimensions_leave_acquisition_signal(planted):
    X, y, pairs, _, _ = planted
    rot = LatentRotation(n_technical=1).fit(X, y, pairs=pairs)
    assert rot.probe_accuracy(X, y) > chance_level(y) + 0.2


def test_fixed_k_beyond_paired_spectrum_uses_inlp_directions(planted):
    X, y, pairs, tech, _ = planted
    rot = LatentRotation(n_technical=5).fit(X, y, pairs=pairs)
    assert rot.n_technical_ == 5
    assert rot.direction_sources_[:3] == ["paired"] * 3
    assert set(rot.direction_sources_[3:]) == {"inlp"}
    assert np.max(subspace_angles(rot.technical_basis_[:, :3], tech)) < 0.05


def test_inlp_removes_acquisition_signal_the_pairs_do_not_show():
    """Acquisition 2 was never paired: the paired model cannot see its shift, INLP must remove it."""
    X, y, pairs, tech, loc = planted_latents(k=2, n_acq=3, seed=4)
    extra = np.linalg.qr(np.column_stack([tech, np.ones(len(tech))]))[0][:, 2]  # outside the paired subspace
    X[y == 2] += 2.0 * extra
    unpaired = np.all(y[pairs] != 2, axis=1)
    rot = LatentRotation().fit(X, y, pairs=pairs[unpaired], groups=loc)
    assert rot.direction_sources_ == ["paired", "paired", "inlp"]
    # the planted technical span plus the unpaired shift is recovered (the weaker, gain-only paired
    # direction is estimated to ~0.08 rad from 150 pairs)
    assert np.max(subspace_angles(rot.technical_basis_, np.column_stack([tech, extra]))) < 0.15
    assert abs(rot.probe_accuracy(X, y, groups=loc) - chance_level(y)) < 0.06
    assert rot.probe_accuracy(X, y, space="entangled", groups=loc) > 0.9


def test_pair_subset_still_recovers_the_subspace(planted):
    X, y, pairs, tech, _ = planted
    rot = LatentRotation(n_technical=3, max_pairs=300).fit(X, y, pairs=pairs)
    assert np.max(subspace_angles(rot.technical_basis_, tech)) < 0.1


def test_deterministic_for_a_seed(planted):
    X, y, pairs, _, _ = planted
    a = LatentRotation(random_state=1).fit(X, y, pairs=pairs)
    b = LatentRotation(random_state=1).fit(X, y, pairs=pairs)
    assert np.array_equal(a.rotation_, b.rotation_)
    assert np.array_equal(a.probe_curve_, b.probe_curve_)


def test_state_round_trip(planted):
    X, y, pairs, _, _ = planted
    rot = LatentRotation(n_technical=3).fit(X, y, pairs=pairs)
    arrays, meta = rot.export_state()
    back = LatentRotation.from_state(arrays, meta)
    np.testing.assert_array_equal(back.transform(X), rot.transform(X))
    assert back.n_technical_ == 3 and back.method_ == "paired"
    assert back.probe_biological_ == rot.probe_biological_ < 0.3


def test_chance_level():
    assert chance_level([0, 0, 0, 1]) == 0.75
    assert chance_level(["a", "b", "c"]) == pytest.approx(1 / 3)


@pytest.mark.parametrize("kwargs, fit_args, match", [
    ({}, dict(X=np.ones((5, 1)), y=[0, 0, 1, 1, 1]), "2-D"),
    ({}, dict(X=np.full((4, 3), np.nan), y=[0, 0, 1, 1]), "finite"),
    ({}, dict(X=np.eye(4), y=[0, 0, 1]), "4 latents but 3"),
    ({}, dict(X=np.eye(4), y=[0, 0, 0, 0]), "single acquisition"),
    ({}, dict(X=np.eye(4), y=None), "acquisition label"),
    ({"method": "paired"}, dict(X=np.eye(4), y=[0, 0, 1, 1]), "needs pairs"),
    ({"method": "magic"}, dict(X=np.eye(4), y=[0, 0, 1, 1]), "method must be"),
    ({"n_technical": 4}, dict(X=np.eye(4), y=[0, 0, 1, 1]), r"0\.\.3"),
    ({"n_technical": "many"}, dict(X=np.eye(4), y=[0, 0, 1, 1]), "'auto' or an integer"),
    ({}, dict(X=np.eye(4), y=[0, 0, 1, 1], pairs=[[0, 1]]), "same acquisition"),
    ({}, dict(X=np.eye(4), y=[0, 0, 1, 1], pairs=[[0, 9]]), "outside"),
    ({}, dict(X=np.eye(4), y=[0, 0, 1, 1], pairs=[0, 2]), r"\[m, 2\]"),
])
def test_bad_inputs_raise_clear_errors(kwargs, fit_args, match):
    with pytest.raises(InputError, match=match):
        LatentRotation(**kwargs).fit(fit_args.pop("X"), fit_args.pop("y"), **fit_args)


def test_use_before_fit_and_wrong_width(planted):
    X, y, pairs, _, _ = planted
    with pytest.raises(NotFittedError):
        LatentRotation().transform(X)
    rot = LatentRotation(n_technical=3).fit(X, y, pairs=pairs)
    with pytest.raises(InputError, match="fitted on 10"):
        rot.transform(X[:, :5])
    with pytest.raises(InputError, match="space must be"):
        rot.probe_accuracy(X, y, space="latent")


def test_cluster_features_without_a_weight_are_the_biological_coordinates(planted):
    X, y, pairs, _, _ = planted
    rot = LatentRotation(n_technical=3).fit(X, y, pairs=pairs)
    np.testing.assert_array_equal(rot.cluster_features(X), rot.biological(X))
    assert rot.n_cluster_features_ == 7
    assert rot.probe_accuracy(X, y, space="clusters") == rot.probe_accuracy(X, y, space="biological")


def test_recentred_technical_coordinates_drop_a_scan_offset_and_keep_contrast_inside_the_scan(planted):
    X, y, pairs, _, _ = planted
    rot = LatentRotation(n_technical=3, technical_weight=0.5).fit(X, y, pairs=pairs)
    assert rot.n_cluster_features_ == 10
    tech = rot.technical_basis_
    scan = X[y == 0]
    shifted = scan + np.array([4.0, -2.0, 1.0]) @ tech.T  # the same scan under an acquisition offset
    np.testing.assert_allclose(rot.cluster_features(shifted), rot.cluster_features(scan), atol=1e-9)
    # a denser region inside one scan stays apart from the rest of that scan, scaled by the weight
    denser = scan.copy()
    denser[:20] += 3.0 * tech[:, 0]
    moved = rot.cluster_features(denser)[:20, :3] - rot.cluster_features(scan)[:20, :3]
    assert np.linalg.norm(moved, axis=1).mean() > 0.5 * 0.5 * 3.0
    # rows of several scans: each scan is re-centred on its own median, as if it had been given alone
    both = np.vstack([scan, shifted])
    ids = np.repeat([0, 1], len(scan))
    np.testing.assert_allclose(rot.cluster_features(both, scans=ids)[ids == 1], rot.cluster_features(shifted), atol=1e-9)
    np.testing.assert_allclose(rot.cluster_features(both)[:, 3:], rot.biological(both))
    # per-acquisition offsets are what the re-centring removes: the probe on what the clusters see stays near chance
    scans = y  # here each acquisition of the planted latents is one scan
    assert rot.probe_accuracy(X, y, space="clusters", scans=scans) < rot.chance_ + 0.1
    assert rot.probe_accuracy(X, y, space="technical") > 0.8  # chance 0.25


def test_technical_weight_survives_the_state_round_trip_and_old_states_drop_it(planted):
    X, y, pairs, _, _ = planted
    rot = LatentRotation(n_technical=3, technical_weight=0.3).fit(X, y, pairs=pairs)
    arrays, meta = rot.export_state()
    np.testing.assert_array_equal(LatentRotation.from_state(arrays, meta).cluster_features(X), rot.cluster_features(X))
    del meta["params"]["technical_weight"]  # a bundle written before the weight existed
    np.testing.assert_array_equal(LatentRotation.from_state(arrays, meta).cluster_features(X), rot.biological(X))


@pytest.mark.parametrize("weight", [-0.1, float("nan"), "0.3", True])
def test_bad_technical_weight_is_refused(planted, weight):
    X, y, pairs, _, _ = planted
    rot = LatentRotation(n_technical=3, technical_weight=weight).fit(X, y, pairs=pairs)
    with pytest.raises(InputError, match="technical_weight must be"):
        rot.cluster_features(X)


def test_harmonized_columns_are_the_last_inputs_with_the_technical_coordinates_removed(planted):
    X, y, pairs, _, _ = planted
    rot = LatentRotation(n_technical=3, harmonized_columns=4).fit(X, y, pairs=pairs)
    assert rot.n_cluster_features_ == 4
    Z = rot.transform(X)
    Z[:, :3] = 0.0
    np.testing.assert_allclose(rot.cluster_features(X), rot.inverse_transform(Z)[:, -4:], atol=1e-12)
    # a shift along the technical subspace (what an acquisition adds) does not move them; a biological change does
    technical = rot.technical_basis_
    shifted = X + np.array([4.0, -2.0, 1.0]) @ technical.T
    np.testing.assert_allclose(rot.cluster_features(shifted), rot.cluster_features(X), atol=1e-9)
    biological_change = (np.eye(10) - technical @ technical.T)[:, -1]  # the last input, technical part removed
    moved = rot.cluster_features(X + 2.0 * biological_change) - rot.cluster_features(X)
    assert np.abs(moved[:, -1]).mean() > 2.0 * 0.5 * np.linalg.norm(biological_change) ** 2
    arrays, meta = rot.export_state()
    np.testing.assert_array_equal(LatentRotation.from_state(arrays, meta).cluster_features(X), rot.cluster_features(X))
    del meta["params"]["harmonized_columns"]  # a bundle written before the option existed: the rotated coordinates
    np.testing.assert_array_equal(LatentRotation.from_state(arrays, meta).cluster_features(X), rot.biological(X))
    # with a technical weight, the scan-re-centred technical coordinates come first, as with the rotated coordinates
    rot.set_params(technical_weight=0.5)
    assert rot.n_cluster_features_ == 3 + 4
    recentred = rot.technical(X) - np.median(rot.technical(X), axis=0)
    expected = np.hstack([0.5 * recentred, rot.inverse_transform(Z)[:, -4:]])
    np.testing.assert_allclose(rot.cluster_features(X), expected, atol=1e-12)


@pytest.mark.parametrize("columns, weight, message", [(11, 0.0, "harmonized_columns must be"),
                                                      (-1, 0.0, "harmonized_columns must be"),
                                                      (2.0, 0.0, "harmonized_columns must be")])
def test_bad_harmonized_columns_are_refused(planted, columns, weight, message):
    X, y, pairs, _, _ = planted
    rot = LatentRotation(n_technical=3, harmonized_columns=columns, technical_weight=weight).fit(X, y, pairs=pairs)
    with pytest.raises(InputError, match=message):
        rot.cluster_features(X)
