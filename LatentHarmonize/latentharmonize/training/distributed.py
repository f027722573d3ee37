"""Training samples drawn on a Dask cluster (``train --workers`` / ``--scheduler``): one task per patient."""
from __future__ import annotations

from typing import Optional

from ..batch import client_session
from ..cohort import read_cohort
from ..patches import PatchSpec
from ..progress import Progress
from .config import TrainConfig
from .samples import cohort_patients, concat_samples, patient_seed, sample_patient


def sample_cohort_patches(cohort_csv, config: TrainConfig, spec: PatchSpec, client=None,
                          scheduler: Optional[str] = None, workers: Optional[int] = None,
                          progress: Optional[Progress] = None) -> tuple:
    """Distributed :func:`.samples.load_cohort_samples`: one Dask task per patient.

    Same arguments and same result ``(PairedPatches, cohort DataFrame)``, bit for bit: patients keep their order and
    per-patient seeds, and ``concat_samples`` renumbers ids as the serial path.
    Each worker holds one patient's volumes at a time; only the sampled patches travel back.
    """
    cohort = read_cohort(cohort_csv)
    patients = cohort_patients(cohort)
    with client_session(client, scheduler, workers) as active:
        futures = [active.submit(sample_patient, rows, config.per_patient, spec, patient_seed(config.seed, n),
                                 pure=False) for n, (_, rows) in enumerate(patients)]
        parts = []
        for n, future in enumerate(futures):  # gathered in patient order, so the result is deterministic
            parts.append(future.result())
            if progress is not None:
                progress(5 + 15 * (n + 1) / len(patients), "patches", f"patient {patients[n][0]}: sampled")
    return concat_samples(parts), cohort
