"""The server under bad input and at run time: 400s naming the field, 404/401/403/409/429/503, adapters added and
removed during traffic, eviction, disconnects and metrics."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from .conftest import KEY, metric, wait_for

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")


# --- bad input and safety ---------------------------------------------------------------------------


BAD_REQUESTS = [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {"prompt": "a"}, 400, "model"),
    ("/v1/completions", {"model": "llama"}, 400, "prompt"),
    ("/v1/completions", {"model": "llama", "prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"model": "llama", "prompt": []}, 400, "prompt"),
    ("/v1/completions", {"model": "llama", "prompt": [5, 500]}, 400, "prompt"),
    ("/v1/completions", {"model": "llama", "prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": "llama", "prompt": "a", "max_tokens": "3"}, 400, "max_tokens"),
    ("/v1/completions", {"model": "llama", "prompt": "a", "max_tokens": 1000}, 400, "max_tokens"),
    ("/v1/completions", {"model": "llama", "prompt": "a " * 200}, 400, "prompt"),
    ("/v1/completions", {"model": "llama", "prompt": "a", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"model": "llama", "prompt": "a", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": "llama", "prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/completions", {"model": "llama", "prompt": "a", "seed": "x"}, 400, "seed"),
    ("/v1/completions", {"model": "llama", "prompt": "a", "n": 0}, 400, "n"),
    ("/v1/completions", {"model": "llama", "prompt": "a", "echo": True}, 400, "echo"),
    ("/v1/completions", {"model": "llama", "prompt": "a", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("/v1/chat/completions", {"model": "llama", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "llama", "messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role"),
    ("/v1/chat/completions", {"model": "llama", "messages": [{"role": "user", "content": 3}]}, 400, "messages.0.content"),
    ("/v1/adapters", {"name": "x"}, 400, "path"),
    ("/v1/adapters", {"name": "has space", "path": "alpha"}, 400, "name"),
]


@pytest.mark.parametrize("path,body,status,param", BAD_REQUESTS)
def test_bad_requests_get_400_naming_the_field(server, path, body, status, param):
    r = server.http.post(path, content=body) if isinstance(body, bytes) else server.http.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["type"] == "invalid_request_error"
    if param:
        assert param.split(".")[0] in error["message"] or param == "prompt"


def test_unknown_model_is_404_naming_the_known_ones(server):
    with pytest.raises(openai.NotFoundError) as e:
        server.client.completions.create(model="delta", prompt="a", max_tokens=2)
    message = e.value.body["message"]
    assert "'delta'" in message and all(n in message for n in ("llama", "alpha", "beta"))
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    assert server.http.delete("/v1/adapters/delta").status_code == 404


def test_api_key_is_required(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.get(server.url + "/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.post(server.url + "/v1/adapters", json={"name": "x", "path": "y"}).status_code == 401
    assert httpx.get(server.url + "/health").json()["status"] == "ok"  # health checks need no key


@pytest.mark.parametrize("path,status,reason", [
    ("{root}/outside", 403, "outside"),
    ("{root}/adapters/sneaky", 403, "outside"),  # a symlink out of the root
    ("{root}/adapters/../outside", 403, "outside"),
    ("/etc", 403, "outside"),
    ("{root}/adapters/gpt2", 400, "another architecture"),
    ("{root}/adapters/junk", 400, "JSON"),
    ("{root}/adapters/missing", 400, "does not exist"),
])
def test_adapter_paths_outside_the_root_or_invalid_are_refused(server, serve_root, path, status, reason):
    r = server.http.post("/v1/adapters", json={"name": "newcomer", "path": path.format(root=serve_root)})
    assert r.status_code == status, r.text
    assert reason.lower() in r.json()["error"]["message"].lower() and r.json()["error"]["param"] == "path"
    assert "newcomer" not in [m.id for m in server.client.models.list().data]


def test_load_and_unload_adapters_during_traffic(server, serve_root, reference):
    stop = threading.Event()
    errors: list[str] = []

    def traffic(model):
        count = 0
        while not stop.is_set() or count < 2:
            r = server.http.post("/v1/completions", json={"model": model, "prompt": "the dog", "max_tokens": 6,
                                                          "temperature": 0})
            if r.status_code != 200 or r.json()["choices"][0]["text"] != reference(model, "the dog", 6):
                errors.append(f"{model}: {r.status_code} {r.text[:200]}")
            count += 1

    gamma = str(serve_root / "adapters" / "gamma")
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(traffic, m) for m in ("alpha", "beta")]
        try:
            for path in (gamma, "gamma", "./gamma/"):  # relative paths are taken from the adapter root
                r = server.http.post("/v1/adapters", json={"name": "gamma", "path": path})
                assert r.status_code == 201, r.text
                r = server.http.post("/v1/completions", json={"model": "gamma", "prompt": "the dog", "max_tokens": 6,
                                                              "temperature": 0})
                assert r.json()["choices"][0]["text"] == reference("gamma", "the dog", 6)
                deleted = server.http.delete("/v1/adapters/gamma").json()
                assert deleted == {"id": "gamma", "object": "model", "deleted": True}
                assert server.http.post("/v1/completions", json={"model": "gamma", "prompt": "a"}).status_code == 404
        finally:  # a failed assertion must not leave the traffic threads running
            stop.set()
        for f in futures:
            f.result()
    assert errors == []


def test_adding_a_loaded_adapter_again_copies_no_weight(server, serve_root):
    model = server.state.engine.model
    pointers = {n: p.data_ptr() for n, p in model.named_parameters()}
    r = server.http.post("/v1/adapters", json={"name": "alpha", "path": str(serve_root / "adapters" / "alpha")})
    assert r.status_code == 200, r.text
    for m in ("alpha", "beta", "llama", "alpha"):  # switching adapters between requests
        server.client.completions.create(model=m, prompt="a", max_tokens=2, temperature=0)
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == pointers
    r = server.http.post("/v1/adapters", json={"name": "alpha", "path": str(serve_root / "adapters" / "beta")})
    assert r.status_code == 409 and r.json()["error"]["param"] == "name"


def test_an_adapter_in_use_cannot_be_deleted(server):
    pool = ThreadPoolExecutor(1)
    with server.paused():  # the request holds its pin on alpha while it waits in the queue
        future = pool.submit(server.http.post, "/v1/completions", json={"model": "alpha", "prompt": "a", "max_tokens": 2})
        wait_for(lambda: server.metric("lorakit_queue_depth") == 1)
        r = server.http.delete("/v1/adapters/alpha")
        assert r.status_code == 409 and r.json()["error"]["code"] == "adapter_in_use"
    assert future.result().status_code == 200
    pool.shutdown()
    assert "alpha" in [m.id for m in server.client.models.list().data]


def test_evicted_adapters_reload_transparently(small_server, reference):
    client = small_server.client
    for model in ("alpha", "beta", "gamma", "alpha", "llama", "gamma"):
        r = client.completions.create(model=model, prompt="the dog", max_tokens=6, temperature=0)
        assert r.choices[0].text == reference(None if model == "llama" else model, "the dog", 6)
    assert small_server.metric("lorakit_adapters_loaded") == 1
    assert small_server.metric("lorakit_adapter_evictions_total") == 4
    assert small_server.metric("lorakit_adapter_loads_total") == 5


def test_loading_at_run_time_needs_an_adapter_root(small_server, serve_root):
    r = small_server.http.post("/v1/adapters", json={"name": "new", "path": str(serve_root / "adapters" / "alpha")})
    assert r.status_code == 403 and "--adapter-root" in r.json()["error"]["message"]


def test_a_full_queue_answers_429(server):
    rejected = server.metric("lorakit_rejected_total")
    pool = ThreadPoolExecutor(8)
    with server.paused():
        futures = [pool.submit(server.http.post, "/v1/completions", json={"model": "alpha", "prompt": "a", "max_tokens": 2})
                   for _ in range(8)]
        wait_for(lambda: server.metric("lorakit_queue_depth") == 8)
        r = server.http.post("/v1/completions", json={"model": "beta", "prompt": "a", "max_tokens": 2})
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
        with pytest.raises(openai.RateLimitError):
            server.client.chat.completions.create(model="llama", messages=[{"role": "user", "content": "a"}])
    assert [f.result().status_code for f in futures] == [200] * 8
    pool.shutdown()
    assert server.metric("lorakit_rejected_total") == rejected + 2
    # The refused request had pinned beta before it met the full queue: its pin was given back.
    assert server.http.delete("/v1/adapters/beta").status_code == 200
    beta = str(server.state.adapters.root / "beta")
    assert server.http.post("/v1/adapters", json={"name": "beta", "path": beta}).status_code == 201


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server, monkeypatch):
    engine = server.state.engine
    gate = threading.Event()
    decode = engine._decode

    def gated_decode():  # the first token comes from the prefill; decoding waits until the client has gone
        gate.wait(30)
        decode()

    monkeypatch.setattr(engine, "_decode", gated_decode)
    served = 'lorakit_http_requests_total{method="POST",route="/v1/completions",code="200"}'
    cancelled = 'lorakit_generations_total{finish_reason="cancelled"}'
    before = (metric(server, served), metric(server, cancelled), server.metric("lorakit_completion_tokens_total"))
    body = {"model": "beta", "prompt": "the cat", "max_tokens": 100, "temperature": 0, "stream": True}
    try:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}) as client:
            with client.stream("POST", "/v1/completions", json=body) as r:
                assert next(r.iter_lines()).startswith("data: ")
        wait_for(lambda: metric(server, served) == before[0] + 1)  # the server saw the hang-up
    finally:
        gate.set()
    wait_for(lambda: metric(server, cancelled) == before[1] + 1)
    assert server.metric("lorakit_batch_size") == 0
    assert server.metric("lorakit_completion_tokens_total") - before[2] <= 3  # not 100
    monkeypatch.undo()
    r = server.client.completions.create(model="beta", prompt="the cat", max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason == "length"


def test_metrics_count_requests_tokens_and_adapters(server):
    server.client.completions.create(model="alpha", prompt="a b", max_tokens=3, temperature=0)
    text = server.http.get("/metrics").text
    assert 'lorakit_http_requests_total{method="POST",route="/v1/completions",code="200"}' in text
    assert server.metric("lorakit_completion_tokens_total") >= 3
    assert server.metric("lorakit_prompt_tokens_total") >= 2
    assert server.metric("lorakit_adapters_registered") == 2
    assert server.metric("lorakit_adapters_loaded") >= 1
    for name in ("lorakit_queue_depth", "lorakit_batch_size"):
        assert f"# TYPE {name} gauge" in text


def test_cli_registers_serve():
    from lorakit.cli import build_parser
    from lorakit.errors import ConfigError
    from lorakit.serve.cli import parse_adapters, run_serve

    args = build_parser().parse_args(["serve", "--base", "m", "--adapters", "a=x", "b=y/z", "--max-batch", "2"])
    assert args.func is run_serve and args.max_batch == 2 and args.port == 8000 and args.host == "127.0.0.1"
    assert parse_adapters(args.adapters) == {"a": "x", "b": "y/z"}
    for bad in (["a"], ["=x"], ["a=x", "a=y"]):
        with pytest.raises(ConfigError):
            parse_adapters(bad)


