"""Continuous batching: one thread runs decode steps over a running batch that requests join and leave.

Waiting requests are prefilled together (prefill.py: one forward for several prompts, long ones in chunks
between decode steps), then decoded together with whatever else is running. Rows keep their own keys/values
inside one left-padded batch cache: an attention mask hides the padding and each row gets its own position
ids, so a row computes what it would compute alone. Rows may use different adapters, or weighted mixes of them
(per-row LoRA through `lorakit.adapter_rows`); an adapter that must be loaded first is pinned by a helper thread,
so its load never holds up the running batch.
"""

from __future__ import annotations

import collections
import inspect
import itertools
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

import torch
from torch import nn

from .. import rows
from ..device import model_device
from ..errors import ConfigError, LorakitError
from .batch_cache import BatchCache
from .lock import FairLock
from . import mixes
from .jobs import Choice, Event, Job, _Request
from .prefill import Prefill, take_group
from .sampling import sample, token_logprob
from .stats import EngineStats
from .text import TextStream

DECODE_SWITCH_INTERVAL = 0.0005  # seconds; see Engine.start


class QueueFullError(LorakitError, RuntimeError):
    """The engine's waiting queue is full; the client should retry later (HTTP 429)."""


class EngineStoppedError(LorakitError, RuntimeError):
    """A request was submitted to an engine that is not running."""


class AdapterSource(Protocol):
    """What the engine needs from an adapter store: pin an adapter (loading it) while a row uses it (a row running
    a mix pins each of its adapters)."""

    def acquire(self, name: str) -> str:  # returns the adapter's name on the model
        ...

    def release(self, name: str) -> None:
        ...


class Handle:
    """A submitted request; `cancel()` drops it from the queue or the running batch at the next step."""

    def __init__(self, engine: "Engine", request: _Request):
        self._engine, self._request = engine, request

    @property
    def id(self) -> int:
        return self._request.id

    def cancel(self) -> None:
        self._engine._cancel(self._request)


# --- the engine ----------------------------------------------------------------------------------


# Prefill forwards run between two decode steps at most.
PREFILLS_PER_STEP = 4


class Engine:
    """Owns the model while running: admits queued requests between decode steps, up to `max_batch` rows.
    `prefill_tokens`: tokens per prefill forward at most (prompts are grouped up to it; a longer prompt is
    prefilled in chunks). Small groups give the first of a burst of requests their first token early; measured
    on CPU, groups of ~4 prompts of 32 tokens already get the whole gain of batching."""

    def __init__(self, model: nn.Module, tokenizer, adapters: AdapterSource | None = None,
                 max_batch: int = 8, max_queue: int = 64, eos_token_ids: set[int] | None = None,
                 prefill_tokens: int = 128):
        if max_batch < 1 or max_queue < 0 or prefill_tokens < 1:
            raise ConfigError(f"max_batch and prefill_tokens must be >= 1 and max_queue >= 0, got {max_batch}, "
                              f"{prefill_tokens} and {max_queue}")
        self.model, self.tokenizer, self.adapters = model.eval(), tokenizer, adapters
        self.max_batch, self.max_queue, self.prefill_tokens = max_batch, max_queue, prefill_tokens
        self.max_context = _max_context(model)
        self.device = model_device(model)  # ids and positions are made here; the model stays where it is
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.eos_token_ids = eos_token_ids if eos_token_ids is not None else _eos_ids(model, tokenizer)
        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        # Held for every step; code that changes the model (loading, evicting adapters) takes it between steps.
        self.model_lock = FairLock()
        self._cv = threading.Condition()
        self._waiting: collections.deque[_Request] = collections.deque()
        self._dropped: list[_Request] = []  # cancelled while waiting
        self._rows: list[_Request] = []
        self._prefill: Prefill | None = None
        self._cache = BatchCache()
        self._decode_plan: tuple | None = None  # (the running rows' adapters, their kept row plan)
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._pinner = ThreadPoolExecutor(max_workers=4, thread_name_prefix="lorakit-pin")
        self._stopping = False
        self.stats = EngineStats()

    # -- lifecycle --

    def start(self) -> "Engine":
        if self._thread is None:
            # The decode loop is many short Python-level ops; an adapter load in another thread (file reads,
            # validation) holds the GIL for up to the switch interval each time it runs. Decode-step p99 while 100
            # adapters load, ÷ idle (bench/serve_scale.py --parts stall, quiet 2-core CPU): at Python's default 5 ms
            # 1.08-1.50 (median 1.17 of 5 runs), at 0.5 ms 1.01-1.41 (median 1.08 of 10); idle steps unchanged.
            # Only ever lowered, never raised.
            sys.setswitchinterval(min(sys.getswitchinterval(), DECODE_SWITCH_INTERVAL))
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
                if req.adapter is not None and req.model_adapter is None:
                    req.pinning = self._pin(req.adapter)
                self._waiting.append(req)
                handles.append(Handle(self, req))
            self._cv.notify_all()
        return handles

    def _pin(self, choice: Choice) -> Future:
        """Acquire the adapter (each adapter of a mix) on a helper thread (a load reads its files there, outside the
        model lock)."""
        if self.adapters is None:
            future: Future = Future()
            future.set_exception(ConfigError(f"adapter {choice!r} requested, but the engine has no adapter source"))
            return future
        future = self._pinner.submit(mixes.acquire, self.adapters, choice)
        future.add_done_callback(lambda _: self._wake())
        return future

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

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
        return len(self._rows) + (len(self._prefill.requests) if self._prefill is not None else 0)

    # -- the loop --

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self._has_work():
                    self._cv.wait()
                if self._stopping:
                    break
            with self.model_lock, torch.inference_mode():
                try:
                    self._step()
                except Exception as e:  # a bug or a broken adapter must not kill the server: fail the rows
                    self._fail_all(f"{type(e).__name__}: {e}")
        self._fail_all("the server is shutting down", reason="cancelled", waiting=True)

    def _has_work(self) -> bool:
        """Called with _cv held: rows to decode or prefill, finals to send, or a waiting request that can start."""
        if self._rows or self._prefill is not None or self._dropped:
            return True
        return any(r.pinning is None or r.pinning.done() for r in self._waiting)

    def _step(self) -> None:
        self._drop_cancelled()
        # Prefill forwards first (each emits first tokens at once), a few per step so that a burst of prompts gets
        # its first tokens quickly while the running rows still get a decode step every PREFILLS_PER_STEP forwards.
        for _ in range(PREFILLS_PER_STEP):
            if self._prefill is None:
                self._prefill = self._next_prefill()
            if self._prefill is None:
                break
            self._prefill_chunk()
        self._drop_finished()
        if self._rows:
            self._decode()
            self._drop_finished()

    def _next_prefill(self) -> Prefill | None:
        """The waiting requests to prefill together next (oldest first, those whose adapter is pinned)."""
        room = self.max_batch - len(self._rows)
        if room <= 0:
            return None
        ready, failed = [], []
        with self._cv:
            for req in self._waiting:
                if req.pinning is not None and req.pinning.done():
                    if req.pinning.exception() is not None:
                        failed.append(req)
                        continue
                    req.model_adapter, req.pinning = req.pinning.result(), None
                if req.pinning is None:
                    ready.append(req)
            group = sorted(take_group(ready, room, self.prefill_tokens), key=lambda r: _choice_key(r.model_adapter))
            for req in failed + group:
                self._waiting.remove(req)
        for req in failed:  # this request fails (e.g. its adapter no longer loads); the others go on
            e = req.pinning.exception()
            req.pinning = None
            self._finish(req, "error", error=f"{type(e).__name__}: {e}")
        return Prefill(group, self.prefill_tokens, self.device) if group else None

    def _prefill_chunk(self) -> None:
        prefill = self._prefill
        self.stats.prefill_forwards += 1
        try:
            logits = prefill.step(self._forward)
        except Exception as e:  # e.g. an adapter that cannot run per row: these requests fail, the batch goes on
            self._prefill = None
            for req in prefill.requests:
                self._finish(req, "error", error=f"{type(e).__name__}: {e}")
            return
        if logits is None:
            return
        self._prefill = None
        self._cache.add(prefill.cache, prefill.mask)
        self._rows.extend(prefill.requests)
        self._group_rows()
        self.stats.record_prefill(len(prefill.requests), prefill.tokens)
        for i, req in enumerate(prefill.requests):
            self._accept(req, logits[i])

    def _group_rows(self) -> None:
        """Keep the running rows grouped by adapter (in the cache too): a group of consecutive rows runs its adapter's
        two products on its own rows, in place (rows.py), the cheapest per-row path. Done when rows join, not per step."""
        order = sorted(range(len(self._rows)), key=lambda i: _choice_key(self._rows[i].model_adapter))
        if order != list(range(len(order))):
            self._cache.keep(order)
            self._rows = [self._rows[i] for i in order]

    def _decode(self) -> None:
        rows = self._rows
        ids = torch.tensor([[r.generated[-1]] for r in rows], device=self.device)
        positions = torch.tensor([[len(r.prompt) + len(r.generated) - 1] for r in rows], device=self.device)
        mask = self._cache.grow()
        logits = self._forward(ids, self._rows_plan([r.model_adapter for r in rows]), self._cache.cache,
                               attention_mask=mask, position_ids=positions)
        self.stats.record_step(len(rows))
        for i, req in enumerate(rows):
            self._accept(req, logits[i])

    def _rows_plan(self, adapters: list[Choice]):
        """The decode steps' row plan, kept while the running rows and every adapter slot stay the same: the engine
        alone changes the model while it runs, and its adapters come and go through slots: a change to a slot of one of
        the plan's adapters makes it stale (others loading meanwhile do not).
        Saves re-deriving each layer's per-row layout at every step (~6% of a decode step on CPU)."""
        from ..adapters import row_plan

        kept = self._decode_plan
        if kept is not None and kept[0] == adapters and not kept[1].stale():
            return kept[1]
        plan = row_plan(self.model, adapters, trust_slots=True)
        self._decode_plan = (adapters, plan)
        return plan

    def _forward(self, ids, adapters, cache, **kwargs) -> torch.Tensor:
        """One forward with row i running adapters[i] (a list of choices, or a kept row plan)."""
        from ..adapters import adapter_rows, row_plan

        if not isinstance(adapters, rows.RowPlan):  # the engine's adapters change only through their slots
            adapters = row_plan(self.model, adapters, trust_slots=True)
        with adapter_rows(self.model, adapters):
            out = self.model(ids, use_cache=True, logits_to_keep=1, **{self._cache_kw: cache}, **kwargs)
        return out.logits[:, -1]

    def _accept(self, req: _Request, logits: torch.Tensor) -> None:
        """Sample the row's next token and send its text; set `done` when the row stops."""
        token = sample(logits, req.params, req.generator)
        req.generated.append(token)
        if req.params.logprobs:
            req.logprobs.append(token_logprob(logits, token))
        self.stats.completion_tokens += 1
        if token in self.eos_token_ids and not req.params.ignore_eos:
            req.done = "eos"
            return
        text, stopped = req.stream.push(token)
        full = len(req.generated) >= req.params.max_tokens or len(req.prompt) + len(req.generated) >= self.max_context
        req.done = "stop" if stopped else ("length" if full else None)
        if req.done is None:
            req.reported = len(req.generated)
            req.on_event(Event(text=text, tokens=1, token_ids=[token],
                               logprobs=req.logprobs[-1:] if req.params.logprobs else None))
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
        """Send the final event. `reason` "eos" (the end-of-sequence token) is reported as "stop", as OpenAI does;
        `Event.token_ids` then ends with that token."""
        self._unpin(req)
        text = req.tail + req.stream.flush() if reason in ("stop", "length", "eos") else ""
        start, req.reported = req.reported, len(req.generated)
        self.stats.record_finish("stop" if reason == "eos" else reason)
        req.on_event(Event(text=text, tokens=len(req.generated) - start, finish_reason=reason,
                           prompt_tokens=len(req.prompt), completion_tokens=len(req.generated), error=error,
                           token_ids=req.generated[start:], logprobs=req.logprobs[start:] if req.params.logprobs else None))

    def _unpin(self, req: _Request) -> None:
        if req.adapter is None:
            return
        if req.model_adapter is not None:
            mixes.release(self.adapters, req.adapter)
            req.model_adapter = None
        elif req.pinning is not None:  # still being pinned: give the pins back once they are taken
            pinning, req.pinning = req.pinning, None
            pinning.add_done_callback(lambda f: f.exception() is None and mixes.release(self.adapters, req.adapter))

    def _fail_all(self, message: str, reason: str = "error", waiting: bool = False) -> None:
        rows, self._rows = self._rows, []
        if self._prefill is not None:
            rows += self._prefill.requests
            self._prefill = None
        self._cache = BatchCache()
        if waiting:
            with self._cv:
                rows += list(self._waiting) + self._dropped
                self._waiting.clear()
                self._dropped = []
        for req in rows:
            self._finish(req, reason, error=message if reason == "error" else None)


def _choice_key(choice: Choice) -> tuple:
    """Orders rows by what they run: the base, then adapters by name, then mixes."""
    if choice is None:
        return (0, "")
    return (1, choice) if isinstance(choice, str) else (2, repr(choice))


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
