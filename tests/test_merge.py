"""Merge/unmerge/unload: merged = unmerged, unmerge is bit-exact after 1,000 cycles, unload gives a plain model."""

import pytest
import torch

import lorakit
from lorakit import LoraConfig
from lorakit.errors import MergeStateError
from lorakit.state import lora_layers

from .conftest import load, randomise_lora


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize("fixture, targets", [("llama", "all-linear"), ("gpt2", ["c_attn", "c_fc"]),
                                              ("llama", ["embed_tokens", "q_proj"])])
def test_merged_equals_unmerged_fp32(fixture, targets, request, tokens):
    model = request.getfixturevalue(fixture)
    lorakit.inject(model, LoraConfig(r=4, target_modules=targets))
    randomise_lora(model)
    unmerged = logits(model, tokens)
    lorakit.merge(model)
    assert lorakit.is_merged(model)
    torch.testing.assert_close(logits(model, tokens), unmerged, atol=1e-5, rtol=0)


def test_merged_equals_unmerged_bf16(llama_dir, tokens):
    model = load(llama_dir).to(torch.bfloat16)
    lorakit.inject(model, LoraConfig(r=4, target_modules="all-linear"))
    randomise_lora(model, std=0.05)
    unmerged = logits(model, tokens).float()
    lorakit.merge(model)
    assert (logits(model, tokens).float() - unmerged).abs().max() < 1e-2 * max(1.0, unmerged.abs().max().item())


def test_unmerge_is_bit_exact_after_1000_cycles(llama, tokens):
    lorakit.inject(llama, LoraConfig(r=4, target_modules="all-linear"))
    randomise_lora(llama)
    weights = {n: p.detach().clone() for n, p in llama.named_parameters()}
    for _ in range(1000):
        lorakit.merge(llama)
        lorakit.unmerge(llama)
    for n, p in llama.named_parameters():
        assert torch.equal(p, weights[n]), n


def test_merge_named_adapter_and_state_errors(llama, tokens):
    lorakit.inject(llama, LoraConfig(r=4, target_modules=["q_proj"]), adapter="a")
    lorakit.inject(llama, LoraConfig(r=4, target_modules=["v_proj"]), adapter="b")
    randomise_lora(llama)
    lorakit.set_active(llama, "b")
    out_b = logits(llama, tokens)
    lorakit.set_active(llama, "a")
    lorakit.merge(llama, adapter="b")
    torch.testing.assert_close(logits(llama, tokens), out_b, atol=1e-5, rtol=0)
    assert lorakit.active_adapters(llama) == [("b", 1.0)]  # what is merged is what runs
    with pytest.raises(MergeStateError, match="unmerge"):
        lorakit.set_active(llama, "b")
    with pytest.raises(MergeStateError, match="unmerge"):
        with lorakit.disabled(llama):
            pass
    lorakit.unmerge(llama)
    lorakit.set_active(llama, "b")


def test_merge_and_unload_saves_a_plain_checkpoint(llama, llama_dir, tokens, tmp_path):
    lorakit.inject(llama, LoraConfig(r=4, target_modules="all-linear"))
    randomise_lora(llama)
    adapted = logits(llama, tokens)
    plain = lorakit.merge_and_unload(llama)
    assert not list(lora_layers(plain))
    assert "forward" not in plain.__dict__ and "generate" not in plain.__dict__  # no adapter_names= wrapper left
    assert not any("lora" in k or "base_layer" in k for k in plain.state_dict())
    plain.save_pretrained(tmp_path)
    again = load(tmp_path)
    torch.testing.assert_close(logits(again, tokens), adapted, atol=1e-5, rtol=0)
    assert set(again.state_dict()) == set(load(llama_dir).state_dict())


def test_unload_returns_the_base(llama_dir, tokens):
    model = load(llama_dir)
    base = logits(model, tokens)
    lorakit.inject(model, LoraConfig(r=4, target_modules="all-linear"))
    randomise_lora(model)
    lorakit.merge(model)
    plain = lorakit.unload(model)
    assert torch.equal(logits(plain, tokens), base)


def test_merge_and_unload_keeps_trained_head(bert, tokens):
    lorakit.inject(bert, LoraConfig(target_modules=["query"], task_type="SEQ_CLS"))
    randomise_lora(bert)
    with torch.no_grad():
        bert.classifier.modules_to_save["default"].weight.normal_()
    adapted = logits(bert, tokens)
    plain = lorakit.merge_and_unload(bert)
    assert type(plain.classifier).__name__ == "Linear"
    torch.testing.assert_close(logits(plain, tokens), adapted, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype, expected", [("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16),
                                             ("fp16", torch.float16), ("float32", torch.float32),
                                             (torch.bfloat16, torch.bfloat16)])
def test_merge_and_unload_takes_a_dtype_by_name_as_load_base_model_does(llama, tokens, dtype, expected):
    lorakit.inject(llama, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomise_lora(llama, std=0.05)
    adapted = logits(llama, tokens)
    plain = lorakit.merge_and_unload(llama, dtype=dtype)
    assert not list(lora_layers(plain)) and plain.model.layers[0].self_attn.q_proj.weight.dtype == expected
    assert all(p.dtype == expected for p in plain.parameters())
    assert (logits(plain, tokens).float() - adapted).abs().max() < 0.05


@pytest.mark.parametrize("dtype", ["int4", "cuda", torch.int8, 16])
def test_merge_and_unload_refuses_an_unknown_dtype_before_changing_anything(llama, dtype):
    from lorakit.errors import ConfigError

    lorakit.inject(llama, LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match=r"dtype .* is not one of 'fp32', 'float32', 'bf16', 'bfloat16', 'fp16', "
                                          r"'float16'"):
        lorakit.merge_and_unload(llama, dtype=dtype)
    assert len(list(lora_layers(llama))) == 2 and not lorakit.is_merged(llama)
