"""``latentharmonize report``: build ``report.html`` and the QC pictures of an analysis made with ``--no-report``.

The folder holds the label, confidence and lung maps, the composition and ``analysis.json``, but not the CT, whose
slices the report shows, nor the patches the gallery shows. So the command needs the CT (``--ct``, default: the path
recorded in ``analysis.json``), checked against the recorded SHA-256, and the model bundle (checked against the
recorded model SHA-256): it encodes the lung again to find each cluster's most confident patches. Then it draws
exactly what ``analyze`` draws, with analyze's own code, and publishes the five files atomically.
"""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import SimpleITK as sitk

from . import options, render
from .analyze_command import input_name, interrupt_on_sigterm, read_scan, write_qc_and_report
from .atomic import StagedOutput
from .errors import BundleError, InputError
from .io import image_sha256, same_geometry
from .outputs import output_names
from .patches import model_grid_hu
from .pipeline import (ImageAnalysis, encode_patches, load_model, map_legend, patch_clusters,
                       stage_progress)
from .progress import Progress
from .structures import parenchyma, segment_structures
from .two_stage import reads_core

REPORT_KINDS = ("montage", "gallery", "view3d", "surfaces", "report")
_MAPS = ("labels", "confidence", "lungs")


def _read_record(folder: Path) -> dict:
    """The run record of an analysis folder, checked for what the report needs."""
    path = folder / "analysis.json"
    if not path.is_file():
        raise InputError(f"{folder} holds no analysis.json; give the folder that `latentharmonize analyze` wrote.")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise InputError(f"{path} is not valid JSON ({exc}); the analysis folder is damaged, analyze again.") from exc
    missing = [k for k in ("input", "input_sha256", "model_sha256", "n_patches") if k not in record]
    if missing:
        raise InputError(f"{path} lacks {', '.join(missing)}; analyze the scan again.")
    return record


def build_report(folder, ct=None, model=None, device="auto", overwrite=False, progress=None) -> Path:
    """Write the QC pictures, surfaces and ``report.html`` of the analysis in ``folder``; returns the report's path.

    ``ct``: the analysed CT (default: the input path recorded in ``analysis.json``); ``model``: the bundle folder
    used (default: the bundled model). Both must be those of the analysis (SHA-256 checked). Existing report files
    are refused unless ``overwrite``.
    """
    folder = Path(folder)
    record = _read_record(folder)
    name = input_name(record["input"])
    files = output_names(name, write_report=True)
    missing = [files[k] for k in (*_MAPS, "composition_json") if not (folder / files[k]).is_file()]
    if missing:
        raise InputError(f"{folder} lacks {', '.join(missing)}; the report is built from a complete analysis folder.")
    ct_path = Path(ct) if ct is not None else Path(record["input"])
    if not ct_path.exists():
        raise InputError(f"The analysed CT is not at {ct_path}; give it with --ct PATH.")
    stage_progress(progress, "load")(0, message=f"checking {ct_path.name}")
    # Worker threads hash and read the CT and read the maps (C++ and hashlib, outside the GIL) while this thread
    # loads the model and imports the drawing libraries. The CT is checked before anything is staged.
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="latentharmonize-report") as pool:
        input_hash = pool.submit(image_sha256, ct_path)
        scan = pool.submit(read_scan, ct_path)
        if input_hash.result() != record["input_sha256"]:
            raise InputError(f"{ct_path} is not the CT this folder was analysed from (its SHA-256 differs from "
                             "analysis.json's input_sha256); give that CT with --ct PATH.")
        stored = pool.submit(_read_maps, folder, files)
        # Refuses existing report files (unless overwrite) before the heavy work
        with StagedOutput(folder, [files[k] for k in REPORT_KINDS], overwrite=overwrite) as staged:
            loaded = load_model(model, device)
            if loaded[0].sha256 != record["model_sha256"]:
                raise BundleError(f"The model bundle {model or '(bundled default)'} is not the one this folder was "
                                  f"analysed with (model SHA-256 {record['model_sha256'][:12]}...); give that bundle "
                                  "with --model.")
            render.import_drawing_libraries()
            image = scan.result()
            maps = _on_the_ct_grid(stored.result(), image, files)
            _draw(staged, files, name, record, folder, image, maps, loaded, progress)
    if progress is not None:
        progress(100, "done", f"report in {folder / files['report']}")
    return folder / files["report"]


def _read_maps(folder: Path, files: dict) -> dict:
    """The label, confidence and lung maps of the analysis in ``folder``."""
    return {kind: sitk.ReadImage(str(folder / files[kind])) for kind in _MAPS}


def _on_the_ct_grid(maps: dict, image: sitk.Image, files: dict) -> dict:
    """The analysis' maps, refused unless they lie on the CT's grid, given exactly the geometry analyze drew with."""
    for kind, volume in maps.items():
        if not same_geometry(volume, image):
            raise InputError(f"{files[kind]} does not lie on the CT's grid; the folder is not this CT's analysis.")
        volume.CopyInformation(image)
    return maps


def _draw(staged, files, name, record, folder, image, maps, model, progress) -> None:
    """Encode the lung again for the gallery's patches and draw what ``analyze`` draws into ``staged``; ``model``:
    ``(bundle, device, encoder)`` of :func:`load_model`."""
    bundle, device, encoder = model
    hu, lung_grid, grid, _ = model_grid_hu(image, maps["lungs"], bundle.spec)
    structures = segment_structures(hu, lung_grid, grid.spacing, grid.scan_slices)
    dense = encode_patches(encoder, hu, parenchyma(lung_grid, structures), grid, bundle.spec, device, progress,
                           core=reads_core(bundle.clusters))
    if len(dense.latents) != record["n_patches"]:
        raise InputError(f"The lung mask in {folder} gives {len(dense.latents)} patches, not the "
                         f"{record['n_patches']} the analysis recorded; analyze again.")
    labels_n, conf_n = patch_clusters(dense, bundle)
    composition_json = (folder / files["composition_json"]).read_text(encoding="utf-8")
    names, colors = map_legend(bundle)
    done = ImageAnalysis(ct=image, lungs=maps["lungs"], labels=maps["labels"], confidence=maps["confidence"],
                         composition=None, densitometry=None, names=names, colors=colors, record=record,
                         composition_json=composition_json, hu=hu, patches=dense, patch_labels=labels_n,
                         patch_confidence=conf_n)
    write_qc_and_report(staged, files, name, done, bundle.spec, progress)


# ----------------------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    parser.add_argument("folder", help="analysis folder written by `latentharmonize analyze` (e.g. with --no-report)")
    parser.add_argument("--ct", default=None,
                        help="the analysed CT (default: the input path recorded in analysis.json; SHA-256 checked)")
    options.add_model(parser, "model bundle folder of the analysis (default: the bundled model)")
    options.add_device(parser)
    options.add_overwrite(parser, "a report already in the folder")
    options.add_output_style(parser, quiet_help="print nothing but errors and the report's path")  # run() prints it


def run(args) -> int:
    interrupt_on_sigterm()
    started = time.perf_counter()
    progress = Progress(machine=args.progress_lines, quiet=args.quiet)
    path = build_report(args.folder, ct=args.ct, model=args.model, device=args.device, overwrite=args.overwrite,
                        progress=progress)
    print(path)
    if not args.quiet and not args.progress_lines:
        print(f"Report and QC pictures written in {time.perf_counter() - started:.1f} s.")
    return 0
