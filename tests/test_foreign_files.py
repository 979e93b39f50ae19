"""Adapters from elsewhere: adapter_config.json from other PEFT versions (unknown keys warned about once and ignored,
math-changing keys refused by name) and tensor keys as other tools write them (no `base_model.model.` prefix, the
adapter name inside keys, the inner model's names, compile/FSDP wrapper segments, raw modules_to_save dumps).
Each crafted file loads to exactly the logits of the clean PEFT file. Unsloth's and axolotl's exports are written
by PEFT itself, configured and patched as those tools do it, and load to the trained model's logits."""

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


# --- files written by Unsloth and axolotl: both save through PEFT's save_pretrained, so they are crafted here with
# PEFT itself, configured and patched as those tools do it ----------------------------------------------------------


def peft_trained(llama_dir, config):
    """A PEFT model with `config`, its factors (and saved copies) moved as by training."""
    from peft import get_peft_model

    model = get_peft_model(load(llama_dir), config)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def test_unsloth_export(llama_dir, tmp_path):
    """Unsloth's FastLanguageModel.get_peft_model(r, target_modules, lora_alpha, lora_dropout=0, bias="none",
    use_rslora, loftq_config=None) then model.save_pretrained(dir) or save_pretrained_merged(dir, tok,
    save_method="lora"): PEFT's files, after unsloth_zoo's fix_lora_auto_mapping has put an auto_mapping block
    (base_model_class, parent_library, unsloth_fixed) into the config."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel

    config = PeftLoraConfig(r=8, lora_alpha=16, lora_dropout=0, bias="none", use_rslora=True, loftq_config={},
                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                            task_type="CAUSAL_LM")
    model = peft_trained(llama_dir, config)
    model.peft_config["default"].auto_mapping = {"base_model_class": "LlamaForCausalLM",
                                                 "parent_library": "transformers.models.llama.modeling_llama",
                                                 "unsloth_fixed": True}
    model.save_pretrained(tmp_path / "unsloth")
    written = json.loads((tmp_path / "unsloth" / "adapter_config.json").read_text())
    written["base_model_name_or_path"] = "unsloth/llama-3-8b-Instruct-bnb-4bit"  # its 4-bit base on the hub
    (tmp_path / "unsloth" / "adapter_config.json").write_text(json.dumps(written, indent=2))
    assert written["auto_mapping"]["unsloth_fixed"] is True and written["use_rslora"] is True
    assert {"loftq_config", "megatron_config", "eva_config", "lora_bias", "exclude_modules",
            "trainable_token_indices", "layer_replication"} <= set(written)  # the keys PEFT 0.21 writes with them
    x = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(x).logits
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key is one PEFT writes: nothing to warn about
        got = logits(llama_dir, tmp_path / "unsloth", x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # the same files with 16-bit factors (a bf16 run's save): lorakit reads them as PEFT does
    bf16 = craft(tmp_path / "unsloth", tmp_path / "bf16")
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(bf16 / "adapter_model.safetensors").items()},
              bf16 / "adapter_model.safetensors", metadata={"format": "pt"})
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(load(llama_dir), bf16).eval()(x).logits
    torch.testing.assert_close(logits(llama_dir, bf16, x), theirs, atol=1e-5, rtol=0)


def axolotl_lora_config(**kw):
    """axolotl's load_lora: target_modules as list(set(lora_target_modules + find_all_linear_names(model))), fan_in_fan_out
    from lora_fan_in_fan_out (null when the YAML leaves it out), layers_to_transform/layers_pattern from peft_*,
    modules_to_save from lora_modules_to_save, bias "none", task_type CAUSAL_LM."""
    from peft import LoraConfig as PeftLoraConfig

    linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # lora_target_linear: true
    return PeftLoraConfig(r=8, lora_alpha=16, target_modules=list(set(linear)), layers_to_transform=None,
                          layers_pattern=None, lora_dropout=0.05, fan_in_fan_out=None, modules_to_save=["lm_head"],
                          bias="none", task_type="CAUSAL_LM", **kw)


def test_axolotl_export(llama_dir, tmp_path):
    """axolotl saves the trained PeftModel with model.save_pretrained(output_dir, safe_serialization=cfg.save_safetensors):
    PEFT's safetensors files, with the config it built (fan_in_fan_out null) and a trained lm_head copy."""
    model = peft_trained(llama_dir, axolotl_lora_config())
    model.save_pretrained(tmp_path / "axolotl", safe_serialization=True)
    written = json.loads((tmp_path / "axolotl" / "adapter_config.json").read_text())
    assert written["fan_in_fan_out"] is None and written["modules_to_save"] == ["lm_head"]
    x = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(x).logits
    torch.testing.assert_close(logits(llama_dir, tmp_path / "axolotl", x), expected, atol=1e-5, rtol=0)


def test_axolotl_pickled_export_is_refused_with_the_way_out(llama_dir, tmp_path):
    """Older axolotl runs (save_safetensors unset) wrote adapter_model.bin, a pickle: refused, with the one-line
    conversion; converted that way it loads to PEFT's logits."""
    from lorakit.errors import AdapterFileNotFoundError

    model = peft_trained(llama_dir, axolotl_lora_config())
    model.save_pretrained(tmp_path / "old", safe_serialization=False)
    assert (tmp_path / "old" / "adapter_model.bin").exists()
    assert not (tmp_path / "old" / "adapter_model.safetensors").exists()
    with pytest.raises(AdapterFileNotFoundError, match=r"adapter_model.bin, a pickle, which lorakit never loads"):
        lorakit.load_adapter(load(llama_dir), tmp_path / "old")
    save_file(torch.load(tmp_path / "old" / "adapter_model.bin", weights_only=True),
              tmp_path / "old" / "adapter_model.safetensors")
    x = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(logits(llama_dir, tmp_path / "old", x), model(x).logits, atol=1e-5, rtol=0)
