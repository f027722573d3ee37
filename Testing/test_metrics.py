"""Consistency metrics on cases whose answers are known by hand."""
from __future__ import annotations

import numpy as np
import pytest

from latentharmonize.errors import InputError
from latentharmonize.metrics import (bootstrap_ci, label_agreement, matched_dice, mean_pairwise_agreement,
                                     paired_difference, summarize)


def test_identical_up_to_permutation_scores_one():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, size=500)
    permuted = np.array([3, 0, 4, 1, 2])[a] + 10  # renamed labels, same partition
    scores = label_agreement(a, permuted)
    assert scores == pytest.approx({"ari": 1.0, "nmi": 1.0, "dice": 1.0})


def test_independent_labels_score_near_zero():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 4, size=20000)
    b = rng.integers(0, 4, size=20000)
    scores = label_agreement(a, b)
    assert abs(scores["ari"]) < 0.01
    assert scores["nmi"] < 0.01
    # Dice of independent equal-size clusters is about the cluster share (1/4), not 0.
    assert scores["dice"] == pytest.approx(0.25, abs=0.02)


def test_matched_dice_hand_computed():
    a = [0, 0, 0, 1, 1, 2]
    b = [5, 5, 6, 6, 6, 7]
    # best matching 0->5 (2*2/5), 1->6 (2*2/5), 2->7 (2*1/2)
    assert matched_dice(a, b) == pytest.approx((0.8 + 0.8 + 1.0) / 3)


def test_matched_dice_counts_unpaired_clusters_as_zero():
    assert matched_dice([0, 0, 1, 1], [0, 0, 0, 0]) == pytest.approx((2 * 2 / 6 + 0.0) / 2)


def test_label_arrays_must_correspond():
    with pytest.raises(InputError, match="corresponding location"):
        label_agreement([0, 1, 2], [0, 1])
    with pytest.raises(InputError, match="empty"):
        matched_dice([], [])


def test_bootstrap_ci_brackets_mean_and_is_seeded():
    values = np.random.default_rng(2).normal(0.6, 0.1, size=40)
    low, high = bootstrap_ci(values, seed=3)
    assert low < values.mean() < high
    assert high - low < 0.1
    assert bootstrap_ci(values, seed=3) == (low, high)
    assert bootstrap_ci([0.5, 0.5, 0.5]) == (0.5, 0.5)
    with pytest.raises(InputError, match="finite"):
        bootstrap_ci([0.1, np.nan])


def test_summarize_and_pairwise_agreement():
    same = np.array([0, 0, 1, 1, 2, 2])
    shuffled = np.array([0, 1, 2, 0, 1, 2])
    p1 = mean_pairwise_agreement([same, same, same])
    p2 = mean_pairwise_agreement([same, same, shuffled])
    assert p1["ari"] == pytest.approx(1.0)
    assert p2["ari"] < p1["ari"]
    summary = summarize([p1, p2], n_boot=200)
    assert summary["n_patients"] == 2
    assert summary["ari"] == pytest.approx((p1["ari"] + p2["ari"]) / 2)
    assert summary["ari_ci"][0] <= summary["ari"] <= summary["ari_ci"][1]
    with pytest.raises(InputError, match="at least two"):
        mean_pairwise_agreement([same])


def test_paired_difference_cancels_what_patients_share():
    rng = np.random.default_rng(5)
    shared = rng.uniform(0.2, 0.9, 25)
    out = paired_difference(shared + 0.02, shared, seed=1)
    assert out["difference"] == pytest.approx(0.02)
    assert out["ci"] == pytest.approx([0.02, 0.02])
    alone = bootstrap_ci(shared + 0.02, seed=1)
    assert alone[0] < np.mean(shared)  # compared unpaired, the two means' CIs overlap
    with pytest.raises(InputError, match="both sides"):
        paired_difference([0.1, 0.2], [0.1])
