"""Realistic multi-patient, multi-acquisition chest CT phantom with known tissue truth and survival.

A patient (``patient``) has an anatomy on a fine grid (``anatomy``, built from ``body``, ``tubes``, ``parenchyma``
and ``fields``): body wall, ribs, spine, mediastinum, two lungs, airways, vessel trees and six lung tissue types
differing in texture, in spatially coherent regions with patient-specific proportions (``phenotypes``: healthy,
emphysema, fibrosis, inflammatory, combined); ``variants`` adds gas below the diaphragm or moves the field of view.
The patient is then "scanned" (``scanner``) under several acquisitions (``settings``; their effects in
``acquisition``) sharing one quantum-noise realisation, and gets clinical covariates and a survival outcome
(``outcome``) whose hazard depends on the TRUE tissue composition.

``latentharmonize phantom OUTDIR --patients N --seed S`` writes ``OUTDIR/<patient>/<acquisition>.nrrd`` (Int16 HU),
``OUTDIR/<patient>/truth.nrrd`` (UInt8 tissue labels, ``latentharmonize.tissue``), ``OUTDIR/cohort.csv`` and
``OUTDIR/phantom.json`` (the generation parameters). ``latentharmonize phantom --sample OUT.nrrd`` writes only one
full-size scan of a patient with mixed disease: the 3D Slicer module's sample data (``cohort``, ``sample``,
``command``). See ``docs/phantom.md``.
"""
from .acquisition import KERNELS, VENDORS, kernel_at, kernel_label
from .anatomy import AIR_HU, LIVER_HU
from .cohort import generate_cohort, is_phantom_cohort, scanned_acquisitions
from .command import add_arguments, run
from .outcome import draw_outcome, log_hazard
from .parenchyma import TISSUE_MEDIAN_HU, vessel_visibility
from .patient import make_patient
from .phenotypes import draw_fractions, phenotype_of
from .sample import SAMPLE_PATIENT, SAMPLE_SEED
from .scanner import acquire, acquire_all
from .settings import DEFAULT_ACQUISITIONS, MIN_AIR_HU, SETTING_RANGES, Acquisition
from .tubes import splat_tubes
from .variants import DIAPHRAGM_MM

__all__ = [
    "AIR_HU", "Acquisition", "DEFAULT_ACQUISITIONS", "DIAPHRAGM_MM", "KERNELS", "LIVER_HU", "MIN_AIR_HU",
    "SAMPLE_PATIENT", "SAMPLE_SEED", "SETTING_RANGES", "TISSUE_MEDIAN_HU", "VENDORS", "acquire", "acquire_all",
    "add_arguments", "draw_fractions", "draw_outcome", "generate_cohort", "is_phantom_cohort", "kernel_at",
    "kernel_label", "log_hazard", "make_patient", "phenotype_of", "run", "scanned_acquisitions", "splat_tubes",
    "vessel_visibility",
]
