"""Slicer-free helpers for the 3D Slicer module: the whole exchange with the backend process.

The Slicer module (``LatentHarmonize.py``) only moves data between MRML nodes and these functions, so everything a
user sees (progress, cluster names and colours, composition numbers) is computed here and tested without Slicer.

Geometry: Slicer hands volumes over as numpy arrays in ``[k, j, i]`` order with a 4x4 IJK-to-RAS matrix; the backend
reads and writes NRRD files whose physical space is LPS (ITK). The voxel order is the same on both sides, only the
physical frame differs by the sign of the first two axes, so arrays pass through unchanged.

Imports stay light (numpy, SimpleITK, both bundled with Slicer); pandas, slicerio and the composition code are
imported by the functions that need them, after the module has installed the dependencies.
"""
from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from .atomic import atomic_write_text
from .errors import InputError, OutputError
from .outputs import output_names
from .progress import ProgressEvent, parse_progress_line
from .worker import DEFAULT_IDLE_TIMEOUT_S, WorkerResult, format_request, parse_result_line

# Device choices offered in the GUI and the backend's --device value for each
DEVICES = {"auto": "auto", "CPU": "cpu", "GPU": "cuda"}
# Sign flip between LPS (ITK, backend files) and RAS (Slicer scene)
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# File that marks a model bundle folder (bundle.MANIFEST; not imported here: bundle.py needs the full dependencies)
BUNDLE_MANIFEST = "manifest.json"
_ERROR_LINE = re.compile(r"^latentharmonize \w+: error: (.*)$")
# The module's backend worker exits after the worker's own idle timeout, so it never holds memory for long
WORKER_IDLE_TIMEOUT_S = DEFAULT_IDLE_TIMEOUT_S
# A worker idle for nearly that long may be exiting just as a request arrives: a fresh one is started instead
WORKER_REUSE_MARGIN_S = 30.0


# --------------------------------------------------------------------------------------------- backend command

def device_argument(choice: str) -> str:
    """The backend's ``--device`` value for a GUI device choice (``auto``, ``CPU``, ``GPU``)."""
    for label, value in DEVICES.items():
        if choice in (label, value):
            return value
    raise InputError(f"Unknown device {choice!r}; choose one of {', '.join(DEVICES)}.")


def build_worker_command(python_executable, idle_timeout_s: float = WORKER_IDLE_TIMEOUT_S) -> list:
    """Argument list that starts the backend worker (``latentharmonize worker``) in a separate Python (Slicer's
    ``PythonSlicer``); it analyzes the requests sent to its stdin one after another."""
    if not python_executable:
        raise InputError("No Python interpreter to run the backend: PythonSlicer was not found next to Slicer.")
    return [str(python_executable), "-m", "latentharmonize", "worker", "--idle-timeout", f"{idle_timeout_s:g}"]


def preload_arguments(model_dir, device: str = "auto") -> list:
    """Worker options that load the selected model and the libraries before the first request (the module starts
    the worker when it is opened). Without a usable bundle folder they preload the bundled default, since the
    libraries are most of the wait."""
    usable = bool(model_dir) and (Path(model_dir) / BUNDLE_MANIFEST).is_file()
    return ["--preload", str(model_dir) if usable else "default", "--preload-device", device_argument(device)]


def worker_request(input_path, out_dir, mask_path=None, model_dir=None, device: str = "auto",
                   request_id=None) -> str:
    """The request line for one Analyze (a GUI device choice; each run has a fresh output folder, so nothing is
    overwritten). Without the QC pictures and report.html (``--no-report``): they need off-screen OpenGL, which not
    every Slicer machine has, and the module builds them on demand with :func:`report_command`."""
    return format_request(input_path, out_dir, mask=mask_path or None, model=model_dir or None,
                          device=device_argument(device), report=False, request_id=request_id)


def report_command(python_executable, out_dir, model_dir=None) -> list:
    """``latentharmonize report <analysis folder>``: writes report.html (and the QC pictures) into a finished
    analysis folder and prints the page's path (``--quiet``: nothing else). ``model_dir``: the bundle the analysis
    used, which the report checks and encodes the lung with again."""
    if not python_executable:
        raise InputError("No Python interpreter to run the backend: PythonSlicer was not found next to Slicer.")
    model = ["--model", str(model_dir)] if model_dir else []
    return [str(python_executable), "-m", "latentharmonize", "report", str(out_dir), *model, "--quiet"]


def report_page(returncode: Optional[int], output: str) -> Optional[Path]:
    """The page ``latentharmonize report`` wrote (the last line it printed), or None when it failed."""
    lines = [line.strip() for line in (output or "").splitlines() if line.strip()]
    if returncode != 0 or not lines or not Path(lines[-1]).is_file():
        return None
    return Path(lines[-1])


def phantom_sample_command(python_executable, path) -> list:
    """``latentharmonize phantom --sample OUT.nrrd``: one phantom chest CT for Slicer's Sample Data module."""
    if not python_executable:
        raise InputError("No Python interpreter to run the backend: PythonSlicer was not found next to Slicer.")
    return [str(python_executable), "-m", "latentharmonize", "phantom", "--sample", str(path)]


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
class WorkerLaunch:
    """What a backend worker was started with: command, environment and the state of the backend's source files
    (size and modification time of each), so that edits to the backend take effect on the next Analyze."""

    command: tuple
    environment: tuple
    backend_files: tuple


def worker_launch(command: Sequence[str], environment: dict, module_dir) -> WorkerLaunch:
    package = Path(module_dir) / "latentharmonize"
    files = tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in package.glob("*.py")))
    return WorkerLaunch(tuple(str(a) for a in command), tuple(sorted(environment.items())), files)


def can_reuse_worker(running: Optional[WorkerLaunch], wanted: WorkerLaunch, alive: bool, busy: bool, idle_s: float,
                     idle_timeout_s: float = WORKER_IDLE_TIMEOUT_S) -> bool:
    """Whether the running worker can take the next request: still alive, not busy, started the way a new one
    would be, and not about to exit for idleness."""
    return (running == wanted and alive and not busy
            and idle_s < idle_timeout_s - WORKER_REUSE_MARGIN_S)


def backend_environment(module_dir, inherited_pythonpath: Optional[str] = None) -> dict:
    """Environment updates so the child Python imports ``latentharmonize`` from the module folder, unbuffered, and
    talks UTF-8 on its pipes whatever the system's code page (file names in progress messages)."""
    paths = [str(Path(module_dir))] + [p for p in (inherited_pythonpath or "").split(os.pathsep) if p]
    return {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths)), "PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8"}


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


class BackendLog:
    """Reads the backend's output for one analysis line by line: progress events out, the worker's result line
    kept, everything else kept for error reports."""

    def __init__(self, keep: int = 200):
        self.keep = keep
        self.lines: list = []
        self.last_event: Optional[ProgressEvent] = None
        self.result: Optional[WorkerResult] = None

    def feed(self, line: str) -> Optional[ProgressEvent]:
        """Record one output line; return its progress event, or None for a log or result line."""
        line = line.rstrip("\r\n")
        result = parse_result_line(line)
        if result is not None:
            self.result = result
            return None
        event = parse_progress_line(line)
        if event is not None:
            self.last_event = event
        else:
            self.lines.append(line)
            del self.lines[:-self.keep]
        return event

    def returncode(self, worker_returncode: Optional[int] = None) -> int:
        """The analysis' exit status: 0 on success, the error's exit code, or, when the worker ended without
        answering, the worker's own exit code (never 0 then)."""
        if self.result is not None:
            return 0 if self.result.ok else (self.result.exit_code or 1)
        return worker_returncode or 1

    def failure_message(self, returncode: int) -> str:
        """User-facing summary of a failed run: the backend's own error sentence, else the last log lines."""
        if self.result is not None and self.result.error:
            return self.result.error
        for line in reversed(self.lines):
            m = _ERROR_LINE.match(line.strip())
            if m:
                return m.group(1)
        stage = f" during '{self.last_event.stage}'" if self.last_event else ""
        tail = "\n".join(self.lines[-10:]) or "(no output)"
        return f"The analysis stopped{stage} with exit code {returncode}. Last output:\n{tail}"


def kill_process_tree(pid: int, grace_s: float = 5.0, background: bool = False) -> int:
    """Stop a process and all its descendants (Cancel); returns how many processes were signalled.

    SIGTERM first, so ``analyze`` can remove its staging folder (it treats SIGTERM like Ctrl-C); whatever is still
    running after ``grace_s`` is killed. With ``background`` only the SIGTERMs are sent before returning; the wait
    and the kill happen in a daemon thread, so the GUI thread never waits for the backend.
    """
    try:
        import psutil
    except ImportError:  # psutil is in requirements.txt; without it only the direct child can be stopped
        os.kill(pid, signal.SIGTERM)
        return 1
    try:
        parent = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return 0
    children = parent.children(recursive=True)
    for proc in children + [parent]:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    if background:
        threading.Thread(target=_kill_after_grace, args=(parent, children, grace_s), daemon=True).start()
    else:
        _kill_after_grace(parent, children, grace_s)
    return len(children) + 1


def _kill_after_grace(parent, children: list, grace_s: float) -> None:
    """Kill what is still running ``grace_s`` after the SIGTERMs. The descendants are waited for; the direct child
    is only watched, since its owner reaps it and keeps its exit status."""
    import psutil

    _, alive = psutil.wait_procs(children, timeout=grace_s)
    deadline = time.monotonic() + grace_s
    while _running(parent) and time.monotonic() < deadline:
        time.sleep(0.05)
    for proc in alive + ([parent] if _running(parent) else []):
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


def _running(proc) -> bool:
    """True while ``proc`` (a psutil.Process) runs; an exited child waiting to be reaped counts as stopped."""
    import psutil

    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# --------------------------------------------------------------------------------------------- dependencies

def read_requirements(path) -> list:
    """Requirement strings of a requirements.txt (comments and blank lines dropped)."""
    reqs = []
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            reqs.append(line)
    return reqs


def missing_requirements(requirements: Iterable[str], version_of: Optional[Callable[[str], str]] = None) -> list:
    """The requirements not satisfied by what is installed (``version_of(name)`` raises if absent)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    version_of = version_of or metadata.version
    missing = []
    for text in requirements:
        req = Requirement(text)
        try:
            installed = version_of(req.name)
        except metadata.PackageNotFoundError:
            missing.append(text)
            continue
        if req.specifier and not req.specifier.contains(installed, prereleases=True):
            missing.append(text)
    return missing


@dataclass(frozen=True)
class DependencyStatus:
    """What the analysis lacks in Slicer's Python, read from package metadata only (nothing is imported, so
    opening the module never loads PyTorch): ``torch`` is None when a good enough PyTorch is installed, else why not;
    ``packages`` are the unmet requirements of requirements.txt."""

    torch: Optional[str]
    packages: tuple

    @property
    def complete(self) -> bool:
        return self.torch is None and not self.packages

    def question(self) -> str:
        """The one install dialog's text: everything that will be installed, PyTorch first."""
        lines = ["LatentHarmonize needs to install into Slicer's Python:"]
        if self.torch is not None:
            lines.append(f"- PyTorch ({self.torch}), through the PyTorch extension")
        lines += [f"- {p}" for p in self.packages]
        lines.append("This happens once and can take several minutes. Install now?")
        return "\n".join(lines)


def dependency_status(requirements: Iterable[str], torch_requirement: str,
                      version_of: Optional[Callable[[str], str]] = None) -> DependencyStatus:
    """PyTorch's state (absent, or older than ``torch_requirement``) and the unmet ``requirements``."""
    from importlib import metadata

    from packaging.requirements import Requirement

    version_of = version_of or metadata.version
    wanted = Requirement(f"torch{torch_requirement}")
    try:
        installed = version_of("torch")
    except metadata.PackageNotFoundError:
        torch = f"not installed; {wanted} is needed"
    else:
        torch = None if wanted.specifier.contains(installed, prereleases=True) else \
            f"{installed} is installed; {wanted} is needed"
    return DependencyStatus(torch, tuple(missing_requirements(requirements, version_of)))


def installed_versions(names: Iterable[str], version_of: Optional[Callable[[str], str]] = None) -> list:
    """``[(name, version or 'not installed')]`` from package metadata (the backend panel)."""
    from importlib import metadata

    version_of = version_of or metadata.version
    versions = []
    for name in names:
        try:
            versions.append((name, version_of(name)))
        except metadata.PackageNotFoundError:
            versions.append((name, "not installed"))
    return versions


def worker_state(alive: bool, busy: bool, idle_s: float) -> str:
    """One line for the backend panel (the worker does not report when a preload has finished, so it is not
    claimed)."""
    if not alive:
        return "stopped"
    if busy:
        return "analyzing"
    return f"running, idle for {idle_s:.0f} s (exits after {WORKER_IDLE_TIMEOUT_S:.0f} s idle)"


# --------------------------------------------------------------------------------------------- geometry and volumes

def ijk_to_ras_matrix(image: sitk.Image) -> np.ndarray:
    """4x4 IJK-to-RAS matrix (Slicer convention) of a SimpleITK image (LPS)."""
    matrix = np.eye(4)
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    matrix[:3, :3] = direction * np.asarray(image.GetSpacing(), dtype=float)[None, :]
    matrix[:3, 3] = image.GetOrigin()
    return _LPS_TO_RAS @ matrix


def image_from_array(array_kji: np.ndarray, ijk_to_ras) -> sitk.Image:
    """SimpleITK image (LPS) from a Slicer-ordered ``[k, j, i]`` array and its IJK-to-RAS matrix."""
    array_kji = np.asarray(array_kji)
    if array_kji.ndim != 3:
        raise InputError(f"Expected a 3D volume, got an array of shape {array_kji.shape}.")
    lps = _LPS_TO_RAS @ np.asarray(ijk_to_ras, dtype=float).reshape(4, 4)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    if np.any(spacing <= 0):
        raise InputError("The volume has a zero voxel spacing; fix its geometry (Volumes module) before analysis.")
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_kji))
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(o) for o in lps[:3, 3]))
    image.SetDirection(tuple(float(d) for d in (lps[:3, :3] / spacing[None, :]).ravel()))
    return image


def write_input_volume(array_kji: np.ndarray, ijk_to_ras, path) -> Path:
    """Write the CT for the backend as NRRD: Int16 when the HU values are whole numbers in range, else Float32.

    Uncompressed: this is a scratch copy in Slicer's temporary folder, and gzip took 1.7 s of every Analyze click on a
    512 x 512 x 240 CT (raw: 0.1 s to write, 0.3 s less for the backend to read).
    """
    array_kji = np.asarray(array_kji)
    if not np.issubdtype(array_kji.dtype, np.number) or array_kji.size == 0:
        raise InputError("The input volume has no numeric voxels; select a CT volume.")
    finite = np.isfinite(array_kji)
    if not finite.all():
        raise InputError("The input volume contains NaN or infinite voxels; it is not a CT in HU.")
    whole = np.issubdtype(array_kji.dtype, np.integer) or bool(np.all(array_kji == np.round(array_kji)))
    lo, hi = float(array_kji.min()), float(array_kji.max())
    dtype = np.int16 if whole and lo >= -32768 and hi <= 32767 else np.float32
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image_from_array(array_kji.astype(dtype, copy=False), ijk_to_ras), str(path), False)
    return path


def write_mask(mask_kji: np.ndarray, ijk_to_ras, path) -> Path:
    """Write a lung mask (non-zero = lung) for ``--mask`` as a UInt8 NRRD with values 0/1."""
    mask = np.asarray(mask_kji) != 0
    if not mask.any():
        raise InputError("The selected lung mask segment is empty; pick another segment or clear the mask.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image_from_array(mask.astype(np.uint8), ijk_to_ras), str(path), True)
    return path


def write_mask_segments(labels_kji: np.ndarray, ijk_to_ras, names: Sequence[str], path) -> Path:
    """Write a lung mask given as several segments (left/right lung, lobes) for ``--mask``: a UInt8 label map
    (segment ``n`` of ``names`` has label ``n + 1``) as a ``.seg.nrrd`` whose header names each label, so the
    backend reports the composition per segment under these names."""
    labels = np.asarray(labels_kji)
    if not names:
        raise InputError("The lung mask segmentation has no segments; pick another segmentation or clear the mask.")
    if len(names) > 255 or labels.max() > len(names):
        raise InputError(f"The mask has labels above {len(names)}, the number of its segments.")
    if not (labels > 0).any():
        raise InputError("The selected lung mask segments are empty; pick other segments or clear the mask.")
    if len(set(names)) != len(names):
        raise InputError(f"Two mask segments share a name ({', '.join(names)}); rename them so each region is "
                         "reported under its own name.")
    image = image_from_array(labels.astype(np.uint8), ijk_to_ras)
    for index, name in enumerate(names):
        image.SetMetaData(f"Segment{index}_ID", f"Segment_{index + 1}")
        image.SetMetaData(f"Segment{index}_Name", str(name))
        image.SetMetaData(f"Segment{index}_LabelValue", str(index + 1))
        image.SetMetaData(f"Segment{index}_Layer", "0")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), True)
    return path


@dataclass
class VolumeArray:
    """A volume as Slicer wants it: ``[k, j, i]`` array and IJK-to-RAS matrix."""

    array: np.ndarray
    ijk_to_ras: np.ndarray


def read_volume_array(path) -> VolumeArray:
    """Read a backend volume (label, confidence or lung map) for ``slicer.util.addVolumeFromArray``."""
    image = sitk.ReadImage(str(path))
    return VolumeArray(sitk.GetArrayFromImage(image), ijk_to_ras_matrix(image))


def largest_region_center(mask_kji: np.ndarray, ijk_to_ras) -> Optional[tuple]:
    """RAS point (mm) at the voxel nearest the centroid of the largest connected region of a mask, or None."""
    from scipy import ndimage

    components, count = ndimage.label(np.asarray(mask_kji) != 0)
    if count == 0:
        return None
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    voxels = np.argwhere(components == int(np.argmax(sizes)))
    # the voxel of the region closest to its centroid: stays inside even for curved regions
    k, j, i = voxels[np.argmin(((voxels - voxels.mean(axis=0)) ** 2).sum(axis=1))]
    ras = np.asarray(ijk_to_ras, dtype=float).reshape(4, 4) @ np.array([i, j, k, 1.0])
    return tuple(float(v) for v in ras[:3])


# --------------------------------------------------------------------------------------------- analyze outputs

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
    import slicerio

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


def read_composition(csv_path):
    """The composition table (pandas DataFrame) written by analyze."""
    import pandas as pd

    from .composition import COLUMNS

    table = pd.read_csv(csv_path)
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise OutputError(f"{csv_path} lacks the columns {missing}; it was not written by this version of analyze.")
    return table[COLUMNS]


# Column titles shown in Slicer's table view, with units
COLUMN_TITLES = {"region": "Region", "label": "Label", "name": "Cluster", "fraction": "Fraction (%)",
                 "volume_ml": "Volume (mL)", "mean_hu": "Mean (HU)", "sd_hu": "SD (HU)"}


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


# Densitometry rows of composition.json (key "densitometry") and their column titles, with units
DENSITOMETRY_TITLES = {"region": "Region", "laa950_pct": "LAA-950 (%)", "haa700_250_pct": "HAA -700..-250 (%)",
                       "mld_hu": "MLD (HU)", "perc15_hu": "Perc15 (HU)", "volume_ml": "Volume (mL)"}


def read_densitometry(json_path) -> list:
    """The densitometry rows the analysis wrote (per lung, zone and mask segment); empty for older analyses."""
    try:
        doc = json.loads(Path(json_path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise OutputError(f"Cannot read {json_path}: {exc}. Run Analyze again.") from exc
    rows = doc.get("densitometry") or []
    bad = [r for r in rows if not isinstance(r, dict) or set(DENSITOMETRY_TITLES) - set(r)]
    if bad:
        raise OutputError(f"{json_path}: densitometry rows lack {sorted(set(DENSITOMETRY_TITLES) - set(bad[0]))}; it "
                          "was not written by this version of analyze.")
    return [{k: r[k] for k in DENSITOMETRY_TITLES} for r in rows]


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


def selection_order(previous: Sequence[str], selected: Sequence[str]) -> list:
    """The selected segments in the order the user selected them: those selected before keep their place, newly
    selected ones follow in table order ("Merge into the first selected")."""
    still = [s for s in previous if s in selected]
    return still + [s for s in selected if s not in still]


def whole_lung_summary(table) -> list:
    """``[(label, name, percent)]`` of the whole lung, largest first: the one-line-per-cluster GUI summary."""
    whole = table[table.region == "whole"].sort_values("fraction", ascending=False)
    return [(int(r.label), str(r.name), float(r.fraction) * 100.0) for r in whole.itertuples(index=False)]


# --------------------------------------------------------------------------------------------- QC edits

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


def recompute_composition(labels_kji: np.ndarray, ct_kji: np.ndarray, lungs_kji: np.ndarray, ijk_to_ras,
                          names: dict):
    """Composition table of an edited label map, with the analyze code (same numbers as the original report).

    All arrays come from the scene, on the CT's voxel grid (``ijk_to_ras``): the CT the clusters were computed on and
    the analysis' lung map, so a saved and reloaded scene can still be recomputed.
    """
    from .composition import composition_table

    shapes = {"edited label map": np.shape(labels_kji), "lung map": np.shape(lungs_kji)}
    for what, shape in shapes.items():
        if shape != np.shape(ct_kji):
            raise InputError(f"The {what} has shape {shape} but the CT has {np.shape(ct_kji)}; export the segments "
                             "in the CT's geometry.")
    ct = image_from_array(np.asarray(ct_kji), ijk_to_ras)
    labels = image_from_array(np.asarray(labels_kji).astype(np.uint8), ijk_to_ras)
    lungs = image_from_array(np.asarray(lungs_kji).astype(np.uint8), ijk_to_ras)
    return composition_table(labels, ct, lungs, names)


def read_model_id(outputs: AnalysisOutputs) -> Optional[str]:
    """The model's SHA-256 recorded in composition.json, so exports after editing keep it."""
    import json

    try:
        return json.loads(outputs.composition_json.read_text(encoding="utf-8")).get("model_sha256")
    except (OSError, ValueError, AttributeError):
        return None


def export_composition(table, names: dict, colors: dict, csv_path, json_path, model_id: Optional[str] = None) -> None:
    """Write the (recomputed) composition as CSV and JSON, atomically, in the analyze formats."""
    from .composition import composition_to_json

    atomic_write_text(csv_path, table.to_csv(index=False, float_format="%.6g", lineterminator="\n"))
    atomic_write_text(json_path, composition_to_json(table, names, colors, model_id=model_id))
