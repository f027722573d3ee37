"""Phenotypes of the chest CT phantom: each patient's disease pattern, as target lung fractions of each tissue."""
from __future__ import annotations

import numpy as np

# target lung fractions drawn uniformly in these ranges (rest is normal lung)
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


def phenotype_of(patient_index: int, seed: int) -> str:
    """Phenotypes cycle with the index (offset by the seed), so any 5 consecutive patients cover all of them."""
    return PHENOTYPES[(int(patient_index) + int(seed)) % len(PHENOTYPES)]


def draw_fractions(phenotype: str, rng: np.random.Generator) -> dict:
    """Target lung fraction of each disease tissue for a phenotype."""
    return {name: float(rng.uniform(lo, hi)) for name, (lo, hi) in FRACTION_RANGES[phenotype].items()}
