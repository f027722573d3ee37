"""``latentharmonize worker``: a resident backend that analyzes one CT after another.

A fresh ``analyze`` process spends most of its time starting up: importing PyTorch and scikit-learn and loading the
model take about 2.4 s on a 2-core CPU (7.5-9 s with CUDA initialisation on a GPU machine), against about 2.2 s of
analysis. The worker pays that once. It reads one JSON request per line on stdin::

    {"ct": PATH, "out": DIR, "mask": PATH|null, "model": DIR|null, "device": "auto|cpu|cuda",
     "overwrite": false, "report": true, "id": STRING|NUMBER|null}

(only ``ct`` and ``out`` are required), runs :func:`latentharmonize.analyze_command.analyze` for it, prints the
same ``LH-PROGRESS`` lines as ``analyze --progress-lines`` and ends each request with one result line::

    LH-RESULT {"ok": true, "id": ..., "out": DIR, "seconds": 2.31, "exit_code": 0}
    LH-RESULT {"ok": false, "id": ..., "error": MESSAGE, "error_type": "InputError", "exit_code": 2}

The loaded model is kept between requests while the bundle's files and the device stay the same. A failed request
leaves nothing half-written (analyze stages its outputs) and the worker goes on with the next one. It exits with
code 0 at the end of its input or after ``--idle-timeout`` seconds without a request, so it never lingers holding
memory. While it runs, on Linux (glibc), it keeps the memory it has touched (:func:`keep_touched_memory`), so that
a second request reuses the first one's pages instead of faulting in fresh ones. SIGTERM (Cancel) interrupts the
running request like Ctrl-C: the worker reports it and exits with 130.
The format is documented for users in docs/analyze.md.

This is the server side, which loads the whole analysis; the protocol, all a client needs, is
:mod:`latentharmonize.worker_protocol`.
"""
from __future__ import annotations

import ctypes
import hashlib
import queue
import sys
import threading
import time
import traceback
from typing import Optional

import numpy as np
import torch

from . import render
from .analyze_command import analyze, interrupt_on_sigterm
from .bundle import DATA_FILES, MANIFEST, bundle_folder
from .errors import REPORT_BUG, Cancelled, InputError, as_user_error
from .patches import autocast_for, extract_patches, resolve_device
from .options import DEVICES
from .pipeline import load_model
from .progress import Progress
from .worker_protocol import DEFAULT_IDLE_TIMEOUT_S, SHOWN_CHARS, WorkerResult, format_result_line, parse_request


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def keep_touched_memory() -> bool:
    """Make this process's C allocator keep and reuse the memory it frees (glibc only; elsewhere nothing changes,
    False is returned). Call it before any thread starts.

    A request allocates about 1.5 GB of arrays on a full-size CT (numpy, SimpleITK, PyTorch), most of them larger
    than glibc's 32 MB mmap limit: by default each is mapped fresh and freed back to the system, and the kernel
    zero-fills every page again on the next request (about 120,000 page faults, 0.4 s of system time per warm request
    on a 2-core CPU). Served from one heap that is not trimmed, the second request finds its pages mapped: the idle
    worker holds its peak memory (about 1.7 GB instead of 1.0 GB) until it exits."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    return all(mallopt(param, value) == 1 for param, value in
               ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2 ** 31 - 1)))


# ----------------------------------------------------------------------------- the loaded model

def bundle_fingerprint(model) -> Optional[tuple]:
    """(resolved folder, SHA-256 over its manifest and data files) of a model bundle, or None when the files cannot
    be read (loading the bundle then says why). Any edit of the bundle, even one loading would refuse, changes it."""
    folder = bundle_folder(model)
    digest = hashlib.sha256()
    try:
        for name in (MANIFEST, *DATA_FILES):
            if not (folder / name).is_file():  # missing, or a pipe that would block the read
                return None
            digest.update(hashlib.sha256((folder / name).read_bytes()).digest())
    except OSError:
        return None
    return str(folder.resolve()), digest.hexdigest()


class ModelCache:
    """The model of the last request (bundle, device, encoder), reused while the bundle's files and the device stay
    the same. It is an ``analyze(model_loader=...)``: any other request loads and verifies the bundle afresh."""

    def __init__(self, load=None):
        self._load = load or load_model
        self._key = None
        self._loaded = None

    def __call__(self, model, device) -> tuple:
        fingerprint = bundle_fingerprint(model)
        key = None if fingerprint is None else (fingerprint, str(resolve_device(device)))
        if key is None or key != self._key:
            self._key = self._loaded = None  # the old model is released before the new one loads
            loaded = self._load(model, device)
            self._key, self._loaded = key, loaded
        return self._loaded


def warm_up(models: ModelCache, model, device) -> None:
    """Do before the first request what it would otherwise wait for: import the libraries of a whole run (the QC
    pictures' matplotlib and VTK included), load the model into ``models`` and run the encoder once, which
    initialises the GPU's libraries on CUDA. A failure is only logged: the first request meets it again and
    reports it."""
    try:
        render._vtk()
        import matplotlib.figure  # noqa: F401  (lazy in render too: imported here only to pay its cost early)
        import matplotlib.image  # noqa: F401

        bundle, device, encoder = models(model, device)
        spec = bundle.spec
        volume = np.zeros((spec.slices, spec.patch_size, spec.patch_size), np.float32)
        with torch.inference_mode(), autocast_for(device):
            encoder.encode(torch.from_numpy(extract_patches(volume, np.zeros((1, 3), np.int64), spec)).to(device))
    except Exception as err:  # noqa: BLE001  (reported by the request that needs the model)
        print(f"latentharmonize worker: preloading failed ({type(err).__name__}: {err}); the first request will "
              "load the model itself.", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- serving

def _incoming(stream) -> queue.Queue:
    """The lines of ``stream`` as they arrive, then None at its end. A thread reads them so that the wait for the
    next request can time out (select() does not work on pipes on Windows)."""
    lines: queue.Queue = queue.Queue()

    def read():
        for line in stream:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, name="latentharmonize-requests", daemon=True).start()
    return lines


def handle(line: str, models: ModelCache) -> WorkerResult:
    """Run one request line through analyze; every failure becomes an error result, except an interruption
    (SIGTERM, Ctrl-C), which is reported and then ends the worker."""
    started = time.perf_counter()
    request_id = None
    try:
        request = parse_request(line)
        request_id = request.id
        analyze(request.ct, request.out, model=request.model, mask=request.mask, device=request.device,
                overwrite=request.overwrite, progress=Progress(machine=True), write_report=request.report,
                model_loader=models)
    except KeyboardInterrupt:
        print(format_result_line(WorkerResult(False, request_id, error="interrupted; no partial outputs were left.",
                                              error_type=Cancelled.__name__, exit_code=Cancelled.exit_code)),
              flush=True)
        raise
    except Exception as exc:  # noqa: BLE001  (the user's or the system's error, or a bug: the worker goes on)
        err = as_user_error(exc)  # a LatentHarmonizeError as it is; an OSError or MemoryError as a ResourceError
        if err is not None:
            return WorkerResult(False, request_id, error=str(err), error_type=type(err).__name__,
                                exit_code=err.exit_code)
        traceback.print_exc()
        return WorkerResult(False, request_id, error=f"{type(exc).__name__}: {str(exc)[:SHOWN_CHARS]}. {REPORT_BUG}",
                            error_type=type(exc).__name__, exit_code=1)
    return WorkerResult(True, request_id, out=request.out, seconds=round(time.perf_counter() - started, 3))


def serve(stream, idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S, preload: Optional[tuple] = None) -> int:
    """Answer the requests of ``stream`` until it ends or stays silent for ``idle_timeout_s``; returns 0.

    ``preload``: ``(model, device)`` to :func:`warm_up` in the background while the first request is awaited.
    """
    models = ModelCache()
    preloading = None
    if preload is not None:
        preloading = threading.Thread(target=warm_up, args=(models, *preload), name="latentharmonize-preload",
                                      daemon=True)
        preloading.start()
    incoming = _incoming(stream)
    while True:
        try:
            line = incoming.get(timeout=idle_timeout_s)
        except queue.Empty:
            print(f"latentharmonize worker: no request for {idle_timeout_s:g} s; exiting.", file=sys.stderr,
                  flush=True)
            return 0
        if line is None:
            return 0
        if line.strip():
            if preloading is not None:  # a request that arrives early waits for it: one thread imports and loads
                preloading.join()
                preloading = None
            print(format_result_line(handle(line, models)), flush=True)


# ----------------------------------------------------------------------------- CLI

def add_arguments(parser) -> None:
    parser.add_argument("--idle-timeout", type=float, default=DEFAULT_IDLE_TIMEOUT_S, metavar="SECONDS",
                        help="exit after this long without a request (default: %(default)g s)")
    parser.add_argument("--preload", nargs="?", const="default", metavar="MODEL_DIR",
                        help="load this model bundle (default: the bundled one) and the libraries while waiting for "
                             "the first request, so that even the first is answered warm")
    parser.add_argument("--preload-device", default="auto", choices=DEVICES,
                        help="device for --preload (default: %(default)s); requests for another device reload")


def run(args) -> int:
    if not args.idle_timeout > 0:
        raise InputError(f"--idle-timeout must be a positive number of seconds, got {args.idle_timeout:g}.")
    interrupt_on_sigterm()
    keep_touched_memory()
    preload = None
    if args.preload is not None:
        preload = (None if args.preload == "default" else args.preload, args.preload_device)
    return serve(sys.stdin, args.idle_timeout, preload)
