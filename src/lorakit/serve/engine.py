"""Continuous batching: one thread runs decode steps over a running batch that requests join and leave.

Each request is prefilled alone, then decoded together with whatever else is running. Rows keep
their own keys/values inside one left-padded batch cache: an attention mask hides the padding and
each row gets its own position ids, so a row computes what it would compute alone. Rows may use
different adapters (per-row LoRA through `lorakit.adapter_rows`).
"""

from __future__ import annotations

import collections
import inspect
import itertools
import threading
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..device import model_device
from ..errors import ConfigError, LorakitError


class QueueFullError(LorakitError, RuntimeError):
    """The engine's waiting queue is full; the client should retry later (HTTP 429)."""


class EngineStoppedError(LorakitError, RuntimeError):
    """A request was submitted to an engine that is not running."""


class AdapterSource(Protocol):
    """What the engine needs from an adapter store: pin an adapter (loading it) while a row uses it."""

    def acquire(self, name: str) -> str:  # returns the adapter's name on the model
        ...

    def release(self, name: str) -> None:
        ...


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Event:
    """What a request's callback receives: text as it is produced, then one final event with `finish_reason`."""

    text: str = ""
    tokens: int = 0  # new completion tokens in this event
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class Job:
    """One generation to run. `pinned`: the adapter's name on the model when the caller already holds a pin
    on it (acquired from the adapter source; the engine releases it when the job ends)."""

    prompt: list[int]
    params: SamplingParams
    on_event: Callable[[Event], None]
    adapter: str | None = None  # name in the adapter source; None runs the base
    pinned: str | None = None


@dataclass
class _Request:
    id: int
    prompt: list[int]
    adapter: str | None
    params: SamplingParams
    on_event: Callable[[Event], None]
    stream: "TextStream"
    generator: torch.Generator
    cancelled: bool = False
    model_adapter: str | None = None  # the adapter's name on the model while this request holds a pin
    generated: list[int] = field(default_factory=list)
    reported: int = 0  # generated tokens already counted in an event
    done: str | None = None  # finish reason, set when the row stops
    tail: str = ""  # text of the last token, sent with the final event


class Handle:
    """A submitted request; `cancel()` drops it from the queue or the running batch at the next step."""

    def __init__(self, engine: "Engine", request: _Request):
        self._engine, self._request = engine, request

    @property
    def id(self) -> int:
        return self._request.id

    def cancel(self) -> None:
        self._engine._cancel(self._request)


# --- text: incremental decoding and stop strings ------------------------------------------------


class TextStream:
    """Turns token ids into text deltas; holds back text that could still become a stop string.

    Only a short window of ids is decoded per token (so a long answer costs the same per token), and
    the window starts inside the prompt: tokenizers that drop a leading space at the start of a text
    (SentencePiece) then give the first generated word its space, as the whole text would.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = (), context: list[int] = ()):
        self.tokenizer, self.stop = tokenizer, tuple(s for s in stop if s)
        self.ids: list[int] = list(context)
        self.prefix_offset, self.read_offset = 0, len(self.ids)  # ids[prefix:read] is decoded text already
        self.text = ""  # the generated text so far (complete characters only)
        self.emitted = 0  # characters of `text` already sent

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; return (text to send now, whether a stop string was reached)."""
        self.ids.append(token)
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        after = decode(self.ids[self.prefix_offset:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):  # \ufffd: half of a multi-byte character
            self.text += after[len(before):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        hits = [i for i in (self.text.find(s, self.emitted) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            return self._take(len(self.text)), True
        safe = len(self.text)
        for s in self.stop:  # a tail that could start a stop string waits for the next token
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:k]):
                    safe = min(safe, len(self.text) - k)
                    break
        return self._take(safe), False

    def flush(self) -> str:
        """The rest of the text, at the end of the row (a trailing half character included)."""
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=True)
        after = decode(self.ids[self.prefix_offset:], skip_special_tokens=True)
        if len(after) > len(before):
            self.text += after[len(before):]
            self.prefix_offset = self.read_offset = len(self.ids)
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        out = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return out


# --- sampling ------------------------------------------------------------------------------------


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token from a row's logits: greedy at temperature 0, else temperature + nucleus (top_p)."""
    if params.temperature <= 0:
        return int(logits.argmax())
    # Drawn where the request's generator lives (the CPU): a seed gives the same draws whatever the model's device.
    probs = torch.softmax(logits.float().to(generator.device) / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least the most likely token)
        drop = sorted_probs.cumsum(0) - sorted_probs >= params.top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


# --- the batch's key/value cache -----------------------------------------------------------------


class BatchCache:
    """The running rows' keys/values: one transformers cache whose rows are left-padded to a common length,
    and a mask (rows, T) with 1 for real tokens. Decode steps append to it in place; it is only copied
    when rows join or leave."""

    def __init__(self):
        self.cache = None
        self.mask: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def add(self, row_cache) -> None:
        """Append one row (the cache of a prefill of batch 1), padding on the left to a common length."""
        n = row_cache.get_seq_length()
        row_mask = torch.ones(1, n, dtype=torch.long, device=row_cache.layers[0].keys.device)
        if self.cache is None:
            self.cache, self.mask = row_cache, row_mask
            return
        T = max(self.length, n)
        for layer, row in zip(self.cache.layers, row_cache.layers):
            layer.keys = torch.cat([_pad_left(layer.keys, T), _pad_left(row.keys, T)])
            layer.values = torch.cat([_pad_left(layer.values, T), _pad_left(row.values, T)])
        self.mask = torch.cat([F.pad(self.mask, (T - self.length, 0)), F.pad(row_mask, (T - n, 0))])

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows`, then drop leading columns that are padding in every row left."""
        if not rows:
            self.cache = self.mask = None
            return
        idx = torch.tensor(rows, device=self.mask.device)
        mask = self.mask[idx]
        start = int(mask.any(0).int().argmax())
        self.mask = mask[:, start:]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[idx, :, start:], layer.values[idx, :, start:]

    def grow(self) -> torch.Tensor:
        """The mask for a decode step that appends one real token to every row (the cache appends itself)."""
        self.mask = F.pad(self.mask, (0, 1), value=1)
        return self.mask


def _pad_left(t: torch.Tensor, length: int) -> torch.Tensor:
    return F.pad(t, (0, 0, length - t.shape[-2], 0))


def _new_cache():
    from transformers import DynamicCache

    return DynamicCache()  # DynamicLayers only: full attention (sliding-window layers are not special-cased)


# --- the engine ----------------------------------------------------------------------------------


class Engine:
    """Owns the model while running: admits queued requests between decode steps, up to `max_batch` rows."""

    def __init__(self, model: nn.Module, tokenizer, adapters: AdapterSource | None = None,
                 max_batch: int = 8, max_queue: int = 64, eos_token_ids: set[int] | None = None):
        if max_batch < 1 or max_queue < 0:
            raise ConfigError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        self.model, self.tokenizer, self.adapters = model.eval(), tokenizer, adapters
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_context = _max_context(model)
        self.device = model_device(model)  # ids and positions are made here; the model stays where it is
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.eos_token_ids = eos_token_ids if eos_token_ids is not None else _eos_ids(model, tokenizer)
        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        # Held for every step; code that changes the model (loading, evicting adapters) takes it too.
        self.model_lock = threading.RLock()
        self._cv = threading.Condition()
        self._waiting: collections.deque[_Request] = collections.deque()
        self._dropped: list[_Request] = []  # cancelled while waiting
        self._rows: list[_Request] = []
        self._cache = BatchCache()
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.stats = EngineStats()

    # -- lifecycle --

    def start(self) -> "Engine":
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="lorakit-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    # -- requests --

    def submit(self, job: Job) -> Handle:
        """Queue a job; its `on_event` is called on the engine thread. Raises QueueFullError when full."""
        return self.submit_many([job])[0]

    def submit_many(self, jobs: list[Job]) -> list[Handle]:
        """Queue several jobs (the choices of one HTTP request) all or none."""
        with self._cv:
            if self._stopping or self._thread is None:
                raise EngineStoppedError("the engine is not running")
            if len(self._waiting) + len(jobs) > self.max_queue:
                self.stats.rejected += 1
                raise QueueFullError(f"the server is busy: {len(self._waiting)} requests are waiting "
                                     f"(max_queue={self.max_queue}); retry later")
            handles = []
            for job in jobs:
                seed = job.params.seed if job.params.seed is not None else int(torch.randint(0, 2**62, (1,)))
                req = _Request(next(self._ids), list(job.prompt), job.adapter, job.params, job.on_event,
                               TextStream(self.tokenizer, job.params.stop, job.prompt[-4:]),
                               torch.Generator().manual_seed(seed),
                               model_adapter=job.pinned)
                self._waiting.append(req)
                handles.append(Handle(self, req))
            self._cv.notify_all()
        return handles

    def _cancel(self, req: _Request) -> None:
        with self._cv:
            if req.cancelled:
                return
            req.cancelled = True
            if req in self._waiting:  # free its place in the queue now; the engine sends its final event
                self._waiting.remove(req)
                self._dropped.append(req)
            self._cv.notify_all()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._rows)

    # -- the loop --

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self._waiting and not self._rows and not self._dropped:
                    self._cv.wait()
                if self._stopping:
                    break
            with self.model_lock, torch.inference_mode():
                try:
                    self._step()
                except Exception as e:  # a bug or a broken adapter must not kill the server: fail the rows
                    self._fail_all(f"{type(e).__name__}: {e}")
        self._fail_all("the server is shutting down", reason="cancelled", waiting=True)

    def _step(self) -> None:
        self._drop_cancelled()
        while len(self._rows) < self.max_batch:
            with self._cv:
                if not self._waiting:
                    break
                req = self._waiting.popleft()
            self._prefill(req)
        self._drop_finished()
        if self._rows:
            self._decode()
            self._drop_finished()

    def _prefill(self, req: _Request) -> None:
        """Run the prompt alone (so a row's cache never depends on the batch), then join the batch."""
        try:
            if req.adapter is not None and req.model_adapter is None:
                req.model_adapter = self.adapters.acquire(req.adapter)
            cache = _new_cache()
            logits = self._forward(torch.tensor([req.prompt], device=self.device), [req.model_adapter], cache)
        except Exception as e:  # this request fails (e.g. its adapter no longer loads); the batch goes on
            self._finish(req, "error", error=f"{type(e).__name__}: {e}")
            return
        self._cache.add(cache)
        self._rows.append(req)
        self.stats.prompt_tokens += len(req.prompt)
        self._accept(req, logits[0])

    def _decode(self) -> None:
        rows = self._rows
        ids = torch.tensor([[r.generated[-1]] for r in rows], device=self.device)
        positions = torch.tensor([[len(r.prompt) + len(r.generated) - 1] for r in rows], device=self.device)
        mask = self._cache.grow()
        logits = self._forward(ids, [r.model_adapter for r in rows], self._cache.cache, attention_mask=mask,
                               position_ids=positions)
        self.stats.record_step(len(rows))
        for i, req in enumerate(rows):
            self._accept(req, logits[i])

    def _forward(self, ids, adapters: list[str | None], cache, **kwargs) -> torch.Tensor:
        from ..adapters import adapter_rows

        with adapter_rows(self.model, adapters):
            out = self.model(ids, use_cache=True, logits_to_keep=1, **{self._cache_kw: cache}, **kwargs)
        return out.logits[:, -1]

    def _accept(self, req: _Request, logits: torch.Tensor) -> None:
        """Sample the row's next token and send its text; set `done` when the row stops."""
        token = sample(logits, req.params, req.generator)
        req.generated.append(token)
        self.stats.completion_tokens += 1
        if token in self.eos_token_ids:
            req.done = "stop"
            return
        text, stopped = req.stream.push(token)
        full = len(req.generated) >= req.params.max_tokens or len(req.prompt) + len(req.generated) >= self.max_context
        req.done = "stop" if stopped else ("length" if full else None)
        if req.done is None:
            req.reported = len(req.generated)
            req.on_event(Event(text=text, tokens=1))
        else:
            req.tail = text  # sent by _finish, together with the finish reason

    def _drop_cancelled(self) -> None:
        for req in self._rows:
            if req.cancelled:
                req.done = "cancelled"
        self._drop_finished()
        with self._cv:
            dropped, self._dropped = self._dropped, []
        for req in dropped:
            self._finish(req, "cancelled")

    def _drop_finished(self) -> None:
        keep = [i for i, r in enumerate(self._rows) if r.done is None]
        if len(keep) == len(self._rows):
            return
        finished = [r for r in self._rows if r.done is not None]
        self._cache.keep(keep)
        self._rows = [self._rows[i] for i in keep]
        for req in finished:
            self._finish(req, req.done)

    def _finish(self, req: _Request, reason: str, error: str | None = None) -> None:
        if req.adapter is not None and req.model_adapter is not None:
            self.adapters.release(req.adapter)
            req.model_adapter = None
        text = req.tail + req.stream.flush() if reason in ("stop", "length") else ""
        tokens, req.reported = len(req.generated) - req.reported, len(req.generated)
        self.stats.record_finish(reason)
        req.on_event(Event(text=text, tokens=tokens, finish_reason=reason, prompt_tokens=len(req.prompt),
                           completion_tokens=len(req.generated), error=error))

    def _fail_all(self, message: str, reason: str = "error", waiting: bool = False) -> None:
        rows, self._rows = self._rows, []
        self._cache = BatchCache()
        if waiting:
            with self._cv:
                rows += list(self._waiting) + self._dropped
                self._waiting.clear()
                self._dropped = []
        for req in rows:
            self._finish(req, reason, error=message if reason == "error" else None)


@dataclass
class EngineStats:
    """Counters for /metrics (read without a lock: each is a plain int written by one thread)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    steps: int = 0
    batch_rows: int = 0  # summed over steps: batch_rows / steps is the mean batch size
    max_batch_seen: int = 0
    rejected: int = 0
    finished: dict[str, int] = field(default_factory=lambda: collections.Counter())

    def record_step(self, rows: int) -> None:
        self.steps += 1
        self.batch_rows += rows
        self.max_batch_seen = max(self.max_batch_seen, rows)

    def record_finish(self, reason: str) -> None:
        self.finished[reason] += 1


def _max_context(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def _eos_ids(model: nn.Module, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        ids |= set(value) if isinstance(value, (list, tuple)) else ({value} if isinstance(value, int) else set())
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
