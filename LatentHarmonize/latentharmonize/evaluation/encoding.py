"""Cohort scans to latents: every scan of a cohort table on the model grid, encoded at its valid lattice points.

A :class:`ScanLatents` holds one scan's latents per source (the bundle encoder's ``entangled`` latent, each patch
statistic, each image-level harmonizer's and each other encoder's latent at the same points), its phantom truth,
densitometry and clinical columns; the representations (:mod:`.representations`) and measures read only these.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional

import numpy as np
import pandas as pd

from ..densitometry import lung_hu_indices
from ..errors import InputError
from ..patches import aggregate_context, centre_pixels, core_statistics, encode_dense, point_keys, resolve_device
from ..pipeline import whole_lung_densitometry
from ..progress import Progress
from ..scans import read_scan, read_truth, scan_on_grid
from .tissue import PATCH_MEAN_HU, SETTING_COLUMNS, patch_mean_hu, tissue_in_mask

CLINICAL = ("time", "event", "age", "sex", "fvc")
CORE_STATISTICS = "core_statistics"  # source: each patch's patches.core_statistics, what two-stage clusters read


@dataclass
class ScanLatents:
    """One scan, encoded: latents per source at its valid lattice points, truth and densitometry."""

    patient: str
    acquisition: str
    split: str                      # "train", "eval" or "survival"
    keys: np.ndarray                # int64 [n, 3]: physical micrometres of each patch centre
    positions: np.ndarray           # int [n, 3] (z, y, x) lattice indices
    latents: Dict[str, np.ndarray]  # source ("entangled", "histogram_matching", "unoranic", "hu_statistics") -> [n, d]
    truth: Optional[np.ndarray]     # [n] phantom tissue label at each centre (0: none), or None
    densitometry: Dict[str, float]
    clinical: Dict[str, object]
    labels: Dict[str, np.ndarray] = field(default_factory=dict)  # representation -> cluster label [n]
    readout: Dict[str, np.ndarray] = field(default_factory=dict)  # representation -> read-out tissue label [n]
    setting: Dict[str, object] = field(default_factory=dict)  # acquisition columns of the cohort row (kernel, ...)
    mask_holds: Dict[str, list] = field(default_factory=dict)  # evaluation scans: tissue -> [voxels in the mask, all]


def load_volumes(row: pd.Series, spec):
    """One cohort row on the model grid: HU, parenchyma (the lung without vessels and airways, which is what
    ``analyze`` encodes), grid, truth (or None), and densitometry of the native CT's whole lung."""
    return _read_volumes(row, spec, count_tissue=False)[:5]


def _read_volumes(row: pd.Series, spec, count_tissue: bool):
    """:func:`load_volumes`, then with ``count_tissue`` how much of each true tissue the lung mask holds
    (:func:`tissue.tissue_in_mask`; else empty), then the lung on the model grid, the CT and its lung mask."""
    ct, lungs = read_scan(row)
    truth = read_truth(row)
    scan = scan_on_grid(row, ct, lungs, spec, truth)
    held = tissue_in_mask(truth, ct, lungs) if count_tissue and truth is not None else {}
    return scan.hu, scan.parenchyma, scan.grid, scan.truth, lung_hu_indices(ct, lungs), held, scan.lung, ct, lungs


def matched_indices(ct, lungs, hu, lung, grid, spec, lowpass_mm: float) -> Dict[str, float]:
    """LAA-950 and Perc15 of the whole lung read noise-matched, as ``analyze`` writes them in ``densitometry.csv``
    (``laa950_matched_pct``, ``perc15_matched_hu``; :func:`pipeline.whole_lung_densitometry`)."""
    whole = whole_lung_densitometry(ct, lungs, hu, lung, grid, spec, lowpass_mm)
    return {"laa950_matched": whole["laa950_matched_pct"], "perc15_matched": whole["perc15_matched_hu"]}


def _clinical(row: pd.Series) -> Dict[str, object]:
    keep = [c for c in row.index if c in CLINICAL or str(c).startswith("frac_")]
    return {c: row[c] for c in keep}


class Encoders:
    """The bundle encoder, and other bundles' encoders by representation name (e.g. ``unoranic``), with their specs.

    ``statistics``: patch statistics computed at encoding time by name, ``f(hu, lung, positions, spec) -> [n, d]``
    (context-averaged like the latents)."""

    def __init__(self, bundle, others: Optional[dict] = None, device: str = "cpu",
                 statistics: Optional[Dict[str, Callable]] = None):
        self.bundle = bundle
        self.others = dict(others or {})
        self.statistics = dict(statistics or {})
        self.device = resolve_device(device)
        self.model = bundle.encoder(device)
        self.other_models = {name: b.encoder(device) for name, b in self.others.items()}

    @property
    def spec(self):
        return self.bundle.spec

    def encode(self, hu, lung, grid, which: Optional[str] = None):
        """Dense latents of a scan on the model grid by the bundle encoder, or by the other encoder ``which``."""
        if which is not None:
            return encode_dense(self.other_models[which], hu, lung, grid, self.others[which].spec, device=self.device)
        return encode_dense(self.model, hu, lung, grid, self.spec, device=self.device)


def encode_row(row: pd.Series, split: str, encoders: Encoders, transforms: Optional[dict] = None) -> tuple:
    """Encode one scan under every source; ``transforms``: fitted image-level harmonizers by name, each scan
    encoded again after ``transform(hu, parenchyma)``. Returns (ScanLatents, regular sample of its parenchyma HU)."""
    # the tissue measures read the evaluation scans only, so only they count what the mask holds
    hu, parenchyma, grid, truth, dens, held, lung, ct, lungs = _read_volumes(row, encoders.spec,
                                                                            count_tissue=split == "eval")
    dense = encoders.encode(hu, parenchyma, grid)
    if len(dense.latents) == 0:
        raise InputError(f"Scan {row['image']} has no patch inside the lung; check its lung mask.")
    dens = {**dens, **matched_indices(ct, lungs, hu, lung, grid, encoders.spec, dense.lowpass_mm)}
    latents = {"entangled": dense.latents}
    computed = {**encoders.statistics, PATCH_MEAN_HU: patch_mean_hu, CORE_STATISTICS: core_statistics}
    for name, statistic in computed.items():
        values = replace(dense, latents=statistic(hu, parenchyma, dense.positions, encoders.spec))
        latents[name] = aggregate_context(values, encoders.spec.context_radius).latents
    for name in encoders.others:
        latents[name] = _align_rows(encoders.encode(hu, parenchyma, grid, name), dense)
    latents.update(transformed_latents(hu, parenchyma, grid, encoders, transforms or {}))
    scan = ScanLatents(patient=str(row["patient"]), acquisition=str(row["acquisition"]), split=split,
                       keys=point_keys(dense.lattice, dense.positions), positions=dense.positions, latents=latents,
                       truth=None if truth is None else truth[centre_pixels(dense.positions, encoders.spec)].astype(np.int64),
                       densitometry=dens, clinical=_clinical(row),
                       setting={c: row[c] for c in SETTING_COLUMNS if c in row.index}, mask_holds=held)
    values = hu[parenchyma]
    return scan, values[:: max(values.size // 50000, 1)]


def transformed_latents(hu, parenchyma, grid, encoders: Encoders, transforms: dict) -> Dict[str, np.ndarray]:
    """Latents of the scan after each image-level harmonizer (same lattice points as its entangled latents)."""
    return {name: encoders.encode(t.transform(hu, parenchyma), parenchyma, grid).latents for name, t in transforms.items()}


def _align_rows(other, reference) -> np.ndarray:
    """Rows of ``other``'s latents at ``reference``'s positions (both encoders use one lattice)."""
    index = {tuple(p): i for i, p in enumerate(other.positions.tolist())}
    try:
        rows = [index[tuple(p)] for p in reference.positions.tolist()]
    except KeyError:
        raise InputError("The other bundle uses a different patch lattice than the evaluated bundle; "
                         "train both with the same patch spec.") from None
    return other.latents[rows]


def encode_training(rows: pd.DataFrame, encoders: Encoders, fit_transforms: Callable, progress: Progress) -> tuple:
    """Encode the training scans, fit the image-level harmonizers on their lung HU (``fit_transforms(samples) ->
    {name: fitted}``), then add each scan's latents after them. Returns (scans, fitted transforms)."""
    scans: List[ScanLatents] = []
    samples = []
    for i, (_, row) in enumerate(rows.iterrows()):
        scan, sample = encode_row(row, "train", encoders)
        scans.append(scan)
        samples.append(sample)
        progress(30 * (i + 1) / len(rows), "encode", f"training scan {i + 1}/{len(rows)}")
    transforms = fit_transforms(samples)
    for i, (_, row) in enumerate(rows.iterrows()):  # the transformed latents need the fitted harmonizers
        hu, parenchyma, grid, _, _ = load_volumes(row, encoders.spec)
        scans[i].latents.update(transformed_latents(hu, parenchyma, grid, encoders, transforms))
        progress(30 + 10 * (i + 1) / len(rows), "encode", f"image-harmonized training scan {i + 1}/{len(rows)}")
    return scans, transforms


def encode_held_out(cohorts: Dict[str, Optional[pd.DataFrame]], encoders: Encoders, transforms: dict,
                    progress: Progress) -> Dict[str, List[ScanLatents]]:
    """Encode the scans of each held-out cohort (split name -> rows, None when absent) under every source."""
    held_out = [(split, row) for split, rows in cohorts.items() if rows is not None for _, row in rows.iterrows()]
    encoded: Dict[str, List[ScanLatents]] = {split: [] for split in cohorts}
    for i, (split, row) in enumerate(held_out):
        encoded[split].append(encode_row(row, split, encoders, transforms)[0])
        progress(40 + 15 * (i + 1) / len(held_out), "encode", f"held-out scan {i + 1}/{len(held_out)} ({split})")
    return encoded


def training_rows(scans: List[ScanLatents], budget: int, seed: int) -> Dict[int, np.ndarray]:
    """A seeded, equal share of each training scan's latents (the fitting set of clusters and harmonizers)."""
    rng = np.random.default_rng(seed)
    share = max(budget // max(len(scans), 1), 1)
    return {i: np.sort(rng.choice(len(s.keys), size=min(share, len(s.keys)), replace=False)) for i, s in enumerate(scans)}


def stack(scans: List[ScanLatents], rows: Dict[int, np.ndarray], source: str):
    """The training rows' latents of ``source`` (float64) and each row's acquisition."""
    X = np.concatenate([scans[i].latents[source][r] for i, r in rows.items()]).astype(np.float64)
    batch = np.concatenate([np.full(len(r), scans[i].acquisition) for i, r in rows.items()])
    return X, batch
