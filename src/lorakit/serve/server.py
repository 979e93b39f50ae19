"""The HTTP server: OpenAI's completions/chat/models API over one base and many adapters, plus adapter admin.

All generation goes through one `Engine` (continuous batching); the handlers only parse, tokenize,
submit, and turn the engine's events into OpenAI responses or server-sent events.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import secrets
import time
from typing import AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..chat import has_template, prompt_ids
from ..errors import (
    AdapterExistsError,
    AdapterFileError,
    AdapterNotFoundError,
    ChatTemplateError,
    IncompatibleAdapterError,
    LorakitError,
)
from ..io import read_adapter_config
from .api_models import MAX_CHOICES, AdapterRequest, APIError, ChatRequest, CompletionRequest, Reply, parse, sse
from .engine import Engine, EngineStoppedError, Event, Job, QueueFullError, SamplingParams
from .store import AdapterInUseError, AdapterPathError, AdapterStore, StoreFullError


DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions (chat: up to the context)


class ServerState:
    """What the handlers share: the engine, the adapters, the tokenizer, the base's name and HTTP counters."""

    def __init__(self, engine: Engine, adapters: AdapterStore, tokenizer, base_name: str, api_key: str | None,
                 max_lora_rank: int | None = None):
        self.engine, self.adapters, self.tokenizer = engine, adapters, tokenizer
        self.base_name, self.api_key, self.max_lora_rank = base_name, api_key, max_lora_rank
        self.created = int(time.time())
        self.http_requests: collections.Counter[tuple[str, str, int]] = collections.Counter()

    def resolve(self, model: str) -> str | None:
        """The adapter a `model` field names (None for the base); a 404 listing the known names otherwise."""
        if model == self.base_name:
            return None
        names = self.adapters.names()
        if model in names:
            return model
        raise APIError(404, f"the model {model!r} does not exist; known models: {', '.join([self.base_name, *names])}",
                       param="model", code="model_not_found")


def create_app(base, *, tokenizer=None, adapters: dict[str, str] | None = None, adapter_root: str | os.PathLike | None = None,
               api_key: str | None = None, max_batch: int = 8, max_queue: int = 64, base_name: str | None = None,
               dtype: str | None = None, max_loaded: int | None = None, max_bytes: int | None = None,
               max_lora_rank: int | None = None, device=None) -> FastAPI:
    """The server app for `base` (a model directory, or a loaded model plus `tokenizer`) and named adapter directories.

    `adapter_root`: every adapter, named here or loaded by `POST /v1/adapters`, must lie inside it; without
    it, loading at run time is refused. `max_loaded`/`max_bytes` cap the adapters kept on the base (LRU);
    `max_lora_rank` refuses adapters of a higher rank. `device` (auto, cpu, cuda, cuda:N): where a directory's
    model runs; a model passed in runs where it is.
    The engine thread starts and stops with the app.
    """
    model, tokenizer, base_name = _load_base(base, tokenizer, base_name, dtype, device)
    engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue)
    # The store changes the model only under the engine's lock, i.e. between decode steps.
    store = AdapterStore(model, root=adapter_root, max_loaded=max_loaded, max_bytes=max_bytes, model_lock=engine.model_lock)
    for name, path in (adapters or {}).items():
        if name == base_name:
            raise AdapterExistsError(f"adapter name {name!r} is the base model's name; pick another")
        store.register(name, path)  # checked now, loaded on first use
        _check_rank(store, name, max_lora_rank)
    engine.adapters = store
    state = ServerState(engine, store, tokenizer, base_name, api_key, max_lora_rank)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            await run_in_threadpool(engine.stop)

    app = FastAPI(title="lorakit", lifespan=lifespan)
    app.state.lorakit = state
    app.add_middleware(_CountRequests, counter=state.http_requests)
    _add_error_handlers(app)
    _add_routes(app, state)
    return app


def _load_base(base, tokenizer, base_name, dtype, device):
    from torch import nn

    from ..device import model_device, resolve_device
    from ..errors import ConfigError

    if isinstance(base, nn.Module):
        if tokenizer is None:
            raise ValueError("create_app(model) needs tokenizer=...; or pass the base model's directory")
        if device is not None and resolve_device(device) != model_device(base):  # a model is served where it is
            raise ConfigError(f"create_app(model, device={str(device)!r}): the model is on {model_device(base)}; move "
                              "it first (model.to(device)), or pass the base model's directory with device=")
        return base, tokenizer, base_name or getattr(base.config, "_name_or_path", "") or "base"
    from ..hf import load_base_model, load_tokenizer

    path = os.fspath(base)
    model = load_base_model(path, dtype=dtype).to(resolve_device(device)).eval()
    tok = tokenizer if tokenizer is not None else load_tokenizer(path)
    return model, tok, base_name or os.path.basename(os.path.normpath(path))


# --- routes --------------------------------------------------------------------------------------


def _add_routes(app: FastAPI, state: ServerState) -> None:
    def authorize(request: Request) -> None:
        if state.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), state.api_key.encode()):
            raise APIError(401, "missing or wrong API key; send 'Authorization: Bearer KEY'", type="authentication_error",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    auth = [Depends(authorize)]

    @app.get("/health")
    async def health():
        ok = state.engine.alive
        return JSONResponse({"status": "ok" if ok else "engine stopped", "running": state.engine.running,
                             "queued": state.engine.queue_depth}, status_code=200 if ok else 503)

    @app.get("/metrics", dependencies=auth)
    async def metrics():
        return PlainTextResponse(_metrics_text(state), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=auth)
    async def models():
        base = {"id": state.base_name, "object": "model", "created": state.created, "owned_by": "lorakit",
                "root": state.base_name, "parent": None}
        return {"object": "list", "data": [base] + [
            {"id": n, "object": "model", "created": state.created, "owned_by": "lorakit", "root": n,
             "parent": state.base_name} for n in state.adapters.names()]}

    @app.post("/v1/completions", dependencies=auth)
    async def completions(request: Request):
        body = parse(CompletionRequest, await request.body())
        adapter = state.resolve(body.model)
        prompts = [_encode_prompt(state, p) for p in body.prompts()]
        return await _generate(request, state, body, adapter, prompts, chat=False)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(request: Request):
        body = parse(ChatRequest, await request.body())
        adapter = state.resolve(body.model)
        prompt = _encode_chat(state, body)
        return await _generate(request, state, body, adapter, [prompt], chat=True)

    @app.post("/v1/adapters", dependencies=auth)
    async def add_adapter(request: Request):
        body = parse(AdapterRequest, await request.body())
        if body.name == state.base_name:
            raise APIError(400, f"{body.name!r} is the base model's name; pick another adapter name", param="name")
        if state.adapters.root is None:
            raise APIError(403, "loading adapters at run time is off; start the server with --adapter-root DIR",
                           type="permission_error", param="path", code="adapter_loading_disabled")
        try:
            created = await run_in_threadpool(_register_and_load, state.adapters, body.name, body.path,
                                              state.max_lora_rank)
        except AdapterPathError as e:
            raise APIError(403, str(e), type="permission_error", param="path", code="adapter_path_forbidden") from None
        except AdapterExistsError as e:
            raise APIError(409, str(e), param="name", code="adapter_exists") from None
        except StoreFullError as e:
            raise APIError(503, str(e), type="server_error", code="adapter_store_full", headers={"Retry-After": "1"}) from None
        except (AdapterFileError, IncompatibleAdapterError) as e:
            raise APIError(400, f"not a valid adapter for this base: {e}", param="path", code="invalid_adapter") from None
        card = {"id": body.name, "object": "model", "created": state.created, "owned_by": "lorakit",
                "root": body.name, "parent": state.base_name}
        return JSONResponse(card, status_code=201 if created else 200)

    @app.delete("/v1/adapters/{name}", dependencies=auth)
    async def delete_adapter(name: str):
        if name == state.base_name:
            raise APIError(400, "the base model cannot be removed", param="name")
        try:
            await run_in_threadpool(state.adapters.unregister, name)
        except AdapterNotFoundError:
            state.resolve(name)  # raises the 404 with the known names
        except AdapterInUseError as e:
            raise APIError(409, str(e), param="name", code="adapter_in_use", headers={"Retry-After": "1"}) from None
        return {"id": name, "object": "model", "deleted": True}


def _register_and_load(store: AdapterStore, name: str, path: str, max_lora_rank: int | None = None) -> bool:
    """Register and load now, so that the client learns at once whether the adapter works on this base.
    Returns False when `name` was already registered for the same directory (nothing is loaded or copied)."""
    if not store.register(name, path):
        return False
    try:
        _check_rank(store, name, max_lora_rank)
        store.release(store.acquire(name))
    except BaseException:
        store.unregister(name)
        raise
    return True


def _check_rank(store: AdapterStore, name: str, limit: int | None) -> None:
    """vLLM's --max-lora-rank: an adapter of a higher rank is refused, with its rank (the caller unregisters it)."""
    if limit is None:
        return
    config = read_adapter_config(store.path(name))
    rank = max([config.r, *config.rank_pattern.values()])
    if rank > limit:
        raise IncompatibleAdapterError(f"adapter {name!r} has rank {rank}, above --max-lora-rank {limit}; raise the "
                                       "limit or serve an adapter of lower rank")


# --- prompts -------------------------------------------------------------------------------------


def _encode_prompt(state: ServerState, prompt: str | list[int]) -> list[int]:
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


def _encode_chat(state: ServerState, body: ChatRequest) -> list[int]:
    """The tokenizer's chat template when it has one, else a plain "role: content" transcript."""
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    if has_template(state.tokenizer):  # the tokens `lorakit train` builds for the same conversation
        try:
            return prompt_ids(state.tokenizer, messages)
        except ChatTemplateError as e:
            raise APIError(400, str(e), param="messages") from None
    text = "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
    return _encode_prompt(state, text)


def _sampling(state: ServerState, body, prompt: list[int], seed: int | None) -> SamplingParams:
    limit = state.engine.max_context
    room = limit - len(prompt)
    if room < 1:
        raise APIError(400, f"the prompt has {len(prompt)} tokens; this model's context is {limit} tokens",
                       param="messages" if isinstance(body, ChatRequest) else "prompt", code="context_length_exceeded")
    if body.max_tokens is not None and body.max_tokens > room:
        raise APIError(400, f"this model's context is {limit} tokens: the prompt has {len(prompt)} tokens, so "
                       f"max_tokens can be at most {room}, got {body.max_tokens}", param="max_tokens",
                       code="context_length_exceeded")
    default = room if isinstance(body, ChatRequest) else min(DEFAULT_COMPLETION_TOKENS, room)
    return SamplingParams(max_tokens=body.max_tokens or default, temperature=body.temperature, top_p=body.top_p,
                          stop=body.stop or (), seed=seed)


# --- generation ----------------------------------------------------------------------------------


async def _generate(request: Request, state: ServerState, body, adapter: str | None, prompts: list[list[int]], chat: bool):
    n = body.n
    if len(prompts) * n > MAX_CHOICES:
        raise APIError(400, f"{len(prompts)} prompts × n={n} is more than {MAX_CHOICES} choices per request", param="n")
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()
    jobs = [Job(prompt, _sampling(state, body, prompt, None if body.seed is None else body.seed + p * n + j),
                _sink(loop, queue, p * n + j), adapter)
            for p, prompt in enumerate(prompts) for j in range(n)]
    pins: list[str] = []  # filled by _pin as it goes, so a request cancelled meanwhile gives back what it got
    try:
        if adapter is not None:  # pin (and load) here, off the engine thread; the engine releases each pin
            await run_in_threadpool(_pin, state.adapters, adapter, len(jobs), pins)
            for job in jobs:
                job.pinned = pins[0]
        handles = state.engine.submit_many(jobs)
    except BaseException as e:
        for _ in pins:
            state.adapters.release(adapter)
        if isinstance(e, QueueFullError):
            raise APIError(429, str(e), type="rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": "1"}) from None
        if isinstance(e, EngineStoppedError):
            raise APIError(503, str(e), type="server_error", code="server_unavailable") from None
        raise
    reply = Reply(body.model, chat, prompts, n)
    if body.stream:
        return StreamingResponse(_stream(reply, queue, handles, body.include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        while not reply.all_done:
            try:
                index, event = await asyncio.wait_for(queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return JSONResponse({}, status_code=499)
                continue
            reply.add(index, event)
    finally:
        for h in handles:  # no-op for finished ones; frees the rows of a client that went away
            h.cancel()
    if reply.error:
        raise APIError(500, f"generation failed: {reply.error}", type="server_error")
    return reply.full()


def _pin(store: AdapterStore, name: str, count: int, pins: list[str]) -> None:
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


def _sink(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, index: int):
    def on_event(event: Event) -> None:  # called on the engine thread
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server is shutting down
            loop.call_soon_threadsafe(queue.put_nowait, (index, event))

    return on_event


async def _stream(reply: "Reply", queue: asyncio.Queue, handles, include_usage: bool) -> AsyncIterator[str]:
    try:
        if reply.chat:
            for i in range(reply.choices):
                yield sse(reply.chunk(i, {"role": "assistant", "content": ""}, None))
        while not reply.all_done:
            index, event = await queue.get()
            reply.add(index, event)
            if event.finish_reason == "error":
                yield sse(APIError(500, f"generation failed: {event.error}", type="server_error").body())
                break
            if event.text or event.finish_reason:
                delta = {"content": event.text} if reply.chat and event.text else ({} if reply.chat else event.text)
                yield sse(reply.chunk(index, delta, event.finish_reason))
        if include_usage:
            yield sse(reply.usage_chunk())
        yield "data: [DONE]\n\n"
    finally:  # also runs when the client disconnects: the engine drops the rows at its next step
        for h in handles:
            h.cancel()


# --- errors and counters -------------------------------------------------------------------------


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(e.status_code, str(e.detail), type=kind).body(), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        err = e.errors()[0]
        param = ".".join(str(x) for x in err["loc"][1:]) or None
        return JSONResponse(APIError(400, f"invalid {param}: {err['msg']}", param=param).body(), status_code=400)


_ROUTES = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/adapters")


class _CountRequests:
    """ASGI middleware counting responses by route and status (a plain ASGI wrapper keeps streaming and
    client disconnects untouched, unlike BaseHTTPMiddleware)."""

    def __init__(self, app, counter: collections.Counter):
        self.app, self.counter = app, counter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope["path"]
            route = path if path in _ROUTES else ("/v1/adapters/{name}" if path.startswith("/v1/adapters/") else "other")
            self.counter[(scope["method"], route, status)] += 1


def _metrics_text(state: ServerState) -> str:
    """Prometheus' text format, written by hand: a handful of counters and gauges need no client library."""
    e, s = state.engine, state.engine.stats
    lines: list[str] = []

    def metric(name: str, kind: str, help: str, samples: list[tuple[str, float]]):
        lines.append(f"# HELP {name} {help}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f"{name}{labels} {value:g}" for labels, value in samples)

    metric("lorakit_http_requests_total", "counter", "HTTP requests by method, route and status code",
           [(f'{{method="{m}",route="{r}",code="{c}"}}', v) for (m, r, c), v in sorted(state.http_requests.items())])
    metric("lorakit_generations_total", "counter", "Finished generations (one per choice) by finish reason",
           [(f'{{finish_reason="{k}"}}', v) for k, v in sorted(s.finished.items())])
    metric("lorakit_rejected_total", "counter", "Requests refused because the queue was full", [("", s.rejected)])
    metric("lorakit_prompt_tokens_total", "counter", "Prompt tokens prefilled", [("", s.prompt_tokens)])
    metric("lorakit_completion_tokens_total", "counter", "Tokens generated", [("", s.completion_tokens)])
    metric("lorakit_queue_depth", "gauge", "Requests waiting for a place in the batch", [("", e.queue_depth)])
    metric("lorakit_batch_size", "gauge", "Rows in the running batch now", [("", e.running)])
    metric("lorakit_batch_size_max", "gauge", "Largest batch a decode step has run", [("", s.max_batch_seen)])
    metric("lorakit_decode_steps_total", "counter", "Decode steps run", [("", s.steps)])
    metric("lorakit_decode_rows_total", "counter", "Rows summed over decode steps (mean batch = rows / steps)",
           [("", s.batch_rows)])
    metric("lorakit_adapters_registered", "gauge", "Adapters the server can serve", [("", len(state.adapters.names()))])
    store = state.adapters.stats()
    metric("lorakit_adapters_loaded", "gauge", "Adapters whose weights are on the base now", [("", store.loaded)])
    metric("lorakit_adapters_loaded_bytes", "gauge", "Bytes of the loaded adapters", [("", store.loaded_bytes)])
    metric("lorakit_adapter_loads_total", "counter", "Adapter loads (first use, or use after eviction)", [("", store.loads)])
    metric("lorakit_adapter_evictions_total", "counter", "Adapters evicted to make room", [("", store.evictions)])
    return "\n".join(lines) + "\n"
