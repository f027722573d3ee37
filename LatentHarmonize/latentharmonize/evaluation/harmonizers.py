"""Harmonization baselines, each fitted on TRAINING data and applied to new data.

The evaluation compares the rotated latent against established harmonization methods. A fair
comparison fits every method on the training scans only and applies the fitted correction to the
held-out scans, the way a deployed model meets a new scan. The maintained packages are wrapped as
scikit-learn style estimators:

- :class:`ComBatHarmonizer` — ComBat (``neuroCombat``) on latents, with empirical Bayes.
- :class:`HarmonyHarmonizer` — Harmony (``harmonypy``), with a mapping of new samples onto the
  fitted reference (Harmony itself only corrects the data it was run on).
- :class:`LeaceHarmonizer` — LEACE linear concept erasure (``concept-erasure``) of the acquisition.
- :class:`HistogramMatcher` — image-level histogram matching of lung HU (SimpleITK), before encoding.

Latent matrices are ``[n_samples, n_features]`` (scikit-learn orientation) with one acquisition
label per sample; the wrappers transpose for packages that expect features x samples.
"""
from __future__ import annotations

import contextlib
import io
from typing import Sequence

import numpy as np
import pandas as pd
import SimpleITK as sitk
import harmonypy
import torch
from concept_erasure import LeaceFitter
from neuroCombat import neuroCombat
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from ..errors import InputError


def _check_latents(X, batch=None, n_features: int | None = None, what: str = "latents"):
    """Validate a ``[n_samples, n_features]`` matrix (and its per-sample batch labels)."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise InputError(f"{what} must be a 2-D array [n_samples, n_features]; got shape {X.shape}.")
    if X.shape[0] == 0:
        raise InputError(f"{what} hold no sample.")
    if not np.all(np.isfinite(X)):
        raise InputError(f"{what} contain {int(np.sum(~np.isfinite(X)))} NaN or infinite values; remove or impute them first.")
    if n_features is not None and X.shape[1] != n_features:
        raise InputError(f"{what} have {X.shape[1]} features but the harmonizer was fitted on {n_features}. "
                         "Samples are rows and features columns ([n_samples, n_features]).")
    if batch is None:
        return X, None
    batch = np.asarray(batch).astype(str).ravel()
    if batch.size != X.shape[0]:
        hint = " The matrix looks transposed: give [n_samples, n_features]." if batch.size == X.shape[1] else ""
        raise InputError(f"Got {batch.size} acquisition labels for {X.shape[0]} samples; give one label per row.{hint}")
    return X, batch


def _check_known_batches(batch: np.ndarray, known: np.ndarray, method: str) -> np.ndarray:
    """Index of each label in ``known``; unseen acquisitions cannot be corrected by a fitted model."""
    unseen = sorted(set(batch) - set(known))
    if unseen:
        raise InputError(f"{method} was fitted on acquisitions {list(known)} and cannot correct unseen ones {unseen}. "
                         "Fit it on a training cohort that includes these acquisitions.")
    return np.searchsorted(known, batch)


class ComBatHarmonizer(BaseEstimator):
    """ComBat location/scale harmonization of latent features (``neuroCombat``), fit on training data.

    ``fit`` runs ``neuroCombat.neuroCombat`` on the training latents and keeps its estimates
    (pooled mean and variance, per-acquisition shift ``gamma*`` and scale ``delta*``).
    ``transform`` applies those estimates to new samples, the computation of
    ``neuroCombatFromTraining``, which itself fails on NumPy >= 2.4 (it calls ``int()`` on an array).
    Features that are constant in the training data are passed through unchanged: ComBat would
    divide by their zero variance and return NaN.
    """

    def __init__(self, eb: bool = True, parametric: bool = True, mean_only: bool = False):
        self.eb = eb
        self.parametric = parametric
        self.mean_only = mean_only

    def fit(self, X, batch) -> "ComBatHarmonizer":
        X, batch = _check_latents(X, batch)
        levels, counts = np.unique(batch, return_counts=True)
        if levels.size < 2:
            raise InputError(f"ComBat needs at least two acquisitions to harmonize; got only {list(levels)}.")
        if counts.min() < 2:
            raise InputError(f"ComBat needs at least two samples per acquisition; {list(levels[counts < 2])} have one.")
        self.n_features_in_ = X.shape[1]
        self.varying_ = X.std(axis=0) > 1e-12 * (1.0 + np.abs(X).max(axis=0))
        if not self.varying_.any():
            raise InputError("Every latent feature is constant in the training data; there is nothing to harmonize.")
        with contextlib.redirect_stdout(io.StringIO()):  # neuroCombat prints progress on stdout
            fitted = neuroCombat(X[:, self.varying_].T, pd.DataFrame({"batch": batch}), "batch",
                                 eb=self.eb, parametric=self.parametric, mean_only=self.mean_only)
        est = fitted["estimates"]
        self.batches_ = np.asarray(est["batches"]).astype(str)
        self.mean_ = est["stand.mean"][:, 0] + est["mod.mean"].mean(axis=1)
        self.var_pooled_ = np.asarray(est["var.pooled"]).ravel()
        self.gamma_ = np.asarray(est["gamma.star"], dtype=np.float64)  # [batches, features]
        self.delta_ = np.asarray(est["delta.star"], dtype=np.float64)
        bad = ~np.all(np.isfinite(self.gamma_) & np.isfinite(self.delta_) & (self.delta_ > 0), axis=0)
        if bad.any():
            raise InputError(f"ComBat estimates are NaN or zero for {int(bad.sum())} features: some acquisition has "
                             "(near-)constant values there. Use more training samples per acquisition.")
        return self

    def transform(self, X, batch) -> np.ndarray:
        check_is_fitted(self, "gamma_")
        X, batch = _check_latents(X, batch, self.n_features_in_)
        index = _check_known_batches(batch, self.batches_, "ComBat")
        sd = np.sqrt(self.var_pooled_)
        standardized = (X[:, self.varying_] - self.mean_) / sd
        adjusted = (standardized - self.gamma_[index]) / np.sqrt(self.delta_[index])
        out = X.copy()
        out[:, self.varying_] = adjusted * sd + self.mean_
        return out


class HarmonyHarmonizer(BaseEstimator):
    """Harmony (``harmonypy``) fitted on training latents, with a mapping for new samples.

    Harmony corrects each sample by a mixture of cluster-specific linear batch effects:
    ``z_corr = z - sum_k R_k W_k[batch]``, where ``R`` is the soft assignment of the corrected,
    cosine-normalised sample to the cluster centroids ``Y``. harmonypy returns ``Z_orig``, ``Z_corr``,
    ``R`` and ``Y`` but not ``W``; since the correction is exactly linear in ``R`` for each batch,
    ``fit`` recovers ``W`` by least squares on the training samples. ``transform`` then maps a new
    sample as Symphony (Kang et al., Nat Commun 2021) maps query cells onto a Harmony reference:
    soft-assign it to the fitted centroids with the same kernel (without Harmony's diversity
    penalty, which is a property of a dataset, not of one sample), apply the fitted corrections of
    its acquisition, and repeat with the corrected sample ``n_refine`` times. Unlike Symphony, the
    batch coefficients are not re-estimated on the new data: nothing is fitted on test data.
    """

    def __init__(self, theta: float = 2.0, sigma: float = 0.1, n_clusters: int | None = None,
                 max_iter: int = 10, n_refine: int = 5, random_state: int = 0):
        self.theta = theta
        self.sigma = sigma
        self.n_clusters = n_clusters
        self.max_iter = max_iter
        self.n_refine = n_refine
        self.random_state = random_state

    def fit(self, X, batch) -> "HarmonyHarmonizer":
        X, batch = _check_latents(X, batch)
        levels = np.unique(batch)
        if levels.size < 2:
            raise InputError(f"Harmony needs at least two acquisitions to harmonize; got only {list(levels)}.")
        n_clusters = self.n_clusters or int(min(max(round(X.shape[0] / 30.0), 2), 100))
        if X.shape[0] < 2 * n_clusters:
            raise InputError(f"Harmony with {n_clusters} clusters needs at least {2 * n_clusters} training samples; got {X.shape[0]}.")
        fitted = harmonypy.run_harmony(X, pd.DataFrame({"batch": batch}), "batch", theta=self.theta, sigma=self.sigma,
                                       nclust=n_clusters, max_iter_harmony=self.max_iter, verbose=False,
                                       random_state=self.random_state, ncores=1)
        self.n_features_in_ = X.shape[1]
        self.batches_ = levels
        self.centroids_ = np.asarray(fitted.Y, dtype=np.float64)  # [features, clusters], unit columns
        shift = np.asarray(fitted.Z_orig, dtype=np.float64) - np.asarray(fitted.Z_corr, dtype=np.float64)
        R = np.asarray(fitted.R, dtype=np.float64)
        self.corrections_ = np.stack([np.linalg.lstsq(R[batch == b], shift[batch == b], rcond=None)[0] for b in levels])
        self.train_corrected_ = np.asarray(fitted.Z_corr, dtype=np.float64)
        return self

    def _soft_assign(self, Z: np.ndarray) -> np.ndarray:
        unit = Z / np.maximum(np.linalg.norm(Z, axis=1, keepdims=True), 1e-12)
        logits = -2.0 * (1.0 - unit @ self.centroids_) / self.sigma
        logits -= logits.max(axis=1, keepdims=True)
        R = np.exp(logits)
        return R / R.sum(axis=1, keepdims=True)

    def transform(self, X, batch) -> np.ndarray:
        check_is_fitted(self, "corrections_")
        X, batch = _check_latents(X, batch, self.n_features_in_)
        index = _check_known_batches(batch, self.batches_, "Harmony")
        corrected = X.copy()
        for b in np.unique(index):  # one acquisition at a time: R [n, clusters] @ W [clusters, features]
            rows = index == b
            for _ in range(self.n_refine):
                corrected[rows] = X[rows] - self._soft_assign(corrected[rows]) @ self.corrections_[b]
        return corrected


class LeaceHarmonizer(BaseEstimator):
    """LEACE (``concept-erasure``): the least-squares affine edit after which no linear classifier
    predicts the acquisition better than a constant, fitted on training latents and applied to any
    latent (it needs no acquisition label at transform time)."""

    def fit(self, X, batch) -> "LeaceHarmonizer":
        X, batch = _check_latents(X, batch)
        self.batches_, codes = np.unique(batch, return_inverse=True)
        if self.batches_.size < 2:
            raise InputError(f"LEACE needs at least two acquisitions to erase; got only {list(self.batches_)}.")
        onehot = np.eye(self.batches_.size)[codes]
        self.n_features_in_ = X.shape[1]
        self.eraser_ = LeaceFitter.fit(torch.from_numpy(X), torch.from_numpy(onehot)).eraser
        return self

    def transform(self, X, batch=None) -> np.ndarray:
        check_is_fitted(self, "eraser_")
        X, _ = _check_latents(X, None, self.n_features_in_)
        with torch.no_grad():
            return self.eraser_(torch.from_numpy(X)).numpy()


def _lung_values(ct, lung) -> tuple:
    """HU array and lung bool array of a CT and its mask, given as SimpleITK images or numpy arrays."""
    hu = (sitk.GetArrayFromImage(ct) if isinstance(ct, sitk.Image) else np.asarray(ct)).astype(np.float32)
    inside = (sitk.GetArrayFromImage(lung) if isinstance(lung, sitk.Image) else np.asarray(lung)) > 0
    if hu.shape != inside.shape:
        raise InputError(f"CT {hu.shape[::-1]} and lung mask {inside.shape[::-1]} sizes differ; give the mask made for this CT.")
    if not inside.any():
        raise InputError("The lung mask is empty; histogram matching needs lung voxels.")
    return hu, inside


class HistogramMatcher(BaseEstimator):
    """Image-level baseline: match the lung HU histogram of each scan to a training reference.

    ``fit`` pools lung voxels of the training scans (an equal, seeded random share per scan) into a
    reference distribution; ``transform`` maps the lung voxels of a new scan onto it with SimpleITK's
    ``HistogramMatchingImageFilter`` (quantile matching at ``n_match_points``) and leaves voxels
    outside the lung untouched. It runs before encoding, on the CT itself. CTs and masks may be
    SimpleITK images or numpy arrays (e.g. volumes on the model grid); ``transform`` returns the
    type it is given.
    """

    def __init__(self, n_histogram_levels: int = 1024, n_match_points: int = 64, n_reference_voxels: int = 500_000,
                 random_state: int = 0):
        self.n_histogram_levels = n_histogram_levels
        self.n_match_points = n_match_points
        self.n_reference_voxels = n_reference_voxels
        self.random_state = random_state

    def fit(self, cts: Sequence, lungs: Sequence) -> "HistogramMatcher":
        if len(cts) == 0 or len(cts) != len(lungs):
            raise InputError(f"Histogram matching needs one lung mask per training CT; got {len(cts)} CTs and {len(lungs)} masks.")
        rng = np.random.default_rng(self.random_state)
        share = max(self.n_reference_voxels // len(cts), 1)
        pooled = []
        for ct, lung in zip(cts, lungs):
            hu, inside = _lung_values(ct, lung)
            values = hu[inside]
            pooled.append(values if values.size <= share else rng.choice(values, share, replace=False))
        self.reference_ = np.sort(np.concatenate(pooled)).astype(np.float32)
        return self

    def transform(self, ct, lung):
        check_is_fitted(self, "reference_")
        hu, inside = _lung_values(ct, lung)
        matcher = sitk.HistogramMatchingImageFilter()
        matcher.SetNumberOfHistogramLevels(self.n_histogram_levels)
        matcher.SetNumberOfMatchPoints(self.n_match_points)
        matcher.ThresholdAtMeanIntensityOff()  # only lung voxels are passed, no background to exclude
        matched = matcher.Execute(sitk.GetImageFromArray(hu[inside][None, :]),
                                  sitk.GetImageFromArray(self.reference_[None, :]))
        hu[inside] = sitk.GetArrayFromImage(matched).ravel()
        if not isinstance(ct, sitk.Image):
            return hu
        out = sitk.GetImageFromArray(hu)
        out.CopyInformation(ct)
        return out
