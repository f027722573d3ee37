"""Measures on the held-out scans' labels and features: consistency across one patient's acquisitions, agreement
with the phantom truth, and the acquisition probe."""
from __future__ import annotations

from typing import Callable, Dict, List

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ..errors import InputError
from .encoding import ScanLatents
from .metrics import METRICS, label_agreement, mean_pairwise_agreement, summarize


def by_patient(scans: List[ScanLatents]) -> Dict[str, List[ScanLatents]]:
    """Scans grouped per patient; keys are ``split:patient`` since two cohorts may reuse patient ids."""
    out: Dict[str, List[ScanLatents]] = {}
    for s in scans:
        out.setdefault(f"{s.split}:{s.patient}", []).append(s)
    return {p: sorted(v, key=lambda s: s.acquisition) for p, v in sorted(out.items())}


def common_rows(scans: List[ScanLatents]) -> List[np.ndarray]:
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
    for patient, scans in by_patient(eval_scans).items():
        if len(scans) < 2:
            continue
        rows = common_rows(scans)
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


def truth_agreement(eval_scans: List[ScanLatents], names, n_boot: int, seed: int) -> dict:
    """ARI/NMI/Dice of each representation's labels against the phantom truth at the patch centres."""
    if any(s.truth is None for s in eval_scans):
        return {}
    return {n: summarize(truth_per_patient(eval_scans, n), n_boot=n_boot, seed=seed) for n in names}


def truth_per_patient(eval_scans: List[ScanLatents], name: str) -> List[Dict[str, float]]:
    """One record per patient: representation ``name``'s ARI/NMI/Dice against the truth, averaged over the
    patient's scans (scans with truth only)."""
    per_patient = []
    for scans in by_patient(eval_scans).values():
        scores = [label_agreement(s.labels[name][s.truth > 0], s.truth[s.truth > 0]) for s in scans if (s.truth > 0).any()]
        if scores:
            per_patient.append({k: float(np.mean([sc[k] for sc in scores])) for k in scores[0]})
    return per_patient


def probe(eval_scans: List[ScanLatents], funcs: Dict[str, Callable], samples: int, seed: int) -> dict:
    """Cross-validated logistic-regression accuracy of the acquisition on held-out latents, folds grouped by patient."""
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
