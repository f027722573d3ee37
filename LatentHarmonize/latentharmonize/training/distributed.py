"""Training samples drawn on a Dask cluster (``train --workers`` / ``--scheduler``): one task per patient."""
from __future__ import annotations

from typing import Optional

import pandas as pd

from ..batch import client_session
from ..cohort import read_cohort
from ..patches import PatchSpec
from ..progress import Progress
from ..scans import load_scan
from .config import TrainConfig
from .samples import concat_samples, patient_seed, sample_paired_patches


def _sample_patient(rows: pd.DataFrame, per_patient: int, spec: PatchSpec, seed: int):
    """Worker side: read one patient's scans onto the model grid and draw its paired patches."""
    scans = [load_scan(row, spec) for _, row in rows.iterrows()]
    return sample_paired_patches(scans, per_patient, spec, seed=seed)


def sample_cohort_patches(cohort_csv, config: TrainConfig, spec: PatchSpec, client=None,
                          scheduler: Optional[str] = None, workers: Optional[int] = None,
                          progress: Optional[Progress] = None) -> tuple:
    """Distributed :func:`.samples.load_cohort_samples`: one Dask task per patient.

    Same arguments and same result ``(PairedPatches, cohort DataFrame)``, bit for bit: patients keep their order and
    per-patient seeds, and ``concat_samples`` renumbers ids as the serial path.
    Each worker holds one patient's volumes at a time; only the sampled patches travel back.
    """
    cohort = read_cohort(cohort_csv)
    patients = list(dict.fromkeys(cohort["patient"].astype(str)))
    with client_session(client, scheduler, workers) as active:
        futures = [active.submit(_sample_patient, cohort[cohort["patient"].astype(str) == patient],
                                 config.per_patient, spec, patient_seed(config.seed, n), pure=False)
                   for n, patient in enumerate(patients)]
        parts = []
        for n, future in enumerate(futures):  # gathered in patient order, so the result is deterministic
            parts.append(future.result())
            if progress is not None:
                progress(5 + 15 * (n + 1) / len(patients), "patches", f"patient {patients[n]}: sampled")
    return concat_samples(parts), cohort
