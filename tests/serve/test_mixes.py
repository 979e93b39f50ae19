"""Weighted mixes per request: `"model": "alpha:0.6+beta:0.4"`, the `adapters` field or LoRAX's `adapter_id` give
the tokens of the `cat`-combined adapter served by name, alone or in a busy batch beside other adapters; each adapter
of a mix is pinned like one adapter; bad mixes get a clear 4xx."""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import lorakit

from .conftest import completion_text, wait_for

pytest.importorskip("openai")
pytest.importorskip("uvicorn")

MIX = {"alpha": 0.6, "beta": 0.4}
NEGATIVE = {"beta": 1.0, "alpha": -0.5}


@pytest.fixture(scope="module")
def combined(serve_root):
    """The mixes as adapters of their own (PEFT's `cat`: ΔW = Σ wᵢ·ΔWᵢ), saved under the adapter root."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(serve_root / "llama").eval()
    for name in MIX:
        lorakit.load_adapter(model, serve_root / "adapters" / name, adapter=name)
    for name, weights in (("mix", MIX), ("negative", NEGATIVE)):
        lorakit.combine_adapters(model, weights, method="cat", name=name, activate=False)
        lorakit.save_adapter(model, serve_root / "adapters" / name, adapter=name)
    return {"mix": "mix", "negative": "negative"}


@pytest.fixture(scope="module")
def mix_server(server, combined):
    for name in combined:
        assert server.http.post("/v1/adapters", json={"name": name, "path": name}).status_code in (200, 201)
    return server


text = functools.partial(completion_text, max_tokens=10)


def pins(server) -> dict[str, int]:
    return {name: e.pins for name, e in server.state.adapters._entries.items()}


def test_a_mix_in_model_equals_the_combined_adapter_served_by_name(mix_server):
    for prompt in ("hello world the cat", "a small green mat and"):
        want = text(mix_server, "mix", prompt)
        assert text(mix_server, "alpha:0.6+beta:0.4", prompt) == want
        assert text(mix_server, "beta:0.4 + alpha:0.6", prompt) == want  # order and spaces do not matter
        assert text(mix_server, "beta:1+alpha:-0.5", prompt) == text(mix_server, "negative", prompt)
    assert text(mix_server, "mix", "the dog") != text(mix_server, "alpha", "the dog") != text(mix_server, "beta", "the dog")
    assert text(mix_server, "alpha:1", "the dog") == text(mix_server, "alpha", "the dog")  # a mix of one at weight 1
    assert all(n == 0 for n in pins(mix_server).values())  # every pin of every mix was given back


def test_the_adapters_field_and_chat(mix_server):
    want = text(mix_server, "mix", "the big red dog")
    assert text(mix_server, "llama", "the big red dog", adapters=MIX) == want
    listed = [{"name": "alpha", "weight": 0.6}, {"name": "beta", "weight": 0.4}]
    assert text(mix_server, "llama", "the big red dog", adapters=listed) == want
    messages = [{"role": "user", "content": "hello world"}]
    chat = {m: mix_server.client.chat.completions.create(model=m, messages=messages, max_tokens=6, temperature=0)
            for m in ("mix", "alpha:0.6+beta:0.4")}
    assert chat["mix"].choices[0].message.content == chat["alpha:0.6+beta:0.4"].choices[0].message.content
    assert chat["alpha:0.6+beta:0.4"].model == "alpha:0.6+beta:0.4"
    r = mix_server.client.chat.completions.create(model="llama", messages=messages, max_tokens=6, temperature=0,
                                                  extra_body={"adapters": MIX})
    assert r.choices[0].message.content == chat["mix"].choices[0].message.content
    # The openai client's streaming and n work for a mix as for any model.
    n = mix_server.client.completions.create(model="alpha:0.6+beta:0.4", prompt="the cat", n=2, max_tokens=5, temperature=0)
    assert [c.text for c in n.choices] == [text(mix_server, "mix", "the cat", max_tokens=5)] * 2
    chunks = list(mix_server.client.completions.create(model="alpha:0.6+beta:0.4", prompt="the cat", max_tokens=5,
                                                       temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == n.choices[0].text


def test_the_mix_equals_a_plain_greedy_loop_with_weighted_active_adapters(mix_server, serve_root):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(serve_root / "llama").eval()
    for name in MIX:
        lorakit.load_adapter(model, serve_root / "adapters" / name, adapter=name)
    lorakit.set_active(model, MIX)
    tok = mix_server.state.tokenizer
    ids = tok("small blue mat")["input_ids"]
    with torch.no_grad():
        for _ in range(8):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    want = tok.decode(ids, skip_special_tokens=True)[len(tok.decode(ids[:-8], skip_special_tokens=True)):]
    assert text(mix_server, "alpha:0.6+beta:0.4", "small blue mat", max_tokens=8) == want


def test_mixes_in_a_busy_batch_equal_each_request_alone(mix_server):
    jobs = [(m, "hello world") for m in ("alpha:0.6+beta:0.4", "alpha", "llama", "beta:1+alpha:-0.5")]
    jobs += [(m, "the big red dog runs") for m in ("alpha:0.3+beta:0.7", "beta", "alpha:0.6+beta:0.4", "llama")]
    alone = [text(mix_server, m, p, max_tokens=12) for m, p in jobs]
    pool = ThreadPoolExecutor(len(jobs))
    with mix_server.paused():  # queue them all first (max_queue=8), so the engine runs them in shared batches
        futures = [pool.submit(text, mix_server, m, p, max_tokens=12) for m, p in jobs]
        wait_for(lambda: mix_server.state.engine.queue_depth == len(jobs))
    together = [f.result() for f in futures]
    pool.shutdown()
    assert together == alone
    assert all(n == 0 for n in pins(mix_server).values())


def test_a_mix_loads_and_pins_each_adapter(mix_server, serve_root):
    """gamma is under the root but not registered: a mix cannot name it until it is; then the mix loads it on first
    use, and while a request runs the mix, each of its adapters is pinned (gamma cannot be removed)."""
    r = mix_server.http.post("/v1/completions", json={"model": "gamma:0.5+alpha:0.5", "prompt": "a", "max_tokens": 2})
    assert r.status_code == 404 and "'gamma'" in r.json()["error"]["message"]
    store = mix_server.state.adapters
    store.register("gamma", serve_root / "adapters" / "gamma")  # registered, not loaded
    assert "gamma" not in store.loaded()
    first = text(mix_server, "gamma:0.5+alpha:0.5", "the cat", max_tokens=3)
    assert "gamma" in store.loaded()
    pool = ThreadPoolExecutor(1)
    with mix_server.paused():
        future = pool.submit(text, mix_server, "gamma:0.5+alpha:0.5", "the cat", max_tokens=3)
        wait_for(lambda: mix_server.state.engine.queue_depth == 1)
        assert pins(mix_server)["gamma"] == 1 and pins(mix_server)["alpha"] == 1
        r = mix_server.http.delete("/v1/adapters/gamma")
        assert r.status_code == 409 and r.json()["error"]["code"] == "adapter_in_use"
    assert future.result() == first
    pool.shutdown()
    assert all(n == 0 for n in pins(mix_server).values())
    assert mix_server.http.delete("/v1/adapters/gamma").status_code == 200


def test_lorax_adapter_id_carries_a_mix(mix_server):
    body = {"inputs": "hello world", "parameters": {"adapter_id": "alpha:0.6+beta:0.4", "max_new_tokens": 6}}
    r = mix_server.http.post("/generate", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["generated_text"] == text(mix_server, "mix", "hello world", max_tokens=6)
    r = mix_server.http.post("/generate", json={"inputs": "a", "parameters": {"adapter_id": "alpha:0.5+nope:0.5",
                                                                               "adapter_source": "local"}})
    assert r.status_code == 404 and r.json()["error_type"] == "validation" and "'nope'" in r.json()["error"]
    r = mix_server.http.post("/generate", json={"inputs": "a", "parameters": {"adapter_id": "alpha:x+beta:1"}})
    assert r.status_code == 400 and "name:weight+name:weight" in r.json()["error"]


@pytest.mark.parametrize("body, status, words", [
    ({"model": "alpha:0.6+nope:0.4"}, 404, ["'nope'", "known models: llama, alpha, beta"]),
    ({"model": "alpha:0.6+beta:heavy"}, 400, ["'heavy'", "not a number", "name:weight+name:weight"]),
    ({"model": "alpha:x"}, 400, ["'x'", "not a number"]),
    ({"model": "alpha:0.6+"}, 400, ["empty part", "name:weight+name:weight"]),
    ({"model": ":0.5+beta:0.5"}, 400, ["no adapter name"]),
    ({"model": "alpha:nan+beta:0.4"}, 400, ["finite"]),
    ({"model": "alpha:inf"}, 400, ["finite"]),
    ({"model": "alpha:1e999+beta:1"}, 400, ["finite"]),
    ({"model": "alpha:0.5+alpha:0.5"}, 400, ["twice"]),
    ({"model": "llama:0.5+alpha:0.5"}, 400, ["base model"]),
    ({"model": "nope:model"}, 404, ["'nope:model'"]),
    ({"model": "llama", "adapters": {}}, 400, ["empty mix"]),
    ({"model": "llama", "adapters": []}, 400, ["empty mix"]),
    ({"model": "llama", "adapters": {"alpha": "0.5"}}, 400, ["adapters must be"]),
    ({"model": "llama", "adapters": {"nope": 1.0}}, 404, ["'nope'"]),
    ({"model": "llama", "adapters": [{"name": "alpha", "weight": 0.5, "extra": 1}]}, 400, ["adapters"]),
    ({"model": "alpha", "adapters": {"beta": 0.5}}, 400, ["base model's name 'llama'"]),
])
def test_bad_mixes_get_a_clear_4xx(server, body, status, words):
    r = server.http.post("/v1/completions", json={"prompt": "a", "max_tokens": 2, **body})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    for word in words:
        assert word in error["message"], error
    assert error["param"].startswith(("model", "adapters")), error


def test_non_finite_weights_in_the_adapters_field(server):
    r = server.http.post("/v1/completions", content=b'{"model": "llama", "prompt": "a", "adapters": {"alpha": NaN}}')
    assert r.status_code == 400 and "finite" in r.json()["error"]["message"]


def test_a_mix_larger_than_the_store_is_refused(small_server):
    """max_loaded=1: a mix of two adapters could never be pinned at once, so it is a 400, not a retry forever."""
    r = small_server.http.post("/v1/completions", json={"model": "alpha:0.5+beta:0.5", "prompt": "a", "max_tokens": 2})
    assert r.status_code == 400 and "at most 1" in r.json()["error"]["message"]
