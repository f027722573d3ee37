"""Scanning a chest CT phantom patient: its Int16 HU images under acquisition settings, in the patient frame."""
from __future__ import annotations

from typing import Sequence

import SimpleITK as sitk

from .acquisition import reconstruct, to_int16
from .patient import Patient, to_image
from .settings import Acquisition


def acquire_all(patient: Patient, acquisitions: Sequence[Acquisition]) -> list:
    """Int16 HU images of the patient under each acquisition, sharing one noise realisation and the patient frame."""
    grid = patient.grid
    settings = [a.setting() for a in acquisitions]
    volumes = reconstruct(sitk.GetArrayViewFromImage(patient.hu), grid.spacing, patient.noise_seed, settings)
    z_low = grid.extent_z[0]
    images = []
    for acq, volume in zip(acquisitions, volumes):
        t = float(acq.thickness_mm)
        images.append(to_image(to_int16(volume), (grid.spacing[0], grid.spacing[1], t),
                               (grid.origin[0], grid.origin[1], z_low + t / 2.0)))
    return images


def acquire(patient: Patient, acquisition: Acquisition) -> sitk.Image:
    """Int16 HU image of the patient under one acquisition (see ``acquire_all`` for several at once)."""
    return acquire_all(patient, [acquisition])[0]
