"""Errors that reach the user: each says what was wrong and what to do about it."""
from __future__ import annotations


class LatentHarmonizeError(Exception):
    """Base class for problems the user can fix; the CLI prints them without a traceback."""

    exit_code = 2


class InputError(LatentHarmonizeError):
    """The input image, mask, cohort table or option is not usable."""


class NoLungFoundError(InputError):
    """Automatic lung segmentation found nothing that looks like lung."""


class BundleError(LatentHarmonizeError):
    """A model bundle is missing, incomplete, tampered with, or of an unknown version."""


class OutputError(LatentHarmonizeError):
    """The output folder cannot be written, or would overwrite existing results."""


class Cancelled(LatentHarmonizeError):
    """The run was interrupted (Ctrl-C or Cancel in Slicer); nothing was left half-written."""

    exit_code = 130
