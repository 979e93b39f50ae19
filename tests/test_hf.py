"""Every command checks --base the same way before anything loads: one message naming what the path is instead
and what to pass (no tokenizer traceback, no hub error), and `builtin` names the built-in model everywhere."""

import pytest
import torch

import lorakit
from lorakit import LoraConfig
from lorakit.hf import resolve_base, stored_dtype

from .conftest import load


@pytest.fixture
def adapter(llama_dir, tmp_path):
    model = load(llama_dir)
    lorakit.inject(model, LoraConfig(r=2, target_modules=["q_proj"]))
    return lorakit.save_adapter(model, tmp_path / "adapter")


def commands(base, tmp_path, adapter):
    return {"train": ["train", "--base", base, "--data", tmp_path / "none.jsonl", "--out", tmp_path / "run"],
            "generate": ["generate", "--base", base, "--prompt", "hi"],
            "merge": ["merge", "--base", base, "--adapter", adapter, "--out", tmp_path / "merged"],
            "serve": ["serve", "--base", base, "--port", "1"]}


@pytest.mark.parametrize("command", ["train", "generate", "merge", "serve"])
def test_a_wrong_base_gets_one_message_in_every_command(cli, command, tmp_path, adapter, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    cases = {
        "notamodel": "notamodel does not exist; pass a local model directory (config.json, weights, tokenizer) or "
                     "`builtin` for the built-in model",
        "/nonexistent": "/nonexistent does not exist",
        "HuggingFaceTB/SmolLM2-135M-Instruct": "'HuggingFaceTB/SmolLM2-135M-Instruct' is not a local directory. lorakit "
                                               "never downloads models: fetch it first (e.g. `hf download",
        "empty": "empty is not a model directory (no config.json)",
        str(adapter): "is a LoRA adapter, not a base model: pass it as --adapter",
    }
    for base, message in cases.items():
        code, out, err = cli(*commands(base, tmp_path, adapter)[command])
        assert code == 2 and f"lorakit {command}: error: " in err and message in err, (base, err)
    assert not (tmp_path / "run").exists() and not (tmp_path / "merged").exists()


def test_a_base_without_tokenizer_is_refused_where_one_is_needed(cli, llama_dir, tmp_path):
    code, _, err = cli("generate", "--base", llama_dir, "--prompt", "hi")
    assert code == 2 and f"{llama_dir} has no tokenizer" in err and "tokenizer.save_pretrained(DIR)" in err
    with pytest.raises(lorakit.LorakitError, match="no weights"):
        (tmp_path / "config.json").write_text("{}")
        resolve_base(tmp_path)


def test_builtin_names_the_cached_directory_everywhere(cli, lm_dir, tmp_path, builtin_cache):
    assert resolve_base("builtin", tokenizer=True) == builtin_cache
    code, out, _ = cli("generate", "--base", "builtin", "--prompt", "ab", "--max-new-tokens", "2")
    assert code == 0 and out.startswith("--- [base] 'ab'\n")
    model = load(lm_dir)
    lorakit.inject(model, LoraConfig(r=2, target_modules=["q_proj"]))
    lorakit.save_adapter(model, tmp_path / "a")
    assert cli("merge", "--base", "builtin", "--adapter", tmp_path / "a", "--out", tmp_path / "m")[0] == 0
    assert (tmp_path / "m" / "tokenizer.json").exists()


def test_stored_dtype_reads_the_weight_files_not_the_config(llama_dir, tmp_path):
    assert stored_dtype(llama_dir) == torch.float32
    load(llama_dir).to(torch.float16).save_pretrained(tmp_path)
    assert stored_dtype(tmp_path) == torch.float16 and stored_dtype(tmp_path / "nothing") is None
