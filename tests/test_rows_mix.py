"""Weighted mixes per row: a row running {name: weight} computes what `set_active` with those weights computes alone,
which is the `cat`-combined adapter's output, in a batch beside single-adapter and base rows; DoRA inside a mix and
adapters without slots (a mixture router) run their own output on their rows."""

import pytest
import torch

import lorakit
from lorakit import LoraConfig
from lorakit.adapters import adapter_rows, check_names
from lorakit.errors import AdapterNotFoundError
from lorakit.rows import MixedBatchError

from .conftest import alone, load, randomise_lora, rows_alone, save_experts
from .conftest import row_ids as ids

ATOL = 1e-5
MIX = {"a": 0.6, "b": 0.4}
NEGATIVE = {"b": 1.0, "a": -0.5}
NAMES = [MIX, "a", None, NEGATIVE]  # the batch: a mix, one adapter, the base, a mix with a negative weight


@pytest.fixture
def llama2(llama):
    """Two adapters of different ranks and scales over different layers (some layers hold only one of them)."""
    lorakit.inject(llama, LoraConfig(r=4, target_modules="all-linear"), adapter="a")
    lorakit.inject(llama, LoraConfig(r=8, alpha=4, target_modules=["q_proj", "v_proj", "down_proj"]), adapter="b")
    randomise_lora(llama, std=0.1)
    return llama


@pytest.mark.parametrize("length", [10, 3], ids=["batched-products", "few-tokens"])
def test_mixed_batch_equals_each_row_alone_and_the_combined_adapter(llama2, length):
    x = ids(len(NAMES), length)
    with torch.no_grad():
        got = llama2(x, adapter_names=NAMES).logits
    torch.testing.assert_close(got, rows_alone(llama2, x, NAMES), atol=ATOL, rtol=0)
    # A weighted sum of deltas is PEFT's `cat` combination: the same rows through adapters built that way.
    lorakit.combine_adapters(llama2, MIX, method="cat", name="mix", activate=False)
    lorakit.combine_adapters(llama2, NEGATIVE, method="cat", name="neg", activate=False)
    with torch.no_grad():
        combined = llama2(x, adapter_names=["mix", "a", None, "neg"]).logits
    torch.testing.assert_close(got, combined, atol=ATOL, rtol=0)
    torch.testing.assert_close(got[0], alone(llama2, x[:1], "mix")[0], atol=ATOL, rtol=0)
    assert (got[0] - got[1]).abs().max() > 1e-2 and (got[0] - got[3]).abs().max() > 1e-2  # the mixes do something


@pytest.mark.parametrize("length", [10, 2])
def test_rows_with_different_weights_and_orders(llama2, length):
    """One adapter at several weights in one pass (a per-row scale), mixes in either order, a mix of one."""
    names = [{"a": 0.3, "b": 0.7}, {"b": -0.2, "a": 0.9}, {"b": 0.5}, "b", [("a", 2.0), ("b", 0.0)], None]
    x = ids(len(names), length)
    with torch.no_grad():
        got = llama2(x, adapter_names=names).logits
        with adapter_rows(llama2, names):
            again = llama2(x).logits
    torch.testing.assert_close(got, rows_alone(llama2, x, names), atol=ATOL, rtol=0)
    assert torch.equal(got, again)


def test_every_row_the_same_mix(llama2):
    x = ids(3)
    with torch.no_grad():
        got = llama2(x, adapter_names=[MIX] * 3).logits
    torch.testing.assert_close(got, rows_alone(llama2, x, [MIX] * 3), atol=ATOL, rtol=0)


def test_gpt2_conv1d_and_embeddings(gpt2, llama):
    lorakit.inject(gpt2, LoraConfig(r=4, target_modules=["c_attn", "c_proj", "c_fc"]), adapter="a")
    lorakit.inject(gpt2, LoraConfig(r=6, alpha=3, target_modules=["c_attn"]), adapter="b")
    lorakit.inject(llama, LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]), adapter="a")
    lorakit.inject(llama, LoraConfig(r=2, target_modules=["embed_tokens"]), adapter="b")
    for model in (gpt2, llama):
        randomise_lora(model, std=0.1)
        for length in (8, 2):
            x = ids(len(NAMES), length)
            with torch.no_grad():
                got = model(x, adapter_names=NAMES).logits
            torch.testing.assert_close(got, rows_alone(model, x, NAMES), atol=ATOL, rtol=0)


def test_generate_with_mixes(llama2):
    """Greedy generate equals each row alone; sampling's repeated rows (num_return_sequences) keep their mix."""
    x = ids(len(NAMES), length=5)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(x))
    mixed = llama2.generate(x, adapter_names=NAMES, **kw)
    for i, choice in enumerate(NAMES):
        if choice is None:
            with lorakit.disabled(llama2):
                want = llama2.generate(x[i : i + 1], **{**kw, "attention_mask": torch.ones_like(x[:1])})
        else:
            lorakit.set_active(llama2, choice)
            want = llama2.generate(x[i : i + 1], **{**kw, "attention_mask": torch.ones_like(x[:1])})
        assert torch.equal(mixed[i], want[0]), f"row {i} ({choice})"
    out = llama2.generate(x, adapter_names=NAMES, output_logits=True, return_dict_in_generate=True,
                          num_return_sequences=2, **{**kw, "do_sample": True, "top_k": 0})
    expected = rows_alone(llama2, x, NAMES)[:, -1]
    torch.testing.assert_close(out.logits[0], expected.repeat_interleave(2, dim=0), atol=ATOL, rtol=0)


def test_dora_alone_and_inside_a_mix(llama2):
    """A DoRA row alone keeps its per-feature factor; inside a mix DoRA runs its own output on its rows."""
    lorakit.inject(llama2, LoraConfig(r=4, use_dora=True, target_modules=["q_proj", "o_proj"]), adapter="d")
    randomise_lora(llama2, std=0.1, seed=4)
    names = [{"a": 0.5, "d": 0.5}, "d", None, {"d": -1.0, "b": 0.3}, "a"]
    for length in (9, 2):
        x = ids(len(names), length)
        with torch.no_grad():
            got = llama2(x, adapter_names=names).logits
        torch.testing.assert_close(got, rows_alone(llama2, x, names), atol=ATOL, rtol=0)


def test_a_mixture_router_runs_per_row_by_its_own_output(llama_dir, tmp_path):
    """A learned mixture has no slots: its rows run its output() on their subset, beside slotted rows and mixes."""
    paths = save_experts(llama_dir, tmp_path)
    model = load(llama_dir)
    lorakit.add_mixture(model, lorakit.MixtureConfig(experts=paths))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "router" in name:
                p.copy_(torch.randn(p.shape, generator=g))
    names = ["mixture", "code", None, {"code": 0.5, "chat": 0.5}, "mixture"]
    x = ids(len(names), 6)
    with torch.no_grad():
        got = model(x, adapter_names=names).logits
        only = model(x[:2], adapter_names=["mixture", "mixture"]).logits  # every row: no row subset taken
    torch.testing.assert_close(got, rows_alone(model, x, names), atol=ATOL, rtol=0)
    torch.testing.assert_close(only, rows_alone(model, x[:2], ["mixture", "mixture"]), atol=ATOL, rtol=0)


def test_a_mix_of_one_at_weight_one_is_the_plain_adapter(llama2):
    assert check_names(llama2, [{"a": 1.0}, [("b", 1)], {"a": 0.5}, None]) == ("a", "b", (("a", 0.5),), None)


def test_bad_mixes(llama2):
    x = ids(2)
    with pytest.raises(AdapterNotFoundError, match=r"'zz'.*\['a', 'b'\]"):
        llama2(x, adapter_names=[{"a": 0.5, "zz": 0.5}, None])
    with pytest.raises(MixedBatchError, match="empty mix"):
        llama2(x, adapter_names=[{}, None])
    for weight in (float("nan"), float("inf"), "0.5", True):
        with pytest.raises(MixedBatchError, match="finite number"):
            llama2(x, adapter_names=[{"a": weight}, None])
    with pytest.raises(MixedBatchError, match="twice"):
        llama2(x, adapter_names=[[("a", 0.5), ("a", 0.5)], None])
    with pytest.raises(MixedBatchError, match=r"a mix as \{name: weight\}"):
        llama2(x, adapter_names=[("a", 0.5), None])  # a pair alone is not a list of pairs
    with pytest.raises(MixedBatchError, match=r"a mix as \{name: weight\}"):
        llama2(x, adapter_names=[5, None])
