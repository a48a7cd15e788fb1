"""The documentation stays true: the generated config reference, relative links, and no references outside the repo."""

from __future__ import annotations

import fnmatch
import re
import subprocess
from pathlib import Path

from pipeline import config_docs

ROOT = Path(__file__).resolve().parents[2]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.DOTALL)
OLD_SPEC = re.compile(r"(?<!docs/)DESIGN" + r"\.md")
OUTSIDE = ".." + "/shared"


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def repo_files() -> list[Path]:
    """Tracked files plus new ones git does not ignore (docs written but not committed yet); in an unpacked
    `git archive` (no .git), every file outside the folders .gitignore names."""
    if not (ROOT / ".git").exists():
        return [path for path in sorted(ROOT.rglob("*")) if path.is_file() and not ignored(path.relative_to(ROOT))]
    listing = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, check=True).stdout.decode()
    return [ROOT / name for name in sorted(set(listing.split("\0"))) if name and (ROOT / name).is_file()]


def ignored(relative: Path) -> bool:
    """Whether .gitignore's folder and glob patterns (the only kinds it has) leave `relative` out."""
    patterns = [line.strip().strip("/") for line in (ROOT / ".gitignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    return any(fnmatch.fnmatch(part, pattern) or fnmatch.fnmatch(str(relative), pattern)
               for pattern in patterns for part in relative.parts)


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", CODE.sub("", markdown), re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
    out = set()
    for slug, repeats in seen.items():
        out |= {slug} | {f"{slug}-{n}" for n in range(1, repeats + 1)}
    return out


def test_configuration_reference_is_generated_from_config():
    path = ROOT / "docs" / "configuration.md"
    assert path.is_file() and path.read_text() == config_docs.render(), (
        "docs/configuration.md is out of date with pipeline/config.py; run `python -m pipeline.config_docs`")


def test_relative_links_point_at_files_and_headings_in_the_repo():
    broken = []
    for page in markdown_files():
        for target in LINK.findall(CODE.sub("", page.read_text())):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:: not ours to check
                continue
            file_part, _, anchor = target.partition("#")
            linked = (page.parent / file_part).resolve() if file_part else page
            if not linked.exists() or ROOT not in (linked, *linked.parents):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file in the repository)")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked.read_text()):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no heading with that anchor)")
    assert not broken, "broken links:\n  " + "\n  ".join(broken)


def test_no_file_refers_outside_the_repository():
    found = []
    for path in repo_files():
        data = path.read_bytes()
        if b"\0" in data:
            continue  # binary
        for number, line in enumerate(data.decode(errors="replace").splitlines(), 1):
            if OLD_SPEC.search(line) or OUTSIDE in line:
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert not found, "the design lives in docs/design.md, inside the repository; found:\n  " + "\n  ".join(found)
