"""Progress reporting that a GUI can parse and a person can read.

Machine-readable mode prints one line per update on stdout::

    LH-PROGRESS <percent 0-100> <stage> <message>

``percent`` is an integer over the whole run, ``stage`` one word (``load``, ``mask``, ``encode``...),
``message`` free text to the end of the line. Any other line is log output. The Slicer module
parses these lines with :func:`parse_progress_line`.
"""
from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional, TextIO

PREFIX = "LH-PROGRESS"
_LINE = re.compile(rf"^{PREFIX} (\d{{1,3}}) (\S+) ?(.*)$")


@dataclass(frozen=True)
class ProgressEvent:
    percent: int
    stage: str
    message: str


def format_progress_line(percent: float, stage: str, message: str = "") -> str:
    if not stage or any(c.isspace() for c in stage):
        raise ValueError(f"stage must be one word, got {stage!r}")
    pct = int(round(min(max(percent, 0.0), 100.0)))
    return f"{PREFIX} {pct} {stage} {' '.join(message.split())}".rstrip()


def parse_progress_line(line: str) -> Optional[ProgressEvent]:
    """Return the event a progress line carries, or None for ordinary log lines."""
    m = _LINE.match(line.strip())
    if not m:
        return None
    pct = int(m.group(1))
    if pct > 100:
        return None
    return ProgressEvent(pct, m.group(2), m.group(3))


class Progress:
    """Report stage progress as parseable lines (``machine=True``) or as a readable log.

    ``callback`` (optional) receives every :class:`ProgressEvent`, for library use.
    """

    def __init__(self, machine: bool = False, quiet: bool = False, stream: TextIO | None = None,
                 callback: Callable[[ProgressEvent], None] | None = None):
        self.machine = machine
        self.quiet = quiet
        self.stream = stream or sys.stdout
        self.callback = callback
        self._t0 = time.perf_counter()

    def __call__(self, percent: float, stage: str, message: str = "") -> None:
        event = parse_progress_line(format_progress_line(percent, stage, message))
        if self.callback is not None:
            self.callback(event)
        if self.quiet:
            return
        if self.machine:
            print(format_progress_line(percent, stage, message), file=self.stream, flush=True)
        else:
            elapsed = time.perf_counter() - self._t0
            print(f"[{elapsed:6.1f}s {event.percent:3d}%] {stage}: {message}", file=self.stream, flush=True)


def silent() -> Progress:
    return Progress(quiet=True)
