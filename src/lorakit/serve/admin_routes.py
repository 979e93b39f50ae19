"""The server's own routes: /health, /metrics, /v1/models, and adding, listing and removing adapters at run time."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse

from ..errors import AdapterExistsError, AdapterFileError, AdapterNotFoundError, IncompatibleAdapterError
from .api_models import AdapterRequest, APIError, parse
from .context import ServerState, check_rank
from .metrics import metrics_text
from .store import AdapterInUseError, AdapterPathError, AdapterStore, StoreFullError


def add_admin_routes(app: FastAPI, state: ServerState, auth: list) -> None:
    @app.get("/health")
    async def health():
        ok = state.engine.alive
        return JSONResponse({"status": "ok" if ok else "engine stopped", "running": state.engine.running,
                             "queued": state.engine.queue_depth}, status_code=200 if ok else 503)

    @app.get("/metrics", dependencies=auth)
    async def metrics():
        return PlainTextResponse(metrics_text(state), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=auth)
    async def models():
        base = {"id": state.base_name, "object": "model", "created": state.created, "owned_by": "lorakit",
                "root": state.base_name, "parent": None}
        return {"object": "list", "data": [base] + [
            {"id": n, "object": "model", "created": state.created, "owned_by": "lorakit", "root": n,
             "parent": state.base_name} for n in state.adapters.names()]}

    @app.get("/v1/adapters", dependencies=auth)
    async def list_adapters():
        """Registered adapters, which are loaded now, and the directories skipped at registration with the reason."""
        loaded = set(state.adapters.loaded())
        return {"object": "list",
                "data": [{"id": n, "loaded": n in loaded} for n in state.adapters.names()],
                "broken": [{"id": n, "reason": why} for n, why in sorted(state.adapters.broken.items())]}

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
        check_rank(store, name, max_lora_rank)
        store.release(store.acquire(name))
    except BaseException:
        store.unregister(name)
        raise
    return True


