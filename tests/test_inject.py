"""Injection: which modules get LoRA, zero-init equivalence, freezing, gradients, parameter counts, errors."""

import pytest
import torch

import lorakit
from lorakit import LoraConfig
from lorakit.errors import ConfigError, TargetModulesNotFoundError
from lorakit.state import lora_layers

from .conftest import load, randomise_lora


def targeted(model):
    return sorted(name for name, _ in lora_layers(model))


def test_suffix_list_on_llama(llama, tokens):
    before = llama(tokens).logits
    lorakit.inject(llama, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert targeted(llama) == [f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    assert torch.equal(llama(tokens).logits, before)  # B = 0: bit for bit the base model


def test_all_linear_skips_the_head(llama, gpt2, bert):
    lorakit.inject(llama, LoraConfig(target_modules="all-linear"))
    names = targeted(llama)
    assert len(names) == 14 and "lm_head" not in names
    lorakit.inject(gpt2, LoraConfig(target_modules="all-linear"))
    assert {n.rsplit(".", 1)[-1] for n in targeted(gpt2)} == {"c_attn", "c_proj", "c_fc"}
    lorakit.inject(bert, LoraConfig(target_modules="all-linear"))
    assert not any(n.startswith("classifier") for n in targeted(bert))


def test_regex_layers_to_transform_and_exclude(llama):
    lorakit.inject(llama, LoraConfig(target_modules=r".*\.(q_proj|k_proj)"), adapter="re")
    assert len(targeted(llama)) == 4
    m2 = type(llama)(llama.config)
    lorakit.inject(m2, LoraConfig(target_modules=["q_proj", "k_proj", "v_proj"], layers_to_transform=[1],
                                  exclude_modules=["k_proj"]))
    assert targeted(m2) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


def test_rank_and_alpha_patterns(llama):
    cfg = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2},
                     alpha_pattern={"model.layers.0.self_attn.q_proj": 32})
    lorakit.inject(llama, cfg)
    layers = dict(lora_layers(llama))
    assert layers["model.layers.1.self_attn.v_proj"].adapters["default"].lora_A.shape[0] == 2
    assert layers["model.layers.1.self_attn.v_proj"].adapters["default"].scale == pytest.approx(4.0)
    assert layers["model.layers.0.self_attn.q_proj"].adapters["default"].scale == pytest.approx(8.0)
    assert layers["model.layers.1.self_attn.q_proj"].adapters["default"].scale == pytest.approx(2.0)


def test_rslora_scale(llama):
    lorakit.inject(llama, LoraConfig(r=16, alpha=8, rslora=True, target_modules=["q_proj"]))
    layer = dict(lora_layers(llama))["model.layers.0.self_attn.q_proj"]
    assert layer.adapters["default"].scale == pytest.approx(2.0)


def test_only_lora_is_trainable_and_gets_gradients(llama, tokens):
    lorakit.inject(llama, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomise_lora(llama)
    llama.train()
    llama(tokens, labels=tokens).loss.backward()
    for name, p in llama.named_parameters():
        if "lora_" in name:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


def test_bias_modes(bert):
    lorakit.inject(bert, LoraConfig(target_modules=["query"], bias="lora_only"))
    trainable = {n for n, p in bert.named_parameters() if p.requires_grad}
    assert "bert.encoder.layer.0.attention.self.query.base_layer.bias" in trainable
    assert "bert.encoder.layer.0.attention.self.key.bias" not in trainable
    m = type(bert)(bert.config)
    lorakit.inject(m, LoraConfig(target_modules=["query"], bias="all"))
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert "bert.encoder.layer.0.attention.self.key.bias" in trainable


def test_modules_to_save(bert, tokens):
    before = bert(tokens).logits
    lorakit.inject(bert, LoraConfig(target_modules=["query", "value"], task_type="SEQ_CLS"))
    trainable = {n for n, p in bert.named_parameters() if p.requires_grad}
    assert "classifier.modules_to_save.default.weight" in trainable
    assert "classifier.original_module.weight" not in trainable
    assert torch.equal(bert(tokens).logits, before)
    with torch.no_grad():
        bert.classifier.modules_to_save["default"].weight.add_(1.0)
    assert not torch.equal(bert(tokens).logits, before)
    with lorakit.disabled(bert):
        assert torch.equal(bert(tokens).logits, before)


def test_trainable_parameters_line(llama, capsys):
    lorakit.inject(llama, LoraConfig(r=4, target_modules=["q_proj"]))
    count = lorakit.trainable_parameters(llama)
    assert count.trainable == 2 * (4 * 64 + 64 * 4)
    assert count.total == sum(p.numel() for p in llama.parameters())
    out = capsys.readouterr().out.strip()
    assert out == f"trainable params: {count.trainable:,} || all params: {count.total:,} || trainable%: {100 * count.trainable / count.total:.4f}"


def test_no_match_lists_candidates(llama):
    with pytest.raises(TargetModulesNotFoundError) as e:
        lorakit.inject(llama, LoraConfig(target_modules=["qproj"]))
    msg = str(e.value)
    assert "qproj" in msg and "q_proj" in msg and "down_proj" in msg
    assert not list(lora_layers(llama))


def test_a_partly_unmatched_target_list_warns_or_with_strict_raises(llama, llama_dir):
    with pytest.warns(UserWarning, match=r"target_modules \['q_prj'\] matched no module"):
        lorakit.inject(llama, LoraConfig(target_modules=["q_prj", "v_proj"]))
    assert targeted(llama) == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]
    fresh = load(llama_dir)
    with pytest.raises(TargetModulesNotFoundError, match=r"\['q_prj'\] matched no module; candidates: .*q_proj"):
        lorakit.inject(fresh, LoraConfig(target_modules=["q_prj", "v_proj"]), strict=True)
    assert targeted(fresh) == []


def test_unsupported_match_is_explained(llama):
    with pytest.raises(TargetModulesNotFoundError, match="LlamaAttention.*q_proj"):
        lorakit.inject(llama, LoraConfig(target_modules=["self_attn"]))


@pytest.mark.parametrize("kwargs, word", [
    ({"r": 0}, "r must be"), ({"alpha": -1}, "alpha"), ({"dropout": 1.5}, "dropout"), ({"bias": "some"}, "bias"),
    ({"target_modules": []}, "empty"), ({"target_modules": "(["}, "regular expression"), ({"init": "xavier"}, "init"),
])
def test_config_validation(kwargs, word):
    with pytest.raises(ConfigError, match=word):
        LoraConfig(**kwargs)


def test_default_targets(gpt2):
    lorakit.inject(gpt2, LoraConfig())
    assert {n.rsplit(".", 1)[-1] for n in targeted(gpt2)} == {"c_attn"}


def test_embedding_target(llama, tokens):
    before = llama(tokens).logits
    lorakit.inject(llama, LoraConfig(target_modules=["embed_tokens", "q_proj"]))
    assert "model.embed_tokens" in targeted(llama)
    assert torch.equal(llama(tokens).logits, before)


def test_new_modules_take_the_mode_of_the_model(llama_dir, tokens):
    """from_pretrained gives a model in eval mode; an adapter added to it must not run its dropout at inference."""
    model = load(llama_dir)  # eval()
    lorakit.inject(model, LoraConfig(r=4, dropout=0.5, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]))
    randomise_lora(model)
    assert not any(m.training for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, model(tokens).logits, atol=0, rtol=0)  # no dropout draws
    model.train()
    lorakit.inject(model, LoraConfig(r=4, dropout=0.5, target_modules=["k_proj"]), adapter="second")
    assert all(m.training for m in model.modules())  # and one added while training trains with dropout
