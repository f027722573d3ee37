"""The chest CT phantom's sample scan: one full-size chest CT with mixed disease, the 3D Slicer module's sample data."""
from __future__ import annotations

from pathlib import Path

import SimpleITK as sitk

from ..atomic import StagedOutput
from ..errors import InputError
from .patient import make_patient
from .scanner import acquire
from .settings import DEFAULT_ACQUISITIONS

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
