"""Encoder training: the epoch loop with its budget, checkpoints and ``--resume``.

Each epoch reseeds the shuffle, the augmentations and the VAE noise from the seed and the epoch number, so a
resumed run equals an uninterrupted one.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from monai.data import DataLoader
from tqdm import tqdm

from ..networks import build_model
from ..patches import autocast_for
from ..progress import Progress
from .augment import training_dataset
from .checkpoints import load_checkpoint, save_checkpoint
from .config import TrainConfig
from .samples import PairedPatches


def fit_encoder(samples: PairedPatches, config: TrainConfig, device: torch.device, checkpoints: Path,
                fingerprint: dict, resume: bool, progress: Progress | None = None) -> tuple:
    """Train the encoder for the config's budget; returns (model, loss history per epoch, epochs completed).

    A checkpoint is written after every epoch, and after the epoch that a ``max_minutes`` budget cuts short."""
    model = build_model(config.encoder, seed=config.seed, **config.model_kwargs()).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    epoch, history = _start(checkpoints, model, optimizer, fingerprint, resume)
    dataset = training_dataset(samples, seed=config.seed)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and not torch.cuda.is_bf16_supported())
    epochs = config.epoch_budget
    deadline = None if config.max_minutes is None else time.monotonic() + 60.0 * config.max_minutes
    while epoch < (epochs if epochs is not None else 10 ** 6) and not _past(deadline):
        losses, finished = _run_epoch(model, optimizer, scaler, dataset, config, device, epoch, deadline)
        history.append(float(np.mean(losses)))
        epoch += int(finished)
        save_checkpoint(checkpoints, model, optimizer, epoch, history, fingerprint)
        if progress is not None:
            done = epoch / epochs if epochs else 1 - max(deadline - time.monotonic(), 0) / (60 * config.max_minutes)
            progress(20 + 50 * done, "train", f"epoch {len(history)} loss {history[-1]:.5f}")
    return model.eval(), history, epoch


def _start(checkpoints: Path, model, optimizer, fingerprint: dict, resume: bool) -> tuple[int, list]:
    """(completed epochs, loss history) to start from: the checkpoint's with ``resume``, else nothing."""
    if resume and (checkpoints / "state.json").exists():
        start, history = load_checkpoint(checkpoints, model, optimizer, fingerprint)
        print(f"Resuming from the checkpoint after epoch {start}.")
        return start, history
    if resume:
        print(f"No checkpoint in {checkpoints}; starting from scratch.")
    return 0, []


def _run_epoch(model, optimizer, scaler, dataset, config: TrainConfig, device: torch.device, epoch: int,
               deadline: float | None) -> tuple[list, bool]:
    """One pass over the paired patches; returns (batch losses, whether the epoch ran to its end)."""
    torch.manual_seed(config.seed + epoch)  # VAE noise; per epoch so --resume reproduces the same run
    dataset.transform.set_random_state(seed=config.seed + epoch)
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, num_workers=0,
                        generator=torch.Generator().manual_seed(config.seed + epoch))
    model.train()
    losses = []
    epochs = config.epoch_budget
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
            return losses, False
    return losses, True


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() > deadline
