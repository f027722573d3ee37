"""What ``train`` fits on the frozen encoder's latents (:func:`fit_posthoc`): the training rows' latents (dense, with
context, as ``analyze`` sees them), the densitometry entry of the spec, the latent rotation with its acquisition
probe, the technical weight, and the named tissue clusters."""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from sklearn.metrics import adjusted_rand_score

from ..clusters import (TissueClusters, acquisition_covariance, cluster_profiles, default_colors,
                        fit_named_clusters)
from ..densitometry import HU_STATISTIC_NAMES
from ..patches import (DenseLatents, PatchDensitometry, PatchSpec, aggregate_context, autocast_for, core_statistics,
                       encode_dense, n_features, patch_lattice, point_keys, valid_centres)
from ..progress import Progress
from ..rotation import LatentRotation, chance_level
from ..scans import load_scan
from ..two_stage import N_CORE, TwoStageClusters, with_core
from .config import TrainConfig
from .samples import PairedPatches, cohort_patients


@dataclass
class PosthocFit:
    """Everything fitted after the encoder; ``spec`` carries the fitted densitometry entry, if any."""

    spec: PatchSpec
    reconstruction_mse: float
    rotation: LatentRotation
    probe: dict
    technical_weight: float
    weight_scores: dict  # {candidate weight: ARI across the training pairs}
    clusters: TissueClusters | TwoStageClusters
    labels: np.ndarray  # cluster of each training row
    profiles: list
    names: list
    colors: list


def fit_posthoc(model, cohort, samples: PairedPatches, config: TrainConfig, device: torch.device,
                progress: Progress) -> PosthocFit:
    """Latents of the training rows with the frozen encoder, then the rotation, technical weight and clusters."""
    progress(70, "rotate", "encoding patches with the frozen encoder")
    latents, mse = encode_rows(model, samples.patches, device)
    spec = config.patch_spec()
    if config.densitometry is not None:
        spec, latents = fit_densitometry(model, cohort, samples, spec, config.densitometry, device, progress,
                                         config.densitometry_smooth_mm, config.densitometry_smooth_total)
    elif spec.context_radius > 0:
        latents = context_latents(model, cohort, samples, spec, device, progress)
    rotation, probe = fit_rotation(latents, samples, config.n_technical, config.seed)
    # with densitometry the clusters read the statistics, harmonized, not the encoder's latent (0 columns without)
    rotation.set_params(harmonized_columns=spec.n_statistics)
    if config.technical_weight is None:
        progress(78, "cluster", f"{rotation.n_technical_} technical dimensions; choosing their re-centred weight")
        weight, weight_scores, clusters = select_technical_weight(rotation, latents, samples, config.clusters,
                                                                  config.seed)
    else:
        weight, weight_scores = float(config.technical_weight), {}
        rotation.set_params(technical_weight=weight)
        clusters = fit_clusters(rotation.cluster_features(latents, scans=samples.scan), samples, config.clusters,
                                config.seed)
    if config.second_stage:
        progress(79, "cluster", f"second stage: {config.second_stage} components on the raised clusters")
        core = core_rows(cohort, samples, spec)
        clusters = fit_second_stage(clusters, rotation.cluster_features(latents, scans=samples.scan), core, samples,
                                    config.second_stage, spec.n_statistics, config.seed, config.depth_contrast_hu)
    tissue, labels, profiles, names, colors = clusters
    progress(80, "cluster", f"technical weight {weight:g}; {len(names)} tissue clusters")
    probe["clusters"] = rotation.probe_accuracy(latents, samples.acquisition.astype(str), space="clusters",
                                                groups=samples.point, scans=samples.scan)
    if config.densitometry_read_z_mm:  # everything above is fitted on the scans as acquired
        spec = replace(spec, densitometry=replace(spec.densitometry, z_total_mm=float(config.densitometry_read_z_mm)))
    return PosthocFit(spec, mse, rotation, probe, weight, weight_scores, tissue, labels, profiles, names, colors)


def encode_rows(model, patches: np.ndarray, device: torch.device, batch: int = 1024) -> tuple[np.ndarray, float]:
    """Latents [n, d] of training patches with the frozen encoder, and their mean squared reconstruction error."""
    latents, sq = [], 0.0
    with torch.inference_mode(), autocast_for(device):
        for start in range(0, len(patches), batch):
            x = torch.from_numpy(patches[start: start + batch]).to(device)
            z = model.encode(x)
            latents.append(z.float().cpu().numpy())
            sq += float(((model.reconstruct(x).float() - x) ** 2).sum())
    return np.concatenate(latents), sq / patches.size


def context_latents(model, cohort, samples: PairedPatches, spec: PatchSpec, device: torch.device,
                    progress: Progress | None = None) -> np.ndarray:
    """Latents of the sampled rows exactly as ``analyze`` will see them: each scan is encoded densely, with the
    spec's context aggregation, and every row takes the latent at its physical point."""
    def dense_latents(scan):
        return encode_dense(model, scan.hu, scan.lung, scan.grid, spec, device)

    return _at_sampled_rows(cohort, samples, spec, dense_latents, n_features(model.latent_dim, spec), progress,
                            "dense latents with context")


def core_rows(cohort, samples: PairedPatches, spec: PatchSpec) -> np.ndarray:
    """The sampled rows' context-averaged :func:`patches.core_statistics`, as ``analyze`` computes them for the
    second stage of the clusters (at every whole-lung lattice point, then taken at the rows' points)."""
    def dense_core(scan):
        positions = np.argwhere(valid_centres(scan.lung, spec))
        values = core_statistics(scan.hu, scan.parenchyma, positions, spec, lung=scan.lung)
        return aggregate_context(DenseLatents(values, positions, patch_lattice(scan.grid, spec)), spec.context_radius)

    return _at_sampled_rows(cohort, samples, spec, dense_core, N_CORE)


def _at_sampled_rows(cohort, samples: PairedPatches, spec: PatchSpec, dense_of, width: int,
                     progress: Progress | None = None, what: str = "") -> np.ndarray:
    """[len(samples), width]: for every scan, ``dense_of(scan)`` (a :class:`DenseLatents`) at the rows' points.
    Scans are visited in the order ``load_cohort_samples`` numbered them (:func:`.samples.cohort_patients`)."""
    out = np.zeros((len(samples), width), np.float32)
    patients = cohort_patients(cohort)
    index = 0
    for n, (patient, rows_of_patient) in enumerate(patients):
        for _, row in rows_of_patient.iterrows():
            dense = dense_of(load_scan(row, spec))
            where = {key: i for i, key in enumerate(map(tuple, point_keys(dense.lattice, dense.positions).tolist()))}
            rows = np.flatnonzero(samples.scan == index)
            out[rows] = dense.latents[[where[key] for key in map(tuple, samples.keys[rows].tolist())]]
            index += 1
        if progress is not None:
            progress(70 + 8 * (n + 1) / len(patients), "rotate", f"patient {patient}: {what}")
    return out


def fit_densitometry(model, cohort, samples: PairedPatches, spec: PatchSpec, weight: float, device: torch.device,
                     progress: Progress | None = None, smooth_mm: float = 0.0, smooth_total: bool = False) -> tuple:
    """The spec with a fitted ``densitometry`` entry, and the training rows' latents with its columns appended.

    Each statistic is centred on its mean over the training rows and scaled so that its SD is ``weight`` times the
    mean SD of the encoder's latent coordinates: at weight 1 the eight statistics weigh like eight latent
    coordinates in the rotation and the clusters. ``smooth_mm`` > 0: statistics of the in-plane smoothed lung
    (``densitometry.smooth_lung``); ``smooth_total``: ``smooth_mm`` counts the encoder's low-pass in.
    """
    n = len(HU_STATISTIC_NAMES)
    smooth = float(smooth_mm) if smooth_mm else None
    raw_spec = replace(spec, densitometry=PatchDensitometry(float(weight), (0.0,) * n, (1.0,) * n, smooth,
                                                            bool(smooth_total)))
    latents = context_latents(model, cohort, samples, raw_spec, device, progress)  # statistics as they are
    d = model.latent_dim
    center = latents[:, d:].mean(axis=0)
    sd = np.maximum(latents[:, d:].std(axis=0), 1e-6)  # a statistic constant over the training rows stays 0
    scale = sd / (weight * latents[:, :d].std(axis=0).mean())
    latents[:, d:] = (latents[:, d:] - center) / scale
    entry = replace(raw_spec.densitometry, center=tuple(float(v) for v in center), scale=tuple(float(v) for v in scale))
    return replace(spec, densitometry=entry), latents


def fit_rotation(latents: np.ndarray, samples: PairedPatches, n_technical, seed: int) -> tuple:
    """Fit the latent rotation (paired when the cohort has pairs) and measure the acquisition probe."""
    pairs = samples.pairs()
    y = samples.acquisition.astype(str)
    rotation = LatentRotation(n_technical=n_technical, random_state=seed)
    rotation.fit(latents, y, pairs=pairs if len(pairs) else None)
    # One physical point seen under several acquisitions stays inside one fold, else the probe is biased.
    probe = {"chance": chance_level(y),
             "entangled": rotation.probe_accuracy(latents, y, space="entangled", groups=samples.point),
             "biological": rotation.probe_accuracy(latents, y, space="biological", groups=samples.point)}
    return rotation, probe


TECHNICAL_WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)


def select_technical_weight(rotation, latents: np.ndarray, samples: PairedPatches, n_clusters: int | None,
                            seed: int, weights=TECHNICAL_WEIGHTS) -> tuple:
    """Set ``rotation.technical_weight`` to the candidate whose tissue clusters (:func:`fit_clusters`) agree best
    across acquisitions of the same training points (ARI over the cross-acquisition pairs); returns (weight,
    {weight: ARI}, the clusters fitted at that weight, as :func:`fit_clusters` returns them).

    Only training pairs are used: no outcome and no held-out scan. Each scan's technical coordinates are re-centred
    on the median of its sampled points, which estimates the median over all its lung that ``analyze`` takes.
    """
    pairs = samples.pairs()
    candidates = weights if rotation.n_technical_ and len(pairs) else (0.0,)
    fits = {}
    for weight in map(float, candidates):
        rotation.set_params(technical_weight=weight)
        fits[weight] = fit_clusters(rotation.cluster_features(latents, scans=samples.scan), samples, n_clusters, seed)
    if len(fits) == 1:  # no technical coordinates or no pairs to choose by: they stay out of the clusters
        return 0.0, {}, fits[0.0]
    scores = {w: float(adjusted_rand_score(fit[1][pairs[:, 0]], fit[1][pairs[:, 1]])) for w, fit in fits.items()}
    best = max(scores, key=lambda w: (scores[w], -w))  # ties: the smaller weight
    rotation.set_params(technical_weight=best)
    return best, scores, fits[best]


def fit_second_stage(clusters: tuple, features: np.ndarray, core: np.ndarray, samples: PairedPatches,
                     n_second: int, harmonized_columns: int, seed: int, min_above_depth_hu=None) -> tuple:
    """:class:`two_stage.TwoStageClusters` on the first stage ``clusters`` (as :func:`fit_clusters` returns them),
    widened by the acquisition covariance of the training pairs; returns the same five things for the final
    clusters."""
    first, _, _, first_names, _ = clusters
    X = with_core(features, core)
    pairs = samples.pairs()
    widening = acquisition_covariance(X[pairs[:, 0]], X[pairs[:, 1]]) if len(pairs) else None
    two = TwoStageClusters(n_second=n_second, harmonized_columns=harmonized_columns, random_state=seed,
                           min_above_depth_hu=min_above_depth_hu).fit(
        X, first, first_names, samples.stats["mean_hu"], widening)
    names = list(two.names_)
    return (two, two.labels_, cluster_profiles(two.labels_, samples.stats, two.n_clusters_), names,
            default_colors(names))


def fit_clusters(features: np.ndarray, samples: PairedPatches, n_clusters: int | None, seed: int) -> tuple:
    """Mixture tissue clusters on the rotation's cluster features, components widened by the acquisition covariance
    of the training pairs (when the cohort has pairs), named from the HU profile of their patches and merged by name
    (:func:`clusters.fit_named_clusters`)."""
    pairs = samples.pairs()
    widening = acquisition_covariance(features[pairs[:, 0]], features[pairs[:, 1]]) if len(pairs) else None
    clusters, labels, profiles, names = fit_named_clusters(features, samples.stats, n_clusters, seed,
                                                           order_by=samples.stats["mean_hu"],
                                                           acquisition_covariance=widening)
    return clusters, labels, profiles, names, default_colors(names)
