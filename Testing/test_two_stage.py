"""Two-stage clusters: the raised side split by the parenchyma's core, names earned patch by patch."""
import numpy as np
import pytest

from latentharmonize.clusters import (DENSE_STRUCTURES, GROUND_GLASS, HIGHER, LOW_ATTENUATION, NAMING_THRESHOLDS, NORMAL, _name_one,
                                      acquisition_covariance, fit_named_clusters, name_rows)
from latentharmonize.densitometry import HU_STATISTIC_NAMES
from latentharmonize.errors import InputError
from latentharmonize.patches import CORE_STATISTIC_NAMES
from latentharmonize.two_stage import TwoStageClusters, fit_two_stage_clusters, reads_core, with_core

# core statistics rows (q10, q25, q50, q75, q90, below_950, above_700, above_300, above_depth) of three textures
NORMAL_CORE = (-900, -880, -860, -840, -810, 0.02, 0.0, 0.0, 0.0)
GLASS_CORE = (-720, -690, -620, -560, -500, 0.0, 0.7, 0.01, 240.0)
# raised by a bright minority (vessels the segmentation missed): the median and lower quartile stay near normal
DENSE_MINORITY_CORE = (-880, -850, -780, -500, 40, 0.01, 0.3, 0.2, 80.0)
DEPTH = 2 + CORE_STATISTIC_NAMES.index("above_depth")  # its column in the rows of _fitted


def _rows(rng, n, centre, core, spread=1.0):
    features = rng.normal(centre, 0.3, size=(n, 2))
    noise = rng.normal(0, spread, size=(n, len(CORE_STATISTIC_NAMES))) * np.array([10] * 5 + [0.005] * 3 + [10])
    return features, np.asarray(core, float) + noise


def _cohort(seed=0):
    """First-stage features put normal lung at 0 and everything raised at 3: the raised rows differ only in their
    core, half ground glass and half normal lung crossed by bright structures."""
    rng = np.random.default_rng(seed)
    parts = [_rows(rng, 600, (0, 0), NORMAL_CORE), _rows(rng, 200, (3, 0), GLASS_CORE),
             _rows(rng, 200, (3, 0), DENSE_MINORITY_CORE)]
    features = np.vstack([f for f, _ in parts])
    core = np.vstack([c for _, c in parts])
    kind = np.repeat([0, 1, 2], [600, 200, 200])
    # the first stage names from a profile that sees only normal against raised: the blurred view
    blurred = {"mean_hu": np.where(kind == 0, -860.0, -700.0), "median_hu": np.where(kind == 0, -860.0, -760.0),
               "q25_hu": np.where(kind == 0, -880.0, -830.0), "frac_below_950": np.zeros(len(kind)),
               "frac_above_300": np.where(kind == 0, 0.0, 0.05)}
    return features, core, kind, blurred


def _fitted(seed=0, min_above_depth_hu=None):
    features, core, kind, blurred = _cohort(seed)
    first, _, _, names = fit_named_clusters(features, blurred, 2, 0, order_by=blurred["mean_hu"])
    assert names == [NORMAL, HIGHER]  # one raised cluster holds both raised textures
    X = with_core(features, core)
    model = TwoStageClusters(n_second=2, harmonized_columns=2, random_state=0,
                             min_above_depth_hu=min_above_depth_hu).fit(X, first, names, blurred["mean_hu"])
    return model, X, kind


def test_the_second_stage_splits_the_raised_side_by_the_core_and_names_ground_glass():
    model, X, kind = _fitted()
    assert reads_core(model) and model.n_components_ == 2
    # the first stage's kept cluster, the second stage's two, and higher-attenuation lung for unearned names
    assert model.names_[0] == NORMAL and set(model.names_[1:3]) == {GROUND_GLASS, DENSE_STRUCTURES}
    assert model.names_[3] == HIGHER
    labels = model.predict(X)
    names = np.array(model.names_, dtype=object)[labels - 1]
    assert np.mean(names[kind == 0] == NORMAL) > 0.98
    assert np.mean(names[kind == 1] == GROUND_GLASS) > 0.95
    # bright structures in normal parenchyma raise the patch but never earn the ground-glass name
    assert np.mean(names[kind == 2] == GROUND_GLASS) < 0.02 and np.mean(names[kind == 2] == DENSE_STRUCTURES) > 0.95
    np.testing.assert_allclose(model.predict_proba(X).sum(axis=1), 1.0)
    np.testing.assert_array_equal(model.labels_, labels)


def test_the_first_stage_alone_keeps_its_clusters_and_marks_its_raised_side():
    model, X, kind = _fitted()
    first = model.predict_first_stage(X)
    final = model.predict(X)
    # normal lung keeps its final label; every raised row, whatever the second stage names it, is the raised side (0)
    assert np.mean(first[kind == 0] == 1) > 0.98 and np.all(first[kind > 0] == 0)
    assert np.all(final[first == 1] == 1)
    assert set(np.unique(final[first == 0])) >= {2, 3}
    with pytest.raises(InputError, match="columns"):
        model.predict_first_stage(X[:, :-1])


def test_a_patch_earns_a_second_stage_disease_name_by_its_own_core():
    model, X, kind = _fitted()
    glass = np.flatnonzero(kind == 1)[:20]
    before = model.predict_proba(X[glass])
    g, h = model.names_.index(GROUND_GLASS), model.names_.index(HIGHER)
    assert np.all(before.argmax(axis=1) == g)
    # the second stage does not read the lower quartile; only the patch's own naming does: below -820 HU the
    # parenchyma between the structures is normal, so the patch is raised but not ground glass
    changed = X[glass].copy()
    changed[:, 2 + HU_STATISTIC_NAMES.index("q25")] = NAMING_THRESHOLDS["raised_background_q25_hu"] - 50
    after = model.predict_proba(changed)
    assert np.all(after[:, g] == 0.0)
    np.testing.assert_allclose(after[:, h], before[:, h] + before[:, g])
    np.testing.assert_allclose(np.delete(after, [g, h], axis=1), np.delete(before, [g, h], axis=1))


def test_with_a_depth_test_ground_glass_must_stand_above_the_lung_at_its_depth():
    """A patch with ground glass's own profile that does not stand ``min_above_depth_hu`` above the lung at its
    depth (the dense back of a lung in a small breath) is higher-attenuation lung; one that does keeps the name, and
    without the test the depth is not read."""
    plain, X, kind = _fitted()
    model, _, _ = _fitted(min_above_depth_hu=50.0)
    glass = np.flatnonzero(kind == 1)[:20]
    g, h = model.names_.index(GROUND_GLASS), model.names_.index(HIGHER)
    np.testing.assert_array_equal(model.predict_proba(X), plain.predict_proba(X))  # all glass stands 240 HU above
    flat = X[glass].copy()
    flat[:, DEPTH] = np.linspace(-20.0, 49.0, len(glass))
    before, after = plain.predict_proba(flat), model.predict_proba(flat)
    assert np.all(before.argmax(axis=1) == g) and np.all(after[:, g] == 0.0)
    np.testing.assert_allclose(after[:, h], before[:, h] + before[:, g])
    flat[:, DEPTH] = 50.0
    np.testing.assert_array_equal(model.predict_proba(flat), before)
    assert model.export_state()[1]["params"]["min_above_depth_hu"] == 50.0
    with pytest.raises(InputError, match="min_above_depth_hu"):
        TwoStageClusters(n_second=2, harmonized_columns=2, min_above_depth_hu=-5.0).fit(X, model.first_,
                                                                                        [NORMAL, HIGHER])


def test_clusters_stored_before_the_depth_column_load_and_ignore_it():
    """A state saved when the core had eight statistics (no above_depth, no depth test) still loads, reads the
    nine-column rows of today's code, and labels as the clusters it came from."""
    model, X, _ = _fitted()
    arrays, meta = model.export_state()
    arrays = dict(arrays, core_center=arrays["core_center"][:-1], core_scale=arrays["core_scale"][:-1])
    meta = dict(meta, params={k: v for k, v in meta["params"].items() if k != "min_above_depth_hu"})
    old = TwoStageClusters.from_state(arrays, meta)
    assert old.min_above_depth_hu is None
    np.testing.assert_array_equal(old.predict_proba(X), model.predict_proba(X))


def test_two_stage_state_round_trips_and_refuses_inconsistent_maps():
    model, X, _ = _fitted()
    arrays, meta = model.export_state()
    again = TwoStageClusters.from_state(arrays, meta)
    np.testing.assert_array_equal(again.predict_proba(X), model.predict_proba(X))
    assert again.names_ == model.names_
    broken = dict(arrays, first_map=np.array([1, 7]))
    with pytest.raises(InputError, match="do not fit together"):
        TwoStageClusters.from_state(broken, meta)
    with pytest.raises(InputError, match="core statistics"):
        model.predict(X[:, :-1])


def test_without_enough_raised_rows_the_first_stage_is_all_there_is():
    features, core, kind, blurred = _cohort()
    keep = (kind == 0) | (np.arange(len(kind)) % 50 == 0)  # a handful of raised rows
    first, labels, _, names = fit_named_clusters(features[keep], {k: v[keep] for k, v in blurred.items()}, 2, 0)
    model = TwoStageClusters(n_second=2, harmonized_columns=2).fit(with_core(features[keep], core[keep]), first, names)
    assert model.second_ is None and model.names_ == names
    np.testing.assert_array_equal(model.labels_, labels)


def test_the_second_stage_is_widened_by_its_share_of_the_acquisition_covariance():
    """The widening of the second stage is the first's covariance mapped onto its features: the harmonized columns
    as they are and the core columns divided by their scale."""
    features, core, kind, blurred = _cohort()
    X = with_core(features, core)
    rng = np.random.default_rng(1)
    shifted = X + rng.normal(0, 0.05, size=X.shape) * np.r_[1.0, 1.0, X[:, 2:].std(axis=0)]
    cov = acquisition_covariance(X, shifted)
    model, labels, names = fit_two_stage_clusters(X, blurred, 2, 2, 0, order_by=blurred["mean_hu"],
                                                  acquisition_covariance=cov, harmonized_columns=2)
    cols = np.array([CORE_STATISTIC_NAMES.index(c) for c in model.core_columns])
    scale = np.r_[1.0, 1.0, model.core_scale_[cols]]
    block = cov[np.ix_(np.r_[0, 1, 2 + cols], np.r_[0, 1, 2 + cols])] / np.outer(scale, scale)
    assert model.first_.widening_share_ > 0 and model.second_.widening_share_ > 0
    # every component's covariance is a fitted one plus the mapped block: what remains is positive semi-definite
    fitted = model.second_.covariances_ - block
    for c in fitted:
        assert np.linalg.eigvalsh(c).min() > -1e-9 * np.trace(c)
    assert model.second_.widening_share_ == pytest.approx(np.trace(block) / np.trace(fitted, axis1=1, axis2=2).mean())
    # and the block is what the second stage's own features scatter by between the two acquisitions
    np.testing.assert_allclose(block, acquisition_covariance(model._second_features(X), model._second_features(shifted)))
    assert set(names) == {NORMAL, GROUND_GLASS, DENSE_STRUCTURES, HIGHER} and len(labels) == len(X)


def test_rows_are_named_all_at_once_by_the_rules_in_their_order():
    from latentharmonize.clusters import DENSE, HONEYCOMB, LOWER, RETICULAR

    table = [  # (median, q25, share below -950, share above -300) -> name; the first rule that matches wins
        ((-900, -960, 0.35, 0.25), HONEYCOMB), ((-940, -970, 0.40, 0.0), LOW_ATTENUATION),
        ((-100, -400, 0.0, 0.6), DENSE), ((-750, -800, 0.0, 0.2), RETICULAR), ((-650, -760, 0.0, 0.05), GROUND_GLASS),
        ((-780, -860, 0.0, 0.2), DENSE_STRUCTURES), ((-780, -860, 0.0, 0.05), HIGHER),
        ((-750, -800, 0.0, 0.05), HIGHER), ((-890, -920, 0.2, 0.0), LOWER), ((-860, -880, 0.02, 0.0), NORMAL),
    ]
    columns = np.array([row for row, _ in table], dtype=float).T
    names = name_rows(dict(zip(("median_hu", "q25_hu", "frac_below_950", "frac_above_300"), columns)))
    assert list(names) == [name for _, name in table]
    assert _name_one(dict(zip(("median_hu", "q25_hu", "frac_below_950", "frac_above_300"), columns[:, 4]))) == GROUND_GLASS


def test_evaluate_refits_both_stages_for_rotated_and_labels_bundle_clusters_as_analyze_does():
    """With a two-stage bundle, ``rotated`` reads the core statistics after its features and refits both stages at
    the evaluation's seed (in ``evaluate`` and in the seed spread); ``bundle_clusters`` labels with the bundle's."""
    from types import SimpleNamespace

    from latentharmonize.evaluation.encoding import CORE_STATISTICS
    from latentharmonize.evaluation.representations import (REGISTRY, Training, assign_clusters, cluster_recipes,
                                                            own_clusters)
    from latentharmonize.evaluation.seed_spread import seed_spread
    from latentharmonize.progress import Progress

    from test_evaluate import _grid_keys, _scan

    model, _, _ = _fitted()
    features, core, kind, blurred = _cohort(seed=1)
    hu = np.column_stack([blurred["median_hu"] - 40, blurred["q25_hu"], blurred["median_hu"], blurred["median_hu"] + 30,
                          blurred["median_hu"] + 60, blurred["frac_below_950"], np.full(len(kind), 0.1),
                          blurred["frac_above_300"]])
    rng = np.random.default_rng(2)
    scans = []
    for p, rows in enumerate(np.array_split(rng.permutation(len(kind)), 2)):
        for acquisition in ("soft", "sharp"):
            jitter = 0.0 if acquisition == "soft" else 0.02
            s = _scan(f"p{p}", acquisition, _grid_keys(len(rows)), {}, truth=kind[rows] + 1,
                      latents=features[rows] + jitter)
            s.latents.update({CORE_STATISTICS: core[rows], "hu_statistics": hu[rows],
                              "patch_mean_hu": blurred["mean_hu"][rows, None]})
            scans.append(s)
    bundle = SimpleNamespace(rotation=SimpleNamespace(cluster_features=lambda x: x), clusters=model)
    rows = {i: np.arange(len(s.keys)) for i, s in enumerate(scans)}
    training = Training(bundle, scans, rows, 0)
    funcs = {r.name: r.fit(training) for r in REGISTRY if r.name in ("rotated", "bundle_clusters")}
    recipes = cluster_recipes(training, funcs)
    names = assign_clusters(funcs, scans, scans, rows, 2, 0, Progress(quiet=True), {}, own_clusters(training, funcs),
                            recipes)
    assert names["bundle_clusters"] == list(model.names_)  # two-stage clusters keep their names for evaluate's tables
    for s in scans:
        X = with_core(s.latents["entangled"], s.latents[CORE_STATISTICS])
        np.testing.assert_array_equal(funcs["rotated"](s), X)
        np.testing.assert_array_equal(s.labels["bundle_clusters"], model.predict(X))
    truth = np.concatenate([s.truth for s in scans])
    refit = np.concatenate([s.labels["rotated"] for s in scans])
    # two mixture components, one of them raised: a one-stage refit would give two labels; the second stage splits
    # the raised side into ground glass and normal lung crossed by dense structures
    assert len(np.unique(refit)) == 3
    glass, dense = (np.bincount(refit[truth == k]).argmax() for k in (2, 3))
    assert glass != dense and np.mean(refit[truth == 2] == glass) > 0.95
    assert names["rotated"][glass - 1] == "ground-glass-like"
    spread = seed_spread({"rotated": funcs["rotated"]}, scans, scans, 2000, 2, 0, n_seeds=2, recipes=recipes)
    assert spread["rotated"]["truth_ari"][1] > 0.9
    no_recipe = seed_spread({"rotated": funcs["rotated"]}, scans, scans, 2000, 2, 0, n_seeds=2)
    assert no_recipe["rotated"]["truth_ari"][1] < spread["rotated"]["truth_ari"][1]


def test_a_two_stage_bundle_with_inconsistent_stages_is_refused(tmp_path):
    """The default bundle has two stages; a manifest whose second stage reads other harmonized columns than the
    rotation gives, or arrays whose maps point past the final clusters, are refused on loading."""
    import hashlib
    import json
    import shutil

    from safetensors.numpy import load, save

    from latentharmonize.bundle import _sealed_manifest_bytes, default_bundle_path, load_bundle
    from latentharmonize.errors import BundleError

    def copy(name):
        folder = tmp_path / name
        shutil.copytree(default_bundle_path(), folder)
        return folder, json.loads((folder / "manifest.json").read_text())

    assert reads_core(load_bundle().clusters)
    folder, manifest = copy("columns")
    manifest["clusters"]["params"]["harmonized_columns"] = 4
    (folder / "manifest.json").write_bytes(_sealed_manifest_bytes(manifest))
    with pytest.raises(BundleError, match="second stage of the clusters reads 4 harmonized columns"):
        load_bundle(folder)

    folder, manifest = copy("maps")
    arrays = load((folder / "arrays.safetensors").read_bytes())
    arrays["clusters.second_map"] = arrays["clusters.second_map"] + 10.0
    data = save(arrays)
    (folder / "arrays.safetensors").write_bytes(data)
    manifest["files"]["arrays.safetensors"] = hashlib.sha256(data).hexdigest()
    (folder / "manifest.json").write_bytes(_sealed_manifest_bytes(manifest))
    with pytest.raises(BundleError, match="inconsistent with its manifest"):
        load_bundle(folder)
