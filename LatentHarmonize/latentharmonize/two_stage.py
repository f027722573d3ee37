"""Two-stage tissue clusters: the first stage's raised side split again by the texture of the parenchyma's core.

The first stage (:func:`clusters.fit_named_clusters` on the rotation's cluster features) reads densitometry blurred
to 2.5 mm, which keeps the map steady across kernels but puts ground glass, reticulation, honeycombing and
consolidation into one raised cluster. The second stage is a mixture fitted only on the patches the first stage
calls raised (higher-attenuation lung, lung with dense structures or a raised pattern's name). It reads the first
stage's harmonized statistics plus three unblurred statistics of each patch's *core* (:func:`patches.core_statistics`:
the parenchyma eroded by one voxel, away from the vessels, airways and lung edge found): the median, the upper decile
and the share above -300 HU, standardised on the training rows. The sharp kernel moves the core's lower statistics
(its noise fills the tail below -950 HU) but hardly these upper ones
(``docs/experiments/2026-12-05-eight-components-and-unblurred-statistics.md``), so the second stage keeps the
kernel robustness (``docs/experiments/2026-12-06-two-stage-clusters.md``).

The second stage's components are named by the naming rules from their patches' core statistics and merged by
name. A patch's probability of a final cluster is its first-stage probability for the kept (not raised) clusters,
and ``P(raised) * P(second-stage cluster | raised)`` for the second stage's; clusters of one name are one final
cluster (one name, one colour, one segment).

Each patch earns a disease-like name of the second stage by its own core: where the core's median, lower quartile
and threshold shares, named alone by the rules of :func:`clusters.name_rows`, do not give that name, the
probability moves to higher-attenuation lung. On three normal real lungs (LIDC-IDRI) the second stage otherwise named
1-2.5 % of the lung ground-glass-like: hilar vessels and partial volume at the bases, which a 20 mm patch's blurred
statistics cannot tell from ground glass but its core can. With ``min_above_depth_hu``, a ground-glass-like or
reticular-like name also needs the core's median to stand that far above the lung at the patch's antero-posterior
depth (the core's ``above_depth``, :func:`patches.core_statistics`): the dense back of a lung held in a small breath
reads as raised against fixed bounds, but not against the lung beside it
(``docs/experiments/2026-12-07-depth-contrast.md``).

Input rows are ``[first-stage features | the 9 core statistics]`` (raw HU and shares, in
``patches.CORE_STATISTIC_NAMES`` order): :func:`with_core` builds them.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from sklearn.base import BaseEstimator, ClusterMixin
from sklearn.utils.validation import check_is_fitted

from .clusters import (DENSE, DENSE_STRUCTURES, DISEASE_NAMES, GROUND_GLASS, HIGHER, HONEYCOMB, NAMING_KEYS,
                       RETICULAR, TissueClusters, _check_points, base_name, fit_named_clusters,
                       name_rows, nearest_with_confidence, stored_params, with_stored_params)
from .densitometry import HU_STATISTIC_NAMES
from .errors import InputError
from .patches import CORE_STATISTIC_NAMES

RAISED_NAMES = (HIGHER, DENSE_STRUCTURES, GROUND_GLASS, RETICULAR, HONEYCOMB, DENSE)  # what the second stage splits
CORE_COLUMNS = ("q50", "q90", "above_300")  # the core statistics the second stage reads
N_CORE = len(CORE_STATISTIC_NAMES)
DEPTH_CHECKED = (GROUND_GLASS, RETICULAR)  # the names of a raised parenchyma, which must stand above the lung's depth
# the core statistics that name a patch on its own (clusters.NAMING_KEYS, in that order)
_OWN_PROFILE = dict(zip(NAMING_KEYS, ("q50", "q25", "below_950", "above_300")))
MIN_RAISED_ROWS = 50  # fewer raised training rows than this: no second stage is fitted


def with_core(features, core) -> np.ndarray:
    """The input rows of :class:`TwoStageClusters`: first-stage ``features`` [n, d] then ``core`` [n, 9]
    (:func:`patches.core_statistics`)."""
    features, core = np.asarray(features), np.asarray(core)
    if core.ndim != 2 or core.shape[1] != N_CORE or len(core) != len(features):
        raise InputError(f"Core statistics must be [n_patches, {N_CORE}] with one row per feature row; got "
                         f"{core.shape} for {len(features)} rows.")
    return np.hstack([features, core])


def reads_core(clusters) -> bool:
    """Whether fitted clusters take the core statistics after their features (:func:`with_core`)."""
    return isinstance(clusters, TwoStageClusters)


def _column(name: str) -> int:
    return CORE_STATISTIC_NAMES.index(name)


def own_profile(core) -> dict:
    """The naming profile (``clusters.NAMING_KEYS``) of each row of core statistics [n, 9]."""
    core = np.asarray(core, dtype=np.float64)
    return {key: core[:, _column(c)] for key, c in _OWN_PROFILE.items()}


class TwoStageClusters(ClusterMixin, BaseEstimator):
    """A first stage's named clusters with their raised side split by a second, core-reading mixture.

    Parameters
    ----------
    n_second : int
        Mixture components of the second stage (merged by name like the first stage's).
    harmonized_columns : int
        How many of the first stage's last feature columns are the harmonized densitometry the second stage reads
        beside the core (``LatentRotation.harmonized_columns``).
    core_columns : sequence of str
        The core statistics the second stage reads (names of ``HU_STATISTIC_NAMES``).
    random_state : int
        Seed of the second stage's mixture.
    min_above_depth_hu : float or None
        How far (HU) a patch's core median must stand above the lung at its depth to earn a ground-glass-like or
        reticular-like name; None: no such test.
    """

    def __init__(self, n_second=4, harmonized_columns=8, core_columns=CORE_COLUMNS, random_state=0,
                 min_above_depth_hu=None):
        self.n_second = n_second
        self.harmonized_columns = harmonized_columns
        self.core_columns = core_columns
        self.random_state = random_state
        self.min_above_depth_hu = min_above_depth_hu

    # ------------------------------------------------------------------ fitting
    def fit(self, X, first: TissueClusters, first_names: Sequence[str], order_by=None, acquisition_covariance=None):
        """Fit the second stage on the rows of ``X`` (:func:`with_core`) that ``first`` (fitted on ``X``'s feature
        columns, clusters named ``first_names``) calls raised. Its components are named from their rows' core
        statistics, the profile each patch earns its name by, and merged by name; ``order_by`` ([n], e.g. patch
        mean HU) orders them; ``acquisition_covariance`` is ``X``'s (the second stage's rows and columns of it are
        taken). Without raised rows (fewer than :data:`MIN_RAISED_ROWS`) the first stage is all there is."""
        X = _check_points(X, "X")
        d1 = X.shape[1] - N_CORE
        if d1 < 1 or first.means_.shape[1] != d1:
            raise InputError(f"X must hold the first stage's {first.means_.shape[1]} feature columns and {N_CORE} core "
                             f"statistics; got {X.shape[1]} columns.")
        self._check_params(d1)
        self.first_ = first
        self.n_features_in_ = X.shape[1]
        names1 = [base_name(n) for n in first_names]
        raised = np.array([n in RAISED_NAMES for n in names1])
        core = X[:, d1:]
        self.core_center_ = core.mean(axis=0)
        self.core_scale_ = np.maximum(core.std(axis=0), 1e-6)
        rows = raised[first.predict(X[:, :d1]) - 1]
        self.second_, names2 = None, []
        if rows.sum() >= max(MIN_RAISED_ROWS, 2 * int(self.n_second)):
            widening = None
            if acquisition_covariance is not None:
                a = self._second_map(d1)
                widening = a @ np.asarray(acquisition_covariance, dtype=np.float64) @ a.T
            profile = own_profile(X[rows, d1:])
            order = None if order_by is None else np.asarray(order_by, dtype=np.float64).ravel()[rows]
            self.second_, _, _, names2 = fit_named_clusters(
                self._second_features(X[rows]), profile, int(self.n_second), self.random_state,
                order_by=profile["median_hu"] if order is None else order, acquisition_covariance=widening)
            names2 = [base_name(n) for n in names2]
        else:
            raised[:] = False
        final = list(dict.fromkeys([n for n, r in zip(names1, raised) if not r] + names2))
        self.first_map_ = np.array([0 if r else final.index(n) + 1 for n, r in zip(names1, raised)], np.int64)
        self.second_map_ = np.array([final.index(n) + 1 for n in names2], np.int64)
        # names only the second stage gives are earned patch by patch; what is not earned is higher-attenuation lung
        kept = {n for n, r in zip(names1, raised) if not r}
        earned = [n for n in names2 if n in DISEASE_NAMES and n not in kept]
        if earned and HIGHER not in final:
            final.append(HIGHER)
        self.earned_ = np.array([final.index(n) + 1 for n in earned], np.int64)
        self.fallback_ = final.index(HIGHER) + 1 if HIGHER in final else 0
        self.names_ = final
        self.n_clusters_ = len(final)
        self.n_components_ = first.n_components_
        self.labels_ = self.predict(X)
        return self

    def _check_params(self, d1: int) -> None:
        if isinstance(self.n_second, bool) or not isinstance(self.n_second, (int, np.integer)) or self.n_second < 2:
            raise InputError(f"n_second must be an integer >= 2, got {self.n_second!r}.")
        k = self.harmonized_columns
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= d1:
            raise InputError(f"harmonized_columns must be an integer in 1..{d1} (the first stage's feature columns), "
                             f"got {k!r}.")
        unknown = [c for c in self.core_columns if c not in HU_STATISTIC_NAMES]
        if unknown or not len(self.core_columns):
            raise InputError(f"core_columns must name statistics of {list(HU_STATISTIC_NAMES)}; got "
                             f"{list(self.core_columns)}.")
        m = self.min_above_depth_hu
        if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float, np.integer, np.floating))
                              or not np.isfinite(m) or m < 0):
            raise InputError(f"min_above_depth_hu must be None or a finite number of HU >= 0, got {m!r}.")

    def _second_map(self, d1: int) -> np.ndarray:
        """The linear map from an input row (features, core) to the second stage's features, [d2, d1 + 9]."""
        k = int(self.harmonized_columns)
        cols = [_column(c) for c in self.core_columns]
        a = np.zeros((k + len(cols), d1 + N_CORE))
        a[np.arange(k), d1 - k + np.arange(k)] = 1.0
        a[k + np.arange(len(cols)), d1 + np.array(cols)] = 1.0 / self.core_scale_[cols]
        return a

    def _second_features(self, X: np.ndarray) -> np.ndarray:
        """The second stage's features of input rows: :meth:`_second_map` of the rows, the core centred first."""
        d1 = X.shape[1] - N_CORE
        return (X - np.concatenate([np.zeros(d1), self.core_center_])) @ self._second_map(d1).T

    # --------------------------------------------------------------- predicting
    def predict_proba(self, X) -> np.ndarray:
        """Posterior probability of each final cluster, float64 [n, C], after the per-patch naming (module
        docstring)."""
        X, first = self._first_stage_proba(X)
        d1 = X.shape[1] - N_CORE
        out = np.zeros((len(X), self.n_clusters_))
        for k, label in enumerate(self.first_map_):
            if label:
                out[:, label - 1] += first[:, k]
        if self.second_ is not None:
            raised = first[:, self.first_map_ == 0].sum(axis=1)
            second = self.second_.predict_proba(self._second_features(X))
            for k, label in enumerate(self.second_map_):
                out[:, label - 1] += raised * second[:, k]
        if len(self.earned_):
            own = name_rows(own_profile(X[:, d1:]))
            flat = (X[:, d1 + _column("above_depth")] < self.min_above_depth_hu
                    if self.min_above_depth_hu is not None else np.zeros(len(X), bool))
            for label in self.earned_:
                unearned = own != self.names_[label - 1]
                if self.names_[label - 1] in DEPTH_CHECKED:
                    unearned |= flat
                out[unearned, self.fallback_ - 1] += out[unearned, label - 1]
                out[unearned, label - 1] = 0.0
        return out

    def transform(self, X) -> np.ndarray:
        """Dissimilarity to each final cluster, ``1 - posterior probability``, [n, C]."""
        return 1.0 - self.predict_proba(X)

    def predict(self, X) -> np.ndarray:
        return self.predict_with_confidence(X)[0]

    def predict_with_confidence(self, X) -> tuple:
        return nearest_with_confidence(self.transform(X))

    def predict_first_stage(self, X) -> np.ndarray:
        """Labels of the first stage alone: its kept clusters' final labels, and 0 for its raised side. Beside
        :meth:`predict` it tells which stage moves a patch between two acquisitions (``scripts/kernel_pair.py``)."""
        return self.first_map_[np.argmax(self._first_stage_proba(X)[1], axis=1)]

    def _first_stage_proba(self, X) -> tuple:
        """``(X checked, the first stage's probabilities of its clusters)`` for input rows (:func:`with_core`)."""
        check_is_fitted(self, "names_")
        X = _check_points(X, "X")
        if X.shape[1] != self.n_features_in_:
            raise InputError(f"Got {X.shape[1]} columns; these clusters read {self.n_features_in_ - N_CORE} feature "
                             f"columns and {N_CORE} core statistics (two_stage.with_core).")
        return X, self.first_.predict_proba(X[:, :X.shape[1] - N_CORE])

    # ------------------------------------------------------------ persistence
    def export_state(self) -> tuple:
        """(arrays, meta) a model bundle stores; the stages' own states under ``first.`` / ``second.``."""
        check_is_fitted(self, "names_")
        arrays, meta = {}, {"k": int(self.n_clusters_), "n_components": int(self.n_components_),
                            "final_names": list(self.names_), "fallback": int(self.fallback_),
                            "params": stored_params(self)}
        stages = {"first": self.first_, "second": self.second_}
        for stage, clusters in stages.items():
            if clusters is not None:
                a, m = clusters.export_state()
                arrays.update({f"{stage}.{k}": v for k, v in a.items()})
                meta[stage] = m
        arrays.update({"first_map": self.first_map_, "second_map": self.second_map_, "earned": self.earned_,
                       "core_center": self.core_center_, "core_scale": self.core_scale_})
        return arrays, meta

    @classmethod
    def from_state(cls, arrays: dict, meta: dict) -> "TwoStageClusters":
        """Rebuild from :meth:`export_state` output (no refitting)."""
        tc = with_stored_params(cls, meta)

        def stage(name):
            part = {k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith(f"{name}.")}
            return TissueClusters.from_state(part, meta[name]) if name in meta else None

        tc.first_, tc.second_ = stage("first"), stage("second")
        if tc.first_ is None:
            raise InputError("Two-stage clusters without a first stage.")
        as_int = {k: np.asarray(arrays[k], dtype=np.float64).astype(np.int64).ravel()
                  for k in ("first_map", "second_map", "earned")}
        tc.first_map_, tc.second_map_, tc.earned_ = as_int["first_map"], as_int["second_map"], as_int["earned"]
        tc.core_center_ = np.asarray(arrays["core_center"], dtype=np.float64).ravel()
        tc.core_scale_ = np.asarray(arrays["core_scale"], dtype=np.float64).ravel()
        if tc.core_center_.shape == tc.core_scale_.shape == (len(HU_STATISTIC_NAMES),):
            # stored before the core gained above_depth, which such clusters do not read
            tc.core_center_, tc.core_scale_ = np.append(tc.core_center_, 0.0), np.append(tc.core_scale_, 1.0)
        tc.names_ = [str(n) for n in meta["final_names"]]
        tc.n_clusters_, tc.n_components_ = len(tc.names_), tc.first_.n_components_
        tc.fallback_ = int(meta["fallback"])
        tc.n_features_in_ = tc.first_.means_.shape[1] + N_CORE
        c = tc.n_clusters_
        labels = np.concatenate([tc.first_map_[tc.first_map_ > 0], tc.second_map_, tc.earned_, [tc.fallback_]])
        if (len(tc.first_map_) != tc.first_.n_clusters_ or int(meta["k"]) != c
                or (tc.second_ is not None) != bool(len(tc.second_map_))
                or (tc.second_ is not None and len(tc.second_map_) != tc.second_.n_clusters_)
                or labels.min() < 0 or labels.max() > c or (len(tc.earned_) and not tc.fallback_)
                or tc.core_center_.shape != (N_CORE,) or tc.core_scale_.shape != (N_CORE,)
                or not np.all(tc.core_scale_ > 0)):
            raise InputError("The stored two-stage clusters' maps, names and core scale do not fit together.")
        tc._check_params(tc.first_.means_.shape[1])
        return tc


def fit_two_stage_clusters(X, stats: Mapping[str, np.ndarray], n_clusters, n_second: int, random_state: int,
                           order_by=None, acquisition_covariance=None, harmonized_columns: int = 8,
                           min_above_depth_hu=None) -> tuple:
    """:func:`clusters.fit_named_clusters` on ``X``'s feature columns (named from ``stats``), then
    :class:`TwoStageClusters` on its raised side; returns (clusters, final label of each row, names of the final
    clusters)."""
    X = _check_points(X, "X")
    d1 = X.shape[1] - N_CORE
    cov = None if acquisition_covariance is None else np.asarray(acquisition_covariance, dtype=np.float64)
    first, _, _, names = fit_named_clusters(X[:, :d1], stats, n_clusters, random_state, order_by=order_by,
                                            acquisition_covariance=None if cov is None else cov[:d1, :d1])
    clusters = TwoStageClusters(n_second=n_second, harmonized_columns=harmonized_columns, random_state=random_state,
                                min_above_depth_hu=min_above_depth_hu).fit(X, first, names, order_by, cov)
    return clusters, clusters.labels_, list(clusters.names_)
