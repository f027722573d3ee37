"""The analysis of one chest CT in memory: CT in, tissue map, composition and densitometry out (nothing written).

Pipeline: lung mask (automatic, or the one given) -> model grid -> vessels and airways -> dense latents of the
parenchyma -> cluster labels with confidence per patch -> label map on the CT's own grid at voxel level ->
composition and densitometry. :func:`analyze_image` is the public entry; ``latentharmonize.analyze``
(:mod:`latentharmonize.analyze_command`) reads the files, runs the same steps and writes the outputs (see
docs/analyze.md).
"""
from __future__ import annotations

import contextlib
import functools
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Callable, Optional

import numpy as np
import pandas as pd
import SimpleITK as sitk
import torch
from scipy import ndimage

from . import __version__
from .bundle import ModelBundle, load_bundle
from .clusters import nearest_with_confidence
from .composition import composition_table, composition_to_json, lung_cells, lung_volumes_from_table
from .densitometry import densitometry_table
from .errors import BundleError, InputError, NoLungFoundError
from .grid import axial_axis, box_resampler, lattice_to_image, lung_voxels, mask_box
from .io import as_lung_mask, check_ct
from .lungmask import assess_mask, segment_lungs_detailed
from .patches import (DenseLatents, PatchSpec, aggregate_context, core_statistics, encode_dense, matched_hu,
                      model_grid_hu, noise_warning, resolve_device, threads_beside, valid_centres)
from .segments import label_segments
from .structures import STRUCTURE_COLORS, STRUCTURE_NAMES, parenchyma, refine_on_ct, segment_structures
from .two_stage import reads_core, with_core

# Geometry the model can read (see check_geometry); typical chest CT: 0.6-0.9 mm pixels, 0.6-5 mm slices.
MAX_INPLANE_SPACING_MM = 3.0
MAX_SLICE_SPACING_MM = 6.0
MIN_SPACING_MM = 0.1
MIN_INPLANE_FOV_MM = 120.0
MIN_CRANIOCAUDAL_MM = 20.0

# Progress: stage -> (start, end) percent of the whole run (of ``analyze``, which adds writing and the report).
STAGES = {"load": (0, 5), "mask": (5, 20), "grid": (20, 23), "structures": (23, 25), "encode": (25, 70), "cluster": (70, 82),
          "composition": (82, 85), "write": (85, 92), "qc": (92, 98), "report": (98, 100)}


def stage_progress(progress, stage: str):
    """A progress callback for one stage that maps its 0..100 onto the stage's share of the run."""
    lo, hi = STAGES[stage]

    def report(percent: float, _stage: str = stage, message: str = "") -> None:
        if progress is not None:
            progress(lo + (hi - lo) * min(max(percent, 0.0), 100.0) / 100.0, stage, message)
    return report


def check_geometry(ct: sitk.Image) -> None:
    """Refuse a CT whose voxel spacing or field of view is far from what the model reads (clear InputError)."""
    spacing = np.asarray(ct.GetSpacing(), dtype=float)
    extent = spacing * np.asarray(ct.GetSize(), dtype=float)
    axial = axial_axis(ct)
    inplane = [a for a in range(3) if a != axial]
    shown = "x".join(f"{s:.3g}" for s in spacing)
    if spacing.min() < MIN_SPACING_MM:
        raise InputError(f"Voxel spacing {shown} mm is far finer than any CT's; the header is probably not in "
                         "millimetres. Fix the spacing in the image header.")
    if spacing[inplane].max() > MAX_INPLANE_SPACING_MM:
        raise InputError(f"In-plane pixel spacing {shown} mm is coarser than the {MAX_INPLANE_SPACING_MM:g} mm the "
                         "model can read lung texture at. Use a reconstruction with pixels of about 0.6-1.5 mm.")
    if spacing[axial] > MAX_SLICE_SPACING_MM:
        raise InputError(f"Slice spacing {spacing[axial]:.3g} mm is coarser than {MAX_SLICE_SPACING_MM:g} mm; the "
                         "model needs slices of 5 mm or thinner. Use a thinner reconstruction of the scan.")
    if extent[inplane].min() < MIN_INPLANE_FOV_MM:
        fov = " x ".join(f"{e:.0f}" for e in extent[inplane])
        raise InputError(f"The field of view ({fov} mm) cannot contain a chest (at least {MIN_INPLANE_FOV_MM:g} mm "
                         "is needed; chest CTs are 300-450 mm wide). Give the whole chest CT, not a crop.")
    if extent[axial] < MIN_CRANIOCAUDAL_MM:
        raise InputError(f"The scan covers only {extent[axial]:.0f} mm from head to feet; at least "
                         f"{MIN_CRANIOCAUDAL_MM:g} mm of lung is needed. Give the whole chest series.")


@contextlib.contextmanager
def _deterministic_torch():
    """Deterministic kernels for the duration of the run (restores the caller's settings)."""
    saved = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def nearest_valid_index(valid: np.ndarray, sampling) -> tuple:
    """For every lattice point, the index of its nearest valid point (physical distance, ``sampling`` mm):
    ``values[nearest_valid_index(valid, s)]`` fills the whole lattice with nearest-valid values."""
    if valid.all():
        return tuple(np.indices(valid.shape))
    return tuple(ndimage.distance_transform_edt(~valid, sampling=sampling, return_distances=False,
                                               return_indices=True))


@dataclass
class CtLookup:
    """For every lung voxel of a CT, its flat index in the CT's [z, y, x] array (``voxels``) and the flat index of
    its nearest lattice point (``index``). Built once, it maps any lattice map onto the CT by indexing."""

    shape: tuple
    voxels: np.ndarray
    index: np.ndarray

    def scatter(self, values: np.ndarray, reference: sitk.Image) -> sitk.Image:
        """Image on the CT grid holding ``values`` at lung voxels, 0 elsewhere: a lattice-shaped array (each voxel
        takes its lattice point's value) or one value per lung voxel (in the order of ``voxels``)."""
        full = np.zeros(self.shape, dtype=values.dtype)  # pages outside the lungs are never written
        np.put(full, self.voxels, values if values.ndim == 1 and values.size == self.voxels.size
               else values.ravel()[self.index])
        image = sitk.GetImageFromArray(full)
        image.CopyInformation(reference)
        return image


def ct_lookup(lattice, ct: sitk.Image, lungs: sitk.Image) -> CtLookup:
    """Nearest-neighbour map from the CT's lung voxels to lattice points: one SimpleITK resample of an index image
    over the lungs' bounding box only, so the cost follows the lungs, not the scan."""
    lung = lung_voxels(lungs)
    region = mask_box(lung)
    index = lattice_to_image(np.arange(int(np.prod(lattice.shape)), dtype=np.int32).reshape(lattice.shape), lattice)
    resample = box_resampler(ct, region, sitk.sitkNearestNeighbor)
    resample.SetUseNearestNeighborExtrapolator(True)  # lung voxels beyond the last centre take the nearest one
    crop = resample.Execute(index)
    in_box = np.flatnonzero(lung[region] != 0)
    # flat CT index of a lung voxel = where its row of the box starts in the CT array + its place in that row
    z, y, x = region
    row_start = np.ravel_multi_index(np.ix_(np.arange(z.start, z.stop), np.arange(y.start, y.stop), [x.start]),
                                     lung.shape).ravel()
    row, column = np.divmod(in_box, x.stop - x.start)
    return CtLookup(tuple(lung.shape), row_start[row] + column, sitk.GetArrayViewFromImage(crop).ravel()[in_box])


def patch_dissimilarities(dense, bundle) -> np.ndarray:
    """Dissimilarity of every patch to each cluster (1 - posterior probability), float32 [n, K]: what the patch
    labels and the voxel-level map are both read from, so analyze and ``latentharmonize report`` label each patch
    alike."""
    return bundle.clusters.transform(cluster_inputs(bundle, dense.latents, dense.core)).astype(np.float32)


def cluster_inputs(bundle, latents, core=None) -> np.ndarray:
    """What the bundle's clusters read of patches with these dense ``latents``: the rotation's cluster features,
    and for two-stage clusters each patch's context-averaged core statistics after them (``core``)."""
    features = bundle.rotation.cluster_features(latents)
    if not reads_core(bundle.clusters):
        return features
    if core is None:
        raise InputError("These clusters read each patch's core statistics; encode with encode_patches(..., "
                         "core=True).")
    return with_core(features, core)


def patch_clusters(dense, bundle) -> tuple:
    """Cluster label (UInt8) and confidence (Float32) of every patch."""
    return nearest_with_confidence(patch_dissimilarities(dense, bundle))


def _cluster_values(dense, bundle, ct, grid, structures, lookup) -> tuple:
    """What :func:`_cluster_maps` computes before the maps are scattered onto the CT grid: ``(labels_n, conf_n,
    labels, confidence)``, the last two one value per lung voxel of ``lookup`` (the :func:`ct_lookup` of ``grid``)."""
    dissimilarity = patch_dissimilarities(dense, bundle)
    labels_n, conf_n = nearest_with_confidence(dissimilarity)
    lattice = dense.lattice
    valid = np.zeros(lattice.shape, dtype=bool)
    field = np.zeros(tuple(lattice.shape) + (dissimilarity.shape[1],), dtype=np.float32)
    pos = tuple(dense.positions.T)
    valid[pos], field[pos] = True, dissimilarity
    field = field[nearest_valid_index(valid, tuple(lattice.spacing[::-1]))]
    resample = sitk.ResampleImageFilter()
    resample.SetReferenceImage(grid.reference_image())
    resample.SetInterpolator(sitk.sitkLinear)
    resample.SetUseNearestNeighborExtrapolator(True)  # the model grid's margin beyond the outermost centres
    # the most probable cluster once per model-grid voxel that some lung voxel of the CT reads (fewer than those voxels)
    needed = np.zeros(int(np.prod(grid.shape)), dtype=bool)
    needed[lookup.index] = True
    rows = np.flatnonzero(needed)
    where = np.zeros(len(needed), dtype=np.int64)
    where[rows] = np.arange(len(rows))
    lab_rows, conf_rows = nearest_with_confidence(np.column_stack(
        [_resampled(field[..., k], lattice, resample, rows) for k in range(field.shape[-1])]))
    row_of_voxel = where[lookup.index]
    labels, confidence = lab_rows[row_of_voxel], conf_rows[row_of_voxel]
    found = refine_on_ct(structures, lookup.index, sitk.GetArrayViewFromImage(ct).ravel()[lookup.voxels])
    anatomy = found > 0
    labels[anatomy], confidence[anatomy] = found[anatomy], 1.0
    return labels_n, conf_n, labels, confidence


def _resampled(values: np.ndarray, lattice, resample: sitk.ResampleImageFilter, rows: np.ndarray) -> np.ndarray:
    """``values`` [z, y, x] on ``lattice`` resampled by ``resample``, at the flat indices ``rows`` of its output.
    One cluster's map at a time: ITK interpolates a scalar image faster than a vector image, to the same values."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(values))
    image.SetOrigin(tuple(float(v) for v in lattice.origin))
    image.SetSpacing(tuple(float(v) for v in lattice.spacing))
    resampled = resample.Execute(image)  # held while its buffer is read through the view
    return sitk.GetArrayViewFromImage(resampled).ravel()[rows]


def _cluster_maps(dense, bundle, ct, lungs, grid, structures) -> tuple:
    """Cluster label and confidence per patch, then both maps on the CT grid at voxel level.

    Each patch's cluster probabilities (as dissimilarities, 1 - p) are filled over the patch lattice (nearest valid
    centre), linearly interpolated onto the model grid (1.25 mm in-plane instead of the 5 mm lattice), and each voxel
    takes its most probable cluster with the margin confidence, as a patch does; a patch centre keeps its own label. On the CT
    grid, the vessels and airways found at the CT's resolution (``structures.refine_on_ct``) replace the tissue
    label (confidence 1: a rule, not a cluster assignment).
    """
    lookup = ct_lookup(grid, ct, lungs)
    labels_n, conf_n, labels, confidence = _cluster_values(dense, bundle, ct, grid, structures, lookup)
    return labels_n, conf_n, lookup.scatter(labels, ct), lookup.scatter(confidence, ct)


def map_legend(bundle) -> tuple:
    """({label: name}, {label: colour}) of the label map: the bundle's clusters, then vessels and airways."""
    if max(bundle.names) >= min(STRUCTURE_NAMES):
        raise BundleError(f"The bundle has {max(bundle.names)} clusters; the label map keeps labels "
                          f"{sorted(STRUCTURE_NAMES)} for vessels and airways, so at most {min(STRUCTURE_NAMES) - 1} "
                          "clusters fit. Retrain with fewer clusters.")
    return {**bundle.names, **STRUCTURE_NAMES}, {**bundle.colors, **STRUCTURE_COLORS}


def _versions() -> dict:
    return {"latentharmonize": __version__, "python": platform.python_version(), "numpy": np.__version__,
            "torch": torch.__version__, "SimpleITK": sitk.Version.VersionString()}


class Timer:
    """Wall and CPU time (all threads) per stage. CPU time tells how much work a stage is when the machine is
    shared: on an otherwise idle machine its wall time is about its CPU time divided by the cores it uses."""

    def __init__(self):
        self.wall: dict = {}
        self.cpu: dict = {}
        self._last = (time.perf_counter(), time.process_time())

    def lap(self, stage: str) -> None:
        now = (time.perf_counter(), time.process_time())
        self.wall[stage] = round(now[0] - self._last[0], 3)
        self.cpu[stage] = round(now[1] - self._last[1], 3)
        self._last = now

    @staticmethod
    def _with_total(seconds: dict) -> dict:
        return dict(seconds, total=round(sum(seconds.values()), 3))

    def summary(self) -> dict:
        return {"timings_s": self._with_total(self.wall), "cpu_s": self._with_total(self.cpu)}


@dataclass
class ImageAnalysis:
    """What the analysis of one CT found, in memory (:func:`analyze_image`; ``analyze`` writes it to files).

    The images lie on the CT's own grid. ``composition`` and ``densitometry`` are None only when ``latentharmonize
    report`` rebuilds an analysis from its folder for the QC pictures.
    """

    ct: sitk.Image                  # the CT analysed, HU
    lungs: sitk.Image               # lung mask used (1 right, 2 left)
    labels: sitk.Image              # UInt8: cluster 1..K, 200 vessels, 201 airways, 0 outside the lung
    confidence: sitk.Image          # Float32 in [0, 1] (1 on vessels and airways, 0 outside the lung)
    composition: pd.DataFrame | None  # region, label, name, fraction, volume_ml, mean_hu, sd_hu
    densitometry: pd.DataFrame | None  # region, laa950_pct, haa700_250_pct, mld_hu, perc15_hu, volume_ml
    names: dict                     # {label: name} of the label map (clusters, then vessels and airways)
    colors: dict                    # {label: (r, g, b) floats 0..1}
    record: dict                    # the run record (analysis.json less the input hash, outputs and timings)
    composition_json: str           # the text of composition.json
    hu: np.ndarray                  # model-grid HU of the lung box, what the patches were read from
    patches: DenseLatents           # one latent per patch of the parenchyma (.latents, .positions, .lattice)
    patch_labels: np.ndarray        # UInt8 cluster of each patch
    patch_confidence: np.ndarray    # Float32 confidence of each patch

    @property
    def warnings(self) -> list:
        """The lung mask's plausibility warnings, ``[{"code", "message"}]`` (empty when all is well)."""
        return self.record["warnings"]


def load_model(model=None, device="auto") -> tuple:
    """The model side of a run: the bundle (a :class:`ModelBundle`, or its folder verified and loaded; None: the
    bundled default), the device and the encoder on it."""
    bundle = model if isinstance(model, ModelBundle) else load_bundle(model)
    device = resolve_device(device)
    return bundle, device, bundle.encoder(device)


def encode_patches(encoder, hu, parenchyma, grid, spec: PatchSpec, device, progress=None, core: bool = False):
    """The dense latents of every patch whose centre lies in the parenchyma (deterministic kernels); with ``core``,
    also each patch's context-averaged :func:`patches.core_statistics` (what two-stage clusters read).

    The clusters describe the parenchyma: vessel and airway voxels are left out of ``parenchyma``, so they are filled
    like the outside of the lung (the spec's ``outside_fill_hu``) and do not drive the patches they cross.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="latentharmonize-core") as pool:
        # beside the encoder (numpy releases the GIL); encode_dense gives its patches in np.argwhere order
        statistics = (pool.submit(core_statistics, hu, parenchyma, np.argwhere(valid_centres(parenchyma, spec)), spec)
                      if core else None)
        with _deterministic_torch(), threads_beside(int(core)):
            dense = encode_dense(encoder, hu, parenchyma, grid, spec, device,
                                 progress=stage_progress(progress, "encode"))
        if len(dense.latents) == 0:
            raise NoLungFoundError("The lung mask is too small to hold a single 20 mm patch; check the mask or the "
                                   "scan.")
        if statistics is not None:
            values = replace(dense, latents=statistics.result())
            dense = replace(dense, core=aggregate_context(values, spec.context_radius).latents)
    return dense


def automatic_lungs(ct: sitk.Image, step: Callable) -> tuple:
    """``(lungs, source, assessment, segments)`` of the automatic lung segmentation; an impossible mask is refused."""
    step(0, message="segmenting the lungs")
    found = segment_lungs_detailed(ct)
    return found.lungs, "automatic", assess_mask(found.lungs, ct, found.excluded_air_ml), None


def given_lungs(mask: sitk.Image, ct: sitk.Image, step: Callable) -> tuple:
    """``(lungs, source, assessment, segments)`` of a lung mask image on the CT's grid (as ``--mask`` reads a file:
    labels 1/2 kept as right/left, any other mask split; several labels also give one region per label)."""
    step(0, message="checking the lung mask")
    lungs = as_lung_mask(mask, ct)
    return lungs, "given", assess_mask(lungs, ct), label_segments(mask, ct)


def analyze_image(ct: sitk.Image, bundle=None, lungs: Optional[sitk.Image] = None, *, device="auto",
                  progress=None) -> ImageAnalysis:
    """Analyse one chest CT in memory; nothing is written.

    ``ct``: a SimpleITK image in HU (a numpy array ``[z, y, x]`` becomes one with ``sitk.GetImageFromArray`` and
    ``SetSpacing((x, y, z))``); it is checked as ``analyze`` checks a file. ``bundle``: a :class:`ModelBundle`, a
    bundle folder, or None for the bundled default model. ``lungs``: a lung mask image on the CT's grid, or None for
    the automatic segmentation. ``device``: ``auto``, ``cpu`` or ``cuda``. ``progress``: a ``(percent, stage,
    message)`` callable (stages ``mask`` to ``composition`` of :data:`STAGES`).
    """
    for what, image in (("CT", ct), ("lung mask", lungs)):
        if image is not None and not isinstance(image, sitk.Image):
            raise TypeError(f"analyze_image takes the {what} as a SimpleITK image, not {type(image).__name__}: wrap a "
                            "[z, y, x] array with sitk.GetImageFromArray(array) and give its geometry with "
                            "SetSpacing((x, y, z)) (and SetOrigin, SetDirection), or CopyInformation(ct).")
    model = load_model(bundle, device)
    ct = check_ct(ct)
    check_geometry(ct)
    find_lungs = automatic_lungs if lungs is None else functools.partial(given_lungs, lungs)
    return run_pipeline(ct, model, find_lungs, progress, Timer(), source=None)


def run_pipeline(ct: sitk.Image, model: tuple, find_lungs: Callable, progress, timer: Timer,
                 source: Optional[str]) -> ImageAnalysis:
    """The pipeline from a checked CT to label map and composition (nothing written). ``model``: ``(bundle, device,
    encoder)`` of :func:`load_model`; ``find_lungs(ct, step)``: :func:`automatic_lungs`, :func:`given_lungs` or a
    mask file's reader, giving ``(lungs, source, assessment, segments)`` (segments: lobes, a region each);
    ``source``: the CT's path, recorded as ``input``.

    Steps that need only earlier results run in worker threads beside the main line (SimpleITK, numpy and scipy
    release the GIL): the CT-to-model-grid lookup beside vessels, airways and encoding, the densitometry beside the
    cluster maps, the confidence map beside the composition."""
    bundle, device, encoder = model
    lungs, mask_source, assessment, segments = find_lungs(ct, stage_progress(progress, "mask"))
    timer.lap("mask")

    stage_progress(progress, "grid")(0, message="resampling onto the model grid")
    hu, lung_grid, grid, calibration = model_grid_hu(ct, lungs, bundle.spec)
    timer.lap("grid")
    # GetArrayViewFromImage first makes an image's buffer its own (MakeUnique), which would move it under a view
    # another thread holds: done here, once, before the threads read the CT and the mask
    sitk.GetArrayViewFromImage(ct), sitk.GetArrayViewFromImage(lungs)
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="latentharmonize-pipeline") as pool:
        lookup = pool.submit(ct_lookup, grid, ct, lungs)
        stage_progress(progress, "structures")(0, message="vessels and airways")
        structures = segment_structures(hu, lung_grid, grid.spacing, grid.scan_slices)
        timer.lap("structures")

        dense = encode_patches(encoder, hu, parenchyma(lung_grid, structures), grid, bundle.spec, device, progress,
                               core=reads_core(bundle.clusters))
        timer.lap("encode")

        stage_progress(progress, "cluster")(0, message=f"assigning {len(dense.latents)} patches to tissue clusters")
        lookup = lookup.result()
        tables = pool.submit(_lung_tables, ct, lungs, segments,
                             functools.partial(matched_lung_voxels, hu, lung_grid, grid, bundle.spec, dense.lowpass_mm,
                                               lookup))
        labels_n, conf_n, labels, confidence = _cluster_values(dense, bundle, ct, grid, structures, lookup)
        confidence = pool.submit(lookup.scatter, confidence, ct)
        labels = lookup.scatter(labels, ct)
        timer.lap("cluster")

        stage_progress(progress, "composition")(0, message="tissue composition per lung and zone")
        names, colors = map_legend(bundle)
        cells, densitometry = tables.result()
        table = composition_table(labels, ct, lungs, names, segments, cells=cells)
        volumes = lung_volumes_from_table(table)  # every lung voxel is in the table: same as the mask's volumes
        composition_json = composition_to_json(table, names, colors, bundle.sha256, volumes, densitometry)
        confidence = confidence.result()
        timer.lap("composition")

    warnings = [w for w in (getattr(calibration, "warning", None), noise_warning(hu, bundle.spec, dense.lowpass_mm))
                if w]
    record = _run_record(source, bundle, device, mask_source, assessment, calibration, warnings, dense, volumes, ct,
                         grid)
    return ImageAnalysis(ct=ct, lungs=lungs, labels=labels, confidence=confidence, composition=table,
                         densitometry=densitometry, names=names, colors=colors, record=record,
                         composition_json=composition_json, hu=hu, patches=dense, patch_labels=labels_n,
                         patch_confidence=conf_n)


def _lung_tables(ct: sitk.Image, lungs: sitk.Image, segments, matched: Callable) -> tuple:
    """``(cells, densitometry)``: the lung voxels' (side, zone) cells, shared by the composition and densitometry
    tables, and the densitometry table (neither needs the label map); ``matched()`` gives the noise-matched HU of
    the lung voxels (:func:`matched_lung_voxels`)."""
    cells = lung_cells(lungs)
    return cells, densitometry_table(ct, lungs, segments, cells=cells, matched=matched())


def matched_lung_voxels(hu: np.ndarray, lung: np.ndarray, grid, spec, lowpass_mm: float,
                        lookup: CtLookup) -> np.ndarray:
    """The noise-matched HU (:func:`patches.matched_hu`, at the scan's own low-pass ``lowpass_mm``) of the
    model-grid voxel each lung voxel of the CT reads, in the CT's [z, y, x] order (``lookup.voxels``): what
    ``densitometry.csv``'s matched columns read."""
    return matched_hu(hu, lung, grid, spec, lowpass_mm).ravel()[lookup.index]


def whole_lung_densitometry(ct: sitk.Image, lungs: sitk.Image, hu: np.ndarray, lung: np.ndarray, grid, spec,
                            lowpass_mm: float) -> dict:
    """The whole lung's row of ``densitometry.csv`` (:data:`densitometry.COLUMNS`), raw and noise-matched, of a CT
    whose model-grid HU and lung (:func:`patches.model_grid_hu`) are ``hu`` and ``lung`` on ``grid``, encoded at
    the low-pass ``lowpass_mm``; the evaluation reads a scan's densitometry through it."""
    matched = matched_lung_voxels(hu, lung, grid, spec, lowpass_mm, ct_lookup(grid, ct, lungs))
    return densitometry_table(ct, lungs, matched=matched).set_index("region").loc["whole"].to_dict()


def _run_record(source, bundle, device, mask_source, assessment, calibration, warnings: list, dense: DenseLatents,
                volumes: dict, ct: sitk.Image, grid) -> dict:
    """The run record (analysis.json less the input hash, outputs and timings); ``warnings`` after the mask's."""
    return {  # analyze has no random step; "seed" is the one the model was trained with
        "input": source, "model_sha256": bundle.sha256,
        "model_name": bundle.manifest.get("name"), "seed": bundle.manifest.get("training", {}).get("seed"),
        "device": str(device), "mask": mask_source,
        "warnings": assessment.warnings + warnings,
        "lung_mask": assessment.as_dict(),
        "hu_calibration": None if calibration is None else calibration.as_dict(),
        "encoder_lowpass_mm": float(dense.lowpass_mm),
        "n_patches": int(len(dense.latents)), "lung_volumes_ml": {k: float(v) for k, v in volumes.items()},
        "ct": {"size": list(ct.GetSize()), "spacing": list(ct.GetSpacing())}, "model_grid": grid.to_dict(),
        "versions": _versions(),
    }
