"""evaluate's seed spread: the tissue goal's pair refitted at several mixture seeds."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from latentharmonize.clusters import fit_named_clusters
from latentharmonize.evaluation.encoding import ScanLatents, training_rows
from latentharmonize.evaluation.goals import tissue_goals
from latentharmonize.evaluation.representations import (refit_clusters, training_acquisition_covariance,
                                                       training_naming_statistics)
from latentharmonize.evaluation.seed_spread import seed_spread, spread_caption, spread_rows
from latentharmonize.evaluation.tissue import PATCH_MEAN_HU
from latentharmonize.tissue import TISSUE_LABELS

# per tissue: patch HU statistics q10, q25, q50, q75, q90, shares below -950, above -700, above -300
PROFILES = {"normal": [-900, -880, -850, -820, -780, 0.01, 0.05, 0.01],
            "emphysema": [-990, -975, -960, -930, -900, 0.60, 0.02, 0.00],
            "reticulation": [-850, -780, -690, -560, -400, 0.00, 0.55, 0.20]}
TISSUES = list(PROFILES)


def _cohort(split, patients, rng, n=240):
    """Patients scanned twice ("soft", "sharp": +20 HU and more noise) at the same lattice points; the features of
    both representations follow the tissue, with overlap, so fits at different seeds can differ."""
    scans = []
    for p in range(patients):
        tissue = rng.choice(3, size=n, p=[0.6, 0.2, 0.2])
        for acquisition, offset, noise in (("soft", 0.0, 25.0), ("sharp", 20.0, 45.0)):
            stats = np.array([PROFILES[TISSUES[t]] for t in tissue], float)
            stats[:, :5] += offset + rng.normal(0, noise, (n, 1))
            latent = np.eye(3)[tissue] * 2.0 + rng.normal(0, 0.9, (n, 3))
            scans.append(ScanLatents(
                patient=f"P{p}", acquisition=acquisition, split=split,
                keys=np.stack([np.arange(n), np.zeros(n), np.zeros(n)], 1).astype(np.int64),
                positions=np.zeros((n, 3), np.int64),
                latents={"hu_statistics": stats, PATCH_MEAN_HU: stats[:, 2:3], "rotated": latent},
                truth=np.array([TISSUE_LABELS[TISSUES[t]] for t in tissue]), densitometry={}, clinical={}))
    return scans


CENTRE, SCALE = np.array([-850.0] * 5 + [0.0] * 3), np.array([100.0] * 5 + [0.2] * 3)
FUNCS = {"rotated": lambda s: s.latents["rotated"],
         "hu_statistics": lambda s: (s.latents["hu_statistics"] - CENTRE) / SCALE}


def _fit_and_label(train, scans, budget, k, seed):
    """What evaluate does at its own seed: fit each representation on the seeded training rows, label the scans."""
    rows = training_rows(train, budget, seed)
    stats = training_naming_statistics(train, rows)
    for name, f in FUNCS.items():
        widening = training_acquisition_covariance(train, [f(s) for s in train])
        features = np.concatenate([f(train[i])[r] for i, r in rows.items()])
        clusters = refit_clusters(features, stats, k, seed, widening)
        for s in scans:
            s.labels[name] = np.asarray(clusters.predict(f(s)))


def _truth_ari(labels_of, scans):
    """Mean over patients of the mean over their scans of the ARI against the truth."""
    per_patient = {}
    for s in scans:
        per_patient.setdefault(s.patient, []).append(adjusted_rand_score(s.truth, labels_of(s)))
    return float(np.mean([np.mean(v) for v in per_patient.values()]))


def test_seed_spread_refits_at_each_seed_and_keeps_the_runs_own_fit_first():
    rng = np.random.default_rng(0)
    train, evals = _cohort("train", 4, rng), _cohort("eval", 3, rng)
    budget, k, seed = 1200, 4, 7
    _fit_and_label(train, train + evals, budget, k, seed)
    own = {name: [s.labels[name].copy() for s in evals] for name in FUNCS}

    spread = seed_spread(FUNCS, evals, train, budget, k, seed, n_seeds=3)

    assert [s.labels[n].tolist() for n in FUNCS for s in evals] == [x.tolist() for n in FUNCS for x in own[n]]
    for name, f in FUNCS.items():
        m = spread[name]
        assert m["seeds"] == [7, 8, 9] and len(m["truth_ari"]) == len(m["consistency_ari"]) == 3
        assert m["truth_ari"][0] == pytest.approx(_truth_ari(lambda s: s.labels[name], evals))
        # seed 9, computed here from scratch: its own training rows, naming statistics and mixture seed
        rows = training_rows(train, budget, 9)
        stats = training_naming_statistics(train, rows)
        clusters = fit_named_clusters(np.concatenate([f(train[i])[r] for i, r in rows.items()]), stats, k, 9,
                                      order_by=stats["mean_hu"],
                                      acquisition_covariance=training_acquisition_covariance(train, [f(s) for s in train]))[0]
        assert m["truth_ari"][2] == pytest.approx(_truth_ari(lambda s: clusters.predict(f(s)), evals))
        pairs = {}
        for s in evals:
            pairs.setdefault(s.patient, []).append(clusters.predict(f(s)))
        assert m["consistency_ari"][2] == pytest.approx(np.mean([adjusted_rand_score(*v) for v in pairs.values()]))
        assert m["truth_ari_mean"] == pytest.approx(np.mean(m["truth_ari"]))
    ahead = sum(r >= h for r, h in zip(spread["rotated"]["truth_ari"], spread["hu_statistics"]["truth_ari"]))
    assert spread["rotated_ahead"] == ahead
    assert f"at {ahead} of 3 seeds" in spread_caption({"seed_spread": spread})
    assert [row[0] for row in spread_rows({"seed_spread": spread})] == ["rotated", "hu_statistics"]


def test_seed_spread_needs_truth_and_the_goal_reads_its_means():
    rng = np.random.default_rng(1)
    train, evals = _cohort("train", 2, rng, n=120), _cohort("eval", 2, rng, n=120)
    for s in evals:
        s.truth = None
    assert seed_spread(FUNCS, evals, train, 400, 3, 0, n_seeds=2) == {}

    spread = {"rotated": {"truth_ari_mean": 0.47}, "hu_statistics": {"truth_ari_mean": 0.42}, "rotated_ahead": 4}
    truth = {"rotated": {"ari": 0.40}, "hu_statistics": {"ari": 0.42}}
    goals = tissue_goals({"truth_agreement": truth, "seed_spread": spread})
    assert goals["truth_ari_at_least_hu_statistics"] is False
    assert goals["truth_ari_at_least_hu_statistics_over_seeds"] is True
    spread["hu_statistics"]["truth_ari_mean"] = 0.48
    assert tissue_goals({"truth_agreement": truth, "seed_spread": spread})[
        "truth_ari_at_least_hu_statistics_over_seeds"] is False
