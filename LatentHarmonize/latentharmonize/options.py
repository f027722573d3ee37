"""Command-line flags that several commands share, each declared once so that its spelling, default and help are
the same everywhere (``latentharmonize analyze --device`` means what ``train --device`` means)."""
from __future__ import annotations

import argparse

DEVICES = ("auto", "cpu", "cuda")  # --device, and the "device" of a worker request (worker_protocol)


def add_out(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--out", required=True, help=help)


def add_model(parser: argparse.ArgumentParser, help: str = "model bundle folder (default: the bundled model)") -> None:
    parser.add_argument("--model", default=None, help=help)


def add_device(parser: argparse.ArgumentParser, default: str = "auto") -> None:
    parser.add_argument("--device", default=default, choices=DEVICES,
                        help=f"where to run the encoder: auto (a GPU if there is one), cpu or cuda (default {default})")


def add_seed(parser: argparse.ArgumentParser, default: int = 0, help: str = "random seed") -> None:
    parser.add_argument("--seed", type=int, default=default, help=f"{help} (default {default})")


def add_overwrite(parser: argparse.ArgumentParser, what: str = "results already in the output folder") -> None:
    parser.add_argument("--overwrite", action="store_true", help=f"replace {what}")


def add_no_report(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-report", dest="write_report", action="store_false",
                        help="skip report.html and the QC pictures (faster; `latentharmonize report` makes them later)")


def add_output_style(parser: argparse.ArgumentParser, quiet: bool = True,
                     quiet_help: str = "print nothing but errors") -> None:
    """``--progress-lines`` (machine-readable progress, what the Slicer module reads) and, where the command has a
    human summary, ``--quiet`` (``quiet_help``: what it still prints)."""
    if quiet:
        parser.add_argument("--quiet", action="store_true", help=quiet_help)
    parser.add_argument("--progress-lines", action="store_true",
                        help="print progress as machine-readable LH-PROGRESS lines (for the Slicer module or scripts)")


def add_dask(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--scheduler", default=None, metavar="ADDRESS",
                        help=f"address of an existing Dask scheduler (tcp://host:port) for {what}")
    parser.add_argument("--workers", type=int, default=None,
                        help=f"worker processes of a local Dask cluster for {what}")
