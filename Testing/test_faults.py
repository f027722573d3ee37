"""Fault injection (issue 21): bad files, signals at several moments, a full disk, tampered bundles, hostile paths.

Each test checks the promise, not the code path: a refusal is exit 2 with a message saying what to do and no
traceback, and the output folder holds exactly what it held before, or exactly the complete new result set. The
catalogue of cases, with the test of each, is docs/reliability.md.
"""
from __future__ import annotations

import builtins
import errno
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from latentharmonize import atomic
from latentharmonize.analyze_command import analyze, output_names
from latentharmonize.atomic import STAGING_PREFIX
from latentharmonize.bundle import ARRAYS_FILE, MANIFEST
from latentharmonize.cli import main as cli_main
from latentharmonize.errors import InputError, OutputError

from test_analyze import _write, bundle_dir, scan, synthetic_chest  # noqa: F401  (fixtures reused)


def _snapshot(folder: Path) -> dict:
    """Every file under ``folder`` (hidden ones included) with its SHA-256: what "exactly as before" compares."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def results(tmp_path_factory, scan, bundle_dir) -> dict:  # noqa: F811
    """Two result sets of the same scan without the report (fast), from two different bundles: "old" (a re-labelled
    copy of the default bundle, so every file differs) and "new" (the default bundle)."""
    from latentharmonize.bundle import set_cluster_names

    root = tmp_path_factory.mktemp("results")
    relabelled = root / "relabelled-model"
    shutil.copytree(bundle_dir, relabelled)
    set_cluster_names(relabelled, names={1: "old name"})
    analyze(scan, root / "old", model=relabelled, device="cpu", write_report=False)
    analyze(scan, root / "new", model=bundle_dir, device="cpu", write_report=False)
    old, new = _snapshot(root / "old"), _snapshot(root / "new")
    changing = {k for k in new if k != "analysis.json" and new[k] != old[k]}
    assert changing, "the two result sets must differ, or a mix could not be seen"
    return {"root": root, "old": old, "new": new}


def _folder_with_old_results(results, tmp_path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(results["root"] / "old", out)
    (out / "notes.txt").write_text("the user's own file")
    return out


def _is_old_or_new(folder: Path, results) -> str:
    """'old' or 'new' when the folder holds exactly that set (plus the user's notes), else fail with the mix."""
    now = _snapshot(folder)
    assert now.pop("notes.txt", None) == hashlib.sha256(b"the user's own file").hexdigest()
    assert not any(STAGING_PREFIX in k for k in now), f"staging leftovers: {sorted(now)}"
    # analysis.json holds timings: compare its presence only
    if all(now.get(k) == v for k, v in results["old"].items()) and set(now) == set(results["old"]):
        return "old"
    same = {k for k, v in results["new"].items() if k == "analysis.json" or now.get(k) == v}
    assert set(now) == set(results["new"]) and same == set(results["new"]), f"a mix of old and new: {now}"
    return "new"


# ----------------------------------------------------------------------------- bad files


def _truncated(scan_image: sitk.Image, folder: Path, suffix: str, fraction: float) -> Path:
    whole = _write(scan_image, folder / f"whole{suffix}")
    data = whole.read_bytes()
    cut = folder / f"cut{suffix}"
    cut.write_bytes(data[: int(len(data) * fraction)])
    return cut


@pytest.mark.parametrize("suffix, fraction", [(".nii.gz", 0.5), (".nii.gz", 0.9), (".nii.gz", 0.999), (".nii", 0.5),
                                              (".nii", 0.9), (".nrrd", 0.9), (".mha", 0.9)])
def test_truncated_volume_is_refused(tmp_path, bundle_dir, suffix, fraction):  # noqa: F811
    cut = _truncated(synthetic_chest(), tmp_path, suffix, fraction)
    out = tmp_path / "out"
    with pytest.raises(InputError, match="truncated|corrupt|could not be read"):
        analyze(cut, out, model=bundle_dir, device="cpu", write_report=False)
    assert not out.exists()


def _run_briefly(target, *args, limit_s: float = 60.0):
    """Run ``target`` in a thread; fail if it has not ended within ``limit_s`` (a FIFO read would hang forever)."""
    outcome = {}

    def call():
        try:
            outcome["value"] = target(*args)
        except BaseException as exc:  # noqa: BLE001  (handed back to the test)
            outcome["error"] = exc

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(limit_s)
    assert not thread.is_alive(), f"{target.__name__} hung"
    return outcome


@pytest.mark.parametrize("role", ["ct", "mask"])
def test_fifo_input_is_refused_without_hanging(tmp_path, bundle_dir, role):  # noqa: F811
    fifo = tmp_path / "stream.nrrd"
    os.mkfifo(fifo)
    ct = fifo if role == "ct" else _write(synthetic_chest(), tmp_path / "chest.nrrd")
    mask = fifo if role == "mask" else None
    outcome = _run_briefly(cli_main, ["analyze", str(ct), "--out", str(tmp_path / "out"), "--model", str(bundle_dir),
                                      "--device", "cpu", "--no-report", *(["--mask", str(mask)] if mask else [])])
    assert outcome.get("value") == 2 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("container", ["dicom folder", "mhd"])
def test_a_fifo_inside_a_multi_file_input_is_refused_without_hanging(tmp_path, container):
    from latentharmonize.io import read_ct

    if container == "dicom folder":
        ct = tmp_path / "series"
        ct.mkdir()
        os.mkfifo(ct / "IM0001")
    else:
        os.mkfifo(tmp_path / "chest.raw")
        ct = tmp_path / "chest.mhd"
        ct.write_text("ObjectType = Image\nNDims = 3\nDimSize = 8 8 8\nElementType = MET_SHORT\n"
                      "ElementDataFile = chest.raw\n")
    outcome = _run_briefly(read_ct, ct, limit_s=30)
    assert isinstance(outcome.get("error"), InputError) and "named pipe" in str(outcome["error"])


@pytest.mark.parametrize("special", ["/dev/null", "/dev/zero"])
def test_device_file_is_refused(tmp_path, bundle_dir, special):  # noqa: F811
    if not os.path.exists(special):
        pytest.skip(f"no {special} here")
    outcome = _run_briefly(analyze, special, tmp_path / "out", bundle_dir, None, "cpu")
    assert isinstance(outcome.get("error"), InputError) and "not a file" in str(outcome["error"])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("size, spacing, words", [((200, 200, 120), (0.05, 0.05, 0.05), "not in millimetres"),
                                                  ((200, 200, 6), (1.8, 1.8, 2.5), "from head to feet")])
def test_headers_not_in_mm_or_too_short_are_refused(size, spacing, words):
    from latentharmonize.pipeline import check_geometry

    image = sitk.Image(list(size), sitk.sitkUInt8)
    image.SetSpacing(spacing)
    with pytest.raises(InputError, match=words):
        check_geometry(image)


# ----------------------------------------------------------------------------- outputs that are inputs


@pytest.mark.parametrize("input_name, role", [("chest.seg.nrrd", "ct"), ("chest_lungs.nrrd", "mask")])
def test_an_output_is_never_the_input(tmp_path, scan, bundle_dir, input_name, role):  # noqa: F811
    """`DIR/chest.seg.nrrd --out DIR --overwrite` would have replaced the input by the segmentation."""
    target = tmp_path / input_name
    if role == "ct":
        shutil.copy(scan, target)
        ct, mask = target, None
    else:
        ct, mask = scan, target
        lungs = sitk.ReadImage(str(scan)) < -500
        _write(sitk.Cast(lungs, sitk.sitkUInt8), target)
    before = _snapshot(tmp_path)
    with pytest.raises(OutputError, match="would replace the input"):
        analyze(ct, tmp_path, model=bundle_dir, mask=mask, device="cpu", overwrite=True, write_report=False)
    assert _snapshot(tmp_path) == before


def test_output_inside_an_input_folder_is_refused(tmp_path):
    folder = tmp_path / "dicom"
    folder.mkdir()
    with pytest.raises(OutputError, match="inside the input folder"):
        atomic.StagedOutput(folder / "results", ["a.csv"], inputs=[folder])


# ----------------------------------------------------------------------------- a full disk


def _disk_full_for(monkeypatch, hit):
    """Python's opens for writing of the files for which ``hit(path)`` is true fail as on a full file system."""
    real_open = builtins.open

    def full_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and hit(str(file)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", full_open)
    monkeypatch.setattr(io, "open", full_open)


@pytest.mark.parametrize("overwrite", [False, True])
def test_full_disk_during_writing(results, scan, bundle_dir, tmp_path, monkeypatch, capsys, overwrite):  # noqa: F811
    out = _folder_with_old_results(results, tmp_path) if overwrite else tmp_path / "out"
    before = _snapshot(out)
    _disk_full_for(monkeypatch, lambda path: STAGING_PREFIX in path)
    code = cli_main(["analyze", str(scan), "--out", str(out), "--model", str(bundle_dir), "--device", "cpu",
                     "--no-report", *(["--overwrite"] if overwrite else [])])
    err = capsys.readouterr().err
    assert code == 2 and "disk is full" in err and "Traceback" not in err
    assert _snapshot(out) == before and not any(STAGING_PREFIX in p.name for p in tmp_path.rglob("*"))


def test_full_disk_while_writing_the_surfaces(scan, bundle_dir, tmp_path, monkeypatch, capsys):  # noqa: F811
    """VTK's own writer crashed the process (SIGSEGV, "free(): invalid pointer") when the disk filled while it wrote
    clusters.vtp, and left the cut file behind: now a clean refusal, and nothing is left."""
    _disk_full_for(monkeypatch, lambda path: path.endswith("clusters.vtp"))
    out = tmp_path / "out"
    code = cli_main(["analyze", str(scan), "--out", str(out), "--model", str(bundle_dir), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "disk is full" in err and "Traceback" not in err
    assert not out.exists()


def test_a_later_run_removes_what_a_crashed_run_left(results, scan, bundle_dir, tmp_path):  # noqa: F811
    """A killed run's staging folder (here: a cut clusters.vtp, no journal) is removed by the next run."""
    out = tmp_path / "out"
    stale = out / f"{STAGING_PREFIX}crashed"
    (stale / "files").mkdir(parents=True)
    (stale / "files" / "clusters.vtp").write_bytes(b"<VTKFile cut")
    (stale / "lock").write_bytes(b"")  # its owner is dead: nobody holds the lock
    analyze(scan, out, model=bundle_dir, device="cpu", write_report=False)
    assert not stale.exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(output_names("chest", write_report=False).values())


# ----------------------------------------------------------------------------- signals while publishing

# Runs the CLI with every os.replace slowed down and announced on stderr, so a signal can land mid-publication.
# A suite started as a background job (`cmd &`) passes Ctrl-C on ignored, and Python keeps ignoring it; the script
# restores Python's own Ctrl-C handler, as under a terminal, so the test is about how analyze handles it.
_SLOW_PUBLISH = """
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)
from latentharmonize import atomic
real = os.replace
def slow(src, dst):
    print("LH-FAULT replace", flush=True, file=sys.stderr)
    time.sleep(0.15)
    real(src, dst)
atomic.os.replace = slow
from latentharmonize.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_signal_during_publishing_leaves_old_or_new_never_a_mix(results, scan, bundle_dir, tmp_path,  # noqa: F811
                                                                signum):
    out = _folder_with_old_results(results, tmp_path)
    command = [sys.executable, "-c", _SLOW_PUBLISH, "analyze", str(scan), "--out", str(out), "--model",
               str(bundle_dir), "--device", "cpu", "--no-report", "--overwrite", "--quiet"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    moves = 0
    for line in process.stderr:
        moves += line.startswith("LH-FAULT replace")
        if moves == 3:  # the journal and two result files are in place, five are not
            process.send_signal(signum)
            break
    _, err = process.communicate(timeout=120)
    assert moves == 3, err
    if signum == signal.SIGKILL:
        # Killed outright, the run could not finish; the next run on the folder does, before anything else.
        from latentharmonize.atomic import recover_leftovers

        assert any(p.name.startswith(STAGING_PREFIX) for p in out.iterdir())
        recover_leftovers(out)
    else:
        assert process.returncode == 130 and "Traceback" not in err
    assert _is_old_or_new(out, results) == "new"


def test_interruption_before_the_commit_keeps_the_old_results(results, scan, bundle_dir, tmp_path):  # noqa: F811
    out = _folder_with_old_results(results, tmp_path)

    def interrupt(percent, stage, message=""):
        if stage == "write" and percent >= 90:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        analyze(scan, out, model=bundle_dir, device="cpu", overwrite=True, write_report=False, progress=interrupt)
    assert _is_old_or_new(out, results) == "old"


def test_overwriting_a_report_run_without_report_leaves_no_old_report(scan, bundle_dir, tmp_path):  # noqa: F811
    """The QC pictures and report.html of an earlier run would describe other results than the new maps."""
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    for name in output_names("chest", write_report=True).values():
        (out / name).write_text("from an earlier run")
    analyze(scan, out, model=bundle_dir, device="cpu", overwrite=True, write_report=False)
    assert sorted(p.name for p in out.iterdir()) == sorted([*output_names("chest", write_report=False).values(),
                                                           "sub"])


# ----------------------------------------------------------------------------- bundles


def _bundle_copy(bundle_dir, tmp_path) -> Path:  # noqa: F811
    copy = tmp_path / "model"
    shutil.copytree(bundle_dir, copy)
    return copy


def _hand_edit(model: Path) -> None:
    m = json.loads((model / MANIFEST).read_text())
    m["patch_spec"]["hu_window"] = [-1000.0, 200.0]
    (model / MANIFEST).write_text(json.dumps(m))


def _nan_cluster_means(model: Path) -> None:
    from safetensors.numpy import load, save

    from latentharmonize.bundle import _sealed_manifest_bytes

    arrays = load((model / ARRAYS_FILE).read_bytes())
    for key in [k for k in arrays if k.startswith("clusters.") and k.endswith(".means")]:  # every stage's
        arrays[key][:] = np.nan
    data = save(arrays)
    (model / ARRAYS_FILE).write_bytes(data)
    m = json.loads((model / MANIFEST).read_text())
    m["files"][ARRAYS_FILE] = hashlib.sha256(data).hexdigest()
    (model / MANIFEST).write_bytes(_sealed_manifest_bytes(m))  # checksums all match: only the numbers are wrong


def _path_entry(model: Path) -> None:
    from latentharmonize.bundle import _sealed_manifest_bytes

    m = json.loads((model / MANIFEST).read_text())
    m["files"]["../../etc/shadow"] = "0" * 64
    (model / MANIFEST).write_bytes(_sealed_manifest_bytes(m))


def _nan_margin(model: Path) -> None:
    text = (model / MANIFEST).read_text().replace('"margin_mm": 12.5', '"margin_mm": NaN')
    (model / MANIFEST).write_text(text)


@pytest.mark.parametrize("damage, words", [(_hand_edit, "does not match its checksum"), (_nan_cluster_means, "NaN"),
                                           (_path_entry, "path-like file entries"), (_nan_margin, "not valid JSON")])
def test_tampered_bundle_is_refused_before_any_output(scan, bundle_dir, tmp_path, capsys, damage, words):  # noqa: F811
    model = _bundle_copy(bundle_dir, tmp_path)
    damage(model)
    code = cli_main(["analyze", str(scan), "--out", str(tmp_path / "out"), "--model", str(model), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and words in err and "Traceback" not in err and "lung" not in err.lower()
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- messages


def test_a_path_too_long_is_a_clear_refusal(scan, bundle_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / ("x" * 300)
    assert cli_main(["analyze", str(scan), "--out", str(out), "--model", str(bundle_dir)]) == 2
    err = capsys.readouterr().err
    assert "too long" in err and "Traceback" not in err


def test_a_bug_says_where_to_report_it(monkeypatch, tmp_path, capsys):
    from latentharmonize import survival

    def broken(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(survival, "run", broken)
    assert cli_main(["survival", str(tmp_path / "c.csv"), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "report it to the LatentHarmonize developers" in err
