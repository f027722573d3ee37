"""A second stage for the clusters of a bundle already trained: its encoder, rotation and first-stage clusters kept,
the second stage (:mod:`latentharmonize.two_stage`) fitted on the paired patches of its training cohort, as
``train --second-stage`` fits it after the first."""
from __future__ import annotations

from dataclasses import replace

import torch

from ..bundle import ModelBundle
from ..clusters import HIGHER
from ..errors import InputError
from ..progress import Progress
from ..two_stage import reads_core
from .config import TrainConfig
from .posthoc import context_latents, core_rows, fit_second_stage
from .samples import load_cohort_samples
from .summary import ari_vs_truth


def add_second_stage(bundle: ModelBundle, cohort_csv, n_second: int, *, seed: int,
                     per_patient: int = TrainConfig.per_patient, depth_contrast_hu: float | None = None,
                     refit: bool = False, progress: Progress | None = None) -> ModelBundle:
    """A new bundle: ``bundle`` with a ``n_second``-component second stage fitted on ``per_patient`` paired points
    per patient of ``cohort_csv`` (drawn with ``seed``, as ``train`` draws them). With ``refit``, a bundle that
    already has a second stage gets a new one on its first stage (after the second stage's recipe changed); its
    depth test is not carried over, so give ``depth_contrast_hu`` (the bundle's ``clusters.min_above_depth_hu``) to
    keep it. Its identity (SHA-256) is new; the manifest's training summary records the second stage and the bundle
    it extends."""
    if reads_core(bundle.clusters) and not refit:
        raise InputError("This bundle's clusters already have a second stage; refit=True replaces it.")
    spec = bundle.spec
    if not spec.n_statistics or bundle.rotation.harmonized_columns != spec.n_statistics:
        raise InputError("A second stage reads the harmonized densitometry; this bundle was trained without "
                         "--densitometry.")
    config = TrainConfig(seed=seed, per_patient=per_patient, densitometry=spec.densitometry.weight,
                         second_stage=n_second, depth_contrast_hu=depth_contrast_hu)
    progress = progress or Progress(quiet=True)
    samples, cohort = load_cohort_samples(cohort_csv, config, replace(spec, densitometry=None), progress)
    device = torch.device("cpu")
    # train fits on the scans as acquired; the through-plane read (--densitometry-read-z) is for analysed scans only
    as_fitted = replace(spec, densitometry=replace(spec.densitometry, z_total_mm=None))
    latents = context_latents(bundle.encoder(device), cohort, samples, as_fitted, device, progress)
    features = bundle.rotation.cluster_features(latents, scans=samples.scan)
    if reads_core(bundle.clusters):
        # the first stage's raised clusters are all the second stage's: one raised name stands for theirs
        final = bundle.clusters.names_
        first = (bundle.clusters.first_, None, None,
                 [final[label - 1] if label else HIGHER for label in bundle.clusters.first_map_], None)
    else:
        first = (bundle.clusters, None, None, list(bundle.names.values()), None)
    clusters, labels, profiles, names, colors = fit_second_stage(
        first, features, core_rows(cohort, samples, spec), samples, n_second, spec.n_statistics, seed,
        depth_contrast_hu)
    m = bundle.manifest
    training = {**m["training"], "k": len(names), "second_stage": int(n_second), "second_stage_of": bundle.sha256,
                "cluster_names": dict(enumerate(names, start=1)),
                "cluster_sizes": {k: int(p["n"]) for k, p in enumerate(profiles, start=1)},
                "cluster_profiles": profiles, "ari_vs_truth": ari_vs_truth(labels, samples)}
    return ModelBundle.create(name=m["name"], encoder_config={"kind": m["encoder"]["kind"], **m["encoder"]["config"]},
                              encoder_state=bundle.encoder_state, spec=spec, rotation=bundle.rotation,
                              clusters=clusters, names=names, colors=colors, training=training, probe=m["probe"],
                              created=m["created"])
