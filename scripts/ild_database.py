#!/usr/bin/env python3
"""The label map on real interstitial lung disease: the HUG ILD database (issue 19).

    PYTHONPATH=LatentHarmonize .venv/bin/python scripts/ild_database.py ILD_DB_txtROIs [--out TABLE.md]

``ILD_DB_txtROIs``: the folder of the multimedia database of interstitial lung diseases of the University Hospitals
of Geneva (Depeursinge et al., Comput Med Imaging Graph 2012; given on request by its authors, and committed in
MK25BM/ILD-Segmentation-And-Classification-DL at becfb69d, folder ``ILD_DB``): one folder per case with HRCT slices
(``CT-*.dcm``, 1 mm slices 10 mm apart) and a ``.txt`` of the regions radiologists outlined on them (``label``,
``slice_number``: the DICOM InstanceNumber, and the contour's points in mm). The data may not be redistributed: the
script reads it where it lies and writes at most the table.

That public copy is damaged: each slice's pixel data stops after the first 254 (in two cases 169) of its 512 rows,
the front of the chest in a supine scan and the back in a prone one. The script reads the rows a file holds and,
where it holds fewer than the image's, fills the rest with those rows mirrored, so that ``analyze`` meets a body
with two lungs; only regions lying wholly in the rows read are counted. As for the emphysema database
(``scripts/emphysema_database.py``), each slice is analysed as a stack of ``--stack`` copies of itself
(``latentharmonize.analyze_image``, default bundle unless ``--model``) and the middle copy's label map is read. A
slice whose lung the automatic mask cannot find (under 100 mL in the stack), or that the analysis refuses (rows read
that hold no soft tissue), is reported and skipped.

Printed (and written to ``--out``): per label, the slices and cases it was read on, the mean HU of its region, how
far the median of its lung lies above its slice's lung median (in the rows read), its share inside the lung mask,
each segment's share of the region's lung, and on how many slices most of the region lies outside normal-appearing
and lower-attenuation lung and the vessels. This script only orchestrates tested library
functions and the data's reading, so it has no test of its own.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from matplotlib.path import Path as Polygon

import latentharmonize as lh
from latentharmonize.errors import InputError, NoLungFoundError
from emphysema_database import above_lung, as_volume, report, slice_database_parser

NOT_ABNORMAL = ("normal-appearing lung", "lower-attenuation lung", "vessels", "airways")
MIN_PIXELS = 20  # a region with fewer lung pixels in the rows read is not counted


def read_contours(path: Path) -> list:
    """``(label, slice number, points [n, 2] in pixels (x, y))`` of every contour in a case's ``.txt``."""
    spacing, label, slice_number, contours = None, None, None, []
    for line in path.read_text(encoding="latin-1").splitlines():
        key, _, value = line.strip().partition(":")
        if key == "SpacingX":
            spacing = float(value)
        elif key == "label":
            label = value.strip()
        elif key == "slice_number":
            slice_number = int(value)
        elif key.startswith("nb_point"):
            contours.append((label, slice_number, []))
        elif contours and re.fullmatch(r"[-\d.eE+]+\s+[-\d.eE+]+", line.strip()):
            contours[-1][2].append([float(v) / spacing for v in line.split()])
    return [(label, number, np.array(points)) for label, number, points in contours if len(points) > 2]


def read_slice(path: Path) -> tuple:
    """``(HU [512 rows, columns], rows read, pixel mm, kernel)`` of one slice; a file whose pixel data stops early
    gives its complete rows, mirrored below them to the image's height."""
    dataset = pydicom.dcmread(str(path), force=True)
    columns, rows = int(dataset.Columns), int(dataset.Rows)
    data = np.frombuffer(dataset.PixelData[: len(dataset.PixelData) // (2 * columns) * 2 * columns],
                         np.dtype("<i2" if int(getattr(dataset, "PixelRepresentation", 0)) else "<u2"))
    read = data.reshape(-1, columns)[:rows].astype(np.float32)
    hu = read * float(getattr(dataset, "RescaleSlope", 1.0)) + float(getattr(dataset, "RescaleIntercept", 0.0))
    full = hu
    while len(full) < rows:
        full = np.concatenate([full, hu[::-1]])
    return full[:rows], len(hu), float(dataset.PixelSpacing[0]), str(getattr(dataset, "ConvolutionKernel", "?"))


def region_rows(case: str, hu: np.ndarray, rows_read: int, labels: np.ndarray, lung: np.ndarray, names: dict,
                contours: list, kernel: str) -> list:
    """One row per label outlined on the slice: the union of its contours lying wholly in the rows read."""
    ys, xs = np.mgrid[: hu.shape[0], : hu.shape[1]]
    points = np.column_stack([xs.ravel(), ys.ravel()])
    out = []
    for label in sorted({c[0] for c in contours}):
        region = np.zeros(hu.shape, bool)
        for _, _, polygon in (c for c in contours if c[0] == label and c[2][:, 1].max() < rows_read - 1):
            region |= Polygon(polygon).contains_points(points).reshape(hu.shape)
        inside = region & lung
        if np.count_nonzero(inside) < MIN_PIXELS:
            continue
        shares = {name: 100.0 * np.count_nonzero(labels[inside] == value) / np.count_nonzero(inside)
                  for value, name in sorted(names.items())}
        out.append({"label": label, "case": case, "kernel": kernel, "mean_hu": float(hu[region].mean()),
                    "above_lung_hu": above_lung(hu[inside], hu[:rows_read][lung[:rows_read]]),
                    "in_mask_pct": 100.0 * np.count_nonzero(inside) / np.count_nonzero(region), "shares": shares,
                    "abnormal_pct": 100.0 - sum(shares.get(name, 0.0) for name in NOT_ABNORMAL)})
    return out


def analyse_case(folder: Path, args) -> list:
    """The region rows of every outlined slice of one case."""
    text = next(folder.glob("*.txt"), None)
    if text is None:
        return []
    contours = read_contours(text)
    files = {int(pydicom.dcmread(str(p), stop_before_pixels=True, force=True).InstanceNumber): p
             for p in sorted(folder.glob("*.dcm")) if p.stat().st_size}
    rows = []
    for number in sorted({c[1] for c in contours} & set(files)):
        hu, rows_read, pixel_mm, kernel = read_slice(files[number])
        try:
            analysis = lh.analyze_image(as_volume(hu.astype(np.int16), args.stack, pixel_mm, 1.0), args.model)
        except NoLungFoundError:
            print(f"{folder.name}/{files[number].name}: no lung found in the stack, skipped", file=sys.stderr)
            continue
        except InputError as refused:  # a damaged slice the analysis refuses, e.g. rows read holding no soft tissue
            print(f"{folder.name}/{files[number].name}: refused ({refused}), skipped", file=sys.stderr)
            continue
        middle = args.stack // 2
        labels = sitk.GetArrayFromImage(analysis.labels)[middle]
        lung = sitk.GetArrayFromImage(analysis.lungs)[middle] > 0
        rows += region_rows(folder.name, hu, rows_read, labels, lung, analysis.names,
                            [c for c in contours if c[1] == number], kernel)
    return rows


def label_table(rows: list) -> list:
    """Markdown lines: per label, its slices and cases, mean HU, share inside the mask, each segment's mean share of
    the region's lung, and the slices where most of the region lies outside normal lung."""
    segments = list(rows[0]["shares"])
    header = ["label", "slices", "cases", "mean HU", "median above the slice's lung (HU)", "inside the lung mask (%)"]
    header += [f"{s} (%)" for s in segments]
    lines = ["| " + " | ".join(header + ["slices mostly outside normal"]) + " |", "|" + "---|" * (len(header) + 1)]
    for label in sorted({r["label"] for r in rows}):
        group = [r for r in rows if r["label"] == label]
        cells = [label, str(len(group)), str(len({r["case"] for r in group})),
                 f"{np.mean([r['mean_hu'] for r in group]):.0f}", f"{np.mean([r['above_lung_hu'] for r in group]):.0f}",
                 f"{np.mean([r['in_mask_pct'] for r in group]):.0f}"]
        cells += [f"{np.mean([r['shares'][s] for r in group]):.1f}" for s in segments]
        cells.append(str(sum(r["abnormal_pct"] > 50 for r in group)))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> int:
    args = slice_database_parser(__doc__, "the database's ILD_DB_txtROIs folder").parse_args(argv)
    rows = []
    for case in sorted((p for p in args.folder.iterdir() if p.is_dir()), key=lambda p: p.name):
        rows += analyse_case(case, args)
        print(f"case {case.name}: {len(rows)} regions so far", file=sys.stderr, flush=True)
    if not rows:
        raise SystemExit(f"{args.folder}: no outlined region with lung in it was found")
    report(label_table(rows), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
