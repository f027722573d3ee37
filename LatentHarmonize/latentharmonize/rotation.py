"""Post-hoc latent rotation that puts acquisition effects in their own coordinates.

``LatentRotation`` learns an orthogonal matrix ``R`` (d x d) for a frozen encoder's latent space.
The first ``n_technical_`` columns span the *technical* subspace (vendor, kernel, dose, slice
thickness); the remaining columns span its orthogonal complement, the *biological* subspace,
which is what tissue clusters are fitted on.

How the technical directions are found (in this order, one direction at a time):

1. ``method="paired"`` (rows of the same patient and physical location, acquired differently):
   a ridge regression models the paired difference ``X[i] - X[j]`` as a per-acquisition affine
   effect, ``c[y_i] - c[y_j] + (B[y_i] - B[y_j]) x_mean`` (an offset plus a gain acting on the
   pair's mean latent, the multivariate analogue of ComBat's location/scale). Paired differences
   hold no biology, so every output direction of that model is technical; the right singular
   vectors of its weight matrix, strongest first, are the candidate directions. A direction is
   kept when its singular value exceeds the noise floor: the largest singular value of the same
   model fitted to its own residuals with random signs (a wild bootstrap, ``n_permutations``
   draws; one sign per physical location, since pairs sharing a row share its noise), i.e. the
   weights that noise alone produces at this sample size.
   ``method="labels"`` (no pairs): the nearest-class-mean classifier of the acquisition, a linear
   classifier whose coefficients are the acquisition means; the right singular vectors of its
   centred, size-weighted coefficients span the differences between acquisition means. Why not
   logistic regression or LDA: their coefficients point along ``inv(cov) @ mean_difference``, and
   removing those directions with an *orthogonal* projection leaves mean differences behind when
   the within-acquisition covariance is anisotropic. Removing the mean-difference span makes all
   acquisition means equal in the complement, which is exactly the condition under which no linear
   probe beats a constant predictor (linear guardedness, Belrose et al. 2023, LEACE).
2. Removing only a model's strongest directions can leave acquisition signal behind (effects the
   paired model misses, acquisitions that were never paired). When the candidates are used up,
   the class-mean classifier is re-fitted on the remaining complement and its directions are
   removed next, one at a time: iterative nullspace projection (INLP, Ravfogel et al. 2020).
3. ``n_technical="auto"`` keeps every significant paired direction (they carry technical
   *variance* that changes clusters even when a linear probe cannot see it), then continues until
   a cross-validated logistic-regression probe of the acquisition on the complement is at chance
   (within ``tolerance``); an int takes exactly that many directions, in the same order. The
   probe's folds never split a group (rows joined by pairs are one physical location; ``groups``
   may give patient ids): near-duplicate rows of one location in both training and test folds
   would bias the accuracy.

The biological basis is the orthogonal complement, ordered by the variance of the data inside it
(a PCA of the complement), and each column's sign is fixed so its largest entry is positive,
so the whole rotation is deterministic.

What the tissue clusters see (``cluster_features``): the biological coordinates and, with
``technical_weight > 0``, the technical ones re-centred on the scan's own median and scaled by that
weight. Dropping the technical coordinates drops the biology they also hold: on CT the strongest
technical direction is overall density (a vendor's HU calibration moves normal lung by about as much
as emphysema does), so dropping it merges emphysema with normal lung. The median over one scan's lung
is that scan's acquisition offset, since most lung is normal; subtracting it removes the scanner's
shift with no acquisition label (so it works for a scanner never seen in training) and keeps the
contrast between the scan's own tissues. ``technical_weight`` is chosen at training time (see
``train.select_technical_weight``); 0 (the default, and what older bundles hold) drops them.

With ``harmonized_columns=k`` the clusters read, in place of the biological coordinates, the last ``k`` input
columns (the patch densitometry that ``train --densitometry`` appends to the encoder's latent) as the rotation
harmonizes them: the technical coordinates are removed and the rest is rotated back into the input space. The
encoder's latent still shapes the rotation (it finds the technical directions with the statistics), but not the
clusters, which it would split by anatomy. The re-centred technical coordinates join them as above.
"""
from __future__ import annotations

import numbers
import warnings

import numpy as np
from scipy.linalg import null_space, svd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_array, check_is_fitted, column_or_1d

from .errors import InputError

METHODS = ("auto", "paired", "labels")
SPACES = ("biological", "clusters", "entangled", "technical")


def chance_level(y) -> float:
    """Accuracy of always predicting the most frequent acquisition (what a useless probe scores)."""
    y = column_or_1d(np.asarray(y), warn=False)
    if y.size == 0:
        raise InputError("chance_level needs at least one acquisition label.")
    _, counts = np.unique(y, return_counts=True)
    return float(counts.max() / y.size)


def _check_latents(X, name: str = "X") -> np.ndarray:
    try:
        return check_array(X, dtype=np.float64, ensure_min_samples=2, ensure_min_features=2)
    except ValueError as exc:
        raise InputError(f"Latents {name} must be a finite 2-D array [n_patches, latent_dim]: {exc}") from exc


def _check_labels(y, n: int) -> np.ndarray:
    if y is None:
        raise InputError("LatentRotation.fit needs the acquisition label of every latent (y); got None.")
    y = np.asarray(y)
    if y.ndim != 1 and not (y.ndim == 2 and y.shape[1] == 1):
        raise InputError(f"Acquisition labels y must be 1-D, got shape {y.shape}.")
    y = y.ravel()
    if y.shape[0] != n:
        raise InputError(f"Got {n} latents but {y.shape[0]} acquisition labels; give one label per latent row.")
    if y.dtype.kind == "f" and not np.all(np.isfinite(y)):
        raise InputError("Acquisition labels y contain NaN or infinity.")
    classes, counts = np.unique(y, return_counts=True)
    if classes.size < 2:
        raise InputError("The latents come from a single acquisition; a rotation needs at least two "
                         "different acquisitions (kernels, doses, vendors...) in the cohort.")
    if counts.min() < 2:
        raise InputError(f"Acquisition {classes[counts.argmin()]!r} has a single latent; each acquisition "
                         "needs at least two.")
    return y


def _check_pairs(pairs, y: np.ndarray) -> np.ndarray:
    try:
        pairs = np.asarray(pairs)
    except Exception as exc:  # ragged lists and the like
        raise InputError(f"pairs must be an integer array [m, 2] of row indices: {exc}") from exc
    if pairs.ndim != 2 or pairs.shape[1] != 2 or pairs.shape[0] == 0:
        raise InputError(f"pairs must be an integer array [m, 2] with m >= 1, got shape {pairs.shape}.")
    if pairs.dtype.kind not in "iu":
        raise InputError(f"pairs must hold integer row indices, got dtype {pairs.dtype}.")
    n = y.shape[0]
    if pairs.min() < 0 or pairs.max() >= n:
        raise InputError(f"pairs hold row indices outside 0..{n - 1}; they must index rows of X.")
    same = y[pairs[:, 0]] == y[pairs[:, 1]]
    if np.any(same):
        raise InputError(f"{int(same.sum())} pairs join two latents of the same acquisition; a pair must be the "
                         "same location acquired differently (e.g. soft and sharp kernel of one scan).")
    return pairs.astype(np.int64)


def _check_groups(groups, n: int) -> np.ndarray:
    groups = np.asarray(groups).ravel()
    if groups.shape[0] != n:
        raise InputError(f"Got {n} latents but {groups.shape[0]} group ids; give one id per latent row.")
    return groups


def _pair_groups(pairs, n: int):
    """Group id per row: rows linked through pairs are one physical location (None without pairs)."""
    if pairs is None:
        return None
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def _nonzero_directions(vt: np.ndarray, s: np.ndarray, source: str) -> list:
    """Right singular vectors with a non-zero singular value (at least the first), strongest first."""
    keep = np.flatnonzero(s > 1e-12 * s[0]) if s[0] > 0 else [0]
    return [(vt[i], source) for i in keep]


def _fix_signs(basis: np.ndarray) -> np.ndarray:
    """Flip each column so that its largest-magnitude entry is positive (SVD signs are arbitrary)."""
    if basis.shape[1] == 0:
        return basis
    idx = np.abs(basis).argmax(axis=0)
    signs = np.sign(basis[idx, np.arange(basis.shape[1])])
    signs[signs == 0] = 1.0
    return basis * signs


def _complement(basis: np.ndarray, d: int) -> np.ndarray:
    """Orthonormal basis [d, d - k] of the orthogonal complement of the columns of ``basis``."""
    if basis.shape[1] == 0:
        return np.eye(d)
    return null_space(basis.T)


class LatentRotation(TransformerMixin, BaseEstimator):
    """Orthogonal rotation of a latent space: technical coordinates first, biological after.

    Parameters
    ----------
    n_technical : "auto" or int
        Number of technical dimensions; "auto" picks the smallest number that brings the
        acquisition probe on the biological coordinates to chance (+ ``tolerance``).
    method : "auto", "paired" or "labels"
        "auto" uses pairs when ``fit`` receives them, acquisition labels otherwise.
    alpha : float
        Ridge penalty of the paired difference model.
    tolerance : float
        How far above chance (accuracy points) the probe may stay for "auto".
    max_technical : int or None
        Upper bound for "auto" (default: half the latent size).
    n_permutations : int
        Sign-flipped residual fits of the paired model that set its noise floor.
    cv : int
        Folds of the cross-validated probe.
    probe_samples : int
        Rows (stratified random subset) the probe uses, to keep it fast on dense latents.
    max_pairs : int
        Pairs (random subset) the paired difference model is fitted on, to bound its memory.
    random_state : int
        Seed of every random choice (probe subsets and folds).
    technical_weight : float
        Scale of the scan-re-centred technical coordinates in ``cluster_features`` (0: left out).
    harmonized_columns : int
        0: ``cluster_features`` hold the biological coordinates; k > 0: the last k input columns with the technical
        coordinates removed in their place.

    Attributes
    ----------
    rotation_ : [d, d] orthogonal matrix, technical columns first.
    technical_basis_ : [d, n_technical_] its technical columns.
    n_technical_ : number of technical dimensions.
    mean_ : [d] latent mean removed before rotating.
    method_ : "paired" or "labels".
    singular_values_ : spectrum of the first model (paired difference model or class means).
    noise_floor_ : paired: largest singular value fitted to sign-flipped residuals (else 0).
    n_significant_ : paired directions above the noise floor (0 for "labels").
    direction_sources_ : per technical direction, "paired", "labels" or "inlp".
    probe_curve_ : with "auto", probe accuracy on the complement after 0, 1, ... directions.
    probe_entangled_, probe_biological_ : grouped cross-validated probe accuracy on the fitted
        latents before and after rotation; chance_ : the chance level.
    """

    def __init__(self, n_technical="auto", method="auto", alpha=1.0, tolerance=0.05, max_technical=None,
                 n_permutations=20, cv=5, probe_samples=4000, max_pairs=20000, random_state=0, technical_weight=0.0,
                 harmonized_columns=0):
        self.n_technical = n_technical
        self.method = method
        self.alpha = alpha
        self.tolerance = tolerance
        self.max_technical = max_technical
        self.n_permutations = n_permutations
        self.cv = cv
        self.probe_samples = probe_samples
        self.max_pairs = max_pairs
        self.random_state = random_state
        self.technical_weight = technical_weight
        self.harmonized_columns = harmonized_columns

    # ------------------------------------------------------------------ fitting
    def fit(self, X, y, pairs=None, groups=None):
        """Fit the rotation on latents ``X`` [n, d] with acquisition labels ``y`` [n].

        ``pairs`` (optional) is an int array [m, 2] of row indices of the same patient and physical
        location under two different acquisitions. ``groups`` (optional, [n]) are ids (e.g. patient)
        whose rows the probe's folds keep together; by default rows joined by pairs form a group.
        """
        X = _check_latents(X)
        n, d = X.shape
        y = _check_labels(y, n)
        method = self._resolve_method(pairs)
        if pairs is not None:
            pairs = _check_pairs(pairs, y)
        groups = _check_groups(groups, n) if groups is not None else _pair_groups(pairs, n)
        k_fixed = self._resolve_n_technical(d)
        k_max = k_fixed if k_fixed is not None else self._resolve_max_technical(d)

        self.mean_ = X.mean(axis=0)
        Xc = X - self.mean_
        self.method_ = method
        self.chance_ = chance_level(y)
        rng = np.random.default_rng(self.random_state)
        rows = self._probe_subset(y, rng)
        probe_groups = None if groups is None else groups[rows]

        if method == "paired":
            if len(pairs) > self.max_pairs:
                pairs = pairs[np.sort(rng.choice(len(pairs), self.max_pairs, replace=False))]
            queue = self._paired_directions(Xc, y, pairs, rng)
        else:
            _, self.singular_values_, vt = svd(self._class_mean_weights(Xc, y), full_matrices=False)
            self.noise_floor_, self.n_significant_ = 0.0, 0
            queue = _nonzero_directions(vt, self.singular_values_, "labels")

        def probe(basis):
            return self._probe(Xc[rows] @ _complement(basis, d), y[rows], probe_groups)

        basis, sources, curve = self._select_directions(Xc, y, queue, k_fixed, k_max, probe)
        if k_fixed is None and curve[-1] > self.chance_ + self.tolerance:
            warnings.warn(f"The acquisition probe is still {curve[-1]:.2f} (chance {self.chance_:.2f}) after removing "
                          f"{basis.shape[1]} technical dimensions (max_technical); acquisition signal remains in the "
                          "biological coordinates.", RuntimeWarning, stacklevel=2)
        self._set_rotation(Xc, _fix_signs(basis))
        self.direction_sources_ = sources
        self.probe_curve_ = np.asarray(curve, dtype=np.float64)
        if curve:
            self.probe_entangled_, self.probe_biological_ = curve[0], curve[-1]
        else:
            self.probe_entangled_ = self._probe(Xc[rows], y[rows], probe_groups)
            self.probe_biological_ = self._probe(self.biological(X)[rows], y[rows], probe_groups)
        return self

    def _select_directions(self, Xc, y, queue: list, k_fixed, k_max: int, probe) -> tuple:
        """Technical basis [d, k], source of each direction, and (auto) the probe after 0..k directions.

        Directions come from ``queue`` (strongest first), then from INLP re-fits on the complement.
        "auto" stops once the significant paired directions are in and ``probe`` is at chance.
        """
        d = Xc.shape[1]
        basis = np.zeros((d, 0))
        sources, curve = [], []
        while True:
            if k_fixed is None:
                curve.append(probe(basis))
                if curve[-1] <= self.chance_ + self.tolerance and basis.shape[1] >= min(self.n_significant_, k_max):
                    break
            if basis.shape[1] >= k_max:
                break
            if not queue:  # INLP: re-fit the class-mean classifier on what is left, remove its directions
                complement = _complement(basis, d)
                _, s, vt = svd(self._class_mean_weights(Xc @ complement, y), full_matrices=False)
                queue = _nonzero_directions(vt @ complement.T, s, "inlp")
            v, src = queue.pop(0)
            v = v - basis @ (basis.T @ v)
            if np.linalg.norm(v) > 1e-8:
                basis = np.column_stack([basis, v / np.linalg.norm(v)])
                sources.append(src)
        return basis, sources, curve

    def _resolve_method(self, pairs) -> str:
        if self.method not in METHODS:
            raise InputError(f"method must be one of {METHODS}, got {self.method!r}.")
        if self.method == "paired" and pairs is None:
            raise InputError("method='paired' needs pairs (row indices of the same location under two "
                             "acquisitions); pass pairs=... or use method='labels'.")
        if self.method == "auto":
            return "paired" if pairs is not None else "labels"
        return self.method

    def _resolve_n_technical(self, d: int):
        k = self.n_technical
        if isinstance(k, str) and k == "auto":
            return None
        if isinstance(k, bool) or not isinstance(k, numbers.Integral):
            raise InputError(f"n_technical must be 'auto' or an integer, got {k!r}.")
        if not 0 <= k < d:
            raise InputError(f"n_technical={k} must lie in 0..{d - 1} for a latent size of {d} "
                             "(at least one biological dimension must remain).")
        return int(k)

    def _resolve_max_technical(self, d: int) -> int:
        k = d // 2 if self.max_technical is None else self.max_technical
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 0 <= k < d:
            raise InputError(f"max_technical must be an integer in 0..{d - 1}, got {self.max_technical!r}.")
        return int(k)

    def _paired_directions(self, Xc: np.ndarray, y: np.ndarray, pairs: np.ndarray, rng) -> list:
        """Significant right singular vectors of the paired difference model, strongest first."""
        features, diff = self._difference_design(Xc, y, pairs)
        weights = self._ridge(features, diff)
        _, self.singular_values_, vt = svd(weights, full_matrices=False)
        residual = diff - features @ weights
        location = _pair_groups(pairs, len(Xc))[pairs[:, 0]]
        flips = (rng.choice([-1.0, 1.0], size=location.max() + 1)[location, None] for _ in range(self.n_permutations))
        self.noise_floor_ = max((svd(self._ridge(features, residual * f), compute_uv=False)[0] for f in flips),
                                default=0.0)
        keep = np.flatnonzero(self.singular_values_ > self.noise_floor_)
        self.n_significant_ = int(keep.size)
        return [(vt[i], "paired") for i in keep]

    def _ridge(self, features: np.ndarray, targets: np.ndarray) -> np.ndarray:
        return Ridge(alpha=self.alpha, fit_intercept=False).fit(features, targets).coef_.T

    def _difference_design(self, Xc: np.ndarray, y: np.ndarray, pairs: np.ndarray) -> tuple:
        """(features [m, p], paired differences [m, d]) of the per-acquisition offset + gain model."""
        classes = np.unique(y)
        codes = np.searchsorted(classes, y)
        onehot = np.eye(classes.size)
        e = onehot[codes[pairs[:, 0]]] - onehot[codes[pairs[:, 1]]]
        diff = Xc[pairs[:, 0]] - Xc[pairs[:, 1]]
        pair_mean = 0.5 * (Xc[pairs[:, 0]] + Xc[pairs[:, 1]])
        pair_mean /= np.sqrt(np.mean(Xc ** 2)) + 1e-12  # gain features on the scale of the offsets
        gain = (e[:, :, None] * pair_mean[:, None, :]).reshape(len(pairs), -1)
        return np.hstack([e, gain]), diff

    @staticmethod
    def _class_mean_weights(Z: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Centred coefficients [n_classes, dims] of the nearest-class-mean classifier, weighted by
        sqrt(class share) so that their SVD is that of the between-acquisition scatter."""
        classes, codes, counts = np.unique(y, return_inverse=True, return_counts=True)
        means = np.zeros((classes.size, Z.shape[1]))
        np.add.at(means, codes, Z)
        means /= counts[:, None]
        return np.sqrt(counts / y.size)[:, None] * (means - Z.mean(axis=0))

    def _set_rotation(self, Xc: np.ndarray, technical: np.ndarray) -> None:
        d = Xc.shape[1]
        complement = _complement(technical, d)
        if complement.shape[1]:  # order biological axes by the variance of the data inside them
            _, _, vt = svd(Xc @ complement, full_matrices=False)
            complement = _fix_signs(complement @ vt.T)
        self.rotation_ = np.hstack([technical, complement])
        self.technical_basis_ = technical
        self.n_technical_ = technical.shape[1]
        self.n_features_in_ = d

    # ---------------------------------------------------------------- transforms
    def transform(self, X) -> np.ndarray:
        """All rotated coordinates: ``(X - mean_) @ rotation_``, technical columns first."""
        check_is_fitted(self, "rotation_")
        X = _check_latents(X)
        if X.shape[1] != self.rotation_.shape[0]:
            raise InputError(f"Latents have {X.shape[1]} dimensions but the rotation was fitted on "
                             f"{self.rotation_.shape[0]}; use the encoder this rotation belongs to.")
        return (X - self.mean_) @ self.rotation_

    def technical(self, X) -> np.ndarray:
        return self.transform(X)[:, :self.n_technical_]

    def biological(self, X) -> np.ndarray:
        return self.transform(X)[:, self.n_technical_:]

    @property
    def n_cluster_features_(self) -> int:
        """Width of ``cluster_features``: the harmonized columns or the biological coordinates, plus the technical ones
        with a technical weight."""
        check_is_fitted(self, "rotation_")
        base = self._harmonized_columns() or self.rotation_.shape[0] - self.n_technical_
        return base + (self.n_technical_ if self._technical_weight() > 0 else 0)

    def cluster_features(self, X, scans=None) -> np.ndarray:
        """What tissue clusters are fitted on and assigned from (see the module docstring).

        ``X`` holds the lung latents of one scan; for rows of several scans give ``scans`` ([n] scan ids), and
        each scan's technical coordinates are re-centred on that scan's own median.
        """
        weight, k = self._technical_weight(), self._harmonized_columns()
        Z = self.transform(X)
        biological = Z[:, self.n_technical_:]
        if k:  # the projection of X - mean_ onto the biological subspace, plus mean_: its last k input columns
            biological = biological @ self.rotation_[-k:, self.n_technical_:].T + self.mean_[-k:]
        if weight == 0:
            return biological
        scans = np.zeros(len(Z), np.int64) if scans is None else _check_groups(scans, len(Z))
        technical = Z[:, :self.n_technical_]
        for scan in np.unique(scans):
            rows = scans == scan
            technical[rows] -= np.median(technical[rows], axis=0)
        return np.hstack([weight * technical, biological])

    def _technical_weight(self) -> float:
        w = self.technical_weight
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not np.isfinite(w) or w < 0:
            raise InputError(f"technical_weight must be a finite number >= 0, got {w!r}.")
        return float(w)

    def _harmonized_columns(self) -> int:
        k, d = self.harmonized_columns, self.rotation_.shape[0]
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 0 <= k <= d:
            raise InputError(f"harmonized_columns must be an integer in 0..{d}, got {k!r}.")
        return int(k)

    def inverse_transform(self, Z) -> np.ndarray:
        """Latents back from rotated coordinates (for decoding latent traversals)."""
        check_is_fitted(self, "rotation_")
        Z = _check_latents(Z, "Z")
        return Z @ self.rotation_.T + self.mean_

    # -------------------------------------------------------------------- probe
    def probe_accuracy(self, X, y, space: str = "biological", cv=None, groups=None, scans=None) -> float:
        """Cross-validated accuracy of a linear probe predicting the acquisition ``y`` from one space.

        ``space`` is "biological", "technical", "entangled" (the latents before rotation) or "clusters" (what
        ``cluster_features`` gives, with ``scans`` as there).
        ``groups`` ([n] ids, e.g. patient or location) keeps each group inside one fold; pass them
        whenever one location appears under several acquisitions. Compare with :func:`chance_level`.
        """
        check_is_fitted(self, "rotation_")
        if space not in SPACES:
            raise InputError(f"space must be one of {SPACES}, got {space!r}.")
        X = _check_latents(X)
        y = _check_labels(y, X.shape[0])
        Z = {"entangled": lambda: X - self.mean_, "technical": lambda: self.technical(X),
             "biological": lambda: self.biological(X), "clusters": lambda: self.cluster_features(X, scans)}[space]()
        groups = None if groups is None else _check_groups(groups, X.shape[0])
        rows = self._probe_subset(y, np.random.default_rng(self.random_state))
        return self._probe(Z[rows], y[rows], None if groups is None else groups[rows], cv)

    chance_level = staticmethod(chance_level)

    def _probe_subset(self, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Stratified random subset of at most ``probe_samples`` rows (all rows when fewer)."""
        n = y.shape[0]
        if n <= self.probe_samples:
            return np.arange(n)
        rows = []
        for c in np.unique(y):
            idx = np.flatnonzero(y == c)
            take = max(2, int(round(self.probe_samples * idx.size / n)))
            rows.append(rng.choice(idx, size=min(take, idx.size), replace=False))
        return np.sort(np.concatenate(rows))

    def _probe(self, Z: np.ndarray, y: np.ndarray, groups=None, cv=None) -> float:
        if Z.shape[1] == 0:
            return chance_level(y)
        folds = min(cv or self.cv, int(np.unique(y, return_counts=True)[1].min()))
        if groups is None:
            splitter = StratifiedKFold(n_splits=max(folds, 2), shuffle=True, random_state=self.random_state)
        else:
            folds = min(folds, np.unique(groups).size)
            if folds < 2:
                raise InputError("The probe needs at least two groups (patients or locations) to cross-validate.")
            splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=self.random_state)
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
        return float(np.mean(cross_val_score(probe, Z, y, groups=groups, cv=splitter)))

    # ------------------------------------------------------------ persistence
    def export_state(self) -> tuple:
        """(arrays, meta): what a model bundle stores to rebuild this fitted rotation."""
        check_is_fitted(self, "rotation_")
        arrays = {"rotation": self.rotation_, "mean": self.mean_, "singular_values": self.singular_values_,
                  "probe_curve": self.probe_curve_}
        meta = {"method": self.method_, "n_technical": int(self.n_technical_),
                "latent_dim": int(self.rotation_.shape[0]),
                "chance": float(self.chance_), "probe_entangled": float(self.probe_entangled_),
                "probe_biological": float(self.probe_biological_), "direction_sources": list(self.direction_sources_),
                "noise_floor": float(self.noise_floor_), "n_significant": int(self.n_significant_),
                "params": {k: v for k, v in self.get_params().items()}}
        return arrays, meta

    @classmethod
    def from_state(cls, arrays: dict, meta: dict) -> "LatentRotation":
        """Rebuild a fitted rotation from :meth:`export_state` output (no refitting)."""
        rot = cls(**meta.get("params", {}))
        R = np.asarray(arrays["rotation"], dtype=np.float64)
        d = R.shape[0]
        k = int(meta["n_technical"])
        if R.shape != (d, d) or not np.allclose(R.T @ R, np.eye(d), atol=1e-5):
            raise InputError(f"Stored rotation is not an orthogonal square matrix (shape {R.shape}).")
        if np.asarray(arrays["mean"]).shape != (d,) or not 0 <= k < d:
            raise InputError(f"Stored rotation mean/n_technical do not match a latent size of {d}.")
        rot.rotation_ = R
        rot.mean_ = np.asarray(arrays["mean"], dtype=np.float64)
        rot.singular_values_ = np.asarray(arrays.get("singular_values", np.zeros(0)), dtype=np.float64)
        rot.probe_curve_ = np.asarray(arrays.get("probe_curve", np.zeros(0)), dtype=np.float64)
        rot.technical_basis_ = R[:, :k]
        rot.n_technical_ = k
        rot.n_features_in_ = d
        rot.method_ = str(meta["method"])
        rot.chance_ = float(meta.get("chance", np.nan))
        rot.probe_entangled_ = float(meta.get("probe_entangled", np.nan))
        rot.probe_biological_ = float(meta.get("probe_biological", np.nan))
        rot.direction_sources_ = list(meta.get("direction_sources", []))
        rot.noise_floor_ = float(meta.get("noise_floor", 0.0))
        rot.n_significant_ = int(meta.get("n_significant", 0))
        return rot
