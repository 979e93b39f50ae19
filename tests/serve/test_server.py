"""The HTTP server end to end: a real uvicorn on a loopback port, a tiny Llama with three adapters of different
ranks, the `openai` client for the API and httpx for bad input. Outputs are checked against a plain greedy loop."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

import lorakit
from tests.conftest import gpt2_config, llama_config, randomise_lora

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

KEY = "test-key"
WORDS = "the a cat dog sat on mat hello world big small red blue green runs jumps quickly slowly and or".split()
ADAPTERS = {"alpha": (2, ["q_proj", "v_proj"]), "beta": (8, "all-linear"), "gamma": (4, ["o_proj", "up_proj"])}


def word_tokenizer(vocab: int = 128):
    """Whole words as tokens (so short prompts fit the tiny context), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    words = WORDS + [f"w{i}" for i in range(vocab - len(specials) - len(WORDS))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # No eos_token: a random model would stop at random places; finish reasons are tested with `stop`.
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="<unk>", pad_token="<pad>")


@pytest.fixture(scope="module")
def serve_root(tmp_path_factory) -> Path:
    """root/llama (model + tokenizer), root/adapters/{alpha,beta,gamma}, root/adapters/{gpt2,junk}, root/outside."""
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    root = tmp_path_factory.mktemp("serve")
    config = llama_config()
    config.max_position_embeddings = 128
    config.eos_token_id = None  # see word_tokenizer
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root / "llama")
    word_tokenizer().save_pretrained(root / "llama")
    for seed, (name, (rank, targets)) in enumerate(ADAPTERS.items()):
        model = LlamaForCausalLM.from_pretrained(root / "llama")
        lorakit.inject(model, lorakit.LoraConfig(r=rank, alpha=2 * rank, target_modules=targets))
        randomise_lora(model, std=0.3, seed=seed)
        lorakit.save_adapter(model, root / "adapters" / name)
    lorakit.save_adapter(lorakit.inject(GPT2LMHeadModel(gpt2_config()), lorakit.LoraConfig(r=2, target_modules=["c_attn"])),
                         root / "adapters" / "gpt2")
    (root / "adapters" / "junk").mkdir()
    (root / "adapters" / "junk" / "adapter_config.json").write_text("{not json")
    model = LlamaForCausalLM.from_pretrained(root / "llama")
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    lorakit.save_adapter(model, root / "outside")
    os.symlink(root / "outside", root / "adapters" / "sneaky")  # inside the root by name, outside by target
    return root


class Server:
    def __init__(self, app):
        self.app = app
        self.state = app.state.lorakit
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0, timeout=60)

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)

    def paused(self):
        """Hold the engine between steps (nothing is admitted or decoded) while a test arranges the queue."""
        return self.state.engine.model_lock

    def metric(self, name: str) -> float:
        for line in self.http.get("/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        raise AssertionError(f"no metric {name}")


@pytest.fixture(scope="module")
def server(serve_root):
    from lorakit.serve.server import create_app

    app = create_app(serve_root / "llama", adapters={n: str(serve_root / "adapters" / n) for n in ("alpha", "beta")},
                     adapter_root=serve_root / "adapters", api_key=KEY, max_batch=4, max_queue=8)
    s = Server(app)
    yield s
    s.close()


@pytest.fixture(scope="module")
def reference(serve_root):
    """Greedy text of (adapter, prompt, n) computed the plain way: one model per adapter, no cache, no batch."""
    from transformers import AutoModelForCausalLM

    tok = word_tokenizer()
    models = {}

    def run(adapter: str | None, prompt: str, n: int) -> str:
        if adapter not in models:
            model = AutoModelForCausalLM.from_pretrained(serve_root / "llama").eval()
            if adapter is not None:
                lorakit.load_adapter(model, serve_root / "adapters" / adapter)
            models[adapter] = model
        ids = tok(prompt)["input_ids"]
        with torch.no_grad():
            for _ in range(n):
                ids.append(int(models[adapter](torch.tensor([ids])).logits[0, -1].argmax()))
        # What the prompt's text grows by (so " w10", with its space), skipping special tokens as the server does.
        return tok.decode(ids, skip_special_tokens=True)[len(tok.decode(ids[:-n], skip_special_tokens=True)):]

    return run


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
        _wait_for(lambda: server.metric("lorakit_queue_depth") == 6)
    _wait_for(lambda: server.metric("lorakit_queue_depth") <= 2)
    futures += [pool.submit(complete, j) for j in jobs[6:]]  # these join the running batch between steps
    together = [f.result() for f in futures]
    pool.shutdown()
    assert together == alone
    assert server.metric("lorakit_batch_size_max") == 4
    assert server.metric("lorakit_decode_steps_total") - before < 12 * 13  # rows shared decode steps


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
        _wait_for(lambda: server.metric("lorakit_queue_depth") == 1)
        r = server.http.delete("/v1/adapters/alpha")
        assert r.status_code == 409 and r.json()["error"]["code"] == "adapter_in_use"
    assert future.result().status_code == 200
    pool.shutdown()
    assert "alpha" in [m.id for m in server.client.models.list().data]


@pytest.fixture(scope="module")
def small_server(serve_root):
    """One adapter loaded at a time, no adapter root (so no loading at run time), no API key."""
    from lorakit.serve.server import create_app

    app = create_app(serve_root / "llama", adapters={n: str(serve_root / "adapters" / n) for n in ADAPTERS},
                     max_loaded=1, max_batch=2, max_queue=4)
    s = Server(app)
    yield s
    s.close()


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
        _wait_for(lambda: server.metric("lorakit_queue_depth") == 8)
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
    before = (_metric(server, served), _metric(server, cancelled), server.metric("lorakit_completion_tokens_total"))
    body = {"model": "beta", "prompt": "the cat", "max_tokens": 100, "temperature": 0, "stream": True}
    try:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}) as client:
            with client.stream("POST", "/v1/completions", json=body) as r:
                assert next(r.iter_lines()).startswith("data: ")
        _wait_for(lambda: _metric(server, served) == before[0] + 1)  # the server saw the hang-up
    finally:
        gate.set()
    _wait_for(lambda: _metric(server, cancelled) == before[1] + 1)
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


# --- helpers -----------------------------------------------------------------------------------------


def _wait_for(condition, timeout: float = 30.0) -> None:
    """Poll until `condition()` holds (the timeout only guards against a hang; no test asserts a duration)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.02)


def _metric(server, name: str) -> float:
    """A labelled sample's value, 0 when it has not appeared yet."""
    for line in server.http.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0
