"""VeRA and AdaLoRA on bitsandbytes' 4-bit (and 8-bit) bases: equal to PEFT's same method on the same quantised model
and weights, training only the variant's tensors, and merging the way plain LoRA does (a full-precision
merge_and_unload equal to the unmerged model; unmerge restoring the packed weights bit for bit)."""

import pytest
import torch
from torch import nn

import lorakit
from lorakit import AdaLoraConfig, VeraConfig

bnb = pytest.importorskip("bitsandbytes")
from .test_bnb import load, merge_cycles, packed_state, repack_for_cpu, same_state  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:MatMul8bitLt", "ignore:merging into quantised weights")
TARGETS = ["q_proj", "v_proj", "down_proj"]  # three widths: 64->64, 64->32, 128->64


def vera_config(targets=TARGETS):
    return VeraConfig(r=16, target_modules=targets)


def adalora_config(targets=TARGETS):
    return AdaLoraConfig(init_r=6, target_r=3, target_modules=targets, total_step=10, tinit=2, tfinal=3, alpha=8)


def peft_config(method):
    from peft import AdaLoraConfig as PeftAdaLoraConfig
    from peft import VeraConfig as PeftVeraConfig

    if method == "vera":
        return PeftVeraConfig(r=16, target_modules=TARGETS)
    return PeftAdaLoraConfig(init_r=6, target_r=3, target_modules=TARGETS, total_step=10, tinit=2, tfinal=3,
                             lora_alpha=8)


def adapted(path, method, quantize="nf4", seed=0, targets=TARGETS):
    """Our method on a quantised load of `path`, every trained tensor random (so the adapter changes the output)."""
    model = load(path, quantize)
    lorakit.inject(model, vera_config(targets) if method == "vera" else adalora_config(targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def peft_twin(path, ours, method, quantize="nf4"):
    """PEFT's same method on its own quantised load of the base, holding our trained tensors."""
    from peft import get_peft_model

    peft = get_peft_model(load(path, quantize), peft_config(method))
    inner = peft.base_model.model
    names = ("vera_lambda_b", "vera_lambda_d") if method == "vera" else ("lora_A", "lora_E", "lora_B")
    with torch.no_grad():
        for name, layer in lorakit.state.lora_layers(ours):
            mine, theirs = layer.adapters["default"], inner.get_submodule(name)
            for n in names:
                getattr(theirs, n)["default"].copy_(getattr(mine, n))
    return peft.eval()


@pytest.mark.parametrize("method, quantize", [("vera", "nf4"), ("vera", "int8"), ("adalora", "nf4")])
def test_logits_and_gradients_equal_peft_on_a_quantised_base(llama_dir, tokens, method, quantize):
    ours = adapted(llama_dir, method, quantize)
    layer = ours.model.layers[0].mlp.down_proj
    assert layer.kind == ("linear4bit" if quantize == "nf4" else "linear8bit")
    peft = peft_twin(llama_dir, ours, method, quantize)
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens).logits, peft(tokens).logits, atol=1e-5, rtol=0)
    ours.train(), peft.train()
    ours(tokens, labels=tokens).loss.backward()
    peft(tokens, labels=tokens).loss.backward()
    inner = peft.base_model.model
    for name, layer in lorakit.state.lora_layers(ours):
        for pname, p in layer.adapters["default"].named_parameters():
            theirs = getattr(inner.get_submodule(name), pname)["default"]
            torch.testing.assert_close(p.grad, theirs.grad, atol=1e-6, rtol=1e-4, msg=f"{name}.{pname}")


@pytest.mark.parametrize("method", ["vera", "adalora"])
def test_training_on_a_4bit_base_changes_only_the_variants_tensors(llama_dir, tokens, method):
    model = load(llama_dir)
    lorakit.inject(model, vera_config() if method == "vera" else adalora_config())
    before_packed = packed_state(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.is_floating_point()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):
        model(tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.is_floating_point()
               and not torch.equal(p, before[n])}
    assert changed == ({"vera_lambda_b", "vera_lambda_d"} if method == "vera" else {"lora_A", "lora_E", "lora_B"})
    assert same_state(before_packed, packed_state(model))


@pytest.mark.parametrize("layout", ["standard", "cpu_packed"])
@pytest.mark.parametrize("method", ["vera", "adalora"])
def test_merge_on_a_4bit_base_behaves_like_loras(llama_dir, tokens, method, layout):
    # all-linear: a 4-bit layer left unwrapped runs bitsandbytes' own bf16 kernel on the CPU-packed layout, which
    # the full-precision merge_and_unload model does not reproduce (the LoRA test in test_bnb.py does the same)
    model = adapted(llama_dir, method, targets="all-linear")
    if layout == "cpu_packed":
        repack_for_cpu(model)
    unmerged, merged = merge_cycles(model, tokens)  # the packed data and its quantisation state, bit for bit
    # merged back into 4 bits, part of the update is rounded away: close to the unmerged output, not equal
    assert 1e-5 < (merged - unmerged).abs().max() < 0.5
    lorakit.merge(model)  # merge_and_unload starts again from the original weights, not from the rounded merge
    plain = lorakit.merge_and_unload(model)
    down = plain.model.layers[0].mlp.down_proj
    assert type(down) is nn.Linear and down.weight.dtype == torch.float32 and not lorakit.quant.is_quantized(plain)
    with torch.no_grad():
        torch.testing.assert_close(plain(tokens).logits, unmerged, atol=1e-5, rtol=0)


def test_vera_on_an_8bit_base_merges_and_unmerges_exactly(llama_dir, tokens):
    model = adapted(llama_dir, "vera", "int8")
    layer = model.model.layers[0].mlp.down_proj.base_layer
    with torch.no_grad():
        model.train()  # bitsandbytes' training path multiplies by the dequantised weight: merged = unmerged there
        expected = model(tokens).logits
    before = [layer.weight.data.clone(), layer.state.SCB.clone()]
    lorakit.merge(model)
    lorakit.unmerge(model)
    assert torch.equal(before[0], layer.weight.data) and torch.equal(before[1], layer.state.SCB)
    plain = lorakit.merge_and_unload(model)
    with torch.no_grad():
        torch.testing.assert_close(plain(tokens).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("rows", [3, 600])  # short: the low-rank term row by row; long: folded into the weight
def test_vera_fused_path_on_a_4bit_layer_equals_the_formula(llama_dir, rows):
    """base 4-bit output + λ_b ⊙ (B (λ_d ⊙ (A x))), and its gradients, with the weight dequantised on demand."""
    model = adapted(llama_dir, "vera")
    layer = model.model.layers[0].mlp.down_proj
    a = layer.adapters["default"]
    A, B = a.projection_slices()
    W = lorakit.quant.bnb.dequantize_4bit(layer.base_layer.weight)
    x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(2))
    x_ref = x.clone().requires_grad_()
    expected = x_ref @ W.T + a.vera_lambda_b * ((a.vera_lambda_d * (x_ref @ A.T)) @ B.T)
    expected.square().sum().backward()
    reference = [t.grad.clone() for t in (x_ref, a.vera_lambda_d, a.vera_lambda_b)]
    a.zero_grad()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)  # inference: no graph
    layer.train()
    x.requires_grad_()
    y = layer(x)
    assert y.grad_fn is not None and "VeraLinearFn" in type(y.grad_fn).__name__  # the hand-written backward
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    y.square().sum().backward()
    for got, want in zip((x.grad, a.vera_lambda_d.grad, a.vera_lambda_b.grad), reference):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(lorakit.quant.bnb.dequantize_4bit(layer.base_layer.weight), W)  # folding used a temporary
