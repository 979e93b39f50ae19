"""The engine's counters, read by /metrics."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field


@dataclass
class EngineStats:
    """Counters for /metrics (read without a lock: each is a plain int written by one thread)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    steps: int = 0
    batch_rows: int = 0  # summed over steps: batch_rows / steps is the mean batch size
    max_batch_seen: int = 0
    prefills: int = 0  # prefill groups run
    prefill_rows: int = 0  # summed over groups: prefill_rows / prefills is the mean prefill batch
    prefill_forwards: int = 0  # more than prefills when long prompts are prefilled in chunks
    rejected: int = 0
    finished: dict[str, int] = field(default_factory=lambda: collections.Counter())

    def record_step(self, rows: int) -> None:
        self.steps += 1
        self.batch_rows += rows
        self.max_batch_seen = max(self.max_batch_seen, rows)

    def record_prefill(self, rows: int, tokens: int) -> None:
        self.prefills += 1
        self.prefill_rows += rows
        self.prompt_tokens += tokens

    def record_finish(self, reason: str) -> None:
        self.finished[reason] += 1
