"""A model built from its config alone, on the meta device: every shape is real, no weight is read or allocated."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelConfigError
from ..hf import BUILTIN

# The sizes a plan is made of. A config file must state them: transformers would otherwise fill in its
# class defaults (a LlamaConfig without hidden_size is silently a 7B model) and the plan would describe
# a model the user does not have.
REQUIRED_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def load_config(source: Any):
    """A transformers `PretrainedConfig` from a model directory, a config.json path, "builtin" (lorakit's built-in
    model, as `--base builtin` names it), a dict, a config, or a model.

    Only the config file is opened: a directory's weight files are never touched.
    """
    from transformers import PretrainedConfig

    if isinstance(source, PretrainedConfig):
        return source
    if isinstance(source, nn.Module):
        config = getattr(source, "config", None)
        if isinstance(config, PretrainedConfig):
            return config
        raise ModelConfigError(
            f"plan_memory needs a transformers model or config; {type(source).__name__} has no `.config`. "
            "Pass the model's config (or its directory / config.json) instead"
        )
    if isinstance(source, dict):
        return _from_dict(dict(source), "the config dict")
    if isinstance(source, (str, os.PathLike)):
        if str(source) == BUILTIN:  # its directory, converted once into the cache (as recommend and train find it)
            from ..train.builtin import default_model_dir

            source = default_model_dir()
        path = Path(source)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise ModelConfigError(f"{file} does not exist; pass a model directory that has a config.json, or the config.json itself")
        try:
            data = json.loads(file.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelConfigError(f"{file} is not a transformers config: it is not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ModelConfigError(f"{file} is not a transformers config: expected a JSON object, found {type(data).__name__}")
        return _from_dict(data, str(file))
    raise ModelConfigError(f"cannot plan for a {type(source).__name__}; pass a model directory, a config.json path, "
                           "a transformers config or a transformers model")


def _from_dict(data: dict, where: str):
    from transformers import AutoConfig, CONFIG_MAPPING

    model_type = data.get("model_type")
    if model_type is None:
        raise ModelConfigError(f"{where} is not a transformers config: missing key 'model_type' "
                               "(e.g. \"model_type\": \"llama\"); a model's config.json from save_pretrained has it")
    if model_type not in CONFIG_MAPPING:
        raise ModelConfigError(f"{where}: model_type {model_type!r} is not known to the installed transformers; "
                               "upgrade transformers or check the spelling")
    config_class = CONFIG_MAPPING[model_type]
    renamed = getattr(config_class, "attribute_map", {})  # e.g. GPT-2: {"hidden_size": "n_embd", ...}
    aliases = {canonical: [canonical] + ([renamed[canonical]] if canonical in renamed else []) for canonical in REQUIRED_KEYS}
    for names in aliases.values():
        if not any(n in data for n in names):
            spelled = " or ".join(repr(n) for n in names)
            raise ModelConfigError(f"{where} is not a complete transformers config: missing key {spelled}; "
                                   f"the plan is computed from it, so state the model's real value")
    body = {k: v for k, v in data.items() if k != "model_type"}
    try:
        return AutoConfig.for_model(model_type, **body)
    except (TypeError, ValueError) as e:
        raise ModelConfigError(f"{where}: transformers rejected this {model_type} config: {e}") from None


def build_meta_model(config) -> nn.Module:
    """The model class for `config`, constructed on the meta device (shapes only, zero bytes, no file read)."""
    import transformers

    errors = []
    with torch.device("meta"):
        for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
            try:
                model = auto.from_config(config)
                break
            except (ValueError, KeyError) as e:  # no causal-LM head for this type: fall back to the bare model
                errors.append(str(e))
        else:
            raise ModelConfigError(f"transformers cannot build a {config.model_type} model from this config: {errors[-1]}")
    if any(p.device.type != "meta" for p in model.parameters()):  # a model class that ignores the device context
        raise ModelConfigError(f"{type(model).__name__} allocated real weights on construction; cannot plan without loading it")
    return model
