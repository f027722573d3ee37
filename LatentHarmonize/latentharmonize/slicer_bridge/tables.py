"""Composition tables for the scene: read, shown, recomputed from an edited label map and exported, with the
analyze code (same numbers as the original report).

Unlike the rest of the bridge this imports pandas and the composition code, so the Slicer module imports it only
once the dependencies are installed (its ``bridgeTables()``).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import pandas as pd

from ..atomic import atomic_write_text
from ..composition import COLUMNS, composition_table, composition_to_json
from ..errors import InputError, OutputError
from ..writers import table_csv
from .volumes import image_from_array

# Column titles shown in Slicer's table view, with units
COLUMN_TITLES = {"region": "Region", "label": "Label", "name": "Cluster", "fraction": "Fraction (%)",
                 "volume_ml": "Volume (mL)", "mean_hu": "Mean (HU)", "sd_hu": "SD (HU)"}


def read_composition(csv_path):
    """The composition table (pandas DataFrame) written by analyze."""
    table = pd.read_csv(csv_path)
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise OutputError(f"{csv_path} lacks the columns {missing}; it was not written by this version of analyze.")
    return table[COLUMNS]


def table_columns(table) -> list:
    """Columns for a vtkMRMLTableNode: ``[(title, values)]``, text as str arrays, numbers as float64.

    Fractions are shown in percent; NaN (empty cluster) stays NaN.
    """
    columns = []
    for name, title in COLUMN_TITLES.items():
        values = table[name].to_numpy()
        if name in ("region", "name"):
            values = values.astype(str)
        elif name == "label":
            values = values.astype(np.int64)
        else:
            values = values.astype(np.float64) * (100.0 if name == "fraction" else 1.0)
        columns.append((title, values))
    return columns


def whole_lung_summary(table) -> list:
    """``[(label, name, percent)]`` of the whole lung, largest first: the one-line-per-cluster GUI summary."""
    whole = table[table.region == "whole"].sort_values("fraction", ascending=False)
    return [(int(r.label), str(r.name), float(r.fraction) * 100.0) for r in whole.itertuples(index=False)]


def recompute_composition(labels_kji: np.ndarray, ct_kji: np.ndarray, lungs_kji: np.ndarray, ijk_to_ras,
                          names: dict):
    """Composition table of an edited label map, with the analyze code (same numbers as the original report).

    All arrays come from the scene, on the CT's voxel grid (``ijk_to_ras``): the CT the clusters were computed on and
    the analysis' lung map, so a saved and reloaded scene can still be recomputed.
    """
    shapes = {"edited label map": np.shape(labels_kji), "lung map": np.shape(lungs_kji)}
    for what, shape in shapes.items():
        if shape != np.shape(ct_kji):
            raise InputError(f"The {what} has shape {shape} but the CT has {np.shape(ct_kji)}; export the segments "
                             "in the CT's geometry.")
    ct = image_from_array(np.asarray(ct_kji), ijk_to_ras)
    labels = image_from_array(np.asarray(labels_kji).astype(np.uint8), ijk_to_ras)
    lungs = image_from_array(np.asarray(lungs_kji).astype(np.uint8), ijk_to_ras)
    return composition_table(labels, ct, lungs, names)


def export_composition(table, names: dict, colors: dict, csv_path, json_path, model_id: Optional[str] = None) -> None:
    """Write the (recomputed) composition as CSV and JSON, atomically, in the analyze formats."""
    atomic_write_text(csv_path, table_csv(table))
    atomic_write_text(json_path, composition_to_json(table, names, colors, model_id=model_id))
