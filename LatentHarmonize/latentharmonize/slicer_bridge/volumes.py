"""Volumes between the Slicer scene and the backend's files.

Slicer hands volumes over as numpy arrays in ``[k, j, i]`` order with a 4x4 IJK-to-RAS matrix; the backend reads and
writes NRRD files whose physical space is LPS (ITK). The voxel order is the same on both sides, only the physical
frame differs by the sign of the first two axes, so arrays pass through unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import SimpleITK as sitk

from ..errors import InputError

# Sign flip between LPS (ITK, backend files) and RAS (Slicer scene)
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def ijk_to_ras_matrix(image: sitk.Image) -> np.ndarray:
    """4x4 IJK-to-RAS matrix (Slicer convention) of a SimpleITK image (LPS)."""
    matrix = np.eye(4)
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    matrix[:3, :3] = direction * np.asarray(image.GetSpacing(), dtype=float)[None, :]
    matrix[:3, 3] = image.GetOrigin()
    return _LPS_TO_RAS @ matrix


def image_from_array(array_kji: np.ndarray, ijk_to_ras) -> sitk.Image:
    """SimpleITK image (LPS) from a Slicer-ordered ``[k, j, i]`` array and its IJK-to-RAS matrix."""
    array_kji = np.asarray(array_kji)
    if array_kji.ndim != 3:
        raise InputError(f"Expected a 3D volume, got an array of shape {array_kji.shape}.")
    lps = _LPS_TO_RAS @ np.asarray(ijk_to_ras, dtype=float).reshape(4, 4)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    if np.any(spacing <= 0):
        raise InputError("The volume has a zero voxel spacing; fix its geometry (Volumes module) before analysis.")
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_kji))
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(o) for o in lps[:3, 3]))
    image.SetDirection(tuple(float(d) for d in (lps[:3, :3] / spacing[None, :]).ravel()))
    return image


def write_input_volume(array_kji: np.ndarray, ijk_to_ras, path) -> Path:
    """Write the CT for the backend as NRRD: Int16 when the HU values are whole numbers in range, else Float32.

    Uncompressed: this is a scratch copy in Slicer's temporary folder, and gzip took 1.7 s of every Analyze click on a
    512 x 512 x 240 CT (raw: 0.1 s to write, 0.3 s less for the backend to read).
    """
    array_kji = np.asarray(array_kji)
    if not np.issubdtype(array_kji.dtype, np.number) or array_kji.size == 0:
        raise InputError("The input volume has no numeric voxels; select a CT volume.")
    finite = np.isfinite(array_kji)
    if not finite.all():
        raise InputError("The input volume contains NaN or infinite voxels; it is not a CT in HU.")
    whole = np.issubdtype(array_kji.dtype, np.integer) or bool(np.all(array_kji == np.round(array_kji)))
    lo, hi = float(array_kji.min()), float(array_kji.max())
    dtype = np.int16 if whole and lo >= -32768 and hi <= 32767 else np.float32
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image_from_array(array_kji.astype(dtype, copy=False), ijk_to_ras), str(path), False)
    return path


def write_mask(mask_kji: np.ndarray, ijk_to_ras, path) -> Path:
    """Write a lung mask (non-zero = lung) for ``--mask`` as a UInt8 NRRD with values 0/1."""
    mask = np.asarray(mask_kji) != 0
    if not mask.any():
        raise InputError("The selected lung mask segment is empty; pick another segment or clear the mask.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image_from_array(mask.astype(np.uint8), ijk_to_ras), str(path), True)
    return path


def write_mask_segments(labels_kji: np.ndarray, ijk_to_ras, names: Sequence[str], path) -> Path:
    """Write a lung mask given as several segments (left/right lung, lobes) for ``--mask``: a UInt8 label map
    (segment ``n`` of ``names`` has label ``n + 1``) as a ``.seg.nrrd`` whose header names each label, so the
    backend reports the composition per segment under these names."""
    labels = np.asarray(labels_kji)
    if not names:
        raise InputError("The lung mask segmentation has no segments; pick another segmentation or clear the mask.")
    if len(names) > 255 or labels.max() > len(names):
        raise InputError(f"The mask has labels above {len(names)}, the number of its segments.")
    if not (labels > 0).any():
        raise InputError("The selected lung mask segments are empty; pick other segments or clear the mask.")
    if len(set(names)) != len(names):
        raise InputError(f"Two mask segments share a name ({', '.join(names)}); rename them so each region is "
                         "reported under its own name.")
    image = image_from_array(labels.astype(np.uint8), ijk_to_ras)
    for index, name in enumerate(names):
        image.SetMetaData(f"Segment{index}_ID", f"Segment_{index + 1}")
        image.SetMetaData(f"Segment{index}_Name", str(name))
        image.SetMetaData(f"Segment{index}_LabelValue", str(index + 1))
        image.SetMetaData(f"Segment{index}_Layer", "0")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), True)
    return path


@dataclass
class VolumeArray:
    """A volume as Slicer wants it: ``[k, j, i]`` array and IJK-to-RAS matrix."""

    array: np.ndarray
    ijk_to_ras: np.ndarray


def read_volume_array(path) -> VolumeArray:
    """Read a backend volume (label, confidence or lung map) for ``slicer.util.addVolumeFromArray``."""
    image = sitk.ReadImage(str(path))
    return VolumeArray(sitk.GetArrayFromImage(image), ijk_to_ras_matrix(image))


def largest_region_center(mask_kji: np.ndarray, ijk_to_ras) -> Optional[tuple]:
    """RAS point (mm) at the voxel nearest the centroid of the largest connected region of a mask, or None."""
    from scipy import ndimage  # lazy: installed with the dependencies, after the module first imports the bridge

    components, count = ndimage.label(np.asarray(mask_kji) != 0)
    if count == 0:
        return None
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    voxels = np.argwhere(components == int(np.argmax(sizes)))
    # the voxel of the region closest to its centroid: stays inside even for curved regions
    k, j, i = voxels[np.argmin(((voxels - voxels.mean(axis=0)) ** 2).sum(axis=1))]
    ras = np.asarray(ijk_to_ras, dtype=float).reshape(4, 4) @ np.array([i, j, k, 1.0])
    return tuple(float(v) for v in ras[:3])
