"""combine_adapters: PEFT's add_weighted_adapter definitions, checked against PEFT (linear, cat, svd, and the random
methods given the same draws) and against the formulas; the result is an ordinary adapter."""

import json

import pytest
import torch

import lorakit
from lorakit import LoraConfig
from lorakit.compose.combine import combine_adapter_files, merge_tensors
from lorakit.errors import ConfigError, IncompatibleAdapterError
from lorakit.state import lora_layers

from ..conftest import load, randomise_lora

ATOL = 1e-5
WEIGHTS = {"a": 0.6, "b": -0.4}


@pytest.fixture
def two_adapters(llama_dir, tmp_path):
    """Two saved adapters on the tiny Llama: same targets and rank (what the factor methods need)."""
    paths = {}
    for i, name in enumerate(("a", "b")):
        model = load(llama_dir)
        lorakit.inject(model, LoraConfig(r=4, alpha=8 + 8 * i, target_modules=["q_proj", "v_proj", "gate_proj"]))
        randomise_lora(model, seed=i)
        paths[name] = lorakit.save_adapter(model, tmp_path / name)
    return paths


def _ours(llama_dir, paths):
    model = load(llama_dir)
    for name, path in paths.items():
        lorakit.load_adapter(model, path, adapter=name, activate=False)
    return model


def _peft(llama_dir, paths):
    from peft import PeftModel

    model = PeftModel.from_pretrained(load(llama_dir), paths["a"], adapter_name="a")
    model.load_adapter(paths["b"], adapter_name="b")
    return model


@pytest.mark.parametrize("method,kw", [("linear", {}), ("cat", {}), ("svd", {}), ("svd", {"rank": 3}),
                                       ("ties", {"density": 0.5}), ("magnitude_prune", {"density": 0.5}),
                                       ("dare_linear", {"density": 0.7}), ("dare_ties", {"density": 0.7}),
                                       ("ties_svd", {"density": 0.5}), ("dare_linear_svd", {"density": 0.7})])
def test_logits_equal_peft(llama_dir, two_adapters, tokens, method, kw, monkeypatch):
    # DARE draws its masks with torch.bernoulli from the global generator; PEFT also draws its new adapter's
    # initial weights from it first, so the same seed does not give the same masks. Give both libraries the same
    # stream of masks instead (both draw them in the same order: layer by layer, A's then B's).
    real = torch.bernoulli

    def same_draws():
        g = torch.Generator().manual_seed(3)
        monkeypatch.setattr(torch, "bernoulli", lambda p: real(p, generator=g))

    ours = _ours(llama_dir, two_adapters)
    same_draws()
    lorakit.combine_adapters(ours, WEIGHTS, method=method, name="ab", seed=3, **kw)
    theirs = _peft(llama_dir, two_adapters)
    same_draws()
    theirs.add_weighted_adapter(["a", "b"], list(WEIGHTS.values()), "ab", combination_type=method,
                                density=kw.get("density"), svd_rank=kw.get("rank"))
    theirs.set_adapter("ab")
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens).logits, theirs(tokens).logits, atol=ATOL, rtol=0)


def test_cat_is_exactly_the_weighted_sum_of_running_both(llama_dir, two_adapters, tokens):
    model = _ours(llama_dir, two_adapters)
    lorakit.set_active(model, WEIGHTS)
    with torch.no_grad():
        both = model(tokens).logits
    lorakit.combine_adapters(model, WEIGHTS, method="cat", name="ab")
    assert lorakit.active_adapters(model) == [("ab", 1.0)]
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, both, atol=ATOL, rtol=0)
    layer = dict(lora_layers(model))["model.layers.0.self_attn.q_proj"]
    assert layer.adapters["ab"].rank == 8  # ranks add up


def test_svd_at_full_rank_equals_cat_and_truncation_keeps_the_top(llama_dir, two_adapters):
    model = _ours(llama_dir, two_adapters)
    lorakit.combine_adapters(model, WEIGHTS, method="cat", name="cat")
    lorakit.combine_adapters(model, WEIGHTS, method="svd", name="svd8", rank=8)
    lorakit.combine_adapters(model, WEIGHTS, method="svd", name="svd2", rank=2)
    for _, layer in lora_layers(model):
        exact = layer.adapters["cat"].delta_weight(layer)
        torch.testing.assert_close(layer.adapters["svd8"].delta_weight(layer), exact, atol=1e-5, rtol=1e-4)
        U, S, Vh = torch.linalg.svd(exact)
        torch.testing.assert_close(layer.adapters["svd2"].delta_weight(layer), (U[:, :2] * S[:2]) @ Vh[:2],
                                   atol=1e-5, rtol=1e-4)


def test_dare_is_reproducible_and_keeps_the_expected_share(llama_dir, two_adapters):
    model = _ours(llama_dir, two_adapters)
    state = torch.random.get_rng_state()
    lorakit.combine_adapters(model, {"a": 1.0}, method="dare_linear", density=0.25, seed=7, name="d1")
    lorakit.combine_adapters(model, {"a": 1.0}, method="dare_linear", density=0.25, seed=7, name="d2")
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's generator is untouched
    layer = dict(lora_layers(model))["model.layers.1.mlp.gate_proj"]
    d1, d2, a = layer.adapters["d1"], layer.adapters["d2"], layer.adapters["a"]
    assert torch.equal(d1.lora_A, d2.lora_A)
    kept = d1.lora_A != 0
    assert 0.15 < kept.float().mean() < 0.35
    # kept entries are the original's, times √(w·s) (the weight split between A and B) and 1/density
    torch.testing.assert_close(d1.lora_A[kept], (a.lora_A * a.scale**0.5 / 0.25)[kept])


def test_merge_utils_against_the_formulas():
    t1 = torch.tensor([[3.0, -1.0], [0.5, 2.0]])
    t2 = torch.tensor([[-2.0, -4.0], [1.0, 0.1]])
    w = torch.tensor([1.0, 0.5])
    torch.testing.assert_close(merge_tensors([t1, t2], w, "linear", None), t1 + 0.5 * t2)
    # magnitude_prune at density 0.5 keeps the 2 largest |entries| of each tensor
    kept1, kept2 = torch.tensor([[3.0, 0.0], [0.0, 2.0]]), torch.tensor([[-2.0, -4.0], [0.0, 0.0]])
    torch.testing.assert_close(merge_tensors([t1, t2], w, "magnitude_prune", 0.5), kept1 + 0.5 * kept2)
    # TIES: signs elected by the sum of the pruned tensors; agreeing entries averaged (weighted)
    ties = merge_tensors([t1, t2], w, "ties", 0.5)
    expected = torch.tensor([[3.0, -2.0], [0.0, 2.0]])  # [0,0]: 3 vs -2 → +, only t1 agrees; [0,1]: only t2 (-4·0.5)
    torch.testing.assert_close(ties, expected)


def test_magnitude_prune_keeps_the_k_largest_like_top_k():
    from lorakit.compose.combine import _keep_largest

    g = torch.Generator().manual_seed(0)
    t = torch.randn(64, 16, generator=g)
    for density in (0.1, 0.5, 0.9):
        k = int(density * t.numel())
        top = torch.zeros(t.numel())
        top[torch.topk(t.abs().reshape(-1), k).indices] = 1
        assert torch.equal(_keep_largest(t, density), t * top.view(t.shape))  # PEFT's definition
    assert torch.equal(_keep_largest(t, 0.0001), torch.zeros_like(t))  # k = 0 keeps nothing
    zeros_b = torch.cat([torch.zeros(500), torch.randn(100, generator=g)])  # a freshly initialised B: mostly 0
    kept = _keep_largest(zeros_b, 0.5)
    assert torch.equal(kept[500:], zeros_b[500:]) and not kept[:500].any()


def test_result_is_an_ordinary_adapter(llama_dir, two_adapters, tmp_path, tokens):
    from peft import PeftModel

    model = _ours(llama_dir, two_adapters)
    lorakit.combine_adapters(model, WEIGHTS, method="svd", name="ab", rank=3)
    with torch.no_grad():
        combined = model(tokens).logits
    path = lorakit.save_adapter(model, tmp_path / "ab", adapter="ab")
    assert json.loads((path / "adapter_config.json").read_text())["r"] == 3
    theirs = PeftModel.from_pretrained(load(llama_dir), path)
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, combined, atol=ATOL, rtol=0)
        lorakit.merge(model, adapter="ab")
        torch.testing.assert_close(model(tokens).logits, combined, atol=ATOL, rtol=0)
        lorakit.unmerge(model)
        mixed = model(torch.cat([tokens, tokens]), adapter_names=["ab", "a", "ab", None]).logits
        torch.testing.assert_close(mixed[0], combined[0], atol=ATOL, rtol=0)


def test_different_targets_need_cat_or_svd(llama_dir, tmp_path, tokens):
    model = load(llama_dir)
    lorakit.inject(model, LoraConfig(r=4, target_modules=["q_proj"]), adapter="q")
    lorakit.inject(model, LoraConfig(r=2, target_modules=["v_proj"]), adapter="v")
    randomise_lora(model)
    with pytest.raises(IncompatibleAdapterError, match=r"adapter 'v' has no factors on \['model.layers.0.self_attn.q_proj'"):
        lorakit.combine_adapters(model, {"q": 1.0, "v": 1.0}, method="linear")
    lorakit.set_active(model, ["q", "v"])
    with torch.no_grad():
        both = model(tokens).logits
    lorakit.inject(model, LoraConfig(r=4, target_modules=["q_proj"]), adapter="q2")
    # a layer that only an adapter left out of the combination adapts (v's v_proj) is not one q2 lacks
    lorakit.combine_adapters(model, {"q": 1.0, "q2": 1.0}, method="linear", name="qq")
    lorakit.combine_adapters(model, {"q": 1.0, "v": 1.0}, method="cat", name="qv")
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, both, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kw,match", [
    ({"weights": {"a": float("nan"), "b": 1.0}}, "finite"),
    ({"method": "ties", "density": 0.0}, r"0 < density ≤ 1"),
    ({"method": "ties", "density": 1.5}, r"0 < density ≤ 1"),
    ({"method": "dare_linear"}, "density"),
    ({"method": "averaged"}, "method must be one of"),
    ({"method": "cat", "rank": 2}, "rank= applies to the SVD methods"),
    ({"name": "a"}, "already has an adapter named 'a'"),
])
def test_bad_input(llama_dir, two_adapters, kw, match):
    model = _ours(llama_dir, two_adapters)
    args = {"weights": WEIGHTS, "method": "svd", "name": "ab", **kw}
    with pytest.raises((ConfigError, lorakit.AdapterExistsError), match=match):
        lorakit.combine_adapters(model, **args)
    assert "ab" not in lorakit.list_adapters(model)


def test_command_line_combines_files(llama_dir, two_adapters, tmp_path, tokens):
    from lorakit.cli import main

    out = tmp_path / "cli"
    assert main(["combine", f"a={two_adapters['a']}:0.6", f"b={two_adapters['b']}:-0.4", "--method", "cat",
                 "--out", str(out)]) == 0
    model = _ours(llama_dir, two_adapters)
    lorakit.combine_adapters(model, WEIGHTS, method="cat", name="ab")
    from_cli = load(llama_dir)
    lorakit.load_adapter(from_cli, out)
    with torch.no_grad():
        torch.testing.assert_close(from_cli(tokens).logits, model(tokens).logits, atol=ATOL, rtol=0)
    assert main(["combine", f"a={two_adapters['a']}", "--method", "ties", "--density", "2", "--out", str(out)]) == 2


def test_dora_adapters_are_refused_by_name(llama_dir):
    model = load(llama_dir)
    lorakit.inject(model, LoraConfig(r=4, target_modules=["q_proj"], use_dora=True), adapter="d")
    lorakit.inject(model, LoraConfig(r=4, target_modules=["q_proj"]), adapter="p")
    with pytest.raises(IncompatibleAdapterError, match="adapter 'd' is a dora adapter"):
        lorakit.combine_adapters(model, {"d": 0.5, "p": 0.5}, method="cat")
    with pytest.raises(IncompatibleAdapterError, match="dora adapter"):
        lorakit.resize_adapter(model, "d", rank=2)


# --- combining adapter files without a base (lorakit combine without --base) ----------------------------


def _llama(hidden):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128)).eval()


def _adapter_file(model, path, targets, seed=0, base=None):
    lorakit.inject(model, LoraConfig(r=4, target_modules=targets))
    randomise_lora(model, seed=seed)
    path = lorakit.save_adapter(model, path)
    if base is not None:
        cfg = json.loads((path / "adapter_config.json").read_text())
        (path / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": base}))
    return path


def test_files_from_different_bases_are_refused_naming_the_layer(tmp_path, cli):
    small = _adapter_file(_llama(64), tmp_path / "small", ["q_proj"], base="org/llama-64")
    large = _adapter_file(_llama(96), tmp_path / "large", ["q_proj"], seed=1, base="org/llama-96")
    for method in ("cat", "svd", "linear"):
        with pytest.raises(IncompatibleAdapterError, match=r"different bases: layer 'model.layers.0.self_attn.q_proj' "
                                                            r"takes 64 inputs to 64 outputs in the first and 96 to 96"):
            combine_adapter_files([(small, 0.5), (large, 0.5)], tmp_path / "out", method=method)
    code, out, err = cli("combine", f"a={small}", f"b={large}", "--method", "cat", "--out", tmp_path / "out")
    assert code == 2 and not (tmp_path / "out").exists()
    assert len(err.strip().splitlines()) == 1 and "model.layers.0.self_attn.q_proj" in err
    assert "org/llama-64" in err and "org/llama-96" in err


def test_files_naming_other_bases_of_one_shape_are_combined_with_one_warning(llama_dir, tmp_path):
    a = _adapter_file(load(llama_dir), tmp_path / "a", ["q_proj"], base="org/one")
    b = _adapter_file(load(llama_dir), tmp_path / "b", ["q_proj"], seed=1, base="org/other")
    c = _adapter_file(load(llama_dir), tmp_path / "c", ["q_proj"], seed=2, base="org/third")
    with pytest.warns(lorakit.errors.ConfigWarning, match="different base models") as caught:
        combine_adapter_files([(a, 0.5), (b, 0.3), (c, 0.2)], tmp_path / "out", method="cat")
    assert len([w for w in caught if "different base models" in str(w.message)]) == 1
    assert "org/other" in str(caught[0].message)


@pytest.mark.parametrize("method,kw", [("linear", {}), ("ties", {"density": 0.5})])
def test_files_on_other_layers_are_refused_by_the_factor_methods(llama_dir, tmp_path, method, kw):
    q = _adapter_file(load(llama_dir), tmp_path / "q", ["q_proj"])
    v = _adapter_file(load(llama_dir), tmp_path / "v", ["v_proj"], seed=1)
    qv = _adapter_file(load(llama_dir), tmp_path / "qv", ["q_proj", "v_proj"], seed=2)
    # disjoint targets: each layer has one adapter, which the old check let through
    with pytest.raises(IncompatibleAdapterError, match=rf"adapter '{v}' has no factors on "
                                                       r"\['model.layers.0.self_attn.q_proj', 'model.layers.1"):
        combine_adapter_files([(q, 0.5), (v, 0.5)], tmp_path / "out", method=method, **kw)
    # partial overlap: the message names the adapter and the layers it lacks (as combine_adapters does)
    with pytest.raises(IncompatibleAdapterError, match=rf"adapter '{q}' has no factors on \['model.layers.0.self_attn.v_proj'"):
        combine_adapter_files([(qv, 0.5), (q, 0.5)], tmp_path / "out", method=method, **kw)
    assert not (tmp_path / "out").exists()
    combine_adapter_files([(q, 0.5), (v, 0.5)], tmp_path / "out", method="cat")  # cat takes them


def test_files_of_gpt2_keep_fan_in_fan_out(gpt2_dir, tmp_path, tokens):
    from peft import PeftModel

    a = _adapter_file(load(gpt2_dir), tmp_path / "a", ["c_attn", "c_fc"])
    b = _adapter_file(load(gpt2_dir), tmp_path / "b", ["c_attn", "c_fc"], seed=1)
    assert json.loads((a / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    out = combine_adapter_files([(a, 0.6), (b, 0.4)], tmp_path / "ab", method="linear")
    assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    ours = lorakit.load_adapter(load(gpt2_dir), out)
    theirs = PeftModel.from_pretrained(load(gpt2_dir), out).eval()  # PEFT reads the Conv1D factors by that flag
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, ours(tokens).logits, atol=ATOL, rtol=0)


def test_weights_are_any_real_number_and_density_no_bool(llama_dir, two_adapters, tokens, tmp_path):
    import numpy as np

    model = _ours(llama_dir, two_adapters)
    lorakit.combine_adapters(model, WEIGHTS, method="cat", name="floats")
    lorakit.combine_adapters(model, {"a": np.float32(0.6), "b": torch.tensor(-0.4)}, method="cat", name="others")
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, adapter_names=["others"] * 2).logits,
                                   model(tokens, adapter_names=["floats"] * 2).logits, atol=ATOL, rtol=0)
    combine_adapter_files([(two_adapters["a"], np.float64(0.5)), (two_adapters["b"], torch.tensor(2))], tmp_path / "o")
    for bad in (torch.tensor(float("nan")), np.float32("inf"), torch.tensor([0.5]), True, "0.5"):
        with pytest.raises(ConfigError, match="finite real number"):
            lorakit.combine_adapters(model, {"a": bad}, method="cat", name="bad")
        with pytest.raises(ConfigError, match="finite real number"):
            combine_adapter_files([(two_adapters["a"], bad)], tmp_path / "bad")
    for density in (True, float("nan"), "0.5"):
        with pytest.raises(ConfigError, match="0 < density ≤ 1"):
            lorakit.combine_adapters(model, WEIGHTS, method="ties", density=density, name="bad")
    lorakit.combine_adapters(model, WEIGHTS, method="ties", density=np.float32(0.5), name="np_density")


def test_the_issues_example_command(llama_dir, two_adapters, tmp_path, tokens, cli):
    """`lorakit combine a=DIR:0.6 b=DIR:0.4 --method ties --density 0.5 --out DIR`, as issue 9 writes it."""
    out = tmp_path / "ab"
    code, stdout, _ = cli("combine", f"a={two_adapters['a']}:0.6", f"b={two_adapters['b']}:0.4", "--method", "ties",
                          "--density", "0.5", "--out", out)
    assert code == 0 and f"written to {out}" in stdout
    from_cli = lorakit.load_adapter(load(llama_dir), out)
    model = _ours(llama_dir, two_adapters)
    lorakit.combine_adapters(model, {"a": 0.6, "b": 0.4}, method="ties", density=0.5, name="ab")
    with torch.no_grad():
        expected = model(tokens).logits
        torch.testing.assert_close(from_cli(tokens).logits, expected, atol=ATOL, rtol=0)
        assert not torch.allclose(expected, load(llama_dir)(tokens).logits, atol=1e-3)  # it does change the output
