"""Training checkpoints in ``OUT/.checkpoints``: weights and optimizer moments as safetensors, the rest as JSON (no
pickle), and the fingerprint of the run that wrote them, so that ``--resume`` never continues another run."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from ..atomic import atomic_write_bytes, atomic_write_text
from ..errors import InputError
from .config import TrainConfig

CHECKPOINT_DIR = ".checkpoints"


def run_fingerprint(config: TrainConfig, cohort_csv) -> dict:
    """The config's fingerprint and the cohort table's SHA-256, as JSON stores it (lists, not tuples), so that it
    compares equal to the one read back from a checkpoint."""
    digest = hashlib.sha256(Path(cohort_csv).read_bytes()).hexdigest()
    return json.loads(json.dumps({**config.fingerprint(), "cohort_sha256": digest}))


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
    """Restore a checkpoint written by :func:`save_checkpoint`; returns (completed epochs, loss history).

    A checkpoint made with another fingerprint is refused, naming the settings that differ."""
    try:
        meta = json.loads((folder / "state.json").read_text())
        blob = (folder / "state.safetensors").read_bytes()
    except (OSError, ValueError) as exc:
        raise InputError(f"Cannot read the checkpoint in {folder} ({exc}); run without --resume to start over.") from exc
    if hashlib.sha256(blob).hexdigest() != meta.get("tensors_sha256"):
        raise InputError(f"The checkpoint in {folder} is incomplete or damaged; run without --resume to start over.")
    if meta.get("fingerprint") != fingerprint:
        stored = meta.get("fingerprint") or {}
        changed = sorted(k for k in set(fingerprint) | set(stored) if stored.get(k) != fingerprint.get(k))
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
