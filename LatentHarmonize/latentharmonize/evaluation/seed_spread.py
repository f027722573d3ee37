"""Truth and consistency of the refitted clusters over several mixture seeds.

``evaluate`` fits each representation's clusters once, at its seed: a seeded subsample of training latents and a
seeded mixture. One such fit is one draw. On the phantom the rotated clusters' agreement with the true tissue moved
from 0.40 to 0.50 between seeds while the ``hu_statistics`` reference's stayed within 0.02, so the tissue goal read
at one seed said more about the draw than about the representation
(docs/experiments/2026-12-05-mixture-seed-spread.md). Here the pair the tissue goal compares is refitted at
``seed, seed + 1, ...``, each with its own training subsample and mixture seed, as a fresh ``evaluate --seed`` would,
and measured on the held-out scans: truth ARI and consistency ARI per seed, their means, and the seeds at which
rotated is ahead.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Dict, List, Optional

import numpy as np

from .consistency import consistency_per_patient, truth_per_patient
from .encoding import ScanLatents, training_rows
from .representations import refit_clusters, training_acquisition_covariance, training_naming_statistics

SPREAD_NAMES = ("rotated", "hu_statistics")  # the pair of the tissue goal
SPREAD_HEAD = ["representation", "truth ARI by seed", "mean", "consistency ARI by seed", "mean"]


def seed_spread(funcs: Dict[str, Callable], evals: List[ScanLatents], train: List[ScanLatents], budget: int,
                n_clusters: int, seed: int, n_seeds: int, recipes: Optional[dict] = None) -> dict:
    """Per representation of :data:`SPREAD_NAMES` in ``funcs``: ``seeds``, ``truth_ari`` and ``consistency_ari`` (the
    held-out scans' means over patients, one per seed) and their ``*_mean``; ``rotated_ahead`` counts the seeds at
    which rotated's truth ARI is at least ``hu_statistics``'. The first seed is the run's own fit: the labels the
    scans already carry; ``recipes``: how a representation refits, where not by
    :func:`.representations.refit_clusters` (:func:`.representations.cluster_recipes`). Empty when the held-out
    scans have no truth or ``funcs`` holds neither representation."""
    names = [n for n in SPREAD_NAMES if n in funcs]
    if not names or any(s.truth is None for s in evals):
        return {}
    seeds = [seed + i for i in range(n_seeds)]
    widening = {n: training_acquisition_covariance(train, [funcs[n](s) for s in train]) for n in names}
    out = {n: {"seeds": seeds, "truth_ari": [], "consistency_ari": []} for n in names}
    for s in seeds:
        labelled = evals if s == seed else _refit(funcs, names, evals, train, budget, n_clusters, s, widening,
                                                  recipes or {})
        for n in names:
            out[n]["truth_ari"].append(float(np.mean([r["ari"] for r in truth_per_patient(labelled, n)])))
            out[n]["consistency_ari"].append(float(np.mean([r["ari"] for r in consistency_per_patient(labelled, [n])[n]])))
    for n in names:
        for measure in ("truth_ari", "consistency_ari"):
            out[n][f"{measure}_mean"] = float(np.mean(out[n][measure]))
    if len(names) == 2:
        rotated, reference = (out[n]["truth_ari"] for n in SPREAD_NAMES)
        out["rotated_ahead"] = int(sum(r >= h for r, h in zip(rotated, reference)))
    return out


def _refit(funcs, names, evals, train, budget, n_clusters, seed, widening, recipes) -> List[ScanLatents]:
    """Copies of ``evals`` labelled by each representation's clusters refitted at ``seed`` (the scans keep theirs)."""
    rows = training_rows(train, budget, seed)
    stats = training_naming_statistics(train, rows)
    labels: Dict[str, list] = {}
    for n in names:
        f = funcs[n]
        features = np.concatenate([f(train[i])[r] for i, r in rows.items()])
        clusters = recipes.get(n, refit_clusters)(features, stats, n_clusters, seed, widening[n])
        labels[n] = [np.asarray(clusters.predict(f(s))) for s in evals]
    return [replace(s, labels={n: labels[n][i] for n in names}) for i, s in enumerate(evals)]


def spread_rows(metrics: dict) -> List[List[str]]:
    """Rows of the seed-spread table (empty without one)."""
    spread = metrics.get("seed_spread", {})
    return [[n, " / ".join(f"{v:.3f}" for v in spread[n]["truth_ari"]), f"{spread[n]['truth_ari_mean']:.3f}",
             " / ".join(f"{v:.3f}" for v in spread[n]["consistency_ari"]), f"{spread[n]['consistency_ari_mean']:.3f}"]
            for n in SPREAD_NAMES if n in spread]


def spread_caption(metrics: dict) -> str:
    """One sentence: the seeds, and at how many rotated's truth ARI is at least the reference's."""
    spread = metrics.get("seed_spread", {})
    if not spread:
        return ""
    seeds = next(v["seeds"] for k, v in spread.items() if k in SPREAD_NAMES)
    ahead = (f" Rotated's truth ARI is at least hu_statistics' at {spread['rotated_ahead']} of {len(seeds)} seeds."
             if "rotated_ahead" in spread else "")
    return f"Refitted at mixture seeds {', '.join(map(str, seeds))} (the first is the run's own fit).{ahead}"
