"""The run report: one self-contained HTML file (``RUN/report.html``) that shows what a run did and produced.

It is meant to be opened anywhere (mailed, archived, viewed in Slicer's web widget), so it references nothing:
styles are inline, curves are SVG polylines drawn here, pictures are base64 PNG ``data:`` URIs, and no JavaScript
is needed. Every text taken from files or the cohort is HTML-escaped.

Sections, each built from what the run folder holds (see :mod:`SFRSegmentLib.storage.runfolder`) and replaced by a
one-line note when its input is missing or unreadable, so that a partial run still gets a report:

1. Summary: the cohort, the resolved ``config.json`` and ``manifest.json`` (collapsed).
2. Metrics: ``metrics.csv`` per split, the held-out test cases first, then the unlabeled cases (transductive: their
   images trained the model); each per class (mean ± sample std over the cases where a value is defined) and per
   case. A table without a ``split`` column (older runs) holds unlabeled cases.
3. Review queue: the unlabeled cases of ``predictions/confidence.csv``, least confident prediction first.
4. Training curves: every numeric column of each ``log.csv`` (fine-tuning, re-training, SFR+ rounds) against its
   step column, so that the stages may log whatever columns they like.
5. Images: the SAM mosaic of the first labeled case's central patch, as fine-tuning sees it, and three
   orthogonal slices through the predicted foreground of every predicted case.

Callers add their own sections (e.g. a baseline comparison) as ``(heading, html)`` pairs.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import logging
import math
import re
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from scipy import ndimage

from ..base.config import PATCH_SIZE
from ..data.cohort import Cohort, load_case
from ..data.patches import center_crop_start, crop, pad_to_shape, zscore
from ..models.sam.stitching import DEFAULT_CANVAS, mosaic_layout, render_mosaic, stitch_image, stitch_label
from ..stages.confidence import read_table, recorded
from ..stages.sfrplus import ROUNDS_FOLDER
from ..storage.atomic import atomic_write_text
from ..storage.runfolder import RunFolder
from ..storage.volumes import SEGMENTATION_SUFFIX, read_volume
from .metrics import (
    CSV_COLUMNS,
    METRIC_NAMES,
    SPLIT_COLUMN,
    SPLIT_DESCRIPTIONS,
    TEST_SPLIT,
    UNLABELED_SPLIT,
    mean_dice,
    scored_split,
    split_rank,
)

logger = logging.getLogger(__name__)

STEP_COLUMN = "iteration"
"""The x axis of a training curve; a log without it is plotted against its first column."""
TRUTH_OUTLINE_RGB = (255, 220, 0)
"""Colour of the true label's outline over a prediction: yellow, unlike the default segment colours."""
SLICE_VIEW_PX = 260
"""Displayed size of the longest physical extent of a volume in the slice pictures."""
MOSAIC_VIEW_PX = 640
"""Displayed width of a mosaic picture at most (the PNG keeps the full canvas resolution)."""
_PERCENT_METRICS = ("dice", "jaccard")
_METRIC_TITLES = {"dice": "Dice (%)", "jaccard": "Jaccard (%)", "hd95_vox": "HD95 (vox)", "asd_vox": "ASD (vox)",
                  "hd95_mm": "HD95 (mm)", "asd_mm": "ASD (mm)"}
_MISSING = "—"
_SPLIT_NOTES = {
    TEST_SPLIT: "Labeled cases that no stage trained on (not fine-tuning, pseudo-labelling, re-training or SFR+ "
                "selection), scored against their own labels: the estimate of how the model does on new scans.",
    UNLABELED_SPLIT: "The cohort's unlabeled cases, scored against their true labels. Their images were used in "
                     "training (pseudo-labels, consistency), so these scores are transductive and can be higher than "
                     "on new scans.",
}
_READ_ERRORS = (OSError, ValueError, KeyError, csv.Error)
"""What a missing, corrupt or unexpected input raises; the section then shows a note instead."""

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;padding:0 1em;color:#222}
h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0}
th,td{border:1px solid #ddd;padding:.2em .6em;text-align:right}
th:first-child,td:first-child{text-align:left}
.note{color:#666;font-style:italic}
.bar{background:#eee;width:240px;height:.9em}
.bar span{display:block;height:100%;background:#d9822b}
pre{background:#f6f6f6;padding:.6em;overflow:auto;max-height:30em}
figure{display:inline-block;margin:.3em;vertical-align:top}
figcaption{font-size:.85em;color:#444}
img{image-rendering:pixelated;max-width:100%;height:auto}
svg text{font-size:11px;fill:#333}
"""


def write_report(run: RunFolder, cohort: Cohort, title: str = "SFRSegment run",
                 extra_sections: Sequence[Tuple[str, str]] = (),
                 truths: Optional[Mapping[str, Path]] = None) -> Path:
    """Write ``run.report`` (atomically) from whatever the run folder holds; return its path.

    ``extra_sections`` are ``(heading, html)`` pairs appended as they are (the heading is escaped, the HTML is
    trusted). ``truths`` maps case names to true label files, outlined over the predictions they belong to.
    """
    sections = [
        ("Summary", _guarded(lambda: _summary_section(run, cohort), "the summary")),
        ("Metrics", _guarded(lambda: _metrics_section(run.metrics, cohort.classes), "metrics.csv")),
        ("Review queue", _guarded(lambda: _review_section(run.prediction_confidence, cohort), "confidence.csv")),
        ("Training curves", _curves_section(run)),
        ("Images", _images_section(run, cohort, truths or {})),
        *extra_sections,
    ]
    body = "".join(f"<section><h2>{_e(heading)}</h2>\n{content}</section>\n" for heading, content in sections)
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{_STYLE}</style></head>\n<body><h1>{_e(title)}</h1>\n"
            f"<p>Run folder: <code>{_e(run.root)}</code></p>\n{body}</body></html>\n")
    atomic_write_text(run.report, page)
    return run.report


# ---------------------------------------------------------------------------------------------------------------
# Sections


def _summary_section(run: RunFolder, cohort: Cohort) -> str:
    classes = ", ".join(f"{value} = {name}" for value, name in sorted(cohort.classes.items()))
    rows = [("Cohort", f"{cohort.root} ({cohort.source}), {len(cohort.cases)} cases"),
            ("Classes", f"0 = background, {classes}"),
            (f"Labeled ({len(cohort.labeled)})", ", ".join(c.name for c in cohort.labeled) or _MISSING),
            (f"Unlabeled ({len(cohort.unlabeled)})", ", ".join(c.name for c in cohort.unlabeled) or _MISSING)]
    if cohort.test:
        rows.append((f"Test, held out ({len(cohort.test)})", ", ".join(c.name for c in cohort.test)))
    parts = [_table((), rows)]
    for name, path in (("Resolved configuration", run.config), ("Manifest", run.manifest)):
        parts.append(_guarded(lambda path=path, name=name: _json_details(name, path), path.name))
    return "".join(parts)


def _json_details(name: str, path: Path) -> str:
    content = _read_json(path)
    if content is None:
        return _note(f"No {path.name} in the run folder.")
    return (f"<details><summary>{_e(name)} ({_e(path.name)})</summary>"
            f"<pre>{_e(json.dumps(content, indent=2))}</pre></details>\n")


def _metrics_section(path: Path, classes: Mapping[int, str]) -> str:
    if not path.is_file():
        return _note("No metrics.csv: the predictions were not evaluated (no held-out test cases and no truth "
                     "labels were given).")
    rows = _read_csv(path, CSV_COLUMNS)
    by_split: Dict[str, List[Dict[str, str]]] = {}
    for row in rows:
        by_split.setdefault(row.get(SPLIT_COLUMN) or UNLABELED_SPLIT, []).append(row)
    parts = []
    for split in sorted(by_split, key=split_rank):
        mine = by_split[split]
        title = SPLIT_DESCRIPTIONS.get(split, f"split {split}")
        n_cases = len({row["case"] for row in mine})
        parts += [f"<h3>{_e(title[0].upper() + title[1:])}: {n_cases} case{'s' if n_cases != 1 else ''}</h3>",
                  _note(_SPLIT_NOTES[split]) if split in _SPLIT_NOTES else "", _split_tables(mine, classes)]
    if any(math.isnan(float(row[name])) for row in rows for name in METRIC_NAMES):
        parts.append(_note(f"{_MISSING} marks an undefined distance: the class is empty in the prediction (or in "
                           "the truth) of that case, so Dice and Jaccard are 0 there; the class means leave such "
                           "values out, and 'Undefined' counts those cases."))
    return "".join(parts)


def _split_tables(rows: Sequence[Mapping[str, str]], classes: Mapping[int, str]) -> str:
    """The per-class (mean ± std) and per-case tables of one split's rows of ``metrics.csv``."""
    values = [{name: float(row[name]) for name in METRIC_NAMES} for row in rows]
    class_of = [int(row["class"]) for row in rows]
    headers = ("Case", "Class") + tuple(_METRIC_TITLES[m] for m in METRIC_NAMES)
    per_case = [(row["case"], classes.get(c, str(c)), *(_format_metric(m, v[m]) for m in METRIC_NAMES))
                for row, c, v in zip(rows, class_of, values)]
    per_class = []
    for value in sorted(set(class_of)):
        mine = [v for v, c in zip(values, class_of) if c == value]
        undefined = sum(math.isnan(v["hd95_vox"]) for v in mine)
        per_class.append((classes.get(value, str(value)), str(len(mine)), str(undefined),
                          *(_mean_std(m, [v[m] for v in mine]) for m in METRIC_NAMES)))
    return "".join(["<h4>Per class (mean ± std over the cases where defined)</h4>",
                    _table(("Class", "Cases", "Undefined") + headers[2:], per_class),
                    "<h4>Per case</h4>", _table(headers, per_case)])


def _review_section(path: Path, cohort: Cohort) -> str:
    if not path.is_file():
        return _note("No predictions/confidence.csv: the V-Net has not predicted the unlabeled cases.")
    unlabeled = {case.name for case in cohort.unlabeled}
    rows = [(str(rank), name, f"{conf:.4f}",
             f'<div class="bar"><span style="width:{100 * min(max(conf, 0.0), 1.0):.2f}%"></span></div>')
            for rank, (name, conf) in enumerate([row for row in read_table(path) if row[0] in unlabeled], start=1)]
    intro = ("<p>Unlabeled cases by the confidence of the V-Net's prediction (the mean over voxels of the largest "
             "class probability), least confident first: review and correct the top of this list first, then "
             "update the run with the corrections as labels (<code>run --from</code>).</p>")
    return intro + _table(("#", "Case", "Confidence", ""), rows, raw_columns=(3,))


def _curves_section(run: RunFolder) -> str:
    logs = [("SAM fine-tuning", run.finetune_log), ("V-Net re-training", run.retrain_log)]
    rounds = run.root / ROUNDS_FOLDER
    logs += [(f"SFR+ {p.parent.relative_to(rounds).as_posix()}", p)
             for p in sorted(rounds.glob("round*/**/log.csv"), key=lambda p: _natural_key(str(p)))]
    parts = []
    for name, path in logs:
        where = path.relative_to(run.root).as_posix()
        parts.append(f"<h3>{_e(name)} <small>({_e(where)})</small></h3>")
        parts.append(_guarded(lambda path=path: _log_chart(path), where))
    return "".join(parts)


def _log_chart(path: Path) -> str:
    if not path.is_file():
        return _note("Not in the run folder: this stage has not run.")
    rows = _read_csv(path, ())
    if not rows:
        return _note("The log holds no rows yet.")
    columns = list(rows[0])
    step = STEP_COLUMN if STEP_COLUMN in columns else columns[0]
    steps = [float(row[step]) for row in rows]
    series = [(c, [_float_or_none(row[c]) for row in rows]) for c in columns if c != step]
    series = [(c, v) for c, v in series if all(x is not None for x in v)]
    if not series:
        return _note(f"No numeric column besides {step!r}.")
    return _svg_chart(steps, series, step)


def _images_section(run: RunFolder, cohort: Cohort, truths: Mapping[str, Path]) -> str:
    parts = ["<h3>SAM mosaic</h3>", _guarded(lambda: _mosaic_figure(run, cohort), "the SAM mosaic"),
             "<h3>Predictions</h3>"]
    files = sorted(run.prediction_dir.glob("*" + SEGMENTATION_SUFFIX)) if run.prediction_dir.is_dir() else []
    if not files:
        parts.append(_note("No predictions/<case>.seg.nrrd in the run folder."))
        return "".join(parts)
    confidences = recorded(run.prediction_confidence)
    for path in files:
        name = path.name[: -len(SEGMENTATION_SUFFIX)]
        parts.append(_guarded(lambda path=path, name=name: _prediction_figure(path, name, cohort, truths,
                                                                             confidences.get(name)),
                              f"the prediction of {name}"))
    return "".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# Pictures


def _mosaic_figure(run: RunFolder, cohort: Cohort) -> str:
    """The first labeled case's central patch, z-scored and zero-padded as fine-tuning does, label overlaid."""
    if not cohort.labeled:
        return _note("The cohort has no labeled case.")
    finetune = (_read_json(run.config) or {}).get("finetune", {})
    patch = tuple(int(s) for s in finetune.get("patch_size") or PATCH_SIZE)
    canvas = int(finetune.get("sam", {}).get("image_size", DEFAULT_CANVAS))
    layout = mosaic_layout(patch, canvas, finetune.get("depth_padding", "centre"))
    case = cohort.labeled[0]
    image, label = load_case(case, cohort.classes)
    image_array = pad_to_shape(zscore(image.array), patch)
    label_array = pad_to_shape(label.array, patch)
    start = center_crop_start(image_array.shape, patch)
    images = stitch_image(crop(image_array, start, patch), layout)
    labels = stitch_label(crop(label_array, start, patch), layout)
    colours = {s.value: s.color for s in label.segments or []}
    shown = min(canvas, MOSAIC_VIEW_PX)
    figures = "".join(
        _figure(render_mosaic(images[m], labels[m], colours), f"SAM mosaic {m + 1} of {case.name}", shown, shown,
                f"mosaic {m + 1} of {layout.n_mosaics}")
        for m in range(layout.n_mosaics))
    caption = (f"{case.name}: central {'×'.join(map(str, patch))} patch, {layout.n_rows}×{layout.n_cols} tiles of "
               f"{layout.tile_h}×{layout.tile_w} px on a {canvas}×{canvas} canvas, label overlaid.")
    return f"<p>{_e(caption)}</p>{figures}\n"


def _prediction_figure(path: Path, name: str, cohort: Cohort, truths: Mapping[str, Path],
                       confidence: Optional[float]) -> str:
    """Axial, coronal and sagittal slices (IJK axes) through the centroid of the predicted foreground."""
    cases = {c.name: c for c in cohort.cases + cohort.test}
    if name not in cases:
        return _note(f"{name}: prediction of a case that is not in the cohort.")
    prediction = read_volume(path)
    image = read_volume(cases[name].image)
    truth = read_volume(truths[name]) if name in truths else None
    for other, what in ((image, "image"), (truth, "truth")):
        if other is not None and other.shape != prediction.shape:
            raise ValueError(f"{what} shape {other.shape} differs from the prediction's {prediction.shape}")
    foreground = np.argwhere(prediction.array > 0)
    centre = (np.rint(foreground.mean(axis=0)).astype(int) if foreground.size
              else np.asarray(prediction.shape) // 2)
    colours = {s.value: s.color for s in prediction.segments or []}
    scale = SLICE_VIEW_PX / max(n * s for n, s in zip(prediction.shape, prediction.spacing))
    figures = []
    for view, axis in (("axial", 2), ("coronal", 1), ("sagittal", 0)):
        index = int(centre[axis])
        rest = [a for a in range(3) if a != axis]
        picture = render_mosaic(_oriented(image.array, axis, index), _oriented(prediction.array, axis, index),
                                colours)
        if truth is not None:
            picture[_outline(_oriented(truth.array, axis, index))] = TRUTH_OUTLINE_RGB
        width, height = (round(prediction.shape[a] * prediction.spacing[a] * scale) for a in rest)
        figures.append(_figure(picture, f"{name} {view}", width, height, f"{view}, {'ijk'[axis]} = {index}"))
    if any(c.name == name for c in cohort.test):
        notes = ["held-out test case"]
    else:
        notes = [f"confidence {confidence:.4f}" if confidence is not None else "no recorded confidence"]
    if not foreground.size:
        notes.append("empty prediction: slices through the volume centre")
    if truth is not None:
        notes.append("truth outlined in yellow")
    return f"<h4>{_e(name)} <small>({_e('; '.join(notes))})</small></h4>{''.join(figures)}\n"


def _oriented(array: np.ndarray, axis: int, index: int) -> np.ndarray:
    """The slice ``index`` across ``axis`` as a picture: the first remaining IJK axis to the right, the second
    down for axial slices and the slice axis k up for the others."""
    plane = np.take(array, index, axis=axis).T
    return plane if axis == 2 else plane[::-1]


def _outline(label: np.ndarray) -> np.ndarray:
    """Pixels on the boundary of each foreground class of a 2D label (the array border counts as outside)."""
    edge = np.zeros(label.shape, dtype=bool)
    for value in np.unique(label[label > 0]):
        mask = label == value
        edge |= mask & ~ndimage.binary_erosion(mask)
    return edge


def _figure(rgb: np.ndarray, alt: str, width: int, height: int, caption: str) -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buffer, format="PNG")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return (f'<figure><img alt="{_e(alt)}" width="{width}" height="{height}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _svg_chart(steps: Sequence[float], series: Sequence[Tuple[str, Sequence[float]]], x_name: str) -> str:
    """One SVG with a panel per series (each on its own y range), min and max ticks on both axes."""
    width, panel, left, right, top, bottom = 640, 150, 72, 16, 10, 34
    x0, x1 = left, width - right
    x_lo, x_hi = min(steps), max(steps)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{panel * len(series)}" '
             f'viewBox="0 0 {width} {panel * len(series)}">']
    for n, (name, values) in enumerate(series):
        y0, y1 = n * panel + panel - bottom, n * panel + top  # y0 is the bottom of the plot area
        finite = [v for v in values if math.isfinite(v)]
        y_lo, y_hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
        points = " ".join(f"{_scale(s, x_lo, x_hi, x0, x1):.2f},{_scale(v, y_lo, y_hi, y0, y1):.2f}"
                          for s, v in zip(steps, values) if math.isfinite(v))
        parts += [
            f'<polyline data-series="{_e(name)}" fill="none" stroke="#1f6fb4" stroke-width="1.5" '
            f'points="{points}"/>',
            f'<path d="M{x0},{y1} V{y0} H{x1}" fill="none" stroke="#888"/>',
            f'<text x="{x0 - 4}" y="{y1 + 8}" text-anchor="end">{_e(f"{y_hi:.4g}")}</text>',
            f'<text x="{x0 - 4}" y="{y0}" text-anchor="end">{_e(f"{y_lo:.4g}")}</text>',
            f'<text x="{x0}" y="{y0 + 13}" text-anchor="middle">{_e(f"{x_lo:.6g}")}</text>',
            f'<text x="{x1}" y="{y0 + 13}" text-anchor="end">{_e(f"{x_hi:.6g}")}</text>',
            f'<text x="{(x0 + x1) / 2}" y="{y0 + 27}" text-anchor="middle">{_e(x_name)}</text>',
            f'<text transform="translate(14 {(y0 + y1) / 2}) rotate(-90)" text-anchor="middle">{_e(name)}</text>',
        ]
    return "".join(parts) + "</svg>\n"


def _scale(value: float, lo: float, hi: float, out_lo: float, out_hi: float) -> float:
    """``value`` mapped linearly from [lo, hi] to [out_lo, out_hi]; a constant series lies in the middle."""
    if hi <= lo:
        return (out_lo + out_hi) / 2
    return out_lo + (value - lo) / (hi - lo) * (out_hi - out_lo)


# ---------------------------------------------------------------------------------------------------------------
# Reading and formatting


def _read_json(path: Path) -> Optional[dict]:
    """The JSON object in ``path``, None if there is no such file."""
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _read_csv(path: Path, required: Sequence[str]) -> List[Dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path.name} lacks the column(s) {', '.join(missing)}")
        return list(reader)


def _float_or_none(text: str) -> Optional[float]:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _format_metric(name: str, value: float) -> str:
    if math.isnan(value):
        return _MISSING
    return f"{100 * value:.2f}" if name in _PERCENT_METRICS else f"{value:.2f}"


def _mean_std(name: str, values: Sequence[float]) -> str:
    """``mean ± std`` (sample std) over the defined values; the mean alone for one value, — for none."""
    defined = [v for v in values if not math.isnan(v)]
    if not defined:
        return _MISSING
    mean = _format_metric(name, float(np.mean(defined)))
    if len(defined) < 2:
        return mean
    return f"{mean} ± {_format_metric(name, float(np.std(defined, ddof=1)))}"


def _natural_key(text: str) -> List[object]:
    """Sort key that orders embedded numbers by value (round2 before round10)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], raw_columns: Sequence[int] = ()) -> str:
    """An HTML table of text cells (escaped), except the ``raw_columns`` that already hold HTML; no header row
    when ``headers`` is empty."""
    head = "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in headers) + "</tr>" if headers else ""
    body = "".join("<tr>" + "".join(f"<td>{cell if i in raw_columns else _e(cell)}</td>"
                                    for i, cell in enumerate(row)) + "</tr>\n" for row in rows)
    return f"<table>{head}\n{body}</table>\n"


def _guarded(build: Callable[[], str], what: str) -> str:
    """``build()``, or a note saying why ``what`` could not be shown when an input is corrupt or unexpected."""
    try:
        return build()
    except _READ_ERRORS as error:
        logger.warning("report: cannot show %s: %s", what, error)
        return _note(f"Cannot show {what}: {error}")


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>\n'


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


# ---------------------------------------------------------------------------------------------------------------
# Sections the pipeline adds: each takes plain values and returns (title, HTML) pairs, none when it has nothing


def comparison_section(metrics: Optional[Path], baseline: Optional[Path], method: str,
                       baseline_method: Optional[str]) -> List[Tuple[str, str]]:
    """The baseline's mean Dice beside the run's, on the split the run is judged on."""
    if metrics is None or baseline is None:
        return []
    split = scored_split(metrics)
    text = (f"<p>Mean Dice on the {SPLIT_DESCRIPTIONS[split]}: <b>{html.escape(str(baseline_method))}</b> "
            f"{mean_dice(baseline, split):.4f}; <b>{html.escape(method)}</b> {mean_dice(metrics, split):.4f}.</p>")
    return [("Baseline versus SFR", text)]


def plan_section(planned: Optional[Mapping[str, object]]) -> List[Tuple[str, str]]:
    """The table of the planned values (none when planning is off)."""
    if planned is None:
        return []
    rows = "".join(f"<tr><td><code>{html.escape(path)}</code></td><td>{html.escape(json.dumps(value['used']))}</td>"
                   f"<td>{html.escape(value['reason'])}</td></tr>" for path, value in planned["planned"].items())
    return [("Plan", f"<p>{html.escape(str(planned['summary']))}</p><table><tr><th>option</th><th>value</th>"
                     f"<th>why</th></tr>{rows}</table>")]


def lineage_section(chain: Sequence[Tuple[Path, str, Optional[float]]]) -> List[Tuple[str, str]]:
    """The table of the runs this one was updated from, oldest first: (run folder, what the update changed,
    seconds); none for a run from scratch."""
    if len(chain) < 2:
        return []
    rows = []
    for root, changes, seconds in chain:
        metrics = RunFolder(root).metrics
        dice = f"{mean_dice(metrics):.4f} ({scored_split(metrics)})" if metrics.is_file() else "—"
        duration = f"{seconds / 60:.1f} min" if seconds is not None else "—"
        rows.append(f"<tr><td>{html.escape(str(root))}</td><td>{html.escape(changes)}</td><td>{duration}</td>"
                    f"<td>{dice}</td></tr>")
    return [("Lineage", "<table><tr><th>run</th><th>changes</th><th>time</th><th>mean Dice</th></tr>"
                        + "".join(rows) + "</table>")]


def provenance_section(lineage: Mapping[str, object]) -> List[Tuple[str, str]]:
    """The identities of the fine-tuned SAM and the V-Net the results came from."""
    return [("Provenance", "<p>Identities of the outputs these results came from (each recorded beside its output "
                           "with the SHA-256 of its input files and its options; <code>provenance.json</code> lists "
                           f"them all): fine-tuned SAM <code>{html.escape(str(lineage['fine-tuned SAM']))}</code>, "
                           f"V-Net <code>{html.escape(str(lineage['V-Net']))}</code>.</p>")]
