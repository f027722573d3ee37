"""Body of the chest CT phantom: the fine grid, the patient's body plan and the analytic shapes of the chest.

Everything is placed in physical millimetres, LPS (x towards the patient's left, y posterior, z superior), on the
patient's *fine grid*. Organ sizes scale with the field of view so the small test geometry still holds a whole
chest.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FineGrid:
    """The patient's fine grid: ``shape`` (z, y, x), ``spacing`` (x, y, z) mm, centred on the origin of LPS space."""

    shape: tuple
    spacing: tuple

    @property
    def origin(self) -> tuple:
        nz, ny, nx = self.shape
        sx, sy, sz = self.spacing
        return (-(nx - 1) * sx / 2.0, -(ny - 1) * sy / 2.0, -(nz - 1) * sz / 2.0)

    @property
    def extent_z(self) -> tuple:
        """Physical z interval (mm) covered by the slices, slab edges included."""
        z0 = self.origin[2] - self.spacing[2] / 2.0
        return (z0, z0 + self.shape[0] * self.spacing[2])

    def axes(self) -> tuple:
        """1D physical coordinates (z, y, x) of the voxel centres, float64."""
        return tuple(o + s * np.arange(n) for o, s, n in zip(self.origin[::-1], self.spacing[::-1], self.shape))


SMALL_GRID = FineGrid(shape=(112, 192, 192), spacing=(1.25, 1.25, 1.25))   # 240 x 240 x 140 mm
FULL_GRID = FineGrid(shape=(300, 512, 512), spacing=(0.7, 0.7, 1.0))       # 358 x 358 x 300 mm


@dataclass(frozen=True)
class BodyPlan:
    """Patient-specific sizes and positions (mm) of the chest structures."""

    A: float            # body half-width
    B: float            # body half-depth (antero-posterior)
    fat: float          # subcutaneous fat thickness
    muscle: float       # chest wall muscle thickness
    rib: float          # rib band thickness
    Ac: float           # thoracic cavity half-width at the lung bases
    Bc: float           # thoracic cavity half-depth
    yc: float           # cavity centre y
    z_base: float       # lowest lung point (posterior costophrenic recess)
    z_apex: float       # lung apex
    dome: tuple         # diaphragm dome heights (right, left)
    rib_period: float
    rib_phase: float
    disc_phase: float
    gravity_hu: float   # dependent-lung density gradient

    @property
    def height(self) -> float:
        return self.z_apex - self.z_base

    def w(self, z):
        """Normalised lung height: 0 at the lowest recess, 1 at the apex."""
        return (z - self.z_base) / self.height


def draw_body_plan(grid: FineGrid, rng: np.random.Generator, male: bool) -> BodyPlan:
    """Sizes scale with the field of view (``k`` = 1 for a 358 mm adult FOV) and vary by patient."""
    fov = grid.shape[2] * grid.spacing[0]
    k = fov / 358.0
    z0, z1 = grid.extent_z
    size = rng.uniform(0.94, 1.02) * (1.02 if male else 0.97)
    A = 158.0 * k * size
    B = A * rng.uniform(0.66, 0.74)
    fat = k * rng.uniform(6.0, 20.0) * (1.0 if male else 1.3)
    muscle = k * rng.uniform(9.0, 14.0)
    rib = k * 9.0
    wall = 2.0 + fat + muscle + rib
    lz = z1 - z0
    z_base = z0 + lz * rng.uniform(0.03, 0.06)
    z_apex = z1 - lz * rng.uniform(0.05, 0.09)
    h = z_apex - z_base
    right_dome = z_base + h * rng.uniform(0.27, 0.33)
    return BodyPlan(A=A, B=B, fat=fat, muscle=muscle, rib=rib, Ac=A - wall, Bc=B - wall, yc=0.02 * B,
                    z_base=z_base, z_apex=z_apex, dome=(right_dome, right_dome - h * rng.uniform(0.02, 0.06)),
                    rib_period=h * rng.uniform(0.13, 0.16), rib_phase=rng.uniform(0, 1), disc_phase=rng.uniform(0, 1),
                    gravity_hu=rng.uniform(15.0, 35.0))


# --- analytic shapes ------------------------------------------------------------------------------------------

def ellipse(x, y, a, b, y0):
    """Normalised squared radius of an axis-aligned ellipse centred at (0, y0): < 1 inside."""
    return (x / a) ** 2 + ((y - y0) / b) ** 2


def cavity_scale(plan: BodyPlan, z):
    """Cross-section scale of the thoracic cavity with height: wider base, dome-shaped apex, 0 above it."""
    w = np.clip(plan.w(np.asarray(z, dtype=np.float64)), 0.0, None)
    top = np.sqrt(np.clip(1.0 - ((w - 0.6) / 0.4).clip(0, None) ** 2, 0.0, None))
    return (1.04 - 0.12 * w) * top


def heart(plan: BodyPlan):
    """Heart ellipsoid (centre x, y, z; semi-axes) sitting on the diaphragm, shifted to the patient's left."""
    return (0.16 * plan.Ac, plan.yc - 0.28 * plan.Bc, plan.z_base + 0.27 * plan.height,
            0.44 * plan.Ac, 0.56 * plan.Bc, 0.26 * plan.height)


def vertebra(plan: BodyPlan):
    """Vertebral body centre y and radius."""
    return plan.yc + 0.74 * plan.Bc, 0.21 * plan.Bc


def diaphragm_z(plan: BodyPlan, x, y):
    """Height of the diaphragm surface: two domes, higher centrally, lowest in the posterior recesses."""
    out = np.full(np.broadcast(x, y).shape, plan.z_base)
    for side, top in zip((-1.0, 1.0), plan.dome):
        q = ellipse(x - side * 0.5 * plan.Ac, y, 0.8 * plan.Ac, 1.05 * plan.Bc, plan.yc - 0.15 * plan.Bc)
        out = np.maximum(out, plan.z_base + (top - plan.z_base) * np.clip(1.0 - q, 0.0, 1.0) ** 0.6)
    return out


def lung_side(plan: BodyPlan, x, y, z):
    """0 outside the lungs, 1 right lung (x < 0), 2 left lung, at broadcastable coordinates (mm)."""
    s = cavity_scale(plan, z)
    inside = ((x / plan.Ac) ** 2 + ((y - plan.yc) / plan.Bc) ** 2) < s ** 2
    hx, hy, hz, ha, hb, hc = heart(plan)
    inside &= ((x - hx) / ha) ** 2 + ((y - hy) / hb) ** 2 + ((z - hz) / hc) ** 2 > 1.0
    # mediastinum: a midline band, wider anteriorly (great vessels, thymic fat)
    half = plan.Ac * (0.12 + 0.06 * np.clip(-(y - plan.yc) / plan.Bc, 0.0, 1.0))
    inside &= np.abs(x - 0.03 * plan.Ac) > half
    yv, rv = vertebra(plan)
    inside &= ~((np.abs(x) < 1.5 * rv) & (y > yv - 1.05 * rv))
    inside &= z > diaphragm_z(plan, x, y)
    return np.where(inside, np.where(x < 0, 1, 2), 0).astype(np.uint8)


def lung_points(plan: BodyPlan, side: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """About ``n`` uniform random points (x, y, z mm) inside one lung (rejection sampling in its bounding box)."""
    lo = np.array([-plan.Ac if side == 1 else 0.0, plan.yc - plan.Bc, plan.z_base])
    hi = np.array([0.0 if side == 1 else plan.Ac, plan.yc + plan.Bc, plan.z_apex])
    pts = lo + (hi - lo) * rng.random((4 * n, 3))
    return pts[lung_side(plan, pts[:, 0], pts[:, 1], pts[:, 2]) == side][:n]
