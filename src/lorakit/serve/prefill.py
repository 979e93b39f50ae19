"""Prefill: the prompts of several waiting requests run together, in chunks between the decode steps."""

from __future__ import annotations

from typing import Callable

import torch

from .batch_cache import new_cache


class Prefill:
    """Prompts prefilled in one forward per chunk: left-padded to a common length (a mask hides the padding and
    positions count real tokens only, so each row computes what it computes alone), each row with its own
    adapter. A long prompt takes several chunks of at most `chunk_tokens` tokens per forward, and the running
    batch takes a decode step between two chunks, so one long prompt does not stall everyone else."""

    def __init__(self, requests: list, chunk_tokens: int, device: torch.device | str = "cpu"):
        self.requests = requests
        lengths = [len(r.prompt) for r in requests]
        self.length = max(lengths)
        self.ids = torch.zeros(len(requests), self.length, dtype=torch.long, device=device)
        self.mask = torch.zeros(len(requests), self.length, dtype=torch.long, device=device)
        for i, r in enumerate(requests):
            self.ids[i, self.length - lengths[i]:] = torch.tensor(r.prompt, device=device)
            self.mask[i, self.length - lengths[i]:] = 1
        self.positions = (self.mask.cumsum(1) - 1).clamp(min=0)
        self.cache = new_cache()
        self.done = 0  # columns prefilled so far
        self.chunk = max(1, chunk_tokens // len(requests))

    @property
    def tokens(self) -> int:
        return int(self.mask.sum())

    def step(self, forward: Callable) -> torch.Tensor | None:
        """Run the next chunk; the last position's logits (rows, vocab) once the prompts are done, else None."""
        end = min(self.length, self.done + self.chunk)
        logits = forward(self.ids[:, self.done:end], [r.model_adapter for r in self.requests], self.cache,
                         attention_mask=self.mask[:, :end], position_ids=self.positions[:, self.done:end])
        self.done = end
        return logits if end == self.length else None


def take_group(waiting: list, room: int, tokens: int) -> list:
    """Which of the `waiting` requests (all ready to run, oldest first) to prefill together: at most `room`, within
    `tokens` padded tokens (the first one always), and only while left-padding to the longest would waste less
    than the prompts' own tokens (a short prompt is not held up by padding it to a long one)."""
    group, longest, total = [], 0, 0
    for req in waiting:
        if len(group) == room:
            break
        n = len(req.prompt)
        padded = (len(group) + 1) * max(longest, n)
        if group and (padded > tokens or padded > 2 * (total + n)):
            continue
        group.append(req)
        longest, total = max(longest, n), total + n
    return group
