"""PiSSA / OLoRA init: A, B and the residual base equal PEFT's; saved files apply to the untouched base (rank 2r)
with equal outputs in lorakit and PEFT; the base is whole again when the adapter is disabled, deleted or unloaded."""

import json
import math

import pytest
import torch

import lorakit
from lorakit import LoraConfig
from lorakit.errors import ConfigError, IncompatibleAdapterError
from lorakit.rows import MixedBatchError
from lorakit.state import lora_layers

from ..conftest import load, perturb

TARGETS = ["q_proj", "v_proj", "down_proj"]
ATOL = 1e-5


def _peft(llama_dir, init, r=4, alpha=8, rslora=False):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    config = PeftLoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=init, use_rslora=rslora)
    return get_peft_model(load(llama_dir), config)


def _ours(llama_dir, init, r=4, alpha=8, rslora=False):
    model = load(llama_dir)
    lorakit.inject(model, LoraConfig(r=r, alpha=alpha, target_modules=TARGETS, init=init, rslora=rslora))
    return model


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_factors_and_residual_equal_peft(llama_dir, tokens, init):
    ours, theirs = _ours(llama_dir, init), _peft(llama_dir, init)
    inner = theirs.base_model.model
    for name, layer in lora_layers(ours):
        peft_layer = inner.get_submodule(name)
        a = layer.adapters["default"]
        torch.testing.assert_close(a.lora_A, peft_layer.lora_A["default"].weight, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(a.lora_B, peft_layer.lora_B["default"].weight, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(layer.base_layer.weight, peft_layer.base_layer.weight, atol=1e-6, rtol=1e-5)
    base = load(llama_dir)
    with torch.no_grad():
        start = ours(tokens).logits
        torch.testing.assert_close(start, base(tokens).logits, atol=ATOL, rtol=0)  # starts as the base
        perturb(ours), perturb(theirs)
        torch.testing.assert_close(ours(tokens).logits, theirs(tokens).logits, atol=ATOL, rtol=0)


def test_pissa_is_the_principal_part_of_w0(llama_dir):
    model = _ours(llama_dir, "pissa")
    original = load(llama_dir)
    for name, layer in lora_layers(model):
        a = layer.adapters["default"]
        w0 = original.get_submodule(name).weight
        principal = a.scale * a.lora_B @ a.lora_A
        U, S, Vh = torch.linalg.svd(w0)
        torch.testing.assert_close(principal, (U[:, :4] * S[:4]) @ Vh[:4], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(layer.base_layer.weight + principal, w0, atol=1e-6, rtol=1e-5)


def test_randomised_svd_init_reconstructs_w0(llama_dir, tokens):
    torch.manual_seed(0)
    model = _ours(llama_dir, "pissa_niter_4")
    original = load(llama_dir)
    for name, layer in lora_layers(model):
        a = layer.adapters["default"]
        w0 = original.get_submodule(name).weight
        torch.testing.assert_close(layer.base_layer.weight + a.scale * a.lora_B @ a.lora_A, w0, atol=1e-6, rtol=1e-5)
        exact = torch.linalg.svdvals(w0)[:4]
        found = torch.linalg.svdvals(a.scale * a.lora_B @ a.lora_A)[:4]
        # A projection of W0 never exceeds its singular values; 4 iterations get close to the top one even on a
        # random weight, whose spectrum is flat (the hardest case for a randomised SVD).
        assert (found <= exact * (1 + 1e-4)).all() and found[0] >= 0.9 * exact[0]


@pytest.mark.parametrize("init,rslora", [("pissa", False), ("olora", False), ("pissa", True)])
def test_saved_adapter_is_plain_lora_for_the_untouched_base(llama_dir, tmp_path, tokens, init, rslora):
    from peft import PeftModel

    model = _ours(llama_dir, init, rslora=rslora)
    perturb(model)
    with torch.no_grad():
        trained = model(tokens).logits
    path = lorakit.save_adapter(model, tmp_path / "a")
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["init_lora_weights"] is True
    assert config["lora_alpha"] == pytest.approx(8 * (math.sqrt(2) if rslora else 2))
    fresh = load(llama_dir)
    lorakit.load_adapter(fresh, path)
    theirs = PeftModel.from_pretrained(load(llama_dir), path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(tokens).logits, trained, atol=ATOL, rtol=0)
        torch.testing.assert_close(theirs(tokens).logits, trained, atol=ATOL, rtol=0)


def test_peft_residual_form_file_loads(llama_dir, tmp_path, tokens):
    """PEFT saves PiSSA as is (init_lora_weights="pissa"); loading re-initialises from the same base."""
    theirs = _peft(llama_dir, "pissa")
    perturb(theirs)
    theirs.save_pretrained(tmp_path / "p")
    ours = load(llama_dir)
    lorakit.load_adapter(ours, tmp_path / "p")
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens).logits, theirs(tokens).logits, atol=ATOL, rtol=0)


def test_residual_form_round_trip(llama_dir, tmp_path, tokens):
    model = _ours(llama_dir, "olora")
    perturb(model)
    lorakit.save_adapter(model, tmp_path / "r", residual_form=True)
    assert json.loads((tmp_path / "r" / "adapter_config.json").read_text())["init_lora_weights"] == "olora"
    again = load(llama_dir)
    lorakit.load_adapter(again, tmp_path / "r")
    with torch.no_grad():
        torch.testing.assert_close(again(tokens).logits, model(tokens).logits, atol=ATOL, rtol=0)


def test_the_base_is_whole_when_the_adapter_is_not_running(llama_dir, tokens):
    base = load(llama_dir)
    model = _ours(llama_dir, "pissa")
    perturb(model)
    lorakit.inject(model, LoraConfig(r=2, target_modules=["q_proj"]), adapter="plain", activate=False)
    with torch.no_grad():
        expected = base(tokens).logits
        with lorakit.disabled(model):
            torch.testing.assert_close(model(tokens).logits, expected, atol=ATOL, rtol=0)
        lorakit.set_active(model, "plain")  # B = 0: the other adapter alone is the base
        torch.testing.assert_close(model(tokens).logits, expected, atol=ATOL, rtol=0)
        lorakit.set_active(model, "default")
        lorakit.delete_adapter(model, "default")
        torch.testing.assert_close(model(tokens).logits, expected, atol=ATOL, rtol=0)
    for name, layer in lora_layers(model):
        torch.testing.assert_close(layer.base_layer.weight, base.get_submodule(name).weight, atol=1e-6, rtol=1e-5)


def test_unload_gives_back_the_base(llama_dir, tokens):
    base = load(llama_dir)
    model = _ours(llama_dir, "olora")
    perturb(model)
    plain = lorakit.unload(model)
    with torch.no_grad():
        torch.testing.assert_close(plain(tokens).logits, base(tokens).logits, atol=ATOL, rtol=0)


def test_weighted_mix_is_relative_to_the_untouched_base(llama_dir, tokens):
    base = load(llama_dir)
    model = _ours(llama_dir, "pissa")
    perturb(model)
    with torch.no_grad():
        full = model(tokens).logits
        lorakit.set_active(model, {"default": 0.5})
        half = model(tokens).logits
        expected = base(tokens).logits
    # Halfway in ΔW is not halfway in logits, but it lies strictly between base and adapted and fits a direct sum.
    ref = load(llama_dir)
    with torch.no_grad():
        for name, layer in lora_layers(model):
            a = layer.adapters["default"]
            delta = a.scale * (a.lora_B @ a.lora_A - a.init_B @ a.init_A)
            ref.get_submodule(name).weight.add_(0.5 * delta)
        torch.testing.assert_close(half, ref(tokens).logits, atol=ATOL, rtol=0)
    assert not torch.allclose(half, full) and not torch.allclose(half, expected)


def test_merge_unmerge_exact(llama_dir, tokens):
    model = _ours(llama_dir, "pissa")
    perturb(model)
    residual = {n: layer.base_layer.weight.clone() for n, layer in lora_layers(model)}
    with torch.no_grad():
        unmerged = model(tokens).logits
        for _ in range(100):
            lorakit.merge(model)
            lorakit.unmerge(model)
        lorakit.merge(model)
        torch.testing.assert_close(model(tokens).logits, unmerged, atol=ATOL, rtol=0)
        lorakit.unmerge(model)
    assert all(torch.equal(layer.base_layer.weight, residual[n]) for n, layer in lora_layers(model))
    plain = lorakit.merge_and_unload(model)
    with torch.no_grad():
        torch.testing.assert_close(plain(tokens).logits, unmerged, atol=ATOL, rtol=0)


def test_training_moves_only_a_and_b(llama_dir, tokens):
    model = _ours(llama_dir, "pissa")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        model(tokens, labels=tokens).loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.endswith(("lora_A", "lora_B")) for k in changed)


def test_refusals(llama_dir, tmp_path, tokens):
    with pytest.raises(ConfigError, match="embed_tokens.*Embedding"):
        lorakit.inject(load(llama_dir), LoraConfig(target_modules=["embed_tokens"], init="pissa"))
    with pytest.raises(ConfigError, match="pissa_niter_N"):
        LoraConfig(init="pissa_niter_0")
    model = _ours(llama_dir, "pissa")
    with pytest.raises(MixedBatchError, match="holds part of the base"):
        model(tokens, adapter_names=["default", None])
    from lorakit.serve import AdapterStore

    lorakit.save_adapter(model, tmp_path / "residual", residual_form=True)
    with pytest.raises(IncompatibleAdapterError, match="residual base"):
        AdapterStore(load(llama_dir)).register("p", tmp_path / "residual")
    lorakit.save_adapter(model, tmp_path / "plain")  # the default form serves like any LoRA
    assert AdapterStore(load(llama_dir)).register("p", tmp_path / "plain")


def test_train_with_pissa_resumes_exactly_and_saves_the_plain_form(lm_dir, tmp_path):
    """Checkpoints keep the residual form (A, B as trained); the run's adapter is the untouched-base form."""
    from lorakit.train.config import TrainConfig
    from lorakit.train.loop import train
    from safetensors.torch import load_file

    from ..train.helpers import letter_rows, write_jsonl

    data = write_jsonl(tmp_path / "letters.jsonl", letter_rows(48))

    def cfg(out, steps, **kw):
        return TrainConfig(base=str(lm_dir), data=str(data), out=str(out), max_steps=steps, batch_size=8, lr=3e-3,
                           targets=["q_proj", "v_proj"], init="pissa", rank=4, eval_fraction=0.2, seed=1,
                           exact_match=False, **kw)

    import shutil

    straight = train(cfg(tmp_path / "a", 4, save_every=2, keep_checkpoints=3))
    step2 = tmp_path / "a" / "checkpoints" / "step-000002"
    assert json.loads((step2 / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
    shutil.copytree(step2, tmp_path / "b" / "checkpoints" / "step-000002")  # as if run b had been killed there
    resumed = train(cfg(tmp_path / "b", 4, save_every=2, resume=True))
    saved = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["init_lora_weights"] is True
    a, b = load_file(tmp_path / "a" / "adapter_model.safetensors"), load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert straight.metrics["eval_loss"] == resumed.metrics["eval_loss"]
