"""Slicer-free helpers for the 3D Slicer module: the whole exchange with the backend process.

The Slicer module (``LatentHarmonize.py``) only moves data between MRML nodes and these functions, so everything a
user sees (progress, cluster names and colours, composition numbers) is computed here and tested without Slicer.
One concept per file:

- :mod:`.dependencies`: what Slicer's Python lacks, from package metadata;
- :mod:`.inputs`: the selected inputs checked, the output name;
- :mod:`.backend`: the backend worker's command, requests and output, and stopping it;
- :mod:`.volumes`: volumes between the scene (``[k, j, i]`` arrays, IJK-to-RAS) and the backend's files (LPS);
- :mod:`.results`: an analysis folder read for the scene;
- :mod:`.edits`: quality-control edits of the cluster segments;
- :mod:`.tables`: composition tables (pandas), imported by the module only once the dependencies are installed.

Importing this package stays light (numpy and SimpleITK, both bundled with Slicer, no PyTorch or pandas): the module
imports it when it opens, before the backend's dependencies are installed. The few third-party libraries that come
with those dependencies (psutil, SciPy, slicerio) are imported by the functions that need them.
"""
from __future__ import annotations

from .backend import (DEVICES, WORKER_IDLE_TIMEOUT_S, WORKER_REUSE_MARGIN_S, BackendLog, WorkerLaunch,
                      backend_environment, build_worker_command, can_reuse_worker, device_argument, kill_process_tree,
                      phantom_sample_command, preload_arguments, report_command, report_page, worker_launch,
                      worker_request, worker_state)
from .dependencies import (DependencyStatus, dependency_status, installed_versions, missing_requirements,
                           read_requirements)
from .inputs import BUNDLE_MANIFEST, missing_inputs, safe_volume_name
from .volumes import (VolumeArray, ijk_to_ras_matrix, image_from_array, largest_region_center, read_volume_array,
                      write_input_volume, write_mask, write_mask_segments)
from .results import (DENSITOMETRY_TITLES, AnalysisOutputs, SegmentDefinition, analysis_input_path, cluster_colors,
                      cluster_names, densitometry_columns, format_warnings, locate_outputs, read_densitometry,
                      read_model_id, read_segment_definitions, read_warnings)
from .edits import (assign_segment_labels, labels_from_masks, merge_clusters, merge_definitions, rename_cluster,
                    selection_order)

__all__ = [
    "DEVICES", "WORKER_IDLE_TIMEOUT_S", "WORKER_REUSE_MARGIN_S", "device_argument", "build_worker_command",
    "preload_arguments", "worker_request", "report_command", "report_page", "phantom_sample_command", "WorkerLaunch",
    "worker_launch", "can_reuse_worker", "backend_environment", "worker_state", "BackendLog", "kill_process_tree",
    "read_requirements", "missing_requirements", "DependencyStatus", "dependency_status", "installed_versions",
    "BUNDLE_MANIFEST", "safe_volume_name", "missing_inputs",
    "ijk_to_ras_matrix", "image_from_array", "write_input_volume", "write_mask", "write_mask_segments", "VolumeArray",
    "read_volume_array", "largest_region_center",
    "DENSITOMETRY_TITLES", "analysis_input_path", "read_warnings", "format_warnings", "AnalysisOutputs",
    "locate_outputs", "SegmentDefinition", "read_segment_definitions", "cluster_names", "cluster_colors",
    "read_model_id", "read_densitometry", "densitometry_columns",
    "selection_order", "rename_cluster", "merge_clusters", "merge_definitions", "assign_segment_labels",
    "labels_from_masks",
]
