"""The chest CT phantom cohort: patients scanned under acquisitions, written as a cohort folder with its table.

``latentharmonize phantom OUTDIR --patients N --seed S`` writes ``OUTDIR/<patient>/<acquisition>.nrrd`` (Int16 HU),
``OUTDIR/<patient>/truth.nrrd`` (UInt8 tissue labels, ``latentharmonize.tissue``), ``OUTDIR/cohort.csv`` and
``OUTDIR/phantom.json`` (the generation parameters).
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import SimpleITK as sitk

from .. import __version__
from ..atomic import STAGING_PREFIX, StagedOutput
from ..errors import InputError, OutputError
from ..progress import Progress
from ..tissue import TISSUES
from .patient import Patient, make_patient, patient_id
from .scanner import acquire_all
from .settings import SETTING_RANGES, Acquisition, draw_acquisitions, resolve_acquisitions

GENERATOR = "latentharmonize.phantom"


def is_phantom_cohort(folder) -> bool:
    """True when ``folder`` was written by this generator (it holds our ``phantom.json``)."""
    try:
        return json.loads((Path(folder) / "phantom.json").read_text(encoding="utf-8")).get("generator") == GENERATOR
    except (OSError, ValueError, AttributeError):
        return False


def _check_outdir(outdir: Path, overwrite: bool) -> None:
    if outdir.is_dir() and not overwrite and not is_phantom_cohort(outdir):
        foreign = [p.name for p in outdir.iterdir() if not p.name.startswith(STAGING_PREFIX)]
        if foreign:
            shown = ", ".join(sorted(foreign)[:5])
            raise OutputError(f"{outdir} is not empty and is not a phantom cohort (it holds {shown}). "
                              "Choose an empty or new folder, or pass --overwrite to write into it anyway.")


def cohort_row(patient: Patient, acq: Acquisition) -> dict:
    row = {"image": f"{patient.patient_id}/{acq.name}.nrrd", "patient": patient.patient_id, "acquisition": acq.name,
           "truth": f"{patient.patient_id}/truth.nrrd", "time": patient.time, "event": patient.event,
           "kernel": acq.kernel, "vendor": acq.vendor, "dose": float(acq.dose_mAs),
           "thickness": float(acq.thickness_mm)}
    if acq.sharpness is not None:
        row["kernel_sharpness"] = acq.sharpness
    if acq.calibration is not None:
        row["hu_scale"], row["hu_offset"] = acq.calibration
    row.update({f"frac_{name}": round(float(patient.fractions[name]), 6) for name in TISSUES})
    row.update({"age": patient.age, "sex": patient.sex, "fvc": patient.fvc, "phenotype": patient.phenotype})
    return row


def _check_count(value, option: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{option} must be a positive integer, got {value!r}.")


def scanned_acquisitions(acqs: list, n_patients: int, per_patient: Optional[int], seed: int) -> list:
    """Acquisitions of each patient: all of them, or a seeded draw of ``per_patient`` distinct ones (a multi-site
    cohort, where each patient was scanned wherever they happened to be; the order of ``acqs`` is kept)."""
    if per_patient is None or per_patient >= len(acqs):
        return [list(acqs)] * n_patients
    _check_count(per_patient, "--acquisitions-per-patient")
    rng = np.random.default_rng([int(seed), 7])
    return [[acqs[i] for i in sorted(rng.choice(len(acqs), size=per_patient, replace=False))]
            for _ in range(n_patients)]


def generate_cohort(outdir, n_patients: int, seed: int, acquisitions=None, full: bool = False,
                    overwrite: bool = False, progress: Optional[Progress] = None,
                    acquisitions_per_patient: Optional[int] = None,
                    drawn_settings: Optional[str] = None) -> pd.DataFrame:
    """Write a phantom cohort to ``outdir`` and return its table (also written as ``cohort.csv``).

    With ``acquisitions_per_patient``, each patient is scanned under only that many of the acquisitions (drawn
    with the seed); patients are the same as in the full cohort with the same seed. With ``drawn_settings``
    (``"train"`` or ``"heldout"``, see ``settings.SETTING_RANGES``) each patient gets their own
    ``acquisitions_per_patient`` (default 4) settings instead (``draw_acquisitions``).
    """
    _check_count(n_patients, "--patients")
    outdir = Path(outdir)
    ids = [patient_id(i) for i in range(n_patients)]
    if drawn_settings is not None:
        if drawn_settings not in SETTING_RANGES or acquisitions is not None:
            raise InputError(f"--drawn-settings takes one of {sorted(SETTING_RANGES)}, without --acquisitions.")
        n = 4 if acquisitions_per_patient is None else acquisitions_per_patient
        _check_count(n, "--acquisitions-per-patient")
        scanned = [draw_acquisitions(drawn_settings, n, np.random.default_rng([int(seed), 11, i]))
                   for i in range(n_patients)]
        acqs = []
    else:
        acqs = resolve_acquisitions(acquisitions)
        scanned = scanned_acquisitions(acqs, n_patients, acquisitions_per_patient, seed)
    _check_outdir(outdir, overwrite)
    names = [f"{p}/{a.name}.nrrd" for p, own in zip(ids, scanned) for a in own] + [f"{p}/truth.nrrd" for p in ids]
    names += ["cohort.csv", "phantom.json"]
    rows = []
    with StagedOutput(outdir, names, overwrite=overwrite) as staged:
        for i, pid in enumerate(ids):
            if progress is not None:
                progress(100.0 * i / n_patients, "phantom", f"patient {pid} ({i + 1}/{n_patients})")
            patient = make_patient(i, seed, full=full)
            sitk.WriteImage(patient.truth, str(staged.path(f"{pid}/truth.nrrd")), True, 1)
            for acq, image in zip(scanned[i], acquire_all(patient, scanned[i])):
                sitk.WriteImage(image, str(staged.path(f"{pid}/{acq.name}.nrrd")), True, 1)
                rows.append(cohort_row(patient, acq))
        table = pd.DataFrame(rows)
        table.to_csv(staged.path("cohort.csv"), index=False)
        meta = {"generator": GENERATOR, "version": __version__, "seed": int(seed), "patients": int(n_patients),
                "full": bool(full), "acquisitions": [asdict(a) for a in acqs],
                "acquisitions_per_patient": acquisitions_per_patient, "drawn_settings": drawn_settings}
        if drawn_settings is not None:
            meta["setting_ranges"] = asdict(SETTING_RANGES[drawn_settings])
        staged.path("phantom.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    if progress is not None:
        progress(100.0, "phantom", f"wrote {n_patients} patients, {len(rows)} scans to {outdir}")
    return table
