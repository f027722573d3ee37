"""Acquisition settings of the chest CT phantom: the named acquisitions, and settings drawn from continuous ranges.

Besides the named kernels and vendors, settings can be drawn per scan from continuous ranges (``SETTING_RANGES``):
kernel sharpness (0 soft, 0.5 standard, 1 sharp, parameters interpolated in between), dose, thickness and the
calibration's scale and offset. The ``"train"`` ranges and the ``"heldout"`` ones do not overlap, so a model
trained on the first meets settings it has never seen on the second.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Optional, Tuple

import numpy as np

from ..errors import InputError
from .acquisition import KERNELS, VENDORS, kernel_at, kernel_label

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


@dataclass(frozen=True)
class Acquisition:
    """One acquisition setting: reconstruction kernel, scanner vendor, tube current-time product, slice thickness.

    A drawn setting (``draw_acquisitions``) also has ``sharpness`` (the kernel between the named ones; ``kernel`` is
    then its name, ``acquisition.kernel_label``) and ``calibration`` (scale, offset; ``vendor`` is then ``"drawn"``)."""

    name: str
    kernel: str
    vendor: str
    dose_mAs: float
    thickness_mm: float
    sharpness: Optional[float] = None
    calibration: Optional[tuple] = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not _SAFE_NAME.match(self.name):
            raise InputError(f"Acquisition name {self.name!r} must be letters, digits, '_' or '-' (it names a file).")
        if self.kernel not in KERNELS:
            raise InputError(f"Unknown kernel {self.kernel!r} in acquisition {self.name!r}; "
                             f"use one of {sorted(KERNELS)}.")
        if self.calibration is None and self.vendor not in VENDORS:
            raise InputError(f"Unknown vendor {self.vendor!r} in acquisition {self.name!r}; "
                             f"use one of {sorted(VENDORS)}.")
        for label, value in (("dose_mAs", self.dose_mAs), ("thickness_mm", self.thickness_mm)):
            if not (isinstance(value, (int, float)) and np.isfinite(value) and value > 0):
                raise InputError(f"Acquisition {self.name!r}: {label} must be a positive number, got {value!r}.")

    def setting(self) -> tuple:
        """``(kernel, vendor, dose_mAs, thickness_mm)`` as ``acquisition.reconstruct`` takes it."""
        kernel = self.kernel if self.sharpness is None else kernel_at(self.sharpness)
        vendor = self.vendor if self.calibration is None else tuple(self.calibration)
        return kernel, vendor, float(self.dose_mAs), float(self.thickness_mm)


# One raw scan reconstructed soft and sharp (the paired case), a low-dose standard-kernel scan from another vendor,
# and a thick sharp-kernel scan from a third vendor.
DEFAULT_ACQUISITIONS = (
    Acquisition("a_soft_thin", "soft", "A", 120.0, 1.25),
    Acquisition("a_sharp_thin", "sharp", "A", 120.0, 1.25),
    Acquisition("b_standard_lowdose", "standard", "B", 30.0, 2.5),
    Acquisition("c_sharp_thick", "sharp", "C", 100.0, 5.0),
)

MIN_AIR_HU = -1030.0


Interval = Tuple[float, float]


@dataclass(frozen=True)
class SettingRanges:
    """Continuous acquisition ranges, each a tuple of (low, high) intervals drawn uniformly by their length."""

    sharpness: Tuple[Interval, ...]
    dose_mAs: Tuple[Interval, ...]
    thickness_mm: Tuple[Interval, ...]
    hu_scale: Tuple[Interval, ...]
    hu_offset: Tuple[Interval, ...]

    def draw(self, rng: np.random.Generator, field: str) -> float:
        intervals = np.asarray(getattr(self, field), dtype=float)
        lengths = intervals[:, 1] - intervals[:, 0]
        low, high = intervals[rng.choice(len(intervals), p=lengths / lengths.sum())]
        return float(rng.uniform(low, high))


# Training ranges sit inside the held-out ones' gaps: held-out scans are softer or sharper, noisier, thicker and
# further off calibration than any training scan (the named vendors B and C are at x0.985 + 18 and x1.02 - 12).
SETTING_RANGES = {
    "train": SettingRanges(sharpness=((0.15, 0.85),), dose_mAs=((50.0, 150.0),), thickness_mm=((1.25, 3.0),),
                           hu_scale=((0.99, 1.01),), hu_offset=((-10.0, 10.0),)),
    "heldout": SettingRanges(sharpness=((0.0, 0.15), (0.85, 1.0)), dose_mAs=((20.0, 50.0),),
                             thickness_mm=((3.0, 5.0),), hu_scale=((0.975, 0.99), (1.01, 1.025)),
                             hu_offset=((-20.0, -10.0), (10.0, 20.0))),
}


def draw_acquisitions(ranges: str, n: int, rng: np.random.Generator) -> list:
    """``n`` acquisitions drawn from ``SETTING_RANGES[ranges]``: with ``n >= 2`` first a soft and a sharp
    reconstruction of one raw scan (same dose, thickness and calibration, sharpness from the two ends of the range),
    then scans with every setting drawn independently. Each is named by its setting's bins (:func:`setting_name`), so
    the acquisition labels that the rotation and the probe use carry the setting. A calibration that
    would put air (-1000 HU) below ``MIN_AIR_HU`` takes the opposite offset: scanners keep air within a few tens of
    HU, and air below the -1024 floor cannot be measured (``train --calibrate`` refuses such scans)."""
    r = SETTING_RANGES[ranges]

    def calibration():
        scale, offset = r.draw(rng, "hu_scale"), r.draw(rng, "hu_offset")
        return {"hu_scale": scale, "hu_offset": -offset if -1000.0 * scale + offset < MIN_AIR_HU else offset}

    low, high = r.sharpness[0], r.sharpness[-1]
    span = 0.2 * (high[1] - low[0])
    shared = {**{f: r.draw(rng, f) for f in ("dose_mAs", "thickness_mm")}, **calibration()}
    out = []
    if n >= 2:
        out += [(rng.uniform(low[0], min(low[1], low[0] + span)), shared),
                (rng.uniform(max(high[0], high[1] - span), high[1]), shared)]
    while len(out) < n:
        out.append((r.draw(rng, "sharpness"), {**{f: r.draw(rng, f) for f in ("dose_mAs", "thickness_mm")},
                                               **calibration()}))
    acquisitions, names = [], set()
    for k, v in out:
        a = Acquisition("drawn", kernel_label(float(k)), "drawn", round(v["dose_mAs"], 1), round(v["thickness_mm"], 2),
                        sharpness=round(float(k), 3), calibration=(round(v["hu_scale"], 4), round(v["hu_offset"], 1)))
        name, i = setting_name(a), 0
        while name in names:  # two scans of the patient in the same bins
            i += 1
            name = f"{setting_name(a)}_{i}"
        names.add(name)
        acquisitions.append(replace(a, name=name))
    return acquisitions


def setting_name(a: Acquisition) -> str:
    """Bins of a drawn setting: kernel name, dose (below 60 mAs: ``lowdose``), thickness (above 2.5 mm: ``thick``)
    and whether the calibration puts air above or below -1000 HU, e.g. ``sharp_lowdose_thick_airlow``."""
    air = -1000.0 * a.calibration[0] + a.calibration[1]
    return "_".join([a.kernel, "lowdose" if a.dose_mAs < 60 else "dose", "thick" if a.thickness_mm > 2.5 else "thin",
                     "airlow" if air < -1000.0 else "airhigh"])


def resolve_acquisitions(acquisitions) -> list:
    """Acquisitions given by name (of ``DEFAULT_ACQUISITIONS``) or as objects; all the default ones for ``None``."""
    if acquisitions is None:
        return list(DEFAULT_ACQUISITIONS)
    known = {a.name: a for a in DEFAULT_ACQUISITIONS}
    out = []
    for a in acquisitions:
        if isinstance(a, str):
            if a not in known:
                raise InputError(f"Unknown acquisition {a!r}; choose from {', '.join(known)}.")
            a = known[a]
        elif not isinstance(a, Acquisition):
            raise InputError(f"Acquisitions must be names or Acquisition objects, got {type(a).__name__}.")
        out.append(a)
    names = [a.name for a in out]
    if not out or len(set(names)) != len(names):
        raise InputError(f"Give at least one acquisition, each name once (got {names}).")
    return out
