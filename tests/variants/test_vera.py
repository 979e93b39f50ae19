"""VeRA: the formula, PEFT's files both ways (with and without the shared projections), merge, training only the
λ vectors, per-row batches beside LoRA, serving, and clear errors for what VeRA cannot do."""

import json
import math
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from lorakit import LoraConfig, VeraConfig
from lorakit.errors import AdapterFileError, ConfigError, IncompatibleAdapterError, ShapeMismatchError
from lorakit.state import adapter_layers
from lorakit.variants.vera import draw_projections, vera_linear

from ..conftest import VOCAB, load

ATOL = 1e-5
LLAMA_TARGETS = ["q_proj", "k_proj", "down_proj"]  # widths 64→64, 64→32, 128→64: sliced projections
GPT2_TARGETS = ["c_attn", "c_fc", "c_proj"]  # Conv1D, weights stored (in, out)


def ids(rows=2, length=12, seed=1):
    return torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def randomise_lambdas(model, seed=0):
    """λ_b starts at zero (a no-op adapter): give both vectors non-zero values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "vera_lambda" in name or "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def vera(model, r=16, targets=LLAMA_TARGETS, adapter="default", **kw):
    lorakit.inject(model, VeraConfig(r=r, target_modules=targets, **kw), adapter=adapter)
    randomise_lambdas(model)
    return model


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def reference(layer, a, x):
    """The paper's formula written out: base(x) + λ_b ⊙ (B[:out, :r] (λ_d ⊙ (A[:r, :in] x)))."""
    A, B = a.projections.vera_A, a.projections.vera_B
    in_f, out_f = layer.features
    u = x @ A[: a.rank, :in_f].T
    return layer.base_layer(x) + a.vera_lambda_b * ((a.vera_lambda_d * u) @ B[:out_f, : a.rank].T)


# --- the math ------------------------------------------------------------------------------------


def test_projections_are_drawn_as_the_paper_and_peft_draw_them():
    A, B = draw_projections(7, 16, 128, 64)
    g = torch.Generator().manual_seed(7)  # Kaiming-uniform with gain √2: bound √(6 / fan-in)
    expected_A = torch.empty(16, 128).uniform_(-math.sqrt(6 / 128), math.sqrt(6 / 128), generator=g)
    expected_B = torch.empty(64, 16).uniform_(-math.sqrt(6 / 16), math.sqrt(6 / 16), generator=g)
    torch.testing.assert_close(A, expected_A, atol=1e-7, rtol=0)
    torch.testing.assert_close(B, expected_B, atol=1e-7, rtol=0)


@pytest.mark.parametrize("rows", [3, 40], ids=["row-wise", "folded"])
def test_output_equals_the_formula(llama, rows):
    vera(llama)
    for name, layer, a in adapter_layers(llama, "default"):
        x = torch.randn(rows, layer.features[0], generator=torch.Generator().manual_seed(2))
        expected = reference(layer, a, x)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), expected, atol=ATOL, rtol=0)  # fused, inference
        torch.testing.assert_close(layer(x.requires_grad_()), expected, atol=ATOL, rtol=0)  # fused, with a graph
        lorakit.set_active(llama, {"default": 0.5})  # weighted: the adapter's output() route
        torch.testing.assert_close(layer(x), (expected + layer.base_layer(x)) / 2, atol=ATOL, rtol=0)
        lorakit.set_active(llama, "default")


def test_starts_as_the_base_exactly(llama, gpt2):
    for model, targets in ((llama, LLAMA_TARGETS), (gpt2, GPT2_TARGETS)):
        x = ids()
        before = logits(model, x)
        lorakit.inject(model, VeraConfig(r=16, target_modules=targets))
        assert torch.equal(logits(model, x), before)  # λ_b = 0
        assert all(torch.all(a.vera_lambda_d == 0.1) for _, _, a in adapter_layers(model, "default"))


def test_projections_are_stored_once(llama):
    vera(llama, targets="all-linear")
    adapters = [a for _, _, a in adapter_layers(llama, "default")]
    assert len(adapters) == 14 and len({id(a.projections) for a in adapters}) == 1
    p = adapters[0].projections
    assert p.vera_A.shape == (16, 128) and p.vera_B.shape == (128, 16)  # widest in (down) and out (gate, up)
    assert sum(1 for _ in llama.buffers() if _.shape in ((16, 128), (128, 16))) == 2  # not a copy per layer
    llama.to(torch.float64)  # moving the model moves the one pair once
    assert all(a.projections is p for a in adapters) and p.vera_A.dtype == adapters[5].vera_lambda_b.dtype == torch.float64


def test_trainable_parameters_are_the_lambdas(llama):
    vera(llama, targets="all-linear")
    expected = sum(16 + layer.features[1] for _, layer, _ in adapter_layers(llama, "default"))
    assert lorakit.trainable_parameters(llama, verbose=False).trainable == expected


@pytest.mark.parametrize("rows", [3, 40], ids=["row-wise", "folded"])
@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
def test_hand_written_backward_matches_autograd(rows, transposed):
    g = torch.Generator().manual_seed(0)
    in_f, out_f, r = 8, 6, 4
    A, B = (torch.randn(r, 10, generator=g, dtype=torch.float64)[:, :in_f],
            torch.randn(7, r, generator=g, dtype=torch.float64)[:out_f])  # slices of a wider pair
    weight = torch.randn((in_f, out_f) if transposed else (out_f, in_f), generator=g, dtype=torch.float64)
    bias = torch.randn(out_f, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(rows, in_f, generator=g, dtype=torch.float64, requires_grad=True)
    lambda_d = torch.randn(r, generator=g, dtype=torch.float64, requires_grad=True)
    lambda_b = torch.randn(out_f, generator=g, dtype=torch.float64, requires_grad=True)
    projections = lorakit.variants.vera.VeraProjections(A, B)

    def fn(x, bias, lambda_d, lambda_b):
        return vera_linear(x, weight, bias, lambda_d, lambda_b, A, B, 0.7, transposed, projections)

    assert torch.autograd.gradcheck(fn, (x, bias, lambda_d, lambda_b))


# --- PEFT's files, both ways ---------------------------------------------------------------------


CASES = {
    "llama": ("llama_dir", LLAMA_TARGETS),
    "gpt2-conv1d": ("gpt2_dir", GPT2_TARGETS),
}


@pytest.mark.parametrize("save_projection", [True, False], ids=["with-projections", "from-seed"])
@pytest.mark.parametrize("case", list(CASES))
def test_our_adapter_loads_in_peft(case, save_projection, request, tmp_path):
    from peft import PeftModel

    fixture, targets = CASES[case]
    path = request.getfixturevalue(fixture)
    ours = vera(load(path), targets=targets, save_projection=save_projection, projection_seed=3)
    lorakit.save_adapter(ours, tmp_path / "a")
    keys = set(load_file(tmp_path / "a" / "adapter_model.safetensors"))
    assert ({"base_model.vera_A", "base_model.vera_B"} <= keys) == save_projection
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns when it must redraw the projections from the seed
        theirs = PeftModel.from_pretrained(load(path), tmp_path / "a").eval()
    torch.testing.assert_close(logits(theirs, ids()), logits(ours, ids()), atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("save_projection", [True, False], ids=["with-projections", "from-seed"])
@pytest.mark.parametrize("case", list(CASES))
def test_peft_adapter_loads_in_ours(case, save_projection, request, tmp_path):
    import peft

    fixture, targets = CASES[case]
    path = request.getfixturevalue(fixture)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(load(path), peft.VeraConfig(r=16, target_modules=targets, projection_prng_key=5,
                                                                 save_projection=save_projection)).eval()
        randomise_lambdas(theirs)
        theirs.save_pretrained(tmp_path / "p")
    ours = lorakit.load_adapter(load(path), tmp_path / "p")
    torch.testing.assert_close(logits(ours, ids()), logits(theirs, ids()), atol=ATOL, rtol=ATOL)
    # the same adapter saved by us has PEFT's keys, shapes and config fields
    lorakit.save_adapter(ours, tmp_path / "a")
    mine, peft_file = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("a", "p"))
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in peft_file.items()}
    assert all(torch.equal(mine[k], peft_file[k]) for k in mine)
    cfg, peft_cfg = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("a", "p"))
    assert {k: cfg[k] for k in ("peft_type", "r", "projection_prng_key", "save_projection", "d_initial", "fan_in_fan_out")} \
        == {k: peft_cfg[k] for k in ("peft_type", "r", "projection_prng_key", "save_projection", "d_initial", "fan_in_fan_out")}


def test_config_round_trips_through_peft_fields():
    config = VeraConfig(r=32, target_modules=["q_proj"], projection_seed=9, save_projection=False, dropout=0.1,
                        d_initial=0.05, bias="vera_only", layers_to_transform=1)
    d = config.to_peft_dict()
    assert (d["peft_type"], d["projection_prng_key"], d["vera_dropout"], d["bias"]) == ("VERA", 9, 0.1, "vera_only")
    assert VeraConfig.from_peft_dict(d) == config and config.bias == "lora_only" and config.method == "vera"
    with pytest.raises(ConfigError, match="bias"):
        VeraConfig(bias="lora_B")
    with pytest.raises(ConfigError, match="r must be a positive integer"):
        VeraConfig(r=0)


# --- merge, training, per-row batches, serving -----------------------------------------------------


def test_merged_equals_unmerged_and_unmerge_is_bit_exact(gpt2):
    vera(gpt2, targets=GPT2_TARGETS)
    x = ids()
    unmerged = logits(gpt2, x)
    weights = {n: p.detach().clone() for n, p in gpt2.named_parameters()}
    lorakit.merge(gpt2)
    torch.testing.assert_close(logits(gpt2, x), unmerged, atol=ATOL, rtol=0)
    lorakit.unmerge(gpt2)
    for _ in range(99):
        lorakit.merge(gpt2)
        lorakit.unmerge(gpt2)
    assert all(torch.equal(p, weights[n]) for n, p in gpt2.named_parameters())
    assert torch.equal(logits(gpt2, x), unmerged)


def test_training_changes_only_the_lambdas(llama):
    lorakit.inject(llama, VeraConfig(r=16, target_modules="all-linear"))  # λ_b = 0: λ_d's gradient starts at zero
    before = {n: t.detach().clone() for n, t in [*llama.named_parameters(), *llama.named_buffers()]}
    opt = torch.optim.AdamW([p for p in llama.parameters() if p.requires_grad], lr=1e-2)
    llama.train()
    x = ids(4, 16)
    losses = []
    for _ in range(4):
        loss = llama(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    changed = {n for n, t in [*llama.named_parameters(), *llama.named_buffers()] if not torch.equal(t, before[n])}
    assert changed == {n for n in before if "vera_lambda" in n}  # every λ_b and λ_d, and nothing else
    assert losses[-1] < losses[0]


def test_fused_gradients_equal_peft(llama_dir):
    """The hand-written backward gives PEFT's (autograd's) gradients on the same weights."""
    import peft

    x = ids(2, 40)  # 80 rows: the folded path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(load(llama_dir), peft.VeraConfig(r=16, target_modules="all-linear", init_weights=False))
    randomise_lambdas(theirs)
    ours = lorakit.inject(load(llama_dir), VeraConfig(r=16, target_modules="all-linear"))
    theirs.train(), ours.train()
    with torch.no_grad():
        for (name, _, a) in adapter_layers(ours, "default"):
            peft_layer = theirs.base_model.model.get_submodule(name)
            a.vera_lambda_b.copy_(peft_layer.vera_lambda_b["default"])
            a.vera_lambda_d.copy_(peft_layer.vera_lambda_d["default"])
    theirs(x, labels=x).loss.backward()
    ours(x, labels=x).loss.backward()
    for name, _, a in adapter_layers(ours, "default"):
        peft_layer = theirs.base_model.model.get_submodule(name)
        torch.testing.assert_close(a.vera_lambda_b.grad, peft_layer.vera_lambda_b["default"].grad, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(a.vera_lambda_d.grad, peft_layer.vera_lambda_d["default"].grad, atol=1e-5, rtol=1e-4)


def test_mixed_batch_with_vera_and_lora_rows_equals_each_alone(llama):
    vera(llama, targets="all-linear", adapter="v")
    lorakit.inject(llama, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), adapter="l")
    randomise_lambdas(llama, seed=1)
    names = ["v", "l", None, "v"]
    x = ids(len(names), 10)
    expected = []
    for i, name in enumerate(names):
        if name is None:
            with lorakit.disabled(llama):
                expected.append(logits(llama, x[i : i + 1]))
        else:
            lorakit.set_active(llama, name)
            expected.append(logits(llama, x[i : i + 1]))
    for length in (10, 3):  # batched products, and few tokens per row
        with torch.no_grad():
            got = llama(x[:, :length], adapter_names=names).logits
        torch.testing.assert_close(got, torch.cat(expected)[:, :length], atol=ATOL, rtol=0)


def test_the_server_store_serves_a_vera_adapter(llama_dir, tmp_path):
    from lorakit.serve.store import AdapterStore

    saved = vera(load(llama_dir), targets="all-linear")
    lorakit.save_adapter(saved, tmp_path / "v")
    x = ids()
    expected = logits(saved, x)
    with lorakit.disabled(saved):
        base = logits(saved, x)
    store = AdapterStore(load(llama_dir), root=tmp_path)
    store.register("v", "v")
    with torch.no_grad(), store.rows(["v", None]) as model:
        got = model(x).logits
    torch.testing.assert_close(got[0], expected[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(got[1], base[1], atol=ATOL, rtol=0)


# --- what VeRA cannot do, and damaged files -----------------------------------------------------------


def test_layer_types_vera_cannot_adapt_are_named(llama):
    with pytest.raises(ConfigError, match=r"'model.embed_tokens', a Embedding.*Linear and GPT-2 Conv1D"):
        lorakit.inject(llama, VeraConfig(target_modules=["embed_tokens", "q_proj"]))
    assert lorakit.list_adapters(llama) == []


def test_layers_wider_than_the_shared_projections_are_named(llama_dir, tmp_path):
    saved = vera(load(llama_dir))
    lorakit.save_adapter(saved, tmp_path / "a")
    file = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(file)
    tensors["base_model.vera_A"] = tensors["base_model.vera_A"][:, :64].contiguous()  # down_proj reads 128
    save_file(tensors, file)
    model = load(llama_dir)
    with pytest.raises(ShapeMismatchError, match=r"vera_A has shape \(16, 64\).*'model.layers.0.mlp.down_proj' "
                                                 r"\(in=128, out=64, r=16\) needs at least \(16, 128\)"):
        lorakit.load_adapter(model, tmp_path / "a")
    assert lorakit.list_adapters(model) == []  # nothing half-loaded
    del tensors["base_model.vera_A"]
    save_file(tensors, file)
    with pytest.raises(IncompatibleAdapterError, match="incomplete"):
        lorakit.load_adapter(model, tmp_path / "a")
    tensors["base_model.vera_A"] = torch.full((16, 128), float("nan"))
    save_file(tensors, file)
    with pytest.raises(AdapterFileError, match="NaN"):
        lorakit.load_adapter(model, tmp_path / "a")


def test_vera_adapter_on_an_embedding_file_is_refused(llama_dir, tmp_path):
    saved = vera(load(llama_dir))
    lorakit.save_adapter(saved, tmp_path / "a")
    file = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(file)
    tensors["base_model.model.model.embed_tokens.vera_lambda_b"] = torch.zeros(64)
    save_file(tensors, file)
    with pytest.raises(IncompatibleAdapterError, match="embed_tokens.*not supported"):
        lorakit.check_adapter_files(tmp_path / "a", load(llama_dir))


def test_inspect_reports_the_method_and_the_trained_numbers(llama, tmp_path):
    from lorakit.inspect import inspect_adapter

    vera(llama, targets="all-linear")
    lorakit.save_adapter(llama, tmp_path / "a")
    report = inspect_adapter(tmp_path / "a")
    assert (report.method, report.r, report.alpha, report.scale, report.num_layers) == ("vera", 16, None, 1.0, 14)
    assert report.num_parameters == lorakit.trainable_parameters(llama, verbose=False).trainable
    assert "method         vera" in report.format() and "not available" in report.format()
