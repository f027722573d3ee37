"""Small harness for representation experiments (issue 19): tissue and consistency of several clusterings.

Encodes a training and a test cohort with each given bundle once, then, for each representation, fits the tissue
clusters as ``train`` and ``evaluate`` do (``fit_named_clusters``: K mixture components, seeded, widened by the
representation's acquisition covariance on the training pairs, named from their patches' HU and merged by name) on a seeded subsample of training latents and measures on the test scans
what ``evaluate`` measures: consistency across acquisitions (ARI, NMI, Dice), agreement with the phantom truth,
emphysema recall into the low-attenuation cluster and abnormal tissue outside the normal cluster (worst
acquisition), the low-attenuation share's soft-to-sharp change beside LAA-950, the acquisition probe, and the
emphysema-versus-normal separation d' of a linear discriminant. No survival, no harmonization baselines: minutes.

Representations per bundle: ``entangled``, ``rotated`` (the bundle's cluster features), and their texture-prototype
variants (``+prototypes``: many k-means micro-clusters, then the tissue clusters of each point's local histogram of
micro-clusters, after Yang, Angelini et al.'s lung texture patterns); once per run: ``hu_statistics`` (the patch
HU statistics reference), its prototype variant, ``smoothed_hu_statistics`` (the same statistics of the scan after
an in-plane Gaussian blur of ``--smooth-mm``, which takes most of a sharp kernel's extra noise out before the
thresholds count it, a crude kernel normalisation), ``calibrated_smoothed_hu_statistics`` (the same after the
air/fat HU calibration of ``train --calibrate``, which takes the vendor's offset out) and the equal-scale
``hu_threshold_classes``.

    python scripts/representation_harness.py --train TRAIN.csv --test TEST.csv --model A --model B --out r.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from latentharmonize.bundle import load_bundle
from latentharmonize.cohort import read_cohort
from latentharmonize.patches import lattice_hu_statistics
from latentharmonize.evaluation.consistency import consistency, consistency_per_patient, probe, truth_agreement
from latentharmonize.evaluation.encoding import Encoders, encode_row, load_volumes, training_rows
from latentharmonize.evaluation.evaluate import select_patients
from latentharmonize.clusters import fit_named_clusters
from latentharmonize.evaluation.representations import (patch_statistics, training_acquisition_covariance,
                                                       training_naming_statistics)
from latentharmonize.evaluation.tissue import (PATCH_MEAN_HU, THRESHOLD_BASELINE, kernel_robustness, reference_clusters,
                                               threshold_classes, tissue_recall)
from latentharmonize.patches import DenseLatents, aggregate_context
from latentharmonize.tissue import TISSUE_LABELS


def prototype_features(micro, n_micro: int, radius: int):
    """f(scan, features) -> each point's share of every micro-cluster within ``radius`` lattice steps in-plane."""
    def features(scan, x):
        onehot = np.eye(n_micro, dtype=np.float32)[micro.predict(x)]
        return aggregate_context(DenseLatents(latents=onehot, positions=scan.positions, lattice=None), radius).latents
    return features


def add_smoothed_statistics(scan, row, spec, smooth_mm: float) -> None:
    """``scan.latents["smoothed_hu_statistics"]`` and ``["calibrated_smoothed_hu_statistics"]``: patch HU statistics
    of the in-plane blurred scan, without and with the air/fat calibration, context-averaged."""
    from scipy.ndimage import gaussian_filter

    for name, calibration in (("smoothed_hu_statistics", None), ("calibrated_smoothed_hu_statistics", "air_fat")):
        hu, lung, _, _, _ = load_volumes(row, replace(spec, calibration=calibration))
        sigma = smooth_mm / np.asarray(spec.spacing[:2])[::-1]
        blurred = gaussian_filter(np.where(lung, hu, -850.0), sigma=(0, *sigma))
        stats = lattice_hu_statistics(blurred, lung, scan.positions, spec)
        dense = DenseLatents(latents=stats, positions=scan.positions, lattice=None)
        scan.latents[name] = aggregate_context(dense, int(spec.context_radius)).latents


def emphysema_dprime(train_x, train_truth, test_x, test_truth) -> float:
    """d' of a linear discriminant (fitted on training cells) between emphysema and normal test cells."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    e, n = TISSUE_LABELS["emphysema"], TISSUE_LABELS["normal"]
    keep = np.isin(train_truth, (e, n))
    lda = LinearDiscriminantAnalysis().fit(train_x[keep], train_truth[keep])
    proj = lda.transform(test_x)[:, 0]
    a, b = proj[test_truth == e], proj[test_truth == n]
    return float(abs(a.mean() - b.mean()) / np.sqrt(0.5 * (a.var() + b.var())))


def truth_by_cluster(test, name: str, cluster_names) -> dict:
    """Per cluster of representation ``name`` on the test scans: its share of the lung points and, per true
    tissue, the share of that tissue's points it holds (what a seed or a setting moves between clusters)."""
    labels = np.concatenate([s.labels[name] for s in test])
    truth = np.concatenate([s.truth for s in test])
    out = {}
    for k, cluster in enumerate(cluster_names, start=1):
        here = labels == k
        out[cluster] = {"share": round(float(here.mean()), 3),
                        **{t: round(float(here[truth == v].mean()), 3) for t, v in TISSUE_LABELS.items() if (truth == v).any()}}
    return out


def measure(funcs: dict, train, test, rows, k: int, seed: int, n_micro: int, radius: int) -> dict:
    """Fit and measure every representation of ``funcs`` (plus prototype variants unless ``n_micro`` is 0)."""
    from sklearn.cluster import KMeans
    from sklearn.preprocessing import StandardScaler

    for name, f in list(funcs.items()) if n_micro else []:
        X = np.concatenate([f(train[i])[r] for i, r in rows.items()])
        micro = KMeans(n_clusters=n_micro, n_init=2, random_state=seed).fit(StandardScaler().fit(X).transform(X))
        scaler = StandardScaler().fit(X)

        class Micro:  # micro-clusters of standardised features
            def predict(self, x, _s=scaler, _m=micro):
                return _m.predict(_s.transform(x))
        proto = prototype_features(Micro(), n_micro, radius)
        funcs[f"{name}+prototypes"] = (lambda g, p: lambda s: p(s, g(s)))(f, proto)
    out = {}
    stats = training_naming_statistics(train, rows)
    truth_train = np.concatenate([train[i].truth[r] for i, r in rows.items()])
    truth_test = np.concatenate([s.truth for s in test])
    for name, f in funcs.items():
        t0 = time.perf_counter()
        train_features = [f(s) for s in train]
        X = np.concatenate([train_features[i][r] for i, r in rows.items()])
        clusters, _, _, cluster_names = fit_named_clusters(
            X, stats, k, seed, order_by=stats["mean_hu"],
            acquisition_covariance=training_acquisition_covariance(train, train_features))
        for s in train + test:
            s.labels[name] = np.asarray(clusters.predict(f(s)))
        out[name] = {"dprime_emphysema": emphysema_dprime(X, truth_train, np.concatenate([f(s) for s in test]), truth_test),
                     "truth_by_cluster": truth_by_cluster(test, name, cluster_names),
                     "seconds": round(time.perf_counter() - t0, 1)}
    for s in train + test:
        s.labels[THRESHOLD_BASELINE] = threshold_classes(s.latents[PATCH_MEAN_HU])
    names = list(funcs) + [THRESHOLD_BASELINE]
    cons = consistency(consistency_per_patient(test, names), n_boot=200, seed=seed)
    truth = truth_agreement(test, names, n_boot=200, seed=seed)
    refs = reference_clusters(train, names)
    recall = tissue_recall(test, refs)
    kernel = kernel_robustness(test, refs)
    probes = probe(test, funcs, 4000, seed)
    for n in names:
        out.setdefault(n, {}).update({
            "consistency": {m: round(cons[n][m], 3) for m in ("ari", "nmi", "dice")},
            "truth_ari": round(truth[n]["ari"], 3), "truth_nmi": round(truth[n]["nmi"], 3),
            "recall_min": {k2: round(v, 3) for k2, v in recall[n]["min"].items()},
            "recall_per_acquisition": {a: round(v.get("emphysema_recall", float("nan")), 3)
                                       for a, v in recall[n]["per_acquisition"].items()},
            "normal_median_hu": round(refs[n]["normal_median_hu"], 1),
            "low_attenuation_median_hu": refs[n]["low_attenuation_median_hu"],
            "kernel_change_points": round(kernel[n]["mean_abs_change_points"], 2) if n in kernel else None,
            "probe": round(probes[n], 3) if n in probes else None})
    out["laa950_kernel_change_points"] = round(kernel["laa950"]["mean_abs_change_points"], 2) if kernel else None
    out["probe_chance"] = round(probes["chance"], 3)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", required=True)
    parser.add_argument("--test", required=True)
    parser.add_argument("--model", action="append", required=True, help="bundle folder (repeatable)")
    parser.add_argument("--out", type=Path, required=True, help="JSON file of the results")
    parser.add_argument("--k", type=int, default=None, help="mixture components (default: each bundle's own)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-latents", type=int, default=20000)
    parser.add_argument("--micro", type=int, default=32, help="micro-clusters of the prototype variants (0: none)")
    parser.add_argument("--radius", type=int, default=2, help="lattice steps of the local micro-cluster histogram")
    parser.add_argument("--smooth-mm", type=float, default=2.0, help="in-plane Gaussian SD of smoothed_hu_statistics")
    parser.add_argument("--skip-statistics", action="store_true", help="bundle representations only")
    parser.add_argument("--train-patients", type=int, default=None)
    parser.add_argument("--test-patients", type=int, default=None)
    args = parser.parse_args(argv)
    train_rows = select_patients(read_cohort(args.train), args.train_patients)
    test_rows = select_patients(read_cohort(args.test), args.test_patients)
    results = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    base = None
    for model in args.model:
        bundle = load_bundle(model)
        encoders = Encoders(bundle, statistics=patch_statistics())
        train = [encode_row(r, "train", encoders)[0] for _, r in train_rows.iterrows()]
        test = [encode_row(r, "eval", encoders)[0] for _, r in test_rows.iterrows()]
        rows = training_rows(train, args.train_latents, args.seed)
        if base is None and not args.skip_statistics:
            for scans, table in ((train, train_rows), (test, test_rows)):
                for scan, (_, row) in zip(scans, table.iterrows()):
                    add_smoothed_statistics(scan, row, bundle.spec, args.smooth_mm)
        funcs = {"entangled": lambda s: s.latents["entangled"].astype(np.float64),
                 "rotated": (lambda b: lambda s: b.rotation.cluster_features(s.latents["entangled"]))(bundle)}
        if base is None and not args.skip_statistics:  # the histogram references once: they do not depend on the bundle
            from sklearn.preprocessing import StandardScaler
            for source in ("hu_statistics", "smoothed_hu_statistics", "calibrated_smoothed_hu_statistics"):
                st = StandardScaler().fit(np.concatenate([train[i].latents[source][r] for i, r in rows.items()]))
                funcs[source] = (lambda src, fitted: lambda s: fitted.transform(s.latents[src]))(source, st)
            base = model
        k = args.k or bundle.clusters.n_components_
        results[str(model)] = measure(funcs, train, test, rows, k, args.seed, args.micro, args.radius)
        print(json.dumps({str(model): results[str(model)]}, indent=1), flush=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
