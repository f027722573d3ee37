"""Evaluation: measurements on synthetic encoded scans, and an end-to-end run on a tiny phantom cohort."""
from __future__ import annotations

import numpy as np
import pytest

from latentharmonize.evaluate import (PAPER_GAIN_PERCENT, ScanLatents, consistency, goal_check, patient_profiles, probe,
                                      relative_gains, truth_agreement)


def _scan(patient, acquisition, keys, labels, truth=None, latents=None, time=1.0, event=1):
    n = len(keys)
    return ScanLatents(patient=patient, acquisition=acquisition, split="eval", keys=np.asarray(keys, np.int64),
                       positions=np.asarray(keys, np.int64), latents={"entangled": latents if latents is not None else np.zeros((n, 2))},
                       truth=truth, densitometry={"laa950": 1.0, "haa700": 2.0, "mld": -850.0, "perc15": -900.0},
                       clinical={"time": time, "event": event}, labels=labels)


def _grid_keys(n, shift=0):
    return [(0, i + shift, 0) for i in range(n)]


def test_consistency_compares_labels_at_common_points_only():
    rng = np.random.default_rng(0)
    scans = []
    for p in range(3):
        truth = rng.integers(1, 4, 40)
        # acquisition b covers points 5..44: only 5..39 are shared with a
        a = _scan(f"p{p}", "a", _grid_keys(40), {"stable": truth.copy(), "noisy": truth.copy()})
        b_truth = np.concatenate([truth[5:], rng.integers(1, 4, 5)])
        noisy = np.where(rng.random(40) < 0.5, rng.integers(1, 4, 40), b_truth)
        b = _scan(f"p{p}", "b", _grid_keys(40, shift=5), {"stable": (b_truth % 3) + 7, "noisy": noisy})  # renamed labels
        scans += [a, b]
    out = consistency(scans, ["stable", "noisy"], n_boot=100, seed=0)
    assert out["stable"]["ari"] == pytest.approx(1.0)
    assert out["stable"]["dice"] == pytest.approx(1.0)
    assert out["noisy"]["ari"] < 0.7
    assert out["stable"]["n_patients"] == 3
    assert out["stable"]["mean_common_points"] == 35


def test_truth_agreement_and_profiles():
    truth = np.array([1, 1, 2, 2, 0, 3])
    s1 = _scan("p0", "a", _grid_keys(6), {"r": np.array([2, 2, 1, 1, 1, 3])}, truth=truth)
    s2 = _scan("p0", "b", _grid_keys(6), {"r": np.array([2, 2, 1, 3, 1, 3])}, truth=truth)
    agreement = truth_agreement([s1, s2], ["r"], n_boot=50, seed=0)
    assert agreement["r"]["ari"] < 1.0
    assert truth_agreement([s1], ["r"], n_boot=50, seed=0)["r"]["ari"] == pytest.approx(1.0)  # background excluded
    table = patient_profiles([s1, s2], ["r"], n_clusters=3)
    assert table.loc[0, "r:frac_1"] == pytest.approx(np.mean([3 / 6, 2 / 6]))
    assert table.loc[0, "laa950"] == 1.0 and table.loc[0, "time"] == 1.0


def test_probe_detects_acquisition_signal():
    rng = np.random.default_rng(1)
    scans = []
    for p in range(4):
        for acq, shift in (("soft", 0.0), ("sharp", 2.0)):
            X = rng.normal(size=(200, 3))
            s = _scan(f"p{p}", acq, _grid_keys(200), {}, latents=X)
            s.latents["shifted"] = X + shift
            scans.append(s)
    acc = probe(scans, {"clean": lambda s: s.latents["entangled"], "shifted": lambda s: s.latents["shifted"]}, 800, 0)
    assert acc["chance"] == pytest.approx(0.5)
    assert acc["shifted"] > 0.9
    assert abs(acc["clean"] - 0.5) < 0.1


def test_gains_and_goal_check():
    cons = {"entangled": {"ari": 0.5, "nmi": 0.5, "dice": 0.6}, "rotated": {"ari": 0.65, "nmi": 0.55, "dice": 0.7},
            "combat": {"ari": 0.6, "nmi": 0.6, "dice": 0.6}}
    gains = relative_gains(cons)
    assert gains["rotated_vs_entangled_percent"]["ari"] == pytest.approx(30.0)
    assert gains["paper_percent"] == PAPER_GAIN_PERCENT
    goal = goal_check({"consistency": cons, "relative_gain": gains, "probe": {"rotated": 0.52, "chance": 0.5},
                       "survival": {"rotated": {"c_index": 0.7}, "entangled": {"c_index": 0.6}, "hu_thresholds": {"c_index": 0.75}}})
    assert goal["gain_at_least_paper"] == {"ari": True, "nmi": False, "dice": True}
    assert goal["rotated_beats_baselines"] == {"combat": False}
    assert goal["probe_near_chance"] is True
    assert goal["survival_rotated_beats"] == {"entangled": True, "hu_thresholds": False}
