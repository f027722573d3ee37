#!/usr/bin/env python3
"""Train the default model bundle shipped in LatentHarmonize/Resources/Models/default.

Generates the phantom cohort (fixed seed) in a temporary folder, runs the same code as
``latentharmonize train`` on it, and writes the bundle. Reproducible: fixed seeds, an epoch budget, a fixed
thread count and a fixed creation date (SOURCE_DATE_EPOCH) give the same bundle bytes on the same platform.
About five minutes on one CPU thread (4.5 min measured on a busy 2-core machine, 7 min beside two other jobs).

    .venv/bin/python scripts/train_default_bundle.py [--patients 10] [--epochs 20] [--encoder ae] [--out DIR]
        [--no-calibrate] [--densitometry WEIGHT] [--densitometry-smooth MM] [--[no-]densitometry-smooth-total]
        [--technical-weight W] [--lowpass MM] [--lowpass-noise HU] [--clusters K] [--second-stage K]
        [--depth-contrast HU]

The representation options are those of ``latentharmonize train`` and default to the shipped bundle's: HU
calibration on each scan's air and fat, patch densitometry of weight 1 read from the lung smoothed in-plane to a
total 2.5 mm Gaussian, the encoder's low-pass included (``docs/experiments/2026-12-04-representation.md``: the
option that finds emphysema and stays kernel-robust on real scans; the total,
``docs/experiments/2026-12-05-total-densitometry-blur.md``), an in-plane low-pass of at least 1 mm on what the
encoder reads, raised per scan until its soft tissue's noise is at most 1.3 HU
(``docs/experiments/2026-12-05-noise-matched-lowpass.md``), 5 mixture components, merged by name into the tissue
clusters (``docs/experiments/2026-12-04-mixture-clusters.md``), and a 4-component second stage on the raised side
(``docs/experiments/2026-12-06-two-stage-clusters.md``), whose ground-glass-like and reticular-like patches must stand
50 HU above the lung at their depth (``docs/experiments/2026-12-07-depth-contrast.md``).
Other values train a candidate the same reproducible way into another ``--out``. The shipped bundle is this script's
output with the defaults, on today's code (``docs/experiments/2026-12-06-default-from-scratch.md``).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "LatentHarmonize" / "Resources" / "Models" / "default"
CREATED = "1767225600"  # 2026-01-01 UTC: the manifest's creation date, fixed for reproducible bytes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="bundle folder (default: the shipped one)")
    parser.add_argument("--patients", type=int, default=10, help="phantom patients (default 10)")
    parser.add_argument("--seed", type=int, default=2026, help="phantom and training seed (default 2026)")
    parser.add_argument("--epochs", type=int, default=20, help="training epochs (default 20)")
    parser.add_argument("--encoder", default="ae", choices=["ae", "vae", "unoranic"])
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: fixed for reproducible bytes, and fastest on a busy machine)")
    parser.add_argument("--clusters", type=int, default=5,
                        help="mixture components, merged by name into the tissue clusters (default 5)")
    parser.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=True,
                        help="calibrate each scan's HU on its own air and fat references before encoding (default on)")
    parser.add_argument("--densitometry", type=float, default=1.0, metavar="WEIGHT",
                        help="weight of the patch densitometry appended to the latent before the rotation (default 1)")
    parser.add_argument("--densitometry-smooth", type=float, default=2.5, metavar="MM",
                        help="in-plane Gaussian sigma (mm) before the densitometry (default 2.5)")
    parser.add_argument("--densitometry-smooth-total", action=argparse.BooleanOptionalAction, default=True,
                        help="make --densitometry-smooth the total blur, the encoder's low-pass included (default on)")
    parser.add_argument("--densitometry-read-z", type=float, default=2.5, metavar="MM",
                        help="through-plane Gaussian SD (mm) at which analysis reads each scan's densitometry, its "
                             "slices included; fitted on the scans as acquired (default 2.5, that of 5 mm slices; 0: "
                             "each scan as acquired)")
    parser.add_argument("--technical-weight", type=float, default=0.1, metavar="W",
                        help="weight of the scan-re-centred technical coordinates in the clusters (default 0.1)")
    parser.add_argument("--lowpass", type=float, default=1.0, metavar="MM",
                        help="in-plane Gaussian sigma (mm) of every scan on the model grid before encoding (default 1)")
    parser.add_argument("--lowpass-noise", type=float, default=1.3, metavar="HU",
                        help="raise each scan's blur from --lowpass until its soft-tissue noise is at most HU "
                             "(default 1.3; 0: every scan gets --lowpass)")
    parser.add_argument("--second-stage", type=int, default=4, metavar="K",
                        help="components of the clusters' second stage on the raised side (default 4; 0: none)")
    parser.add_argument("--depth-contrast", type=float, default=50.0, metavar="HU",
                        help="how far above the lung at its depth a patch must stand to be named ground-glass-like or "
                             "reticular-like (default 50; -1: no such test)")
    args = parser.parse_args(argv)

    os.environ.setdefault("SOURCE_DATE_EPOCH", CREATED)
    import torch

    torch.set_num_threads(args.threads)
    from latentharmonize.phantom import generate_cohort
    from latentharmonize.training import TrainConfig, train
    from latentharmonize.training.checkpoints import CHECKPOINT_DIR
    from latentharmonize.training.summary import format_summary

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lh-default-cohort-") as tmp:
        generate_cohort(tmp, n_patients=args.patients, seed=args.seed)
        print(f"phantom cohort: {args.patients} patients in {time.perf_counter() - t0:.0f} s", flush=True)
        config = TrainConfig(seed=args.seed, epochs=args.epochs, encoder=args.encoder, device="cpu",
                             clusters=args.clusters, calibrate=args.calibrate, densitometry=args.densitometry,
                             densitometry_smooth_mm=args.densitometry_smooth,
                             densitometry_smooth_total=args.densitometry_smooth_total,
                             densitometry_read_z_mm=args.densitometry_read_z,
                             technical_weight=args.technical_weight, lowpass_mm=args.lowpass,
                             lowpass_noise_hu=args.lowpass_noise or None, second_stage=args.second_stage or None,
                             depth_contrast_hu=None if args.depth_contrast < 0 else args.depth_contrast)
        summary = train(Path(tmp) / "cohort.csv", args.out, config, overwrite=True)
    shutil.rmtree(args.out / CHECKPOINT_DIR, ignore_errors=True)  # only needed to resume; not shipped
    print(format_summary(summary))
    print(f"bundle written to {args.out} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
