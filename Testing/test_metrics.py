"""Consistency metrics on cases whose answers are known by hand."""
from __future__ import annotations

import numpy as np
import pytest

from latentharmonize.errors import InputError
from latentharmonize.evaluation.metrics import (bootstrap_ci, icc_absolute_agreement, icc_with_ci, label_agreement, mask_dice,
                                     matched_dice, mean_pairwise_agreement, paired_difference, summarize)


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


def test_mask_dice_hand_computed_and_zero_when_both_empty():
    a, b = np.array([1, 1, 0, 0], bool), np.array([1, 0, 1, 0], bool)
    assert mask_dice(a, b) == pytest.approx(2 * 1 / 4)
    assert mask_dice(np.zeros(3, bool), np.zeros(3, bool)) == 0.0


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


# Shrout & Fleiss (1979), Table 2: 6 targets rated by 4 judges; their Table 4 gives ICC(2,1) = 0.29.
SHROUT_FLEISS = np.array([[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]])


def test_icc_absolute_agreement_matches_the_published_example():
    assert icc_absolute_agreement(SHROUT_FLEISS) == pytest.approx(0.2898, abs=1e-4)


def test_icc_absolute_agreement_punishes_a_shifted_acquisition():
    rng = np.random.default_rng(0)
    patients = rng.normal(size=(40, 1))
    same = np.repeat(patients, 3, axis=1)
    assert icc_absolute_agreement(same) == pytest.approx(1.0)
    noisy = same + rng.normal(scale=0.5, size=same.shape)  # within-patient SD 0.5 vs between-patient SD 1
    assert 0.6 < icc_absolute_agreement(noisy) < 0.9
    shifted = same + np.array([0.0, 0.0, 2.0])  # one acquisition raises every patient's value by 2 SD
    assert icc_absolute_agreement(shifted) < 0.5


def test_icc_with_ci_is_paired_seeded_and_validated():
    rng = np.random.default_rng(1)
    patients = rng.normal(size=(30, 1))
    matrices = {"good": patients + rng.normal(scale=0.2, size=(30, 4)),
                "bad": patients + rng.normal(scale=1.5, size=(30, 4))}
    summary, boots = icc_with_ci(matrices, n_boot=300, seed=2)
    assert boots.shape == (300, 2)
    for name, m in summary.items():
        assert m["icc"] == pytest.approx(icc_absolute_agreement(matrices[name]))
        assert m["icc_ci"][0] < m["icc"] < m["icc_ci"][1]
    assert np.all(boots[:, 0] > boots[:, 1])  # the same patients in every resample: "good" wins each time
    assert icc_with_ci(matrices, n_boot=300, seed=2)[0] == summary
    with pytest.raises(InputError, match="at least 2"):
        icc_absolute_agreement(np.ones((5, 1)))
    with pytest.raises(InputError, match="finite"):
        icc_absolute_agreement(np.array([[1.0, np.nan], [2.0, 2.0]]))
    with pytest.raises(InputError, match="same patients"):
        icc_with_ci({"a": np.ones((4, 2)), "b": np.ones((5, 2))})
