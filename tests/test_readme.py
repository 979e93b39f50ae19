"""The README's library snippet runs as written (on a tiny model standing in for the built-in one)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_library_snippet_runs_as_written(builtin_cache, tmp_path, monkeypatch, capsys):
    text = README.read_text()
    snippet = re.search(r"## The library in one screen\n\n```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "README.md", "exec"), {})
    assert re.fullmatch(r"trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: [\d.]+\n", capsys.readouterr().out)
    assert (tmp_path / "out" / "chat" / "adapter_model.safetensors").exists()


def test_no_table_is_printed_twice():
    """Benchmark tables are pasted in by hand; a second paste of one (the serve_scale table once was) is a mistake."""
    tables, current = [], []
    for line in README.read_text().splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append("\n".join(current))
            current = []
    repeated = [t.splitlines()[0] for t in tables if tables.count(t) > 1 and len(t.splitlines()) > 3]
    assert not repeated, f"tables printed twice in README.md: {repeated}"
