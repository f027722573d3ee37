"""What Analyze needs before it runs: the selected inputs, checked, and the name the backend's outputs take."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

# File that marks a model bundle folder (bundle.MANIFEST; not imported here: bundle.py needs the full dependencies)
BUNDLE_MANIFEST = "manifest.json"


def safe_volume_name(name: str) -> str:
    """A file-name stem for a Slicer node name (the backend names its outputs after the input file)."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", str(name or "")).strip("_")
    return stem or "volume"


def missing_inputs(has_input_volume: bool, model_dir, mask_segmentation_set: bool = False,
                   mask_segment_id: Optional[str] = None) -> list:
    """What keeps Analyze from running, one sentence per problem (empty list: ready)."""
    problems = []
    if not has_input_volume:
        problems.append("Select an input CT volume.")
    if not model_dir or not str(model_dir).strip():
        problems.append("Select a model bundle folder.")
    elif not Path(model_dir).is_dir():
        problems.append(f"The model bundle folder {model_dir} does not exist.")
    elif not (Path(model_dir) / BUNDLE_MANIFEST).is_file():
        problems.append(f"{model_dir} is not a model bundle (it has no {BUNDLE_MANIFEST}); select a trained bundle "
                        "folder, such as the bundled Resources/Models/default.")
    if mask_segmentation_set and not mask_segment_id:
        problems.append("Select the lung segment of the mask segmentation, tick 'All segments as regions', or clear "
                        "the mask.")
    return problems
