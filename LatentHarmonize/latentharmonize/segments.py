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
import slicerio

# The built-in regions of the composition and densitometry tables, whose names a segment does not take
REGIONS = ("whole", "right", "left", "upper", "middle", "lower")


@dataclass
class MaskSegments:
    """Segment label of every voxel (integer image on the CT's grid, 0 = none) and ``{value: region name}``."""

    labels: sitk.Image
    names: dict


def read_segments(path, reference: sitk.Image) -> MaskSegments | None:
    """The segments of the mask file ``path`` (already accepted by :func:`latentharmonize.io.read_mask` for
    ``reference``, the CT), or None when it has fewer than two segments or is a plain 1/2 right/left mask."""
    path = Path(path)
    if path.is_dir():
        return None  # a mask given as a DICOM series folder is taken as lungs only
    seg_path = path if path.name.lower().endswith(".seg.nrrd") else None
    return _segments(sitk.ReadImage(str(path)), reference, seg_path)


def label_segments(mask: sitk.Image, reference: sitk.Image) -> MaskSegments | None:
    """The segments of a plain label-map mask image (regions ``segment_<value>``) on the grid of ``reference``, or
    None when it has fewer than two values or is a plain 1/2 right/left mask."""
    return _segments(mask, reference, None)


def _segments(image: sitk.Image, reference: sitk.Image, seg_path: Path | None) -> MaskSegments | None:
    """Segments of a mask image; ``seg_path``: the ``.seg.nrrd`` it was read from, whose header names them."""
    values = sitk.GetArrayFromImage(image)
    if values.dtype.kind == "f":
        if not np.array_equal(values, np.round(values)):
            return None  # not a label map (e.g. a probability mask): no segments
        values = values.astype(np.int64)
    present = [int(v) for v in np.unique(values) if v != 0]
    if len(present) < 2 or (seg_path is None and present == [1, 2]):
        return None
    given = {}
    if seg_path is not None:
        # one layer: read_mask refuses a multi-layer (overlapping) segmentation, which SimpleITK reads as vectors
        described = slicerio.read_segmentation(str(seg_path), skip_voxels=True)["segments"]
        given = {int(s["labelValue"]): str(s["name"]) for s in described}
    names, taken = {}, set(REGIONS)
    for value in present:
        name = given.get(value) or f"segment_{value}"
        if name in taken:
            name = f"{name}_{value}"
        taken.add(name)
        names[value] = name
    labels = sitk.GetImageFromArray(values)
    labels.CopyInformation(reference)  # the mask was accepted on the CT's geometry
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
