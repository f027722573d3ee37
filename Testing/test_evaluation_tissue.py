"""Tissue measurements of evaluate: equal-scale threshold classes, tissue recall, kernel robustness and
each cluster's stability across acquisitions; and the label make-up of an analysed phantom scan."""
from __future__ import annotations

import numpy as np
import pytest

from latentharmonize.evaluation.cluster_stability import cluster_stability, stability_rows
from latentharmonize.evaluation.encoding import ScanLatents
from latentharmonize.evaluation.goals import goal_check, relative_gains
from latentharmonize.errors import InputError
from latentharmonize.evaluation.tissue import (MASK_ROW, OUTSIDE_MASK, PATCH_MEAN_HU, add_makeups,
                                               kernel_robustness, label_makeup, low_attenuation_cluster, mask_holds,
                                               name_support, normal_cluster, patch_mean_hu, recall_rows,
                                               reference_clusters, threshold_classes, tissue_in_mask, tissue_recall)
from latentharmonize.patches import PatchSpec
from latentharmonize.tissue import TISSUE_LABELS, TISSUES

EMPH, NORMAL, RETIC = TISSUE_LABELS["emphysema"], TISSUE_LABELS["normal"], TISSUE_LABELS["reticulation"]


def _scan(patient, acquisition, labels, truth, mean_hu, laa950=5.0, split="eval", **setting):
    n = len(truth)
    return ScanLatents(patient=patient, acquisition=acquisition, split=split, keys=np.zeros((n, 3), np.int64),
                       positions=np.zeros((n, 3), np.int64), latents={PATCH_MEAN_HU: np.asarray(mean_hu, float)[:, None]},
                       truth=np.asarray(truth), densitometry={"laa950": laa950}, clinical={},
                       labels={"rep": np.asarray(labels)}, setting=setting)


def test_threshold_classes_cut_at_minus_950_700_300():
    values = np.array([-1000.0, -950.0, -800.0, -700.01, -700.0, -300.0, 40.0])
    assert threshold_classes(values[:, None]).tolist() == [1, 2, 2, 2, 3, 4, 4]


def test_patch_mean_hu_averages_the_lung_voxels_of_each_patch():
    spec = PatchSpec()
    rng = np.random.default_rng(0)
    hu = rng.normal(-800, 100, (5, 40, 40)).astype(np.float32)
    lung = np.zeros(hu.shape, bool)
    lung[:, 4:30, 6:36] = True
    positions = np.array([[0, 1, 2], [2, 3, 1]])
    out = patch_mean_hu(hu, lung, positions, spec)
    for (z, i, j), value in zip(positions, out[:, 0]):
        window = (slice(z, z + 3), slice(4 * i, 4 * i + 16), slice(4 * j, 4 * j + 16))
        assert value == pytest.approx(hu[window][lung[window]].mean(), rel=1e-5)
    with pytest.raises(Exception, match="no lung voxel"):
        patch_mean_hu(hu, np.zeros_like(lung), positions, spec)


def test_reference_clusters_pick_the_normal_majority_and_a_lower_cluster_beside_it():
    labels = np.array([1, 1, 2, 2, 3, 3, 3])
    hu = np.array([-850, -860, -700, -650, -960, -990, -600])  # cluster 3's median -960 is the lowest
    truth = np.array([NORMAL, NORMAL, NORMAL, RETIC, EMPH, EMPH, NORMAL])
    assert normal_cluster(labels, truth) == 1 and normal_cluster(labels) == 3  # without truth: the largest
    assert low_attenuation_cluster(labels, hu, normal=1) == 3
    ref = reference_clusters([_scan("p", "a", labels, truth, hu, split="train")], ["rep"])
    assert ref == {"rep": {"normal": 1, "normal_median_hu": -855.0, "low_attenuation": 3,
                           "low_attenuation_median_hu": -960.0}}
    # the lowest cluster holds most normal lung: there is no low-attenuation cluster, and emphysema recall is 0
    truth = np.array([EMPH, EMPH, NORMAL, RETIC, NORMAL, NORMAL, EMPH])
    ref = reference_clusters([_scan("p", "a", labels, truth, hu, split="train")], ["rep"])
    assert ref["rep"]["normal"] == 3 and ref["rep"]["low_attenuation"] is None
    recall = tissue_recall([_scan("p", "a", labels, truth, hu)], ref)["rep"]
    assert recall["min"]["emphysema_recall"] == 0.0
    assert kernel_robustness([_scan("p", "s", labels, truth, hu, kernel="soft"),
                              _scan("p", "h", labels, truth, hu, kernel="sharp")], ref) == {
        "laa950": {"mean_abs_change_points": 0.0, "mean_change_points": 0.0, "mean_share_soft_percent": 5.0},
        "n_pairs": 1}


def test_tissue_recall_is_per_acquisition_and_keeps_the_worst():
    ref = {"rep": {"low_attenuation": 3, "low_attenuation_median_hu": -960.0, "normal": 1}}
    truth = np.array([EMPH] * 4 + [RETIC] * 4 + [NORMAL] * 2)
    soft = _scan("p", "soft", [3, 3, 3, 3, 2, 2, 2, 1, 1, 1], truth, np.zeros(10))   # recall 1.0, retic 0.75 out
    sharp = _scan("p", "sharp", [3, 1, 1, 3, 1, 1, 2, 1, 1, 1], truth, np.zeros(10))  # recall 0.5, retic 0.25 out
    out = tissue_recall([soft, sharp], ref)["rep"]
    assert out["per_acquisition"]["soft"] == {"emphysema_recall": 1.0, "reticulation_outside_normal": 0.75}
    assert out["per_acquisition"]["sharp"] == {"emphysema_recall": 0.5, "reticulation_outside_normal": 0.25}
    assert out["min"] == {"emphysema_recall": 0.5, "reticulation_outside_normal": 0.25}
    no_truth = _scan("p", "soft", [1], [NORMAL], [0.0])
    no_truth.truth = None
    assert tissue_recall([no_truth], ref) == {}


def test_what_the_mask_holds_bounds_the_tissue_the_map_finds():
    """The cells lie inside the lung mask; a tissue the mask half leaves out is half found at best."""
    import SimpleITK as sitk

    truth = np.zeros((4, 4, 4), np.uint8)
    truth[:2], truth[2:, :2] = NORMAL, RETIC  # 32 normal, 16 reticulation voxels
    lungs = truth.copy()
    lungs[2:, :2, :2] = 0  # the mask leaves out half the reticulation
    images = []
    for array in (truth, np.zeros(truth.shape, np.int16), lungs):  # truth, CT, lung mask
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((2.0, 2.0, 2.0))
        images.append(image)
    held = tissue_in_mask(*images)
    assert held == {"normal": [32, 32], "reticulation": [8, 16]}  # tissues absent from the truth are left out

    ref = {"rep": {"low_attenuation": 3, "normal": 1}}
    cells = np.array([RETIC] * 4 + [NORMAL] * 2)
    soft = _scan("p", "soft", [2, 2, 2, 1, 1, 1], cells, np.zeros(6))  # 0.75 of the reticulation cells outside normal
    sharp = _scan("q", "soft", [2, 2, 2, 2, 1, 1], cells, np.zeros(6))
    soft.mask_holds, sharp.mask_holds = held, {"reticulation": [16, 16]}
    assert mask_holds([soft, sharp]) == {"per_acquisition": {"soft": {"normal": 1.0, "reticulation": 0.75}},
                                         "min": {"normal": 1.0, "reticulation": 0.75}}  # pooled: 24 of 32
    record = tissue_recall([soft, sharp], ref)["rep"]["per_acquisition"]["soft"]
    assert record["reticulation_outside_normal"] == pytest.approx(0.875)
    assert record["reticulation_found"] == pytest.approx(0.875 * 0.75)
    assert mask_holds([_scan("p", "soft", [1], [NORMAL], [0.0])]) == {}  # scans that did not count
    assert recall_rows({"tissue_recall": {}, "tissue_in_mask": {"min": {"reticulation": 0.75}}}) == []
    rows = recall_rows({"tissue_recall": {"rep": {"min": {}, "normal_median_hu": -850.0,
                                                  "low_attenuation_median_hu": None}},
                        "tissue_in_mask": {"min": {"reticulation": 0.75}}})
    assert rows[-1] == [MASK_ROW, "", "", "–", "–", "0.75", "–", "–"]


def test_kernel_robustness_pairs_soft_and_sharp_under_equal_settings_only():
    ref = {"rep": {"low_attenuation": 3}}
    truth = np.full(10, NORMAL)
    scans = [
        _scan("p1", "s", [3] * 2 + [1] * 8, truth, np.zeros(10), laa950=5.0, kernel="soft", vendor="A"),
        _scan("p1", "h", [3] * 3 + [1] * 7, truth, np.zeros(10), laa950=15.0, kernel="sharp", vendor="A"),
        _scan("p1", "hB", [3] * 10, truth, np.zeros(10), laa950=40.0, kernel="sharp", vendor="B"),  # other vendor
        _scan("p2", "s", [3] * 4 + [1] * 6, truth, np.zeros(10), laa950=2.0, kernel="soft", vendor="A"),
        _scan("p2", "h", [3] * 2 + [1] * 8, truth, np.zeros(10), laa950=10.0, kernel="sharp", vendor="A"),
    ]
    out = kernel_robustness(scans, ref)
    assert out["n_pairs"] == 2
    assert out["rep"]["mean_abs_change_points"] == pytest.approx(15.0)   # |30-20| and |20-40|
    assert out["rep"]["mean_change_points"] == pytest.approx(-5.0)
    assert out["laa950"]["mean_abs_change_points"] == pytest.approx(9.0)
    assert kernel_robustness(scans[:1] + scans[2:3], ref) == {}


def test_goal_check_reports_the_tissue_goals():
    cons = {"entangled": {"ari": 0.5, "nmi": 0.5, "dice": 0.6}, "rotated": {"ari": 0.8, "nmi": 0.7, "dice": 0.8},
            "hu_threshold_classes": {"ari": 0.85, "nmi": 0.6, "dice": 0.9}}
    metrics = {"consistency": cons, "relative_gain": relative_gains(cons), "probe": {"rotated": 0.3, "chance": 0.25},
               "truth_agreement": {"rotated": {"ari": 0.4}, "hu_statistics": {"ari": 0.45}},
               "tissue_recall": {"rotated": {"min": {"emphysema_recall": 0.72, "reticulation_outside_normal": 0.4,
                                                     "consolidation_outside_normal": 0.9}}},
               "kernel_robustness": {"rotated": {"mean_abs_change_points": 0.6}, "n_pairs": 2}}
    goal = goal_check(metrics)
    assert goal["rotated_beats_baselines"] == {"hu_threshold_classes": False}
    assert goal["truth_ari_at_least_hu_statistics"] is False
    assert goal["emphysema_recall_at_least_0.7"] is True
    assert goal["abnormal_mostly_outside_normal"] == {"reticulation": False, "consolidation": True}
    # counted over all of it: a consolidation the mask mostly leaves out is not mostly found
    metrics["tissue_recall"]["rotated"]["min"]["consolidation_found"] = 0.2
    assert goal_check(metrics)["abnormal_mostly_outside_normal"] == {"reticulation": False, "consolidation": False}
    del metrics["tissue_recall"]["rotated"]["min"]["consolidation_found"]
    assert goal["low_attenuation_kernel_change_at_most_0.5_points"] is False
    metrics["kernel_robustness"] = {"laa950": {"mean_abs_change_points": 10.0}, "n_pairs": 2}  # rotated has none
    assert goal_check(metrics)["low_attenuation_kernel_change_at_most_0.5_points"] is False
    metrics["kernel_robustness"]["rotated"] = {"mean_abs_change_points": 0.4}
    assert goal_check(metrics)["low_attenuation_kernel_change_at_most_0.5_points"] is True


def test_cluster_stability_follows_each_cluster_across_a_patients_acquisitions():
    def scan(patient, acquisition, labels, mean_hu):
        s = _scan(patient, acquisition, labels, np.full(len(labels), NORMAL), mean_hu)
        s.keys = np.column_stack([np.arange(len(labels)), np.zeros((len(labels), 2), np.int64)])  # one point per row
        return s

    hu = [-850, -840, -830, -820, -700, -690, -950, -960]
    scans = [scan("p", "a", [1, 1, 1, 1, 2, 2, 3, 3], hu), scan("p", "b", [1, 1, 1, 2, 2, 2, 1, 1], hu),
             scan("q", "a", [1, 2], [-850, -700]), scan("q", "b", [1, 2], [-850, -700])]
    named = {"rep": ["low", "normal", "raised"]}
    records = {c["label"]: c for c in cluster_stability(scans, scans, ["rep"], named)["rep"]}
    # patient p: cluster 1 holds rows 0-3 in one scan, 0-2 and 6-7 in the other; q agrees everywhere
    assert records[1]["dice"] == pytest.approx((2 * 3 / 9 + 1.0) / 2)
    assert records[2]["dice"] == pytest.approx((2 * 2 / 5 + 1.0) / 2)
    # cluster 3 is in one scan of p only (Dice 0) and in no scan of q, whose pair does not count for its Dice
    assert records[3]["dice"] == 0.0 and records[3]["pairs_with_cluster"] == 1
    assert records[3]["mean_abs_share_change_points"] == pytest.approx((25.0 + 0.0) / 2)
    assert records[1]["mean_abs_share_change_points"] == pytest.approx((12.5 + 0.0) / 2)
    assert records[3]["median_patch_hu"] == pytest.approx(-955.0)
    assert sum(c["share_percent"] for c in records.values()) == pytest.approx(100.0)
    assert [records[k]["name"] for k in (1, 2, 3)] == ["low", "normal", "raised"]
    rows = stability_rows({"cluster_stability": {"rep": list(records.values())}})
    assert [r[:3] for r in rows] == [["rep", "1", "low"], ["rep", "2", "normal"], ["rep", "3", "raised"]]
    assert rows[2][5] == "0.000"  # cluster 3's Dice
    assert cluster_stability(scans, scans, ["rep"])["rep"][0]["name"] is None  # clusters that keep no names


def test_label_makeup_counts_each_segments_true_tissue_and_checks_disease_names():
    GG, CONS = TISSUE_LABELS["ground_glass"], TISSUE_LABELS["consolidation"]
    labels = np.array([[0, 1, 1, 1, 3, 3, 3, 3, 200, 1]])
    truth = np.array([[NORMAL, NORMAL, NORMAL, EMPH, GG, GG, GG, NORMAL, NORMAL, 0]])
    names = {1: "normal-appearing lung", 3: "ground-glass-like", 200: "vessels"}
    makeup = label_makeup(labels, truth, names)  # truth 0 voxels left out
    assert makeup[OUTSIDE_MASK] == {**dict.fromkeys(TISSUES, 0), "normal": 1}  # true lung the mask missed
    assert makeup["normal-appearing lung"]["normal"] == 2 and makeup["normal-appearing lung"]["emphysema"] == 1
    assert makeup["ground-glass-like"]["ground_glass"] == 3 and makeup["ground-glass-like"]["normal"] == 1
    assert makeup["vessels"]["normal"] == 1 and sum(makeup["vessels"].values()) == 1
    assert name_support(makeup) == {"ground-glass-like": 0.75}  # neither normal lung nor vessels name a disease
    other = label_makeup(np.array([3, 5]), np.array([CONS, CONS]), {3: "ground-glass-like", 5: "consolidation-like"})
    total = add_makeups(makeup, other)
    assert total["ground-glass-like"]["consolidation"] == 1 and total["ground-glass-like"]["ground_glass"] == 3
    assert name_support(total) == {"ground-glass-like": 0.6, "consolidation-like": 1.0}
    repeated = label_makeup(np.array([4, 4]), np.array([GG, NORMAL]), {4: "ground-glass-like 2"})
    assert name_support(repeated) == {"ground-glass-like 2": 0.5}  # a repeated name claims the same tissue
    assert makeup["ground-glass-like"]["consolidation"] == 0  # the summed make-up is a new one
    with pytest.raises(InputError, match="one grid"):
        label_makeup(labels, truth[:, :5], names)


def test_goal_check_judges_the_painted_map_by_its_own_paired_verdicts():
    def diff(low, high):
        return {"ci": [low, high], "difference": (low + high) / 2}

    cons = {"entangled": {"ari": 0.5, "nmi": 0.5, "dice": 0.6}, "rotated": {"ari": 0.8, "nmi": 0.7, "dice": 0.8},
            "bundle_clusters": {"ari": 0.9, "nmi": 0.8, "dice": 0.85},
            "combat": {"ari": 0.85, "nmi": 0.75, "dice": 0.9}, "leace": {"ari": 0.7, "nmi": 0.6, "dice": 0.7}}
    better, tie = diff(0.01, 0.05), diff(-0.01, 0.03)
    metrics = {"consistency": cons, "relative_gain": relative_gains(cons),
               "probe": {"rotated": 0.4, "bundle_clusters": 0.28, "chance": 0.25},
               "bundle_versus": {"combat": {"ari": better, "nmi": better, "dice": diff(-0.06, -0.02)},
                                 "leace": {"ari": better, "nmi": better, "dice": better},
                                 "entangled": {"ari": better, "nmi": better, "dice": better, "c_index": better},
                                 "hu_thresholds": {"c_index": tie}, "hu_statistics": {"c_index": tie}},
               "truth_agreement": {"rotated": {"ari": 0.4}, "bundle_clusters": {"ari": 0.5},
                                   "hu_statistics": {"ari": 0.45}},
               "tissue_recall": {"rotated": {"min": {"emphysema_recall": 0.6}},
                                 "bundle_clusters": {"min": {"emphysema_recall": 0.8,
                                                             "reticulation_outside_normal": 0.7,
                                                             "reticulation_found": 0.45}}},
               "kernel_robustness": {"rotated": {"mean_abs_change_points": 0.6},
                                     "bundle_clusters": {"mean_abs_change_points": 0.4}, "n_pairs": 2}}
    goal = goal_check(metrics)
    painted = goal["painted_map"]
    # rotated's own goals still read the refitted clusters
    assert goal["truth_ari_at_least_hu_statistics"] is False and goal["emphysema_recall_at_least_0.7"] is False
    assert painted["paired_better_than_baselines"] == {"combat": False, "leace": True}
    assert painted["probe_near_chance"] is True
    assert painted["survival_paired_better"] == {"entangled": True, "hu_thresholds": False}
    assert painted["survival_at_least_hu_statistics"] is True
    assert painted["truth_ari_at_least_hu_statistics"] is True
    assert painted["emphysema_recall_at_least_0.7"] is True
    assert painted["abnormal_mostly_outside_normal"] == {"reticulation": False}  # counted over all of it
    assert painted["low_attenuation_kernel_change_at_most_0.5_points"] is True
    assert "truth_ari_at_least_hu_statistics_over_seeds" not in painted  # the bundle is fitted once, by train
    del metrics["bundle_versus"]
    assert "painted_map" not in goal_check(metrics)
