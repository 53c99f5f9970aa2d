"""Documentation that points elsewhere points at something: method.md sections, results.md JSON sources."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHOD_DOC = ROOT / "docs" / "method.md"
SCANNED = {".py", ".md", ".yaml", ".yml", ".toml", ".html", ".txt"}
SKIPPED_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", "node_modules"}
CITATION = re.compile(r"docs/method\.md, '([^']{1,80})'")
OLD_NAME = re.compile(r"\bMETHOD\.md")  # the shared notes outside the repository, which readers cannot open


def project_files() -> list[Path]:
    return sorted(
        path for path in ROOT.rglob("*")
        if path.is_file() and path.suffix in SCANNED and not SKIPPED_DIRS & set(path.relative_to(ROOT).parts)
    )


def sections() -> list[str]:
    return [line[3:].strip() for line in METHOD_DOC.read_text().splitlines() if line.startswith("## ")]


def citations() -> list[tuple[str, str]]:
    """(file, section name) for every citation; a name wrapped over lines counts with single spaces."""
    found = []
    for path in project_files():
        for match in CITATION.finditer(path.read_text(errors="replace")):
            found.append((str(path.relative_to(ROOT)), " ".join(match.group(1).split())))
    return found


def test_every_citation_names_a_section_of_the_method_doc():
    headings = set(sections())
    cited = citations()
    assert len({file for file, _ in cited if file.startswith("guidance/")}) >= 5  # the scan finds the real ones
    broken = [f"{file}: '{name}'" for file, name in cited if name not in headings]
    assert not broken, f"citations of docs/method.md name no '## ' heading there: {broken}; headings: {sorted(headings)}"


def test_section_names_are_unique_and_citable():
    names = sections()
    assert len(names) >= 10
    assert len(names) == len(set(names)), f"duplicate headings in docs/method.md: {names}"
    assert not [name for name in names if "'" in name], "a heading with an apostrophe cannot be cited as '<Section>'"


def test_no_file_cites_the_shared_notes_outside_the_repository():
    stale = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in project_files()
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if OLD_NAME.search(line)
    ]
    assert not stale, f"cite docs/method.md and a section name instead: {stale}"


RESULTS_DOC = ROOT / "docs" / "results.md"
RESULTS_DIR = ROOT / "benchmarks" / "results"
CITED_RESULT = re.compile(r"benchmarks/results/([\w./-]+\.json)")


def test_every_json_cited_by_the_results_doc_exists_and_every_result_is_cited():
    cited = set(CITED_RESULT.findall(RESULTS_DOC.read_text()))
    stored = {str(path.relative_to(RESULTS_DIR)) for path in RESULTS_DIR.rglob("*.json")}
    assert len(cited) >= 10  # the scan finds the real citations
    missing = sorted(cited - stored)
    assert not missing, f"docs/results.md cites JSON that benchmarks/results/ lacks: {missing}"
    uncited = sorted(stored - cited)
    assert not uncited, f"results in benchmarks/results/ that docs/results.md never names (as benchmarks/results/NAME): {uncited}"
