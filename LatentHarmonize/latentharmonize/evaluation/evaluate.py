"""``latentharmonize evaluate``: the paper's claim measured on held-out scans, against baselines.

For every representation of the lung patches

- ``entangled``: the encoder latent as it is; ``rotated``: its biological coordinates (bundle rotation);
- ``combat``, ``harmony``, ``leace``: the entangled latent harmonized by :mod:`.harmonizers`;
- ``histogram_matching``: the latent of the scan after lung histogram matching to the training scans;
- ``unoranic``: the anatomy latent of a model trained with ``--encoder unoranic`` (``--unoranic DIR``);
- ``hu_statistics``: no encoder at all, the standardised HU quantiles and threshold shares of each patch
  (:func:`latentharmonize.densitometry.patch_hu_statistics`), averaged over the same context as the latents: the
  reference that says whether a learned representation finds more than the patch's histogram;
- ``hu_threshold_classes``: no clustering, each patch's mean lung HU (context-averaged) in four classes at -950,
  -700 and -300 HU: the threshold baseline at the clusters' own scale (consistency and truth only),

tissue clusters are fitted the same way (``TissueClusters``, the bundle's K, same seed) on latents of
the TRAINING scans, and every harmonizer is fitted on the training scans only; the held-out scans
are then labelled and compared:

1. consistency: labels of one patient's acquisitions at the same physical lattice points (the
   model grid makes lattices coincide), ARI / NMI / matched Dice per acquisition pair, averaged per
   patient, mean and bootstrap 95 % CI over patients;
2. agreement with the phantom truth (tissue label at each patch centre), where the cohort has it;
3. probe: cross-validated linear classifier of the acquisition on held-out latents (folds never
   split a patient), and chance;
4. survival: per-patient composition (fraction of patches per cluster, averaged over the patient's
   scans) -> penalised Cox, cross-validated C-index; HU densitometry (LAA950, HAA700, MLD, Perc15)
   and, on the phantom, the true composition as upper bound. Survival uses ``--survival-cohort`` when given
   (e.g. a multi-site cohort, each patient scanned once on whatever scanner: the situation where harmonization
   matters), else the patients of both cohorts: the clusters and harmonizers never see the outcome, and the
   Cox model is cross-validated;
5. tissue read-out (phantom): a linear classifier of the true tissue, fitted on each representation's training
   patches, labels the held-out patches; its balanced accuracy and the survival C-index of the compositions it
   gives say how much tissue and outcome information the representation holds, whatever the clusters find;
6. tissue (:mod:`.tissue`): emphysema recall into each representation's low-attenuation
   cluster and the abnormal tissues' share outside its normal cluster, per acquisition; the low-attenuation
   cluster's share of the lung and LAA-950 between soft and sharp reconstructions of the same patient; and
   (:mod:`.seed_spread`, phantom) the truth and consistency ARI of ``rotated`` and ``hu_statistics`` refitted at
   several mixture seeds, since one fit is one draw;
7. pictures: consistency bars, label maps of one patient, Kaplan-Meier, PCA of latents by
   acquisition before and after rotation, decoded traversals along the top technical and
   biological directions.

The representations are the entries of :data:`.representations.REGISTRY` (how to add one: that module's docstring).
Outputs in ``--out``: ``metrics.json``, ``report.html`` (figures embedded) and the PNG figures.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pandas as pd

from ..atomic import StagedOutput
from ..bundle import load_bundle
from ..cohort import read_cohort
from ..errors import InputError
from ..progress import Progress
from .cluster_stability import cluster_stability
from .consistency import by_patient, consistency, consistency_per_patient, probe, truth_agreement
from .encoding import Encoders, ScanLatents, encode_held_out, encode_training, training_rows
from .figures import (plot_consistency, plot_km, plot_label_maps, plot_latent_pca, plot_risk_reproducibility,
                      plot_traversals)
from .goals import goal_check, paired_versus, relative_gains
from .report import render_report
from .representations import (Training, assign_clusters, cluster_recipes, fit_features, fit_image_harmonizers,
                              label_with_baselines, own_clusters, patch_statistics)
from .seed_spread import seed_spread
from .survival_comparison import (outcome_redraws, patient_profiles, risk_reproducibility, survival_comparison,
                                  tissue_readout)
from .tissue import kernel_robustness, mask_holds, reference_clusters, tissue_recall

FIGURES = ("consistency.png", "label_maps.png", "km.png", "risk_reproducibility.png", "latent_pca.png",
           "traversals.png")
OUTCOME_FIGURES = ("km.png", "risk_reproducibility.png")  # drawn only when there are time and event columns


@dataclass
class EvalConfig:
    seed: int = 0
    quick: bool = False
    train_latents: int = 20000     # training latents (all scans together) that clusters and harmonizers are fitted on
    probe_samples: int = 4000      # held-out latents the acquisition probe uses
    n_boot: int = 1000
    outcome_draws: int = 300       # phantom only: fresh outcomes drawn for the survival patients (outcome_redraws)
    mixture_seeds: int = 5         # phantom only: seeds at which the tissue goal's pair is refitted (seed_spread)
    max_train_patients: Optional[int] = None
    max_eval_patients: Optional[int] = None
    max_survival_patients: Optional[int] = None

    @classmethod
    def for_run(cls, seed: int, quick: bool) -> "EvalConfig":
        if quick:  # a smoke run: few patients and latents, enough to exercise every step
            return cls(seed=seed, quick=True, train_latents=3000, probe_samples=1500, n_boot=200, outcome_draws=30,
                       mixture_seeds=2, max_train_patients=4, max_eval_patients=3, max_survival_patients=8)
        return cls(seed=seed)


@dataclass
class Encoded:
    """The encoded and labelled scans of one run, and what labelled them."""

    train: List[ScanLatents]
    evals: List[ScanLatents]
    survivors: List[ScanLatents]    # scans of the survival cohort (empty without one)
    rows: Dict[int, np.ndarray]     # fitting rows of each training scan
    funcs: dict                     # clustered representation -> features of a scan
    compared: List[str]             # clustered representations, then label baselines
    n_clusters: int
    recipes: dict                   # clustered representation -> how its clusters are refitted
    cluster_names: dict             # clustered representation -> name of label 1, 2, ..., where its clusters keep names


def select_patients(cohort: pd.DataFrame, limit: Optional[int]) -> pd.DataFrame:
    if limit is None:
        return cohort
    keep = sorted(cohort["patient"].astype(str).unique())[:limit]
    return cohort[cohort["patient"].astype(str).isin(keep)]


def _training_cohort_path(bundle, train_cohort) -> Path:
    if train_cohort is not None:
        return Path(train_cohort)
    recorded = bundle.manifest.get("training", {}).get("cohort")
    if not recorded:
        raise InputError("The model bundle does not record its training cohort; give it with --train-cohort TRAIN.csv.")
    return Path(recorded)


def _read_survival_cohort(survival_cohort, cfg: EvalConfig) -> Optional[pd.DataFrame]:
    if survival_cohort is None:
        return None
    rows = select_patients(read_cohort(survival_cohort), cfg.max_survival_patients)
    if not {"time", "event"} <= set(rows.columns):
        raise InputError(f"The survival cohort {survival_cohort} has no time and event columns; add them "
                         "(years to death or censoring, and 1 = death observed, 0 = censored).")
    return rows


def _check_disjoint(train_rows: pd.DataFrame, held_out: Dict[str, Optional[pd.DataFrame]]) -> None:
    for what, rows in held_out.items():
        overlap = set() if rows is None else set(map(str, rows["image"])) & set(map(str, train_rows["image"]))
        if overlap:
            raise InputError(f"{len(overlap)} {what} scans are also training scans (e.g. {sorted(overlap)[0]}); "
                             "evaluate on patients not used in training.")


def _encode(encoders: Encoders, train_rows, held_out: dict, seed: int, progress: Progress) -> tuple:
    """Encode the training scans (fitting the image-level harmonizers on them), then the held-out cohorts."""
    train, transforms = encode_training(train_rows, encoders, lambda samples: fit_image_harmonizers(samples, seed),
                                        progress)
    encoded = encode_held_out(held_out, encoders, transforms, progress)
    return train, encoded["eval"], encoded["survival"]


def _label(bundle, train, evals, survivors, cfg: EvalConfig, progress: Progress, skipped: dict) -> Encoded:
    """Fit each representation on the training scans and label every scan with its clusters (or baseline labels)."""
    rows = training_rows(train, cfg.train_latents, cfg.seed)
    training = Training(bundle, train, rows, cfg.seed)
    funcs = fit_features(training, skipped, {s.acquisition for s in evals + survivors})
    n_clusters = int(bundle.clusters.n_components_)
    recipes = cluster_recipes(training, funcs)
    cluster_names = assign_clusters(funcs, train + evals + survivors, train, rows, n_clusters, cfg.seed, progress,
                                    skipped, own_clusters(training, funcs), recipes)
    # the paper's pair (rotated against entangled) is always measured; another representation whose components all
    # got one name is not, since a constant map agrees with itself across scanners
    compared = [n for n in funcs if n in ("rotated", "entangled") or not _one_cluster(n, train, skipped)]
    compared += label_with_baselines(train + evals + survivors)
    return Encoded(train, evals, survivors, rows, funcs, compared, n_clusters, recipes, cluster_names)


def _one_cluster(name: str, train, skipped: dict) -> bool:
    """Whether every component of a representation got the same name, so that its map is one cluster (recorded in
    ``skipped``)."""
    if len(np.unique(np.concatenate([s.labels[name] for s in train]))) > 1:
        return False
    skipped[f"clusters:{name}"] = ("all its mixture components got one name from their HU profile: one cluster, "
                                   "left out of the cluster measures")
    return True


def _measure(e: Encoded, cfg: EvalConfig, progress: Progress, skipped: dict) -> tuple:
    """Every measure of the labelled scans; returns (metrics, survival table, cross-validated risks,
    reproducibility data for its figure)."""
    seed, names = cfg.seed, [n for n in e.funcs if n in e.compared]  # representations with a cluster map
    per_patient = consistency_per_patient(e.evals, e.compared)
    references = reference_clusters(e.train, e.compared)
    metrics: dict = {
        "consistency": consistency(per_patient, cfg.n_boot, seed),
        "cluster_stability": cluster_stability(e.evals, e.train, e.compared, e.cluster_names),
        "truth_agreement": truth_agreement(e.evals, e.compared, cfg.n_boot, seed),
        "probe": probe(e.evals, e.funcs, cfg.probe_samples, seed),
        "tissue_recall": tissue_recall(e.evals, references),
        "tissue_in_mask": mask_holds(e.evals),
        "kernel_robustness": kernel_robustness(e.evals, references),
        "seed_spread": seed_spread({n: f for n, f in e.funcs.items() if n in e.compared}, e.evals, e.train,
                                   cfg.train_latents, e.n_clusters, seed, cfg.mixture_seeds, e.recipes),
    }
    progress(80, "metrics", "consistency, truth agreement and probe done")
    table = patient_profiles(e.survivors or e.train + e.evals, list(e.funcs), e.n_clusters)
    metrics["survival"], risks = survival_comparison(table, names, seed, cfg.n_boot, skipped)
    metrics["rotated_versus"] = paired_versus("rotated", per_patient, table, risks, cfg.n_boot, seed)
    if "bundle_clusters" in per_patient:  # the map analyze paints, judged against the same baselines
        metrics["bundle_versus"] = paired_versus("bundle_clusters", per_patient, table, risks, cfg.n_boot, seed)
    metrics["survival_redraws"] = outcome_redraws(table, risks, cfg.outcome_draws, seed)
    metrics["tissue_readout"] = tissue_readout(e.evals, table, list(e.funcs), seed, cfg.n_boot, skipped)
    metrics["risk_reproducibility"], reproducibility = risk_reproducibility(table, e.evals, names, e.n_clusters,
                                                                            cfg.n_boot, seed, skipped)
    for other, diff in reproducibility.get("versus", {}).items():
        metrics["rotated_versus"].setdefault(other, {})["risk_icc"] = diff
    metrics["relative_gain"] = relative_gains(metrics["consistency"])
    metrics["goal"] = goal_check(metrics)
    return metrics, table, risks, reproducibility


def _describe(metrics: dict, bundle, model, e: Encoded, table, cfg: EvalConfig, skipped: dict, survival_cohort) -> None:
    """The run's facts beside the measures: model, sizes, seed, what was skipped."""
    metrics.update({
        "model": {"path": str(model or "default"), "sha256": bundle.sha256, "n_technical": int(bundle.rotation.n_technical_)},
        "n_clusters": e.n_clusters, "seed": cfg.seed, "quick": cfg.quick, "skipped": skipped,
        "n_train_scans": len(e.train), "n_eval_scans": len(e.evals), "n_eval_patients": len(by_patient(e.evals)),
        "n_survival_patients": int(len(table)),
        "survival_population": (f"survival cohort {survival_cohort} ({len(e.survivors)} scans)" if e.survivors else
                                "training and evaluation patients") + " (outcome-free clustering, cross-validated Cox)",
    })


def _draw_figures(staged, figures: List[str], metrics: dict, e: Encoded, bundle, table, risks, reproducibility,
                  cfg: EvalConfig, skipped: dict) -> None:
    plot_consistency(metrics["consistency"], metrics["probe"], staged.path("consistency.png"))
    example = next(v for v in by_patient(e.evals).values() if len(v) >= 2)
    plot_label_maps(example, all(s.truth is not None for s in example), staged.path("label_maps.png"))
    metrics["km"] = plot_km(table, risks, staged.path("km.png")) if "km.png" in figures else {}
    if "risk_reproducibility.png" in figures:
        plot_risk_reproducibility(metrics["risk_reproducibility"], reproducibility,
                                  staged.path("risk_reproducibility.png"), skipped.get("risk_reproducibility", ""))
    plot_latent_pca(e.evals, bundle, cfg.probe_samples, cfg.seed, staged.path("latent_pca.png"))
    metrics["traversal_sd"] = plot_traversals(bundle, e.train, e.rows, staged.path("traversals.png"))


def evaluate(cohort_csv, out_dir, model=None, train_cohort=None, bundles: Optional[dict] = None, seed: int = 0,
             quick: bool = False, overwrite: bool = False, device: str = "cpu", progress: Progress | None = None,
             survival_cohort=None) -> dict:
    """Run the whole evaluation and write ``metrics.json``, ``report.html`` and figures to ``out_dir``.

    ``bundles``: the bundle folder of each other-encoder representation by name (e.g. ``{"unoranic": DIR}``);
    ``survival_cohort``: a cohort CSV (with time and event) whose patients the survival comparison uses instead of
    the training and evaluation patients; it must share no scan with the training cohort.
    """
    progress = progress or Progress(quiet=True)
    cfg = EvalConfig.for_run(seed, quick)
    t0 = time.perf_counter()
    held_out = {"eval": select_patients(read_cohort(cohort_csv), cfg.max_eval_patients),
                "survival": _read_survival_cohort(survival_cohort, cfg)}
    outcomes = held_out["survival"] if held_out["survival"] is not None else held_out["eval"]
    figures = [f for f in FIGURES if f not in OUTCOME_FIGURES or {"time", "event"} <= set(outcomes.columns)]
    staged = StagedOutput(out_dir, ["metrics.json", "report.html", *figures], overwrite=overwrite)  # refuse early
    bundle = load_bundle(model)
    others = {name: load_bundle(path) for name, path in (bundles or {}).items()}
    encoders = Encoders(bundle, others, device, patch_statistics())
    train_rows = select_patients(read_cohort(_training_cohort_path(bundle, train_cohort)), cfg.max_train_patients)
    _check_disjoint(train_rows, {"evaluation": held_out["eval"], "survival": held_out["survival"]})
    train, evals, survivors = _encode(encoders, train_rows, held_out, seed, progress)
    t_encode = time.perf_counter() - t0
    skipped: Dict[str, str] = {}
    encoded = _label(bundle, train, evals, survivors, cfg, progress, skipped)
    metrics, table, risks, reproducibility = _measure(encoded, cfg, progress, skipped)
    _describe(metrics, bundle, model, encoded, table, cfg, skipped, survival_cohort)
    progress(85, "figures", "drawing figures")
    with staged:
        _draw_figures(staged, figures, metrics, encoded, bundle, table, risks, reproducibility, cfg, skipped)
        metrics["timings_s"] = {"encode": round(t_encode, 1), "total": round(time.perf_counter() - t0, 1)}
        staged.path("metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True, default=float) + "\n")
        staged.path("report.html").write_text(render_report(metrics, staged, figures), encoding="utf-8")
    progress(100, "done", f"wrote metrics.json, report.html and {len(figures)} figures to {out_dir}")
    return metrics
