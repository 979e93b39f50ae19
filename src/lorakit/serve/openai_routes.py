"""OpenAI's API: /v1/completions and /v1/chat/completions (with server-sent events), over the shared engine."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..chat import has_template, prompt_ids
from ..errors import ChatTemplateError
from .api_models import MAX_CHOICES, APIError, ChatRequest, CompletionRequest, Reply, parse, sse
from .context import ServerState
from .generation import collect, encode_prompt, sink, submit
from .jobs import Job
from .mixes import Choice
from .sampling import SamplingParams


DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions (chat: up to the context)


def add_openai_routes(app: FastAPI, state: ServerState, auth: list) -> None:
    @app.post("/v1/completions", dependencies=auth)
    async def completions(request: Request):
        body = parse(CompletionRequest, await request.body())
        adapter = state.choose(body.model, body.adapters)
        prompts = [encode_prompt(state, p) for p in body.prompts()]
        return await _generate(request, state, body, adapter, prompts, chat=False)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(request: Request):
        body = parse(ChatRequest, await request.body())
        adapter = state.choose(body.model, body.adapters)
        prompt = _encode_chat(state, body)
        return await _generate(request, state, body, adapter, [prompt], chat=True)


def _encode_chat(state: ServerState, body: ChatRequest) -> list[int]:
    """The tokenizer's chat template when it has one, else a plain "role: content" transcript."""
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    if has_template(state.tokenizer):  # the tokens `lorakit train` builds for the same conversation
        try:
            return prompt_ids(state.tokenizer, messages)
        except ChatTemplateError as e:
            raise APIError(400, str(e), param="messages") from None
    text = "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
    return encode_prompt(state, text)


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


async def _generate(request: Request, state: ServerState, body, adapter: Choice, prompts: list[list[int]], chat: bool):
    n = body.n
    if len(prompts) * n > MAX_CHOICES:
        raise APIError(400, f"{len(prompts)} prompts × n={n} is more than {MAX_CHOICES} choices per request", param="n")
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()
    jobs = [Job(prompt, _sampling(state, body, prompt, None if body.seed is None else body.seed + p * n + j),
                sink(loop, queue, p * n + j), adapter)
            for p, prompt in enumerate(prompts) for j in range(n)]
    handles = await submit(state, adapter, jobs)
    reply = Reply(body.model, chat, prompts, n)
    if body.stream:
        return StreamingResponse(_stream(reply, queue, handles, body.include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    if not await collect(request, queue, handles, reply.add, lambda: reply.all_done):
        return JSONResponse({}, status_code=499)
    if reply.error:
        raise APIError(500, f"generation failed: {reply.error}", type="server_error")
    return reply.full()


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
                yield sse(reply.chunk(index, delta, reply.finish[index]))
        if include_usage:
            yield sse(reply.usage_chunk())
        yield "data: [DONE]\n\n"
    finally:  # also runs when the client disconnects: the engine drops the rows at its next step
        for h in handles:
            h.cancel()


