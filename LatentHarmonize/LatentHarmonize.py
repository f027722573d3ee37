"""LatentHarmonize: scanner-invariant lung tissue clusters from chest CT, inside 3D Slicer.

The module is a thin shell around the ``latentharmonize`` backend (the sub-package next to this file). The analysis
runs in a separate ``PythonSlicer`` process, so the GUI stays responsive and Cancel can stop it. That process (the
backend worker) is started when the module is opened, loads the model in the background and stays loaded between
Analyze clicks, so no click waits for PyTorch and the model to load. Every number shown to the user comes from ``latentharmonize.slicer_bridge``, which is tested outside Slicer.
"""
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
# Attributes stored on the result segmentation so QC and export work after the run
SEGMENT_LABELS_ATTRIBUTE = "LatentHarmonize.SegmentLabels"
OUTPUT_FOLDER_ATTRIBUTE = "LatentHarmonize.OutputFolder"
INPUT_PATH_ATTRIBUTE = "LatentHarmonize.InputPath"
NAME_ATTRIBUTE = "LatentHarmonize.Name"


def bridge():
    """The Slicer-free backend helpers, imported on first use (never at module import)."""
    if str(MODULE_DIR) not in sys.path:
        sys.path.insert(0, str(MODULE_DIR))
    from latentharmonize import slicer_bridge

    return slicer_bridge


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
            "Rotation in Clinical Imaging' (MICCAI AMAI 2025). Built on 3D Slicer, PyTorch and MONAI."
        )


#
# Parameter node
#


@parameterNodeWrapper
class LatentHarmonizeParameterNode:
    """Module state, saved with the scene.

    inputVolume: chest CT to analyze. maskSegmentation/maskSegmentID: optional lung mask (else automatic).
    modelPath: model bundle folder. device: where the encoder runs. resultSegmentation, compositionTable,
    confidenceVolume: outputs of the last run. fillOpacity: 2D fill opacity of the clusters. showConfidence: show
    the confidence map as foreground. exportFolder: where Export writes.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    maskSegmentation: vtkMRMLSegmentationNode
    maskSegmentID: str = ""
    modelPath: pathlib.Path = DEFAULT_MODEL
    device: Annotated[str, Choice(["auto", "CPU", "GPU"])] = "auto"
    resultSegmentation: vtkMRMLSegmentationNode
    compositionTable: vtkMRMLTableNode
    confidenceVolume: vtkMRMLScalarVolumeNode
    fillOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    showConfidence: bool = False
    exportFolder: pathlib.Path = pathlib.Path.home()


#
# Widget
#


class LatentHarmonizeWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """GUI: inputs, Analyze/Cancel, results display, QC and export."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run = None
        self._confidenceShown = False

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/LatentHarmonize.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = LatentHarmonizeLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.maskSegmentSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onMaskSelectionChanged)
        self.ui.maskSegmentSelector.connect("currentSegmentChanged(QString)", self.onMaskSelectionChanged)
        self.ui.showTableButton.connect("clicked(bool)", self.onShowTable)
        self.ui.flagButton.connect("clicked(bool)", self.onFlag)
        self.ui.completeButton.connect("clicked(bool)", self.onComplete)
        self.ui.jumpButton.connect("clicked(bool)", self.onJump)
        self.ui.segmentEditorButton.connect("clicked(bool)", self.onOpenSegmentEditor)
        self.ui.renameButton.connect("clicked(bool)", self.onRename)
        self.ui.mergeButton.connect("clicked(bool)", self.onMerge)
        self.ui.recomputeButton.connect("clicked(bool)", self.onRecompute)
        self.ui.exportButton.connect("clicked(bool)", self.onExport)
        self.ui.progressBar.setValue(0)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self._run is not None:
            self._run.cancel()
        self.logic.stopWorker()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
        try:  # only saves time: opening the module must work whatever happens here
            self.logic.prestartWorker(self._parameterNode.modelPath, self._parameterNode.device)
        except Exception:
            logging.exception("LatentHarmonize: could not start the backend in advance")

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)
        self.logic.stopWorker()

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
            self.ui.maskSegmentSelector.setCurrentNode(self._parameterNode.maskSegmentation)
            self.ui.maskSegmentSelector.setCurrentSegmentID(self._parameterNode.maskSegmentID)
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
                                           pn.maskSegmentation is not None, pn.maskSegmentID)
        self.ui.applyButton.enabled = not problems
        ready = _("Cluster the lung tissue of the input volume")
        self.ui.applyButton.toolTip = "\n".join(problems) if problems else ready

    def _updateResultsDisplay(self) -> None:
        pn = self._parameterNode
        segmentation = pn.resultSegmentation if pn else None
        self.ui.segmentsTableView.setSegmentationNode(segmentation)
        for widget in (self.ui.flagButton, self.ui.completeButton, self.ui.jumpButton, self.ui.segmentEditorButton,
                       self.ui.renameButton, self.ui.mergeButton, self.ui.recomputeButton, self.ui.exportButton):
            widget.enabled = segmentation is not None
        self.ui.showTableButton.enabled = pn is not None and pn.compositionTable is not None
        if segmentation is not None:
            self.logic.setFillOpacity(segmentation, pn.fillOpacity)
        # touch the slice views only when the checkbox changes, so the user's own layers are left alone
        if pn is not None and pn.confidenceVolume is not None and pn.showConfidence != self._confidenceShown:
            self.logic.showConfidence(pn.inputVolume, pn.confidenceVolume, pn.showConfidence)
            self._confidenceShown = pn.showConfidence

    # --- inputs

    def onMaskSelectionChanged(self, *unused) -> None:
        if self._parameterNode:
            self._parameterNode.maskSegmentation = self.ui.maskSegmentSelector.currentNode()
            self._parameterNode.maskSegmentID = self.ui.maskSegmentSelector.currentSegmentID() or ""

    # --- run

    def onApplyButton(self) -> None:
        if self._run is not None:
            self.addLog(_("Cancelling..."))
            self._run.cancel()
            return
        pn = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to start the analysis."), waitCursor=True):
            self.logic.ensureDependencies()
            self.ui.statusLabel.plainText = ""
            self.ui.progressBar.setValue(0)
            self._run = self.logic.startAnalysis(pn.inputVolume, pn.maskSegmentation, pn.maskSegmentID, pn.modelPath,
                                                 pn.device, onLog=self.addLog, onProgress=self.onProgress,
                                                 onFinished=self.onAnalysisFinished)
            self.addLog(_("Working folder: {folder}").format(folder=self._run.runFolder))
            self._checkCanApply()

    def addLog(self, text: str) -> None:
        self.ui.statusLabel.appendPlainText(text)

    def onProgress(self, event) -> None:
        self.ui.progressBar.setValue(event.percent)
        self.ui.progressBar.setFormat(f"{event.stage}: %p%")
        slicer.util.showStatusMessage(f"LatentHarmonize: {event.message or event.stage}", 3000)

    def onAnalysisFinished(self, run: "AnalysisRun", returncode: int) -> None:
        self._run = None
        self._checkCanApply()
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
        if pn is None:  # the scene was closed while the analysis ran
            self.addLog(_("The scene was closed; results are in {folder}.").format(folder=run.outputFolder))
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to load the results."), waitCursor=True):
            results = self.logic.loadResults(run)
            pn.resultSegmentation = results.segmentation
            pn.compositionTable = results.table
            pn.confidenceVolume = results.confidence
            self.logic.showCompositionTable(results.table)
            self._showSummary(results.composition)
            self.addLog(_("Analysis finished in {seconds:.0f} s.").format(seconds=run.elapsed()))

    def _showSummary(self, composition) -> None:
        lines = [f"{name}: {percent:.1f} %" for _label, name, percent in bridge().whole_lung_summary(composition)]
        self.ui.summaryLabel.text = "\n".join(lines)

    # --- results and QC

    def _selectedSegmentIDs(self) -> list:
        selected = list(self.ui.segmentsTableView.selectedSegmentIDs())
        if not selected:
            raise ValueError(_("Select one or more clusters in the list first."))
        return selected

    def onShowTable(self) -> None:
        self.logic.showCompositionTable(self._parameterNode.compositionTable)

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
            pn = self._parameterNode
            self.logic.jumpToLargestRegion(pn.resultSegmentation, self._selectedSegmentIDs()[0], pn.inputVolume)

    def onOpenSegmentEditor(self) -> None:
        self.logic.openSegmentEditor(self._parameterNode.resultSegmentation, self._parameterNode.inputVolume)

    def onRename(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to rename the cluster.")):
            self.logic.renameCluster(self._parameterNode.resultSegmentation, self._selectedSegmentIDs()[0],
                                     self.ui.renameLineEdit.text)
            self.ui.renameLineEdit.text = ""

    def onMerge(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to merge the clusters."), waitCursor=True):
            pn = self._parameterNode
            self.logic.mergeClusters(pn.resultSegmentation, self._selectedSegmentIDs(), pn.inputVolume)

    def onRecompute(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to recompute the composition."), waitCursor=True):
            pn = self._parameterNode
            composition = self.logic.recomputeComposition(pn.resultSegmentation, pn.inputVolume, pn.compositionTable)
            self._showSummary(composition)

    def onExport(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to export the results."), waitCursor=True):
            pn = self._parameterNode
            written = self.logic.exportResults(pn.resultSegmentation, pn.inputVolume, pn.exportFolder)
            self.addLog(_("Exported:") + "\n" + "\n".join(str(path) for path in written))


#
# Logic
#


class BackendWorker:
    """The resident backend process (``latentharmonize worker``), started when the module is opened (or else on the
    first Analyze). It imports the libraries and loads the model once and then analyzes one request after another,
    so the clicks skip seconds of start-up. A thread reads its output; a QTimer hands each line to the running analysis on the main thread.
    """

    def __init__(self, launch, preload=()) -> None:
        self.launch = launch
        self.preload = list(preload)  # extra options, not part of launch: a preloading worker serves any request
        self.process = None
        self.run = None
        self.idleSince = time.time()
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
        return self.process is not None and self.process.poll() is None

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
        """Stop the worker and all its children now (Cancel); the next Analyze starts a fresh one."""
        bridge().kill_process_tree(self.process.pid)

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


class AnalysisRun:
    """One Analyze: its working folder, its request to the backend worker, progress, completion and Cancel."""

    def __init__(self, worker: BackendWorker, request: str, runFolder, name,
                 inputVolume: "vtkMRMLScalarVolumeNode", onLog=None, onProgress=None, onFinished=None) -> None:
        self.worker = worker
        self.request = request
        self.runFolder = runFolder
        self.name = name
        self.inputVolume = inputVolume
        self.onLog = onLog
        self.onProgress = onProgress
        self.onFinished = onFinished
        self.log = bridge().BackendLog()
        self.cancelled = False
        self.returncode = None
        self._startTime = time.time()

    @property
    def inputPath(self) -> pathlib.Path:
        return self.runFolder / "input" / f"{self.name}.nrrd"

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
        """The result line arrived, or the worker ended (``workerReturncode``) without one."""
        self.returncode = self.log.returncode(workerReturncode)
        if self.onFinished:
            self.onFinished(self, self.returncode)

    def cancel(self) -> None:
        """Kill the worker and all its children; the completion callback still fires."""
        if self.returncode is None:
            self.cancelled = True
            self.worker.kill()


class LatentHarmonizeResults:
    """Nodes created from one analysis, plus the composition table (pandas) they show."""

    def __init__(self, segmentation: "vtkMRMLSegmentationNode", table: "vtkMRMLTableNode",
                 confidence: "vtkMRMLScalarVolumeNode", composition) -> None:
        self.segmentation = segmentation
        self.table = table
        self.confidence = confidence
        self.composition = composition


class LatentHarmonizeLogic(ScriptedLoadableModuleLogic):
    """All processing, usable without the GUI (self-test, Python console, batch scripts)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.dependenciesChecked = False
        self.worker = None

    def getParameterNode(self) -> "LatentHarmonizeParameterNode":
        return LatentHarmonizeParameterNode(super().getParameterNode())

    # --- dependencies

    def ensureDependencies(self, confirm: bool = True) -> None:
        """Install what the backend needs into Slicer's Python, after the user agrees (first Analyze only)."""
        if self.dependenciesChecked:
            return
        self._ensureTorch(confirm)
        if hasattr(slicer, "packaging"):
            requirements = slicer.packaging.load_requirements(REQUIREMENTS)
            slicer.packaging.pip_ensure(requirements, skip_packages=SKIP_PACKAGES, prompt_install=confirm,
                                        requester="LatentHarmonize")
        else:
            missing = self.missingPackages()
            if missing:
                question = _("LatentHarmonize needs these Python packages, which will now be installed:")
                if confirm and not slicer.util.confirmOkCancelDisplay(question + "\n" + "\n".join(missing)):
                    raise RuntimeError(_("Installation declined: the analysis needs these packages."))
                slicer.util.pip_install(" ".join(shlex.quote(r) for r in missing))
        self.dependenciesChecked = True

    def _ensureTorch(self, confirm: bool) -> None:
        """PyTorch comes through the PyTorch extension, which picks the build matching the GPU driver."""
        try:
            import PyTorchUtils
        except ModuleNotFoundError as exc:
            raise RuntimeError(_("LatentHarmonize needs the PyTorch extension. Install 'PyTorch' from the "
                                 "Extensions Manager, restart Slicer and click Analyze again.")) from exc
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if torchLogic.torchInstalled():
            return
        if confirm and not slicer.util.confirmOkCancelDisplay(
                _("PyTorch is not installed yet. Install it now? This can take several minutes.")):
            raise RuntimeError(_("Installation declined: the analysis needs PyTorch."))
        torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=MIN_TORCH)

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
                      onFinished=None) -> AnalysisRun:
        """Write the input (and mask) to a temporary folder and send it to the backend worker (started when none
        can take it); returns the running job."""
        b = bridge()
        problems = b.missing_inputs(inputVolume is not None, modelPath, maskSegmentation is not None, maskSegmentID)
        if problems:
            raise ValueError("\n".join(problems))
        runFolder = pathlib.Path(slicer.util.tempDirectory("LatentHarmonize"))
        name = b.safe_volume_name(inputVolume.GetName())
        ijkToRAS = self.ijkToRAS(inputVolume)
        inputPath = b.write_input_volume(slicer.util.arrayFromVolume(inputVolume), ijkToRAS,
                                         runFolder / "input" / f"{name}.nrrd")
        maskPath = None
        if maskSegmentation is not None and maskSegmentID:
            mask = slicer.util.arrayFromSegmentBinaryLabelmap(maskSegmentation, maskSegmentID, inputVolume)
            maskPath = b.write_mask(mask, ijkToRAS, runFolder / "input" / "lung_mask.nrrd")
        worker = self.backendWorker(self.workerLaunch())
        request = b.worker_request(inputPath, runFolder / "out", maskPath, modelPath, device)
        run = AnalysisRun(worker, request, runFolder, name, inputVolume, onLog, onProgress, onFinished)
        run.start()
        return run

    def backendWorker(self, launch) -> BackendWorker:
        """The running backend worker if it can take a request started with ``launch``, else a fresh one."""
        worker = self.worker
        if worker is not None and bridge().can_reuse_worker(worker.launch, launch, worker.alive(),
                                                            worker.run is not None, time.time() - worker.idleSince):
            return worker
        return self._startWorker(launch)

    def dependenciesInstalled(self) -> bool:
        """Whether PyTorch and the Python packages are already there (checked without asking or installing)."""
        if self.dependenciesChecked:
            return True
        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            return False
        if not PyTorchUtils.PyTorchUtilsLogic().torchInstalled():
            return False
        return not self.missingPackages()

    @staticmethod
    def missingPackages() -> list:
        """The backend's requirements that Slicer's Python lacks or has in too old a version."""
        return bridge().missing_requirements(bridge().read_requirements(REQUIREMENTS))

    def prestartWorker(self, modelPath=DEFAULT_MODEL, device="auto") -> None:
        """Start the backend worker when the module is opened, loading the model and libraries in the background,
        so that even the first Analyze is answered warm. Nothing happens while a worker runs or before the
        dependencies are installed (installing asks the user first, on Analyze)."""
        if (self.worker is not None and self.worker.alive()) or not self.dependenciesInstalled():
            return
        self._startWorker(self.workerLaunch(), bridge().preload_arguments(modelPath, device))

    def _startWorker(self, launch, preload=()) -> BackendWorker:
        """Replace the backend worker by a fresh one started with ``launch`` (and ``preload`` options)."""
        self.stopWorker()
        self.worker = BackendWorker(launch, preload)
        self.worker.start()
        return self.worker

    def workerLaunch(self):
        """How the backend worker starts: PythonSlicer runs ``latentharmonize worker`` from the module folder."""
        b = bridge()
        command = b.build_worker_command(self.pythonSlicerExecutable())
        environment = b.backend_environment(MODULE_DIR, slicer.util.startupEnvironment().get("PYTHONPATH"))
        return b.worker_launch(command, environment, MODULE_DIR)

    def stopWorker(self) -> None:
        """Let the backend worker exit once the analysis it runs, if any, is done (scene close, module cleanup)."""
        if self.worker is not None:
            self.worker.stop()
            self.worker = None

    # --- results in the scene

    def loadResults(self, run: AnalysisRun) -> LatentHarmonizeResults:
        """Segmentation, composition table and confidence map of a finished run, placed beside the input."""
        b = bridge()
        outputs = b.locate_outputs(run.outputFolder, run.name)
        inputVolume: "vtkMRMLScalarVolumeNode" = run.inputVolume
        segmentation: "vtkMRMLSegmentationNode" = slicer.util.loadSegmentation(str(outputs.segmentation))
        segmentation.SetName(slicer.mrmlScene.GenerateUniqueName(f"{inputVolume.GetName()} clusters"))
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(inputVolume)
        segmentation.SetNodeReferenceID(segmentation.GetReferenceImageGeometryReferenceRole(), inputVolume.GetID())
        segmentation.SetAttribute(OUTPUT_FOLDER_ATTRIBUTE, str(outputs.out_dir))
        segmentation.SetAttribute(INPUT_PATH_ATTRIBUTE, str(run.inputPath))
        segmentation.SetAttribute(NAME_ATTRIBUTE, run.name)
        self.applySegmentDefinitions(segmentation, b.read_segment_definitions(outputs.segmentation))
        segmentation.CreateDefaultDisplayNodes()
        self.setFillOpacity(segmentation, 0.5)

        confidenceArray = b.read_volume_array(outputs.confidence)
        confidence: "vtkMRMLScalarVolumeNode" = slicer.util.addVolumeFromArray(
            confidenceArray.array, slicer.util.vtkMatrixFromArray(confidenceArray.ijk_to_ras),
            f"{inputVolume.GetName()} confidence")

        composition = b.read_composition(outputs.composition_csv)
        table: "vtkMRMLTableNode" = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode",
                                                                        f"{inputVolume.GetName()} composition")
        self.fillCompositionTable(table, composition)
        for node in (segmentation, confidence, table):
            self.placeBeside(node, inputVolume)
        return LatentHarmonizeResults(segmentation, table, confidence, composition)

    @staticmethod
    def applySegmentDefinitions(segmentation: "vtkMRMLSegmentationNode", definitions) -> None:
        """Names and colours from the backend; segment ID -> cluster label kept on the node for QC."""
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
    def placeBeside(node: "vtkMRMLNode", reference: "vtkMRMLNode") -> None:
        """Put ``node`` in the same subject hierarchy folder (study) as ``reference``."""
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        parent = shNode.GetItemParent(shNode.GetItemByDataNode(reference))
        shNode.SetItemParent(shNode.GetItemByDataNode(node), parent)

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
    def fillCompositionTable(table: "vtkMRMLTableNode", composition) -> None:
        """Replace the table's columns with the composition (titles and units from the bridge)."""
        wasModified = table.StartModify()
        table.RemoveAllColumns()
        for title, values in bridge().table_columns(composition):
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

    # --- QC

    @staticmethod
    def setClusterStatus(segmentation: "vtkMRMLSegmentationNode", segmentIDs, status: int) -> None:
        """Segment Editor status (Flagged, Completed...) of each cluster; saved with the .seg.nrrd."""
        segments: "vtkSegmentation" = segmentation.GetSegmentation()
        for segmentID in segmentIDs:
            slicer.vtkSlicerSegmentationsModuleLogic.SetSegmentStatus(segments.GetSegment(segmentID), status)

    def jumpToLargestRegion(self, segmentation: "vtkMRMLSegmentationNode", segmentID: str,
                            referenceVolume: "vtkMRMLScalarVolumeNode"):
        """Centre all slice views on the largest connected region of a cluster; returns the RAS point."""
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentID, referenceVolume)
        center = None if mask is None else bridge().largest_region_center(mask, self.ijkToRAS(referenceVolume))
        if center is None:
            raise ValueError(_("This cluster is empty."))
        slicer.vtkMRMLSliceNode.JumpAllSlices(slicer.mrmlScene, center[0], center[1], center[2],
                                              slicer.vtkMRMLSliceNode.CenteredJumpSlice)
        return center

    @staticmethod
    def openSegmentEditor(segmentation: "vtkMRMLSegmentationNode", sourceVolume: "vtkMRMLScalarVolumeNode") -> None:
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(segmentation)
        editor.setSourceVolumeNode(sourceVolume)

    def segmentLabels(self, segmentation: "vtkMRMLSegmentationNode") -> dict:
        """Cluster label of every segment (segments drawn by the user get new labels)."""
        known = json.loads(segmentation.GetAttribute(SEGMENT_LABELS_ATTRIBUTE) or "{}")
        original = [d.label for d in bridge().read_segment_definitions(self.analysisOutputs(segmentation).segmentation)]
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
        """The segments as one label map in the input's voxel grid, with the clusters' label values."""
        def masks():  # one segment at a time: a full-size CT holds ~100 MB per mask
            for segmentID, label in labels.items():
                mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segmentID, referenceVolume)
                if mask is not None:
                    yield label, mask

        shape = slicer.util.arrayFromVolume(referenceVolume).shape
        return bridge().labels_from_masks(masks(), shape=shape)

    def mergeClusters(self, segmentation: "vtkMRMLSegmentationNode", segmentIDs, referenceVolume) -> str:
        """Merge the selected clusters into the first selected one; returns the kept segment ID."""
        if len(segmentIDs) < 2:
            raise ValueError(_("Select at least two clusters to merge."))
        b = bridge()
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

    @staticmethod
    def analysisOutputs(segmentation: "vtkMRMLSegmentationNode"):
        """The backend outputs a result segmentation was loaded from (needed to recompute and export)."""
        folder = segmentation.GetAttribute(OUTPUT_FOLDER_ATTRIBUTE)
        if not folder or not segmentation.GetAttribute(INPUT_PATH_ATTRIBUTE):
            raise ValueError(_("{name} was not produced by LatentHarmonize in this session: run Analyze first.")
                             .format(name=segmentation.GetName()))
        return bridge().locate_outputs(folder, segmentation.GetAttribute(NAME_ATTRIBUTE))

    def recomputeComposition(self, segmentation: "vtkMRMLSegmentationNode", referenceVolume, table=None):
        """Composition of the edited segmentation, with the backend's code; refreshes ``table`` if given."""
        outputs = self.analysisOutputs(segmentation)
        labels = self.segmentLabels(segmentation)
        names = {d.label: d.name for d in self.currentDefinitions(segmentation)}
        composition = bridge().recompute_composition(self.labelMap(segmentation, referenceVolume, labels),
                                                     segmentation.GetAttribute(INPUT_PATH_ATTRIBUTE),
                                                     outputs.lungs, names)
        if table is not None:
            self.fillCompositionTable(table, composition)
        return composition

    # --- export

    def segmentStatistics(self, segmentation: "vtkMRMLSegmentationNode", volume: "vtkMRMLScalarVolumeNode", csvPath):
        """Segment Statistics of ALL clusters (hidden ones too) into a new table node and a CSV file."""
        import SegmentStatistics

        statsLogic = SegmentStatistics.SegmentStatisticsLogic()
        statsNode: "vtkMRMLScriptedModuleNode" = statsLogic.getParameterNode()
        statsNode.SetParameter("Segmentation", segmentation.GetID())
        statsNode.SetParameter("ScalarVolume", volume.GetID())
        statsNode.SetParameter("visibleSegmentsOnly", "False")
        statsLogic.computeStatistics()
        table: "vtkMRMLTableNode" = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode",
                                                                        f"{segmentation.GetName()} statistics")
        statsLogic.exportToTable(table)
        statsLogic.exportToCSVFile(str(csvPath))
        self.placeBeside(table, volume)
        return table

    def exportResults(self, segmentation: "vtkMRMLSegmentationNode", volume: "vtkMRMLScalarVolumeNode", folder) -> list:
        """Write composition CSV/JSON (of the edited clusters), segment statistics CSV and the .seg.nrrd."""
        b = bridge()
        folder = pathlib.Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        outputs = self.analysisOutputs(segmentation)
        name = outputs.name
        definitions = self.currentDefinitions(segmentation)
        composition = self.recomputeComposition(segmentation, volume)
        written = [folder / f"{name}_composition.csv", folder / f"{name}_composition.json",
                   folder / f"{name}_segment_statistics.csv", folder / f"{name}.seg.nrrd"]
        b.export_composition(composition, b.cluster_names(definitions), b.cluster_colors(definitions),
                             written[0], written[1], model_id=b.read_model_id(outputs))
        self.segmentStatistics(segmentation, volume, written[2])
        if not slicer.util.saveNode(segmentation, str(written[3])):
            raise OSError(_("Could not write {path}.").format(path=written[3]))
        return written


#
# Self-test (runs inside Slicer only)
#


class LatentHarmonizeTest(ScriptedLoadableModuleTest):
    """Runs the real analysis on SampleData's CTChest, then the QC and export steps."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_AnalyzeCTChest()

    def test_AnalyzeCTChest(self):
        import SampleData

        self.delayDisplay("Loading CTChest")
        volume = SampleData.downloadSample("CTChest")
        logic = LatentHarmonizeLogic()
        logic.ensureDependencies(confirm=False)

        self.delayDisplay("Analyzing (background process), twice: the second run reuses the backend worker")
        run = self.analyze(logic, volume)
        worker = logic.worker
        again = self.analyze(logic, volume)
        self.assertIs(again.worker, worker)

        results = logic.loadResults(run)
        segmentIDs = list(results.segmentation.GetSegmentation().GetSegmentIDs())
        self.assertGreater(len(segmentIDs), 1)
        whole = bridge().whole_lung_summary(results.composition)
        self.assertAlmostEqual(sum(percent for _label, _name, percent in whole), 100.0, places=3)

        self.delayDisplay("QC: status, jump, rename, merge, recompute")
        logic.setClusterStatus(results.segmentation, segmentIDs[:1], slicer.vtkSlicerSegmentationsModuleLogic.Flagged)
        logic.jumpToLargestRegion(results.segmentation, segmentIDs[0], volume)
        logic.renameCluster(results.segmentation, segmentIDs[0], "reviewed")
        labels = logic.segmentLabels(results.segmentation)
        before = {label: percent for label, _name, percent in whole}
        logic.mergeClusters(results.segmentation, segmentIDs[:2], volume)
        recomputed = logic.recomputeComposition(results.segmentation, volume, results.table)
        after = {label: percent for label, _name, percent in bridge().whole_lung_summary(recomputed)}
        target, source = labels[segmentIDs[0]], labels[segmentIDs[1]]
        self.assertNotIn(source, after)
        self.assertAlmostEqual(after[target], before[target] + before[source], places=3)
        self.assertAlmostEqual(sum(after.values()), 100.0, places=3)

        self.delayDisplay("Export")
        exportFolder = pathlib.Path(slicer.util.tempDirectory("LatentHarmonizeTest"))
        for path in logic.exportResults(results.segmentation, volume, exportFolder):
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
