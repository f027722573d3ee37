"""``latentharmonize worker``: a resident process that analyzes request after request with the model kept loaded.

A real worker subprocess serves a session of good and bad requests on two small phantom scans; its outputs are
compared byte for byte with ``analyze`` run on its own.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import SimpleITK as sitk

from latentharmonize.analyze_command import analyze
from latentharmonize.errors import BundleError, InputError
from latentharmonize.outputs import output_names
from latentharmonize.progress import parse_progress_line
from latentharmonize.worker import ModelCache, bundle_fingerprint, handle
from latentharmonize.worker_protocol import (Request, WorkerResult, format_request, format_result_line, parse_request,
                                             parse_result_line)


def _worker(*options) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "latentharmonize", "worker", *options], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _answer(process: subprocess.Popen, request: str) -> tuple:
    """Send one request; read up to its result line. Returns (result, progress events, other lines)."""
    process.stdin.write(request)
    process.stdin.flush()
    events, others = [], []
    for line in process.stdout:
        result = parse_result_line(line)
        if result is not None:
            return result, events, others
        event = parse_progress_line(line)
        if event is not None:
            events.append(event)
        else:
            others.append(line)
    raise AssertionError(f"the worker ended without answering: {process.stderr.read()[-2000:]}")


def _contents(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> list:
    """Two different small phantom scans (two patients, two acquisitions)."""
    from latentharmonize.phantom import DEFAULT_ACQUISITIONS, acquire, make_patient

    folder = tmp_path_factory.mktemp("scans")
    paths = []
    for patient, name in ((0, "first"), (1, "second")):
        image = acquire(make_patient(patient, seed=0), DEFAULT_ACQUISITIONS[patient])
        sitk.WriteImage(image, str(folder / f"{name}.nrrd"), True)
        paths.append(folder / f"{name}.nrrd")
    return paths


@pytest.fixture(scope="module")
def session(tmp_path_factory, scans):
    """One worker process serving: scan 1 (with report), a missing CT, scan 1 again into its existing folder
    without overwrite, a line that is not JSON, then scan 2 (no report); then its input ends."""
    out = tmp_path_factory.mktemp("worker")
    requests = [("first", format_request(scans[0], out / "first", device="cpu", request_id=1)),
                ("missing", format_request(out / "no-such-scan.nrrd", out / "missing", device="cpu", request_id=2)),
                ("existing", format_request(scans[0], out / "first", device="cpu", request_id=3)),
                ("garbled", "{this is not json\n"),
                ("second", format_request(scans[1], out / "second", device="cpu", report=False, request_id="4"))]
    process = _worker()
    answers, snapshots = {}, {}
    for name, request in requests:
        if name == "existing":
            snapshots["first"] = _contents(out / "first")
        answers[name] = _answer(process, request)
    process.stdin.close()
    returncode = process.wait(timeout=60)
    return {"out": out, "answers": answers, "snapshots": snapshots, "returncode": returncode,
            "stderr": process.stderr.read()}


@pytest.fixture(scope="module")
def one_shot(tmp_path_factory, scans) -> dict:
    """The same two analyses, each by analyze on its own (what `latentharmonize analyze` runs)."""
    out = tmp_path_factory.mktemp("one_shot")
    analyze(scans[0], out / "first", device="cpu")
    analyze(scans[1], out / "second", device="cpu", write_report=False)
    return {"first": _contents(out / "first"), "second": _contents(out / "second")}


def test_two_scans_in_one_worker_give_the_one_shot_outputs(session, one_shot):
    for name, report in (("first", True), ("second", False)):
        result, events, _ = session["answers"][name]
        assert result.ok and result.out == str(session["out"] / name) and result.exit_code == 0
        served = _contents(session["out"] / name)
        assert set(served) == set(output_names(name, write_report=report).values())
        assert {k: v for k, v in served.items() if k != "analysis.json"} == \
               {k: v for k, v in one_shot[name].items() if k != "analysis.json"}  # analysis.json holds timings
        percents = [e.percent for e in events]
        assert percents == sorted(percents) and percents[-1] == 100 and events[-1].stage == "done"
    assert session["answers"]["first"][0].id == 1 and session["answers"]["second"][0].id == "4"


def test_bad_requests_get_error_results_and_leave_nothing(session):
    answers, out = session["answers"], session["out"]
    missing, _, _ = answers["missing"]
    assert not missing.ok and missing.id == 2 and missing.error_type == "InputError" and missing.exit_code == 2
    assert "does not exist" in missing.error
    assert not (out / "missing").exists()
    existing, _, _ = answers["existing"]
    assert not existing.ok and existing.error_type == "OutputError" and "already holds results" in existing.error
    assert '"overwrite": true' in existing.error  # says how to ask for it in the worker's own terms
    assert _contents(out / "first") == session["snapshots"]["first"]  # untouched, no staging folder left
    garbled, _, _ = answers["garbled"]
    assert not garbled.ok and garbled.id is None and "JSON" in garbled.error
    assert answers["second"][0].ok  # served after the failures, by the same process
    assert "Traceback" not in session["stderr"]


def test_end_of_input_ends_the_worker_with_code_0(session):
    assert session["returncode"] == 0, session["stderr"]


def test_idle_worker_exits_on_its_own():
    process = _worker("--idle-timeout", "0.5")  # stdin stays open: only the timeout can end it
    try:
        assert process.wait(timeout=60) == 0
    finally:
        process.kill()
    assert "no request for 0.5 s" in process.stderr.read()
    assert process.stdout.read() == ""


def test_sigterm_interrupts_the_request_reports_it_and_ends_the_worker(scans, tmp_path):
    """Cancel in Slicer: the running request is reported as cancelled, nothing is published, exit code 130."""
    process = _worker()
    process.stdin.write(format_request(scans[0], tmp_path / "out", device="cpu", request_id=7))
    process.stdin.flush()
    for line in process.stdout:
        event = parse_progress_line(line)
        if event is not None and event.stage == "encode":
            break
    os.kill(process.pid, signal.SIGTERM)
    rest = process.stdout.read()
    assert process.wait(timeout=60) == 130
    result = next(r for r in map(parse_result_line, rest.splitlines()) if r is not None)
    assert (result.ok, result.id, result.error_type, result.exit_code) == (False, 7, "Cancelled", 130)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------- protocol

def test_request_round_trip_and_defaults(tmp_path):
    line = format_request(tmp_path / "ct.nrrd", tmp_path / "out", mask=tmp_path / "mask.nrrd", device="cuda",
                          request_id="a1")
    assert line.endswith("\n") and line.count("\n") == 1 and line.isascii()
    assert parse_request(line) == Request(str(tmp_path / "ct.nrrd"), str(tmp_path / "out"),
                                          mask=str(tmp_path / "mask.nrrd"), device="cuda", id="a1")
    assert parse_request('{"ct": "a.nrrd", "out": "o"}') == Request("a.nrrd", "o", None, None, "auto", False, True)
    assert parse_request(format_request("é/ct.nrrd", "o")).ct == "é/ct.nrrd"  # any path survives the ASCII line


@pytest.mark.parametrize("line, words", [
    ("[1, 2]", "JSON object"),
    ('{"ct": "a.nrrd"}', "no out"),
    ('{"ct": "a.nrrd", "out": "o", "overwite": true}', "Unknown request field(s) overwite"),
    ('{"ct": "a.nrrd", "out": "o", "overwrite": 1}', "'overwrite' must be bool"),
    ('{"ct": "a.nrrd", "out": "o", "mask": 3}', "'mask' must be str or null"),
    ('{"ct": "a.nrrd", "out": "o", "device": "tpu"}', "auto, cpu, cuda"),
])
def test_malformed_requests_are_explained(line, words):
    with pytest.raises(InputError, match=re.escape(words)):
        parse_request(line)


def test_requests_are_checked_before_they_are_sent():
    with pytest.raises(InputError, match="'device' must be one of"):
        format_request("a.nrrd", "o", device="gpu")


def test_result_lines_round_trip_and_other_lines_are_not_results():
    results = [WorkerResult(True, 3, out="/x/out", seconds=2.5),
               WorkerResult(False, None, error="No lung found.", error_type="NoLungFoundError", exit_code=2)]
    for result in results:
        line = format_result_line(result)
        assert "\n" not in line and parse_result_line(line + "\r\n") == result
    for other in ("LH-PROGRESS 40 encode slab batch 2/5", "LH-RESULT not json", 'LH-RESULT {"id": 1}',
                  "some log line", ""):
        assert parse_result_line(other) is None


# ------------------------------------------------------------------------------------------- the model cache

def test_cached_model_is_reloaded_when_the_bundle_changes(tmp_path):
    from latentharmonize.pipeline import load_model
    from latentharmonize.bundle import default_bundle_path, set_cluster_names

    bundle = shutil.copytree(default_bundle_path(), tmp_path / "bundle")
    loads = []
    cache = ModelCache(lambda model, device: loads.append(model) or load_model(model, device))
    first = cache(bundle, "cpu")
    assert cache(str(bundle), "cpu") is first and cache(bundle / "manifest.json", "cpu") is first
    assert len(loads) == 1

    set_cluster_names(bundle, names={1: "renamed cluster"})
    renamed = cache(bundle, "cpu")
    assert len(loads) == 2 and renamed is not first and renamed[0].names[1] == "renamed cluster"

    weights = bundle / "arrays.safetensors"  # edited behind the manifest's back: refused, as a fresh load would be
    weights.write_bytes(weights.read_bytes() + b"\0")
    with pytest.raises(BundleError, match="checksum"):
        cache(bundle, "cpu")
    with pytest.raises(BundleError, match="No model bundle folder"):
        cache(tmp_path / "nowhere", "cpu")


def test_cache_key_follows_folder_contents_and_device(tmp_path):
    import torch

    from latentharmonize.bundle import default_bundle_path

    bundle = shutil.copytree(default_bundle_path(), tmp_path / "a")
    copy = shutil.copytree(default_bundle_path(), tmp_path / "b")
    assert bundle_fingerprint(bundle)[1] == bundle_fingerprint(copy)[1]  # same content...
    assert bundle_fingerprint(bundle) != bundle_fingerprint(copy)  # ...but another folder
    assert bundle_fingerprint(None) == bundle_fingerprint(default_bundle_path())
    assert bundle_fingerprint(tmp_path / "nowhere") is None

    loads = []
    cache = ModelCache(lambda model, device: loads.append(device) or object())
    cache(bundle, "cpu")
    cache(bundle, "auto")  # 'auto' is the CPU here, or a GPU: reloaded only if it resolves to another device
    assert loads == (["cpu", "auto"] if torch.cuda.is_available() else ["cpu"])


def test_warm_up_loads_the_model_once_for_the_first_request():
    from latentharmonize.pipeline import load_model
    from latentharmonize.worker import warm_up

    loads = []
    cache = ModelCache(lambda model, device: loads.append(model) or load_model(model, device))
    warm_up(cache, None, "cpu")
    assert len(loads) == 1
    bundle, device, encoder = cache(None, "cpu")  # what the first request asks for: no second load
    assert len(loads) == 1 and str(device) == "cpu" and not encoder.training


def test_failed_warm_up_is_logged_and_the_request_reports_the_error(capsys, tmp_path):
    from latentharmonize.worker import warm_up

    cache = ModelCache()
    warm_up(cache, tmp_path / "nowhere", "cpu")
    assert "preloading failed (BundleError" in capsys.readouterr().err
    with pytest.raises(BundleError, match="No model bundle folder"):
        cache(tmp_path / "nowhere", "cpu")


def test_preloading_worker_answers_its_first_request_like_analyze(scans, one_shot, tmp_path):
    process = _worker("--preload", "--preload-device", "cpu")
    result, _, _ = _answer(process, format_request(scans[1], tmp_path / "second", device="cpu", report=False))
    process.stdin.close()
    assert process.wait(timeout=60) == 0
    assert result.ok
    served = _contents(tmp_path / "second")
    assert {k: v for k, v in served.items() if k != "analysis.json"} == \
           {k: v for k, v in one_shot["second"].items() if k != "analysis.json"}
    assert "preloading failed" not in process.stderr.read()


# ----------------------------------------------------------------------------- hostile requests (issue 21)
def _no_model(model, device):
    raise AssertionError("a refused request must not load a model")


@pytest.mark.parametrize("line, words", [
    ('{"ct": "' + "a" * 30_000_000 + '", "out": "o"}', "at most 65536 characters"),
    ("[" * 30_000 + "]" * 30_000, "nested too deeply"),
    ('{"ct": "a.nrrd", "out": "o", "mask": [' + "1," * 30_000 + '1]}', "'mask' must be str or null"),
    ('{"' + "x" * 60_000 + '": 1, "ct": "a.nrrd", "out": "o"}', "Unknown request field(s)"),
])
def test_hostile_requests_get_short_error_results(line, words):
    result = handle(line + "\n", _no_model)
    assert not result.ok and result.error_type == "InputError" and result.exit_code == 2
    assert words in result.error and len(format_result_line(result)) < 1000


def test_a_path_too_long_is_an_error_result_not_a_traceback(tmp_path, capsys):
    result = handle(format_request(tmp_path / "ct.nrrd", tmp_path / ("d" * 300) / "out"), _no_model)
    assert not result.ok and result.exit_code == 2 and "too long" in result.error
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator only")
def test_the_worker_reuses_the_pages_of_freed_arrays_instead_of_faulting_in_fresh_ones():
    # in a child process: the setting is process-wide and stays until exit
    probe = textwrap.dedent("""
        import resource, sys
        import SimpleITK as sitk
        from latentharmonize.worker import keep_touched_memory
        if sys.argv[1] == "keep" and not keep_touched_memory():
            print("unsupported"); sys.exit()
        def faults_of_one_image():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            image = sitk.Image(1024, 1024, 200, sitk.sitkUInt8)  # 200 MB, zero-filled, above the 32 MB mmap limit
            del image
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        faults_of_one_image()
        print(faults_of_one_image())
    """)
    counts = {}
    for mode in ("keep", "default"):
        out = subprocess.run([sys.executable, "-c", probe, mode], capture_output=True, text=True,
                             check=True).stdout.strip()
        if out == "unsupported":
            pytest.skip("not glibc")
        counts[mode] = int(out)
    pages = 200 * 2 ** 20 // 4096
    assert counts["default"] > pages // 2  # every fresh mapping is zero-filled page by page again
    assert counts["keep"] < pages // 20   # the second array lands on the first one's pages
