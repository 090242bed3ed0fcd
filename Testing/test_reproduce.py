"""`reproduce`: the LA protocol's split and cell cohorts, the paper's numbers, the results table, and the command
run end to end in a real subprocess (then resumed)."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import pytest

from SFRSegmentLib.base.config import preset
from SFRSegmentLib.base.config_io import to_dict
from SFRSegmentLib.data.cohort import discover_cohort
from SFRSegmentLib.base.errors import InputError
from SFRSegmentLib.storage.volumes import write_volume
from SFRSegmentLib.research.paper_results import paper_result
from SFRSegmentLib.research.reproduce import (
    CELL_FILE,
    COHORT_FILE,
    OVERRIDES_FILE,
    RESULTS_CSV,
    RESULTS_MD,
    Cell,
    LASplit,
    Protocol,
    cell_cohort,
    cell_overrides,
    grid,
    la_split,
    measured_run,
    run_grid,
    write_table,
)
from SFRSegmentLib.research.synthetic import make_synthetic_volume

REPO = Path(__file__).resolve().parents[1]
LA_ROOT = REPO.parent / "shared" / "data" / "LA"
"""The shared LA cases beside the repository: case folders plus ``train.list``."""
needs_la = pytest.mark.skipif(not (LA_ROOT / "train.list").is_file(), reason="../shared/data/LA is not present")


def _write_list(path: Path, ids: Sequence[str]) -> Path:
    path.write_text("\n".join(ids) + "\n", encoding="utf-8")
    return path


def _synthetic_la(root: Path, n_cases: int = 5) -> Path:
    """An LA-like folder of small synthetic volumes (`CASE<i>/image.nrrd`, `label.nrrd`, 0.625 mm): train.list =
    the first n_cases - 2, test.list = the last 2."""
    ids = [f"CASE{i}" for i in range(n_cases)]
    for i, case in enumerate(ids):
        image, label = make_synthetic_volume((48 + 2 * i, 50, 16 + i % 2), (0.625,) * 3, 1, np.random.default_rng(i))
        write_volume(image, root / case / "image.nrrd")
        write_volume(label, root / case / "label.nrrd")
    _write_list(root / "train.list", ids[:-2])
    _write_list(root / "test.list", ids[-2:])
    return root


@pytest.fixture
def la_folder(tmp_path) -> Path:
    """A small LA folder of 10 real cases (symlinked): train.list = 8 of them in the standard order, test.list = 2
    (for tests marked ``needs_la``)."""
    ids = (LA_ROOT / "train.list").read_text().split()[:10]
    root = tmp_path / "LA"
    root.mkdir()
    for case in ids:
        (root / case).symlink_to(LA_ROOT / case, target_is_directory=True)
    _write_list(root / "train.list", ids[:8])
    _write_list(root / "test.list", ids[8:])
    return root


# ---------------------------------------------------------------------------------------------------------------
# (a) the split and each cell's cohort


@needs_la
def test_a_cell_cohort_is_the_first_n_labeled_the_rest_unlabeled_and_the_test_list_held_out(la_folder, tmp_path):
    ids = (la_folder / "train.list").read_text().split()
    test_ids = (la_folder / "test.list").read_text().split()
    manifest = cell_cohort(la_split(la_folder), labeled=3)
    path = tmp_path / "cell" / COHORT_FILE
    path.parent.mkdir()
    path.write_text(json.dumps(manifest))

    cohort = discover_cohort(path)  # the engine reads it as run does
    assert [c.name for c in cohort.labeled] == ids[:3]
    assert [c.name for c in cohort.unlabeled] == ids[3:]
    assert [c.name for c in cohort.test] == test_ids
    assert cohort.classes == {1: "left atrium"}
    assert all(c.label == la_folder.resolve() / c.name / "label.nrrd" for c in cohort.labeled + cohort.test)
    assert all(c.image == la_folder.resolve() / c.name / "image.nrrd" for c in cohort.cases + cohort.test)
    names = [c.name for c in cohort.cases] + [c.name for c in cohort.test]
    assert len(names) == len(set(names)) == 10


@needs_la
def test_the_development_test_set_is_the_end_of_train_list_and_leaves_the_pool(la_folder):
    ids = (la_folder / "train.list").read_text().split()
    (la_folder / "test.list").unlink()  # not needed for a development split
    split = la_split(la_folder, dev_test=2)
    assert split.test == tuple(ids[-2:]) and split.pool == tuple(ids[:-2])

    manifest = cell_cohort(split, labeled=2, unlabeled=3)
    assert [c["name"] for c in manifest["cases"]] == ids[:5]
    assert [("label" in c) for c in manifest["cases"]] == [True, True, False, False, False]
    assert [c["name"] for c in manifest["test"]] == ids[-2:]


@needs_la
def test_a_missing_list_case_or_label_is_an_error_naming_the_file(la_folder, tmp_path):
    ids = (la_folder / "train.list").read_text().split()
    with pytest.raises(InputError, match="test.list: test list not found"):
        la_split(la_folder, test_list=tmp_path / "test.list")
    with pytest.raises(InputError, match="not both"):
        la_split(la_folder, test_list=la_folder / "test.list", dev_test=2)

    _write_list(la_folder / "train.list", ids + ["NOSUCHCASE"])
    with pytest.raises(InputError, match=r"NOSUCHCASE/image\.nrrd: file not found for case 'NOSUCHCASE' of .*train"):
        la_split(la_folder)
    _write_list(la_folder / "train.list", ids + [ids[0]])
    with pytest.raises(InputError, match=f"train.list: cases listed more than once: {ids[0]}"):
        la_split(la_folder)
    _write_list(la_folder / "train.list", ids)

    # A test case without its label (an unlabeled-only folder): the missing label is named.
    unlabeled_only = la_folder / "UNLABELEDONLY"
    unlabeled_only.mkdir()
    (unlabeled_only / "image.nrrd").symlink_to(la_folder / ids[0] / "image.nrrd")
    test_list = _write_list(tmp_path / "mine.list", ["UNLABELEDONLY"])
    with pytest.raises(InputError, match=r"UNLABELEDONLY/label\.nrrd: file not found .* of .*mine\.list"):
        la_split(la_folder, test_list=test_list)
    _write_list(test_list, [ids[1]])
    with pytest.raises(InputError, match=f"in both train.list and the test list: {ids[1]}"):
        la_split(la_folder, test_list=test_list)
    (la_folder / "train.list").unlink()
    with pytest.raises(InputError, match="train.list: case list not found"):
        la_split(la_folder)


@needs_la
def test_labeled_counts_that_leave_no_unlabeled_case_are_refused(la_folder):
    split = la_split(la_folder)
    with pytest.raises(InputError, match="between 1 and 7"):
        cell_cohort(split, labeled=8)
    with pytest.raises(InputError, match="between 1 and 7"):
        cell_cohort(split, labeled=0)


def test_the_grid_and_each_cells_overrides():
    cells = grid([1, 4], ["sfr_mt", "mt"], [1337, 7])
    assert [c.name for c in cells[:3]] == ["la_l1_sfr_mt_s1337", "la_l1_sfr_mt_s7", "la_l1_mt_s1337"]
    assert len(cells) == 8 and len(grid([4, 4], ["mt"], [1])) == 1
    split = LASplit(Path("/data/LA"), pool=("a", "b"), test=("c",), test_list=None, dev_test=1)
    protocol = Protocol(split, preset="small", overrides={"retrain": {"iterations": 5, "method": "acmt"},
                                                          "sfr_plus": True})
    assert cell_overrides(protocol, Cell(4, "mt", 7)) == {
        "retrain": {"iterations": 5, "method": "mt", "seed": 7}, "sfr_plus": True, "finetune": {"seed": 7}}
    assert protocol.overrides["retrain"]["method"] == "acmt"  # the protocol's own overrides are left as they were


# ---------------------------------------------------------------------------------------------------------------
# (b) the paper's numbers


def test_the_paper_lookup_returns_the_tables_numbers():
    # Values read from docs/sfr-method.md §7 (columns there: Dice, Jaccard, ASD, 95HD).
    table_1 = paper_result(16, "sfr_mt", sfr_plus=False, simplified=False)
    assert (table_1.table, table_1.row) == ("I", "SFR_MT")
    assert (table_1.dice, table_1.jaccard, table_1.asd_vox, table_1.hd95_vox) == (90.86, 83.34, 1.45, 6.15)
    plus = paper_result(16, "sfr_acmt", sfr_plus=True, simplified=False)
    assert (plus.row, plus.dice, plus.asd_vox, plus.hd95_vox) == ("SFR+_ACMT", 91.00, 1.61, 6.13)
    lower_bound = paper_result(1, "supervised", sfr_plus=False, simplified=False)
    assert (lower_bound.table, lower_bound.row, lower_bound.dice, lower_bound.hd95_vox) == ("VII", "V-Net (LB)",
                                                                                           17.99, 44.58)
    assert paper_result(16, "uamt", False, False).dice == 88.88
    simplified = paper_result(1, "sfr_acmt", sfr_plus=False, simplified=True)
    assert (simplified.table, simplified.jaccard, simplified.asd_vox, simplified.hd95_vox) == ("VI", 57.40, 12.38,
                                                                                                30.76)
    assert paper_result(16, "mt", False, True).dice == 87.47


@pytest.mark.parametrize("labeled, method, sfr_plus, simplified", [
    (4, "sfr_mt", False, False),  # the paper has no 4- or 8-labeled LA table
    (8, "mt", False, False),
    (16, "sfr_uamt", False, False),  # a method of ours the paper does not report
    (16, "sfr", False, False),
    (1, "uamt", False, False),  # UA-MT is in Table I only
    (16, "supervised", False, True),  # Table VI has no lower bound
    (16, "mt", True, False),  # SFR+ without SAM pseudo-labels is no row of the paper
])
def test_the_paper_lookup_is_blank_where_the_paper_has_no_number(labeled, method, sfr_plus, simplified):
    assert paper_result(labeled, method, sfr_plus, simplified) is None


# ---------------------------------------------------------------------------------------------------------------
# (c) the table, from fabricated cell folders


def _settings(labeled: int, method: str, seed: int, preset_name: str = "paper", **protocol) -> Dict[str, object]:
    return {"data": "/data/LA", "test_list": "/data/LA/test.list", "dev_test": None, "unlabeled": None,
            "preset": preset_name, "overrides": {}, **protocol, "labeled": labeled, "method": method, "seed": seed}


def _fabricate_cell(out: Path, settings: Dict[str, object], test_rows: List[Sequence[float]],
                    runs: Sequence[Dict[str, float]], finished: bool = True, patch: Optional[List[int]] = None,
                    sfr_plus: bool = False) -> Path:
    """A cell folder as `reproduce` leaves it: cell.json, the run's config.json and manifest.json, and metrics.csv
    with the given test rows (dice, jaccard, hd95_vox, asd_vox as fractions and voxels) and one unlabeled row."""
    folder = out / Cell(settings["labeled"], settings["method"], settings["seed"]).name
    folder.mkdir(parents=True)
    record = {"settings": settings, "finished": finished,
              "runs": [{"exit_status": 0, "ended": "2026-01-01T00:00:00+00:00", **run} for run in runs]}
    (folder / CELL_FILE).write_text(json.dumps(record))
    config = to_dict(preset(str(settings["preset"])).resolved())  # as the run writes it
    config["sfr_plus"] = sfr_plus
    if patch:
        config["finetune"]["patch_size"] = config["retrain"]["patch_size"] = patch
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "manifest.json").write_text(json.dumps({"device": "cuda:0"}))
    lines = ["split,case,class,dice,jaccard,hd95_vox,asd_vox,hd95_mm,asd_mm",
             "unlabeled,u0,1,0.1,0.1,99.0,99.0,61.9,61.9"]
    lines += [f"test,t{i},1,{d!r},{j!r},{h!r},{a!r},{h * 0.625!r},{a * 0.625!r}"
              for i, (d, j, h, a) in enumerate(test_rows)]
    (folder / "metrics.csv").write_text("\n".join(lines) + "\n")
    return folder


def _read_results(out: Path) -> List[Dict[str, str]]:
    with open(out / RESULTS_CSV, newline="") as handle:
        return list(csv.DictReader(handle))


def test_the_table_gives_mean_and_std_over_seeds_of_the_test_means_beside_the_papers(tmp_path):
    out = tmp_path / "out"
    nan = float("nan")
    # Two seeds of LA 16 / sfr_mt, 3 test cases each. Seed 1: Dice 85 %, Jaccard 75 %, 95HD 5, ASD 1.5; seed 2 with
    # an empty prediction (Dice 0, no distance): Dice 60 %, Jaccard 53.33 %, 95HD 7, ASD 3 over the other two.
    _fabricate_cell(out, _settings(16, "sfr_mt", 1), [(0.90, 0.80, 4.0, 1.0), (0.80, 0.70, 6.0, 2.0),
                                                      (0.85, 0.75, 5.0, 1.5)],
                    runs=[{"wall_s": 60.0, "peak_rss_mib": 2048.0}, {"wall_s": 30.0, "peak_rss_mib": 1024.0}])
    _fabricate_cell(out, _settings(16, "sfr_mt", 2), [(0.90, 0.80, 7.0, 3.0), (0.90, 0.80, 7.0, 3.0),
                                                      (0.0, 0.0, nan, nan)],
                    runs=[{"wall_s": 150.0, "peak_rss_mib": 3072.0}])
    one_run = [{"wall_s": 10.0, "peak_rss_mib": 1.0}]
    _fabricate_cell(out, _settings(4, "mt", 1), [(0.5, 0.4, 10.0, 2.0)], one_run)
    _fabricate_cell(out, _settings(1, "mt", 1), [(0.5, 0.4, 10.0, 2.0)], one_run, patch=[96, 96, 96])
    _fabricate_cell(out, _settings(16, "acmt", 1), [(0.5, 0.4, 1.0, 1.0)], one_run, finished=False)  # not in the table
    _fabricate_cell(out, _settings(16, "sfr_mt", 9, preset_name="small", dev_test=16, unlabeled=4),
                    [(0.6, 0.5, 20.0, 5.0)], runs=[{"wall_s": 600.0, "peak_rss_mib": 512.0}], sfr_plus=True)

    markdown = write_table(out)
    assert markdown == (out / RESULTS_MD).read_text()
    rows = _read_results(out)
    assert [(r["preset"], r["labeled"], r["method"]) for r in rows] == [
        ("paper", "1", "mt"), ("paper", "4", "mt"), ("paper", "16", "sfr_mt"), ("small", "16", "sfr_mt")]
    sfr = rows[2]
    assert (sfr["seeds"], sfr["test_cases"], sfr["empty_predictions"]) == ("1 2", "3", "1")
    # Over the seeds (ddof = 1): Dice 85 and 60 → 72.5 ± 17.68; 95HD 5 and 7 → 6 ± 1.414.
    assert float(sfr["dice_mean"]) == pytest.approx(72.5)
    assert float(sfr["dice_std"]) == pytest.approx(25 / math.sqrt(2))
    assert float(sfr["jaccard_mean"]) == pytest.approx((75 + 160 / 3) / 2)
    assert float(sfr["hd95_vox_mean"]) == pytest.approx(6.0) and float(sfr["hd95_vox_std"]) == pytest.approx(2 ** .5)
    assert float(sfr["asd_vox_mean"]) == pytest.approx(2.25)
    assert float(sfr["time_s_mean"]) == pytest.approx(120.0)  # (60 + 30) and 150 seconds
    assert float(sfr["peak_rss_mib_max"]) == 3072.0 and sfr["device"] == "cuda:0"
    assert (sfr["paper_table"], sfr["paper_row"], sfr["paper_dice"], sfr["paper_hd95_vox"]) == ("I", "SFR_MT",
                                                                                                "90.86", "6.15")
    assert rows[1]["paper_table"] == rows[1]["paper_dice"] == rows[1]["dice_std"] == ""  # no 4-labeled table; 1 seed
    assert (rows[0]["paper_table"], rows[0]["paper_dice"]) == ("VI", "44.89")  # 96³ patches: simplified stitching
    small = rows[3]
    assert (small["paper_row"], small["paper_dice"], small["dev_test"], small["unlabeled_cap"]) == ("SFR+_MT", "90.91",
                                                                                                    "16", "4")

    assert "## The paper's LA protocol (preset paper)" in markdown
    assert "## CPU-size protocol (preset small), not the paper's setting" in markdown
    assert "Data: `/data/LA`; test set: `/data/LA/test.list`; device: cuda:0." in markdown
    assert markdown.count("the last 16 cases of train.list (a development split, not test.list)") == 1
    assert "| 16 | sfr_mt | 2 | 3 | 1 | 72.50 ± 17.68 | 90.86 | 64.17 ± 15.32 | 83.34 | 6.00 ± 1.41 | 6.15 | " \
           "2.25 ± 1.06 | 1.45 | 2.0 ± 0.7 | 3.00 | I: SFR_MT |" in markdown
    assert "| 4 | mt | 1 | 1 | 0 | 50.00 |  | 40.00 |  | 10.00 |  | 2.00 |  |" in markdown


def test_a_cell_run_with_other_settings_is_refused(tmp_path):
    split = la_split(_synthetic_la(tmp_path / "LA"))
    out = tmp_path / "out"
    folder = _fabricate_cell(out, _settings(1, "mt", 3, preset_name="small", data=str(split.data),
                                            test_list=str(split.test_list)), [(0.5, 0.5, 1.0, 1.0)],
                             runs=[{"wall_s": 1.0, "peak_rss_mib": 1.0}])
    before = (folder / CELL_FILE).read_text()
    with pytest.raises(InputError, match=rf"{folder / CELL_FILE}: this cell was run with preset 'small', now 'paper'"):
        run_grid(Protocol(split, preset="paper", overrides={}), [Cell(1, "mt", 3)], out)
    assert (folder / CELL_FILE).read_text() == before and not (folder / COHORT_FILE).exists()


def test_a_cells_process_is_measured_and_sigterm_reaches_it(tmp_path):
    """The child's own peak memory and wall time come back, and SIGTERM to this process is passed on to the child
    (which exits 130 as `run` does after its checkpoint)."""
    ready = tmp_path / "ready"
    child = (f"import pathlib, signal, sys, time\n"
             f"signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))\n"
             f"block = b'x' * (300 * 2 ** 20)\n"
             f"pathlib.Path({str(ready)!r}).touch()\n"
             f"time.sleep(120)\n")

    def stop_when_ready() -> None:
        while not ready.exists():
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    stopper = threading.Thread(target=stop_when_ready)
    stopper.start()
    wall_s, peak_mib, status = measured_run([sys.executable, "-c", child])
    stopper.join()
    assert status == 130  # stopped by the SIGTERM passed on (it would sleep, then exit 0)
    assert wall_s > 0 and peak_mib >= 300


# ---------------------------------------------------------------------------------------------------------------
# (d) end to end


def _reproduce(data: Path, out: Path, config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "SFRSegmentLib", "reproduce", "--data", str(data), "--out", str(out),
                           "--labeled", "1", "--methods", "sfr_mt", "--seeds", "5", "--unlabeled", "2",
                           "--preset", "small", "--config", str(config), "--device", "cpu", "--progress", "none"],
                          cwd=REPO, capture_output=True, text=True, timeout=1800)


def test_reproduce_runs_a_cell_writes_the_table_and_skips_it_when_rerun(tmp_path):
    data = _synthetic_la(tmp_path / "LA", n_cases=6)
    config = tmp_path / "cheap.json"
    config.write_text(json.dumps({"finetune": {"iterations": 2, "checkpoint_every": 2},
                                  "retrain": {"iterations": 2, "checkpoint_every": 2},
                                  "inference": {"stride_xy": 32, "stride_z": 16}, "estimate": False}))
    out = tmp_path / "out"
    result = _reproduce(data, out, config)
    assert result.returncode == 0, result.stderr[-3000:]

    cell = out / "la_l1_sfr_mt_s5"
    manifest = json.loads((cell / COHORT_FILE).read_text())
    assert [c["name"] for c in manifest["cases"]] == ["CASE0", "CASE1", "CASE2"]  # 1 labeled, 2 unlabeled (capped)
    assert ["label" in c for c in manifest["cases"]] == [True, False, False]
    assert [c["name"] for c in manifest["test"]] == ["CASE4", "CASE5"]
    overrides = json.loads((cell / OVERRIDES_FILE).read_text())
    assert overrides["finetune"]["seed"] == overrides["retrain"]["seed"] == 5
    used = json.loads((cell / "config.json").read_text())["retrain"]
    assert (used["ssl_method"], used["pseudo_labels"]) == ("mt", "sam")
    record = json.loads((cell / CELL_FILE).read_text())
    assert record["finished"] and record["settings"]["preset"] == "small" and len(record["runs"]) == 1
    assert record["runs"][0]["exit_status"] == 0 and record["runs"][0]["peak_rss_mib"] > 100  # torch alone is more
    assert sorted(p.name for p in (cell / "predictions").glob("*.seg.nrrd")) == [
        "CASE1.seg.nrrd", "CASE2.seg.nrrd", "CASE4.seg.nrrd", "CASE5.seg.nrrd"]
    assert "cell 1/1 la_l1_sfr_mt_s5: running (preset small)" in result.stderr
    rows = _read_results(out)
    assert [(r["labeled"], r["method"], r["seeds"], r["test_cases"]) for r in rows] == [("1", "sfr_mt", "5", "2")]
    assert rows[0]["paper_table"] == "VII" and 0 <= float(rows[0]["dice_mean"]) <= 100
    assert "## CPU-size protocol (preset small), not the paper's setting" in result.stdout
    assert result.stdout.endswith((out / RESULTS_MD).read_text())

    rerun = _reproduce(data, out, config)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "la_l1_sfr_mt_s5: finished earlier, skipped" in rerun.stderr
    assert json.loads((cell / CELL_FILE).read_text()) == record  # not run again
    assert _read_results(out) == rows


def test_reproduce_names_a_missing_test_list_and_exits_with_status_2(tmp_path):
    data = _synthetic_la(tmp_path / "LA")
    (data / "test.list").unlink()
    result = subprocess.run([sys.executable, "-m", "SFRSegmentLib", "reproduce", "--data", str(data),
                             "--out", str(tmp_path / "out"), "--preset", "small"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert f"error: {data.resolve() / 'test.list'}: test list not found" in result.stderr
    assert not (tmp_path / "out").exists()
