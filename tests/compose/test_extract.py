"""extract_adapter: a LoRA from a full fine-tune by truncated SVD of W_tuned − W_base, streamed from safetensors."""

import pytest
import torch

import lorakit
from lorakit.cli import main
from lorakit.errors import IncompatibleAdapterError

from ..conftest import gpt2_config, load

ATOL = 1e-5


def _tuned_copy(base_dir, out, rank=None, seed=0):
    """A 'fine-tune' of the tiny model: each linear weight moved by a rank-`rank` (or full-rank) change, a norm too."""
    model = load(base_dir)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                out_f, in_f = module.weight.shape
                if rank is None:
                    change = torch.randn(out_f, in_f, generator=g) * 0.02
                else:
                    change = torch.randn(out_f, rank, generator=g) @ torch.randn(rank, in_f, generator=g) * 0.02
                module.weight.add_(change)
        model.model.norm.weight.add_(0.1)
    model.save_pretrained(out)
    return out


def test_low_rank_change_is_recovered_exactly(llama_dir, tmp_path, tokens):
    tuned = _tuned_copy(llama_dir, tmp_path / "tuned", rank=3)
    report = lorakit.extract_adapter(llama_dir, tuned, rank=3, out=tmp_path / "a", progress=False)
    assert len(report.layers) == 14 and all(row.energy_kept > 1 - 1e-6 for row in report.layers)
    assert report.other_changed == ["model.norm.weight"]
    model = load(llama_dir)
    lorakit.load_adapter(model, tmp_path / "a")
    merged = lorakit.merge_and_unload(model)
    tuned_model = load(tuned)
    for name, p in tuned_model.named_parameters():
        if name.endswith("proj.weight"):
            torch.testing.assert_close(merged.get_parameter(name), p, atol=1e-6, rtol=1e-5)


def test_approaches_the_tuned_weights_as_rank_grows(llama_dir, tmp_path):
    tuned = _tuned_copy(llama_dir, tmp_path / "tuned")  # full-rank changes
    errors = []
    for r in (1, 4, 16, 64):
        report = lorakit.extract_adapter(llama_dir, tuned, rank=r, out=tmp_path / f"r{r}", progress=False)
        errors.append(sum(row.relative_error for row in report.layers) / len(report.layers))
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-5  # rank 64 = full rank of every layer here
    model = load(llama_dir)
    lorakit.load_adapter(model, tmp_path / "r64")
    merged = lorakit.merge_and_unload(model)
    for name, p in load(tuned).named_parameters():
        if name.endswith("proj.weight"):
            torch.testing.assert_close(merged.get_parameter(name), p, atol=1e-5, rtol=1e-4)


def test_gpt2_conv1d_and_target_choice(gpt2_dir, tmp_path, tokens):
    model = load(gpt2_dir)
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight.add_(torch.randn(64, 1) @ torch.randn(1, 192) * 0.05)  # (in, out): rank 1
    model.save_pretrained(tmp_path / "tuned")
    report = lorakit.extract_adapter(gpt2_dir, tmp_path / "tuned", rank=1, out=tmp_path / "a", targets=["c_attn"],
                                     progress=False)
    assert [row.module for row in report.layers] == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    ours = load(gpt2_dir)
    lorakit.load_adapter(ours, tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens).logits, model(tokens).logits, atol=1e-4, rtol=0)


def test_different_architectures_name_the_tensor(llama_dir, tmp_path):
    from transformers import LlamaForCausalLM

    from ..conftest import llama_config

    config = llama_config()
    config.intermediate_size = 96
    LlamaForCausalLM(config).save_pretrained(tmp_path / "other")
    with pytest.raises(IncompatibleAdapterError, match=r"tensor 'model.layers.0.mlp.down_proj.weight' is \(64, 128\) "
                                                       r"in the base but \(64, 96\) in the tuned model"):
        lorakit.extract_adapter(llama_dir, tmp_path / "other", rank=2, out=tmp_path / "a", progress=False)
    from transformers import GPT2LMHeadModel

    GPT2LMHeadModel(gpt2_config()).save_pretrained(tmp_path / "gpt2")
    # the config's reason and the first tensor: GPT-2 ties its head, so the Llama's head has no counterpart
    with pytest.raises(IncompatibleAdapterError, match=r"model_type is 'llama' in the base and 'gpt2' in the tuned "
                                                       r"model\): tensor 'lm_head.weight' \(128, 64\) of the base is missing"):
        lorakit.extract_adapter(llama_dir, tmp_path / "gpt2", rank=2, out=tmp_path / "b", progress=False)
    assert not (tmp_path / "a").exists()


def test_a_different_hidden_size_names_the_first_tensor(llama_dir, tmp_path, cli):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(hidden_size=96, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=128)).save_pretrained(tmp_path / "wide")
    code, _, err = cli("extract", "--base", llama_dir, "--tuned", tmp_path / "wide", "--rank", "2", "--out", tmp_path / "a")
    assert code == 2 and not (tmp_path / "a").exists()
    assert "hidden_size is 64 in the base and 96 in the tuned model" in err
    assert "tensor 'lm_head.weight' is (128, 64) in the base but (128, 96) in the tuned model" in err


def test_command_line(llama_dir, tmp_path, capsys):
    tuned = _tuned_copy(llama_dir, tmp_path / "tuned", rank=2)
    assert main(["extract", "--base", str(llama_dir), "--tuned", str(tuned), "--rank", "2", "--targets", "q_proj",
                 "v_proj", "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "4 layers, mean energy kept 100.00%" in out
    assert lorakit.read_adapter_config(tmp_path / "a").target_modules == ["q_proj", "v_proj"]
    assert main(["extract", "--base", str(llama_dir), "--tuned", str(tmp_path / "nope"), "--rank", "2",
                 "--out", str(tmp_path / "b")]) == 2
