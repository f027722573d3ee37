#!/usr/bin/env python3
"""Re-derive the default bundle's cluster names from profiles measured with the current naming rules.

Generates the bundle's own training cohort (phantom, the training seed and patient count), encodes every scan as
``analyze`` does (vessels and airways filled), measures the HU profile (``densitometry.PROFILE_KEYS``) of the centre
slice of every patch per cluster (voxels outside the parenchyma filled as the encoder sees them, as in training), names the clusters with ``clusters.name_clusters`` and writes the names, their
default colours and the measured profiles into the manifest with ``bundle.save_bundle``. Encoder weights, rotation
and centroids are unchanged (same array bytes).

    .venv/bin/python scripts/rename_default_bundle.py [--bundle DIR] [--dry-run]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = REPO / "LatentHarmonize" / "Resources" / "Models" / "default"


def measured_profiles(bundle, cohort_dir: Path) -> list:
    """Cluster profiles of the bundle's clusters over every patch of the cohort's scans."""
    from latentharmonize.clusters import cluster_profiles
    from latentharmonize.densitometry import PROFILE_KEYS, patch_profiles
    from latentharmonize.cohort import read_cohort
    from latentharmonize.grid import to_model_grid
    from latentharmonize.io import read_ct
    from latentharmonize.lungmask import segment_lungs
    from latentharmonize.patches import encode_dense, extract_patches
    from latentharmonize.structures import segment_structures

    spec, encoder = bundle.spec, bundle.encoder("cpu")
    labels, stats = [], {k: [] for k in PROFILE_KEYS}
    for path in read_cohort(cohort_dir / "cohort.csv")["image"]:
        ct = read_ct(path)
        lungs = segment_lungs(ct)
        hu, lung, grid = to_model_grid(ct, lungs, tuple(spec.spacing), spec.margin_mm,
                                       align_px=(spec.stride, spec.stride, 1))
        parenchyma = lung & (segment_structures(hu, lung, grid.spacing) == 0)
        dense = encode_dense(encoder, hu, parenchyma, grid, spec, "cpu")
        labels.append(bundle.clusters.predict(bundle.rotation.cluster_features(dense.latents)))
        filled = np.where(parenchyma, hu, np.float32(spec.outside_fill_hu))  # what the encoder saw
        centre = extract_patches(filled, dense.positions, spec)[:, int(spec.slices) // 2]
        for key, values in patch_profiles(centre).items():
            stats[key].append(values)
    return cluster_profiles(np.concatenate(labels), {k: np.concatenate(v) for k, v in stats.items()},
                            bundle.clusters.n_clusters_)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    parser.add_argument("--dry-run", action="store_true", help="print the profiles and names, write nothing")
    args = parser.parse_args(argv)

    from latentharmonize.bundle import load_bundle, save_bundle
    from latentharmonize.clusters import default_colors, name_clusters
    from latentharmonize.phantom import generate_cohort

    bundle = load_bundle(args.bundle)
    training = bundle.manifest["training"]
    with tempfile.TemporaryDirectory(prefix="lh-rename-cohort-") as tmp:
        generate_cohort(tmp, n_patients=int(training["n_patients"]), seed=int(training["seed"]))
        profiles = measured_profiles(bundle, Path(tmp))
    names = name_clusters(profiles)
    for label, (name, p) in enumerate(zip(names, profiles), start=1):
        print(label, name, {k: round(v, 3) for k, v in p.items()})
    if args.dry_run:
        return 0
    bundle.manifest["clusters"]["names"] = names
    bundle.manifest["clusters"]["colors"] = [list(c) for c in default_colors(names)]
    training["cluster_names"] = {str(k): n for k, n in enumerate(names, start=1)}
    training["cluster_profiles_measured"] = profiles  # the training sample's profiles (older keys) stay as they were
    save_bundle(bundle, args.bundle, overwrite=True)
    print(f"names written to {args.bundle}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
