"""LoftQ: adapters that start where they cancel part of the 4-bit rounding error, W0 ≈ Q + s·B·A."""

import pytest
import torch

import lorakit
from lorakit import LoraConfig
from lorakit.errors import ConfigError
from lorakit.quant.loftq import OriginalWeights

pytest.importorskip("bitsandbytes")

TARGETS = ["q_proj", "down_proj"]


def errors(model, path):
    """{layer: (‖W0 − Q‖, ‖W0 − (Q + s·B·A)‖, the residual's singular values)} for every adapted layer."""
    originals, found = OriginalWeights(model), {}
    for name, layer in lorakit.state.lora_layers(model):
        in_f, out_f = layer.features
        W0 = originals.get(name, (out_f, in_f)).float()
        Q = layer.type.dense_weight(layer.base_layer)
        delta = layer.adapters["default"].delta_weight(layer).detach()
        found[name] = (float((W0 - Q).norm()), float((W0 - Q - delta).norm()), torch.linalg.svdvals(W0 - Q))
    return found


def test_loftq_recovers_the_top_singular_directions_of_the_rounding_error(llama_dir):
    model = lorakit.load_base_model(llama_dir, quantize="nf4")
    before = [m.weight.data.clone() for _, m in lorakit.quant.quantized_layers(model)]
    lorakit.inject(model, LoraConfig(r=8, alpha=32, target_modules=TARGETS, init="loftq"))  # scale 4: divided out
    for name, (plain, loftq, s) in errors(model, llama_dir).items():
        # the best rank-8 fit removes exactly the 8 largest singular values of W0 − Q
        assert loftq == pytest.approx(float(s[8:].square().sum().sqrt()), rel=1e-4)
        assert loftq < 0.95 * plain
    # one iteration keeps the base as loaded: the adapter is an ordinary one for the ordinary 4-bit base
    assert all(torch.equal(m.weight.data, b) for (_, m), b in zip(lorakit.quant.quantized_layers(model), before))


def test_more_loftq_iterations_requantise_the_base_and_lower_the_error_further(llama_dir):
    one = lorakit.load_base_model(llama_dir, quantize="nf4")
    lorakit.inject(one, LoraConfig(r=8, target_modules=TARGETS, init="loftq"))
    three = lorakit.load_base_model(llama_dir, quantize="nf4")
    lorakit.inject(three, LoraConfig(r=8, target_modules=TARGETS, init="loftq", loftq_iter=3))
    e1, e3 = errors(one, llama_dir), errors(three, llama_dir)
    total1 = sum(after ** 2 for _, after, _ in e1.values())
    total3 = sum(after ** 2 for _, after, _ in e3.values())
    assert total3 < total1
    layer = three.model.layers[0].mlp.down_proj
    assert not torch.equal(layer.base_layer.weight.data, one.model.layers[0].mlp.down_proj.base_layer.weight.data)


def test_a_loftq_adapter_is_saved_as_an_ordinary_peft_adapter(llama_dir, tmp_path, tokens):
    model = lorakit.load_base_model(llama_dir, quantize="nf4").eval()
    lorakit.inject(model, LoraConfig(r=4, target_modules=TARGETS, init="loftq"))
    lorakit.save_adapter(model, tmp_path / "a")
    assert lorakit.read_adapter_config(tmp_path / "a").init == "kaiming"  # PEFT loads it, it does not re-fit it
    again = lorakit.load_adapter(lorakit.load_base_model(llama_dir, quantize="nf4").eval(), tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(again(tokens).logits, model(tokens).logits, atol=1e-6, rtol=0)  # slot views


def test_loftq_needs_a_quantised_base_and_its_original_weights(llama, llama_dir, tmp_path):
    with pytest.raises(ConfigError, match="quantize='nf4'"):
        lorakit.inject(llama, LoraConfig(r=4, target_modules=TARGETS, init="loftq"))
    assert not lorakit.list_adapters(llama)
    model = lorakit.load_base_model(llama_dir, quantize="nf4")
    model.name_or_path = str(tmp_path)  # a model whose directory holds no weights
    with pytest.raises(ConfigError, match="original .*weights.*no model.safetensors"):
        lorakit.inject(model, LoraConfig(r=4, target_modules=TARGETS, init="loftq"))
