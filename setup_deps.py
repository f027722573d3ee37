#!/usr/bin/env python3
"""Install the LatentHarmonize backend and its dependencies.

Default: a project virtual environment ``.venv/`` at the repository root, so that
``.venv/bin/latentharmonize`` exists afterwards.  ``--python PATH`` installs into another
interpreter instead (for example Slicer's ``PythonSlicer``).

PyTorch is handled apart from the other dependencies: an already-installed torch that is
recent enough is kept (Slicer users get theirs from the PyTorch extension); otherwise a pinned
release is installed, because a bare ``torch`` requirement can pull a multi-GB CUDA build.

A second run with the same options and an unchanged ``pyproject.toml`` does nothing.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parent
MIN_PYTHON = (3, 9)
PINNED_TORCH = "torch==2.13.0"
MIN_TORCH = (2, 1)
STAMP_NAME = ".setup_deps.stamp"


class SetupError(RuntimeError):
    pass


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--python", metavar="PATH", help="install into this interpreter instead of creating .venv/")
    p.add_argument("--venv", metavar="DIR", default=str(REPO / ".venv"), help="virtual environment to create or reuse (default: .venv/)")
    p.add_argument("--test", action="store_true", help="also install the test extras (pytest, playwright, pydicom)")
    p.add_argument("--torch", default=PINNED_TORCH, metavar="REQ", help=f"torch requirement used when no compatible torch is present (default: {PINNED_TORCH})")
    p.add_argument("--force", action="store_true", help="reinstall even if nothing changed since the last run")
    return p.parse_args(argv)


def run(cmd: list[str], what: str) -> str:
    """Run an install step; on failure raise with the command and the end of its output."""
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.strip().splitlines()[-25:])
        raise SetupError(f"{what} failed (exit code {proc.returncode}).\nCommand: {' '.join(cmd)}\n--- last lines ---\n{tail}")
    return proc.stdout


def target_interpreter(args) -> Path:
    if args.python:
        exe = Path(args.python)
        if not exe.exists():
            raise SetupError(f"--python {exe}: no such interpreter. Give the full path, e.g. to Slicer's PythonSlicer.")
        return exe
    env_dir = Path(args.venv)
    exe = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    if not exe.exists():
        print(f"Creating virtual environment {env_dir}")
        try:
            venv.EnvBuilder(with_pip=True, clear=False).create(env_dir)
        except Exception as exc:  # venv raises several kinds; all mean the same to the user
            raise SetupError(f"Could not create a virtual environment in {env_dir}: {exc}\n"
                             "On Debian/Ubuntu install the venv module first: apt-get install python3-venv") from exc
    return exe


def interpreter_version(exe: Path) -> tuple[int, int]:
    out = run([str(exe), "-c", "import sys; print(sys.version_info[0], sys.version_info[1])"], "Checking the Python version")
    major, minor = (int(x) for x in out.split())
    return major, minor


def installed_torch(exe: Path) -> str | None:
    proc = subprocess.run([str(exe), "-c", "import torch; print(torch.__version__)"],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def torch_is_compatible(version: str) -> bool:
    try:
        major, minor = (int(part) for part in version.split("+")[0].split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= MIN_TORCH


def stamp_key(exe: Path, args) -> str:
    h = hashlib.sha256()
    h.update((REPO / "pyproject.toml").read_bytes())
    h.update(json.dumps([str(exe.resolve()), args.test, args.torch]).encode())
    return h.hexdigest()


def main(argv=None) -> int:
    args = parse_args(argv)
    if sys.version_info < MIN_PYTHON:
        raise SetupError(f"Python {'.'.join(map(str, MIN_PYTHON))} or newer is needed; this is {sys.version.split()[0]}.")
    exe = target_interpreter(args)
    version = interpreter_version(exe)
    if version < MIN_PYTHON:
        raise SetupError(f"{exe} is Python {version[0]}.{version[1]}; LatentHarmonize needs {MIN_PYTHON[0]}.{MIN_PYTHON[1]} or newer.")

    stamp = (exe.parent.parent if not args.python else REPO) / STAMP_NAME
    key = stamp_key(exe, args)
    if not args.force and stamp.exists() and stamp.read_text().strip() == key and installed_torch(exe):
        print(f"Dependencies are up to date in {exe} (use --force to reinstall).")
        return 0

    pip = [str(exe), "-m", "pip", "install", "--disable-pip-version-check"]
    torch_version = installed_torch(exe)
    if torch_version and torch_is_compatible(torch_version):
        print(f"Keeping the installed torch {torch_version}.")
    else:
        if torch_version:
            print(f"Installed torch {torch_version} is older than {'.'.join(map(str, MIN_TORCH))}; installing {args.torch}.")
        else:
            print(f"Installing {args.torch}.")
        run(pip + [args.torch], f"Installing {args.torch}")

    extras = "[test]" if args.test else ""
    print(f"Installing the latentharmonize backend{' with test extras' if args.test else ''} into {exe}.")
    run(pip + ["-e", f"{REPO}{extras}"], "Installing the latentharmonize backend")
    stamp.write_text(key + "\n")
    print("Done." + ("" if args.python else f" The command line is {exe.parent / 'latentharmonize'}"))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SetupError as err:
        print(f"setup_deps.py: error: {err}", file=sys.stderr)
        sys.exit(1)
