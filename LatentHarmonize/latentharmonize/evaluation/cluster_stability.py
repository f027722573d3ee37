"""Each cluster across one patient's acquisitions: which of a representation's clusters the scanner moves.

The consistency table's matched Dice is the unweighted mean over a map's clusters, so one small cluster that comes
and goes between acquisitions pulls it down as much as the normal lung cluster would; a map with more clusters
(one that says more) is judged on more of them. This table breaks the agreement down per cluster, which is also
what a researcher needs before trusting one cluster's volume in a multi-scanner cohort:

- share of the lung: the cluster's mean share of the held-out scans' lung points (%);
- Dice across acquisitions: for every two acquisitions of a patient, at the lattice points both hold, the Dice of
  the cluster's two masks, averaged over the pairs where either scan has the cluster;
- share change: the mean absolute change of the cluster's share of those same points between two acquisitions of
  a patient (percentage points), over every pair;
- the cluster is identified by its label, its name where its clusters keep one, and the median mean-HU of its
  training patches.
"""
from __future__ import annotations

import itertools
from typing import Dict, List, Optional, Sequence

import numpy as np

from .consistency import by_patient, common_rows
from .metrics import mask_dice
from .tissue import PATCH_MEAN_HU


def cluster_stability(eval_scans: Sequence, train_scans: Sequence, names: Sequence[str],
                      cluster_names: Optional[Dict[str, List[str]]] = None) -> Dict[str, List[dict]]:
    """{representation: one record per cluster label} (module docstring); ``cluster_names``: {representation: name
    of label 1, 2, ...} where known. Patients with fewer than two acquisitions, or none sharing a lattice point, are
    left out."""
    hu = np.concatenate([np.ravel(s.latents[PATCH_MEAN_HU]) for s in train_scans])
    patients = [scans for scans in by_patient(list(eval_scans)).values() if len(scans) >= 2]
    rows = [common_rows(scans) for scans in patients]
    out = {}
    for n in names:
        train_labels = np.concatenate([s.labels[n] for s in train_scans])
        labels = np.unique(np.concatenate([train_labels, *(s.labels[n] for s in eval_scans)]))
        dice: Dict[int, list] = {int(k): [] for k in labels}
        change: Dict[int, list] = {int(k): [] for k in labels}
        for scans, common in zip(patients, rows):
            if len(common[0]) == 0:
                continue
            maps = [s.labels[n][r] for s, r in zip(scans, common)]
            for a, b in itertools.combinations(maps, 2):
                for k in dice:
                    in_a, in_b = a == k, b == k
                    change[k].append(100.0 * abs(float(in_a.mean()) - float(in_b.mean())))
                    if in_a.any() or in_b.any():
                        dice[k].append(mask_dice(in_a, in_b))
        named = (cluster_names or {}).get(n, [])
        out[n] = [{"label": k, "name": named[k - 1] if 0 < k <= len(named) else None,
                   "median_patch_hu": float(np.median(hu[train_labels == k])) if np.any(train_labels == k) else None,
                   "share_percent": float(np.mean([100.0 * np.mean(s.labels[n] == k) for s in eval_scans])),
                   "dice": float(np.mean(dice[k])) if dice[k] else None,
                   "pairs_with_cluster": len(dice[k]),
                   "mean_abs_share_change_points": float(np.mean(change[k])) if change[k] else None}
                  for k in dice]
    return out


STABILITY_HEAD = ["representation", "cluster", "name", "median patch HU (training)", "share of the lung (%)",
                  "Dice across acquisitions", "acquisition pairs holding it", "mean share change (points)"]


def stability_rows(metrics: dict) -> List[List[str]]:
    """Rows of the per-cluster stability table (report and table.md), one per representation and cluster."""
    def number(value, form):
        return "–" if value is None else format(value, form)

    return [[n, str(c["label"]), c["name"] or "–", number(c["median_patch_hu"], ".0f"), f"{c['share_percent']:.1f}",
             number(c["dice"], ".3f"), str(c["pairs_with_cluster"]), number(c["mean_abs_share_change_points"], ".2f")]
            for n, clusters in metrics.get("cluster_stability", {}).items() for c in clusters]
