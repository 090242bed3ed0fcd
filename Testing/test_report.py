"""The run report: one self-contained HTML file, every section from a hand-made run folder, notes for what is
missing, and escaped text."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import re
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest
from PIL import Image

from SFRSegmentLib.data.cohort import Case
from SFRSegmentLib.storage.volumes import read_volume, write_volume
from SFRSegmentLib.evaluation.report import TRUTH_OUTLINE_RGB, write_report
from SFRSegmentLib.storage.runfolder import RunFolder
from SFRSegmentLib.research.synthetic import TRUTH_FOLDER, make_synthetic_cohort

ODD_NAME = 'x<&>"y'
"""A case name made of HTML-special characters (it appears in the tables only, not in the cohort)."""
PATCH = (48, 48, 4)
"""Larger in-plane than the synthetic volumes (40–44), so the mosaic patch is padded; a 2×2 grid on 128²."""
CANVAS = 128
FINETUNE_LOG = [(i, 1.0 / i, 1e-3) for i in range(1, 8)]
ROUND_LOG_ROWS = 4


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Tuple[RunFolder, object, str, Path]:
    """A run folder with config, metrics (with NaN), confidences, logs and one prediction; its report's HTML."""
    tmp = tmp_path_factory.mktemp("report")
    cohort = make_synthetic_cohort(tmp / "cohort", n_cases=3, n_labeled=1,
                                   size_range=((40, 44), (40, 44), (16, 20)))
    run = RunFolder(tmp / "run")
    run.root.mkdir()
    config = {"preset": "test", "finetune": {"patch_size": list(PATCH), "sam": {"image_size": CANVAS}}}
    run.config.write_text(json.dumps(config))
    run.metrics.write_text("case,class,dice,jaccard,hd95_vox,asd_vox,hd95_mm,asd_mm\n"
                           "case_001,1,0.9,0.81818,3.456,1.2345,2.7648,0.98765\n"
                           "case_002,1,0.6,0.42857,5.0,2.0,4.0,1.6\n"
                           f'"{ODD_NAME.replace(chr(34), 2 * chr(34))}",1,0.0,0.0,nan,nan,nan,nan\n')
    run.prediction_dir.mkdir()
    run.prediction_confidence.write_text(f'case,confidence\ncase_002,0.9\ncase_001,0.6\ncase_000,0.5\n'
                                         f'"{ODD_NAME.replace(chr(34), 2 * chr(34))}",0.75\n')
    run.finetune_dir.mkdir()
    run.finetune_log.write_text("iteration,loss,lr\n" + "".join(f"{i},{loss},{lr}\n" for i, loss, lr in FINETUNE_LOG))
    round_log = run.root / "sfrplus" / "round1" / "retrain" / "log.csv"
    round_log.parent.mkdir(parents=True)
    round_log.write_text("iteration,lr,loss,supervised,note\n"
                         + "".join(f"{i},0.01,{1 / i},{2 / i},text\n" for i in range(1, ROUND_LOG_ROWS + 1)))
    truth = cohort.root / TRUTH_FOLDER / "case_001" / "label.nrrd"
    write_volume(read_volume(truth), run.prediction("case_001"))
    report = write_report(run, cohort, truths={"case_001": truth})
    return run, cohort, report.read_text(encoding="utf-8"), truth


def _section(page: str, heading: str) -> str:
    match = re.search(rf"<h2>{heading}</h2>(.*?)</section>", page, re.S)
    assert match, f"no section {heading!r}"
    return match.group(1)


def _images(page: str) -> Dict[str, Image.Image]:
    """alt text → decoded picture of every <img> (all must be base64 PNG data URIs)."""
    pictures = {}
    for alt, data in re.findall(r'<img alt="([^"]*)"[^>]*src="data:image/png;base64,([^"]*)"', page):
        picture = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        assert picture.format == "PNG"
        pictures[alt] = picture.convert("RGB")
    assert len(pictures) == page.count("<img"), "an <img> is not a base64 PNG data URI"
    return pictures


def test_report_is_one_self_contained_file(built):
    run, _, page, _ = built
    assert run.report.is_file() and page.startswith("<!DOCTYPE html>")
    assert not [p for p in run.root.iterdir() if p.name.startswith(".report.html")], "atomic write left a temp"
    references = re.findall(r'\b(?:src|href)\s*=\s*"([^"]*)"', page, re.I)
    assert references and all(r.startswith("data:image/png;base64,") for r in references)
    assert "<script" not in page.lower() and "<link" not in page.lower() and "url(" not in page


def test_images_decode_as_pngs_of_the_expected_size(built):
    _, _, page, truth_path = built
    pictures = _images(page)
    assert pictures["SAM mosaic 1 of case_000"].size == (CANVAS, CANVAS)
    assert "SAM mosaic 2 of case_000" not in pictures
    i, j, k = read_volume(truth_path).shape
    expected = {"axial": (i, j), "coronal": (i, k), "sagittal": (j, k)}
    for view, size in expected.items():
        picture = np.asarray(pictures[f"case_001 {view}"])
        assert picture.shape[1::-1] == size
        assert (picture == TRUTH_OUTLINE_RGB).all(axis=-1).any(), f"no truth outline in the {view} slice"
        grey = (picture[..., 0] == picture[..., 1]) & (picture[..., 1] == picture[..., 2])
        assert not grey.all(), f"no prediction overlay in the {view} slice"
    mosaic = np.asarray(pictures["SAM mosaic 1 of case_000"])
    assert not ((mosaic[..., 0] == mosaic[..., 1]) & (mosaic[..., 1] == mosaic[..., 2])).all(), "no label overlay"
    assert "confidence 0.6000" in _section(page, "Images")


def test_summary_shows_cohort_and_collapsed_config(built):
    _, cohort, page, _ = built
    summary = _section(page, "Summary")
    assert "case_000" in summary and "case_001, case_002" in summary
    assert "1 = organ 1" in summary
    details = re.search(r"<details>(.*?)</details>", summary, re.S)
    assert details and "&quot;image_size&quot;: 128" in details.group(1)
    assert "No manifest.json" in summary


def test_metrics_are_formatted_with_undefined_values_explained(built):
    _, _, page, _ = built
    metrics = _section(page, "Metrics")
    for text in ("90.00", "81.82", "3.46", "1.23", "2.76", "0.99", "42.86", "50.00 ± 45.83"):
        assert text in metrics
    assert "4.23 ± 1.09" in metrics, "HD95 mean leaves the undefined value out"
    assert metrics.count("<td>—</td>") == 4 and "empty in the prediction" in metrics
    assert "<td>1</td>" in metrics, "one case with undefined distances"


def test_review_queue_lists_the_unlabeled_predictions_least_confident_first(built):
    _, _, page, _ = built
    queue = _section(page, "Review queue")
    names = re.findall(r"<tr><td>\d+</td><td>(.*?)</td>", queue)
    assert names == ["case_001", "case_002"]  # not the labeled case_000, nor a case outside the cohort
    assert re.findall(r'style="width:([\d.]+)%"', queue) == ["60.00", "90.00"]


def test_every_numeric_log_column_is_a_polyline_with_one_point_per_row(built):
    _, _, page, _ = built
    curves = _section(page, "Training curves")
    polylines: List[Tuple[str, str]] = re.findall(r'<polyline data-series="([^"]*)"[^>]*points="([^"]*)"', curves)
    assert [name for name, _ in polylines] == ["loss", "lr", "lr", "loss", "supervised"]
    counts = [len(points.split()) for _, points in polylines]
    assert counts == [len(FINETUNE_LOG)] * 2 + [ROUND_LOG_ROWS] * 3
    assert "SFR+ round1/retrain" in curves
    assert ">1<" in curves and ">0.1429<" in curves and ">7<" in curves, "min/max tick labels"
    assert "retrain/log.csv" in curves and "this stage has not run" in curves


def test_missing_inputs_give_notes(tmp_path, built):
    _, cohort, _, _ = built
    run = RunFolder(tmp_path / "empty")
    page = write_report(run, cohort).read_text(encoding="utf-8")
    assert "No config.json" in _section(page, "Summary")
    assert "No metrics.csv" in _section(page, "Metrics")
    assert "No predictions/confidence.csv" in _section(page, "Review queue")
    assert _section(page, "Training curves").count("this stage has not run") == 2
    images = _section(page, "Images")
    assert "No predictions/" in images
    assert "SAM mosaic 1 of case_000" in images, "defaults (112×112×80 patch, 1024 canvas) when no config"
    assert _images(page)["SAM mosaic 1 of case_000"].size == (1024, 1024)


def test_corrupt_inputs_give_notes(tmp_path, built):
    _, cohort, _, _ = built
    run = RunFolder(tmp_path / "corrupt")
    run.root.mkdir()
    run.config.write_text("{not json")
    run.metrics.write_text("case,dice\na,0.5\n")
    run.finetune_dir.mkdir()
    run.finetune_log.write_text("")
    run.prediction_dir.mkdir()
    run.prediction_confidence.write_text("case,confidence\ncase_001,high\n")
    page = write_report(run, cohort).read_text(encoding="utf-8")
    assert "Cannot show config.json" in _section(page, "Summary")
    assert "Cannot show metrics.csv" in _section(page, "Metrics") and "class" in _section(page, "Metrics")
    assert "holds no rows" in _section(page, "Training curves")
    assert "Cannot show confidence.csv" in _section(page, "Review queue") and "case,confidence" in page
    assert "Cannot show the SAM mosaic" in _section(page, "Images")


def test_text_is_escaped_and_extra_sections_are_added(tmp_path, built):
    _, cohort, page, _ = built
    assert ODD_NAME not in page and "x&lt;&amp;&gt;&quot;y" in page
    page = write_report(RunFolder(tmp_path / "extra"), cohort, title="A <b> & run",
                        extra_sections=[("Supervised <vs> SFR", "<p>Dice <b>0.9</b></p>")]).read_text()
    assert "<title>A &lt;b&gt; &amp; run</title>" in page
    assert "<h2>Supervised &lt;vs&gt; SFR</h2>\n<p>Dice <b>0.9</b></p>" in page


def test_held_out_test_metrics_come_first_with_mean_and_std(tmp_path, built):
    _, cohort, _, _ = built
    held_out = make_synthetic_cohort(tmp_path / "held_out", n_cases=2, n_labeled=2, seed=9,
                                     size_range=((40, 44), (40, 44), (16, 20)))
    test = [Case(name, case.image, case.label) for name, case in zip(("t1", "t2"), held_out.cases)]
    run = RunFolder(tmp_path / "run")
    run.root.mkdir()
    run.metrics.write_text("split,case,class,dice,jaccard,hd95_vox,asd_vox,hd95_mm,asd_mm\n"
                           "unlabeled,case_001,1,0.95,0.9,1.0,0.5,1.0,0.5\n"
                           "test,t1,1,0.8,0.66667,4.0,1.0,3.0,0.8\n"
                           "test,t2,1,0.6,0.42857,6.0,2.0,5.0,1.6\n")
    write_volume(read_volume(test[0].label), run.prediction("t1"))
    page = write_report(run, dataclasses.replace(cohort, test=test),
                        truths={"t1": test[0].label}).read_text(encoding="utf-8")
    metrics = _section(page, "Metrics")
    test_at = metrics.index("<h3>Held-out test cases: 2 cases</h3>")
    unlabeled_at = metrics.index("<h3>Unlabeled cases (transductive): 1 case</h3>")
    assert test_at < unlabeled_at, "the held-out test metrics come first"
    test_part, unlabeled_part = metrics[test_at:unlabeled_at], metrics[unlabeled_at:]
    assert "no stage trained on" in test_part and "transductive" in unlabeled_part
    assert "70.00 ± 14.14" in test_part and "5.00 ± 1.41" in test_part, "Dice and HD95 mean ± std of the test cases"
    assert "t1" in test_part and "case_001" not in test_part and "95.00" in unlabeled_part
    assert "t1, t2" in _section(page, "Summary") and "Test, held out (2)" in _section(page, "Summary")
    images = _section(page, "Images")
    assert "<h4>t1 <small>(held-out test case; truth outlined in yellow)</small></h4>" in images
