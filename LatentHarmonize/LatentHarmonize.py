"""LatentHarmonize: scanner-invariant lung tissue clusters from chest CT, inside 3D Slicer.

The module is a thin shell around the ``latentharmonize`` backend (the sub-package next to this file). The analysis
runs in a separate ``PythonSlicer`` process, so the GUI stays responsive and Cancel can stop it. That process (the
backend worker) is started when the module is opened, loads the model in the background and stays loaded between
Analyze clicks, so no click waits for PyTorch and the model to load. Every number shown to the user comes from ``latentharmonize.slicer_bridge``, which is tested outside Slicer.
"""
import importlib
import json
import logging
import os
import pathlib
import queue
import shlex
import shutil
import subprocess
import sys
import threading
import time
import unittest
from typing import Annotated

import slicer  # first non-standard import: in plain Python this is the only import that fails
import qt
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

MODULE_DIR = pathlib.Path(__file__).resolve().parent
DEFAULT_MODEL = MODULE_DIR / "Resources" / "Models" / "default"
REQUIREMENTS = MODULE_DIR / "Resources" / "requirements.txt"
# Provided by Slicer itself or by the PyTorch extension: pip must never replace them
SKIP_PACKAGES = ["SimpleITK", "torch", "vtk"]
MIN_TORCH = ">=2.1"
# Shown in the backend panel (versions read from package metadata, nothing imported)
PANEL_PACKAGES = ["torch", "numpy", "scipy", "scikit-learn", "pandas", "SimpleITK"]
# Attributes stored on the result segmentation (saved with the scene) so QC and export work after a scene reload
SEGMENT_LABELS_ATTRIBUTE = "LatentHarmonize.SegmentLabels"
ORIGINAL_LABELS_ATTRIBUTE = "LatentHarmonize.OriginalLabels"
MODEL_ID_ATTRIBUTE = "LatentHarmonize.ModelSHA256"
WARNINGS_ATTRIBUTE = "LatentHarmonize.Warnings"
OUTPUT_FOLDER_ATTRIBUTE = "LatentHarmonize.OutputFolder"
MODEL_PATH_ATTRIBUTE = "LatentHarmonize.ModelPath"
NAME_ATTRIBUTE = "LatentHarmonize.Name"
# Node references from the result segmentation to the CT the clusters were computed on (kept apart from Slicer's
# reference geometry role, which the Segment Editor may point at another source volume) and to the analysis' lung map
CLUSTERED_VOLUME_ROLE = "LatentHarmonizeClusteredVolume"
LUNGS_REFERENCE_ROLE = "LatentHarmonizeLungRegions"
SAMPLE_NAME = "LatentHarmonizePhantomChest"


def bridge():
    """The Slicer-free backend helpers, imported on first use (never at module import)."""
    if str(MODULE_DIR) not in sys.path:
        sys.path.insert(0, str(MODULE_DIR))
    from latentharmonize import slicer_bridge

    return slicer_bridge


def bridgeTables():
    """The bridge's composition tables (they need pandas): imported once the dependencies are installed."""
    bridge()  # puts the module folder on the path
    from latentharmonize.slicer_bridge import tables

    return tables


def phantomSamplePath() -> pathlib.Path:
    return pathlib.Path(slicer.app.cachePath) / "LatentHarmonize" / f"{SAMPLE_NAME}.nrrd"


def registerSampleData() -> None:
    """Register the phantom chest CT in the Sample Data module, as Slicer's scripted-module template does. Nothing
    is downloaded: the Sample Data button calls ``customDownloader``, which has the backend generate the CT on the
    first click into Slicer's cache folder; the URI (required by SampleDataSource) names that local file."""
    import SampleData

    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="LatentHarmonize", sampleName=SAMPLE_NAME, uris=phantomSamplePath().as_uri(),
        fileNames=f"{SAMPLE_NAME}.nrrd", nodeNames=SAMPLE_NAME, loadFileType="VolumeFile",
        thumbnailFileName=str(MODULE_DIR / "Resources" / "Icons" / "LatentHarmonize.png"),
        customDownloader=loadPhantomSample)


def loadPhantomSample(source=None) -> "vtkMRMLScalarVolumeNode":
    """Sample Data's button for the phantom: generate it once with the backend (a few seconds), then load it."""
    path = phantomSamplePath()
    if not path.is_file():
        command = bridge().phantom_sample_command(LatentHarmonizeLogic.pythonSlicerExecutable(), path)
        environment = LatentHarmonizeLogic.backendEnvironment()
        with slicer.util.WaitCursor():
            done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
        if done.returncode != 0 or not path.is_file():
            raise RuntimeError(_("Could not generate the phantom chest CT:") + "\n" + (done.stderr or done.stdout))
    return slicer.util.loadVolume(str(path), {"name": SAMPLE_NAME})


#
# LatentHarmonize
#


class LatentHarmonize(ScriptedLoadableModule):
    """Module description shown in Slicer's module panel and Help section."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("LatentHarmonize")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Quantification")]
        self.parent.dependencies = []
        self.parent.contributors = ["LatentHarmonize Maintainers (LatentHarmonize project)"]
        self.parent.helpText = _(
            "Cluster lung tissue of a chest CT in a latent space where scanner and reconstruction effects "
            "(vendor, kernel, dose, slice thickness) have been rotated out. Click Analyze, review the clusters, "
            "fix them in the Segment Editor, recompute the composition and export statistics. "
            "See docs/slicer.md in the extension's repository."
        )
        self.parent.acknowledgementText = _(
            "Method after Pan et al., 'Disentanglement of Biological and Technical Factors via Latent Space "
            "Rotation in Clinical Imaging' (MICCAI AMAI 2025). Built on 3D Slicer and PyTorch."
        )
        slicer.app.connect("startupCompleted()", registerSampleData)


#
# Parameter node
#


@parameterNodeWrapper
class LatentHarmonizeParameterNode:
    """Module state, saved with the scene.

    inputVolume: chest CT to analyze. maskSegmentation/maskSegmentID: optional lung mask (else automatic);
    maskPerSegment: use every segment of the mask segmentation as a region (left/right lung, lobes). modelPath: model
    bundle folder. device: where the encoder runs. resultSegmentation, compositionTable, densitometryTable,
    confidenceVolume: outputs of the last run. fillOpacity: 2D fill opacity of the clusters. showConfidence: show
    the confidence map as foreground. exportFolder: where Export writes.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    maskSegmentation: vtkMRMLSegmentationNode
    maskSegmentID: str = ""
    maskPerSegment: bool = False
    modelPath: pathlib.Path = DEFAULT_MODEL
    device: Annotated[str, Choice(["auto", "CPU", "GPU"])] = "auto"
    resultSegmentation: vtkMRMLSegmentationNode
    compositionTable: vtkMRMLTableNode
    densitometryTable: vtkMRMLTableNode
    confidenceVolume: vtkMRMLScalarVolumeNode
    fillOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    showConfidence: bool = False
    exportFolder: pathlib.Path = pathlib.Path.home()


#
# Widget
#


class LatentHarmonizeWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """GUI: inputs, Analyze/Cancel, results display, QC, export and the backend panel."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run = None
        self._report = None
        self._confidenceShown = None  # ID of the confidence volume in the foreground, None when none is shown
        self._selectionOrder = []
        self._updatingMaskSelector = False

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/LatentHarmonize.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = LatentHarmonizeLogic()
        self.connectSignals()
        self.initializeParameterNode()

    def connectSignals(self) -> None:
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.maskSegmentSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onMaskSelectionChanged)
        self.ui.maskSegmentSelector.connect("currentSegmentChanged(QString)", self.onMaskSelectionChanged)
        self.ui.segmentsTableView.connect("selectionChanged(QItemSelection,QItemSelection)",
                                          self.onSegmentSelectionChanged)
        self.ui.showTableButton.connect("clicked(bool)", self.onShowTable)
        self.ui.reportButton.connect("clicked(bool)", self.onOpenReport)
        self.ui.screenshotButton.connect("clicked(bool)", self.onScreenshot)
        self.ui.flagButton.connect("clicked(bool)", self.onFlag)
        self.ui.completeButton.connect("clicked(bool)", self.onComplete)
        self.ui.jumpButton.connect("clicked(bool)", self.onJump)
        self.ui.segmentEditorButton.connect("clicked(bool)", self.onOpenSegmentEditor)
        self.ui.renameButton.connect("clicked(bool)", self.onRename)
        self.ui.mergeButton.connect("clicked(bool)", self.onMerge)
        self.ui.recomputeButton.connect("clicked(bool)", self.onRecompute)
        self.ui.exportButton.connect("clicked(bool)", self.onExport)
        self.ui.backendStopButton.connect("clicked(bool)", self.onStopBackend)
        self.ui.backendRestartButton.connect("clicked(bool)", self.onRestartBackend)
        self.ui.backendRefreshButton.connect("clicked(bool)", self.updateBackendPanel)
        self.ui.progressBar.setValue(0)

    def cleanup(self) -> None:
        """Module unloaded or Slicer closing: stop everything without waiting for it."""
        if self._run is not None:
            self._run.cancel()
            # Slicer may quit before the run's completion, which would delete the CT copy, comes round
            shutil.rmtree(self._run.inputFolder, ignore_errors=True)
        self.logic.stopWorker()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
        try:  # only saves time: opening the module must work whatever happens here
            self.logic.prestartWorker(self._parameterNode.modelPath, self._parameterNode.device)
        except Exception:
            logging.exception("LatentHarmonize: could not start the backend in advance")
        self.updateBackendPanel()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        """The volume a running analysis reads is about to go: cancel it, so nothing loads into the next scene."""
        if self._run is not None:
            self.addLog(_("The scene is closing: the running analysis is cancelled."))
            self._run.cancel()
        self.setParameterNode(None)
        self.logic.stopWorker()
        self._confidenceShown = None
        self._selectionOrder = []

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode: "LatentHarmonizeParameterNode") -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            # setting the node resets the selector's segment, which would overwrite the saved one: read it first
            segmentID = self._parameterNode.maskSegmentID
            self._updatingMaskSelector = True
            try:
                self.ui.maskSegmentSelector.setCurrentNode(self._parameterNode.maskSegmentation)
                self.ui.maskSegmentSelector.setCurrentSegmentID(segmentID)
            finally:
                self._updatingMaskSelector = False
        self._onParameterNodeModified()

    # --- state -> GUI

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        self._checkCanApply()
        self._updateResultsDisplay()

    def _checkCanApply(self) -> None:
        """Analyze is enabled only with valid inputs; its tooltip says what is missing. While running it cancels."""
        if self._run is not None:
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the running analysis")
            self.ui.applyButton.enabled = True
            return
        self.ui.applyButton.text = _("Analyze")
        pn = self._parameterNode
        if pn is None:
            self.ui.applyButton.enabled = False
            return
        problems = bridge().missing_inputs(pn.inputVolume is not None, pn.modelPath,
                                           pn.maskSegmentation is not None, pn.maskSegmentID or pn.maskPerSegment)
        self.ui.applyButton.enabled = not problems
        ready = _("Cluster the lung tissue of the input volume")
        self.ui.applyButton.toolTip = "\n".join(problems) if problems else ready

    def _updateResultsDisplay(self) -> None:
        pn = self._parameterNode
        segmentation = pn.resultSegmentation if pn else None
        self.ui.segmentsTableView.setSegmentationNode(segmentation)
        for widget in (self.ui.flagButton, self.ui.completeButton, self.ui.jumpButton, self.ui.segmentEditorButton,
                       self.ui.renameButton, self.ui.mergeButton, self.ui.recomputeButton, self.ui.exportButton,
                       self.ui.reportButton):
            widget.enabled = segmentation is not None
        self.ui.showTableButton.enabled = pn is not None and pn.compositionTable is not None
        self.ui.densitometryTableView.setMRMLTableNode(pn.densitometryTable if pn else None)
        self._showWarnings(self.logic.storedWarnings(segmentation) if segmentation is not None else [])
        if segmentation is not None:
            self.logic.setFillOpacity(segmentation, pn.fillOpacity)
        # touch the slice views only when what should be shown changes, so the user's own layers are left alone;
        # a new run's confidence map replaces the previous one
        wanted: "vtkMRMLScalarVolumeNode" = pn.confidenceVolume if pn is not None and pn.showConfidence else None
        wantedID = wanted.GetID() if wanted is not None else None
        if pn is not None and pn.confidenceVolume is not None and wantedID != self._confidenceShown:
            background = self.logic.referenceVolume(segmentation) if segmentation is not None else pn.inputVolume
            self.logic.showConfidence(background, pn.confidenceVolume, wanted is not None)
            self._confidenceShown = wantedID

    def _showWarnings(self, warnings) -> None:
        text = bridge().format_warnings(warnings)
        self.ui.warningLabel.text = text
        self.ui.warningLabel.visible = bool(text)

    # --- inputs

    def onMaskSelectionChanged(self, *unused) -> None:
        if self._parameterNode and not self._updatingMaskSelector:
            self._parameterNode.maskSegmentation = self.ui.maskSegmentSelector.currentNode()
            self._parameterNode.maskSegmentID = self.ui.maskSegmentSelector.currentSegmentID() or ""

    # --- run

    def onApplyButton(self) -> None:
        if self._run is not None:
            self.addLog(_("Cancelling..."))
            self._run.cancel()
            return
        pn = self._parameterNode
        # dialogs first, with the normal cursor: the install question and pip's own progress
        with slicer.util.tryWithErrorDisplay(_("The analysis needs packages that are not installed.")):
            self.logic.ensureDependencies()
        with slicer.util.tryWithErrorDisplay(_("Failed to start the analysis."), waitCursor=True):
            self.ui.statusLabel.plainText = ""
            self.ui.progressBar.setValue(0)
            self._showWarnings([])
            self._run = self.logic.startAnalysis(pn.inputVolume, pn.maskSegmentation, pn.maskSegmentID, pn.modelPath,
                                                 pn.device, onLog=self.addLog, onProgress=self.onProgress,
                                                 onFinished=self.onAnalysisFinished,
                                                 maskPerSegment=pn.maskPerSegment)
            self.addLog(_("Working folder: {folder}").format(folder=self._run.runFolder))
            self._checkCanApply()
        self.updateBackendPanel()

    def addLog(self, text: str) -> None:
        self.ui.statusLabel.appendPlainText(text)

    def onProgress(self, event) -> None:
        self.ui.progressBar.setValue(event.percent)
        self.ui.progressBar.setFormat(f"{event.stage}: %p%")
        slicer.util.showStatusMessage(f"LatentHarmonize: {event.message or event.stage}", 3000)

    def onAnalysisFinished(self, run: "AnalysisRun", returncode: int) -> None:
        self._run = None
        self._checkCanApply()
        self.updateBackendPanel()
        if run.cancelled:
            self.addLog(_("Analysis cancelled."))
            self.ui.progressBar.setValue(0)
            return
        if returncode != 0:
            message = run.log.failure_message(returncode)
            self.addLog(message)
            slicer.util.errorDisplay(_("The analysis failed.") + "\n\n" + message,
                                     detailedText="\n".join(run.log.lines))
            return
        pn = self._parameterNode
        if pn is None or not slicer.mrmlScene.IsNodePresent(run.inputVolume):  # the scene changed meanwhile
            self.addLog(_("The input volume left the scene; results are in {folder}.").format(folder=run.outputFolder))
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to load the results."), waitCursor=True):
            results = self.logic.loadResults(run)
            pn.resultSegmentation = results.segmentation
            pn.compositionTable = results.table
            pn.densitometryTable = results.densitometry
            pn.confidenceVolume = results.confidence
            self.logic.showCompositionTable(results.table)
            self._showSummary(results.composition)
            self.addLog(_("Analysis finished in {seconds:.0f} s.").format(seconds=run.elapsed()))

    def _showSummary(self, composition) -> None:
        lines = [f"{name}: {percent:.1f} %" for _label, name, percent in bridgeTables().whole_lung_summary(composition)]
        self.ui.summaryLabel.text = "\n".join(lines)

    # --- results and QC

    def onSegmentSelectionChanged(self, *unused) -> None:
        selected = list(self.ui.segmentsTableView.selectedSegmentIDs())
        self._selectionOrder = bridge().selection_order(self._selectionOrder, selected)

    def _selectedSegmentIDs(self) -> list:
        """The selected clusters, in the order the user selected them."""
        selected = list(self.ui.segmentsTableView.selectedSegmentIDs())
        if not selected:
            raise ValueError(_("Select one or more clusters in the list first."))
        return bridge().selection_order(self._selectionOrder, selected)

    def onShowTable(self) -> None:
        self.logic.showCompositionTable(self._parameterNode.compositionTable)

    def onOpenReport(self) -> None:
        """Build report.html in the background and open it in the browser when it is ready."""
        if self._report is not None:
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to create the report.")):
            segmentation = self._parameterNode.resultSegmentation
            page = self.logic.existingReport(segmentation)
            if page is not None:
                qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(page)))
                return
            self.addLog(_("Creating the report (the lung is encoded again for the pictures)..."))
            self._report = self.logic.startReport(segmentation, self.onReportFinished)

    def onReportFinished(self, job: "BackgroundCommand") -> None:
        self._report = None
        page = bridge().report_page(job.returncode, job.output)
        if page is None:
            slicer.util.errorDisplay(_("The report could not be created."), detailedText=job.output)
            return
        self.addLog(_("Report: {page}").format(page=page))
        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(page)))

    def onScreenshot(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to save the screenshot.")):
            segmentation = self._parameterNode.resultSegmentation
            path = self.logic.saveScreenshot(self._parameterNode.exportFolder,
                                             segmentation.GetName() if segmentation is not None else "views")
            self.addLog(_("Screenshot: {path}").format(path=path))

    def onFlag(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to flag the clusters.")):
            self.logic.setClusterStatus(self._parameterNode.resultSegmentation, self._selectedSegmentIDs(),
                                        slicer.vtkSlicerSegmentationsModuleLogic.Flagged)

    def onComplete(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to mark the clusters as completed.")):
            self.logic.setClusterStatus(self._parameterNode.resultSegmentation, self._selectedSegmentIDs(),
                                        slicer.vtkSlicerSegmentationsModuleLogic.Completed)

    def onJump(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to jump to the cluster.")):
            self.logic.jumpToLargestRegion(self._parameterNode.resultSegmentation, self._selectedSegmentIDs()[0])

    def onOpenSegmentEditor(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to open the Segment Editor.")):
            self.logic.openSegmentEditor(self._parameterNode.resultSegmentation)

    def onRename(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to rename the cluster.")):
            self.logic.renameCluster(self._parameterNode.resultSegmentation, self._selectedSegmentIDs()[0],
                                     self.ui.renameLineEdit.text)
            self.ui.renameLineEdit.text = ""

    def onMerge(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to merge the clusters."), waitCursor=True):
            self.logic.mergeClusters(self._parameterNode.resultSegmentation, self._selectedSegmentIDs())
            self._selectionOrder = []

    def onRecompute(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to recompute the composition."), waitCursor=True):
            pn = self._parameterNode
            composition = self.logic.recomputeComposition(pn.resultSegmentation, pn.compositionTable)
            self._showSummary(composition)

    def onExport(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to export the results."), waitCursor=True):
            pn = self._parameterNode
            written = self.logic.exportResults(pn.resultSegmentation, pn.exportFolder, pn.densitometryTable)
            self.addLog(_("Exported:") + "\n" + "\n".join(str(path) for path in written))

    # --- backend panel

    def updateBackendPanel(self) -> None:
        lines = [f"{name}: {version}" for name, version in self.logic.backendVersions()]
        pn = self._parameterNode
        lines.append(_("Device: {device} (auto: the GPU when PyTorch sees one, else the CPU)").format(
            device=pn.device if pn else "auto"))
        lines.append(_("Backend process: {state}").format(state=self.logic.workerState()))
        self.ui.backendLabel.text = "\n".join(lines)

    def onStopBackend(self) -> None:
        if self._run is not None:
            self._run.cancel()
        self.logic.stopWorker(kill=True)
        self.updateBackendPanel()

    def onRestartBackend(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to restart the backend.")):
            self.onStopBackend()
            if not self.logic.prestartWorker(self._parameterNode.modelPath, self._parameterNode.device):
                self.addLog(_("The backend starts on the next Analyze: PyTorch or packages are not installed yet."))
        self.updateBackendPanel()


#
# Logic
#


class BackendWorker:
    """The resident backend process (``latentharmonize worker``), started when the module is opened (or else on the
    first Analyze). It imports the libraries and loads the model once and then analyzes one request after another,
    so the clicks skip seconds of start-up. A thread reads its output; a QTimer hands each line to the running
    analysis on the main thread.
    """

    def __init__(self, launch, preload=()) -> None:
        self.launch = launch
        self.preload = list(preload)  # extra options, not part of launch: a preloading worker serves any request
        self.process = None
        self.run = None
        self.idleSince = time.time()
        self.killed = False
        self._queue = queue.Queue()
        self._timer = None

    def start(self) -> None:
        command = [*self.launch.command, *self.preload]
        logging.info("LatentHarmonize backend: %s", " ".join(shlex.quote(a) for a in command))
        environment = slicer.util.startupEnvironment()
        environment.update(dict(self.launch.environment))
        options = {}
        if os.name == "nt":  # no console window, as slicer.util.launchConsoleProcess does
            options["startupinfo"] = subprocess.STARTUPINFO(dwFlags=subprocess.STARTF_USESHOWWINDOW, wShowWindow=0)
        # launchConsoleProcess gives the process no stdin, which carries the requests
        self.process = subprocess.Popen(command, env=environment, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, encoding="utf-8",
                                        errors="replace", **options)
        threading.Thread(target=self._readOutput, daemon=True).start()
        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.connect("timeout()", self._poll)
        self._timer.start()

    def alive(self) -> bool:
        """Running and able to take a request (a worker being killed is not)."""
        return self.process is not None and self.process.poll() is None and not self.killed

    def submit(self, run: "AnalysisRun") -> None:
        self.run = run
        try:
            self.process.stdin.write(run.request)
            self.process.stdin.flush()
        except OSError:  # the worker has just ended: the end of its output completes the run
            logging.warning("LatentHarmonize backend: the worker ended before taking the request")

    def stop(self) -> None:
        """End the worker's input: it finishes the analysis it is running, if any, and exits."""
        try:
            self.process.stdin.close()
        except OSError:
            pass

    def kill(self) -> None:
        """Stop the worker and all its children (Cancel, scene close, exit): the SIGTERMs go out now, the kill of
        whatever ignores them follows in a background thread, so the GUI never waits. The next Analyze starts a
        fresh worker."""
        self.killed = True
        bridge().kill_process_tree(self.process.pid, background=True)

    def _readOutput(self) -> None:
        """Background thread: only reads the pipe; all GUI work happens in _poll on the main thread."""
        for line in self.process.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def _poll(self) -> None:
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                return
            if line is None:
                self._timer.stop()
                self._finishRun(self.process.wait())
                return
            if self.run is None:
                logging.info("LatentHarmonize backend: %s", line.rstrip())
            elif self.run.feed(line):
                self._finishRun(None)

    def _finishRun(self, workerReturncode) -> None:
        run = self.run
        self.run = None
        self.idleSince = time.time()
        if run is not None:
            run.complete(workerReturncode)


class BackgroundCommand:
    """A short backend command (report) run outside the GUI thread; ``onFinished(job)`` is called on the main thread
    with ``returncode`` and ``output`` set."""

    def __init__(self, command, environment, onFinished, cleanup=None) -> None:
        self.command = list(command)
        self.environment = environment
        self.onFinished = onFinished
        self.cleanup = cleanup
        self.returncode = None
        self.output = ""
        self._result = queue.Queue()
        self._timer = None

    def start(self) -> None:
        threading.Thread(target=self._run, daemon=True).start()
        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.connect("timeout()", self._poll)
        self._timer.start()

    def _run(self) -> None:
        try:
            done = subprocess.run(self.command, env=self.environment, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, encoding="utf-8", errors="replace")
            self._result.put((done.returncode, done.stdout))
        except OSError as exc:
            self._result.put((1, str(exc)))

    def _poll(self) -> None:
        try:
            self.returncode, self.output = self._result.get_nowait()
        except queue.Empty:
            return
        self._timer.stop()
        if self.cleanup:
            self.cleanup()
        self.onFinished(self)


class AnalysisRun:
    """One Analyze: its working folder, its request to the backend worker, progress, completion and Cancel."""

    def __init__(self, worker: BackendWorker, request: str, runFolder, name,
                 inputVolume: "vtkMRMLScalarVolumeNode", onLog=None, onProgress=None, onFinished=None,
                 warnings=(), modelPath=None) -> None:
        self.worker = worker
        self.modelPath = modelPath
        self.request = request
        self.runFolder = pathlib.Path(runFolder)
        self.name = name
        self.inputVolume = inputVolume
        self.onLog = onLog
        self.onProgress = onProgress
        self.onFinished = onFinished
        self.warnings = list(warnings)  # found by the module before the run (e.g. a transformed input)
        self.log = bridge().BackendLog()
        self.cancelled = False
        self.returncode = None
        self._startTime = time.time()

    @property
    def inputFolder(self) -> pathlib.Path:
        return self.runFolder / "input"

    @property
    def inputPath(self) -> pathlib.Path:
        return self.inputFolder / f"{self.name}.nrrd"

    @property
    def outputFolder(self) -> pathlib.Path:
        return self.runFolder / "out"

    def elapsed(self) -> float:
        return time.time() - self._startTime

    def start(self) -> None:
        self.worker.submit(self)

    def feed(self, line: str) -> bool:
        """One line of the worker's output; True when it was this analysis' result line."""
        event = self.log.feed(line)
        if self.log.result is not None:
            return True
        if event is not None:
            if self.onProgress:
                self.onProgress(event)
        elif self.onLog:
            self.onLog(line.rstrip())
        return False

    def complete(self, workerReturncode=None) -> None:
        """The result line arrived, or the worker ended (``workerReturncode``) without one. The uncompressed CT copy
        (and mask) written for the backend is deleted: results are loaded from the outputs and QC works from the
        scene."""
        self.returncode = self.log.returncode(workerReturncode)
        shutil.rmtree(self.inputFolder, ignore_errors=True)
        if self.onFinished:
            self.onFinished(self, self.returncode)

    def cancel(self) -> None:
        """Kill the worker and all its children without waiting; the completion callback still fires."""
        if self.returncode is None and not self.cancelled:
            self.cancelled = True
            self.worker.kill()


class LatentHarmonizeResults:
    """Nodes created from one analysis, plus the composition table (pandas) they show."""

    def __init__(self, segmentation: "vtkMRMLSegmentationNode", table: "vtkMRMLTableNode",
                 confidence: "vtkMRMLScalarVolumeNode", composition, densitometry: "vtkMRMLTableNode" = None,
                 lungs: "vtkMRMLLabelMapVolumeNode" = None) -> None:
        self.segmentation = segmentation
        self.table = table
        self.confidence = confidence
        self.composition = composition
        self.densitometry = densitometry
        self.lungs = lungs


class LatentHarmonizeLogic(ScriptedLoadableModuleLogic):
    """All processing, usable without the GUI (self-test, Python console, batch scripts)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.dependenciesChecked = False
        self.worker = None

    def getParameterNode(self) -> "LatentHarmonizeParameterNode":
        return LatentHarmonizeParameterNode(super().getParameterNode())

    # --- dependencies

    @staticmethod
    def dependencyStatus():
        """PyTorch and the packages, read from package metadata: nothing is imported (opening the module stays
        quick) and nothing is installed."""
        b = bridge()
        return b.dependency_status(b.read_requirements(REQUIREMENTS), MIN_TORCH)

    def dependenciesInstalled(self) -> bool:
        return self.dependenciesChecked or self.dependencyStatus().complete

    def ensureDependencies(self, confirm: bool = True) -> None:
        """Install what the backend lacks into Slicer's Python after one question (first Analyze only): PyTorch
        through the PyTorch extension (the build matching the GPU driver; an installed PyTorch older than MIN_TORCH
        is upgraded), then the packages of requirements.txt."""
        if self.dependenciesChecked:
            return
        status = self.dependencyStatus()
        if not status.complete:
            if status.torch is not None:  # checked before asking: without the extension PyTorch cannot be installed
                try:
                    import PyTorchUtils
                except ModuleNotFoundError as exc:
                    raise RuntimeError(_("LatentHarmonize needs the PyTorch extension. Install 'PyTorch' from the "
                                         "Extensions Manager, restart Slicer and click Analyze again.")) from exc
            if confirm and not slicer.util.confirmOkCancelDisplay(status.question()):
                raise RuntimeError(_("Installation declined: the analysis needs these packages."))
            if status.torch is not None:
                PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=MIN_TORCH)
            if status.packages:
                self._installPackages(list(status.packages))
            if not self.dependencyStatus().complete:
                raise RuntimeError(_("The installation did not complete; see the Python console. Restart Slicer and "
                                     "click Analyze again."))
        self.dependenciesChecked = True

    @staticmethod
    def _installPackages(requirements: list) -> None:
        """pip, sparing Slicer's own packages and PyTorch. ``slicer.packaging`` (Slicer >= 5.12) is not imported when
        Slicer starts (``hasattr(slicer, "packaging")`` is False until someone imports it), so it is imported here;
        Slicer 5.10 and older have only ``slicer.util.pip_install``."""
        try:
            packaging = importlib.import_module("slicer.packaging")
        except ImportError:
            slicer.util.pip_install(" ".join(shlex.quote(r) for r in requirements))
            return
        packaging.pip_ensure(requirements, skip_packages=SKIP_PACKAGES, prompt_install=False,
                             requester="LatentHarmonize")

    @staticmethod
    def backendVersions() -> list:
        return bridge().installed_versions(PANEL_PACKAGES)

    def workerState(self) -> str:
        worker = self.worker
        if worker is None:
            return bridge().worker_state(False, False, 0.0)
        return bridge().worker_state(worker.alive(), worker.run is not None, time.time() - worker.idleSince)

    # --- running the backend

    @staticmethod
    def ijkToRAS(volume: "vtkMRMLVolumeNode"):
        matrix = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(matrix)
        return slicer.util.arrayFromVTKMatrix(matrix)

    @staticmethod
    def pythonSlicerExecutable() -> str:
        return shutil.which("PythonSlicer")

    def startAnalysis(self, inputVolume: "vtkMRMLScalarVolumeNode", maskSegmentation=None, maskSegmentID="",
                      modelPath=DEFAULT_MODEL, device="auto", onLog=None, onProgress=None,
                      onFinished=None, maskPerSegment=False) -> AnalysisRun:
        """Write the input (and mask) to a temporary folder and send it to the backend worker (started when none
        can take it); returns the running job. With ``maskPerSegment`` every segment of ``maskSegmentation`` is a
        region (left/right lung, lobes) and the composition is reported per segment."""
        b = bridge()
        problems = b.missing_inputs(inputVolume is not None, modelPath, maskSegmentation is not None,
                                    maskSegmentID or maskPerSegment)
        if problems:
            raise ValueError("\n".join(problems))
        warnings = self.inputWarnings(inputVolume, maskSegmentation)
        for warning in warnings:
            if onLog:
                onLog(warning["message"])
        runFolder = pathlib.Path(slicer.util.tempDirectory("LatentHarmonize"))
        name = b.safe_volume_name(inputVolume.GetName())
        ijkToRAS = self.ijkToRAS(inputVolume)
        inputPath = b.write_input_volume(slicer.util.arrayFromVolume(inputVolume), ijkToRAS,
                                         runFolder / "input" / f"{name}.nrrd")
        maskPath = None
        if maskSegmentation is not None and maskPerSegment:
            labels, names = self.maskLabelMap(maskSegmentation, inputVolume)
            maskPath = b.write_mask_segments(labels, ijkToRAS, names, runFolder / "input" / "lung_mask.seg.nrrd")
        elif maskSegmentation is not None and maskSegmentID:
            mask = slicer.util.arrayFromSegmentBinaryLabelmap(maskSegmentation, maskSegmentID, inputVolume)
            maskPath = b.write_mask(mask, ijkToRAS, runFolder / "input" / "lung_mask.nrrd")
        worker = self.backendWorker(self.workerLaunch())
        request = b.worker_request(inputPath, runFolder / "out", maskPath, modelPath, device)
        run = AnalysisRun(worker, request, runFolder, name, inputVolume, onLog, onProgress, onFinished, warnings,
                          modelPath)
        run.start()
        return run

    @staticmethod
    def inputWarnings(inputVolume: "vtkMRMLScalarVolumeNode", maskSegmentation=None) -> list:
        """The analysis reads the voxel grid as stored: a transform on the inputs is not applied to it."""
        return [warning for warning in (LatentHarmonizeLogic.transformWarning(inputVolume),
                                        LatentHarmonizeLogic.transformWarning(maskSegmentation)) if warning]

    @staticmethod
    def transformWarning(node: "vtkMRMLTransformableNode"):
        if node is None or node.GetParentTransformNode() is None:
            return None
        return {"code": "input_transformed", "message": _(
            "{name} is under a transform, which the analysis does not apply: the results are placed under the same "
            "transform, but distances and volumes are those of the untransformed voxels. Harden the transform first "
            "(Transforms module) if it changes the geometry.").format(name=node.GetName())}

    def maskLabelMap(self, maskSegmentation: "vtkMRMLSegmentationNode", referenceVolume: "vtkMRMLScalarVolumeNode"):
        """All segments of a mask segmentation as one label map (segment n -> label n + 1) and their names."""
        segments: "vtkSegmentation" = maskSegmentation.GetSegmentation()
        segmentIDs = list(segments.GetSegmentIDs())
        names = [segments.GetSegment(segmentID).GetName() for segmentID in segmentIDs]
        labels = self.labelMap(maskSegmentation, referenceVolume, {s: i + 1 for i, s in enumerate(segmentIDs)})
        return labels, names

    def backendWorker(self, launch) -> BackendWorker:
        """The running backend worker if it can take a request started with ``launch``, else a fresh one."""
        worker = self.worker
        if worker is not None and bridge().can_reuse_worker(worker.launch, launch, worker.alive(),
                                                            worker.run is not None, time.time() - worker.idleSince):
            return worker
        return self._startWorker(launch)

    def prestartWorker(self, modelPath=DEFAULT_MODEL, device="auto") -> bool:
        """Start the backend worker when the module is opened, loading the model and libraries in the background,
        so that even the first Analyze is answered warm. Nothing happens while a worker runs or before the
        dependencies are installed (installing asks the user first, on Analyze). Returns whether a worker runs."""
        if self.worker is not None and self.worker.alive():
            return True
        if not self.dependenciesInstalled():
            return False
        self._startWorker(self.workerLaunch(), bridge().preload_arguments(modelPath, device))
        return True

    def _startWorker(self, launch, preload=()) -> BackendWorker:
        """Replace the backend worker by a fresh one started with ``launch`` (and ``preload`` options)."""
        self.stopWorker()
        self.worker = BackendWorker(launch, preload)
        self.worker.start()
        return self.worker

    @staticmethod
    def backendEnvironment() -> dict:
        """Slicer's startup environment, set so that a child PythonSlicer imports the module's backend."""
        environment = slicer.util.startupEnvironment()
        environment.update(bridge().backend_environment(MODULE_DIR, environment.get("PYTHONPATH")))
        return environment

    def workerLaunch(self):
        """How the backend worker starts: PythonSlicer runs ``latentharmonize worker`` from the module folder."""
        b = bridge()
        command = b.build_worker_command(self.pythonSlicerExecutable())
        environment = b.backend_environment(MODULE_DIR, slicer.util.startupEnvironment().get("PYTHONPATH"))
        return b.worker_launch(command, environment, MODULE_DIR)

    def stopWorker(self, kill: bool = False) -> None:
        """Let the backend worker exit once the analysis it runs, if any, is done (scene close, module cleanup), or
        stop it now (``kill``, the backend panel's Stop). Never waits."""
        if self.worker is not None:
            if kill and self.worker.alive():
                self.worker.kill()
            else:
                self.worker.stop()
            self.worker = None

    # --- report and screenshot

    def analysisFolder(self, segmentation: "vtkMRMLSegmentationNode") -> pathlib.Path:
        folder = segmentation.GetAttribute(OUTPUT_FOLDER_ATTRIBUTE)
        if not folder or not pathlib.Path(folder).is_dir():
            raise ValueError(_("The analysis folder of {name} is gone (it lives in Slicer's temporary folder); run "
                               "Analyze again to get a report.").format(name=segmentation.GetName()))
        return pathlib.Path(folder)

    def existingReport(self, segmentation: "vtkMRMLSegmentationNode"):
        """The report.html already built for ``segmentation``'s analysis, or None."""
        page = bridge().AnalysisOutputs(self.analysisFolder(segmentation),
                                        segmentation.GetAttribute(NAME_ATTRIBUTE) or "").report_html
        return page if page.is_file() else None

    def startReport(self, segmentation: "vtkMRMLSegmentationNode", onFinished) -> BackgroundCommand:
        """Run ``latentharmonize report`` on the analysis folder of ``segmentation`` in the background, with the
        model bundle of the analysis. The CT copy the analysis read was deleted after the run; it is written again
        from the scene, byte for byte as before (the report checks its SHA-256), and deleted afterwards."""
        b = bridge()
        folder = self.analysisFolder(segmentation)
        ctPath = b.analysis_input_path(folder)
        written = None
        if ctPath is not None and not ctPath.is_file():
            volume = self.referenceVolume(segmentation)
            written = b.write_input_volume(slicer.util.arrayFromVolume(volume), self.ijkToRAS(volume), ctPath)

        def removeCopy():
            if written is not None:
                shutil.rmtree(written.parent, ignore_errors=True)

        command = b.report_command(self.pythonSlicerExecutable(), folder,
                                   segmentation.GetAttribute(MODEL_PATH_ATTRIBUTE) or None)
        job = BackgroundCommand(command, self.backendEnvironment(), onFinished, cleanup=removeCopy)
        job.start()
        return job

    @staticmethod
    def saveScreenshot(folder, name: str) -> pathlib.Path:
        """The whole view layout (slice and 3D views) as a PNG, with Slicer's Screen Capture module."""
        import ScreenCapture

        folder = pathlib.Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{bridge().safe_volume_name(name)}_{time.strftime('%Y%m%d-%H%M%S')}.png"
        ScreenCapture.ScreenCaptureLogic().captureImageFromView(None, str(path))
        return path

    # --- results in the scene

    def loadResults(self, run: AnalysisRun) -> LatentHarmonizeResults:
        """Segmentation, composition and densitometry tables, confidence and lung maps of a finished run, placed
        beside (and under the same transform as) the input. Everything QC and export need is stored in the scene."""
        b = bridge()
        outputs = b.locate_outputs(run.outputFolder, run.name)
        inputVolume: "vtkMRMLScalarVolumeNode" = run.inputVolume
        segmentation: "vtkMRMLSegmentationNode" = slicer.util.loadSegmentation(str(outputs.segmentation))
        segmentation.SetName(slicer.mrmlScene.GenerateUniqueName(f"{inputVolume.GetName()} clusters"))
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(inputVolume)
        segmentation.SetNodeReferenceID(segmentation.GetReferenceImageGeometryReferenceRole(), inputVolume.GetID())
        segmentation.SetNodeReferenceID(CLUSTERED_VOLUME_ROLE, inputVolume.GetID())
        definitions = b.read_segment_definitions(outputs.segmentation)
        segmentation.SetAttribute(OUTPUT_FOLDER_ATTRIBUTE, str(outputs.out_dir))
        segmentation.SetAttribute(NAME_ATTRIBUTE, run.name)
        segmentation.SetAttribute(MODEL_PATH_ATTRIBUTE, str(run.modelPath or ""))
        segmentation.SetAttribute(ORIGINAL_LABELS_ATTRIBUTE, json.dumps([d.label for d in definitions]))
        segmentation.SetAttribute(MODEL_ID_ATTRIBUTE, b.read_model_id(outputs) or "")
        segmentation.SetAttribute(WARNINGS_ATTRIBUTE, json.dumps(run.warnings + b.read_warnings(outputs.out_dir)))
        self.applySegmentDefinitions(segmentation, definitions)
        segmentation.CreateDefaultDisplayNodes()
        self.setFillOpacity(segmentation, 0.5)

        lungArray = b.read_volume_array(outputs.lungs)
        lungs: "vtkMRMLLabelMapVolumeNode" = slicer.mrmlScene.AddNewNodeByClass(
            "vtkMRMLLabelMapVolumeNode", f"{inputVolume.GetName()} lung regions")
        slicer.util.updateVolumeFromArray(lungs, lungArray.array)
        lungs.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(lungArray.ijk_to_ras))
        segmentation.SetNodeReferenceID(LUNGS_REFERENCE_ROLE, lungs.GetID())

        confidenceArray = b.read_volume_array(outputs.confidence)
        confidence: "vtkMRMLScalarVolumeNode" = slicer.util.addVolumeFromArray(
            confidenceArray.array, slicer.util.vtkMatrixFromArray(confidenceArray.ijk_to_ras),
            f"{inputVolume.GetName()} confidence")

        composition = bridgeTables().read_composition(outputs.composition_csv)
        table: "vtkMRMLTableNode" = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode",
                                                                        f"{inputVolume.GetName()} composition")
        self.fillTable(table, bridgeTables().table_columns(composition))
        densitometry: "vtkMRMLTableNode" = slicer.mrmlScene.AddNewNodeByClass(
            "vtkMRMLTableNode", f"{inputVolume.GetName()} densitometry")
        self.fillTable(densitometry, b.densitometry_columns(b.read_densitometry(outputs.composition_json)))
        for node in (segmentation, confidence, table, densitometry, lungs):
            self.placeBeside(node, inputVolume)
        for node in (segmentation, confidence, lungs):
            self.placeUnderTransform(node, inputVolume)
        return LatentHarmonizeResults(segmentation, table, confidence, composition, densitometry, lungs)

    @staticmethod
    def applySegmentDefinitions(segmentation: "vtkMRMLSegmentationNode", definitions) -> None:
        """Names and colours from the backend (the segments keep the terminology the backend wrote); segment ID ->
        cluster label kept on the node for QC."""
        segments: "vtkSegmentation" = segmentation.GetSegmentation()
        labels = {}
        for definition in definitions:
            segment = segments.GetSegment(definition.segment_id)
            if segment is None:  # an empty cluster has no segment
                continue
            segment.SetName(definition.name)
            segment.SetColor(*definition.color)
            labels[definition.segment_id] = definition.label
        segmentation.SetAttribute(SEGMENT_LABELS_ATTRIBUTE, json.dumps(labels))

    @staticmethod
    def storedWarnings(segmentation: "vtkMRMLSegmentationNode") -> list:
        """The warnings of the analysis that made ``segmentation`` (saved with the scene)."""
        return json.loads(segmentation.GetAttribute(WARNINGS_ATTRIBUTE) or "[]")

    @staticmethod
    def placeBeside(node: "vtkMRMLNode", reference: "vtkMRMLNode") -> None:
        """Put ``node`` in the same subject hierarchy folder (study) as ``reference``."""
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        parent = shNode.GetItemParent(shNode.GetItemByDataNode(reference))
        shNode.SetItemParent(shNode.GetItemByDataNode(node), parent)

    @staticmethod
    def placeUnderTransform(node: "vtkMRMLTransformableNode", reference: "vtkMRMLTransformableNode") -> None:
        """Results under the input's parent transform, so they overlay the input wherever it was moved."""
        node.SetAndObserveTransformNodeID(reference.GetTransformNodeID())

    @staticmethod
    def setFillOpacity(segmentation: "vtkMRMLSegmentationNode", opacity: float) -> None:
        displayNode: "vtkMRMLSegmentationDisplayNode" = segmentation.GetDisplayNode()
        if displayNode is not None:
            displayNode.SetOpacity2DFill(opacity)

    @staticmethod
    def showConfidence(background: "vtkMRMLScalarVolumeNode", confidence: "vtkMRMLScalarVolumeNode",
                       show: bool) -> None:
        slicer.util.setSliceViewerLayers(background=background, foreground=confidence if show else None,
                                         foregroundOpacity=0.5)

    @staticmethod
    def fillTable(table: "vtkMRMLTableNode", columns) -> None:
        """Replace the table's columns with ``[(title, values)]`` from the bridge (text or numbers)."""
        wasModified = table.StartModify()
        table.RemoveAllColumns()
        for title, values in columns:
            if values.dtype.kind in "US":
                column = vtk.vtkStringArray()
                for value in values:
                    column.InsertNextValue(str(value))
            else:
                column = vtk.vtkDoubleArray()
                for value in values:
                    column.InsertNextValue(float(value))
            column.SetName(title)
            table.AddColumn(column)
        table.EndModify(wasModified)

    @staticmethod
    def showCompositionTable(table: "vtkMRMLTableNode") -> None:
        layoutManager = slicer.app.layoutManager()
        layoutManager.setLayout(slicer.modules.tables.logic().GetLayoutWithTable(layoutManager.layout))
        slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(table.GetID())
        slicer.app.applicationLogic().PropagateTableSelection()

    # --- QC: every step works on the CT the clusters were computed on (the segmentation's reference volume), never
    # on the volume currently selected as input

    @staticmethod
    def referenceVolume(segmentation: "vtkMRMLSegmentationNode") -> "vtkMRMLScalarVolumeNode":
        volume: "vtkMRMLScalarVolumeNode" = segmentation.GetNodeReference(CLUSTERED_VOLUME_ROLE)
        if volume is None:
            raise ValueError(_("{name} does not record the CT its clusters were computed on: it was not produced "
                               "by this version of LatentHarmonize, or that CT was removed from the scene.")
                             .format(name=segmentation.GetName()))
        return volume

    @staticmethod
    def lungRegions(segmentation: "vtkMRMLSegmentationNode") -> "vtkMRMLLabelMapVolumeNode":
        lungs: "vtkMRMLLabelMapVolumeNode" = segmentation.GetNodeReference(LUNGS_REFERENCE_ROLE)
        if lungs is None:
            raise ValueError(_("{name} has no lung map in the scene: it was not produced by this version of "
                               "LatentHarmonize; run Analyze first.").format(name=segmentation.GetName()))
        return lungs

    @staticmethod
    def setClusterStatus(segmentation: "vtkMRMLSegmentationNode", segmentIDs, status: int) -> None:
        """Segment Editor status (Flagged, Completed...) of each cluster; saved with the .seg.nrrd."""
        segments: "vtkSegmentation" = segmentation.GetSegmentation()
        for segmentID in segmentIDs:
            slicer.vtkSlicerSegmentationsModuleLogic.SetSegmentStatus(segments.GetSegment(segmentID), status)

    def jumpToLargestRegion(self, segmentation: "vtkMRMLSegmentationNode", segmentID: str):
        """Centre all slice views on the largest connected region of a cluster; returns the RAS point."""
        referenceVolume = self.referenceVolume(segmentation)
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentID, referenceVolume)
        center = None if mask is None else bridge().largest_region_center(mask, self.ijkToRAS(referenceVolume))
        if center is None:
            raise ValueError(_("This cluster is empty."))
        slicer.vtkMRMLSliceNode.JumpAllSlices(slicer.mrmlScene, center[0], center[1], center[2],
                                              slicer.vtkMRMLSliceNode.CenteredJumpSlice)
        return center

    def openSegmentEditor(self, segmentation: "vtkMRMLSegmentationNode") -> None:
        sourceVolume = self.referenceVolume(segmentation)
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(segmentation)
        editor.setSourceVolumeNode(sourceVolume)

    def segmentLabels(self, segmentation: "vtkMRMLSegmentationNode") -> dict:
        """Cluster label of every segment (segments drawn by the user get new labels)."""
        if not segmentation.GetAttribute(ORIGINAL_LABELS_ATTRIBUTE):
            raise ValueError(_("{name} was not produced by this version of LatentHarmonize: run Analyze first.")
                             .format(name=segmentation.GetName()))
        known = json.loads(segmentation.GetAttribute(SEGMENT_LABELS_ATTRIBUTE) or "{}")
        original = json.loads(segmentation.GetAttribute(ORIGINAL_LABELS_ATTRIBUTE))
        segmentIDs = list(segmentation.GetSegmentation().GetSegmentIDs())
        return bridge().assign_segment_labels(segmentIDs, known, reserved=original)

    def currentDefinitions(self, segmentation: "vtkMRMLSegmentationNode") -> list:
        """The clusters as they are now in the scene (after renames, merges and edits)."""
        segments: "vtkSegmentation" = segmentation.GetSegmentation()
        definitions = []
        for segmentID, label in self.segmentLabels(segmentation).items():
            segment: "vtkSegment" = segments.GetSegment(segmentID)
            definitions.append(bridge().SegmentDefinition(label, segment.GetName(), tuple(segment.GetColor()),
                                                          segmentID))
        return definitions

    def renameCluster(self, segmentation: "vtkMRMLSegmentationNode", segmentID: str, newName: str) -> None:
        labels = self.segmentLabels(segmentation)
        renamed = bridge().rename_cluster(self.currentDefinitions(segmentation), labels[segmentID], newName)
        newName = next(d.name for d in renamed if d.segment_id == segmentID)
        segmentation.GetSegmentation().GetSegment(segmentID).SetName(newName)

    def labelMap(self, segmentation: "vtkMRMLSegmentationNode", referenceVolume: "vtkMRMLScalarVolumeNode",
                 labels: dict):
        """The segments as one label map in the reference volume's voxel grid, with the given label values."""
        def masks():  # one segment at a time: a full-size CT holds ~100 MB per mask
            for segmentID, label in labels.items():
                mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentID, referenceVolume)
                if mask is not None:
                    yield label, mask

        shape = slicer.util.arrayFromVolume(referenceVolume).shape
        return bridge().labels_from_masks(masks(), shape=shape)

    def mergeClusters(self, segmentation: "vtkMRMLSegmentationNode", segmentIDs) -> str:
        """Merge the selected clusters into the first selected one; returns the kept segment ID."""
        if len(segmentIDs) < 2:
            raise ValueError(_("Select at least two clusters to merge."))
        b = bridge()
        referenceVolume = self.referenceVolume(segmentation)
        labels = self.segmentLabels(segmentation)
        target, sources = segmentIDs[0], segmentIDs[1:]
        merged = b.merge_clusters(self.labelMap(segmentation, referenceVolume, labels),
                                  [labels[s] for s in sources], labels[target])
        slicer.util.updateSegmentBinaryLabelmapFromArray((merged == labels[target]).astype("uint8"), segmentation,
                                                         target, referenceVolume)
        for segmentID in sources:
            segmentation.RemoveSegment(segmentID)
            del labels[segmentID]
        segmentation.SetAttribute(SEGMENT_LABELS_ATTRIBUTE, json.dumps(labels))
        return target

    def recomputeComposition(self, segmentation: "vtkMRMLSegmentationNode", table=None):
        """Composition of the edited segmentation, with the backend's code, from what the scene holds (the reference
        CT and the analysis' lung map); refreshes ``table`` if given."""
        referenceVolume = self.referenceVolume(segmentation)
        labels = self.segmentLabels(segmentation)
        names = {d.label: d.name for d in self.currentDefinitions(segmentation)}
        composition = bridgeTables().recompute_composition(
            self.labelMap(segmentation, referenceVolume, labels), slicer.util.arrayFromVolume(referenceVolume),
            slicer.util.arrayFromVolume(self.lungRegions(segmentation)), self.ijkToRAS(referenceVolume), names)
        if table is not None:
            self.fillTable(table, bridgeTables().table_columns(composition))
        return composition

    # --- export

    def segmentStatistics(self, segmentation: "vtkMRMLSegmentationNode", volume: "vtkMRMLScalarVolumeNode", csvPath):
        """Segment Statistics of ALL clusters (hidden ones too) into a new table node and a CSV file. A parameter
        node of its own: the Segment Statistics module's shared one keeps the user's settings, untouched."""
        import SegmentStatistics

        statsNode: "vtkMRMLScriptedModuleNode" = slicer.mrmlScene.AddNewNodeByClass(
            "vtkMRMLScriptedModuleNode", "LatentHarmonize segment statistics")
        try:
            statsLogic = SegmentStatistics.SegmentStatisticsLogic()
            statsLogic.setParameterNode(statsNode)  # also sets every plugin's defaults on it
            statsNode.SetParameter("Segmentation", segmentation.GetID())
            statsNode.SetParameter("ScalarVolume", volume.GetID())
            statsNode.SetParameter("visibleSegmentsOnly", "False")
            statsLogic.computeStatistics()
            table: "vtkMRMLTableNode" = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode",
                                                                            f"{segmentation.GetName()} statistics")
            statsLogic.exportToTable(table)
            statsLogic.exportToCSVFile(str(csvPath))
        finally:
            slicer.mrmlScene.RemoveNode(statsNode)
        self.placeBeside(table, volume)
        return table

    def exportResults(self, segmentation: "vtkMRMLSegmentationNode", folder, densitometry=None) -> list:
        """Write composition CSV/JSON (of the edited clusters), segment statistics CSV, the .seg.nrrd and, when
        given, the densitometry table as CSV; all measured on the segmentation's reference volume."""
        b = bridge()
        folder = pathlib.Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        volume = self.referenceVolume(segmentation)
        name = segmentation.GetAttribute(NAME_ATTRIBUTE) or b.safe_volume_name(volume.GetName())
        definitions = self.currentDefinitions(segmentation)
        composition = self.recomputeComposition(segmentation)
        written = [folder / f"{name}_composition.csv", folder / f"{name}_composition.json",
                   folder / f"{name}_segment_statistics.csv", folder / f"{name}.seg.nrrd"]
        bridgeTables().export_composition(composition, b.cluster_names(definitions), b.cluster_colors(definitions),
                                          written[0], written[1],
                                          model_id=segmentation.GetAttribute(MODEL_ID_ATTRIBUTE) or None)
        self.segmentStatistics(segmentation, volume, written[2])
        nodes = [(segmentation, written[3])]
        if densitometry is not None:
            written.append(folder / f"{name}_densitometry.csv")
            nodes.append((densitometry, written[-1]))
        for node, path in nodes:
            if not slicer.util.saveNode(node, str(path)):
                raise OSError(_("Could not write {path}.").format(path=path))
        return written


#
# Self-test (runs inside Slicer only)
#


class LatentHarmonizeTest(ScriptedLoadableModuleTest):
    """Runs the real analysis on SampleData's CTChest, then the QC and export steps. Under CTest (testing mode) it
    never installs anything: without PyTorch and the packages it is skipped with a message."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        try:
            self.test_AnalyzeCTChest()
        except unittest.SkipTest as skipped:
            self.delayDisplay(f"Test skipped: {skipped}")

    def test_AnalyzeCTChest(self):
        import SampleData

        logic = LatentHarmonizeLogic()
        status = logic.dependencyStatus()
        if slicer.app.testingEnabled() and not status.complete:
            self.skipTest("PyTorch or the analysis packages are not installed, and tests install nothing:\n"
                          + status.question())
        logic.ensureDependencies()

        self.delayDisplay("Loading CTChest")
        volume = SampleData.downloadSample("CTChest")
        self.delayDisplay("Analyzing (background process), twice: the second run reuses the backend worker")
        run = self.analyze(logic, volume)
        worker = logic.worker
        again = self.analyze(logic, volume)
        self.assertIs(again.worker, worker)
        self.assertFalse(run.inputPath.exists())  # the uncompressed CT copy is removed after the run

        results = logic.loadResults(run)
        segmentIDs = list(results.segmentation.GetSegmentation().GetSegmentIDs())
        self.assertGreater(len(segmentIDs), 1)
        whole = bridgeTables().whole_lung_summary(results.composition)
        self.assertAlmostEqual(sum(percent for _label, _name, percent in whole), 100.0, places=3)

        self.delayDisplay("QC: status, jump, rename, merge, recompute")
        logic.setClusterStatus(results.segmentation, segmentIDs[:1], slicer.vtkSlicerSegmentationsModuleLogic.Flagged)
        logic.jumpToLargestRegion(results.segmentation, segmentIDs[0])
        logic.renameCluster(results.segmentation, segmentIDs[0], "reviewed")
        labels = logic.segmentLabels(results.segmentation)
        before = {label: percent for label, _name, percent in whole}
        logic.mergeClusters(results.segmentation, segmentIDs[:2])
        recomputed = logic.recomputeComposition(results.segmentation, results.table)
        after = {label: percent for label, _name, percent in bridgeTables().whole_lung_summary(recomputed)}
        target, source = labels[segmentIDs[0]], labels[segmentIDs[1]]
        self.assertNotIn(source, after)
        self.assertAlmostEqual(after[target], before[target] + before[source], places=3)
        self.assertAlmostEqual(sum(after.values()), 100.0, places=3)

        self.delayDisplay("Export")
        exportFolder = pathlib.Path(slicer.util.tempDirectory("LatentHarmonizeTest"))
        for path in logic.exportResults(results.segmentation, exportFolder, results.densitometry):
            self.assertTrue(os.path.getsize(path) > 0, f"{path} is empty")
        logic.stopWorker()
        self.delayDisplay("Test passed")

    def analyze(self, logic: "LatentHarmonizeLogic", volume: "vtkMRMLScalarVolumeNode") -> AnalysisRun:
        """One Analyze, waited for while Slicer keeps processing events; fails the test unless it succeeded."""
        finished = {}
        run = logic.startAnalysis(volume, onLog=logging.info,
                                  onFinished=lambda job, returncode: finished.update(returncode=returncode))
        deadline = time.time() + 3600
        while "returncode" not in finished and time.time() < deadline:
            slicer.app.processEvents()
            time.sleep(0.1)
        self.assertIn("returncode", finished, "the analysis did not finish within an hour")
        self.assertEqual(finished["returncode"], 0, run.log.failure_message(finished["returncode"]))
        return run
