"""Lung parenchyma of the chest CT phantom: where each tissue type lies, and its HU texture.

HU values follow the field notes (`shared/reference/field-notes.md` section 2); see `docs/phantom.md` for the table.
Lung textures (holes, cysts, lines, vessels) keep physical sizes whatever the grid.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..tissue import TISSUE_LABELS
from .body import BodyPlan, lung_side
from .fields import Lattice, gaussian_field

# --- lung parenchyma HU per tissue (field notes section 2) -----------------------------------------------------
NORMAL_HU = -905.0          # parenchyma between visible vessels; + 15-35 HU gravity gradient to posterior
EMPH_HOLE_HU = -995.0       # emphysematous air spaces (< -950)
EMPH_WALL_HU = -935.0       # rarefied parenchyma between the holes
GGO_HU_RANGE = (-650.0, -480.0)   # per-patient ground-glass level (field notes: -700..-300)
RETIC_BG_HU = -790.0
RETIC_LINE_HU = -150.0
HONEY_CYST_HU = -975.0      # cysts about -950 and below
HONEY_WALL_HU = -60.0       # thick fibrous walls
CONSOL_HU = 30.0            # field notes: 0..+50

# documented median HU of each tissue region in a soft-kernel, vendor-A acquisition (checked by the tests);
# medians sit below the means because vessels are a bright minority of voxels
TISSUE_MEDIAN_HU = {
    "normal": (-900, -850),
    "emphysema": (-1000, -945),
    "ground_glass": (-700, -400),
    "reticulation": (-720, -540),
    "honeycombing": (-850, -550),
    "consolidation": (-20, 60),
}


# order in which disease regions claim lung voxels (earlier wins)
CLAIM_ORDER = ("honeycombing", "reticulation", "consolidation", "emphysema", "ground_glass")


def tissue_scores(plan: BodyPlan, lattice: Lattice, rng: np.random.Generator, scale_k: float) -> tuple:
    """(scores, lung): propensity of each disease on the coarse lattice, and the lattice's lung mask.

    Scores are smooth random fields plus anatomical priors.
    Fibrosis (reticulation, honeycombing) is basal and subpleural, emphysema apical, consolidation dependent
    (posterior) and basal, ground-glass patchy and near fibrosis. Region size ~ a few cm (field sigma 12-18 mm).
    """
    z, y, x = np.meshgrid(*lattice.axes, indexing="ij", sparse=True)
    lung = lung_side(plan, x, y, z) > 0
    depth = ndimage.distance_transform_edt(lung, sampling=lattice.spacing)
    peripheral = np.exp(-depth / (12.0 * scale_k + 4.0))
    w = np.clip(plan.w(z), 0, 1)
    dependent = np.clip((y - plan.yc) / plan.Bc, -1, 1)
    sig = 14.0 * scale_k + 6.0
    fib = gaussian_field(lattice, rng, sig) + 2.0 * (1 - w) + 2.5 * peripheral
    scores = {
        "honeycombing": fib + 1.0 * peripheral,
        "reticulation": fib,
        "emphysema": gaussian_field(lattice, rng, sig) + 2.0 * w,
        "consolidation": gaussian_field(lattice, rng, sig) + 0.6 * dependent + 0.6 * (1 - w),
        "ground_glass": gaussian_field(lattice, rng, sig * 1.2) + 0.5 * fib,
    }
    return {k: v.astype(np.float32) for k, v in scores.items()}, lung


def claim_thresholds(scores: dict, lung: np.ndarray, fractions: dict) -> dict:
    """Score thresholds such that each disease claims its target fraction of the lung, in ``CLAIM_ORDER``."""
    free = lung.copy()
    n = lung.sum()
    out = {}
    for name in CLAIM_ORDER:
        f = fractions.get(name, 0.0)
        vals = scores[name][free]
        if f <= 0 or len(vals) == 0:
            out[name] = np.inf
            continue
        k = int(min(len(vals), round(f * n)))
        out[name] = float(np.partition(vals, len(vals) - k)[len(vals) - k]) if k > 0 else np.inf
        free &= ~(scores[name] >= out[name])
    return out


def lung_hu(labels: np.ndarray, tex_fine, tex_coarse, smooth, dependent, ggo_level: float) -> np.ndarray:
    """Parenchymal HU of each tissue type (before vessels and airways); inputs are unit-SD texture fields.

    ``tex_coarse`` (~12 mm wavelength) makes emphysema holes and honeycomb cysts; ``tex_fine`` (~7 mm) makes the
    reticular network lines (where it crosses zero) and the lobular texture of normal lung.
    """
    L = TISSUE_LABELS
    hu = NORMAL_HU + dependent + 12.0 * tex_fine
    emph = labels == L["emphysema"]
    holes = np.clip((tex_coarse[emph] + 0.2) / 0.3 + 0.5, 0, 1)
    hu[emph] = EMPH_WALL_HU + (EMPH_HOLE_HU - EMPH_WALL_HU) * holes + 6.0 * tex_fine[emph]
    ggo = labels == L["ground_glass"]
    hu[ggo] = ggo_level + 60.0 * smooth[ggo] + 25.0 * tex_fine[ggo]
    ret = labels == L["reticulation"]
    line = np.clip(1.6 * (1.0 - np.abs(tex_fine[ret]) / 0.45), 0, 1)
    hu[ret] = RETIC_BG_HU + 25.0 * smooth[ret] + (RETIC_LINE_HU - RETIC_BG_HU) * line
    hc = labels == L["honeycombing"]
    cyst = np.clip((tex_coarse[hc] + 0.1) / 0.25 + 0.5, 0, 1)
    hu[hc] = HONEY_WALL_HU + 30.0 * tex_fine[hc] + (HONEY_CYST_HU - HONEY_WALL_HU) * cyst
    cons = labels == L["consolidation"]
    hu[cons] = CONSOL_HU + 12.0 * smooth[cons] + 5.0 * tex_fine[cons]
    return hu


def vessel_visibility(labels: np.ndarray) -> np.ndarray:
    """Vessels are pruned (fewer, thinner) in emphysema and honeycombing."""
    vis = np.ones(labels.shape, dtype=np.float32)
    vis[(labels == TISSUE_LABELS["emphysema"]) | (labels == TISSUE_LABELS["honeycombing"])] = 0.55
    return vis
