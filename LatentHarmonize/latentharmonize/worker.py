"""``latentharmonize worker``: a resident backend that analyzes one CT after another.

A fresh ``analyze`` process spends most of its time starting up: importing PyTorch and scikit-learn and loading the
model take about 2.4 s on a 2-core CPU (7.5-9 s with CUDA initialisation on a GPU machine), against about 2.2 s of
analysis. The worker pays that once. It reads one JSON request per line on stdin::

    {"ct": PATH, "out": DIR, "mask": PATH|null, "model": DIR|null, "device": "auto|cpu|cuda",
     "overwrite": false, "report": true, "id": STRING|NUMBER|null}

(only ``ct`` and ``out`` are required), runs :func:`latentharmonize.analyze.analyze` for it, prints the same
``LH-PROGRESS`` lines as ``analyze --progress-lines`` and ends each request with one result line::

    LH-RESULT {"ok": true, "id": ..., "out": DIR, "seconds": 2.31, "exit_code": 0}
    LH-RESULT {"ok": false, "id": ..., "error": MESSAGE, "error_type": "InputError", "exit_code": 2}

The loaded model is kept between requests while the bundle's files and the device stay the same. A failed request
leaves nothing half-written (analyze stages its outputs) and the worker goes on with the next one. It exits with
code 0 at the end of its input or after ``--idle-timeout`` seconds without a request, so it never lingers holding
memory. SIGTERM (Cancel) interrupts the running request like Ctrl-C: the worker reports it and exits with 130.
The format is documented for users in docs/analyze.md.

Module-level imports stay light: the Slicer module reads the protocol (``format_request``, ``parse_result_line``)
before the backend's dependencies are installed.
"""
from __future__ import annotations

import hashlib
import json
import queue
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, fields
from typing import Optional

from .errors import REPORT_BUG, Cancelled, InputError, as_user_error

RESULT_PREFIX = "LH-RESULT"
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_IDLE_TIMEOUT_S = 600.0
# A request is a few paths and flags; anything far longer is refused unread, and error messages quote at most
# SHOWN_CHARS of what the request held, so a hostile request cannot make the answer itself huge.
MAX_REQUEST_CHARS = 65536
SHOWN_CHARS = 200


# ----------------------------------------------------------------------------- protocol

@dataclass(frozen=True)
class Request:
    """One analysis to run: the arguments of :func:`~latentharmonize.analyze.analyze`, and an id echoed back."""

    ct: str
    out: str
    mask: Optional[str] = None
    model: Optional[str] = None
    device: str = "auto"
    overwrite: bool = False
    report: bool = True
    id: object = None


# JSON types each request field accepts
_FIELD_TYPES = {"ct": (str,), "out": (str,), "mask": (str, type(None)), "model": (str, type(None)), "device": (str,),
                "overwrite": (bool,), "report": (bool,), "id": (str, int, float, type(None))}


def format_request(ct, out, mask=None, model=None, device: str = "auto", overwrite: bool = False,
                   report: bool = True, request_id=None) -> str:
    """One request line (JSON, ASCII, newline-terminated); checked as the worker will check it."""
    text = json.dumps({"ct": str(ct), "out": str(out), "mask": None if mask is None else str(mask),
                       "model": None if model is None else str(model), "device": device, "overwrite": overwrite,
                       "report": report, "id": request_id})
    parse_request(text)
    return text + "\n"


def parse_request(line: str) -> Request:
    """The request a line carries; InputError saying what is wrong with it otherwise."""
    if len(line) > MAX_REQUEST_CHARS:
        raise InputError(f"A worker request is one short JSON line (at most {MAX_REQUEST_CHARS} characters); this one "
                         f"has {len(line)}, starting {_shown(line.strip())}.")
    try:
        data = json.loads(line)
    except ValueError as exc:
        raise InputError(f"A worker request must be one JSON object per line; could not read {_shown(line.strip())} "
                         f"({exc}).") from None
    except RecursionError:
        raise InputError("A worker request is a flat JSON object of paths and flags; this one is nested too deeply "
                         "to read.") from None
    if not isinstance(data, dict):
        raise InputError(f"A worker request must be a JSON object, got {type(data).__name__}.")
    unknown = sorted(set(data) - set(_FIELD_TYPES))
    if unknown:
        raise InputError(f"Unknown request field(s) {_shown(', '.join(unknown), quote=False)}; the fields are "
                         f"{', '.join(_FIELD_TYPES)}.")
    missing = [name for name in ("ct", "out") if not data.get(name)]
    if missing:
        raise InputError(f"The request gives no {' and no '.join(missing)}; both the CT and the output folder are "
                         "needed.")
    for name, value in data.items():
        if not isinstance(value, _FIELD_TYPES[name]):  # JSON true/false are bool, never int or str
            allowed = " or ".join("null" if t is type(None) else t.__name__ for t in _FIELD_TYPES[name])
            raise InputError(f"Request field {name!r} must be {allowed}, got {_shown(json.dumps(value))}.")
    if data.get("device", "auto") not in DEVICES:
        raise InputError(f"Request field 'device' must be one of {', '.join(DEVICES)}, got {_shown(data['device'])}.")
    return Request(**data)


def _shown(text: str, quote: bool = True) -> str:
    """``text`` (quoted) for an error message, cut to SHOWN_CHARS characters."""
    head = repr(text[:SHOWN_CHARS]) if quote else text[:SHOWN_CHARS]
    return head + (f" ... ({len(text)} characters)" if len(text) > SHOWN_CHARS else "")


@dataclass(frozen=True)
class WorkerResult:
    """How one request ended: ``ok`` with the output folder and seconds taken, or the error the user can act on
    (``exit_code`` as ``analyze`` would have exited)."""

    ok: bool
    id: object = None
    out: Optional[str] = None
    seconds: Optional[float] = None
    error: Optional[str] = None
    error_type: Optional[str] = None
    exit_code: int = 0


def format_result_line(result: WorkerResult) -> str:
    shown = {k: v for k, v in asdict(result).items() if v is not None or k == "id"}
    return f"{RESULT_PREFIX} {json.dumps(shown)}"


def parse_result_line(line: str) -> Optional[WorkerResult]:
    """The result a line carries, or None for progress and log lines."""
    line = line.strip()
    if not line.startswith(RESULT_PREFIX + " "):
        return None
    try:
        data = json.loads(line[len(RESULT_PREFIX) + 1:])
    except ValueError:
        return None
    known = {f.name for f in fields(WorkerResult)}
    if not isinstance(data, dict) or not isinstance(data.get("ok"), bool):
        return None
    return WorkerResult(**{k: v for k, v in data.items() if k in known})


# ----------------------------------------------------------------------------- the loaded model

def bundle_fingerprint(model) -> Optional[tuple]:
    """(resolved folder, SHA-256 over its manifest and data files) of a model bundle, or None when the files cannot
    be read (loading the bundle then says why). Any edit of the bundle, even one loading would refuse, changes it."""
    from .bundle import DATA_FILES, MANIFEST, bundle_folder

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
        from .analyze import load_model

        self._load = load or load_model
        self._key = None
        self._loaded = None

    def __call__(self, model, device) -> tuple:
        from .patches import resolve_device

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
        import numpy as np
        import torch

        from . import composition, lungmask, render, report, writers  # noqa: F401  (imported for their cost)
        from .patches import autocast_for, extract_patches

        render._vtk()
        import matplotlib.figure  # noqa: F401
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
    from .analyze import analyze
    from .progress import Progress

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
    models = ModelCache()  # imports analyze first, which sets OMP_WAIT_POLICY before PyTorch loads
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
    from .analyze import _interrupt_on_sigterm

    if not args.idle_timeout > 0:
        raise InputError(f"--idle-timeout must be a positive number of seconds, got {args.idle_timeout:g}.")
    _interrupt_on_sigterm()
    preload = None
    if args.preload is not None:
        preload = (None if args.preload == "default" else args.preload, args.preload_device)
    return serve(sys.stdin, args.idle_timeout, preload)
