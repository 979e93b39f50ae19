"""The HTTP server: one base and many adapters behind OpenAI's API (openai_routes.py), LoRAX/TGI's API
(lorax_routes.py) and the server's own routes (admin_routes.py).

All generation goes through one `Engine` (continuous batching); the handlers only parse, tokenize,
submit, and turn the engine's events into responses or server-sent events.
"""

from __future__ import annotations

import contextlib
import os
import sys

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import AdapterExistsError
from .admin_routes import add_admin_routes
from .api_models import APIError
from .context import ServerState, authorizer, check_rank
from .engine import Engine
from .lorax_routes import add_lorax_routes
from .metrics import CountRequests
from .openai_routes import add_openai_routes
from .store import AdapterStore


def create_app(base, *, tokenizer=None, adapters: dict[str, str] | None = None, adapter_root: str | os.PathLike | None = None,
               api_key: str | None = None, max_batch: int = 8, max_queue: int = 64, base_name: str | None = None,
               dtype: str | None = None, max_loaded: int | None = None, max_bytes: int | None = None,
               max_lora_rank: int | None = None, register_root: bool = False, prefill_tokens: int = 128,
               device=None) -> FastAPI:
    """The server app for `base` (a model directory, or a loaded model plus `tokenizer`) and named adapter directories.

    `adapter_root`: every adapter, named here or loaded by `POST /v1/adapters`, must lie inside it; without
    it, loading at run time is refused. `max_loaded`/`max_bytes` cap the adapters kept on the base (LRU);
    `max_lora_rank` refuses adapters of a higher rank (vLLM's flag). `device` (auto, cpu, cuda, cuda:N): where a
    directory's model runs; a model passed in runs where it is. `register_root`: also register every adapter directory under `adapter_root` by its relative path; broken
    ones are skipped, printed with the reason and listed by GET /v1/adapters. `prefill_tokens`: tokens per
    prefill forward at most. The engine thread starts and stops with the app.
    """
    model, tokenizer, base_name = _load_base(base, tokenizer, base_name, dtype, device)
    engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue, prefill_tokens=prefill_tokens)
    # The store changes the model only under the engine's lock, i.e. between decode steps.
    store = AdapterStore(model, root=adapter_root, max_loaded=max_loaded, max_bytes=max_bytes, model_lock=engine.model_lock)
    for name, path in (adapters or {}).items():
        if name == base_name:
            raise AdapterExistsError(f"adapter name {name!r} is the base model's name; pick another")
        store.register(name, path)  # checked now, loaded on first use
        check_rank(store, name, max_lora_rank)
    if register_root:
        for name, why in store.register_root().items():
            print(f"lorakit serve: skipped adapter {name!r}: {why}", file=sys.stderr)
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
    app.add_middleware(CountRequests, counter=state.http_requests)
    _add_error_handlers(app)
    auth = [Depends(authorizer(state))]
    add_admin_routes(app, state, auth)
    add_openai_routes(app, state, auth)
    add_lorax_routes(app, state, auth)
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
