"""Consistency metrics between two label maps sampled at corresponding locations.

Cluster labels are arbitrary names, so every metric here is invariant to a permutation of the
labels: ARI and NMI by construction (scikit-learn), Dice after matching the clusters of one map to
those of the other with the Hungarian algorithm (scipy). Per-patient scores are summarised by
their mean and a percentile bootstrap 95 % confidence interval over patients.

For a number measured on every scan of a patient (a predicted risk), the agreement across acquisitions is the
intraclass correlation ICC(A,1). It is computed here from the two-way ANOVA mean squares rather than with
``pingouin.intraclass_corr``: that would bring statsmodels, seaborn and pandas-flavor into Slicer's Python for a
formula of a few lines, and the bootstrap evaluates it thousands of times on resampled patients.
"""
from __future__ import annotations

from typing import Dict, Iterable, Sequence, Tuple

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.metrics.cluster import contingency_matrix

from ..errors import InputError
from ..survival import percentile_ci

METRICS = ("ari", "nmi", "dice")


def _check_label_pair(a, b) -> Tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a).ravel()
    b = np.asarray(b).ravel()
    if a.shape != b.shape:
        raise InputError(f"Label arrays must have one label per corresponding location; got {a.size} and {b.size} labels. "
                         "Sample both maps at the same locations first.")
    if a.size == 0:
        raise InputError("Label arrays are empty: the two maps share no location to compare.")
    return a, b


def mask_dice(a, b) -> float:
    """Dice of two boolean masks of one grid (0 when both are empty)."""
    return float(2 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1))


def matched_dice(a, b) -> float:
    """Mean Dice over clusters after optimally matching the labels of ``a`` to those of ``b``.

    Clusters are paired one-to-one to maximise the total Dice (Hungarian algorithm). When the maps
    have different numbers of clusters, the unpaired clusters count as Dice 0, so the mean is taken
    over ``max(n_clusters_a, n_clusters_b)`` clusters.
    """
    a, b = _check_label_pair(a, b)
    counts = contingency_matrix(a, b)  # [clusters of a, clusters of b]
    sizes_a = counts.sum(axis=1, keepdims=True)
    sizes_b = counts.sum(axis=0, keepdims=True)
    dice = 2.0 * counts / (sizes_a + sizes_b)
    rows, cols = linear_sum_assignment(dice, maximize=True)
    return float(dice[rows, cols].sum() / max(dice.shape))


def label_agreement(a, b) -> Dict[str, float]:
    """ARI, NMI and matched Dice between two label arrays at corresponding locations."""
    a, b = _check_label_pair(a, b)
    return {
        "ari": float(adjusted_rand_score(a, b)),
        "nmi": float(normalized_mutual_info_score(a, b)),
        "dice": matched_dice(a, b),
    }


def bootstrap_ci(values: Sequence[float], n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> Tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of ``values`` (one value per patient)."""
    values = np.asarray(values, dtype=float).ravel()
    if values.size == 0 or not np.all(np.isfinite(values)):
        raise InputError(f"Bootstrap needs at least one finite value per patient; got {values.size} values "
                         f"({int(np.sum(~np.isfinite(values)))} not finite).")
    if not 0.0 < level < 1.0:
        raise InputError(f"Confidence level must lie in (0, 1); got {level}.")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(n_boot, values.size))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def paired_difference(a: Sequence[float], b: Sequence[float], n_boot: int = 2000, seed: int = 0) -> Dict[str, object]:
    """Mean of ``a - b`` over patients measured both ways, with the bootstrap 95 % CI of that mean.

    Pairing removes what the patients share (some patients are harder for every method), so a difference can be
    clear even when the two methods' own CIs overlap, or a tie even when one mean is higher.
    """
    a, b = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    if a.shape != b.shape:
        raise InputError(f"Paired values need one value per patient on both sides; got {a.size} and {b.size}.")
    return {"difference": float(np.mean(a - b)), "ci": list(bootstrap_ci(a - b, n_boot=n_boot, seed=seed))}


def summarize(per_patient: Iterable[Dict[str, float]], n_boot: int = 2000, seed: int = 0) -> Dict[str, object]:
    """Mean and bootstrap 95 % CI over patients of each metric found in the per-patient records.

    Returns ``{"ari": mean, "ari_ci": [low, high], ..., "n_patients": n}``.
    """
    records = list(per_patient)
    if not records:
        raise InputError("No patient to summarise: the evaluation cohort needs patients with at least two acquisitions.")
    out: Dict[str, object] = {}
    for name in records[0]:
        values = [r[name] for r in records]
        out[name] = float(np.mean(values))
        out[f"{name}_ci"] = list(bootstrap_ci(values, n_boot=n_boot, seed=seed))
    out["n_patients"] = len(records)
    return out


def mean_pairwise_agreement(labels: Sequence[np.ndarray]) -> Dict[str, float]:
    """Average :func:`label_agreement` over every pair of label arrays (e.g. one per acquisition of a patient)."""
    if len(labels) < 2:
        raise InputError(f"Pairwise agreement needs at least two label arrays; got {len(labels)}.")
    scores = [label_agreement(labels[i], labels[j]) for i in range(len(labels)) for j in range(i + 1, len(labels))]
    return {name: float(np.mean([s[name] for s in scores])) for name in METRICS}


def _check_ratings(values) -> np.ndarray:
    Y = np.asarray(values, dtype=float)
    if Y.ndim != 2 or Y.shape[0] < 2 or Y.shape[1] < 2:
        raise InputError(f"ICC needs a [patients, acquisitions] matrix with at least 2 of each; got shape {Y.shape}.")
    if not np.all(np.isfinite(Y)):
        raise InputError(f"ICC needs finite values; {int(np.sum(~np.isfinite(Y)))} of {Y.size} are not.")
    return Y


def _icc_a1(Y: np.ndarray) -> np.ndarray:
    """ICC(A,1) of each matrix in the stack ``Y`` [..., n, k]; NaN where every value is equal (nothing to agree on)."""
    n, k = Y.shape[-2:]
    grand = Y.mean(axis=(-2, -1), keepdims=True)
    rows, cols = Y.mean(axis=-1, keepdims=True), Y.mean(axis=-2, keepdims=True)
    ms_rows = k * ((rows - grand) ** 2).sum(axis=(-2, -1)) / (n - 1)
    ms_cols = n * ((cols - grand) ** 2).sum(axis=(-2, -1)) / (k - 1)
    ms_error = ((Y - rows - cols + grand) ** 2).sum(axis=(-2, -1)) / ((n - 1) * (k - 1))
    denominator = ms_rows + (k - 1) * ms_error + k * (ms_cols - ms_error) / n
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (ms_rows - ms_error) / denominator, np.nan)


def icc_absolute_agreement(values) -> float:
    """ICC(A,1) of ``values`` [patients, acquisitions]: two-way random effects, absolute agreement, one measurement
    (McGraw & Wong 1996; Shrout & Fleiss 1979 ICC(2,1)). 1 when every acquisition gives each patient the same value;
    an acquisition that shifts everyone's value lowers it too, unlike the consistency ICC(C,1)."""
    return float(_icc_a1(_check_ratings(values)))


def icc_with_ci(matrices: Dict[str, np.ndarray], n_boot: int = 2000, seed: int = 0) -> tuple:
    """ICC(A,1) of each named [patients, acquisitions] matrix (same patients in the same rows) with a percentile
    bootstrap 95 % CI over patients, and the bootstrap ICCs themselves [n_boot, len(matrices)] (the same resamples
    for every matrix, so differences between them can be judged paired). Resamples where an ICC is undefined are
    left out of its CI."""
    names = list(matrices)
    checked = [_check_ratings(matrices[n]) for n in names]
    if len({m.shape for m in checked}) > 1:
        raise InputError("Every ICC matrix needs the same patients and acquisitions; got shapes "
                         f"{sorted({m.shape for m in checked})}.")
    stack = np.stack(checked)
    n = stack.shape[1]
    rng = np.random.default_rng(seed)
    boots = np.stack([_icc_a1(stack[:, rng.integers(0, n, n)]) for _ in range(n_boot)])
    out = {name: {"icc": float(_icc_a1(stack[j])), "icc_ci": percentile_ci(boots[:, j])} for j, name in enumerate(names)}
    return out, boots
