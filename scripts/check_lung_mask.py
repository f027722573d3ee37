"""Check the automatic lung mask on real chest CTs, whole and cut down as real scans often are.

    python scripts/check_lung_mask.py CT [CT ...] [--fov-margin-mm 15] [--bases-fraction 0.35] [--png DIR]

Each CT (file or DICOM folder, read with ``latentharmonize.io.read_ct``) must cover the whole chest. Three cases are
made from it:

- ``whole``: the scan as it is;
- ``fov``: cropped left-right to the lungs' extent less ``--fov-margin-mm`` on each side, so the lungs touch the edge
  of the field of view on most slices (a reconstruction cropped to the body, as in CT angiography);
- ``bases``: the slices below ``--bases-fraction`` of the lungs' height, so only the lung bases and the upper
  abdomen remain (an abdominal CT).

The reference is a careful threshold segmentation of the whole scan, independent of the automatic mask: air (below
-400 HU, padding aside) not connected in-plane to the image border (directly or through the padding), its 3D
components of at least 10 % of the largest (the lungs, with trachea and main bronchi), holes filled slice by slice
(vessels). Every other air region
inside the body of at least 1 mL is gas (stomach, bowel, oesophagus). Crops of the reference are the reference of the
crops. For each case the script prints the automatic mask's volume against the reference, Dice, the mL of gas it
labels lung, and the warnings of ``assess_mask``. With ``--png DIR`` it also writes a coronal picture per case.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from latentharmonize.errors import LatentHarmonizeError
from latentharmonize.io import read_ct
from latentharmonize.lungmask import (AIR_HU, KEEP_FRACTION, PAD_HU, assess_mask, lung_volumes_ml,
                                      segment_lungs_detailed)
from latentharmonize.evaluation.metrics import mask_dice

IN_PLANE = np.pad(ndimage.generate_binary_structure(2, 1)[None], ((1, 1), (0, 0), (0, 0)))


def reference(ct: sitk.Image) -> tuple:
    """(lung, gas) boolean [z, y, x] arrays of a whole-chest scan (see the module docstring)."""
    hu = sitk.GetArrayViewFromImage(ct)
    low = hu < AIR_HU  # air, and the padding outside the reconstruction circle that joins it to the border
    inside = np.zeros_like(low)
    for k in range(low.shape[0]):  # slice by slice: a full-size 3D label image of all air would be large
        labels, _ = ndimage.label(low[k])
        border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        inside[k] = (labels > 0) & ~np.isin(labels, border) & (hu[k] > PAD_HU)
    labels, _ = ndimage.label(inside)
    voxel_ml = float(np.prod(ct.GetSpacing())) / 1000.0
    volumes = np.bincount(labels.ravel())[1:] * voxel_ml
    lung_ids = 1 + np.flatnonzero(volumes >= KEEP_FRACTION * volumes.max())
    lung = ndimage.binary_fill_holes(np.isin(labels, lung_ids), IN_PLANE)
    gas = np.isin(labels, 1 + np.flatnonzero(volumes >= 1.0)) & ~lung
    return lung, gas


def cases(ct: sitk.Image, lung: np.ndarray, fov_margin_mm: float, bases_fraction: float) -> dict:
    """name -> (index box (z, y, x) slices of the whole scan)."""
    z, x = [np.flatnonzero(lung.any(axis=axes)) for axes in ((1, 2), (0, 1))]
    margin = int(round(fov_margin_mm / ct.GetSpacing()[0]))
    everything = (slice(None),) * 3
    fov = (slice(None), slice(None), slice(x[0] + margin, x[-1] + 1 - margin))
    top = z[0] + int(round(bases_fraction * (z[-1] - z[0])))
    if ct.GetDirection()[8] < 0:  # slices run superior to inferior: the bases are at the high indices
        top = z[-1] - int(round(bases_fraction * (z[-1] - z[0])))
        bases = (slice(top, None), slice(None), slice(None))
    else:
        bases = (slice(None, top + 1), slice(None), slice(None))
    return {"whole": everything, "fov": fov, "bases": bases}


def crop(image: sitk.Image, box: tuple) -> sitk.Image:
    z, y, x = box
    return image[x, y, z]


def coronal_png(ct: sitk.Image, mask: np.ndarray, ref: np.ndarray, path: Path) -> None:
    """Coronal slice through the lungs: CT in a lung window, mask in red, reference outline in green."""
    hu = sitk.GetArrayViewFromImage(ct)
    y = int(np.median(np.flatnonzero(ref.any(axis=(0, 2))))) if ref.any() else hu.shape[1] // 2
    grey = np.clip((hu[:, y, :].astype(np.float32) + 1200) / 1400 * 255, 0, 255)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    rgb[mask[:, y, :], 0] = 255
    edge = ref[:, y, :] & ~ndimage.binary_erosion(ref[:, y, :])
    rgb[edge] = (0, 255, 0)
    image = sitk.GetImageFromArray(np.flipud(rgb).astype(np.uint8), isVector=True)
    sx, _, sz = ct.GetSpacing()
    image.SetSpacing((sx, sz))
    size = [int(round(n * s)) for n, s in zip(image.GetSize(), (sx, sz))]  # 1 px per mm
    sitk.WriteImage(sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, (0, 0), (1.0, 1.0)), str(path))


def check(path: str, args) -> None:
    ct = read_ct(path)
    lung, gas = reference(ct)
    voxel_ml = float(np.prod(ct.GetSpacing())) / 1000.0
    print(f"\n{path}: {ct.GetSize()} voxels of {', '.join(f'{s:.2f}' for s in ct.GetSpacing())} mm; reference lung "
          f"{np.count_nonzero(lung) * voxel_ml:.0f} mL, gas inside the body {np.count_nonzero(gas) * voxel_ml:.0f} mL")
    for name, box in cases(ct, lung, args.fov_margin_mm, args.bases_fraction).items():
        part, ref, gas_part = crop(ct, box), lung[box], gas[box]
        ref_ml = np.count_nonzero(ref) * voxel_ml
        started = time.perf_counter()
        try:
            found = segment_lungs_detailed(part)
        except LatentHarmonizeError as error:
            print(f"  {name:<6} reference {ref_ml:6.0f} mL; refused: {error}")
            continue
        seconds = time.perf_counter() - started
        mask = sitk.GetArrayViewFromImage(found.lungs) > 0
        volume = lung_volumes_ml(found.lungs)
        try:
            assessment = assess_mask(found.lungs, part, found.excluded_air_ml)
            warnings = [w["code"] for w in assessment.warnings]
            warnings.append(f"lungs fill {100 * assessment.body_fraction:.0f} % of the body")
        except LatentHarmonizeError as error:
            warnings = [f"refused: {error}"]
        print(f"  {name:<6} reference {ref_ml:6.0f} mL, mask {volume['total']:6.0f} mL ({volume['right']:.0f} R, "
              f"{volume['left']:.0f} L), {100 * (volume['total'] / ref_ml - 1):+5.1f} %, Dice {mask_dice(mask, ref):.3f}, "
              f"gas labelled lung {np.count_nonzero(mask & gas_part) * voxel_ml:.1f} mL, gas left out "
              f"{found.excluded_air_ml:.0f} mL, {seconds:.1f} s; {'; '.join(warnings)}")
        if args.png:
            Path(args.png).mkdir(parents=True, exist_ok=True)
            coronal_png(part, mask, ref, Path(args.png) / f"{Path(path).stem}_{name}.png")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ct", nargs="+", help="whole-chest CT files or DICOM folders")
    parser.add_argument("--fov-margin-mm", type=float, default=15.0,
                        help="in-plane crop inside the lungs' extent, each side (default 15)")
    parser.add_argument("--bases-fraction", type=float, default=0.35,
                        help="keep the slices below this fraction of the lungs' height (default 0.35)")
    parser.add_argument("--png", default=None, help="folder for coronal pictures (mask red, reference green)")
    args = parser.parse_args(argv)
    try:
        for path in args.ct:
            check(path, args)
    except LatentHarmonizeError as error:  # an unreadable scan: say so, no traceback
        print(f"check_lung_mask: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
