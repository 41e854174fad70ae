"""Code, configs and documentation cite only files that exist in the repository."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("fsad", "callbacks", "datamodules", "lightning_modules", "configs", "benchmarks", "docs", "tests", ".ci")
TOP_FILES = ("README.md", "pyproject.toml", "Makefile")
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg", ""}
#: documents that live outside the repository (built from parts, so this file does not cite them itself)
OUTSIDE = [re.escape(p) for p in ("DESIGN" + ".md", "reference" + "/methods", "reference" + "/ecosystem",
                                  "reference" + "/papers", "/work" + "/shared", "shared" + "/reference", "../" + "shared")]  # fmt: skip
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")
MARKDOWN_PATH = re.compile(r"(?<![\w<>/.$-])((?:\.\.?/)*[\w-]+(?:/[\w.-]+)+\.md)\b")


def project_files() -> list[Path]:
    files = [REPO / name for name in TOP_FILES]
    for folder in SOURCES:
        files += [p for p in (REPO / folder).rglob("*") if p.is_file() and p.suffix in SUFFIXES]
    return [p for p in files if "__pycache__" not in p.parts and p.resolve() != Path(__file__).resolve()]


def exists(citing: Path, target: str) -> bool:
    """A path cited in ``citing`` names a file relative to that file's folder or to the repository root."""
    target = target.split("#", 1)[0]
    return not target or (citing.parent / target).exists() or (REPO / target).exists()


def test_no_file_cites_a_document_outside_the_repository() -> None:
    pattern = re.compile("|".join(OUTSIDE))
    offenders = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for path in project_files()
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders, "documents outside the repository are cited:\n" + "\n".join(offenders)


def test_every_cited_markdown_path_and_link_exists() -> None:
    broken = []
    for path in project_files():
        if path.name == "pyproject.toml" or path.is_relative_to(REPO / "tests"):  # package-data globs; tests'
            continue  # temporary output folders (tmp_path / "sweep/benchmark.md") are no citations
        text = path.read_text(errors="replace")
        links = MARKDOWN_LINK.findall(text) if path.suffix == ".md" else []
        for target in [*links, *MARKDOWN_PATH.findall(text)]:
            if re.match(r"[a-z]+:", target):  # https:, mailto: and the like
                continue
            if not exists(path, target):
                broken.append(f"{path.relative_to(REPO)}: {target}")
    assert not broken, "cited paths that do not exist in the repository:\n" + "\n".join(broken)


def test_the_checks_catch_a_bad_citation(tmp_path: Path) -> None:
    """The two patterns flag what they are for (so an empty result above means something)."""
    assert re.search("|".join(OUTSIDE), "see " + "DESIGN" + ".md, section CLI")
    assert re.search("|".join(OUTSIDE), "as `../../../shared/" + "reference/methods.md` §2")
    cited = MARKDOWN_PATH.findall("details in docs/methods/nowhere.md and `lightning_modules/promptad/README.md`")
    assert cited == ["docs/methods/nowhere.md", "lightning_modules/promptad/README.md"]
    assert not exists(REPO / "README.md", cited[0]) and exists(REPO / "README.md", cited[1])
    assert MARKDOWN_PATH.findall("writes <output>/benchmark.md and results.md") == []  # outputs, not citations
