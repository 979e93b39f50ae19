"""Per-row batches with DoRA adapters (which neither PEFT's mixed batches nor vLLM allow): mixed with plain LoRA
and base rows, each row equals its adapter run alone, in a forward and in generate()."""

import pytest
import torch

import lorakit
from lorakit import LoraConfig
from lorakit.state import lora_layers

from .conftest import VOCAB, alone
from .test_dora import ATOL, randomise_dora


@pytest.fixture(params=["llama", "gpt2"])
def mixed(request):
    """DoRA adapters ("d", with the embedding for Llama; "e") next to a plain LoRA one ("l"), on different targets."""
    model = request.getfixturevalue(request.param)
    if request.param == "llama":
        targets = (["embed_tokens", "q_proj", "v_proj", "down_proj"], ["q_proj", "o_proj"], "all-linear")
    else:
        targets = (["c_attn", "c_fc"], ["c_proj"], ["c_attn"])
    lorakit.inject(model, LoraConfig(r=4, target_modules=targets[0], use_dora=True), adapter="d")
    lorakit.inject(model, LoraConfig(r=2, alpha=4, target_modules=targets[1], use_dora=True), adapter="e")
    lorakit.inject(model, LoraConfig(r=8, target_modules=targets[2]), adapter="l")
    randomise_dora(model, std=0.1)
    return model


@pytest.mark.parametrize("length", [10, 3], ids=["batched-products", "few-tokens"])
def test_mixed_batch_with_dora_equals_rows_alone(mixed, length):
    names = ["d", "l", None, "e", "d", "l"]
    x = torch.randint(0, VOCAB, (len(names), length), generator=torch.Generator().manual_seed(3))
    expected = torch.cat([alone(mixed, x[i : i + 1], n) for i, n in enumerate(names)])
    with torch.no_grad():
        got = mixed(x, adapter_names=names).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    # a changed magnitude reaches the next per-row batch (the stacks follow row_version)
    with torch.no_grad():
        for _, layer in lora_layers(mixed):
            if "e" in layer.adapters:
                layer.adapters["e"].lora_magnitude_vector.mul_(1.5)
        got = mixed(x, adapter_names=names).logits
    torch.testing.assert_close(got[3], alone(mixed, x[3:4], "e")[0], atol=ATOL, rtol=0)
    assert not torch.allclose(got[3], expected[3], atol=1e-3)


def test_mixed_generate_with_dora_equals_rows_alone(mixed):
    names = ["d", None, "l", "e"]
    x = torch.randint(1, VOCAB, (len(names), 5), generator=torch.Generator().manual_seed(5))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, attention_mask=torch.ones(1, 5, dtype=torch.long))
    got = mixed.generate(x, adapter_names=names, **{**kw, "attention_mask": torch.ones_like(x)})
    for i, name in enumerate(names):
        with torch.no_grad():
            if name is None:
                with lorakit.disabled(mixed):
                    want = mixed.generate(x[i : i + 1], **kw)
            else:
                lorakit.set_active(mixed, name)
                want = mixed.generate(x[i : i + 1], **kw)
        assert torch.equal(got[i], want[0]), name
