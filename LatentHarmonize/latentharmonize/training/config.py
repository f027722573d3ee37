"""Every setting of a training run in one frozen ``TrainConfig``: its defaults are the defaults (the CLI reads them
from here), its validation is the only one, and, with the cohort's hash, it is the resume fingerprint."""
from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass

import numpy as np

from ..densitometry import LAA_THRESHOLD_HU
from ..errors import InputError
from ..networks import DEFAULT_LATENT_DIM, DEFAULT_WIDTH, MODEL_KINDS
from ..patches import PatchSpec

DEFAULT_EPOCHS = 20
# How long and where a run goes, not what it computes: left out of the resume fingerprint, so that
# `--resume --epochs 30` extends a 20-epoch run, possibly on another device or cluster.
RUNTIME_FIELDS = ("epochs", "max_minutes", "device", "scheduler", "workers")


@dataclass(frozen=True)
class TrainConfig:
    """Everything ``train`` needs besides the cohort and the output folder; invalid settings raise ``InputError``
    with the command-line flag to fix."""

    encoder: str = "ae"
    seed: int = 0
    epochs: int | None = None  # None: DEFAULT_EPOCHS, unless max_minutes is the budget
    max_minutes: float | None = None
    clusters: int | None = None  # mixture components; None: K chosen by stability
    n_technical: int | str = "auto"
    per_patient: int = 400
    latent_dim: int = DEFAULT_LATENT_DIM
    width: int = DEFAULT_WIDTH
    batch_size: int = 128
    lr: float = 2e-3
    low_attenuation_channel: bool = False  # ae only: also encode a channel of voxels below LAA_THRESHOLD_HU
    densitometry: float | None = None  # weight of the patch statistics appended to the latents
    densitometry_smooth_mm: float = 0.0
    densitometry_smooth_total: bool = False  # densitometry_smooth_mm counts the low-pass in (the spec's smooth_total)
    densitometry_read_z_mm: float = 0.0  # through-plane SD analysis reads the statistics at; fitted as acquired
    technical_weight: float | None = None  # of the re-centred technical coordinates in the clusters; None: chosen
    calibrate: bool = False  # air/fat HU calibration of every scan (the spec's calibration)
    second_stage: int | None = None  # components of the clusters' second stage (two_stage.py); None: one stage
    depth_contrast_hu: float | None = None  # the second stage's min_above_depth_hu; None: no depth test
    lowpass_mm: float = 0.0  # in-plane Gaussian SD of the model-grid HU (the spec's lowpass_mm)
    lowpass_noise_hu: float | None = None  # soft-tissue noise each scan is blurred down to (the spec's)
    context_radius: int = PatchSpec.context_radius
    device: str = "auto"
    scheduler: str | None = None  # Dask scheduler address for sampling the cohort
    workers: int | None = None  # or a local Dask cluster of this size

    def __post_init__(self):
        _check_model(self)
        _check_budget(self)
        _check_sizes(self)
        _check_densitometry(self)
        _check_technical_weight(self)
        self.patch_spec()  # the spec validates the context radius and the low-pass

    @property
    def epoch_budget(self) -> int | None:
        """Epochs to train to; None when ``max_minutes`` is the budget."""
        return DEFAULT_EPOCHS if self.epochs is None and self.max_minutes is None else self.epochs

    def patch_spec(self) -> PatchSpec:
        """The spec the encoder is trained on (``train`` appends the fitted densitometry entry later)."""
        return PatchSpec(context_radius=self.context_radius, calibration="air_fat" if self.calibrate else None,
                         lowpass_mm=self.lowpass_mm, lowpass_noise_hu=self.lowpass_noise_hu)

    def model_kwargs(self) -> dict:
        kwargs = {"latent_dim": self.latent_dim, "width": self.width}
        if self.low_attenuation_channel:
            kwargs.update(low_attenuation_hu=LAA_THRESHOLD_HU, hu_window=list(self.patch_spec().hu_window))
        return kwargs

    def fingerprint(self) -> dict:
        """What shapes the weights: every setting but the runtime ones, and the patch spec in its manifest form."""
        settings = {k: v for k, v in asdict(self).items() if k not in RUNTIME_FIELDS}
        return {**settings, "patch_spec": self.patch_spec().to_dict()}


def _check_model(config: TrainConfig) -> None:
    if config.encoder not in MODEL_KINDS:
        raise InputError(f"--encoder must be one of {', '.join(MODEL_KINDS)}, got {config.encoder!r}.")
    if config.low_attenuation_channel and config.encoder != "ae":
        raise InputError(f"--low-attenuation-channel works with --encoder ae only, got {config.encoder!r}.")
    if not _is_int(config.seed):
        raise InputError(f"--seed must be an integer, got {config.seed!r}.")


def _check_budget(config: TrainConfig) -> None:
    epochs, max_minutes = config.epochs, config.max_minutes
    if epochs is not None and max_minutes is not None:
        raise InputError("Give either --epochs or --max-minutes, not both.")
    if epochs is not None and epochs < 1:
        raise InputError(f"--epochs must be at least 1, got {epochs}.")
    if max_minutes is not None and not max_minutes > 0:
        raise InputError(f"--max-minutes must be positive, got {max_minutes}.")


def _check_sizes(config: TrainConfig) -> None:
    if config.clusters is not None and config.clusters < 2:
        raise InputError(f"--clusters must be at least 2 (or left out to choose K by stability), got {config.clusters}.")
    for name in ("per_patient", "latent_dim", "batch_size"):
        value = getattr(config, name)
        if not _is_int(value) or value < 2:
            raise InputError(f"{name} must be an integer of at least 2, got {value!r}.")
    n_technical, latent_dim = config.n_technical, config.latent_dim
    if n_technical != "auto" and (not _is_int(n_technical) or not 0 <= n_technical < latent_dim):
        raise InputError(f"--n-technical must be 'auto' or an integer in 0..{latent_dim - 1}, got {n_technical!r}.")


def _check_densitometry(config: TrainConfig) -> None:
    weight, smooth = config.densitometry, config.densitometry_smooth_mm
    if weight is not None and not (_is_real(weight) and weight > 0):
        raise InputError(f"--densitometry must be a positive weight (1 is the usual choice), got {weight!r}.")
    if not (_is_real(smooth) and smooth >= 0) or (smooth and weight is None):
        raise InputError(f"--densitometry-smooth must be 0 or more mm, and goes with --densitometry; got {smooth!r}.")
    stage = config.second_stage
    if stage is not None and (not _is_int(stage) or stage < 2 or weight is None):
        raise InputError(f"--second-stage must be an integer of at least 2 and goes with --densitometry (it reads the "
                         f"harmonized statistics); got {stage!r}.")
    depth = config.depth_contrast_hu
    if depth is not None and (not (_is_real(depth) and depth >= 0) or stage is None):
        raise InputError(f"--depth-contrast must be 0 or more HU, and goes with --second-stage (it tests the second "
                         f"stage's names); got {depth!r}.")
    z = config.densitometry_read_z_mm
    if not (_is_real(z) and z >= 0) or (z and weight is None):
        raise InputError(f"--densitometry-read-z must be 0 or more mm, and goes with --densitometry; got {z!r}.")
    total = config.densitometry_smooth_total
    if not isinstance(total, bool) or (total and not smooth):
        raise InputError(f"--densitometry-smooth-total goes with a --densitometry-smooth above 0; got {total!r} "
                         f"with {smooth!r} mm.")


def _check_technical_weight(config: TrainConfig) -> None:
    weight = config.technical_weight
    if weight is not None and not (_is_real(weight) and 0 <= weight <= 100):
        raise InputError(f"--technical-weight must be a number from 0 to 100 (0.1 is the shipped bundle's), got "
                         f"{weight!r}.")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and bool(np.isfinite(value))
