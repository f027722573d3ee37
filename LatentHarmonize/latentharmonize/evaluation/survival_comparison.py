"""Survival from each representation's tissue composition, on the survival patients: cross-validated Cox C-index,
the HU thresholds and (phantom) the true composition beside it, fresh outcome draws, risk reproducibility across
acquisitions and the tissue read-out's compositions."""
from __future__ import annotations

from typing import Dict, List

import numpy as np
import pandas as pd
from lifelines.utils import concordance_index
from sklearn.metrics import balanced_accuracy_score

from ..errors import InputError
from ..phantom import draw_outcome
from ..survival import c_index_with_ci, cross_validated_risk, fitted_risk, percentile_ci
from ..tissue import TISSUES
from .consistency import by_patient
from .encoding import ScanLatents
from .metrics import icc_with_ci

HU_THRESHOLD_FEATURES = ("laa950", "haa700", "mld", "perc15")
# the same with LAA-950 and Perc15 read noise-matched (densitometry.matched_lung_hu), as analyze's densitometry.csv has
MATCHED_THRESHOLD_FEATURES = ("laa950_matched", "haa700", "mld", "perc15_matched")
SURVIVAL_ONLY = ("hu_thresholds", "hu_thresholds_matched", "true_composition")  # survival rows with no clusters


def _mean_fractions(label_maps: List[np.ndarray], n_labels: int) -> np.ndarray:
    """Fraction of each label 1..n_labels per scan, averaged over the scans."""
    return np.mean([np.bincount(labels, minlength=n_labels + 1)[1:n_labels + 1] / len(labels) for labels in label_maps], axis=0)


def patient_profiles(scans: List[ScanLatents], names, n_clusters: int) -> pd.DataFrame:
    """One row per patient: cluster fractions per representation (``<rep>:frac_<k>``), read-out tissue fractions
    where there is a read-out (``readout:<rep>:frac_<tissue>``), densitometry, clinical."""
    rows = []
    for patient, group in by_patient(scans).items():
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
    if set(MATCHED_THRESHOLD_FEATURES) <= set(table.columns):  # encodings cached before the matched reading lack it
        feature_sets["hu_thresholds_matched"] = list(MATCHED_THRESHOLD_FEATURES)
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
    if not {"time", "event"} <= set(table.columns):
        return {}, {}
    profiles = scan_profiles(eval_scans, names, n_clusters)
    acquisitions_of = profiles.groupby("patient")["acquisition"].apply(set)
    shared = sorted(set.intersection(*acquisitions_of)) if len(acquisitions_of) else []
    if len(acquisitions_of) < 3 or len(shared) < 2:
        skipped["risk_reproducibility"] = (f"needs at least 3 evaluation patients scanned under the same 2 or more "
                                           f"acquisitions; got {len(acquisitions_of)} patients sharing {len(shared)}.")
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
        risks[name] = matrix.loc[sorted(acquisitions_of.index), shared].to_numpy()
    if not risks:
        return {}, {}
    summary, boots = icc_with_ci(risks, n_boot=n_boot, seed=seed)
    for m in summary.values():
        m.update({"n_patients": len(acquisitions_of), "acquisitions": shared})
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
    tissues present), that of the acquisition where it is lowest, each tissue's recall (the share of its patches
    read out as it), and the survival C-index of the tissue compositions it reads out. Empty without a read-out."""
    names = [n for n in names if eval_scans and all(n in s.readout for s in eval_scans)]
    if not names:
        return {}
    truth = np.concatenate([s.truth for s in eval_scans])
    lung = truth > 0
    acquisitions = np.concatenate([np.full(len(s.truth), s.acquisition) for s in eval_scans])[lung]
    out: Dict[str, dict] = {}
    for n in names:
        found, true = np.concatenate([s.readout[n] for s in eval_scans])[lung], truth[lung]
        out[n] = {"balanced_accuracy": float(balanced_accuracy_score(true, found)),
                  "balanced_accuracy_worst_acquisition": min(
                      float(balanced_accuracy_score(true[acquisitions == a], found[acquisitions == a]))
                      for a in np.unique(acquisitions)),
                  "recall": {t: float(np.mean(found[true == k] == k)) for k, t in enumerate(TISSUES, start=1)
                             if np.any(true == k)}}
    out["chance"] = {"balanced_accuracy": 1.0 / len(np.unique(truth[lung]))}
    if {"time", "event"} <= set(table.columns):
        feature_sets = {n: _without_reference(table, [c for c in table.columns if c.startswith(f"readout:{n}:frac_")])
                        for n in names if f"readout:{n}:frac_normal" in table.columns}
        c_indices, _ = _c_indices(table, feature_sets, seed, n_boot, skipped)
        for n, c in c_indices.items():
            out[n].update({"c_index": c["c_index"], "c_index_ci": c["c_index_ci"]})
    return out
