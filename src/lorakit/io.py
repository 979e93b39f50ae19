"""Adapter files in PEFT's format (adapter_config.json + adapter_model.safetensors): save, load, validate.

Only safetensors is read: a pickle can run code, so `adapter_model.bin` is refused with a way out.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import LoraConfig
from .errors import (
    AdapterFileError,
    AdapterFileNotFoundError,
    ConfigError,
    IncompatibleAdapterError,
    ShapeMismatchError,
    TargetModulesNotFoundError,
)
from .files import atomic_write, atomic_write_json
from .inject import _in_layers, _is_excluded, _logical_modules, get_state, inject, lora_layers, save_wrappers
from .layers import LoraLayer, layer_kind

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<factor>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?(?:\.weight)?$")


# --- save ----------------------------------------------------------------------------------------


def adapter_state_dict(model: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's key names (`base_model.model.<module>.lora_A.weight`, ...)."""
    state = get_state(model)
    config = state.configs[adapter]
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model):
        if adapter not in layer.adapters:
            continue
        a = layer.adapters[adapter]
        if layer.kind == "embedding":
            tensors[f"{PREFIX}{name}.lora_embedding_A"] = a.lora_A
            tensors[f"{PREFIX}{name}.lora_embedding_B"] = a.lora_B
        else:
            tensors[f"{PREFIX}{name}.lora_A.weight"] = a.lora_A
            tensors[f"{PREFIX}{name}.lora_B.weight"] = a.lora_B
        if config.bias != "none" and getattr(layer.base_layer, "bias", None) is not None:
            tensors[f"{PREFIX}{name}.base_layer.bias"] = layer.base_layer.bias
    for name, wrapper in save_wrappers(model):
        if adapter in wrapper.modules_to_save:
            for pname, p in wrapper.modules_to_save[adapter].named_parameters():
                tensors[f"{PREFIX}{name}.{pname}"] = p
    if config.bias == "all":
        for pname, p in model.named_parameters():
            if pname.endswith("bias") and ".lora" not in pname and "original_module" not in pname and "modules_to_save" not in pname:
                tensors.setdefault(f"{PREFIX}{pname}", p)
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter: str | None = None) -> Path:
    """Write `adapter` (default: the first active one) to `path` in PEFT's format, each file atomically."""
    state = get_state(model)
    if state is None or not state.configs:
        raise AdapterFileError("the model has no LoRA adapter to save; call lorakit.inject(model, config) first")
    if adapter is None:
        adapter = state.active[0].name if state.active else next(iter(state.configs))
    if adapter not in state.configs:
        from .errors import AdapterNotFoundError

        raise AdapterNotFoundError(f"no adapter named {adapter!r}; the model has: {list(state.configs)}")
    config = state.configs[adapter]
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = adapter_state_dict(model, adapter)
    peft = config.to_peft_dict(target_modules=_saved_target_modules(model, config, state.targets[adapter]))
    if peft["base_model_name_or_path"] is None:
        peft["base_model_name_or_path"] = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    # PEFT reads GPT-2's transposed Conv1D weights with fan_in_fan_out=True (and warns otherwise).
    peft["fan_in_fan_out"] = any(layer.kind == "conv1d" for _, layer in lora_layers(model) if adapter in layer.adapters)
    if peft["task_type"] is None:
        peft["task_type"] = _guess_task_type(model)
    # Weights first, config last: a directory with a config always has the weights that go with it.
    atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write_json(path / CONFIG_NAME, peft)
    return path


def _saved_target_modules(model: nn.Module, config: LoraConfig, targets: list[str]) -> list[str] | str:
    """Leaf names (["q_proj", "v_proj"]) when they select exactly the adapted modules, else the full names."""
    if isinstance(config.target_modules, str) and config.target_modules != "all-linear":
        return config.target_modules
    leaves = sorted({t.rsplit(".", 1)[-1] for t in targets})
    probe = config.replace(target_modules=leaves)
    reselected = [
        n for n, m in _logical_modules(model)
        if (isinstance(m, LoraLayer) or layer_kind(m)) and n.rsplit(".", 1)[-1] in leaves
        and not _is_excluded(n, probe) and _in_layers(n, probe)
    ]
    return leaves if reselected == targets else list(targets)


def _guess_task_type(model: nn.Module) -> str | None:
    """CAUSAL_LM for language models. Not SEQ_CLS: PEFT would then expect a trained classifier in the file."""
    name = type(model).__name__
    return "CAUSAL_LM" if name.endswith(("ForCausalLM", "LMHeadModel")) else None


# --- load ----------------------------------------------------------------------------------------


def read_adapter_config(path: str | os.PathLike) -> LoraConfig:
    """Read and validate `path/adapter_config.json` (PEFT's or ours)."""
    return LoraConfig.from_peft_dict(_read_config_json(Path(path)))


def _read_config_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise AdapterFileNotFoundError(f"adapter directory {str(path)!r} does not exist")
    if not path.is_dir():
        raise AdapterFileError(f"{str(path)!r} is a file; pass the adapter's directory (holding {CONFIG_NAME} and {WEIGHTS_NAME})")
    file = path / CONFIG_NAME
    if not file.exists():
        raise AdapterFileNotFoundError(f"{file} is missing: {str(path)!r} is not a LoRA adapter directory")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFileError(f"{file} is not valid JSON ({e}); the file is corrupt") from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"{file} must hold a JSON object, got {type(data).__name__}")
    return data


def read_adapter_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load `path/adapter_model.safetensors`; a corrupt or missing file names itself in the error."""
    path = Path(path)
    file = path / WEIGHTS_NAME
    if not file.exists():
        pickled = [p.name for p in (path / "adapter_model.bin", path / "adapter_model.pt") if p.exists()]
        hint = (
            f" It has {pickled[0]}, a pickle, which lorakit never loads because unpickling can run code; convert it "
            "with safetensors.torch.save_file(torch.load(f, weights_only=True), 'adapter_model.safetensors')."
            if pickled else ""
        )
        raise AdapterFileNotFoundError(f"{file} is missing.{hint}")
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterFileError(f"{file} is not a readable safetensors file ({e}); the file is corrupt or truncated") from None


def load_adapter(model: nn.Module, path: str | os.PathLike, adapter: str = "default",
                 activate: bool = True, trainable: bool = False) -> nn.Module:
    """Add the adapter stored at `path` (PEFT's format) to `model` under `adapter`; works on a plain model too.

    Nothing is left half-loaded: on any error the adapter is removed again and the model is as before.
    """
    path = Path(path)
    try:
        config = read_adapter_config(path)
    except ConfigError as e:
        raise AdapterFileError(f"{path / CONFIG_NAME}: {e}") from None
    tensors = read_adapter_tensors(path)
    tensors = _strip_prefix(tensors)
    _check_modules_exist(model, tensors, path, config)
    try:
        inject(model, config, adapter=adapter, activate=activate)
    except TargetModulesNotFoundError as e:
        raise IncompatibleAdapterError(f"adapter {str(path)!r} does not fit this {type(model).__name__}: {e}") from None
    try:
        _copy_tensors(model, adapter, tensors, path)
    except BaseException:
        from .adapters import delete_adapter

        delete_adapter(model, adapter)
        raise
    if not trainable:
        for _, layer in lora_layers(model):
            if adapter in layer.adapters:
                layer.adapters[adapter].requires_grad_(False)
        for _, wrapper in save_wrappers(model):
            if adapter in wrapper.modules_to_save:
                wrapper.modules_to_save[adapter].requires_grad_(False)
    return model


def _strip_prefix(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {(k[len(PREFIX):] if k.startswith(PREFIX) else k): v for k, v in tensors.items()}


def _check_modules_exist(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path, config: LoraConfig) -> None:
    names = {n for n, _ in _logical_modules(model)}
    missing = sorted({m.group("module") for k in tensors if (m := _LORA_KEY.match(k)) and m.group("module") not in names})
    if missing:
        base = config.base_model_name_or_path or "an unknown base"
        raise IncompatibleAdapterError(
            f"adapter {str(path)!r} (written for {base}) names {len(missing)} module(s) that this "
            f"{type(model).__name__} does not have, e.g. {missing[:3]}; it was made for another architecture"
        )


def _copy_tensors(model: nn.Module, adapter: str, tensors: dict[str, torch.Tensor], path: Path) -> None:
    file = path / WEIGHTS_NAME
    layers = dict(lora_layers(model))
    wrappers = dict(save_wrappers(model))
    filled: set[tuple[str, str]] = set()
    with torch.no_grad():
        for key, value in tensors.items():
            m = _LORA_KEY.match(key)
            if m:
                module, factor = m.group("module"), m.group("factor")
                layer = layers.get(module)
                if layer is None or adapter not in layer.adapters:
                    raise IncompatibleAdapterError(
                        f"{file} has {key!r}, but its config does not target {module!r}; the config and weights disagree"
                    )
                target = getattr(layer.adapters[adapter], "lora_A" if factor.endswith("A") else "lora_B")
                _copy_checked(target, value, f"{module}.{factor}", file)
                filled.add((module, factor[-1]))
                continue
            _copy_other(model, layers, wrappers, adapter, key, value, file)
    for module, layer in layers.items():
        if adapter in layer.adapters:
            for f in "AB":
                if (module, f) not in filled:
                    raise IncompatibleAdapterError(f"{file} has no lora_{f} for {module!r}, which its config targets; the file is incomplete")


def _copy_other(model, layers, wrappers, adapter, key, value, file) -> None:
    """Biases (bias='lora_only'/'all'), saved modules (modules_to_save) and PEFT's saved embedding copies."""
    module, _, pname = key.rpartition(".")
    if module.endswith(".base_layer") and module[: -len(".base_layer")] in layers:
        target = getattr(layers[module[: -len(".base_layer")]].base_layer, pname)
        if pname == "weight":  # PEFT saves embedding weights it may have resized; we never replace base weights
            if target.shape != value.shape or not torch.equal(target.detach().cpu().to(value.dtype), value):
                raise IncompatibleAdapterError(
                    f"{file} carries its own {key!r} (e.g. a resized vocabulary); lorakit does not replace base weights"
                )
            return
        _copy_checked(target, value, key, file)
        return
    for wname, wrapper in wrappers.items():
        if key.startswith(wname + ".") and adapter in wrapper.modules_to_save:
            sub = key[len(wname) + 1:]
            params = dict(wrapper.modules_to_save[adapter].named_parameters())
            if sub in params:
                _copy_checked(params[sub], value, key, file)
                return
    params = dict(model.named_parameters())
    if key in params and key.endswith("bias"):
        _copy_checked(params[key], value, key, file)
        return
    raise IncompatibleAdapterError(f"{file} has a tensor {key!r} that matches no LoRA factor, bias or saved module of this model")


def _copy_checked(target: torch.Tensor, value: torch.Tensor, name: str, file: Path) -> None:
    if tuple(target.shape) != tuple(value.shape):
        raise ShapeMismatchError(
            f"{file}: tensor for {name} has shape {tuple(value.shape)} but the layer needs {tuple(target.shape)}; "
            "the adapter was trained on a model with other layer sizes or another rank"
        )
    if not torch.isfinite(value).all():
        raise AdapterFileError(f"{file}: tensor for {name} holds NaN or Inf values; the adapter is corrupt")
    target.copy_(value.to(device=target.device, dtype=target.dtype))
