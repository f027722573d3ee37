"""The trained model bundle on disk: refused early when one is in the way, written atomically at the end."""
from __future__ import annotations

from pathlib import Path

from ..bundle import ModelBundle, save_bundle
from ..errors import OutputError
from .posthoc import PosthocFit


def refuse_existing_bundle(out_dir: Path, overwrite: bool) -> None:
    """Fail before hours of training, not after, when the bundle would be refused at save time."""
    if (out_dir / "manifest.json").exists() and not overwrite:
        raise OutputError(f"{out_dir} already holds a model bundle. Use --overwrite to replace it, or choose "
                          "another --out folder.")
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"Output path {out_dir} exists and is a file; give a folder.")


def save_trained_bundle(out_dir: Path, model, fit: PosthocFit, summary: dict, overwrite: bool) -> ModelBundle:
    """Assemble the model bundle (manifest, weights, rotation, clusters) and write it atomically."""
    training = {k: v for k, v in summary.items() if k != "probe"}
    bundle = ModelBundle.create(name=out_dir.resolve().name, encoder_config=model.config,
                                encoder_state=model.state_dict(), spec=fit.spec, rotation=fit.rotation,
                                clusters=fit.clusters, names=fit.names, colors=fit.colors, training=training,
                                probe=summary["probe"])
    save_bundle(bundle, out_dir, overwrite=overwrite)
    return bundle
