"""What the HTTP handlers share: the engine, the adapter store, the tokenizer, the base's name, the API key check."""

from __future__ import annotations

import collections
import secrets
import time

from fastapi import Request

from ..compose.mixture import is_mixture_dir, mixture_config
from ..errors import IncompatibleAdapterError
from ..io import read_adapter_config
from . import mixes
from .api_models import APIError
from .engine import Engine
from .store import AdapterStore


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

    def choose(self, model: str, adapters=None, param: str = "model") -> mixes.Choice:
        """What a request runs: the base (None), one adapter, or a weighted mix, from its `model` string (a name or
        `name:w+name:w`) or its `adapters` field (then `model` must name the base)."""
        names = self.adapters.names()
        if adapters is not None:
            if model != self.base_name:
                raise APIError(400, f"with an adapters field, model must be the base model's name {self.base_name!r}, "
                               f"got {model!r}; or write the mix in model instead ({mixes.SYNTAX})", param="model",
                               code="invalid_mix")
            choice = mixes.from_field(adapters, self.base_name, names)
            param = "adapters"
        else:
            choice = mixes.parse_model(model, self.base_name, names, param)
        limit = self.adapters.max_loaded
        if isinstance(choice, tuple) and limit is not None and len(choice) > limit:
            raise APIError(400, f"{param} mixes {len(choice)} adapters, but this server keeps at most {limit} loaded at "
                           "once (--max-loaded); mix fewer", param=param, code="invalid_mix")
        return choice


def authorizer(state: ServerState):
    """A FastAPI dependency that requires `Authorization: Bearer KEY` when the server has a key."""

    def authorize(request: Request) -> None:
        if state.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), state.api_key.encode()):
            raise APIError(401, "missing or wrong API key; send 'Authorization: Bearer KEY'", type="authentication_error",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    return authorize


def check_rank(store: AdapterStore, name: str, limit: int | None) -> None:
    """vLLM's --max-lora-rank: an adapter of a higher rank is refused, with its rank (the caller unregisters it)."""
    if limit is None:
        return
    path = store.path(name)
    experts = mixture_config(path).experts if is_mixture_dir(path) else {None: path}
    for expert, directory in experts.items():  # a mixture's experts each have their own rank
        config = read_adapter_config(directory)
        rank = max([config.r, *config.rank_pattern.values()])
        if rank > limit:
            which = f"adapter {name!r}" + (f" (its expert {expert!r})" if expert is not None else "")
            raise IncompatibleAdapterError(f"{which} has rank {rank}, above --max-lora-rank {limit}; raise the "
                                           "limit or serve an adapter of lower rank")
