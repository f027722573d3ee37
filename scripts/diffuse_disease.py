#!/usr/bin/env python3
"""How the label map follows the extent of one disease, from a little to most of the lung (issue 19).

    PYTHONPATH=LatentHarmonize .venv/bin/python scripts/diffuse_disease.py [--model M] [--patients 2]
        [--tissues emphysema ground_glass ...] [--fractions 0.2 0.5 0.8] [--true-mask]

For each disease tissue and target share of the lung, small phantom patients are made with only that disease
(``phantom.make_patient(..., fractions={tissue: share})``), scanned under the four default acquisitions, and
analysed in memory (``latentharmonize.analyze_image``, default bundle unless ``--model``; the automatic lung mask, or
with ``--true-mask`` the phantom's true lung, which holds all the disease). Printed: one Markdown row per tissue and
share, with the true share, each cluster's share of the lung mask averaged over patients and acquisitions (vessels
and airways make up the rest), and the mask's volume against the true lung's. Each scan's technical coordinate is
re-centred on its own median, so a lung that is mostly disease is the case to look at. The script only orchestrates
tested library functions, hence no test of its own.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import SimpleITK as sitk

from latentharmonize import analyze_image, load_bundle
from latentharmonize.errors import NoLungFoundError
from latentharmonize.evaluation.tissue import truth_on
from latentharmonize.phantom import DEFAULT_ACQUISITIONS, acquire, make_patient

TISSUES = ("emphysema", "ground_glass", "reticulation", "honeycombing", "consolidation")
IN_MASK = "lung mask / true lung"


def true_lung(patient, ct: sitk.Image) -> sitk.Image:
    """The patient's true lung (every tissue) on the scan's grid: a lung mask that holds all the disease."""
    return sitk.Cast(truth_on(ct, patient.truth) > 0, sitk.sitkUInt8)


def segment_shares(patient, bundle, given_truth: bool = False) -> list:
    """``{segment name: share of the lung}`` of the patient under each default acquisition, on the automatic lung
    mask or (``given_truth``) the true lung; None for a scan whose automatic mask finds no lung (a lung mostly
    consolidated holds too little air)."""
    out = []
    for acquisition in DEFAULT_ACQUISITIONS:
        ct = acquire(patient, acquisition)
        truth = true_lung(patient, ct)
        try:
            result = analyze_image(ct, bundle, truth if given_truth else None, device="cpu")
        except NoLungFoundError:
            out.append(None)
            continue
        labels = sitk.GetArrayViewFromImage(result.labels)
        lung = labels[labels > 0]
        shares = {name: float(np.mean(lung == label)) for label, name in result.names.items()}
        shares[IN_MASK] = lung.size / np.count_nonzero(sitk.GetArrayViewFromImage(truth))
        out.append(shares)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model bundle (default: the bundled default model)")
    parser.add_argument("--patients", type=int, default=2, help="phantom patients per row (seed 0)")
    parser.add_argument("--tissues", nargs="+", default=list(TISSUES), choices=TISSUES)
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.2, 0.5, 0.8])
    parser.add_argument("--true-mask", action="store_true",
                        help="give the phantom's true lung as the lung mask instead of the automatic one")
    args = parser.parse_args(argv)
    bundle = load_bundle(args.model)
    names = [name for _, name in sorted(bundle.names.items())] + [IN_MASK]
    print("| tissue | true share (%) | " + " | ".join(f"{n} (%)" for n in names) + " | scans with no lung found |")
    print("|---|---|" + "---|" * (len(names) + 1))
    for tissue in args.tissues:
        for share in args.fractions:
            patients = [make_patient(i, 0, fractions={tissue: share}) for i in range(args.patients)]
            found = [s for p in patients for s in segment_shares(p, bundle, args.true_mask)]
            rows = [r for r in found if r is not None]
            truth = 100 * np.mean([p.fractions[tissue] for p in patients])
            means = [f"{100 * np.mean([r.get(n, 0.0) for r in rows]):.1f}" if rows else "–" for n in names]
            print(f"| {tissue} | {truth:.0f} | " + " | ".join(means) + f" | {len(found) - len(rows)} of {len(found)} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
