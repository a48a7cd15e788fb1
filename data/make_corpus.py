"""Rebuild data/python-docs.jsonl from Debian's python3.11-doc (PSF licence).

Run once by a maintainer (`apt-get install python3.11-doc`); the output is committed so
that no run needs the package. One JSON line per documentation page, reST markup stripped.
"""

import json
import re
import sys
from pathlib import Path

SOURCES = Path("/usr/share/doc/python3.11/html/_sources")
SECTIONS = ("tutorial", "howto", "faq", "reference", "whatsnew/3.1", "whatsnew/3.2", "whatsnew/3.3")
ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`!?~?([^`<]*?)(?:\s*<[^`]*>)?`")
LITERAL = re.compile(r"``([^`]*)``")


def clean(text: str) -> str:
    lines = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith(".. ") or stripped.startswith(":") and stripped.endswith(":"):
            continue
        if stripped and set(stripped) <= set("=-*^~#+`'\""):
            continue  # section underlines
        line = ROLE.sub(r"\1", line)
        line = LITERAL.sub(r"\1", line)
        lines.append(line.rstrip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def main(out: Path) -> None:
    files = []
    for section in SECTIONS:
        folder = SOURCES / section
        files += sorted(folder.rglob("*.rst.txt")) if folder.is_dir() else [folder.with_name(folder.name + ".rst.txt")]
    with out.open("w") as f:
        for path in files:
            text = clean(path.read_text(encoding="utf-8"))
            if len(text) > 200:
                f.write(json.dumps({"text": text, "source": str(path.relative_to(SOURCES))}) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "data/python-docs.jsonl"))
