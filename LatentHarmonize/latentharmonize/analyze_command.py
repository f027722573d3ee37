"""``latentharmonize analyze``: one chest CT file in; cluster map, composition table and QC report files out.

:func:`analyze` reads the CT (and the lung mask file), runs :func:`latentharmonize.pipeline.run_pipeline` and writes
its outputs. The CT is read in a worker thread while the model and the drawing libraries load, and the volumes are
compressed in worker threads while the QC pictures are drawn. Every check that can fail on the user's input (output
folder, model bundle, device, CT geometry) runs before the heavy work, and all files are published atomically at the
end, so an error or a Ctrl-C leaves the output folder as it was. See docs/analyze.md for the outputs and the progress
line format.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import SimpleITK as sitk

from . import options, render
from .atomic import StagedOutput
from .io import image_sha256, read_ct, read_mask
from .lungmask import assess_mask
from .outputs import output_names
from .patches import extract_patches
from .pipeline import (ImageAnalysis, Timer, automatic_lungs, check_geometry, load_model, run_pipeline,
                       stage_progress)
from .progress import Progress
from .report import build_report
from .segments import read_segments
from .structures import STRUCTURE_KINDS
from .writers import write_composition, write_json, write_segmentation, write_table, write_volume

GALLERY_PER_CLUSTER = 8
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


def mask_file_lungs(path, ct: sitk.Image, step) -> tuple:
    """``(lungs, source, assessment, segments)`` of a lung mask file (``--mask``); an impossible mask is refused."""
    step(0, message=f"reading lung mask {path}")
    lungs = read_mask(path, ct)
    return lungs, str(path), assess_mask(lungs, ct), read_segments(path, ct)


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
    ct_path = Path(ct_path)
    name = input_name(ct_path)
    files = output_names(name, write_report)
    timer = Timer()
    created = not Path(out_dir).exists()
    try:
        # Entering the stage first refuses collisions, unwritable folders and outputs that would be an input before
        # any heavy work. Outputs of a run with a report that this run does not write are replaced too (no mix).
        earlier = output_names(name, write_report=True).values()
        with StagedOutput(out_dir, files.values(), overwrite=overwrite, replaces=earlier,
                          inputs=(ct_path, mask)) as staged, _workers() as pool:
            # Worker threads read and hash the scan (C++ and hashlib, outside the GIL) while this thread loads the
            # model (checks the bundle, reads its weights) and the drawing libraries. Model errors still come first.
            stage_progress(progress, "load")(0, message=f"reading {ct_path.name}")
            ct_read = pool.submit(read_scan, ct_path)
            input_hash = pool.submit(image_sha256, ct_path)
            bundle, device, encoder = (model_loader or load_model)(model, device)
            timer.lap("model")
            if write_report:  # while the threads still read the scan, this one imports what the QC is drawn with
                render.import_drawing_libraries()
            ct = ct_read.result()
            timer.lap("load")  # what is left of reading the scan once the model (and the drawing) is loaded
            find_lungs = automatic_lungs if mask is None else functools.partial(mask_file_lungs, mask)
            done = run_pipeline(ct, (bundle, device, encoder), find_lungs, progress, timer, source=str(ct_path))
            done.record["input_sha256"] = input_hash.result()
            done.record["outputs"] = files
            writes = _write_outputs(pool, staged, files, done, progress)
            if write_report:  # the volumes are compressed in the worker threads meanwhile
                write_qc_and_report(staged, files, name, done, bundle.spec, progress)
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
    return AnalysisResult(Path(out_dir), {k: Path(out_dir) / v for k, v in files.items()}, done.composition,
                          done.record)


@contextlib.contextmanager
def _workers():
    """Worker threads for the run. On the way out, queued tasks are dropped and running ones awaited, so nothing
    is still writing into the staging folder when it is removed."""
    pool = ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 1)), thread_name_prefix="latentharmonize")
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def read_scan(ct_path: Path) -> sitk.Image:
    """The CT, read and checked (in a worker thread)."""
    ct = read_ct(ct_path)
    check_geometry(ct)
    return ct


def _write_outputs(pool, staged, files, done: ImageAnalysis, progress) -> list:
    """Write the tables, and start writing the segmentation and maps in ``pool``; returns those writes' futures."""
    step = stage_progress(progress, "write")
    step(0, message="segmentation and maps")
    lungs = done.lungs if done.lungs.GetPixelID() == sitk.sitkUInt8 else sitk.Cast(done.lungs, sitk.sitkUInt8)
    # Writing is mostly gzip compression in C (zlib, ITK), outside the GIL: the segmentation (pynrrd) and the ITK
    # volumes are written side by side, the largest first. The ITK volumes go one at a time: two ITK NRRD writes
    # failing at once on a full disk crashed the process (SIGSEGV) instead of raising.
    def volumes() -> None:
        for image, kind in ((done.confidence, "confidence"), (done.labels, "labels"), (lungs, "lungs")):
            write_volume(image, staged.path(files[kind]))

    writes = [pool.submit(write_segmentation, done.labels, staged.path(files["segmentation"]), done.names, done.colors,
                          kinds=STRUCTURE_KINDS),
              pool.submit(volumes)]
    step(90, message="composition table")
    write_composition(done.composition, staged.path(files["composition_csv"]), staged.path(files["composition_json"]),
                      done.composition_json)
    write_table(done.densitometry, staged.path(files["densitometry_csv"]))
    return writes


def write_qc_and_report(staged, files, name: str, done: ImageAnalysis, spec, progress) -> None:
    """Draw the QC pictures and surfaces and build ``report.html`` into ``staged`` (names from ``files``)."""
    qc = stage_progress(progress, "qc")
    qc(0, message="QC montage")
    dv = render.display_volumes(done.ct, done.labels, done.confidence, done.lungs)
    # the 2D pictures (matplotlib) are drawn in a worker thread while this one builds and renders the surfaces (VTK)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="latentharmonize-qc") as pool:
        pictures_2d = pool.submit(_draw_2d, staged, files, done, dv, spec)
        qc(50, message="3D view of the cluster surfaces")
        surface = render.cluster_surfaces(*render.coarsen_labels(dv.labels, dv.spacing), dv.origin)
        render.write_vtp(surface, staged.path(files["surfaces"]))
        composition = json.loads(done.composition_json)
        largest = max(composition["regions"]["whole"], key=lambda e: e["fraction"])["label"]
        render.render_3d(surface, done.colors, staged.path(files["view3d"]), translucent_label=largest)
        pictures_2d.result()

    stage_progress(progress, "report")(0, message="report.html")
    record, volumes = done.record, done.record["lung_volumes_ml"]
    details = {"input": Path(record["input"]).name, "model": f"{record['model_name']} ({record['model_sha256'][:12]})",
               "lung volume": f"{volumes['total']:.0f} mL (right {volumes['right']:.0f}, left {volumes['left']:.0f})",
               "patches": record["n_patches"]}
    pictures = {"3D view of the clusters (largest cluster translucent)": staged.path(files["view3d"]).read_bytes(),
                "Most confident patches per cluster": staged.path(files["gallery"]).read_bytes()}
    page = build_report(dv, composition, name, details, pictures, record.get("warnings"))  # none before issue 20
    staged.path(files["report"]).write_text(page, encoding="utf-8")


def _draw_2d(staged, files, done: ImageAnalysis, dv, spec) -> None:
    """The montage and the gallery of exemplar patches (QC pictures drawn with matplotlib)."""
    render.render_montage(dv, done.names, done.colors, staged.path(files["montage"]))
    gallery = _gallery(done.hu, done.patches, done.patch_labels, done.patch_confidence, spec)
    render.render_gallery(gallery, done.names, done.colors, staged.path(files["gallery"]))


def _gallery(hu, dense, labels_n, conf_n, spec) -> dict:
    """Centre slices (lung window) of the most confident patches of each cluster."""
    middle = int(spec.slices) // 2
    gallery = {}
    for label, rows in render.select_exemplars(labels_n, conf_n, GALLERY_PER_CLUSTER).items():
        patches = extract_patches(hu, dense.positions[rows], spec)[:, middle]
        gallery[label] = [render.window_to_uint8(p) for p in patches]
    return gallery


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


def interrupt_on_sigterm() -> None:
    """Treat SIGTERM (a GUI's Cancel, a batch scheduler) like Ctrl-C, so the staging folder is cleaned up."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


def run(args) -> int:
    interrupt_on_sigterm()
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
