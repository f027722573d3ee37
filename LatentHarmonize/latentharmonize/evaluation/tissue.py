"""Tissue measurements of ``evaluate`` (issue 19): do the clusters find the disease, and does it survive a kernel?

- ``hu_threshold_classes``: a baseline with no encoder and no fitting, four classes of each patch's mean lung HU
  (below -950, -950 to -700, -700 to -300, above -300), the patch and context averaging being those of the
  clusters, so consistency is compared at equal smoothing;
- tissue recall (phantom truth): per acquisition, the share of true emphysema cells in the representation's
  low-attenuation cluster, and for ground glass, reticulation, honeycombing and consolidation the share outside its
  normal cluster. The normal cluster holds the most true normal-lung training cells (without truth: the largest
  cluster); the low-attenuation cluster is, among the other clusters, the one whose training cells have the lowest
  median patch HU, if that median is below the normal cluster's. A representation without one has recall 0: a
  cluster that also holds most normal lung finds no emphysema, whatever share of it it holds. The cells lie inside
  the lung mask; what the mask holds of each tissue (``mask_holds``) turns the share outside normal into the share of
  all the tissue the map shows (``<tissue>_found``), which the goal reads;
- kernel robustness: for each patient scanned with a soft and a sharp kernel under otherwise equal settings, the
  change (percentage points) of the low-attenuation cluster's share of the lung, beside that of LAA-950;
- label make-up (``scripts/cluster_makeup.py``): voxel by voxel, what tissue each segment of an analysed phantom
  scan's label map holds, and for a disease-like name the share of its voxels that are the tissue it names.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from ..clusters import DENSE, GROUND_GLASS, HONEYCOMB, LOW_ATTENUATION, RETICULAR, base_name
from ..errors import InputError
from ..patches import PatchSpec, extract_patches
from ..tissue import TISSUE_LABELS, TISSUES

HU_CLASS_THRESHOLDS = (-950.0, -700.0, -300.0)
THRESHOLD_BASELINE = "hu_threshold_classes"
PATCH_MEAN_HU = "patch_mean_hu"  # ScanLatents source: each patch's mean lung HU, context-averaged like the latents
OUTSIDE_NORMAL_TISSUES = ("ground_glass", "reticulation", "honeycombing", "consolidation")
# Columns of a cohort table that describe an acquisition; a soft/sharp pair must agree on all but the kernel ones.
SETTING_COLUMNS = ("kernel", "kernel_sharpness", "vendor", "hu_scale", "hu_offset", "dose", "thickness")
KERNEL_COLUMNS = ("kernel", "kernel_sharpness")
# the phantom tissue each disease-like cluster name (clusters.DISEASE_NAMES) claims
NAMED_TISSUE = {LOW_ATTENUATION: "emphysema", GROUND_GLASS: "ground_glass", RETICULAR: "reticulation",
                HONEYCOMB: "honeycombing", DENSE: "consolidation"}


def patch_mean_hu(hu: np.ndarray, lung: np.ndarray, positions: np.ndarray, spec: PatchSpec) -> np.ndarray:
    """Mean HU of the lung voxels of each patch at lattice ``positions``, float32 [n, 1] (patches cut once, NaN
    outside the lung, as :func:`latentharmonize.patches.lattice_hu_statistics` cuts them)."""
    values = extract_patches(np.where(lung, hu, np.nan).astype(np.float32), positions, spec).reshape(len(positions), -1)
    counts = np.count_nonzero(~np.isnan(values), axis=1)
    if np.any(counts == 0):
        raise InputError("A patch at the given positions holds no lung voxel; pass the positions of valid centres.")
    return (np.nansum(values, axis=1) / counts)[:, None].astype(np.float32)


def threshold_classes(mean_hu: np.ndarray) -> np.ndarray:
    """Class 1..4 of each patch's mean HU at the thresholds -950, -700, -300 (a value on a threshold goes up)."""
    return (np.digitize(np.ravel(mean_hu), HU_CLASS_THRESHOLDS) + 1).astype(np.int64)


def low_attenuation_cluster(labels: np.ndarray, mean_hu: np.ndarray, normal: int) -> Optional[int]:
    """Among the clusters other than ``normal``, the one whose cells have the lowest median patch HU, if that median
    is below the normal cluster's; else None."""
    labels, mean_hu = np.ravel(labels), np.ravel(mean_hu)
    medians = {int(k): float(np.median(mean_hu[labels == k])) for k in np.unique(labels)}
    others = [k for k in medians if k != normal]
    if not others:
        return None
    low = min(others, key=medians.get)
    return low if normal not in medians or medians[low] < medians[normal] else None


def normal_cluster(labels: np.ndarray, truth: Optional[np.ndarray] = None) -> int:
    """The cluster holding the most true normal-lung cells; without ``truth``, the largest cluster."""
    labels = np.ravel(labels)
    normal = labels if truth is None else labels[np.ravel(truth) == TISSUE_LABELS["normal"]]
    if normal.size == 0:
        raise ValueError("no true normal-lung cell to find the normal cluster with")
    values, counts = np.unique(normal, return_counts=True)
    return int(values[counts.argmax()])


def reference_clusters(train_scans: Sequence, names: Sequence[str]) -> Dict[str, dict]:
    """Per representation, from the training scans: its normal cluster, its low-attenuation cluster (None when it
    has none) and the median patch HU of each."""
    hu = np.concatenate([np.ravel(s.latents[PATCH_MEAN_HU]) for s in train_scans])
    truth = np.concatenate([s.truth for s in train_scans]) if all(s.truth is not None for s in train_scans) else None
    out = {}
    for n in names:
        labels = np.concatenate([s.labels[n] for s in train_scans])
        normal = normal_cluster(labels, truth)
        low = low_attenuation_cluster(labels, hu, normal)
        out[n] = {"normal": normal, "normal_median_hu": float(np.median(hu[labels == normal])),
                  "low_attenuation": low,
                  "low_attenuation_median_hu": None if low is None else float(np.median(hu[labels == low]))}
    return out


def truth_on(ct, truth):
    """The phantom's tissue truth brought (nearest, 0 outside it) onto the CT's grid: a UInt8 image."""
    return sitk.Resample(truth, ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0)


def tissue_in_mask(truth, ct, lungs) -> Dict[str, List[int]]:
    """Per tissue present, ``[voxels inside the lung mask, voxels]`` of the phantom truth brought onto the CT's grid
    (:func:`truth_on`): the map, read inside the mask, can show no more of a tissue than the mask holds."""
    labels = sitk.GetArrayFromImage(truth_on(ct, truth))
    inside = sitk.GetArrayViewFromImage(lungs) > 0
    counts = np.bincount(labels.ravel(), minlength=len(TISSUES) + 1)
    held = np.bincount(labels[inside], minlength=len(TISSUES) + 1)
    return {t: [int(held[TISSUE_LABELS[t]]), int(counts[TISSUE_LABELS[t]])] for t in TISSUES
            if counts[TISSUE_LABELS[t]]}


def _by_acquisition(scans: Sequence) -> Dict[str, list]:
    out: Dict[str, list] = {}
    for s in scans:
        out.setdefault(s.acquisition, []).append(s)
    return dict(sorted(out.items()))


def mask_holds(eval_scans: Sequence) -> dict:
    """Per acquisition, the share of each tissue's voxels inside the lung mask (:func:`tissue_in_mask`, pooled over
    the acquisition's evaluation scans); ``min`` holds the worst acquisition. Empty when no scan was counted."""
    per_acq = {}
    for acq, scans in _by_acquisition(eval_scans).items():
        totals: Dict[str, np.ndarray] = {}
        for s in scans:
            for t, pair in s.mask_holds.items():
                totals[t] = totals.get(t, np.zeros(2, np.int64)) + pair
        if totals:
            per_acq[acq] = {t: float(inside / total) for t, (inside, total) in totals.items()}
    if not per_acq:
        return {}
    keys = sorted({t for r in per_acq.values() for t in r})
    return {"per_acquisition": per_acq, "min": {t: min(r[t] for r in per_acq.values() if t in r) for t in keys}}


def tissue_recall(eval_scans: Sequence, references: Dict[str, dict]) -> dict:
    """Per representation and acquisition: emphysema recall into the low-attenuation cluster and each abnormal
    tissue's share outside the normal cluster, pooled over the acquisition's evaluation cells, which lie inside the
    lung mask; where the scans counted what the mask holds (:func:`mask_holds`), also ``<tissue>_found``: that share
    times the mask's share of the tissue, i.e. of all the tissue, the part the map shows outside normal lung. ``min``
    holds the worst acquisition. Empty without truth; a tissue absent from an acquisition's scans is left out
    there."""
    if not eval_scans or any(s.truth is None for s in eval_scans):
        return {}
    held = mask_holds(eval_scans).get("per_acquisition", {})
    out = {}
    for n, ref in references.items():
        per_acq: Dict[str, dict] = {}
        for acq, scans in _by_acquisition(eval_scans).items():
            labels = np.concatenate([s.labels[n] for s in scans])
            truth = np.concatenate([s.truth for s in scans])
            record = {}
            emphysema = truth == TISSUE_LABELS["emphysema"]
            if emphysema.any():
                record["emphysema_recall"] = float(np.mean(labels[emphysema] == ref["low_attenuation"]))
            for t in OUTSIDE_NORMAL_TISSUES:
                cells = truth == TISSUE_LABELS[t]
                if cells.any():
                    record[f"{t}_outside_normal"] = float(np.mean(labels[cells] != ref["normal"]))
                    if t in held.get(acq, {}):
                        record[f"{t}_found"] = record[f"{t}_outside_normal"] * held[acq][t]
            per_acq[acq] = record
        keys = sorted({k for r in per_acq.values() for k in r})
        out[n] = {"per_acquisition": per_acq,
                  "min": {k: float(min(r[k] for r in per_acq.values() if k in r)) for k in keys},
                  **ref}
    return out


def _kernel_pairs(scans: Sequence) -> List[tuple]:
    """(soft, sharp) scans of one patient whose settings differ in the kernel only."""
    pairs = []
    for soft in scans:
        if soft.setting.get("kernel") != "soft":
            continue
        for sharp in scans:
            if sharp.patient == soft.patient and sharp.split == soft.split and sharp.setting.get("kernel") == "sharp" \
                    and all(soft.setting.get(c) == sharp.setting.get(c) for c in SETTING_COLUMNS if c not in KERNEL_COLUMNS):
                pairs.append((soft, sharp))
                break
    return pairs


def kernel_robustness(eval_scans: Sequence, references: Dict[str, dict]) -> dict:
    """Mean absolute change (percentage points) between soft and sharp reconstructions of the same patient of each
    representation's low-attenuation cluster share of the lung (representations without one are left out), and of
    LAA-950, raw and noise-matched (``laa950_matched``, where the scans have it); empty when no patient has such a
    pair (the cohort table needs a ``kernel`` column)."""
    pairs = _kernel_pairs(eval_scans)
    if not pairs:
        return {}

    def share(s, n):
        return 100.0 * float(np.mean(s.labels[n] == references[n]["low_attenuation"]))

    out = {n: {"mean_abs_change_points": float(np.mean([abs(share(b, n) - share(a, n)) for a, b in pairs])),
               "mean_change_points": float(np.mean([share(b, n) - share(a, n) for a, b in pairs])),
               "mean_share_soft_percent": float(np.mean([share(a, n) for a, _ in pairs]))}
           for n, ref in references.items() if ref["low_attenuation"] is not None}
    for key in ("laa950", "laa950_matched"):
        laa = [(a.densitometry[key], b.densitometry[key]) for a, b in pairs if key in a.densitometry]
        if laa:
            out[key] = {"mean_abs_change_points": float(np.mean([abs(b - a) for a, b in laa])),
                        "mean_change_points": float(np.mean([b - a for a, b in laa])),
                        "mean_share_soft_percent": float(np.mean([a for a, _ in laa]))}
    out["n_pairs"] = len(pairs)
    return out


def recall_rows(metrics: dict) -> List[List[str]]:
    """Rows of the tissue-recall table (worst acquisition): representation, low-attenuation cluster's median HU,
    emphysema recall, and each abnormal tissue's share outside the normal cluster (report and README); then, where
    the evaluation counted it, a row with the share of each tissue inside the lung mask, which bounds them all."""
    rows = []
    for n, m in metrics.get("tissue_recall", {}).items():
        worst = m["min"]
        cells = [f"{worst[k]:.2f}" if k in worst else "–"
                 for k in ("emphysema_recall", *(f"{t}_outside_normal" for t in OUTSIDE_NORMAL_TISSUES))]
        low = m["low_attenuation_median_hu"]
        rows.append([n, f"{m['normal_median_hu']:.0f}", "none" if low is None else f"{low:.0f}", *cells])
    held = metrics.get("tissue_in_mask", {}).get("min")
    if rows and held:
        rows.append([MASK_ROW, "", "", *(f"{held[t]:.2f}" if t in held else "–"
                                         for t in ("emphysema", *OUTSIDE_NORMAL_TISSUES))])
    return rows


MASK_ROW = "inside the lung mask (every representation)"


RECALL_HEAD = ["representation", "normal cluster median HU", "low-attenuation cluster median HU", "emphysema recall",
               *(f"{t.replace('_', ' ')} outside normal" for t in OUTSIDE_NORMAL_TISSUES)]
KERNEL_HEAD = ["features", "mean absolute change soft to sharp (points)", "mean change sharp minus soft (points)",
               "share in the soft scan (%)"]


def kernel_rows(metrics: dict) -> List[List[str]]:
    """Rows of the kernel-robustness table: per representation (low-attenuation cluster) and LAA-950."""
    return [[n, f"{m['mean_abs_change_points']:.2f}", f"{m['mean_change_points']:+.2f}", f"{m['mean_share_soft_percent']:.1f}"]
            for n, m in metrics.get("kernel_robustness", {}).items() if n != "n_pairs"]


OUTSIDE_MASK = "outside the lung mask"  # label_makeup's segment of the true lung the label map leaves out


def label_makeup(labels: np.ndarray, truth: np.ndarray, names: Dict[int, str]) -> Dict[str, Dict[str, int]]:
    """Voxel counts of a label map against the phantom's tissue truth on the same grid: for each segment that holds
    true lung, named by ``names`` (its label value otherwise), the count of each tissue of :data:`TISSUES`. True lung
    the map leaves out (label 0: outside the lung mask) is the segment :data:`OUTSIDE_MASK`, since the map cannot
    show tissue the mask missed; voxels outside the truth's lung are left out."""
    labels, truth = np.asarray(labels), np.asarray(truth)
    if labels.shape != truth.shape:
        raise InputError(f"The label map {labels.shape} and the tissue truth {truth.shape} must be on one grid.")
    names = {0: OUTSIDE_MASK, **names}
    keep = (truth > 0) & (truth <= len(TISSUES))
    width = len(TISSUES) + 1
    counts = np.bincount(labels[keep].astype(np.int64) * width + truth[keep], minlength=width)
    out: Dict[str, Dict[str, int]] = {}
    for code in np.flatnonzero(counts):
        label, tissue = divmod(int(code), width)
        segment = out.setdefault(names.get(label, str(label)), dict.fromkeys(TISSUES, 0))
        segment[TISSUES[tissue - 1]] += int(counts[code])
    return out


def add_makeups(total: Dict[str, Dict[str, int]], makeup: Dict[str, Dict[str, int]]) -> Dict[str, Dict[str, int]]:
    """The voxel counts of two make-ups (:func:`label_makeup`) summed, segment by segment."""
    out = {name: dict(counts) for name, counts in total.items()}
    for name, counts in makeup.items():
        segment = out.setdefault(name, dict.fromkeys(TISSUES, 0))
        for tissue, n in counts.items():
            segment[tissue] += n
    return out


def name_support(makeup: Dict[str, Dict[str, int]]) -> Dict[str, float]:
    """For each disease-like segment name in a make-up (a repeated one, "ground-glass-like 2", included): the share
    of its voxels that are the tissue it names (an honest name holds mostly that tissue)."""
    return {name: counts[NAMED_TISSUE[base_name(name)]] / max(sum(counts.values()), 1)
            for name, counts in makeup.items() if base_name(name) in NAMED_TISSUE}
