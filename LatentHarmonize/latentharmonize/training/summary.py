"""The training summary: what the bundle's manifest records under ``training`` (and ``probe``), and its printed
form."""
from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import adjusted_rand_score

from ..two_stage import reads_core
from .config import TrainConfig
from .posthoc import PosthocFit
from .samples import PairedPatches


def training_summary(config: TrainConfig, device: torch.device, epochs: int, history: list, cohort,
                     samples: PairedPatches, fit: PosthocFit) -> dict:
    """The summary of a run; its keys and their order are part of the bundle's bytes."""
    return {
        "encoder": config.encoder, "seed": config.seed, "device": str(device), "epochs": epochs,
        "loss_history": history, "n_patients": int(cohort["patient"].nunique()), "n_scans": int(len(cohort)),
        "acquisitions": sorted(set(samples.acquisition.astype(str))), "n_patches": int(len(samples)),
        "n_pairs": int(len(samples.pairs())), "reconstruction_mse": fit.reconstruction_mse,
        "reconstruction_rmse_hu": float(np.sqrt(fit.reconstruction_mse) * np.diff(fit.spec.hu_window)[0]),
        "probe": fit.probe, "n_technical": int(fit.rotation.n_technical_), "technical_weight": fit.technical_weight,
        "technical_weight_pair_ari": {f"{w:g}": a for w, a in fit.weight_scores.items()},
        "k": int(fit.clusters.n_clusters_), "n_components": int(fit.clusters.n_components_),
        "acquisition_widening": (fit.clusters.first_ if reads_core(fit.clusters) else fit.clusters).widening_share_,
        "cluster_sizes": {int(k): int(p["n"]) for k, p in enumerate(fit.profiles, start=1)},
        "cluster_names": {int(k): n for k, n in enumerate(fit.names, start=1)},
        "cluster_profiles": fit.profiles, "ari_vs_truth": ari_vs_truth(fit.labels, samples),
        **({"densitometry": float(config.densitometry)} if config.densitometry is not None else {}),
        **({"densitometry_smooth_mm": float(config.densitometry_smooth_mm)} if config.densitometry_smooth_mm else {}),
        **({"densitometry_smooth_total": True} if config.densitometry_smooth_total else {}),
        **({"densitometry_read_z_mm": float(config.densitometry_read_z_mm)} if config.densitometry_read_z_mm else {}),
        **({"technical_weight_fixed": True} if config.technical_weight is not None else {}),
        **({"second_stage": int(config.second_stage)} if config.second_stage else {}),
    }


def recipe_options(bundle) -> dict:
    """The ``TrainConfig`` options of the recipe ``bundle`` was trained with (its representation and clusters; not
    the seed, the epochs or the cohort), so that a bundle trained with them is of its kind, e.g. on held-out scanner
    settings. The depth test is read from the clusters, since the manifest's summary does not record it."""
    trained, spec, clusters = bundle.manifest["training"], bundle.spec, bundle.clusters
    return {"calibrate": spec.calibration is not None, "densitometry": trained.get("densitometry"),
            "densitometry_smooth_mm": trained.get("densitometry_smooth_mm", 0.0),
            "densitometry_smooth_total": trained.get("densitometry_smooth_total", False),
            "densitometry_read_z_mm": (spec.densitometry.z_total_mm or 0.0) if spec.densitometry else 0.0,
            "technical_weight": trained["technical_weight"] if trained.get("technical_weight_fixed") else None,
            "lowpass_mm": spec.lowpass_mm, "lowpass_noise_hu": spec.lowpass_noise_hu,
            "clusters": trained.get("n_components"), "second_stage": trained.get("second_stage"),
            "depth_contrast_hu": clusters.min_above_depth_hu if reads_core(clusters) else None}


def ari_vs_truth(labels: np.ndarray, samples: PairedPatches):
    """Adjusted Rand index of the clusters against the tissue truth at the patch centres (phantom cohorts)."""
    if samples.truth is None:
        return None
    inside = samples.truth > 0
    return float(adjusted_rand_score(samples.truth[inside], labels[inside])) if inside.any() else None


def format_summary(summary: dict) -> str:
    probe = summary["probe"]
    lines = [
        f"Trained {summary['encoder']} encoder for {summary['epochs']} epochs on {summary['device']} "
        f"({summary['train_seconds']} s): {summary['n_patients']} patients, {summary['n_scans']} scans, "
        f"{summary['n_patches']} patches, {summary['n_pairs']} cross-acquisition pairs.",
        f"Reconstruction error: RMSE {summary['reconstruction_rmse_hu']:.1f} HU (MSE {summary['reconstruction_mse']:.5f}).",
        f"Acquisition probe accuracy: {probe['entangled']:.3f} before rotation, {probe['biological']:.3f} on the biological "
        f"coordinates (chance {probe['chance']:.3f}); {summary['n_technical']} technical dimensions "
        + (f"re-centred on each scan's median, weight {summary['technical_weight']:g}, for the clusters "
           f"(probe on what the {'first stage sees' if summary.get('second_stage') else 'clusters see'}: "
           f"{probe['clusters']:.3f})."
           if summary.get("technical_weight") else "left out of the clusters."),
        f"{summary['n_components']} mixture components"
        + (f", widened by the training pairs' acquisition scatter ({100 * summary['acquisition_widening']:.1f} % of "
           "a component's spread)" if summary.get("acquisition_widening") else "")
        + f", named from their patches' HU and merged by name into {summary['k']} tissue "
          f"cluster{'s' if summary['k'] != 1 else ''}:",
    ]
    if summary.get("densitometry"):
        lines.insert(2, "Patch densitometry appended to the latents before the rotation, "
                        f"weight {summary['densitometry']:g}; the clusters read it with the technical coordinates "
                        "removed.")
    if summary.get("second_stage"):
        lines[-1] = lines[-1][:-1] + (f", the raised side split again by a {summary['second_stage']}-component second "
                                      "stage that reads each patch's core:")
    lines += [f"  {k}: {summary['cluster_names'][k]} ({n} patches)" for k, n in summary["cluster_sizes"].items()]
    if summary["ari_vs_truth"] is not None:
        lines.append(f"Agreement with the phantom tissue truth: ARI {summary['ari_vs_truth']:.3f}.")
    return "\n".join(lines)
