"""What a generation request is: the job a caller submits, the events it receives, and the engine's record of it."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from .sampling import SamplingParams
from .text import TextStream


@dataclass
class Event:
    """What a request's callback receives: text as it is produced, then one final event with `finish_reason`."""

    text: str = ""
    tokens: int = 0  # new completion tokens in this event
    finish_reason: str | None = None  # "stop" (a stop string), "eos", "length", "cancelled" or "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    token_ids: list[int] = field(default_factory=list)  # the tokens this event reports (its `tokens` of them)
    logprobs: list[float] | None = None  # theirs, when the request asked (SamplingParams.logprobs)


# What a row runs: None (the base), an adapter's name, or a weighted mix ((name, weight), ...) (serve/mixes.py).
Choice = str | tuple[tuple[str, float], ...] | None


@dataclass
class Job:
    """One generation to run. `pinned`: the adapter's name on the model (a mix: its adapters' names) when the
    caller already holds a pin on each (acquired from the adapter source; the engine releases them when the job ends)."""

    prompt: list[int]
    params: SamplingParams
    on_event: Callable[[Event], None]
    adapter: Choice = None  # name(s) in the adapter source; None runs the base
    pinned: Choice = None


@dataclass
class _Request:
    id: int
    prompt: list[int]
    adapter: Choice
    params: SamplingParams
    on_event: Callable[[Event], None]
    stream: TextStream
    generator: torch.Generator
    cancelled: bool = False
    model_adapter: Choice = None  # the adapter's name (a mix: names) on the model while this request holds pins
    pinning: Future | None = None  # the pin a helper thread is taking (loading the adapter if needed)
    generated: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    reported: int = 0  # generated tokens already counted in an event
    done: str | None = None  # finish reason, set when the row stops
    tail: str = ""  # text of the last token, sent with the final event
