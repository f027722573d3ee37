"""Tissue clusters of the rotation's cluster features: fitting, naming and colours.

``TissueClusters`` is a Gaussian mixture (full covariances) on the cluster features of
:class:`~latentharmonize.rotation.LatentRotation`. Each component has its own covariance, so a small, compact tissue
(low-attenuation lung) keeps its own boundary beside the large, elongated spread of normal lung; k-means, with one
shared spherical scale, cut emphysema in two at the midpoint between centroids (see
``docs/experiments/2026-12-04-mixture-clusters.md``). :func:`fit_named_clusters` names every component from the HU
profile of its patches and merges the components that get the same name into one cluster: normal lung may take
several components, and a tissue type is one cluster, one colour and one segment.

Labels are ``1..C`` (0 is background in label maps); components are numbered in a deterministic order (ascending
mean of ``order_by``, e.g. patch mean HU, else of the first feature) and clusters take the order of their first
component.

Choosing the number of components (``n_clusters=None``): for each K in ``k_range``, pairs of random subsamples (a
share ``subsample`` of the rows, without replacement) are fitted independently and the two partitions are compared
on the rows both subsamples hold, by the adjusted Rand index (ARI). The chosen K is the *largest* K whose mean ARI is
at least ``(1 - stability_tolerance)`` times the best: never less reproducible than the best choice, but as
fine-grained as reproducibility allows. Subsamples rather than bootstrap resamples: repeated rows of a bootstrap
draw form artificial tight groups that make large K look stable.

Widening by the acquisition covariance: the same lung point read under two acquisitions lands at two places in
feature space. :func:`acquisition_covariance` measures that scatter on paired rows (half the second moment of their
differences: the covariance one acquisition adds to a point), and ``fit(..., acquisition_covariance=...)`` adds it
to every component's covariance. A boundary is then softer along the directions in which a change of scanner moves
points, and firmer along those in which only tissue does (``docs/experiments/2026-12-05-acquisition-widening.md``).

Confidence of a prediction: with ``p1 >= p2`` the two largest posterior probabilities of the clusters and
``d = 1 - p`` their dissimilarities, ``confidence = (d2 - d1) / (d2 + d1)`` in [0, 1]: 0 where two clusters are
equally likely, 1 where one cluster has all the probability.
"""
from __future__ import annotations

import numbers
import re
import warnings
from typing import Mapping, Sequence

import numpy as np
from sklearn.base import BaseEstimator, ClusterMixin
from scipy.special import logsumexp
from sklearn.mixture import GaussianMixture
from sklearn.metrics import adjusted_rand_score
from sklearn.utils.validation import check_array, check_is_fitted

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
DENSE_STRUCTURES = "lung with dense structures"
TISSUE_NAMES = (LOW_ATTENUATION, NORMAL, GROUND_GLASS, RETICULAR, HONEYCOMB, DENSE, HIGHER, LOWER, DENSE_STRUCTURES)
DISEASE_NAMES = (LOW_ATTENUATION, GROUND_GLASS, RETICULAR, HONEYCOMB, DENSE)
# each tissue name keeps the same colour in every model: palette entries in TISSUE_NAMES order, except lower-attenuation
# lung, whose entry in that order (Tol blue) could not be told from higher-attenuation lung's (Okabe-Ito blue) on a
# real scan's map: it takes Tol purple; lung with dense structures, a mixture rather than a tissue, takes Tol grey
NAME_COLORS = {name: PALETTE[i] for i, name in enumerate(TISSUE_NAMES)}
NAME_COLORS[LOWER] = PALETTE[12]
NAME_COLORS[DENSE_STRUCTURES] = PALETTE[13]

NAMING_KEYS = ("median_hu", "q25_hu", "frac_below_950", "frac_above_300")  # the profile values the naming rules read
NAME_SUPPORT = 0.5  # share of a cluster's own patches that must earn its disease-like name (:func:`supported_names`)
WEAK_STABILITY = 0.5  # best mean ARI below this: warn that no K gives reproducible clusters
# Thresholds of the naming rules (HU and voxel shares), from typical lung CT values (field notes section 2):
# normal parenchyma about -850 HU, emphysema below -950, ground glass -700..-300, consolidation 0..+50, vessels +40.
# The lower-quartile one sits between the phantom's normal lung (about -890) and its abnormal tissue (-660..-775);
# see docs/experiments/2026-12-05-names-by-lower-quartile.md.
NAMING_THRESHOLDS = {
    "emphysema_median_hu": -930.0,    # median below this, or ...
    "emphysema_low_frac": 0.5,        # ... most voxels below -950: low attenuation, emphysema-like
    "honeycomb_low_frac": 0.3,        # air-cyst voxels (< -950) at least this share ...
    "honeycomb_dense_frac": 0.2,      # ... and thick wall voxels (> -300) at least this share: honeycombing-like
    "dense_median_hu": -300.0,        # median at least this (most voxels denser than ground glass): consolidation-like
    "ground_glass_median_hu": -700.0,  # median at least this (most voxels raised into ground glass) ...
    "reticular_dense_frac": 0.15,     # ... or, above ``raised_median_hu``, this share of dense voxels (> -300):
                                      # reticular-like lines, or dense structures where the lower quartile is low
    "raised_median_hu": -800.0,       # median above normal lung's: higher-attenuation lung at the least
    "raised_background_q25_hu": -820.0,  # lower quartile above this: the parenchyma itself is raised (needed for the
                                         # ground-glass-like and reticular-like names)
    "lowered_median_hu": -880.0,      # median below normal lung's ...
    "lowered_low_frac": 0.15,         # ... and this share of voxels below -950: lower-attenuation lung
}


def _check_points(Z, name: str = "Z") -> np.ndarray:
    try:
        return check_array(Z, dtype=np.float64, ensure_min_samples=1, ensure_min_features=1)
    except ValueError as exc:
        raise InputError(f"Biological coordinates {name} must be a finite 2-D array [n_patches, dims]: {exc}") from exc


def acquisition_covariance(first, second) -> np.ndarray:
    """The covariance one acquisition adds to a point's features, [dims, dims]: ``first`` and ``second`` [m, dims]
    hold the same m lung points under two acquisitions (row i of each is one point), and with ``d`` their
    differences this is ``d.T @ d / (2 m)`` (a difference carries the scatter of two acquisitions)."""
    first, second = _check_points(first, "first"), _check_points(second, "second")
    if first.shape != second.shape:
        raise InputError(f"Paired rows must match: first has shape {first.shape}, second {second.shape}.")
    d = first - second
    return d.T @ d / (2.0 * len(d))


def _check_covariance(covariance, dims: int):
    """None (no widening) or the validated symmetric, positive semi-definite [dims, dims] array."""
    if covariance is None:
        return None
    c = np.asarray(covariance, dtype=np.float64)
    if (c.shape != (dims, dims) or not np.all(np.isfinite(c)) or not np.allclose(c, c.T)
            or np.linalg.eigvalsh(c).min() < -1e-9 * max(float(np.trace(c)), 1.0)):
        raise InputError(f"acquisition_covariance must be a finite, symmetric, positive semi-definite [{dims}, {dims}] "
                         f"array (clusters.acquisition_covariance); got shape {c.shape}.")
    return c


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


class TissueClusters(ClusterMixin, BaseEstimator):
    """Gaussian-mixture tissue clusters with a stability-selected number of components and margin confidence.

    Parameters
    ----------
    n_clusters : int or None
        Number of mixture components (before :meth:`merge`); None chooses it in ``k_range`` by subsample stability.
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
        Restarts of the final fit (the one with the highest likelihood is kept).
    reg_covar : float
        Added to each covariance's diagonal, so that a component on a flat direction stays invertible.
    random_state : int
        Seed of every random choice.
    """

    def __init__(self, n_clusters=None, k_range=(4, 10), n_bootstrap=10, subsample=0.8, stability_tolerance=0.02,
                 max_samples=4000, n_init=10, reg_covar=1e-4, random_state=0):
        self.n_clusters = n_clusters
        self.k_range = k_range
        self.n_bootstrap = n_bootstrap
        self.subsample = subsample
        self.stability_tolerance = stability_tolerance
        self.max_samples = max_samples
        self.n_init = n_init
        self.reg_covar = reg_covar
        self.random_state = random_state

    def fit(self, Z, y=None, order_by=None, acquisition_covariance=None):
        """Fit the mixture on ``Z`` [n, dims]; ``order_by`` ([n], e.g. patch mean HU) sets the component order;
        ``acquisition_covariance`` ([dims, dims], from :func:`acquisition_covariance`) is added to every component's
        covariance. Each component is its own cluster until :meth:`merge`."""
        Z = _check_points(Z)
        order_by = self._check_order_by(order_by, Z.shape[0])
        widening = _check_covariance(acquisition_covariance, Z.shape[1])
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
        mixture = self._mixture(k, self.n_init, int(rng.integers(2 ** 31))).fit(Z)
        responsibilities = mixture.predict_proba(Z)
        keys = order_by if order_by is not None else Z[:, 0]
        values = keys @ responsibilities / np.maximum(responsibilities.sum(axis=0), 1e-300)
        order = np.lexsort((mixture.means_[:, 0], values))
        self.order_values_ = values[order]
        self.means_ = mixture.means_[order]
        fitted = mixture.covariances_[order]
        self.covariances_ = fitted if widening is None else fitted + widening
        # what the widening adds: its trace against the mean trace of the fitted covariances
        self.widening_share_ = 0.0 if widening is None else float(np.trace(widening) / np.trace(fitted, axis1=1, axis2=2).mean())
        self.weights_ = mixture.weights_[order]
        self._set_components()
        self.n_features_in_ = Z.shape[1]
        self.groups_, self.n_clusters_ = np.arange(1, k + 1), k
        self.component_labels_ = self.predict(Z)
        return self.merge(self.groups_)

    def merge(self, groups):
        """Make clusters of components: ``groups[i]`` is the cluster label (1..C, each used) of component i + 1."""
        check_is_fitted(self, "means_")
        groups = np.asarray(groups).ravel()
        c = int(groups.max()) if groups.size else 0
        if (groups.shape[0] != self.n_components_ or not np.issubdtype(groups.dtype, np.integer)
                or set(groups.tolist()) != set(range(1, c + 1))):
            raise InputError(f"groups must give each of the {self.n_components_} components a cluster label 1..C, "
                             f"every label used; got {groups.tolist()}.")
        self.groups_ = groups.astype(np.int64)
        self.n_clusters_ = c
        if hasattr(self, "component_labels_"):
            self.labels_ = self.groups_[self.component_labels_ - 1].astype(self.component_labels_.dtype)
        return self

    def predict(self, Z) -> np.ndarray:
        """Cluster label 1..C of each row (the most probable cluster)."""
        return self.predict_with_confidence(Z)[0]

    def fit_predict(self, Z, y=None, order_by=None) -> np.ndarray:
        return self.fit(Z, order_by=order_by).labels_

    def predict_with_confidence(self, Z) -> tuple:
        """(labels 1..C as uint8 when C < 256, margin confidence in [0, 1] as float32; see the module docstring)."""
        return nearest_with_confidence(self.transform(Z))

    def predict_proba(self, Z) -> np.ndarray:
        """Posterior probability of each cluster, float64 [n, C] (the sum over its components)."""
        responsibilities = np.exp(self._log_responsibilities(Z))
        out = np.zeros((len(responsibilities), self.n_clusters_))
        for component, cluster in enumerate(self.groups_):
            out[:, cluster - 1] += responsibilities[:, component]
        return out

    def transform(self, Z) -> np.ndarray:
        """Dissimilarity of each row to each cluster, ``1 - posterior probability``, float64 [n, C]: lower is nearer,
        and it interpolates between patch centres as the probabilities do."""
        return 1.0 - self.predict_proba(Z)

    # ------------------------------------------------------------------ helpers
    def _mixture(self, k: int, n_init: int, seed: int) -> GaussianMixture:
        return GaussianMixture(n_components=k, covariance_type="full", n_init=n_init, reg_covar=self.reg_covar,
                               random_state=seed)

    def _set_components(self) -> None:
        """Cholesky factors of the precisions and log normalisers, from means, covariances and weights."""
        self.n_components_ = len(self.means_)
        try:
            chol = np.linalg.cholesky(self.covariances_)
        except np.linalg.LinAlgError as exc:
            raise InputError(f"A cluster covariance is not positive definite ({exc}).") from exc
        eye = np.eye(self.means_.shape[1])
        self._precision_chol = np.stack([np.linalg.solve(c, eye).T for c in chol])
        log_det = np.log(np.diagonal(self._precision_chol, axis1=1, axis2=2)).sum(axis=1)
        self._log_norm = np.log(self.weights_) + log_det - 0.5 * self.means_.shape[1] * np.log(2 * np.pi)

    def _log_responsibilities(self, Z) -> np.ndarray:
        """log posterior probability of each component, [n, K]."""
        check_is_fitted(self, "means_")
        Z = _check_points(Z)
        if Z.shape[1] != self.means_.shape[1]:
            raise InputError(f"Got {Z.shape[1]} feature dimensions but the clusters were fitted on "
                             f"{self.means_.shape[1]}; use the rotation these clusters belong to.")
        log_p = np.empty((Z.shape[0], self.n_components_))
        for k, (mean, prec) in enumerate(zip(self.means_, self._precision_chol)):
            y = Z @ prec - mean @ prec
            log_p[:, k] = self._log_norm[k] - 0.5 * np.einsum("ij,ij->i", y, y)
        return log_p - logsumexp(log_p, axis=1, keepdims=True)

    def _stability(self, Z: np.ndarray, k: int, rng: np.random.Generator) -> float:
        """Mean ARI between mixture partitions of two random subsamples, on the rows they share."""
        if Z.shape[0] > self.max_samples:
            Z = Z[np.sort(rng.choice(Z.shape[0], self.max_samples, replace=False))]
        n = Z.shape[0]
        m = max(k + 1, int(round(self.subsample * n)))
        scores = []
        for _ in range(self.n_bootstrap):
            a, b = (np.sort(rng.choice(n, m, replace=False)) for _ in range(2))
            common = np.intersect1d(a, b)
            labels = [self._mixture(k, 1, int(rng.integers(2 ** 31))).fit(Z[rows]).predict(Z[common]) for rows in (a, b)]
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
        check_is_fitted(self, "means_")
        arrays = {"means": self.means_, "covariances": self.covariances_, "weights": self.weights_,
                  "groups": self.groups_, "order_values": self.order_values_}
        meta = {"k": int(self.n_clusters_), "n_components": int(self.n_components_),
                "stability": {str(k): float(s) for k, s in self.stability_.items()},
                "params": stored_params(self)}
        return arrays, meta

    @classmethod
    def from_state(cls, arrays: dict, meta: dict) -> "TissueClusters":
        """Rebuild fitted clusters from :meth:`export_state` output (no refitting)."""
        tc = with_stored_params(cls, meta)
        means = np.asarray(arrays["means"], dtype=np.float64)
        n = int(meta["n_components"])
        if means.ndim != 2 or means.shape[0] != n or n < 2:
            raise InputError(f"Stored cluster means have shape {means.shape} but {n} components.")
        tc.means_ = means
        tc.covariances_ = np.asarray(arrays["covariances"], dtype=np.float64).reshape(n, means.shape[1], means.shape[1])
        tc.weights_ = np.asarray(arrays["weights"], dtype=np.float64).reshape(n)
        tc.order_values_ = np.asarray(arrays["order_values"], dtype=np.float64)
        tc._set_components()
        tc.merge(np.asarray(arrays["groups"], dtype=np.int64))
        if tc.n_clusters_ != int(meta["k"]):
            raise InputError(f"Stored cluster groups make {tc.n_clusters_} clusters but K={meta['k']}.")
        tc.n_features_in_ = means.shape[1]
        tc.stability_ = {int(kk): float(s) for kk, s in meta.get("stability", {}).items()}
        return tc


def stored_params(estimator) -> dict:
    """An estimator's parameters as a bundle's manifest stores them (tuples as lists)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in estimator.get_params().items()}


def with_stored_params(cls, meta: Mapping):
    """An unfitted ``cls`` with the parameters ``meta["params"]`` holds (:func:`stored_params`; a list becomes a
    tuple again where the parameter's default is one)."""
    defaults = cls().get_params()
    params = {k: tuple(v) if isinstance(v, list) and isinstance(defaults.get(k), tuple) else v
              for k, v in meta.get("params", {}).items()}
    return cls(**params)


def nearest_with_confidence(distances) -> tuple:
    """From cluster dissimilarities [n, K] (:meth:`TissueClusters.transform`): (label 1..K of the nearest, uint8
    when K < 256; confidence (d2 - d1) / (d2 + d1) as float32, 1 where there is one cluster). Also used on
    dissimilarities interpolated between patch centres."""
    dist = np.asarray(distances)
    if dist.shape[1] == 1:
        return np.ones(len(dist), np.uint8), np.ones(len(dist), np.float32)
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


def name_rows(stats: Mapping[str, np.ndarray]) -> np.ndarray:
    """The name of each row's profile (``stats``: arrays of the ``NAMING_KEYS``), by the rules of
    :func:`name_clusters` applied to every row at once; an object array of names."""
    t = NAMING_THRESHOLDS
    median, q25, low, dense = (np.asarray(stats[k], dtype=np.float64) for k in NAMING_KEYS)
    raised, background = median > t["raised_median_hu"], q25 > t["raised_background_q25_hu"]
    lines = dense >= t["reticular_dense_frac"]
    rules = [
        (low >= t["honeycomb_low_frac"]) & (dense >= t["honeycomb_dense_frac"]),
        (median < t["emphysema_median_hu"]) | (low > t["emphysema_low_frac"]),
        median >= t["dense_median_hu"],
        raised & background & lines,
        raised & background & (median >= t["ground_glass_median_hu"]),
        raised & ~background & lines,
        raised,
        (median < t["lowered_median_hu"]) & (low >= t["lowered_low_frac"]),
    ]  # first match wins, in this order
    names = [HONEYCOMB, LOW_ATTENUATION, DENSE, RETICULAR, GROUND_GLASS, DENSE_STRUCTURES, HIGHER, LOWER]
    return np.select(rules, np.array(names, dtype=object), default=NORMAL)


def _name_one(p: Mapping[str, float]) -> str:
    return str(name_rows({k: [p[k]] for k in NAMING_KEYS})[0])


def name_clusters(profiles: Sequence[Mapping[str, float]]) -> list:
    """A name per cluster profile (dicts with the keys of ``PROFILE_KEYS``): the profile alone sets the name.

    Deterministic rules (``NAMING_THRESHOLDS``), first match wins:

    1. >= 30 % air-cyst voxels (< -950 HU) and >= 20 % thick-wall voxels (> -300 HU): honeycombing-like;
    2. median < -930 HU or > 50 % of voxels below -950 HU: low attenuation, emphysema-like;
    3. median >= -300 HU (most voxels denser than ground glass): consolidation-like;
    4. median > -800 HU (raised above normal lung's), read by the lower quartile, the parenchyma between the
       structures:
       a. lower quartile > -820 HU (the parenchyma itself raised) and >= 15 % dense-line voxels (> -300 HU):
          reticular-like;
       b. lower quartile > -820 HU and median >= -700 HU (most voxels raised into ground glass): ground-glass-like;
       c. lower quartile <= -820 HU and >= 15 % dense voxels: lung with dense structures (near-normal parenchyma
          with many vessels, bands or consolidated parts: a mixture, so no disease name);
       d. otherwise: higher-attenuation lung (raised, but short of a pattern's profile);
    5. median < -880 HU and >= 15 % of voxels below -950 HU: lower-attenuation lung (darker than normal lung, short
       of emphysema-like; normal lung read through a sharp kernel can look so too, hence no disease name);
    6. otherwise: normal-appearing lung.

    A disease-like name needs the bulk of the patch (its median and lower quartile) or a large share of its voxels
    to look like the disease: a vessel or a bronchus crossing normal lung fills a minority of a 20 mm patch and
    leaves the median at normal lung's, so normal anatomy is named normal-appearing; many vessels raise the median
    but leave the lower quartile there, and get a descriptive name. The mean HU and SD are reported, not used: a
    vessel at +40 HU moves them as much as disease does. A name used twice gets " 2", " 3" ... in order.
    """
    names, seen = [], {}
    for i, p in enumerate(profiles):
        missing = [k for k in NAMING_KEYS if k not in p]
        if missing:
            raise InputError(f"Cluster profile {i + 1} lacks {missing}; each profile needs {list(NAMING_KEYS)}.")
        if not all(np.isfinite(float(p[k])) for k in NAMING_KEYS):
            raise InputError(f"Cluster profile {i + 1} has a non-finite value (empty cluster?): {dict(p)}.")
        base = _name_one(p)
        seen[base] = seen.get(base, 0) + 1
        names.append(base if seen[base] == 1 else f"{base} {seen[base]}")
    return names


def base_name(name: str) -> str:
    """A cluster name without the " 2", " 3" ... that :func:`name_clusters` adds to a repeated name."""
    return re.sub(r" \d+$", "", name)


def supported_names(names: Sequence[str], labels, stats: Mapping[str, np.ndarray]) -> list:
    """``names`` of clusters 1..C, each disease-like name that fewer than :data:`NAME_SUPPORT` of the cluster's own
    rows earn (each row's statistics named alone by the same rules) replaced by the descriptive name of its side of
    normal lung: lower-attenuation lung for emphysema-like, higher-attenuation lung for the raised patterns. A name
    used twice then gets " 2", " 3" ... in order.

    A mixed cluster's mean profile can pass a pattern's rule that few of its patches pass: on the phantom, one
    cluster of ground glass, reticulation, honeycombing and normal lung has a ground-glass-like mean profile while
    43 % of its patches are ground-glass-like on their own; on real scans the same cluster takes hilar vessels."""
    labels = np.asarray(labels).ravel()
    own = name_rows({k: np.asarray(stats[k]).ravel() for k in NAMING_KEYS})
    supported, seen = [], {}
    for k, name in enumerate(map(base_name, names), start=1):
        if name in DISEASE_NAMES and np.mean(own[labels == k] == name) < NAME_SUPPORT:
            name = LOWER if name == LOW_ATTENUATION else HIGHER
        seen[name] = seen.get(name, 0) + 1
        supported.append(name if seen[name] == 1 else f"{name} {seen[name]}")
    return supported


def fit_named_clusters(features, stats: Mapping[str, np.ndarray], n_clusters, random_state: int,
                       order_by=None, acquisition_covariance=None) -> tuple:
    """Fit :class:`TissueClusters` on ``features`` [n, d] (components widened by ``acquisition_covariance`` when
    given), name each component from the HU profile of its rows (``stats``: per-row patch statistics holding
    ``NAMING_KEYS``), merge the components of one name, and keep a disease-like name only where most of the
    cluster's rows earn it (:func:`supported_names`).

    Returns (clusters, cluster label 1..C of each row, the C cluster profiles, their C distinct names). A component
    that no row falls in takes the name of the component with the nearest mean.
    """
    clusters = TissueClusters(n_clusters=n_clusters, random_state=random_state).fit(
        features, order_by=order_by, acquisition_covariance=acquisition_covariance)
    components = cluster_profiles(clusters.component_labels_, stats, clusters.n_components_)
    filled = [i for i, p in enumerate(components) if p["n"] > 0]
    filled_names = dict(zip(filled, (base_name(n) for n in name_clusters([components[i] for i in filled]))))
    means = clusters.means_
    names = [filled_names.get(i) or filled_names[min(filled, key=lambda j: np.linalg.norm(means[j] - means[i]))]
             for i in range(clusters.n_components_)]
    distinct = list(dict.fromkeys(names))  # in component order: ascending ``order_by``
    clusters.merge(np.array([distinct.index(n) + 1 for n in names]))
    return (clusters, clusters.labels_, cluster_profiles(clusters.labels_, stats, clusters.n_clusters_),
            supported_names(distinct, clusters.labels_, stats))


def default_colors(names: Sequence[str]) -> list:
    """One colour per name: a tissue name's own palette colour on its first use, then unused palette
    colours in order (cycling if there are more clusters than colours)."""
    used, colors = set(), []
    spare = [c for c in PALETTE if c not in NAME_COLORS.values()] + list(NAME_COLORS.values())
    for name in names:
        color = NAME_COLORS.get(base_name(name))
        if color is None or color in used:
            free = [c for c in spare if c not in used]
            color = free[0] if free else PALETTE[len(colors) % len(PALETTE)]
        used.add(color)
        colors.append(color)
    return colors
