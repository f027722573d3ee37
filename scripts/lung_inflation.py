#!/usr/bin/env python3
"""How the label map reads a normal lung made denser, as a smaller breath makes it (issue 19).

    PYTHONPATH=LatentHarmonize .venv/bin/python scripts/lung_inflation.py [--model M] [--patients 4]
        [--shifts 0 50 100 150 200]

Real normal lungs differ in density by more than 100 HU between patients and scans (docs/real-scans.md: the
emphysema database's normal slices read −752 HU, the ILD database's healthy lung −892 HU), while the cohort's
phantom lungs all share one normal density. For each shift, the first ``--patients`` phantom patients of seed 0
are made with their normal parenchyma that much denser (``phantom.make_patient(..., normal_shift_hu=...)``; their
disease is unchanged), scanned under the four default acquisitions and analysed in memory
(``latentharmonize.analyze_image``, automatic lung mask, default bundle unless ``--model``). Printed: one Markdown
row per shift and true tissue, with where its voxels inside the lung mask go (``scripts/cluster_makeup.py``'s
``image_makeup``, pooled over patients and acquisitions). The script only orchestrates tested library functions,
hence no test of its own.
"""
from __future__ import annotations

import argparse
import sys

from cluster_makeup import image_makeup
from latentharmonize import load_bundle
from latentharmonize.evaluation.tissue import OUTSIDE_MASK, add_makeups
from latentharmonize.phantom import DEFAULT_ACQUISITIONS, acquire, make_patient
from latentharmonize.tissue import TISSUES


def makeup_at(shift: float, patients: int, bundle) -> dict:
    """The pooled :func:`label_makeup` of the patients' scans with the normal parenchyma ``shift`` HU denser."""
    total: dict = {}
    for index in range(patients):
        patient = make_patient(index, 0, normal_shift_hu=shift)
        for acquisition in DEFAULT_ACQUISITIONS:
            total = add_makeups(total, image_makeup(acquire(patient, acquisition), patient.truth, bundle))
    return total


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model bundle (default: the bundled default model)")
    parser.add_argument("--patients", type=int, default=4, help="phantom patients per shift (seed 0)")
    parser.add_argument("--shifts", nargs="+", type=float, default=[0.0, 50.0, 100.0, 150.0, 200.0])
    args = parser.parse_args(argv)
    bundle = load_bundle(args.model)
    segments = [name for _, name in sorted(bundle.names.items())]
    print("| normal lung denser by (HU) | true tissue | voxels in the mask | "
          + " | ".join(f"{s} (%)" for s in segments) + " |")
    print("|---|---|---|" + "---|" * len(segments))
    for shift in args.shifts:
        makeup = makeup_at(shift, args.patients, bundle)
        for tissue in TISSUES:
            held = {s: counts[tissue] for s, counts in makeup.items() if s != OUTSIDE_MASK}
            n = sum(held.values())
            if n:
                print(f"| {shift:g} | {tissue} | {n} | "
                      + " | ".join(f"{100 * held.get(s, 0) / n:.1f}" for s in segments) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
