#!/usr/bin/env python3
"""Cluster agreement between a real thin-slice CT and a thicker reconstruction of it, against the equal-scale
HU-threshold classes (issue 19: the same tissue gets the same label whatever the slice thickness).

Real scans of one patient at two slice thicknesses are rarely public. The thick scan is therefore made from the
thin one as the phantom makes its thick scans: each new slice is the mean of the thin slices in its slab
(``phantom.acquisition.thicker_slices``). Both scans are then compared as ``scripts/kernel_pair.py`` compares two
kernels: ARI, NMI and matched Dice of the bundle's own clusters and of the four HU classes at the lattice points
both scans have in the lung, every cluster's share of the lung and its change in percentage points (thick minus
thin), LAA-950's change, and the whole lung's LAA-950 and Perc15, raw and noise-matched, as ``analyze`` writes
them. The thick scan lives in a temporary folder; nothing is written beside the data.

    PYTHONPATH=LatentHarmonize .venv/bin/python scripts/slice_thickness_pair.py THIN --thickness 5 \\
        [--model BUNDLE] [--json OUT.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import SimpleITK as sitk

from kernel_pair import compare
from latentharmonize import read_ct
from latentharmonize.evaluation.tissue import THRESHOLD_BASELINE
from latentharmonize.phantom.acquisition import thicker_slices


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("thin", type=Path, help="the thin-slice CT (file or DICOM folder)")
    parser.add_argument("--thickness", type=float, required=True, help="slice thickness of the thick scan, mm")
    parser.add_argument("--model", help="model bundle (default: the bundled default model)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    thin = read_ct(args.thin)
    with tempfile.TemporaryDirectory() as scratch:
        thick_path = Path(scratch) / "thick.nrrd"
        sitk.WriteImage(thicker_slices(thin, args.thickness), str(thick_path))
        result = compare(args.thin, thick_path, args.model, names=("thin", "thick"))
    result["slice_thickness_mm"] = {"thin": thin.GetSpacing()[2], "thick": args.thickness}
    text = json.dumps(result, indent=1)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    c, t = result["clusters"], result[THRESHOLD_BASELINE]
    low = c["low_attenuation_change_points"]
    print(f"{thin.GetSpacing()[2]:g} -> {args.thickness:g} mm: clusters ARI {c['ari']:.3f} vs HU-threshold classes "
          f"{t['ari']:.3f}; largest cluster share change {c['max_abs_share_change_points']:.2f} points; "
          f"lower-attenuation cluster {'none' if low is None else f'{low:+.2f} points'}; "
          f"LAA-950 {result['laa950']['change_points']:+.2f} points")
    return 0


if __name__ == "__main__":
    sys.exit(main())
