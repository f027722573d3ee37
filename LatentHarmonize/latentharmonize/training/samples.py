"""Paired training samples: the same physical lung points cut from every acquisition of a patient.

Points are patch-lattice centres (:mod:`latentharmonize.patches`) valid in all of a patient's acquisitions; their
integer keys (``patches.point_keys``) are equal across acquisitions, which is how rows are paired. Only training
samples pairs; ``analyze`` encodes every lattice point instead.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..cohort import read_cohort
from ..densitometry import PROFILE_KEYS, patch_profiles
from ..errors import InputError
from ..patches import (PatchSpec, centre_pixels, encoder_input, extract_patches, patch_lattice, point_keys,
                       valid_centres)
from ..progress import Progress
from ..scans import Scan, load_scan
from .config import TrainConfig


@dataclass
class PairedPatches:
    """Sampled patches, one row per (physical point, acquisition); rows sharing ``point`` are the same place."""

    patches: np.ndarray  # float32 [n, 3, 16, 16], normalised
    patient: np.ndarray  # [n] patient id
    acquisition: np.ndarray  # [n] acquisition name
    point: np.ndarray  # [n] int, global id of the physical point
    scan: np.ndarray  # [n] int, index of the scan the row comes from
    keys: np.ndarray  # [n, 3] int64 physical micrometres of the centre
    stats: dict = field(default_factory=dict)  # densitometry.PROFILE_KEYS -> [n], HU profile of the centre slice
    truth: np.ndarray | None = None  # [n] int tissue label at the centre, when scans carry truth

    def __len__(self) -> int:
        return len(self.patches)

    def pairs(self) -> np.ndarray:
        """Int [m, 2]: every two rows of one point under different acquisitions."""
        out = []
        for rows in self.rows_by_point():
            out.extend((a, b) for a, b in itertools.combinations(rows, 2)
                       if self.acquisition[a] != self.acquisition[b])
        return np.asarray(out, dtype=np.int64).reshape(-1, 2)

    def rows_by_point(self) -> list:
        order = np.argsort(self.point, kind="stable")
        bounds = np.flatnonzero(np.diff(self.point[order])) + 1
        return [r for r in np.split(order, bounds) if len(r)]


def _common_points(scans: list, spec: PatchSpec) -> tuple[np.ndarray, list]:
    """Keys of lattice points valid in every scan of one patient, and each scan's positions of those points."""
    per_scan = []
    for scan in scans:
        pos = np.argwhere(valid_centres(scan.lung, spec))
        keys = point_keys(patch_lattice(scan.grid, spec), pos)
        per_scan.append({tuple(k): p for k, p in zip(keys.tolist(), pos)})
    common = sorted(set.intersection(*(set(d) for d in per_scan)))
    return np.asarray(common, dtype=np.int64).reshape(-1, 3), [np.array([d[k] for k in common]).reshape(-1, 3)
                                                                for d in per_scan]


def sample_paired_patches(scans: list, per_patient: int, spec: PatchSpec = PatchSpec(), seed: int = 0) -> PairedPatches:
    """Sample ``per_patient`` lung points per patient (balanced), each taken from *every* acquisition of it.

    Points are lattice centres valid in all of a patient's acquisitions, so each point yields one row per
    acquisition at the same physical location.
    """
    if per_patient < 1:
        raise InputError(f"per_patient must be at least 1, got {per_patient}.")
    rng = np.random.default_rng(seed)
    by_patient = {}
    for i, scan in enumerate(scans):
        by_patient.setdefault(str(scan.patient), []).append(i)
    parts, next_point = [], 0
    for patient in sorted(by_patient):
        ids = by_patient[patient]
        keys, positions = _common_points([scans[i] for i in ids], spec)
        if len(keys) == 0:
            raise InputError(f"Patient {patient!r}: no lung location is inside the lung mask of all of its "
                             "acquisitions; check that its scans share the patient coordinate frame.")
        take = np.sort(rng.choice(len(keys), size=min(per_patient, len(keys)), replace=False))
        point_ids = next_point + np.arange(len(take))
        next_point += len(take)
        for i, pos in zip(ids, positions):
            parts.append(_rows_of_scan(scans[i], i, pos[take], keys[take], point_ids, spec))
    return _concat_rows(parts)


def concat_samples(parts: list) -> PairedPatches:
    """Join samples drawn separately (e.g. patient by patient); point and scan ids are renumbered to stay unique."""
    if not parts:
        raise InputError("No patches were sampled: the cohort has no scans.")
    rows, point_base, scan_base = [], 0, 0
    for part in parts:
        rows.append({"patches": part.patches, "patient": part.patient, "acquisition": part.acquisition,
                     "point": part.point + point_base, "scan": part.scan + scan_base, "keys": part.keys,
                     "stats": part.stats, **({} if part.truth is None else {"truth": part.truth})})
        point_base += int(part.point.max()) + 1
        scan_base += int(part.scan.max()) + 1
    return _concat_rows(rows)


def _rows_of_scan(scan: Scan, index: int, positions: np.ndarray, keys: np.ndarray, point_ids: np.ndarray,
                  spec: PatchSpec) -> dict:
    hu, _ = encoder_input(scan.hu, spec)  # what encode_dense reads
    filled = np.where(scan.lung, hu, np.float32(spec.outside_fill_hu))
    raw = extract_patches(filled, positions, spec)
    lo, hi = spec.hu_window
    rows = {"patches": ((np.clip(raw, lo, hi) - lo) / (hi - lo)).astype(np.float32),
            "patient": np.full(len(positions), str(scan.patient), dtype=object),
            "acquisition": np.full(len(positions), str(scan.acquisition), dtype=object),
            "point": point_ids, "scan": np.full(len(positions), index), "keys": keys,
            "stats": patch_profiles(raw[:, spec.slices // 2])}
    if scan.truth is not None:
        rows["truth"] = scan.truth[centre_pixels(positions, spec)].astype(np.int64)
    return rows


def _concat_rows(parts: list) -> PairedPatches:
    cat = {k: np.concatenate([p[k] for p in parts]) for k in ("patches", "patient", "acquisition", "point", "scan", "keys")}
    stats = {k: np.concatenate([p["stats"][k] for p in parts]) for k in PROFILE_KEYS}
    truth = np.concatenate([p["truth"] for p in parts]) if all("truth" in p for p in parts) else None
    return PairedPatches(stats=stats, truth=truth, **cat)


def patient_seed(seed: int, n: int) -> int:
    """The sampling seed of the ``n``-th patient of a cohort, shared by the serial and the distributed path."""
    return seed * 100003 + n


def cohort_patients(cohort: pd.DataFrame) -> list:
    """``(patient, rows)`` of each patient of a cohort table, in order of first appearance: the order that numbers
    the patients' seeds and the sampled scans (``PairedPatches.scan``)."""
    patients = list(dict.fromkeys(cohort["patient"].astype(str)))
    return [(patient, cohort[cohort["patient"].astype(str) == patient]) for patient in patients]


def sample_patient(rows: pd.DataFrame, per_patient: int, spec: PatchSpec, seed: int) -> PairedPatches:
    """Read one patient's scans onto the model grid and draw its paired patches (one task of the distributed path)."""
    scans = [load_scan(row, spec) for _, row in rows.iterrows()]
    return sample_paired_patches(scans, per_patient, spec, seed=seed)


def load_cohort_samples(cohort_csv, config: TrainConfig, spec: PatchSpec, progress: Progress | None = None) -> tuple:
    """Read every scan, resample it to the model grid and draw ``config.per_patient`` paired patches patient by
    patient (the serial path; :mod:`.distributed` is the Dask one).

    Returns ``(samples, cohort DataFrame)``. Only one patient's volumes are held in memory at a time.
    """
    cohort = read_cohort(cohort_csv)
    patients = cohort_patients(cohort)
    parts = []
    for n, (patient, rows) in enumerate(patients):
        parts.append(sample_patient(rows, config.per_patient, spec, patient_seed(config.seed, n)))
        if progress is not None:
            progress(5 + 15 * (n + 1) / len(patients), "patches", f"patient {patient}: {len(rows)} scans")
    return concat_samples(parts), cohort
