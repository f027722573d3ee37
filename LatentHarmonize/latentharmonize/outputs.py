"""The names of the files ``analyze`` writes: one definition for the pipeline and for the Slicer module.

Kept free of heavy imports, because the Slicer module reads it before the backend's dependencies are installed.
"""
from __future__ import annotations


def output_names(name: str, write_report: bool = True) -> dict:
    """Output file names by kind, for an input named ``name``."""
    files = {"segmentation": f"{name}.seg.nrrd", "labels": f"{name}_clusters.nrrd",
             "confidence": f"{name}_confidence.nrrd", "lungs": f"{name}_lungs.nrrd",
             "composition_csv": "composition.csv", "composition_json": "composition.json",
             "densitometry_csv": "densitometry.csv",
             "record": "analysis.json"}
    if write_report:
        files.update({"montage": "qc_montage.png", "gallery": "qc_gallery.png", "view3d": "qc_3d.png",
                      "surfaces": "clusters.vtp", "report": "report.html"})
    return files
