"""Model bundle: one folder holding everything ``analyze`` needs, with no pickled code.

::

    MODEL_DIR/
      manifest.json         format version, patch spec, encoder, rotation, clusters (names, colours),
                            training summary, probe accuracy, SHA-256 of every other file
      encoder.safetensors   encoder + decoder weights (safetensors)
      arrays.safetensors    rotation matrix, latent mean, singular values, probe curve, cluster
                            mixture (means, covariances, weights, component groups); with two-stage
                            clusters, both stages' mixtures, their maps to the final clusters and
                            the core statistics' scale

The SHA-256 of the manifest's content (``ModelBundle.sha256``, also stored in the manifest as
``manifest_sha256``) identifies the model in analysis records. Loading verifies that checksum, the
format version, that exactly the two data files are listed, present and match their checksums, that
every number is finite and every setting in range, and that the arrays agree with the manifest;
anything else is refused with a ``BundleError``.
The format is described for users in ``docs/model-bundle.md``.
"""
from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_arrays
from safetensors.numpy import save as save_arrays
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from . import __version__
from .atomic import StagedOutput, atomic_write_bytes
from .clusters import TissueClusters, default_colors
from .errors import BundleError, InputError
from .networks import build_model
from .patches import PatchSpec, n_features
from .rotation import LatentRotation
from .two_stage import TwoStageClusters, reads_core

FORMAT_VERSION = 2  # 2: Gaussian-mixture clusters (1: k-means centroids)
MANIFEST = "manifest.json"
ENCODER_FILE = "encoder.safetensors"
ARRAYS_FILE = "arrays.safetensors"
DATA_FILES = (ENCODER_FILE, ARRAYS_FILE)
# keys of the patch spec that analyze/evaluate read (see patches.PatchSpec)
SPEC_KEYS = ("patch_size", "slices", "stride", "spacing", "margin_mm", "hu_window", "outside_fill_hu")
CHECKSUM_KEY = "manifest_sha256"  # SHA-256 of the rest of the manifest (see _sealed_manifest_bytes)
MANIFEST_SECTIONS = {"name": str, "created": str, "latentharmonize_version": str, "encoder": dict, "patch_spec": dict,
                     "rotation": dict, "clusters": dict, "training": dict, "probe": dict, "files": dict}


def default_bundle_path() -> Path:
    """``<repo>/LatentHarmonize/Resources/Models/default``, the bundle ``analyze`` uses without ``--model``."""
    return Path(__file__).resolve().parents[1] / "Resources" / "Models" / "default"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _manifest_bytes(manifest: Mapping) -> bytes:
    """Canonical manifest serialisation (sorted keys), so equal manifests give equal bytes and hashes."""
    return (json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")


def _content_sha256(manifest: Mapping) -> str:
    """SHA-256 of the manifest's canonical bytes without its own checksum entry."""
    return _sha256(_manifest_bytes({k: v for k, v in manifest.items() if k != CHECKSUM_KEY}))


def _sealed_manifest_bytes(manifest: dict) -> bytes:
    """The bytes of ``manifest`` as saved: with the checksum of its content, which loading verifies, so an edited
    manifest (HU window, spacing, technical dimensions...) is refused instead of silently changing results."""
    manifest[CHECKSUM_KEY] = _content_sha256(manifest)
    return _manifest_bytes(manifest)


def _today() -> str:
    """ISO date of creation: from SOURCE_DATE_EPOCH when set (reproducible builds), else today (UTC)."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    moment = _dt.datetime.fromtimestamp(int(epoch), _dt.timezone.utc) if epoch else _dt.datetime.now(_dt.timezone.utc)
    return moment.date().isoformat()


def _jsonable(value):
    """numpy scalars/arrays and tuples -> plain JSON types (manifest sections come from many places)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


def _check_names_colors(names: Sequence[str], colors: Sequence, k: int) -> tuple:
    """Validated (names, colors) lists of length ``k``; InputError says what is wrong."""
    names = [str(n).strip() for n in names]
    if len(names) != k:
        raise InputError(f"Need {k} cluster names, got {len(names)}.")
    if any(not n for n in names) or len(set(names)) != k:
        raise InputError(f"Cluster names must be non-empty and unique, got {names}.")
    checked = []
    for label, c in enumerate(colors, start=1):
        try:
            rgb = tuple(float(v) for v in c)
        except (TypeError, ValueError):
            rgb = ()
        if len(rgb) != 3 or not all(0.0 <= v <= 1.0 for v in rgb):
            raise InputError(f"Colour of cluster {label} must be three floats (r, g, b) in 0..1, got {c!r}.")
        checked.append(rgb)
    if len(checked) != k:
        raise InputError(f"Need {k} cluster colours, got {len(checked)}.")
    return names, checked


@dataclass
class ModelBundle:
    """A trained model: manifest, encoder weights, fitted rotation and clusters.

    Build one with :meth:`create` (training) or :func:`load_bundle`; write it with :func:`save_bundle`.
    """

    manifest: dict
    encoder_state: dict
    rotation: LatentRotation
    clusters: TissueClusters | TwoStageClusters
    path: Optional[Path] = None

    @classmethod
    def create(cls, *, name: str, encoder_config: Mapping, encoder_state: Mapping, spec: PatchSpec,
               rotation: LatentRotation, clusters: TissueClusters, names: Sequence[str],
               colors: Optional[Sequence] = None, training: Optional[Mapping] = None,
               probe: Optional[Mapping] = None, created: Optional[str] = None) -> "ModelBundle":
        """Assemble a bundle from training results.

        ``encoder_config`` is the network's ``config`` (``kind`` plus the keyword arguments of
        ``networks.build_model``, including ``latent_dim``); ``encoder_state`` its ``state_dict()``;
        ``spec`` the patch spec; ``names`` one name per cluster label 1..K (``colors`` default to
        :func:`clusters.default_colors`); ``training`` a cohort/run summary; ``probe`` the
        acquisition probe accuracies ``{"entangled": .., "biological": .., "chance": ..}`` (default:
        those the rotation measured while fitting).
        """
        config = _jsonable(dict(encoder_config))
        kind = config.pop("kind", None)
        if not isinstance(kind, str) or "latent_dim" not in config:
            raise InputError("encoder_config needs 'kind' and 'latent_dim' (use the network's .config).")
        _, rot_meta = rotation.export_state()
        _, cl_meta = clusters.export_state()
        k = cl_meta["k"]
        names, colors = _check_names_colors(names, default_colors(names) if colors is None else colors, k)
        manifest = {
            "format_version": FORMAT_VERSION,
            "name": str(name),
            "created": created or _today(),
            "latentharmonize_version": __version__,
            "encoder": {"kind": kind, "latent_dim": int(config["latent_dim"]), "config": config},
            "patch_spec": _jsonable(spec.to_dict()),
            "rotation": _jsonable(rot_meta),
            "clusters": {**_jsonable(cl_meta), "labels": list(range(1, k + 1)), "names": names,
                         "colors": [list(c) for c in colors]},
            "training": _jsonable(dict(training or {})),
            "probe": _jsonable(dict(probe if probe is not None else {
                "entangled": rotation.probe_entangled_, "biological": rotation.probe_biological_,
                "chance": rotation.chance_})),
            "files": {},
        }
        state = {str(key): value for key, value in encoder_state.items()}
        bundle = cls(manifest=manifest, encoder_state=state, rotation=rotation, clusters=clusters)
        bundle.manifest["files"] = {fname: _sha256(data) for fname, data in bundle._payload().items()}
        _validate(bundle)
        return bundle

    # ------------------------------------------------------------------ views
    @property
    def names(self) -> dict:
        c = self.manifest["clusters"]
        return {int(label): str(n) for label, n in zip(c["labels"], c["names"])}

    @property
    def colors(self) -> dict:
        c = self.manifest["clusters"]
        return {int(label): tuple(float(v) for v in rgb) for label, rgb in zip(c["labels"], c["colors"])}

    @property
    def spec(self) -> PatchSpec:
        return PatchSpec.from_dict(self.manifest["patch_spec"])

    @property
    def sha256(self) -> str:
        """SHA-256 of the manifest's content (its canonical bytes without the checksum entry, which for a loaded
        bundle is that verified checksum): the model's identity."""
        return _content_sha256(self.manifest)

    def encoder(self, device="cpu"):
        """The trained network (``networks.build_model``) with its weights, in eval mode on ``device``."""
        enc = self.manifest["encoder"]
        try:
            model = build_model(enc["kind"], **enc["config"])
        except (TypeError, ValueError, InputError) as exc:
            raise BundleError(f"This LatentHarmonize cannot build the bundle's encoder {enc['kind']!r} with "
                              f"{enc['config']}: {exc}. Update LatentHarmonize or retrain the model.") from exc
        try:
            model.load_state_dict(self.encoder_state, strict=True)
        except RuntimeError as exc:
            raise BundleError(f"The encoder weights in the bundle do not fit the {enc['kind']!r} network: "
                              f"{str(exc).splitlines()[0]}. The bundle is damaged or from another version.") from exc
        return model.to(device).eval()

    def decoder(self, device="cpu"):
        """Latents [B, latent_dim] -> patches [B, 3, 16, 16] (normalised intensities), for latent traversals."""
        return self.encoder(device).decode

    # ---------------------------------------------------------- serialisation
    def _arrays(self) -> dict:
        rot_arrays, _ = self.rotation.export_state()
        cl_arrays, _ = self.clusters.export_state()
        arrays = {f"rotation.{k}": v for k, v in rot_arrays.items()}
        arrays.update({f"clusters.{k}": v for k, v in cl_arrays.items()})
        return {k: np.ascontiguousarray(v, dtype=np.float64) for k, v in arrays.items()}

    def _payload(self) -> dict:
        """Bytes of the data files, in a deterministic serialisation."""
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in self.encoder_state.items()}
        return {ENCODER_FILE: save_tensors(tensors), ARRAYS_FILE: save_arrays(self._arrays())}


def _validate(bundle: ModelBundle) -> None:
    """Consistency of manifest, arrays and weights; BundleError naming the first problem."""
    m = bundle.manifest
    try:
        spec = PatchSpec.from_dict(m["patch_spec"])
    except (InputError, TypeError, ValueError) as exc:
        raise BundleError(f"The bundle's patch spec is invalid: {exc}") from None
    d = n_features(int(m["encoder"]["latent_dim"]), spec)
    rot = bundle.rotation
    if rot.rotation_.shape != (d, d):
        raise BundleError(f"The rotation is {rot.rotation_.shape} but the encoder's latent size (with the patch "
                          f"densitometry, if any) is {d}.")
    if int(m["rotation"].get("n_technical", -1)) != rot.n_technical_:
        raise BundleError("The manifest's n_technical disagrees with the stored rotation.")
    harmonized = getattr(rot, "harmonized_columns", 0)
    if harmonized not in (0, spec.n_statistics):
        raise BundleError(f"The rotation's clusters read {harmonized!r} harmonized columns, but the patch spec appends "
                          f"{spec.n_statistics} densitometry columns; a bundle's clusters read all of them or none.")
    cl = bundle.clusters
    first = cl.first_ if reads_core(cl) else cl
    if first.means_.shape[1] != rot.n_cluster_features_:
        raise BundleError(f"The cluster means have {first.means_.shape[1]} dimensions but the rotation's cluster "
                          f"features have {rot.n_cluster_features_}.")
    if reads_core(cl) and cl.harmonized_columns != harmonized:
        raise BundleError(f"The second stage of the clusters reads {cl.harmonized_columns} harmonized columns but the "
                          f"rotation gives {harmonized}.")
    c = m["clusters"]
    k = cl.n_clusters_
    if not (int(c.get("k", -1)) == k and list(c.get("labels", [])) == list(range(1, k + 1))
            and len(c.get("names", [])) == k and len(c.get("colors", [])) == k):
        raise BundleError(f"The manifest's clusters section (k, labels, names, colors) does not describe the "
                          f"{k} stored clusters.")
    missing = [key for key in SPEC_KEYS if key not in m["patch_spec"]]
    if missing:
        raise BundleError(f"The patch spec lacks {missing}.")
    _check_ranges(spec, rot)


def _check_ranges(spec: PatchSpec, rot) -> None:
    """Every setting analyze reads is a finite number in the range a model can have been trained with."""
    def number(value) -> float:
        ok = isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and np.isfinite(value)
        return float(value) if ok else float("nan")

    spacing = [number(v) for v in spec.spacing] if isinstance(spec.spacing, tuple) else []
    lo, hi = (number(v) for v in spec.hu_window)
    checks = {
        "spacing": len(spacing) == 3 and all(0.1 <= v <= 10 for v in spacing),
        "margin_mm": 0 <= number(spec.margin_mm) <= 100,
        "hu_window": -3000 <= lo < hi <= 5000,
        "outside_fill_hu": lo <= number(spec.outside_fill_hu) <= hi,
        "min_lung_fraction": 0 <= number(spec.min_lung_fraction) <= 1,
        "context_radius": float(number(spec.context_radius)).is_integer() and 0 <= spec.context_radius <= 16,
        "technical_weight": 0 <= number(getattr(rot, "technical_weight", 0.0)) <= 100,
    }
    wrong = [key for key, ok in checks.items() if not ok]
    if wrong:
        shown = {k: (rot.technical_weight if k == "technical_weight" else getattr(spec, k)) for k in wrong}
        raise BundleError(f"The bundle's settings are out of range or not finite: {shown}. It is damaged or was "
                          "edited by hand; restore it or retrain.")


def save_bundle(bundle: ModelBundle, out_dir, overwrite: bool = False) -> Path:
    """Write ``bundle`` into the folder ``out_dir`` and return that path.

    The files are staged in a hidden folder inside ``out_dir`` and moved into place with
    ``os.replace``, manifest last, so an interrupted save never leaves a bundle that loads with
    mismatched files (it is refused by its checksums). Other files in the folder (e.g. training
    checkpoints) are left alone. An existing bundle is refused unless ``overwrite``.
    """
    payload = bundle._payload()
    manifest = copy.deepcopy(bundle.manifest)
    manifest["files"] = {fname: _sha256(data) for fname, data in payload.items()}
    manifest_bytes = _sealed_manifest_bytes(manifest)
    out = Path(out_dir)
    with StagedOutput(out, [*DATA_FILES, MANIFEST], overwrite=overwrite) as staged:
        for fname, data in payload.items():
            staged.path(fname).write_bytes(data)
        staged.path(MANIFEST).write_bytes(manifest_bytes)
    bundle.manifest = manifest
    bundle.path = out
    return out


# ------------------------------------------------------------------------- loading
def _read_manifest(folder: Path) -> dict:
    mpath = folder / MANIFEST
    if not mpath.is_file():
        raise BundleError(f"{folder} is not a model bundle: it has no {MANIFEST}. Give the folder written by "
                          "`latentharmonize train`.")
    if mpath.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{mpath} is {mpath.stat().st_size} bytes, far more than a manifest; the bundle is damaged. "
                          "Restore it or retrain.")
    raw = mpath.read_bytes()
    try:
        manifest = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise BundleError(f"{mpath} is not valid JSON ({exc}); the bundle is damaged. Restore it or retrain.") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{mpath} must hold a JSON object; the bundle is damaged.")
    return manifest


MAX_MANIFEST_BYTES = 1 << 20


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a number a model can hold")


def _check_manifest(manifest: dict, folder: Path) -> None:
    version = manifest.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise BundleError(f"{folder / MANIFEST} has no integer format_version; it is not a LatentHarmonize bundle "
                          "or is damaged.")
    if version != FORMAT_VERSION:
        hint = ("it was made by a newer LatentHarmonize; update LatentHarmonize" if version > FORMAT_VERSION
                else "retrain the model with this version")
        raise BundleError(f"Model bundle {folder} has format version {version}, but this LatentHarmonize "
                          f"({__version__}) reads version {FORMAT_VERSION}: {hint}.")
    if manifest.get(CHECKSUM_KEY) != _content_sha256(manifest):
        what = "has no checksum" if CHECKSUM_KEY not in manifest else "does not match its checksum"
        raise BundleError(f"{folder / MANIFEST} {what}: it was edited or damaged, and its settings would change the "
                          "results. Restore the bundle from its source or retrain (cluster names and colours are "
                          "changed with `latentharmonize.bundle.set_cluster_names`, which keeps the checksum right).")
    wrong = [f"{key} ({kind.__name__})" for key, kind in MANIFEST_SECTIONS.items()
             if not isinstance(manifest.get(key), kind)]
    enc = manifest.get("encoder", {})
    if isinstance(enc, dict) and not (isinstance(enc.get("kind"), str) and isinstance(enc.get("config"), dict)
                                      and isinstance(enc.get("latent_dim"), int)):
        wrong.append("encoder.kind/latent_dim/config")
    if wrong:
        raise BundleError(f"{folder / MANIFEST} is malformed: missing or wrong type: {', '.join(wrong)}. "
                          "Restore the bundle or retrain.")
    unknown = sorted(set(manifest["files"]) - set(DATA_FILES))
    if unknown:
        kind = "path-like " if any("/" in f or "\\" in f or f.startswith(".") for f in unknown) else ""
        raise BundleError(f"{folder / MANIFEST} lists {kind}file entries this format does not have: {unknown} (a "
                          f"bundle holds exactly {', '.join(DATA_FILES)}). It is damaged or was tampered with; "
                          "restore it or retrain.")


def _read_verified(folder: Path, files: dict, fname: str) -> bytes:
    if fname not in files:
        raise BundleError(f"{folder / MANIFEST} does not list {fname}; the bundle is incomplete.")
    expected = files[fname]
    if not (isinstance(expected, str) and re.fullmatch(r"[0-9a-f]{64}", expected)):
        raise BundleError(f"{folder / MANIFEST} gives no valid SHA-256 for {fname}; the bundle is damaged.")
    path = folder / fname
    if not path.is_file():
        raise BundleError(f"Model bundle {folder} is missing {fname}. Copy the whole bundle folder, or retrain.")
    data = path.read_bytes()
    if _sha256(data) != expected:
        raise BundleError(f"{path} does not match the checksum in {MANIFEST} (modified or truncated file). "
                          "Restore the bundle from its source or retrain; it is not safe to use.")
    return data


def bundle_folder(path=None) -> Path:
    """The folder a ``--model`` argument names: the folder itself, its manifest's path, or None for the default."""
    folder = Path(path) if path is not None else default_bundle_path()
    return folder.parent if folder.is_file() and folder.name == MANIFEST else folder


def load_bundle(path=None) -> ModelBundle:
    """Load and verify a model bundle folder (default: :func:`default_bundle_path`)."""
    folder = bundle_folder(path)
    if not folder.is_dir():
        if path is None:
            raise BundleError(f"The default model bundle is not installed at {folder}. Pass --model with a folder "
                              "written by `latentharmonize train`, or build the default with "
                              "`python scripts/train_default_bundle.py`.")
        raise BundleError(f"No model bundle folder at {folder}. Pass --model with a folder written by "
                          "`latentharmonize train`.")
    manifest = _read_manifest(folder)
    _check_manifest(manifest, folder)
    blobs = {fname: _read_verified(folder, manifest["files"], fname) for fname in DATA_FILES}
    try:
        state = load_tensors(blobs[ENCODER_FILE])
        arrays = load_arrays(blobs[ARRAYS_FILE])
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise BundleError(f"Cannot read the weights/arrays of {folder} ({exc}); the bundle is damaged.") from exc
    try:
        rotation = LatentRotation.from_state(
            {k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith("rotation.")}, manifest["rotation"])
        kind = TwoStageClusters if "first" in manifest["clusters"] else TissueClusters
        clusters = kind.from_state(
            {k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith("clusters.")}, manifest["clusters"])
    except (KeyError, TypeError, ValueError, InputError) as exc:
        raise BundleError(f"The rotation/cluster arrays of {folder} are inconsistent with its manifest ({exc}); "
                          "the bundle is damaged.") from exc
    bad = sorted([f"{ARRAYS_FILE}:{k}" for k, v in arrays.items() if not np.all(np.isfinite(v))]
                 + [f"{ENCODER_FILE}:{k}" for k, v in state.items() if v.is_floating_point() and not v.isfinite().all()])
    if bad:
        raise BundleError(f"Model bundle {folder} holds NaN or infinite numbers in {', '.join(bad[:5])}; a model with "
                          "them gives meaningless clusters. Retrain, or restore the bundle from its source.")
    bundle = ModelBundle(manifest=manifest, encoder_state=state, rotation=rotation, clusters=clusters,
                         path=folder)
    _validate(bundle)
    return bundle


def set_cluster_names(path, names=None, colors=None) -> ModelBundle:
    """Edit cluster names and/or colours of the bundle at ``path``; returns the reloaded bundle.

    ``names``/``colors`` are a list for all labels 1..K or a dict ``{label: value}`` for some of
    them; a colour is (r, g, b) floats in 0..1. The bundle is verified first, and manifest.json is
    rewritten atomically with fresh checksums (the model's SHA-256 changes with it).
    """
    bundle = load_bundle(path)
    c = bundle.manifest["clusters"]
    k = len(c["labels"])

    def merged(current: list, update, what: str) -> list:
        if update is None:
            return list(current)
        if isinstance(update, Mapping):  # labels may be ints or digit strings (from JSON or a GUI)
            by_label = {int(lab) if str(lab).strip().isdigit() else lab: v for lab, v in update.items()}
            bad = [lab for lab in by_label if not (isinstance(lab, int) and 1 <= lab <= k)]
            if bad:
                raise InputError(f"Unknown cluster label(s) {bad} for {what}; labels are 1..{k}.")
            return [by_label.get(lab, cur) for lab, cur in zip(range(1, k + 1), current)]
        return list(update)

    new_names, new_colors = _check_names_colors(merged(c["names"], names, "names"),
                                                merged(c["colors"], colors, "colors"), k)
    manifest = copy.deepcopy(bundle.manifest)
    manifest["clusters"]["names"] = new_names
    manifest["clusters"]["colors"] = [list(rgb) for rgb in new_colors]
    manifest["files"] = {fname: _sha256((bundle.path / fname).read_bytes()) for fname in DATA_FILES}
    atomic_write_bytes(bundle.path / MANIFEST, _sealed_manifest_bytes(manifest))
    return load_bundle(bundle.path)
