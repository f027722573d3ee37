"""Atomic outputs: a run's result set is published whole or not at all, never half-written or mixed.

``StagedOutput`` collects a run's files in a hidden staging folder inside the target folder (same file system).
Publishing is one commit: a journal listing the files is written into the staging folder (the commit point), then
each file is moved into place with ``os.replace`` while Ctrl-C and SIGTERM are held back, then the journal is
removed. A process that dies before the commit point leaves an unpublished staging folder; one that dies after it
leaves a journal. Every later ``StagedOutput`` on the same folder first tidies such leftovers of dead runs (a run is
alive while it holds the lock file in its staging folder): it finishes a journalled publication and deletes an
unpublished staging folder. Existing outputs are refused unless ``overwrite`` is set; files in the folder that the
run does not write are never touched, and no output may be one of the run's inputs. See docs/analyze.md for what a
crash at each moment leaves behind.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterable

from .errors import DISK_FULL_ERRNOS, LatentHarmonizeError, OutputError, os_error_message

STAGING_PREFIX = ".latentharmonize-staging-"
LOCK_FILE = "lock"            # held (flock / msvcrt lock) by the live run that owns the staging folder
JOURNAL_FILE = "publish.json"  # present from the commit point until every file is in place
FILES_DIR = "files"           # the staged outputs, at their paths relative to the output folder
# A staging folder without a lock file may be one a live run made an instant ago; only older ones are leftovers.
UNLOCKED_GRACE_S = 60.0
# Below this much free space after a failed write, the failure is reported as a full disk.
DISK_FULL_MARGIN_BYTES = 16 << 20


def _check_writable(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"Output path {out_dir} exists and is a file; give a folder.")
    probe_dir = out_dir if out_dir.exists() else next((p for p in out_dir.parents if p.exists()), None)
    if probe_dir is None or not os.access(probe_dir, os.W_OK | os.X_OK):
        raise OutputError(f"Cannot write to {out_dir}: {probe_dir or out_dir} is not writable. Choose another --out folder.")


def disk_full(path: Path, exc: BaseException) -> OutputError | None:
    """An OutputError naming a full disk when ``exc`` (a failed write into ``path``) came from one: ENOSPC or a
    quota error, or a library's write error (ITK, VTK) while the disk has almost no free space left. Our own errors
    (OutputError and ResourceError are OSErrors too) already say what happened."""
    if isinstance(exc, LatentHarmonizeError):
        return None
    if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
        return OutputError(os_error_message(exc, f"writing into {path}"))
    if isinstance(exc, (OSError, RuntimeError)):
        try:
            free = shutil.disk_usage(path).free
        except OSError:
            return None
        if free < DISK_FULL_MARGIN_BYTES:
            return OutputError(f"The disk holding {path} is full ({free >> 20} MB free) and a file could not be "
                               f"written ({type(exc).__name__}). Free some space or choose a folder on another disk; "
                               "nothing was published.")
    return None


# ----------------------------------------------------------------------------- the owner's lock

def _try_lock(fd: int) -> bool:
    """Take an exclusive lock on the open file ``fd`` without waiting; False when another process holds it. The
    operating system releases it when its holder exits, however it exits."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _claim(stage: Path) -> int | None:
    """The open, locked lock file of a staging folder whose owner is gone, or None while a live run holds it (or
    while a lock-less folder is young enough to be one a live run is just creating)."""
    lock = stage / LOCK_FILE
    try:
        if not lock.exists() and time.time() - stage.stat().st_mtime < UNLOCKED_GRACE_S:
            return None
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:  # gone meanwhile, or not ours to tidy (read-only): left alone
        return None
    if _try_lock(fd):
        return fd
    os.close(fd)
    return None


def recover_leftovers(out_dir) -> list:
    """Tidy what dead runs left in ``out_dir``: finish each journalled publication, delete each unpublished staging
    folder. Folders of live runs are left alone. Returns the staging folders handled."""
    out_dir = Path(out_dir)
    handled = []
    try:
        candidates = sorted(p for p in out_dir.iterdir() if p.name.startswith(STAGING_PREFIX))
    except OSError:
        return handled
    for stage in candidates:
        if stage.is_symlink() or not stage.is_dir():
            continue
        fd = _claim(stage)
        if fd is None:
            continue
        try:
            journal = _read_journal(stage)
            if journal is not None:
                _move_into_place(stage, out_dir, journal)
        finally:
            os.close(fd)
            if not (stage / JOURNAL_FILE).exists():  # a publication that failed again is kept for the next try
                shutil.rmtree(stage, ignore_errors=True)
        handled.append(stage)
    return handled


def _read_journal(stage: Path) -> dict | None:
    """The journal of a committed publication; None before the commit point (it is written atomically)."""
    try:
        journal = json.loads((stage / JOURNAL_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not (isinstance(journal, dict) and all(isinstance(journal.get(k), list) for k in ("publish", "remove"))):
        return None
    return journal


def _inside(name: str) -> bool:
    """True for a relative path that stays inside its folder (journal entries are data read back from disk)."""
    parts = Path(name).parts
    return bool(parts) and not Path(name).is_absolute() and ".." not in parts


def _move_into_place(stage: Path, out_dir: Path, journal: dict) -> None:
    """Publish a committed journal (idempotent: a file already moved is not in the staging folder any more)."""
    for name in journal["publish"]:
        source = stage / FILES_DIR / name
        if _inside(name) and source.exists():
            dest = out_dir / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, dest)
    for name in journal["remove"]:  # earlier outputs the new set does not have: they would mix with it
        if _inside(name):
            with contextlib.suppress(FileNotFoundError):
                (out_dir / name).unlink()
    (stage / JOURNAL_FILE).unlink()


@contextlib.contextmanager
def _signals_held():
    """Hold Ctrl-C and SIGTERM back for the block (main thread only); a signal that came is delivered after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            previous[s] = signal.SIG_DFL if handler is None else handler  # None: a handler set outside Python
            signal.signal(s, previous[s])
        for signum in dict.fromkeys(caught):  # what would have happened, now (KeyboardInterrupt for Ctrl-C)
            handler = previous[signum]
            if callable(handler):
                handler(signum, None)
            elif handler != signal.SIG_IGN:
                signal.raise_signal(signum)


# ----------------------------------------------------------------------------- staging

class StagedOutput:
    """Context manager that stages output files and publishes them, all together, on success.

    ``names`` are the file names (relative to ``out_dir``) the run will write; they are checked for collisions before
    any work starts. Inside the block, write each file to ``staged.path(name)``. ``replaces`` names earlier outputs
    of the same kind that this run does not write (e.g. a report from a run with one): they count as existing results,
    and are removed when the new set is published over them, so the folder never mixes two runs. ``inputs`` are the
    run's input files and folders: an output that would be one of them, or a folder inside an input folder, is
    refused.
    """

    def __init__(self, out_dir, names: Iterable[str], overwrite: bool = False, replaces: Iterable[str] = (),
                 inputs: Iterable = ()):
        self.out_dir = Path(out_dir)
        self.names = list(names)
        self.replaces = [n for n in replaces if n not in self.names]
        self.overwrite = overwrite
        self._stage: Path | None = None
        self._lock: int | None = None
        self._committed = False
        try:
            _check_writable(self.out_dir)
            _refuse_inputs(self.out_dir, [*self.names, *self.replaces], inputs)
            recover_leftovers(self.out_dir)
            existing = [n for n in [*self.names, *self.replaces] if os.path.lexists(self.out_dir / n)]
        except LatentHarmonizeError:
            raise
        except OSError as exc:
            raise OutputError(os_error_message(exc, f"Preparing the output folder {self.out_dir}")) from exc
        if existing and not overwrite:
            shown = ", ".join(existing[:5]) + (" ..." if len(existing) > 5 else "")
            raise OutputError(f"{self.out_dir} already holds results ({shown}). To replace them, ask to overwrite "
                              "(--overwrite on the command line, overwrite=True in Python, \"overwrite\": true in a "
                              "worker request), or choose another folder.")

    def __enter__(self) -> "StagedOutput":
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._stage = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.out_dir))
            self._lock = os.open(self._stage / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
            _try_lock(self._lock)
        except OSError as exc:
            self._cleanup()
            raise OutputError(os_error_message(exc, f"Creating the output folder {self.out_dir}")) from exc
        return self

    def path(self, name: str) -> Path:
        if name not in self.names:
            raise ValueError(f"{name!r} was not declared as an output of this run")
        target = self._stage / FILES_DIR / name
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                missing = [n for n in self.names if not (self._stage / FILES_DIR / n).exists()]
                if missing:
                    raise RuntimeError(f"declared outputs were not written: {missing}")
                self._publish()
            elif isinstance(exc, Exception):
                full = disk_full(self.out_dir, exc)  # measured before the staged files are deleted
                if full is not None:
                    raise full from exc
        except LatentHarmonizeError:
            raise
        except OSError as error:
            full = disk_full(self.out_dir, error)
            message = str(full) if full else os_error_message(error, f"Publishing the results in {self.out_dir}")
            if self._committed:  # files were moved already: the staging folder keeps the rest for the next run
                message += (f" The results were only partly moved into place; the next run writing into "
                            f"{self.out_dir} completes them (or run again with --overwrite).")
            raise OutputError(message) from error
        finally:
            self._cleanup()
        return False

    def _publish(self) -> None:
        journal = {"publish": self.names, "remove": self.replaces if self.overwrite else []}
        with _signals_held():
            # The commit point: once the journal is on disk, the new set will be published, by this run or, if it
            # dies, by the next run on this folder.
            atomic_write_bytes(self._stage / JOURNAL_FILE, json.dumps(journal).encode("utf-8"), sync=True)
            self._committed = True
            _move_into_place(self._stage, self.out_dir, journal)

    def _cleanup(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # releases the lock: a committed leftover is now the next run's to finish
            self._lock = None
        if self._stage is not None and not (self._stage / JOURNAL_FILE).exists():
            shutil.rmtree(self._stage, ignore_errors=True)


def _refuse_inputs(out_dir: Path, names: list, inputs: Iterable) -> None:
    """OutputError when an output would be (or replace) one of the run's inputs."""
    real_out = Path(os.path.realpath(out_dir))
    for given in inputs:
        if given is None or not os.path.exists(given):
            continue
        source = Path(os.path.realpath(given))
        if source.is_dir() and (real_out == source or source in real_out.parents):
            raise OutputError(f"The output folder {out_dir} is inside the input folder {given}; writing there would "
                              "change the input. Choose another --out folder.")
        for name in names:
            dest = out_dir / name
            if os.path.realpath(dest) == str(source) or (dest.exists() and os.path.samefile(dest, source)):
                raise OutputError(f"The output {dest} would replace the input {given}. Choose another --out folder "
                                  "(or rename the input).")


def atomic_write_bytes(path, data: bytes, sync: bool = False) -> None:
    """Write ``data`` to ``path`` via a temporary sibling and ``os.replace``; ``sync`` also makes it durable (fsync
    before the rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if sync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
