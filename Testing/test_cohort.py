"""Cohort table contract: required columns, path resolution, and specific errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from latentharmonize.cohort import read_cohort
from latentharmonize.errors import InputError


@pytest.fixture
def study(tmp_path):
    """A study folder with three scans (one a DICOM-like folder), one mask, one truth file."""
    (tmp_path / "scans").mkdir()
    for name in ("p1_soft.nrrd", "p1_sharp.nrrd", "p1_truth.nrrd", "p1_mask.nrrd"):
        (tmp_path / "scans" / name).write_bytes(b"x")
    (tmp_path / "scans" / "p2_dicom").mkdir()
    return tmp_path


def _csv(folder: Path, text: str, name="cohort.csv") -> Path:
    path = folder / name
    path.write_text(text)
    return path


GOOD = """image,patient,acquisition,mask,truth,time,event,site
scans/p1_soft.nrrd,007,soft,scans/p1_mask.nrrd,scans/p1_truth.nrrd,12.5,1,A
scans/p1_sharp.nrrd,007,sharp,,scans/p1_truth.nrrd,12.5,1,A
{absolute},p2,soft,,,3,0,B
"""


def test_reads_and_resolves_paths(study):
    absolute = study / "scans" / "p2_dicom"
    table = read_cohort(_csv(study, GOOD.format(absolute=absolute)))
    assert list(table.columns) == ["image", "patient", "acquisition", "mask", "truth", "time", "event", "site"]
    assert table["image"].tolist() == [str(study / "scans" / "p1_soft.nrrd"), str(study / "scans" / "p1_sharp.nrrd"),
                                       str(absolute)]
    assert table["mask"].iloc[0] == str(study / "scans" / "p1_mask.nrrd")
    assert table["mask"].iloc[1:].isna().all() and table["truth"].iloc[2] is None
    assert table["patient"].tolist() == ["007", "007", "p2"], "identifiers stay text"
    assert np.issubdtype(table["time"].dtype, np.number) and table["event"].tolist() == [1, 1, 0]
    assert table["site"].tolist() == ["A", "A", "B"], "other columns are kept"


def test_paths_relative_to_csv_not_to_working_directory(study, monkeypatch):
    sub = study / "tables"
    sub.mkdir()
    path = _csv(sub, "image,patient,acquisition\n../scans/p1_soft.nrrd,1,soft\n")
    monkeypatch.chdir(study / "scans")
    assert read_cohort(path)["image"].iloc[0] == str(study / "scans" / "p1_soft.nrrd")


def test_missing_csv(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_cohort(tmp_path / "nope.csv")


def test_empty_table(study):
    with pytest.raises(InputError, match="no rows"):
        read_cohort(_csv(study, "image,patient,acquisition\n"))


def test_missing_required_column(study):
    with pytest.raises(InputError, match=r"lacks the column\(s\) acquisition \(found: image, patient, kernel\)"):
        read_cohort(_csv(study, "image,patient,kernel\nscans/p1_soft.nrrd,1,B30f\n"))


def test_semicolon_separated_file_gets_a_hint(study):
    with pytest.raises(InputError, match="seems to use ';' between columns"):
        read_cohort(_csv(study, "image;patient;acquisition\nscans/p1_soft.nrrd;1;soft\n"))


def test_spreadsheet_byte_order_mark(study):
    path = study / "excel.csv"
    path.write_bytes("image,patient,acquisition\nscans/p1_soft.nrrd,1,soft\n".encode("utf-8-sig"))
    assert list(read_cohort(path).columns) == ["image", "patient", "acquisition"]


def test_empty_required_cell(study):
    with pytest.raises(InputError, match=r"'patient' is empty in row\(s\) 3"):
        read_cohort(_csv(study, "image,patient,acquisition\nscans/p1_soft.nrrd,1,soft\nscans/p1_sharp.nrrd,,sharp\n"))


def test_missing_files_are_listed(study):
    rows = "".join(f"scans/gone{i}.nrrd,{i},soft\n" for i in range(7))
    with pytest.raises(InputError, match=r"names 7 file\(s\) that do not exist: image .*gone0\.nrrd.* and 2 more"):
        read_cohort(_csv(study, "image,patient,acquisition\n" + rows))


def test_missing_mask_file(study):
    with pytest.raises(InputError, match=r"mask .*no_mask\.nrrd"):
        read_cohort(_csv(study, "image,patient,acquisition,mask\nscans/p1_soft.nrrd,1,soft,scans/no_mask.nrrd\n"))


def test_duplicate_scans(study):
    text = "image,patient,acquisition\nscans/p1_soft.nrrd,1,soft\nscans/p1_sharp.nrrd,1,soft\n"
    with pytest.raises(InputError, match=r"same \(patient, acquisition\) more than once: \(1, soft\) \(rows 2, 3\)"):
        read_cohort(_csv(study, text))


@pytest.mark.parametrize("column, values, message", [
    ("time", ("12", "soon"), r"'time' must be numeric; row\(s\) 3 hold 'soon'"),
    ("event", ("1", "yes"), r"'event' must be numeric; row\(s\) 3 hold 'yes'"),
    ("time", ("12", "-3"), "'time' is negative"),
    ("event", ("1", "2"), "'event' must be 1 .* or 0"),
])
def test_bad_survival_columns(study, column, values, message):
    text = (f"image,patient,acquisition,{column}\nscans/p1_soft.nrrd,1,soft,{values[0]}\n"
            f"scans/p1_sharp.nrrd,1,sharp,{values[1]}\n")
    with pytest.raises(InputError, match=message):
        read_cohort(_csv(study, text))


def test_missing_survival_values_are_allowed(study):
    text = "image,patient,acquisition,time,event\nscans/p1_soft.nrrd,1,soft,,\nscans/p1_sharp.nrrd,1,sharp,4,1\n"
    table = read_cohort(_csv(study, text))
    assert np.isnan(table["time"].iloc[0]) and table["time"].iloc[1] == 4
