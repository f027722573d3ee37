"""The module's widget and the new Slicer-side features, run on stand-ins for Slicer and Qt (Slicer itself cannot
run here). Stand-ins behave like the real widgets where it matters: setting a segment selector's node resets its
segment and emits ``currentNodeChanged``, the segments table reports its selection in table order.
"""
from __future__ import annotations

import contextlib
import json
import sys
import types
import unittest
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from test_slicer_bridge import IJK_TO_RAS, outputs  # noqa: F401  (fixture)
from test_slicer_module import (_FakeSegmentationNode, _FakeVolume, _SceneVolume, _fake_worker,  # noqa: F401
                                _load_module, _logic_with_fake_python, _wait, fake_python)


class _Widget:
    """Qt widget stand-in: properties are attributes, signals connect to Python callables, other slots are
    recorded in ``calls``."""

    def __init__(self):
        self.calls, self.slots = [], {}
        self.enabled, self.visible, self.text, self.toolTip, self.plainText = True, True, "", "", ""

    def connect(self, signal, callback):
        self.slots.setdefault(signal, []).append(callback)

    def emit(self, signal, *args):
        for callback in self.slots.get(signal, []):
            callback(*args)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return lambda *args: self.calls.append((name, args))


class _SegmentSelector(_Widget):
    """qMRMLSegmentSelectorWidget: a new node resets the current segment, and both changes are signalled."""

    def __init__(self):
        super().__init__()
        self.node, self.segment = None, ""

    def currentNode(self):
        return self.node

    def currentSegmentID(self):
        return self.segment

    def setCurrentNode(self, node):
        self.node, self.segment = node, ""
        self.emit("currentNodeChanged(vtkMRMLNode*)", node)

    def setCurrentSegmentID(self, segment):
        self.segment = segment
        self.emit("currentSegmentChanged(QString)", segment)


class _SegmentsTable(_Widget):
    def __init__(self):
        super().__init__()
        self.selected = []

    def selectedSegmentIDs(self):
        return list(self.selected)

    def select(self, ids):  # the user's click: the view reports the selection in table order
        self.selected = list(ids)
        self.emit("selectionChanged(QItemSelection,QItemSelection)", None, None)


class _Log(_Widget):
    def __init__(self):
        super().__init__()
        self.lines = []

    def appendPlainText(self, text):
        self.lines.append(text)


class _UI:
    def __init__(self):
        self.maskSegmentSelector, self.segmentsTableView, self.statusLabel = _SegmentSelector(), _SegmentsTable(), _Log()

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        widget = _Widget()
        setattr(self, name, widget)
        return widget


class _Node:
    def __init__(self, node_id, attributes=None):
        self.node_id, self.attributes = node_id, dict(attributes or {})

    def GetID(self):
        return self.node_id

    def GetName(self):
        return self.node_id

    def GetAttribute(self, key):
        return self.attributes.get(key)


def _parameter_node(**values):
    fields = dict(inputVolume=None, maskSegmentation=None, maskSegmentID="", maskPerSegment=False,
                  modelPath=Path("/nonexistent"), device="auto", resultSegmentation=None, compositionTable=None,
                  densitometryTable=None, confidenceVolume=None, fillOpacity=0.5, showConfidence=False,
                  exportFolder=Path("/tmp"))
    fields.update(values)
    return types.SimpleNamespace(connectGui=lambda ui: "tag", disconnectGui=lambda tag: None, **fields)


def _widget(monkeypatch, module=None, calls=None):
    module = module or _load_module(monkeypatch, calls=calls)
    module.slicer.mrmlScene = types.SimpleNamespace(StartCloseEvent=1, EndCloseEvent=2,
                                                    IsNodePresent=lambda node: True)
    widget = module.LatentHarmonizeWidget()
    widget.ui, widget.logic, widget.parent = _UI(), module.LatentHarmonizeLogic(), types.SimpleNamespace(isEntered=True)
    widget.connectSignals()
    monkeypatch.setattr(module.LatentHarmonizeLogic, "setFillOpacity", staticmethod(lambda seg, opacity: None))
    return module, widget


# ------------------------------------------------------------------------------------------- parameters and display

def test_saved_mask_segment_survives_loading_the_scene(monkeypatch):
    """Connecting a loaded parameter node sets the selector's node first, which resets its segment and signals it;
    the saved segment must not be overwritten by that."""
    module, widget = _widget(monkeypatch)
    mask = _Node("vtkMRMLSegmentationNode7")
    pn = _parameter_node(maskSegmentation=mask, maskSegmentID="Segment_2")
    widget.setParameterNode(pn)
    assert pn.maskSegmentID == "Segment_2" and pn.maskSegmentation is mask
    assert widget.ui.maskSegmentSelector.currentSegmentID() == "Segment_2"
    widget.ui.maskSegmentSelector.setCurrentSegmentID("Segment_3")  # the user's own choice still reaches the node
    assert pn.maskSegmentID == "Segment_3"


def test_confidence_overlay_follows_a_second_run(monkeypatch):
    module, widget = _widget(monkeypatch)
    shown = []
    monkeypatch.setattr(module.LatentHarmonizeLogic, "showConfidence",
                        staticmethod(lambda background, confidence, show: shown.append((confidence.GetID(), show))))
    pn = _parameter_node(confidenceVolume=_Node("confidence1"), showConfidence=True, inputVolume=_Node("ct"))
    widget.setParameterNode(pn)
    widget._onParameterNodeModified()  # an unrelated change: the views are left alone
    pn.confidenceVolume = _Node("confidence2")  # the next run's map
    widget._onParameterNodeModified()
    pn.showConfidence = False
    widget._onParameterNodeModified()
    assert shown == [("confidence1", True), ("confidence2", True), ("confidence2", False)]
    backgrounds = []
    monkeypatch.setattr(module.LatentHarmonizeLogic, "showConfidence",
                        staticmethod(lambda background, confidence, show: backgrounds.append(background.GetID())))
    reference = _Node("clustered CT")
    pn.resultSegmentation = _FakeSegmentationNode("clusters", {}, {module.CLUSTERED_VOLUME_ROLE: reference})
    pn.inputVolume, pn.showConfidence = _Node("another CT"), True
    widget._onParameterNodeModified()
    assert backgrounds == ["clustered CT"]  # under the map, the CT it belongs to


def test_warnings_box_shows_the_stored_warnings(monkeypatch):
    """The warnings live on the result segmentation (saved with the scene), so they come back with the scene."""
    module, widget = _widget(monkeypatch)
    warnings = [{"code": "input_transformed", "message": "CT is under a transform"},
                {"code": "thin_slices", "message": "Slices thinner than trained on."}]
    segmentation = _Node("vtkMRMLSegmentationNode1", {module.WARNINGS_ATTRIBUTE: json.dumps(warnings)})
    widget.setParameterNode(_parameter_node(resultSegmentation=segmentation))
    assert widget.ui.warningLabel.visible and widget.ui.warningLabel.text.splitlines() == [
        "\u26a0 CT is under a transform", "\u26a0 Slices thinner than trained on."]
    assert widget.ui.reportButton.enabled and widget.ui.exportButton.enabled
    widget.setParameterNode(_parameter_node())
    assert not widget.ui.warningLabel.visible and not widget.ui.reportButton.enabled


def test_merge_goes_into_the_first_selected_cluster(monkeypatch):
    module, widget = _widget(monkeypatch)
    merged = []
    monkeypatch.setattr(module.LatentHarmonizeLogic, "mergeClusters",
                        lambda self, segmentation, ids: merged.append(list(ids)))
    widget._parameterNode = _parameter_node(resultSegmentation=_Node("seg"))
    widget.ui.segmentsTableView.select(["Segment_3"])
    widget.ui.segmentsTableView.select(["Segment_1", "Segment_3"])  # ctrl-click on a row above
    widget.onMerge()
    assert merged == [["Segment_3", "Segment_1"]]


def test_no_busy_cursor_while_the_install_question_is_open(monkeypatch, tmp_path):
    calls = []
    module = _load_module(monkeypatch, calls=calls)
    cursor = []

    @contextlib.contextmanager
    def try_with_error_display(message, waitCursor=False):
        cursor.append(waitCursor)
        try:
            yield
        finally:
            cursor.pop()

    def confirm(text, *a, **k):
        calls.append(("confirm while busy", any(cursor)))
        return False

    module.slicer.util.tryWithErrorDisplay = try_with_error_display
    module.slicer.util.confirmOkCancelDisplay = confirm
    monkeypatch.setattr(module, "MIN_TORCH", ">=999")
    module, widget = _widget(monkeypatch, module)
    widget._parameterNode = _parameter_node()
    with pytest.raises(RuntimeError, match="Installation declined"):
        widget.onApplyButton()
    assert ("confirm while busy", False) in calls and widget._run is None


# ------------------------------------------------------------------------------------------- process

def test_closing_the_scene_cancels_the_run_and_loads_nothing(monkeypatch, tmp_path, fake_python):
    module, widget = _widget(monkeypatch)
    monkeypatch.setattr(module.LatentHarmonizeLogic, "loadResults",
                        lambda self, run: pytest.fail("results loaded into the next scene"))
    widget.logic = _logic_with_fake_python(monkeypatch, module, fake_python)
    worker = _fake_worker(module, fake_python)
    from latentharmonize import slicer_bridge as bridge

    run = module.AnalysisRun(worker, bridge.worker_request(tmp_path / "slow.nrrd", tmp_path / "out"), tmp_path,
                             "slow", _Node("vtkMRMLScalarVolumeNode1"), onFinished=widget.onAnalysisFinished)
    run.start()
    widget._run = run
    widget.onSceneStartClose(None, None)  # it cancels through run.cancel, which test_slicer_module shows never waits
    assert run.cancelled
    _wait(lambda: run.returncode is not None, tick=worker._timer.fire)
    assert widget._run is None and "Analysis cancelled." in widget.ui.statusLabel.lines


def test_quitting_during_a_run_removes_the_ct_copy_at_once(monkeypatch, tmp_path, fake_python):
    module, widget = _widget(monkeypatch)
    worker = _fake_worker(module, fake_python)
    from latentharmonize import slicer_bridge as bridge

    (tmp_path / "input").mkdir()
    (tmp_path / "input" / "slow.nrrd").write_text("ct")
    run = module.AnalysisRun(worker, bridge.worker_request(tmp_path / "input" / "slow.nrrd", tmp_path / "out"),
                             tmp_path, "slow", _Node("vtkMRMLScalarVolumeNode1"))
    run.start()
    widget._run = run
    widget.cleanup()  # no timer fires any more: Slicer is quitting
    assert run.cancelled and not (tmp_path / "input").exists()


def test_results_of_a_volume_that_left_the_scene_are_not_loaded(monkeypatch, tmp_path):
    module, widget = _widget(monkeypatch)
    module.slicer.mrmlScene.IsNodePresent = lambda node: False
    monkeypatch.setattr(module.LatentHarmonizeLogic, "loadResults",
                        lambda self, run: pytest.fail("results loaded for a removed volume"))
    widget._parameterNode = _parameter_node()
    run = types.SimpleNamespace(cancelled=False, outputFolder=tmp_path, inputVolume=_Node("gone"))
    widget.onAnalysisFinished(run, 0)
    assert any("left the scene" in line for line in widget.ui.statusLabel.lines)


def test_transformed_input_warns_and_mask_segments_go_as_named_regions(monkeypatch, tmp_path, fake_python):
    module = _load_module(monkeypatch)
    logic = _logic_with_fake_python(monkeypatch, module, fake_python)
    ct = np.full((4, 6, 8), -800, np.int16)
    masks = {"Segment_1": np.zeros(ct.shape, bool), "Segment_2": np.zeros(ct.shape, bool)}
    masks["Segment_1"][:, :, :4] = True
    masks["Segment_2"][:, :, 4:] = True
    mask = _FakeSegmentationNode("lobes", masks)
    mask.segments["Segment_1"].name, mask.segments["Segment_2"].name = "right lung", "left lung"
    mask.GetParentTransformNode = lambda: None
    util = module.slicer.util
    util.arrayFromVolume = lambda node: ct
    util.arrayFromSegmentBinaryLabelmap = lambda seg, sid, ref: seg.masks[sid].astype(np.uint8)
    util.tempDirectory = lambda key: str(tmp_path / key)
    volume = _FakeVolume("CT", IJK_TO_RAS.tolist(), transform=object())
    log = []
    run = logic.startAnalysis(volume, mask, "", module.DEFAULT_MODEL, onLog=log.append, maskPerSegment=True)
    assert [w["code"] for w in run.warnings] == ["input_transformed"] and "under a transform" in log[0]
    request = json.loads(run.request)
    assert request["mask"].endswith("lung_mask.seg.nrrd")
    import slicerio

    written = slicerio.read_segmentation(request["mask"])
    assert [(s["name"], s["labelValue"]) for s in written["segments"]] == [("right lung", 1), ("left lung", 2)]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(request["mask"]))[:, :, 5], 2)
    _wait(lambda: run.returncode is not None, tick=run.worker._timer.fire)
    assert not Path(request["mask"]).exists()  # input copies are removed after the run
    logic.stopWorker()


# ------------------------------------------------------------------------------------------- user features

REPORT_SCRIPT = """
import hashlib, json, pathlib, sys
folder = pathlib.Path(sys.argv[4])
record = json.loads((folder / "analysis.json").read_text())
ct = pathlib.Path(record["input"])
same = ct.is_file() and hashlib.sha256(ct.read_bytes()).hexdigest() == record["input_sha256"]
page = folder / "report.html"
page.write_text(("CT as analysed" if same else "CT differs") + " " + " ".join(sys.argv[5:]))
print(page)
"""


def test_open_report_builds_the_page_in_the_background_then_opens_it(monkeypatch, outputs, tmp_path):
    """The CT copy of the run is gone; the report (which checks the CT's SHA-256) gets it again from the scene, byte
    for byte, with the analysis' model bundle; the copy is removed afterwards, and a second click opens the page."""
    import hashlib
    import shutil

    calls = []
    module = _load_module(monkeypatch, calls=calls)
    script = tmp_path / "report.py"
    script.write_text(REPORT_SCRIPT)
    python = tmp_path / "PythonSlicer"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{script}" "$@"\n')
    python.chmod(0o755)
    monkeypatch.setattr(module.LatentHarmonizeLogic, "pythonSlicerExecutable", staticmethod(lambda: str(python)))
    module.slicer.util.arrayFromVolume = lambda node: node.array
    record = json.loads((outputs["out"] / "analysis.json").read_text())
    record["input_sha256"] = hashlib.sha256(outputs["ct_path"].read_bytes()).hexdigest()
    (outputs["out"] / "analysis.json").write_text(json.dumps(record))
    shutil.rmtree(outputs["ct_path"].parent)
    reference = _SceneVolume("vtkMRMLScalarVolumeNode1", outputs["ct"])
    segmentation = _FakeSegmentationNode("clusters", {}, {module.CLUSTERED_VOLUME_ROLE: reference})
    segmentation.attributes.update({module.OUTPUT_FOLDER_ATTRIBUTE: str(outputs["out"]), module.NAME_ATTRIBUTE: "chest",
                                    module.MODEL_PATH_ATTRIBUTE: "/bundles/mine"})
    module, widget = _widget(monkeypatch, module)
    widget._parameterNode = _parameter_node(resultSegmentation=segmentation)

    widget.onOpenReport()
    job = widget._report
    assert outputs["ct_path"].is_file()  # written again for the report
    _wait(lambda: job.returncode is not None, tick=job._timer.fire)
    page = outputs["out"] / "report.html"
    assert page.read_text() == "CT as analysed --model /bundles/mine --quiet"
    assert calls[-1] == ("openUrl", ("url", str(page)))
    assert not outputs["ct_path"].exists() and widget._report is None
    widget.onOpenReport()  # built already: opened again, not rebuilt
    assert widget._report is None and calls[-1] == ("openUrl", ("url", str(page)))

    shutil.rmtree(outputs["out"])
    with pytest.raises(ValueError, match="analysis folder of clusters is gone"):
        widget.logic.startReport(segmentation, lambda job: None)


def test_screenshot_captures_the_whole_layout(monkeypatch, tmp_path):
    module = _load_module(monkeypatch)
    captured = []
    screen_capture = types.ModuleType("ScreenCapture")
    screen_capture.ScreenCaptureLogic = lambda: types.SimpleNamespace(
        captureImageFromView=lambda view, filename: captured.append((view, filename)))
    monkeypatch.setitem(sys.modules, "ScreenCapture", screen_capture)
    path = module.LatentHarmonizeLogic.saveScreenshot(tmp_path / "shots", "CT chest clusters")
    assert captured == [(None, str(path))] and path.parent.is_dir()
    assert path.name.startswith("CT_chest_clusters_") and path.suffix == ".png"


def test_sample_data_is_registered_and_generated_by_the_backend(monkeypatch, tmp_path):
    calls = []
    module = _load_module(monkeypatch, calls=calls)
    instance = module.LatentHarmonize.__new__(module.LatentHarmonize)
    instance.parent = types.SimpleNamespace()
    module.LatentHarmonize.__init__(instance, instance.parent)  # registration waits for Slicer's start-up
    assert ("app.connect", "startupCompleted()") in calls
    registered = {}
    sample_data = types.ModuleType("SampleData")
    sample_data.SampleDataLogic = types.SimpleNamespace(registerCustomSampleDataSource=registered.update)
    monkeypatch.setitem(sys.modules, "SampleData", sample_data)
    module.slicer.app.cachePath = str(tmp_path / "cache")
    expected = tmp_path / "cache" / "LatentHarmonize" / f"{module.SAMPLE_NAME}.nrrd"
    module.registerSampleData()
    assert registered["sampleName"] == module.SAMPLE_NAME and registered["customDownloader"] is module.loadPhantomSample
    assert Path(registered["thumbnailFileName"]).is_file()
    # SampleDataSource needs a URI of the same length as fileNames: the local file, nothing from the network
    assert registered["uris"] == expected.as_uri() and isinstance(registered["fileNames"], str)

    script = tmp_path / "phantom.py"
    script.write_text("import pathlib, sys\npathlib.Path(sys.argv[-1]).parent.mkdir(parents=True)\n"
                      "pathlib.Path(sys.argv[-1]).write_text('ct')\n")
    python = tmp_path / "PythonSlicer"
    python.write_text(f'#!/bin/sh\necho "$@" >> "{tmp_path}/args"\nexec "{sys.executable}" "{script}" "$@"\n')
    python.chmod(0o755)
    monkeypatch.setattr(module.LatentHarmonizeLogic, "pythonSlicerExecutable", staticmethod(lambda: str(python)))
    module.slicer.util.WaitCursor = contextlib.nullcontext
    module.slicer.util.loadVolume = lambda path, properties: ("volume", path, properties["name"])
    assert module.loadPhantomSample() == ("volume", str(expected), module.SAMPLE_NAME)
    assert module.loadPhantomSample()[1] == str(expected)  # generated once, then loaded from the cache
    assert (tmp_path / "args").read_text().splitlines() == [f"-m latentharmonize phantom --sample {expected}"]


def test_backend_panel_shows_versions_state_and_stops(monkeypatch, tmp_path, fake_python):
    module, widget = _widget(monkeypatch)
    widget.logic = _logic_with_fake_python(monkeypatch, module, fake_python)
    widget._parameterNode = _parameter_node(device="CPU")
    widget.updateBackendPanel()
    lines = widget.ui.backendLabel.text.splitlines()
    assert lines[0].startswith("torch: ") and lines[-2].startswith("Device: CPU")
    assert lines[-1] == "Backend process: stopped"
    widget.onRestartBackend()
    worker = widget.logic.worker
    assert worker.alive() and worker.preload[:2] == ["--preload", "default"]  # the bundle folder does not exist
    assert widget.ui.backendLabel.text.splitlines()[-1].startswith("Backend process: running, idle for")
    widget.onStopBackend()
    assert widget.logic.worker is None and widget.ui.backendLabel.text.endswith("stopped")
    assert worker.process.wait(timeout=10) != 0  # killed, not left to finish


def test_self_test_installs_nothing_under_ctest(monkeypatch):
    calls = []
    module = _load_module(monkeypatch, calls=calls)
    module.slicer.app.testingEnabled = lambda: True
    module.slicer.mrmlScene = types.SimpleNamespace(Clear=lambda: calls.append(("clear",)))
    monkeypatch.setattr(module, "MIN_TORCH", ">=999")
    monkeypatch.setitem(sys.modules, "SampleData", types.ModuleType("SampleData"))
    result = unittest.TestResult()
    module.LatentHarmonizeTest("test_AnalyzeCTChest").run(result)
    assert not result.errors, result.errors
    assert len(result.skipped) == 1 and "tests install nothing" in result.skipped[0][1]
    assert not [c for c in calls if c[0] in ("confirm", "installTorch")]
