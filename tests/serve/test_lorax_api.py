"""LoRAX / TGI's API: the real `lorax-client` package (in its own virtual environment) against `lorakit serve`,
with the same outputs as the OpenAI routes; TGI's routes and error bodies through httpx; a full slot pool → 503."""

from __future__ import annotations

import json
import subprocess
import textwrap
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from .conftest import KEY, wait_for
from .lorax_client import client_python

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

# Runs inside the lorax-client environment: each call's result (or exception type and message) as JSON.
CLIENT = textwrap.dedent('''
    import json, sys
    from lorax import Client
    url, key, calls = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    client = Client(url, headers={"Authorization": "Bearer " + key}, timeout=60)
    out = []
    for kind, prompt, kwargs in calls:
        try:
            if kind == "generate":
                r = client.generate(prompt, **kwargs)
                out.append({"text": r.generated_text, "details": r.details.model_dump(mode="json") if r.details else None})
            else:
                tokens, last = [], None
                for m in client.generate_stream(prompt, **kwargs):
                    tokens.append(m.token.model_dump(mode="json"))
                    last = m
                out.append({"tokens": tokens, "text": last.generated_text,
                            "details": last.details.model_dump(mode="json") if last.details else None})
        except Exception as e:
            out.append({"error": type(e).__name__, "message": str(e)})
    print(json.dumps(out))
''')


@pytest.fixture(scope="module")
def lorax_python():
    python, why = client_python()
    if python is None:
        pytest.skip(why)
    return python


def run_client(python, server, calls):
    done = subprocess.run([str(python), "-c", CLIENT, server.url, KEY, json.dumps(calls)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def openai_text(server, model, prompt, **kw):
    return server.client.completions.create(model=model, prompt=prompt, **kw).choices[0].text


def test_lorax_client_gets_the_openai_routes_outputs(server, lorax_python):
    prompt = "the big red dog"
    greedy = {m: openai_text(server, m, prompt, max_tokens=8, temperature=0) for m in ("llama", "alpha", "beta")}
    sampled = openai_text(server, "alpha", prompt, max_tokens=8, temperature=0.9, top_p=0.8, seed=5)
    stop_word = greedy["beta"].split()[3]
    results = run_client(lorax_python, server, [
        ("generate", prompt, {"adapter_id": "alpha", "max_new_tokens": 8}),
        ("generate", prompt, {"max_new_tokens": 8}),
        ("stream", prompt, {"adapter_id": "beta", "max_new_tokens": 8}),
        ("generate", prompt, {"adapter_id": "alpha", "max_new_tokens": 8, "do_sample": True, "temperature": 0.9,
                              "top_p": 0.8, "seed": 5}),
        ("generate", prompt, {"adapter_id": "beta", "max_new_tokens": 8, "stop_sequences": [stop_word]}),
        ("generate", prompt, {"adapter_id": "alpha", "adapter_source": "hub", "max_new_tokens": 8}),
        ("generate", prompt, {"adapter_id": "delta", "max_new_tokens": 8}),
    ])
    alpha, base, stream, sample, stop, hub, unknown = results
    assert alpha["text"] == greedy["alpha"] and base["text"] == greedy["llama"]
    details = alpha["details"]
    assert (details["finish_reason"], details["prompt_tokens"], details["generated_tokens"]) == ("length", 4, 8)
    assert "".join(t["text"] for t in details["tokens"]) == greedy["alpha"]
    assert all(t["logprob"] <= 0 and not t["special"] for t in details["tokens"])
    assert stream["text"] == greedy["beta"] == "".join(t["text"] for t in stream["tokens"])
    assert len(stream["tokens"]) == 8 and stream["details"]["finish_reason"] == "length"
    assert sample["text"] == sampled
    assert stop["text"] == greedy["beta"][: greedy["beta"].index(stop_word)]
    assert stop["details"]["finish_reason"] == "stop_sequence"
    assert hub["error"] == "ValidationError" and "only serves local adapters" in hub["message"]  # a 400
    assert unknown["error"] == "ValidationError" and "'delta'" in unknown["message"]


def test_tgi_routes_and_error_bodies(server):
    body = {"inputs": "hello world", "parameters": {"adapter_id": "beta", "max_new_tokens": 5}}
    one = server.http.post("/generate", json=body)
    assert one.status_code == 200 and one.json()["details"] is None
    assert one.json()["generated_text"] == openai_text(server, "beta", "hello world", max_tokens=5, temperature=0)
    assert server.http.post("/", json=body).json() == [one.json()]  # TGI's root route answers a list
    full = server.http.post("/generate", json={**body, "parameters": {**body["parameters"], "return_full_text": True,
                                                                        "decoder_input_details": True, "details": True}})
    assert full.json()["generated_text"] == "hello world" + one.json()["generated_text"]
    assert [t["id"] for t in full.json()["details"]["prefill"]] == server.state.tokenizer("hello world")["input_ids"]
    with server.http.stream("POST", "/", json={**body, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream") and len(lines) == 5
    assert json.loads(lines[-1][5:])["generated_text"] == one.json()["generated_text"]
    for params, field in [({"top_k": 5}, "top_k"), ({"max_new_tokens": 0}, "max_new_tokens"),
                          ({"adapter_source": "s3", "adapter_id": "x"}, "adapter_source")]:
        r = server.http.post("/generate", json={"inputs": "a", "parameters": params})
        assert r.status_code == 400 and r.json()["error_type"] == "validation" and field in r.json()["error"], r.text
    assert server.http.post("/generate", json={"parameters": {}}).status_code == 400
    assert httpx.post(server.url + "/generate", json=body).status_code == 401


def test_a_local_adapter_directory_is_registered_on_first_use(server):
    r = server.http.post("/generate", json={"inputs": "the dog", "parameters": {
        "adapter_id": "gamma", "adapter_source": "local", "max_new_tokens": 6}})
    assert r.status_code == 200, r.text
    assert r.json()["generated_text"] == openai_text(server, "gamma", "the dog", max_tokens=6, temperature=0)
    assert server.http.delete("/v1/adapters/gamma").status_code == 200
    r = server.http.post("/generate", json={"inputs": "a", "parameters": {"adapter_id": "../outside",
                                                                          "adapter_source": "local"}})
    assert r.status_code == 403 and "outside" in r.json()["error"]


def test_a_pool_full_of_pinned_adapters_answers_503_with_a_retry_hint(small_server):
    """max_loaded=1: while a queued request pins alpha, a request for beta cannot load (not a hang: a 503)."""
    small_server.client.completions.create(model="alpha", prompt="a", max_tokens=1)  # loaded before the pause
    pool = ThreadPoolExecutor(1)
    with small_server.paused():
        future = pool.submit(small_server.http.post, "/v1/completions", json={"model": "alpha", "prompt": "a",
                                                                            "max_tokens": 2})
        wait_for(lambda: small_server.state.engine.queue_depth == 1)
        r = small_server.http.post("/v1/completions", json={"model": "beta", "prompt": "a", "max_tokens": 2})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "adapter_store_full" and "retry" in r.json()["error"]["message"]
        r = small_server.http.post("/generate", json={"inputs": "a", "parameters": {"adapter_id": "beta"}})
        assert r.status_code == 503 and r.json()["error_type"] == "overloaded" and r.headers["retry-after"] == "1"
    assert future.result().status_code == 200
    pool.shutdown()
