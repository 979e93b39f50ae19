"""The OpenAI API's shapes: request bodies as pydantic models (a bad field becomes a 400 naming it), the error
body, and the response and streaming-chunk objects."""

from __future__ import annotations

import json
import time
import uuid
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

if TYPE_CHECKING:
    from .jobs import Event

MAX_CHOICES = 16  # n × prompts per request; each is a row in the batch


class APIError(Exception):
    """An error the server answers with OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class MixPart(BaseModel):
    """One adapter of a weighted mix in the `adapters` field's list form."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(min_length=1)
    weight: float = 1.0


class _Request(BaseModel):
    # Unknown fields are ignored, as OpenAI's own clients send fields a server may not know (e.g. `user`).
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    # A weighted mix of adapters ({name: weight} or [{"name", "weight"}]); `model` then names the base (mixes.py).
    adapters: dict[str, float] | list[MixPart] | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: Any = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        return tuple(s for s in stops if s)

    @model_validator(mode="after")
    def _unsupported(self):
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0.0:
                raise _FieldError(name, f"{name} is not supported by this server; leave it at 0")
        if self.logprobs not in (None, False, 0):
            raise _FieldError("logprobs", "logprobs are not supported by this server")
        return self

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be an empty list")
        if isinstance(v, list) and isinstance(v[0], list) and any(not p for p in v):
            raise ValueError("each list of token ids must hold at least one token")
        return v

    @model_validator(mode="after")
    def _unsupported_completion(self):
        if self.echo:
            raise _FieldError("echo", "echo is not supported by this server")
        if self.best_of not in (None, 1):
            raise _FieldError("best_of", "best_of is not supported by this server; use n")
        if self.suffix:
            raise _FieldError("suffix", "suffix is not supported by this server")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list: each a text or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Any] | None = None

    @model_validator(mode="after")
    def _unsupported_chat(self):
        if self.tools:
            raise _FieldError("tools", "tool calling is not supported by this server")
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self


class AdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_\-:]+$")
    path: str = Field(min_length=1)


class _FieldError(ValueError):
    """Raised inside a validator for a field other than the one being validated."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param, self.message = param, message


def parse(model: type[BaseModel], body: bytes) -> BaseModel:
    """Validate a JSON body; any problem becomes a 400 APIError whose `param` names the field."""
    try:
        return model.model_validate_json(body or b"")
    except ValidationError as e:
        raise _to_api_error(e) from None


def _to_api_error(e: ValidationError) -> APIError:
    err = e.errors(include_url=False)[0]
    ctx_error = (err.get("ctx") or {}).get("error")
    if isinstance(ctx_error, _FieldError):
        return APIError(400, ctx_error.message, param=ctx_error.param)
    if err["type"] == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {err['msg']}")
    if err["type"] == "model_type":
        return APIError(400, "the request body must be a JSON object")
    loc = [str(x) for x in err["loc"] if not _is_type_name(x)]
    param = ".".join(loc) or None
    if err["type"] == "missing":
        return APIError(400, f"{param} is required", param=param)
    msg = err["msg"].removeprefix("Value error, ")
    if len({str(x['loc'][0]) for x in e.errors() if x['loc']}) == 1 and len(e.errors()) > 1 and loc:
        msg = _union_message(loc[0]) or msg
    return APIError(400, f"invalid {param}: {msg}", param=param)


def _is_type_name(part) -> bool:
    return isinstance(part, str) and (part.startswith(("list[", "str", "int", "float", "bool", "dict[")) or part[:1].isupper())


def _union_message(field: str) -> str | None:
    return {
        "prompt": "prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids",
        "stop": "stop must be a string or a list of at most 4 strings",
        "messages": "each message needs a role (system, user, assistant) and content as a string or a list of text parts",
        "adapters": 'adapters must be {"name": weight, ...} or [{"name": ..., "weight": ...}, ...] with numbers as weights',
    }.get(field)


# --- responses ----------------------------------------------------------------------------------


def sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


class Reply:
    """Collects the engine's events for one HTTP request and shapes OpenAI's response and chunk objects."""

    def __init__(self, model: str, chat: bool, prompts: list[list[int]], n: int):
        self.model, self.chat, self.n = model, chat, n
        self.choices = len(prompts) * n
        self.prompt_tokens = sum(len(p) for p in prompts)  # a prompt counts once, however many choices share it
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.text = [""] * self.choices
        self.tokens = [0] * self.choices
        self.finish: list[str | None] = [None] * self.choices
        self.error: str | None = None

    @property
    def all_done(self) -> bool:
        return self.error is not None or all(f is not None for f in self.finish)

    def add(self, index: int, event: Event) -> None:
        self.text[index] += event.text
        self.tokens[index] += event.tokens
        if event.finish_reason == "error":
            self.error = event.error or "unknown error"
        if event.finish_reason is not None:  # OpenAI says "stop" for the end-of-sequence token too
            self.finish[index] = "stop" if event.finish_reason == "eos" else event.finish_reason

    def usage(self) -> dict[str, int]:
        completion = sum(self.tokens)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def _envelope(self, choices: list[dict], chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def full(self) -> dict[str, Any]:
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": self.text[i]}, "logprobs": None,
                        "finish_reason": self.finish[i]} for i in range(self.choices)]
        else:
            choices = [{"index": i, "text": self.text[i], "logprobs": None, "finish_reason": self.finish[i]}
                       for i in range(self.choices)]
        return {**self._envelope(choices, False), "usage": self.usage()}

    def chunk(self, index: int, delta, finish_reason: str | None) -> dict[str, Any]:
        if self.chat:
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": delta, "logprobs": None, "finish_reason": finish_reason}
        return self._envelope([choice], True)

    def usage_chunk(self) -> dict[str, Any]:
        return {**self._envelope([], True), "usage": self.usage()}
