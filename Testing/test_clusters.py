"""TissueClusters: planted clusters, stability-chosen K, mixture confidence, naming and merging by name, colours,
determinism."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.exceptions import NotFittedError
from sklearn.metrics import adjusted_rand_score

from latentharmonize.clusters import (DENSE, DENSE_STRUCTURES, DISEASE_NAMES, GROUND_GLASS, HIGHER, HONEYCOMB,
                                      LOW_ATTENUATION, LOWER, NAME_COLORS, NORMAL, PALETTE, RETICULAR, TissueClusters,
                                      acquisition_covariance, base_name, cluster_profiles, default_colors,
                                      fit_named_clusters, name_clusters, supported_names)
from latentharmonize.densitometry import patch_profiles
from latentharmonize.errors import InputError


def planted_clusters(k=5, n_per=80, dims=4, seed=0):
    """Well-separated isotropic Gaussian clusters; returns points and their 0-based true cluster."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=6.0, size=(k, dims))
    truth = np.repeat(np.arange(k), n_per)
    return centres[truth] + rng.normal(size=(k * n_per, dims)), truth


@pytest.fixture(scope="module")
def planted():
    return planted_clusters()


FAST = dict(k_range=(3, 7), n_bootstrap=4, n_init=4)


def test_stability_picks_planted_k_and_recovers_clusters(planted):
    Z, truth = planted
    tc = TissueClusters(**FAST).fit(Z)
    assert tc.n_clusters_ == 5
    assert tc.stability_[5] > 0.95 and tc.stability_[7] < 0.9
    assert adjusted_rand_score(truth, tc.labels_) > 0.98
    assert set(np.unique(tc.labels_)) == {1, 2, 3, 4, 5}


def test_unstructured_data_warns():
    Z = np.random.default_rng(1).normal(size=(300, 6))
    with pytest.warns(RuntimeWarning, match="reproducible"):
        TissueClusters(**FAST).fit(Z)


def test_fixed_k_order_by_and_determinism(planted):
    Z, truth = planted
    hu = np.array([-900.0, -850, -600, -400, 20])[truth]  # a planted "mean HU" per true cluster
    a = TissueClusters(n_clusters=5, random_state=3).fit(Z, order_by=hu)
    b = TissueClusters(n_clusters=5, random_state=3).fit(Z, order_by=hu)
    np.testing.assert_array_equal(a.means_, b.means_)
    np.testing.assert_array_equal(a.covariances_, b.covariances_)
    # labels follow ascending mean HU, so label = true cluster + 1
    np.testing.assert_array_equal(a.labels_, truth + 1)
    assert np.all(np.diff(a.order_values_) > 0)


def test_confidence_is_the_margin_of_the_two_most_probable_clusters(planted):
    Z, _ = planted
    tc = TissueClusters(n_clusters=5).fit(Z)
    labels, conf = tc.predict_with_confidence(Z)
    assert labels.dtype == np.uint8 and conf.dtype == np.float32
    assert np.all((conf >= 0) & (conf <= 1))
    p = tc.predict_proba(Z)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-9)
    np.testing.assert_array_equal(labels, p.argmax(axis=1) + 1)
    top = -np.sort(-p, axis=1)
    np.testing.assert_allclose(conf, (top[:, 0] - top[:, 1]) / (2 - top[:, 0] - top[:, 1]), atol=1e-5)
    assert np.all(tc.predict_with_confidence(tc.means_)[1] > 0.99)  # a component's mean, far from the others
    # on the way between the two nearest means the label switches, where the two are equally likely
    d = np.linalg.norm(tc.means_[:, None] - tc.means_[None], axis=2) + np.eye(5) * 1e9
    i, j = np.unravel_index(d.argmin(), d.shape)
    path = tc.means_[i] + np.linspace(0, 1, 2001)[:, None] * (tc.means_[j] - tc.means_[i])
    lab, cf = tc.predict_with_confidence(path)
    assert lab[0] == i + 1 and lab[-1] == j + 1 and cf.min() < 0.01


def test_mixture_keeps_a_compact_tissue_that_kmeans_cuts():
    """The reason for the mixture: a small compact group (emphysema) beside a large elongated one (normal lung)."""
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(0)
    large = rng.normal(size=(3000, 2)) * [4.0, 0.5]
    small = rng.normal(size=(300, 2)) * 0.4 + [0.0, 3.0]
    Z = np.vstack([large, small])
    truth = np.repeat([0, 1], [3000, 300])
    mixture = TissueClusters(n_clusters=2, random_state=0).fit(Z).labels_
    kmeans = KMeans(n_clusters=2, n_init=10, random_state=0).fit(Z).labels_
    assert adjusted_rand_score(truth, mixture) > 0.9
    assert adjusted_rand_score(truth, kmeans) < 0.3


def test_components_of_one_name_merge_into_one_cluster():
    rng = np.random.default_rng(1)
    means = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    truth = np.repeat([0, 1, 2], 200)
    Z = means[truth] + rng.normal(size=(600, 2))
    median = np.array([-870.0, -850.0, -960.0])[truth]  # two normal-looking components, one emphysema-like
    stats = {"median_hu": median, "mean_hu": median, "q25_hu": median - 30.0,
             "frac_below_950": np.array([0.02, 0.01, 0.7])[truth], "frac_above_300": np.full(600, 0.01)}
    clusters, labels, profiles, names = fit_named_clusters(Z, stats, 3, 0, order_by=stats["mean_hu"])
    assert clusters.n_components_ == 3 and clusters.n_clusters_ == 2
    assert names == [LOW_ATTENUATION, NORMAL]  # ordered by mean HU
    np.testing.assert_array_equal(labels, np.where(truth == 2, 1, 2))
    assert [p["n"] for p in profiles] == [200, 400]
    np.testing.assert_array_equal(clusters.predict(Z), labels)
    assert clusters.predict_proba(Z).shape == (600, 2)
    back = TissueClusters.from_state(*clusters.export_state())
    for x, y in zip(back.predict_with_confidence(Z), clusters.predict_with_confidence(Z)):
        np.testing.assert_array_equal(x, y)


def test_acquisition_covariance_is_the_scatter_one_acquisition_adds():
    rng = np.random.default_rng(3)
    points = rng.normal(size=(20000, 3)) * 5.0
    scatter = np.array([[1.0, 0.4, 0.0], [0.4, 0.5, 0.0], [0.0, 0.0, 0.1]])
    read = [points + rng.multivariate_normal(np.zeros(3), scatter, size=len(points)) for _ in range(2)]
    np.testing.assert_allclose(acquisition_covariance(*read), scatter, atol=0.03)
    with pytest.raises(InputError, match="Paired rows must match"):
        acquisition_covariance(read[0], read[1][:-1])


def test_widening_by_the_acquisition_covariance_keeps_labels_across_scanners():
    """A large tissue thin along axis 1 beside a small one wide along it; the second scanner moves points along axis
    1. Widened by that scatter, the same points keep their labels across the scanners more often, and the labels
    follow the tissue as well as before."""
    rng = np.random.default_rng(0)
    tissue = np.vstack([rng.normal(size=(3000, 2)) * [1.0, 0.3], rng.normal(size=(600, 2)) * [0.6, 1.5] + [3.0, 0.0]])
    truth = np.repeat([0, 1], [3000, 600])
    scans = [tissue + rng.normal(size=tissue.shape) * [0.05, sd] for sd in (0.1, 0.8)]
    widening = acquisition_covariance(*scans)
    fits = {name: TissueClusters(n_clusters=2, random_state=0).fit(np.vstack(scans), acquisition_covariance=cov)
            for name, cov in (("plain", None), ("widened", widening))}
    agreement = {name: adjusted_rand_score(*(tc.predict(s) for s in scans)) for name, tc in fits.items()}
    tissue_ari = {name: np.mean([adjusted_rand_score(truth, tc.predict(s)) for s in scans]) for name, tc in fits.items()}
    assert agreement["widened"] > agreement["plain"] + 0.01
    assert tissue_ari["widened"] > tissue_ari["plain"] - 0.01
    # the mixture itself is the same fit; only its covariances grow, by exactly the widening
    np.testing.assert_allclose(fits["widened"].covariances_ - fits["plain"].covariances_,
                               np.broadcast_to(widening, fits["plain"].covariances_.shape))
    np.testing.assert_array_equal(fits["widened"].means_, fits["plain"].means_)


@pytest.mark.parametrize("covariance", [np.eye(3), -np.eye(4), np.triu(np.ones((4, 4))), np.full((4, 4), np.nan)])
def test_a_bad_acquisition_covariance_is_refused(planted, covariance):
    with pytest.raises(InputError, match="acquisition_covariance must be"):
        TissueClusters(n_clusters=3).fit(planted[0], acquisition_covariance=covariance)


def test_merge_needs_every_label(planted):
    tc = TissueClusters(n_clusters=3).fit(planted[0])
    with pytest.raises(InputError, match="every label used"):
        tc.merge([1, 3, 3])
    with pytest.raises(InputError, match="3 components"):
        tc.merge([1, 2])


def test_state_round_trip(planted):
    Z, _ = planted
    tc = TissueClusters(n_clusters=4).fit(Z)
    back = TissueClusters.from_state(*tc.export_state())
    for x, y in zip(back.predict_with_confidence(Z), tc.predict_with_confidence(Z)):
        np.testing.assert_array_equal(x, y)


def profile(median, low, high700, high300, mean=None, sd=100.0, q25=None):
    """A cluster profile; the lower quartile defaults to 40 HU below the median."""
    return {"mean_hu": median if mean is None else mean, "sd_hu": sd, "median_hu": median,
            "q25_hu": median - 40.0 if q25 is None else q25, "frac_below_950": low, "frac_above_700": high700,
            "frac_above_300": high300}


def test_name_clusters_from_crafted_profiles():
    profiles = [profile(-975, 0.8, 0.0, 0.0), profile(-860, 0.05, 0.05, 0.02), profile(-550, 0.0, 0.9, 0.03),
                profile(-680, 0.02, 0.45, 0.25), profile(-700, 0.4, 0.5, 0.3), profile(10, 0.0, 1.0, 0.95),
                profile(-760, 0.02, 0.2, 0.05),
                profile(-890, 0.33, 0.04, 0.01),  # darker than normal lung (or normal lung through a sharp kernel)
                profile(-870, 0.33, 0.04, 0.01)]  # a median within normal lung's range stays normal-appearing
    assert name_clusters(profiles) == [LOW_ATTENUATION, NORMAL, GROUND_GLASS, RETICULAR, HONEYCOMB, DENSE, HIGHER,
                                       LOWER, NORMAL + " 2"]


def test_raised_median_is_read_by_the_lower_quartile():
    """A raised median over a near-normal lower quartile is many structures crossing near-normal lung, described as
    such; a pattern's name needs the parenchyma itself raised. Profiles of mixture components the phantom's
    evaluation fitted (rounded), which the median alone had named reticular-like."""
    vessel_rich_normal = profile(-790, 0.05, 0.33, 0.17, q25=-886)  # mostly normal lung, 9 % of it
    assert name_clusters([vessel_rich_normal]) == [DENSE_STRUCTURES]
    normal_with_consolidation = profile(-722, 0.02, 0.41, 0.24, q25=-854)  # most of the consolidation, and vessels
    assert name_clusters([normal_with_consolidation]) == [DENSE_STRUCTURES]
    assert name_clusters([dict(normal_with_consolidation, frac_above_300=0.05)]) == [HIGHER]
    raised_parenchyma = profile(-627, 0.02, 0.63, 0.12, q25=-762)  # ground glass, reticulation, honeycombing
    assert name_clusters([raised_parenchyma]) == [GROUND_GLASS]
    assert name_clusters([dict(raised_parenchyma, frac_above_300=0.17)]) == [RETICULAR]
    assert name_clusters([dict(raised_parenchyma, q25_hu=-830.0)]) == [HIGHER]
    # the lower quartile does not touch a median within normal lung's range, nor consolidation
    assert name_clusters([profile(-850, 0.01, 0.1, 0.02, q25=-790)]) == [NORMAL]
    assert name_clusters([profile(-250, 0.0, 0.9, 0.6, q25=-900)]) == [DENSE]


def test_emphysema_like_only_below_the_documented_thresholds():
    assert name_clusters([profile(-935, 0.45, 0.0, 0.0)]) == [LOW_ATTENUATION]  # median < -930
    assert name_clusters([profile(-900, 0.55, 0.0, 0.0)]) == [LOW_ATTENUATION]  # most voxels < -950
    assert name_clusters([profile(-925, 0.45, 0.0, 0.0)]) == [LOWER]  # darker than normal, short of emphysema-like
    assert LOWER not in DISEASE_NAMES


def test_a_profile_always_gets_the_same_name():
    """The name depends on the profile only: not on the other clusters, their order or their sizes."""
    rng = np.random.default_rng(3)
    profiles = [profile(m, lo, h7, h3) for m, lo, h7, h3 in zip(rng.uniform(-1000, 50, 40), rng.uniform(0, 1, 40),
                                                                rng.uniform(0, 1, 40), rng.uniform(0, 1, 40))]
    alone = [name_clusters([p])[0] for p in profiles]
    together = name_clusters(profiles[::-1])[::-1]
    assert [t.rsplit(" ", 1)[0] if t[-1].isdigit() else t for t in together] == alone
    assert name_clusters([dict(profiles[0], n=5)]) == name_clusters([dict(profiles[0], n=5000)])


def _patch(background_hu, noise_sd, rng, size=16, spacing=1.25):
    """A 3 x 16 x 16 patch (20 mm, 1.25 mm pixels) of lung at ``background_hu`` with noise, and the in-plane
    distance (mm) of each pixel from a random point near the centre."""
    patch = rng.normal(background_hu, noise_sd, size=(3, size, size))
    y, x = (np.mgrid[:size, :size] - (size - 1) / 2.0) * spacing
    cy, cx = rng.uniform(-4.0, 4.0, 2)
    return patch, np.hypot(y - cy, x - cx)[None]


@pytest.mark.parametrize("noise_sd", [30.0, 110.0], ids=["soft kernel", "sharp kernel"])
def test_normal_anatomy_never_gets_a_disease_name(noise_sd):
    """Normal lung crossed by vessels (+40 HU, radius 1-5 mm) or bronchi (air lumen, +40 HU wall) is named
    normal-appearing, whatever the kernel noise: anatomy is not disease."""
    rng = np.random.default_rng(7)
    vessels, airways = [], []
    for _ in range(60):
        patch, r = _patch(-860.0, noise_sd, rng)
        radius = rng.uniform(1.0, 5.0)
        vessels.append(np.where(r < radius, rng.normal(40.0, noise_sd, patch.shape), patch))
        patch, r = _patch(-860.0, noise_sd, rng)
        lumen, wall = rng.uniform(1.5, 4.0), rng.uniform(1.0, 1.5)
        patch = np.where(r < lumen + wall, rng.normal(40.0, noise_sd, patch.shape), patch)
        airways.append(np.where(r < lumen, rng.normal(-1000.0, noise_sd / 3, patch.shape), patch))
    stats = patch_profiles(np.stack(vessels + airways))
    profiles = cluster_profiles(np.repeat([1, 2], 60), stats, 2)
    for name in name_clusters(profiles):
        assert name.split(" 2")[0] not in DISEASE_NAMES
    for p in range(120):  # and not one patch alone either
        single = {k: v[p] for k, v in stats.items()}
        assert name_clusters([single])[0] not in DISEASE_NAMES, single


def test_disease_patterns_get_their_names():
    rng = np.random.default_rng(11)
    y, x = np.mgrid[:16, :16] * 1.25
    lines = (np.abs(np.sin(2 * np.pi * x / 6.0)) < 0.35) | (np.abs(np.sin(2 * np.pi * y / 7.0)) < 0.35)
    cysts = (np.sin(2 * np.pi * x / 9.0) * np.sin(2 * np.pi * y / 9.0)) > -0.35
    patterns = {
        LOW_ATTENUATION: rng.normal(-975, 25, (20, 3, 16, 16)),
        GROUND_GLASS: rng.normal(-550, 60, (20, 3, 16, 16)),
        DENSE: rng.normal(25, 30, (20, 3, 16, 16)),
        RETICULAR: np.where(lines, -150.0, -790.0) + rng.normal(0, 40, (20, 3, 16, 16)),
        HONEYCOMB: np.where(cysts, -975.0, -60.0) + rng.normal(0, 40, (20, 3, 16, 16)),
    }
    stats = patch_profiles(np.concatenate(list(patterns.values())))
    profiles = cluster_profiles(np.repeat(np.arange(1, 6), 20), stats, 5)
    assert name_clusters(profiles) == list(patterns)


def test_profiles_from_patches_feed_naming():
    rng = np.random.default_rng(0)
    normal = rng.normal(-850, 30, size=(10, 3, 16, 16))
    dense = rng.normal(20, 30, size=(10, 3, 16, 16))
    stats = patch_profiles(np.concatenate([normal, dense]))
    assert stats["frac_above_700"][:10].max() < 0.01 and stats["frac_above_700"][10:].min() > 0.99
    assert abs(stats["median_hu"][:10].mean() + 850) < 10 and stats["frac_above_300"][10:].min() > 0.99
    profiles = cluster_profiles(np.repeat([1, 2], 10), stats, 2)
    assert [p["n"] for p in profiles] == [10, 10]
    assert name_clusters(profiles) == [NORMAL, DENSE]


def test_bad_profile_is_refused():
    with pytest.raises(InputError, match="lacks"):
        name_clusters([{"mean_hu": -800}])
    with pytest.raises(InputError, match="non-finite"):
        name_clusters([profile(float("nan"), 1, 0, 0)])


def test_palette_and_default_colors():
    assert len(set(PALETTE)) == len(PALETTE) >= 10
    assert all(0 <= v <= 1 for c in PALETTE for v in c)
    colors = default_colors([NORMAL, DENSE, NORMAL + " 2", "my cluster"])
    assert colors[0] == NAME_COLORS[NORMAL] and colors[1] == NAME_COLORS[DENSE]
    assert len(set(colors)) == 4  # repeats and unknown names get unused palette colours
    assert len(set(NAME_COLORS.values())) == len(NAME_COLORS)  # every tissue name its own colour


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_clusters=1), "integer >= 2"),
    (dict(n_clusters=500), "Cannot form 500"),
    (dict(k_range=(5, 3)), "k_range"),
    (dict(k_range=(2, 300)), "too few"),
    (dict(subsample=1.5), "subsample"),
])
def test_bad_parameters_raise_clear_errors(planted, kwargs, match):
    with pytest.raises(InputError, match=match):
        TissueClusters(**kwargs).fit(planted[0])


def test_bad_inputs(planted):
    Z, _ = planted
    with pytest.raises(InputError, match="finite"):
        TissueClusters(n_clusters=3).fit(np.full((10, 2), np.nan))
    with pytest.raises(InputError, match="order_by"):
        TissueClusters(n_clusters=3).fit(Z, order_by=np.zeros(3))
    with pytest.raises(NotFittedError):
        TissueClusters().predict(Z)
    tc = TissueClusters(n_clusters=3).fit(Z)
    with pytest.raises(InputError, match="fitted on 4"):
        tc.predict(Z[:, :2])


def test_a_disease_name_needs_most_of_the_clusters_own_patches():
    """A cluster half normal lung, half consolidation has a raised mean profile that passes a pattern's rule, but
    almost none of its patches do: it gets the descriptive name. A pure ground-glass cluster keeps its name."""
    rng = np.random.default_rng(3)
    n = 200
    kind = np.repeat([0, 1, 2, 3], n)  # normal, ground glass, then the mixed cluster: normal and consolidation halves
    Z = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [0.0, 10.0]])[kind] + rng.normal(scale=0.5, size=(4 * n, 2))
    median = np.array([-850.0, -600.0, -860.0, -100.0])[kind] + rng.normal(scale=5.0, size=4 * n)
    stats = {"median_hu": median, "mean_hu": median, "q25_hu": median - np.array([30.0, 60.0, 30.0, 80.0])[kind],
             "frac_below_950": np.full(4 * n, 0.01), "frac_above_300": np.array([0.01, 0.05, 0.01, 0.9])[kind]}
    _, labels, profiles, names = fit_named_clusters(Z, stats, 3, 0, order_by=stats["mean_hu"])
    mixed = labels[kind == 3][0]
    assert base_name(name_clusters([profiles[mixed - 1]])[0]) in DISEASE_NAMES  # what the mean profile alone says
    assert names[mixed - 1] == HIGHER
    assert names[labels[kind == 1][0] - 1] == GROUND_GLASS
    assert names[labels[kind == 0][0] - 1] == NORMAL
    # the rule reads the cluster's rows, not its mean profile: with every row raised the name stays
    assert supported_names([GROUND_GLASS, RETICULAR], np.array([1, 1, 2, 2]),
                           {"median_hu": np.array([-600.0, -620.0, -850.0, -300.0]),
                            "q25_hu": np.array([-700.0, -700.0, -780.0, -800.0]),
                            "frac_below_950": np.zeros(4), "frac_above_300": np.array([0.0, 0.0, 0.5, 0.5])}) \
        == [GROUND_GLASS, HIGHER]
