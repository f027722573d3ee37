"""setup_deps.py and the command-line entry point."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import setup_deps  # noqa: E402

from latentharmonize import cli  # noqa: E402


@pytest.mark.parametrize("version, ok", [("2.13.0+cpu", True), ("2.1.0", True), ("2.0.1", False), ("1.13.1+cu117", False), ("garbage", False)])
def test_torch_compatibility_rule(version, ok):
    assert setup_deps.torch_is_compatible(version) is ok


def test_second_run_changes_nothing():
    # CI and the README run `setup_deps.py --test` before the suite, so this run must find everything in place.
    venv_python = REPO / ".venv" / "bin" / "python"
    if Path(sys.executable).resolve() != venv_python.resolve():
        pytest.skip("suite not running from the project .venv that setup_deps.py manages")
    proc = subprocess.run([sys.executable, str(REPO / "setup_deps.py"), "--test"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "up to date" in proc.stdout
    assert "Installing" not in proc.stdout


def test_missing_interpreter_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "setup_deps.py"), "--python", str(tmp_path / "PythonSlicer")],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert "no such interpreter" in proc.stderr


def test_cli_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out


def test_every_command_module_exposes_its_interface():
    import importlib

    for name, (module_name, _) in cli.COMMANDS.items():
        module = importlib.import_module(module_name)
        assert callable(module.add_arguments) and callable(module.run), name


def test_user_errors_print_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "latentharmonize", "analyze", str(tmp_path / "missing.nrrd"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "missing.nrrd" in proc.stderr
