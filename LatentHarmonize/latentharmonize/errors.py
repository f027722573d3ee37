"""Errors that reach the user: each says what was wrong and what to do about it.

Each also subclasses the builtin of its meaning, so callers that know only Python's own errors catch them too:
a bad input or bundle is a ``ValueError``; an unusable output folder or a refusal of the system is an ``OSError``.
"""
from __future__ import annotations

import errno

DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
REPORT_BUG = ("This is a bug in LatentHarmonize, not a problem with your data: please report it to the "
              "LatentHarmonize developers with the traceback above and the command you ran.")


class LatentHarmonizeError(Exception):
    """Base class for problems the user can fix; the CLI prints them without a traceback."""

    exit_code = 2


class InputError(LatentHarmonizeError, ValueError):
    """The input image, mask, cohort table or option is not usable."""


class NoLungFoundError(InputError):
    """Automatic lung segmentation found nothing that looks like lung."""


class BundleError(LatentHarmonizeError, ValueError):
    """A model bundle is missing, incomplete, tampered with, or of an unknown version."""


class OutputError(LatentHarmonizeError, OSError):
    """The output folder cannot be written, or would overwrite existing results."""


class ResourceError(LatentHarmonizeError, OSError):
    """The system refused an operation: a full disk, a path too long, a missing permission, not enough memory."""


class Cancelled(LatentHarmonizeError):
    """The run was interrupted (Ctrl-C or Cancel in Slicer); nothing was left half-written."""

    exit_code = 130


def os_error_message(exc: OSError, what: str) -> str:
    """A one-line explanation of an OSError met while doing ``what``, with what to do about it."""
    where = f" ({exc.filename})" if exc.filename and len(str(exc.filename)) <= 300 else ""
    if exc.errno in DISK_FULL_ERRNOS:
        return (f"The disk is full: {what} failed{where}. Free some space or choose a folder on another disk; "
                "nothing was published.")
    if exc.errno == errno.ENAMETOOLONG:
        name = str(exc.filename or "")
        shown = f" ({len(name)} characters: {name[:60]}...)" if name else ""
        return f"A path is too long for the file system{shown}. Use a shorter folder or file name."
    return f"{what} failed: {exc.strerror or exc}{where}. Check the path and its permissions."


def as_user_error(exc: BaseException) -> LatentHarmonizeError | None:
    """The user-facing error for a failure of the system rather than of LatentHarmonize (OSError, MemoryError),
    or None for anything else, which is a bug."""
    if isinstance(exc, LatentHarmonizeError):
        return exc
    if isinstance(exc, OSError):
        return ResourceError(os_error_message(exc, "An operation on a file or folder"))
    if isinstance(exc, MemoryError):
        return ResourceError("Not enough memory for this scan. Close other programs, or use a machine with more "
                             "memory.")
    return None
