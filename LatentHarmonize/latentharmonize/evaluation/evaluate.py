"""``latentharmonize evaluate``: the paper's claim measured on held-out scans, against baselines.

For every representation of the lung patches

- ``entangled``: the encoder latent as it is; ``rotated``: its biological coordinates (bundle rotation);
- ``combat``, ``harmony``, ``leace``: the entangled latent harmonized by :mod:`latentharmonize.baselines`;
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
6. tissue (:mod:`latentharmonize.evaluation_tissue`): emphysema recall into each representation's low-attenuation
   cluster and the abnormal tissues' share outside its normal cluster, per acquisition; the low-attenuation
   cluster's share of the lung and LAA-950 between soft and sharp reconstructions of the same patient;
7. pictures: consistency bars, label maps of one patient, Kaplan-Meier, PCA of latents by
   acquisition before and after rotation, decoded traversals along the top technical and
   biological directions.

Outputs in ``--out``: ``metrics.json``, ``report.html`` (figures embedded) and the PNG figures.
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import pandas as pd

from .. import options
from ..atomic import StagedOutput
from ..errors import InputError
from .tissue import (KERNEL_HEAD, PATCH_MEAN_HU, RECALL_HEAD, SETTING_COLUMNS, THRESHOLD_BASELINE, kernel_robustness,
                                kernel_rows, patch_mean_hu, recall_rows, reference_clusters, threshold_classes,
                                tissue_recall)
from .metrics import METRICS, label_agreement, mean_pairwise_agreement, paired_difference, summarize
from ..progress import Progress

REPRESENTATIONS = ("entangled", "rotated", "combat", "harmony", "leace", "histogram_matching", "unoranic",
                   "hu_statistics")
# Compared and reported like the others, but not a harmonization baseline of the goal check.
REFERENCE_REPRESENTATIONS = ("hu_statistics",)
# Labels without a representation to cluster: compared on consistency and truth, not probed, no survival profile.
LABEL_BASELINES = (THRESHOLD_BASELINE,)
PAPER_GAIN_PERCENT = {"ari": 19.01, "nmi": 16.85, "dice": 12.39}
FIGURES = ("consistency.png", "label_maps.png", "km.png", "risk_reproducibility.png", "latent_pca.png",
           "traversals.png")
OUTCOME_FIGURES = ("km.png", "risk_reproducibility.png")  # drawn only when there are time and event columns
CLINICAL = ("time", "event", "age", "sex", "fvc")
HU_THRESHOLD_FEATURES = ("laa950", "haa700", "mld", "perc15")


@dataclass
class EvalConfig:
    seed: int = 0
    quick: bool = False
    train_latents: int = 20000     # training latents (all scans together) that clusters and harmonizers are fitted on
    probe_samples: int = 4000      # held-out latents the acquisition probe uses
    n_boot: int = 1000
    outcome_draws: int = 300       # phantom only: fresh outcomes drawn for the survival patients (outcome_redraws)
    max_train_patients: Optional[int] = None
    max_eval_patients: Optional[int] = None
    max_survival_patients: Optional[int] = None
    device: str = "cpu"

    @classmethod
    def for_run(cls, seed: int, quick: bool, device: str = "cpu") -> "EvalConfig":
        if quick:  # a smoke run: few patients and latents, enough to exercise every step
            return cls(seed=seed, quick=True, train_latents=3000, probe_samples=1500, n_boot=200, outcome_draws=30,
                       max_train_patients=4, max_eval_patients=3, max_survival_patients=8, device=device)
        return cls(seed=seed, device=device)


@dataclass
class ScanLatents:
    """One scan, encoded: latents per source at its valid lattice points, truth and densitometry."""

    patient: str
    acquisition: str
    split: str                      # "train" or "eval"
    keys: np.ndarray                # int64 [n, 3]: physical micrometres of each patch centre
    positions: np.ndarray           # int [n, 3] (z, y, x) lattice indices
    latents: Dict[str, np.ndarray]  # source ("entangled", "histogram_matching", "unoranic", "hu_statistics") -> [n, d]
    truth: Optional[np.ndarray]     # [n] phantom tissue label at each centre (0: none), or None
    densitometry: Dict[str, float]
    clinical: Dict[str, object]
    labels: Dict[str, np.ndarray] = field(default_factory=dict)  # representation -> cluster label [n]
    readout: Dict[str, np.ndarray] = field(default_factory=dict)  # representation -> read-out tissue label [n]
    setting: Dict[str, object] = field(default_factory=dict)  # acquisition columns of the cohort row (kernel, ...)


# ----------------------------------------------------------------------------- loading and encoding
def _load_volumes(row: pd.Series, spec):
    """One cohort row on the model grid: HU, lung, grid, truth (or None), and densitometry of the native CT."""
    from ..densitometry import lung_hu_indices
    from ..scans import read_scan, scan_on_grid

    ct, lungs = read_scan(row)
    scan = scan_on_grid(row, ct, lungs, spec)
    return scan.hu, scan.lung, scan.grid, scan.truth, lung_hu_indices(ct, lungs)


def _truth_at_centres(truth: np.ndarray, positions: np.ndarray, spec) -> np.ndarray:
    from ..patches import centre_pixels

    return truth[centre_pixels(positions, spec)].astype(np.int64)


def _clinical(row: pd.Series) -> Dict[str, object]:
    keep = [c for c in row.index if c in CLINICAL or str(c).startswith("frac_")]
    return {c: row[c] for c in keep}


class Encoders:
    """The bundle encoder (and the optional unORANIC anatomy encoder) with their patch specs."""

    def __init__(self, bundle, unoranic=None, device: str = "cpu"):
        from ..patches import resolve_device

        self.bundle = bundle
        self.unoranic = unoranic
        self.device = resolve_device(device)
        self.model = bundle.encoder(device)
        self.unoranic_model = unoranic.encoder(device) if unoranic is not None else None

    @property
    def spec(self):
        return self.bundle.spec

    def encode(self, hu, lung, grid, which: str = "bundle"):
        from ..patches import encode_dense

        if which == "unoranic":
            return encode_dense(self.unoranic_model, hu, lung, grid, self.unoranic.spec, device=self.device)
        return encode_dense(self.model, hu, lung, grid, self.spec, device=self.device)


def _encode_row(row: pd.Series, split: str, encoders: Encoders, matcher=None) -> tuple:
    """Encode one scan under every source; returns (ScanLatents, regular sample of its lung HU)."""
    from ..patches import aggregate_context, lattice_hu_statistics, point_keys

    hu, lung, grid, truth, dens = _load_volumes(row, encoders.spec)
    dense = encoders.encode(hu, lung, grid)
    if len(dense.latents) == 0:
        raise InputError(f"Scan {row['image']} has no patch inside the lung; check its lung mask.")
    radius = encoders.spec.context_radius
    statistics = replace(dense, latents=lattice_hu_statistics(hu, lung, dense.positions, encoders.spec))
    mean_hu = replace(dense, latents=patch_mean_hu(hu, lung, dense.positions, encoders.spec))
    latents = {"entangled": dense.latents, "hu_statistics": aggregate_context(statistics, radius).latents,
               PATCH_MEAN_HU: aggregate_context(mean_hu, radius).latents}
    if encoders.unoranic is not None:
        latents["unoranic"] = _align_rows(encoders.encode(hu, lung, grid, "unoranic"), dense)
    if matcher is not None:
        latents["histogram_matching"] = encoders.encode(matcher.transform(hu, lung), lung, grid).latents
    scan = ScanLatents(patient=str(row["patient"]), acquisition=str(row["acquisition"]), split=split,
                       keys=point_keys(dense.lattice, dense.positions), positions=dense.positions, latents=latents,
                       truth=None if truth is None else _truth_at_centres(truth, dense.positions, encoders.spec),
                       densitometry=dens, clinical=_clinical(row),
                       setting={c: row[c] for c in SETTING_COLUMNS if c in row.index})
    values = hu[lung]
    return scan, values[:: max(values.size // 50000, 1)]


def _matched_latents(row: pd.Series, encoders: Encoders, matcher) -> np.ndarray:
    """Latents of a scan after histogram matching (same lattice points as its entangled latents)."""
    hu, lung, grid, _, _ = _load_volumes(row, encoders.spec)
    return encoders.encode(matcher.transform(hu, lung), lung, grid).latents


def _align_rows(other, reference) -> np.ndarray:
    """Rows of ``other``'s latents at ``reference``'s positions (both encoders use one lattice)."""
    index = {tuple(p): i for i, p in enumerate(other.positions.tolist())}
    try:
        rows = [index[tuple(p)] for p in reference.positions.tolist()]
    except KeyError:
        raise InputError("The unORANIC bundle uses a different patch lattice than the evaluated bundle; "
                         "train both with the same patch spec.") from None
    return other.latents[rows]


# ----------------------------------------------------------------------------- representations
def _training_rows(scans: List[ScanLatents], budget: int, seed: int) -> Dict[int, np.ndarray]:
    """A seeded, equal share of each training scan's latents (the fitting set of clusters and harmonizers)."""
    rng = np.random.default_rng(seed)
    share = max(budget // max(len(scans), 1), 1)
    return {i: np.sort(rng.choice(len(s.keys), size=min(share, len(s.keys)), replace=False)) for i, s in enumerate(scans)}


def _stack(scans: List[ScanLatents], rows: Dict[int, np.ndarray], source: str):
    X = np.concatenate([scans[i].latents[source][r] for i, r in rows.items()]).astype(np.float64)
    batch = np.concatenate([np.full(len(r), scans[i].acquisition) for i, r in rows.items()])
    return X, batch


def representation_functions(bundle, train: List[ScanLatents], rows, seed: int, sources: set, skipped: dict) -> Dict[str, Callable]:
    """Fit every baseline on the training latents; each returned function maps (scan) -> features."""
    from sklearn.preprocessing import StandardScaler

    from .harmonizers import ComBatHarmonizer, HarmonyHarmonizer, LeaceHarmonizer

    X, batch = _stack(train, rows, "entangled")
    funcs: Dict[str, Callable] = {
        "entangled": lambda s: s.latents["entangled"],
        "rotated": lambda s: bundle.rotation.cluster_features(s.latents["entangled"]),
    }
    harmonizers = {"combat": ComBatHarmonizer(), "harmony": HarmonyHarmonizer(random_state=seed), "leace": LeaceHarmonizer()}
    for name, h in harmonizers.items():
        h.fit(X, batch)
        funcs[name] = (lambda fitted: lambda s: fitted.transform(s.latents["entangled"], np.full(len(s.keys), s.acquisition)))(h)
    for source in ("histogram_matching", "unoranic"):
        if source in sources:
            funcs[source] = (lambda src: lambda s: s.latents[src])(source)
    # every scan has its HU statistics (_encode_row); quantiles in HU and shares in [0, 1]: one scale for k-means
    scaler = StandardScaler().fit(_stack(train, rows, "hu_statistics")[0])
    funcs["hu_statistics"] = lambda s: scaler.transform(s.latents["hu_statistics"])
    if "unoranic" not in sources:
        skipped["unoranic"] = "no unORANIC bundle given (--unoranic DIR)"
    return {name: funcs[name] for name in REPRESENTATIONS if name in funcs}


def fit_tissue_readout(features: np.ndarray, truth: np.ndarray, seed: int):
    """Class-balanced logistic regression of the true tissue (labels > 0) on a representation's features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    lung = truth > 0
    if len(np.unique(truth[lung])) < 2:
        raise InputError("The training patches hold fewer than two true tissue classes; the tissue read-out needs more "
                         "(diseased) training patients.")
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, class_weight="balanced", random_state=seed))
    return model.fit(features[lung], truth[lung])


def assign_clusters(funcs: Dict[str, Callable], scans: List[ScanLatents], train: List[ScanLatents], rows,
                    n_clusters: int, seed: int, progress: Progress, skipped: dict) -> None:
    """Fit one ``TissueClusters`` per representation on the training rows and label every scan with it; where the
    training scans carry the phantom truth, also fit the tissue read-out and store its labels in ``readout``."""
    from ..clusters import TissueClusters

    with_truth = all(s.truth is not None for s in train)
    for k, (name, f) in enumerate(funcs.items()):
        features = np.concatenate([f(train[i])[r] for i, r in rows.items()])
        clusters = TissueClusters(n_clusters=n_clusters, random_state=seed).fit(features)
        readout = None
        if with_truth:
            try:
                readout = fit_tissue_readout(features, np.concatenate([train[i].truth[r] for i, r in rows.items()]), seed)
            except InputError as err:
                skipped["tissue_readout"] = str(err)
        for s in scans:
            scan_features = f(s)
            s.labels[name] = np.asarray(clusters.predict(scan_features))
            if readout is not None:
                s.readout[name] = readout.predict(scan_features).astype(np.int64)
        progress(55 + 15 * (k + 1) / len(funcs), "clusters", f"{name}: {n_clusters} clusters")


# ----------------------------------------------------------------------------- measurements
def _by_patient(scans: List[ScanLatents]) -> Dict[str, List[ScanLatents]]:
    """Scans grouped per patient; keys are ``split:patient`` since two cohorts may reuse patient ids."""
    out: Dict[str, List[ScanLatents]] = {}
    for s in scans:
        out.setdefault(f"{s.split}:{s.patient}", []).append(s)
    return {p: sorted(v, key=lambda s: s.acquisition) for p, v in sorted(out.items())}


def _common_rows(scans: List[ScanLatents]) -> List[np.ndarray]:
    """For each scan, the row indices of the lattice points that every scan of the patient has, in one order."""
    common = scans[0].keys
    for s in scans[1:]:
        common = common[_rows_of(common, s.keys) >= 0]
    return [_rows_of(common, s.keys) for s in scans]


def _rows_of(query: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Row of each ``query`` key in ``keys`` (-1 where absent)."""
    lookup = {tuple(k): i for i, k in enumerate(keys.tolist())}
    return np.array([lookup.get(tuple(k), -1) for k in query.tolist()], dtype=np.int64)


def consistency_per_patient(eval_scans: List[ScanLatents], names) -> Dict[str, list]:
    """Per representation, one record per patient: mean pairwise ARI/NMI/Dice across the patient's acquisitions
    at the lung locations they share (``common_points`` on every record)."""
    per_patient: Dict[str, list] = {n: [] for n in names}
    for patient, scans in _by_patient(eval_scans).items():
        if len(scans) < 2:
            continue
        rows = _common_rows(scans)
        if len(rows[0]) == 0:
            continue
        for n in names:
            record = mean_pairwise_agreement([s.labels[n][r] for s, r in zip(scans, rows)])
            per_patient[n].append({**record, "common_points": float(len(rows[0]))})
    if not per_patient[names[0]]:
        raise InputError("No evaluation patient has two acquisitions sharing lung locations; the evaluation cohort "
                         "needs each patient scanned under at least two acquisition settings.")
    return per_patient


def consistency(per_patient: Dict[str, list], n_boot: int, seed: int) -> dict:
    """Mean and bootstrap CI over patients of each representation's consistency records."""
    out = {}
    for n, records in per_patient.items():
        out[n] = summarize([{m: r[m] for m in METRICS} for r in records], n_boot=n_boot, seed=seed)
        out[n]["mean_common_points"] = float(np.mean([r["common_points"] for r in records]))
    return out


def rotated_versus(per_patient: Dict[str, list], table: pd.DataFrame, risks: dict, n_boot: int, seed: int) -> dict:
    """Rotated minus every other representation (and feature set), paired over the same patients, with 95 % CIs:
    consistency ARI/NMI/Dice per evaluation patient, and survival C-index on the same bootstrap resamples.
    A CI that contains 0 means this cohort cannot tell the two apart."""
    from ..survival import c_index_difference

    out: Dict[str, dict] = {}
    for other, records in per_patient.items():
        if other != "rotated":
            out[other] = {m: paired_difference([r[m] for r in per_patient["rotated"]], [r[m] for r in records],
                                               n_boot=n_boot, seed=seed) for m in METRICS}
    if "rotated" in risks:
        for other, risk in risks.items():
            if other != "rotated":
                out.setdefault(other, {})["c_index"] = c_index_difference(
                    table["time"], table["event"], risks["rotated"], risk, n_boot=n_boot, seed=seed)
    return out


def truth_agreement(eval_scans: List[ScanLatents], names, n_boot: int, seed: int) -> dict:
    """ARI/NMI/Dice of each representation's labels against the phantom truth at the patch centres."""
    if any(s.truth is None for s in eval_scans):
        return {}
    out = {}
    for n in names:
        per_patient = []
        for scans in _by_patient(eval_scans).values():
            scores = [label_agreement(s.labels[n][s.truth > 0], s.truth[s.truth > 0]) for s in scans if (s.truth > 0).any()]
            if scores:
                per_patient.append({k: float(np.mean([sc[k] for sc in scores])) for k in scores[0]})
        out[n] = summarize(per_patient, n_boot=n_boot, seed=seed)
    return out


def probe(eval_scans: List[ScanLatents], funcs: Dict[str, Callable], samples: int, seed: int) -> dict:
    """Cross-validated logistic-regression accuracy of the acquisition on held-out latents, folds grouped by patient."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    share = max(samples // len(eval_scans), 2)
    picks = [np.sort(rng.choice(len(s.keys), size=min(share, len(s.keys)), replace=False)) for s in eval_scans]
    y = np.concatenate([np.full(len(p), s.acquisition) for s, p in zip(eval_scans, picks)])
    groups = np.concatenate([np.full(len(p), s.patient) for s, p in zip(eval_scans, picks)])
    n_folds = min(5, len(set(groups)))
    if n_folds < 2 or len(set(y)) < 2:
        raise InputError("The acquisition probe needs at least two patients and two acquisitions in the evaluation cohort.")
    cv = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    out = {}
    for name, f in funcs.items():
        X = np.concatenate([f(s)[p] for s, p in zip(eval_scans, picks)])
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
        out[name] = float(np.mean(cross_val_score(model, X, y, cv=cv, groups=groups)))
    _, counts = np.unique(y, return_counts=True)
    out["chance"] = float(counts.max() / counts.sum())
    return out


def _mean_fractions(label_maps: List[np.ndarray], n_labels: int) -> np.ndarray:
    """Fraction of each label 1..n_labels per scan, averaged over the scans."""
    return np.mean([np.bincount(labels, minlength=n_labels + 1)[1:n_labels + 1] / len(labels) for labels in label_maps], axis=0)


def patient_profiles(scans: List[ScanLatents], names, n_clusters: int) -> pd.DataFrame:
    """One row per patient: cluster fractions per representation (``<rep>:frac_<k>``), read-out tissue fractions
    where there is a read-out (``readout:<rep>:frac_<tissue>``), densitometry, clinical."""
    from ..tissue import TISSUES

    rows = []
    for patient, group in _by_patient(scans).items():
        row: Dict[str, object] = {"patient": patient}
        row.update(group[0].clinical)
        for n in names:
            fractions = _mean_fractions([s.labels[n] for s in group], n_clusters)
            row.update({f"{n}:frac_{k + 1}": float(v) for k, v in enumerate(fractions)})
            if all(n in s.readout for s in group):
                fractions = _mean_fractions([s.readout[n] for s in group], len(TISSUES))
                row.update({f"readout:{n}:frac_{t}": float(v) for t, v in zip(TISSUES, fractions)})
        for key in group[0].densitometry:
            row[key] = float(np.mean([s.densitometry[key] for s in group]))
        rows.append(row)
    return pd.DataFrame(rows)


def _without_reference(table: pd.DataFrame, cols: List[str]) -> List[str]:
    """Composition columns minus the most abundant one (fractions sum to 1, so one is redundant)."""
    reference = table[cols].mean().idxmax()
    return [c for c in cols if c != reference]


def _c_indices(table: pd.DataFrame, feature_sets: Dict[str, List[str]], seed: int, n_boot: int, skipped: dict) -> tuple:
    """Cross-validated Cox C-index with CI per feature set, and the cross-validated risks; a feature set the Cox
    model cannot be fitted on (too few events, no convergence) is recorded in ``skipped``."""
    from ..survival import c_index_with_ci, cross_validated_risk

    out, risks = {}, {}
    for name, cols in feature_sets.items():
        try:
            risks[name] = cross_validated_risk(table, cols, seed=seed)
            out[name] = {**c_index_with_ci(table["time"], table["event"], risks[name], n_boot=n_boot, seed=seed),
                         "features": cols}
        except InputError as err:
            skipped[f"survival:{name}"] = str(err)
    return out, risks


def survival_comparison(table: pd.DataFrame, names, seed: int, n_boot: int, skipped: dict) -> tuple:
    """Cross-validated Cox C-index of each representation's composition, densitometry and true composition."""
    from ..tissue import TISSUES

    if not {"time", "event"} <= set(table.columns):
        return {}, {}
    feature_sets = survival_feature_sets(table, names)
    truth = [f"frac_{t}" for t in TISSUES if f"frac_{t}" in table.columns]
    if truth:
        feature_sets["true_composition"] = truth[1:]  # normal lung is the reference
    return _c_indices(table, feature_sets, seed, n_boot, skipped)


def survival_feature_sets(table: pd.DataFrame, names) -> Dict[str, List[str]]:
    """The Cox covariates of each representation (its cluster composition) and of the HU thresholds."""
    feature_sets = {n: _without_reference(table, [c for c in table.columns if c.startswith(f"{n}:frac_")]) for n in names}
    feature_sets["hu_thresholds"] = list(HU_THRESHOLD_FEATURES)
    return feature_sets


def scan_profiles(scans: List[ScanLatents], names, n_clusters: int) -> pd.DataFrame:
    """One row per scan: its own cluster fractions per representation (``<rep>:frac_<k>``) and densitometry."""
    rows = []
    for s in scans:
        row: Dict[str, object] = {"patient": s.patient, "acquisition": s.acquisition, **s.densitometry}
        for n in names:
            row.update({f"{n}:frac_{k + 1}": float(v) for k, v in enumerate(_mean_fractions([s.labels[n]], n_clusters))})
        rows.append(row)
    return pd.DataFrame(rows)


def risk_reproducibility(table: pd.DataFrame, eval_scans: List[ScanLatents], names, n_clusters: int, n_boot: int,
                         seed: int, skipped: dict) -> tuple:
    """Does one patient get the same predicted risk whatever scanner or kernel imaged them?

    Per feature set (each representation's composition, the HU thresholds): one penalised Cox model fitted on all of
    ``table`` (the survival patients) scores every evaluation scan on its own, and the ICC(A,1) of those log risks
    across the acquisitions that every evaluation patient has says how much of the spread is the patient and how
    much the acquisition (1: acquisition changes nothing). Returns ({name: {"icc", "icc_ci", ...}},
    {"risks": {name: [patients, acquisitions]}, "acquisitions", "versus": {other: rotated minus other}}).
    """
    from .metrics import icc_with_ci, percentile_ci
    from ..survival import fitted_risk

    if not {"time", "event"} <= set(table.columns):
        return {}, {}
    profiles = scan_profiles(eval_scans, names, n_clusters)
    by_patient = profiles.groupby("patient")["acquisition"].apply(set)
    shared = sorted(set.intersection(*by_patient)) if len(by_patient) else []
    if len(by_patient) < 3 or len(shared) < 2:
        skipped["risk_reproducibility"] = (f"needs at least 3 evaluation patients scanned under the same 2 or more "
                                           f"acquisitions; got {len(by_patient)} patients sharing {len(shared)}.")
        return {}, {}
    profiles = profiles[profiles["acquisition"].isin(shared)]
    risks = {}
    for name, features in survival_feature_sets(table, names).items():
        try:
            risk = fitted_risk(table, features, profiles)
        except InputError as err:
            skipped[f"risk_reproducibility:{name}"] = str(err)
            continue
        matrix = pd.DataFrame({"p": profiles["patient"], "a": profiles["acquisition"], "r": risk}).pivot_table(
            index="p", columns="a", values="r", aggfunc="mean")
        risks[name] = matrix.loc[sorted(by_patient.index), shared].to_numpy()
    if not risks:
        return {}, {}
    summary, boots = icc_with_ci(risks, n_boot=n_boot, seed=seed)
    for m in summary.values():
        m.update({"n_patients": len(by_patient), "acquisitions": shared})
    order = list(risks)
    versus = {}
    if "rotated" in summary:
        rotated = boots[:, order.index("rotated")]
        versus = {other: {"difference": summary["rotated"]["icc"] - summary[other]["icc"],
                          "ci": percentile_ci(rotated - boots[:, j])}
                  for j, other in enumerate(order) if other != "rotated"}
    return summary, {"risks": risks, "acquisitions": shared, "versus": versus}


def outcome_redraws(table: pd.DataFrame, risks: Dict[str, np.ndarray], n_draws: int, seed: int) -> dict:
    """Phantom only: is a C-index lead the representation or the luck of one outcome draw?

    The phantom's outcome is a random draw from a known hazard of each patient's true composition and age, so fresh
    outcomes can be drawn for the same patients (``phantom.draw_outcome``). Each feature set's risks stay as they
    are (cross-validated on the one observed outcome); per draw, Harrell's C of every feature set is recomputed.
    Returns the expected C-index and its SD over draws per feature set, and the share of draws in which rotated is
    ahead of each other one. Empty when the table lacks the phantom's true fractions and age, or has no rotated risk.
    """
    from lifelines.utils import concordance_index

    from ..phantom import draw_outcome
    from ..tissue import TISSUES

    truth = [f"frac_{t}" for t in TISSUES]
    if "rotated" not in risks or not {*truth, "age"} <= set(table.columns) or n_draws < 1:
        return {}
    fractions = [dict(zip(TISSUES, row)) for row in table[truth].to_numpy(dtype=float)]
    ages = table["age"].to_numpy(dtype=float)
    rng = np.random.default_rng(seed)
    names = list(risks)
    c = np.empty((n_draws, len(names)))
    for d in range(n_draws):
        outcomes = np.array([draw_outcome(f, a, rng) for f, a in zip(fractions, ages)])
        c[d] = [concordance_index(outcomes[:, 0], -risks[n], outcomes[:, 1]) for n in names]
    rotated = c[:, names.index("rotated")]
    return {"n_draws": int(n_draws),
            "c_index": {n: {"mean": float(c[:, j].mean()), "sd": float(c[:, j].std())} for j, n in enumerate(names)},
            "rotated_ahead_share": {n: float(np.mean(rotated > c[:, j])) for j, n in enumerate(names) if n != "rotated"}}


def tissue_readout(eval_scans: List[ScanLatents], table: pd.DataFrame, names, seed: int, n_boot: int, skipped: dict) -> dict:
    """Per representation: balanced accuracy of the tissue read-out on the evaluation patches (chance 1 / number of
    tissues present) and the survival C-index of the tissue compositions it reads out. Empty without a read-out."""
    from sklearn.metrics import balanced_accuracy_score

    names = [n for n in names if eval_scans and all(n in s.readout for s in eval_scans)]
    if not names:
        return {}
    truth = np.concatenate([s.truth for s in eval_scans])
    lung = truth > 0
    out: Dict[str, dict] = {n: {"balanced_accuracy": float(balanced_accuracy_score(
        truth[lung], np.concatenate([s.readout[n] for s in eval_scans])[lung]))} for n in names}
    out["chance"] = {"balanced_accuracy": 1.0 / len(np.unique(truth[lung]))}
    if {"time", "event"} <= set(table.columns):
        feature_sets = {n: _without_reference(table, [c for c in table.columns if c.startswith(f"readout:{n}:frac_")])
                        for n in names if f"readout:{n}:frac_normal" in table.columns}
        c_indices, _ = _c_indices(table, feature_sets, seed, n_boot, skipped)
        for n, c in c_indices.items():
            out[n].update({"c_index": c["c_index"], "c_index_ci": c["c_index_ci"]})
    return out


def relative_gains(consistency_metrics: dict) -> dict:
    """Relative gain (%) of rotated over entangled per metric, beside the paper's figures."""
    ent, rot = consistency_metrics["entangled"], consistency_metrics["rotated"]
    gains = {m: 100.0 * (rot[m] - ent[m]) / abs(ent[m]) if ent[m] else float("nan") for m in PAPER_GAIN_PERCENT}
    return {"rotated_vs_entangled_percent": gains, "paper_percent": dict(PAPER_GAIN_PERCENT)}


def goal_check(metrics: dict) -> dict:
    """The issue's goal, item by item: gains >= paper, rotated beats every baseline, probe near chance, survival."""
    cons, gains = metrics["consistency"], metrics["relative_gain"]["rotated_vs_entangled_percent"]
    baselines = [n for n in cons if n not in ("entangled", "rotated", *REFERENCE_REPRESENTATIONS)]
    out = {
        "gain_at_least_paper": {m: bool(gains[m] >= PAPER_GAIN_PERCENT[m]) for m in PAPER_GAIN_PERCENT},
        "rotated_beats_baselines": {b: bool(all(cons["rotated"][m] > cons[b][m] for m in ("ari", "nmi", "dice")))
                                    for b in baselines},
        "probe_near_chance": bool(metrics["probe"]["rotated"] <= metrics["probe"]["chance"] + 0.05),
    }
    surv = metrics.get("survival", {})
    if "rotated" in surv:
        out["survival_rotated_beats"] = {k: bool(surv["rotated"]["c_index"] > surv[k]["c_index"])
                                         for k in ("entangled", "hu_thresholds") if k in surv}
    out.update(tissue_goals(metrics))
    versus = metrics.get("rotated_versus", {})
    if versus:
        out["paired_verdict"] = {other: {m: paired_verdict(d["ci"]) for m, d in diffs.items()}
                                 for other, diffs in versus.items()}
    return out


def tissue_goals(metrics: dict) -> dict:
    """Issue 19's tissue goals for the rotated clusters, where the cohort allows them: truth ARI at least the
    ``hu_statistics`` reference's, emphysema recall >= 0.7 and each abnormal tissue mostly (> 0.5) outside the
    normal cluster in every acquisition, and the low-attenuation share moving by <= 0.5 points soft to sharp."""
    out = {}
    truth, recall = metrics.get("truth_agreement", {}), metrics.get("tissue_recall", {}).get("rotated")
    if "rotated" in truth and "hu_statistics" in truth:
        out["truth_ari_at_least_hu_statistics"] = bool(truth["rotated"]["ari"] >= truth["hu_statistics"]["ari"])
    if recall:
        worst = recall["min"]
        out["emphysema_recall_at_least_0.7"] = bool(worst.get("emphysema_recall", 0.0) >= 0.7)
        out["abnormal_mostly_outside_normal"] = {k[: -len("_outside_normal")]: bool(v > 0.5)
                                                 for k, v in worst.items() if k.endswith("_outside_normal")}
    kernel = metrics.get("kernel_robustness", {})
    if kernel:  # no low-attenuation cluster: nothing to quantify emphysema with, the goal is not met
        out["low_attenuation_kernel_change_at_most_0.5_points"] = bool(
            "rotated" in kernel and kernel["rotated"]["mean_abs_change_points"] <= 0.5)
    return out


def paired_verdict(ci) -> str:
    """'better' or 'worse' when the 95 % CI of rotated minus other excludes 0, else 'tie' (this cohort cannot tell)."""
    low, high = ci
    return "better" if low > 0 else "worse" if high < 0 else "tie"


# ----------------------------------------------------------------------------- figures
def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def _save(fig, path) -> None:
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})


def plot_consistency(cons: dict, probe_acc: dict, path) -> None:
    names = list(cons)
    fig = _figure(10, 3.8)
    ax = fig.add_subplot(1, 2, 1)
    width = 0.27
    for j, m in enumerate(("ari", "nmi", "dice")):
        means = np.array([cons[n][m] for n in names])
        ci = np.array([cons[n][f"{m}_ci"] for n in names]).T
        ax.bar(np.arange(len(names)) + (j - 1) * width, means, width, yerr=np.abs(ci - means), capsize=2, label=m.upper())
    ax.set_xticks(np.arange(len(names)), names, rotation=35, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title("Cluster consistency across acquisitions (95 % CI)", fontsize=9)
    ax.legend(fontsize=8)
    ax2 = fig.add_subplot(1, 2, 2)
    ax2.bar(np.arange(len(names)), [probe_acc.get(n, np.nan) for n in names], color="#777777")
    ax2.axhline(probe_acc["chance"], color="#d55e00", ls="--", label="chance")
    ax2.set_xticks(np.arange(len(names)), names, rotation=35, ha="right", fontsize=8)
    ax2.set_ylim(0, 1)
    ax2.set_title("Acquisition probe accuracy (lower is better)", fontsize=9)
    ax2.legend(fontsize=8)
    _save(fig, path)


def plot_label_maps(scans: List[ScanLatents], with_truth: bool, path) -> None:
    """Cluster labels of one patient on one axial lattice plane: rows = representations, columns = acquisitions.

    Points are placed by their physical keys, so a pixel is the same place in every column; within a row a colour is
    one cluster (the clusters of a representation are shared by all scans).
    """
    from matplotlib.colors import ListedColormap

    from ..clusters import PALETTE

    reps = ["entangled", "rotated"] + (["truth"] if with_truth else [])
    planes, counts = np.unique(scans[0].keys[:, 2], return_counts=True)
    plane = int(planes[counts.argmax()])  # the axial plane with the most lung
    keys = np.concatenate([s.keys for s in scans])
    steps = [np.diff(np.unique(keys[:, a])) for a in (0, 1)]
    step = int(min(d[d > 0].min() if (d > 0).any() else 1 for d in steps))
    lo = keys[:, :2].min(axis=0)
    shape = ((keys[:, 1].max() - lo[1]) // step + 1, (keys[:, 0].max() - lo[0]) // step + 1)
    colours = ["#ffffff"] + list(PALETTE)
    cmap = ListedColormap(colours)
    fig = _figure(2.2 * len(scans), 2.2 * len(reps))
    for r, rep in enumerate(reps):
        for c, s in enumerate(scans):
            image = np.zeros(shape, dtype=np.int64)
            sel = s.keys[:, 2] == plane
            values = s.truth if rep == "truth" else s.labels[rep]
            image[(s.keys[sel, 1] - lo[1]) // step, (s.keys[sel, 0] - lo[0]) // step] = values[sel]
            ax = fig.add_subplot(len(reps), len(scans), r * len(scans) + c + 1)
            ax.imshow(image, cmap=cmap, vmin=0, vmax=len(colours) - 1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(s.acquisition, fontsize=8)
            if c == 0:
                ax.set_ylabel(rep, fontsize=8)
    fig.suptitle(f"Patient {scans[0].patient}, z = {plane / 1000:.1f} mm (colour = cluster of that row)",
                 fontsize=8)
    _save(fig, path)


def plot_latent_pca(eval_scans: List[ScanLatents], bundle, samples: int, seed: int, path) -> None:
    """2-D PCA of held-out latents coloured by acquisition: entangled vs the rotated coordinates clusters see."""
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(seed)
    share = max(samples // len(eval_scans), 1)
    picks = [np.sort(rng.choice(len(s.keys), size=min(share, len(s.keys)), replace=False)) for s in eval_scans]
    X = np.concatenate([s.latents["entangled"][p] for s, p in zip(eval_scans, picks)]).astype(np.float64)
    rotated = np.concatenate([bundle.rotation.cluster_features(s.latents["entangled"])[p] for s, p in zip(eval_scans, picks)])
    acq = np.concatenate([np.full(len(p), s.acquisition) for s, p in zip(eval_scans, picks)])
    fig = _figure(9, 4)
    for k, (title, Z) in enumerate((("entangled latent", X), ("rotated coordinates the clusters see", rotated))):
        P = PCA(n_components=2, random_state=seed).fit_transform(Z)
        ax = fig.add_subplot(1, 2, k + 1)
        for a in np.unique(acq):
            ax.scatter(P[acq == a, 0], P[acq == a, 1], s=3, alpha=0.5, label=a)
        ax.set_title(f"PCA of {title}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.axes[0].legend(fontsize=7, markerscale=3)
    _save(fig, path)


def plot_traversals(bundle, train: List[ScanLatents], rows, path, steps=(-3, -2, -1, 0, 1, 2, 3)) -> dict:
    """Decode latents moved along the top technical and top biological direction (in SDs of the training latents)."""
    import torch

    X, _ = _stack(train, rows, "entangled")
    rot = bundle.rotation
    directions = {"technical 1": rot.rotation_[:, 0]} if rot.n_technical_ > 0 else {}
    directions["biological 1"] = rot.rotation_[:, rot.n_technical_]
    decoder = bundle.decoder("cpu")
    latent_dim = int(bundle.manifest["encoder"]["latent_dim"])
    centre = np.median(X, axis=0)
    fig = _figure(1.3 * len(steps), 1.5 * len(directions))
    sds = {}
    for r, (name, v) in enumerate(directions.items()):
        sd = float(np.std(X @ v))
        sds[name] = sd
        batch = np.stack([centre + t * sd * v for t in steps]).astype(np.float32)
        batch = batch[:, :latent_dim]  # the decoder takes the encoder's latent, without appended densitometry
        with torch.inference_mode():
            patches = decoder(torch.from_numpy(batch)).numpy()
        window = bundle.spec.hu_window
        for c, t in enumerate(steps):
            ax = fig.add_subplot(len(directions), len(steps), r * len(steps) + c + 1)
            mid = patches[c, patches.shape[1] // 2] * (window[1] - window[0]) + window[0]
            ax.imshow(mid, cmap="gray", vmin=-1000, vmax=-400)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"{t:+d} SD", fontsize=8)
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.suptitle("Decoded latent traversals (lung window -1000..-400 HU)", fontsize=8)
    _save(fig, path)
    return sds


def plot_km(table: pd.DataFrame, risks: dict, path) -> dict:
    from ..survival import plot_km_by_risk

    if "rotated" not in risks:  # no Cox model could be fitted: one curve of all patients
        return plot_km_by_risk(table["time"], table["event"], np.zeros(len(table)), path, title="Kaplan-Meier (no risk model)")
    return plot_km_by_risk(table["time"], table["event"], risks["rotated"], path, title="Kaplan-Meier by risk (rotated composition)")


def plot_risk_reproducibility(summary: dict, data: dict, path, reason: str = "") -> None:
    """ICC of the predicted risk across acquisitions per feature set, and for entangled, rotated and the HU
    thresholds each patient's risk under every acquisition (a patient's points should coincide). Without a
    measurement, a figure that says why (``reason``)."""
    if not summary:
        fig = _figure(6, 1.5)
        fig.text(0.5, 0.5, f"Risk reproducibility not measured: {reason}", ha="center", va="center", fontsize=8,
                 wrap=True)
        _save(fig, path)
        return
    names = list(summary)
    shown = [n for n in ("entangled", "rotated", "hu_thresholds") if n in data["risks"]]
    fig = _figure(3.2 * (1 + len(shown)), 3.6)
    ax = fig.add_subplot(1, 1 + len(shown), 1)
    icc = np.array([summary[n]["icc"] for n in names])
    ci = np.array([summary[n]["icc_ci"] for n in names]).T
    ax.bar(np.arange(len(names)), icc, yerr=np.abs(ci - icc), capsize=2, color="#777777")
    ax.set_xticks(np.arange(len(names)), names, rotation=35, ha="right", fontsize=8)
    ax.set_ylim(min(0.0, float(np.nanmin(ci))), 1)
    ax.set_title("Risk ICC across acquisitions (95 % CI)", fontsize=9)
    for k, name in enumerate(shown):
        risk = data["risks"][name]
        z = (risk - risk.mean()) / (risk.std() or 1.0)
        order = np.argsort(z.mean(axis=1))
        ax = fig.add_subplot(1, 1 + len(shown), k + 2)
        x = np.arange(len(order))
        ax.vlines(x, z[order].min(axis=1), z[order].max(axis=1), color="#bbbbbb", lw=1)
        for j, acquisition in enumerate(data["acquisitions"]):
            ax.scatter(x, z[order, j], s=10, label=acquisition)
        ax.set_title(f"{name}: ICC {summary[name]['icc']:.2f}", fontsize=9)
        ax.set_xlabel("patient (by mean risk)", fontsize=8)
        ax.set_ylabel("log risk (SD units)", fontsize=8)
        ax.set_xticks([])
    if shown:
        fig.axes[1].legend(fontsize=6, markerscale=1.5)
    _save(fig, path)


# ----------------------------------------------------------------------------- report
def _uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _table(rows: List[List[str]], head: List[str]) -> str:
    h = "".join(f"<th>{html.escape(x)}</th>" for x in head)
    body = "".join("<tr>" + "".join(f"<td>{x}</td>" for x in r) + "</tr>" for r in rows)
    return f"<table><tr>{h}</tr>{body}</table>"


def _ci(m: dict, key: str) -> str:
    lo, hi = m[f"{key}_ci"]
    return f"{m[key]:.3f} <small>({lo:.3f}–{hi:.3f})</small>"


VERSUS_COLUMNS = ("ari", "nmi", "dice", "c_index")


def versus_rows(metrics: dict) -> List[List[str]]:
    """Rows of the 'rotated minus other' table: per other representation, each metric's paired difference, its
    95 % CI and the verdict (the README and the HTML report show the same text)."""
    rows = []
    for other, diffs in metrics.get("rotated_versus", {}).items():
        cells = [other]
        for m in VERSUS_COLUMNS:
            d = diffs.get(m)
            cells.append("" if d is None else f"{d['difference']:+.3f} ({d['ci'][0]:+.3f} to {d['ci'][1]:+.3f}) "
                                              f"{paired_verdict(d['ci'])}")
        rows.append(cells)
    return rows


def reproducibility_rows(metrics: dict) -> List[List[str]]:
    """Rows of the risk-reproducibility table: ICC with CI, and rotated minus it (paired CI and verdict)."""
    rows = []
    for name, m in metrics.get("risk_reproducibility", {}).items():
        d = metrics.get("rotated_versus", {}).get(name, {}).get("risk_icc")
        versus = "" if d is None else f"{d['difference']:+.3f} ({d['ci'][0]:+.3f} to {d['ci'][1]:+.3f}) {paired_verdict(d['ci'])}"
        rows.append([name, f"{m['icc']:.3f} ({m['icc_ci'][0]:.3f}–{m['icc_ci'][1]:.3f})", versus])
    return rows


def redraw_rows(metrics: dict) -> List[List[str]]:
    """Rows of the outcome-redraw table: expected C-index ± SD over fresh outcome draws, and how often rotated leads."""
    redraws = metrics.get("survival_redraws", {})
    ahead = redraws.get("rotated_ahead_share", {})
    return [[name, f"{m['mean']:.3f} ± {m['sd']:.3f}", f"{100 * ahead[name]:.0f} %" if name in ahead else ""]
            for name, m in redraws.get("c_index", {}).items()]


def _redraw_section(metrics: dict, rows: List[List[str]]) -> str:
    if not rows:
        return "<p>Not a phantom cohort with true fractions and age.</p>"
    return (f"<p>The same risks, scored against {metrics['survival_redraws']['n_draws']} fresh outcomes drawn from the "
            "phantom's own hazard for the same patients: the spread one cohort's outcome draw puts on the C-index, and "
            "the share of draws in which rotated is ahead.</p>"
            + _table([[html.escape(c) for c in row] for row in rows], ["features", "expected C-index ± SD", "rotated ahead in"]))


_REFERENCE_NOTE = (" <i>hu_statistics</i> uses no encoder: the HU quantiles and threshold shares of each patch, the "
                   "reference a learned representation has to beat.")


def _kernel_section(metrics: dict) -> str:
    rows = kernel_rows(metrics)
    if not rows:
        return "<p>No patient scanned with a soft and a sharp kernel under otherwise equal settings.</p>"
    return (f"<p>{metrics['kernel_robustness']['n_pairs']} soft/sharp pairs; the low-attenuation cluster's share of "
            "the lung beside LAA-950 (% lung voxels below -950 HU).</p>"
            + _table([[html.escape(c) for c in row] for row in rows], KERNEL_HEAD))


def render_report(metrics: dict, staged, figures: List[str]) -> str:
    cons, probe_acc = metrics["consistency"], metrics["probe"]
    cons_rows = [[html.escape(n), _ci(m, "ari"), _ci(m, "nmi"), _ci(m, "dice"),
                  f"{probe_acc[n]:.3f}" if n in probe_acc else "–"] for n, m in cons.items()]
    gains = metrics["relative_gain"]
    gain_rows = [[m.upper(), f"{gains['rotated_vs_entangled_percent'][m]:+.2f} %", f"+{gains['paper_percent'][m]:.2f} %"]
                 for m in PAPER_GAIN_PERCENT]
    truth_rows = [[html.escape(n), _ci(m, "ari"), _ci(m, "nmi")] for n, m in metrics["truth_agreement"].items()]
    surv_rows = [[html.escape(n), _ci(m, "c_index"), str(len(m["features"]))] for n, m in metrics["survival"].items()]
    readout = metrics.get("tissue_readout", {})
    readout_rows = [[html.escape(n), f"{m['balanced_accuracy']:.3f}",
                     _ci(m, "c_index") if "c_index" in m else "–",
                     f"{metrics['survival'][n]['c_index']:.3f}" if n in metrics["survival"] else "–"]
                    for n, m in readout.items() if n != "chance"]
    repro_rows = reproducibility_rows(metrics)
    redraws = redraw_rows(metrics)
    skipped = "".join(f"<li>{html.escape(k)}: {html.escape(v)}</li>" for k, v in metrics["skipped"].items())
    figures = "".join(f"<h3>{html.escape(name[:-4].replace('_', ' '))}</h3><img alt='{name}' src='{_uri(staged.path(name))}'>"
                      for name in figures)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>LatentHarmonize evaluation</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}td:first-child{{text-align:left}}img{{max-width:100%}}</style></head>
<body><h1>LatentHarmonize evaluation</h1>
<p>Model {html.escape(metrics['model']['sha256'][:12])}; {metrics['n_eval_patients']} held-out patients
({metrics['n_eval_scans']} scans), clusters and harmonizers fitted on {metrics['n_train_scans']} training scans; K = {metrics['n_clusters']};
seed {metrics['seed']}{' (quick mode: subsampled)' if metrics['quick'] else ''}.</p>
<h2>Consistency across acquisitions (mean, 95 % bootstrap CI over patients) and acquisition probe</h2>
{_table(cons_rows, ['representation', 'ARI', 'NMI', 'Dice', 'probe accuracy'])}
<p>Probe chance level: {probe_acc['chance']:.3f}.{_REFERENCE_NOTE if 'hu_statistics' in cons else ''}</p>
<h2>Rotated over entangled: relative gain</h2>{_table(gain_rows, ['metric', 'this run', 'paper'])}
<h2>Agreement with the phantom truth</h2>{_table(truth_rows, ['representation', 'ARI', 'NMI']) if truth_rows else '<p>No truth in this cohort.</p>'}
<h2>Tissue found by the clusters (phantom truth, worst acquisition)</h2>
<p>Emphysema recall: share of true emphysema cells in the cluster with the lowest median patch HU; the other columns:
share of each tissue outside the cluster that holds most normal lung.</p>
{_table([[html.escape(c) for c in row] for row in recall_rows(metrics)], RECALL_HEAD) if metrics.get('tissue_recall') else '<p>No truth in this cohort.</p>'}
<h2>Kernel-robust emphysema: soft versus sharp reconstruction of the same patient</h2>
{_kernel_section(metrics)}
<h2>Survival: cross-validated Cox C-index</h2>{_table(surv_rows, ['features', 'C-index (95 % CI)', 'n features']) if surv_rows else '<p>No time/event columns.</p>'}
<h2>Rotated minus each other representation, paired over the same patients (95 % bootstrap CI)</h2>
<p>"tie": the CI contains 0, so this cohort cannot tell the two apart.</p>
{_table([[html.escape(c) for c in row] for row in versus_rows(metrics)], ['other', 'ARI', 'NMI', 'Dice', 'C-index'])}
<h2>Survival over fresh outcome draws (phantom only)</h2>
{_redraw_section(metrics, redraws)}
<h2>Risk reproducibility across acquisitions</h2>
<p>One penalised Cox model per feature set, fitted on the survival patients, scores each evaluation scan on its own;
ICC(A,1) of the log risk over patients × acquisitions (1: the scanner changes nobody's risk). Paired: rotated minus
the other on the same patient resamples.</p>
{_table([[html.escape(c) for c in row] for row in repro_rows], ['features', 'risk ICC (95 % CI)', 'rotated minus']) if repro_rows else '<p>Not run (see below).</p>'}
<h2>Tissue read-out (phantom diagnostic)</h2>
<p>A linear classifier of the true tissue, fitted on each representation's training patches: how much tissue and
outcome information the representation holds, whatever its clusters find. Chance balanced accuracy:
{readout.get('chance', {}).get('balanced_accuracy', float('nan')):.3f}.</p>
{_table(readout_rows, ['representation', 'tissue balanced accuracy', 'read-out composition C-index', 'cluster composition C-index']) if readout_rows else '<p>No read-out: the training scans carry no truth, or it was not run (see below).</p>'}
<h2>Goal check</h2><pre>{html.escape(json.dumps(metrics['goal'], indent=1))}</pre>
{'<h2>Not run</h2><ul>' + skipped + '</ul>' if skipped else ''}
<h2>Figures</h2>{figures}
</body></html>
"""


# ----------------------------------------------------------------------------- orchestration
def _select_patients(cohort: pd.DataFrame, limit: Optional[int]) -> pd.DataFrame:
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


def evaluate(cohort_csv, out_dir, model=None, train_cohort=None, unoranic=None, seed: int = 0, quick: bool = False,
             overwrite: bool = False, device: str = "cpu", progress: Progress | None = None,
             survival_cohort=None) -> dict:
    """Run the whole evaluation and write ``metrics.json``, ``report.html`` and figures to ``out_dir``.

    ``survival_cohort``: a cohort CSV (with time and event) whose patients the survival comparison uses instead of
    the training and evaluation patients; it must share no scan with the training cohort.
    """
    from .harmonizers import HistogramMatcher
    from ..bundle import load_bundle
    from ..cohort import read_cohort

    progress = progress or Progress(quiet=True)
    cfg = EvalConfig.for_run(seed, quick, device)
    t0 = time.perf_counter()
    eval_rows = _select_patients(read_cohort(cohort_csv), cfg.max_eval_patients)
    surv_rows = None
    if survival_cohort is not None:
        surv_rows = _select_patients(read_cohort(survival_cohort), cfg.max_survival_patients)
        if not {"time", "event"} <= set(surv_rows.columns):
            raise InputError(f"The survival cohort {survival_cohort} has no time and event columns; add them "
                             "(years to death or censoring, and 1 = death observed, 0 = censored).")
    outcomes = surv_rows if surv_rows is not None else eval_rows
    figures = [f for f in FIGURES if f not in OUTCOME_FIGURES or {"time", "event"} <= set(outcomes.columns)]
    staged = StagedOutput(out_dir, ["metrics.json", "report.html", *figures], overwrite=overwrite)  # refuse early
    bundle = load_bundle(model)
    encoders = Encoders(bundle, load_bundle(unoranic) if unoranic else None, device)
    train_rows = _select_patients(read_cohort(_training_cohort_path(bundle, train_cohort)), cfg.max_train_patients)
    for what, rows in (("evaluation", eval_rows), ("survival", surv_rows)):
        overlap = set() if rows is None else set(map(str, rows["image"])) & set(map(str, train_rows["image"]))
        if overlap:
            raise InputError(f"{len(overlap)} {what} scans are also training scans (e.g. {sorted(overlap)[0]}); "
                             "evaluate on patients not used in training.")

    train: List[ScanLatents] = []
    samples = []
    for i, (_, row) in enumerate(train_rows.iterrows()):
        scan, sample = _encode_row(row, "train", encoders)
        train.append(scan)
        samples.append(sample)
        progress(30 * (i + 1) / len(train_rows), "encode", f"training scan {i + 1}/{len(train_rows)}")
    matcher = HistogramMatcher(random_state=seed).fit(samples, [np.ones(s.shape, bool) for s in samples])
    for i, (_, row) in enumerate(train_rows.iterrows()):  # the matched latents need the fitted reference
        train[i].latents["histogram_matching"] = _matched_latents(row, encoders, matcher)
        progress(30 + 10 * (i + 1) / len(train_rows), "encode", f"histogram-matched training scan {i + 1}/{len(train_rows)}")
    held_out = [("eval", row) for _, row in eval_rows.iterrows()]
    held_out += [] if surv_rows is None else [("survival", row) for _, row in surv_rows.iterrows()]
    encoded = {"eval": [], "survival": []}
    for i, (split, row) in enumerate(held_out):
        encoded[split].append(_encode_row(row, split, encoders, matcher)[0])
        progress(40 + 15 * (i + 1) / len(held_out), "encode", f"held-out scan {i + 1}/{len(held_out)} ({split})")
    evals, survivors = encoded["eval"], encoded["survival"]
    t_encode = time.perf_counter() - t0

    rows = _training_rows(train, cfg.train_latents, seed)
    skipped: Dict[str, str] = {}
    funcs = representation_functions(bundle, train, rows, seed, set(train[0].latents), skipped)
    n_clusters = int(len(bundle.clusters.centroids_))
    assign_clusters(funcs, train + evals + survivors, train, rows, n_clusters, seed, progress, skipped)
    for s in train + evals + survivors:
        s.labels[THRESHOLD_BASELINE] = threshold_classes(s.latents[PATCH_MEAN_HU])
    names = list(funcs)
    compared = names + list(LABEL_BASELINES)

    per_patient = consistency_per_patient(evals, compared)
    references = reference_clusters(train, compared)
    metrics: dict = {
        "consistency": consistency(per_patient, cfg.n_boot, seed),
        "truth_agreement": truth_agreement(evals, compared, cfg.n_boot, seed),
        "probe": probe(evals, funcs, cfg.probe_samples, seed),
        "tissue_recall": tissue_recall(evals, references),
        "kernel_robustness": kernel_robustness(evals, references),
    }
    progress(80, "metrics", "consistency, truth agreement and probe done")
    table = patient_profiles(survivors or train + evals, names, n_clusters)
    metrics["survival"], risks = survival_comparison(table, names, seed, cfg.n_boot, skipped)
    metrics["rotated_versus"] = rotated_versus(per_patient, table, risks, cfg.n_boot, seed)
    metrics["survival_redraws"] = outcome_redraws(table, risks, cfg.outcome_draws, seed)
    metrics["tissue_readout"] = tissue_readout(evals, table, names, seed, cfg.n_boot, skipped)
    metrics["risk_reproducibility"], reproducibility = risk_reproducibility(table, evals, names, n_clusters, cfg.n_boot,
                                                                            seed, skipped)
    for other, diff in reproducibility.get("versus", {}).items():
        metrics["rotated_versus"].setdefault(other, {})["risk_icc"] = diff
    metrics["relative_gain"] = relative_gains(metrics["consistency"])
    metrics["goal"] = goal_check(metrics)
    metrics.update({
        "model": {"path": str(model or "default"), "sha256": bundle.sha256, "n_technical": int(bundle.rotation.n_technical_)},
        "n_clusters": n_clusters, "seed": seed, "quick": quick, "skipped": skipped,
        "n_train_scans": len(train), "n_eval_scans": len(evals), "n_eval_patients": len(_by_patient(evals)),
        "n_survival_patients": int(len(table)),
        "survival_population": (f"survival cohort {survival_cohort} ({len(survivors)} scans)" if survivors else
                                "training and evaluation patients") + " (outcome-free clustering, cross-validated Cox)",
    })
    progress(85, "figures", "drawing figures")
    with staged:
        plot_consistency(metrics["consistency"], metrics["probe"], staged.path("consistency.png"))
        example = next(v for v in _by_patient(evals).values() if len(v) >= 2)
        plot_label_maps(example, all(s.truth is not None for s in example), staged.path("label_maps.png"))
        metrics["km"] = plot_km(table, risks, staged.path("km.png")) if "km.png" in figures else {}
        if "risk_reproducibility.png" in figures:
            plot_risk_reproducibility(metrics["risk_reproducibility"], reproducibility,
                                      staged.path("risk_reproducibility.png"), skipped.get("risk_reproducibility", ""))
        plot_latent_pca(evals, bundle, cfg.probe_samples, seed, staged.path("latent_pca.png"))
        metrics["traversal_sd"] = plot_traversals(bundle, train, rows, staged.path("traversals.png"))
        metrics["timings_s"] = {"encode": round(t_encode, 1), "total": round(time.perf_counter() - t0, 1)}
        staged.path("metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True, default=float) + "\n")
        staged.path("report.html").write_text(render_report(metrics, staged, figures), encoding="utf-8")
    progress(100, "done", f"wrote metrics.json, report.html and {len(figures)} figures to {out_dir}")
    return metrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("cohort", help="evaluation cohort CSV (patients NOT used in training)")
    options.add_model(parser)
    options.add_out(parser, "output folder for metrics.json, report.html and figures")
    parser.add_argument("--train-cohort", help="training cohort CSV the baselines and clusters are fitted on "
                                              "(default: the cohort recorded in the bundle)")
    parser.add_argument("--unoranic", help="bundle trained with --encoder unoranic, for the unoranic baseline")
    parser.add_argument("--survival-cohort", help="cohort CSV with time and event whose patients the survival "
                                                 "comparison uses (default: the training and evaluation patients)")
    options.add_seed(parser)
    parser.add_argument("--quick", action="store_true", help="subsample patients and latents (smoke test, minutes)")
    options.add_device(parser, default="cpu")
    options.add_overwrite(parser)
    options.add_output_style(parser, quiet=False)


def run(args) -> int:
    metrics = evaluate(args.cohort, args.out, model=args.model, train_cohort=args.train_cohort, unoranic=args.unoranic,
                       seed=args.seed, quick=args.quick, overwrite=args.overwrite, device=args.device,
                       progress=Progress(machine=args.progress_lines), survival_cohort=args.survival_cohort)
    print(format_summary(metrics))
    return 0


def format_summary(metrics: dict) -> str:
    """A plain-text table of the headline numbers (what the README carries)."""
    lines = [f"{'representation':20s} {'ARI':>6s} {'NMI':>6s} {'Dice':>6s} {'probe':>6s} {'C-index':>8s}"]
    for n, m in metrics["consistency"].items():
        c = metrics["survival"].get(n, {}).get("c_index", float("nan"))
        p = metrics["probe"].get(n, float("nan"))
        lines.append(f"{n:20s} {m['ari']:6.3f} {m['nmi']:6.3f} {m['dice']:6.3f} {p:6.3f} {c:8.3f}")
    lines.append(f"{'chance (probe)':20s} {'':6s} {'':6s} {'':6s} {metrics['probe']['chance']:6.3f}")
    for k in ("hu_thresholds", "true_composition"):
        if k in metrics["survival"]:
            lines.append(f"{k:20s} {'':6s} {'':6s} {'':6s} {'':6s} {metrics['survival'][k]['c_index']:8.3f}")
    ahead = metrics.get("survival_redraws", {}).get("rotated_ahead_share", {})
    if ahead:
        lines.append(f"rotated C-index ahead over {metrics['survival_redraws']['n_draws']} outcome draws: "
                     + ", ".join(f"of {n} {100 * v:.0f} %" for n, v in ahead.items()))
    icc = metrics.get("risk_reproducibility", {})
    if icc:
        lines.append("risk ICC across acquisitions: " + ", ".join(f"{n} {m['icc']:.3f}" for n, m in icc.items()))
    g = metrics["relative_gain"]["rotated_vs_entangled_percent"]
    lines.append("rotated vs entangled: " + ", ".join(f"{m.upper()} {g[m]:+.2f} % (paper +{PAPER_GAIN_PERCENT[m]:.2f} %)"
                                                      for m in PAPER_GAIN_PERCENT))
    return "\n".join(lines)
