"""``latentharmonize analyze``: one chest CT in; cluster map, composition table and QC report out.

Pipeline: read CT -> lung mask (automatic, or the user's) -> model grid -> dense latents -> biological coordinates ->
cluster labels with confidence -> label map on the CT's own grid (each lung voxel takes the cluster of its nearest
valid patch centre) -> composition -> outputs. The CT is read in a worker thread while the model loads, and the
volumes are compressed in worker threads while the QC pictures are drawn. Every check that can fail on the user's
input (output folder, model bundle, device, CT geometry) runs before the heavy work, and all files are published
atomically at the end, so an error or a Ctrl-C leaves the output folder as it was. See docs/analyze.md for the
outputs and the progress line format.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk

from . import __version__
from .atomic import StagedOutput
from .errors import InputError, NoLungFoundError
from .outputs import output_names
from .progress import Progress
from . import options

if TYPE_CHECKING:
    import pandas as pd

    from .patches import PatchSpec

# PyTorch's OpenMP threads spin while they wait for work. When other programs keep the cores busy (3D Slicer itself,
# another analysis), spinning threads hold each other up: on the shared 2-core CPU the encoding took 1-3.4 s instead
# of 0.5 s. Waiting passively costs little when the machine is idle (0.27 -> 0.29 s there). OpenMP reads this when
# PyTorch loads, which analyze does later; a value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Geometry the model can read (see check_geometry); typical chest CT: 0.6-0.9 mm pixels, 0.6-5 mm slices.
MAX_INPLANE_SPACING_MM = 3.0
MAX_SLICE_SPACING_MM = 6.0
MIN_SPACING_MM = 0.1
MIN_INPLANE_FOV_MM = 120.0
MIN_CRANIOCAUDAL_MM = 20.0
GALLERY_PER_CLUSTER = 8

# Progress: stage -> (start, end) percent of the whole run.
STAGES = {"load": (0, 5), "mask": (5, 20), "grid": (20, 23), "structures": (23, 25), "encode": (25, 70), "cluster": (70, 82),
          "composition": (82, 85), "write": (85, 92), "qc": (92, 98), "report": (98, 100)}
# Timed laps of analysis.json (wall time of the main thread), in run order. The scan is read while the model loads
# ("load" is what is left of it), and the volumes are written while the QC pictures are drawn ("write" is the rest).
LAPS = ("model", "load", "mask", "grid", "structures", "encode", "cluster", "composition", "qc_report", "write")


@dataclass
class AnalysisResult:
    """What one analysis produced: output files by kind, the composition table and the run record."""

    out_dir: Path
    files: dict
    composition: pd.DataFrame
    record: dict = field(default_factory=dict)


def input_name(ct_path) -> str:
    """Output name stem of an input: file name without image extensions, or the DICOM folder's name."""
    path = Path(ct_path)
    name = path.name
    for ext in (".nii.gz", ".seg.nrrd", ".nrrd", ".nii", ".mha", ".mhd", ".dcm"):
        if name.lower().endswith(ext):
            return name[: -len(ext)] or "scan"
    return name or "scan"


def _scaled(progress, stage: str):
    """A progress callback for one stage that maps its 0..100 onto the stage's share of the run."""
    lo, hi = STAGES[stage]

    def report(percent: float, _stage: str = stage, message: str = "") -> None:
        if progress is not None:
            progress(lo + (hi - lo) * min(max(percent, 0.0), 100.0) / 100.0, stage, message)
    return report


def check_geometry(ct: sitk.Image) -> None:
    """Refuse a CT whose voxel spacing or field of view is far from what the model reads (clear InputError)."""
    direction = np.abs(np.asarray(ct.GetDirection(), dtype=float).reshape(3, 3))
    spacing = np.asarray(ct.GetSpacing(), dtype=float)
    extent = spacing * np.asarray(ct.GetSize(), dtype=float)
    axial = int(np.argmax(direction[2]))  # image axis closest to the patient's cranio-caudal axis
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
    import torch

    saved = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def nearest_valid_index(valid: np.ndarray, sampling) -> tuple:
    """For every lattice point, the index of its nearest valid point (physical distance, ``sampling`` mm):
    ``values[nearest_valid_index(valid, s)]`` fills the whole lattice with nearest-valid values."""
    from scipy import ndimage

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
    from .grid import box_resampler, lattice_to_image, lung_voxels, mask_box

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


def _load_lungs(ct: sitk.Image, mask, progress) -> tuple:
    """(lung mask, its source, its assessment); an impossible mask is refused here."""
    from .io import read_mask
    from .lungmask import assess_mask, segment_lungs_detailed

    if mask is not None:
        progress(0, message=f"reading lung mask {mask}")
        lungs = read_mask(mask, ct)
        return lungs, str(mask), assess_mask(lungs, ct)
    progress(0, message="segmenting the lungs")
    found = segment_lungs_detailed(ct)
    return found.lungs, "automatic", assess_mask(found.lungs, ct, found.excluded_air_ml)


def patch_distances(dense, bundle) -> np.ndarray:
    """Distance of every patch to each cluster centroid, float32 [n, K]: what the patch labels and the voxel-level
    map are both read from, so analyze and ``latentharmonize report`` label each patch alike."""
    return bundle.clusters.transform(bundle.rotation.cluster_features(dense.latents)).astype(np.float32)


def patch_clusters(dense, bundle) -> tuple:
    """Cluster label (UInt8) and confidence (Float32) of every patch."""
    from .clusters import nearest_with_confidence

    return nearest_with_confidence(patch_distances(dense, bundle))


def _cluster_maps(dense, bundle, ct, lungs, grid, structures) -> tuple:
    """Cluster label and confidence per patch, then both maps on the CT grid at voxel level.

    Each patch's distances to the K centroids are filled over the patch lattice (nearest valid centre), linearly
    interpolated onto the model grid (1.25 mm in-plane instead of the 5 mm lattice), and each voxel takes its
    nearest centroid with the margin confidence, as a patch does; a patch centre keeps its own label. On the CT
    grid, the vessels and airways found at the CT's resolution (``structures.refine_on_ct``) replace the tissue
    label (confidence 1: a rule, not a cluster assignment).
    """
    from .clusters import nearest_with_confidence
    from .structures import refine_on_ct

    distances = patch_distances(dense, bundle)
    labels_n, conf_n = nearest_with_confidence(distances)
    lattice = dense.lattice
    valid = np.zeros(lattice.shape, dtype=bool)
    field = np.zeros(tuple(lattice.shape) + (distances.shape[1],), dtype=np.float32)
    pos = tuple(dense.positions.T)
    valid[pos], field[pos] = True, distances
    field = field[nearest_valid_index(valid, tuple(lattice.spacing[::-1]))]
    image = sitk.GetImageFromArray(field, isVector=True)
    image.SetOrigin(tuple(float(v) for v in lattice.origin))
    image.SetSpacing(tuple(float(v) for v in lattice.spacing))
    resample = sitk.ResampleImageFilter()
    resample.SetReferenceImage(grid.reference_image())
    resample.SetInterpolator(sitk.sitkLinear)
    resample.SetUseNearestNeighborExtrapolator(True)  # the model grid's margin beyond the outermost centres
    fine_image = resample.Execute(image)  # held: the array below is a view of its buffer
    fine = sitk.GetArrayViewFromImage(fine_image).reshape(-1, distances.shape[1])
    lookup = ct_lookup(grid, ct, lungs)
    # the nearest centroid once per model-grid voxel that some lung voxel of the CT reads (fewer than those voxels)
    needed = np.zeros(len(fine), dtype=bool)
    needed[lookup.index] = True
    rows = np.flatnonzero(needed)
    where = np.zeros(len(fine), dtype=np.int64)
    where[rows] = np.arange(len(rows))
    lab_rows, conf_rows = nearest_with_confidence(fine[rows])
    labels, confidence = lab_rows[where[lookup.index]], conf_rows[where[lookup.index]]
    found = refine_on_ct(structures, lookup.index, sitk.GetArrayViewFromImage(ct).ravel()[lookup.voxels])
    anatomy = found > 0
    labels[anatomy], confidence[anatomy] = found[anatomy], 1.0
    return labels_n, conf_n, lookup.scatter(labels, ct), lookup.scatter(confidence, ct)


def map_legend(bundle) -> tuple:
    """({label: name}, {label: colour}) of the label map: the bundle's clusters, then vessels and airways."""
    from .errors import BundleError
    from .structures import STRUCTURE_COLORS, STRUCTURE_NAMES

    if max(bundle.names) >= min(STRUCTURE_NAMES):
        raise BundleError(f"The bundle has {max(bundle.names)} clusters; the label map keeps labels "
                          f"{sorted(STRUCTURE_NAMES)} for vessels and airways, so at most {min(STRUCTURE_NAMES) - 1} "
                          "clusters fit. Retrain with fewer clusters.")
    return {**bundle.names, **STRUCTURE_NAMES}, {**bundle.colors, **STRUCTURE_COLORS}


def _gallery(hu, dense, labels_n, conf_n, spec) -> dict:
    """Centre slices (lung window) of the most confident patches of each cluster."""
    from .patches import extract_patches
    from .render import select_exemplars, window_to_uint8

    middle = int(spec.slices) // 2
    gallery = {}
    for label, rows in select_exemplars(labels_n, conf_n, GALLERY_PER_CLUSTER).items():
        patches = extract_patches(hu, dense.positions[rows], spec)[:, middle]
        gallery[label] = [window_to_uint8(p) for p in patches]
    return gallery


def _versions() -> dict:
    import torch

    return {"latentharmonize": __version__, "python": platform.python_version(), "numpy": np.__version__,
            "torch": torch.__version__, "SimpleITK": sitk.Version.VersionString()}


class _Timer:
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
class Computed:
    """Everything the pipeline computed for one scan, before anything is written (``report`` rebuilds what the QC
    and report need, without the tables)."""

    ct: sitk.Image
    lungs: sitk.Image
    hu: np.ndarray
    dense: object
    labels_n: np.ndarray
    conf_n: np.ndarray
    labels: sitk.Image
    confidence: sitk.Image
    table: pd.DataFrame | None
    densitometry: pd.DataFrame | None
    composition_json: str
    record: dict


def analyze(ct_path, out_dir, model=None, mask=None, device="auto", overwrite=False, progress=None,
            write_report=True, model_loader=None) -> AnalysisResult:
    """Analyse one chest CT into ``out_dir`` (see docs/analyze.md for the files written).

    ``model``: model bundle folder (default: the bundled model); ``mask``: lung mask file on the CT's grid (default:
    automatic segmentation); ``device``: ``auto``, ``cpu`` or ``cuda``; ``overwrite``: replace earlier results;
    ``progress``: a :class:`~latentharmonize.progress.Progress` (or any ``(percent, stage, message)`` callable);
    ``write_report``: also write the QC pictures, surfaces and ``report.html`` (batch runs may skip them);
    ``model_loader``: a ``(model, device) -> (bundle, device, encoder)`` callable used instead of :func:`load_model`
    (a resident worker passes its cache of the loaded model).
    Files are staged in a hidden folder of ``out_dir`` and published only when the whole run succeeds.
    """
    from .io import image_sha256
    from .writers import write_json

    ct_path = Path(ct_path)
    name = input_name(ct_path)
    files = output_names(name, write_report)
    timer = _Timer()
    created = not Path(out_dir).exists()
    try:
        # Entering the stage first refuses collisions, unwritable folders and outputs that would be an input before
        # any heavy work. Outputs of a run with a report that this run does not write are replaced too (no mix).
        earlier = output_names(name, write_report=True).values()
        with StagedOutput(out_dir, files.values(), overwrite=overwrite, replaces=earlier,
                          inputs=(ct_path, mask)) as staged, _workers() as pool:
            # Worker threads read and hash the scan (C++ and hashlib, outside the GIL) while this thread loads the
            # model, which is mostly importing Python modules (PyTorch, scikit-learn). Model errors still come first.
            _scaled(progress, "load")(0, message=f"reading {ct_path.name}")
            ct_read = pool.submit(_read_scan, ct_path)
            input_hash = pool.submit(image_sha256, ct_path)
            bundle, device, encoder = (model_loader or load_model)(model, device)
            timer.lap("model")
            ct = ct_read.result()
            timer.lap("load")  # what is left of reading the scan once the model is loaded
            done = _compute(ct_path, ct, bundle, device, encoder, mask, progress, timer)
            done.record["input_sha256"] = input_hash.result()
            done.record["outputs"] = files
            writes = _write_outputs(pool, staged, files, done, bundle, progress)
            if write_report:  # the volumes are compressed in the worker threads meanwhile
                write_qc_and_report(staged, files, name, done, bundle, progress)
                timer.lap("qc_report")
            for write in writes:
                write.result()
            timer.lap("write")  # what is left of writing the volumes after the QC
            done.record.update(timer.summary())
            write_json(done.record, staged.path(files["record"]))
    except BaseException:
        if created and Path(out_dir).is_dir() and not any(Path(out_dir).iterdir()):
            Path(out_dir).rmdir()  # a failed run leaves no trace, not even the folder it made
        raise
    if progress is not None:
        progress(100, "done", f"results in {out_dir}")
    return AnalysisResult(Path(out_dir), {k: Path(out_dir) / v for k, v in files.items()}, done.table, done.record)


@contextlib.contextmanager
def _workers():
    """Worker threads for the run. On the way out, queued tasks are dropped and running ones awaited, so nothing
    is still writing into the staging folder when it is removed."""
    pool = ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 1)), thread_name_prefix="latentharmonize")
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _read_scan(ct_path: Path) -> sitk.Image:
    """The CT, read and checked (in a worker thread)."""
    from .io import read_ct

    ct = read_ct(ct_path)
    check_geometry(ct)
    return ct


def load_model(model, device) -> tuple:
    """The model side of a run: the bundle (verified), the device and the encoder on it."""
    from .bundle import load_bundle
    from .patches import resolve_device

    bundle = load_bundle(model)
    device = resolve_device(device)
    return bundle, device, bundle.encoder(device)


def model_grid_hu(ct: sitk.Image, lungs: sitk.Image, spec: PatchSpec) -> tuple:
    """``(hu, lung, grid, calibration)``: the lung box on the model grid of the bundle's ``spec``, HU calibrated
    if the bundle asks (``calibration`` None otherwise)."""
    from .calibration import calibrate_grid_hu
    from .grid import to_model_grid

    hu, lung_grid, grid = to_model_grid(ct, lungs, tuple(spec.spacing), spec.margin_mm,
                                        align_px=(spec.stride, spec.stride, 1))
    # required=False: a scan without usable air/fat references is analysed uncalibrated, with a warning (issue 19)
    hu, calibration = calibrate_grid_hu(hu, ct, lungs, spec, required=False)
    return hu, lung_grid, grid, calibration


def encode_patches(encoder, hu, parenchyma, grid, spec: PatchSpec, device, progress=None):
    """The dense latents of every patch whose centre lies in the parenchyma (deterministic kernels).

    The clusters describe the parenchyma: vessel and airway voxels are left out of ``parenchyma``, so they are filled
    like the outside of the lung (the spec's ``outside_fill_hu``) and do not drive the patches they cross.
    """
    from .patches import encode_dense

    with _deterministic_torch():
        dense = encode_dense(encoder, hu, parenchyma, grid, spec, device, progress=_scaled(progress, "encode"))
    if len(dense.latents) == 0:
        raise NoLungFoundError("The lung mask is too small to hold a single 20 mm patch; check the mask or the scan.")
    return dense


def _compute(ct_path: Path, ct: sitk.Image, bundle, device, encoder, mask, progress, timer: _Timer) -> Computed:
    """The pipeline from the CT to label map and composition (nothing written)."""
    from .composition import composition_table, composition_to_json, lung_cells, lung_volumes_from_table
    from .densitometry import densitometry_table
    from .segments import read_segments
    from .structures import segment_structures

    lungs, mask_source, assessment = _load_lungs(ct, mask, _scaled(progress, "mask"))
    segments = None if mask is None else read_segments(mask, ct)  # lobes: composition per lobe
    timer.lap("mask")

    _scaled(progress, "grid")(0, message="resampling onto the model grid")
    hu, lung_grid, grid, calibration = model_grid_hu(ct, lungs, bundle.spec)
    timer.lap("grid")

    _scaled(progress, "structures")(0, message="vessels and airways")
    structures = segment_structures(hu, lung_grid, grid.spacing)
    timer.lap("structures")

    dense = encode_patches(encoder, hu, lung_grid & (structures == 0), grid, bundle.spec, device, progress)
    timer.lap("encode")

    _scaled(progress, "cluster")(0, message=f"assigning {len(dense.latents)} patches to tissue clusters")
    labels_n, conf_n, labels, confidence = _cluster_maps(dense, bundle, ct, lungs, grid, structures)
    timer.lap("cluster")

    _scaled(progress, "composition")(0, message="tissue composition per lung and zone")
    names, colors = map_legend(bundle)
    cells = lung_cells(lungs)  # the lung voxels' (side, zone) cells, shared by both tables
    table = composition_table(labels, ct, lungs, names, segments, cells=cells)
    densitometry = densitometry_table(ct, lungs, segments, cells=cells)
    volumes = lung_volumes_from_table(table)  # every lung voxel is in the table: same as the mask's volumes
    composition_json = composition_to_json(table, names, colors, bundle.sha256, volumes, densitometry)
    timer.lap("composition")

    record = {  # analyze has no random step; "seed" is the one the model was trained with
        "input": str(ct_path), "model_sha256": bundle.sha256,
        "model_name": bundle.manifest.get("name"), "seed": bundle.manifest.get("training", {}).get("seed"),
        "device": str(device), "mask": mask_source,
        "warnings": assessment.warnings + ([calibration.warning] if getattr(calibration, "warning", None) else []),
        "lung_mask": assessment.as_dict(),
        "hu_calibration": None if calibration is None else calibration.as_dict(),
        "n_patches": int(len(dense.latents)), "lung_volumes_ml": {k: float(v) for k, v in volumes.items()},
        "ct": {"size": list(ct.GetSize()), "spacing": list(ct.GetSpacing())}, "model_grid": grid.to_dict(),
        "versions": _versions(),
    }
    return Computed(ct, lungs, hu, dense, labels_n, conf_n, labels, confidence, table, densitometry,
                     composition_json, record)


def _write_outputs(pool, staged, files, done: Computed, bundle, progress) -> list:
    """Write the tables, and start writing the segmentation and maps in ``pool``; returns those writes' futures."""
    from .structures import STRUCTURE_KINDS
    from .writers import write_composition, write_segmentation, write_table, write_volume

    step = _scaled(progress, "write")
    step(0, message="segmentation and maps")
    lungs = done.lungs if done.lungs.GetPixelID() == sitk.sitkUInt8 else sitk.Cast(done.lungs, sitk.sitkUInt8)
    # Writing is mostly gzip compression in C (zlib, ITK), outside the GIL: the segmentation (pynrrd) and the ITK
    # volumes are written side by side, the largest first. The ITK volumes go one at a time: two ITK NRRD writes
    # failing at once on a full disk crashed the process (SIGSEGV) instead of raising.
    def volumes() -> None:
        for image, kind in ((done.confidence, "confidence"), (done.labels, "labels"), (lungs, "lungs")):
            write_volume(image, staged.path(files[kind]))

    names, colors = map_legend(bundle)
    writes = [pool.submit(write_segmentation, done.labels, staged.path(files["segmentation"]), names, colors,
                          kinds=STRUCTURE_KINDS),
              pool.submit(volumes)]
    step(90, message="composition table")
    write_composition(done.table, staged.path(files["composition_csv"]), staged.path(files["composition_json"]),
                      done.composition_json)
    write_table(done.densitometry, staged.path(files["densitometry_csv"]))
    return writes


def write_qc_and_report(staged, files, name: str, done: Computed, bundle, progress) -> None:
    """Draw the QC pictures and surfaces and build ``report.html`` into ``staged`` (names from ``files``)."""
    from . import render
    from .report import build_report

    qc = _scaled(progress, "qc")
    qc(0, message="QC montage")
    dv = render.display_volumes(done.ct, done.labels, done.confidence, done.lungs)
    names, colors = map_legend(bundle)
    render.render_montage(dv, names, colors, staged.path(files["montage"]))
    qc(30, message="exemplar patches")
    gallery = _gallery(done.hu, done.dense, done.labels_n, done.conf_n, bundle.spec)
    render.render_gallery(gallery, bundle.names, bundle.colors, staged.path(files["gallery"]))
    qc(50, message="3D view of the cluster surfaces")
    surface = render.cluster_surfaces(*render.coarsen_labels(dv.labels, dv.spacing), dv.origin)
    render.write_vtp(surface, staged.path(files["surfaces"]))
    composition = json.loads(done.composition_json)
    largest = max(composition["regions"]["whole"], key=lambda e: e["fraction"])["label"]
    render.render_3d(surface, colors, staged.path(files["view3d"]), translucent_label=largest)

    _scaled(progress, "report")(0, message="report.html")
    record, volumes = done.record, done.record["lung_volumes_ml"]
    details = {"input": Path(record["input"]).name, "model": f"{record['model_name']} ({bundle.sha256[:12]})",
               "lung volume": f"{volumes['total']:.0f} mL (right {volumes['right']:.0f}, left {volumes['left']:.0f})",
               "patches": record["n_patches"]}
    pictures = {"3D view of the clusters (largest cluster translucent)": staged.path(files["view3d"]).read_bytes(),
                "Most confident patches per cluster": staged.path(files["gallery"]).read_bytes()}
    page = build_report(dv, composition, name, details, pictures, record.get("warnings"))  # none before issue 20
    staged.path(files["report"]).write_text(page, encoding="utf-8")


# ----------------------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    parser.add_argument("ct", help="chest CT: .nrrd, .nii(.gz), .mha or a DICOM series folder")
    options.add_out(parser, "output folder (created if missing)")
    options.add_model(parser)
    parser.add_argument("--mask", default=None, help="lung mask on the CT's grid (default: automatic segmentation)")
    options.add_device(parser)
    options.add_overwrite(parser)
    options.add_no_report(parser)
    options.add_output_style(parser)


def _interrupt_on_sigterm() -> None:
    """Treat SIGTERM (a GUI's Cancel, a batch scheduler) like Ctrl-C, so the staging folder is cleaned up."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


def run(args) -> int:
    _interrupt_on_sigterm()
    started = time.perf_counter()
    progress = Progress(machine=args.progress_lines, quiet=args.quiet)
    result = analyze(args.ct, args.out, model=args.model, mask=args.mask, device=args.device,
                     overwrite=args.overwrite, progress=progress, write_report=args.write_report)
    if not args.quiet and not args.progress_lines:
        whole = result.composition[result.composition.region == "whole"]
        for warning in result.record["warnings"]:
            print(f"Warning ({warning['code']}): {warning['message']}")
        print(f"Lung volume {result.record['lung_volumes_ml']['total']:.0f} mL; composition of the whole lung:")
        for row in whole.itertuples():
            print(f"  {row.label:>2} {row.name:<40} {100 * row.fraction:5.1f} %  {row.volume_ml:8.1f} mL")
        opened = "open the .seg.nrrd in 3D Slicer" if not args.write_report else "open report.html in a browser, or the .seg.nrrd in 3D Slicer"
        print(f"Results in {result.out_dir} ({opened}); "
              f"{time.perf_counter() - started:.1f} s.")
    return 0
