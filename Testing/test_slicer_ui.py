"""The module's .ui file against the module's code, with PySide6 offscreen (no Slicer needed).

Slicer's .ui uses CTK and qMRML widget classes that Qt's QUiLoader does not know. The .ui XML is therefore parsed for
the widget names and classes (what the checks compare), and for loading, each custom class is replaced by the base
class its <customwidget> entry declares (QWidget); the Qt widgets keep their real classes. The module file is read as
text and parsed with ``ast``: it imports Slicer's application modules, so it cannot be imported here. Parts of it that
need none of them (an enum, the widget's progress display) are executed on their own (:func:`module_code`).
"""

import argparse
import ast
import enum
import os
import re
import sys
import textwrap
import types
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable, List, Optional, Sequence, TypeVar

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "SFRSegment" / "SFRSegment.py"
UI_FILE = ROOT / "Resources" / "UI" / "SFRSegment.ui"
sys.path.insert(0, str(ROOT / "SFRSegment"))

SUFFIX_CLASSES = {
    # Name endings the module uses, and the classes such a widget may have.
    "CollapsibleButton": {"ctkCollapsibleButton"},
    "Button": {"QPushButton", "ctkPushButton"},
    "ComboBox": {"QComboBox"},  # connectGui binds enums to exactly QComboBox
    "Selector": {"qMRMLNodeComboBox"},
    "SpinBox": {"QSpinBox"},
    "CheckBox": {"QCheckBox"},
    "Table": {"QTableWidget"},
    "ListWidget": {"QListWidget"},
    "TextEdit": {"QPlainTextEdit"},
    "ProgressBar": {"QProgressBar"},
    "Label": {"QLabel"},
    "PathLineEdit": {"ctkPathLineEdit"},
    "LineEdit": {"QLineEdit"},
}
# Which widget classes connectGui can bind to which parameter types (Slicer's parameterNodeWrapper connectors).
BINDABLE = {"bool": {"QCheckBox"}, "int": {"QSpinBox", "QSlider"}, "enum": {"QComboBox"},
            "node": {"qMRMLNodeComboBox"}}


def ui_widgets():
    """{object name: class} of every widget in the .ui file."""
    return {w.get("name"): w.get("class") for w in ET.parse(UI_FILE).getroot().iter("widget")}


def parameter_names():
    """{object name: SlicerParameterName} of the widgets bound to the parameter node."""
    bound = {}
    for widget in ET.parse(UI_FILE).getroot().iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[widget.get("name")] = prop.findtext("string")
    return bound


def module_tree():
    return ast.parse(MODULE.read_text(encoding="utf-8"))


def module_class(name):
    return next(node for node in module_tree().body if isinstance(node, ast.ClassDef) and node.name == name)


def enum_names():
    """The module's enums: the names it assigns a ``choiceEnum(...)`` to."""
    return [node.targets[0].id for node in module_tree().body if isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Call) and getattr(node.value.func, "id", None) == "choiceEnum"]


def parameter_fields():
    """{field: kind} of SFRSegmentParameterNode, kind being bool, int, str, enum, node or list."""
    enums = set(enum_names())
    fields = {}
    for statement in module_class("SFRSegmentParameterNode").body:
        if isinstance(statement, ast.AnnAssign):
            annotation = ast.unparse(statement.annotation)
            kind = re.sub(r"^Annotated\[(\w+),.*\]$", r"\1", annotation)
            if kind in enums:
                kind = "enum"
            elif kind.startswith("vtkMRML"):
                kind = "node"
            elif kind.startswith("list["):
                kind = "list"
            fields[statement.target.id] = kind
    return fields


def parameter_ranges():
    """{field: (low, high)} of the SFRSegmentParameterNode fields annotated with WithinRange(low, high)."""
    ranges = {}
    for statement in module_class("SFRSegmentParameterNode").body:
        if isinstance(statement, ast.AnnAssign):
            for call in ast.walk(statement.annotation):
                if isinstance(call, ast.Call) and ast.unparse(call.func) == "WithinRange":
                    ranges[statement.target.id] = tuple(ast.literal_eval(argument) for argument in call.args)
    return ranges


def module_code(*, classes=(), functions=(), assignments=(), widget_methods=(), **names):
    """A namespace running the named classes, functions and module-level assignments of SFRSegment.py, and the named
    SFRSegmentWidget methods as methods of its class ``Widget``; ``names`` are what they use besides, and ``_``
    returns its text."""
    source = MODULE.read_text(encoding="utf-8")
    tree = module_tree()
    wanted = set(classes) | set(functions) | set(assignments)

    def name(node):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            return node.name
        return node.targets[0].id if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) else None

    parts = [ast.get_source_segment(source, node) for node in tree.body if name(node) in wanted]
    methods = [textwrap.indent(textwrap.dedent(ast.get_source_segment(source, node, padded=True)), "    ")
               for node in module_class("SFRSegmentWidget").body
               if isinstance(node, ast.FunctionDef) and node.name in widget_methods]
    assert len(parts) == len(wanted) and len(methods) == len(widget_methods), "a name is missing in SFRSegment.py"
    code = "\n\n".join([*parts, "class Widget:\n" + "\n".join(methods) if methods else ""])
    namespace = types.SimpleNamespace(_=lambda text: text, **names)
    exec(compile(code, str(MODULE), "exec"), namespace.__dict__)
    return namespace


class PythonQtWidget:
    """A PySide6 widget as PythonQt, Slicer's Qt binding, shows it to Python: Qt properties (declared or dynamic) are
    read and written as attributes (``label.text = ...``), the rest is the widget's own."""

    def __init__(self, widget):
        object.__setattr__(self, "widget", widget)

    def __getattr__(self, name):
        dynamic = [bytes(n).decode() for n in self.widget.dynamicPropertyNames()]
        if self.widget.metaObject().indexOfProperty(name) >= 0 or name in dynamic:
            return self.widget.property(name)
        return getattr(self.widget, name)

    def __setattr__(self, name, value):
        self.widget.setProperty(name, value)


def referenced_widgets():
    return sorted(set(re.findall(r"self\.ui\.(\w+)", MODULE.read_text(encoding="utf-8"))))


def test_every_widget_the_module_uses_exists_with_a_sensible_class():
    widgets = ui_widgets()
    referenced = referenced_widgets()
    assert len(referenced) >= 10  # the parse found the module's uses
    for name in referenced:
        assert name in widgets, f"SFRSegment.py uses self.ui.{name}, which the .ui file lacks"
        suffix = next((s for s in SUFFIX_CLASSES if name.lower().endswith(s.lower())), None)
        assert suffix is not None, f"{name}: its name does not say what kind of widget it is"
        assert widgets[name] in SUFFIX_CLASSES[suffix], f"{name} is a {widgets[name]}"


def test_the_buttons_the_issue_asks_for_are_there():
    texts = {}
    for widget in ET.parse(UI_FILE).getroot().iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "text":
                texts[widget.get("name")] = prop.findtext("string")
    assert texts["runButton"] == "Run"
    assert texts["applyButton"] == "Apply model to selected volume"
    assert texts["openReportButton"] == "Open report"
    assert (texts["editSegmentationButton"], texts["useAsLabelsButton"], texts["updateModelButton"]) == (
        "Edit in Segment Editor", "Use as labels", "Update model")
    assert "self.ui.runButton.text = _(\"Cancel\") if running" in MODULE.read_text(encoding="utf-8")


def test_bound_widgets_match_the_parameter_node():
    fields = parameter_fields()
    widgets = ui_widgets()
    bound = parameter_names()
    assert len(set(bound.values())) == len(bound), "two widgets are bound to the same parameter"
    for widget, parameter in bound.items():
        assert parameter in fields, f"{widget} is bound to '{parameter}', which SFRSegmentParameterNode lacks"
        assert widgets[widget] in BINDABLE.get(fields[parameter], set()), \
            f"{widget} ({widgets[widget]}) cannot show the {fields[parameter]} parameter '{parameter}'"
    source = MODULE.read_text(encoding="utf-8")
    for parameter in set(fields) - set(bound.values()):
        # Parameters without a bound widget must be kept up to date by the module's own code.
        assert re.search(rf"_parameterNode\.{parameter}\s*=", source), f"nothing ever sets '{parameter}'"


def module_enums():
    """The module's enums, built as the module builds them from the engine's lists."""
    from SFRSegmentLib.base import choices

    names = enum_names()
    return module_code(functions=["choiceEnum"], assignments=names, enum=enum, choices=choices, Sequence=Sequence,
                       Callable=Callable)


def test_enum_choices_are_the_engine_configuration_values():
    """The module, its job files and the command line offer the same lists: the engine's choices."""
    from SFRSegmentLib.base import choices
    from SFRSegmentLib.cli import build_parser
    from SFRSegmentLogicLib import jobs

    enums = module_enums()
    assert set(enum_names()) == {"SslMethod", "PseudoLabelSource", "Device", "Preset"}
    assert tuple(member.value for member in enums.SslMethod) == choices.SSL_METHODS
    assert tuple(member.value for member in enums.PseudoLabelSource) == choices.PSEUDO_LABEL_SOURCES
    assert tuple(member.value for member in enums.Device) == choices.DEVICES
    assert tuple(member.value for member in enums.Preset) == choices.PRESETS
    assert (jobs.SSL_METHODS, jobs.PSEUDO_LABEL_SOURCES, jobs.DEVICES, jobs.PRESETS) == (
        choices.SSL_METHODS, choices.PSEUDO_LABEL_SOURCES, choices.DEVICES, choices.PRESETS)
    assert [member.label() for member in enums.SslMethod] == [choices.SSL_METHOD_TITLES[m] for m in choices.SSL_METHODS]
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    offered = {(name, action.option_strings[0]): tuple(action.choices) for name, parser in commands.items()
               for action in parser._actions if action.choices is not None and action.option_strings}
    method_flags = ("--preset", "--method", "--methods", "--ssl-method", "--pseudo-labels")
    assert {key: value for key, value in offered.items() if key[1] in method_flags} == {
        **{(name, "--preset"): choices.PRESETS
           for name in ("run", "reproduce", "finetune", "pseudolabel", "retrain", "predict")},
        ("retrain", "--method"): choices.METHODS, ("reproduce", "--methods"): choices.METHODS,
        ("retrain", "--ssl-method"): choices.SSL_METHODS, ("retrain", "--pseudo-labels"): choices.PSEUDO_LABEL_SOURCES}
    assert offered[("run", "--redo")] == choices.STAGES
    assert {key: value for key, value in offered.items() if key[1] == "--precision"} == {
        (name, "--precision"): choices.PRECISIONS for name in ("finetune", "pseudolabel", "retrain", "predict")}


def test_each_run_setting_is_a_parameter_node_field_of_a_kind_that_holds_it():
    """RunSettings declares the run settings; the parameter node must hold each under the name it gives, with the
    "preset's value" sentinel inside the field's range."""
    import dataclasses

    from SFRSegmentLogicLib.jobs import RunSettings

    fields, ranges = parameter_fields(), parameter_ranges()
    kinds = {str: {"str", "enum"}, bool: {"bool"}}
    for spec in dataclasses.fields(RunSettings):
        names = spec.metadata["parameter"]
        for name in (names,) if isinstance(names, str) else names:
            expected = kinds.get(type(spec.default), {"int"}) if spec.default is not None else {"int"}
            assert fields.get(name) in expected, (spec.name, name, fields.get(name))
            unset = spec.metadata["unset"]
            if unset is not None:
                low, high = ranges[name]
                assert low <= unset <= high, (spec.name, name, unset, ranges[name])


def test_user_visible_strings_are_translatable():
    """Texts given to labels, buttons, tooltips, combo boxes and dialogs go through _() (slicer.i18n.tr)."""
    tree = module_tree()
    translated = {id(constant) for call in ast.walk(tree)
                  if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "_"
                  for constant in ast.walk(call)}
    shown = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in (
                "errorDisplay", "infoDisplay", "confirmOkCancelDisplay", "confirmYesNoDisplay", "setToolTip",
                "addItem", "_showStatus"):
            shown += node.args[:1]
        elif isinstance(node, ast.Assign) and any(isinstance(target, ast.Attribute)
                                                  and target.attr in ("text", "toolTip") for target in node.targets):
            shown.append(node.value)
    assert len(shown) >= 10  # the walk found the module's texts
    untranslated = [(constant.lineno, constant.value) for expression in shown for constant in ast.walk(expression)
                    if isinstance(constant, ast.Constant) and isinstance(constant.value, str)
                    and any(c.isalpha() for c in constant.value) and id(constant) not in translated]
    assert untranslated == []


def test_qmrml_widgets_get_the_scene():
    root = ET.parse(UI_FILE).getroot()
    top = root.find("widget").get("name")
    receivers = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("sender") == top and c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
                 and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    for name, cls in ui_widgets().items():
        if cls.startswith("qMRML") and name != top:
            assert name in receivers, f"{name} is never given the MRML scene"


@pytest.fixture(scope="module")
def loaded_ui():
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    QtWidgets = pytest.importorskip("PySide6.QtWidgets")
    QtUiTools = pytest.importorskip("PySide6.QtUiTools")
    QtCore = pytest.importorskip("PySide6.QtCore")
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    root = ET.parse(UI_FILE).getroot()
    bases = {entry.findtext("class"): entry.findtext("extends") for entry in root.iter("customwidget")}
    for widget in root.iter("widget"):
        widget.set("class", bases.get(widget.get("class"), widget.get("class")))
    for section in ("customwidgets", "connections"):  # the slots of CTK/qMRML classes do not exist here
        for element in root.findall(section):
            root.remove(element)
    buffer = QtCore.QBuffer()
    buffer.setData(QtCore.QByteArray(ET.tostring(root)))
    buffer.open(QtCore.QIODevice.ReadOnly)
    loader = QtUiTools.QUiLoader()
    widget = loader.load(buffer)
    assert widget is not None, loader.errorString()
    yield widget, QtWidgets
    widget.deleteLater()
    app.processEvents()


def test_the_ui_loads_and_every_referenced_widget_is_found(loaded_ui):
    widget, QtWidgets = loaded_ui
    classes = ui_widgets()
    for name in referenced_widgets():
        child = widget.findChild(QtWidgets.QWidget, name)
        assert child is not None, name
        if classes[name].startswith("Q"):
            assert child.metaObject().className() == classes[name]
    bound = parameter_names()
    for name, parameter in bound.items():
        assert widget.findChild(QtWidgets.QWidget, name).property("SlicerParameterName") == parameter
    table = widget.findChild(QtWidgets.QTableWidget, "inputsTable")
    assert table.columnCount() == 2
    assert [table.horizontalHeaderItem(c).text() for c in range(2)] == ["Volume", "Labels"]
    for name in ("fineTuneIterationsSpinBox", "retrainIterationsSpinBox", "batchSizeSpinBox", "seedSpinBox"):
        assert widget.findChild(QtWidgets.QSpinBox, name).specialValueText()  # "0 / -1: from the preset" is shown
    assert widget.findChild(QtWidgets.QPlainTextEdit, "logTextEdit").isReadOnly()


def test_every_engine_stage_has_a_title():
    from SFRSegmentLib.base import choices
    from SFRSegmentLib.run.pipeline import STAGES

    assert STAGES is choices.STAGES and set(choices.STAGE_TITLES) >= {"validate", "estimate", *STAGES}
    stage_title = module_code(functions=["stageTitle"], choices=choices).stageTitle
    assert stage_title("retrain") == "Re-training the V-Net" and stage_title("unknown") == "unknown"


def test_the_preset_combo_box_offers_every_preset_with_a_label_saying_what_it_is_for(loaded_ui):
    from SFRSegmentLogicLib import jobs

    widget, QtWidgets = loaded_ui
    assert parameter_names()["presetComboBox"] == jobs.PRESET_PARAMETER  # the name a new node's preset is set by
    assert parameter_fields()[jobs.PRESET_PARAMETER] == "enum"
    Preset = module_enums().Preset
    combo = widget.findChild(QtWidgets.QComboBox, "presetComboBox")
    # connectGui fills the combo box from the enum: one item per member, in order, named by its label()
    # (slicer.parameterNodeWrapper.guiConnectors.QComboBoxToEnumConnector).
    combo.clear()
    combo.addItems([member.label() for member in Preset])
    assert tuple(member.value for member in Preset) == jobs.PRESETS
    labels = dict(zip(jobs.PRESETS, (combo.itemText(index) for index in range(combo.count()))))
    assert labels == {"paper": "Paper (full size; needs a GPU)", "cpu": "CPU (real scans, no GPU; about 1 h on 2 cores)",
                      "small": "Small (quick tests and demos; not for real data)"}
    assert "not for real data" in combo.toolTip() and "without a GPU" in combo.toolTip()


def test_a_new_nodes_model_is_set_by_the_name_the_parameter_node_gives_it():
    from SFRSegmentLogicLib import jobs

    assert parameter_fields()[jobs.MODEL_PARAMETER] == "str"  # jobs.new_node_model looks for a model by that name
    assert "model = jobs.new_node_model(node, preset or node.GetParameter(jobs.PRESET_PARAMETER))" in \
        MODULE.read_text(encoding="utf-8")


MISSING_SAM_WARNING = ("no pretrained SAM checkpoint (sam_vit_b) is on this machine, so SAM is not fine-tuned (never "
                       "from random weights): re-training mt without the SFR term instead of sfr_mt.")


def test_an_engine_warning_stays_in_the_status_line_and_opens_the_log(loaded_ui, tmp_path):
    """JSON lines from a child process, read by the module's EngineJob, shown by the widget's own onProgress."""
    from SFRSegmentLogicLib.process import ChildProcessRunner, EngineJob, ProgressEvent, Status, engine_environment

    widget, QtWidgets = loaded_ui
    from SFRSegmentLib.base import choices

    from SFRSegmentLib.base.events import format_duration

    parts = module_code(functions=["stageTitle", "formatDuration"],
                        widget_methods=["onProgress", "_showStatus", "onLog"], ProgressEvent=ProgressEvent,
                        choices=choices, format_duration=format_duration)
    view = parts.Widget()
    view.ui = types.SimpleNamespace(**{name: PythonQtWidget(widget.findChild(QtWidgets.QWidget, name)) for name in (
        "statusLabel", "logTextEdit", "progressBar", "logCollapsibleButton")})
    view._runWarning = ""  # as _startRun leaves it
    view.ui.logTextEdit.clear()
    events = [ProgressEvent("validate", 1, 1, message="2 cases"),
              ProgressEvent("validate", 1, 1, level="warning", message=MISSING_SAM_WARNING),
              ProgressEvent("retrain", 5, 10, loss=0.25, eta_s=75)]
    script = tmp_path / "engine.py"
    script.write_text("".join(f"print({event.to_json()!r}, flush=True)\n" for event in events), encoding="utf-8")
    process = ChildProcessRunner().start([sys.executable, str(script)], engine_environment(os.environ, ROOT), tmp_path)
    job = EngineJob(process, on_progress=view.onProgress, on_log=view.onLog)
    assert job.wait(interval_s=0.05).status == Status.SUCCEEDED

    status = view.ui.statusLabel.text
    assert status.splitlines() == ["Re-training the V-Net 5/10 · loss 0.2500 · 1 min 15 s left",
                                   f"Warning: {MISSING_SAM_WARNING}"]
    log = view.ui.logTextEdit.plainText.splitlines()
    assert log == ["[Checking the inputs] 2 cases", f"[Checking the inputs] WARNING: {MISSING_SAM_WARNING}"]
    assert view.ui.logCollapsibleButton.collapsed is False
    assert view.ui.progressBar.value == 500


def test_the_past_jobs_table_shows_each_job_and_offers_what_its_state_allows(loaded_ui, tmp_path):
    """The widget's own code fills the .ui's jobs table from job summaries and enables the buttons for the selected
    job: reopen a finished job, resume an unfinished one (not while a run is going), delete any but a running one."""
    import time

    from SFRSegmentLogicLib import jobs
    from SFRSegmentLogicLib.history import JobSummary
    from SFRSegmentLogicLib.jobs import JobState

    widget, QtWidgets = loaded_ui
    qt = types.SimpleNamespace(QTableWidgetItem=QtWidgets.QTableWidgetItem)
    parts = module_code(functions=["jobStateTitle", "formatSize", "selectedRow"], assignments=["Row"],
                        widget_methods=["_showPastJobs", "_selectedJob", "_updateJobButtons"], qt=qt, time=time,
                        Path=Path, JobState=JobState, JobSummary=JobSummary, jobs=jobs, List=List, Optional=Optional,
                        Sequence=Sequence, TypeVar=TypeVar)
    view = parts.Widget()
    view.ui = types.SimpleNamespace(**{name: PythonQtWidget(widget.findChild(QtWidgets.QWidget, name)) for name in (
        "jobsTable", "reopenJobButton", "resumeJobButton", "deleteJobButton")})
    view._run = None
    created = time.mktime((2026, 5, 1, 14, 25, 30, 0, 0, -1))

    def summary(name, state, model=None, message="", size=0):
        return JobSummary(tmp_path / name, created, ["CT 1", "CT 2"], model, "sfr_mt", "cpu", state, message, size)

    view._showPastJobs([summary("finished", JobState.FINISHED, "sam_vit_b", size=1_234_000_000),
                        summary("failed", JobState.FAILED, message="The engine stopped with exit code 1.",
                                size=56_700_000),
                        summary("running", JobState.RUNNING, str(tmp_path / "my_sam.pth"), size=820_000)])

    table = view.ui.jobsTable.widget
    headers = [table.horizontalHeaderItem(column).text() for column in range(table.columnCount())]
    assert headers == ["Date", "Volumes", "Model", "Method", "State", "Size"]
    rows = [[table.item(row, column).text() for column in range(table.columnCount())]
            for row in range(table.rowCount())]
    assert rows == [
        ["2026-05-01 14:25", "2: CT 1, CT 2", "sam_vit_b", "sfr_mt", "Finished", "1.2 GB"],
        ["2026-05-01 14:25", "2: CT 1, CT 2", "none", "sfr_mt", "Failed", "56.7 MB"],
        ["2026-05-01 14:25", "2: CT 1, CT 2", "my_sam.pth", "sfr_mt", "Running", "820 KB"]]
    assert table.item(1, 4).toolTip() == f"{tmp_path / 'failed'}\nThe engine stopped with exit code 1."
    assert table.editTriggers() == QtWidgets.QAbstractItemView.NoEditTriggers

    def offered(row=None, running=None):
        view._run = running
        table.clearSelection() if row is None else table.selectRow(row)
        view._updateJobButtons()
        return [name for name in ("reopenJobButton", "resumeJobButton", "deleteJobButton")
                if getattr(view.ui, name).enabled]

    assert offered() == [] and view._selectedJob() is None
    assert offered(0) == ["reopenJobButton", "deleteJobButton"]
    assert offered(1) == ["resumeJobButton", "deleteJobButton"]
    assert offered(1, running=types.SimpleNamespace(finished=False)) == ["deleteJobButton"]
    assert offered(2) == []
    assert view._selectedJob().folder == tmp_path / "running"


def test_the_review_table_shows_the_queue_and_offers_what_each_row_allows(loaded_ui, tmp_path):
    """The widget's own code fills the .ui's review table from review rows (least confident first, as the Logic
    gives them) and enables its buttons: edit a row that has a segmentation, use it as labels unless it is already,
    update a finished job's model unless a run is going."""
    from SFRSegmentLogicLib.review import ReviewRow

    widget, QtWidgets = loaded_ui
    qt = types.SimpleNamespace(QTableWidgetItem=QtWidgets.QTableWidgetItem)
    parts = module_code(functions=["selectedRow", "reviewStateTitle"], assignments=["Row"],
                        widget_methods=["_showReview", "_selectedReviewRow", "_updateReviewButtons"], qt=qt,
                        List=List, Optional=Optional, Sequence=Sequence, TypeVar=TypeVar, ReviewRow=ReviewRow)
    view = parts.Widget()
    names = ("reviewTable", "editSegmentationButton", "useAsLabelsButton", "updateModelButton")
    view.ui = types.SimpleNamespace(**{name: PythonQtWidget(widget.findChild(QtWidgets.QWidget, name))
                                       for name in names})
    weights = tmp_path / "run" / "vnet.pt"
    view._run, view._reviewJob = None, types.SimpleNamespace(run=types.SimpleNamespace(vnet_weights=weights))
    weights.parent.mkdir()
    weights.write_bytes(b"weights")

    view._showReview([ReviewRow("CT_2", "CT 2", 0.8123, "vtkMRMLScalarVolumeNode3", "vtkMRMLSegmentationNode2", False),
                      ReviewRow("CT_1", "CT 1", 0.9, "vtkMRMLScalarVolumeNode2", "vtkMRMLSegmentationNode3", True),
                      ReviewRow("CT_3", "CT 3", 0.95, "vtkMRMLScalarVolumeNode4", None, False)])

    table = view.ui.reviewTable.widget
    assert [table.horizontalHeaderItem(column).text() for column in range(3)] == [
        "Volume", "Confidence", "Segmentation"]
    assert [[table.item(row, column).text() for column in range(3)] for row in range(table.rowCount())] == [
        ["CT 2", "0.812", "Prediction"], ["CT 1", "0.900", "Used as labels"], ["CT 3", "0.950", "none"]]
    assert table.editTriggers() == QtWidgets.QAbstractItemView.NoEditTriggers

    def offered(row=None, running=None):
        view._run = running
        table.clearSelection() if row is None else table.selectRow(row)
        view._updateReviewButtons()
        return [name for name in names[1:] if getattr(view.ui, name).enabled]

    assert offered() == ["updateModelButton"] and view._selectedReviewRow() is None
    assert offered(0) == ["editSegmentationButton", "useAsLabelsButton", "updateModelButton"]
    assert view._selectedReviewRow().segmentation_id == "vtkMRMLSegmentationNode2"
    assert offered(1) == ["editSegmentationButton", "updateModelButton"]
    assert offered(2) == ["updateModelButton"]
    assert offered(0, running=types.SimpleNamespace(finished=False)) == ["editSegmentationButton", "useAsLabelsButton"]
    weights.unlink()  # no model to start from
    assert offered() == []


def test_the_engines_bad_input_message_is_the_error_dialog_s_text(loaded_ui, tmp_path):
    """The real engine refuses a damaged file (exit 2); the run's end shows its message, naming the file and what is
    wrong, as the dialog's text and in the status line: no traceback, nothing hidden behind "Show details"."""
    from SFRSegmentLogicLib.process import (ChildProcessRunner, EngineCancelled, EngineFailed, EngineJob,
                                            engine_environment)

    widget, QtWidgets = loaded_ui
    damaged = tmp_path / "image.nrrd"
    damaged.write_bytes(b"NRRD0004\ngarbage")
    process = ChildProcessRunner().start([sys.executable, "-m", "SFRSegmentLib", "info", str(damaged)],
                                         engine_environment(os.environ, ROOT), tmp_path)
    job = EngineJob(process)
    job.wait(interval_s=0.05)
    with pytest.raises(EngineFailed) as failed:
        job.raise_for_outcome()
    assert failed.value.bad_input and str(failed.value).startswith(f"{damaged}: ")

    shown = []
    slicer_stub = types.SimpleNamespace(util=types.SimpleNamespace(
        errorDisplay=lambda text, **options: shown.append((text, options))))
    parts = module_code(widget_methods=["onRunFinished", "_showStatus"], slicer=slicer_stub,
                        EngineCancelled=EngineCancelled, EngineFailed=EngineFailed, TrainingJob=type(None))
    view = parts.Widget()
    view.ui = types.SimpleNamespace(**{name: PythonQtWidget(widget.findChild(QtWidgets.QWidget, name)) for name in (
        "statusLabel", "progressBar")})
    view._runWarning = ""
    view._updateButtons = view.updatePastJobs = lambda: None
    view.onRunFinished(types.SimpleNamespace(error=failed.value, job=None))
    assert shown == [(f"The run failed: {failed.value}", {})]
    assert "Traceback" not in shown[0][0] and view.ui.statusLabel.text == f"Failed: {failed.value}"


def test_compute_on_shows_the_kept_choice_and_keeps_each_change_in_the_application_settings(loaded_ui, tmp_path):
    """The widget's own code fills Compute on from the application's settings (a real QSettings file), greys out the
    server's fields for this computer, and writes every change back there: the token is typed hidden, and kept in
    the settings file only (readable by its owner), never in a parameter node."""
    from SFRSegmentLogicLib import remote
    from SFRSegmentLogicLib.remote import ComputeSettings

    widget, QtWidgets = loaded_ui
    QtCore = pytest.importorskip("PySide6.QtCore")
    path = tmp_path / "Slicer.ini"

    def settings():  # as each Slicer session opens the application's settings anew
        return QtCore.QSettings(str(path), QtCore.QSettings.IniFormat)

    kept = ComputeSettings(on_server=True, url="https://gpu.example.org:8765", token="s3cret-token")
    remote.store_compute_settings(settings(), kept)
    # The Logic's two methods the widget calls (SFRSegmentLogic.computeSettings, setComputeSettings).
    logic = types.SimpleNamespace(computeSettings=lambda: remote.load_compute_settings(settings()),
                                  setComputeSettings=lambda compute: remote.store_compute_settings(settings(), compute))
    parts = module_code(widget_methods=["_setupComputeOn", "onComputeSettingsChanged", "_enableServerFields"],
                        remote=remote, ComputeSettings=ComputeSettings)
    view = parts.Widget()
    fields = ("serverUrlLabel", "serverUrlLineEdit", "serverTokenLabel", "serverTokenLineEdit", "serverCaFileLabel",
              "serverCaFilePathLineEdit")
    view.ui = types.SimpleNamespace(**{name: PythonQtWidget(widget.findChild(QtWidgets.QWidget, name))
                                       for name in ("computeOnComboBox", *fields)})
    view.logic = logic
    combo = view.ui.computeOnComboBox.widget
    combo.clear()
    view._setupComputeOn()

    assert [combo.itemText(index) for index in range(combo.count())] == ["this computer", "a server"]
    assert combo.currentText() == "a server"
    token = view.ui.serverTokenLineEdit.widget
    assert (view.ui.serverUrlLineEdit.text, token.text()) == (kept.url, kept.token)
    assert token.echoMode() == QtWidgets.QLineEdit.Password
    assert all(getattr(view.ui, name).enabled for name in fields)

    combo.setCurrentIndex(combo.findText("this computer"))  # the user computes here again
    view.onComputeSettingsChanged(0)
    assert not any(getattr(view.ui, name).enabled for name in fields)
    assert remote.load_compute_settings(settings()) == ComputeSettings(False, kept.url, kept.token)  # kept for later

    combo.setCurrentIndex(combo.findText("a server"))
    token.setText("  new-token ")
    certificate = tmp_path / "server.pem"
    view.ui.serverCaFilePathLineEdit.currentPath = str(certificate)
    view.onComputeSettingsChanged()
    assert remote.load_compute_settings(settings()) == ComputeSettings(True, kept.url, "new-token", str(certificate))
    assert "new-token" in path.read_text(encoding="utf-8") and path.stat().st_mode & 0o777 == 0o600
    assert all(getattr(view.ui, name).enabled for name in fields)
