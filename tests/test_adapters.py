"""Many adapters on one base: activate one or a weighted mix, disable, delete; switching copies no weights."""

import pytest
import torch

import lorakit
from lorakit import LoraConfig
from lorakit.errors import AdapterExistsError, AdapterNotFoundError
from lorakit.state import lora_layers

from .conftest import randomise_lora


@pytest.fixture
def two(llama):
    lorakit.inject(llama, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), adapter="a")
    lorakit.inject(llama, LoraConfig(r=2, alpha=4, target_modules=["q_proj", "o_proj"]), adapter="b")
    randomise_lora(llama)
    return llama


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def test_adapters_are_independent(two, tokens):
    with lorakit.disabled(two):
        base = logits(two, tokens)
    lorakit.set_active(two, "a")
    out_a = logits(two, tokens)
    lorakit.set_active(two, "b")
    out_b = logits(two, tokens)
    assert not torch.allclose(out_a, base) and not torch.allclose(out_b, base) and not torch.allclose(out_a, out_b)
    assert lorakit.active_adapters(two) == [("b", 1.0)]
    assert lorakit.list_adapters(two) == ["a", "b"]


def test_weighted_mix_matches_formula(two, tokens):
    """Active [(a, .7), (b, .3)]: every layer adds 0.7·Δa x + 0.3·Δb x."""
    lorakit.set_active(two, [("a", 0.7), ("b", 0.3)])
    mixed = logits(two, tokens)
    lorakit.merge(two)  # folds the same weighted sum into the weights
    merged = logits(two, tokens)
    lorakit.unmerge(two)
    torch.testing.assert_close(mixed, merged, atol=1e-5, rtol=1e-5)
    lorakit.set_active(two, {"a": 0.7})
    only_a = logits(two, tokens)
    assert not torch.allclose(only_a, mixed)


def test_switching_copies_no_weights(two):
    ptrs = {n: p.data_ptr() for n, p in two.named_parameters()}
    lorakit.set_active(two, "a")
    lorakit.set_active(two, "b")
    lorakit.set_active(two, [("a", 0.5), ("b", 0.5)])
    assert {n: p.data_ptr() for n, p in two.named_parameters()} == ptrs


def test_disabled_gives_base_and_restores(two, llama_dir, tokens):
    from .conftest import load

    base = logits(load(llama_dir), tokens)
    lorakit.set_active(two, "a")
    before = logits(two, tokens)
    with lorakit.disabled(two):
        assert torch.equal(logits(two, tokens), base)
    assert torch.equal(logits(two, tokens), before)


def test_delete(two, tokens):
    lorakit.set_active(two, [("a", 1.0), ("b", 1.0)])
    lorakit.delete_adapter(two, "b")
    assert lorakit.list_adapters(two) == ["a"]
    assert lorakit.active_adapters(two) == [("a", 1.0)]
    assert all("b" not in layer.adapters for _, layer in lora_layers(two))
    lorakit.set_active(two, "a")


def test_errors_name_the_known_adapters(two):
    with pytest.raises(AdapterNotFoundError, match=r"'c'.*\['a', 'b'\]"):
        lorakit.set_active(two, "c")
    with pytest.raises(AdapterNotFoundError):
        lorakit.delete_adapter(two, "c")
    with pytest.raises(AdapterExistsError, match="'a'"):
        lorakit.inject(two, LoraConfig(target_modules=["q_proj"]), adapter="a")


def test_set_trainable_switches_gradients(two):
    lorakit.set_trainable(two, "a")
    trainable = {n for n, p in two.named_parameters() if p.requires_grad}
    assert trainable and all(".a." in n for n in trainable)
