"""LoRAX / Text Generation Inference's API shapes: the request body (a bad field becomes a 400 naming it), TGI's
error body, and the response and stream-message objects, as the `lorax-client` package reads them."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .api_models import APIError, _FieldError
from .jobs import Event

# Our finish reasons -> TGI's
FINISH = {"length": "length", "eos": "eos_token", "stop": "stop_sequence"}
DEFAULT_MAX_NEW_TOKENS = 20  # TGI's


class TGIError(APIError):
    """An error answered with TGI's body, {"error": message, "error_type": kind}, which lorax-client turns into
    its own exception types (validation, overloaded, generation)."""

    KINDS = {400: "validation", 403: "validation", 404: "validation", 422: "validation", 429: "overloaded",
             503: "overloaded"}

    def body(self) -> dict[str, Any]:
        return {"error": self.message, "error_type": self.KINDS.get(self.status, "generation")}

    @classmethod
    def of(cls, e: APIError) -> "TGIError":
        return cls(e.status, e.message, e.type, e.param, e.code, e.headers)


class Parameters(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    adapter_id: str | None = None
    adapter_source: str | None = None
    api_token: str | None = None  # for downloads from a hub: nothing to do with local adapters
    do_sample: bool = False
    max_new_tokens: int | None = Field(None, ge=1)
    ignore_eos_token: bool = False
    return_full_text: bool = False
    stop: list[str] = Field(default_factory=list, max_length=4)
    seed: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    truncate: int | None = Field(None, ge=1)
    details: bool = False
    decoder_input_details: bool = False
    # Accepted only at their neutral values (lorax-client sends them all):
    merged_adapters: Any = None
    repetition_penalty: float | None = None
    top_k: int | None = None
    typical_p: float | None = None
    best_of: int | None = None
    watermark: bool = False
    return_k_alternatives: int | None = None
    response_format: Any = None

    @model_validator(mode="after")
    def _unsupported(self):
        neutral = {"merged_adapters": (None,), "repetition_penalty": (None, 1.0), "top_k": (None, 0),
                   "typical_p": (None, 1.0), "best_of": (None, 1), "watermark": (False,),
                   "return_k_alternatives": (None,), "response_format": (None,)}
        for name, values in neutral.items():
            if getattr(self, name) not in values:
                raise _FieldError(f"parameters.{name}", f"parameters.{name} is not supported by this server")
        return self

    def sampling(self) -> tuple[float, float]:
        """(temperature, top_p); temperature 0 is greedy. As TGI: sampling when do_sample, or when temperature or
        top_p is set to something other than their neutral values."""
        temperature = 1.0 if self.temperature is None else self.temperature
        top_p = 1.0 if self.top_p is None else self.top_p
        sampling = self.do_sample or temperature != 1.0 or top_p < 1.0
        return (temperature if sampling else 0.0), top_p


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    inputs: str = Field(min_length=1)
    parameters: Parameters = Field(default_factory=Parameters)
    stream: bool = False


class Generation:
    """Collects one request's events; shapes TGI's response, details and stream messages."""

    def __init__(self, tokenizer, prompt: list[int], params: Parameters, seed: int | None):
        self.tokenizer, self.prompt, self.params, self.seed = tokenizer, prompt, params, seed
        self.special = set(getattr(tokenizer, "all_special_ids", []) or [])
        self.text = ""
        self.tokens: list[dict[str, Any]] = []
        self.finish: str | None = None
        self.error: str | None = None

    @property
    def done(self) -> bool:
        return self.finish is not None

    def add(self, index: int, event: Event) -> list[dict[str, Any]]:
        """Take an event; returns the tokens it brought (TGI's token objects). A token's text is what the text grew
        by at that token (stop strings hold text back), so the tokens' texts add up to generated_text."""
        self.text += event.text
        logprobs = event.logprobs or [0.0] * len(event.token_ids)
        new = [{"id": t, "text": "", "logprob": lp, "special": t in self.special}
               for t, lp in zip(event.token_ids, logprobs)]
        if new:
            new[-1]["text"] = event.text
        self.tokens += new
        if event.finish_reason == "error":
            self.error = event.error or "unknown error"
        if event.finish_reason is not None:
            self.finish = event.finish_reason
        return new

    def generated_text(self) -> str:
        if self.params.return_full_text:
            return self.tokenizer.decode(self.prompt, skip_special_tokens=True) + self.text
        return self.text

    def details(self, stream: bool = False) -> dict[str, Any]:
        out = {"finish_reason": FINISH.get(self.finish, "length"), "prompt_tokens": len(self.prompt),
               "generated_tokens": len(self.tokens), "seed": self.seed}
        if stream:
            return out
        prefill = ([{"id": t, "text": self.tokenizer.decode([t]), "logprob": None} for t in self.prompt]
                   if self.params.decoder_input_details else [])
        return {**out, "prefill": prefill, "tokens": self.tokens, "best_of_sequences": None}

    def response(self) -> dict[str, Any]:
        return {"generated_text": self.generated_text(), "details": self.details() if self.params.details else None}

    def messages(self, new: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Stream messages for the tokens an event brought; the last message of the request carries the text."""
        out = [{"token": tok, "generated_text": None, "details": None} for tok in new]
        if self.done and out:
            out[-1]["generated_text"] = self.generated_text()
            out[-1]["details"] = self.details(stream=True) if self.params.details else None
        return out
