"""Atomic outputs: complete files or none, existing results refused unless overwrite, others untouched."""
from __future__ import annotations

import os

import pytest

from latentharmonize.atomic import STAGING_PREFIX, StagedOutput, atomic_write_bytes, atomic_write_text
from latentharmonize.errors import OutputError

NAMES = ["result.csv", "maps/labels.nrrd"]


def _write_all(staged, text="new"):
    for name in NAMES:
        staged.path(name).write_text(f"{text} {name}")


def _listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_publishes_all_declared_files(tmp_path):
    out = tmp_path / "out"
    with StagedOutput(out, NAMES) as staged:
        _write_all(staged)
        assert not (out / "result.csv").exists(), "nothing is visible before the block ends"
    assert (out / "result.csv").read_text() == "new result.csv"
    assert (out / "maps" / "labels.nrrd").read_text() == "new maps/labels.nrrd"
    assert not any(p.name.startswith(STAGING_PREFIX) for p in out.iterdir()), "the staging folder is removed"


def test_refuses_existing_outputs_without_overwrite(tmp_path):
    (tmp_path / "result.csv").write_text("old")
    with pytest.raises(OutputError, match=r"already holds results \(result.csv\).*--overwrite"):
        StagedOutput(tmp_path, NAMES)
    assert (tmp_path / "result.csv").read_text() == "old"


def test_overwrite_replaces_and_leaves_unrelated_files(tmp_path):
    (tmp_path / "result.csv").write_text("old")
    (tmp_path / "notes.txt").write_text("mine")
    with StagedOutput(tmp_path, NAMES, overwrite=True) as staged:
        _write_all(staged)
    assert (tmp_path / "result.csv").read_text() == "new result.csv"
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_exception_leaves_nothing_and_keeps_previous_results(tmp_path):
    (tmp_path / "result.csv").write_text("old")
    (tmp_path / "notes.txt").write_text("mine")
    before = _listing(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        with StagedOutput(tmp_path, NAMES, overwrite=True) as staged:
            staged.path("result.csv").write_text("half")
            raise KeyboardInterrupt
    assert _listing(tmp_path) == before
    assert (tmp_path / "result.csv").read_text() == "old"


def test_undeclared_or_unwritten_outputs_are_errors(tmp_path):
    with pytest.raises(RuntimeError, match="not written"):
        with StagedOutput(tmp_path / "out", NAMES) as staged:
            staged.path("result.csv").write_text("only one")
    assert not (tmp_path / "out" / "result.csv").exists(), "a run missing an output publishes none of them"
    with StagedOutput(tmp_path / "other", NAMES) as staged:
        with pytest.raises(ValueError, match="not declared"):
            staged.path("extra.txt")
        _write_all(staged)


def test_output_path_that_is_a_file(tmp_path):
    (tmp_path / "taken").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        StagedOutput(tmp_path / "taken", NAMES)


def test_unwritable_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as for a read-only folder (root ignores chmod)
    with pytest.raises(OutputError, match="not writable. Choose another --out folder"):
        StagedOutput(tmp_path / "out", NAMES)
    assert not (tmp_path / "out").exists()


def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "sub" / "table.json"
    atomic_write_text(target, "first")
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    assert _listing(tmp_path) == ["sub", "sub/table.json"], "no temporary sibling is left"
