#!/usr/bin/env python3
"""Check vessels, airways and the voxel-level label map: on a phantom patient against its truth, or on real scans.

    .venv/bin/python scripts/check_structures.py phantom [--patient 0] [--seed 7] [--full] [--model BUNDLE]
    .venv/bin/python scripts/check_structures.py cohort PHANTOM_DIR [--patients P000,P003]
    .venv/bin/python scripts/check_structures.py scan RESULT_DIR [RESULT_DIR ...]

``phantom`` makes one patient, rebuilds the truth of its vessels and airways from the generator's tubes (voxels
more than half inside a vessel or airway lumen, within the lung truth; the phantom's truth file holds tissue only),
and for each default acquisition reports the Dice of the found vessels and airways, the share of each truth tissue
wrongly taken as vessel, and the agreement (ARI) of the label map with the truth tissue on the parenchyma voxels.
(Until 2026-12-06 it also drew the nearest-patch map with the vessels left in the patches, which clusters that read
each patch's core cannot label; docs/structures.md keeps that comparison.) ``cohort`` reads a phantom cohort
already written (for instance one with drawn, held-out settings) and reports, per scan, the vessels found on the
model grid against the truth rebuilt from the cohort's seed: recall, precision, and the share of each abnormal
tissue taken as vessel. ``scan`` reads the outputs of ``latentharmonize analyze`` on real scans and reports the
structures' volumes and where each cluster lies (near the lung border, near a found vessel): nothing is written,
so real data stays out of the repository.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def phantom_truth(patient_index: int, seed: int, full: bool):
    """(patient, structure truth [z, y, x] uint8: 1 vessel, 2 airway lumen) of one phantom patient."""
    import SimpleITK as sitk

    from latentharmonize import phantom
    from latentharmonize.phantom import anatomy, splat_tubes, vessel_visibility

    tubes, fine = {}, []
    original = anatomy.airway_and_vessel_tubes  # patched where render_anatomy looks it up

    def keep(plan, grid, rng):
        tubes.update(original(plan, grid, rng))
        fine.append(grid)
        return dict(tubes)

    anatomy.airway_and_vessel_tubes = keep
    try:
        patient = phantom.make_patient(patient_index, seed, full=full)
    finally:
        anatomy.airway_and_vessel_tubes = original
    tissue = sitk.GetArrayViewFromImage(patient.truth)
    vessels = splat_tubes(tubes["vessels"], fine[0]) * (vessel_visibility(tissue) / 255.0) > 0.5
    lumen = splat_tubes(tubes["lumen"], fine[0]) > 127
    truth = np.zeros(tissue.shape, np.uint8)
    truth[vessels & (tissue > 0)] = 1
    truth[lumen & (tissue > 0)] = 2
    return patient, truth


def taken_as_vessel(is_vessel: np.ndarray, tissue: np.ndarray, where: np.ndarray, first: int = 1,
                    min_voxels: int = 1) -> str:
    """Per truth tissue label ``first`` and up with at least ``min_voxels`` voxels in ``where``, the share of those
    voxels found as vessel, as one printable line."""
    from latentharmonize.tissue import TISSUES

    shares = []
    for k, name in enumerate(TISSUES, start=1):
        voxels = where & (tissue == k)
        if k >= first and np.count_nonzero(voxels) >= min_voxels:
            shares.append(f"{name} {np.mean(is_vessel[voxels]):.0%}")
    return "  ".join(shares)


def check_phantom(patient_index: int, seed: int, full: bool, model=None) -> None:
    import SimpleITK as sitk
    from sklearn.metrics import adjusted_rand_score

    from latentharmonize.pipeline import _cluster_maps, encode_patches
    from latentharmonize.bundle import load_bundle
    from latentharmonize.lungmask import segment_lungs
    from latentharmonize.evaluation.metrics import mask_dice
    from latentharmonize.patches import model_grid_hu
    from latentharmonize.phantom import DEFAULT_ACQUISITIONS, acquire_all
    from latentharmonize.structures import AIRWAY_LABEL, VESSEL_LABEL, parenchyma, segment_structures
    from latentharmonize.two_stage import reads_core

    bundle = load_bundle(model)
    encoder, spec = bundle.encoder("cpu"), bundle.spec
    patient, truth = phantom_truth(patient_index, seed, full)
    structure_truth = sitk.GetImageFromArray(truth)
    structure_truth.CopyInformation(patient.truth)
    print(f"patient {patient.patient_id} ({patient.phenotype}); truth vessels {np.mean(truth[truth > 0] == 1):.0%} "
          f"of the structures, {np.count_nonzero(truth == 1) / np.count_nonzero(sitk.GetArrayViewFromImage(patient.truth)):.1%} of the lung")
    for acq, ct in zip(DEFAULT_ACQUISITIONS, acquire_all(patient, DEFAULT_ACQUISITIONS)):
        lungs = segment_lungs(ct)
        hu, lung, grid, _ = model_grid_hu(ct, lungs, spec)  # calibrated as analyze reads it (encode_dense low-passes)
        found = segment_structures(hu, lung, grid.spacing, grid.scan_slices)
        dense = encode_patches(encoder, hu, parenchyma(lung, found), grid, spec, "cpu", core=reads_core(bundle.clusters))
        labels = sitk.GetArrayFromImage(_cluster_maps(dense, bundle, ct, lungs, grid, found)[2])

        def on_ct(image):
            return sitk.GetArrayFromImage(sitk.Resample(image, ct, sitk.Transform(), sitk.sitkNearestNeighbor))
        tissue, structure = on_ct(patient.truth), on_ct(structure_truth)
        in_lung = labels > 0
        false_vessel = taken_as_vessel(labels == VESSEL_LABEL, tissue, in_lung & (structure == 0))
        rows = np.flatnonzero((in_lung & (tissue > 0) & (structure == 0)).ravel())
        painted, want = labels.ravel()[rows], tissue.ravel()[rows]
        tissue_voxels = painted < VESSEL_LABEL
        print(f"{acq.name}: vessel Dice {mask_dice(labels == VESSEL_LABEL, in_lung & (structure == 1)):.2f}, "
              f"airway Dice {mask_dice(labels == AIRWAY_LABEL, in_lung & (structure == 2)):.2f}; "
              f"found vessels {np.mean(labels[in_lung] == VESSEL_LABEL):.1%} / airways "
              f"{np.mean(labels[in_lung] == AIRWAY_LABEL):.1%} of the lung (truth "
              f"{np.mean(structure[in_lung] == 1):.1%} / {np.mean(structure[in_lung] == 2):.1%}); "
              f"tissue taken as vessel: {false_vessel}; voxel ARI vs truth tissue "
              f"{adjusted_rand_score(want[tissue_voxels], painted[tissue_voxels]):.3f}",
              flush=True)


def check_cohort(folder: Path, patients=None) -> None:
    import json

    import SimpleITK as sitk

    from latentharmonize.bundle import load_bundle
    from latentharmonize.cohort import read_cohort
    from latentharmonize.grid import resample_onto
    from latentharmonize.lungmask import segment_lungs
    from latentharmonize.patches import model_grid_hu
    from latentharmonize.structures import VESSEL_LABEL, segment_structures

    manifest = json.loads((folder / "phantom.json").read_text())
    seed, full = manifest["seed"], bool(manifest.get("full", False))
    rows = read_cohort(folder / "cohort.csv")
    spec = load_bundle(None).spec
    for patient_id, scans in rows.groupby("patient", sort=True):
        if patients and patient_id not in patients:
            continue
        patient, truth = phantom_truth(int(str(patient_id).lstrip("P")), seed, full)
        written = sitk.GetArrayFromImage(sitk.ReadImage(str(scans["truth"].iloc[0])))
        if not np.array_equal(sitk.GetArrayViewFromImage(patient.truth), written):
            raise SystemExit(f"{patient_id}: the rebuilt patient differs from the cohort's truth; is this a phantom "
                             "cohort made by this version?")
        structure_truth = sitk.GetImageFromArray(truth)
        structure_truth.CopyInformation(patient.truth)
        for _, row in scans.iterrows():
            ct = sitk.ReadImage(str(row["image"]))
            hu, lung, grid, _ = model_grid_hu(ct, segment_lungs(ct), spec)
            found = (segment_structures(hu, lung, grid.spacing, grid.scan_slices) == VESSEL_LABEL) & lung
            vessel = (resample_onto(structure_truth, grid, nearest=True, default=0) == 1) & lung
            tissue = resample_onto(patient.truth, grid, nearest=True, default=0)
            taken = taken_as_vessel(found, tissue, lung & ~vessel, first=3, min_voxels=200)
            print(f"{patient_id} {row['acquisition']} (kernel {row.get('kernel')}, {float(row['thickness']):.2f} mm, "
                  f"{float(row['dose']):.0f} mAs): vessels truth {np.mean(vessel[lung]):.1%} / found "
                  f"{np.mean(found[lung]):.1%} of the lung; recall {np.mean(found[vessel]):.2f}, precision "
                  f"{np.mean(vessel[found]) if found.any() else float('nan'):.2f}; tissue taken as vessel: {taken}",
                  flush=True)


def check_scans(results) -> None:
    import json

    import SimpleITK as sitk
    from scipy import ndimage

    from latentharmonize.structures import VESSEL_LABEL

    for folder in map(Path, results):
        labels_path = next(folder.glob("*_clusters.nrrd"))
        labels = sitk.ReadImage(str(labels_path))
        spacing = labels.GetSpacing()[::-1]
        lab = sitk.GetArrayFromImage(labels)
        lung = sitk.GetArrayFromImage(sitk.ReadImage(str(next(folder.glob("*_lungs.nrrd"))))) > 0
        box = tuple(slice(int(a.min()), int(a.max()) + 1) for a in np.nonzero(lung))
        lab, lung = lab[box], lung[box]
        depth = ndimage.distance_transform_edt(lung, sampling=spacing)
        to_vessel = ndimage.distance_transform_edt(lab != VESSEL_LABEL, sampling=spacing)
        composition = json.loads((folder / "composition.json").read_text())
        print(f"{folder} (spacing {tuple(round(s, 2) for s in labels.GetSpacing())} mm); lung "
              f"{composition['lung_volumes_ml']['total']:.0f} mL; all lung: {np.mean(depth[lung] < 10):.0%} within "
              f"10 mm of the lung border, {np.mean(to_vessel[lung] < 5):.0%} within 5 mm of a found vessel")
        for row in composition["regions"]["whole"]:
            where = lab == row["label"]
            near = (f"; {np.mean(depth[where] < 10):.0%} within 10 mm of the border, "
                    f"{np.mean(to_vessel[where] < 5):.0%} within 5 mm of a vessel" if row["label"] < VESSEL_LABEL and where.any() else "")
            print(f"  {row['label']:>3} {row['name']:<28} {100 * row['fraction']:5.1f} %  {row['volume_ml']:7.1f} mL  "
                  f"mean {row['mean_hu'] if row['mean_hu'] is None else round(row['mean_hu'])} HU{near}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    ph = sub.add_parser("phantom")
    ph.add_argument("--patient", type=int, default=0)
    ph.add_argument("--seed", type=int, default=7)
    ph.add_argument("--full", action="store_true", help="the full-size 512 x 512 x 300 patient")
    ph.add_argument("--model", help="model bundle folder (default: the shipped one)")
    co = sub.add_parser("cohort")
    co.add_argument("folder", type=Path, help="a phantom cohort folder (cohort.csv, phantom.json)")
    co.add_argument("--patients", help="comma-separated patient ids (default: all)")
    sc = sub.add_parser("scan")
    sc.add_argument("results", nargs="+", help="output folders of latentharmonize analyze")
    args = parser.parse_args(argv)
    if args.mode == "phantom":
        check_phantom(args.patient, args.seed, args.full, args.model)
    elif args.mode == "cohort":
        check_cohort(args.folder, args.patients.split(",") if args.patients else None)
    else:
        check_scans(args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
