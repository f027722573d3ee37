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


def _command_seeing_the_environment(monkeypatch) -> dict:
    """A stand-in command module registered with the CLI; returns what its ``run`` saw of OMP_WAIT_POLICY."""
    import os
    import types

    seen = {}

    def run(args) -> int:
        seen["policy"] = os.environ.get("OMP_WAIT_POLICY")
        return 0

    module = types.ModuleType("fake_command")
    module.add_arguments = lambda parser: None
    module.run = run
    monkeypatch.setitem(sys.modules, "fake_command", module)
    monkeypatch.setitem(cli.COMMANDS, "fake", ("fake_command", "a stand-in"))
    return seen


def test_backend_commands_wait_passively_and_keep_the_users_choice(monkeypatch):
    seen = _command_seeing_the_environment(monkeypatch)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert cli.main(["fake"]) == 0 and seen["policy"] == "PASSIVE"
    seen.clear()
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert cli.main(["fake"]) == 0 and seen["policy"] == "ACTIVE"


def test_importing_the_package_leaves_the_openmp_policy_alone():
    """3D Slicer's own process imports the bridge (and so the package): its OpenMP settings are not ours to change."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = "import os, latentharmonize, latentharmonize.slicer_bridge; print(os.environ.get('OMP_WAIT_POLICY'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"
