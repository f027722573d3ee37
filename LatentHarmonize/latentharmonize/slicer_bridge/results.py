"""An analysis folder read for the scene: its files, warnings, segment definitions, densitometry and model."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import OutputError
from ..outputs import output_names

# Densitometry rows of composition.json (key "densitometry") and their column titles, with units
DENSITOMETRY_TITLES = {"region": "Region", "laa950_pct": "LAA-950 (%)", "haa700_250_pct": "HAA -700..-250 (%)",
                       "mld_hu": "MLD (HU)", "perc15_hu": "Perc15 (HU)",
                       "laa950_matched_pct": "LAA-950 noise-matched (%)",
                       "perc15_matched_hu": "Perc15 noise-matched (HU)", "volume_ml": "Volume (mL)"}
ADDED_LATER = ("laa950_matched_pct", "perc15_matched_hu")  # absent from older analyses' rows: shown empty


def analysis_input_path(out_dir) -> Optional[Path]:
    """The CT an analysis read (``input`` of its analysis.json), or None when the record is missing."""
    try:
        record = json.loads((Path(out_dir) / output_names("x")["record"]).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return Path(record["input"]) if isinstance(record, dict) and record.get("input") else None


def read_warnings(out_dir) -> list:
    """The analysis' warnings (``warnings`` of analysis.json): ``[{"code", "message"}]``, empty when there are none."""
    try:
        record = json.loads((Path(out_dir) / output_names("x")["record"]).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    warnings = record.get("warnings") if isinstance(record, dict) else None
    return [{"code": str(w.get("code", "")), "message": str(w.get("message", ""))}
            for w in (warnings or []) if isinstance(w, dict) and w.get("message")]


def format_warnings(warnings: Sequence[dict]) -> str:
    """The warning box text: one line per warning, empty when there are none."""
    return "\n".join(f"\u26a0 {w['message']}" for w in warnings)


@dataclass(frozen=True)
class AnalysisOutputs:
    """Paths of the files ``analyze`` writes for an input named ``name`` (names from ``outputs.output_names``)."""

    out_dir: Path
    name: str

    def _path(self, kind: str) -> Path:
        return self.out_dir / output_names(self.name)[kind]

    segmentation = property(lambda self: self._path("segmentation"))
    clusters = property(lambda self: self._path("labels"))
    confidence = property(lambda self: self._path("confidence"))
    lungs = property(lambda self: self._path("lungs"))
    composition_csv = property(lambda self: self._path("composition_csv"))
    composition_json = property(lambda self: self._path("composition_json"))
    report_html = property(lambda self: self._path("report"))

    def required(self) -> list:
        """The files the Slicer module loads."""
        return [self.segmentation, self.clusters, self.confidence, self.lungs, self.composition_csv]


def locate_outputs(out_dir, name: Optional[str] = None) -> AnalysisOutputs:
    """The outputs of one analyze run in ``out_dir``; raises OutputError naming any missing file."""
    out_dir = Path(out_dir)
    if name is None:
        found = sorted(out_dir.glob("*.seg.nrrd"))
        if len(found) != 1:
            raise OutputError(f"Expected one .seg.nrrd in {out_dir}, found {len(found)}; pass the input name.")
        name = found[0].name[:-len(".seg.nrrd")]
    outputs = AnalysisOutputs(out_dir, name)
    missing = [p.name for p in outputs.required() if not p.is_file()]
    if missing:
        raise OutputError(f"The analysis did not produce {', '.join(missing)} in {out_dir}. "
                          "See the log for the backend's messages and run Analyze again.")
    return outputs


@dataclass(frozen=True)
class SegmentDefinition:
    """One cluster as a Slicer segment: label value in the label map, name, colour (r, g, b floats 0..1)."""

    label: int
    name: str
    color: tuple
    segment_id: str = ""


def read_segment_definitions(seg_path) -> list:
    """Cluster label, name and colour of every segment of a ``.seg.nrrd`` (header only), sorted by label."""
    import slicerio  # lazy: installed with the dependencies, after the module first imports the bridge

    try:
        segmentation = slicerio.read_segmentation(str(seg_path), skip_voxels=True)
    except (OSError, ValueError, KeyError) as exc:
        raise OutputError(f"Cannot read the segmentation {seg_path}: {exc}. Run Analyze again.") from exc
    definitions = [SegmentDefinition(int(s["labelValue"]), str(s["name"]),
                                     tuple(float(c) for c in s["color"]), str(s.get("id", "")))
                   for s in segmentation["segments"]]
    return sorted(definitions, key=lambda d: d.label)


def cluster_names(definitions: Sequence[SegmentDefinition]) -> dict:
    return {d.label: d.name for d in definitions}


def cluster_colors(definitions: Sequence[SegmentDefinition]) -> dict:
    return {d.label: d.color for d in definitions}


def read_model_id(outputs: AnalysisOutputs) -> Optional[str]:
    """The model's SHA-256 recorded in composition.json, so exports after editing keep it."""
    try:
        return json.loads(outputs.composition_json.read_text(encoding="utf-8")).get("model_sha256")
    except (OSError, ValueError, AttributeError):
        return None


def read_densitometry(json_path) -> list:
    """The densitometry rows the analysis wrote (per lung, zone and mask segment); empty for older analyses."""
    try:
        doc = json.loads(Path(json_path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise OutputError(f"Cannot read {json_path}: {exc}. Run Analyze again.") from exc
    rows = doc.get("densitometry") or []
    required = set(DENSITOMETRY_TITLES) - set(ADDED_LATER)
    bad = [r for r in rows if not isinstance(r, dict) or required - set(r)]
    if bad:
        raise OutputError(f"{json_path}: densitometry rows lack {sorted(required - set(bad[0]))}; it "
                          "was not written by this version of analyze.")
    return [{k: r.get(k) for k in DENSITOMETRY_TITLES} for r in rows]


def densitometry_columns(rows: Sequence[dict]) -> list:
    """Columns for a vtkMRMLTableNode: ``[(title, values)]``, the region as text, the rest as float64 (NaN kept)."""
    columns = []
    for key, title in DENSITOMETRY_TITLES.items():
        if key == "region":
            values = np.array([str(r[key]) for r in rows], dtype=str)
        else:
            values = np.array([np.nan if r[key] is None else float(r[key]) for r in rows], dtype=np.float64)
        columns.append((title, values))
    return columns
