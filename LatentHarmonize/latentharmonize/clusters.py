"""Tissue clusters of the biological latent coordinates: fitting, naming and colours.

``TissueClusters`` is k-means on the biological coordinates of :class:`~latentharmonize.rotation.LatentRotation`.
Labels are ``1..K`` (0 is background in label maps); clusters are numbered in a deterministic order
(ascending mean of ``order_by``, e.g. patch mean HU, else of the first biological coordinate).

Choosing K (``n_clusters=None``): for each K in ``k_range``, pairs of random subsamples (a share
``subsample`` of the rows, without replacement) are clustered independently and the two partitions
are compared on the rows both subsamples hold, by the adjusted Rand index (ARI). A K whose
clusters are real structure gives the same partition on any subsample (ARI near 1); a K that cuts a
homogeneous group in two cuts it differently each time. The chosen K is the *largest* K whose mean
ARI is at least ``(1 - stability_tolerance)`` times the best: never less reproducible than the best choice,
but as fine-grained as reproducibility allows (tissue types are many; the most stable K alone is
often the coarsest). Subsamples rather than bootstrap resamples: repeated rows of a bootstrap draw
form artificial tight groups that make large K look stable.

Confidence of a prediction: with ``d1 <= d2`` the distances to the nearest and second-nearest
centroid, ``confidence = (d2 - d1) / (d2 + d1)`` in [0, 1]: 0 on the bisector between two centroids,
1 at a centroid.
"""
from __future__ import annotations

import numbers
import re
import warnings
from typing import Mapping, Sequence

import numpy as np
from sklearn.base import BaseEstimator, ClusterMixin
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score
from sklearn.utils.validation import check_array, check_is_fitted

from .densitometry import PROFILE_KEYS
from .errors import InputError

# Okabe & Ito (2008) colour-blind-safe set (without black), then Paul Tol's "bright" scheme.
PALETTE = tuple((r / 255.0, g / 255.0, b / 255.0) for r, g, b in (
    (86, 180, 233), (0, 158, 115), (240, 228, 66), (230, 159, 0), (204, 121, 167), (213, 94, 0), (0, 114, 178),
    (68, 119, 170), (102, 204, 238), (34, 136, 51), (204, 187, 68), (238, 102, 119), (170, 51, 119), (187, 187, 187),
))

LOW_ATTENUATION = "low attenuation, emphysema-like"
NORMAL = "normal-appearing lung"
GROUND_GLASS = "ground-glass-like"
RETICULAR = "reticular-like"
HONEYCOMB = "honeycombing-like"
DENSE = "consolidation-like"
HIGHER = "higher-attenuation lung"
LOWER = "lower-attenuation lung"
TISSUE_NAMES = (LOW_ATTENUATION, NORMAL, GROUND_GLASS, RETICULAR, HONEYCOMB, DENSE, HIGHER, LOWER)
DISEASE_NAMES = (LOW_ATTENUATION, GROUND_GLASS, RETICULAR, HONEYCOMB, DENSE)
# each tissue name keeps the same colour in every model: palette entries in TISSUE_NAMES order
NAME_COLORS = {name: PALETTE[i] for i, name in enumerate(TISSUE_NAMES)}

WEAK_STABILITY = 0.5  # best mean ARI below this: warn that no K gives reproducible clusters
# Thresholds of the naming rules (HU and voxel shares), from typical lung CT values (field notes section 2):
# normal parenchyma about -850 HU, emphysema below -950, ground glass -700..-300, consolidation 0..+50, vessels +40.
NAMING_THRESHOLDS = {
    "emphysema_median_hu": -930.0,    # median below this, or ...
    "emphysema_low_frac": 0.5,        # ... most voxels below -950: low attenuation, emphysema-like
    "honeycomb_low_frac": 0.3,        # air-cyst voxels (< -950) at least this share ...
    "honeycomb_dense_frac": 0.2,      # ... and thick wall voxels (> -300) at least this share: honeycombing-like
    "dense_median_hu": -300.0,        # median at least this (most voxels denser than ground glass): consolidation-like
    "ground_glass_median_hu": -700.0,  # median at least this (most voxels raised into ground glass) ...
    "reticular_dense_frac": 0.15,     # ... or, above ``raised_median_hu``, this share of dense lines (> -300): reticular
    "raised_median_hu": -800.0,       # median above normal lung's: higher-attenuation lung at the least
    "lowered_median_hu": -880.0,      # median below normal lung's ...
    "lowered_low_frac": 0.15,         # ... and this share of voxels below -950: lower-attenuation lung
}


def _check_points(Z, name: str = "Z") -> np.ndarray:
    try:
        return check_array(Z, dtype=np.float64, ensure_min_samples=1, ensure_min_features=1)
    except ValueError as exc:
        raise InputError(f"Biological coordinates {name} must be a finite 2-D array [n_patches, dims]: {exc}") from exc


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


class TissueClusters(ClusterMixin, BaseEstimator):
    """k-means tissue clusters with stability-selected K and margin confidence.

    Parameters
    ----------
    n_clusters : int or None
        Number of clusters; None chooses K in ``k_range`` by subsample stability.
    k_range : (int, int)
        Smallest and largest K tried when ``n_clusters`` is None (inclusive).
    n_bootstrap : int
        Subsample pairs per K.
    subsample : float
        Share of the rows in each subsample.
    stability_tolerance : float
        A K is eligible when its mean ARI is at least (1 - this) times the best mean ARI.
    max_samples : int
        Rows (random subset) used for the stability search, to keep it fast on dense latents.
    n_init : int
        k-means restarts of the final fit.
    random_state : int
        Seed of every random choice.
    """

    def __init__(self, n_clusters=None, k_range=(4, 10), n_bootstrap=10, subsample=0.8, stability_tolerance=0.02,
                 max_samples=4000, n_init=10, random_state=0):
        self.n_clusters = n_clusters
        self.k_range = k_range
        self.n_bootstrap = n_bootstrap
        self.subsample = subsample
        self.stability_tolerance = stability_tolerance
        self.max_samples = max_samples
        self.n_init = n_init
        self.random_state = random_state

    def fit(self, Z, y=None, order_by=None):
        """Cluster ``Z`` [n, dims]; ``order_by`` ([n], e.g. patch mean HU) sets the label order."""
        Z = _check_points(Z)
        order_by = self._check_order_by(order_by, Z.shape[0])
        rng = np.random.default_rng(self.random_state)
        if self.n_clusters is None:
            ks = self._check_k_range(Z.shape[0])
            self.stability_ = {k: self._stability(Z, k, rng) for k in ks}
            best = max(self.stability_.values())
            k = max(k for k, s in self.stability_.items() if s >= (1.0 - self.stability_tolerance) * best)
            if best < WEAK_STABILITY:
                warnings.warn(f"No K in {tuple(self.k_range)} gives reproducible clusters (best mean ARI {best:.2f}); "
                              f"K={k} was chosen but the tissue types may not be distinct. Consider fixing K.",
                              RuntimeWarning, stacklevel=2)
        else:
            k = self._check_n_clusters(Z.shape[0])
            self.stability_ = {}
        km = KMeans(n_clusters=k, n_init=self.n_init, random_state=int(rng.integers(2 ** 31))).fit(Z)
        raw = km.labels_
        keys = order_by if order_by is not None else Z[:, 0]
        self.order_values_ = np.array([keys[raw == c].mean() for c in range(k)])
        order = np.lexsort((km.cluster_centers_[:, 0], self.order_values_))
        self.order_values_ = self.order_values_[order]
        self.centroids_ = km.cluster_centers_[order]
        self.n_clusters_ = k
        self.n_features_in_ = Z.shape[1]
        self.labels_ = self.predict(Z)
        return self

    def predict(self, Z) -> np.ndarray:
        """Cluster label 1..K of each row (nearest centroid)."""
        return self.predict_with_confidence(Z)[0]

    def fit_predict(self, Z, y=None, order_by=None) -> np.ndarray:
        return self.fit(Z, order_by=order_by).labels_

    def predict_with_confidence(self, Z) -> tuple:
        """(labels 1..K as uint8 when K < 256, confidence (d2 - d1) / (d2 + d1) in [0, 1] as float32)."""
        return nearest_with_confidence(self.transform(Z))

    def transform(self, Z) -> np.ndarray:
        """Euclidean distance of each row to each centroid, float64 [n, K] (scikit-learn's k-means convention)."""
        check_is_fitted(self, "centroids_")
        Z = _check_points(Z)
        if Z.shape[1] != self.centroids_.shape[1]:
            raise InputError(f"Got {Z.shape[1]} biological dimensions but the clusters were fitted on "
                             f"{self.centroids_.shape[1]}; use the rotation these clusters belong to.")
        sq = (np.einsum("ij,ij->i", Z, Z)[:, None] - 2.0 * Z @ self.centroids_.T
              + np.einsum("ij,ij->i", self.centroids_, self.centroids_)[None, :])
        return np.sqrt(np.maximum(sq, 0.0))

    # ------------------------------------------------------------------ helpers
    def _stability(self, Z: np.ndarray, k: int, rng: np.random.Generator) -> float:
        """Mean ARI between k-means partitions of two random subsamples, on the rows they share."""
        if Z.shape[0] > self.max_samples:
            Z = Z[np.sort(rng.choice(Z.shape[0], self.max_samples, replace=False))]
        n = Z.shape[0]
        m = max(k + 1, int(round(self.subsample * n)))
        scores = []
        for _ in range(self.n_bootstrap):
            a, b = (np.sort(rng.choice(n, m, replace=False)) for _ in range(2))
            common = np.intersect1d(a, b)
            labels = []
            for rows in (a, b):
                km = KMeans(n_clusters=k, n_init=3, random_state=int(rng.integers(2 ** 31))).fit(Z[rows])
                labels.append(km.predict(Z[common]))
            scores.append(adjusted_rand_score(*labels))
        return float(np.mean(scores))

    def _check_k_range(self, n: int) -> range:
        kr = self.k_range
        if (not isinstance(kr, (tuple, list)) or len(kr) != 2 or not all(_is_int(k) for k in kr)
                or not 2 <= kr[0] <= kr[1]):
            raise InputError(f"k_range must be two integers (lo, hi) with 2 <= lo <= hi, got {kr!r}.")
        if not _is_int(self.n_bootstrap) or self.n_bootstrap < 1:
            raise InputError(f"n_bootstrap must be a positive integer, got {self.n_bootstrap!r}.")
        if not 0.0 < self.subsample < 1.0:
            raise InputError(f"subsample must lie strictly between 0 and 1, got {self.subsample!r}.")
        if 2 * kr[1] > n:
            raise InputError(f"{n} patches are too few to test up to K={kr[1]} clusters; give more patches "
                             "or a smaller k_range / --clusters.")
        return range(kr[0], kr[1] + 1)

    def _check_n_clusters(self, n: int) -> int:
        k = self.n_clusters
        if not _is_int(k) or k < 2:
            raise InputError(f"n_clusters must be None (choose by stability) or an integer >= 2, got {k!r}.")
        if k > n:
            raise InputError(f"Cannot form {k} clusters from {n} patches; use fewer clusters or more patches.")
        return int(k)

    @staticmethod
    def _check_order_by(order_by, n: int):
        if order_by is None:
            return None
        order_by = np.asarray(order_by, dtype=np.float64).ravel()
        if order_by.shape[0] != n or not np.all(np.isfinite(order_by)):
            raise InputError(f"order_by must hold one finite value per row ({n}), got {order_by.shape[0]} values.")
        return order_by

    # ------------------------------------------------------------ persistence
    def export_state(self) -> tuple:
        """(arrays, meta): what a model bundle stores to rebuild these fitted clusters."""
        check_is_fitted(self, "centroids_")
        arrays = {"centroids": self.centroids_, "order_values": self.order_values_}
        meta = {"k": int(self.n_clusters_), "stability": {str(k): float(s) for k, s in self.stability_.items()},
                "params": {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.get_params().items()}}
        return arrays, meta

    @classmethod
    def from_state(cls, arrays: dict, meta: dict) -> "TissueClusters":
        """Rebuild fitted clusters from :meth:`export_state` output (no refitting)."""
        params = dict(meta.get("params", {}))
        if isinstance(params.get("k_range"), list):
            params["k_range"] = tuple(params["k_range"])
        tc = cls(**params)
        centroids = np.asarray(arrays["centroids"], dtype=np.float64)
        k = int(meta["k"])
        if centroids.ndim != 2 or centroids.shape[0] != k or k < 2:
            raise InputError(f"Stored centroids have shape {centroids.shape} but K={k}.")
        tc.centroids_ = centroids
        tc.order_values_ = np.asarray(arrays.get("order_values", np.zeros(k)), dtype=np.float64)
        tc.n_clusters_ = k
        tc.n_features_in_ = centroids.shape[1]
        tc.stability_ = {int(kk): float(s) for kk, s in meta.get("stability", {}).items()}
        return tc


def nearest_with_confidence(distances) -> tuple:
    """From centroid distances [n, K]: (label 1..K of the nearest, uint8 when K < 256; confidence
    (d2 - d1) / (d2 + d1) as float32). Also used on distances interpolated between patch centres."""
    dist = np.asarray(distances)
    two = np.partition(dist, 1, axis=1)
    d1, d2 = two[:, 0], two[:, 1]
    total = d1 + d2
    confidence = np.divide(d2 - d1, total, out=np.zeros_like(total), where=total > 0)
    labels = dist.argmin(axis=1) + 1
    return labels.astype(np.uint8 if dist.shape[1] < 256 else np.int32), confidence.astype(np.float32)


# ---------------------------------------------------------------- profiles and names
def cluster_profiles(labels, stats: Mapping[str, np.ndarray], n_clusters: int) -> list:
    """Mean of each per-patch statistic within each cluster 1..K: one dict per cluster (plus ``n``)."""
    labels = np.asarray(labels).ravel()
    profiles = []
    for k in range(1, n_clusters + 1):
        rows = labels == k
        profile = {key: float(np.asarray(v)[rows].mean()) if rows.any() else float("nan") for key, v in stats.items()}
        profile["n"] = int(rows.sum())
        profiles.append(profile)
    return profiles


def _name_one(p: Mapping[str, float]) -> str:
    t = NAMING_THRESHOLDS
    median, low, dense = p["median_hu"], p["frac_below_950"], p["frac_above_300"]
    if low >= t["honeycomb_low_frac"] and dense >= t["honeycomb_dense_frac"]:
        return HONEYCOMB
    if median < t["emphysema_median_hu"] or low > t["emphysema_low_frac"]:
        return LOW_ATTENUATION
    if median >= t["dense_median_hu"]:
        return DENSE
    if median > t["raised_median_hu"] and dense >= t["reticular_dense_frac"]:
        return RETICULAR
    if median >= t["ground_glass_median_hu"]:
        return GROUND_GLASS
    if median > t["raised_median_hu"]:
        return HIGHER
    if median < t["lowered_median_hu"] and low >= t["lowered_low_frac"]:
        return LOWER
    return NORMAL


def name_clusters(profiles: Sequence[Mapping[str, float]]) -> list:
    """A name per cluster profile (dicts with the keys of ``PROFILE_KEYS``): the profile alone sets the name.

    Deterministic rules (``NAMING_THRESHOLDS``), first match wins:

    1. >= 30 % air-cyst voxels (< -950 HU) and >= 20 % thick-wall voxels (> -300 HU): honeycombing-like;
    2. median < -930 HU or > 50 % of voxels below -950 HU: low attenuation, emphysema-like;
    3. median >= -300 HU (most voxels denser than ground glass): consolidation-like;
    4. median > -800 HU and >= 15 % dense-line voxels (> -300 HU): reticular-like;
    5. median >= -700 HU (most voxels raised into ground glass): ground-glass-like;
    6. median > -800 HU: higher-attenuation lung (raised, but short of ground glass);
    7. median < -880 HU and >= 15 % of voxels below -950 HU: lower-attenuation lung (darker than normal lung, short
       of emphysema-like; normal lung read through a sharp kernel can look so too, hence no disease name);
    8. otherwise: normal-appearing lung.

    A disease-like name needs the bulk of the patch (its median) or a large share of its voxels to look like the
    disease: a vessel or a bronchus crossing normal lung fills a minority of a 20 mm patch and leaves the median at
    normal lung's, so normal anatomy is named normal-appearing. The mean HU and SD are reported, not used: a vessel
    at +40 HU moves them as much as disease does. A name used twice gets " 2", " 3" ... in order.
    """
    names, seen = [], {}
    for i, p in enumerate(profiles):
        missing = [k for k in PROFILE_KEYS if k not in p]
        if missing:
            raise InputError(f"Cluster profile {i + 1} lacks {missing}; each profile needs {list(PROFILE_KEYS)}.")
        if not all(np.isfinite(float(p[k])) for k in PROFILE_KEYS):
            raise InputError(f"Cluster profile {i + 1} has a non-finite value (empty cluster?): {dict(p)}.")
        base = _name_one(p)
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base} {seen[base]}")
    return names


def default_colors(names: Sequence[str]) -> list:
    """One colour per name: a tissue name's own palette colour on its first use, then unused palette
    colours in order (cycling if there are more clusters than colours)."""
    used, colors = set(), []
    spare = [c for c in PALETTE if c not in NAME_COLORS.values()] + list(NAME_COLORS.values())
    for name in names:
        base = re.sub(r" \d+$", "", name)
        color = NAME_COLORS.get(base)
        if color is None or color in used:
            free = [c for c in spare if c not in used]
            color = free[0] if free else PALETTE[len(colors) % len(PALETTE)]
        used.add(color)
        colors.append(color)
    return colors
