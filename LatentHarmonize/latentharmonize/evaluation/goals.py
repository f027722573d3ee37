"""Rotated, and the bundle's own clusters, against the rest: paired differences with their verdicts, the gain over
entangled beside the paper's, and the goal check item by item."""
from __future__ import annotations

from typing import Dict

import pandas as pd

from ..survival import c_index_difference
from .metrics import METRICS, paired_difference
from .representations import goal_baselines

PAPER_GAIN_PERCENT = {"ari": 19.01, "nmi": 16.85, "dice": 12.39}
PROBE_MARGIN = 0.05  # the issue: the acquisition probe stays within this of chance


def paired_versus(name: str, per_patient: Dict[str, list], table: pd.DataFrame, risks: dict, n_boot: int,
                  seed: int) -> dict:
    """``name`` minus every other representation (and feature set), paired over the same patients, with 95 % CIs:
    consistency ARI/NMI/Dice per evaluation patient, and survival C-index on the same bootstrap resamples.
    A CI that contains 0 means this cohort cannot tell the two apart. ``rotated`` is what the issue's goals judge;
    ``bundle_clusters`` is the map ``analyze`` paints."""
    out: Dict[str, dict] = {}
    for other, records in per_patient.items():
        if other != name:
            out[other] = {m: paired_difference([r[m] for r in per_patient[name]], [r[m] for r in records],
                                               n_boot=n_boot, seed=seed) for m in METRICS}
    if name in risks:
        for other, risk in risks.items():
            if other != name:
                out.setdefault(other, {})["c_index"] = c_index_difference(
                    table["time"], table["event"], risks[name], risk, n_boot=n_boot, seed=seed)
    return out


def relative_gains(consistency_metrics: dict) -> dict:
    """Relative gain (%) of rotated over entangled per metric, beside the paper's figures."""
    ent, rot = consistency_metrics["entangled"], consistency_metrics["rotated"]
    gains = {m: 100.0 * (rot[m] - ent[m]) / abs(ent[m]) if ent[m] else float("nan") for m in PAPER_GAIN_PERCENT}
    return {"rotated_vs_entangled_percent": gains, "paper_percent": dict(PAPER_GAIN_PERCENT)}


def goal_check(metrics: dict) -> dict:
    """The issue's goal, item by item: gains >= paper, rotated beats every baseline, probe near chance, survival."""
    cons, gains = metrics["consistency"], metrics["relative_gain"]["rotated_vs_entangled_percent"]
    baselines = goal_baselines(cons)
    out = {
        "gain_at_least_paper": {m: bool(gains[m] >= PAPER_GAIN_PERCENT[m]) for m in PAPER_GAIN_PERCENT},
        "rotated_beats_baselines": {b: bool(all(cons["rotated"][m] > cons[b][m] for m in METRICS))
                                    for b in baselines},
        "probe_near_chance": probe_near_chance(metrics["probe"], "rotated"),
    }
    surv = metrics.get("survival", {})
    if "rotated" in surv:
        out["survival_rotated_beats"] = {k: bool(surv["rotated"]["c_index"] > surv[k]["c_index"])
                                         for k in ("entangled", "hu_thresholds") if k in surv}
    out.update(tissue_goals(metrics))
    for key, verdicts in (("rotated_versus", "paired_verdict"), ("bundle_versus", "bundle_paired_verdict")):
        if metrics.get(key):
            out[verdicts] = {other: {m: paired_verdict(d["ci"]) for m, d in diffs.items()}
                             for other, diffs in metrics[key].items()}
    if "bundle_paired_verdict" in out:
        out["painted_map"] = painted_map_goals(metrics, baselines, out["bundle_paired_verdict"])
    return out


def probe_near_chance(probe: dict, name: str) -> bool:
    """Whether the acquisition probe on ``name``'s features reads within ``PROBE_MARGIN`` of chance."""
    return bool(probe[name] <= probe["chance"] + PROBE_MARGIN)


def painted_map_goals(metrics: dict, baselines, verdicts: dict) -> dict:
    """The same goals for the map ``analyze`` paints (the bundle's own clusters, ``bundle_clusters``), which no refit
    moves: consistency and survival by its paired ``verdicts`` (the issue's "paired-better"), the probe and the
    tissue goals as for rotated."""
    out = {"paired_better_than_baselines": {
        b: all(verdicts[b].get(m) == "better" for m in METRICS) for b in baselines if b in verdicts}}
    if "bundle_clusters" in metrics.get("probe", {}):
        out["probe_near_chance"] = probe_near_chance(metrics["probe"], "bundle_clusters")
    survival = {k: verdicts[k]["c_index"] for k in ("entangled", "hu_thresholds", "hu_statistics")
                if "c_index" in verdicts.get(k, {})}
    if survival:
        out["survival_paired_better"] = {k: v == "better" for k, v in survival.items() if k != "hu_statistics"}
        if "hu_statistics" in survival:
            out["survival_at_least_hu_statistics"] = survival["hu_statistics"] != "worse"
    out.update(tissue_goals(metrics, "bundle_clusters"))
    return out


def tissue_goals(metrics: dict, name: str = "rotated") -> dict:
    """Issue 19's tissue goals for the clusters ``name``, where the cohort allows them: truth ARI at least the
    ``hu_statistics`` reference's (at the run's seed, and for rotated on average over the mixture seeds), emphysema
    recall >= 0.7 and each abnormal tissue mostly (> 0.5) outside the normal cluster in every acquisition (counted
    over all of it, the part the lung mask leaves out included, where the evaluation counted that), and the
    low-attenuation share moving by <= 0.5 points soft to sharp."""
    out = {}
    truth, recall = metrics.get("truth_agreement", {}), metrics.get("tissue_recall", {}).get(name)
    if name in truth and "hu_statistics" in truth:
        out["truth_ari_at_least_hu_statistics"] = bool(truth[name]["ari"] >= truth["hu_statistics"]["ari"])
    spread = metrics.get("seed_spread", {})
    if name == "rotated" and "rotated_ahead" in spread:  # the bundle's clusters are fitted once, by train
        out["truth_ari_at_least_hu_statistics_over_seeds"] = bool(
            spread["rotated"]["truth_ari_mean"] >= spread["hu_statistics"]["truth_ari_mean"])
    if recall:
        worst = recall["min"]
        out["emphysema_recall_at_least_0.7"] = bool(worst.get("emphysema_recall", 0.0) >= 0.7)
        # of all the tissue where the mask's share was counted, else of the tissue inside the mask
        out["abnormal_mostly_outside_normal"] = {
            k[: -len("_outside_normal")]: bool(worst.get(k.replace("_outside_normal", "_found"), v) > 0.5)
            for k, v in worst.items() if k.endswith("_outside_normal")}
    kernel = metrics.get("kernel_robustness", {})
    if kernel:  # no low-attenuation cluster: nothing to quantify emphysema with, the goal is not met
        out["low_attenuation_kernel_change_at_most_0.5_points"] = bool(
            name in kernel and kernel[name]["mean_abs_change_points"] <= 0.5)
    return out


def paired_verdict(ci) -> str:
    """'better' or 'worse' when the 95 % CI of rotated minus other excludes 0, else 'tie' (this cohort cannot tell)."""
    low, high = ci
    return "better" if low > 0 else "worse" if high < 0 else "tie"
