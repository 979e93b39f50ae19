"""The quality study's measurements as the recommender reads them (lorakit/data/study.json, made by export.py):
cells grouped by the study's tables, their scores, the noise band, and how to cite a cell."""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .export import STUDY_FILE

METRIC_NAMES = {"exact_match": "exact match", "accuracy": "accuracy"}
# The study's tables (bench/quality.py's `rows` tags) each decision reads, per task. The classification grid is
# smaller: what it lacks is read from the causal-LM task's tables, and the reason says so.
TABLES = {
    "causal-lm": {"headline": "headline", "rank": "rank", "targets": "targets", "alpha": "alpha", "lr": "lr",
                  "full-lr": "full-lr", "method": "method"},
    "classify": {"headline": "cls-headline", "rank": "cls-rank", "targets": "cls-targets"},
}


@dataclass
class Point:
    """One row of a study table: its label (8, 0.001, "q,v r=42", "full FT") and its cells (one per seed)."""

    label: Any
    cells: list[dict]  # every cell of the row, finished or not, each with its "name"

    @property
    def done(self) -> list[dict]:
        return [c for c in self.cells if c["status"] == "done" and c.get("score") is not None]

    @property
    def score(self) -> float | None:
        return statistics.fmean(c["score"] for c in self.done) if self.done else None

    @property
    def names(self) -> str:
        return "/".join(c["name"] for c in self.cells)

    def mean(self, key: str) -> float | None:
        values = [c[key] for c in self.done if c.get(key) is not None]
        return statistics.fmean(values) if values else None

    def setting(self, key: str) -> Any:
        return self.done[0]["settings"].get(key) if self.done else None

    def brief(self) -> str:
        """"lora-r8-s0/lora-r8-s1: 0.829 exact match": for a row already cited in full in an earlier reason."""
        metric = METRIC_NAMES.get(self.done[0]["metric"], self.done[0]["metric"])
        return f"{'/'.join(c['name'] for c in self.done)}: {self.score:.3f} {metric}"

    def text(self) -> str:
        """"0.842 exact match (lora-r8-s0)", or the mean and each seed's score for a row run with several seeds."""
        done = self.done
        metric = METRIC_NAMES.get(done[0]["metric"], done[0]["metric"])
        if len(done) == 1:
            return f"{done[0]['score']:.3f} {metric} ({done[0]['name']})"
        seeds = ", ".join(f"{c['name']} {c['score']:.3f}" for c in done)
        return f"{self.score:.3f} {metric} (mean of {len(done)} seeds: {seeds})"


class Study:
    """The shipped study data: which cells finished, with what numbers, on what machine, model and data."""

    def __init__(self, data: dict[str, Any], path: Path | None = None):
        self.path = path
        self.exported = data.get("exported", "?")
        self.cells = {name: {**entry, "name": name} for name, entry in data.get("cells", {}).items()}
        self.cited: dict[str, dict] = {}  # cells a recommendation named, for its provenance lines

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> "Study":
        path = Path(path) if path is not None else STUDY_FILE
        if not path.is_file():  # an install without the data file: every reason falls back to its stated prior
            return cls({}, path)
        return cls(json.loads(path.read_text(encoding="utf-8")), path)

    def table(self, task: str, decision: str) -> tuple[str, list[Point]]:
        """The study table a decision reads for `task` (falling back to the causal-LM task's) and its rows."""
        own = TABLES.get(task, {}).get(decision)
        name, table_task = (own, task) if own else (TABLES["causal-lm"].get(decision), "causal-lm")
        groups: dict[Any, list[dict]] = {}
        for cell in self.cells.values():
            if cell["task"] == table_task and name in cell.get("tables", {}):
                groups.setdefault(cell["tables"][name], []).append(cell)
        return table_task, [Point(label, cells) for label, cells in groups.items()]

    def cite(self, *points: Point) -> None:
        for p in points:
            for c in p.done:
                self.cited[c["name"]] = c

    def noise(self, task: str) -> tuple[float | None, str]:
        """A difference smaller than this is not evidence: the seed spread of the headline LoRA row or twice the
        binomial standard error of its score on the held-out rows, whichever is larger (as docs/quality.md)."""
        _, points = self.table(task, "headline")
        lora = next((p for p in points if p.done and p.setting("method") == "lora"), None)
        if lora is None:
            return None, "no noise band yet (the headline LoRA cells have not finished)"
        self.cite(lora)
        p, n = lora.score, lora.done[0].get("eval_rows") or 0
        se2 = 2 * math.sqrt(p * (1 - p) / n) if n else 0.0
        scores = [c["score"] for c in lora.done]
        spread = max(scores) - min(scores) if len(scores) > 1 else 0.0
        how = f"twice the standard error of {p:.3f} on {n} held-out rows, {se2:.3f}"
        if len(scores) > 1:
            how = f"the larger of the seed spread ({spread:.3f} across {lora.names}) and {how}"
        return max(spread, se2), how

    def provenance(self) -> list[str]:
        """One line per cited cell: its date, machine, model and data, as the study recorded them."""
        lines = []
        for name, c in sorted(self.cited.items()):
            rows = f", {c['train_rows']} training / {c['eval_rows']} held-out rows" if c.get("train_rows") else ""
            lines.append(f"{name}: {c.get('date', '?')}, {c.get('model', '?')}, {c.get('data', '?')}{rows}, "
                         f"{c.get('settings', {}).get('max_steps', '?')} steps; {c.get('machine', '?')}")
        return lines
