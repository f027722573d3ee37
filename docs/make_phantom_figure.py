"""Draw Resources/phantom_acquisitions.png: one phantom patient under each default acquisition, side by side.

Top row: the same axial slice (same physical height) of every acquisition, lung window. Bottom row: a zoom on the
lung, where kernel, dose, vendor and slice thickness change texture and density. Last column: the tissue truth.
Run from the repository root: ``.venv/bin/python docs/make_phantom_figure.py [--patient 4 --seed 0]``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402

from latentharmonize import phantom as ph  # noqa: E402
from latentharmonize.tissue import TISSUES  # noqa: E402

WINDOW = (-1350, 150)  # lung window: level -600, width 1500
TISSUE_COLOURS = ["#000000", "#8c8c8c", "#4477aa", "#ccbb44", "#ee6677", "#aa3377", "#66ccee"]
OUT = Path(__file__).resolve().parents[1] / "Resources" / "phantom_acquisitions.png"


def pick_slice(truth: np.ndarray) -> int:
    """The axial slice showing the most tissue types (ties: the most diseased lung)."""
    scores = []
    for z in range(truth.shape[0]):
        labels = truth[z][truth[z] > 0]
        counts = np.bincount(labels, minlength=len(TISSUES) + 1)[2:]
        scores.append(((counts > 50).sum(), counts.sum()))
    return int(max(range(len(scores)), key=lambda z: scores[z]))


def zoom_box(truth_slice: np.ndarray, size: int) -> tuple:
    """Square (y0, x0) on the lung (image half) showing the most tissue types."""
    half = truth_slice.shape[1] // 2
    sides = [np.where(np.arange(truth_slice.shape[1]) < half, truth_slice, 0),
             np.where(np.arange(truth_slice.shape[1]) >= half, truth_slice, 0)]
    side = max(sides, key=lambda t: (len(np.unique(t[t > 0])), (t > 1).sum()))
    ys, xs = np.nonzero(side > 0)
    cy, cx = int(np.median(ys)), int(np.median(xs))
    ny, nx = truth_slice.shape
    return (int(np.clip(cy - size // 2, 0, ny - size)), int(np.clip(cx - size // 2, 0, nx - size)))


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patient", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)

    patient = ph.make_patient(args.patient, args.seed)
    images = ph.acquire_all(patient, ph.DEFAULT_ACQUISITIONS)
    truth_img = patient.truth
    truth = sitk.GetArrayFromImage(truth_img)
    z_fine = pick_slice(truth)
    z_mm = truth_img.TransformIndexToPhysicalPoint((0, 0, z_fine))[2]
    size = truth.shape[1] // 3
    y0, x0 = zoom_box(truth[z_fine], size)

    n = len(images) + 1
    fig, axes = plt.subplots(2, n, figsize=(3.2 * n, 6.6), facecolor="black",
                             gridspec_kw={"height_ratios": [1, 1], "hspace": 0.12, "wspace": 0.04})
    for col, (acq, image) in enumerate(zip(ph.DEFAULT_ACQUISITIONS, images)):
        volume = sitk.GetArrayFromImage(image)
        k = image.TransformPhysicalPointToIndex((0.0, 0.0, z_mm))[2]
        lung = sitk.GetArrayFromImage(sitk.Resample(truth_img, image, sitk.Transform(), sitk.sitkNearestNeighbor)) > 0
        ei = 100.0 * (volume[lung] < -950).mean()
        axes[0, col].imshow(volume[k], cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1], interpolation="nearest")
        axes[0, col].add_patch(Rectangle((x0, y0), size, size, fill=False, edgecolor="#ffcc00", linewidth=1))
        axes[0, col].set_title(f"{acq.name}\n{acq.kernel} kernel, vendor {acq.vendor}, {acq.dose_mAs:g} mAs, "
                               f"{acq.thickness_mm:g} mm\nemphysema index {ei:.1f} %", color="white", fontsize=8)
        axes[1, col].imshow(volume[k, y0:y0 + size, x0:x0 + size], cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1],
                            interpolation="nearest")
    cmap = ListedColormap(TISSUE_COLOURS)
    anatomy = sitk.GetArrayFromImage(patient.hu)[z_fine]
    axes[0, -1].imshow(anatomy, cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1], interpolation="nearest")
    axes[0, -1].set_title(f"anatomy before acquisition\n{patient.patient_id}, {patient.phenotype} phenotype",
                          color="white", fontsize=8)
    axes[1, -1].imshow(truth[z_fine, y0:y0 + size, x0:x0 + size], cmap=cmap, vmin=0, vmax=len(TISSUES),
                       interpolation="nearest")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    present = sorted(set(np.unique(truth[z_fine, y0:y0 + size, x0:x0 + size])) - {0})
    axes[1, -1].legend(handles=[Patch(color=TISSUE_COLOURS[v], label=TISSUES[v - 1]) for v in present],
                       loc="lower center", bbox_to_anchor=(0.5, -0.42), ncol=2, fontsize=7, frameon=False,
                       labelcolor="white")
    axes[1, 0].set_ylabel("lung zoom", color="white")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, facecolor="black", bbox_inches="tight")
    plt.close(fig)
    return out


if __name__ == "__main__":
    print(main())
