#!/usr/bin/env python3
"""What each segment of the label map holds, voxel by voxel, on phantom scans with a tissue truth (issue 19,
"honest names").

    PYTHONPATH=LatentHarmonize .venv/bin/python -m latentharmonize phantom --patients 20 --seed 3026 /tmp/lh-test
    PYTHONPATH=LatentHarmonize .venv/bin/python scripts/cluster_makeup.py /tmp/lh-test --out docs/results/makeup.md

(seed 3026: the test cohort ``scripts/evaluate_phantom.py`` draws for the default bundle, trained with seed 2026.)
Every scan of the cohort (or of its first ``--patients`` patients) is analysed as ``analyze`` does it, in memory
(``latentharmonize.analyze_image``: automatic lung mask, CPU, default bundle unless ``--model``), and its label map is
compared with the patient's tissue truth brought onto the scan's grid. ``--out`` gets three tables: how much of each
true tissue lies inside the automatic lung mask, where each true tissue inside it goes, and what each segment holds;
beside them, for each disease-like name, the share of its voxels that are the tissue it names. This script only
orchestrates tested library functions (the analysis; ``evaluation.tissue.label_makeup``, ``add_makeups`` and
``name_support``), so it has no test of its own.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
import SimpleITK as sitk

import latentharmonize as lh
from latentharmonize.bundle import load_bundle
from latentharmonize.cohort import read_cohort
from latentharmonize.evaluation.tissue import OUTSIDE_MASK, add_makeups, label_makeup, name_support, truth_on
from latentharmonize.io import read_ct
from latentharmonize.tissue import TISSUES


def scan_makeup(ct_path: Path, truth_path: Path, bundle) -> dict:
    """:func:`image_makeup` of one phantom scan and its truth, read from their files."""
    return image_makeup(read_ct(str(ct_path)), sitk.ReadImage(str(truth_path)), bundle)


def image_makeup(ct: sitk.Image, truth: sitk.Image, bundle) -> dict:
    """:func:`label_makeup` of a phantom scan's label map, the truth resampled (nearest) onto the CT's grid."""
    analysis = lh.analyze_image(ct, bundle, device="cpu")
    return label_makeup(sitk.GetArrayFromImage(analysis.labels), sitk.GetArrayFromImage(truth_on(ct, truth)),
                        analysis.names)


def percent_table(makeup: dict, by: str) -> str:
    """Markdown: ``by="tissue"``, where each tissue's voxels go (columns sum to 100; – for a tissue the scans lack);
    ``by="segment"``, what each segment holds (rows sum to 100)."""
    counts = pd.DataFrame(makeup).T.reindex(columns=list(TISSUES)).fillna(0)
    share = counts / counts.sum(axis=0) if by == "tissue" else counts.div(counts.sum(axis=1), axis=0)
    head = "| segment | " + " | ".join(TISSUES) + " |"
    rows = [f"| {name} | " + " | ".join("–" if pd.isna(v) else f"{100 * v:.1f}" for v in row) + " |"
            for name, row in share.iterrows()]
    return "\n".join([head, "|---|" + "---|" * len(TISSUES), *rows])


def mask_table(makeup: dict) -> str:
    """Markdown: the share (%) of each true tissue's voxels that the label map covers (not :data:`OUTSIDE_MASK`)."""
    counts = pd.DataFrame(makeup).T.reindex(columns=list(TISSUES)).fillna(0)
    outside = counts.loc[OUTSIDE_MASK] if OUTSIDE_MASK in counts.index else 0
    inside = 1.0 - outside / counts.sum(axis=0)  # a tissue the scans lack: 0 / 0, shown as –
    return "\n".join(["| " + " | ".join(TISSUES) + " |", "|" + "---|" * len(TISSUES),
                      "| " + " | ".join("–" if pd.isna(v) else f"{100 * v:.1f}" for v in inside) + " |"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cohort", type=Path, help="phantom cohort folder (its cohort.csv names scans and truths)")
    parser.add_argument("--out", type=Path, required=True, help="Markdown file for the tables (JSON beside it)")
    parser.add_argument("--patients", type=int, default=None, help="only the first N patients (default: all)")
    parser.add_argument("--model", default=None, help="model bundle folder (default: the bundled model)")
    args = parser.parse_args(argv)

    bundle = load_bundle(args.model)
    rows = read_cohort(args.cohort / "cohort.csv")  # checked, with absolute paths
    patients = sorted(rows["patient"].unique())[:args.patients]
    rows = rows[rows["patient"].isin(patients)]
    total: dict = {}
    for _, row in rows.iterrows():
        total = add_makeups(total, scan_makeup(Path(row["image"]), Path(row["truth"]), bundle))
        print(f"{row['patient']} {row['acquisition']}", flush=True)
    support = name_support(total)
    mapped = {name: counts for name, counts in total.items() if name != OUTSIDE_MASK}
    text = "\n".join([
        f"# Label make-up on the phantom: bundle `{bundle.sha256[:12]}…`, {len(rows)} scans of {len(patients)} "
        f"patients of `{args.cohort.name}`", "",
        "How much of each true tissue lies inside the automatic lung mask, so that the map can show it:", "",
        mask_table(total), "",
        "Where each true tissue's voxels inside the mask go (each column sums to 100 %):", "",
        percent_table(mapped, "tissue"), "",
        "What each segment holds (each row sums to 100 %):", "", percent_table(mapped, "segment"), "",
        "Disease-like names, share of the segment that is the tissue named: "
        + (", ".join(f"{name} {100 * v:.1f} %" for name, v in support.items()) or "none in this map"), ""])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"model_sha256": bundle.sha256, "scans": len(rows), "patients": [str(p) for p in patients],
         "voxels": total, "name_support": support}, indent=1, sort_keys=True) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
