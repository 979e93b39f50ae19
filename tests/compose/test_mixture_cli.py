"""A saved mixture of LoRAs through the commands: `lorakit generate --adapter MIX` gives the library's tokens
(load_mixture, then generate), also beside other adapters in one batch; `lorakit inspect MIX` shows the router
settings and each expert; a broken mixture is an error naming the file, not a traceback."""

import shutil

import pytest
import torch

import lorakit
from lorakit import MixtureConfig
from lorakit.state import adapter_layers

from ..conftest import load, save_experts, tiny_tokenizer

PROMPTS = ["w: a\nc:", "w: bb\nc:"]


@pytest.fixture
def mix_dir(lm_dir, tmp_path):
    """Two experts on different layers and a mixture of them with random routers (std 1: far from the average)."""
    experts = save_experts(lm_dir, tmp_path, std=0.5)
    model = load(lm_dir)
    lorakit.add_mixture(model, MixtureConfig(experts=experts, top_k=1, load_balance=0.05), name="mix")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, _, a in adapter_layers(model, "mix"):
            a.router.weight.copy_(torch.randn(a.router.weight.shape, generator=g))
    return lorakit.save_mixture(model, tmp_path / "mix", name="mix")


def library(lm_dir, prompt, n, mixture=None, adapter=None):
    """Greedy text from the library alone: load_mixture (or load_adapter) on a fresh base, then generate()."""
    model = load(lm_dir)
    if mixture is not None:
        lorakit.load_mixture(model, mixture)
    if adapter is not None:
        lorakit.load_adapter(model, adapter)
    tok = tiny_tokenizer()
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def printed(labels, prompts, texts) -> str:
    return "".join(f"--- [{label}] {prompt!r}\n{text}\n" for label, prompt, text in zip(labels, prompts, texts))


def test_generate_with_a_mixture_gives_the_librarys_tokens(cli, lm_dir, mix_dir):
    want = [library(lm_dir, p, 8, mixture=mix_dir) for p in PROMPTS]
    experts = [library(lm_dir, p, 8, adapter=mix_dir / "experts" / e) for p in PROMPTS for e in ("code", "chat")]
    assert not set(want) & set(experts + [library(lm_dir, p, 8) for p in PROMPTS])  # the test can tell them apart
    args = ("generate", "--base", lm_dir, "--adapter", mix_dir, "--max-new-tokens", "8")
    code, out, _ = cli(*args, *[a for p in PROMPTS for a in ("--prompt", p)])
    assert code == 0 and out == printed([mix_dir] * 2, PROMPTS, want)


def test_a_mixture_beside_its_copy_an_adapter_and_the_base_in_one_batch(cli, lm_dir, mix_dir, tmp_path):
    """Each row equals that adapter alone; two mixtures with the same expert names do not clash (the server's
    `<name>/<expert>` naming)."""
    copy = shutil.copytree(mix_dir, tmp_path / "copy")
    expert = mix_dir / "experts" / "chat"
    adapters = [mix_dir, copy, expert, "base"]
    prompt = PROMPTS[1]
    code, out, _ = cli("generate", "--base", lm_dir, "--max-new-tokens", "8",
                       *[a for adapter in adapters for a in ("--adapter", adapter, "--prompt", prompt)])
    mixed = library(lm_dir, prompt, 8, mixture=mix_dir)
    want = [mixed, mixed, library(lm_dir, prompt, 8, adapter=expert), library(lm_dir, prompt, 8)]
    assert code == 0 and out == printed(adapters, [prompt] * 4, want)


def test_inspect_shows_the_router_settings_and_each_expert(cli, mix_dir):
    code, out, _ = cli("inspect", mix_dir, "--layers")
    assert code == 0 and out.startswith(f"mixture        {mix_dir}\n")
    assert "experts        2: code, chat\n" in out
    assert "router         per token, top_k 1 of 2, load balance 0.05\n" in out
    # a router per layer an expert adapts (q, v, up in 2 decoder layers), each 2 experts × 64 input features
    assert "router layers  6\n" in out and f"trainable      {6 * 2 * 64:,} router parameters" in out
    code_part, chat_part = out.split("\nexpert code\n")[1].split("\nexpert chat\n")
    assert f"  adapter        {mix_dir / 'experts' / 'code'}\n" in code_part
    assert "  rank r         4\n" in code_part and "  targets        q_proj, v_proj\n" in code_part
    assert "  targets        up_proj, v_proj\n" in chat_part and "  layers         4\n" in chat_part
    assert "    model.layers.1.self_attn.q_proj " in code_part and "effective=" in code_part
    assert "    model.layers.1.mlp.up_proj " in chat_part and "q_proj" not in chat_part
    code, fast, _ = cli("inspect", mix_dir, "--fast")
    assert code == 0 and "effective" not in fast and "  parameters     " in fast
    code, _, err = cli("inspect", mix_dir, "--spectrum")
    assert code == 2 and "is a saved mixture: give one of its experts" in err


def test_a_mixture_missing_an_expert_is_an_error_naming_the_file(cli, lm_dir, mix_dir):
    shutil.rmtree(mix_dir / "experts" / "chat")
    for args in (("inspect", mix_dir), ("generate", "--base", lm_dir, "--adapter", mix_dir, "--prompt", "ab")):
        code, out, err = cli(*args)  # the fixture fails the test on a traceback
        assert code == 2 and out == ""
        assert f"mixture {str(mix_dir)!r}, expert 'chat': adapter directory {str(mix_dir / 'experts' / 'chat')!r} " \
               "does not exist" in err
    (mix_dir / "router.safetensors").unlink()
    shutil.copytree(mix_dir / "experts" / "code", mix_dir / "experts" / "chat")
    code, _, err = cli("inspect", mix_dir)
    assert code == 2 and f"{mix_dir / 'router.safetensors'} is missing" in err
