"""The Slicer module's exchange with the backend, tested without Slicer on a small phantom-like chest CT.

Analyze outputs are written with the backend's own writers (writers.py, composition.py), in the documented format.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from latentharmonize import analyze_command, bundle as bundle_module, slicer_bridge as bridge, worker_protocol, writers
from latentharmonize.slicer_bridge import tables
from latentharmonize.composition import composition_table, composition_to_json
from latentharmonize.errors import InputError, OutputError
from latentharmonize.progress import Progress

MODULE_DIR = Path(bridge.__file__).resolve().parents[2]
NAMES = {1: "normal", 2: "emphysema", 3: "ground_glass"}
COLORS = {1: (0.0, 0.45, 0.7), 2: (0.9, 0.62, 0.0), 3: (0.0, 0.62, 0.45)}
DENSITOMETRY = [{"region": region, "laa950_pct": laa, "haa700_250_pct": haa, "mld_hu": mld, "perc15_hu": p15,
                 "laa950_matched_pct": laa_m, "perc15_matched_hu": p15_m, "volume_ml": ml}
                for region, laa, haa, mld, p15, laa_m, p15_m, ml in
                [("whole", 12.5, 8.0, -851.0, -940.0, 9.5, -931.0, 5.2),
                 ("right", 20.0, 1.0, -870.0, -955.0, 16.0, -948.0, 2.6),
                 ("left", 5.0, 15.0, -832.0, -905.0, 3.0, -899.0, 2.6)]]
WARNINGS = [{"code": "thin_slices", "message": "Slices thinner than the model was trained on."}]
# oblique-free but flipped, anisotropic geometry, as Slicer gives for a typical axial CT (IJK -> RAS)
IJK_TO_RAS = np.array([[-0.8, 0.0, 0.0, 120.0],
                       [0.0, -0.9, 0.0, 95.0],
                       [0.0, 0.0, 2.5, -210.0],
                       [0.0, 0.0, 0.0, 1.0]])


def _phantom(shape=(10, 24, 32), seed=0):
    """Chest-like CT [k, j, i]: air outside, soft-tissue body, two lungs (-850 HU) with emphysema and ground glass."""
    rng = np.random.default_rng(seed)
    k, j, i = np.indices(shape)
    body = ((i - 15.5) / 15) ** 2 + ((j - 11.5) / 11) ** 2 < 1
    right = ((i - 9) / 5.5) ** 2 + ((j - 11.5) / 8) ** 2 < 1
    left = ((i - 22) / 5.5) ** 2 + ((j - 11.5) / 8) ** 2 < 1
    ct = np.where(body, 40, -1000).astype(np.float64)
    ct[right | left] = -850
    emphysema = right & (k < 4)
    ground_glass = left & (j > 13)
    ct[emphysema] = -960
    ct[ground_glass] = -550
    ct = np.round(ct + rng.normal(0, 15, shape)).astype(np.int16)
    lungs = np.zeros(shape, np.uint8)
    lungs[right] = 1
    lungs[left] = 2
    labels = np.where(lungs > 0, 1, 0).astype(np.uint8)
    labels[emphysema] = 2
    labels[ground_glass] = 3
    return ct, lungs, labels


@pytest.fixture()
def outputs(tmp_path):
    """An analyze output folder for input 'chest', written with the backend's writers."""
    ct, lungs, labels = _phantom()
    ct_path = bridge.write_input_volume(ct, IJK_TO_RAS, tmp_path / "input" / "chest.nrrd")
    ct_image = sitk.ReadImage(str(ct_path))

    def like_ct(array, pixel):
        image = sitk.GetImageFromArray(array.astype(pixel))
        image.CopyInformation(ct_image)
        return image

    out = tmp_path / "out"
    out.mkdir()
    label_image, lung_image = like_ct(labels, np.uint8), like_ct(lungs, np.uint8)
    writers.write_segmentation(label_image, out / "chest.seg.nrrd", NAMES, COLORS)
    writers.write_volume(label_image, out / "chest_clusters.nrrd")
    writers.write_volume(like_ct(np.where(lungs > 0, 0.8, 0.0), np.float32), out / "chest_confidence.nrrd")
    writers.write_volume(lung_image, out / "chest_lungs.nrrd")
    table = composition_table(label_image, ct_image, lung_image, NAMES)
    writers.write_composition(table, out / "composition.csv", out / "composition.json",
                              composition_to_json(table, NAMES, COLORS, model_id="abc123"))
    # the densitometry rows and warnings of the backend's interface (composition.json "densitometry", analysis.json
    # "warnings"), added here in that format where this backend version does not write them yet
    doc = json.loads((out / "composition.json").read_text())
    doc.setdefault("densitometry", DENSITOMETRY)
    (out / "composition.json").write_text(json.dumps(doc))
    (out / "analysis.json").write_text(json.dumps({"input": str(ct_path), "warnings": WARNINGS}))
    return {"ct": ct, "lungs": lungs, "labels": labels, "ct_path": ct_path, "out": out, "table": table,
            "densitometry": doc["densitometry"]}


# ------------------------------------------------------------------------------------------- command and process

def test_worker_command_and_request_are_what_the_worker_reads(tmp_path):
    from latentharmonize import worker

    command = bridge.build_worker_command("/opt/Slicer/bin/PythonSlicer", idle_timeout_s=90)
    assert command[:4] == ["/opt/Slicer/bin/PythonSlicer", "-m", "latentharmonize", "worker"]
    parser = __import__("argparse").ArgumentParser()
    worker.add_arguments(parser)
    assert parser.parse_args(command[4:]).idle_timeout == 90
    assert parser.parse_args(bridge.build_worker_command("py")[4:]).idle_timeout == bridge.WORKER_IDLE_TIMEOUT_S

    line = bridge.worker_request(tmp_path / "chest.nrrd", tmp_path / "out", mask_path=tmp_path / "mask.nrrd",
                                 model_dir=tmp_path / "bundle", device="GPU", request_id=4)
    assert line.endswith("\n") and line.count("\n") == 1
    assert worker_protocol.parse_request(line) == worker_protocol.Request(
        str(tmp_path / "chest.nrrd"), str(tmp_path / "out"), mask=str(tmp_path / "mask.nrrd"),
        model=str(tmp_path / "bundle"), device="cuda", overwrite=False, report=False, id=4)
    minimal = worker_protocol.parse_request(bridge.worker_request("a.nrrd", "o", mask_path="", model_dir=None, device="CPU"))
    assert minimal.mask is None and minimal.model is None and minimal.device == "cpu"


def test_device_choices_and_missing_python():
    assert [bridge.device_argument(c) for c in ("auto", "CPU", "GPU", "cuda")] == ["auto", "cpu", "cuda", "cuda"]
    with pytest.raises(InputError, match="Unknown device"):
        bridge.device_argument("TPU")
    with pytest.raises(InputError, match="PythonSlicer was not found"):
        bridge.build_worker_command(None)


def test_worker_is_reused_only_when_it_can_take_the_request(tmp_path):
    package = tmp_path / "latentharmonize"
    package.mkdir()
    (package / "analyze.py").write_text("A = 1\n")
    launch = bridge.worker_launch(["py", "-m", "latentharmonize", "worker"], {"PYTHONPATH": "/m"}, tmp_path)
    assert bridge.worker_launch(["py", "-m", "latentharmonize", "worker"], {"PYTHONPATH": "/m"}, tmp_path) == launch
    assert bridge.can_reuse_worker(launch, launch, alive=True, busy=False, idle_s=5.0)
    assert not bridge.can_reuse_worker(None, launch, alive=True, busy=False, idle_s=5.0)
    assert not bridge.can_reuse_worker(launch, launch, alive=False, busy=False, idle_s=5.0)  # ended, or cancelled
    assert not bridge.can_reuse_worker(launch, launch, alive=True, busy=True, idle_s=5.0)
    # idle for nearly its timeout: it may be exiting just as the request arrives
    timeout = bridge.WORKER_IDLE_TIMEOUT_S
    assert bridge.can_reuse_worker(launch, launch, True, False, idle_s=timeout - bridge.WORKER_REUSE_MARGIN_S - 1)
    assert not bridge.can_reuse_worker(launch, launch, True, False, idle_s=timeout - bridge.WORKER_REUSE_MARGIN_S)
    other_python = bridge.worker_launch(["py3", "-m", "latentharmonize", "worker"], {"PYTHONPATH": "/m"}, tmp_path)
    other_path = bridge.worker_launch(["py", "-m", "latentharmonize", "worker"], {"PYTHONPATH": "/n"}, tmp_path)
    (package / "analyze.py").write_text("A = 22\n")  # the backend was edited: the next Analyze runs the new code
    edited = bridge.worker_launch(["py", "-m", "latentharmonize", "worker"], {"PYTHONPATH": "/m"}, tmp_path)
    for wanted in (other_python, other_path, edited):
        assert not bridge.can_reuse_worker(launch, wanted, alive=True, busy=False, idle_s=5.0)


def test_environment_makes_the_module_folder_importable(tmp_path):
    """A Python that ignores site-packages (-S) still imports latentharmonize from the module folder."""
    env = dict(os.environ)
    env.update(bridge.backend_environment(MODULE_DIR, inherited_pythonpath=str(tmp_path)))
    assert env["PYTHONPATH"].split(os.pathsep) == [str(MODULE_DIR), str(tmp_path)]
    out = subprocess.run([sys.executable, "-S", "-c", "import latentharmonize; print(latentharmonize.__file__)"],
                         env=env, cwd=tmp_path, capture_output=True, text=True, check=True)
    assert Path(out.stdout.strip()).parent == MODULE_DIR / "latentharmonize"


def test_importing_the_bridge_stays_light():
    """Slicer imports the bridge for the GUI before the backend's dependencies are installed."""
    code = ("import sys, latentharmonize.slicer_bridge; "
            "print(sorted(m for m in ('pandas', 'torch', 'monai', 'sklearn', 'slicerio', 'scipy', 'matplotlib', "
            "'psutil', 'latentharmonize.composition', 'latentharmonize.bundle') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_bundle_marker_is_the_bundle_manifest():
    assert bridge.BUNDLE_MANIFEST == bundle_module.MANIFEST


def test_names_match_what_analyze_writes(tmp_path):
    name = bridge.safe_volume_name("CT chest (2)/ä")
    assert name == "CT_chest_2" and bridge.safe_volume_name("***") == "volume"
    assert analyze_command.input_name(tmp_path / f"{name}.nrrd") == name
    paths = bridge.AnalysisOutputs(tmp_path, name)
    expected = analyze_command.output_names(name)
    for kind, path in [("segmentation", paths.segmentation), ("labels", paths.clusters), ("confidence", paths.confidence),
                       ("lungs", paths.lungs), ("composition_csv", paths.composition_csv),
                       ("composition_json", paths.composition_json), ("report", paths.report_html)]:
        assert path.name == expected[kind]


def test_progress_lines_and_failure_message():
    import io

    stream = io.StringIO()
    progress = Progress(machine=True, stream=stream)
    progress(12.4, "load", "reading  CT")
    progress(55, "encode", "slab 3/8")
    log = bridge.BackendLog()
    lines = ["Loading bundle"] + stream.getvalue().splitlines() + ["latentharmonize analyze: error: No lung found in a.nrrd."]
    events = [log.feed(line + "\n") for line in lines]
    assert [(e.percent, e.stage, e.message) for e in events if e] == [(12, "load", "reading CT"), (55, "encode", "slab 3/8")]
    assert log.lines == ["Loading bundle", "latentharmonize analyze: error: No lung found in a.nrrd."]
    assert log.failure_message(2) == "No lung found in a.nrrd."

    crashed = bridge.BackendLog(keep=3)
    for line in ["LH-PROGRESS 40 encode x", "a", "b", "c", "Traceback: boom"]:
        crashed.feed(line)
    message = crashed.failure_message(1)
    assert "during 'encode'" in message and "exit code 1" in message
    assert message.endswith("b\nc\nTraceback: boom") and "\na\n" not in message


def test_the_worker_result_line_decides_the_outcome():
    from latentharmonize.worker_protocol import WorkerResult, format_result_line

    done = bridge.BackendLog()
    assert done.feed("LH-PROGRESS 100 done results in /x\n").percent == 100
    assert done.feed(format_result_line(WorkerResult(True, 1, out="/x", seconds=2.0)) + "\n") is None
    assert done.result.ok and done.returncode() == 0 and done.lines == []  # the result line is not log output

    failed = bridge.BackendLog()
    failed.feed("Loading bundle")
    failed.feed(format_result_line(WorkerResult(False, 1, error="No lung found in a.nrrd.", error_type="NoLungFoundError",
                                                exit_code=2)))
    assert failed.returncode() == 2 and failed.failure_message(2) == "No lung found in a.nrrd."

    # the worker ended (crashed, killed) before answering: its exit code, and never success
    died = bridge.BackendLog()
    died.feed("LH-PROGRESS 40 encode slab 2/5")
    assert died.returncode(-9) == -9 and "exit code -9" in died.failure_message(-9)
    assert bridge.BackendLog().returncode(0) != 0


def test_cancel_kills_the_whole_process_tree():
    code = ("import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
            "print(c.pid, flush=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child_pid = int(parent.stdout.readline())
    assert bridge.kill_process_tree(parent.pid) == 2
    assert parent.wait(timeout=10) != 0
    deadline = time.time() + 10
    while _alive(child_pid) and time.time() < deadline:
        time.sleep(0.05)
    assert not _alive(child_pid)
    assert bridge.kill_process_tree(parent.pid) == 0  # already gone: nothing to do


def test_cancel_lets_the_backend_clean_up_before_killing(tmp_path):
    """Cancel sends SIGTERM first: analyze turns it into a KeyboardInterrupt and removes its staging folder."""
    marker = tmp_path / "cleaned"
    code = ("import pathlib, signal, sys, time\n"
            "def stop(*_):\n"
            f"    pathlib.Path({str(marker)!r}).write_text('x'); sys.exit(3)\n"
            "signal.signal(signal.SIGTERM, stop); print('ready', flush=True); time.sleep(60)")
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    assert bridge.kill_process_tree(process.pid) == 1
    assert process.wait(timeout=10) == 3 and marker.read_text() == "x"


def test_cancel_from_the_gui_returns_at_once_and_still_kills(tmp_path):
    """With ``background`` only the SIGTERMs are sent before returning: a backend that ignores them is killed after
    the grace period by a thread, while the caller (Slicer's GUI thread) goes on."""
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    assert bridge.kill_process_tree(process.pid, grace_s=2.0, background=True) == 1
    assert process.poll() is None  # returned before the grace period: the kill is still to come
    assert process.wait(timeout=10) == -9  # SIGTERM ignored, killed after the grace period


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# ------------------------------------------------------------------------------------------- inputs

def test_missing_inputs_explains_each_problem(tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    assert bridge.missing_inputs(False, "") == ["Select an input CT volume.", "Select a model bundle folder."]
    assert "does not exist" in bridge.missing_inputs(True, tmp_path / "nope")[0]
    assert "is not a model bundle (it has no manifest.json)" in bridge.missing_inputs(True, bundle)[0]
    (bundle / bundle_module.MANIFEST).write_text("{}")
    assert bridge.missing_inputs(True, bundle) == []
    assert bridge.missing_inputs(True, bundle, mask_segmentation_set=True, mask_segment_id="") == [
        "Select the lung segment of the mask segmentation, tick 'All segments as regions', or clear the mask."]
    assert bridge.missing_inputs(True, bundle, mask_segmentation_set=True, mask_segment_id="Segment_1") == []


def test_input_volume_round_trip_keeps_voxels_and_geometry(tmp_path):
    ct, _, _ = _phantom()
    path = bridge.write_input_volume(ct, IJK_TO_RAS, tmp_path / "ct.nrrd")
    image = sitk.ReadImage(str(path))
    assert image.GetPixelID() == sitk.sitkInt16
    assert b"encoding: raw" in path.read_bytes()[:1000]  # a scratch copy: no time spent compressing it
    # Slicer's RAS frame is ITK's LPS with x and y negated: voxel (i, j, k) lands on the same physical point
    i, j, k = 5, 7, 3
    ras = IJK_TO_RAS @ [i, j, k, 1]
    np.testing.assert_allclose(image.TransformIndexToPhysicalPoint((i, j, k)), [-ras[0], -ras[1], ras[2]])
    back = bridge.read_volume_array(path)
    np.testing.assert_array_equal(back.array, ct)
    np.testing.assert_allclose(back.ijk_to_ras, IJK_TO_RAS)

    fractional = bridge.write_input_volume(ct + 0.5, IJK_TO_RAS, tmp_path / "f.nrrd")
    assert sitk.ReadImage(str(fractional)).GetPixelID() == sitk.sitkFloat32


def test_input_volume_and_mask_are_validated(tmp_path):
    ct, lungs, _ = _phantom()
    bad = ct.astype(float)
    bad[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        bridge.write_input_volume(bad, IJK_TO_RAS, tmp_path / "bad.nrrd")
    with pytest.raises(InputError, match="3D"):
        bridge.write_input_volume(ct[0], IJK_TO_RAS, tmp_path / "flat.nrrd")
    with pytest.raises(InputError, match="empty"):
        bridge.write_mask(np.zeros_like(lungs), IJK_TO_RAS, tmp_path / "m.nrrd")
    mask = sitk.ReadImage(str(bridge.write_mask(lungs * 7, IJK_TO_RAS, tmp_path / "m.nrrd")))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(mask), (lungs > 0).astype(np.uint8))


def test_mask_written_by_the_bridge_is_accepted_by_the_backend(tmp_path):
    from latentharmonize.io import read_mask

    ct, lungs, _ = _phantom()
    ct_image = sitk.ReadImage(str(bridge.write_input_volume(ct, IJK_TO_RAS, tmp_path / "ct.nrrd")))
    mask = read_mask(bridge.write_mask(lungs > 0, IJK_TO_RAS, tmp_path / "mask.nrrd"), ct_image)
    assert set(np.unique(sitk.GetArrayFromImage(mask))) == {0, 1, 2}


def test_requirements_file_parses_and_spares_slicer_packages():
    from packaging.requirements import Requirement

    reqs = bridge.read_requirements(MODULE_DIR / "Resources" / "requirements.txt")
    names = {Requirement(r).name.lower() for r in reqs}
    assert {"scikit-learn", "pandas", "slicerio"} <= names
    assert not names & {"torch", "simpleitk", "vtk", "numpy", "monai"}  # Slicer's own builds or the PyTorch extension
    assert bridge.missing_requirements(reqs) == []  # this environment runs the backend, so it has them all


def test_missing_requirements_compares_versions():
    from importlib.metadata import PackageNotFoundError

    installed = {"pandas": "2.2.0", "monai": "1.2.0"}

    def version_of(name):
        if name not in installed:
            raise PackageNotFoundError(name)
        return installed[name]

    assert bridge.missing_requirements(["pandas>=2.0", "monai>=1.3", "slicerio"], version_of) == ["monai>=1.3", "slicerio"]


# ------------------------------------------------------------------------------------------- reading outputs

def test_locate_outputs_finds_the_run_and_names_missing_files(outputs):
    found = bridge.locate_outputs(outputs["out"])
    assert found.name == "chest" and found.segmentation.is_file()
    outputs["out"].joinpath("chest_lungs.nrrd").unlink()
    with pytest.raises(OutputError, match="chest_lungs.nrrd"):
        bridge.locate_outputs(outputs["out"], "chest")


def test_segment_definitions_come_from_the_seg_nrrd(outputs):
    definitions = bridge.read_segment_definitions(outputs["out"] / "chest.seg.nrrd")
    assert bridge.cluster_names(definitions) == NAMES
    for label, color in bridge.cluster_colors(definitions).items():
        np.testing.assert_allclose(color, COLORS[label], atol=1e-6)
    assert len({d.segment_id for d in definitions}) == 3 and all(d.segment_id for d in definitions)
    with pytest.raises(OutputError, match="Run Analyze again"):
        bridge.read_segment_definitions(outputs["out"] / "composition.csv")


def test_label_and_confidence_volumes_match_the_input_grid(outputs):
    labels = bridge.read_volume_array(outputs["out"] / "chest_clusters.nrrd")
    confidence = bridge.read_volume_array(outputs["out"] / "chest_confidence.nrrd")
    np.testing.assert_array_equal(labels.array, outputs["labels"])
    np.testing.assert_allclose(labels.ijk_to_ras, IJK_TO_RAS)
    np.testing.assert_allclose(confidence.ijk_to_ras, IJK_TO_RAS)
    assert confidence.array.dtype == np.float32 and confidence.array.max() == pytest.approx(0.8)


def test_table_columns_and_summary(outputs):
    table = tables.read_composition(outputs["out"] / "composition.csv")
    columns = dict(tables.table_columns(table))
    assert list(columns) == ["Region", "Label", "Cluster", "Fraction (%)", "Volume (mL)", "Mean (HU)", "SD (HU)"]
    assert columns["Region"].dtype.kind == "U" and columns["Fraction (%)"].dtype == np.float64
    whole = table.region == "whole"
    np.testing.assert_allclose(columns["Fraction (%)"][whole.to_numpy()].sum(), 100.0, rtol=1e-5)
    voxel_ml = np.prod(np.linalg.norm(IJK_TO_RAS[:3, :3], axis=0)) / 1000
    np.testing.assert_allclose(columns["Volume (mL)"][whole.to_numpy()].sum(), (outputs["lungs"] > 0).sum() * voxel_ml,
                               rtol=1e-5)
    summary = tables.whole_lung_summary(table)
    counts = np.bincount(outputs["labels"][outputs["lungs"] > 0], minlength=4)
    assert [s[0] for s in summary] == list(np.argsort(-counts[1:]) + 1)
    assert summary[0][2] == pytest.approx(100 * counts.max() / counts.sum(), rel=1e-5)


def test_composition_csv_with_foreign_columns_is_refused(tmp_path):
    path = tmp_path / "composition.csv"
    pd.DataFrame({"region": ["whole"], "fraction": [1.0]}).to_csv(path, index=False)
    with pytest.raises(OutputError, match="lacks the columns"):
        tables.read_composition(path)


# ------------------------------------------------------------------------------------------- QC edits

def test_merging_two_clusters_adds_their_fractions(outputs):
    before = outputs["table"].set_index(["region", "label"])
    merged = bridge.merge_clusters(outputs["labels"], [3], 2)
    assert not (merged == 3).any() and (merged == 2).sum() == np.isin(outputs["labels"], [2, 3]).sum()
    names = bridge.cluster_names(bridge.merge_definitions(
        bridge.read_segment_definitions(outputs["out"] / "chest.seg.nrrd"), [3]))
    assert names == {1: "normal", 2: "emphysema"}
    after = tables.recompute_composition(merged, outputs["ct"], outputs["lungs"], IJK_TO_RAS, names)
    after = after.set_index(["region", "label"])
    for region in ("whole", "right", "left", "upper", "middle", "lower"):
        if (region, 2) not in after.index:
            continue
        assert after.loc[(region, 2), "fraction"] == pytest.approx(
            before.loc[(region, 2), "fraction"] + before.loc[(region, 3), "fraction"], abs=1e-12)
        assert after.loc[(region, 1), "fraction"] == pytest.approx(before.loc[(region, 1), "fraction"])
    assert (after.loc["whole", "fraction"].sum()) == pytest.approx(1.0)
    assert 3 not in after.loc["whole"].index


def test_recompute_without_edits_reproduces_the_analyze_table(outputs):
    again = tables.recompute_composition(outputs["labels"], outputs["ct"], outputs["lungs"], IJK_TO_RAS, NAMES)
    pd.testing.assert_frame_equal(again, outputs["table"])
    with pytest.raises(InputError, match="export the segments in the CT's geometry"):
        tables.recompute_composition(outputs["labels"][:, :-1], outputs["ct"], outputs["lungs"], IJK_TO_RAS, NAMES)


def test_erased_voxels_become_unlabelled(outputs):
    """An eraser stroke in the Segment Editor: those lung voxels count as 'unlabelled', fractions still sum to 1."""
    masks = [(label, outputs["labels"] == label) for label in NAMES]
    masks[0] = (1, masks[0][1] & (np.indices(outputs["labels"].shape)[0] > 2))
    edited = bridge.labels_from_masks(masks)
    table = tables.recompute_composition(edited, outputs["ct"], outputs["lungs"], IJK_TO_RAS, NAMES)
    whole = table[table.region == "whole"].set_index("label")
    erased = ((outputs["labels"] == 1) & (np.indices(outputs["labels"].shape)[0] <= 2)).sum()
    assert whole.loc[0, "name"] == "unlabelled"
    assert whole.loc[0, "fraction"] == pytest.approx(erased / (outputs["lungs"] > 0).sum())
    assert whole.fraction.sum() == pytest.approx(1.0)


def test_labels_from_masks_round_trip_and_overlap_order(outputs):
    labels = outputs["labels"]
    masks = [(label, labels == label) for label in (1, 2, 3)]
    np.testing.assert_array_equal(bridge.labels_from_masks(masks), labels)
    np.testing.assert_array_equal(bridge.labels_from_masks(iter(masks)), labels)  # a generator works too
    with pytest.raises(InputError, match="no segments"):
        bridge.labels_from_masks([])
    everywhere = np.ones_like(labels, dtype=bool)
    first_wins = bridge.labels_from_masks([(2, labels == 2), (1, everywhere)])
    assert (first_wins[labels == 2] == 2).all() and (first_wins[labels != 2] == 1).all()
    assert not bridge.labels_from_masks([], shape=(2, 3, 4)).any()
    with pytest.raises(InputError, match="expected"):
        bridge.labels_from_masks([(1, everywhere), (2, everywhere[:1])])
    with pytest.raises(InputError, match="1..255"):
        bridge.labels_from_masks([(256, everywhere)])


def test_segment_labels_keep_known_and_number_new_segments():
    known = {"Segment_1": 1, "Segment_3": 3, "Removed": 2}
    labels = bridge.assign_segment_labels(["Segment_1", "Segment_3", "drawn_a", "drawn_b"], known)
    assert labels == {"Segment_1": 1, "Segment_3": 3, "drawn_a": 4, "drawn_b": 5}
    # a cluster merged away (label 4 of the original analysis) is not reused for a new segment
    assert bridge.assign_segment_labels(["Segment_1", "new"], {"Segment_1": 1}, reserved=[1, 2, 3, 4]) == {
        "Segment_1": 1, "new": 5}


def test_rename_and_merge_validation(outputs):
    definitions = bridge.read_segment_definitions(outputs["out"] / "chest.seg.nrrd")
    renamed = bridge.rename_cluster(definitions, 3, "  GGO   left ")
    assert bridge.cluster_names(renamed) == {1: "normal", 2: "emphysema", 3: "GGO left"}
    assert [d.color for d in renamed] == [d.color for d in definitions]
    with pytest.raises(InputError, match="already named"):
        bridge.rename_cluster(definitions, 3, "normal")
    with pytest.raises(InputError, match="cannot be empty"):
        bridge.rename_cluster(definitions, 3, "   ")
    with pytest.raises(InputError, match="no cluster with label 9"):
        bridge.rename_cluster(definitions, 9, "x")
    with pytest.raises(InputError, match="at least one cluster other than the target"):
        bridge.merge_clusters(outputs["labels"], [2], 2)
    with pytest.raises(InputError, match="label 0"):
        bridge.merge_clusters(outputs["labels"], [0], 2)


def test_largest_region_center_picks_the_bigger_blob():
    mask = np.zeros((6, 20, 20), bool)
    mask[1:3, 2:4, 2:4] = True          # small blob
    mask[2:5, 10:16, 12:18] = True      # large blob: centre voxel (k, j, i) ~ (3, 13, 15)
    center = bridge.largest_region_center(mask, IJK_TO_RAS)
    k, j, i = 3, 13, 15
    np.testing.assert_allclose(center, (IJK_TO_RAS @ [i, j, k, 1])[:3], atol=np.abs(IJK_TO_RAS[:3, :3]).max())
    assert bridge.largest_region_center(np.zeros((2, 2, 2)), IJK_TO_RAS) is None


def test_export_composition_writes_csv_and_json(outputs, tmp_path):
    definitions = bridge.rename_cluster(bridge.read_segment_definitions(outputs["out"] / "chest.seg.nrrd"), 1, "healthy")
    found = bridge.locate_outputs(outputs["out"], "chest")
    names = bridge.cluster_names(definitions)
    table = tables.recompute_composition(outputs["labels"], outputs["ct"], outputs["lungs"], IJK_TO_RAS, names)
    tables.export_composition(table, names, bridge.cluster_colors(definitions), tmp_path / "c.csv", tmp_path / "c.json",
                              model_id=bridge.read_model_id(found))
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "c.csv"), pd.read_csv(outputs["out"] / "composition.csv")
                                  .assign(name=lambda t: t.name.replace("normal", "healthy")))
    doc = json.loads((tmp_path / "c.json").read_text())
    assert doc["model_sha256"] == "abc123"
    assert [c["name"] for c in doc["clusters"]] == ["healthy", "emphysema", "ground_glass"]


# ------------------------------------------------------------------------------------------- with the real backend

def _chest_ct(size=(88, 72, 28), spacing=(3.0, 3.0, 5.0), seed=1) -> sitk.Image:
    """A small chest CT (HU) as Slicer would hand it over: body, two lungs with an emphysematous apex on the right
    and a denser base on the left, noise. LPS origin at the volume centre."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(size[::-1], spacing[::-1])], indexing="ij")
    hu = np.where((x / 130) ** 2 + (y / 95) ** 2 < 1, 40.0, -1000.0)
    lung = ((np.abs(x) - 58) / 42) ** 2 + (y / 62) ** 2 + (z / 68) ** 2 < 1
    hu[lung] = -850.0
    hu[lung & (z > 20) & (x < 0)] = -960.0
    hu[lung & (z < -25) & (x > 0)] = -600.0
    image = sitk.GetImageFromArray(np.round(hu + rng.normal(0, 25, hu.shape)).astype(np.int16))
    image.SetSpacing(spacing)
    image.SetOrigin(tuple(-(n - 1) / 2 * s for n, s in zip(size, spacing)))
    return image


@pytest.fixture(scope="module")
def backend_case(tmp_path_factory):
    """What the module hands the backend for a scan: input written by the bridge, and a tiny untrained bundle."""
    from latentharmonize.bundle import ModelBundle, save_bundle
    from latentharmonize.clusters import TissueClusters
    from latentharmonize.grid import to_model_grid
    from latentharmonize.lungmask import segment_lungs
    from latentharmonize.networks import build_model
    from latentharmonize.patches import PatchSpec, encode_dense
    from latentharmonize.rotation import LatentRotation

    folder = tmp_path_factory.mktemp("slicer_run")
    ct = _chest_ct()
    ijk_to_ras = bridge.ijk_to_ras_matrix(ct)  # as slicer.util.arrayFromVTKMatrix(GetIJKToRASMatrix) gives it
    name = bridge.safe_volume_name("CT chest")
    input_path = bridge.write_input_volume(sitk.GetArrayFromImage(ct), ijk_to_ras, folder / "input" / f"{name}.nrrd")

    hu, lung, grid = to_model_grid(ct, segment_lungs(ct), align_px=(4, 4, 1))
    model = build_model("ae", seed=0)
    dense = encode_dense(model, hu, lung, grid, PatchSpec())
    rotation = LatentRotation(n_technical=1, method="labels", random_state=0).fit(
        dense.latents, np.where(dense.positions[:, 2] % 2 == 0, "a", "b"))
    clusters = TissueClusters(n_clusters=3, random_state=0).fit(rotation.biological(dense.latents))
    bundle = ModelBundle.create(name="slicer-test", encoder_config=model.config, encoder_state=model.state_dict(),
                                spec=PatchSpec(), rotation=rotation, clusters=clusters,
                                names=["low attenuation", "normal-appearing", "dense"], created="2026-01-01")
    save_bundle(bundle, folder / "bundle")
    return {"folder": folder, "input": input_path, "name": name, "ijk_to_ras": ijk_to_ras,
            "array": sitk.GetArrayFromImage(ct), "bundle": folder / "bundle"}


def _start_backend(case, out_dir):
    """Start the worker exactly as the module does (command, environment and request from the bridge), stderr merged,
    and send it the analysis of the case."""
    env = dict(os.environ)
    env.update(bridge.backend_environment(MODULE_DIR, os.environ.get("PYTHONPATH")))
    process = subprocess.Popen(bridge.build_worker_command(sys.executable), env=env, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    process.stdin.write(bridge.worker_request(case["input"], out_dir, model_dir=case["bundle"], device="CPU"))
    process.stdin.flush()
    return process


def test_backend_run_through_the_bridge_end_to_end(backend_case):
    out_dir = backend_case["folder"] / "out"
    process = _start_backend(backend_case, out_dir)
    log = bridge.BackendLog()
    events = []
    for line in process.stdout:
        event = log.feed(line)
        if event is not None:
            events.append(event)
        if log.result is not None:
            break
    process.stdin.close()
    assert process.wait(timeout=60) == 0
    assert log.returncode() == 0, log.failure_message(log.returncode())
    percents = [e.percent for e in events]
    assert percents == sorted(percents) and percents[-1] == 100 and len({e.stage for e in events}) >= 3

    outputs = bridge.locate_outputs(out_dir)
    assert outputs.name == backend_case["name"]
    definitions = bridge.read_segment_definitions(outputs.segmentation)
    # the clusters, then the vessels and airways analyze finds (labels 200 and 201)
    assert [d.name for d in definitions] == ["low attenuation", "normal-appearing", "dense", "vessels", "airways"]
    labels = bridge.read_volume_array(outputs.clusters)
    np.testing.assert_allclose(labels.ijk_to_ras, backend_case["ijk_to_ras"], atol=1e-6)
    assert labels.array.shape == backend_case["array"].shape
    confidence = bridge.read_volume_array(outputs.confidence).array
    assert confidence.min() >= 0 and confidence.max() <= 1

    # the table shown after loading and the one recomputed from the unedited segments agree
    shown = tables.read_composition(outputs.composition_csv)
    recomputed = tables.recompute_composition(labels.array, backend_case["array"],
                                              bridge.read_volume_array(outputs.lungs).array,
                                              backend_case["ijk_to_ras"], bridge.cluster_names(definitions))
    pd.testing.assert_frame_equal(recomputed, shown, check_exact=False, rtol=1e-5, check_dtype=False)
    assert bridge.read_model_id(outputs)


@pytest.mark.slow
def test_cancel_stops_the_backend_and_leaves_no_outputs(backend_case):
    out_dir = backend_case["folder"] / "cancelled"
    process = _start_backend(backend_case, out_dir)
    log = bridge.BackendLog()
    for line in process.stdout:
        if log.feed(line) is not None:  # cancel as soon as the analysis reports progress
            break
    assert bridge.kill_process_tree(process.pid) >= 1
    assert process.wait(timeout=30) == 130
    for line in process.stdout.read().splitlines():  # the worker reported the interrupted request before exiting
        log.feed(line)
    assert log.result.error_type == "Cancelled" and log.returncode() == 130
    left = [p.name for p in out_dir.glob("*")] if out_dir.exists() else []
    assert left == []  # no results and no staging folder: the backend cleaned up on SIGTERM


def test_preload_arguments_name_the_selected_bundle_or_the_default(tmp_path):
    from latentharmonize.worker import add_arguments

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text("{}")
    assert bridge.preload_arguments(bundle, "CPU") == ["--preload", str(bundle), "--preload-device", "cpu"]
    assert bridge.preload_arguments(tmp_path / "not-a-bundle", "auto")[:2] == ["--preload", "default"]
    assert bridge.preload_arguments("", "GPU") == ["--preload", "default", "--preload-device", "cuda"]
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)  # the worker accepts what the module sends
    args = parser.parse_args(bridge.preload_arguments(bundle, "GPU"))
    assert (args.preload, args.preload_device) == (str(bundle), "cuda")


# ------------------------------------------------------------------------------------------- issue 22 helpers

def test_dependency_status_reads_metadata_and_checks_the_torch_version():
    versions = {"torch": "2.0.1+cu118", "pandas": "2.2.0"}

    def version_of(name):
        if name not in versions:
            from importlib.metadata import PackageNotFoundError
            raise PackageNotFoundError(name)
        return versions[name]

    status = bridge.dependency_status(["pandas>=2.0", "slicerio>=1.1"], ">=2.1", version_of)
    assert status.torch == "2.0.1+cu118 is installed; torch>=2.1 is needed" and status.packages == ("slicerio>=1.1",)
    assert not status.complete
    question = status.question()
    assert question.index("PyTorch (2.0.1+cu118") < question.index("slicerio>=1.1") and "pandas" not in question
    versions.update({"torch": "2.4.0+cpu", "slicerio": "1.1.2"})
    assert bridge.dependency_status(["pandas>=2.0", "slicerio>=1.1"], ">=2.1", version_of).complete
    del versions["torch"]
    assert bridge.dependency_status([], ">=2.1", version_of).torch == "not installed; torch>=2.1 is needed"
    assert bridge.installed_versions(["torch", "pandas"], version_of) == [("torch", "not installed"),
                                                                          ("pandas", "2.2.0")]


def test_worker_state_line():
    assert bridge.worker_state(False, False, 0) == "stopped"
    assert bridge.worker_state(True, True, 5) == "analyzing"
    assert bridge.worker_state(True, False, 12.4) == "running, idle for 12 s (exits after 600 s idle)"


def test_report_and_sample_commands(tmp_path):
    assert bridge.report_command("/s/PythonSlicer", tmp_path) == ["/s/PythonSlicer", "-m", "latentharmonize", "report",
                                                                  str(tmp_path), "--quiet"]
    assert bridge.report_command("py", tmp_path, tmp_path / "bundle")[-3:] == ["--model", str(tmp_path / "bundle"),
                                                                               "--quiet"]
    assert bridge.phantom_sample_command("/s/PythonSlicer", tmp_path / "p.nrrd")[-3:] == [
        "phantom", "--sample", str(tmp_path / "p.nrrd")]
    with pytest.raises(InputError, match="PythonSlicer was not found"):
        bridge.report_command(None, tmp_path)
    line = bridge.worker_request(tmp_path / "ct.nrrd", tmp_path / "out")
    assert json.loads(line)["report"] is False  # Slicer runs never need off-screen OpenGL
    page = tmp_path / "report.html"
    page.write_text("<html>")
    assert bridge.report_page(0, f"LH-PROGRESS 50 report qc\n{page}\n") == page
    assert bridge.report_page(1, f"{page}\n") is None and bridge.report_page(0, "") is None
    assert bridge.report_page(0, f"{tmp_path / 'missing.html'}\n") is None


def test_analysis_record_gives_input_and_warnings(outputs, tmp_path):
    assert bridge.analysis_input_path(outputs["out"]) == outputs["ct_path"]
    assert bridge.read_warnings(outputs["out"]) == WARNINGS
    assert bridge.format_warnings(WARNINGS) == "\u26a0 Slices thinner than the model was trained on."
    assert bridge.analysis_input_path(tmp_path) is None and bridge.read_warnings(tmp_path) == []
    assert bridge.format_warnings([]) == ""


def test_densitometry_rows_become_table_columns(outputs, tmp_path):
    rows = bridge.read_densitometry(outputs["out"] / "composition.json")
    assert rows == DENSITOMETRY
    columns = dict(bridge.densitometry_columns(rows))
    assert list(columns) == ["Region", "LAA-950 (%)", "HAA -700..-250 (%)", "MLD (HU)", "Perc15 (HU)",
                             "LAA-950 noise-matched (%)", "Perc15 noise-matched (HU)", "Volume (mL)"]
    assert list(columns["Region"]) == ["whole", "right", "left"] and columns["MLD (HU)"][1] == -870.0
    assert columns["Perc15 noise-matched (HU)"][1] == -948.0
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"clusters": []}))
    assert bridge.read_densitometry(old) == []
    # an analysis written before the noise-matched columns existed: they read empty, the rest as written
    before = tmp_path / "before.json"
    before.write_text(json.dumps({"densitometry": [{k: v for k, v in r.items() if "matched" not in k}
                                                   for r in DENSITOMETRY]}))
    columns = dict(bridge.densitometry_columns(bridge.read_densitometry(before)))
    assert np.isnan(columns["Perc15 noise-matched (HU)"]).all() and columns["Perc15 (HU)"][1] == -955.0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"densitometry": [{"region": "whole"}]}))
    with pytest.raises(OutputError, match="densitometry rows lack"):
        bridge.read_densitometry(bad)


def test_selection_order_keeps_the_first_selected_first():
    order = bridge.selection_order([], ["s1"])
    order = bridge.selection_order(order, ["s3"])  # a click on s3 alone
    order = bridge.selection_order(order, ["s1", "s3"])  # ctrl-click on s1, which is above s3 in the table
    assert order == ["s3", "s1"]
    assert bridge.selection_order(order, ["s1"]) == ["s1"]


def test_mask_given_as_several_segments_keeps_their_names(tmp_path):
    import slicerio

    labels = np.zeros((4, 5, 6), np.uint8)
    labels[:, :, :3] = 1
    labels[:, :, 3:] = 2
    path = bridge.write_mask_segments(labels, IJK_TO_RAS, ["right lung", "left lung"], tmp_path / "mask.seg.nrrd")
    segmentation = slicerio.read_segmentation(str(path))
    assert [(s["name"], s["labelValue"]) for s in segmentation["segments"]] == [("right lung", 1), ("left lung", 2)]
    image = sitk.ReadImage(str(path))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), labels)
    np.testing.assert_allclose(bridge.ijk_to_ras_matrix(image), IJK_TO_RAS, atol=1e-6)
    with pytest.raises(InputError, match="share a name"):
        bridge.write_mask_segments(labels, IJK_TO_RAS, ["lung", "lung"], tmp_path / "m.seg.nrrd")
    with pytest.raises(InputError, match="empty"):
        bridge.write_mask_segments(labels * 0, IJK_TO_RAS, ["a", "b"], tmp_path / "m.seg.nrrd")
