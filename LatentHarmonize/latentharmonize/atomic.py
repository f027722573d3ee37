"""Atomic outputs: a result file is either complete or absent, never half-written.

``StagedOutput`` collects a run's files in a hidden folder inside the target folder (same file
system), then moves each into place with ``os.replace``. Existing outputs are refused unless
``overwrite`` is set; files in the folder that the run does not write are never touched.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

from .errors import OutputError

STAGING_PREFIX = ".latentharmonize-staging-"


def _check_writable(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"Output path {out_dir} exists and is a file; give a folder.")
    probe_dir = out_dir if out_dir.exists() else next((p for p in out_dir.parents if p.exists()), None)
    if probe_dir is None or not os.access(probe_dir, os.W_OK | os.X_OK):
        raise OutputError(f"Cannot write to {out_dir}: {probe_dir or out_dir} is not writable. Choose another --out folder.")


class StagedOutput:
    """Context manager that stages output files and publishes them on success.

    ``names`` are the file names (relative to ``out_dir``) the run will write; they are checked
    for collisions before any work starts. Inside the block, write each file to ``staged.path(name)``.
    """

    def __init__(self, out_dir, names: Iterable[str], overwrite: bool = False):
        self.out_dir = Path(out_dir)
        self.names = list(names)
        self.overwrite = overwrite
        self._stage: Path | None = None
        _check_writable(self.out_dir)
        existing = [n for n in self.names if (self.out_dir / n).exists()]
        if existing and not overwrite:
            shown = ", ".join(existing[:5]) + (" ..." if len(existing) > 5 else "")
            raise OutputError(f"{self.out_dir} already holds results ({shown}). To replace them, ask to overwrite "
                              "(--overwrite on the command line, overwrite=True in Python, \"overwrite\": true in a "
                              "worker request), or choose another folder.")

    def __enter__(self) -> "StagedOutput":
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._stage = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.out_dir))
        except OSError as exc:
            raise OutputError(f"Cannot create output folder {self.out_dir}: {exc.strerror}. Choose another --out folder.") from exc
        return self

    def path(self, name: str) -> Path:
        if name not in self.names:
            raise ValueError(f"{name!r} was not declared as an output of this run")
        target = self._stage / name
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                missing = [n for n in self.names if not (self._stage / n).exists()]
                if missing:
                    raise RuntimeError(f"declared outputs were not written: {missing}")
                for name in self.names:
                    dest = self.out_dir / name
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(self._stage / name, dest)
        finally:
            shutil.rmtree(self._stage, ignore_errors=True)
        return False


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary sibling and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
