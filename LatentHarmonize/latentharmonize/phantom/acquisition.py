"""Acquisition effects of the chest CT phantom: kernel (MTF and noise power spectrum), dose, vendor, slice thickness.

Applied in this order to the patient's anatomy (HU on the fine grid), all acquisitions of a patient sharing ONE
quantum-noise realisation, as reconstructions of one raw scan do (field notes section 2):

1. kernel: the in-plane frequency response ``MTF(f) = (1 + e (f/fc)^2) 2^-((f/fc)^2)``, ``f`` in line pairs per mm;
   ``e > ln 2`` gives the overshoot (edge enhancement) of sharp kernels. The noise is white quantum noise filtered
   by ``sqrt(f) * MTF(f)`` (ramp filter of filtered back-projection times the kernel): its power spectrum peaks at
   low frequency for soft kernels and at high frequency for sharp ones, and its SD grows with sharpness;
2. dose: noise SD scales as ``sqrt(reference mAs / mAs)``;
3. vendor: HU calibration ``scale * HU + offset`` (a few tens of HU);
4. slice thickness: average along z over the thickness, sampled every thickness (contiguous slices), keeping the
   patient's physical z extent, so thicker slices are fewer, smoother and less noisy.

Besides the named kernels, a kernel can sit anywhere between them (:func:`kernel_at`: sharpness 0 soft, 0.5
standard, 1 sharp, parameters interpolated in between); ``settings.SETTING_RANGES`` draws such settings.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import fft

from ..errors import InputError

REFERENCE_MAS = 100.0


@dataclass(frozen=True)
class Kernel:
    """Reconstruction kernel: MTF roll-off ``fc`` (lp/mm), edge boost ``e`` and noise SD (HU) at 100 mAs, thin."""

    fc: float
    edge: float
    noise_sd: float


# MTF50: soft 3.4 lp/cm (~ Siemens B30f, GE STANDARD), standard 4.8 lp/cm (~ B40f-B45f), sharp 6.6 lp/cm with 13 %
# overshoot (~ B50f-B60f, GE LUNG): approximate typical published values, not measurements. Noise SDs are
# calibrated so the emphysema index (% lung voxels < -950 HU) of the paired soft/sharp reconstructions reproduces
# the kernel effect of the field notes (5.4 % B30f vs 15.3 % B50f on the same scans); see docs/phantom.md.
KERNELS = {
    "soft": Kernel(fc=0.34, edge=0.0, noise_sd=18.0),
    "standard": Kernel(fc=0.34, edge=0.5, noise_sd=24.0),
    "sharp": Kernel(fc=0.36, edge=1.2, noise_sd=48.0),
}

# HU' = scale * HU + offset (field notes: vendor calibration shifts HU by a few tens). Vendors are anonymous.
VENDORS = {
    "A": (1.0, 0.0),
    "B": (0.985, 18.0),
    "C": (1.02, -12.0),
}

HU_RANGE = (-1024, 3071)
SHARPNESS_OF = {"soft": 0.0, "standard": 0.5, "sharp": 1.0}


def kernel_at(sharpness: float) -> Kernel:
    """The kernel at ``sharpness`` in [0, 1]: soft, standard and sharp at 0, 0.5, 1, parameters linear in between."""
    if not 0.0 <= sharpness <= 1.0:
        raise InputError(f"Kernel sharpness must lie in [0, 1], got {sharpness}.")
    names = sorted(SHARPNESS_OF, key=SHARPNESS_OF.get)
    at = [SHARPNESS_OF[n] for n in names]
    return Kernel(*(float(np.interp(sharpness, at, [getattr(KERNELS[n], f) for n in names]))
                    for f in ("fc", "edge", "noise_sd")))


def kernel_label(sharpness: float) -> str:
    """The name of a sharpness: soft below 1/3, sharp from 2/3, standard in between."""
    return "soft" if sharpness < 1 / 3 else "standard" if sharpness < 2 / 3 else "sharp"


def _radial_frequency(shape_yx, spacing_yx) -> np.ndarray:
    """|f| (lp/mm) on the rfft2 grid of an image with the given in-plane shape and spacing."""
    fy = fft.fftfreq(shape_yx[0], spacing_yx[0])[:, None]
    fx = fft.rfftfreq(shape_yx[1], spacing_yx[1])[None, :]
    return np.sqrt(fy ** 2 + fx ** 2)


def mtf(kernel: Kernel, f) -> np.ndarray:
    """Modulation transfer function of ``kernel`` at spatial frequency ``f`` (lp/mm)."""
    x2 = (np.asarray(f) / kernel.fc) ** 2
    return (1.0 + kernel.edge * x2) * np.exp2(-x2)


def noise_filter(kernel: Kernel, shape_yx, spacing_yx) -> np.ndarray:
    """Amplitude filter turning unit white noise into kernel-shaped noise of unit SD on this grid."""
    f = _radial_frequency(shape_yx, spacing_yx)
    h = np.sqrt(f) * mtf(kernel, f)
    weight = np.full(h.shape, 2.0)  # rfft half spectrum: columns other than 0 and Nyquist stand for two
    weight[:, 0] = 1.0
    if shape_yx[1] % 2 == 0:
        weight[:, -1] = 1.0
    power = (weight * h ** 2).sum() / (shape_yx[0] * shape_yx[1])
    return (h / np.sqrt(power)).astype(np.float32)


def shared_noise(shape, noise_seed: int, z: int) -> np.ndarray:
    """The patient's unit white quantum noise of slice ``z``: identical for every acquisition of the patient."""
    rng = np.random.default_rng(np.random.SeedSequence([noise_seed, z]))
    return rng.standard_normal(shape[1:], dtype=np.float32)


def thickness_average(volume: np.ndarray, dz: float, thickness: float) -> np.ndarray:
    """Average ``volume`` [z, y, x] (slices ``dz`` mm) over contiguous slabs of ``thickness`` mm along z.

    The slabs tile the volume's z extent from its lower edge; each output slice is the exact mean over its slab of
    the piecewise-constant input (fractional slices weighted by their overlap).
    """
    if thickness < dz - 1e-6:
        raise InputError(f"Slice thickness {thickness} mm is thinner than the phantom's fine grid ({dz} mm); "
                         f"choose a thickness of at least {dz} mm.")
    n_out = int(np.floor(volume.shape[0] * dz / thickness + 1e-6))
    out = np.zeros((n_out,) + volume.shape[1:], dtype=np.float32)
    edges = np.arange(volume.shape[0] + 1) * dz
    for j in range(n_out):
        lo, hi = j * thickness, (j + 1) * thickness
        overlap = np.clip(np.minimum(edges[1:], hi) - np.maximum(edges[:-1], lo), 0.0, None) / thickness
        for i in np.nonzero(overlap > 1e-9)[0]:
            out[j] += np.float32(overlap[i]) * volume[i]
    return out


def thicker_slices(image: sitk.Image, thickness: float) -> sitk.Image:
    """A CT as a reconstruction with thicker contiguous slices would show it: :func:`thickness_average` of its
    slices, the phantom's own slice model applied to a real scan (``scripts/slice_thickness_pair.py``). Each new
    slice sits at the centre of its slab; the in-plane grid, the direction and the pixel type stay the scan's."""
    dz = image.GetSpacing()[2]
    if thickness < dz - 1e-6:
        raise InputError(f"A thicker reconstruction needs slices of at least the scan's {dz:g} mm; "
                         f"{thickness:g} mm was asked for.")
    if int(np.floor(image.GetSize()[2] * dz / thickness + 1e-6)) < 1:
        raise InputError(f"The scan's {image.GetSize()[2]} slices of {dz:g} mm do not fill one {thickness:g} mm "
                         f"slice.")
    slabs = thickness_average(sitk.GetArrayViewFromImage(image).astype(np.float32), dz, thickness)
    pixel = sitk.GetArrayViewFromImage(image).dtype
    if np.issubdtype(pixel, np.integer):
        slabs = np.rint(slabs)
    out = sitk.GetImageFromArray(slabs.astype(pixel))
    out.SetSpacing(image.GetSpacing()[:2] + (float(thickness),))
    out.SetDirection(image.GetDirection())
    z_axis = np.array(image.GetDirection()).reshape(3, 3)[:, 2]
    out.SetOrigin(tuple(np.array(image.GetOrigin()) + z_axis * (thickness - dz) / 2.0))
    return out


def reconstruct(hu: np.ndarray, spacing, noise_seed: int, settings, slab: int = 16) -> list:
    """Reconstructed float32 volumes [z, y, x] of ``hu`` for each ``(kernel, vendor, dose_mAs, thickness_mm)``;
    ``kernel`` is a name of ``KERNELS`` or a :class:`Kernel`, ``vendor`` a name of ``VENDORS`` or ``(scale, offset)``.

    Works slab by slab: the anatomy and shared-noise spectra are computed once per slab and reused by every
    setting, so adding an acquisition costs one inverse FFT per slice.
    """
    shape_yx, sp_yx = hu.shape[1:], (spacing[1], spacing[0])
    f = _radial_frequency(shape_yx, sp_yx)
    filters = []
    for kernel, vendor, dose, _ in settings:
        kernel = KERNELS[kernel] if isinstance(kernel, str) else kernel
        sd = kernel.noise_sd * np.sqrt(REFERENCE_MAS / dose)
        filters.append((mtf(kernel, f).astype(np.float32), noise_filter(kernel, shape_yx, sp_yx) * np.float32(sd)))
    out = [np.empty(hu.shape, dtype=np.float32) for _ in settings]
    for z0 in range(0, hu.shape[0], slab):
        zs = slice(z0, min(hu.shape[0], z0 + slab))
        anatomy = fft.rfft2(hu[zs], workers=-1)
        noise = np.stack([shared_noise(hu.shape, noise_seed, z) for z in range(zs.start, zs.stop)])
        noise = fft.rfft2(noise, workers=-1)
        for (m, h), volume in zip(filters, out):
            volume[zs] = fft.irfft2(anatomy * m + noise * h, s=shape_yx, workers=-1)
    results = []
    for (_, vendor, dose, thickness), volume in zip(settings, out):
        scale, offset = VENDORS[vendor] if isinstance(vendor, str) else vendor
        volume *= np.float32(scale)
        volume += np.float32(offset)
        results.append(thickness_average(volume, spacing[2], thickness))
    return results


def to_int16(volume: np.ndarray) -> np.ndarray:
    """Round to CT integers, clipped to the 12-bit HU range scanners store."""
    return np.clip(np.rint(volume), *HU_RANGE).astype(np.int16)
