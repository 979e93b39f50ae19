"""Counters for /metrics: an ASGI middleware counting responses by route and status, and Prometheus' text format."""

from __future__ import annotations

import collections

from .context import ServerState


_ROUTES = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/adapters", "/",
           "/generate", "/generate_stream")


class CountRequests:
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


def metrics_text(state: ServerState) -> str:
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
    metric("lorakit_prefills_total", "counter", "Prefill groups run (several prompts in one forward)", [("", s.prefills)])
    metric("lorakit_prefill_rows_total", "counter", "Prompts summed over prefill groups (mean group = rows / prefills)",
           [("", s.prefill_rows)])
    metric("lorakit_adapters_registered", "gauge", "Adapters the server can serve", [("", len(state.adapters.names()))])
    metric("lorakit_adapters_broken", "gauge", "Adapter directories skipped at registration (GET /v1/adapters lists why)",
           [("", len(state.adapters.broken))])
    store = state.adapters.stats()
    metric("lorakit_adapters_loaded", "gauge", "Adapters whose weights are on the base now", [("", store.loaded)])
    metric("lorakit_adapters_loaded_bytes", "gauge", "Bytes of the loaded adapters", [("", store.loaded_bytes)])
    metric("lorakit_adapter_loads_total", "counter", "Adapter loads (first use, or use after eviction)", [("", store.loads)])
    metric("lorakit_adapter_evictions_total", "counter", "Adapters evicted to make room", [("", store.evictions)])
    return "\n".join(lines) + "\n"
