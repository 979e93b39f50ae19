"""OpenAI's API end to end through the `openai` client: outputs equal a plain greedy loop, alone or in a busy batch."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from .conftest import wait_for

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")


# --- the API --------------------------------------------------------------------------------------


def test_models_lists_the_base_and_the_adapters(server):
    models = server.client.models.list().data
    assert [m.id for m in models][:3] == ["llama", "alpha", "beta"]
    assert all(m.parent == "llama" for m in models[1:])


@pytest.mark.parametrize("model", ["llama", "alpha", "beta"])
def test_greedy_completion_equals_a_plain_greedy_loop(server, reference, model):
    r = server.client.completions.create(model=model, prompt="hello world the cat", max_tokens=10, temperature=0)
    adapter = None if model == "llama" else model
    assert r.choices[0].text == reference(adapter, "hello world the cat", 10)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (4, 10, 14)
    assert r.model == model and r.object == "text_completion"


def test_adapters_change_the_output(server):
    texts = {m: server.client.completions.create(model=m, prompt="the dog", max_tokens=8, temperature=0).choices[0].text
             for m in ("llama", "alpha", "beta")}
    assert len(set(texts.values())) == 3


def test_prompt_forms_text_list_and_token_ids(server):
    tok = server.state.tokenizer
    ids = tok("big red dog")["input_ids"]
    one = server.client.completions.create(model="alpha", prompt="big red dog", max_tokens=6, temperature=0)
    by_ids = server.client.completions.create(model="alpha", prompt=ids, max_tokens=6, temperature=0)
    many = server.client.completions.create(model="alpha", prompt=["big red dog", "a cat"], max_tokens=6, temperature=0)
    many_ids = server.client.completions.create(model="alpha", prompt=[ids, tok("a cat")["input_ids"]], max_tokens=6,
                                                temperature=0)
    assert by_ids.choices[0].text == one.choices[0].text
    assert [c.index for c in many.choices] == [0, 1]
    assert many.choices[0].text == one.choices[0].text
    assert [c.text for c in many_ids.choices] == [c.text for c in many.choices]
    assert (many.usage.prompt_tokens, many.usage.completion_tokens) == (5, 12)
    n = server.client.completions.create(model="alpha", prompt=["big red dog", "a cat"], n=2, max_tokens=6, temperature=0)
    assert [c.text for c in n.choices] == [many.choices[0].text] * 2 + [many.choices[1].text] * 2
    assert [c.index for c in n.choices] == [0, 1, 2, 3] and n.usage.prompt_tokens == 5
    chunks = list(server.client.completions.create(model="alpha", prompt=["big red dog", "a cat"], max_tokens=6,
                                                   temperature=0, stream=True))
    for i in (0, 1):
        assert "".join(c.choices[0].text for c in chunks if c.choices[0].index == i) == many.choices[i].text


def test_stop_sequence_cuts_the_text_and_finishes_with_stop(server):
    full = server.client.completions.create(model="beta", prompt="small blue mat", max_tokens=12, temperature=0)
    words = full.choices[0].text.split()
    stop = words[5]
    cut = full.choices[0].text[: full.choices[0].text.index(stop)]
    r = server.client.completions.create(model="beta", prompt="small blue mat", max_tokens=12, temperature=0,
                                         stop=[stop, "never-produced"])
    assert r.choices[0].text == cut
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == words.index(stop) + 1  # the stop token itself was generated
    streamed = server.client.completions.create(model="beta", prompt="small blue mat", max_tokens=12, temperature=0,
                                                stop=stop, stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(server):
    def sample(seed, model="alpha"):
        return server.client.completions.create(model=model, prompt="the cat sat", max_tokens=12, temperature=1.0,
                                                top_p=0.9, seed=seed).choices[0].text

    first = sample(7)
    with ThreadPoolExecutor(4) as pool:  # the same seed inside a busy batch gives the same tokens
        results = list(pool.map(lambda i: sample(7) if i % 2 == 0 else sample(i, "beta"), range(8)))
    assert results[::2] == [first] * 4
    assert len({sample(s) for s in (1, 2, 3)} | {first}) > 1


def test_chat_without_template_joins_roles(server):
    messages = [{"role": "system", "content": "the cat"}, {"role": "user", "content": "hello world"}]
    r = server.client.chat.completions.create(model="beta", messages=messages, max_tokens=7, temperature=0)
    # The word tokenizer knows no role names or ":", so they read as <unk>: 3 roles, 3 colons, 4 words.
    plain = server.client.completions.create(model="beta", prompt="system: the cat\nuser: hello world\nassistant:",
                                             max_tokens=7, temperature=0)
    assert r.choices[0].message.content == plain.choices[0].text
    assert r.choices[0].message.role == "assistant" and r.object == "chat.completion"
    assert r.usage.prompt_tokens == plain.usage.prompt_tokens == 10


def test_chat_uses_the_tokenizers_template(server):
    tok = server.state.tokenizer
    tok.chat_template = "{% for m in messages %}{{ m.content }} and {% endfor %}{% if add_generation_prompt %}the{% endif %}"
    try:
        r = server.client.chat.completions.create(
            model="alpha", messages=[{"role": "user", "content": [{"type": "text", "text": "red dog"}]}],
            max_tokens=5, temperature=0)
    finally:
        tok.chat_template = None
    plain = server.client.completions.create(model="alpha", prompt="red dog and the", max_tokens=5, temperature=0)
    assert r.choices[0].message.content == plain.choices[0].text


def test_streaming_chunks_add_up_and_end_with_done(server):
    full = server.client.completions.create(model="alpha", prompt="green mat", max_tokens=9, temperature=0)
    chunks = list(server.client.completions.create(model="alpha", prompt="green mat", max_tokens=9, temperature=0,
                                                   stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 9
    chat = list(server.client.chat.completions.create(model="beta", messages=[{"role": "user", "content": "dog"}],
                                                      max_tokens=6, temperature=0, stream=True))
    assert chat[0].choices[0].delta.role == "assistant"
    assert chat[-1].choices[0].finish_reason == "length"
    assert all(c.object == "chat.completion.chunk" for c in chat)
    with server.http.stream("POST", "/v1/completions", json={"model": "llama", "prompt": "a", "max_tokens": 3,
                                                              "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    assert json.loads(lines[0][6:])["object"] == "text_completion"


def test_a_request_alone_equals_the_same_request_in_a_busy_mixed_batch(server):
    jobs = [(m, p) for p in ("hello world", "the big red dog runs", "cat", "a small green mat and")
            for m in ("llama", "alpha", "beta")]

    def complete(job):
        model, prompt = job
        r = server.client.completions.create(model=model, prompt=prompt, max_tokens=14, temperature=0)
        return r.choices[0].text

    alone = [complete(j) for j in jobs]
    before = server.metric("lorakit_decode_steps_total")
    pool = ThreadPoolExecutor(len(jobs))
    with server.paused():  # queue six first, so the engine must start them together
        futures = [pool.submit(complete, j) for j in jobs[:6]]
        wait_for(lambda: server.metric("lorakit_queue_depth") == 6)
    wait_for(lambda: server.metric("lorakit_queue_depth") <= 2)
    futures += [pool.submit(complete, j) for j in jobs[6:]]  # these join the running batch between steps
    together = [f.result() for f in futures]
    pool.shutdown()
    assert together == alone
    assert server.metric("lorakit_batch_size_max") == 4
    assert server.metric("lorakit_decode_steps_total") - before < 12 * 13  # rows shared decode steps


