"""2.5D lung patches: the spec, normalisation, the patch lattice and dense encoding.

Training samples paired patches from this lattice in :mod:`latentharmonize.training.samples`.

A patch is 3 adjacent axial slices x 16 x 16 px of the model grid. The encoder has an in-plane stride of 4 px, so
patch centres form a *lattice*: centre (k, i, j) is the patch on grid slices k..k+2 whose top-left pixel is
(4 i, 4 j); its centre sits at pixel (4 i + 7.5, 4 j + 7.5) of slice k + 1. A centre is *valid* (in the lung) when
at least half of its 5 mm x 5 mm cell (the central 4 x 4 px of the centre slice) is lung.

Because ``grid.to_model_grid`` aligns grid origins to multiples of the stride, the lattices of all acquisitions of
a patient coincide in physical space; ``point_keys`` turns a lattice position into an exact integer key
(micrometres) that is equal across acquisitions, which is how patches are paired.
"""
from __future__ import annotations

import contextlib
import math
import numbers
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

from .calibration import METHODS as CALIBRATIONS, scan_calibration
from .densitometry import (HAA_THRESHOLD_HU, HU_STATISTIC_NAMES, PATCH_BLOCK, matched_lung_hu, patch_hu_statistics,
                           smooth_lung)
from .errors import InputError
from .grid import (DEFAULT_MARGIN_MM, DEFAULT_SPACING, MAX_LOWPASS_MM, ModelGrid, lowpass_in_plane,
                   noise_matched_sigma, soft_tissue_noise, to_model_grid)
from .networks import PATCH_SIZE, SLICES, STRIDE
from .progress import Progress

_DENSITOMETRY_FORM = (f"a weight > 0, {len(HU_STATISTIC_NAMES)} finite centres and {len(HU_STATISTIC_NAMES)} positive "
                      f"scales (one per statistic {list(HU_STATISTIC_NAMES)}), an optional smooth_mm >= 0, an "
                      "optional boolean smooth_total and an optional z_total_mm > 0")


@dataclass(frozen=True)
class PatchDensitometry:
    """Patch densitometry appended to each latent before the rotation (:func:`densitometry_features`):
    ``(statistic - center) / scale`` per statistic of ``densitometry.HU_STATISTIC_NAMES``; ``train --densitometry``
    fits centre and scale on the training patches. ``smooth_mm``: statistics of :func:`densitometry.smooth_lung`, on
    top of the encoder's low-pass, or with ``smooth_total`` as the total in-plane blur, the low-pass included
    (:meth:`added_smooth_mm`)."""

    weight: float
    center: tuple
    scale: tuple
    smooth_mm: float | None = None
    smooth_total: bool = False
    z_total_mm: float | None = None

    def __post_init__(self):
        n = len(HU_STATISTIC_NAMES)
        try:
            center, scale = (np.asarray(v, dtype=float) for v in (self.center, self.scale))
        except (TypeError, ValueError):  # not numbers: reported below like any other malformed entry
            center = scale = np.zeros(0)
        ok = (center.shape == scale.shape == (n,) and np.all(np.isfinite(center)) and np.all(np.isfinite(scale))
              and np.all(scale > 0) and _is_real(self.weight) and self.weight > 0
              and (self.smooth_mm is None or (_is_real(self.smooth_mm) and self.smooth_mm >= 0))
              and isinstance(self.smooth_total, bool)
              and (self.z_total_mm is None or (_is_real(self.z_total_mm) and self.z_total_mm > 0)))
        if not ok:
            raise InputError(f"densitometry must be null or {_DENSITOMETRY_FORM}, got {self.to_dict()!r}; the model "
                             "bundle is damaged or was edited by hand.")

    @classmethod
    def from_dict(cls, entry) -> "PatchDensitometry":
        keys = {"weight", "center", "scale"}
        if not (isinstance(entry, dict) and keys <= set(entry) <= keys | {"smooth_mm", "smooth_total", "z_total_mm"}):
            raise InputError(f"densitometry must be null or {_DENSITOMETRY_FORM}, got {entry!r}; the model bundle is "
                             "damaged or was edited by hand.")
        center, scale = (tuple(v) if isinstance(v, (list, tuple)) else v for v in (entry["center"], entry["scale"]))
        return cls(entry["weight"], center, scale, entry.get("smooth_mm"), entry.get("smooth_total", False),
                   entry.get("z_total_mm"))

    def added_smooth_mm(self, lowpass_mm: float) -> float:
        """SD (mm) of the blur the statistics add to HU already low-passed with SD ``lowpass_mm``. Gaussian SDs add
        in quadrature, so a total ``smooth_mm`` adds sqrt(smooth_mm² − lowpass_mm²), and nothing where the low-pass
        alone reaches it: every scan's statistics then see one blur, whatever its kernel asked of the low-pass."""
        if not self.smooth_mm:
            return 0.0
        if not self.smooth_total:
            return float(self.smooth_mm)
        return math.sqrt(max(float(self.smooth_mm) ** 2 - float(lowpass_mm) ** 2, 0.0))

    def added_z_mm(self, scan_z_mm: float | None) -> float:
        """SD (mm) of the blur along z that brings a scan of slice spacing ``scan_z_mm`` to ``z_total_mm`` on the
        model grid (0 without ``z_total_mm`` or a known spacing). Contiguous slices of thickness T average over a
        box (variance T²/12), and resampling them linearly onto the model grid adds on average T²/6: a scan reaches
        the grid with a through-plane SD of T/2, 2.5 mm for 5 mm slices, 0.6 mm for 1.25 mm ones."""
        if not self.z_total_mm or not scan_z_mm:
            return 0.0
        return math.sqrt(max(float(self.z_total_mm) ** 2 - (float(scan_z_mm) / 2.0) ** 2, 0.0))

    def to_dict(self) -> dict:
        smooth = {} if self.smooth_mm is None else {"smooth_mm": self.smooth_mm}
        if self.z_total_mm is not None:
            smooth["z_total_mm"] = self.z_total_mm
        if self.smooth_total:  # bundles without the key stack smooth_mm on the low-pass, as before the key existed
            smooth["smooth_total"] = True
        listed = [list(v) if isinstance(v, tuple) else v for v in (self.center, self.scale)]
        return {"weight": self.weight, "center": listed[0], "scale": listed[1], **smooth}


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and bool(np.isfinite(value))


@dataclass(frozen=True)
class PatchSpec:
    """How a scan becomes patches: the model grid, the patch geometry, the HU window and what is added to the
    latents. A bundle stores it as its manifest's ``patch_spec`` (:meth:`to_dict`); every default lives here."""

    patch_size: int = PATCH_SIZE  # px in-plane
    slices: int = SLICES  # adjacent axial slices, as channels
    stride: int = STRIDE  # px between lattice points in-plane
    spacing: tuple = DEFAULT_SPACING  # model grid (x, y, z) mm
    margin_mm: float = DEFAULT_MARGIN_MM
    hu_window: tuple = (-1100.0, 300.0)
    outside_fill_hu: float = -850.0  # normal lung: the chest wall must not drive border patches
    min_lung_fraction: float = 0.5  # of a centre's cell for the centre to count as lung
    # In-plane lattice steps whose latents are averaged into each one (0: the patch alone). Tissue type is a
    # regional property; averaging neighbours damps what one 20 mm patch happens to hold (a vessel, a border).
    context_radius: int = 1
    # Internal-reference HU calibration before encoding (calibration.py): None or "air_fat".
    calibration: str | None = None
    # In-plane Gaussian SD (mm) of the model-grid HU the encoder and the densitometry read (grid.lowpass_in_plane):
    # every reconstruction kernel is brought to one resolution, so a sharp kernel's texture cannot pass for tissue.
    # The vessels and airways are found on the HU as resampled, where thin airway walls keep their contrast.
    lowpass_mm: float = 0.0
    # Soft-tissue noise (HU, grid.soft_tissue_noise) each scan is blurred down to, from lowpass_mm up: a sharp or
    # low-dose kernel gets more blur than a soft one, so both reach the encoder at one noise level. None: every scan
    # gets lowpass_mm.
    lowpass_noise_hu: float | None = None
    densitometry: PatchDensitometry | None = None

    def __post_init__(self):
        fixed = {"patch_size": PATCH_SIZE, "slices": SLICES, "stride": STRIDE}
        wrong = {k: getattr(self, k) for k, v in fixed.items() if int(getattr(self, k)) != v}
        if wrong:
            raise InputError(f"Patch spec {wrong} does not match the encoder ({fixed}); the model bundle is inconsistent.")
        if int(self.context_radius) < 0:
            raise InputError(f"context_radius must be 0 or more lattice steps, got {self.context_radius}.")
        if self.calibration is not None and self.calibration not in CALIBRATIONS:
            raise InputError(f"calibration must be null or one of {CALIBRATIONS}, got {self.calibration!r}.")
        if not (_is_real(self.lowpass_mm) and 0 <= self.lowpass_mm <= 10):
            raise InputError(f"lowpass_mm must be a number of mm in 0..10, got {self.lowpass_mm!r}.")
        if self.lowpass_noise_hu is not None and not (_is_real(self.lowpass_noise_hu) and self.lowpass_noise_hu > 0):
            raise InputError(f"lowpass_noise_hu must be null or a positive number of HU, got {self.lowpass_noise_hu!r}.")
        lo, hi = self.hu_window
        if not lo < hi:
            raise InputError(f"hu_window must be [low, high] with low < high, got {list(self.hu_window)}.")

    @classmethod
    def from_dict(cls, entries: dict | None) -> "PatchSpec":
        """The spec of a manifest's ``patch_spec`` (missing keys take the defaults); refuses specs this encoder
        cannot honour and keys it does not know."""
        entries = dict(entries or {})
        unknown = sorted(set(entries) - {f.name for f in fields(cls)})
        if unknown:
            raise InputError(f"Unknown patch spec settings {unknown}; the model bundle is from another version or was "
                             "edited by hand.")
        for key in ("spacing", "hu_window"):
            if isinstance(entries.get(key), list):
                entries[key] = tuple(entries[key])
        if entries.get("densitometry") is not None:
            entries["densitometry"] = PatchDensitometry.from_dict(entries["densitometry"])
        return cls(**entries)

    def to_dict(self) -> dict:
        """The manifest form: plain JSON types."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["spacing"], out["hu_window"] = list(self.spacing), list(self.hu_window)
        out["densitometry"] = None if self.densitometry is None else self.densitometry.to_dict()
        return out

    @property
    def n_statistics(self) -> int:
        """Columns the densitometry appends to each latent (0 without it)."""
        return len(HU_STATISTIC_NAMES) if self.densitometry is not None else 0


def model_grid_hu(ct, lungs, spec: PatchSpec, required: bool = False) -> tuple:
    """``(hu, lung, grid, calibration)``: the lung box of a CT (SimpleITK images) on the model grid of ``spec``, HU
    calibrated if the spec asks (``calibration`` None otherwise). A scan without usable air/fat references is
    refused when ``required`` (training), else kept uncalibrated with the warning the calibration carries
    (analyze)."""
    # The air and fat levels are measured on the CT in a worker thread while the lung box is resampled (numpy and
    # ITK leave the GIL free). Array views are taken first: a view makes an image's buffer its own, which must not
    # happen under another thread's read.
    sitk.GetArrayViewFromImage(ct), sitk.GetArrayViewFromImage(lungs)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="latentharmonize-calibration") as pool:
        measured = pool.submit(scan_calibration, ct, lungs, spec, required)
        hu, lung, grid = to_model_grid(ct, lungs, tuple(spec.spacing), spec.margin_mm,
                                       align_px=(spec.stride, spec.stride, 1))
        calibration = measured.result()
    return (hu if calibration is None else calibration.apply(hu)), lung, grid, calibration


def matched_hu(hu: np.ndarray, lung: np.ndarray, grid: ModelGrid, spec: PatchSpec, lowpass_mm: float) -> np.ndarray:
    """:func:`densitometry.matched_lung_hu` of a scan on the model grid: in-plane its own noise-matched low-pass
    ``lowpass_mm`` (:func:`encoder_input`), along z the blur to 5 mm slices' resolution that the spec's densitometry
    reads (none for a spec without one)."""
    z_mm = spec.densitometry.added_z_mm(grid.scan_z_mm) if spec.densitometry is not None else 0.0
    return matched_lung_hu(hu, lung, lowpass_mm, grid.spacing, z_mm)


def encoder_input(hu: np.ndarray, spec: PatchSpec) -> tuple[np.ndarray, float]:
    """``(blurred hu, sigma_mm)``: the model-grid HU the encoder and the densitometry read, and the in-plane
    Gaussian SD that made it (the spec's ``lowpass_mm``, raised to match ``lowpass_noise_hu`` where set)."""
    sigma = spec.lowpass_mm
    if spec.lowpass_noise_hu is not None:
        sigma = noise_matched_sigma(hu, spec.spacing, spec.lowpass_noise_hu, spec.lowpass_mm)
    return lowpass_in_plane(hu, sigma, spec.spacing), float(sigma)


NOISY_SCAN = "noise_above_target"


def noise_warning(hu: np.ndarray, spec: PatchSpec, sigma_mm: float) -> dict | None:
    """The warning ``noise_above_target`` where the noise-matched blur (``sigma_mm``, from :func:`encoder_input`)
    stopped at its largest step with the scan's soft tissue still noisier than the spec's target; else None."""
    if spec.lowpass_noise_hu is None or sigma_mm < MAX_LOWPASS_MM:
        return None
    noise = soft_tissue_noise(hu, spec.spacing, sigma_mm)
    if noise is None or noise <= spec.lowpass_noise_hu:
        return None
    return {"code": NOISY_SCAN, "message": (
        f"This scan is noisier than the model reads: even through a {sigma_mm:g} mm in-plane blur its soft tissue "
        f"keeps {noise:.1f} HU of fine-grained noise, against the {spec.lowpass_noise_hu:g} HU of the soft-kernel "
        "scans the model was built for (a very sharp kernel, a low dose, or both). Noise reads as darker and more "
        "textured lung, so the lower-attenuation share and the texture clusters may follow it. Analyse a softer "
        "or thicker reconstruction of the same scan if there is one.")}


def n_features(latent_dim: int, spec: PatchSpec) -> int:
    """Length of the vectors the rotation sees: the encoder's latent plus the densitometry columns, if any."""
    return int(latent_dim) + spec.n_statistics


def lattice_hu_statistics(hu: np.ndarray, lung: np.ndarray, positions: np.ndarray, spec: PatchSpec) -> np.ndarray:
    """:func:`densitometry.patch_hu_statistics` of the lung voxels of each patch at lattice ``positions``, the
    patches cut a block at a time (all of them at once would not stay in cache)."""
    volume = np.where(lung, hu, np.nan).astype(np.float32)
    blocks = [patch_hu_statistics(extract_patches(volume, positions[start:start + PATCH_BLOCK], spec))
              for start in range(0, len(positions), PATCH_BLOCK)]
    return np.vstack(blocks)


# the columns of core_statistics: the patch statistics, then how far the core's median stands above the lung at its
# depth (docs/experiments/2026-12-07-depth-contrast.md)
CORE_STATISTIC_NAMES = HU_STATISTIC_NAMES + ("above_depth",)
DEPTH_BAND_MM = 15.0  # antero-posterior extent of the lung the depth reference reads, centred on the patch
# lung denser than this at a depth is disease rather than a small breath (ground glass starts here): the reference
# stops at it, so a lung mostly ground glass keeps its name
DEPTH_REFERENCE_MAX_HU = HAA_THRESHOLD_HU
DEPTH_HU_RANGE = (-1200, 1200)  # HU the depth reference's histograms hold; values beyond count at its ends


def depth_reference(hu: np.ndarray, mask: np.ndarray, rows: np.ndarray, spacing_y_mm: float,
                    band_mm: float = DEPTH_BAND_MM) -> np.ndarray:
    """Median HU (to the nearest HU) of the ``mask`` voxels whose model-grid row (y, antero-posterior) lies within
    ``band_mm / 2`` of each of ``rows``, over the whole scan: the lung at that depth. A supine lung grows denser
    towards its back (gravity, and more so in a smaller breath); a patch read against the lung at its own depth does
    not take that for disease. A band that holds no voxel reads the whole mask's median.

    Read from one histogram of whole HU per row, summed over each band (a sort of every band's voxels took most of
    a second on a full-size scan)."""
    mask = np.asarray(mask, bool)
    if not mask.any():
        raise InputError("The depth reference needs at least one voxel in the mask.")
    low, high = DEPTH_HU_RANGE
    width = high - low + 1
    bins = np.clip(np.rint(hu[mask]), low, high).astype(np.int32) - low
    row_of = np.broadcast_to(np.arange(mask.shape[1], dtype=np.int32)[None, :, None], mask.shape)[mask]
    counts = np.bincount(row_of.astype(np.int64) * width + bins, minlength=mask.shape[1] * width)
    cumulative = np.vstack([np.zeros((1, width), np.int64), np.cumsum(counts.reshape(mask.shape[1], width), axis=0)])

    def median(histogram):
        return low + int(np.searchsorted(np.cumsum(histogram), (histogram.sum() + 1) / 2))

    half = int(round(band_mm / 2 / spacing_y_mm))
    whole = median(cumulative[-1])
    unique, which = np.unique(rows, return_inverse=True)
    bands = [cumulative[min(row + half + 1, mask.shape[1])] - cumulative[max(row - half, 0)] for row in unique]
    return np.array([median(band) if band.any() else whole for band in bands], np.float32)[which]


def core_statistics(hu: np.ndarray, parenchyma: np.ndarray, positions: np.ndarray, spec: PatchSpec,
                    lung: np.ndarray | None = None) -> np.ndarray:
    """:func:`lattice_hu_statistics` of each patch's *core*: its parenchyma eroded by one model-grid voxel (3-D
    cross), so away from the vessels and airways found, and from the lung's edge, whose partial volume raises
    unblurred HU. ``hu`` as on the model grid, with no low-pass or smoothing: the second stage of the clusters
    (:mod:`latentharmonize.two_stage`) reads texture the densitometry's blur takes away. A patch with no core voxel
    reads its parenchyma, and one with no parenchyma voxel (training cuts whole-lung patches) the ``lung``.

    Columns ``CORE_STATISTIC_NAMES``: the eight statistics, then ``above_depth``, the core's median less the
    :func:`depth_reference` of the scan's core at the patch centre's depth (at most ``DEPTH_REFERENCE_MAX_HU``)."""
    positions = np.asarray(positions, dtype=np.int64).reshape(-1, 3)
    if len(positions) == 0:
        return np.zeros((0, len(CORE_STATISTIC_NAMES)), np.float32)
    core = ndimage.binary_erosion(parenchyma, border_value=1)  # the volume's edge is not the lung's
    masks = [core, parenchyma] + ([] if lung is None else [lung])
    out = np.full((len(positions), len(CORE_STATISTIC_NAMES)), np.nan, np.float32)
    todo = np.ones(len(positions), bool)
    for mask in masks:
        cut = extract_patches(np.asarray(mask, bool).view(np.uint8), positions, spec)
        holds = cut.reshape(len(positions), -1).max(axis=1) > 0
        now = todo & holds
        if now.any():
            out[now, :-1] = lattice_hu_statistics(hu, mask, positions[now], spec)
        todo &= ~holds
    if todo.any():
        raise InputError("A patch at the given positions holds no lung voxel; pass the positions of valid centres.")
    reference_mask = next(m for m in masks if np.any(m))
    rows = centre_pixels(positions, spec)[1]
    median = out[:, HU_STATISTIC_NAMES.index("q50")]
    reference = np.minimum(depth_reference(hu, reference_mask, rows, spec.spacing[1]), DEPTH_REFERENCE_MAX_HU)
    out[:, -1] = median - reference
    return out


def densitometry_features(hu: np.ndarray, lung: np.ndarray, positions: np.ndarray, spec: PatchSpec,
                          lowpass_mm: float = 0.0, scan_z_mm: float | None = None) -> np.ndarray:
    """Each patch's HU quantiles and threshold shares (:func:`lattice_hu_statistics`) as ``(value - center) /
    scale``, float32 [n, 8]: what the spec's ``densitometry`` appends to the latents.

    The latent spends its few dimensions on vessels; emphysema is a shift of the voxel histogram the autoencoder
    barely needs to reconstruct. Appending the histogram before the rotation lets the paired rotation take out
    what the kernel and dose do to it (the emphysema index of a sharp kernel) and keep what the tissue does.
    With ``smooth_mm`` in the entry the statistics are read from :func:`densitometry.smooth_lung` of the scan, which
    ``hu`` reaches low-passed with SD ``lowpass_mm`` (:func:`encoder_input`).
    """
    entry = spec.densitometry
    added, added_z = entry.added_smooth_mm(lowpass_mm), entry.added_z_mm(scan_z_mm)
    if added or added_z:
        hu = smooth_lung(hu, lung, added, spec.spacing, added_z)
    raw = lattice_hu_statistics(hu, lung, positions, spec)
    return ((raw - np.asarray(entry.center, np.float32)) / np.asarray(entry.scale, np.float32)).astype(np.float32)


def _with_densitometry(latents: np.ndarray, hu, lung, positions, spec: PatchSpec, lowpass_mm: float,
                       scan_z_mm: float | None = None, features=None) -> np.ndarray:
    """``latents`` with the spec's densitometry columns appended (``features``: those columns, already computed)."""
    if spec.densitometry is None:
        return latents
    if len(latents) == 0:
        return np.zeros((0, n_features(latents.shape[1], spec)), np.float32)
    if features is None:
        features = densitometry_features(hu, lung, positions, spec, lowpass_mm, scan_z_mm)
    return np.hstack([latents, features])


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> CUDA when present, else CPU; asking for CUDA without one is an error the user can fix."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        raise InputError(f"--device must be auto, cpu or cuda, got {device!r}.")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but PyTorch sees no CUDA GPU; use --device auto or cpu.")
    return torch.device(device)


def autocast_for(device: torch.device):
    """Mixed precision on CUDA (bf16 where supported, else fp16); full precision on CPU."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def normalize_hu(hu: np.ndarray, lung: np.ndarray, spec: PatchSpec) -> np.ndarray:
    """HU -> [0, 1] over the spec's window, with voxels outside the lung set to ``outside_fill_hu`` first."""
    lo, hi = spec.hu_window
    filled = np.where(lung, hu, np.float32(spec.outside_fill_hu))
    return ((np.clip(filled, lo, hi) - lo) / (hi - lo)).astype(np.float32)


# ----------------------------------------------------------------------------- lattice
def patch_lattice(grid: ModelGrid, spec: PatchSpec = PatchSpec()) -> ModelGrid:
    """The grid of patch centres of a model grid (in-plane spacing = stride x grid spacing)."""
    p, s, n = spec.patch_size, spec.stride, spec.slices
    sx, sy, sz = grid.spacing
    z, y, x = grid.shape
    origin = (grid.origin[0] + (p - 1) / 2 * sx, grid.origin[1] + (p - 1) / 2 * sy, grid.origin[2] + (n // 2) * sz)
    shape = (max(z - n + 1, 0), max((y - p) // s + 1, 0), max((x - p) // s + 1, 0))
    return ModelGrid(origin=origin, spacing=(s * sx, s * sy, sz), shape=shape)


def valid_centres(lung: np.ndarray, spec: PatchSpec = PatchSpec()) -> np.ndarray:
    """Bool [Z', H', W'] on the patch lattice: is at least ``min_lung_fraction`` of the centre's cell lung?"""
    p, s, n = spec.patch_size, spec.stride, spec.slices
    z, y, x = lung.shape
    nz, ny, nx = max(z - n + 1, 0), max((y - p) // s + 1, 0), max((x - p) // s + 1, 0)
    off = (p - s) // 2
    cells = lung[n // 2: n // 2 + nz, off: off + s * ny, off: off + s * nx].astype(np.float32)
    fraction = cells.reshape(nz, ny, s, nx, s).mean(axis=(2, 4))
    return fraction >= spec.min_lung_fraction


def point_keys(lattice: ModelGrid, positions: np.ndarray) -> np.ndarray:
    """Exact integer keys (physical micrometres) of lattice positions; equal keys = same physical point."""
    return np.round(lattice.index_to_physical(positions) * 1000.0).astype(np.int64)


def centre_pixels(positions: np.ndarray, spec: PatchSpec) -> tuple:
    """(z, y, x) model-grid indices of the centre pixel of each patch at lattice ``positions`` (slice k + 1, pixel
    stride * i + 7), e.g. to read a tissue truth label per patch."""
    c = (spec.patch_size - 1) // 2
    pos = np.asarray(positions, dtype=np.int64).reshape(-1, 3)
    return pos[:, 0] + spec.slices // 2, spec.stride * pos[:, 1] + c, spec.stride * pos[:, 2] + c


def extract_patches(volume: np.ndarray, positions: np.ndarray, spec: PatchSpec) -> np.ndarray:
    """Patches [m, 3, 16, 16] of ``volume`` at lattice positions [m, 3] (z, y, x)."""
    p, s, n = spec.patch_size, spec.stride, spec.slices
    windows = np.lib.stride_tricks.sliding_window_view(volume, (n, p, p))
    pos = np.asarray(positions, dtype=np.int64).reshape(-1, 3)
    return np.ascontiguousarray(windows[pos[:, 0], s * pos[:, 1], s * pos[:, 2]])


# ----------------------------------------------------------------------------- dense encoding
@dataclass
class DenseLatents:
    latents: np.ndarray  # float32 [n, d], one row per valid patch (centre inside the lung)
    positions: np.ndarray  # int [n, 3] (z, y, x) indices into `lattice`
    lattice: ModelGrid  # grid of all patch centres (in-plane spacing = stride * grid spacing)
    lowpass_mm: float = 0.0  # in-plane Gaussian SD the encoder's input was blurred with (encoder_input)
    core: np.ndarray | None = None  # float32 [n, 9]: context-averaged core_statistics, where the clusters read them


def _slab_batch(device: torch.device) -> int:
    return 32 if device.type == "cuda" else 8


@contextlib.contextmanager
def threads_beside(busy: int):
    """Torch's CPU threads for the duration, fewer by ``busy`` (at least one): the cores that ``busy`` numpy threads
    working beside the encoder leave, so that the encoder's threads and theirs do not take turns on one core."""
    saved = torch.get_num_threads()
    torch.set_num_threads(max(1, saved - int(busy)))
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def encode_dense(model, hu: np.ndarray, lung: np.ndarray, grid: ModelGrid, spec: PatchSpec = PatchSpec(),
                 device="cpu", progress: Progress | None = None, slabs_per_batch: int | None = None) -> DenseLatents:
    """Encode every valid lattice centre of a model-grid volume, streaming batches of slabs over z.

    The encoder and the densitometry read ``hu`` low-passed as :func:`encoder_input` says. Each batch holds
    ``slabs_per_batch`` 3-slice slabs cropped in-plane to the rows/columns that carry a valid centre (exact, since
    crops keep the 4-px alignment); memory stays bounded by one batch. The spec's densitometry columns are computed
    in a worker thread meanwhile (numpy releases the GIL; they need the positions only, which the batches give in
    ``np.argwhere`` order).
    """
    if hu.shape != lung.shape or tuple(hu.shape) != tuple(grid.shape):
        raise InputError(f"hu {hu.shape}, lung {lung.shape} and grid {tuple(grid.shape)} must have one shape.")
    hu, sigma = encoder_input(hu, spec)
    device = device if isinstance(device, torch.device) else resolve_device(device)
    lattice = patch_lattice(grid, spec)
    valid = valid_centres(lung, spec)
    slabs = np.flatnonzero(valid.any(axis=(1, 2)))
    batch = slabs_per_batch or _slab_batch(device)
    model = model.to(device).eval()
    latents, positions = [], []
    n_batches = max(math.ceil(len(slabs) / batch), 1)
    beside = spec.densitometry is not None and valid.any()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="latentharmonize-densitometry") as pool, \
            torch.inference_mode(), autocast_for(device), threads_beside(int(beside)):
        features = (pool.submit(densitometry_features, hu, lung, np.argwhere(valid), spec, sigma, grid.scan_z_mm)
                    if beside else None)
        for b, start in enumerate(range(0, len(slabs), batch)):
            ks = slabs[start: start + batch]
            lat, pos = _encode_slab_batch(model, hu, lung, valid, ks, spec, device)
            latents.append(lat)
            positions.append(pos)
            if progress is not None:
                progress(100.0 * (b + 1) / n_batches, "encode", f"slab batch {b + 1}/{n_batches}")
        features = None if features is None else features.result()
    latents = np.concatenate(latents or [np.zeros((0, model.latent_dim), np.float32)])
    positions = np.concatenate(positions or [np.zeros((0, 3), np.int64)])
    dense = DenseLatents(latents=_with_densitometry(latents, hu, lung, positions, spec, sigma, grid.scan_z_mm,
                                                    features),
                         positions=positions, lattice=lattice, lowpass_mm=sigma)
    return aggregate_context(dense, spec.context_radius)


def aggregate_context(dense: DenseLatents, radius: int) -> DenseLatents:
    """Replace each latent by the mean of the valid latents within ``radius`` lattice steps in-plane (same slice).

    Means are linear, so the rotation and cluster models see the same kind of vector as without context.
    """
    if radius <= 0 or len(dense.latents) == 0:
        return dense
    lo = dense.positions.min(axis=0)
    local = dense.positions - lo  # work on the positions' bounding box only
    shape = tuple(local.max(axis=0) + 1)
    z, y, x = local.T
    field = np.zeros(shape + (dense.latents.shape[1],), np.float64)
    count = np.zeros(shape, np.float64)
    field[z, y, x], count[z, y, x] = dense.latents, 1.0
    size = 2 * radius + 1
    sums = ndimage.uniform_filter(field, size=(1, size, size, 1), mode="constant")
    counts = ndimage.uniform_filter(count, size=(1, size, size), mode="constant")
    return replace(dense, latents=(sums[z, y, x] / counts[z, y, x][:, None]).astype(np.float32))


def _encode_slab_batch(model, hu, lung, valid, ks, spec, device) -> tuple[np.ndarray, np.ndarray]:
    p, s, n = spec.patch_size, spec.stride, spec.slices
    v = valid[ks]
    rows, cols = np.flatnonzero(v.any(axis=(0, 2))), np.flatnonzero(v.any(axis=(0, 1)))
    i0, i1, j0, j1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    ys, xs = slice(s * i0, s * (i1 - 1) + p), slice(s * j0, s * (j1 - 1) + p)
    slab = np.stack([normalize_hu(hu[k: k + n, ys, xs], lung[k: k + n, ys, xs], spec) for k in ks])
    dense = model.encode_dense(torch.from_numpy(slab).to(device)).float()  # [b, D, i1-i0, j1-j0]
    b, i, j = np.nonzero(v[:, i0:i1, j0:j1])
    lat = dense.permute(0, 2, 3, 1)[torch.from_numpy(b), torch.from_numpy(i), torch.from_numpy(j)]
    pos = np.stack([ks[b], i + i0, j + j0], axis=1).astype(np.int64)
    return lat.cpu().numpy().astype(np.float32), pos


def encode_patches_naive(model, hu: np.ndarray, lung: np.ndarray, grid: ModelGrid, spec: PatchSpec = PatchSpec(),
                         device="cpu", batch_size: int = 1, limit: int | None = None) -> DenseLatents:
    """Reference path: cut out each valid patch and encode it separately (``batch_size`` patches per call).

    Same result as :func:`encode_dense`; used to measure what dense encoding saves. ``limit`` keeps the first
    ``limit`` centres only (benchmarks extrapolate).
    """
    device = device if isinstance(device, torch.device) else resolve_device(device)
    positions = np.argwhere(valid_centres(lung, spec))[:limit]
    hu, sigma = encoder_input(hu, spec)
    volume = normalize_hu(hu, lung, spec)
    model = model.to(device).eval()
    out = []
    with torch.inference_mode(), autocast_for(device):
        for start in range(0, len(positions), batch_size):
            patches = extract_patches(volume, positions[start: start + batch_size], spec)
            out.append(model.encode(torch.from_numpy(patches).to(device)).float().cpu().numpy())
    latents = np.concatenate(out) if out else np.zeros((0, model.latent_dim), np.float32)
    latents = _with_densitometry(latents.astype(np.float32), hu, lung, positions, spec, sigma, grid.scan_z_mm)
    return aggregate_context(DenseLatents(latents=latents, positions=positions.astype(np.int64),
                                          lattice=patch_lattice(grid, spec), lowpass_mm=sigma), spec.context_radius)
