"""The literature's LA protocol in one command: a grid of runs (labeled N × method × seed) and one results table.

The protocol (UA-MT, DTC, BCP, SFR; ``shared/data/LA/README.md``): the LA folder holds case folders
``<ID>/image.nrrd`` and ``<ID>/label.nrrd`` and the standard lists ``train.list`` and ``test.list`` (one ID per line).
The first N cases of ``train.list`` are labeled, the rest of it unlabeled (their labels are not given to the run),
the cases of ``test.list`` are the held-out test set. ``dev_test`` instead holds the last cases of ``train.list`` out
as the test set (a development split, for when ``test.list``'s cases are not at hand); ``unlabeled`` caps the
unlabeled pool to the first cases after the labeled ones.

Each cell of the grid is a run folder ``OUT/la_l<N>_<method>_s<seed>/`` holding

* ``cohort.json``: the cell's cohort as a manifest (:mod:`SFRSegmentLib.data.cohort`): labeled, unlabeled and ``"test"``
  cases, absolute paths;
* ``overrides.json``: the run's configuration overrides: the ``--config`` ones, the method (``retrain.method``) and
  the seed (``finetune.seed`` and ``retrain.seed``);
* ``cell.json``: the cell's settings (everything above that defines it, written before it starts), and per
  invocation of ``run`` on it its wall time, peak resident memory and exit status; ``"finished"`` once a run
  exited with status 0;
* everything ``python -m SFRSegmentLib run --cohort cohort.json --config overrides.json`` writes
  (:mod:`SFRSegmentLib.storage.runfolder`), ``metrics.csv`` with the test cases' rows among them.

Each cell runs in a child process, so that its wall time and peak memory (the child's ``ru_maxrss`` from
``wait4``: the largest resident set of the process and of any process it waited for; CPU memory, not GPU memory)
are its own. A rerun skips finished cells and resumes the others (``run`` resumes inside its stages); a cell whose
settings differ from the new ones stops the command (an :class:`InputError` naming its ``cell.json``).

The table (``OUT/results.csv``, ``OUT/results.md``) covers every finished cell in ``OUT``, one section per protocol
(the settings other than N, method and seed): per cell the mean over its test cases; per row (N, method) the mean ±
sample standard deviation (ddof = 1) of those means over the seeds. Dice and Jaccard in %, 95HD and ASD in voxels as
``metrics.csv`` has them (MedPy's definitions without voxel spacing, the paper's convention; LA's spacing is
0.625 mm, so 1 voxel = 0.625 mm); a test case with an empty prediction has no distance and is counted instead. Time
is the sum over the invocations that ran the cell, peak memory the largest of them. The paper's numbers for the same
cell are beside ours (:mod:`SFRSegmentLib.research.paper_results`).
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import io as text_io
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, TextIO, Tuple

from ..base.choices import METHODS
from ..base.config import parse_method
from ..base.config_io import merged
from ..base.errors import InputError, PathLike
from ..base.progress import Cancelled
from ..data.cohort import IMAGE_STEM, LABEL_STEM
from ..evaluation.metrics import SPLIT_COLUMN, TEST_SPLIT
from ..storage.atomic import atomic_write_text
from ..storage.runfolder import RunFolder
from .paper_results import SIMPLIFIED_PATCH, PaperResult, paper_result

TRAIN_LIST = "train.list"
TEST_LIST = "test.list"
LA_CLASSES = {"1": "left atrium"}
LA_IMAGE = f"{IMAGE_STEM}.nrrd"
LA_LABEL = f"{LABEL_STEM}.nrrd"
COHORT_FILE = "cohort.json"
OVERRIDES_FILE = "overrides.json"
CELL_FILE = "cell.json"
RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"
PAPER_PRESET = "paper"
_CELL_AXES = ("labeled", "method", "seed")
"""The settings that vary inside a grid; the others make its protocol."""


class CellFailed(RuntimeError):
    """A cell's ``run`` exited with an error (its own messages were forwarded above); ``exit_status`` is its status,
    1 when a signal killed it."""

    def __init__(self, cell: Path, exit_status: int) -> None:
        how = f"was killed by signal {-exit_status}" if exit_status < 0 else f"failed with exit status {exit_status}"
        super().__init__(f"the run in {cell} {how} (its messages are above); rerun the same command to resume")
        self.exit_status = exit_status if exit_status > 0 else 1


# ---------------------------------------------------------------------------------------------------------------
# The split and each cell's cohort


@dataclass(frozen=True)
class LASplit:
    """An LA folder's case IDs: ``pool`` (train.list, less a development test set) in order, and ``test``, taken from
    ``test_list`` or, with ``dev_test``, from the end of train.list."""

    data: Path
    pool: Tuple[str, ...]
    test: Tuple[str, ...]
    test_list: Optional[Path]
    dev_test: Optional[int]


def read_case_list(path: Path) -> List[str]:
    """The case IDs of a list file, one per line (blank lines skipped), each once."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError("case list not found (expected one case ID per line)", path) from None
    ids = [line.strip() for line in text.splitlines() if line.strip()]
    if not ids:
        raise InputError("the list names no case", path)
    repeated = sorted(case for case, n in Counter(ids).items() if n > 1)
    if repeated:
        raise InputError(f"cases listed more than once: {', '.join(repeated)}", path)
    return ids


def la_split(data: PathLike, test_list: Optional[PathLike] = None, dev_test: Optional[int] = None) -> LASplit:
    """The split of the LA folder ``data``: its ``train.list``, and as test set ``test_list`` (default
    ``data/test.list``) or, with ``dev_test``, the last ``dev_test`` cases of ``train.list`` (then not in the pool).

    Every listed case must have its image, and every test case its label (InputError naming the missing file).
    """
    data = Path(data).resolve()
    if not data.is_dir():
        raise InputError("LA folder not found", data)
    train_path = data / TRAIN_LIST
    train = read_case_list(train_path)
    if dev_test is not None:
        if test_list is not None:
            raise InputError("give either a test list or a development test set (dev_test), not both",
                             field="dev_test")
        if not 1 <= dev_test < len(train):
            raise InputError(f"dev_test must be between 1 and {len(train) - 1} (train.list has {len(train)} cases), "
                             f"got {dev_test}", train_path, "dev_test")
        split = LASplit(data, tuple(train[:-dev_test]), tuple(train[-dev_test:]), None, dev_test)
        test_listed_in = train_path
    else:
        test_listed_in = Path(test_list).resolve() if test_list is not None else data / TEST_LIST
        if not test_listed_in.is_file():
            raise InputError("test list not found: name it with --test-list, or hold the last cases of "
                             f"{TRAIN_LIST} out with --dev-test N", test_listed_in, "test_list")
        split = LASplit(data, tuple(train), tuple(read_case_list(test_listed_in)), test_listed_in, None)
        shared = sorted(set(split.pool) & set(split.test))
        if shared:
            raise InputError(f"cases in both {TRAIN_LIST} and the test list: {', '.join(shared)}", test_listed_in)
    for case in split.pool:
        _require_case_file(data, case, LA_IMAGE, train_path)
    for case in split.test:
        for name in (LA_IMAGE, LA_LABEL):
            _require_case_file(data, case, name, test_listed_in)
    return split


def _require_case_file(data: Path, case: str, name: str, listed_in: Path) -> None:
    path = data / case / name
    if not path.is_file():
        raise InputError(f"file not found for case {case!r} of {listed_in}", path, name)


def cell_cohort(split: LASplit, labeled: int, unlabeled: Optional[int] = None) -> Dict[str, Any]:
    """The manifest of a cell (:mod:`SFRSegmentLib.data.cohort`'s format): the first ``labeled`` cases of the pool with
    their labels, the rest (the first ``unlabeled`` of them when given) without, and the test cases with labels."""
    list_path = split.data / TRAIN_LIST
    if not 1 <= labeled < len(split.pool):
        raise InputError(f"the number of labeled cases must be between 1 and {len(split.pool) - 1} (the pool has "
                         f"{len(split.pool)} cases and needs an unlabeled one), got {labeled}", list_path, "labeled")
    if unlabeled is not None and unlabeled < 1:
        raise InputError(f"the unlabeled pool needs at least one case, got {unlabeled}", field="unlabeled")
    rest = split.pool[labeled:]
    return {
        "classes": LA_CLASSES,
        "cases": [_entry(split.data, case, with_label=True) for case in split.pool[:labeled]]
        + [_entry(split.data, case, with_label=False) for case in rest[:unlabeled]],
        "test": [_entry(split.data, case, with_label=True) for case in split.test],
    }


def _entry(data: Path, case: str, with_label: bool) -> Dict[str, str]:
    entry = {"name": case, "image": str(data / case / LA_IMAGE)}
    if with_label:
        entry["label"] = str(data / case / LA_LABEL)
    return entry


# ---------------------------------------------------------------------------------------------------------------
# The grid


@dataclass(frozen=True)
class Protocol:
    """What every cell of a grid shares: the data and split, the preset and the configuration overrides."""

    split: LASplit
    preset: str
    overrides: Mapping[str, Any]
    unlabeled: Optional[int] = None
    config_file: Optional[Path] = None
    """Where ``overrides`` were read from, named in their errors."""


@dataclass(frozen=True)
class Cell:
    """One run of the grid: the first ``labeled`` cases labeled, re-trained with ``method``, seeded with ``seed``."""

    labeled: int
    method: str
    seed: int

    @property
    def name(self) -> str:
        return f"la_l{self.labeled}_{self.method}_s{self.seed}"


def grid(labeled: Sequence[int], methods: Sequence[str], seeds: Sequence[int]) -> List[Cell]:
    """Every (labeled N, method, seed) once, in that nesting order."""
    cells = [Cell(n, m, s) for n in labeled for m in methods for s in seeds]
    return list(dict.fromkeys(cells))


def cell_settings(protocol: Protocol, cell: Cell) -> Dict[str, Any]:
    """What defines a cell's results (recorded in its ``cell.json``; a rerun with other settings is refused)."""
    split = protocol.split
    return {"data": str(split.data), "test_list": split.test_list and str(split.test_list),
            "dev_test": split.dev_test, "unlabeled": protocol.unlabeled,
            "preset": protocol.preset, "overrides": dict(protocol.overrides), "labeled": cell.labeled,
            "method": cell.method, "seed": cell.seed}


def cell_overrides(protocol: Protocol, cell: Cell) -> Dict[str, Any]:
    """The protocol's overrides with the cell's method and seed (both stages' seeds) set."""
    return merged(protocol.overrides, {"finetune": {"seed": cell.seed},
                                        "retrain": {"method": cell.method, "seed": cell.seed}})


def check_protocol(protocol: Protocol, cells: Sequence[Cell]) -> None:
    """Every cell's configuration and cohort, checked before the first one starts (InputError naming the field)."""
    from ..base.config import preset
    from ..base.config_io import with_overrides

    base = preset(protocol.preset)
    for cell in cells:
        with_overrides(base, cell_overrides(protocol, cell), source=protocol.config_file)
        cell_cohort(protocol.split, cell.labeled, protocol.unlabeled)


def run_grid(protocol: Protocol, cells: Sequence[Cell], out: PathLike, device: Optional[str] = None,
             progress: str = "bar", log: TextIO = sys.stderr) -> None:
    """Run (or resume, or skip when finished) every cell into ``out/<cell name>``, one child process each, showing
    its progress as ``run --progress progress`` does; what this function says goes to ``log``."""
    check_protocol(protocol, cells)
    out = Path(out)
    for index, cell in enumerate(cells, 1):
        folder = out / cell.name
        record = _start_cell(folder, protocol, cell)
        if record.get("finished"):
            print(f"cell {index}/{len(cells)} {cell.name}: finished earlier, skipped", file=log, flush=True)
            continue
        print(f"cell {index}/{len(cells)} {cell.name}: running (preset {protocol.preset})", file=log, flush=True)
        command = [sys.executable, "-m", "SFRSegmentLib", "run", "--cohort", str(folder / COHORT_FILE),
                   "--out", str(folder), "--preset", protocol.preset, "--config", str(folder / OVERRIDES_FILE),
                   "--progress", progress] + (["--device", device] if device else [])
        wall_s, peak_mib, status = measured_run(command)
        record["runs"].append({"wall_s": wall_s, "peak_rss_mib": peak_mib, "exit_status": status,
                               "ended": datetime.datetime.now().astimezone().isoformat(timespec="seconds")})
        record["finished"] = status == 0
        _write_json(folder / CELL_FILE, record)
        if status == 130:
            raise Cancelled(f"cell {cell.name} was cancelled")
        if status != 0:
            raise CellFailed(folder, status)
        print(f"cell {index}/{len(cells)} {cell.name}: done in {wall_s / 60:.1f} min, peak memory "
              f"{peak_mib / 1024:.2f} GiB", file=log, flush=True)


def _start_cell(folder: Path, protocol: Protocol, cell: Cell) -> Dict[str, Any]:
    """The cell's record, created with its cohort and overrides on first use; InputError when the folder holds a
    cell with other settings."""
    settings = cell_settings(protocol, cell)
    path = folder / CELL_FILE
    if path.is_file():
        record = _read_json(path)
        earlier = record.get("settings", {})
        changed = [key for key in settings if earlier.get(key) != settings[key]]
        if changed:
            key = changed[0]
            raise InputError(f"this cell was run with {key} {earlier.get(key)!r}, now {settings[key]!r}; use another "
                             "output folder, or delete the cell folder to run it again", path, f"settings.{key}")
        return record
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / COHORT_FILE, cell_cohort(protocol.split, cell.labeled, protocol.unlabeled))
    _write_json(folder / OVERRIDES_FILE, cell_overrides(protocol, cell))
    record = {"settings": settings, "finished": False, "runs": []}
    _write_json(path, record)
    return record


def measured_run(command: Sequence[str]) -> Tuple[float, float, int]:
    """Run ``command`` in a child process with inherited stdout and stderr: (wall seconds, peak resident memory in
    MiB, exit status). A stop request reaches the child, which saves a checkpoint and exits with status 130: a
    terminal's Ctrl-C (SIGINT) goes to the child directly (same process group), SIGTERM is passed on to it."""
    started = time.monotonic()
    child = subprocess.Popen(command)
    with _stop_requests_to(child):
        _, wait_status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(wait_status)
    wall_s = time.monotonic() - started
    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    peak_mib = usage.ru_maxrss / (1024 ** 2 if sys.platform == "darwin" else 1024)
    return wall_s, peak_mib, child.returncode


@contextlib.contextmanager
def _stop_requests_to(child: subprocess.Popen) -> Iterator[None]:
    """While inside, SIGTERM is passed on to ``child`` and SIGINT left to it (a terminal sends Ctrl-C to the whole
    process group; passing it on too would be the child's second SIGINT, which stops it without a checkpoint)."""
    def forward(signum: int, frame: object) -> None:
        child.send_signal(signum)

    def leave_to_child(signum: int, frame: object) -> None:
        pass

    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, forward),
                signal.SIGINT: signal.signal(signal.SIGINT, leave_to_child)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _write_json(path: Path, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=2) + "\n")


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"not valid JSON: {exc}", path) from None
    if not isinstance(value, dict):
        raise InputError("expected a JSON object", path)
    return value


# ---------------------------------------------------------------------------------------------------------------
# The table

METRICS = (("dice", "Dice %", 100.0), ("jaccard", "Jaccard %", 100.0), ("hd95_vox", "95HD vox", 1.0),
           ("asd_vox", "ASD vox", 1.0))
"""(metrics.csv column, table heading, factor to the table's unit): the paper's four metrics."""


@dataclass(frozen=True)
class CellResult:
    """A finished cell: its settings, the mean of each metric over its test cases (table units), and its cost."""

    settings: Mapping[str, Any]
    means: Mapping[str, float]
    n_test: int
    n_empty: int
    """Test cases with an empty prediction (no distance, so left out of the 95HD and ASD means)."""
    wall_s: float
    peak_rss_mib: float
    device: str
    paper: Optional[PaperResult]


@dataclass(frozen=True)
class Row:
    """One line of the table: the cells of one protocol with the same labeled N and method, over their seeds."""

    labeled: int
    method: str
    cells: Tuple[CellResult, ...]

    def stat(self, metric: str) -> Tuple[float, float]:
        """Mean and sample standard deviation (ddof = 1; NaN for one seed) over the seeds; NaN when undefined."""
        return _mean_std([cell.means[metric] for cell in self.cells])

    def wall_s(self) -> Tuple[float, float]:
        """Mean and sample standard deviation of the cells' wall times, in seconds."""
        return _mean_std([cell.wall_s for cell in self.cells])

    @property
    def peak_rss_mib(self) -> float:
        return max(cell.peak_rss_mib for cell in self.cells)

    @property
    def n_empty(self) -> int:
        return sum(cell.n_empty for cell in self.cells)

    @property
    def paper(self) -> Optional[PaperResult]:
        return self.cells[0].paper


def read_cell(folder: Path) -> Optional[CellResult]:
    """The results of the cell in ``folder``, None when it has not finished."""
    path = folder / CELL_FILE
    record = _read_json(path) if path.is_file() else {}
    if not record.get("finished"):
        return None
    settings = record["settings"]
    run = RunFolder(folder)
    rows = [row for row in _read_metrics(run.metrics) if row.get(SPLIT_COLUMN) == TEST_SPLIT]
    if not rows:
        raise InputError(f"no rows of split {TEST_SPLIT!r}: the cell's test cases were not scored", run.metrics,
                         SPLIT_COLUMN)
    means = {}
    for column, _, factor in METRICS:
        values = [float(row[column]) * factor for row in rows]
        means[column] = _mean_std([v for v in values if not math.isnan(v)])[0]
    config = _read_json(run.config)
    manifest = _read_json(run.manifest)
    return CellResult(
        settings=settings, means=means, n_test=len({row["case"] for row in rows}),
        n_empty=sum(math.isnan(float(row["hd95_vox"])) for row in rows),
        wall_s=sum(r["wall_s"] for r in record["runs"]), peak_rss_mib=max(r["peak_rss_mib"] for r in record["runs"]),
        device=str(manifest.get("device", "")),
        paper=paper_result(settings["labeled"], settings["method"], bool(config.get("sfr_plus")),
                           _simplified_stitching(config, settings["method"])),
    )


def _read_metrics(path: Path) -> List[Dict[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except FileNotFoundError:
        raise InputError("metrics file not found: the run did not evaluate its test cases", path) from None
    missing = [c for c in ("case", SPLIT_COLUMN) + tuple(m for m, _, _ in METRICS) if rows and c not in rows[0]]
    if missing:
        raise InputError(f"missing columns: {', '.join(missing)}", path, missing[0])
    return rows


def _simplified_stitching(config: Mapping[str, Any], method: str) -> bool:
    """Whether every patch the cell used is 96³ (the paper's simplified stitching, Table VI)."""
    uses_sam = parse_method(method)["pseudo_labels"] != "none"
    patches = [config["retrain"]["patch_size"]] + ([config["finetune"]["patch_size"]] if uses_sam else [])
    return all(tuple(p) == SIMPLIFIED_PATCH for p in patches)


def _mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1); NaN where there are too few values."""
    mean = statistics.fmean(values) if values else math.nan
    return mean, statistics.stdev(values) if len(values) > 1 else math.nan


def collect_rows(out: Path) -> List[Tuple[Mapping[str, Any], List[Row]]]:
    """Every finished cell in ``out``, grouped by protocol, then into rows by (labeled N, method) in the order of
    N and of the engine's method list."""
    order = {name: i for i, name in enumerate(METHODS)}
    protocols: Dict[str, Tuple[Mapping[str, Any], Dict[Tuple[int, str], List[CellResult]]]] = {}
    for folder in sorted(p for p in out.iterdir() if p.is_dir()):
        cell = read_cell(folder)
        if cell is None:
            continue
        protocol = {k: v for k, v in cell.settings.items() if k not in _CELL_AXES}
        key = json.dumps(protocol, sort_keys=True)
        rows = protocols.setdefault(key, (protocol, {}))[1]
        rows.setdefault((cell.settings["labeled"], cell.settings["method"]), []).append(cell)
    sections = []
    for protocol, rows in protocols.values():
        keys = sorted(rows, key=lambda key: (key[0], order.get(key[1], len(order))))
        sections.append((protocol, [Row(n, m, tuple(sorted(rows[n, m], key=lambda c: c.settings["seed"])))
                                    for n, m in keys]))
    return sections


def describe_protocol(protocol: Mapping[str, Any]) -> Tuple[str, List[str]]:
    """The heading of a protocol's table (does it follow the paper?) and its deviations from the paper's setting."""
    deviations = []
    if protocol["unlabeled"] is not None:
        deviations.append(f"unlabeled pool capped at {protocol['unlabeled']} cases")
    if protocol["dev_test"] is not None:
        deviations.append(f"test set: the last {protocol['dev_test']} cases of {TRAIN_LIST} (a development split, "
                          f"not {TEST_LIST}), left out of the unlabeled pool")
    if protocol["overrides"]:
        deviations.append(f"configuration overrides: `{json.dumps(protocol['overrides'], sort_keys=True)}`")
    if protocol["preset"] != PAPER_PRESET:
        heading = f"CPU-size protocol (preset {protocol['preset']}), not the paper's setting"
    elif deviations:
        heading = "The paper's preset with changes, not exactly the paper's protocol"
    else:
        heading = "The paper's LA protocol (preset paper)"
    return heading, deviations


CSV_COLUMNS = (
    "preset", "data", "test_list", "dev_test", "unlabeled_cap", "overrides", "labeled", "method", "seeds", "test_cases",
    "empty_predictions", "dice_mean", "dice_std", "jaccard_mean", "jaccard_std", "hd95_vox_mean", "hd95_vox_std",
    "asd_vox_mean", "asd_vox_std", "time_s_mean", "time_s_std", "peak_rss_mib_max", "device", "paper_table",
    "paper_row", "paper_dice", "paper_jaccard", "paper_hd95_vox", "paper_asd_vox")


def write_table(out: PathLike) -> str:
    """Write ``out/results.csv`` and ``out/results.md`` over the finished cells in ``out``; return the Markdown."""
    out = Path(out)
    if not out.is_dir():
        raise InputError("output folder not found: no cell to tabulate", out)
    sections = collect_rows(out)
    buffer = text_io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    markdown = ["# SFR on LA: our runs beside the paper's numbers", "", _EXPLANATION]
    if not sections:
        markdown += ["", f"No finished cell in {out} yet."]
    for protocol, rows in sections:
        for row in rows:
            writer.writerow(_csv_row(protocol, row))
        markdown += [""] + _markdown_section(protocol, rows)
    atomic_write_text(out / RESULTS_CSV, buffer.getvalue())
    text = "\n".join(markdown) + "\n"
    atomic_write_text(out / RESULTS_MD, text)
    return text


_EXPLANATION = (
    "Ours: per cell (labeled N, method, seed) the mean over its test cases, then mean ± std (ddof = 1) over the "
    "seeds. Dice and Jaccard in %, 95HD and ASD in voxels (MedPy's definitions without spacing, as the paper; 1 "
    "LA voxel = 0.625 mm); test cases with an empty prediction have no distance, are left out of 95HD and ASD and "
    "counted under *empty*. Time: wall time per cell (all the invocations that ran it), mean over the seeds; peak: "
    "the largest resident memory of a cell's process (CPU memory). Paper: Li et al., IEEE TMI 2025, Table I (16 "
    "labeled), Table VII (1 labeled), Table VI (every patch 96³); blank where the paper has no number.")


def _csv_row(protocol: Mapping[str, Any], row: Row) -> List[object]:
    paper = row.paper
    stats = [value for column, _, _ in METRICS for value in row.stat(column)]
    return [protocol["preset"], protocol["data"],
            *("" if protocol[key] is None else protocol[key] for key in ("test_list", "dev_test", "unlabeled")),
            json.dumps(protocol["overrides"], sort_keys=True), row.labeled, row.method,
            " ".join(str(cell.settings["seed"]) for cell in row.cells), row.cells[0].n_test, row.n_empty,
            *map(_number, stats), *map(_number, row.wall_s()), _number(row.peak_rss_mib),
            " ".join(sorted({cell.device for cell in row.cells})),
            *(("",) * 6 if paper is None else
              (paper.table, paper.row, paper.dice, paper.jaccard, paper.hd95_vox, paper.asd_vox))]


def _markdown_section(protocol: Mapping[str, Any], rows: Sequence[Row]) -> List[str]:
    heading, deviations = describe_protocol(protocol)
    devices = sorted({cell.device for row in rows for cell in row.cells})
    test_list = f"; test set: `{protocol['test_list']}`" if protocol["test_list"] else ""  # else a deviation
    lines = [f"## {heading}", "", f"Data: `{protocol['data']}`{test_list}; device: {', '.join(devices)}."]
    lines += [f"- {d}" for d in deviations]
    header = ["labeled", "method", "seeds", "test", "empty"]
    for _, title, _ in METRICS:
        header += [title, "paper"]
    header += ["time (min)", "peak (GiB)", "paper table"]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        paper = row.paper
        cells = [str(row.labeled), row.method, str(len(row.cells)), str(row.cells[0].n_test), str(row.n_empty)]
        for column, _, _ in METRICS:
            cells += [_mean_pm_std(*row.stat(column)), "" if paper is None else f"{getattr(paper, column):.2f}"]
        cells += [_mean_pm_std(*(seconds / 60 for seconds in row.wall_s()), digits=1),
                  f"{row.peak_rss_mib / 1024:.2f}", "" if paper is None else f"{paper.table}: {paper.row}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _mean_pm_std(mean: float, std: float, digits: int = 2) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" + ("" if math.isnan(std) else f" ± {std:.{digits}f}")


def _number(value: float) -> str:
    return "" if math.isnan(value) else repr(float(value))
