"""DoRA: the layer output equals the formula for every layer type, PEFT's files both ways with equal logits,
merge/unmerge, training changes only DoRA's tensors (with PEFT's gradients), the norm is computed once per
step. Per-row batches are in test_dora_rows.py."""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import lorakit
from lorakit import LoraConfig, layers
from lorakit.errors import ConfigError
from lorakit.state import lora_layers
from lorakit.variants import dora

from .conftest import load

ATOL = 1e-5


def randomise_dora(model, std=0.2, seed=0):
    """Non-zero A and B, and magnitudes moved off the base's norms, so every part of DoRA shows in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


class TinyConv(nn.Module):
    """A k×k and a 1×1 Conv2d with biases, then a Linear head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 6, 1)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(h.mean((2, 3)))


def tiny_conv():
    torch.manual_seed(0)
    return TinyConv().eval()


IMAGES = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(2))

# name -> (model fixture or builder, target_modules, input kind)
CASES = {
    "llama-all-linear": ("llama", "all-linear"),
    "gpt2-conv1d": ("gpt2", ["c_attn", "c_proj", "c_fc"]),
    "llama-embedding": ("llama", ["embed_tokens", "v_proj"]),
    "conv2d": (tiny_conv, ["conv1", "conv2"]),
}


def base_model(case, request):
    source = CASES[case][0]
    return source() if callable(source) else request.getfixturevalue(source)


def fresh(case, request):
    source = CASES[case][0]
    return source() if callable(source) else load(request.getfixturevalue(f"{source}_dir"))


def run(model, x):
    with torch.no_grad():
        out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


def inputs(case, tokens):
    return IMAGES if case == "conv2d" else tokens


# --- the formula, layer by layer ------------------------------------------------------------------


class Holder(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def _conv1d_layer(n_in=10, n_out=12):
    from transformers.pytorch_utils import Conv1D

    c = Conv1D(n_out, n_in)  # weight (in, out)
    nn.init.normal_(c.bias)
    return c


LAYERS = {
    "linear": (lambda: nn.Linear(10, 12), lambda: torch.randn(3, 5, 10)),
    "conv1d": (_conv1d_layer, lambda: torch.randn(3, 5, 10)),
    "embedding": (lambda: nn.Embedding(20, 12), lambda: torch.randint(0, 20, (3, 5))),
    "conv2d-3x3": (lambda: nn.Conv2d(3, 6, 3, padding=1, stride=2), lambda: torch.randn(2, 3, 7, 7)),
}


def reference(layer, x, weight=1.0):
    """The paper's formula written out per layer type: W' = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖ (rows = output features)."""
    base, a = layer.base_layer, layer.adapters["default"]
    A, B, m, s = a.lora_A.detach(), a.lora_B.detach(), a.lora_magnitude_vector.detach(), a.scale
    W0 = base.weight.detach()
    if isinstance(base, nn.Linear):
        V = W0 + s * B @ A
        W = (m / V.norm(dim=1))[:, None] * V
        out, plain = F.linear(x, W, base.bias), base(x)
    elif isinstance(base, nn.Embedding):  # weight (vocab, dim): the norm runs over the vocabulary, per dimension
        V = W0 + s * (B @ A).T
        W = V * (m / V.norm(dim=0))[None, :]
        out, plain = F.embedding(x, W), base(x)
    elif isinstance(base, nn.Conv2d):
        V = W0 + s * (B.flatten(1) @ A.flatten(1)).view(W0.shape)
        W = V * (m / V.flatten(1).norm(dim=1)).view(-1, 1, 1, 1)
        out, plain = F.conv2d(x, W, base.bias, base.stride, base.padding), base(x)
    else:  # GPT-2 Conv1D: weight (in, out)
        V = W0 + s * (B @ A).T
        W = V * (m / V.norm(dim=0))[None, :]
        out, plain = x @ W + base.bias, base(x)
    return plain + weight * (out - plain)


@pytest.mark.parametrize("kind", list(LAYERS))
def test_layer_output_equals_the_formula(kind):
    make, make_x = LAYERS[kind]
    torch.manual_seed(0)
    model, x = Holder(make()), make_x()
    with torch.no_grad():
        plain = model(x)
    lorakit.inject(model, LoraConfig(r=3, alpha=6, target_modules=["layer"], use_dora=True))
    layer = model.layer
    with torch.no_grad():
        assert torch.equal(model(x), plain)  # B = 0 and m = ‖W0‖: the base output, bit for bit
    randomise_dora(model)
    with torch.no_grad():
        expected = reference(layer, x)
        torch.testing.assert_close(model(x), expected, atol=ATOL, rtol=1e-5)
        lorakit.set_active(model, [("default", 0.5)])  # weighted: y + w·(DoRA's contribution)
        torch.testing.assert_close(model(x), reference(layer, x, 0.5), atol=ATOL, rtol=1e-5)
        lorakit.set_active(model, "default")
    model.train()  # the training path (the fused function for Linear / Conv1D), with a graph
    y = model(x)
    torch.testing.assert_close(y.detach(), expected, atol=ATOL, rtol=1e-5)
    y.square().sum().backward()
    assert layer.adapters["default"].lora_magnitude_vector.grad.abs().sum() > 0


@pytest.mark.parametrize("rows", [5, 50], ids=["row-wise", "folded"])  # fused._fold_is_cheaper's two routes
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_fused_gradients_with_the_dora_factor(kind, rows):
    """The fused function with DoRA's factor g gives autograd's gradients for x, A, B, the bias and m."""
    from lorakit.fused import _fold_is_cheaper

    torch.manual_seed(0)
    model = Holder(nn.Linear(16, 24) if kind == "linear" else _conv1d_layer(16, 24))
    lorakit.inject(model, LoraConfig(r=4, alpha=8, target_modules=["layer"], use_dora=True, bias="lora_only"))
    randomise_dora(model)
    layer = model.layer
    a, base = layer.adapters["default"], layer.base_layer
    assert _fold_is_cheaper(3 * rows, 16, base.weight, 4) == (rows == 50)
    x = torch.randn(3, rows, 16, requires_grad=True)
    out = model(x)
    dy = torch.randn_like(out)
    out.backward(dy)
    params = [x, a.lora_A, a.lora_B, a.lora_magnitude_vector, base.bias]
    got = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    W0 = base.weight if kind == "linear" else base.weight.T
    n = (W0 + a.scale * a.lora_B @ a.lora_A).norm(dim=1).detach()
    ref = (a.lora_magnitude_vector / n) * (x @ W0.T + a.scale * (x @ a.lora_A.T) @ a.lora_B.T) + base.bias
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    ref.backward(dy)
    for mine, p in zip(got, params):
        torch.testing.assert_close(mine, p.grad, atol=1e-4, rtol=1e-4)


def test_config_method_and_peft_dict():
    config = LoraConfig(r=4, use_dora=True)
    assert config.method == "dora" and LoraConfig().method == "lora"
    d = config.to_peft_dict()
    assert d["use_dora"] is True and LoraConfig.from_peft_dict(d).use_dora is True
    assert LoraConfig().to_peft_dict()["use_dora"] is False


def test_unsupported_layer_is_refused_before_the_model_changes(monkeypatch):
    class Odd(nn.Linear):  # a layer type LoRA can wrap but DoRA cannot (as quantised layers would be)
        pass

    monkeypatch.setattr(layers, "LAYER_TYPES", [(Odd, layers.LayerType())] + layers.LAYER_TYPES)
    model = nn.Sequential()
    model.add_module("fine", nn.Linear(4, 4))
    model.add_module("odd_proj", Odd(4, 4))
    with pytest.raises(ConfigError, match="odd_proj.*Odd"):
        lorakit.inject(model, LoraConfig(r=2, target_modules=["fine", "odd_proj"], use_dora=True))
    assert type(model.fine) is nn.Linear and type(model.odd_proj) is Odd
    lorakit.inject(model, LoraConfig(r=2, target_modules=["fine", "odd_proj"]))  # plain LoRA takes it


# --- PEFT's files, both ways --------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_our_dora_adapter_loads_in_peft(case, request, tmp_path, tokens):
    from peft import PeftModel

    x = inputs(case, tokens)
    ours = base_model(case, request)
    lorakit.inject(ours, LoraConfig(r=4, alpha=8, target_modules=CASES[case][1], use_dora=True))
    randomise_dora(ours)
    lorakit.save_adapter(ours, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True and cfg["peft_type"] == "LORA"
    keys = load_file(tmp_path / "a" / "adapter_model.safetensors")
    magnitudes = {k: v.shape for k, v in keys.items() if k.endswith(".lora_magnitude_vector")}
    assert len(magnitudes) == len(list(lora_layers(ours)))
    theirs = PeftModel.from_pretrained(fresh(case, request), tmp_path / "a").eval()
    torch.testing.assert_close(run(theirs, x), run(ours, x), atol=ATOL, rtol=ATOL)
    # PEFT's magnitude shapes: (out,) for 2-D weights, (1, out, 1, 1) for Conv2d
    shapes = {k.removeprefix("base_model.model."): v.shape for k, v in theirs.state_dict().items() if "magnitude" in k}
    for key, shape in magnitudes.items():
        module = key.removeprefix("base_model.model.").removesuffix(".lora_magnitude_vector")
        assert shapes[f"{module}.lora_magnitude_vector.default.weight"] == shape
    assert lorakit.trainable_parameters(ours, verbose=False).trainable == sum(v.numel() for v in keys.values())


@pytest.mark.parametrize("case", list(CASES))
def test_peft_dora_adapter_loads_in_ours(case, request, tmp_path, tokens):
    import peft

    x = inputs(case, tokens)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=CASES[case][1], use_dora=True, init_lora_weights=False)
    theirs = peft.get_peft_model(fresh(case, request), config).eval()
    randomise_dora(theirs)
    theirs.save_pretrained(tmp_path / "p")
    ours = lorakit.load_adapter(base_model(case, request), tmp_path / "p")
    assert lorakit.read_adapter_config(tmp_path / "p").method == "dora"
    torch.testing.assert_close(run(ours, x), run(theirs, x), atol=ATOL, rtol=ATOL)


# --- merge --------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_merge_unmerge_and_unload(case, request, tokens):
    x = inputs(case, tokens)
    model = base_model(case, request)
    lorakit.inject(model, LoraConfig(r=4, alpha=8, target_modules=CASES[case][1], use_dora=True))
    randomise_dora(model)
    unmerged = run(model, x)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    lorakit.merge(model)
    torch.testing.assert_close(run(model, x), unmerged, atol=ATOL, rtol=ATOL)
    lorakit.unmerge(model)
    for _ in range(100):
        lorakit.merge(model)
        lorakit.unmerge(model)
    for n, p in model.named_parameters():
        assert torch.equal(p, weights[n]), n
    assert torch.equal(run(model, x), unmerged)
    plain = lorakit.merge_and_unload(model)
    assert not list(lora_layers(plain))
    torch.testing.assert_close(run(plain, x), unmerged, atol=ATOL, rtol=ATOL)


def test_weighted_merge_of_dora_and_lora_equals_the_weighted_forward(llama, tokens):
    lorakit.inject(llama, LoraConfig(r=4, target_modules="all-linear", use_dora=True), adapter="d")
    lorakit.inject(llama, LoraConfig(r=2, target_modules=["q_proj", "down_proj"]), adapter="l")
    lorakit.inject(llama, LoraConfig(r=3, target_modules=["q_proj", "o_proj"], use_dora=True), adapter="e")
    randomise_dora(llama)
    lorakit.set_active(llama, [("d", 0.7), ("l", 1.0), ("e", 0.4)])
    unmerged = run(llama, tokens)
    lorakit.merge(llama)  # each DoRA norm comes from the unmerged weight, as the forward computes it
    torch.testing.assert_close(run(llama, tokens), unmerged, atol=ATOL, rtol=ATOL)


# --- training -------------------------------------------------------------------------------------


def test_training_changes_only_dora_tensors_with_peft_gradients(llama_dir, tokens):
    import peft

    theirs = peft.get_peft_model(load(llama_dir), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                  use_dora=True, init_lora_weights=False))
    randomise_dora(theirs)
    ours = load(llama_dir)
    lorakit.inject(ours, LoraConfig(r=4, alpha=8, target_modules="all-linear", use_dora=True))
    theirs_params = {k.replace(".default", ""): p for k, p in theirs.named_parameters() if p.requires_grad}
    trainable = [(n, p) for n, p in ours.named_parameters() if p.requires_grad]
    assert {n.rsplit(".", 1)[1] for n, _ in trainable} == {"lora_A", "lora_B", "lora_magnitude_vector"}
    pairs = [(p, theirs_params["base_model.model." + n.replace(".adapters.default", "") + ".weight"]) for n, p in trainable]
    assert len(pairs) == len(theirs_params)
    with torch.no_grad():
        for p, q in pairs:
            p.copy_(q)
    for model in (ours, theirs):
        model.train()
        model(tokens, labels=tokens).loss.backward()
    for p, q in pairs:  # the norm is detached in both: same gradients, through our fused path
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-4)

    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    opt = torch.optim.AdamW([p for _, p in trainable], lr=1e-2)
    for _ in range(3):
        opt.step()
        opt.zero_grad()
        ours(tokens, labels=tokens).loss.backward()
    changed = {n for n, p in ours.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n, _ in trainable}


def test_dropout_in_training_matches_peft(llama_dir, tmp_path, tokens):
    """With dropout, PEFT rescales the base product of the dropped-out input; the same random mask, the same output."""
    import peft

    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["q_proj", "up_proj"], use_dora=True,
                             init_lora_weights=False)
    theirs = peft.get_peft_model(load(llama_dir), config)
    randomise_dora(theirs)
    theirs.save_pretrained(tmp_path)
    ours = lorakit.load_adapter(load(llama_dir), tmp_path, trainable=True)
    outs = []
    for model in (ours, theirs):
        model.train()
        torch.manual_seed(7)
        outs.append(run(model, tokens))
    torch.testing.assert_close(outs[0], outs[1], atol=ATOL, rtol=ATOL)
    ours.eval()
    assert not torch.allclose(run(ours, tokens), outs[0], atol=1e-3)  # dropout really acted


def test_row_norms_formula_and_cancellation():
    """‖W_i + s·B_i A‖ from r-wide products equals the direct norm, also where the update cancels a row."""
    g = torch.Generator().manual_seed(0)
    W, A, B = torch.randn(40, 30, generator=g), torch.randn(4, 30, generator=g), torch.randn(40, 4, generator=g)
    W[:5] = -0.5 * B[:5] @ A + 1e-3 * torch.randn(5, 30, generator=g)  # rows 0-4: the update at s = 0.5 cancels them
    exact = (W.double() + 0.5 * B.double() @ A.double()).norm(dim=1)
    got = dora.row_norms(W, A, B, 0.5, W.square().sum(1))
    peft_way = torch.linalg.norm(W + 0.5 * B @ A, dim=1)  # fp32 itself is only this exact on cancelled rows
    torch.testing.assert_close(got, peft_way, rtol=1e-6, atol=0)
    torch.testing.assert_close(got.double(), exact, rtol=1e-4, atol=0)
    got = dora.row_norms(W[5:], A, B[5:], 0.5, W[5:].square().sum(1))  # no cancellation: the r-wide products
    torch.testing.assert_close(got.double(), exact[5:], rtol=1e-6, atol=0)


def test_norm_is_computed_once_per_step_with_gradient_checkpointing(llama, tokens, monkeypatch):
    computed, asked = [], []
    real_norms, real_factor = dora.row_norms, dora.DoraAdapter.dora_factor
    monkeypatch.setattr(dora, "row_norms", lambda *a: computed.append(1) or real_norms(*a))
    monkeypatch.setattr(dora.DoraAdapter, "dora_factor", lambda self, layer: asked.append(1) or real_factor(self, layer))
    lorakit.inject(llama, LoraConfig(r=4, target_modules="all-linear", use_dora=True))
    n_layers = len(list(lora_layers(llama)))
    llama.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    llama.train()
    opt = torch.optim.AdamW([p for p in llama.parameters() if p.requires_grad], lr=1e-3)
    for step in range(3):
        computed.clear(), asked.clear()
        llama(tokens, labels=tokens).loss.backward()
        opt.step()  # changes A and B: the next step's norms are new
        opt.zero_grad()
        assert len(asked) == 2 * n_layers  # checkpointing ran every forward twice
        if step > 0:  # (step 0 still had the norms computed when the adapter was built)
            assert len(computed) == n_layers, step
