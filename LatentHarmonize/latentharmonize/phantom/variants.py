"""Scan variants of the chest CT phantom, for the lung mask (docs/phantom.md).

``chest`` is the cohort's scan; ``gas`` adds stomach and colon gas below the diaphragm; ``cropped`` is that with a
field of view cropped left-right through both lungs; ``abdomen`` is an abdominal scan whose top slices hold only the
lung bases, with colon and bowel gas.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

import numpy as np
from scipy import ndimage

from .body import BodyPlan, FineGrid

VARIANTS = ("chest", "gas", "cropped", "abdomen")
CROPPED_HALF_WIDTH = 0.85    # of the thoracic cavity's half-width: the lungs are cut on both sides
ABDOMEN_LUNG_IN_VIEW = 0.5   # fraction of the lung height in view above the bottom of the lungs
DIAPHRAGM_MM = 5.0  # soft tissue between gas and lung: diaphragm and stomach/bowel wall


def variant_plan(plan: BodyPlan, grid: FineGrid, variant: str) -> BodyPlan:
    """The body plan in the variant's view: for ``abdomen``, moved up so that the grid's top cuts the lungs at
    ``ABDOMEN_LUNG_IN_VIEW`` of their height; unchanged otherwise."""
    if variant != "abdomen":
        return plan
    shift = grid.extent_z[1] - (plan.z_base + ABDOMEN_LUNG_IN_VIEW * plan.height)
    return replace(plan, z_base=plan.z_base + shift, z_apex=plan.z_apex + shift,
                   dome=tuple(d + shift for d in plan.dome))


def variant_gas(plan: BodyPlan, variant: str, seed: int, patient_index: int) -> Optional[np.ndarray]:
    """Gas pockets of the variant (:func:`gas_pockets`), none for ``chest``; drawn with their own generator, so the
    anatomy draws what it draws for the chest scan."""
    if variant == "chest":
        return None
    return gas_pockets(plan, np.random.default_rng([int(seed), int(patient_index), 20]), variant == "abdomen")


def crop_view(variant: str, plan: BodyPlan, grid: FineGrid, volumes: tuple) -> tuple:
    """(grid, volumes) in the variant's field of view: for ``cropped``, the central ``CROPPED_HALF_WIDTH`` of the
    cavity left-right (symmetric, so the grid stays centred on the origin); unchanged otherwise."""
    if variant != "cropped":
        return grid, volumes
    keep = np.abs(grid.axes()[2]) <= CROPPED_HALF_WIDTH * plan.Ac
    volumes = tuple(v[:, :, keep] for v in volumes)
    return FineGrid(shape=volumes[0].shape, spacing=grid.spacing), volumes


def gas_pockets(plan: BodyPlan, rng: np.random.Generator, abdomen: bool) -> np.ndarray:
    """Ellipsoids (centre x, y, z; semi-axes, mm) of gas: the stomach bubble under the left dome and the colon
    (hepatic and splenic flexures, transverse colon); with ``abdomen``, also the ascending and descending colon and
    small-bowel gas further down (an abdominal scan)."""
    Ac, Bc, yc, zb = plan.Ac, plan.Bc, plan.yc, plan.z_base
    depth = plan.dome[1] - zb  # height of the left dome above the lowest recess
    j = rng.uniform(0.9, 1.1, (8, 6))
    pockets = [[0.42 * Ac, yc - 0.1 * Bc, plan.dome[1] - 0.3 * depth, 0.3 * Ac, 0.35 * Bc, 0.9 * depth],    # stomach
               [-0.5 * Ac, yc - 0.35 * Bc, zb, 0.25 * Ac, 0.25 * Bc, 0.6 * depth],                         # hepatic
               [0.6 * Ac, yc + 0.05 * Bc, zb, 0.2 * Ac, 0.25 * Bc, 0.6 * depth],                            # splenic
               [0.0, yc - 0.55 * Bc, zb - 0.2 * depth, 0.6 * Ac, 0.18 * Bc, 0.5 * depth]]                  # transverse
    if abdomen:
        low = zb - 1.5 * depth
        pockets += [[-0.6 * Ac, yc - 0.1 * Bc, low, 0.18 * Ac, 0.2 * Bc, 1.5 * depth],                    # ascending
                    [0.6 * Ac, yc + 0.1 * Bc, low, 0.16 * Ac, 0.18 * Bc, 1.5 * depth],                    # descending
                    [-0.15 * Ac, yc - 0.3 * Bc, low - 0.3 * depth, 0.15 * Ac, 0.15 * Bc, 0.3 * depth],    # small bowel
                    [0.2 * Ac, yc - 0.2 * Bc, low + 0.3 * depth, 0.12 * Ac, 0.12 * Bc, 0.3 * depth]]
    return np.array(pockets) * j[:len(pockets)]


def in_gas(pockets: np.ndarray, x, y, z, ceiling) -> np.ndarray:
    """Inside any gas ellipsoid and below ``ceiling`` (the diaphragm less DIAPHRAGM_MM, lowered by the steepest
    nearby slope so the soft-tissue layer is that thick in 3D, not only vertically)."""
    gas = np.zeros(np.broadcast(x, y, z).shape, bool)
    for cx, cy, cz, ax, ay, az in pockets:
        gas |= ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 + ((z - cz) / az) ** 2 < 1.0
    return gas & (z < ceiling)



def gas_ceiling(diaphragm: np.ndarray, spacing_mm: float) -> np.ndarray:
    """The ceiling of :func:`in_gas` under the diaphragm heights of an axial slice (in-plane ``spacing_mm``)."""
    reach = max(1, int(round(2.0 * DIAPHRAGM_MM / spacing_mm)))
    return ndimage.minimum_filter(diaphragm, size=2 * reach + 1) - DIAPHRAGM_MM
