"""Anatomy of the chest CT phantom: body wall, bones, mediastinum, lungs, airways, vessels and lung tissue types.

Everything is placed in physical millimetres, LPS (x towards the patient's left, y posterior, z superior), on the
patient's *fine grid*. Organ sizes scale with the field of view so the small test geometry still holds a whole
chest; lung textures (holes, cysts, lines, vessels) keep physical sizes whatever the grid.

The volume is rendered in slabs of slices, so the 512 x 512 x 300 geometry needs only a few slab-sized temporaries.
HU values follow the field notes (`shared/reference/field-notes.md` section 2); see `docs/phantom.md` for the table.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import fft, ndimage

from ..tissue import TISSUE_LABELS

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

SLAB = 24  # slices rendered at a time


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

def _ellipse(x, y, a, b, y0):
    """Normalised squared radius of an axis-aligned ellipse centred at (0, y0): < 1 inside."""
    return (x / a) ** 2 + ((y - y0) / b) ** 2


def cavity_scale(plan: BodyPlan, z):
    """Cross-section scale of the thoracic cavity with height: wider base, dome-shaped apex, 0 above it."""
    w = np.clip(plan.w(np.asarray(z, dtype=np.float64)), 0.0, None)
    top = np.sqrt(np.clip(1.0 - ((w - 0.6) / 0.4).clip(0, None) ** 2, 0.0, None))
    return (1.04 - 0.12 * w) * top


def _heart(plan: BodyPlan):
    """Heart ellipsoid (centre x, y, z; semi-axes) sitting on the diaphragm, shifted to the patient's left."""
    return (0.16 * plan.Ac, plan.yc - 0.28 * plan.Bc, plan.z_base + 0.27 * plan.height,
            0.44 * plan.Ac, 0.56 * plan.Bc, 0.26 * plan.height)


def _vertebra(plan: BodyPlan):
    """Vertebral body centre y and radius."""
    return plan.yc + 0.74 * plan.Bc, 0.21 * plan.Bc


def diaphragm_z(plan: BodyPlan, x, y):
    """Height of the diaphragm surface: two domes, higher centrally, lowest in the posterior recesses."""
    out = np.full(np.broadcast(x, y).shape, plan.z_base)
    for side, top in zip((-1.0, 1.0), plan.dome):
        q = _ellipse(x - side * 0.5 * plan.Ac, y, 0.8 * plan.Ac, 1.05 * plan.Bc, plan.yc - 0.15 * plan.Bc)
        out = np.maximum(out, plan.z_base + (top - plan.z_base) * np.clip(1.0 - q, 0.0, 1.0) ** 0.6)
    return out


def lung_side(plan: BodyPlan, x, y, z):
    """0 outside the lungs, 1 right lung (x < 0), 2 left lung, at broadcastable coordinates (mm)."""
    s = cavity_scale(plan, z)
    inside = ((x / plan.Ac) ** 2 + ((y - plan.yc) / plan.Bc) ** 2) < s ** 2
    hx, hy, hz, ha, hb, hc = _heart(plan)
    inside &= ((x - hx) / ha) ** 2 + ((y - hy) / hb) ** 2 + ((z - hz) / hc) ** 2 > 1.0
    # mediastinum: a midline band, wider anteriorly (great vessels, thymic fat)
    half = plan.Ac * (0.12 + 0.06 * np.clip(-(y - plan.yc) / plan.Bc, 0.0, 1.0))
    inside &= np.abs(x - 0.03 * plan.Ac) > half
    yv, rv = _vertebra(plan)
    inside &= ~((np.abs(x) < 1.5 * rv) & (y > yv - 1.05 * rv))
    inside &= z > diaphragm_z(plan, x, y)
    return np.where(inside, np.where(x < 0, 1, 2), 0).astype(np.uint8)


# --- tubes: airways and vessels ----------------------------------------------------------------------------------

@dataclass
class Tubes:
    """Centre-line points (x, y, z mm) with radii (mm): a cloud of balls whose union is the tube tree."""

    points: np.ndarray
    radii: np.ndarray

    @staticmethod
    def empty() -> "Tubes":
        return Tubes(np.zeros((0, 3)), np.zeros(0))

    def __add__(self, other: "Tubes") -> "Tubes":
        return Tubes(np.vstack([self.points, other.points]), np.concatenate([self.radii, other.radii]))


def segments_to_tubes(starts, ends, radii, step: float) -> Tubes:
    """Sample segments every ``max(step, r/3)`` mm so consecutive balls overlap into a smooth tube."""
    starts, ends, radii = np.atleast_2d(starts), np.atleast_2d(ends), np.atleast_1d(radii)
    if len(radii) == 0:
        return Tubes.empty()
    length = np.linalg.norm(ends - starts, axis=1)
    counts = np.ceil(length / np.maximum(step, radii / 3.0)).astype(int) + 1
    seg = np.repeat(np.arange(len(radii)), counts)
    first = np.cumsum(counts) - counts
    t = (np.arange(counts.sum()) - first[seg]) / np.maximum(counts[seg] - 1, 1)
    pts = starts[seg] + (ends[seg] - starts[seg]) * t[:, None]
    return Tubes(pts, radii[seg])


def _perpendicular(d: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random unit vector perpendicular to each row of ``d``."""
    r = rng.normal(size=d.shape)
    r -= (r * d).sum(1, keepdims=True) * d
    return r / np.linalg.norm(r, axis=1, keepdims=True)


def grow_tree(plan: BodyPlan, root, directions, r0, r_min: float, targets: np.ndarray, rng: np.random.Generator,
              step: float, max_generations: int = 16) -> Tubes:
    """Grow a branching tree inside the lung, one generation at a time for all branches (vectorised).

    Each branch is 8-13 radii (+1.5-3 mm) long and splits into a major (0.85-0.93 r, 5-25 deg) and a minor (0.7-0.8 r,
    30-50 deg) child, close to Murray's law. Each child also leans towards a random point of the lung (``targets``),
    which spreads the tree through the whole lung as real vessels reach every part of it.
    A branch that would leave the lung is halved, and dropped if its end is still outside.
    """
    root = np.asarray(root, dtype=np.float64)
    d = np.asarray(directions, dtype=np.float64)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    p = np.repeat(root[None], len(d), axis=0)
    r = np.broadcast_to(np.asarray(r0, dtype=np.float64), (len(d),)).copy()
    tubes = Tubes.empty()
    for gen in range(max_generations):
        if len(r) == 0:
            break
        length = r * rng.uniform(8.0, 13.0, len(r)) + rng.uniform(1.5, 3.0, len(r))
        end = p + d * length[:, None]
        if gen > 0:  # lobar branches start in the hilum, outside the lung mask
            out = lung_side(plan, end[:, 0], end[:, 1], end[:, 2]) == 0
            end[out] = p[out] + d[out] * (length[out, None] / 2.0)
            keep = lung_side(plan, end[:, 0], end[:, 1], end[:, 2]) > 0
            p, end, d, r = p[keep], end[keep], d[keep], r[keep]
        tubes = tubes + segments_to_tubes(p, end, r, step)
        perp = _perpendicular(d, rng)
        children_d, children_r = [], []
        for sign, ang, scale in ((1.0, (5, 25), (0.85, 0.93)), (-1.0, (30, 50), (0.7, 0.8))):
            theta = np.deg2rad(rng.uniform(*ang, len(r)))[:, None]
            toward = targets[rng.integers(0, len(targets), len(r))] - end
            toward /= np.maximum(np.linalg.norm(toward, axis=1, keepdims=True), 1e-6)
            cd = np.cos(theta) * d + sign * np.sin(theta) * perp + 0.6 * toward
            children_d.append(cd / np.linalg.norm(cd, axis=1, keepdims=True))
            children_r.append(r * rng.uniform(*scale, len(r)))
        p, d, r = np.vstack([end, end]), np.vstack(children_d), np.concatenate(children_r)
        big = r >= r_min
        p, d, r = p[big], d[big], r[big]
    return tubes


def lung_points(plan: BodyPlan, side: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """About ``n`` uniform random points (x, y, z mm) inside one lung (rejection sampling in its bounding box)."""
    lo = np.array([-plan.Ac if side == 1 else 0.0, plan.yc - plan.Bc, plan.z_base])
    hi = np.array([0.0 if side == 1 else plan.Ac, plan.yc + plan.Bc, plan.z_apex])
    pts = lo + (hi - lo) * rng.random((4 * n, 3))
    return pts[lung_side(plan, pts[:, 0], pts[:, 1], pts[:, 2]) == side][:n]


def _root_directions(lateral: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` random directions from the hilum into one lung (lateral half-space, stretched along z)."""
    d = rng.normal(size=(n, 3)) * [1.0, 1.0, 1.6]
    d[:, 0] = lateral * np.abs(d[:, 0])
    return d


def splat_tubes(tubes: Tubes, grid: FineGrid) -> np.ndarray:
    """Occupancy (uint8, 255 = full) of the union of balls, anti-aliased over one voxel (partial volume).

    A tube thinner than a voxel is spread over about one voxel; its occupancy is scaled by ``(2r / voxel)^2`` so
    it keeps roughly its true cross-section, i.e. small vessels fade as they do in CT.
    """
    sp = np.asarray(grid.spacing[::-1], dtype=np.float64)           # z, y, x
    blur = float(sp.mean())
    bucket = np.maximum(np.ceil(tubes.radii / sp.min()), 1).astype(int)
    reaches = {b: np.ceil((b * sp.min() + blur / 2.0) / sp - 1e-9).astype(int) for b in np.unique(bucket)}
    pad = max([int(r.max()) for r in reaches.values()], default=0) + 1
    padded = tuple(n + 2 * pad for n in grid.shape)
    occ = np.zeros(int(np.prod(padded)), dtype=np.uint8)
    idx = (tubes.points[:, ::-1] - np.asarray(grid.origin[::-1])) / sp
    base = np.rint(idx).astype(np.int64)
    frac_mm = ((idx - base) * sp).astype(np.float32)
    strides = np.array([padded[1] * padded[2], padded[2], 1])
    base_flat = (base + pad) @ strides
    for b, reach in reaches.items():
        margin = pad - reach  # balls may stick out of the grid into the padding, never beyond it
        inside = np.all((base >= -margin) & (base < np.asarray(grid.shape) + margin), axis=1)
        sel = np.nonzero((bucket == b) & inside)[0]
        offs = np.stack(np.meshgrid(*[np.arange(-e, e + 1) for e in reach], indexing="ij"), -1).reshape(-1, 3)
        offs_mm = (offs * sp).astype(np.float32)
        for chunk in np.array_split(sel, len(sel) * len(offs) // 2_000_000 + 1):
            d2 = sum((offs_mm[None, :, i] - frac_mm[chunk, None, i]) ** 2 for i in range(3))
            r = tubes.radii[chunk, None].astype(np.float32)
            val = np.clip((r - np.sqrt(d2)) / blur + 0.5, 0.0, 1.0) * np.minimum(1.0, (2.0 * r / blur) ** 2)
            hit = val > 0
            flat = (base_flat[chunk, None] + (offs @ strides)[None])[hit]
            np.maximum.at(occ, flat, np.rint(val[hit] * 255).astype(np.uint8))
    core = tuple(slice(pad, pad + n) for n in grid.shape)
    return np.ascontiguousarray(occ.reshape(padded)[core])


def airway_and_vessel_tubes(plan: BodyPlan, grid: FineGrid, rng: np.random.Generator) -> dict:
    """Centre lines of the trachea, main bronchi, bronchial trees, pulmonary arteries and veins, great vessels."""
    step = 0.5 * min(grid.spacing)
    Ac, Bc, H, yc = plan.Ac, plan.Bc, plan.height, plan.yc
    rt = 0.075 * Ac                                             # tracheal radius (adult ~9-10 mm)
    carina = np.array([-0.02 * Ac, yc + 0.18 * Bc, plan.z_base + 0.62 * H])
    top = np.array([carina[0], carina[1] - 0.08 * Bc, grid.extent_z[1] + 5.0])
    hila = {1: np.array([-0.40 * Ac, yc + 0.10 * Bc, carina[2] - 0.09 * H]),
            2: np.array([0.43 * Ac, yc + 0.12 * Bc, carina[2] - 0.13 * H])}
    large_airways = segments_to_tubes(np.array([top, carina, carina]), np.array([carina, hila[1], hila[2]]),
                                      np.array([rt, 0.62 * rt, 0.55 * rt]), step)
    bronchi, vessels = Tubes.empty(), Tubes.empty()
    for side, hilum in hila.items():
        lat = -1.0 if side == 1 else 1.0
        lobar = np.array([[0.3 * lat, 0.1, 1.0], [lat, 0.0, 0.25], [0.6 * lat, -0.7, -0.5], [0.5 * lat, 0.6, -0.9],
                          [0.9 * lat, 0.2, -0.6]]) + rng.normal(0, 0.12, (5, 3))
        targets = lung_points(plan, side, 2000, rng)
        bronchi += grow_tree(plan, hilum, lobar, 0.4 * rt, 1.1, targets, rng, step, max_generations=4)
        for offset in ([0, -0.06 * Bc, 0.03 * H], [0.05 * lat * Ac, 0.08 * Bc, -0.08 * H]):  # arteries, veins
            vessels += grow_tree(plan, hilum + offset, _root_directions(lat, 16, rng),
                                 0.17 * rt * rng.uniform(0.7, 1.0, 16), 0.35, targets, rng, step)
    # unenhanced great vessels: aorta (ascending, arch, descending) and pulmonary trunk to both hila
    hx, hy, hz, _, _, hc = _heart(plan)
    yv, rv = _vertebra(plan)
    asc0 = np.array([0.02 * Ac, hy + 0.2 * Bc, hz + 0.5 * hc])
    asc1 = np.array([0.02 * Ac, yc - 0.05 * Bc, plan.z_base + 0.80 * H])
    desc0 = np.array([0.25 * Ac, yv - 0.2 * Bc, plan.z_base + 0.80 * H])
    desc1 = np.array([0.22 * Ac, yv - 0.25 * Bc, grid.extent_z[0] - 5.0])
    trunk0 = np.array([0.12 * Ac, hy, hz + 0.7 * hc])
    trunk1 = np.array([0.08 * Ac, yc - 0.02 * Bc, carina[2] - 0.1 * H])
    great = segments_to_tubes(np.array([asc0, asc1, desc0, trunk0, trunk1, trunk1]),
                              np.array([asc1, desc0, desc1, trunk1, hila[1] + [0, -0.06 * Bc, 0.03 * H],
                                        hila[2] + [0, -0.06 * Bc, 0.03 * H]]),
                              np.array([0.13, 0.12, 0.1, 0.12, 0.06, 0.06]) * Ac, 2.0 * step)
    lumen = large_airways + bronchi
    wall = Tubes(lumen.points, lumen.radii * 1.2 + 0.2)
    return {"lumen": lumen, "wall": wall, "vessels": vessels + great,
            "large_lumen": large_airways}


# --- random fields ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Lattice:
    """A coarse regular lattice covering fine-grid axes, for smooth random fields (values at ``axes``)."""

    axes: tuple  # (z, y, x) 1D coordinates mm

    @staticmethod
    def covering(fine_axes: tuple, spacing: float) -> "Lattice":
        axes = []
        for a in fine_axes:
            n = int(np.ceil((a[-1] - a[0]) / spacing)) + 2
            axes.append(a[0] - spacing / 2.0 + spacing * np.arange(n))
        return Lattice(tuple(axes))

    @property
    def shape(self) -> tuple:
        return tuple(len(a) for a in self.axes)

    @property
    def spacing(self) -> float:
        return float(self.axes[0][1] - self.axes[0][0])


def gaussian_field(lattice: Lattice, rng: np.random.Generator, sigma_mm: float) -> np.ndarray:
    """Smooth Gaussian random field (zero mean, unit SD) with correlation length ``sigma_mm``."""
    f = ndimage.gaussian_filter(rng.standard_normal(lattice.shape).astype(np.float32), sigma_mm / lattice.spacing,
                                mode="wrap")
    return (f - f.mean()) / f.std()


def bandpass_field(lattice: Lattice, rng: np.random.Generator, wavelength_mm: float, rel_width: float = 0.35):
    """Random field whose power sits in a shell around 1/wavelength: blobs and cells of about half a wavelength."""
    noise = rng.standard_normal(lattice.shape).astype(np.float32)
    freqs = [fft.fftfreq(n, lattice.spacing) for n in lattice.shape[:2]]
    freqs.append(fft.rfftfreq(lattice.shape[2], lattice.spacing))
    fz, fy, fx = np.meshgrid(*freqs, indexing="ij", sparse=True)
    f = np.sqrt(fz ** 2 + fy ** 2 + fx ** 2)
    f0 = 1.0 / wavelength_mm
    shell = np.exp(-0.5 * ((f - f0) / (rel_width * f0)) ** 2).astype(np.float32)
    out = fft.irfftn(fft.rfftn(noise) * shell, s=lattice.shape).astype(np.float32)
    return (out - out.mean()) / out.std()


class Upsampler:
    """Separable linear interpolation from a coarse lattice to slabs of fine-grid axes."""

    def __init__(self, lattice: Lattice, fine_axes: tuple):
        self._w = [self._weights(src, dst) for src, dst in zip(lattice.axes, fine_axes)]

    @staticmethod
    def _weights(src, dst):
        pos = (dst - src[0]) / (src[1] - src[0])
        i0 = np.clip(np.floor(pos).astype(int), 0, len(src) - 2)
        return i0, np.clip(pos - i0, 0.0, 1.0).astype(np.float32)

    def __call__(self, field: np.ndarray, zs: slice) -> np.ndarray:
        (iz, tz), (iy, ty), (ix, tx) = self._w
        iz, tz = iz[zs], tz[zs][:, None, None]
        f = field[iz] * (1 - tz) + field[iz + 1] * tz
        f = f[:, iy] * (1 - ty[None, :, None]) + f[:, iy + 1] * ty[None, :, None]
        return f[:, :, ix] * (1 - tx) + f[:, :, ix + 1] * tx


# --- lung tissue ------------------------------------------------------------------------------------------------

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


# --- rendering ----------------------------------------------------------------------------------------------------

def _chest_wall(plan: BodyPlan, x, y, tex2d) -> np.ndarray:
    """z-independent HU of air, skin, subcutaneous fat and chest-wall muscle (the cavity is painted later)."""
    hu = np.full(np.broadcast(x, y).shape, AIR_HU, dtype=np.float32)
    hu[_ellipse(x, y, plan.A, plan.B, plan.yc) < 1] = SKIN_HU
    inner = plan.A - 2.0, plan.B - 2.0
    fat = _ellipse(x, y, *inner, plan.yc) < 1
    hu[fat] = FAT_HU + 8.0 * tex2d[fat]
    musc = _ellipse(x, y, inner[0] - plan.fat, inner[1] - plan.fat, plan.yc) < 1
    hu[musc] = MUSCLE_HU + 6.0 * tex2d[musc]
    return hu


def _paint_bones(hu, plan: BodyPlan, x, y, z, q, s) -> None:
    """Ribs (slanted periodic bands just outside the cavity), sternum and thoracic spine, in place."""
    band = (q >= s) & (q < s + plan.rib / plan.Ac) & (s > 0.05)
    phase = (z - 0.8 * (y - plan.yc)) / plan.rib_period + plan.rib_phase
    rib = band & (np.sin(2 * np.pi * phase) > 0.3) & ~((np.abs(x) < 0.15 * plan.Ac) & (y < plan.yc))
    hu[rib] = RIB_HU
    w = plan.w(z)
    sternum = _ellipse(x, y, 0.1 * plan.Ac, 0.6 * plan.rib, plan.yc - plan.Bc - 0.5 * plan.rib) < 1
    sternum = sternum & (w > 0.15) & (w < 0.9)
    hu[np.broadcast_to(sternum, hu.shape)] = RIB_HU - 200.0
    yv, rv = _vertebra(plan)
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


# --- gas below the diaphragm (scan variants) ------------------------------------------------------------------------

DIAPHRAGM_MM = 5.0  # soft tissue between gas and lung: diaphragm and stomach/bowel wall


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


def _gas_mask(pockets: np.ndarray, x, y, z, ceiling) -> np.ndarray:
    """Inside any gas ellipsoid and below ``ceiling`` (the diaphragm less DIAPHRAGM_MM, lowered by the steepest
    nearby slope so the soft-tissue layer is that thick in 3D, not only vertically)."""
    gas = np.zeros(np.broadcast(x, y, z).shape, bool)
    for cx, cy, cz, ax, ay, az in pockets:
        gas |= ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 + ((z - cz) / az) ** 2 < 1.0
    return gas & (z < ceiling)


def lung_box(plan: BodyPlan, grid: FineGrid) -> tuple:
    """In-plane index slices (y, x) of the box holding the thoracic cavity: lung work is done only there."""
    _, ya, xa = grid.axes()
    ys = np.nonzero(np.abs(ya - plan.yc) <= 1.06 * plan.Bc)[0]
    xs = np.nonzero(np.abs(xa) <= 1.06 * plan.Ac)[0]
    return slice(ys[0], ys[-1] + 1), slice(xs[0], xs[-1] + 1)


def render_anatomy(plan: BodyPlan, grid: FineGrid, rng: np.random.Generator, fractions: dict,
                   ggo_level: float, gas: np.ndarray = None) -> tuple:
    """HU (float32), truth labels (uint8, tissue label in the lung, 0 elsewhere) and the gas mask (bool) on the fine
    grid; ``gas``: ellipsoids of gas below the diaphragm (:func:`gas_pockets`), none by default."""
    k = grid.shape[2] * grid.spacing[0] / 358.0
    tubes = airway_and_vessel_tubes(plan, grid, rng)
    occ = {name: splat_tubes(t, grid) for name, t in tubes.items()}
    za, ya, xa = grid.axes()
    by, bx = lung_box(plan, grid)
    box_axes = (za, ya[by], xa[bx])
    coarse = Lattice.covering(box_axes, 4.0)
    scores, lung_c = tissue_scores(plan, coarse, rng, k)
    thresholds = claim_thresholds(scores, lung_c, fractions)
    smooth = gaussian_field(coarse, rng, 10.0)
    texture = Lattice.covering(box_axes, 2.0 if min(grid.spacing) >= 1.0 else 1.5)
    tex_fine, tex_coarse = bandpass_field(texture, rng, 7.0), bandpass_field(texture, rng, 12.0)
    up_c, up_t = Upsampler(coarse, box_axes), Upsampler(texture, box_axes)

    y2, x2 = ya[:, None], xa[None, :]
    wall_texture = ndimage.gaussian_filter(rng.standard_normal(grid.shape[1:]).astype(np.float32),
                                           1.5 / grid.spacing[0])
    wall = _chest_wall(plan, x2, y2, wall_texture / wall_texture.std())
    q2 = np.sqrt(_ellipse(x2, y2, plan.Ac, plan.Bc, plan.yc))
    yb, xb = ya[by][:, None], xa[bx][None, :]
    dependent = (plan.gravity_hu * np.clip(0.5 + 0.5 * (yb - plan.yc) / plan.Bc, 0, 1)).astype(np.float32)
    diaphragm = diaphragm_z(plan, x2, y2)
    hx, hy, hz, ha, hb, hc = _heart(plan)
    heart2 = _ellipse(x2 - hx, y2, ha, hb, hy)
    yv, rv = _vertebra(plan)
    esophagus = _ellipse(x2 - 0.02 * plan.Ac, y2, 0.05 * plan.Ac, 0.05 * plan.Ac, yv - 1.4 * rv) < 1
    liver_side = x2 < 0.1 * plan.Ac
    if gas is not None:
        reach = max(1, int(round(2.0 * DIAPHRAGM_MM / grid.spacing[0])))
        ceiling = ndimage.minimum_filter(diaphragm, size=2 * reach + 1) - DIAPHRAGM_MM
    gas_mask = np.zeros(grid.shape, dtype=bool)

    hu = np.empty(grid.shape, dtype=np.float32)
    labels = np.zeros(grid.shape, dtype=np.uint8)
    for z0 in range(0, grid.shape[0], SLAB):
        zs = slice(z0, min(grid.shape[0], z0 + SLAB))
        z = za[zs][:, None, None]
        s = cavity_scale(plan, z)
        h = np.repeat(wall[None], z.shape[0], axis=0)
        cavity = q2[None] < s
        # mediastinum and abdomen: fat with heart, oesophagus; liver/spleen below the diaphragm
        h[cavity] = FAT_HU
        organ = (heart2[None] + ((z - hz) / hc) ** 2 < 1) | esophagus[None]
        h[cavity & organ] = MUSCLE_HU
        below = cavity & (z < diaphragm[None])
        h[below] = np.where(np.broadcast_to(liver_side, h.shape), LIVER_HU, MUSCLE_HU)[below]
        _paint_bones(h, plan, x2[None], y2[None], z, q2[None], s)
        if gas is not None:  # in the abdomen, bone aside
            gas_mask[zs] = cavity & (h < RIB_HU - 200.0) & _gas_mask(gas, x2[None], y2[None], z, ceiling[None])
            h[gas_mask[zs]] = AIR_HU
        # lung tissue, inside the cavity box only (hb is a view into h)
        hb = h[:, by, bx]
        lung = lung_side(plan, xb[None], yb[None], z) > 0
        lab = np.where(lung, TISSUE_LABELS["normal"], 0).astype(np.uint8)
        for name in reversed(CLAIM_ORDER):
            if np.isfinite(thresholds[name]):
                lab[lung & (up_c(scores[name], zs) >= thresholds[name])] = TISSUE_LABELS[name]
        parenchyma = lung_hu(lab, up_t(tex_fine, zs), up_t(tex_coarse, zs), up_c(smooth, zs),
                             np.broadcast_to(dependent, lab.shape), ggo_level)
        hb[lung] = parenchyma[lung]
        # vessels and airways (all inside the cavity) on top, blended by partial-volume occupancy
        v = occ["vessels"][zs, by, bx] * (vessel_visibility(lab) / 255.0)
        hb += (MUSCLE_HU - hb) * v
        hb += (MUSCLE_HU - hb) * (occ["wall"][zs, by, bx] / 255.0)
        hb += (AIR_HU - hb) * (occ["lumen"][zs, by, bx] / 255.0)
        lab[occ["large_lumen"][zs, by, bx] > 127] = 0
        hu[zs] = h
        labels[zs, by, bx] = lab
    return hu, labels, gas_mask
