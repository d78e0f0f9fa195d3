"""Every reference in the repository's text points inside it: a clone has no dangling links."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\]\(([^)#\s]+)")  # markdown link targets


def text_files() -> list[Path]:
    """The project's own text: the README, docs, package, configs and tests."""
    files = [ROOT / "README.md", ROOT / "pyproject.toml"]
    for folder in ("docs", "sspo", "configs", "tests"):
        files += [p for p in (ROOT / folder).rglob("*") if p.suffix in (".md", ".py", ".yaml") and "__pycache__" not in p.parts]
    return files


def test_no_link_or_citation_points_outside_the_repository():
    outside = []
    for path in text_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        if "SPEC.md" in text and path.name != "test_docs.py":
            outside.append(f"{path.relative_to(ROOT)}: cites SPEC.md")
        for target in LINK.findall(text):
            if "://" in target or target.startswith("mailto:"):
                continue
            resolved = (path.parent / target).resolve()
            if ROOT not in resolved.parents and resolved != ROOT:
                outside.append(f"{path.relative_to(ROOT)}: links {target}")
    assert outside == []


def test_method_doc_cites_the_paper():
    text = (ROOT / "docs" / "method.md").read_text()
    assert "2410.05255" in text and all(f"eq. {n}" in text for n in (2, 8, 9))


def test_reliability_doc_names_tests_that_exist():
    cases = re.findall(r"\[(tests/[\w/]+\.py)::(\w+)\]", (ROOT / "docs" / "reliability.md").read_text())
    assert len(cases) >= 30
    missing = [f"{file}::{name}" for file, name in cases if f"def {name}(" not in (ROOT / file).read_text()]
    assert missing == []
