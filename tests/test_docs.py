"""The documentation: a short README, every docs page reachable from it, no broken relative links, and no file
that cites documents outside the repository or labels things by the internal order of work.

Fast and without torch: plain text checks over the checkout. Words are counted as `len(text.split())` over the
whole README, fenced code blocks included.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_WORDS = 1500
PARAGRAPH_MAX_WORDS = 200

# Documents that live outside the repository (a reader of the repository cannot open them), and labels by the
# order in which work was done ("issue 4", "sessions 5 and 6") rather than by what a result measures.
FORBIDDEN = re.compile(
    r"design\.md|seed-methods|\.\./shared|\bresearch/|vllm-integration\.md|vllm-findings\.md|cpu-feasibility\.md"
    r"|dart-findings\.md|\bissues?\s+\d+|\bsessions?\s+\d+",
    re.IGNORECASE,
)
# References to other projects' trackers are fine, e.g. github.com/vllm-project/vllm/issues/12345.
EXTERNAL_ISSUE = re.compile(r"github\.com/[\w.-]+/[\w.-]+/(?:issues|pull)/\d+", re.IGNORECASE)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def _pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def _prose(path: Path) -> str:
    """The file's text without fenced code blocks (links in code are examples, not links)."""
    return FENCE.sub("", path.read_text(encoding="utf-8"))


def _relative_links(path: Path) -> list[str]:
    links = []
    for target in LINK.findall(_prose(path)):
        if re.match(r"[a-zA-Z][\w+.-]*:", target) or target.startswith("#"):  # URLs, mailto:, anchors
            continue
        links.append(target.split("#", 1)[0])
    return links


def test_readme_is_short() -> None:
    words = len(README.read_text(encoding="utf-8").split())
    assert words <= README_MAX_WORDS, f"README.md has {words} words; at most {README_MAX_WORDS} (move detail to docs/)"


def test_readme_has_no_wall_of_text() -> None:
    long = [
        (len(p.split()), p[:60]) for p in re.split(r"\n\s*\n", _prose(README)) if len(p.split()) > PARAGRAPH_MAX_WORDS
    ]
    assert not long, f"README.md paragraphs over {PARAGRAPH_MAX_WORDS} words: {long}"


def test_docs_exist_and_have_an_index() -> None:
    names = {p.name for p in _pages()}
    assert "README.md" in names, "docs/README.md, the index of the docs pages, is missing"
    index = {Path(link).name for link in _relative_links(DOCS / "README.md")}
    missing = sorted(names - index - {"README.md"})
    assert not missing, f"docs/README.md does not list {missing}"


def test_every_docs_page_is_linked_from_the_readme() -> None:
    linked = {(README.parent / link).resolve() for link in _relative_links(README)}
    missing = [str(p.relative_to(ROOT)) for p in _pages() if p.resolve() not in linked]
    assert not missing, f"README.md does not link {missing}"


@pytest.mark.parametrize("path", [README, ROOT / "BENCHMARKS.md", *_pages()], ids=lambda p: p.name)
def test_relative_links_point_to_existing_files(path: Path) -> None:
    broken = [link for link in _relative_links(path) if link and not (path.parent / link).exists()]
    assert not broken, f"{path.relative_to(ROOT)} links to missing files: {broken}"


def _tracked_text_files() -> list[Path]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(
        ["git", "ls-files", "-z", "--", "*.md", "*.py", "*.toml", "Makefile", "*/Makefile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    this = Path(__file__).resolve()
    return [ROOT / name for name in out.split("\0") if name and (ROOT / name).resolve() != this]


def test_no_file_cites_outside_documents_or_internal_work_labels() -> None:
    offenders = []
    for path in _tracked_text_files():
        if not path.is_file():  # deleted in the working tree, not yet committed
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
            match = FORBIDDEN.search(EXTERNAL_ISSUE.sub("", line))
            if match:
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {match.group(0)!r}")
    assert not offenders, (
        "say what a result measures, with its date, machine and command, and cite only files "
        "in the repository:\n" + "\n".join(offenders)
    )
