"""AdaLoRA: the SVD-form update against its formula and PEFT 0.21.2 (files both ways, the allocator, the
regulariser), merge, training, the rank budget, the plain-LoRA form and per-row serving."""

import copy
import json
import warnings

import pytest
import torch

import lorakit
from lorakit import AdaLoraConfig
from lorakit.errors import AdapterFileError, ConfigError
from lorakit.state import adapter_layers
from lorakit.variants.adalora_budget import budget_schedule

from ..conftest import VOCAB, load, randomise_lora

TARGETS = ["q_proj", "v_proj", "down_proj"]  # three widths: 64->64, 64->32, 128->64
ATOL = 1e-5


def ada(**kw):
    return AdaLoraConfig(**{"init_r": 6, "target_r": 3, "target_modules": TARGETS, "total_step": 10, "tinit": 2,
                            "tfinal": 3, "alpha": 8, **kw})


def peft_ada(**kw):
    from peft import AdaLoraConfig as PeftAdaLoraConfig

    return PeftAdaLoraConfig(**{"init_r": 6, "target_r": 3, "target_modules": TARGETS, "total_step": 10, "tinit": 2,
                                "tfinal": 3, "lora_alpha": 8, **kw})


def train_steps(model, tokens, steps, after_step, extra_loss=None, lr=1e-2):
    """A few AdamW steps with the allocator after each (PEFT adds its regulariser inside forward; we add ours)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(1, steps + 1):
        loss = model(input_ids=tokens, labels=tokens).loss
        if extra_loss is not None:
            loss = loss + extra_loss(model)
        loss.backward()
        opt.step()
        after_step(model, step)
        opt.zero_grad(set_to_none=True)
    return model.eval()


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def test_output_equals_the_formula(llama, tokens):
    lorakit.inject(llama, ada())
    randomise_lora(llama)
    layer = llama.model.layers[0].mlp.down_proj
    a = layer.adapters["default"]
    x = torch.randn(2, 5, 128)
    expected = x @ layer.base_layer.weight.T + (x @ (a.lora_A * a.lora_E).T @ a.lora_B.T) * (8 / (6 + 1e-5))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, atol=ATOL, rtol=0)  # inference: the fused path
    layer.train()
    torch.testing.assert_close(layer(x.requires_grad_()), expected, atol=ATOL, rtol=0)  # the autograd Function
    assert a.lora_A.shape == (6, 128) and a.lora_E.shape == (6, 1) and a.lora_B.shape == (64, 6)


def test_starts_as_the_base_and_counts_parameters(llama, tokens):
    before = logits(llama, tokens)
    lorakit.inject(llama, ada())
    assert torch.equal(logits(llama, tokens), before)  # E = 0
    count = lorakit.trainable_parameters(llama, verbose=False)
    # per layer: init_r·(in + out + 1); 2 layers of q (64, 64), v (64, 32), down (128, 64)
    assert count.trainable == 2 * 6 * ((64 + 64 + 1) + (64 + 32 + 1) + (128 + 64 + 1))


def test_peft_loads_ours_with_equal_logits(llama, tokens, tmp_path):
    from peft import PeftModel

    base = copy.deepcopy(llama)
    lorakit.inject(llama, ada())
    train_steps(llama, tokens, 8, lorakit.adalora_step, lorakit.adalora_orth_loss)  # prunes: budget phase + final
    lorakit.save_adapter(llama, tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and saved["init_r"] == 6 and saved["deltaT"] == 1
    pattern = saved["rank_pattern"]
    assert set(pattern) == {f"model.layers.{i}.{m}.lora_E" for i in (0, 1) for m in
                            ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}
    assert all(len(v) == 6 and all(isinstance(b, bool) for b in v) for v in pattern.values())
    assert sum(map(sum, pattern.values())) == 3 * 6  # pruned to target_r per layer on average at total_step - tfinal
    peft_model = PeftModel.from_pretrained(base, tmp_path / "ours").eval()
    torch.testing.assert_close(logits(peft_model, tokens), logits(llama, tokens), atol=ATOL, rtol=0)
    with peft_model.disable_adapter():  # and the adapter does something
        assert (logits(peft_model, tokens) - logits(llama, tokens)).abs().max() > 1e-3


def test_we_load_peft_after_it_pruned(llama, tokens, tmp_path):
    from peft import get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(copy.deepcopy(llama), peft_ada())
    train_steps(peft_model, tokens, 9, lambda m, step: m.base_model.update_and_allocate(step))
    peft_model.save_pretrained(tmp_path / "peft")
    pattern = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["rank_pattern"]
    ranks = [sum(v) for v in pattern.values()]
    assert sum(ranks) == 18 and len(set(ranks)) > 1  # a non-trivial pattern: the ranks differ per layer
    files = lorakit.check_adapter_files(tmp_path / "peft", llama)
    assert files.config.method == "adalora" and files.config.rank_for("model.layers.0.self_attn.q_proj") == sum(
        pattern["model.layers.0.self_attn.q_proj.lora_E"])
    lorakit.load_adapter(llama, tmp_path / "peft")
    before = logits(llama, tokens)
    torch.testing.assert_close(before, logits(peft_model, tokens), atol=ATOL, rtol=0)
    assert sorted(a.rank for _, _, a in adapter_layers(llama, "default")) == sorted(ranks)
    # saved again by us, the file is PEFT's file
    lorakit.save_adapter(llama, tmp_path / "again")
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["rank_pattern"] == pattern
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "peft" / "adapter_model.safetensors"), load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gpt2_conv1d_round_trip_with_peft(gpt2, tokens, tmp_path):
    from peft import PeftModel

    base = copy.deepcopy(gpt2)
    lorakit.inject(gpt2, ada(target_modules=["c_attn", "c_fc"]))
    randomise_lora(gpt2)
    lorakit.save_adapter(gpt2, tmp_path / "g")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(base, tmp_path / "g").eval()
    torch.testing.assert_close(logits(peft_model, tokens), logits(gpt2, tokens), atol=ATOL, rtol=0)


def test_merge_equals_unmerged_and_unmerge_is_bit_exact(llama, tokens):
    lorakit.inject(llama, ada())
    randomise_lora(llama)
    weights = {n: p.detach().clone() for n, p in llama.named_parameters()}
    unmerged = logits(llama, tokens)
    lorakit.merge(llama)
    torch.testing.assert_close(logits(llama, tokens), unmerged, atol=ATOL, rtol=0)
    for _ in range(100):
        lorakit.unmerge(llama)
        lorakit.merge(llama)
    lorakit.unmerge(llama)
    assert all(torch.equal(p, weights[n]) for n, p in llama.named_parameters())
    assert torch.equal(logits(llama, tokens), unmerged)


def test_training_changes_only_adalora_tensors(llama, tokens):
    lorakit.inject(llama, ada())
    before = {n: p.detach().clone() for n, p in llama.named_parameters()}
    train_steps(llama, tokens, 3, lorakit.adalora_step, lorakit.adalora_orth_loss)
    changed = {n for n, p in llama.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.rsplit(".", 1)[-1] in ("lora_A", "lora_E", "lora_B") for n in changed)
    assert {n.rsplit(".", 1)[-1] for n in changed} == {"lora_A", "lora_E", "lora_B"}


def test_allocator_matches_peft_on_the_same_gradients(llama, tokens):
    """PEFT trains; after each of its steps our allocator sees the same weights and gradients: the moving
    averages, the pruned triplets, the rank pattern and the budget agree with PEFT's RankAllocator bit for bit."""
    from peft import get_peft_model

    from lorakit.state import get_state

    ours = copy.deepcopy(llama)
    lorakit.inject(ours, ada(tinit=1, tfinal=2, delta_t=2))
    peft_model = get_peft_model(llama, peft_ada(tinit=1, tfinal=2, deltaT=2))
    peft_layers = {n: m for n, m in peft_model.base_model.model.named_modules() if hasattr(m, "lora_E")}
    layers = {n: a for n, _, a in adapter_layers(ours, "default")}
    allocator = peft_model.base_model.rankallocator
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    compared = pruned = 0
    for step in range(1, 11):
        peft_model(input_ids=tokens, labels=tokens).loss.backward()
        opt.step()
        with torch.no_grad():
            for name, a in layers.items():
                for t in ("lora_A", "lora_E", "lora_B"):
                    p = getattr(peft_layers[name], t)["default"]
                    getattr(a, t).copy_(p)
                    getattr(a, t).grad = p.grad.clone()
        total = lorakit.adalora_step(ours, step)
        peft_model.base_model.update_and_allocate(step)
        opt.zero_grad(set_to_none=True)
        for name, a in layers.items():
            if f"{name}.lora_E.default" in allocator.exp_avg_ipt:  # PEFT drops them at total_step - tfinal
                for t in ("A", "E", "B"):
                    key = f"{name}.lora_{t}.default"
                    assert torch.equal(getattr(a, f"ipt_{t}"), allocator.exp_avg_ipt[key])
                    assert torch.equal(getattr(a, f"unc_{t}"), allocator.exp_avg_unc[key])
                compared += 1
            assert torch.equal(a.lora_E, peft_layers[name].lora_E["default"])  # the same triplets pruned (E_i = 0)
        pattern = peft_model.peft_config["default"].rank_pattern
        if pattern:
            assert get_state(ours).configs["default"].rank_pattern == {k.replace(".default", ""): v for k, v in pattern.items()}
            assert total == sum(map(sum, pattern.values()))
            pruned += 1
    assert compared == 6 * 7 and pruned >= 5 and total == 3 * 6


def test_budget_schedule_is_cubic():
    config = ada(init_r=12, target_r=8, total_step=100, tinit=10, tfinal=20, delta_t=5)
    init, target = 12 * 4, 8 * 4
    assert budget_schedule(config, 10, init, target) == (init, False)
    assert budget_schedule(config, 45, init, target) == (int(16 * 0.5**3 + 32), True)  # half way: (1 - 1/2)³
    assert budget_schedule(config, 46, init, target)[1] is False  # only every delta_t steps
    assert budget_schedule(config, 80, init, target) == (target, True)


def test_orth_loss_equals_peft(llama, tokens):
    from peft import get_peft_model

    ours = copy.deepcopy(llama)
    lorakit.inject(ours, ada())
    # (PEFT adds the regulariser in the forward of its task models only, hence the task type)
    peft_model = get_peft_model(copy.deepcopy(llama), peft_ada(task_type="CAUSAL_LM")).train()
    randomise_lora(peft_model, std=0.3)
    with torch.no_grad():
        for name, _, a in adapter_layers(ours, "default"):
            m = peft_model.base_model.model.get_submodule(name)
            for t in ("lora_A", "lora_E", "lora_B"):
                getattr(a, t).copy_(getattr(m, t)["default"])
    ours.train()
    with_reg = peft_model(input_ids=tokens, labels=tokens).loss
    plain = ours(input_ids=tokens, labels=tokens).loss
    torch.testing.assert_close(plain + lorakit.adalora_orth_loss(ours), with_reg, atol=1e-5, rtol=1e-6)


def test_lora_form_has_equal_outputs_in_lorakit_and_peft(llama, tokens, tmp_path):
    from peft import PeftModel

    base = copy.deepcopy(llama)
    lorakit.inject(llama, ada(target_r=1, tfinal=0))
    train_steps(llama, tokens, 10, lorakit.adalora_step, lorakit.adalora_orth_loss)
    with torch.no_grad():  # one layer loses every triplet: the LoRA form leaves it out
        a = llama.model.layers[1].self_attn.q_proj.adapters["default"]
        a.rank_mask.zero_()
        a.lora_E.zero_()
    lorakit.save_adapter(llama, tmp_path / "ada")
    lorakit.adalora_to_lora(tmp_path / "ada", tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["lora_alpha"] == config["r"]  # scale 1: vLLM's α/r is right too
    assert "model.layers.1.self_attn.q_proj" not in config["target_modules"]
    assert all(config["alpha_pattern"][m] == k for m, k in config["rank_pattern"].items())
    expected = logits(llama, tokens)
    again = lorakit.load_adapter(copy.deepcopy(base), tmp_path / "lora")
    torch.testing.assert_close(logits(again, tokens), expected, atol=ATOL, rtol=0)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "lora").eval()
    torch.testing.assert_close(logits(peft_model, tokens), expected, atol=ATOL, rtol=0)
    with pytest.raises(AdapterFileError, match="only AdaLoRA"):
        lorakit.adalora_to_lora(tmp_path / "lora", tmp_path / "x")
    from lorakit.cli import main

    assert main(["convert", str(tmp_path / "ada"), "--to", "lora", "--out", str(tmp_path / "cli")]) == 0
    assert json.loads((tmp_path / "cli" / "adapter_config.json").read_text()) == config


def test_per_row_batch_with_adalora_equals_each_row_alone(llama, tokens, tmp_path):
    lorakit.inject(llama, ada(), adapter="ada")
    lorakit.inject(llama, lorakit.LoraConfig(r=4, target_modules=["q_proj"]), adapter="plain")
    randomise_lora(llama)
    names = ["ada", None, "plain"]
    batch = torch.randint(0, VOCAB, (3, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), lorakit.adapter_rows(llama, names):
        mixed = llama(batch).logits
    for i, name in enumerate(names):
        lorakit.set_active(llama, name or [])
        torch.testing.assert_close(mixed[i], logits(llama, batch[i:i + 1])[0], atol=ATOL, rtol=0)


def test_config_round_trip_and_clear_errors(llama):
    config = ada(rank_pattern={"model.layers.0.self_attn.q_proj.lora_E.default": [True, False] * 3})
    assert config.rank_for("model.layers.0.self_attn.q_proj") == 3 and config.rank_for("other") == 6
    again = AdaLoraConfig.from_peft_dict(json.loads(json.dumps(config.to_peft_dict())))
    assert again == config and again.method == "adalora"
    with pytest.raises(ConfigError, match="total_step"):
        AdaLoraConfig(target_modules=TARGETS)
    with pytest.raises(ConfigError, match="no budgeting phase"):
        ada(tinit=5, tfinal=5)
    with pytest.raises(ConfigError, match="init_r is 6"):
        ada(rank_pattern={"model.layers.0.self_attn.q_proj": [True]})
    with pytest.raises(ConfigError, match="exceeds init_r"):
        ada(target_r=7)
    with pytest.raises(ConfigError, match="embed_tokens.*embedding"):
        lorakit.inject(llama, ada(target_modules=["embed_tokens"]))


def test_server_store_serves_adalora_per_row(llama_dir, tmp_path):
    """The server's store loads an AdaLoRA adapter as it is (its row factors are E ⊙ A and scale·B)."""
    from lorakit.serve.store import AdapterStore

    model = load(llama_dir)
    lorakit.inject(model, ada())
    randomise_lora(model)
    lorakit.save_adapter(model, tmp_path / "ada")
    batch = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))
    expected = logits(model, batch)
    with lorakit.disabled(model):
        base = logits(model, batch)
    store = AdapterStore(load(llama_dir), root=tmp_path)
    store.register("ada", "ada")
    with torch.no_grad(), store.rows(["ada", None]) as served:
        out = served(batch).logits
    torch.testing.assert_close(out[0], expected[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(out[1], base[1], atol=ATOL, rtol=0)


def test_conv2d_matches_peft_and_merges(tmp_path):
    from peft import PeftModel

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1)).eval()
    base = copy.deepcopy(net)
    lorakit.inject(net, ada(target_modules=["0", "2"]))
    randomise_lora(net)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        expected = net(x)
        lorakit.save_adapter(net, tmp_path / "conv")
        peft_model = PeftModel.from_pretrained(base, tmp_path / "conv").eval()
        torch.testing.assert_close(peft_model(x), expected, atol=ATOL, rtol=0)
        lorakit.merge(net)
        torch.testing.assert_close(net(x), expected, atol=ATOL, rtol=0)


def test_loading_a_peft_adalora_adapter_warns_about_no_key(llama, tmp_path, cli, monkeypatch):
    """AdaLoRA's own keys (init_r, deltaT, ...) are known; a key nobody knows is still warned about, once."""
    from peft import get_peft_model

    monkeypatch.setattr("lorakit.config._WARNED", set())  # keys warned about by earlier tests would hide a warning
    get_peft_model(copy.deepcopy(llama), peft_ada()).save_pretrained(tmp_path / "peft")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lorakit.load_adapter(llama, tmp_path / "peft")
        code, out, err = cli("inspect", tmp_path / "peft")
    assert code == 0 and "adalora" in out.lower()
    assert [str(w.message) for w in caught] == [] and "warn" not in err.lower()
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({**config, "future_key": 1}))
    with pytest.warns(UserWarning, match="does not know, 'future_key'") as caught:
        AdaLoraConfig.from_peft_dict({**config, "future_key": 1})
        AdaLoraConfig.from_peft_dict({**config, "future_key": 1})
    assert len(caught) == 1


def test_peft_spelling_delta_t_is_accepted():
    config = ada(deltaT=4)  # as PEFT's AdaLoraConfig spells it
    assert config.delta_t == 4 and config.deltaT == 4 and config.to_peft_dict()["deltaT"] == 4
    assert config == ada(delta_t=4) and config.replace(target_r=2).delta_t == 4
    assert AdaLoraConfig.from_peft_dict(config.to_peft_dict()) == config
    assert ada(delta_t=4, deltaT=4) == config
    with pytest.raises(ConfigError, match="delta_t=3 and deltaT=4"):
        ada(delta_t=3, deltaT=4)
    with pytest.raises(ConfigError, match="delta_t must be a positive integer"):
        ada(deltaT=0)
