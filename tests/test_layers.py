"""The LoRA math against the formula: y = base(x) + scale · x Aᵀ Bᵀ, for every supported layer type."""

import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit.layers import ActiveAdapter, LoraLayer


def make(base, r=4, alpha=8.0, rslora=False, seed=0):
    torch.manual_seed(seed)
    layer = LoraLayer(base.requires_grad_(False))
    scale = alpha / (math.sqrt(r) if rslora else r)
    adapter = layer.add_adapter("a", r, scale)
    layer.active = [ActiveAdapter("a", 1.0)]
    return layer, adapter


def test_zero_init_is_bit_exact_for_linear():
    base = nn.Linear(16, 24)
    layer, adapter = make(base)
    x = torch.randn(3, 5, 16)
    assert torch.equal(adapter.lora_B, torch.zeros(24, 4))
    assert torch.equal(layer(x), base(x))


@pytest.mark.parametrize("rslora", [False, True])
def test_linear_matches_formula(rslora):
    base = nn.Linear(16, 24)
    layer, a = make(base, r=4, alpha=8, rslora=rslora)
    nn.init.normal_(a.lora_B)
    scale = 8 / (2.0 if rslora else 4)
    assert a.scale == pytest.approx(scale)
    x = torch.randn(3, 5, 16)
    expected = base(x) + scale * (x @ a.lora_A.T @ a.lora_B.T)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_conv1d_gpt2_transposed_weight():
    base = Conv1D(24, 16)  # nf=24 outputs, nx=16 inputs; weight is (16, 24)
    layer, a = make(base)
    assert a.lora_A.shape == (4, 16) and a.lora_B.shape == (24, 4)
    nn.init.normal_(a.lora_B)
    x = torch.randn(2, 7, 16)
    torch.testing.assert_close(layer(x), base(x) + a.scale * x @ a.lora_A.T @ a.lora_B.T, atol=1e-5, rtol=1e-5)
    # merge delta is laid out like Conv1D's (in, out) weight
    w = base.weight + a.delta_weight(layer)
    torch.testing.assert_close(x @ w + base.bias, layer(x), atol=1e-5, rtol=1e-5)


def test_embedding():
    base = nn.Embedding(50, 12)
    layer, a = make(base)
    assert a.lora_A.shape == (4, 50) and a.lora_B.shape == (12, 4)
    nn.init.normal_(a.lora_B)
    ids = torch.randint(0, 50, (3, 6))
    expected = base(ids) + a.scale * (a.lora_A.T[ids] @ a.lora_B.T)
    torch.testing.assert_close(layer(ids), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(nn.functional.embedding(ids, base.weight + a.delta_weight(layer)), expected,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 3])
def test_conv2d(k):
    base = nn.Conv2d(6, 10, k, padding=k // 2, stride=1)
    layer, a = make(base)
    assert a.lora_A.shape == (4, 6, k, k) and a.lora_B.shape == (10, 4, 1, 1)
    nn.init.normal_(a.lora_B)
    x = torch.randn(2, 6, 9, 9)
    lora = nn.functional.conv2d(nn.functional.conv2d(x, a.lora_A, padding=k // 2), a.lora_B)
    torch.testing.assert_close(layer(x), base(x) + a.scale * lora, atol=1e-4, rtol=1e-4)
    merged = nn.functional.conv2d(x, base.weight + a.delta_weight(layer), base.bias, padding=k // 2)
    torch.testing.assert_close(merged, layer(x), atol=1e-4, rtol=1e-4)


def test_fused_backward_matches_autograd():
    """The hand-written backward gives the gradients plain autograd gives."""
    base = nn.Linear(16, 24)
    layer, a = make(base)
    base.bias.requires_grad_(True)  # bias="lora_only" trains it
    nn.init.normal_(a.lora_B)
    x = torch.randn(3, 5, 16, requires_grad=True)
    out = layer(x)
    g = torch.randn_like(out)
    out.backward(g)
    got = [x.grad.clone(), a.lora_A.grad.clone(), a.lora_B.grad.clone(), base.bias.grad.clone()]
    for t in (x, a.lora_A, a.lora_B, base.bias):
        t.grad = None
    ref = base(x) + a.scale * (x @ a.lora_A.T @ a.lora_B.T)
    ref.backward(g)
    for mine, theirs in zip(got, [x.grad, a.lora_A.grad, a.lora_B.grad, base.bias.grad]):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)


def test_gaussian_init_and_unsupported_layer():
    layer = LoraLayer(nn.Linear(8, 8))
    a = layer.add_adapter("g", r=4, scale=1.0, init="gaussian")
    assert a.lora_A.std().item() == pytest.approx(0.25, rel=0.5)
    with pytest.raises(TypeError, match="cannot wrap LayerNorm"):
        LoraLayer(nn.LayerNorm(8))


@pytest.mark.parametrize("conv1d", [False, True])
def test_long_batches_fold_the_update_and_stay_exact(conv1d):
    """Many rows take the folded-weight path (fused._fold_is_cheaper): same output and gradients as the formula,
    and the base output bit for bit while B = 0."""
    from lorakit.fused import _fold_is_cheaper

    base = Conv1D(24, 16) if conv1d else nn.Linear(16, 24)
    layer, a = make(base)
    x = torch.randn(3, 50, 16, requires_grad=True)
    assert _fold_is_cheaper(150, 24, base.weight, 4)  # this input really takes the fold path
    with torch.no_grad():
        assert torch.equal(layer(x), base(x))
    assert torch.equal(layer(x), base(x))
    nn.init.normal_(a.lora_B)
    out = layer(x)
    g = torch.randn_like(out)
    out.backward(g)
    got = [x.grad.clone(), a.lora_A.grad.clone(), a.lora_B.grad.clone()]
    for t in (x, a.lora_A, a.lora_B):
        t.grad = None
    ref = base(x) + a.scale * (x @ a.lora_A.T @ a.lora_B.T)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    ref.backward(g)
    for mine, theirs in zip(got, [x.grad, a.lora_A.grad, a.lora_B.grad]):
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)
