"""Clinical outcome of the chest CT phantom: FVC and survival from the TRUE lung composition and age."""
from __future__ import annotations

import numpy as np

# survival: Weibull proportional hazards on the true composition and age (time in years)
LOG_HAZARD_PER_FRACTION = {"honeycombing": 14.0, "reticulation": 9.0, "emphysema": 6.0, "ground_glass": 3.0,
                           "consolidation": 3.0}   # e.g. 10 % honeycombing: hazard ratio 4
LOG_HAZARD_PER_YEAR_OF_AGE = 0.04       # hazard ratio 1.5 per decade
WEIBULL_SHAPE = 1.3
WEIBULL_SCALE_YEARS = 10.0              # healthy 65-year-old
CENSORING_YEARS = (1.0, 8.0)            # uniform follow-up, independent of everything else: ~30 % censored


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
