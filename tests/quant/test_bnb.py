"""QLoRA on bitsandbytes' 4-bit NF4 (and 8-bit) layers: sizes, training, PEFT on the same weights, merging, and both
4-bit layouts (standard, and the one bitsandbytes repacks weights into on an AVX512-BF16 CPU)."""

import math
import warnings

import pytest
import torch
from torch import nn

import lorakit
from lorakit import LoraConfig
from lorakit.errors import MissingDependencyError, TargetModulesNotFoundError

from ..conftest import randomise_lora

bnb = pytest.importorskip("bitsandbytes")
from lorakit.quant import bnb as qbnb  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:MatMul8bitLt", "ignore:merging into quantised weights")
LINEAR_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load(path, quantize="nf4", **kw):
    return lorakit.load_base_model(path, quantize=quantize, **kw).eval()


def qlora(path, quantize="nf4", r=4, seed=0, **kw):
    model = load(path, quantize)
    lorakit.inject(model, LoraConfig(r=r, alpha=2 * r, target_modules="all-linear", **kw))
    randomise_lora(model, std=0.1, seed=seed)
    return model


def repack_for_cpu(model):
    """Put every 4-bit weight into the layout bitsandbytes' Linear4bit.forward repacks it into, in place, on an
    AVX512-BF16 CPU (its own function, so this runs on any CPU)."""
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit) and not qbnb.is_cpu_packed(m.weight):
            m.weight.data, m.weight.quant_state = bnb.functional._convert_weight_packed_for_cpu(m.weight.data,
                                                                                                  m.weight.quant_state)
    return model


def packed_state(model):
    """Every stored byte of every quantised weight and its quantisation state."""
    out = {}
    for name, m in lorakit.quant.quantized_layers(model):
        qs = m.weight.quant_state
        out[name] = [m.weight.data.clone(), qs.absmax.clone()] + ([qs.state2.absmax.clone()] if qs.nested else [])
    return out


def same_state(a, b):
    return a.keys() == b.keys() and all(len(a[k]) == len(b[k]) and all(torch.equal(x, y) for x, y in zip(a[k], b[k]))
                                        for k in a)


def merge_cycles(model, tokens, cycles=2):
    """Merge and unmerge `cycles` times, checking after each unmerge that the packed weights and their quantisation
    state are back bit for bit and, at the end, that the logits are the unmerged ones exactly. (unmerged, merged)."""
    with torch.no_grad():
        unmerged = model(tokens).logits
    before = packed_state(model)
    for _ in range(cycles):
        lorakit.merge(model)
        with torch.no_grad():
            merged = model(tokens).logits
        lorakit.unmerge(model)
        assert same_state(before, packed_state(model))
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, unmerged)
    return unmerged, merged


def peft_twin(path, ours, quantize="nf4", r=4):
    """PEFT's QLoRA on its own quantised load of the same base, holding our A and B."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft = get_peft_model(load(path, quantize), PeftLoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"))
    inner = peft.base_model.model
    with torch.no_grad():
        for name, layer in ours.named_modules():
            if isinstance(layer, lorakit.LoraLayer):
                theirs = inner.get_submodule(name)
                theirs.lora_A["default"].weight.copy_(layer.adapters["default"].lora_A)
                theirs.lora_B["default"].weight.copy_(layer.adapters["default"].lora_B)
    return peft.eval()


def test_adapters_are_sized_from_features_and_all_linear_selects_4bit_layers(llama_dir):
    model = load(llama_dir)
    assert model.is_loaded_in_4bit and isinstance(model.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    lorakit.inject(model, LoraConfig(r=4, target_modules="all-linear"))
    layers = dict(lorakit.state.lora_layers(model))
    assert sorted({n.rsplit(".", 1)[1] for n in layers}) == sorted(LINEAR_NAMES) and len(layers) == 14
    down = layers["model.layers.0.mlp.down_proj"]
    assert down.kind == "linear4bit" and down.base_layer.weight.shape == (128 * 64 // 2, 1)  # packed: 2 per byte
    a = down.adapters["default"]
    assert a.lora_A.shape == (4, 128) and a.lora_B.shape == (64, 4) and a.lora_A.dtype == torch.float32
    count = lorakit.trainable_parameters(model, verbose=False)
    # trainable: r·(in + out) per layer; all: every weight counted as the numbers it stands for, not bytes
    per_block = 4 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 2 + (128 + 64))
    assert count.trainable == 2 * per_block
    plain = sum(p.numel() for p in lorakit.load_base_model(llama_dir).parameters())
    assert count.total == plain + count.trainable


def test_training_steps_change_only_the_adapters(llama_dir, tokens):
    model = qlora(llama_dir)
    before_packed = packed_state(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.is_floating_point()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(3):
        loss = model(tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    changed = {n for n, p in model.named_parameters() if p.is_floating_point() and not torch.equal(p, before[n])}
    assert changed == {n for n in before if "lora_" in n} and len(changed) == 28
    assert same_state(before_packed, packed_state(model))  # the 4-bit data and its quantisation state: untouched


def test_logits_and_gradients_equal_peft_qlora(llama_dir, tokens):
    ours = qlora(llama_dir)
    peft = peft_twin(llama_dir, ours)
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens).logits, peft(tokens).logits, atol=1e-5, rtol=0)
    ours.train(), peft.train()
    ours(tokens, labels=tokens).loss.backward()
    peft(tokens, labels=tokens).loss.backward()
    inner = peft.base_model.model
    for name, layer in lorakit.state.lora_layers(ours):
        a, theirs = layer.adapters["default"], inner.get_submodule(name)
        torch.testing.assert_close(a.lora_A.grad, theirs.lora_A["default"].weight.grad, atol=1e-6, rtol=1e-4)
        torch.testing.assert_close(a.lora_B.grad, theirs.lora_B["default"].weight.grad, atol=1e-6, rtol=1e-4)


def test_peft_loads_our_qlora_adapter_with_equal_logits(llama_dir, tmp_path, tokens):
    from peft import PeftModel

    ours = qlora(llama_dir)
    lorakit.save_adapter(ours, tmp_path / "a")
    theirs = PeftModel.from_pretrained(load(llama_dir), tmp_path / "a").eval()
    reloaded = lorakit.load_adapter(load(llama_dir), tmp_path / "a")
    with torch.no_grad():
        expected = ours(tokens).logits
        torch.testing.assert_close(theirs(tokens).logits, expected, atol=1e-5, rtol=0)
        # A reloaded adapter's tensors are views of its per-row slot (held once): ~1e-7, not bit for bit
        torch.testing.assert_close(reloaded(tokens).logits, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype, atol", [(None, 1e-5), (torch.bfloat16, 0.05), ("bf16", 0.05)])
def test_merge_and_unload_gives_a_full_precision_model_equal_to_the_unmerged_one(llama_dir, tokens, dtype, atol):
    model = qlora(llama_dir)
    with torch.no_grad():
        expected = model(tokens).logits
    plain = lorakit.merge_and_unload(model, dtype=dtype)  # a dtype by name too, as load_base_model takes it
    down = plain.model.layers[1].mlp.down_proj
    want = torch.bfloat16 if dtype == "bf16" else dtype or torch.float32
    assert type(down) is nn.Linear and down.weight.dtype == want == plain.dtype
    assert not lorakit.quant.is_quantized(plain) and not getattr(plain, "is_loaded_in_4bit", False)
    assert getattr(plain.config, "quantization_config", None) is None  # save_pretrained writes a plain model
    with torch.no_grad():
        torch.testing.assert_close(plain(tokens).logits.float(), expected, atol=atol, rtol=0)


@pytest.mark.parametrize("layout", ["standard", "cpu_packed"])
def test_merge_then_unmerge_restores_the_packed_weights_bit_for_bit(llama_dir, tokens, layout):
    model = qlora(llama_dir)
    if layout == "cpu_packed":
        repack_for_cpu(model)
    unmerged, merged = merge_cycles(model, tokens)
    assert qbnb.is_cpu_packed(model.model.layers[0].mlp.up_proj.base_layer.weight) == (layout == "cpu_packed")
    # merged back into 4 bits, part of the update is rounded away: close to the unmerged output, not equal
    assert 1e-4 < (merged - unmerged).abs().max() < 0.5
    plain = lorakit.merge_and_unload(model)
    with torch.no_grad():
        torch.testing.assert_close(plain(tokens).logits, unmerged, atol=1e-5, rtol=0)


def test_dequantize_reads_both_4bit_layouts(llama_dir):
    model = load(llama_dir)
    layer = model.model.layers[0].mlp.down_proj
    standard = qbnb.dequantize_4bit(layer.weight)
    reference = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert torch.equal(standard, reference)
    repack_for_cpu(model)
    packed = qbnb.dequantize_4bit(layer.weight)
    assert not torch.equal(bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state), standard)
    # the repacked scales are the double-quantised ones rounded to bf16 (8 significant bits): that far, no further
    assert (packed - standard).abs().max() <= 2**-8 * standard.abs().max()
    assert (packed - standard).abs().max() > 0
    if bnb.functional.has_avx512bf16():  # bitsandbytes' own bf16 kernel on the packed data agrees to bf16 rounding
        layer.support_avx512bf16_for_cpu = True
        with torch.no_grad():
            kernel = layer(torch.eye(128)).T
        assert (kernel - packed).abs().max() <= 2**-8 * packed.abs().max()


def test_cpu_repacking_is_switched_off_so_gradients_keep_flowing(llama_dir, tokens):
    model = load(llama_dir)  # lorakit's loader switches it off for every 4-bit layer
    assert not any(m.support_avx512bf16_for_cpu for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    with torch.no_grad():
        model(tokens)
    assert not any(qbnb.is_cpu_packed(m.weight) for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))
    layer = model.model.layers[0].mlp.down_proj
    repack_for_cpu(model)  # as bitsandbytes leaves a layer after one evaluation on an AVX512-BF16 CPU ...
    x = torch.randn(3, 128, requires_grad=True)
    if bnb.functional.has_avx512bf16():  # (elsewhere bitsandbytes has no kernel for the packed layout)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "an autograd kernel was not registered": the gradient is dropped
            layer(x).sum().backward()
        assert x.grad is None  # ... no gradient reaches its input any more: why lorakit switches it off
    lorakit.inject(model, LoraConfig(r=4, target_modules=["down_proj"]))
    wrapped = model.model.layers[0].mlp.down_proj
    wrapped.train()
    wrapped(x).sum().backward()  # lorakit's path reads the packed layout and differentiates through it
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_storage_is_half_a_byte_per_weight_plus_double_quantised_scales(llama_dir):
    model = load(llama_dir)
    nbytes, params = lorakit.quant.storage_bytes(model)
    shapes = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)] * 2
    assert params == sum(o * i for o, i in shapes)
    # per layer: 4-bit codes, one 8-bit scale per 64 weights, one fp32 scale per 256 of those, an fp32 offset, and
    # its own copies of the NF4 table (16 fp32) and of the 8-bit scales' table (256 fp32): 1 KiB, noise in big layers
    tables = 16 * 4 + 256 * 4
    assert nbytes == sum(o * i // 2 + o * i // 64 + 4 * math.ceil(o * i / 64 / 256) + 4 + tables for o, i in shapes)
    repack_for_cpu(model)  # bf16 scales, no double quantisation (so no 8-bit table)
    assert lorakit.quant.storage_bytes(model) == (sum(o * i // 2 + o * i // 64 * 2 + 16 * 4 for o, i in shapes), params)
    assert lorakit.trainable_parameters(model, verbose=False).total == sum(p.numel() for p in
                                                                          lorakit.load_base_model(llama_dir).parameters())


def test_requantize_merges_into_4_bits_and_prints_each_layers_error(llama_dir, tokens, capsys):
    model = qlora(llama_dir)
    with torch.no_grad():
        unmerged = model(tokens).logits
    merged = lorakit.merge_and_unload(model, requantize=True)
    out = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in out and "error/|dW|" in out and len(out.strip().splitlines()) == 15
    assert isinstance(merged.model.layers[0].mlp.down_proj, bnb.nn.Linear4bit) and not lorakit.is_merged(merged)
    with torch.no_grad():
        assert 1e-4 < (merged(tokens).logits - unmerged).abs().max() < 0.5


def test_int8_base_equals_peft_merges_and_unmerges_exactly(llama_dir, tokens):
    ours = qlora(llama_dir, "int8")
    layer = ours.model.layers[0].mlp.down_proj
    assert layer.kind == "linear8bit" and layer.adapters["default"].lora_A.shape == (4, 128)
    peft = peft_twin(llama_dir, ours, "int8")
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens).logits, peft(tokens).logits, atol=1e-5, rtol=0)
        ours.train()  # bitsandbytes' training path multiplies by the dequantised weight: merged = unmerged there
        expected = ours(tokens).logits
    before = [layer.base_layer.weight.data.clone(), layer.base_layer.state.SCB.clone()]
    lorakit.merge(ours)
    lorakit.unmerge(ours)
    assert torch.equal(before[0], layer.base_layer.weight.data) and torch.equal(before[1], layer.base_layer.state.SCB)
    plain = lorakit.merge_and_unload(ours)
    with torch.no_grad():
        torch.testing.assert_close(plain(tokens).logits, expected, atol=1e-5, rtol=0)


def test_quantising_without_bitsandbytes_says_how_to_install_it(llama_dir, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(MissingDependencyError, match=r"pip install 'bitsandbytes"):
        lorakit.load_base_model(llama_dir, quantize="nf4")


def test_an_already_quantised_base_is_loaded_as_it_is(llama_dir, tmp_path, tokens):
    load(llama_dir).save_pretrained(tmp_path / "q")
    with pytest.warns(UserWarning, match="already quantised .*bitsandbytes nf4.* not applied"):
        again = load(tmp_path / "q", "nf4")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain_load = lorakit.load_base_model(tmp_path / "q").eval()
    layer, first = again.model.layers[0].mlp.down_proj, plain_load.model.layers[0].mlp.down_proj
    assert torch.equal(qbnb.dequantize_4bit(layer.weight), qbnb.dequantize_4bit(first.weight))


def test_a_quantised_layer_lorakit_does_not_know_is_refused_by_name(llama, tokens):
    class QuantLinear(nn.Linear):  # like a GPTQ/HQQ layer: integer weights lorakit cannot add a delta to
        def __init__(self, in_f, out_f):
            super().__init__(in_f, out_f, bias=False)
            self.weight = nn.Parameter(torch.zeros(out_f, in_f, dtype=torch.int8), requires_grad=False)

    llama.model.layers[0].self_attn.q_proj = QuantLinear(64, 64)
    with pytest.raises(TargetModulesNotFoundError, match="'model.layers.0.self_attn.q_proj', a QuantLinear, which LoRA "
                                                         "cannot wrap.*bitsandbytes"):
        lorakit.inject(llama, LoraConfig(target_modules=["q_proj"]))
    lorakit.inject(llama, LoraConfig(target_modules="all-linear"))  # all-linear passes over it
    assert "model.layers.0.self_attn.q_proj" not in dict(lorakit.state.lora_layers(llama))


def test_one_adapter_per_row_on_a_4bit_base_equals_each_adapter_alone(llama_dir, tokens):
    model = qlora(llama_dir)
    lorakit.inject(model, LoraConfig(r=8, alpha=8, target_modules="all-linear"), adapter="b")
    randomise_lora(model, std=0.1, seed=1)
    ids = tokens[:1].repeat(3, 1)
    with torch.no_grad():
        mixed = model(ids, adapter_names=["default", "b", None]).logits
        for row, name in enumerate(["default", "b"]):
            lorakit.set_active(model, name)
            torch.testing.assert_close(mixed[row], model(ids[:1]).logits[0], atol=1e-5, rtol=0)
        with lorakit.disabled(model):
            torch.testing.assert_close(mixed[2], model(ids[:1]).logits[0], atol=1e-6, rtol=0)


def test_merging_a_zero_adapter_into_4_bits_reports_the_absolute_error_not_a_percentage(llama_dir, capsys):
    model = load(llama_dir)
    lorakit.inject(model, LoraConfig(r=4, target_modules="all-linear"))  # B = 0: ΔW = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lorakit.merge(model)
    [message] = [str(w.message) for w in caught if "re-quantises" in str(w.message)]
    assert "the adapter's update is zero" in message and "|error| = " in message and "%" not in message
    lorakit.unmerge(model)
    lorakit.merge_and_unload(model, requantize=True)
    rows = capsys.readouterr().out.strip().splitlines()[1:]
    assert len(rows) == 14 and all(row.endswith("(|dW|=0)") and "%" not in row for row in rows)
    assert all(float(row.split()[1]) == 0 and float(row.split()[2]) > 0 for row in rows)  # ΔW = 0; the rounding's error


def test_a_nonzero_adapter_still_gets_its_share_of_the_update(llama_dir):
    model = qlora(llama_dir)
    with pytest.warns(UserWarning, match=r"the rounding changes up to \d+% of the adapter's update"):
        lorakit.merge(model)
