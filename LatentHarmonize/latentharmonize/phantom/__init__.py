"""Realistic multi-patient, multi-acquisition chest CT phantom with known tissue truth and survival.

Each patient has an anatomy on a fine grid (``anatomy``, built from ``body``, ``tubes``, ``parenchyma``,
``fields`` and ``variants``): body wall, ribs, spine, mediastinum, two lungs,
airways, vessel trees and six lung tissue types differing in texture, in spatially coherent regions with
patient-specific proportions (phenotypes: healthy, emphysema, fibrosis, inflammatory, combined). The patient is
then "scanned" under several acquisitions (``acquisition``) sharing one quantum-noise realisation, and gets
clinical covariates and a survival outcome whose hazard depends on the TRUE tissue composition.

``latentharmonize phantom OUTDIR --patients N --seed S`` writes ``OUTDIR/<patient>/<acquisition>.nrrd`` (Int16 HU),
``OUTDIR/<patient>/truth.nrrd`` (UInt8 tissue labels, ``latentharmonize.tissue``), ``OUTDIR/cohort.csv`` and
``OUTDIR/phantom.json`` (the generation parameters). ``latentharmonize phantom --sample OUT.nrrd`` writes only one
full-size scan of a patient with mixed disease: the 3D Slicer module's sample data. See ``docs/phantom.md``.
"""
from .acquisition import KERNELS, SETTING_RANGES, VENDORS, kernel_at, kernel_label
from .anatomy import AIR_HU, LIVER_HU
from .cohort import (DEFAULT_ACQUISITIONS, MIN_AIR_HU, SAMPLE_PATIENT, SAMPLE_SEED, Acquisition, acquire,
                     acquire_all, add_arguments, draw_fractions, draw_outcome, generate_cohort, is_phantom_cohort,
                     log_hazard, make_patient, phenotype_of, run, scanned_acquisitions)
from .parenchyma import TISSUE_MEDIAN_HU, vessel_visibility
from .tubes import splat_tubes
from .variants import DIAPHRAGM_MM

__all__ = [
    "AIR_HU", "Acquisition", "DEFAULT_ACQUISITIONS", "DIAPHRAGM_MM", "KERNELS", "LIVER_HU", "MIN_AIR_HU",
    "SAMPLE_PATIENT", "SAMPLE_SEED", "SETTING_RANGES", "TISSUE_MEDIAN_HU", "VENDORS", "acquire", "acquire_all",
    "add_arguments", "draw_fractions", "draw_outcome", "generate_cohort", "is_phantom_cohort", "kernel_at",
    "kernel_label", "log_hazard", "make_patient", "phenotype_of", "run", "scanned_acquisitions", "splat_tubes",
    "vessel_visibility",
]
