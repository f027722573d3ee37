#!/usr/bin/env python3
"""The label map on real emphysema: the Computed Tomography Emphysema Database (issue 19).

    PYTHONPATH=LatentHarmonize .venv/bin/python scripts/emphysema_database.py CTED [--out TABLE.md]

``CTED``: a folder holding the database of Sørensen et al. (IEEE TMI 2010, lauge-soerensen.github.io/
emphysema-database; also in rlsn/LungNoduleDetection at 30dbb56, folder ``cted``): ``slices/<subject>_<level>.tiff``
(115 single HRCT slices in HU), ``slice_labels.csv`` (the leading pattern per slice: 1 no emphysema, 2 centrilobular,
3 paraseptal, 4 panlobular), ``slice_severity.csv`` (0-5), and the 168 annotated regions of interest
``patches/patch<n>.tiff`` with ``patch_labels.csv`` and ``patch_subjects.csv`` (in file-number order). The data may
not be redistributed: the script reads it where it lies and writes at most the table.

``analyze`` needs a volume, so each slice is read as a stack of ``--stack`` copies of itself (the TIFFs carry no
geometry: ``--pixel-mm`` and ``--slice-mm`` give it, by default as the database's authors describe the scans). The
product's analysis runs in memory (``latentharmonize.analyze_image``, default bundle unless ``--model``); the middle
copy's label map is read against the slice's own HU. Each region of interest is found in its subject's slices (it is
an exact crop of one) and read the same way. Printed (and written to ``--out``): per leading pattern and per severity,
each segment's share of the lung beside the lung's share below -950 and -910 HU and its 15th percentile (and the
first and last read noise-matched, as ``analyze``'s ``densitometry.csv`` gives them); per
pattern of the regions of interest, the same, with how far a region's median lies above its slice's lung median;
on how many slices with and without emphysema each segment holds at least 1 % of the lung; and how well each
figure tells the slices with emphysema from those without (the area under the ROC curve, scikit-learn's
``roc_auc_score``, with the direction in which it separates).

This script only orchestrates tested library functions (the analysis, the densitometry indices), so it has no test
of its own.
"""
from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from sklearn.metrics import roc_auc_score

import latentharmonize as lh
from latentharmonize.densitometry import MATCHED, density_indices

PATTERNS = {"1": "no emphysema", "2": "centrilobular", "3": "paraseptal", "4": "panlobular"}
NO_EMPHYSEMA = PATTERNS["1"]
MARKED_PCT = 1.0  # a slice counts as marked by a segment holding at least this share of its lung


def read_hu(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.int16)


def read_pairs(path: Path) -> list:
    with open(path, newline="", encoding="utf-8") as fh:
        return [row for row in csv.reader(fh) if row]


def as_volume(hu: np.ndarray, copies: int, pixel_mm: float, slice_mm: float) -> sitk.Image:
    ct = sitk.GetImageFromArray(np.repeat(hu[None], copies, axis=0))
    ct.SetSpacing((pixel_mm, pixel_mm, slice_mm))
    return ct


def slice_figures(hu: np.ndarray, labels: np.ndarray, lung: np.ndarray, names: dict) -> dict:
    """Each segment's share of ``lung`` (%) and the densitometry of its HU, with the share below -910 HU."""
    values = hu[lung].astype(np.float64)
    figures = {name: 100.0 * np.count_nonzero(labels[lung] == label) / values.size for label, name in names.items()}
    figures.update(density_indices(values))
    figures["laa910_pct"] = 100.0 * np.count_nonzero(values < -910.0) / values.size
    return figures


def matched_figures(densitometry) -> dict:
    """The noise-matched emphysema indices of ``analyze``'s densitometry table (whole lung): every copy of the slice
    reads alike, so they are the slice's."""
    whole = densitometry.set_index("region").loc["whole"]
    return {column: float(whole[column]) for column in MATCHED}


def analyse_slices(folder: Path, args) -> tuple:
    """Per slice: pattern, severity and figures; and per slice name the middle copy's labels and lung."""
    severity = dict(read_pairs(folder / "slice_severity.csv"))
    rows, maps, names = [], {}, None
    for name, pattern in read_pairs(folder / "slice_labels.csv"):
        hu = read_hu(folder / "slices" / f"{name}.tiff")
        analysis = lh.analyze_image(as_volume(hu, args.stack, args.pixel_mm, args.slice_mm), args.model)
        middle = args.stack // 2
        labels = sitk.GetArrayFromImage(analysis.labels)[middle]
        lung = sitk.GetArrayFromImage(analysis.lungs)[middle] > 0
        names = analysis.names
        maps[name] = (hu, labels, lung)
        rows.append({"slice": name, "pattern": PATTERNS[pattern], "severity": int(severity[name]),
                     "lowpass_mm": analysis.record["encoder_lowpass_mm"],
                     **slice_figures(hu, labels, lung, names), **matched_figures(analysis.densitometry)})
        print(f"{name}: {PATTERNS[pattern]}, severity {severity[name]}", file=sys.stderr, flush=True)
    return rows, maps, names


def find_crop(patch: np.ndarray, slices: list) -> tuple:
    """``(slice name, row, column)`` of the slice in ``slices`` (name, HU) that ``patch`` was cut from."""
    h, w = patch.shape
    for name, hu in slices:
        for y, x in zip(*np.nonzero(hu[: hu.shape[0] - h + 1, : hu.shape[1] - w + 1] == patch[0, 0])):
            if np.array_equal(hu[y:y + h, x:x + w], patch):
                return name, int(y), int(x)
    raise SystemExit(f"a region of interest was not found in its subject's slices {[n for n, _ in slices]}")


def analyse_regions(folder: Path, maps: dict, names: dict) -> list:
    """Per region of interest with some lung in it: its pattern and figures, read in its slice's map."""
    files = sorted((folder / "patches").glob("patch*.tiff"), key=lambda p: int(re.findall(r"\d+", p.stem)[0]))
    labels = [row[0] for row in read_pairs(folder / "patch_labels.csv")]
    subjects = [row[0] for row in read_pairs(folder / "patch_subjects.csv")]
    if not len(files) == len(labels) == len(subjects):
        raise SystemExit(f"{len(files)} patches, {len(labels)} labels, {len(subjects)} subjects: the folder is "
                         "incomplete")
    rows = []
    for path, pattern, subject in zip(files, labels, subjects):
        patch = read_hu(path)
        name, y, x = find_crop(patch, [(n, maps[n][0]) for n in maps if n.startswith(f"{subject}_")])
        slice_hu, _, slice_lung = maps[name]
        hu, region_labels, lung = (a[y:y + patch.shape[0], x:x + patch.shape[1]] for a in maps[name])
        if lung.any():
            rows.append({"pattern": PATTERNS[pattern], **slice_figures(hu, region_labels, lung, names),
                         "above_lung_hu": above_lung(hu[lung], slice_hu[slice_lung])})
    return rows


def above_lung(region: np.ndarray, lung: np.ndarray) -> float:
    """How far the region's median HU lies above its slice's lung median: density read against the patient's own
    lung rather than against fixed bounds."""
    return float(np.median(region) - np.median(lung))


def summary(rows: list, key: str, columns: list) -> list:
    """Markdown lines: per value of ``key``, the number of rows and the mean of each column."""
    header = [key, "n"] + [title for title, _ in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for value in sorted({r[key] for r in rows}, key=str):
        group = [r for r in rows if r[key] == value]
        cells = [str(value), str(len(group))] + [f"{np.mean([r[c] for r in group]):.1f}" for _, c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def marked_slices(slices: list, segments: list, without: bool) -> str:
    """Per segment, how many slices with emphysema (``without``: without it) it marks (:data:`MARKED_PCT`)."""
    chosen = [r for r in slices if (r["pattern"] == NO_EMPHYSEMA) == without]
    return ", ".join(f"{name} {sum(r[name] >= MARKED_PCT for r in chosen)}" for _, name in segments)


def separation(rows: list, columns: list) -> list:
    """Markdown lines: per column, the area under the ROC curve for emphysema against none, and its direction."""
    truth = [r["pattern"] != NO_EMPHYSEMA for r in rows]
    lines = ["| figure | AUC, emphysema against none | emphysema reads |", "|---|---|---|"]
    for title, column in columns:
        auc = roc_auc_score(truth, [r[column] for r in rows])
        lines.append(f"| {title} | {max(auc, 1 - auc):.2f} | {'higher' if auc >= 0.5 else 'lower'} |")
    return lines


def slice_database_parser(doc: str, folder_help: str) -> argparse.ArgumentParser:
    """The options of a script that analyses a database of single slices: the folder, ``--model``, ``--stack`` and
    ``--out``."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help=folder_help)
    parser.add_argument("--model", help="model bundle folder (default: the bundled model)")
    parser.add_argument("--stack", type=int, default=48, help="copies of each slice in its volume (default 48)")
    parser.add_argument("--out", type=Path, help="also write the tables to this Markdown file")
    return parser


def report(lines: list, out: Path | None) -> None:
    """Print the Markdown ``lines``, and write them to ``out`` when given."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        out.write_text(text, encoding="utf-8")


def main(argv=None) -> int:
    parser = slice_database_parser(__doc__, "the database folder (slices/, patches/ and the CSV files)")
    parser.add_argument("--pixel-mm", type=float, default=0.78, help="in-plane pixel size (default 0.78 mm)")
    parser.add_argument("--slice-mm", type=float, default=1.25, help="slice spacing of the stack (default 1.25 mm)")
    args = parser.parse_args(argv)

    slices, maps, names = analyse_slices(args.folder, args)
    regions = analyse_regions(args.folder, maps, names)
    segments = [(f"{name} (% of lung)", name) for _, name in sorted(names.items())]
    density = [("below −950 HU (%)", "laa950_pct"), ("below −910 HU (%)", "laa910_pct"),
               ("15th percentile (HU)", "perc15_hu"), ("mean (HU)", "mld_hu")]
    matched = [("below −950 HU, noise-matched (%)", "laa950_matched_pct"),
               ("15th percentile, noise-matched (HU)", "perc15_matched_hu")]
    mostly = [{"pattern": r["pattern"], **{name: 100.0 * (r[name] > 50) for _, name in segments}} for r in regions]
    lowpass = [r["lowpass_mm"] for r in slices]
    lines = [f"{len(slices)} slices, {len(regions)} regions of interest holding lung; the encoder's noise-matched "
             f"low-pass {min(lowpass):g}–{max(lowpass):g} mm ({lowpass.count(max(lowpass))} slices at "
             f"{max(lowpass):g} mm, {lowpass.count(min(lowpass))} at {min(lowpass):g} mm).", "",
             "Slices by leading pattern:", "", *summary(slices, "pattern", density + matched + segments), "",
             "Slices by severity:", "", *summary(slices, "severity", density + matched + segments), "",
             f"Emphysema slices holding at least {MARKED_PCT:g} % of each segment: "
             f"{marked_slices(slices, segments, without=False)}.", "",
             f"Slices without emphysema holding at least {MARKED_PCT:g} % of each segment: "
             f"{marked_slices(slices, segments, without=True)}.", "",
             "Regions of interest by pattern:", "",
             *summary(regions, "pattern", density + [("median above the slice's lung (HU)", "above_lung_hu")]
                      + segments), "",
             "Regions of interest mostly (over 50 % of their lung) in each segment:", "",
             *summary(mostly, "pattern", [(f"{name} (% of regions)", name) for _, name in segments]), "",
             "Slices with emphysema against slices without:", "", *separation(slices, density + matched + segments)]
    report(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
