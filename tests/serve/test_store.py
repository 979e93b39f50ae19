"""The adapter store: load on first use, LRU eviction under count and memory caps with transparent reload,
pins that keep a running request's adapter in place across threads, and refusal of bad paths and files."""

import threading

import pytest
import torch

import lorakit
from lorakit import LoraConfig
from lorakit.errors import (
    AdapterExistsError,
    AdapterFileNotFoundError,
    AdapterNotFoundError,
    IncompatibleAdapterError,
    ShapeMismatchError,
)
from lorakit.serve import adapter_rows
from lorakit.serve import store as store_module
from lorakit.serve.store import AdapterInUseError, AdapterPathError, AdapterStore, StoreFullError

from ..conftest import VOCAB, llama_config, load, randomise_lora

ATOL = 1e-5
X = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(4))
RANKS = {"r2": 2, "r4": 4, "r8": 8, "r4b": 4, "r6": 6}


@pytest.fixture(scope="module")
def root(llama_dir, tmp_path_factory):
    """Five adapters of different ranks saved under one root, and each one's logits on X (row 0 adapted, row 1 base)."""
    root = tmp_path_factory.mktemp("adapters")
    model = load(llama_dir)
    for i, (name, r) in enumerate(RANKS.items()):
        lorakit.inject(model, LoraConfig(r=r, target_modules=["q_proj", "v_proj", "up_proj"]), adapter=name)
        randomise_lora(model, std=0.1, seed=i)  # re-randomises earlier adapters too: saved right away, so it does not matter
        lorakit.save_adapter(model, root / name, adapter=name)
    return root


@pytest.fixture(scope="module")
def expected(root, llama_dir):
    """What each adapter computes on X when loaded the usual way."""
    out = {}
    for name in RANKS:
        model = lorakit.load_adapter(load(llama_dir), root / name)
        with torch.no_grad():
            out[name] = model(X).logits
            with lorakit.disabled(model):
                out[None] = model(X).logits
    return out


@pytest.fixture
def store(llama, root):
    s = AdapterStore(llama, root=root, max_loaded=2)
    for name in RANKS:
        s.register(name, name)  # relative to the root
    return s


def run(store, names):
    with torch.no_grad(), store.rows(names) as model:
        return model(X[: len(names)]).logits


def check(store, expected, name):
    got = run(store, [name, None])
    torch.testing.assert_close(got[0], expected[name][0], atol=ATOL, rtol=0)
    torch.testing.assert_close(got[1], expected[None][1], atol=ATOL, rtol=0)


def test_loaded_on_first_use(store, expected):
    assert store.loaded() == [] and lorakit.list_adapters(store.model) == []
    check(store, expected, "r4")
    assert store.loaded() == ["r4"]
    with torch.no_grad(), store.rows(["r8", "r4"]) as model:
        got = model(X).logits
    torch.testing.assert_close(got[0], expected["r8"][0], atol=ATOL, rtol=0)
    torch.testing.assert_close(got[1], expected["r4"][1], atol=ATOL, rtol=0)
    assert store.stats().loads == 2 and store.stats().hits == 1


def test_lru_eviction_and_transparent_reload(store, expected):
    for name in ("r2", "r4", "r8"):  # cap 2: r2 goes
        check(store, expected, name)
    assert store.loaded() == ["r4", "r8"]
    assert len(lorakit.list_adapters(store.model)) == 2  # evicted means gone from the model
    first = store.acquire("r4")
    store.release("r4")  # r4 is now the most recent: r8 goes next
    check(store, expected, "r2")  # reloaded, into a fresh adapter under a new model name
    assert store.loaded() == ["r4", "r2"]
    stats = store.stats()
    assert (stats.loads, stats.evictions, stats.loaded) == (4, 2, 2)
    assert store.acquire("r4") == first  # still loaded: same adapter, nothing copied
    store.release(first)


def test_memory_cap(llama, root, expected):
    sizes = {}
    for name in ("r2", "r4", "r8"):
        s = AdapterStore(load_fresh(llama), root=root)
        s.register(name, name)
        s.release(s.acquire(name))
        sizes[name] = s.stats().loaded_bytes
    assert sizes["r8"] == 2 * sizes["r4"] == 4 * sizes["r2"]  # bytes grow with the rank

    s = AdapterStore(llama, root=root, max_bytes=sizes["r8"] + sizes["r2"])
    for name in RANKS:
        s.register(name, name)
    check(s, expected, "r8")
    check(s, expected, "r2")
    assert s.stats().loaded_bytes == sizes["r8"] + sizes["r2"]
    check(s, expected, "r4")  # needs r8's room: r8 is the least recently used
    assert s.loaded() == ["r2", "r4"] and s.stats().loaded_bytes <= s.max_bytes
    with pytest.raises(StoreFullError, match="max_bytes"):
        small = AdapterStore(llama, root=root, max_bytes=sizes["r4"])
        small.register("r8", "r8")


def load_fresh(model):
    import copy

    from lorakit.merge import unload

    return unload(copy.deepcopy(model)) if lorakit.list_adapters(model) else copy.deepcopy(model)


def test_pinned_adapters_are_never_evicted(llama, root, expected):
    s = AdapterStore(llama, root=root, max_loaded=1)
    for name in RANKS:
        s.register(name, name)
    held = s.acquire("r2")
    with pytest.raises(StoreFullError, match="in use"):
        s.acquire("r4")
    assert s.loaded() == ["r2"]
    with torch.no_grad(), adapter_rows(llama, [held, None]):
        torch.testing.assert_close(llama(X).logits[0], expected["r2"][0], atol=ATOL, rtol=0)
    with pytest.raises(AdapterInUseError):
        s.unregister("r2")
    s.release("r2")
    check(s, expected, "r4")
    assert s.loaded() == ["r4"]


def test_concurrent_requests_never_see_torn_weights(llama, root, expected):
    """Three threads keep running requests on five adapters with room for three: adapters are evicted and
    reloaded under running forwards, and every result is still exact."""
    s = AdapterStore(llama, root=root, max_loaded=3)
    for name in RANKS:
        s.register(name, name)
    names = list(RANKS)
    errors, done = [], []

    def work(k):
        try:
            for i in range(8):
                name = names[(k * 2 + i) % len(names)]
                check(s, expected, name)
                done.append(name)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, repr(errors[0])
    stats = s.stats()
    assert len(done) == 24 and stats.evictions > 0 and stats.loads == stats.loaded + stats.evictions
    assert len(s.loaded()) <= 3 and len(lorakit.list_adapters(llama)) == len(s.loaded())
    assert all(e.pins == 0 for e in s._entries.values())


def test_a_slow_load_does_not_block_other_adapters(store, expected, monkeypatch):
    """While one adapter is stuck loading, a request for a loaded adapter runs to the end."""
    check(store, expected, "r2")
    started, finish = threading.Event(), threading.Event()
    real = store_module.commit_adapter

    def slow_load(*args, **kwargs):
        started.set()
        assert finish.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(store_module, "commit_adapter", slow_load)
    loader = threading.Thread(target=lambda: store.release(store.acquire("r8")))
    loader.start()
    assert started.wait(10)
    check(store, expected, "r2")  # served while r8 is still loading
    assert not finish.is_set() and store.loaded() == ["r2"]
    finish.set()
    loader.join()
    check(store, expected, "r8")
    assert store.stats().loads == 2


def test_failed_load_leaves_nothing_behind(store, root, expected):
    (root / "broken").mkdir(exist_ok=True)
    (root / "broken" / "adapter_config.json").write_text((root / "r4" / "adapter_config.json").read_text())
    (root / "broken" / "adapter_model.safetensors").write_bytes((root / "r4" / "adapter_model.safetensors").read_bytes())
    store.register("broken", "broken")
    (root / "broken" / "adapter_model.safetensors").write_bytes(b"garbage")  # corrupted after registration
    with pytest.raises(lorakit.AdapterFileError, match="corrupt"):
        store.acquire("broken")
    assert store.loaded() == [] and lorakit.list_adapters(store.model) == [] and store.stats().failed_loads == 1
    check(store, expected, "r4")


def test_loading_keeps_the_plain_forward(store, expected):
    """The store never activates what it loads: a plain forward still computes the base."""
    check(store, expected, "r4")
    with torch.no_grad():
        torch.testing.assert_close(store.model(X).logits, expected[None], atol=ATOL, rtol=0)


def test_generate_through_the_store(store):
    prompt = X[:, :5]
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with store.rows(["r4", "r8"]) as model:
        mixed = model.generate(prompt, attention_mask=torch.ones_like(prompt), **kw)
    for i, name in enumerate(["r4", "r8"]):
        row = prompt[i : i + 1]
        with store.rows([name]) as model:
            assert torch.equal(mixed[i], model.generate(row, attention_mask=torch.ones_like(row), **kw)[0])


def test_bad_paths_and_files(llama, root, tmp_path, gpt2):
    s = AdapterStore(llama, root=root)
    outside = tmp_path / "outside"
    lorakit.save_adapter(lorakit.inject(gpt2, LoraConfig(r=2)), outside)
    with pytest.raises(AdapterPathError, match="outside the adapter root"):
        s.register("x", outside)
    with pytest.raises(AdapterPathError, match="outside the adapter root"):
        s.register("x", "../" + outside.name)
    (root / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(AdapterPathError, match="links"):
        s.register("x", "link")
    (root / "empty").mkdir(exist_ok=True)
    with pytest.raises(AdapterFileNotFoundError, match="adapter_config.json"):
        s.register("x", "empty")
    lorakit.save_adapter(gpt2, root / "gpt2ad")
    with pytest.raises(IncompatibleAdapterError, match="another architecture"):
        s.register("x", "gpt2ad")

    from transformers import LlamaForCausalLM

    narrow = llama_config()
    narrow.hidden_size, narrow.intermediate_size = 32, 64
    lorakit.save_adapter(lorakit.inject(LlamaForCausalLM(narrow), LoraConfig(r=2)), root / "narrow")
    with pytest.raises(ShapeMismatchError, match="other layer sizes"):
        s.register("x", "narrow")
    lorakit.save_adapter(lorakit.inject(load_fresh(llama), LoraConfig(r=2, bias="all")), root / "bias")
    with pytest.raises(IncompatibleAdapterError, match="biases"):
        s.register("x", "bias")

    assert s.register("ok", "r2") and not s.register("ok", root / "r2")  # the same directory twice: fine
    with pytest.raises(AdapterExistsError, match="unregister"):
        s.register("ok", "r4")
    with pytest.raises(AdapterNotFoundError, match=r"'nope'.*\['ok'\]"):
        s.acquire("nope")
    with pytest.raises(lorakit.LorakitError, match="without a matching acquire"):
        s.release("ok")
    assert s.names() == ["ok"]
    s.unregister("ok")
    assert s.names() == []



def test_dora_adapters_serve_in_a_mixed_batch(llama_dir, root, expected, tmp_path):
    """DoRA adapters (a per-feature rescaling on top of LoRA; neither vLLM nor PEFT batch them per row) beside
    a plain LoRA adapter and a base row: each row equals its adapter run alone."""
    import shutil

    from lorakit.state import lora_layers
    from lorakit.variants.dora import DoraAdapter

    shutil.copytree(root / "r4", tmp_path / "r4")
    want = {"r4": expected["r4"], None: expected[None]}
    model = load(llama_dir)
    for i, targets in enumerate((["q_proj", "v_proj", "down_proj"], ["embed_tokens", "o_proj"])):
        name = f"dora{i}"
        lorakit.inject(model, LoraConfig(r=4, target_modules=targets, use_dora=True), adapter=name)
        randomise_lora(model, std=0.1, seed=10 + i)  # A and B (and m, set again below)
        with torch.no_grad():
            for _, layer in lora_layers(model):
                if name in layer.adapters:  # magnitudes near the base's norms, as trained ones are
                    m = layer.adapters[name].lora_magnitude_vector
                    m.copy_(1 + torch.rand(m.shape, generator=torch.Generator().manual_seed(i)))
            want[name] = model(X).logits
        lorakit.save_adapter(model, tmp_path / name, adapter=name)
        lorakit.delete_adapter(model, name)
    store = AdapterStore(load(llama_dir), root=tmp_path, max_loaded=3)
    for name in ("dora0", "dora1", "r4"):
        store.register(name, name)
    names = ["dora0", "r4", "dora1", None]
    with torch.no_grad(), store.rows(names) as served:
        got = served(torch.cat([X, X])).logits
        assert any(isinstance(a, DoraAdapter) for _, layer in lora_layers(served) for a in layer.adapters.values())
    for i, name in enumerate(names):
        torch.testing.assert_close(got[i], want[name][i % 2], atol=ATOL, rtol=0)


def test_a_registry_root_with_broken_entries_serves_the_rest(llama, root, tmp_path, expected):
    import shutil

    reg = tmp_path / "registry"
    shutil.copytree(root / "r2", reg / "team" / "r2")
    shutil.copytree(root / "r4", reg / "r4")
    (reg / "junk").mkdir()
    (reg / "junk" / "adapter_config.json").write_text("{")
    shutil.copytree(root / "r8", reg / "torn")
    (reg / "torn" / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    s = AdapterStore(llama, root=reg)
    broken = s.register_root()
    assert sorted(broken) == ["junk", "torn"] and s.broken == broken
    assert "not valid JSON" in broken["junk"] and "corrupt" in broken["torn"]
    assert sorted(s.names()) == ["r4", "team/r2"]
    got = run(s, ["team/r2", "r4"])
    torch.testing.assert_close(got[0], expected["r2"][0], atol=ATOL, rtol=0)
    torch.testing.assert_close(got[1], expected["r4"][1], atol=ATOL, rtol=0)


def test_a_load_reads_its_files_without_the_model_lock(store, expected, monkeypatch):
    """While an adapter's files are being read, the model lock is free (a running batch is not held up)."""
    check(store, expected, "r2")
    reading, finish = threading.Event(), threading.Event()
    real = store_module.read_adapter_tensors

    def slow_read(path):
        reading.set()
        assert finish.wait(10)
        return real(path)

    monkeypatch.setattr(store_module, "read_adapter_tensors", slow_read)
    loader = threading.Thread(target=lambda: store.release(store.acquire("r8")))
    loader.start()
    assert reading.wait(10)
    assert store.model_lock.acquire(timeout=5)  # free while the files are read
    store.model_lock.release()
    finish.set()
    loader.join()
    check(store, expected, "r8")


def test_a_registry_root_lists_first_level_directories_without_a_config(llama, root, tmp_path, capsys):
    """A half-copied adapter (weights but no adapter_config.json) is listed as broken, by the store and by the
    server's GET /v1/adapters, instead of being skipped without a word; the rest serve."""
    import shutil

    from fastapi.testclient import TestClient

    from lorakit.serve.server import create_app

    from ..conftest import tiny_tokenizer

    reg = tmp_path / "registry"
    shutil.copytree(root / "r4", reg / "r4")
    shutil.copytree(root / "r2", reg / "half")
    (reg / "half" / "adapter_config.json").unlink()  # only adapter_model.safetensors left
    (reg / "weights").mkdir()
    shutil.copy(root / "r8" / "adapter_model.safetensors", reg / "weights" / "model.safetensors")
    (reg / "notes").mkdir()
    (reg / "notes" / "README.md").write_text("not an adapter, not weights: not an entry")
    s = AdapterStore(llama, root=reg)
    broken = s.register_root()
    assert sorted(broken) == ["half", "weights"] and s.names() == ["r4"]
    assert all("adapter_config.json is missing" in why for why in broken.values())
    app = create_app(llama, tokenizer=tiny_tokenizer(), adapter_root=reg, register_root=True)
    assert "skipped adapter 'half'" in capsys.readouterr().err
    listing = TestClient(app).get("/v1/adapters").json()
    assert [a["id"] for a in listing["data"]] == ["r4"]
    assert [b["id"] for b in listing["broken"]] == ["half", "weights"]
    assert "adapter_config.json is missing" in listing["broken"][0]["reason"]
