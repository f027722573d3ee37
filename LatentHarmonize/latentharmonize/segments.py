"""Lung masks with several segments (left/right lungs, or five lobes), given to ``analyze --mask``.

The composition and the densitometry then also have one region per segment. A segment's region name is its name in
a Slicer ``.seg.nrrd`` (read with ``slicerio``), or ``segment_<value>`` for a plain label map; a name that is already
taken (``whole``, ``right``... or another segment's) gets ``_<value>`` appended. A plain label map holding exactly
the values 1 and 2 is the usual right/left lung mask and has no segment regions (its sides are ``right``/``left``
already), nor has a mask with a single value.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk


@dataclass
class MaskSegments:
    """Segment label of every voxel (integer image on the CT's grid, 0 = none) and ``{value: region name}``."""

    labels: sitk.Image
    names: dict


def read_segments(path, reference: sitk.Image) -> MaskSegments | None:
    """The segments of the mask file ``path`` (already accepted by :func:`latentharmonize.io.read_mask` for
    ``reference``, the CT), or None when it has fewer than two segments or is a plain 1/2 right/left mask."""
    from .composition import REGIONS

    path = Path(path)
    if path.is_dir():
        return None  # a mask given as a DICOM series folder is taken as lungs only
    image = sitk.ReadImage(str(path))
    values = sitk.GetArrayFromImage(image)
    if values.dtype.kind == "f":
        if not np.array_equal(values, np.round(values)):
            return None  # not a label map (e.g. a probability mask): no segments
        values = values.astype(np.int64)
    present = [int(v) for v in np.unique(values) if v != 0]
    is_seg = path.name.lower().endswith(".seg.nrrd")
    if len(present) < 2 or (not is_seg and present == [1, 2]):
        return None
    given = {}
    if is_seg:
        import slicerio

        # one layer: read_mask refuses a multi-layer (overlapping) segmentation, which SimpleITK reads as vectors
        described = slicerio.read_segmentation(str(path), skip_voxels=True)["segments"]
        given = {int(s["labelValue"]): str(s["name"]) for s in described}
    names, taken = {}, set(REGIONS)
    for value in present:
        name = given.get(value) or f"segment_{value}"
        if name in taken:
            name = f"{name}_{value}"
        taken.add(name)
        names[value] = name
    labels = sitk.GetImageFromArray(values)
    labels.CopyInformation(reference)  # read_mask accepted the mask's geometry as the CT's
    return MaskSegments(labels, names)


def segment_codes(segments: MaskSegments, box: tuple, inside: np.ndarray) -> tuple:
    """For every lung voxel (``inside`` the ``box``): 1 + the index of its segment in ``regions``, 0 for none;
    and ``regions``, the segment region names in label-value order."""
    values = sorted(segments.names)
    keys = np.asarray(values)
    voxels = sitk.GetArrayViewFromImage(segments.labels)[box][inside]
    position = np.minimum(np.searchsorted(keys, voxels), len(values) - 1)
    code = np.where(keys[position] == voxels, position + 1, 0).astype(np.intp)
    return code, [segments.names[v] for v in values]
