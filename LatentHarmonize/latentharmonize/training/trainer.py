"""``latentharmonize train``: encoder, post-hoc latent rotation and tissue clusters, saved as a model bundle.

Steps: read the cohort table; lung masks (the ``mask`` column, else automatic segmentation); model grids; paired
2.5D patches (the same physical points in every acquisition of a patient); train the encoder (progress bar,
checkpoints, ``--resume``, epoch or time budget); freeze it and encode the patches; fit the latent rotation on the
pairs; cluster the biological coordinates; name clusters from their HU profile; save the bundle; print a summary.

Determinism: with an epoch budget, the same cohort, seed and device give the same bundle (CPU runs use
deterministic algorithms; each epoch reseeds the shuffle, the augmentations and the VAE noise, so a resumed run
equals an uninterrupted one). A ``--max-minutes`` budget stops wherever the clock says, so it is reproducible only
in the epochs it completed.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from monai.data import DataLoader
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from tqdm import tqdm

from .. import options
from ..atomic import atomic_write_bytes, atomic_write_text
from ..errors import InputError, OutputError
from ..densitometry import HU_STATISTIC_NAMES, LAA_THRESHOLD_HU
from ..networks import MODEL_KINDS, build_model
from ..patches import (PairedPatches, PatchDensitometry, PatchSpec, autocast_for, concat_samples, encode_dense,
                       n_features, point_keys, resolve_device, sample_paired_patches)
from ..progress import Progress
from ..scans import load_scan
from .augment import training_dataset

CHECKPOINT_DIR = ".checkpoints"
DEFAULT_EPOCHS = 20


@dataclass
class TrainConfig:
    """Everything that shapes the trained weights (it is the resume fingerprint, with the cohort hash)."""

    encoder: str = "ae"
    seed: int = 0
    latent_dim: int = 24
    width: int = 32
    per_patient: int = 400
    batch_size: int = 128
    lr: float = 2e-3
    low_attenuation_hu: float | None = None  # ae only: also encode a channel of voxels below this HU
    hu_window: tuple = PatchSpec().hu_window

    def model_kwargs(self) -> dict:
        kwargs = {"latent_dim": self.latent_dim, "width": self.width}
        if self.low_attenuation_hu is not None:
            kwargs.update(low_attenuation_hu=self.low_attenuation_hu, hu_window=list(self.hu_window))
        return kwargs


# ----------------------------------------------------------------------------- data
def load_cohort_samples(cohort_csv, config: TrainConfig, spec: PatchSpec, progress: Progress | None = None) -> tuple:
    """Read every scan, resample it to the model grid and draw paired patches patient by patient.

    Returns ``(samples, cohort DataFrame)``. Only one patient's volumes are held in memory at a time.
    """
    from ..cohort import read_cohort

    cohort = read_cohort(cohort_csv)
    patients = list(dict.fromkeys(cohort["patient"].astype(str)))
    parts = []
    for n, patient in enumerate(patients):
        rows = cohort[cohort["patient"].astype(str) == patient]
        scans = [load_scan(row, spec) for _, row in rows.iterrows()]
        parts.append(sample_paired_patches(scans, config.per_patient, spec, seed=config.seed * 100003 + n))
        if progress is not None:
            progress(5 + 15 * (n + 1) / len(patients), "patches", f"patient {patient}: {len(scans)} scans")
    return concat_samples(parts), cohort


# ----------------------------------------------------------------------------- checkpoints
def _fingerprint(config: TrainConfig, cohort_csv) -> dict:
    digest = hashlib.sha256(Path(cohort_csv).read_bytes()).hexdigest()
    return {**config.__dict__, "cohort_sha256": digest}


def save_checkpoint(folder: Path, model, optimizer, epoch: int, history: list, fingerprint: dict) -> None:
    """Weights and optimizer moments as safetensors, the rest as JSON (no pickle); each file written atomically."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    state = optimizer.state_dict()
    for idx, moments in state["state"].items():
        tensors.update({f"optim.{idx}.{k}": torch.as_tensor(v).cpu().contiguous() for k, v in moments.items()})
    blob = save_tensors(tensors)
    meta = {"epoch": epoch, "history": history, "fingerprint": fingerprint, "param_groups": state["param_groups"],
            "tensors_sha256": hashlib.sha256(blob).hexdigest()}
    atomic_write_bytes(folder / "state.safetensors", blob)
    atomic_write_text(folder / "state.json", json.dumps(meta, indent=1))


def load_checkpoint(folder: Path, model, optimizer, fingerprint: dict) -> tuple[int, list]:
    """Restore a checkpoint written by :func:`save_checkpoint`; returns (completed epochs, loss history)."""
    try:
        meta = json.loads((folder / "state.json").read_text())
        blob = (folder / "state.safetensors").read_bytes()
    except (OSError, ValueError) as exc:
        raise InputError(f"Cannot read the checkpoint in {folder} ({exc}); run without --resume to start over.") from exc
    if hashlib.sha256(blob).hexdigest() != meta.get("tensors_sha256"):
        raise InputError(f"The checkpoint in {folder} is incomplete or damaged; run without --resume to start over.")
    if meta.get("fingerprint") != fingerprint:
        changed = sorted(k for k in fingerprint if meta.get("fingerprint", {}).get(k) != fingerprint[k])
        raise InputError(f"The checkpoint in {folder} was made with different settings ({', '.join(changed)}); "
                         "resume with the same cohort and options, or run without --resume to start over.")
    tensors = load_tensors(blob)
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    moments = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            moments.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": moments, "param_groups": meta["param_groups"]})
    return int(meta["epoch"]), list(meta["history"])


# ----------------------------------------------------------------------------- training loop
def fit_encoder(samples: PairedPatches, config: TrainConfig, device: torch.device, epochs: int | None,
                max_minutes: float | None, checkpoints: Path, fingerprint: dict, resume: bool,
                progress: Progress | None = None) -> tuple:
    """Train the encoder; returns (model, loss history per epoch, epochs completed)."""
    model = build_model(config.encoder, seed=config.seed, **config.model_kwargs()).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    start, history = 0, []
    if resume and (checkpoints / "state.json").exists():
        start, history = load_checkpoint(checkpoints, model, optimizer, fingerprint)
        print(f"Resuming from the checkpoint after epoch {start}.")
    elif resume:
        print(f"No checkpoint in {checkpoints}; starting from scratch.")
    dataset = training_dataset(samples, seed=config.seed)
    use_fp16 = device.type == "cuda" and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=use_fp16)
    deadline = None if max_minutes is None else time.monotonic() + 60.0 * max_minutes
    total = epochs if epochs is not None else 10 ** 6
    epoch = start
    while epoch < total and not _past(deadline):
        torch.manual_seed(config.seed + epoch)  # VAE noise; per epoch so --resume reproduces the same run
        dataset.transform.set_random_state(seed=config.seed + epoch)
        loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, num_workers=0,
                            generator=torch.Generator().manual_seed(config.seed + epoch))
        model.train()
        losses, finished = [], True
        bar = tqdm(loader, desc=f"epoch {epoch + 1}" + (f"/{epochs}" if epochs else ""), leave=False, disable=None)
        for batch in bar:
            batch = {k: v.to(device) for k, v in batch.items()}
            optimizer.zero_grad(set_to_none=True)
            with autocast_for(device):
                loss = model.loss(batch)["loss"]
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.5f}")
            if _past(deadline):
                finished = False
                break
        history.append(float(np.mean(losses)))
        epoch += int(finished)
        save_checkpoint(checkpoints, model, optimizer, epoch, history, fingerprint)
        if progress is not None:
            done = epoch / epochs if epochs else 1 - max(deadline - time.monotonic(), 0) / (60 * max_minutes)
            progress(20 + 50 * done, "train", f"epoch {len(history)} loss {history[-1]:.5f}")
    return model.eval(), history, epoch


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() > deadline


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
    spec's context aggregation, and every row takes the latent at its physical point.

    Scans are visited in the order ``load_cohort_samples`` numbered them (patients by first appearance, then rows).
    """
    out = np.zeros((len(samples), n_features(model.latent_dim, spec)), np.float32)
    patients = list(dict.fromkeys(cohort["patient"].astype(str)))
    index = 0
    for n, patient in enumerate(patients):
        for _, row in cohort[cohort["patient"].astype(str) == patient].iterrows():
            scan = load_scan(row, spec)
            dense = encode_dense(model, scan.hu, scan.lung, scan.grid, spec, device)
            where = {key: i for i, key in enumerate(map(tuple, point_keys(dense.lattice, dense.positions).tolist()))}
            rows = np.flatnonzero(samples.scan == index)
            out[rows] = dense.latents[[where[key] for key in map(tuple, samples.keys[rows].tolist())]]
            index += 1
        if progress is not None:
            progress(70 + 8 * (n + 1) / len(patients), "rotate",
                     f"patient {patient}: dense latents with context")
    return out


def fit_densitometry(model, cohort, samples: PairedPatches, spec: PatchSpec, weight: float, device: torch.device,
                     progress: Progress | None = None, smooth_mm: float = 0.0) -> tuple:
    """The spec with a fitted ``densitometry`` entry, and the training rows' latents with its columns appended.

    Each statistic is centred on its mean over the training rows and scaled so that its SD is ``weight`` times the
    mean SD of the encoder's latent coordinates: at weight 1 the eight statistics weigh like eight latent
    coordinates in the rotation and the clusters. ``smooth_mm`` > 0: statistics of the in-plane smoothed lung
    (``patches.smooth_lung``).
    """
    n = len(HU_STATISTIC_NAMES)
    smooth = float(smooth_mm) if smooth_mm else None
    raw_spec = replace(spec, densitometry=PatchDensitometry(float(weight), (0.0,) * n, (1.0,) * n, smooth))
    latents = context_latents(model, cohort, samples, raw_spec, device, progress)  # statistics as they are
    d = model.latent_dim
    center = latents[:, d:].mean(axis=0)
    sd = np.maximum(latents[:, d:].std(axis=0), 1e-6)  # a statistic constant over the training rows stays 0
    scale = sd / (weight * latents[:, :d].std(axis=0).mean())
    latents[:, d:] = (latents[:, d:] - center) / scale
    entry = PatchDensitometry(float(weight), tuple(float(v) for v in center), tuple(float(v) for v in scale), smooth)
    return replace(spec, densitometry=entry), latents


# ----------------------------------------------------------------------------- post-hoc fits
def fit_rotation(latents: np.ndarray, samples: PairedPatches, n_technical, seed: int) -> tuple:
    """Fit the latent rotation (paired when the cohort has pairs) and measure the acquisition probe."""
    from ..rotation import LatentRotation, chance_level

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
    """Set ``rotation.technical_weight`` to the candidate whose k-means clusters agree best across acquisitions of
    the same training points (ARI over the cross-acquisition pairs); returns (weight, {weight: ARI}).

    Only training pairs are used: no outcome and no held-out scan. Each scan's technical coordinates are re-centred
    on the median of its sampled points, which estimates the median over all its lung that ``analyze`` takes.
    """
    from sklearn.metrics import adjusted_rand_score

    from ..clusters import TissueClusters

    pairs = samples.pairs()
    if rotation.n_technical_ == 0 or len(pairs) == 0:
        rotation.set_params(technical_weight=0.0)
        return 0.0, {}
    scores = {}
    for weight in weights:
        rotation.set_params(technical_weight=float(weight))
        labels = TissueClusters(n_clusters=n_clusters, random_state=seed).fit_predict(
            rotation.cluster_features(latents, scans=samples.scan))
        scores[float(weight)] = float(adjusted_rand_score(labels[pairs[:, 0]], labels[pairs[:, 1]]))
    best = max(scores, key=lambda w: (scores[w], -w))  # ties: the smaller weight
    rotation.set_params(technical_weight=best)
    return best, scores


def fit_clusters(features: np.ndarray, samples: PairedPatches, n_clusters: int | None, seed: int) -> tuple:
    """k-means tissue clusters on the rotation's cluster features, named from the HU profile of their patches."""
    from ..clusters import TissueClusters, cluster_profiles, default_colors, name_clusters

    clusters = TissueClusters(n_clusters=n_clusters, random_state=seed)
    labels = clusters.fit_predict(features, order_by=samples.stats["mean_hu"])
    profiles = cluster_profiles(labels, samples.stats, clusters.n_clusters_)
    names = name_clusters(profiles)
    return clusters, labels, profiles, names, default_colors(names)


# ----------------------------------------------------------------------------- orchestration
def train(cohort_csv, out_dir, seed: int = 0, epochs: int | None = None, max_minutes: float | None = None,
          encoder: str = "ae", clusters: int | None = None, n_technical="auto", device: str = "auto",
          resume: bool = False, overwrite: bool = False, per_patient: int = 400, latent_dim: int = 24,
          batch_size: int = 128, progress: Progress | None = None, scheduler: str | None = None,
          workers: int | None = None, context_radius: int = 1, low_attenuation_channel: bool = False,
          calibrate: bool = False, densitometry: float | None = None, densitometry_smooth_mm: float = 0.0) -> dict:
    """Train a model bundle from a cohort table into ``out_dir``; returns the training summary.

    With ``scheduler`` (an existing Dask cluster's address) or ``workers`` (a local Dask cluster of that size), the
    patches of a large cohort are read and sampled on the cluster, one task per patient, with the same result.
    """
    config, epochs = _validated(seed, epochs, max_minutes, encoder, clusters, n_technical, per_patient,
                                latent_dim, batch_size, low_attenuation_channel, densitometry,
                                densitometry_smooth_mm)
    out_dir = Path(out_dir)
    _refuse_existing_bundle(out_dir, overwrite)
    progress = progress or Progress()
    torch_device = resolve_device(device)
    spec = PatchSpec(context_radius=context_radius, calibration="air_fat" if calibrate else None)
    t0 = time.monotonic()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(torch_device.type == "cpu")
    try:
        progress(0, "load", f"reading cohort {cohort_csv}")
        if scheduler or workers:
            from .distributed import sample_cohort_patches

            samples, cohort = sample_cohort_patches(cohort_csv, config, spec, scheduler=scheduler, workers=workers,
                                                    progress=progress)
        else:
            samples, cohort = load_cohort_samples(cohort_csv, config, spec, progress)
        progress(20, "train", f"{len(samples)} patches of {len(set(samples.patient))} patients; "
                              f"{config.encoder} encoder on {torch_device}")
        checkpoints = out_dir / CHECKPOINT_DIR
        checkpoints.mkdir(parents=True, exist_ok=True)
        model, history, done = fit_encoder(samples, config, torch_device, epochs, max_minutes, checkpoints,
                                           _fingerprint(config, cohort_csv), resume, progress)
        progress(70, "rotate", "encoding patches with the frozen encoder")
        latents, mse = encode_rows(model, samples.patches, torch_device)
        if densitometry is not None:
            spec, latents = fit_densitometry(model, cohort, samples, spec, densitometry, torch_device, progress,
                                             densitometry_smooth_mm)
        elif spec.context_radius > 0:
            latents = context_latents(model, cohort, samples, spec, torch_device, progress)
        rotation, probe = fit_rotation(latents, samples, n_technical, seed)
        progress(78, "cluster", f"{rotation.n_technical_} technical dimensions; choosing their re-centred weight")
        weight, weight_scores = select_technical_weight(rotation, latents, samples, clusters, seed)
        probe["clusters"] = rotation.probe_accuracy(latents, samples.acquisition.astype(str), space="clusters",
                                                    groups=samples.point, scans=samples.scan)
        progress(80, "cluster", f"technical weight {weight:g}; clustering")
        tissue, labels, profiles, names, colors = fit_clusters(rotation.cluster_features(latents, scans=samples.scan),
                                                               samples, clusters, seed)
    finally:
        torch.use_deterministic_algorithms(deterministic)
    summary = {
        "encoder": config.encoder, "seed": seed, "device": str(torch_device), "epochs": done, "loss_history": history,
        "n_patients": int(cohort["patient"].nunique()), "n_scans": int(len(cohort)),
        "acquisitions": sorted(set(samples.acquisition.astype(str))), "n_patches": int(len(samples)),
        "n_pairs": int(len(samples.pairs())), "reconstruction_mse": mse,
        "reconstruction_rmse_hu": float(np.sqrt(mse) * np.diff(spec.hu_window)[0]),
        "probe": probe, "n_technical": int(rotation.n_technical_), "technical_weight": weight,
        "technical_weight_pair_ari": {f"{w:g}": a for w, a in weight_scores.items()}, "k": int(tissue.n_clusters_),
        "cluster_sizes": {int(k): int(p["n"]) for k, p in enumerate(profiles, start=1)},
        "cluster_names": {int(k): n for k, n in enumerate(names, start=1)},
        "cluster_profiles": profiles, "ari_vs_truth": _ari_vs_truth(labels, samples),
        **({"densitometry": float(densitometry)} if densitometry is not None else {}),
        **({"densitometry_smooth_mm": float(densitometry_smooth_mm)} if densitometry_smooth_mm else {}),
    }
    progress(90, "save", f"writing the model bundle to {out_dir}")
    save_trained_bundle(out_dir, model, spec, rotation, tissue, names, colors, summary, overwrite)
    progress(100, "done", f"bundle saved in {out_dir}")
    return {**summary, "train_seconds": round(time.monotonic() - t0, 1)}  # timing kept out of the bundle: bytes stay reproducible


def save_trained_bundle(out_dir: Path, model, spec: PatchSpec, rotation, tissue, names: list, colors: list,
                        summary: dict, overwrite: bool):
    """Assemble the model bundle (manifest, weights, rotation, centroids) and write it atomically."""
    from ..bundle import ModelBundle, save_bundle

    training = {k: v for k, v in summary.items() if k != "probe"}
    bundle = ModelBundle.create(name=out_dir.resolve().name, encoder_config=model.config,
                                encoder_state=model.state_dict(), spec=spec, rotation=rotation, clusters=tissue,
                                names=names, colors=colors, training=training, probe=summary["probe"])
    save_bundle(bundle, out_dir, overwrite=overwrite)
    return bundle


def _validated(seed, epochs, max_minutes, encoder, clusters, n_technical, per_patient, latent_dim,
               batch_size, low_attenuation_channel=False, densitometry=None, densitometry_smooth_mm=0.0) -> tuple:
    if encoder not in MODEL_KINDS:
        raise InputError(f"--encoder must be one of {', '.join(MODEL_KINDS)}, got {encoder!r}.")
    if low_attenuation_channel and encoder != "ae":
        raise InputError(f"--low-attenuation-channel works with --encoder ae only, got {encoder!r}.")
    if epochs is not None and max_minutes is not None:
        raise InputError("Give either --epochs or --max-minutes, not both.")
    if epochs is None and max_minutes is None:
        epochs = DEFAULT_EPOCHS
    if epochs is not None and epochs < 1:
        raise InputError(f"--epochs must be at least 1, got {epochs}.")
    if max_minutes is not None and not max_minutes > 0:
        raise InputError(f"--max-minutes must be positive, got {max_minutes}.")
    if clusters is not None and clusters < 2:
        raise InputError(f"--clusters must be at least 2 (or left out to choose K by stability), got {clusters}.")
    if n_technical != "auto" and (not isinstance(n_technical, int) or not 0 <= n_technical < latent_dim):
        raise InputError(f"--n-technical must be 'auto' or an integer in 0..{latent_dim - 1}, got {n_technical!r}.")
    if densitometry is not None and (isinstance(densitometry, bool) or not isinstance(densitometry, (int, float))
                                     or not np.isfinite(densitometry) or densitometry <= 0):
        raise InputError(f"--densitometry must be a positive weight (1 is the usual choice), got {densitometry!r}.")
    for name, value in (("per_patient", per_patient), ("latent_dim", latent_dim), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 2:
            raise InputError(f"{name} must be an integer of at least 2, got {value!r}.")
    if not (np.isfinite(densitometry_smooth_mm) and densitometry_smooth_mm >= 0) or (densitometry_smooth_mm and densitometry is None):
        raise InputError(f"--densitometry-smooth must be 0 or more mm, and goes with --densitometry; got "
                         f"{densitometry_smooth_mm!r}.")
    config = TrainConfig(encoder=encoder, seed=int(seed), latent_dim=latent_dim, per_patient=per_patient,
                         batch_size=batch_size,
                         low_attenuation_hu=LAA_THRESHOLD_HU if low_attenuation_channel else None)
    return config, epochs


def _refuse_existing_bundle(out_dir: Path, overwrite: bool) -> None:
    """Fail before hours of training, not after, when the bundle would be refused at save time."""
    if (out_dir / "manifest.json").exists() and not overwrite:
        raise OutputError(f"{out_dir} already holds a model bundle. Use --overwrite to replace it, or choose "
                          "another --out folder.")
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"Output path {out_dir} exists and is a file; give a folder.")


def _ari_vs_truth(labels: np.ndarray, samples: PairedPatches):
    """Adjusted Rand index of the clusters against the tissue truth at the patch centres (phantom cohorts)."""
    if samples.truth is None:
        return None
    from sklearn.metrics import adjusted_rand_score

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
           f"(probe on what the clusters see: {probe['clusters']:.3f})."
           if summary.get("technical_weight") else "left out of the clusters."),
        f"{summary['k']} tissue clusters:",
    ]
    if summary.get("densitometry"):
        lines.insert(2, "Patch densitometry appended to the latents before the rotation, "
                        f"weight {summary['densitometry']:g}.")
    lines += [f"  {k}: {summary['cluster_names'][k]} ({n} patches)" for k, n in summary["cluster_sizes"].items()]
    if summary["ari_vs_truth"] is not None:
        lines.append(f"Agreement with the phantom tissue truth: ARI {summary['ari_vs_truth']:.3f}.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    parser.add_argument("cohort", help="cohort table (CSV with image, patient, acquisition; optional mask, truth)")
    options.add_out(parser, "model bundle folder to write")
    options.add_seed(parser)
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=int, help=f"training epochs (default {DEFAULT_EPOCHS})")
    budget.add_argument("--max-minutes", type=float, help="stop training after this many minutes instead")
    parser.add_argument("--encoder", choices=sorted(MODEL_KINDS), default="ae", help="encoder variant (default ae)")
    parser.add_argument("--clusters", type=int, help="number of tissue clusters (default: chosen by stability)")
    parser.add_argument("--n-technical", default="auto",
                        help="technical latent dimensions to rotate out (default auto: until the probe is at chance)")
    options.add_device(parser)
    parser.add_argument("--patches-per-patient", type=int, default=400, help="sampled lung points per patient")
    parser.add_argument("--latent-dim", type=int, default=24, help="latent size (default 24)")
    parser.add_argument("--context-radius", type=int, default=1,
                        help="lattice steps (5 mm) of neighbouring latents averaged into each one before the rotation "
                             "and clusters (default 1: a 15 mm neighbourhood; 0: the patch alone)")
    parser.add_argument("--low-attenuation-channel", action="store_true",
                        help="ae only: also encode and reconstruct a channel of voxels below -950 HU, so the latent "
                             "keeps emphysema (clusters match tissue better, at some cost in consistency; see "
                             "docs/training.md)")
    parser.add_argument("--calibrate", action="store_true",
                        help="calibrate each scan's HU on its own air and fat before encoding (in training and in every "
                             "analysis with this bundle), so a vendor's HU offset cannot pass for a density change")
    parser.add_argument("--densitometry", type=float, nargs="?", const=1.0, default=None, metavar="WEIGHT",
                        help="append each patch's HU quantiles and threshold shares to its latent before the rotation "
                             "(weight 1 when given without a value): clusters follow tissue and survival better, at "
                             "some cost in consistency across scanners; see docs/training.md")
    parser.add_argument("--densitometry-smooth", type=float, default=0.0, metavar="MM",
                        help="with --densitometry: read the statistics from the lung blurred in-plane with this "
                             "Gaussian SD, so a sharp kernel's extra noise does not count as emphysema (default 0)")
    options.add_dask(parser, "sampling the cohort's patches")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in OUT/.checkpoints")
    options.add_overwrite(parser, "an existing bundle in --out")
    options.add_output_style(parser, quiet=False)


def run(args) -> int:
    n_technical = args.n_technical if args.n_technical == "auto" else _int_option("--n-technical", args.n_technical)
    summary = train(args.cohort, args.out, seed=args.seed, epochs=args.epochs, max_minutes=args.max_minutes,
                    encoder=args.encoder, clusters=args.clusters, n_technical=n_technical, device=args.device,
                    resume=args.resume, overwrite=args.overwrite, per_patient=args.patches_per_patient,
                    latent_dim=args.latent_dim, progress=Progress(machine=args.progress_lines),
                    scheduler=args.scheduler, workers=args.workers, context_radius=args.context_radius,
                    low_attenuation_channel=args.low_attenuation_channel, calibrate=args.calibrate,
                    densitometry=args.densitometry, densitometry_smooth_mm=args.densitometry_smooth)
    print(format_summary(summary))
    return 0


def _int_option(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise InputError(f"{name} must be 'auto' or an integer, got {value!r}.") from None
