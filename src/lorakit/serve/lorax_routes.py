"""LoRAX / TGI's API, so the `lorax-client` package (and TGI clients) work against `lorakit serve` unchanged:
`POST /generate`, `POST /generate_stream` and TGI's root `POST /` ({"inputs", "parameters", "stream"}).

`parameters.adapter_id` names a registered adapter (or, with `adapter_source: "local"`, a directory under the
adapter root, registered on first use) or a weighted mix of registered ones (`code:0.6+chat:0.4`); only local
adapters are served. Outputs are the OpenAI routes' for
the same prompt, adapter and sampling settings.
"""

from __future__ import annotations

import asyncio
import json
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse

from ..errors import LorakitError
from .api_models import APIError, parse
from .context import ServerState
from .generation import collect, encode_prompt, sink, submit
from .jobs import Job
from .mixes import Choice
from .lorax_models import DEFAULT_MAX_NEW_TOKENS, GenerateRequest, Generation, Parameters, TGIError
from .sampling import SamplingParams
from .store import AdapterPathError


def add_lorax_routes(app: FastAPI, state: ServerState, auth: list) -> None:
    @app.post("/", dependencies=auth)
    async def root(request: Request):  # TGI's compatible route: a list of one response, or a stream
        return await _handle(request, state, stream=None, as_list=True)

    @app.post("/generate", dependencies=auth)
    async def generate(request: Request):
        return await _handle(request, state, stream=False, as_list=False)

    @app.post("/generate_stream", dependencies=auth)
    async def generate_stream(request: Request):
        return await _handle(request, state, stream=True, as_list=False)


async def _handle(request: Request, state: ServerState, stream: bool | None, as_list: bool):
    try:
        body = parse(GenerateRequest, await request.body())
        stream = body.stream if stream is None else stream
        params = body.parameters
        adapter = await _resolve(state, params)
        prompt = encode_prompt(state, body.inputs)
        if params.truncate is not None:
            prompt = prompt[-params.truncate:]
        sampling = _sampling(state, params, prompt, logprobs=stream or params.details)
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        handles = await submit(state, adapter, [Job(prompt, sampling, sink(loop, queue, 0), adapter)])
    except APIError as e:
        raise TGIError.of(e) from None
    gen = Generation(state.tokenizer, prompt, params, sampling.seed)
    if stream:
        return StreamingResponse(_stream(gen, queue, handles), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    if not await collect(request, queue, handles, gen.add, lambda: gen.done):
        return JSONResponse({}, status_code=499)
    if gen.error:
        raise TGIError(500, f"generation failed: {gen.error}")
    return [gen.response()] if as_list else gen.response()


async def _resolve(state: ServerState, params: Parameters) -> Choice:
    """The adapter `adapter_id` names (None: the base), or the weighted mix it writes (`code:0.6+chat:0.4`)."""
    if params.adapter_source not in (None, "local"):
        raise APIError(400, f"adapter_source={params.adapter_source!r}: this server only serves local adapters (names "
                       "it has registered, or directories under its --adapter-root with adapter_source='local'); "
                       "download the adapter and register it", param="parameters.adapter_source")
    name = params.adapter_id
    if not name:
        return None
    try:
        return state.choose(name, param="parameters.adapter_id")
    except APIError as e:  # not a registered name, nor a mix of them
        if e.status != 404 or params.adapter_source != "local" or state.adapters.root is None or "+" in name:
            raise
    try:  # a directory under the root: registered on first use, under its path
        await run_in_threadpool(state.adapters.register, name, name)
    except AdapterPathError as e:
        raise APIError(403, str(e), param="parameters.adapter_id") from None
    except LorakitError as e:
        raise APIError(400, f"not a valid adapter for this base: {e}", param="parameters.adapter_id") from None
    return name


def _sampling(state: ServerState, params: Parameters, prompt: list[int], logprobs: bool) -> SamplingParams:
    room = state.engine.max_context - len(prompt)
    if room < 1:
        raise APIError(400, f"the inputs have {len(prompt)} tokens; this model's context is {state.engine.max_context} "
                       "tokens", param="inputs")
    if params.max_new_tokens is not None and params.max_new_tokens > room:
        raise APIError(400, f"this model's context is {state.engine.max_context} tokens: the inputs have {len(prompt)} "
                       f"tokens, so max_new_tokens can be at most {room}, got {params.max_new_tokens}",
                       param="parameters.max_new_tokens")
    temperature, top_p = params.sampling()
    return SamplingParams(max_tokens=params.max_new_tokens or min(DEFAULT_MAX_NEW_TOKENS, room), temperature=temperature,
                          top_p=top_p, stop=tuple(s for s in params.stop if s), seed=params.seed, logprobs=logprobs,
                          ignore_eos=params.ignore_eos_token)


async def _stream(gen: Generation, queue: asyncio.Queue, handles) -> AsyncIterator[str]:
    try:
        while not gen.done:
            index, event = await queue.get()
            new = gen.add(index, event)
            if gen.error:
                yield _sse(TGIError(500, f"generation failed: {gen.error}").body())
                break
            for message in gen.messages(new):
                yield _sse(message)
    finally:  # also runs when the client disconnects: the engine drops the row at its next step
        for h in handles:
            h.cancel()


def _sse(obj) -> str:
    return f"data:{json.dumps(obj, separators=(',', ':'))}\n\n"
