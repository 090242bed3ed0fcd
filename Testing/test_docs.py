"""The documentation in the repository: a short README that points into docs/, a reference generated from the code,
every file the code cites present, and the public API that docs/scripting.md uses."""

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SOURCE_FOLDERS = ("SFRSegmentLib", "SFRSegment", "Testing", "benchmarks")


def code_blocks(path: Path, language: str = "python"):
    return re.findall(rf"^```{language}\n(.*?)^```", path.read_text(encoding="utf-8"), re.M | re.S)


def test_the_reference_is_what_the_code_gives():
    result = subprocess.run([sys.executable, str(DOCS / "make_reference.py"), "--check"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    text = (DOCS / "reference.md").read_text(encoding="utf-8")
    for heading in ("### run", "### predict", "### serve", "### finetune", "### retrain"):
        assert re.search(rf"^{heading}$", text, re.M), heading
    assert re.search(r"^\| `retrain\.ssl\.pseudo_label_weight` \| `1\.0` \|", text, re.M)


def test_the_readme_is_short_and_every_link_into_docs_exists():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) < 120
    assert "make demo" in text and "make test" in text
    links = re.findall(r"\]\((docs/[^)#]+)", text)
    assert len(links) >= 8
    missing = [link for link in links if not (ROOT / link).is_file()]
    assert not missing, missing


def test_every_document_the_code_cites_is_in_the_repository():
    cited = set()
    for folder in SOURCE_FOLDERS:
        for path in (ROOT / folder).rglob("*.py"):
            cited |= {(path, name) for name in re.findall(r"(?<![\w/.])(docs/[\w.-]+\.md)", path.read_text("utf-8"))}
    assert any(name == "docs/sfr-method.md" for _, name in cited)  # the scan finds citations
    missing = sorted(f"{path.relative_to(ROOT)} cites {name}" for path, name in cited if not (ROOT / name).is_file())
    assert not missing, missing
    shared = [str(p.relative_to(ROOT)) for folder in SOURCE_FOLDERS for p in (ROOT / folder).rglob("*.py")
              if p != Path(__file__).resolve()
              if "shared/docs" in p.read_text("utf-8")]
    assert not shared, f"cite the copy in docs/, not ../shared/docs: {shared}"


def test_importing_the_package_loads_no_torch_and_every_public_name_resolves():
    code = ("import sys, SFRSegmentLib as s; assert 'torch' not in sys.modules, 'torch imported'; "
            "names = [(n, getattr(s, n)) for n in s.__all__]; "
            "bad = [n for n, v in names if getattr(v, '__module__', 'typing').split('.')[0] not in ('SFRSegmentLib', 'typing')]; "
            "print(len(names), bad)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    count, bad = result.stdout.split(" ", 1)
    assert int(count) >= 20 and bad.strip() == "[]", result.stdout


def test_the_scripting_guide_uses_only_the_public_api():
    import SFRSegmentLib

    blocks = code_blocks(DOCS / "scripting.md")
    assert len(blocks) >= 3
    imported = set()
    for block in blocks:
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.ImportFrom):
                assert node.module == "SFRSegmentLib", f"docs/scripting.md imports from {node.module}"
                imported |= {alias.name for alias in node.names}
    assert imported and imported <= set(SFRSegmentLib.__all__), imported - set(SFRSegmentLib.__all__)
