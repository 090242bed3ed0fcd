"""The extension's files: CMake lists that miss nothing, the catalog entry, licence, icon, requirements, user guide."""

import ast
import json
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "SFRSegment"
GUIDE = ROOT / "docs" / "slicer.md"


def cmake_list(path: Path, variable: str):
    """The entries of ``set(<variable> ...)`` in a CMakeLists.txt, with ${MODULE_NAME} expanded."""
    text = re.sub(r"#[^\n]*", "", path.read_text(encoding="utf-8"))
    module_name = re.search(r"set\(MODULE_NAME\s+(\S+)\)", text)
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert match, f"{path}: no set({variable} ...)"
    entries = match.group(1).split()
    return [e.replace("${MODULE_NAME}", module_name.group(1)) if module_name else e for e in entries]


def cmake_value(path: Path, variable: str) -> str:
    match = re.search(rf'set\({variable}\s+"([^"]*)"\)', path.read_text(encoding="utf-8"))
    assert match, f"{path}: no set({variable} \"...\")"
    return match.group(1)


def engine_files():
    """Every engine .py file: tracked by git, or on disk (a file being written is not forgotten either)."""
    on_disk = {p.relative_to(ROOT).as_posix() for p in (ROOT / "SFRSegmentLib").rglob("*.py")
               if "__pycache__" not in p.parts}
    try:
        tracked = subprocess.run(["git", "ls-files", "SFRSegmentLib"], cwd=ROOT, capture_output=True, text=True,
                                 check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        tracked = []
    return on_disk | {f for f in tracked if f.endswith(".py")}


def test_every_engine_file_is_listed_for_the_extension_build():
    listed = cmake_list(MODULE_DIR / "CMakeLists.txt", "ENGINE_PYTHON_SCRIPTS")
    files = engine_files()
    assert "SFRSegmentLib/models/sam/catalog.py" in files  # the scan found the subpackages
    missing = sorted(files - set(listed))
    assert not missing, f"add to ENGINE_PYTHON_SCRIPTS in SFRSegment/CMakeLists.txt: {missing}"
    stale = sorted(f for f in listed if not (ROOT / f).is_file())
    assert not stale, f"listed in SFRSegment/CMakeLists.txt but missing: {stale}"
    assert len(listed) == len(set(listed))


def test_every_module_script_and_resource_is_listed():
    cmake = MODULE_DIR / "CMakeLists.txt"
    scripts = cmake_list(cmake, "MODULE_PYTHON_SCRIPTS")
    on_disk = {p.relative_to(MODULE_DIR).as_posix() for p in MODULE_DIR.rglob("*.py") if "__pycache__" not in p.parts}
    assert set(scripts) == on_disk
    resources = cmake_list(cmake, "MODULE_PYTHON_RESOURCES")
    resource_files = {p.relative_to(ROOT).as_posix() for p in (ROOT / "Resources").rglob("*") if p.is_file()}
    assert set(resources) == resource_files
    # What the module and the engine open at run time is among them.
    module_source = (MODULE_DIR / "SFRSegment.py").read_text(encoding="utf-8")
    used = {"Resources/" + "/".join(parts) for parts in
            (re.findall(r'"([^"]+)"', m) for m in re.findall(r"RESOURCES((?:\s*/\s*\"[^\"]+\")+)", module_source))}
    assert {"Resources/UI/SFRSegment.ui", "Resources/Icons/SFRSegment.png", "Resources/requirements.txt"} <= used
    assert used | {"Resources/Models.json"} <= set(resources)


def test_unittest_and_generic_tests_are_registered():
    text = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "slicerMacroBuildScriptedModule(" in text and "WITH_GENERIC_TESTS" in text
    assert re.search(r"slicer_add_python_unittest\(SCRIPT \$\{MODULE_NAME\}\.py\)", text)
    assert "class SFRSegmentTest(ScriptedLoadableModuleTest)" in (MODULE_DIR / "SFRSegment.py").read_text()


def test_extension_metadata_and_catalog_entry_agree():
    cmake = ROOT / "CMakeLists.txt"
    text = cmake.read_text(encoding="utf-8")
    name = re.search(r"project\((\w+)\)", text).group(1)
    entry_path = ROOT / f"{name}.json"
    assert entry_path.is_file(), "the catalog entry is named after the project"
    entry = json.loads(entry_path.read_text(encoding="utf-8"))
    assert "slicer-extension-catalog-entry-schema" in entry["$schema"]
    assert entry["build_dependencies"] == ["PyTorch"]
    assert entry["category"] == "Segmentation"
    assert entry["build_subdirectory"] == "."
    assert entry["tier"] in (1, 3, 5)
    assert entry["scm_revision"]
    homepage = cmake_value(cmake, "EXTENSION_HOMEPAGE")
    assert entry["scm_url"] == homepage
    assert not name.startswith("Slicer") and homepage.rsplit("/", 1)[1].startswith("Slicer")
    assert cmake_value(cmake, "EXTENSION_DEPENDS") == "PyTorch"
    for variable in ("EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION", "EXTENSION_SCREENSHOTURLS"):
        assert cmake_value(cmake, variable).strip()
    raw = homepage.replace("https://github.com/", "https://raw.githubusercontent.com/") + "/main/"
    icon_url = cmake_value(cmake, "EXTENSION_ICONURL")
    assert icon_url.startswith(raw) and (ROOT / icon_url[len(raw):]).is_file()
    assert re.search(r"add_subdirectory\(SFRSegment\)", text)


def test_licence_is_the_full_apache_2_text():
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    for part in ("Apache License", "Version 2.0, January 2004", "TERMS AND CONDITIONS FOR USE, REPRODUCTION",
                 "9. Accepting Warranty or Additional Liability", "END OF TERMS AND CONDITIONS"):
        assert part in text
    assert len(text) > 10000


def test_icon_is_a_128_pixel_png_with_content():
    Image = pytest.importorskip("PIL.Image")
    with Image.open(ROOT / "Resources" / "Icons" / "SFRSegment.png") as icon:
        assert icon.format == "PNG" and icon.size == (128, 128)
        colours = icon.convert("RGB").getcolors(maxcolors=128 * 128)
    assert len(colours) > 20


def test_requirements_are_the_engine_dependencies_without_torch_nor_the_catalogs_packages():
    """Slicer installs torch (and torchvision) through the PyTorch extension, and a catalog model's package without
    its dependencies when that model is chosen (SFRSegmentLogicLib.dependencies.install_model_package); the rest of
    the engine's dependencies come from requirements.txt."""
    tomllib = pytest.importorskip("tomllib")
    from SFRSegmentLib.models.sam.catalog import load_catalog

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    lines = [line.strip() for line in (ROOT / "Resources" / "requirements.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    packages = {entry.package for entry in load_catalog().values() if entry.package is not None}
    assert packages and packages <= set(declared)  # the engine outside Slicer gets them from pyproject.toml
    assert lines == [d for d in declared if not d.startswith("torch") and d not in packages]
    torch_spec = next(d for d in declared if d.startswith("torch"))[len("torch"):]
    dependencies_source = (MODULE_DIR / "SFRSegmentLogicLib" / "dependencies.py").read_text(encoding="utf-8")
    assert f'TORCH_REQUIREMENT = "{torch_spec}"' in dependencies_source


# ---------------------------------------------------------------------------------------------------------------
# The user guide


def guide_sections():
    text = GUIDE.read_text(encoding="utf-8")
    return text, re.findall(r'^### "(.+)"$', text, re.M)


def test_guide_has_the_sections_the_slicer_users_need():
    text, _ = guide_sections()
    for heading in ("# Using SFRSegment in 3D Slicer", "## Install", "## First run", "## Offline weights",
                    "## Troubleshooting", "## Scripting the module"):
        assert re.search(rf"^{re.escape(heading)}$", text, re.M), heading


def test_troubleshooting_is_keyed_by_messages_the_code_really_shows():
    _, messages = guide_sections()
    assert len(messages) >= 10
    texts = [text for path in [*MODULE_DIR.rglob("*.py"), *(ROOT / "SFRSegmentLib").rglob("*.py")]
             if "__pycache__" not in path.parts for text in string_literals(path)]
    for message in messages:
        pieces = [piece.strip() for piece in message.split("…") if piece.strip()]
        assert any(all(piece in text for piece in pieces) for text in texts), \
            f"no message in the code reads {message!r}"


def string_literals(path: Path):
    """The string literals of a Python file, f-strings with their replacement fields as '…'."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.value
        elif isinstance(node, ast.JoinedStr):
            yield "".join(part.value if isinstance(part, ast.Constant) else "…" for part in node.values)


def test_scripting_example_uses_only_what_the_module_offers():
    """The console example calls existing Logic methods, RunSettings fields and run/result attributes.

    Its flow (inputs, run, results) is executed under slicer-core in test_slicer_logic.py.
    """
    text, _ = guide_sections()
    code = re.search(r"## Scripting.*?```python\n(.*?)```", text, re.S).group(1)
    example = ast.parse(code)
    module = ast.parse((MODULE_DIR / "SFRSegment.py").read_text(encoding="utf-8"))
    classes = {node.name: node for node in module.body if isinstance(node, ast.ClassDef)}
    logic_methods = {f.name for f in classes["SFRSegmentLogic"].body if isinstance(f, ast.FunctionDef)}
    runs_module = ast.parse((MODULE_DIR / "SFRSegmentLogicLib" / "runs.py").read_text(encoding="utf-8"))
    engine_run = next(node for node in runs_module.body if isinstance(node, ast.ClassDef) and node.name == "EngineRun")
    run_fields = {s.target.id for s in engine_run.body if isinstance(s, ast.AnnAssign)}
    run_fields |= {f.name for f in engine_run.body if isinstance(f, ast.FunctionDef)}
    jobs_module = ast.parse((MODULE_DIR / "SFRSegmentLogicLib" / "jobs.py").read_text(encoding="utf-8"))
    jobs_classes = {node.name: node for node in jobs_module.body if isinstance(node, ast.ClassDef)}
    settings_fields = {s.target.id for s in jobs_classes["RunSettings"].body if isinstance(s, ast.AnnAssign)}
    result_fields = {s.target.id for s in jobs_classes["TrainingResults"].body if isinstance(s, ast.AnnAssign)}
    job_fields = {s.target.id for s in jobs_classes["TrainingJob"].body if isinstance(s, ast.AnnAssign)}

    used = {"logic": set(), "run": set(), "results": set(), "job": set(), "settings": set()}
    for node in ast.walk(example):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in ("logic", "run"):
            used[node.value.id].add(node.attr)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr in (
                "results", "job") and isinstance(node.value.value, ast.Name) and node.value.value.id == "run":
            used[node.value.attr].add(node.attr)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "RunSettings":
            used["settings"] |= {keyword.arg for keyword in node.keywords}
    assert used["logic"] >= {"inputs", "run", "segmentNames", "setupPythonRequirements"}
    assert used["logic"] <= logic_methods
    assert used["run"] <= run_fields
    assert used["results"] <= result_fields
    assert used["job"] <= job_fields
    assert used["settings"] and used["settings"] <= settings_fields
    imports = {(n.module, a.name) for n in ast.walk(example) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert imports == {("SFRSegment", "SFRSegmentLogic"), ("SFRSegmentLogicLib.jobs", "RunSettings")}


STAGE_MODULES = {"finetune", "pseudolabel", "losses", "retrain", "sfrplus", "inference", "pipeline", "estimate",
                 "reproduce", "report", "metrics", "cli"}


def _engine_imports(path: Path) -> set:
    """The SFRSegmentLib modules that ``path`` imports (relative imports resolved from its package)."""
    package = path.relative_to(ROOT).with_suffix("").parts[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = list(package[:len(package) - node.level + 1]) if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return {name.split(".")[1] for name in names if name.startswith("SFRSegmentLib.") and name.count(".") >= 1}


def test_the_sam_package_imports_no_stage():
    for path in sorted((ROOT / "SFRSegmentLib" / "sam").glob("*.py")):
        assert not _engine_imports(path) & STAGE_MODULES, path


def test_no_engine_module_shadows_the_standard_library():
    import sys

    modules = {path.stem for path in (ROOT / "SFRSegmentLib").rglob("*.py")}
    assert not modules & set(sys.stdlib_module_names)
