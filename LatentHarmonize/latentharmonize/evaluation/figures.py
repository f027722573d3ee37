"""The evaluation's figures: consistency and probe bars, one patient's label maps, Kaplan-Meier, risk
reproducibility, PCA of the latents by acquisition, and decoded traversals."""
from __future__ import annotations

from typing import List

import numpy as np
import pandas as pd
import torch
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from sklearn.decomposition import PCA

from ..clusters import PALETTE
from ..survival import plot_km_by_risk
from .encoding import ScanLatents, stack
def _figure(width: float, height: float):
    return Figure(figsize=(width, height), dpi=100)


def _save(fig, path) -> None:
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})


def plot_consistency(cons: dict, probe_acc: dict, path) -> None:
    names = list(cons)
    fig = _figure(10, 3.8)
    ax = fig.add_subplot(1, 2, 1)
    width = 0.27
    for j, m in enumerate(("ari", "nmi", "dice")):
        means = np.array([cons[n][m] for n in names])
        ci = np.array([cons[n][f"{m}_ci"] for n in names]).T
        ax.bar(np.arange(len(names)) + (j - 1) * width, means, width, yerr=np.abs(ci - means), capsize=2, label=m.upper())
    ax.set_xticks(np.arange(len(names)), names, rotation=35, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_title("Cluster consistency across acquisitions (95 % CI)", fontsize=9)
    ax.legend(fontsize=8)
    ax2 = fig.add_subplot(1, 2, 2)
    ax2.bar(np.arange(len(names)), [probe_acc.get(n, np.nan) for n in names], color="#777777")
    ax2.axhline(probe_acc["chance"], color="#d55e00", ls="--", label="chance")
    ax2.set_xticks(np.arange(len(names)), names, rotation=35, ha="right", fontsize=8)
    ax2.set_ylim(0, 1)
    ax2.set_title("Acquisition probe accuracy (lower is better)", fontsize=9)
    ax2.legend(fontsize=8)
    _save(fig, path)


def plot_label_maps(scans: List[ScanLatents], with_truth: bool, path) -> None:
    """Cluster labels of one patient on one axial lattice plane: rows = representations, columns = acquisitions.

    Points are placed by their physical keys, so a pixel is the same place in every column; within a row a colour is
    one cluster (the clusters of a representation are shared by all scans).
    """

    reps = ["entangled", "rotated"] + (["truth"] if with_truth else [])
    planes, counts = np.unique(scans[0].keys[:, 2], return_counts=True)
    plane = int(planes[counts.argmax()])  # the axial plane with the most lung
    keys = np.concatenate([s.keys for s in scans])
    steps = [np.diff(np.unique(keys[:, a])) for a in (0, 1)]
    step = int(min(d[d > 0].min() if (d > 0).any() else 1 for d in steps))
    lo = keys[:, :2].min(axis=0)
    shape = ((keys[:, 1].max() - lo[1]) // step + 1, (keys[:, 0].max() - lo[0]) // step + 1)
    colours = ["#ffffff"] + list(PALETTE)
    cmap = ListedColormap(colours)
    fig = _figure(2.2 * len(scans), 2.2 * len(reps))
    for r, rep in enumerate(reps):
        for c, s in enumerate(scans):
            image = np.zeros(shape, dtype=np.int64)
            sel = s.keys[:, 2] == plane
            values = s.truth if rep == "truth" else s.labels[rep]
            image[(s.keys[sel, 1] - lo[1]) // step, (s.keys[sel, 0] - lo[0]) // step] = values[sel]
            ax = fig.add_subplot(len(reps), len(scans), r * len(scans) + c + 1)
            ax.imshow(image, cmap=cmap, vmin=0, vmax=len(colours) - 1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(s.acquisition, fontsize=8)
            if c == 0:
                ax.set_ylabel(rep, fontsize=8)
    fig.suptitle(f"Patient {scans[0].patient}, z = {plane / 1000:.1f} mm (colour = cluster of that row)",
                 fontsize=8)
    _save(fig, path)


def plot_latent_pca(eval_scans: List[ScanLatents], bundle, samples: int, seed: int, path) -> None:
    """2-D PCA of held-out latents coloured by acquisition: entangled vs the rotated coordinates clusters see."""
    rng = np.random.default_rng(seed)
    share = max(samples // len(eval_scans), 1)
    picks = [np.sort(rng.choice(len(s.keys), size=min(share, len(s.keys)), replace=False)) for s in eval_scans]
    X = np.concatenate([s.latents["entangled"][p] for s, p in zip(eval_scans, picks)]).astype(np.float64)
    rotated = np.concatenate([bundle.rotation.cluster_features(s.latents["entangled"])[p] for s, p in zip(eval_scans, picks)])
    acq = np.concatenate([np.full(len(p), s.acquisition) for s, p in zip(eval_scans, picks)])
    fig = _figure(9, 4)
    for k, (title, Z) in enumerate((("entangled latent", X), ("rotated coordinates the clusters see", rotated))):
        P = PCA(n_components=2, random_state=seed).fit_transform(Z)
        ax = fig.add_subplot(1, 2, k + 1)
        for a in np.unique(acq):
            ax.scatter(P[acq == a, 0], P[acq == a, 1], s=3, alpha=0.5, label=a)
        ax.set_title(f"PCA of {title}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.axes[0].legend(fontsize=7, markerscale=3)
    _save(fig, path)


def plot_traversals(bundle, train: List[ScanLatents], rows, path, steps=(-3, -2, -1, 0, 1, 2, 3)) -> dict:
    """Decode latents moved along the top technical and top biological direction (in SDs of the training latents)."""
    X, _ = stack(train, rows, "entangled")
    rot = bundle.rotation
    directions = {"technical 1": rot.rotation_[:, 0]} if rot.n_technical_ > 0 else {}
    directions["biological 1"] = rot.rotation_[:, rot.n_technical_]
    decoder = bundle.decoder("cpu")
    latent_dim = int(bundle.manifest["encoder"]["latent_dim"])
    centre = np.median(X, axis=0)
    fig = _figure(1.3 * len(steps), 1.5 * len(directions))
    sds = {}
    for r, (name, v) in enumerate(directions.items()):
        sd = float(np.std(X @ v))
        sds[name] = sd
        batch = np.stack([centre + t * sd * v for t in steps]).astype(np.float32)
        batch = batch[:, :latent_dim]  # the decoder takes the encoder's latent, without appended densitometry
        with torch.inference_mode():
            patches = decoder(torch.from_numpy(batch)).numpy()
        window = bundle.spec.hu_window
        for c, t in enumerate(steps):
            ax = fig.add_subplot(len(directions), len(steps), r * len(steps) + c + 1)
            mid = patches[c, patches.shape[1] // 2] * (window[1] - window[0]) + window[0]
            ax.imshow(mid, cmap="gray", vmin=-1000, vmax=-400)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"{t:+d} SD", fontsize=8)
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.suptitle("Decoded latent traversals (lung window -1000..-400 HU)", fontsize=8)
    _save(fig, path)
    return sds


def plot_km(table: pd.DataFrame, risks: dict, path) -> dict:
    if "rotated" not in risks:  # no Cox model could be fitted: one curve of all patients
        return plot_km_by_risk(table["time"], table["event"], np.zeros(len(table)), path, title="Kaplan-Meier (no risk model)")
    return plot_km_by_risk(table["time"], table["event"], risks["rotated"], path, title="Kaplan-Meier by risk (rotated composition)")


def plot_risk_reproducibility(summary: dict, data: dict, path, reason: str = "") -> None:
    """ICC of the predicted risk across acquisitions per feature set, and for entangled, rotated and the HU
    thresholds each patient's risk under every acquisition (a patient's points should coincide). Without a
    measurement, a figure that says why (``reason``)."""
    if not summary:
        fig = _figure(6, 1.5)
        fig.text(0.5, 0.5, f"Risk reproducibility not measured: {reason}", ha="center", va="center", fontsize=8,
                 wrap=True)
        _save(fig, path)
        return
    names = list(summary)
    shown = [n for n in ("entangled", "rotated", "hu_thresholds") if n in data["risks"]]
    fig = _figure(3.2 * (1 + len(shown)), 3.6)
    ax = fig.add_subplot(1, 1 + len(shown), 1)
    icc = np.array([summary[n]["icc"] for n in names])
    ci = np.array([summary[n]["icc_ci"] for n in names]).T
    ax.bar(np.arange(len(names)), icc, yerr=np.abs(ci - icc), capsize=2, color="#777777")
    ax.set_xticks(np.arange(len(names)), names, rotation=35, ha="right", fontsize=8)
    ax.set_ylim(min(0.0, float(np.nanmin(ci))), 1)
    ax.set_title("Risk ICC across acquisitions (95 % CI)", fontsize=9)
    for k, name in enumerate(shown):
        risk = data["risks"][name]
        z = (risk - risk.mean()) / (risk.std() or 1.0)
        order = np.argsort(z.mean(axis=1))
        ax = fig.add_subplot(1, 1 + len(shown), k + 2)
        x = np.arange(len(order))
        ax.vlines(x, z[order].min(axis=1), z[order].max(axis=1), color="#bbbbbb", lw=1)
        for j, acquisition in enumerate(data["acquisitions"]):
            ax.scatter(x, z[order, j], s=10, label=acquisition)
        ax.set_title(f"{name}: ICC {summary[name]['icc']:.2f}", fontsize=9)
        ax.set_xlabel("patient (by mean risk)", fontsize=8)
        ax.set_ylabel("log risk (SD units)", fontsize=8)
        ax.set_xticks([])
    if shown:
        fig.axes[1].legend(fontsize=6, markerscale=1.5)
    _save(fig, path)
