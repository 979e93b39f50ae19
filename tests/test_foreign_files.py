"""Adapters from elsewhere: adapter_config.json from other PEFT versions (unknown keys warned about once and ignored,
math-changing keys refused by name) and tensor keys as other tools write them (no `base_model.model.` prefix, the
adapter name inside keys, the inner model's names, compile/FSDP wrapper segments, raw modules_to_save dumps).
Each crafted file loads to exactly the logits of the clean PEFT file."""

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from lorakit import LoraConfig
from lorakit.config import _WARNED
from lorakit.errors import AdapterFileError

from .conftest import load, randomise_lora

PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def clean(llama_dir, tmp_path_factory):
    """A PEFT-format adapter (q/v + MLP, and a trained copy of lm_head) and its logits."""
    path = tmp_path_factory.mktemp("clean")
    model = load(llama_dir)
    lorakit.inject(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                     modules_to_save=["lm_head"]))
    randomise_lora(model, std=0.2, seed=3)
    with torch.no_grad():
        model.lm_head.modules_to_save["default"].weight.add_(0.05)
    lorakit.save_adapter(model, path)
    x = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return path, x, model(x).logits


def craft(clean_path, out, rename=lambda k: k, config=lambda c: c, extra=None):
    """A copy of the clean adapter with its tensor keys renamed and its config changed, as another tool writes it."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = {rename(k): v for k, v in load_file(clean_path / "adapter_model.safetensors").items()}
    tensors.update(extra or {})
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((clean_path / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps(config(cfg)))
    return out


def logits(llama_dir, path, x):
    model = lorakit.load_adapter(load(llama_dir), path)
    with torch.no_grad():
        return model(x).logits


def saved_copy(k):  # PEFT's file key of a trained lm_head copy, as a raw state_dict spells it
    return k.replace("lm_head.weight", "lm_head.modules_to_save.default.weight")


KEY_VARIANTS = {
    "no base_model.model. prefix": lambda k: k.removeprefix(PREFIX),
    "adapter name in keys (.default)": lambda k: k.replace(".weight", ".default.weight") if "lora_" in k else k,
    "saved from the inner model (no model.)": lambda k: k.replace(PREFIX + "model.", PREFIX),
    "torch.compile wrapper (_orig_mod.)": lambda k: k.replace(PREFIX, PREFIX + "_orig_mod."),
    "FSDP raw state_dict": lambda k: saved_copy(k.replace("layers.", "layers._fsdp_wrapped_module.", 1)
                                                .replace(".weight", ".default.weight") if "lora_" in k else saved_copy(k)),
}


@pytest.mark.parametrize("variant", list(KEY_VARIANTS))
def test_tensor_key_variants_load_to_the_same_logits(clean, llama_dir, tmp_path, variant):
    path, x, expected = clean
    extra = {}
    if variant == "FSDP raw state_dict":  # such dumps also carry the untouched original of the saved module
        extra = {PREFIX + "lm_head.original_module.weight": load(llama_dir).lm_head.weight.detach().clone()}
    crafted = craft(path, tmp_path / "x", rename=KEY_VARIANTS[variant], extra=extra)
    assert set(load_file(crafted / "adapter_model.safetensors")) != set(load_file(path / "adapter_model.safetensors"))
    assert torch.equal(logits(llama_dir, crafted, x), logits(llama_dir, path, x))
    torch.testing.assert_close(logits(llama_dir, crafted, x), expected, atol=1e-6, rtol=0)


def newer_peft(cfg):  # as PEFT 0.21 (and Unsloth, which saves through it) writes the config, plus a key from the future
    return {**cfg, "peft_version": "0.21.2", "corda_config": None, "eva_config": None, "trainable_token_indices": None,
            "lora_bias": False, "target_parameters": None, "use_bdlora": None, "layer_replication": None,
            "megatron_config": None, "megatron_core": "megatron.core", "runtime_config": {"ephemeral_gpu_offload": False},
            "alora_invocation_tokens": None, "ensure_weight_tying": False, "some_future_option": 7}


def older_peft(cfg):  # PEFT 0.3's config: enable_lora and merge_weights, none of the later keys
    keep = ("peft_type", "task_type", "base_model_name_or_path", "r", "lora_alpha", "lora_dropout", "target_modules",
            "bias", "fan_in_fan_out", "inference_mode", "modules_to_save", "init_lora_weights")
    return {**{k: cfg[k] for k in keep}, "enable_lora": None, "merge_weights": False}


def test_configs_from_other_peft_versions(clean, llama_dir, tmp_path):
    path, x, expected = clean
    _WARNED.discard("some_future_option")
    new = craft(path, tmp_path / "new", config=newer_peft)
    with pytest.warns(UserWarning, match="'some_future_option'.*ignored"):
        got = logits(llama_dir, new, x)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per process, not at every load
        lorakit.read_adapter_config(new)
        old = craft(path, tmp_path / "old", config=older_peft)
        torch.testing.assert_close(logits(llama_dir, old, x), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("key,value", [("layer_replication", [[0, 1]]), ("trainable_token_indices", [3, 5]),
                                       ("target_parameters", ["mlp.experts.gate_up_proj"]), ("enable_lora", [True, False])])
def test_keys_that_change_the_math_are_refused_by_name(clean, tmp_path, key, value):
    path = craft(clean[0], tmp_path / key, config=lambda c: {**c, key: value})
    with pytest.raises(AdapterFileError, match=key):
        lorakit.read_adapter_config(path)
