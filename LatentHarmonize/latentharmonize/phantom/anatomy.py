"""Anatomy of the chest CT phantom: body wall, bones, mediastinum, lungs, airways, vessels and lung tissue types.

Renders the patient's body plan (``body``), airway and vessel trees (``tubes``), lung tissue (``parenchyma``) and,
in the scan variants, gas below the diaphragm (``variants``) into HU and truth labels on the fine grid. The volume
is rendered in slabs of slices, so the 512 x 512 x 300 geometry needs only a few slab-sized temporaries.
HU values follow the field notes (`shared/reference/field-notes.md` section 2); see `docs/phantom.md` for the table.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
from scipy import ndimage

from ..tissue import TISSUE_LABELS
from .body import BodyPlan, FineGrid, cavity_scale, diaphragm_z, ellipse, heart, lung_side, vertebra
from .fields import Lattice, Upsampler, bandpass_field, gaussian_field
from .parenchyma import CLAIM_ORDER, claim_thresholds, lung_hu, tissue_scores, vessel_visibility
from .tubes import airway_and_vessel_tubes, splat_tubes
from .variants import gas_ceiling, in_gas

# --- HU of the non-lung anatomy (contrast-free chest CT) -------------------------------------------------------
AIR_HU = -1000.0
FAT_HU = -100.0         # subcutaneous and mediastinal fat
MUSCLE_HU = 40.0        # muscle, heart, vessels, airway walls (unenhanced blood ~ +40)
SKIN_HU = 30.0
LIVER_HU = 55.0
RIB_HU = 700.0          # cortical/marrow mix of thin ribs at this resolution
CORTEX_HU = 900.0
CANCELLOUS_HU = 250.0
DISC_HU = 90.0
CSF_HU = 20.0

SLAB = 24  # slices rendered at a time


def _chest_wall(plan: BodyPlan, x, y, tex2d) -> np.ndarray:
    """z-independent HU of air, skin, subcutaneous fat and chest-wall muscle (the cavity is painted later)."""
    hu = np.full(np.broadcast(x, y).shape, AIR_HU, dtype=np.float32)
    hu[ellipse(x, y, plan.A, plan.B, plan.yc) < 1] = SKIN_HU
    inner = plan.A - 2.0, plan.B - 2.0
    fat = ellipse(x, y, *inner, plan.yc) < 1
    hu[fat] = FAT_HU + 8.0 * tex2d[fat]
    musc = ellipse(x, y, inner[0] - plan.fat, inner[1] - plan.fat, plan.yc) < 1
    hu[musc] = MUSCLE_HU + 6.0 * tex2d[musc]
    return hu


def _paint_bones(hu, plan: BodyPlan, x, y, z, q, s) -> None:
    """Ribs (slanted periodic bands just outside the cavity), sternum and thoracic spine, in place."""
    band = (q >= s) & (q < s + plan.rib / plan.Ac) & (s > 0.05)
    phase = (z - 0.8 * (y - plan.yc)) / plan.rib_period + plan.rib_phase
    rib = band & (np.sin(2 * np.pi * phase) > 0.3) & ~((np.abs(x) < 0.15 * plan.Ac) & (y < plan.yc))
    hu[rib] = RIB_HU
    w = plan.w(z)
    sternum = ellipse(x, y, 0.1 * plan.Ac, 0.6 * plan.rib, plan.yc - plan.Bc - 0.5 * plan.rib) < 1
    sternum = sternum & (w > 0.15) & (w < 0.9)
    hu[np.broadcast_to(sternum, hu.shape)] = RIB_HU - 200.0
    yv, rv = vertebra(plan)
    r_body = np.sqrt(x ** 2 + (y - yv) ** 2)
    disc = ((z / plan.rib_period + plan.disc_phase) % 1.0) < 0.18
    body = np.broadcast_to(r_body < rv, hu.shape)
    hu[body] = np.where(np.broadcast_to(disc, hu.shape), DISC_HU, CANCELLOUS_HU)[body]
    cortex = np.broadcast_to((r_body < rv) & (r_body > rv - 1.5), hu.shape) & ~np.broadcast_to(disc, hu.shape)
    hu[cortex] = CORTEX_HU
    yc_canal = yv + 1.55 * rv
    r_canal = np.sqrt(x ** 2 + (y - yc_canal) ** 2)
    arch = (r_canal < 0.95 * rv) | ((np.abs(x) < 0.2 * rv) & (y > yc_canal) & (y < yv + 3.3 * rv))
    hu[np.broadcast_to(arch, hu.shape)] = RIB_HU - 100.0
    hu[np.broadcast_to(r_canal < 0.55 * rv, hu.shape)] = CSF_HU


def lung_box(plan: BodyPlan, grid: FineGrid) -> tuple:
    """In-plane index slices (y, x) of the box holding the thoracic cavity: lung work is done only there."""
    _, ya, xa = grid.axes()
    ys = np.nonzero(np.abs(ya - plan.yc) <= 1.06 * plan.Bc)[0]
    xs = np.nonzero(np.abs(xa) <= 1.06 * plan.Ac)[0]
    return slice(ys[0], ys[-1] + 1), slice(xs[0], xs[-1] + 1)



@dataclass(frozen=True)
class _Lung:
    """What the lung needs slab by slab, on the box ``(by, bx)`` of the fine grid holding the thoracic cavity."""

    box: tuple
    y: np.ndarray               # box coordinates (mm), [ny, 1] and [1, nx]
    x: np.ndarray
    dependent: np.ndarray       # gravity gradient (HU) of the box
    occupancy: dict             # uint8 tube occupancy on the fine grid, by tube kind
    scores: dict                # disease propensities on the coarse lattice ...
    thresholds: dict            # ... and the thresholds at which each disease claims a voxel
    coarse: Upsampler
    smooth: np.ndarray          # coarse-lattice field
    texture: Upsampler
    tex_fine: np.ndarray        # texture-lattice fields
    tex_coarse: np.ndarray
    ggo_level: float


def _lung(plan: BodyPlan, grid: FineGrid, rng: np.random.Generator, fractions: dict, ggo_level: float,
          normal_shift_hu: float = 0.0) -> _Lung:
    """Tubes, tissue regions and textures of the lung, drawn from ``rng`` in this order; ``normal_shift_hu`` is added
    to the normal parenchyma with the gravity gradient."""
    k = grid.shape[2] * grid.spacing[0] / 358.0
    tubes = airway_and_vessel_tubes(plan, grid, rng)
    occupancy = {name: splat_tubes(t, grid) for name, t in tubes.items()}
    za, ya, xa = grid.axes()
    by, bx = lung_box(plan, grid)
    box_axes = (za, ya[by], xa[bx])
    coarse = Lattice.covering(box_axes, 4.0)
    scores, lung_c = tissue_scores(plan, coarse, rng, k)
    thresholds = claim_thresholds(scores, lung_c, fractions)
    smooth = gaussian_field(coarse, rng, 10.0)
    texture = Lattice.covering(box_axes, 2.0 if min(grid.spacing) >= 1.0 else 1.5)
    tex_fine, tex_coarse = bandpass_field(texture, rng, 7.0), bandpass_field(texture, rng, 12.0)
    y, x = ya[by][:, None], xa[bx][None, :]
    gravity = plan.gravity_hu * np.clip(0.5 + 0.5 * (y - plan.yc) / plan.Bc, 0, 1)
    dependent = (gravity + normal_shift_hu).astype(np.float32)
    return _Lung(box=(by, bx), y=y, x=x, dependent=dependent, occupancy=occupancy, scores=scores,
                 thresholds=thresholds, coarse=Upsampler(coarse, box_axes), smooth=smooth,
                 texture=Upsampler(texture, box_axes), tex_fine=tex_fine, tex_coarse=tex_coarse, ggo_level=ggo_level)


@dataclass(frozen=True)
class _Section:
    """The z-independent maps of an axial slice: coordinates, chest wall HU, cavity radius, diaphragm height,
    organ cross-sections and, with gas, the gas ceiling."""

    y: np.ndarray               # [ny, 1] and [1, nx] (mm)
    x: np.ndarray
    wall: np.ndarray
    q: np.ndarray               # normalised radius in the cavity ellipse
    diaphragm: np.ndarray
    heart: np.ndarray           # heart ellipse's normalised squared radius, in-plane part
    esophagus: np.ndarray
    liver_side: np.ndarray
    ceiling: Optional[np.ndarray]


def _section(plan: BodyPlan, grid: FineGrid, rng: np.random.Generator, gas: Optional[np.ndarray]) -> _Section:
    """The slice maps; the chest wall's texture is drawn from ``rng``."""
    _, ya, xa = grid.axes()
    y, x = ya[:, None], xa[None, :]
    wall_texture = ndimage.gaussian_filter(rng.standard_normal(grid.shape[1:]).astype(np.float32),
                                           1.5 / grid.spacing[0])
    wall = _chest_wall(plan, x, y, wall_texture / wall_texture.std())
    diaphragm = diaphragm_z(plan, x, y)
    hx, hy, _, ha, hb, _ = heart(plan)
    yv, rv = vertebra(plan)
    return _Section(y=y, x=x, wall=wall, q=np.sqrt(ellipse(x, y, plan.Ac, plan.Bc, plan.yc)), diaphragm=diaphragm,
                    heart=ellipse(x - hx, y, ha, hb, hy),
                    esophagus=ellipse(x - 0.02 * plan.Ac, y, 0.05 * plan.Ac, 0.05 * plan.Ac, yv - 1.4 * rv) < 1,
                    liver_side=x < 0.1 * plan.Ac,
                    ceiling=None if gas is None else gas_ceiling(diaphragm, grid.spacing[0]))


def _render_body(plan: BodyPlan, section: _Section, z: np.ndarray, gas: Optional[np.ndarray]) -> tuple:
    """(HU, gas mask or None) of the slab at heights ``z`` [n, 1, 1], the lung not yet painted."""
    s = cavity_scale(plan, z)
    h = np.repeat(section.wall[None], z.shape[0], axis=0)
    cavity = section.q[None] < s
    # mediastinum and abdomen: fat with heart, oesophagus; liver/spleen below the diaphragm
    h[cavity] = FAT_HU
    _, _, hz, _, _, hc = heart(plan)
    organ = (section.heart[None] + ((z - hz) / hc) ** 2 < 1) | section.esophagus[None]
    h[cavity & organ] = MUSCLE_HU
    below = cavity & (z < section.diaphragm[None])
    h[below] = np.where(np.broadcast_to(section.liver_side, h.shape), LIVER_HU, MUSCLE_HU)[below]
    _paint_bones(h, plan, section.x[None], section.y[None], z, section.q[None], s)
    if gas is None:
        return h, None
    # in the abdomen, bone aside
    gas_mask = cavity & (h < RIB_HU - 200.0) & in_gas(gas, section.x[None], section.y[None], z, section.ceiling[None])
    h[gas_mask] = AIR_HU
    return h, gas_mask


def _lung_labels(plan: BodyPlan, lung: _Lung, z: np.ndarray, zs: slice) -> tuple:
    """(tissue labels, lung mask) of the slab's cavity box: each disease claims the voxels above its threshold."""
    inside = lung_side(plan, lung.x[None], lung.y[None], z) > 0
    labels = np.where(inside, TISSUE_LABELS["normal"], 0).astype(np.uint8)
    for name in reversed(CLAIM_ORDER):
        if np.isfinite(lung.thresholds[name]):
            labels[inside & (lung.coarse(lung.scores[name], zs) >= lung.thresholds[name])] = TISSUE_LABELS[name]
    return labels, inside


def _paint_lung(h: np.ndarray, plan: BodyPlan, lung: _Lung, z: np.ndarray, zs: slice) -> np.ndarray:
    """Paint the lung into the slab's HU ``h`` in place; returns the truth labels of the cavity box."""
    by, bx = lung.box
    hb = h[:, by, bx]  # a view: painting it paints h
    labels, inside = _lung_labels(plan, lung, z, zs)
    parenchyma = lung_hu(labels, lung.texture(lung.tex_fine, zs), lung.texture(lung.tex_coarse, zs),
                         lung.coarse(lung.smooth, zs), np.broadcast_to(lung.dependent, labels.shape), lung.ggo_level)
    hb[inside] = parenchyma[inside]
    # vessels and airways (all inside the cavity) on top, blended by partial-volume occupancy
    occupancy = {name: occ[zs, by, bx] for name, occ in lung.occupancy.items()}
    v = occupancy["vessels"] * (vessel_visibility(labels) / 255.0)
    hb += (MUSCLE_HU - hb) * v
    hb += (MUSCLE_HU - hb) * (occupancy["wall"] / 255.0)
    hb += (AIR_HU - hb) * (occupancy["lumen"] / 255.0)
    labels[occupancy["large_lumen"] > 127] = 0
    return labels


def render_anatomy(plan: BodyPlan, grid: FineGrid, rng: np.random.Generator, fractions: dict,
                   ggo_level: float, gas: np.ndarray = None, normal_shift_hu: float = 0.0) -> tuple:
    """HU (float32), truth labels (uint8, tissue label in the lung, 0 elsewhere) and the gas mask (bool) on the fine
    grid; ``gas``: ellipsoids of gas below the diaphragm (``variants.gas_pockets``), none by default;
    ``normal_shift_hu``: HU added to the normal parenchyma (see ``make_patient``)."""
    lung = _lung(plan, grid, rng, fractions, ggo_level, normal_shift_hu)
    section = _section(plan, grid, rng, gas)
    za = grid.axes()[0]
    by, bx = lung.box
    hu = np.empty(grid.shape, dtype=np.float32)
    labels = np.zeros(grid.shape, dtype=np.uint8)
    gas_mask = np.zeros(grid.shape, dtype=bool)
    for z0 in range(0, grid.shape[0], SLAB):
        zs = slice(z0, min(grid.shape[0], z0 + SLAB))
        z = za[zs][:, None, None]
        h, gas_slab = _render_body(plan, section, z, gas)
        if gas_slab is not None:
            gas_mask[zs] = gas_slab
        labels[zs, by, bx] = _paint_lung(h, plan, lung, z, zs)
        hu[zs] = h
    return hu, labels, gas_mask
