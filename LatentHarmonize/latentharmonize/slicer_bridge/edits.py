"""Quality-control edits of the cluster segments: renaming, merging, the labels of segments added in the editor."""
from __future__ import annotations

from dataclasses import replace
from typing import Iterable, Optional, Sequence

import numpy as np

from ..errors import InputError
from .results import SegmentDefinition


def selection_order(previous: Sequence[str], selected: Sequence[str]) -> list:
    """The selected segments in the order the user selected them: those selected before keep their place, newly
    selected ones follow in table order ("Merge into the first selected")."""
    still = [s for s in previous if s in selected]
    return still + [s for s in selected if s not in still]


def rename_cluster(definitions: Sequence[SegmentDefinition], label: int, new_name: str) -> list:
    """Definitions with cluster ``label`` renamed; names must stay non-empty and unique."""
    new_name = " ".join(str(new_name).split())
    if not new_name:
        raise InputError("A cluster name cannot be empty.")
    labels = [d.label for d in definitions]
    if label not in labels:
        raise InputError(f"There is no cluster with label {label}; clusters are {labels}.")
    if any(d.name == new_name and d.label != label for d in definitions):
        raise InputError(f"Another cluster is already named {new_name!r}; choose a different name or merge them.")
    return [replace(d, name=new_name) if d.label == label else d for d in definitions]


def merge_clusters(labels: np.ndarray, sources: Iterable[int], target: int) -> np.ndarray:
    """Copy of a label map where every voxel of the ``sources`` clusters becomes ``target``."""
    sources = sorted({int(s) for s in sources} - {int(target)})
    if not sources:
        raise InputError("Choose at least one cluster other than the target to merge into it.")
    if int(target) <= 0 or any(s <= 0 for s in sources):
        raise InputError("Cluster labels are 1..255; label 0 is outside the lung and cannot be merged.")
    merged = np.array(labels, copy=True)
    merged[np.isin(merged, sources)] = target
    return merged


def merge_definitions(definitions: Sequence[SegmentDefinition], sources: Iterable[int]) -> list:
    """Definitions without the merged-away ``sources`` clusters."""
    dropped = {int(s) for s in sources}
    return [d for d in definitions if d.label not in dropped]


def assign_segment_labels(segment_ids: Sequence[str], known: dict, reserved: Iterable[int] = ()) -> dict:
    """Label value of every segment: ``known`` ones keep theirs, segments added in the editor get new labels.

    New labels never reuse a ``known`` or ``reserved`` one (pass the analysis' original labels), so a cluster merged
    away does not come back under another name.
    """
    labels = {sid: int(known[sid]) for sid in segment_ids if sid in known}
    next_label = max([int(v) for v in known.values()] + [int(r) for r in reserved] + [0]) + 1
    for sid in segment_ids:
        if sid not in labels:
            if next_label > 255:
                raise InputError("More than 255 segments; merge or delete some before recomputing.")
            labels[sid] = next_label
            next_label += 1
    return labels


def labels_from_masks(masks: Iterable, shape: Optional[tuple] = None) -> np.ndarray:
    """A UInt8 label map from ``(label, mask)`` pairs (segments after editing); earlier pairs win overlaps.

    ``masks`` may be a generator, so only one full-size mask is held at a time.
    """
    labels = None if shape is None else np.zeros(tuple(shape), dtype=np.uint8)
    for label, mask in masks:
        mask = np.asarray(mask) != 0
        if labels is None:
            labels = np.zeros(mask.shape, dtype=np.uint8)
        if mask.shape != labels.shape:
            raise InputError(f"Segment {label} has shape {mask.shape}, expected {labels.shape}: export all segments "
                             "in the geometry of the input volume.")
        if not 0 < int(label) <= 255:
            raise InputError(f"Cluster labels are 1..255, got {label}.")
        labels[mask & (labels == 0)] = int(label)
    if labels is None:
        raise InputError("There are no segments to build a label map from.")
    return labels
