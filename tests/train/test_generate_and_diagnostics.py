"""`lorakit generate` (one adapter, or one per prompt) and the plain-words diagnostics."""

from pathlib import Path

import pytest

import lorakit
from lorakit import LoraConfig
from lorakit.errors import ConfigError
from lorakit.train.checkpoint import Progress
from lorakit.train.diagnostics import diagnose
from lorakit.train.generate_cli import generate

from ..conftest import load, randomise_lora, tiny_tokenizer


@pytest.fixture
def two_adapters(lm_dir, tmp_path):
    paths = []
    for seed in (0, 1):
        model = load(lm_dir)
        lorakit.inject(model, LoraConfig(r=4, target_modules="all-linear"))
        randomise_lora(model, std=0.5, seed=seed)
        paths.append(str(lorakit.save_adapter(model, tmp_path / f"a{seed}")))
    return paths


def reference(lm_dir, adapter, prompt, n):
    model = load(lm_dir)
    if adapter:
        lorakit.load_adapter(model, adapter)
    tok = tiny_tokenizer()
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_one_adapter_per_prompt_matches_running_each_alone(lm_dir, two_adapters):
    prompts = ["w: a\nc:", "w: bb\nc:", "w: c\nc:"]
    adapters = [two_adapters[0], two_adapters[1], "base"]
    got = generate(str(lm_dir), adapters, prompts, max_new_tokens=6)
    want = [reference(lm_dir, a if a != "base" else None, p, 6) for a, p in zip(adapters, prompts)]
    assert got == want
    assert len(set(got)) > 1
    assert generate(str(lm_dir), [two_adapters[1]], prompts[:2], max_new_tokens=6) == [
        reference(lm_dir, two_adapters[1], p, 6) for p in prompts[:2]]
    assert generate(lm_dir, [Path(two_adapters[0]), two_adapters[1], "base"], prompts, max_new_tokens=6) == got


def test_adapter_count_must_fit_prompts(lm_dir, two_adapters):
    with pytest.raises(ConfigError, match="one per prompt"):
        generate(str(lm_dir), two_adapters, ["a", "b", "c"])


def progress(losses, evals=()):
    return Progress(step=len(losses), train_loss=list(enumerate(losses, 1)),
                    eval_metrics=[{"step": s, "eval_loss": v} for s, v in evals])


def test_diagnostics_in_plain_words():
    assert diagnose(progress([3 - 0.05 * i for i in range(40)]), 100, 100_000) == []
    flat = diagnose(progress([2.0] * 40), 100, 100_000)
    assert any("did not fall" in n for n in flat)
    spiky = [3 - 0.05 * i for i in range(40)]
    spiky[30] = 50.0
    assert any("spiked at step(s) [31]" in n for n in diagnose(progress(spiky), 100, 100_000))
    over = diagnose(progress([3 - 0.05 * i for i in range(40)], [(10, 2.0), (20, 1.5), (30, 1.8), (40, 2.2)]), 100, 10**5)
    assert any("overfitting" in n and "step 20" in n for n in over)
    assert any("No parameter is trainable" in n for n in diagnose(progress([1.0] * 3), 0, 100))
    assert any("40.0% of all parameters" in n for n in diagnose(progress([1.0] * 3), 40, 100))
    assert any("full rank" in n for n in diagnose(progress([1.0] * 3), 1, 1000, [(8, 8), (8, 8), (3, 8)]))
    assert not any("full rank" in n for n in diagnose(progress([1.0] * 3), 1, 1000, [(2, 8), (3, 8)]))
