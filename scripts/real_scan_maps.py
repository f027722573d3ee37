#!/usr/bin/env python3
"""Draw the label map of real chest CTs and tabulate each segment's share of the lung (issue 19).

    PYTHONPATH=LatentHarmonize .venv/bin/python scripts/real_scan_maps.py --out docs/real-scans \\
        DATA/tests/assets/LIDC-IDRI-0001 DATA/tests/assets/LIDC-IDRI-0002 DATA/tests/assets/LIDC-IDRI-0003

(``DATA``: a checkout of drivendataorg/concept-to-clinic at its initial commit 17f399f3, see docs/real-scans.md.)
Each input is a CT file or a DICOM series folder, as ``latentharmonize analyze`` takes it, or a folder with exactly
one DICOM series somewhere below it (an LIDC-IDRI case folder); the scan is named after the path given. For each scan
the product's analysis runs in memory (``latentharmonize.analyze_image``, default bundle unless ``--model``) and
``OUT/<scan>.png`` is drawn from analyze's own montage tiles (``render.montage_tiles``: six axial and three coronal
slices in the lung window, the label map overlaid in the bundle's colours, vessels and airways as their own
segments, on the report's display grid of at most 160 voxels per axis, about 2 mm) plus one axial slice at the CT's
own resolution (the one with the most vessel voxels), laid out and saved as the QC montage is; the legend gives each
segment's share of the lung. ``OUT/table.md`` (also printed) holds per scan the slice thickness, the HU calibration
status, each segment's share of the lung, the vessel and airway volumes, and the lung's share below -950 HU and
between -700 and -250 HU and its 15th percentile, with the noise-matched share below -950 HU and 15th percentile
(``analyze``'s densitometry, to read the clusters against). Nothing else is written: the
scans stay where they are. Rerun the same command after retraining the bundle to redraw pictures and table; the same
inputs and bundle give the same bytes.

This script only orchestrates tested library functions (reading, analysis, the montage's tiles, layout and
saving), so it has no test of its own.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

import latentharmonize as lh
from latentharmonize import render
from latentharmonize.analyze_command import input_name
from latentharmonize.structures import AIRWAY_LABEL, VESSEL_LABEL

SLICE_THICKNESS_TAG = "0018|0050"
STRUCTURE_LABELS = (VESSEL_LABEL, AIRWAY_LABEL)
PALETTE_COLOURS = 256  # of the written PNG (fewer mix up the overlay colours)
DENSITOMETRY_COLUMNS = {"laa950_pct": "below −950 HU (% of lung)",
                        "haa700_250_pct": "−700 to −250 HU (% of lung)",
                        "laa950_matched_pct": "below −950 HU, noise-matched (% of lung)",
                        "perc15_hu": "15th percentile (HU)", "perc15_matched_hu": "15th percentile, noise-matched (HU)"}
LEGEND_WIDTH_PX = 760  # the figure is padded to this width, so the four legend columns fit


def series_folder(path: Path) -> Path:
    """The input itself, or the single folder below it that holds DICOM files (an LIDC-IDRI case folder)."""
    if not path.is_dir() or any(path.glob("*.dcm")):
        return path
    found = sorted({f.parent for f in path.rglob("*.dcm")})
    if len(found) != 1:
        raise SystemExit(f"{path}: expected one DICOM series folder below it, found {len(found)}")
    return found[0]


def slice_thickness_mm(source: Path, ct: sitk.Image) -> float:
    """The DICOM SliceThickness of the series' first file, else the slice spacing of the image."""
    first = next(iter(sorted(source.glob("*.dcm"))), None) if source.is_dir() else None
    if first is not None:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(first))
        reader.ReadImageInformation()
        if reader.HasMetaDataKey(SLICE_THICKNESS_TAG):
            return float(reader.GetMetaData(SLICE_THICKNESS_TAG))
    return float(ct.GetSpacing()[2])


def calibration_status(record: dict) -> str:
    """One phrase for the run record's ``hu_calibration``."""
    calibration = record["hu_calibration"]
    if calibration is None:
        return "not used by the bundle"
    if calibration["applied"]:
        return f"applied (air {calibration['air_hu']:.0f} HU, fat {calibration['fat_hu']:.0f} HU)"
    return f"unavailable ({calibration['reason']})"


def whole_lung_rows(analysis) -> list:
    """``(label, name, share %, volume mL)`` of every segment in the whole lung, in label order."""
    table = analysis.composition
    whole = table[table.region == "whole"].sort_values("label")
    return [(int(r.label), r.name, 100.0 * r.fraction, r.volume_ml) for r in whole.itertuples()]


def detail_slice(analysis) -> tuple:
    """(title, RGB tile): the axial slice of the CT with the most vessel voxels, at the CT's own resolution,
    cropped to the lungs, with the label map overlaid (the montage's 1.5 mm voxels lose the small vessels)."""
    labels = sitk.GetArrayViewFromImage(analysis.labels)
    z = int(np.argmax((labels == VESSEL_LABEL).sum(axis=(1, 2))))
    ys, xs = np.nonzero(labels[z])
    box = (slice(max(ys.min() - 4, 0), ys.max() + 5), slice(max(xs.min() - 4, 0), xs.max() + 5))
    gray = render.window_to_uint8(sitk.GetArrayViewFromImage(analysis.ct)[z][box])
    height = analysis.ct.TransformIndexToPhysicalPoint((0, 0, z))[2]
    tile = render.overlay(gray, np.ascontiguousarray(labels[z][box]), render.color_lut(analysis.colors))
    return f"axial z {height:.0f} mm, CT resolution", tile


def shrink_png(path: Path) -> None:
    """Rewrite the PNG with a palette (deterministic; about half the bytes of the RGBA file)."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for key, value in render.PNG_METADATA.items():
        info.add_text(key, value)
    with Image.open(path) as image:
        small = image.convert("RGB").quantize(PALETTE_COLOURS, method=Image.Quantize.MEDIANCUT,
                                              dither=Image.Dither.NONE)
    small.save(path, optimize=True, pnginfo=info)


def draw_map(analysis, rows: list, path: Path) -> None:
    """analyze's montage of the label map (about 2 mm display voxels) plus a slice at the CT's resolution, the legend
    giving each segment's share of the lung."""
    shares = {label: share for label, _, share, _ in rows}
    volumes = render.display_volumes(analysis.ct, analysis.labels, analysis.confidence, analysis.lungs)
    tiles = render.montage_tiles(volumes, render.color_lut(analysis.colors)) + [detail_slice(analysis)]
    image, corners = render._mosaic([tile for _, tile in tiles], columns=4)
    image = np.pad(image, ((0, 0), (0, max(0, LEGEND_WIDTH_PX - image.shape[1])), (0, 0)))
    legend = [(f"{name} {shares.get(k, 0.0):.1f} %", analysis.colors[k]) for k, name in sorted(analysis.names.items())]
    render._save_figure(image, path, list(zip(corners, [title for title, _ in tiles])), legend)
    shrink_png(path)


def table_row(name: str, thickness: float, analysis, rows: list, labels: list) -> str:
    """One Markdown row: scan, thickness, calibration, shares of ``labels``, vessel and airway mL, and the whole
    lung's densitometry (as ``analyze`` writes it, raw and noise-matched), to read the clusters against."""
    shares = {label: share for label, _, share, _ in rows}
    volumes = {label: volume for label, _, _, volume in rows}
    densitometry = analysis.densitometry.set_index("region").loc["whole"]
    cells = [name, f"{thickness:g}", calibration_status(analysis.record)]
    cells += [f"{shares.get(k, 0.0):.1f}" for k in labels]
    cells += [f"{volumes.get(k, 0.0):.1f}" for k in STRUCTURE_LABELS]
    cells += [f"{densitometry[column]:.1f}" for column in DENSITOMETRY_COLUMNS]
    return "| " + " | ".join(cells) + " |"


def table_header(names: dict) -> list:
    """The Markdown header lines: one share column per segment of the label map, then the structure volumes."""
    columns = ["scan", "slice thickness (mm)", "HU calibration"]
    columns += [f"{names[k]} (% of lung)" for k in sorted(names)]
    columns += ["vessels (mL)", "airways (mL)"]
    columns += list(DENSITOMETRY_COLUMNS.values())
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def map_scan(path: Path, bundle, out: Path) -> tuple:
    """Analyse one scan, draw ``OUT/<name>.png``; returns ``(name, thickness, analysis, rows)``."""
    name = input_name(path)
    source = series_folder(path)
    ct = lh.read_ct(source)
    analysis = lh.analyze_image(ct, bundle, device="cpu")
    rows = whole_lung_rows(analysis)
    draw_map(analysis, rows, out / f"{name}.png")
    return name, slice_thickness_mm(source, ct), analysis, rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scans", nargs="+", type=Path, help="CT files, DICOM series folders or case folders")
    parser.add_argument("--out", required=True, type=Path, help="folder for the PNGs and table.md")
    parser.add_argument("--model", default=None, help="model bundle folder (default: the bundled model)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    bundle = lh.load_bundle(args.model)
    mapped = [map_scan(path, bundle, args.out) for path in args.scans]
    names = mapped[0][2].names
    lines = table_header(names) + [table_row(n, t, a, r, sorted(names)) for n, t, a, r in mapped]
    text = "\n".join(lines) + "\n"
    (args.out / "table.md").write_text(text, encoding="utf-8")
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
