"""Cohorts on disk: the layouts :func:`discover_cohort` recognises, and loading their cases checked.

Cohort layouts that :func:`discover_cohort` recognises
------------------------------------------------------
* **Case folders** (``source = "case-folders"``): ``<root>/<case>/image.<ext>`` with an optional
  ``<root>/<case>/label.<ext>`` (any ending :mod:`SFRSegmentLib.storage.volumes` reads, ``label.seg.nrrd`` included), cases
  sorted by folder name. A subfolder holding no volume file directly inside it (for example the ``truth/`` folder of
  :func:`SFRSegmentLib.research.synthetic.make_synthetic_cohort`, whose held-out labels sit one level deeper) is not a case: it
  is listed in :attr:`Cohort.ignored`. A subfolder that holds volume files but no ``image.<ext>`` is an error, so
  that a misnamed file is reported instead of its case silently dropped. Classes come from ``<root>/classes.json``
  (``{"1": "left atrium"}``), else from the segment names of ``.seg.nrrd`` labels and the values found in the labels
  (named ``class_<value>``).
* **Decathlon** (``source = "decathlon"``): ``<root>/dataset.json`` with ``"labels"`` as in the Medical Segmentation
  Decathlon (``{"0": "background", "1": "left atrium"}``) or nnU-Net v2 (``{"background": 0, "left atrium": 1}``).
  Cases are the ``"training"`` entries (``{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}``) and,
  unlabeled, the ``"test"`` entries. Without ``"training"`` (nnU-Net v2) ``imagesTr/<case>_0000.<ext>`` is paired
  with ``labelsTr/<case>.<ext>``; images without a label and ``imagesTs/`` images are unlabeled cases.
* **Manifest** (``source = "manifest"``): a JSON file ``{"classes": {"1": "left atrium"}, "cases": [{"name": "a",
  "image": "a/img.nrrd", "label": "a/lab.nrrd"}, {"image": "b.nii.gz"}], "test": [{"name": "t", "image":
  "t/img.nrrd", "label": "t/lab.nrrd"}]}``; paths are relative to the manifest's folder, ``name`` defaults to the
  image file name without its ending, ``classes`` to what the labels of ``"cases"`` contain. ``"test"`` (optional)
  lists held-out test cases in the same entry format.

Loose files beside the cases (a ``README.md``, a ``train.list``) are not read. Hidden entries (``.name``) are skipped.

Held-out test cases
-------------------
:attr:`Cohort.test` holds labeled cases that no stage trains on: ``Cohort.cases`` (and so ``labeled`` and
``unlabeled``) are the training cases only, and the test cases are predicted and scored after training. They come
from a manifest's ``"test"`` list, or from ``discover_cohort(path, test=TEST)`` where ``TEST`` is a second folder or
manifest in any layout above, every case of which is a test case. Every test case needs a label, a name that no other
case has, and (with :func:`validate_cohort`) label values among the cohort's classes; a ``classes.json`` or
``"classes"`` of ``TEST`` may only name classes the cohort has. (Decathlon's ``"test"`` entries are unlabeled images
and stay unlabeled cases.)

Every problem is an :class:`~SFRSegmentLib.base.errors.InputError` naming the file and the field.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from ..base.errors import InputError, PathLike
from ..storage.volumes import IMAGE_SUFFIXES, Volume, default_segments, file_suffix, read_volume, volume_files
from .validation import check_image, check_label

CLASSES_FILE = "classes.json"
DECATHLON_FILE = "dataset.json"
IMAGE_STEM = "image"
LABEL_STEM = "label"
MAX_CLASS_VALUE = 255
"""Labels are held as uint8, so class values run from 1 to 255."""

_NNUNET_CHANNEL = re.compile(r"_(\d{4})$")
_FIRST_CHANNEL = "0000"


# ---------------------------------------------------------------------------------------------------------------
# Cohorts


@dataclass
class Case:
    """One case: its name, its image file and, when it is labeled, its label file."""

    name: str
    image: Path
    label: Optional[Path] = None

    @property
    def labeled(self) -> bool:
        return self.label is not None


@dataclass
class Cohort:
    """The cases of a data set, its foreground classes (value → name; background 0 is implicit) and its layout.

    ``cases`` (and so :attr:`labeled` and :attr:`unlabeled`) are what training may read; the held-out :attr:`test`
    cases are kept apart so that no stage can train on them."""

    root: Path
    cases: List[Case]
    classes: Dict[int, str]
    source: str
    ignored: List[str] = field(default_factory=list)
    """Subfolders of a case-folder root that are not cases (no volume file inside), reported by :meth:`summary`."""
    test: List[Case] = field(default_factory=list)
    """Held-out labeled cases, never trained on: predicted and scored after training (not in :attr:`cases`)."""

    @property
    def labeled(self) -> List[Case]:
        return [c for c in self.cases if c.labeled]

    @property
    def unlabeled(self) -> List[Case]:
        return [c for c in self.cases if not c.labeled]

    def summary(self) -> str:
        """A readable report: where the cohort comes from, its classes, and which cases are labeled and which not."""
        classes = ", ".join(f"{v} = {n}" for v, n in sorted(self.classes.items()))
        lines = [
            f"Cohort {self.root} ({self.source}): {len(self.cases)} cases, {len(self.labeled)} labeled, "
            f"{len(self.unlabeled)} unlabeled" + (f", and {len(self.test)} held-out test cases" if self.test else ""),
            f"Classes: 0 = background, {classes}",
            f"Labeled ({len(self.labeled)}): {', '.join(c.name for c in self.labeled)}",
            f"Unlabeled ({len(self.unlabeled)}): {', '.join(c.name for c in self.unlabeled) or '-'}",
        ]
        if self.test:
            lines.append(f"Test, held out ({len(self.test)}): {', '.join(c.name for c in self.test)}")
        if self.ignored:
            lines.append(f"Ignored folders (no volume file inside): {', '.join(self.ignored)}")
        return "\n".join(lines)


@dataclass
class _Listing:
    """What a cohort's folder or JSON says before any volume is read; ``classes`` is None when not declared, else
    declared in the file ``classes_from``."""

    root: Path
    cases: List[Case]
    classes: Optional[Dict[int, str]]
    classes_from: Optional[Path]
    source: str
    described_by: Path
    ignored: List[str] = field(default_factory=list)
    test: List[Case] = field(default_factory=list)


def discover_cohort(path: PathLike, test: Optional[PathLike] = None) -> Cohort:
    """The cohort at ``path``: a case-folder root, a Decathlon folder (or its dataset.json) or a manifest file.

    ``test`` is a folder or manifest (any of those layouts) whose cases are all held-out test cases, added to the
    manifest's own ``"test"`` list in :attr:`Cohort.test` (see the module docstring). Only file names and JSON are
    read, except when classes must be derived from the labels of the training cases.
    """
    listing = _list_cases(Path(path))
    cohort = _make_cohort(listing)
    held_out = list(listing.test)
    if test is not None:
        test_listing = _list_cases(Path(test))
        if test_listing.classes is not None:
            _check_test_classes(test_listing.classes, cohort.classes, test_listing.classes_from)
        held_out += test_listing.cases + test_listing.test
    return _with_test_cases(cohort, held_out)


def _list_cases(path: Path) -> _Listing:
    if path.is_file():
        if path.name == DECATHLON_FILE:
            return _list_decathlon(path.parent)
        return _list_manifest(path)
    if not path.is_dir():
        raise InputError("no such folder or file (expected a cohort folder or a manifest .json file)", path)
    if (path / DECATHLON_FILE).is_file():
        return _list_decathlon(path)
    return _list_case_folders(path)


def _list_case_folders(root: Path) -> _Listing:
    cases, ignored = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        volumes = [p.name for p in volume_files(folder)]
        if not volumes:
            ignored.append(folder.name)
            continue
        image = _single_volume(folder, IMAGE_STEM)
        if image is None:
            raise InputError(
                f"case folder has no image file (expected {IMAGE_STEM}.<ext>, <ext> one of "
                f"{', '.join(IMAGE_SUFFIXES)}); found {', '.join(volumes)}",
                folder,
                "image",
            )
        cases.append(Case(folder.name, image, _single_volume(folder, LABEL_STEM)))
    if not cases:
        raise InputError(
            f"no case folders found: expected <case>/{IMAGE_STEM}.<ext> with an optional <case>/{LABEL_STEM}.<ext>"
            + (f" (ignored folders without volume files: {', '.join(ignored)})" if ignored else ""),
            root,
            "cases",
        )
    classes_file = root / CLASSES_FILE
    classes = _parse_classes(_read_json(classes_file), classes_file, "classes") if classes_file.is_file() else None
    return _Listing(root, cases, classes, classes_file, "case-folders", root, ignored)


def _single_volume(folder: Path, stem: str) -> Optional[Path]:
    """The one file ``<stem>.<ext>`` of a case folder, None if there is none."""
    found = volume_files(folder, stem)
    if len(found) > 1:
        raise InputError(f"{len(found)} {stem} files ({', '.join(p.name for p in found)}); keep exactly one", folder,
                         stem)
    return found[0] if found else None


def _list_decathlon(root: Path) -> _Listing:
    spec_path = root / DECATHLON_FILE
    spec = _read_json(spec_path)
    if "labels" not in spec:
        raise InputError('missing key "labels" (class values and names)', spec_path, "labels")
    classes = _decathlon_classes(spec["labels"], spec_path)
    if "training" in spec:
        cases = [
            _case_from_entry(entry, root, spec_path, f"{key}[{index}]")
            for key in ("training", "test")
            for index, entry in enumerate(_json_list(spec, key, spec_path))
        ]
    else:
        cases = _pair_nnunet_folders(root, spec_path)
    return _Listing(root, cases, classes, spec_path, "decathlon", spec_path)


def _decathlon_classes(raw: object, spec_path: Path) -> Dict[int, str]:
    """Classes from MSD ``{"1": "name"}`` or nnU-Net v2 ``{"name": 1}`` labels."""
    if isinstance(raw, dict) and raw and all(isinstance(v, int) and not isinstance(v, bool) for v in raw.values()):
        raw = {str(value): name for name, value in raw.items()}
    elif isinstance(raw, dict) and any(isinstance(v, list) for v in raw.values()):
        raise InputError("region-based labels (lists of values) are not supported; use one value per class",
                         spec_path, "labels")
    return _parse_classes(raw, spec_path, "labels")


def _pair_nnunet_folders(root: Path, spec_path: Path) -> List[Case]:
    """nnU-Net v2 cases: ``imagesTr/<case>_0000.<ext>`` with ``labelsTr/<case>.<ext>``, then ``imagesTs`` unlabeled."""
    images_dir = root / "imagesTr"
    if not images_dir.is_dir():
        raise InputError('no "training" list and no imagesTr folder to take the cases from', spec_path, "training")
    labels = {_case_name(p): p for p in volume_files(root / "labelsTr")}
    images = [(_nnunet_case_name(p), p) for p in volume_files(images_dir)]
    orphans = sorted(set(labels) - {name for name, _ in images})
    if orphans:
        raise InputError(f"labels without an image in imagesTr: {', '.join(orphans)}", root / "labelsTr", "image")
    return [Case(name, path, labels.get(name)) for name, path in images] + [
        Case(_nnunet_case_name(p), p) for p in volume_files(root / "imagesTs")
    ]


def _case_name(path: Path) -> str:
    return path.name[: -len(file_suffix(path))]


def _nnunet_case_name(path: Path) -> str:
    """The case name of an nnU-Net image file: without its ending and its ``_0000`` channel suffix."""
    name = _case_name(path)
    channel = _NNUNET_CHANNEL.search(name)
    if channel is None:
        return name
    if channel.group(1) != _FIRST_CHANNEL:
        raise InputError(
            f"channel {channel.group(1)}: only single-channel images (_{_FIRST_CHANNEL}) are supported", path, "channel"
        )
    return name[: channel.start()]


def _list_manifest(path: Path) -> _Listing:
    if path.suffix.lower() != ".json":
        raise InputError("expected a cohort folder, a dataset.json or a manifest .json file", path)
    spec = _read_json(path)
    if "cases" not in spec:
        raise InputError('missing key "cases" (a list of {"name", "image", "label"} entries)', path, "cases")
    cases, test = ([_case_from_entry(entry, path.parent, path, f"{key}[{i}]")
                    for i, entry in enumerate(_json_list(spec, key, path))] for key in ("cases", "test"))
    classes = _parse_classes(spec["classes"], path, "classes") if "classes" in spec else None
    return _Listing(path.parent, cases, classes, path, "manifest", path, test=test)


def _case_from_entry(entry: object, root: Path, spec_path: Path, where: str) -> Case:
    """A case from a JSON entry: an image path, or ``{"image": ..., "label": ..., "name": ...}`` (label, name
    optional)."""
    if isinstance(entry, str):
        entry = {"image": entry}
    if not isinstance(entry, dict) or "image" not in entry:
        raise InputError(f'{where}: expected an image path or an object with "image" (and optional "label", "name")',
                         spec_path, where)
    image = _referenced_file(entry["image"], root, spec_path, f"{where}.image")
    label = None if entry.get("label") is None else _referenced_file(entry["label"], root, spec_path, f"{where}.label")
    name = entry.get("name", _case_name(image))
    if not isinstance(name, str) or not name:
        raise InputError(f"{where}.name: expected a non-empty string, got {name!r}", spec_path, f"{where}.name")
    return Case(name, image, label)


def _referenced_file(value: object, root: Path, spec_path: Path, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise InputError(f"{where}: expected a file path, got {value!r}", spec_path, where)
    path = root / value
    if not path.is_file():
        raise InputError(f"{where}: file not found: {path}", spec_path, where)
    file_suffix(path)  # an unsupported ending is reported now, not when the case is loaded
    return path


def _make_cohort(listing: _Listing) -> Cohort:
    """The training cases of a listing, checked (some, uniquely named, some labeled), with the classes derived from
    the labels if not declared; held-out test cases are added by :func:`_with_test_cases`."""
    cases, classes, described_by = listing.cases, listing.classes, listing.described_by
    if not cases:
        raise InputError("no cases listed", described_by, "cases")
    duplicates = sorted(name for name, n in Counter(c.name for c in cases).items() if n > 1)
    if duplicates:
        raise InputError(f"duplicate case names: {', '.join(duplicates)}; each case needs its own name",
                         described_by, "name")
    if not any(c.labeled for c in cases):
        raise InputError(f"no labeled case among the {len(cases)} cases; at least one needs a label", described_by,
                         "label")
    if classes is None:
        classes = _classes_from_labels([c for c in cases if c.labeled], described_by)
    return Cohort(root=listing.root, cases=cases, classes=classes, source=listing.source,
                  ignored=list(listing.ignored))


def _with_test_cases(cohort: Cohort, test: Sequence[Case]) -> Cohort:
    """``cohort`` with ``test`` as its held-out cases: each labeled, and none named as (or reading the image of)
    another case, so that no test case can be trained on or overwrite another's prediction."""
    by_name = {case.name: case for case in cohort.cases}
    by_image = {case.image.resolve(): case for case in cohort.cases}
    for case in test:
        if not case.labeled:
            raise InputError(f"test case {case.name!r} has no label; a held-out test case is scored against its "
                             f"label (expected {LABEL_STEM}.<ext> beside the image, or \"label\" in its manifest "
                             "entry)", case.image, "label")
        for what, field_name, other in (("name", "name", by_name.setdefault(case.name, case)),
                                        ("image file", "image", by_image.setdefault(case.image.resolve(), case))):
            if other is not case:
                raise InputError(f"test case {case.name!r} ({case.image}) has the same {what} as the case "
                                 f"{other.name!r} ({other.image}); a test case must be a case of its own, never "
                                 "trained on", case.image, field_name)
    return dataclasses.replace(cohort, test=list(test))


def _check_test_classes(declared: Mapping[int, str], classes: Mapping[int, str], declared_in: Path) -> None:
    """The classes declared for the test cases must be the cohort's: the model predicts no other."""
    unknown = sorted(set(declared) - set(classes))
    if unknown:
        raise InputError(f"test classes {unknown} are not among the cohort's classes "
                         f"{', '.join(f'{v} = {n}' for v, n in sorted(classes.items()))}; the trained model cannot "
                         "predict them", declared_in, "classes")


def _classes_from_labels(labeled: Sequence[Case], described_by: Path) -> Dict[int, str]:
    """Classes named by the labels' segments (``.seg.nrrd``), and ``class_<v>`` for other values found in them."""
    names: Dict[int, Tuple[str, Path]] = {}
    values = set()
    for case in labeled:
        label = read_volume(case.label)
        for segment in label.segments or []:
            known = names.setdefault(segment.value, (segment.name, case.label))
            if known[0] != segment.name:
                raise InputError(
                    f"segment value {segment.value} is {segment.name!r} here but {known[0]!r} in {known[1]}; "
                    f"declare the classes in {CLASSES_FILE} and relabel so that each value means one class",
                    case.label,
                    "segments",
                )
        values.update(int(v) for v in np.unique(label.array) if v > 0 and float(v).is_integer())
    classes = {v: names[v][0] if v in names else f"class_{v}" for v in sorted(values | set(names)) if v > 0}
    _check_classes(classes, described_by, "classes")
    return classes


def _parse_classes(raw: object, path: Path, where: str) -> Dict[int, str]:
    """``{"1": "left atrium"}`` → ``{1: "left atrium"}``; a listed background ``"0"`` is dropped."""
    if not isinstance(raw, dict):
        raise InputError(f'expected an object of class values and names, e.g. {{"1": "left atrium"}}, got {raw!r}',
                         path, where)
    classes = {}
    for key, name in raw.items():
        try:
            value = int(key)
        except ValueError:
            raise InputError(f"class value {key!r} is not a whole number", path, where) from None
        if not isinstance(name, str) or not name.strip():
            raise InputError(f"class {value}: expected a non-empty name, got {name!r}", path, where)
        if value != 0:
            classes[value] = name
    _check_classes(classes, path, where)
    return dict(sorted(classes.items()))


def _check_classes(classes: Iterable[int], path: Optional[Path], where: str) -> None:
    values = sorted(int(v) for v in classes)
    if not values:
        raise InputError("no foreground class (values 1 and up) declared or found", path, where)
    bad = [v for v in values if not 1 <= v <= MAX_CLASS_VALUE]
    if bad:
        raise InputError(f"class values {bad} are outside 1..{MAX_CLASS_VALUE} (0 is the background)", path, where)


def _read_json(path: Path) -> dict:
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError("file not found", path) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"not valid JSON: {exc}", path, "json") from None
    if not isinstance(spec, dict):
        raise InputError(f"expected a JSON object at the top level, got {type(spec).__name__}", path, "json")
    return spec


def _json_list(spec: dict, key: str, path: Path) -> list:
    value = spec.get(key, [])
    if not isinstance(value, list):
        raise InputError(f'"{key}" must be a list, got {type(value).__name__}', path, key)
    return value


# ---------------------------------------------------------------------------------------------------------------
# Loading


def load_case(case: Case, classes: Union[Mapping[int, str], Iterable[int]]) -> Tuple[Volume, Optional[Volume]]:
    """Read a case's image and (when labeled) label, checked: a finite 3D image, a non-empty uint8 label on its grid
    whose values are among ``classes`` (a cohort's value → name mapping, or just the values).

    The label keeps its own segments (a ``.seg.nrrd``) or gets the class names as segments, so that writing it as a
    ``.seg.nrrd`` shows them in Slicer.
    """
    values = sorted(int(c) for c in classes)
    _check_classes(values, case.label, "classes")
    image = read_volume(case.image)
    check_image(image)
    if case.label is None:
        return image, None
    label = read_volume(case.label)
    check_label(label, values, image, require_foreground=True)
    names = [classes[v] for v in values] if isinstance(classes, Mapping) else None
    segments = label.segments or default_segments(values, names)
    return image, dataclasses.replace(label, array=label.array.astype(np.uint8, copy=False), segments=segments)


def validate_cohort(cohort: Cohort) -> None:
    """Load every case, the held-out test cases too; raise one InputError that lists each bad case and its
    problem."""
    problems = []
    checked = [(case, "") for case in cohort.cases] + [(case, " (test)") for case in cohort.test]
    for case, role in checked:
        try:
            load_case(case, cohort.classes)
        except InputError as exc:
            problems.append(f"  {case.name}{role}: {exc}")
    if problems:
        raise InputError(
            f"{len(problems)} of {len(checked)} cases have problems:\n" + "\n".join(problems), cohort.root, "cases"
        )
