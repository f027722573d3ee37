"""Cluster agreement between two reconstructions of one raw CT scan (soft and sharp kernel), against the
equal-scale HU-threshold classes (issue 19, "real scans").

Both scans are read (NRRD, NIfTI, MHA or a DICOM folder), their lungs segmented, encoded with the bundle as
``evaluate`` does, and labelled by the bundle's own clusters (what ``analyze`` shows) and by the four HU classes of
each patch's mean lung HU (-950, -700, -300) on the same 5 mm lattice and context. At the lattice points both
scans have in the lung it reports ARI, NMI and matched Dice of each labelling, every cluster's share of the lung
in both scans and its change in percentage points, the low-attenuation cluster's share change (the rule of
``evaluation.tissue``: the largest cluster is normal) and LAA-950's. It also reports the whole lung's densitometry
as ``analyze`` writes it (``densitometry.csv``): LAA-950 and Perc15, raw and noise-matched, in both scans and their
change. For two-stage clusters it also gives the agreement of their first stage alone, its raised side one label
(``TwoStageClusters.predict_first_stage``): where the clusters agree less, it tells which stage moved the patches.
Nothing is written beside the data.

    python scripts/kernel_pair.py SOFT SHARP [--model BUNDLE] [--json OUT.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from latentharmonize.bundle import load_bundle
from latentharmonize.evaluation.consistency import common_rows
from latentharmonize.evaluation.encoding import CORE_STATISTICS, Encoders, encode_row
from latentharmonize.evaluation.tissue import (PATCH_MEAN_HU, THRESHOLD_BASELINE, low_attenuation_cluster,
                                               normal_cluster, threshold_classes)
from latentharmonize.evaluation.metrics import label_agreement
from latentharmonize.pipeline import cluster_inputs
from latentharmonize.two_stage import reads_core

FIRST_STAGE = "first_stage"  # a two-stage bundle's first stage alone, its raised side one label


def compare(first: Path, second: Path, model=None, device: str = "cpu", names=("soft", "sharp")) -> dict:
    """The figures above for two scans of one patient, keyed by ``names``; every change is second minus first."""
    bundle = load_bundle(model)
    encoders = Encoders(bundle, device=device)
    scans = [encode_row(pd.Series({"image": str(path), "patient": "pair", "acquisition": kind}), "eval", encoders)[0]
             for kind, path in zip(names, (first, second))]
    two_stage = reads_core(bundle.clusters)
    for s in scans:
        inputs = cluster_inputs(bundle, s.latents["entangled"], s.latents[CORE_STATISTICS])
        s.labels["clusters"] = np.asarray(bundle.clusters.predict(inputs))
        if two_stage:
            s.labels[FIRST_STAGE] = bundle.clusters.predict_first_stage(inputs)
        s.labels[THRESHOLD_BASELINE] = threshold_classes(s.latents[PATCH_MEAN_HU])
    rows = common_rows(scans)
    hu = np.concatenate([np.ravel(s.latents[PATCH_MEAN_HU]) for s in scans])
    out = {"model": bundle.sha256[:12], "common_points": int(len(rows[0])),
           "laa950": {k: s.densitometry["laa950"] for k, s in zip(names, scans)}}
    out["laa950"]["change_points"] = out["laa950"][names[1]] - out["laa950"][names[0]]
    for name in ("clusters", THRESHOLD_BASELINE):
        a, b = (s.labels[name][r] for s, r in zip(scans, rows))
        labels = np.concatenate([s.labels[name] for s in scans])
        shares = {int(k): [100.0 * float(np.mean(s.labels[name] == k)) for s in scans] for k in np.unique(labels)}
        normal = normal_cluster(labels)
        low = low_attenuation_cluster(labels, hu, normal)
        out[name] = {**label_agreement(a, b),
                     "share_percent": {k: {names[0]: v[0], names[1]: v[1], "change_points": v[1] - v[0]}
                                       for k, v in shares.items()},
                     "max_abs_share_change_points": max(abs(v[1] - v[0]) for v in shares.values()),
                     "low_attenuation": low,
                     "low_attenuation_change_points": None if low is None else shares[low][1] - shares[low][0]}
    if two_stage:  # which stage moves patches between the kernels
        out[FIRST_STAGE] = label_agreement(*(s.labels[FIRST_STAGE][r] for s, r in zip(scans, rows)))
    out["cluster_names"] = {int(k): v for k, v in bundle.names.items()}
    out["densitometry"] = densitometry_change(scans, names)
    return out


# densitometry.csv's whole-lung emphysema columns and the keys under which encode_row reads them
DENSITOMETRY_KEYS = {"laa950_pct": "laa950", "perc15_hu": "perc15", "laa950_matched_pct": "laa950_matched",
                     "perc15_matched_hu": "perc15_matched"}


def densitometry_change(scans, names) -> dict:
    """The whole lung's ``densitometry.csv`` emphysema indices of each encoded scan (``encode_row`` reads them as
    ``analyze`` writes them) and their change."""
    return {column: {names[0]: float(scans[0].densitometry[key]), names[1]: float(scans[1].densitometry[key]),
                     "change": float(scans[1].densitometry[key] - scans[0].densitometry[key])}
            for column, key in DENSITOMETRY_KEYS.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("soft", type=Path, help="soft-kernel reconstruction (file or DICOM folder)")
    parser.add_argument("sharp", type=Path, help="sharp-kernel reconstruction of the same raw scan")
    parser.add_argument("--model", help="model bundle (default: the bundled default model)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    result = compare(args.soft, args.sharp, args.model)
    text = json.dumps(result, indent=1)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    c, t = result["clusters"], result[THRESHOLD_BASELINE]
    print(f"clusters ARI {c['ari']:.3f} vs HU-threshold classes {t['ari']:.3f}; largest cluster share change "
          f"{c['max_abs_share_change_points']:.2f} points; "
          f"LAA-950 change {result['laa950']['change_points']:+.2f} points"
          + (f"; first stage alone ARI {result[FIRST_STAGE]['ari']:.3f}" if FIRST_STAGE in result else ""))
    d = result["densitometry"]
    print("densitometry.csv, whole lung, change: LAA-950 " + ", ".join(
        f"{kind} {d[column]['change']:+.2f} points" for kind, column in (("raw", "laa950_pct"),
                                                                          ("noise-matched", "laa950_matched_pct")))
          + "; Perc15 " + ", ".join(f"{kind} {d[column]['change']:+.1f} HU" for kind, column in
                                   (("raw", "perc15_hu"), ("noise-matched", "perc15_matched_hu"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
