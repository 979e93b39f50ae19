"""The HTTP server's fixtures: a real uvicorn on a loopback port, a tiny Llama with three adapters of different ranks,
the `openai` client and httpx, and a plain greedy loop to check outputs against."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

import lorakit
from tests.conftest import gpt2_config, llama_config, randomise_lora

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
        import openai
        import uvicorn

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
    # Tests call this from several client threads at once, and transformers' from_pretrained is not thread-safe:
    # two concurrent loads can leave its temporary "parameters on the meta device" patch in place for good, after
    # which later models come out with untied, meta-device weights (seen as flaky failures in unrelated tests).
    loading = threading.Lock()

    def run(adapter: str | None, prompt: str, n: int) -> str:
        with loading:
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


@pytest.fixture(scope="module")
def small_server(serve_root):
    """One adapter loaded at a time, no adapter root (so no loading at run time), no API key."""
    from lorakit.serve.server import create_app

    app = create_app(serve_root / "llama", adapters={n: str(serve_root / "adapters" / n) for n in ADAPTERS},
                     max_loaded=1, max_batch=2, max_queue=4)
    s = Server(app)
    yield s
    s.close()


def completion_text(server, model, prompt, max_tokens: int = 8, **kw) -> str:
    """The text of a greedy /v1/completions answer from `model` (an adapter, a mix, a mixture); asserts 200."""
    r = server.http.post("/v1/completions", json={"model": model, "prompt": prompt, "temperature": 0,
                                                   "max_tokens": max_tokens, **kw})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def wait_for(condition, timeout: float = 30.0) -> None:
    """Poll until `condition()` holds (the timeout only guards against a hang; no test asserts a duration)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.02)


def metric(server, name: str) -> float:
    """A labelled sample's value, 0 when it has not appeared yet."""
    for line in server.http.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0
