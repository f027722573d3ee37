"""The ``latentharmonize`` command line.

Each subcommand lives in its own module, which provides ``add_arguments(parser)`` and
``run(args) -> int``; modules are imported only when their command runs, so ``--help`` is fast
and a missing optional dependency only affects the command that needs it.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from . import __version__
from .errors import REPORT_BUG, as_user_error

COMMANDS = {
    "analyze": ("latentharmonize.analyze_command", "analyze one chest CT: cluster map, composition, QC report"),
    "train": ("latentharmonize.training", "train encoder, latent rotation and tissue clusters into a model bundle"),
    "evaluate": ("latentharmonize.evaluation", "measure cluster consistency, probe and survival against baselines"),
    "phantom": ("latentharmonize.phantom", "generate a multi-patient, multi-acquisition chest CT phantom cohort"),
    "batch": ("latentharmonize.batch", "analyze a whole cohort on a Dask cluster"),
    "survival": ("latentharmonize.survival", "Cox survival model from cohort tissue compositions"),
    "bench": ("latentharmonize.bench", "benchmark analyze speed and memory on a full-size phantom"),
    "worker": ("latentharmonize.worker", "resident analyze: one JSON request per line on stdin, model kept loaded"),
    "report": ("latentharmonize.report_command", "build report.html and the QC pictures of an analysis folder"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="latentharmonize", description="Scanner-invariant lung tissue clusters from chest CT.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


# Commands whose process ends without Python's teardown once they return: their files are closed and published by
# then, and with PyTorch and scikit-learn loaded the teardown alone took 0.7 s, freeing nothing the OS would not.
# (The worker may also still have a thread blocked reading stdin when its idle timeout ends it.)
QUICK_EXIT = {"analyze", "worker", "report"}


def main(argv=None) -> int:
    """Run a command. ``argv`` None means the program's own command line, and then a command of
    :data:`QUICK_EXIT` ends the process itself with its exit code instead of returning."""
    # PyTorch's OpenMP threads spin while they wait for work. When other programs keep the cores busy (3D Slicer itself,
    # another analysis), spinning threads hold each other up: on the shared 2-core CPU the encoding took 1-3.4 s
    # instead of 0.5 s. Waiting passively costs little when the machine is idle (0.27 -> 0.29 s there). OpenMP reads
    # this when PyTorch loads, so it is set here, before the command's module is imported; the processes a command
    # starts (batch's Dask workers, bench's analyze runs) inherit it. Only the backend's own processes: importing the
    # package (as 3D Slicer's process does for the bridge) leaves the environment alone. A value the user set is kept.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    own_process = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv or ["--help"])
        return 2
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(COMMANDS[name][0])
    sub = argparse.ArgumentParser(prog=f"latentharmonize {name}", description=COMMANDS[name][1])
    module.add_arguments(sub)
    args = sub.parse_args(rest)
    try:
        code = int(module.run(args) or 0)
    except KeyboardInterrupt:
        print(f"latentharmonize {name}: interrupted; no partial outputs were left.", file=sys.stderr)
        code = 130
    except Exception as exc:  # noqa: BLE001  (every failure ends with a message, never a bare traceback)
        err = as_user_error(exc)
        if err is None:
            traceback.print_exc()
            print(f"latentharmonize {name}: internal error: {type(exc).__name__}. {REPORT_BUG}", file=sys.stderr)
            code = 1
        else:
            print(f"latentharmonize {name}: error: {err}", file=sys.stderr)
            code = err.exit_code
    if own_process and name in QUICK_EXIT:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
