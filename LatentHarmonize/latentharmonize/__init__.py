"""LatentHarmonize backend: scanner-invariant lung tissue clusters from chest CT.

    import SimpleITK as sitk
    import latentharmonize as lh

    result = lh.analyze_image(sitk.ReadImage("scan.nrrd"))   # in memory: label map, composition, densitometry
    lh.analyze("scan.nrrd", "out/")                            # the same, written to files (docs/analyze.md)

This package never imports ``slicer``; the 3D Slicer module runs it in a background process. Importing it stays
light (no PyTorch): the Slicer module imports ``latentharmonize.slicer_bridge`` before PyTorch may be installed, so
the names below that need PyTorch, pandas, scikit-learn or SciPy are imported on first use, from the modules named in
``_LAZY``.
"""
from __future__ import annotations

import importlib

from .errors import (BundleError, Cancelled, InputError, LatentHarmonizeError, NoLungFoundError, OutputError,
                     ResourceError)

__version__ = "0.1.0"

# Public name -> the module defining it, imported when the name is first used (PEP 562)
_LAZY = {
    "analyze_image": "pipeline",
    "ImageAnalysis": "pipeline",
    "analyze": "analyze_command",
    "AnalysisResult": "analyze_command",
    "load_bundle": "bundle",
    "ModelBundle": "bundle",
    "PatchSpec": "patches",
    "TissueClusters": "clusters",
    "LatentRotation": "rotation",
    "segment_lungs": "lungmask",
    "read_ct": "io",
    "read_mask": "io",
}

__all__ = [*_LAZY, "LatentHarmonizeError", "InputError", "NoLungFoundError", "BundleError", "OutputError",
           "ResourceError", "Cancelled", "__version__"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value  # later uses skip this function
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(_LAZY))
