"""Atomic outputs: complete files or none, existing results refused unless overwrite, others untouched."""
from __future__ import annotations

import os

import pytest

from latentharmonize.atomic import (STAGING_PREFIX, StagedOutput, atomic_write_bytes, atomic_write_text,
                                    recover_leftovers)
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


# ----------------------------------------------------------------------------- leftovers of dead runs (issue 21)
def _leftover(out, journal=None, age_s=0.0, lock=True):
    """A staging folder as a killed run leaves it: new files staged, maybe a journal (killed while publishing)."""
    import json
    import time

    stage = out / f"{STAGING_PREFIX}dead"
    (stage / "files" / "maps").mkdir(parents=True)
    for name in NAMES:
        (stage / "files" / name).write_text(f"new {name}")
    if lock:
        (stage / "lock").write_bytes(b"")
    if journal is not None:
        (stage / "publish.json").write_text(json.dumps(journal))
    os.utime(stage, (time.time() - age_s, time.time() - age_s))
    return stage


def test_a_journalled_publication_is_finished_by_the_next_run(tmp_path):
    (tmp_path / "result.csv").write_text("old")
    (tmp_path / "report.html").write_text("old report")
    (tmp_path / "notes.txt").write_text("mine")
    stage = _leftover(tmp_path, journal={"publish": NAMES, "remove": ["report.html"]})
    with pytest.raises(OutputError, match="already holds results"):  # the finished set counts as results
        StagedOutput(tmp_path, NAMES)
    assert not stage.exists()
    assert (tmp_path / "result.csv").read_text() == "new result.csv"
    assert _listing(tmp_path) == ["maps", "maps/labels.nrrd", "notes.txt", "result.csv"]


def test_an_unpublished_leftover_is_deleted_and_results_kept(tmp_path):
    (tmp_path / "result.csv").write_text("old")
    stage = _leftover(tmp_path)
    StagedOutput(tmp_path, ["other.csv"])
    assert not stage.exists() and (tmp_path / "result.csv").read_text() == "old"


def test_hostile_journal_entries_stay_inside_the_folder(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "victim.txt").write_text("keep")
    _leftover(tmp_path / "out", journal={"publish": ["../victim.txt"], "remove": ["../victim.txt", "/etc/hostname"]})
    recover_leftovers(tmp_path / "out")
    assert (tmp_path / "victim.txt").read_text() == "keep"


def test_a_live_runs_staging_folder_is_left_alone(tmp_path):
    out = tmp_path / "out"
    with StagedOutput(out, NAMES) as running:
        _write_all(running)
        assert recover_leftovers(out) == []  # another process' run would see the lock held
        young = _leftover(out, lock=False)  # a run that has not created its lock yet
        assert recover_leftovers(out) == [] and young.exists()
    assert (out / "result.csv").read_text() == "new result.csv"


def test_an_old_lockless_leftover_is_deleted(tmp_path):
    stage = _leftover(tmp_path, lock=False, age_s=3600)
    assert recover_leftovers(tmp_path) == [stage] and not stage.exists()


def test_a_library_write_error_on_a_full_disk_says_so(tmp_path, monkeypatch):
    """ITK and VTK report a full disk as a RuntimeError of their own: with almost no space left it is named."""
    import shutil

    from latentharmonize import atomic

    real_usage = shutil.disk_usage
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda p: real_usage(p)._replace(free=1 << 20))
    with pytest.raises(OutputError, match="is full"):
        with StagedOutput(tmp_path / "out", NAMES):
            raise RuntimeError("itk::ERROR: ImageFileWriter: could not write")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
