"""A cohort row onto the model grid: the one reader that batch, training and evaluation share.

A cohort table row names a CT (``image``), optionally its lung mask (``mask``) and tissue truth (``truth``), with
``patient`` and ``acquisition`` (:mod:`latentharmonize.cohort`). :func:`load_scan` reads them and puts them on the
model grid of a patch spec, HU calibrated as the spec says, with the vessels and airways found on it: the same grid
and the same parenchyma ``analyze`` encodes.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import SimpleITK as sitk

from .cohort import optional_path
from .errors import InputError
from .grid import ModelGrid, resample_onto
from .io import read_ct, read_mask
from .lungmask import segment_lungs
from .patches import PatchSpec, model_grid_hu
from .structures import parenchyma, segment_structures


@dataclass
class Scan:
    """One acquisition on the model grid (from ``grid.to_model_grid``), optionally with tissue truth."""

    patient: str
    acquisition: str
    hu: np.ndarray
    lung: np.ndarray
    grid: ModelGrid
    truth: np.ndarray | None = None

    @cached_property
    def structures(self) -> np.ndarray:
        """Vessels and airways on the model grid (``structures.segment_structures``), found on first use: training
        reads whole-lung patches and never needs them."""
        return segment_structures(self.hu, self.lung, self.grid.spacing, self.grid.scan_slices)

    @property
    def parenchyma(self) -> np.ndarray:
        """The lung without vessels and airways: the voxels ``analyze`` and ``evaluate`` cut patches from."""
        return parenchyma(self.lung, self.structures)


def read_scan(row) -> tuple:
    """The CT of one cohort row and its lung mask (the row's ``mask``, else segmented automatically)."""
    ct = read_ct(row["image"])
    mask = optional_path(row, "mask")
    return ct, (read_mask(mask, ct) if mask else segment_lungs(ct))


def read_truth(row) -> sitk.Image | None:
    """The row's tissue truth label map (UInt8), or None when the row has none."""
    path = optional_path(row, "truth")
    return None if path is None else _read_truth(path)


def scan_on_grid(row, ct: sitk.Image, lungs: sitk.Image, spec: PatchSpec, truth: sitk.Image | None = None) -> Scan:
    """One cohort row on the model grid: CT, lung mask and, if the row has one, tissue truth (``truth``: the row's
    truth image when the caller has read it already, :func:`read_truth`)."""
    hu, lung, grid, _ = model_grid_hu(ct, lungs, spec, required=True)
    truth = read_truth(row) if truth is None else truth
    on_grid = None if truth is None else resample_onto(truth, grid, nearest=True, default=0)
    return Scan(str(row["patient"]), str(row["acquisition"]), hu, lung, grid, on_grid)


def load_scan(row, spec: PatchSpec) -> Scan:
    """One cohort row on the model grid (:func:`read_scan`, then :func:`scan_on_grid`)."""
    return scan_on_grid(row, *read_scan(row), spec)


def _read_truth(path) -> sitk.Image:
    try:
        return sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkUInt8)
    except RuntimeError as exc:
        raise InputError(f"Cannot read the truth label map {path}: {str(exc).strip().splitlines()[-1]}") from None
