"""The resident worker's protocol (``latentharmonize worker``): one JSON request per line in, progress lines and
one ``LH-RESULT`` line per request out (format in :mod:`latentharmonize.worker` and docs/analyze.md).

The client side (the Slicer module, ``bench``) needs only this module, which imports nothing heavy: the Slicer module
reads it before the backend's dependencies are installed.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Optional

from .errors import InputError
from .options import DEVICES

RESULT_PREFIX = "LH-RESULT"
DEFAULT_IDLE_TIMEOUT_S = 600.0
# A request is a few paths and flags; anything far longer is refused unread, and error messages quote at most
# SHOWN_CHARS of what the request held, so a hostile request cannot make the answer itself huge.
MAX_REQUEST_CHARS = 65536
SHOWN_CHARS = 200


@dataclass(frozen=True)
class Request:
    """One analysis to run: the arguments of :func:`~latentharmonize.analyze_command.analyze`, and an id echoed back."""

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
