"""A chest CT phantom patient: anatomy, truth, phenotype and clinical data, from (seed, index) only."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..tissue import TISSUE_LABELS, TISSUES
from .anatomy import render_anatomy
from .body import FULL_GRID, SMALL_GRID, FineGrid, draw_body_plan
from .outcome import draw_fvc, draw_outcome
from .parenchyma import GGO_HU_RANGE
from .phenotypes import draw_fractions, phenotype_of
from .variants import VARIANTS, crop_view, variant_gas, variant_plan

CUSTOM_PHENOTYPE = "custom"  # the phenotype of a patient whose disease fractions were given, not drawn
MAX_NORMAL_SHIFT_HU = 300.0  # normal parenchyma at -905 + 300 HU is still aerated lung (below the mask's -400 HU)


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


def true_fractions(labels: np.ndarray) -> dict:
    """Fraction of the lung (labels > 0) of each tissue."""
    counts = np.bincount(labels.ravel(), minlength=len(TISSUES) + 1)[1:]
    total = max(int(counts.sum()), 1)
    return {name: counts[TISSUE_LABELS[name] - 1] / total for name in TISSUES}


def to_image(array: np.ndarray, spacing, origin) -> sitk.Image:
    """SimpleITK image of a [z, y, x] array with this spacing and origin (identity direction)."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(o) for o in origin))
    return image


def make_patient(patient_index: int, seed: int, full: bool = False, variant: str = "chest",
                 fractions: Optional[dict] = None, normal_shift_hu: float = 0.0) -> Patient:
    """Build patient ``patient_index`` of the cohort with ``seed``; independent of how many patients are made.

    ``variant`` (one of ``VARIANTS``) changes what the scan shows (``chest`` is the cohort's scan); the fractions,
    FVC and outcome are those of the lung in view. ``fractions`` (e.g. ``{"ground_glass": 0.8}``, a diffuse ground
    glass) sets the target share of the lung of each disease tissue named, instead of the phenotype's draw (the
    tissues not named get none, and the phenotype is ``custom``). ``normal_shift_hu`` (0 to ``MAX_NORMAL_SHIFT_HU``)
    makes the normal parenchyma that much denser, as in a lung held at a smaller breath: real normal lungs differ by
    more than 100 HU between patients and scans, the cohort's phantom lungs do not (docs/real-scans.md).
    """
    if int(patient_index) < 0:
        raise InputError(f"patient_index must be >= 0, got {patient_index}.")
    if variant not in VARIANTS:
        raise InputError(f"Unknown phantom variant {variant!r}; use one of {', '.join(VARIANTS)}.")
    _check_fractions(fractions)
    if isinstance(normal_shift_hu, bool) or not isinstance(normal_shift_hu, (int, float)) \
            or not 0.0 <= normal_shift_hu <= MAX_NORMAL_SHIFT_HU:
        raise InputError(f"normal_shift_hu must be between 0 and {MAX_NORMAL_SHIFT_HU:g} HU, got {normal_shift_hu!r}.")
    grid = FULL_GRID if full else SMALL_GRID
    anatomy_rng, clinical_rng, noise_seed = _rngs(patient_index, seed)
    phenotype = phenotype_of(patient_index, seed)
    male = bool(clinical_rng.random() < 0.6)
    age = float(np.clip(clinical_rng.normal(66, 8), 40, 88))
    drawn = draw_fractions(phenotype, anatomy_rng)  # drawn either way, so the anatomy after it is the same
    targets = drawn if fractions is None else {name: float(share) for name, share in fractions.items()}
    plan = variant_plan(draw_body_plan(grid, anatomy_rng, male), grid, variant)
    gas = variant_gas(plan, variant, seed, patient_index)
    hu, labels, gas_mask = render_anatomy(plan, grid, anatomy_rng, targets,
                                          float(anatomy_rng.uniform(*GGO_HU_RANGE)), gas, float(normal_shift_hu))
    grid, (hu, labels, gas_mask) = crop_view(variant, plan, grid, (hu, labels, gas_mask))
    measured = true_fractions(labels)
    t, event = draw_outcome(measured, age, clinical_rng)
    return Patient(patient_id=patient_id(patient_index), index=int(patient_index), seed=int(seed),
                   hu=to_image(hu, grid.spacing, grid.origin), truth=to_image(labels, grid.spacing, grid.origin),
                   phenotype=phenotype if fractions is None else CUSTOM_PHENOTYPE, fractions=measured,
                   age=round(age, 1), sex="M" if male else "F",
                   fvc=round(draw_fvc(measured, clinical_rng), 1), time=round(t, 3), event=event,
                   noise_seed=noise_seed, variant=variant,
                   gas=None if gas is None else to_image(gas_mask.view(np.uint8), grid.spacing, grid.origin))


def _check_fractions(fractions: Optional[dict]) -> None:
    """Refuse target fractions that name no disease tissue, or do not fit in one lung."""
    if fractions is None:
        return
    diseases = [t for t in TISSUES if t != "normal"]
    if not isinstance(fractions, dict) or not fractions or any(name not in diseases for name in fractions):
        raise InputError(f"fractions must map disease tissues ({', '.join(diseases)}) to shares of the lung, got "
                         f"{fractions!r}.")
    shares = list(fractions.values())
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0 for v in shares) \
            or sum(shares) > 1.0:
        raise InputError(f"fractions must be shares of the lung between 0 and 1 that sum to at most 1, got "
                         f"{fractions!r}.")
