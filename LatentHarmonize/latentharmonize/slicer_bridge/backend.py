"""The backend process: the commands and requests that run it, its output read line by line, and stopping it.

The module's backend worker (``latentharmonize worker``, :mod:`latentharmonize.worker_protocol`) is started in
Slicer's ``PythonSlicer`` with the module folder on its path; ``latentharmonize report`` and ``phantom --sample`` run
as one-shot commands.
"""
from __future__ import annotations

import os
import re
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ..errors import InputError
from ..progress import ProgressEvent, parse_progress_line
from ..worker_protocol import DEFAULT_IDLE_TIMEOUT_S, WorkerResult, format_request, parse_result_line
from .inputs import BUNDLE_MANIFEST

# Device choices offered in the GUI and the backend's --device value for each
DEVICES = {"auto": "auto", "CPU": "cpu", "GPU": "cuda"}
_ERROR_LINE = re.compile(r"^latentharmonize \w+: error: (.*)$")
# The module's backend worker exits after the worker's own idle timeout, so it never holds memory for long
WORKER_IDLE_TIMEOUT_S = DEFAULT_IDLE_TIMEOUT_S
# A worker idle for nearly that long may be exiting just as a request arrives: a fresh one is started instead
WORKER_REUSE_MARGIN_S = 30.0


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


def worker_state(alive: bool, busy: bool, idle_s: float) -> str:
    """One line for the backend panel (the worker does not report when a preload has finished, so it is not
    claimed)."""
    if not alive:
        return "stopped"
    if busy:
        return "analyzing"
    return f"running, idle for {idle_s:.0f} s (exits after {WORKER_IDLE_TIMEOUT_S:.0f} s idle)"


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
        import psutil  # lazy: installed with the dependencies, after the module first imports the bridge
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
    import psutil  # lazy: see kill_process_tree

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
    import psutil  # lazy: see kill_process_tree

    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
