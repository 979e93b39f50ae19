"""Running an HTTP request's generations: pin its adapter, or each adapter of its mix (loading it off the engine
thread and off the event loop), submit the jobs, and receive the engine's events on the event loop. Shared by the
OpenAI and the LoRAX/TGI routes."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Callable

from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from ..errors import AdapterNotFoundError, LorakitError
from .api_models import APIError
from .context import ServerState
from .engine import EngineStoppedError, Handle, QueueFullError
from . import mixes
from .jobs import Choice, Event, Job
from .store import AdapterStore, StoreFullError


async def submit(state: ServerState, adapter: Choice, jobs: list[Job]) -> list[Handle]:
    """Pin `adapter` (each adapter of a mix) once per job, loading it if needed, and queue the jobs; the engine
    releases each pin."""
    pins: list[str] = []  # filled by pin() as it goes, so a request cancelled meanwhile gives back what it got
    try:
        if adapter is not None:
            model_names = await run_in_threadpool(pin_all, state.adapters, adapter, len(jobs), pins)
            for job in jobs:
                job.pinned = mixes.on_model(adapter, model_names)
        return state.engine.submit_many(jobs)
    except BaseException as e:
        for model_name in pins:
            state.adapters.release(model_name)
        if isinstance(e, QueueFullError):
            raise APIError(429, str(e), type="rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": "1"}) from None
        if isinstance(e, EngineStoppedError):
            raise APIError(503, str(e), type="server_error", code="server_unavailable") from None
        raise


def pin_all(store: AdapterStore, choice: Choice, count: int, pins: list[str]) -> dict[str, str]:
    """pin() for each adapter of `choice`; {store name: model name}."""
    model_names = {}
    for name in mixes.adapters_of(choice):
        pin(store, name, count, pins)
        model_names[name] = pins[-1]
    return model_names


def pin(store: AdapterStore, name: str, count: int, pins: list[str]) -> None:
    """Append `count` pins on adapter `name` to `pins` (loading it if needed); the caller releases them."""
    try:
        for _ in range(count):
            pins.append(store.acquire(name))
    except AdapterNotFoundError:  # unregistered since the request named it
        raise APIError(404, f"the model {name!r} does not exist; known models: {', '.join(store.names())}",
                       param="model", code="model_not_found") from None
    except StoreFullError as e:
        raise APIError(503, str(e), type="server_error", code="adapter_store_full", headers={"Retry-After": "1"}) from None
    except LorakitError as e:  # e.g. its files changed since it was registered
        raise APIError(500, f"adapter {name!r} could not be loaded: {e}", type="server_error") from None


def sink(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, index: int):
    def on_event(event: Event) -> None:  # called on the engine thread
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server is shutting down
            loop.call_soon_threadsafe(queue.put_nowait, (index, event))

    return on_event


async def collect(request: Request, queue: asyncio.Queue, handles: list[Handle], add: Callable[[int, Event], None],
                  done: Callable[[], bool]) -> bool:
    """Feed the engine's events to `add` until `done()`; False when the client went away first. The rows are
    cancelled on the way out (a no-op for finished ones)."""
    try:
        while not done():
            try:
                index, event = await asyncio.wait_for(queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return False
                continue
            add(index, event)
    finally:
        for h in handles:
            h.cancel()
    return True


def encode_prompt(state: ServerState, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        ids = state.tokenizer(prompt)["input_ids"]
        if not ids and state.tokenizer.bos_token_id is not None:
            ids = [state.tokenizer.bos_token_id]
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        return list(ids)
    vocab = state.engine.vocab_size
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"token id {bad[0]} is out of range; this model's vocabulary has ids 0..{vocab - 1}", param="prompt")
    return list(prompt)
