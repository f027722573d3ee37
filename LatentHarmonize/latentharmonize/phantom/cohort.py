"""Realistic multi-patient, multi-acquisition chest CT phantom with known tissue truth and survival.

Each patient has an anatomy on a fine grid (``phantom_anatomy``): body wall, ribs, spine, mediastinum, two lungs,
airways, vessel trees and six lung tissue types differing in texture, in spatially coherent regions with
patient-specific proportions (phenotypes: healthy, emphysema, fibrosis, inflammatory, combined). The patient is
then "scanned" under several acquisitions (``phantom_acquisition``) sharing one quantum-noise realisation, and gets
clinical covariates and a survival outcome whose hazard depends on the TRUE tissue composition.

``latentharmonize phantom OUTDIR --patients N --seed S`` writes ``OUTDIR/<patient>/<acquisition>.nrrd`` (Int16 HU),
``OUTDIR/<patient>/truth.nrrd`` (UInt8 tissue labels, ``latentharmonize.tissue``), ``OUTDIR/cohort.csv`` and
``OUTDIR/phantom.json`` (the generation parameters). ``latentharmonize phantom --sample OUT.nrrd`` writes only one
full-size scan of a patient with mixed disease: the 3D Slicer module's sample data. See ``docs/phantom.md``.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import SimpleITK as sitk

from .. import __version__
from ..atomic import STAGING_PREFIX, StagedOutput
from ..errors import InputError, OutputError
from ..progress import Progress
from ..tissue import TISSUE_LABELS, TISSUES
from .acquisition import KERNELS, SETTING_RANGES, VENDORS, kernel_at, kernel_label, reconstruct, to_int16
from .anatomy import render_anatomy
from .body import FULL_GRID, SMALL_GRID, FineGrid, draw_body_plan
from .parenchyma import GGO_HU_RANGE
from .variants import VARIANTS, crop_view, variant_gas, variant_plan

GENERATOR = "latentharmonize.phantom"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


@dataclass(frozen=True)
class Acquisition:
    """One acquisition setting: reconstruction kernel, scanner vendor, tube current-time product, slice thickness.

    A drawn setting (``draw_acquisitions``) also has ``sharpness`` (the kernel between the named ones; ``kernel`` is
    then its name, ``phantom_acquisition.kernel_label``) and ``calibration`` (scale, offset; ``vendor`` is then ``"drawn"``)."""

    name: str
    kernel: str
    vendor: str
    dose_mAs: float
    thickness_mm: float
    sharpness: Optional[float] = None
    calibration: Optional[tuple] = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not _SAFE_NAME.match(self.name):
            raise InputError(f"Acquisition name {self.name!r} must be letters, digits, '_' or '-' (it names a file).")
        if self.kernel not in KERNELS:
            raise InputError(f"Unknown kernel {self.kernel!r} in acquisition {self.name!r}; "
                             f"use one of {sorted(KERNELS)}.")
        if self.calibration is None and self.vendor not in VENDORS:
            raise InputError(f"Unknown vendor {self.vendor!r} in acquisition {self.name!r}; "
                             f"use one of {sorted(VENDORS)}.")
        for label, value in (("dose_mAs", self.dose_mAs), ("thickness_mm", self.thickness_mm)):
            if not (isinstance(value, (int, float)) and np.isfinite(value) and value > 0):
                raise InputError(f"Acquisition {self.name!r}: {label} must be a positive number, got {value!r}.")

    def setting(self) -> tuple:
        """``(kernel, vendor, dose_mAs, thickness_mm)`` as ``phantom_acquisition.reconstruct`` takes it."""
        kernel = self.kernel if self.sharpness is None else kernel_at(self.sharpness)
        vendor = self.vendor if self.calibration is None else tuple(self.calibration)
        return kernel, vendor, float(self.dose_mAs), float(self.thickness_mm)


# One raw scan reconstructed soft and sharp (the paired case), a low-dose standard-kernel scan from another vendor,
# and a thick sharp-kernel scan from a third vendor.
DEFAULT_ACQUISITIONS = (
    Acquisition("a_soft_thin", "soft", "A", 120.0, 1.25),
    Acquisition("a_sharp_thin", "sharp", "A", 120.0, 1.25),
    Acquisition("b_standard_lowdose", "standard", "B", 30.0, 2.5),
    Acquisition("c_sharp_thick", "sharp", "C", 100.0, 5.0),
)

MIN_AIR_HU = -1030.0


def draw_acquisitions(ranges: str, n: int, rng: np.random.Generator) -> list:
    """``n`` acquisitions drawn from ``SETTING_RANGES[ranges]``: with ``n >= 2`` first a soft and a sharp
    reconstruction of one raw scan (same dose, thickness and calibration, sharpness from the two ends of the range),
    then scans with every setting drawn independently. Each is named by its setting's bins (:func:`setting_name`), so
    the acquisition labels that the rotation and the probe use carry the setting. A calibration that
    would put air (-1000 HU) below ``MIN_AIR_HU`` takes the opposite offset: scanners keep air within a few tens of
    HU, and air below the -1024 floor cannot be measured (``train --calibrate`` refuses such scans)."""
    r = SETTING_RANGES[ranges]

    def calibration():
        scale, offset = r.draw(rng, "hu_scale"), r.draw(rng, "hu_offset")
        return {"hu_scale": scale, "hu_offset": -offset if -1000.0 * scale + offset < MIN_AIR_HU else offset}

    low, high = r.sharpness[0], r.sharpness[-1]
    span = 0.2 * (high[1] - low[0])
    shared = {**{f: r.draw(rng, f) for f in ("dose_mAs", "thickness_mm")}, **calibration()}
    out = []
    if n >= 2:
        out += [(rng.uniform(low[0], min(low[1], low[0] + span)), shared),
                (rng.uniform(max(high[0], high[1] - span), high[1]), shared)]
    while len(out) < n:
        out.append((r.draw(rng, "sharpness"), {**{f: r.draw(rng, f) for f in ("dose_mAs", "thickness_mm")},
                                               **calibration()}))
    acquisitions, names = [], set()
    for k, v in out:
        a = Acquisition("drawn", kernel_label(float(k)), "drawn", round(v["dose_mAs"], 1), round(v["thickness_mm"], 2),
                        sharpness=round(float(k), 3), calibration=(round(v["hu_scale"], 4), round(v["hu_offset"], 1)))
        name, i = setting_name(a), 0
        while name in names:  # two scans of the patient in the same bins
            i += 1
            name = f"{setting_name(a)}_{i}"
        names.add(name)
        acquisitions.append(replace(a, name=name))
    return acquisitions


def setting_name(a: Acquisition) -> str:
    """Bins of a drawn setting: kernel name, dose (below 60 mAs: ``lowdose``), thickness (above 2.5 mm: ``thick``)
    and whether the calibration puts air above or below -1000 HU, e.g. ``sharp_lowdose_thick_airlow``."""
    air = -1000.0 * a.calibration[0] + a.calibration[1]
    return "_".join([a.kernel, "lowdose" if a.dose_mAs < 60 else "dose", "thick" if a.thickness_mm > 2.5 else "thin",
                     "airlow" if air < -1000.0 else "airhigh"])


# --- patient phenotypes: target lung fractions drawn uniformly in these ranges (rest is normal lung) -------------
PHENOTYPES = ("healthy", "emphysema", "fibrosis", "inflammatory", "combined")
FRACTION_RANGES = {
    "healthy": {"emphysema": (0.0, 0.02), "ground_glass": (0.0, 0.03), "reticulation": (0.0, 0.01),
                "consolidation": (0.0, 0.01)},
    "emphysema": {"emphysema": (0.08, 0.35), "ground_glass": (0.0, 0.03), "reticulation": (0.0, 0.02),
                  "consolidation": (0.0, 0.01)},
    "fibrosis": {"reticulation": (0.06, 0.2), "honeycombing": (0.02, 0.12), "ground_glass": (0.03, 0.12),
                 "emphysema": (0.0, 0.02), "consolidation": (0.0, 0.02)},
    "inflammatory": {"ground_glass": (0.1, 0.3), "consolidation": (0.04, 0.15), "reticulation": (0.0, 0.03)},
    "combined": {"emphysema": (0.05, 0.2), "reticulation": (0.04, 0.12), "honeycombing": (0.01, 0.06),
                 "ground_glass": (0.02, 0.08)},
}

# --- survival: Weibull proportional hazards on the true composition and age (time in years) ----------------------
LOG_HAZARD_PER_FRACTION = {"honeycombing": 14.0, "reticulation": 9.0, "emphysema": 6.0, "ground_glass": 3.0,
                           "consolidation": 3.0}   # e.g. 10 % honeycombing: hazard ratio 4
LOG_HAZARD_PER_YEAR_OF_AGE = 0.04       # hazard ratio 1.5 per decade
WEIBULL_SHAPE = 1.3
WEIBULL_SCALE_YEARS = 10.0              # healthy 65-year-old
CENSORING_YEARS = (1.0, 8.0)            # uniform follow-up, independent of everything else: ~30 % censored


@dataclass
class Patient:
    """A phantom patient: anatomy HU (Float32) and truth labels (UInt8) on the fine grid, plus metadata."""

    patient_id: str
    index: int
    seed: int
    hu: sitk.Image
    truth: sitk.Image
    phenotype: str
    fractions: dict             # true lung fraction of each tissue (from the truth)
    age: float
    sex: str
    fvc: float                  # forced vital capacity, % predicted
    time: float                 # years
    event: int                  # 1 death observed, 0 censored
    noise_seed: int = field(repr=False, default=0)
    variant: str = "chest"
    gas: Optional[sitk.Image] = field(repr=False, default=None)  # UInt8, 1 where gas lies below the diaphragm

    @property
    def grid(self) -> FineGrid:
        sx, sy, sz = self.hu.GetSpacing()
        return FineGrid(shape=tuple(self.hu.GetSize()[::-1]), spacing=(sx, sy, sz))


def patient_id(index: int) -> str:
    return f"P{index:03d}"


def _rngs(patient_index: int, seed: int) -> tuple:
    """Independent generators for anatomy and clinical data, and the noise seed, derived from (seed, index) only."""
    anatomy, clinical, noise = np.random.SeedSequence([int(seed), int(patient_index)]).spawn(3)
    return np.random.default_rng(anatomy), np.random.default_rng(clinical), int(noise.generate_state(1)[0])


def phenotype_of(patient_index: int, seed: int) -> str:
    """Phenotypes cycle with the index (offset by the seed), so any 5 consecutive patients cover all of them."""
    return PHENOTYPES[(int(patient_index) + int(seed)) % len(PHENOTYPES)]


def draw_fractions(phenotype: str, rng: np.random.Generator) -> dict:
    """Target lung fraction of each disease tissue for a phenotype."""
    return {name: float(rng.uniform(lo, hi)) for name, (lo, hi) in FRACTION_RANGES[phenotype].items()}


def true_fractions(labels: np.ndarray) -> dict:
    counts = np.bincount(labels.ravel(), minlength=len(TISSUES) + 1)[1:]
    total = max(int(counts.sum()), 1)
    return {name: counts[TISSUE_LABELS[name] - 1] / total for name in TISSUES}


def log_hazard(fractions: dict, age: float) -> float:
    """Linear predictor of the true survival model."""
    return sum(LOG_HAZARD_PER_FRACTION[k] * fractions.get(k, 0.0) for k in LOG_HAZARD_PER_FRACTION) \
        + LOG_HAZARD_PER_YEAR_OF_AGE * (age - 65.0)


def draw_outcome(fractions: dict, age: float, rng: np.random.Generator) -> tuple:
    """(time in years, event) from the Weibull hazard, with independent uniform censoring."""
    death = WEIBULL_SCALE_YEARS * (-np.log(rng.random()) / np.exp(log_hazard(fractions, age))) ** (1 / WEIBULL_SHAPE)
    censor = rng.uniform(*CENSORING_YEARS)
    return float(min(death, censor)), int(death <= censor)


def draw_fvc(fractions: dict, rng: np.random.Generator) -> float:
    """FVC % predicted: lowered mostly by fibrosis, less by ground-glass, emphysema and consolidation."""
    loss = 150 * (fractions["reticulation"] + fractions["honeycombing"]) + 60 * fractions["ground_glass"] \
        + 40 * fractions["emphysema"] + 30 * fractions["consolidation"]
    return float(np.clip(100.0 - loss + rng.normal(0, 8), 25, 130))


def _image(array: np.ndarray, spacing, origin) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(o) for o in origin))
    return image


def make_patient(patient_index: int, seed: int, full: bool = False, variant: str = "chest") -> Patient:
    """Build patient ``patient_index`` of the cohort with ``seed``; independent of how many patients are made.

    ``variant`` (one of ``VARIANTS``) changes what the scan shows (``chest`` is the cohort's scan); the fractions,
    FVC and outcome are those of the lung in view.
    """
    if int(patient_index) < 0:
        raise InputError(f"patient_index must be >= 0, got {patient_index}.")
    if variant not in VARIANTS:
        raise InputError(f"Unknown phantom variant {variant!r}; use one of {', '.join(VARIANTS)}.")
    grid = FULL_GRID if full else SMALL_GRID
    anatomy_rng, clinical_rng, noise_seed = _rngs(patient_index, seed)
    phenotype = phenotype_of(patient_index, seed)
    male = bool(clinical_rng.random() < 0.6)
    age = float(np.clip(clinical_rng.normal(66, 8), 40, 88))
    targets = draw_fractions(phenotype, anatomy_rng)
    plan = variant_plan(draw_body_plan(grid, anatomy_rng, male), grid, variant)
    gas = variant_gas(plan, variant, seed, patient_index)
    hu, labels, gas_mask = render_anatomy(plan, grid, anatomy_rng, targets,
                                          float(anatomy_rng.uniform(*GGO_HU_RANGE)), gas)
    grid, (hu, labels, gas_mask) = crop_view(variant, plan, grid, (hu, labels, gas_mask))
    fractions = true_fractions(labels)
    t, event = draw_outcome(fractions, age, clinical_rng)
    return Patient(patient_id=patient_id(patient_index), index=int(patient_index), seed=int(seed),
                   hu=_image(hu, grid.spacing, grid.origin), truth=_image(labels, grid.spacing, grid.origin),
                   phenotype=phenotype, fractions=fractions, age=round(age, 1), sex="M" if male else "F",
                   fvc=round(draw_fvc(fractions, clinical_rng), 1), time=round(t, 3), event=event,
                   noise_seed=noise_seed, variant=variant,
                   gas=None if gas is None else _image(gas_mask.view(np.uint8), grid.spacing, grid.origin))


def acquire_all(patient: Patient, acquisitions: Sequence[Acquisition]) -> list:
    """Int16 HU images of the patient under each acquisition, sharing one noise realisation and the patient frame."""
    grid = patient.grid
    settings = [a.setting() for a in acquisitions]
    volumes = reconstruct(sitk.GetArrayViewFromImage(patient.hu), grid.spacing, patient.noise_seed, settings)
    z_low = grid.extent_z[0]
    images = []
    for acq, volume in zip(acquisitions, volumes):
        t = float(acq.thickness_mm)
        images.append(_image(to_int16(volume), (grid.spacing[0], grid.spacing[1], t),
                             (grid.origin[0], grid.origin[1], z_low + t / 2.0)))
    return images


def acquire(patient: Patient, acquisition: Acquisition) -> sitk.Image:
    """Int16 HU image of the patient under one acquisition (see ``acquire_all`` for several at once)."""
    return acquire_all(patient, [acquisition])[0]


# --- cohort -----------------------------------------------------------------------------------------------------

def _resolve_acquisitions(acquisitions) -> list:
    if acquisitions is None:
        return list(DEFAULT_ACQUISITIONS)
    known = {a.name: a for a in DEFAULT_ACQUISITIONS}
    out = []
    for a in acquisitions:
        if isinstance(a, str):
            if a not in known:
                raise InputError(f"Unknown acquisition {a!r}; choose from {', '.join(known)}.")
            a = known[a]
        elif not isinstance(a, Acquisition):
            raise InputError(f"Acquisitions must be names or Acquisition objects, got {type(a).__name__}.")
        out.append(a)
    names = [a.name for a in out]
    if not out or len(set(names)) != len(names):
        raise InputError(f"Give at least one acquisition, each name once (got {names}).")
    return out


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
    (``"train"`` or ``"heldout"``, see ``phantom_acquisition.SETTING_RANGES``) each patient gets their own
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
        acqs = _resolve_acquisitions(acquisitions)
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


# --- sample data --------------------------------------------------------------------------------------------------

# The sample scan: patient 4 of seed 0, a "combined" phenotype (emphysema, reticulation, honeycombing, ground glass),
# full size, soft kernel at 1.25 mm.
SAMPLE_PATIENT, SAMPLE_SEED, SAMPLE_ACQUISITION = 4, 0, DEFAULT_ACQUISITIONS[0]


def write_sample(path, overwrite: bool = False) -> Path:
    """Write the sample chest CT (Int16 HU, full size, deterministic) to ``path`` (.nrrd, .nii.gz or .mha),
    atomically; an existing file is refused unless ``overwrite``."""
    path = Path(path)
    if not path.name.lower().endswith((".nrrd", ".nii", ".nii.gz", ".mha")):
        raise InputError(f"Sample path {path} must end in .nrrd, .nii, .nii.gz or .mha.")
    image = acquire(make_patient(SAMPLE_PATIENT, SAMPLE_SEED, full=True), SAMPLE_ACQUISITION)
    with StagedOutput(path.parent, [path.name], overwrite=overwrite) as staged:
        sitk.WriteImage(image, str(staged.path(path.name)), True, 1)
    return path


# --- command line -------------------------------------------------------------------------------------------------

def add_arguments(parser) -> None:
    parser.add_argument("outdir", nargs="?", help="output folder for the cohort (created if missing)")
    parser.add_argument("--sample", metavar="OUT.nrrd", default=None,
                        help="write only the sample scan (one full-size chest CT with mixed disease, the 3D Slicer "
                             "module's sample data) to this file, instead of a cohort")
    parser.add_argument("--patients", type=int, default=4, help="number of patients (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same cohort (default 0)")
    parser.add_argument("--acquisitions", nargs="+", metavar="NAME", default=None,
                        help="acquisitions to simulate (default all: "
                             + ", ".join(a.name for a in DEFAULT_ACQUISITIONS) + ")")
    parser.add_argument("--acquisitions-per-patient", type=int, default=None, metavar="N",
                        help="scan each patient under only N of the acquisitions, drawn with the seed "
                             "(a multi-site cohort; default: every patient under all of them)")
    parser.add_argument("--drawn-settings", choices=sorted(SETTING_RANGES), default=None,
                        help="draw each patient's acquisitions (a soft/sharp pair, then independent draws) from "
                             "continuous ranges of kernel, dose, thickness and calibration; the train and heldout "
                             "ranges do not overlap (default: the named acquisitions)")
    parser.add_argument("--full", action="store_true",
                        help="full-size scans (512 x 512 x 300, 0.7 mm in-plane) instead of the small 192 x 192 x 112")
    parser.add_argument("--overwrite", action="store_true", help="replace files already in the output folder")
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")
    parser.add_argument("--progress-lines", action="store_true", help="print machine-readable LH-PROGRESS lines")


def run(args) -> int:
    if (args.outdir is None) == (args.sample is None):
        raise InputError("Give an output folder for a cohort, or --sample OUT.nrrd for the sample scan: one of the two.")
    if args.sample is not None:
        written = write_sample(args.sample, overwrite=args.overwrite)
        if not args.quiet:
            print(written)
        return 0
    progress = Progress(machine=args.progress_lines, quiet=args.quiet)
    t0 = time.perf_counter()
    table = generate_cohort(args.outdir, args.patients, args.seed, acquisitions=args.acquisitions, full=args.full,
                            overwrite=args.overwrite, progress=progress,
                            acquisitions_per_patient=args.acquisitions_per_patient, drawn_settings=args.drawn_settings)
    if not args.quiet and not args.progress_lines:
        print(f"{len(table)} scans of {args.patients} patients in {time.perf_counter() - t0:.1f} s; "
              f"table: {Path(args.outdir) / 'cohort.csv'}")
    return 0
