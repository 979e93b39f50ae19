"""A saved mixture of LoRAs served by name: registered at startup, by POST /v1/adapters or from a registry root; its
greedy tokens equal the library's (load_mixture on a fresh base, generate), alone, inside a weighted mix and in a busy
batch beside plain-adapter and base rows; its experts are internal adapters loaded, counted and deleted with it;
broken mixtures are refused naming the file."""

from __future__ import annotations

import functools
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import lorakit
from lorakit.errors import AdapterFileError, AdapterFileNotFoundError, IncompatibleAdapterError
from lorakit.serve.store import AdapterStore
from lorakit.state import adapter_layers

from .conftest import KEY, Server, completion_text, wait_for, word_tokenizer

pytest.importorskip("openai")
pytest.importorskip("uvicorn")

# The mixture's experts: copies of alpha's and gamma's files under the same names; the server also serves alpha and
# beta as plain adapters, so the expert named alpha must not collide with the adapter named alpha.
EXPERTS = ("alpha", "gamma")
WEIGHTED = {"mixture": 0.5, "beta": -0.7}  # the library's names for "mix:0.5+beta:-0.7"


@pytest.fixture(scope="module")
def mix_dir(serve_root):
    """adapters/mix: a mixture of alpha and gamma with random routers (std 1: routing far from the even average)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(serve_root / "llama")
    experts = {e: str(serve_root / "adapters" / e) for e in EXPERTS}
    lorakit.add_mixture(model, lorakit.MixtureConfig(experts=experts), name="mix")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, _, a in adapter_layers(model, "mix"):
            a.router.weight.copy_(torch.randn(a.router.weight.shape, generator=g))
    return lorakit.save_mixture(model, serve_root / "adapters" / "mix", name="mix")


@pytest.fixture(scope="module")
def mix_server(serve_root, mix_dir):
    from lorakit.serve.server import create_app

    adapters = {"mix": str(mix_dir), **{n: str(serve_root / "adapters" / n) for n in ("alpha", "beta")}}
    app = create_app(serve_root / "llama", adapters=adapters, adapter_root=serve_root / "adapters", api_key=KEY,
                     max_batch=4, max_queue=8)
    s = Server(app)
    yield s
    s.close()


@pytest.fixture(scope="module")
def library(serve_root, mix_dir):
    """Greedy text of the mixture computed by the library alone: load_mixture on a fresh base, then generate()."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(serve_root / "llama").eval()
    lorakit.load_mixture(model, mix_dir)
    lorakit.load_adapter(model, serve_root / "adapters" / "beta", adapter="beta", activate=False)
    tok = word_tokenizer()

    def run(prompt: str | list[int], n: int, names="mixture") -> str:
        ids = tok(prompt)["input_ids"] if isinstance(prompt, str) else list(prompt)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, adapter_names=[names],
                                 pad_token_id=tok.pad_token_id)[0].tolist()
        assert len(out) == len(ids) + n
        return tok.decode(out, skip_special_tokens=True)[len(tok.decode(ids, skip_special_tokens=True)):]

    return run


text = functools.partial(completion_text, max_tokens=8)


def on_model(server) -> list[str]:
    return lorakit.list_adapters(server.state.engine.model)


def test_served_by_name_with_the_librarys_output(mix_server, library, reference):
    for prompt in ("hello world the cat", "a small green mat and"):
        got = text(mix_server, "mix", prompt)
        assert got == library(prompt, 8)
        assert got != reference(None, prompt, 8) and got != reference("alpha", prompt, 8)  # the test can tell them apart
    messages = [{"role": "user", "content": "the big red dog"}]
    chat = mix_server.client.chat.completions.create(model="mix", messages=messages, max_tokens=6, temperature=0)
    assert chat.model == "mix"
    # the word tokenizer has no chat template: the server writes a "role: content" transcript
    assert chat.choices[0].message.content == library("user: the big red dog\nassistant:", 6)
    r = mix_server.http.post("/generate", json={"inputs": "hello world", "parameters": {"adapter_id": "mix",
                                                                                         "max_new_tokens": 6}})
    assert r.status_code == 200 and r.json()["generated_text"] == library("hello world", 6)
    models = [m["id"] for m in mix_server.http.get("/v1/models").json()["data"]]
    assert "mix" in models
    # one servable name; its experts are internal adapters beside the plain adapter named alpha
    model_name = mix_server.state.adapters._entries["mix"].model_name
    assert {f"{model_name}/{e}" for e in EXPERTS} | {model_name} <= set(on_model(mix_server))


def test_a_mixture_in_a_weighted_mix(mix_server, library):
    """The mixture's whole (routed) contribution weighted like any adapter's: what set_active with weights runs."""
    weighted = text(mix_server, "mix:0.5+beta:-0.7", "small blue mat")
    assert weighted == library("small blue mat", 8, WEIGHTED) != library("small blue mat", 8)
    assert text(mix_server, "llama", "small blue mat", adapters={"mix": 0.5, "beta": -0.7}) == library(
        "small blue mat", 8, WEIGHTED)


def test_a_busy_batch_of_mixture_plain_and_base_rows_equals_each_alone(mix_server, library, reference):
    jobs = [("mix", "hello world"), ("alpha", "hello world"), ("llama", "the big red dog runs"),
            ("beta", "the big red dog runs"), ("mix", "the big red dog runs"), ("mix:0.5+beta:-0.7", "hello world"),
            ("llama", "hello world"), ("alpha", "the big red dog runs")]
    alone = [text(mix_server, m, p, max_tokens=10) for m, p in jobs]
    for (m, p), got in zip(jobs, alone):
        if m == "mix":
            assert got == library(p, 10)
        elif m in ("alpha", "beta", "llama"):
            assert got == reference(None if m == "llama" else m, p, 10)
    pool = ThreadPoolExecutor(len(jobs))
    with mix_server.paused():  # queue them all first (max_queue=8), so the engine runs them in shared batches
        futures = [pool.submit(text, mix_server, m, p, max_tokens=10) for m, p in jobs]
        wait_for(lambda: mix_server.state.engine.queue_depth == len(jobs))
    together = [f.result() for f in futures]
    pool.shutdown()
    assert together == alone
    assert all(e.pins == 0 for e in mix_server.state.adapters._entries.values())


def test_post_adapters_loads_a_mixture_and_delete_frees_its_experts(mix_server, library):
    store = mix_server.state.adapters
    r = mix_server.http.post("/v1/adapters", json={"name": "mix2", "path": "mix"})
    assert r.status_code == 201, r.text
    assert {"id": "mix2", "loaded": True} in mix_server.http.get("/v1/adapters").json()["data"]
    assert "mix2" in [m["id"] for m in mix_server.http.get("/v1/models").json()["data"]]
    assert text(mix_server, "mix2", "the cat") == library("the cat", 8)
    entry = store._entries["mix2"]
    parts = [entry.model_name, *entry.parts]
    assert entry.parts == [f"{entry.model_name}/{e}" for e in EXPERTS] and set(parts) <= set(on_model(mix_server))
    model = mix_server.state.engine.model
    held = sum(p.numel() * p.element_size() for name in parts for _, _, a in adapter_layers(model, name)
               for p in a.parameters())
    assert entry.nbytes == held  # the router and both experts count
    before = store.stats().loaded_bytes
    assert mix_server.http.delete("/v1/adapters/mix2").status_code == 200
    assert not set(parts) & set(on_model(mix_server))
    assert store.stats().loaded_bytes == before - held
    assert text(mix_server, "mix", "the cat") == library("the cat", 8)  # the other copy is untouched


def test_eviction_frees_the_experts_and_a_reload_computes_the_same(serve_root, mix_dir, llama_of):
    model = llama_of()
    store = AdapterStore(model, root=serve_root / "adapters", max_loaded=1)
    store.register("mix", "mix")
    store.register("alpha", "alpha")
    x = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(1))
    with store.rows(["mix", None]), torch.no_grad():
        first = model(x).logits
    assert len(lorakit.list_adapters(model)) == 3  # the router and its two experts
    store.release(store.acquire("alpha"))  # max_loaded=1: the mixture goes, experts and all
    assert lorakit.list_adapters(model) == [store._entries["alpha"].model_name] and store.stats().evictions == 1
    with store.rows(["mix", None]), torch.no_grad():
        torch.testing.assert_close(model(x).logits, first, atol=0, rtol=0)
    want = lorakit.load_mixture(llama_of(), mix_dir)
    with torch.no_grad():
        torch.testing.assert_close(first[:1], want(x[:1]).logits, atol=1e-5, rtol=0)


def test_a_registry_root_registers_the_mixture_as_one_name(serve_root, mix_dir, llama_of):
    store = AdapterStore(llama_of(), root=serve_root / "adapters")
    broken = store.register_root()
    assert "mix" in store.names() and not [n for n in store.names() if n.startswith("mix/")]
    assert "mix" not in broken and "junk" in broken


@pytest.fixture
def broken_root(serve_root, mix_dir, tmp_path):
    """A root with copies of the mixture to break."""
    for name in ("no_expert", "bad_router", "later"):
        shutil.copytree(mix_dir, tmp_path / name)
    shutil.rmtree(tmp_path / "no_expert" / "experts" / "gamma")
    (tmp_path / "bad_router" / "router.safetensors").write_bytes(b"not a safetensors file")
    return tmp_path


def test_a_broken_mixture_is_refused_naming_the_file(broken_root, llama_of):
    model = llama_of()
    store = AdapterStore(model, root=broken_root)
    with pytest.raises(AdapterFileNotFoundError, match=r"mixture .*no_expert.*expert 'gamma'.*experts/gamma"):
        store.register("a", "no_expert")
    with pytest.raises(AdapterFileError, match=r"bad_router/router\.safetensors is not a readable safetensors file"):
        store.register("b", "bad_router")
    broken = AdapterStore(llama_of(), root=broken_root).register_root()
    assert "experts/gamma" in broken["no_expert"] and "router.safetensors" in broken["bad_router"]
    # broken after registration: the load fails naming the file, after the experts were read, and leaves nothing
    store.register("c", "later")
    (broken_root / "later" / "router.safetensors").unlink()
    with pytest.raises(AdapterFileNotFoundError, match=r"later/router\.safetensors is missing"):
        store.acquire("c")
    assert lorakit.list_adapters(model) == [] and store.loaded() == []
    assert all(not pool.slots for m in model.modules() if (pool := getattr(m, "row_slots", None)) is not None)


def test_post_adapters_with_a_broken_mixture_is_a_400(mix_server, mix_dir):
    root = mix_server.state.adapters.root
    shutil.copytree(mix_dir, root / "broken_mix")
    try:
        (root / "broken_mix" / "router.safetensors").write_bytes(b"junk")
        r = mix_server.http.post("/v1/adapters", json={"name": "broken", "path": "broken_mix"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_adapter"
        assert "broken_mix/router.safetensors" in r.json()["error"]["message"]
        assert "broken" not in mix_server.state.adapters.names()
    finally:
        shutil.rmtree(root / "broken_mix")


def test_max_lora_rank_reads_the_experts(serve_root, mix_dir, llama_of):
    from lorakit.serve.context import check_rank

    store = AdapterStore(llama_of(), root=serve_root / "adapters")
    store.register("mix", "mix")
    check_rank(store, "mix", 4)
    with pytest.raises(IncompatibleAdapterError, match=r"'mix' \(its expert 'gamma'\) has rank 4, above --max-lora-rank 2"):
        check_rank(store, "mix", 2)


@pytest.fixture(scope="module")
def llama_of(serve_root):
    from transformers import AutoModelForCausalLM

    return lambda: AutoModelForCausalLM.from_pretrained(serve_root / "llama").eval()
