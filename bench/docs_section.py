"""Where a bench script's results go: its own section of docs/benchmarks.md, newest run last."""

from __future__ import annotations

from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def add_to_section(heading: str, intro: str, text: str, path: Path = BENCHMARKS) -> Path:
    """Put `text` at the end of the section `heading` ("## ..."), before the next section; a missing section is
    added at the end of the file, opened by `intro`. Written whole to a temporary file, then renamed over."""
    existing = path.read_text(encoding="utf-8") if path.exists() else ""
    lines = existing.splitlines()
    if heading in lines:
        start = lines.index(heading)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        while end > start + 1 and not lines[end - 1].strip():
            end -= 1
        lines[end:end] = ["", *text.splitlines()]
    else:
        lines += ["", heading, "", intro, "", *text.splitlines()]
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines).strip("\n") + "\n", encoding="utf-8")
    tmp.replace(path)
    return path
