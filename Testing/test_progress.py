"""The progress line protocol that the Slicer module parses."""
from __future__ import annotations

import io

import pytest

from latentharmonize.progress import Progress, format_progress_line, parse_progress_line


def test_round_trip():
    line = format_progress_line(42.4, "encode", "Encoding  patches\n(slab 3/9)")
    event = parse_progress_line(line)
    assert (event.percent, event.stage, event.message) == (42, "encode", "Encoding patches (slab 3/9)")


@pytest.mark.parametrize("line", ["", "Loading model", "LH-PROGRESS abc load x", "LH-PROGRESS 250 load x", "xLH-PROGRESS 5 load"])
def test_other_lines_are_not_progress(line):
    assert parse_progress_line(line) is None


def test_percent_is_clamped_and_stage_must_be_one_word():
    assert parse_progress_line(format_progress_line(130, "done")).percent == 100
    assert parse_progress_line(format_progress_line(-5, "load")).percent == 0
    with pytest.raises(ValueError):
        format_progress_line(10, "two words")


def test_machine_and_human_modes():
    machine, human = io.StringIO(), io.StringIO()
    seen = []
    Progress(machine=True, stream=machine, callback=seen.append)(50, "mask", "Lung mask")
    Progress(stream=human)(50, "mask", "Lung mask")
    assert parse_progress_line(machine.getvalue()).stage == "mask"
    assert parse_progress_line(human.getvalue()) is None and "Lung mask" in human.getvalue()
    assert seen[0].percent == 50
