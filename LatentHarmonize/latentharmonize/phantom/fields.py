"""Random fields of the chest CT phantom on coarse lattices: smooth and band-pass textures, upsampled slab by slab."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import fft, ndimage


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
