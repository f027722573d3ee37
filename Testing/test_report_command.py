"""``latentharmonize report``: the report and QC pictures of an ``analyze --no-report`` folder, on demand."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import SimpleITK as sitk

from latentharmonize.analyze_command import analyze
from latentharmonize.cli import main as cli_main
from latentharmonize.outputs import output_names
from latentharmonize.report_command import REPORT_KINDS

REPORT_FILES = [output_names("chest")[k] for k in REPORT_KINDS]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The small phantom analysed with its report, and without (then the report command run on that folder)."""
    from latentharmonize.phantom import DEFAULT_ACQUISITIONS, acquire, make_patient

    folder = tmp_path_factory.mktemp("report")
    ct = folder / "chest.nrrd"
    sitk.WriteImage(acquire(make_patient(0, seed=0), DEFAULT_ACQUISITIONS[0]), str(ct), True)
    full = analyze(ct, folder / "full", device="cpu")
    bare = analyze(ct, folder / "bare", device="cpu", write_report=False)
    return ct, full.out_dir, bare.out_dir


def test_report_on_demand_is_analyze_s_report_byte_for_byte(runs, capsys):
    ct, full, bare = runs
    before = {p.name: p.read_bytes() for p in bare.iterdir()}
    assert not set(REPORT_FILES) & set(before)
    assert cli_main(["report", str(bare), "--device", "cpu", "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(bare / "report.html")
    for name in REPORT_FILES:
        assert (bare / name).read_bytes() == (full / name).read_bytes(), name
    # the analysis files are untouched, and nothing else appeared (no staging folder left)
    assert {p.name for p in bare.iterdir()} == set(before) | set(REPORT_FILES)
    assert all((bare / n).read_bytes() == data for n, data in before.items())
    # a second run is refused without --overwrite, and gives the same bytes with it
    assert cli_main(["report", str(bare), "--device", "cpu", "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli_main(["report", str(bare), "--device", "cpu", "--quiet", "--overwrite", "--ct", str(ct)]) == 0
    assert (bare / "report.html").read_bytes() == (full / "report.html").read_bytes()


def _copy_bare(runs, tmp_path) -> Path:
    _, full, _ = runs
    folder = tmp_path / "analysis"
    folder.mkdir()
    for name in output_names("chest", write_report=False).values():
        shutil.copy(full / name, folder / name)
    return folder


def test_another_ct_is_refused_and_nothing_is_written(runs, tmp_path, capsys):
    folder = _copy_bare(runs, tmp_path)
    other = tmp_path / "other.nrrd"
    image = sitk.ReadImage(str(runs[0]))
    sitk.WriteImage(image + 1, str(other), True)  # one HU more everywhere: another image
    assert cli_main(["report", str(folder), "--ct", str(other), "--device", "cpu"]) == 2
    assert "SHA-256" in capsys.readouterr().err
    assert {p.name for p in folder.iterdir()} == set(output_names("chest", write_report=False).values())


def test_missing_ct_or_folder_says_what_to_give(runs, tmp_path, capsys):
    folder = _copy_bare(runs, tmp_path)
    assert cli_main(["report", str(folder), "--ct", str(tmp_path / "gone.nrrd")]) == 2
    assert "--ct PATH" in capsys.readouterr().err
    assert cli_main(["report", str(tmp_path)]) == 2
    assert "no analysis.json" in capsys.readouterr().err


def test_quiet_help_says_the_path_is_still_printed():
    import argparse

    from latentharmonize import report_command

    parser = argparse.ArgumentParser()
    report_command.add_arguments(parser)
    assert "report's path" in " ".join(parser.format_help().split())  # what run() prints even with --quiet
