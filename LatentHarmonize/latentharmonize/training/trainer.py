"""``train``: encoder, post-hoc latent rotation and tissue clusters, saved as a model bundle.

Steps: read the cohort table; lung masks (the ``mask`` column, else automatic segmentation); model grids; paired
2.5D patches (the same physical points in every acquisition of a patient; :mod:`.samples`); train the encoder
(progress bar, checkpoints, ``--resume``, epoch or time budget; :mod:`.encoder_fit`); freeze it and encode the
patches; fit the latent rotation on the pairs; cluster the biological coordinates; name clusters from their HU
profile (:mod:`.posthoc`); save the bundle (:mod:`.output`); return the summary (:mod:`.summary`).

Determinism: with an epoch budget, the same cohort, seed and device give the same bundle (CPU runs use
deterministic algorithms; each epoch reseeds the shuffle, the augmentations and the VAE noise, so a resumed run
equals an uninterrupted one). A ``--max-minutes`` budget stops wherever the clock says, so it is reproducible only
in the epochs it completed.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

from ..patches import resolve_device
from ..progress import Progress
from .checkpoints import CHECKPOINT_DIR, run_fingerprint
from .config import TrainConfig
from .distributed import sample_cohort_patches
from .encoder_fit import fit_encoder
from .output import refuse_existing_bundle, save_trained_bundle
from .posthoc import fit_posthoc
from .samples import load_cohort_samples
from .summary import training_summary


def train(cohort_csv, out_dir, config: TrainConfig, *, progress: Progress | None = None, resume: bool = False,
          overwrite: bool = False) -> dict:
    """Train a model bundle from a cohort table into ``out_dir`` with the settings of ``config``; returns the
    training summary (with ``train_seconds``, which the bundle leaves out so that its bytes stay reproducible).

    ``resume`` continues from the checkpoint in ``out_dir/.checkpoints`` if its fingerprint (cohort and settings)
    matches, and refuses it otherwise; ``overwrite`` replaces a bundle already in ``out_dir``.
    """
    out_dir = Path(out_dir)
    refuse_existing_bundle(out_dir, overwrite)
    progress = progress or Progress()
    device = resolve_device(config.device)
    t0 = time.monotonic()
    with _deterministic(device):
        progress(0, "load", f"reading cohort {cohort_csv}")
        samples, cohort = _cohort_samples(cohort_csv, config, progress)
        progress(20, "train", f"{len(samples)} patches of {len(set(samples.patient))} patients; "
                              f"{config.encoder} encoder on {device}")
        checkpoints = out_dir / CHECKPOINT_DIR
        checkpoints.mkdir(parents=True, exist_ok=True)
        model, history, done = fit_encoder(samples, config, device, checkpoints, run_fingerprint(config, cohort_csv),
                                           resume, progress)
        fit = fit_posthoc(model, cohort, samples, config, device, progress)
    summary = training_summary(config, device, done, history, cohort, samples, fit)
    progress(90, "save", f"writing the model bundle to {out_dir}")
    save_trained_bundle(out_dir, model, fit, summary, overwrite)
    progress(100, "done", f"bundle saved in {out_dir}")
    return {**summary, "train_seconds": round(time.monotonic() - t0, 1)}


def _cohort_samples(cohort_csv, config: TrainConfig, progress: Progress) -> tuple:
    """(paired samples, cohort DataFrame): on the Dask cluster the config names, else serially (same result)."""
    if config.scheduler or config.workers:
        return sample_cohort_patches(cohort_csv, config, config.patch_spec(), scheduler=config.scheduler,
                                     workers=config.workers, progress=progress)
    return load_cohort_samples(cohort_csv, config, config.patch_spec(), progress)


@contextlib.contextmanager
def _deterministic(device: torch.device):
    """Deterministic algorithms on CPU for the run, and the caller's setting back afterwards."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(device.type == "cpu")
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)
