"""Tissue classes of the phantom's ground truth (label values 1..6; 0 is not lung)."""
from __future__ import annotations

TISSUES = ["normal", "emphysema", "ground_glass", "reticulation", "honeycombing", "consolidation"]
TISSUE_LABELS = {name: i + 1 for i, name in enumerate(TISSUES)}
BACKGROUND = 0
