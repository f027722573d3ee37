#!/usr/bin/env python3
"""Paint a 3 cm ball at -980 HU (with the scan's own noise) deep in the right lung of real CTs, analyze each with
the default bundle (or ``--model``) and report which segments the ball's voxels get: issue 19's emphysema check.

    PYTHONPATH=LatentHarmonize .venv/bin/python scripts/emphysema_ball.py CT [CT ...] [--model M]

Each CT is a file or a DICOM series folder. The ball is centred on the point of the right lung farthest from its
border; its voxels are set to -980 HU plus noise drawn from the scan's own lung (each voxel minus the median of its
3 x 3 in-plane neighbourhood, seed 0). The analysis runs in memory on the scan's own lung mask; nothing is written,
so real data stays where it is. It only orchestrates tested library functions, hence no test of its own.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from latentharmonize import analyze_image, load_bundle, read_ct, segment_lungs

BALL_HU, BALL_RADIUS_MM = -980.0, 15.0


def painted_ball(ct: sitk.Image, lungs: sitk.Image) -> tuple:
    """(the CT with the ball painted in, the ball's mask [z, y, x], its depth in mm)."""
    hu = sitk.GetArrayFromImage(ct).astype(np.float32)
    right = sitk.GetArrayFromImage(lungs) == 1
    spacing = np.array(ct.GetSpacing())[::-1]
    depth = ndimage.distance_transform_edt(right, sampling=spacing)
    centre = np.unravel_index(np.argmax(depth), depth.shape)
    zz, yy, xx = np.indices(hu.shape, sparse=True)
    r = np.sqrt(sum(((axis - c) * s) ** 2 for axis, c, s in zip((zz, yy, xx), centre, spacing)))
    ball = (r <= BALL_RADIUS_MM) & right
    noise = hu[right] - ndimage.median_filter(hu, size=(1, 3, 3))[right]
    hu[ball] = BALL_HU + np.random.default_rng(0).choice(noise, size=int(ball.sum()))
    out = sitk.GetImageFromArray(np.round(hu).astype(np.int16))
    out.CopyInformation(ct)
    return out, ball, float(depth[centre])


def ball_shares(path: str, bundle) -> dict:
    ct = read_ct(path)
    lungs = segment_lungs(ct)
    painted, ball, depth = painted_ball(ct, lungs)
    result = analyze_image(painted, bundle, lungs=lungs)
    labels = sitk.GetArrayViewFromImage(result.labels)[ball]
    values, counts = np.unique(labels, return_counts=True)
    return {"scan": path, "ball_voxels": int(ball.sum()), "depth_mm": round(depth, 1),
            "ball_laa950_percent": round(100.0 * float(np.mean(sitk.GetArrayViewFromImage(painted)[ball] < -950)), 1),
            "segment_percent": {result.names.get(int(v), str(int(v))): round(100.0 * c / ball.sum(), 1)
                                for v, c in zip(values, counts)}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ct", nargs="+")
    parser.add_argument("--model", default=None, help="model bundle (default: the bundled default model)")
    args = parser.parse_args(argv)
    bundle = load_bundle(args.model)
    for path in args.ct:
        print(json.dumps(ball_shares(path, bundle)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
