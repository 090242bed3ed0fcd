"""Job folders: what the module hands to the engine (a cohort and a configuration) and how results come back.

A training job folder::

    JOB/
      job.json                  the classes (label value, segment name, colour), each case's volume: its name
                                and the fingerprints of its image and label (:class:`CaseRecord`), the
                                SHA-256 of each exported file, the job server it runs on (null: this
                                computer), and for an update, its parent job's folder
      config.json               the run configuration (see :func:`run_config`)
      state.json                running, finished, cancelled or failed (with the message): :class:`JobState`
      cohort/classes.json       {"1": "<segment name>", ...}
      cohort/<case>/image.nrrd  every input volume
      cohort/<case>/label.nrrd  labeled volumes only: the chosen segments on the volume's grid
      run/                      the engine's run folder (layout: SFRSegmentLib.storage.runfolder)
      apply/<stamp>/            "Apply model" jobs: images/<case>.nrrd in, predictions/ out

The engine is started as ``<python> -m SFRSegmentLib run --cohort JOB/cohort --out JOB/run --preset P --config
JOB/config.json --progress jsonl``; the same command in the same folder resumes an unfinished job from its
checkpoints. An *update* (:func:`prepare_update_job`) is a training job that starts from a finished job's models:
its command adds ``--from PARENT/run``, and its results replace the parent's unedited predictions.

A job on a job server (:mod:`remote`) has the same folder: the engine's command adds ``--server URL``, uploads the
cohort, follows the server's job and downloads its results into ``run/`` (with ``run/server-job.json`` naming the
server's job, which a rerun continues).

Node ↔ file conversion is in :mod:`nodes`; this module decides names and paths; :mod:`history` lists, matches,
reopens and deletes job folders, :mod:`runs` runs the engine on them, :mod:`review` ranks a job's results,
:mod:`plans` exports one to a temporary folder only to plan the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

from slicer import (
    vtkMRMLScalarVolumeNode,
    vtkMRMLScene,
    vtkMRMLScriptedModuleNode,
    vtkMRMLSegmentationNode,
    vtkMRMLTableNode,
)

from SFRSegmentLib.storage.atomic import atomic_write_text
from SFRSegmentLib.base.choices import (
    DEFAULT_MODEL_ID,
    DEVICES,
    PRESETS,
    PSEUDO_LABEL_SOURCES,
    SSL_METHODS,
)
from SFRSegmentLib.base.config import RetrainConfig, parse_method, preset
from SFRSegmentLib.base.config_io import set_option, with_overrides
from SFRSegmentLib.data.cohort import CLASSES_FILE, IMAGE_STEM, LABEL_STEM
from SFRSegmentLib.base.errors import InputError
from SFRSegmentLib.storage.provenance import file_digest
from SFRSegmentLib.storage.runfolder import RunFolder
from SFRSegmentLib.models.sam.catalog import ModelEntry, load_catalog

from .nodes import (
    SegmentClass,
    fingerprint,
    label_fingerprint,
    load_confidence_table,
    load_segmentation,
    remove_with_display_nodes,
    segment_classes,
    unedited_prediction,
    write_label_map,
    write_volume,
)
from .nodes import segment_names as segment_names_of
from .process import Outcome, Status
from .remote import ComputeServer, place, server_job_id

PRESET_PARAMETER = "preset"
"""The name of the preset in the module's parameter node (``SFRSegment.SFRSegmentParameterNode.preset``)."""
MODEL_PARAMETER = "model"
"""The name of the model in the module's parameter node (``SFRSegment.SFRSegmentParameterNode.model``)."""
JOB_FILE = "job.json"
CONFIG_FILE = "config.json"
STATE_FILE = "state.json"
RUN_FOLDER = "run"
"""The engine's run folder inside a job folder."""
RESULT_SUFFIX = " segmentation"
"""A result is named after its volume: '<volume name> segmentation'."""


@dataclass(frozen=True)
class CaseInput:
    """A volume to use and, when it is labeled, the segmentation holding its labels."""

    volume: vtkMRMLScalarVolumeNode
    segmentation: Optional[vtkMRMLSegmentationNode] = None


def setting(default: Any, parameter: Union[str, Tuple[str, ...]], config: Sequence[str] = (),
            unset: Any = None) -> Any:
    """A run setting: its default, the parameter node field(s) that hold it in the module (``parameter``; several
    for a shape), the engine configuration option(s) it sets (dotted paths; none: set otherwise) and the value a
    parameter node field holds for "the preset's value" (``unset``; spin boxes cannot hold None)."""
    return field(default=default, metadata={"parameter": parameter, "config": tuple(config), "unset": unset})


@dataclass(frozen=True)
class RunSettings:
    """The choices of a run, each declared here once: what the module's parameter node holds
    (:meth:`from_parameters`) and what the engine is given (:func:`run_config`). None means "the preset's value".
    Every list of choices is the engine's (:mod:`SFRSegmentLib.base.choices`).

    ``method`` (a keyword of the constructor only) sets ``ssl_method`` and ``pseudo_labels`` by one name, as the
    paper names methods: ``RunSettings(method="sfr_mt")`` is Mean Teacher with SAM's pseudo-labels.
    """

    model: str = setting(DEFAULT_MODEL_ID, "model")
    """A model id of the catalog, or the path of an imported checkpoint (used by the paper and cpu presets; the small
    preset runs a small, randomly initialised SAM)."""
    ssl_method: str = setting(SSL_METHODS[0], "sslMethod", ["retrain.ssl_method"])
    pseudo_labels: str = setting(PSEUDO_LABEL_SOURCES[0], "pseudoLabels", ["retrain.pseudo_labels"])
    preset: str = setting(PRESETS[0], "preset", ["preset"])
    device: str = setting(DEVICES[0], "device", ["device"])
    fine_tune_iterations: Optional[int] = setting(None, "fineTuneIterations", ["finetune.iterations"], unset=0)
    retrain_iterations: Optional[int] = setting(None, "retrainIterations", ["retrain.iterations"], unset=0)
    sfr_plus: bool = setting(False, "sfrPlus", ["sfr_plus"])
    patch_size: Optional[Tuple[int, int, int]] = setting(None, ("patchSizeI", "patchSizeJ", "patchSizeK"),
                                                         ["patch_size"], unset=0)
    """The run's working patch (SAM's and the V-Net's unless the preset gives SAM its own, as the cpu preset does)."""
    batch_size: Optional[int] = setting(None, "batchSize", ["finetune.batch_size", "retrain.batch_labeled",
                                                           "retrain.batch_unlabeled"], unset=0)
    """Fine-tuning's batch and each stream of re-training's, as in the presets."""
    seed: Optional[int] = setting(None, "seed", ["finetune.seed", "retrain.seed"], unset=-1)
    method: dataclasses.InitVar[Optional[str]] = None

    def __post_init__(self, method: Optional[str]) -> None:
        if method is not None:
            for name, value in parse_method(method).items():
                object.__setattr__(self, name, value)

    @classmethod
    def from_parameters(cls, read: Callable[[str], Any]) -> "RunSettings":
        """The settings a parameter node holds, ``read(name)`` giving the value of its field ``name`` (an enum's
        value is taken; a field at its ``unset`` value is None)."""
        values = {}
        for spec in dataclasses.fields(cls):
            names = spec.metadata["parameter"]
            stored = [read(name) for name in ((names,) if isinstance(names, str) else names)]
            stored = [getattr(value, "value", value) for value in stored]
            unset = spec.metadata["unset"] is not None and spec.metadata["unset"] in stored
            values[spec.name] = None if unset else stored[0] if isinstance(names, str) else tuple(stored)
        return cls(**values)

    @property
    def uses_checkpoint(self) -> bool:
        """Whether the run is given the SAM checkpoint ``model`` (``finetune.base_checkpoint``): a preset with a
        pretrained SAM, and SAM's pseudo-labels or SFR+."""
        pretrained = preset(self.preset).finetune.base_checkpoint is not None
        return pretrained and (self.pseudo_labels != "none" or self.sfr_plus)

    @property
    def checkpoint_required(self) -> bool:
        """Whether the run needs that checkpoint on this machine. Without it, the cpu preset re-trains without SAM
        (without the SFR term; a warning event says so) instead: the engine's ``sam_missing = "skip"``."""
        return preset(self.preset).sam_missing == "download"


def run_config(settings: RunSettings) -> Dict[str, Any]:
    """The overrides the engine applies to its preset (``--config``; SFRSegmentLib.base.config.RunConfig's fields),
    checked by the engine's configuration (InputError naming the field).

    Only what the user set is written (each setting at the options :class:`RunSettings` declares for it), so every
    other value is the preset's. A catalog model comes with its architecture (``finetune.sam.arch``, which the engine
    requires to be the model's), so that any model runs with any preset, and a job folder keeps its SAM should a
    preset change its own; a checkpoint file keeps the preset's.
    """
    config: Dict[str, Any] = {"finetune": {}, "retrain": {}}
    for spec in dataclasses.fields(settings):
        value = getattr(settings, spec.name)
        for path in spec.metadata["config"] if value is not None else ():
            set_option(config, path, list(value) if isinstance(value, tuple) else value)
    if settings.uses_checkpoint:
        config["finetune"]["base_checkpoint"] = settings.model
        entry = load_catalog().get(settings.model)
        if entry is not None:
            config["finetune"]["sam"] = {"arch": entry.architecture}
    with_overrides(preset(settings.preset), config).resolved()
    return config


def engine_config(overrides: Dict[str, Any], source: Optional[Path] = None) -> Any:
    """The configuration the engine runs with these overrides of their preset (SFRSegmentLib.base.config.RunConfig):
    two jobs whose overrides say the same in other words (a method by its name or by its two fields, as job folders
    made before and after the two fields hold it) have equal ones. InputError for overrides the engine refuses."""
    return with_overrides(preset(overrides.get("preset", PRESETS[0])), overrides, source)


def new_node_preset(parameter_node: vtkMRMLScriptedModuleNode, has_cuda_gpu: Callable[[], bool]) -> Optional[str]:
    """The preset a parameter node without one starts on: ``paper`` with a CUDA GPU, ``cpu`` without.

    None when it has a preset (the user's choice, or a loaded scene's), which is kept; ``has_cuda_gpu`` is then not
    asked. Ask before wrapping the node: the parameter node wrapper writes its class defaults into it.
    """
    if parameter_node.HasParameter(PRESET_PARAMETER):
        return None
    return "paper" if has_cuda_gpu() else "cpu"


def new_node_model(parameter_node: vtkMRMLScriptedModuleNode, preset_name: str) -> Optional[str]:
    """The model a parameter node without one starts on: the SAM its preset ``preset_name`` fine-tunes (LiteMedSAM
    for cpu, SAM ViT-B for paper), so that a new node's model suits the computer as its preset does
    (:func:`new_node_preset`); the default model for a preset that starts from random SAM weights (small).

    None when it has a model (the user's choice, or a loaded scene's), which is kept. Ask before wrapping the node.
    """
    if parameter_node.HasParameter(MODEL_PARAMETER):
        return None
    return preset(preset_name).finetune.base_checkpoint or DEFAULT_MODEL_ID


def model_order(entries: Iterable[ModelEntry], has_cuda_gpu: bool) -> List[ModelEntry]:
    """The catalog's models in the order the model list offers them: the catalog's, but without a CUDA GPU the cpu
    preset's SAM (LiteMedSAM) first, since it is the one such a computer fine-tunes in reasonable time."""
    if has_cuda_gpu:
        return list(entries)
    cpu_model = preset("cpu").finetune.base_checkpoint
    return sorted(entries, key=lambda entry: entry.id != cpu_model)  # stable: the others keep the catalog's order


def new_job_folder(jobs_root: Path) -> Path:
    """A new, empty folder under ``jobs_root`` named after the current time (``2026-05-01_142530``)."""
    stamp = time.strftime("%Y-%m-%d_%H%M%S")
    for attempt in range(1000):
        folder = jobs_root / (f"{stamp}_{attempt}" if attempt else stamp)
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:
            continue
    raise OSError(f"{jobs_root}: cannot create a new job folder")


def case_names(volume_names: Sequence[str]) -> List[str]:
    """File-safe, unique case names for volumes, close to the volumes' names (``CT chest (2)`` → ``CT_chest_2``)."""
    names: List[str] = []
    for volume_name in volume_names:
        # ASCII only: ITK and some tools still mishandle other characters in Windows paths.
        base = re.sub(r"[^A-Za-z0-9_-]+", "_", volume_name).strip("_") or "volume"
        name, number = base, 2
        while name.lower() in (n.lower() for n in names):  # case-insensitive file systems
            name, number = f"{base}_{number}", number + 1
        names.append(name)
    return names


# ---------------------------------------------------------------------------------------------------------------
# Training jobs


class JobState(enum.Enum):
    """Where a training job is (:meth:`TrainingJob.recorded_state`, and :mod:`history` for the state it is in now)."""

    RUNNING = "running"
    FINISHED = "finished"
    CANCELLED = "cancelled"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    """Recorded as running, but no engine runs it: Slicer was closed or crashed during the run. A job whose engine
    never started (no state recorded) is interrupted too."""
    DAMAGED = "damaged"
    """Its job.json or config.json is missing or cannot be read: it can only be deleted. (A state.json that cannot
    be read makes the job INTERRUPTED: the engine, resumed, finds how far the run got from its run folder.)"""


RESUMABLE = (JobState.CANCELLED, JobState.FAILED, JobState.INTERRUPTED)
"""The states of an unfinished job: rerunning its engine continues from its checkpoints."""
_OUTCOME_STATES = {Status.SUCCEEDED: JobState.FINISHED, Status.CANCELLED: JobState.CANCELLED,
                   Status.FAILED: JobState.FAILED}


@dataclass(frozen=True)
class CaseRecord:
    """What a job folder records of one case: its volume's name and the fingerprints (:func:`nodes.fingerprint`)
    of the image and of the label map that were exported, so that the scene's volumes can be recognised."""

    volume: str
    image: str
    label: Optional[str] = None


@dataclass
class TrainingJob:
    """A training job folder, and which scene volume each of its cases is."""

    folder: Path
    classes: List[SegmentClass]
    cases: Dict[str, CaseRecord]
    """Case name → its record, in the cohort's order."""
    overrides: Dict[str, Any]
    """The run configuration the job was made with (config.json, :func:`run_config`)."""
    volume_ids: Dict[str, str] = field(default_factory=dict)
    """Case name → ID of its volume node (not kept on disk: see :func:`history.attach`)."""
    parent: Optional[Path] = None
    """For an update, the folder of the job whose models it starts from (:func:`prepare_update_job`)."""
    cohort_digests: Dict[str, str] = field(default_factory=dict)
    """Path of each exported cohort file, relative to the folder → its SHA-256 (job.json's ``files``; jobs made
    before it was recorded have none), so that a damaged copy is recognised (:func:`require_intact_copy`)."""
    server: Optional[str] = None
    """The URL of the job server it runs on (job.json's ``server``); None: this computer. Its checkpoints are there,
    so it is resumed, updated and applied there only (:func:`require_place`)."""

    @property
    def cohort(self) -> Path:
        return self.folder / "cohort"

    def image(self, case: str) -> Path:
        return self.cohort / case / f"{IMAGE_STEM}.nrrd"

    def label(self, case: str) -> Path:
        return self.cohort / case / f"{LABEL_STEM}.nrrd"

    @property
    def config(self) -> Path:
        return self.folder / CONFIG_FILE

    @property
    def run(self) -> RunFolder:
        return RunFolder(self.folder / RUN_FOLDER)

    @property
    def preset(self) -> str:
        return self.overrides["preset"]

    @property
    def method(self) -> str:
        """The paper's name of the job's method (``sfr_mt``), from either form its configuration may hold (the two
        fields, or the name that job folders made before them hold)."""
        return with_overrides(RetrainConfig(), self.overrides["retrain"], self.config, "retrain.").method

    @property
    def model(self) -> Optional[str]:
        """The SAM checkpoint the run was given; None when it uses none (see :attr:`RunSettings.uses_checkpoint`)."""
        return self.overrides["finetune"].get("base_checkpoint")

    def command(self, python: str, server: Optional[ComputeServer] = None) -> List[str]:
        """The engine's command line for this job; run again in the same folder, it resumes. An update starts from
        its parent's run folder (``--from``). On a server (``server``, which must be the job's: see
        :func:`require_place`) the engine is that server's client, and an update's ``--from`` is the parent's job
        on the server."""
        if server is None:
            warm_start = [] if self.parent is None else ["--from", str(self.parent / RUN_FOLDER)]
        else:
            warm_start = [] if self.parent is None else ["--from", server_job_id(self.parent / RUN_FOLDER)]
        remote = [] if server is None else server.arguments()
        return [python, "-m", "SFRSegmentLib", "run", "--cohort", str(self.cohort), "--out", str(self.run.root),
                "--preset", self.preset, "--config", str(self.config), "--progress", "jsonl", *warm_start, *remote]

    @classmethod
    def load(cls, folder: Path) -> "TrainingJob":
        """The job in ``folder`` as written by :func:`prepare_training_job` (volume IDs are not kept on disk).

        A folder without job.json, or whose job.json or config.json cannot be read, is an :class:`InputError`
        that says so and what to do.
        """
        folder = Path(folder)
        require_job_folder(folder)
        with _damaged_unless_readable(folder, JOB_FILE):
            description = json.loads((folder / JOB_FILE).read_text(encoding="utf-8"))
            classes = [SegmentClass(int(c["value"]), str(c["name"]), tuple(c["color"])) for c in description["classes"]]
            cases = {name: CaseRecord(**record) for name, record in description["cases"].items()}
            parent = None if description.get("parent") is None else Path(description["parent"])
            digests = {str(name): str(digest) for name, digest in description.get("files", {}).items()}
            server = None if description.get("server") is None else str(description["server"])
        with _damaged_unless_readable(folder, CONFIG_FILE):
            job = cls(folder, classes, cases, json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8")),
                      parent=parent, cohort_digests=digests, server=server)
            job.preset, job.method, job.model  # noqa: B018 (read now, so that a damaged config.json is found here)
        return job

    @property
    def state_file(self) -> Path:
        return self.folder / STATE_FILE

    def record_state(self, state: JobState, message: str = "") -> None:
        """Write the job's state (and for a failure, its message) into the folder, where it survives Slicer."""
        _write_json(self.state_file, {"state": state.value, "message": message})

    def recorded_state(self) -> Tuple[JobState, str]:
        """The state last recorded and its message; INTERRUPTED when none was (the engine never started) or when
        the record cannot be read: resuming is then what finds out, since the engine continues from its run folder
        (or just confirms that the run is complete)."""
        try:
            recorded = json.loads(self.state_file.read_text(encoding="utf-8"))
            return JobState(recorded["state"]), str(recorded["message"])
        except FileNotFoundError:
            return JobState.INTERRUPTED, "the engine was never started"
        except READ_ERRORS as error:
            return JobState.INTERRUPTED, (f"its {STATE_FILE} cannot be read ({_reason(error)}); resume the job to "
                                          "continue or confirm its run")

    def ended(self, outcome: Outcome) -> None:
        """Record how the engine's run ended (finished, cancelled, or failed with its message)."""
        self.record_state(_OUTCOME_STATES[outcome.status], outcome.message)


READ_ERRORS = (OSError, ValueError, KeyError, TypeError, AttributeError)
"""What reading a job folder's JSON files raises when they are damaged (missing, cut short, edited)."""


@contextlib.contextmanager
def _damaged_unless_readable(folder: Path, name: str) -> Iterator[None]:
    """Turn an error reading the job folder's file ``name`` into the InputError that says the folder is damaged and
    what to do."""
    try:
        yield
    except READ_ERRORS as error:
        raise InputError(f"this job folder is damaged: its {name} cannot be read ({_reason(error)}). Delete it "
                         "(Past jobs, Delete) and run again.", folder) from error


def _reason(error: Exception) -> str:
    """Why a file could not be read, in words rather than an exception's type."""
    return f"{error.args[0]} is missing" if isinstance(error, KeyError) else str(error)


def require_intact_copy(job: TrainingJob, path: Path) -> None:
    """Raise the InputError that names ``path``, a file of the job's exported cohort, and says what to do, unless it
    is there and (when job.json recorded its SHA-256) unchanged since the job wrote it."""
    recorded = job.cohort_digests.get(path.relative_to(job.folder).as_posix())
    if not path.is_file():
        raise damaged_copy_error(path, "is missing")
    if recorded is not None and file_digest(path) != recorded:
        raise damaged_copy_error(path, "has changed since the job wrote it (damaged, or replaced)")


def damaged_copy_error(path: Path, what: str) -> InputError:
    """The InputError for a damaged file of a job's cohort: it names the file and says what to do."""
    return InputError(f"this job's copy of a volume {what}. Load the original volumes into the scene and start a "
                      "new job (Run, then Start afresh; in a script, run(..., resume=False)), or delete this job "
                      "(Past jobs, Delete).", path)


def require_place(job: TrainingJob, server_url: Optional[str], action: str) -> None:
    """Raise the InputError that says where ``job`` runs and what to choose unless that is ``server_url`` (None: this
    computer): its checkpoints and its model are there, so it is resumed, updated and applied there only."""
    if job.server != server_url:
        raise InputError(f"this job ran on {place(job.server)}, where its checkpoints and model are; it cannot be "
                         f"{action} on {place(server_url)}. Choose Compute on: "
                         + ("this computer" if job.server is None else f"a server, with the URL {job.server}")
                         + ", and try again.", job.folder)


def require_model(job: TrainingJob) -> None:
    """Raise the :class:`InputError` that says what to do unless ``job`` has trained its V-Net (to apply or update)."""
    if not job.run.vnet_weights.is_file():
        raise InputError("This job has no trained model yet; run it to completion first.", job.run.vnet_weights)


JOB_MARKERS = (JOB_FILE, CONFIG_FILE, STATE_FILE)
"""The files that make a folder a job folder: any one of them, so that a job folder that lost its job.json is still
one (damaged, listed, and deletable)."""


def is_job_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a job folder's own files (:data:`JOB_MARKERS`)."""
    return any((folder / name).is_file() for name in JOB_MARKERS)


def require_job_folder(folder: Path) -> None:
    """Raise an :class:`InputError` that says what to do unless ``folder`` is a job folder (:func:`is_job_folder`)."""
    if not is_job_folder(folder):
        raise InputError(f"this is not an SFRSegment job folder: it has no {JOB_FILE}. Choose a folder that Run "
                         "created (Past jobs lists them).", folder)


def prepare_training_job(
    jobs_root: Path, inputs: Sequence[CaseInput], segment_names: Sequence[str], settings: RunSettings,
    server_url: Optional[str] = None,
) -> TrainingJob:
    """Check the inputs, then write a new job folder under ``jobs_root``: cohort (images, labels, classes), job
    description (with the inputs' fingerprints, and the server it runs on: ``server_url``, None for this computer)
    and configuration. Nothing is created when the inputs are wrong."""
    check_inputs(inputs, segment_names)
    return _write_job(jobs_root, inputs, segment_names, run_config(settings), None, server_url)


def prepare_update_job(
    jobs_root: Path, parent: TrainingJob, inputs: Sequence[CaseInput], settings: Optional[RunSettings] = None,
    server_url: Optional[str] = None,
) -> TrainingJob:
    """A new training job folder that starts from the finished job ``parent``'s fine-tuned SAM and V-Net (its
    command's ``--from``), made like any job from the scene's ``inputs`` as they are now: the segmentations used as
    labels since (see :func:`nodes.set_label_segmentation`) are exported as labels, new volumes join as unlabeled.

    It learns the parent's segments, in the parent's order (the models it starts from have those outputs), with
    ``settings`` or, when None, the parent's configuration. ``parent`` is never modified. It runs where the parent's
    models are: ``server_url`` must be the parent's place (:func:`require_place`).
    """
    require_place(parent, server_url, "updated")
    require_model(parent)
    segment_names = [segment_class.name for segment_class in parent.classes]
    check_inputs(inputs, segment_names)
    config = parent.overrides if settings is None else run_config(settings)
    return _write_job(jobs_root, inputs, segment_names, config, parent.folder, server_url)


def _write_job(jobs_root: Path, inputs: Sequence[CaseInput], segment_names: Sequence[str], config: Dict[str, Any],
               parent: Optional[Path], server_url: Optional[str]) -> TrainingJob:
    """Write a new job folder of checked inputs (see :func:`prepare_training_job`), recording ``parent`` if any and
    the server it runs on."""
    classes = input_classes(inputs, segment_names)
    names = case_names([item.volume.GetName() for item in inputs])
    records = {name: CaseRecord(item.volume.GetName(), *fingerprints)
               for name, item, fingerprints in zip(names, inputs, input_fingerprints(inputs, classes))}
    job = TrainingJob(new_job_folder(jobs_root), classes, records, config,
                      {name: item.volume.GetID() for name, item in zip(names, inputs)}, parent, server=server_url)
    for name, item in zip(names, inputs):
        write_volume(item.volume, job.image(name))
        if item.segmentation is not None:
            write_label_map(item.segmentation, classes, item.volume, job.label(name))
    write_cohort_classes(job)
    exported = [path for name in names for path in (job.image(name), job.label(name)) if path.is_file()]
    job.cohort_digests = {path.relative_to(job.folder).as_posix(): file_digest(path) for path in exported}
    _write_json(job.folder / JOB_FILE, {
        "classes": [{"value": c.value, "name": c.name, "color": list(c.color)} for c in classes],
        "cases": {name: dataclasses.asdict(record) for name, record in records.items()},
        "parent": None if parent is None else str(parent),
        "files": job.cohort_digests,
        "server": server_url,
    })
    _write_json(job.config, config)
    return job


def label_segment_names(inputs: Sequence[CaseInput]) -> List[str]:
    """The segment names of the inputs' labels, in order of first appearance: the segments a run can learn."""
    names: List[str] = []
    for item in inputs:
        if item.segmentation is not None:
            names += [name for name in segment_names_of(item.segmentation) if name not in names]
    return names


def input_classes(inputs: Sequence[CaseInput], segment_names: Sequence[str]) -> List[SegmentClass]:
    """The classes a run of ``inputs`` learning ``segment_names`` has: label values 1, 2, … in that order, each
    with its segment's name and the colour it has in the first labeled input having it (:func:`nodes.segment_classes`),
    which its results are imported with."""
    labeled = [item.segmentation for item in inputs if item.segmentation is not None]
    return segment_classes(list(segment_names), labeled)


Fingerprints = Tuple[str, Optional[str]]
"""A case's image fingerprint and its label's (None for an unlabeled case)."""


def input_fingerprints(inputs: Sequence[CaseInput], classes: Sequence[SegmentClass]) -> List[Fingerprints]:
    """The fingerprints of each input's volume and of its label map for ``classes``, as a job folder records them."""
    return [(fingerprint(item.volume),
             None if item.segmentation is None else label_fingerprint(item.segmentation, classes, item.volume))
            for item in inputs]


def check_inputs(inputs: Sequence[CaseInput], segment_names: Sequence[str]) -> None:
    """Raise the :class:`InputError` that says what to fix when the inputs cannot make a job."""
    if not inputs:
        raise InputError("No input volumes. Load the volumes to segment into the scene.")
    if not any(item.segmentation is not None for item in inputs):
        raise InputError("No labeled volume. Segment at least one volume (Segment Editor) and choose its "
                         "segmentation in the inputs table.")
    if not segment_names:
        raise InputError("No segments to learn. Tick at least one segment.")
    duplicates = sorted({name for name in segment_names if list(segment_names).count(name) > 1})
    if duplicates:
        raise InputError(f"Segment names must be unique; repeated: {', '.join(duplicates)}.")
    for item in inputs:
        if item.segmentation is None:
            continue
        missing = [name for name in segment_names if name not in segment_names_of(item.segmentation)]
        if missing:
            raise InputError(
                f"Segmentation '{item.segmentation.GetName()}' (the label of '{item.volume.GetName()}') has no "
                f"segment named {', '.join(repr(n) for n in missing)}. Add it there, or untick it."
            )


def write_cohort_classes(job: TrainingJob) -> None:
    """Write the cohort's classes.json (label value → segment name) from the job's classes, which job.json keeps: so
    it is written again before a resume, whatever happened to it."""
    _write_json(job.cohort / CLASSES_FILE, {str(c.value): c.name for c in job.classes})


def _write_json(path: Path, content: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(content, indent=2) + "\n")


@dataclass
class TrainingResults:
    """What a finished training job added to the scene."""

    job: TrainingJob
    """The job, with its cases paired with the scene's volumes."""
    segmentations: Dict[str, vtkMRMLSegmentationNode]
    """Case name → its result."""
    confidence_table: Optional[vtkMRMLTableNode]
    """The review table: the unlabeled volumes, least confident first (runs with SAM's pseudo-labels only)."""
    report: Optional[Path]
    """The run's HTML report, if it was written."""


def import_training_results(scene: vtkMRMLScene, job: TrainingJob) -> TrainingResults:
    """Load each case's prediction as a segmentation named after its volume, and the confidence table if present;
    the report is named.

    Only cases with a prediction file are loaded (the engine predicts the unlabeled ones); a case whose volume has
    left the scene is skipped. An update's prediction replaces its volume's unedited prediction
    (:func:`nodes.unedited_prediction`: still marked as a prediction and unchanged since it was loaded), taking its
    name; a segmentation the user edited or used as labels is never replaced, and the new prediction is added next
    to it.
    """
    segmentations = {}
    volume_names = {}
    for case, volume_id in job.volume_ids.items():
        volume = scene.GetNodeByID(volume_id)
        if volume is None:
            continue
        volume_names[case] = volume.GetName()
        prediction = job.run.prediction(case)
        if prediction.is_file():
            replaced = None if job.parent is None else unedited_prediction(scene, volume)
            name = volume.GetName() + RESULT_SUFFIX if replaced is None else replaced.GetName()
            segmentations[case] = load_segmentation(scene, prediction, name, volume, job.classes)
            if replaced is not None:
                remove_with_display_nodes(scene, replaced)
                segmentations[case].SetName(name)
    table = None
    if job.run.prediction_confidence.is_file():
        table = load_confidence_table(scene, job.run.prediction_confidence, "SFRSegment confidence", volume_names)
    return TrainingResults(job, segmentations, table, job.run.report if job.run.report.is_file() else None)


# ---------------------------------------------------------------------------------------------------------------
# Applying a trained model to one more volume


@dataclass
class ApplyJob:
    """One volume to segment with the model of a finished training job."""

    folder: Path
    training: TrainingJob
    case: str
    volume_id: str

    @property
    def image(self) -> Path:
        return self.folder / "images" / f"{self.case}.nrrd"

    @property
    def prediction(self) -> Path:
        return self.folder / "predictions" / f"{self.case}.seg.nrrd"

    def command(self, python: str, server: Optional[ComputeServer] = None) -> List[str]:
        """The engine's command line: ``predict --model RUN --images IMAGE --out DIR --preset P --progress jsonl``,
        with the training job's preset, so that the volume is predicted as the run predicted its own. On the
        training job's server, ``--model`` is its job there."""
        preset_name = json.loads(self.training.config.read_text(encoding="utf-8"))["preset"]
        model = str(self.training.run.root) if server is None else server_job_id(self.training.run.root)
        return [python, "-m", "SFRSegmentLib", "predict", "--model", model, "--images", str(self.image), "--out",
                str(self.prediction.parent), "--preset", preset_name, "--progress", "jsonl",
                *([] if server is None else server.arguments())]

    def ended(self, outcome: Outcome) -> None:
        """A cancelled apply job leaves nothing behind: its folder (the exported volume) is removed."""
        if outcome.status == Status.CANCELLED:
            shutil.rmtree(self.folder, ignore_errors=True)


def prepare_apply_job(training: TrainingJob, volume: vtkMRMLScalarVolumeNode,
                      server_url: Optional[str] = None) -> ApplyJob:
    """Write ``volume`` into a new apply folder of ``training``; its model must exist, on ``server_url`` (None: this
    computer), where the training job ran."""
    require_place(training, server_url, "applied")
    require_model(training)
    job = ApplyJob(new_job_folder(training.folder / "apply"), training, case_names([volume.GetName()])[0],
                   volume.GetID())
    write_volume(volume, job.image)
    return job


def import_apply_result(scene: vtkMRMLScene, job: ApplyJob) -> vtkMRMLSegmentationNode:
    """Load the prediction of an apply job, named after its volume."""
    volume = scene.GetNodeByID(job.volume_id)
    if volume is None:
        raise InputError("The volume to segment has been removed from the scene.")
    if not job.prediction.is_file():
        raise InputError("The engine finished without writing the expected prediction.", job.prediction)
    return load_segmentation(scene, job.prediction, volume.GetName() + RESULT_SUFFIX, volume, job.training.classes)
