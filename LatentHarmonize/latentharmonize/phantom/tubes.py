"""Airways and vessels of the chest CT phantom: branching tube trees grown in the lungs, splatted onto the fine grid."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .body import BodyPlan, FineGrid, heart, lung_points, lung_side, vertebra


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
    hx, hy, hz, _, _, hc = heart(plan)
    yv, rv = vertebra(plan)
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
