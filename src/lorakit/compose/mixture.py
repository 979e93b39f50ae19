"""Mixtures of LoRAs: build one from expert adapter directories, save it (routers + copies of the experts' PEFT
files) and load it back. The router and its math live in lorakit.variants.mixture."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..adapters import delete_adapter, list_adapters
from ..errors import AdapterExistsError, AdapterFileError, ConfigError, IncompatibleAdapterError
from ..files import atomic_write, atomic_write_json
from ..inject import inject
from ..io import load_adapter, load_checked, save_adapter
from ..state import adapter_layers, get_state
from ..variants.mixture import MixtureConfig

CONFIG_FILE = "mixture_config.json"
ROUTER_FILE = "router.safetensors"
EXPERTS_DIR = "experts"


def add_mixture(model: nn.Module, config: MixtureConfig, name: str = "mixture") -> nn.Module:
    """Load each expert (frozen, inactive) and put a router on every layer any expert adapts; the mixture is
    made the active, trainable adapter. Returns `model`."""
    taken = [e for e in list(config.experts) + [name] if e in list_adapters(model)]
    if taken:
        raise AdapterExistsError(f"the model already has adapters named {taken}; pick other expert/mixture names")
    state_before = list_adapters(model)
    try:
        for expert, path in config.experts.items():
            load_adapter(model, path, adapter=expert, activate=False, trainable=False)
            expert_config = get_state(model).configs[expert]
            if getattr(expert_config, "modules_to_save", None):
                raise IncompatibleAdapterError(f"expert {expert!r} ({path}) trains full modules "
                                               f"{expert_config.modules_to_save}; mixtures route LoRA-style experts only")
        state = get_state(model)
        targets = list(dict.fromkeys(t for e in config.experts for t in state.targets[e]))
        first = state.configs[next(iter(config.experts))]
        config = config.replace(target_modules=targets, task_type=first.task_type,
                                base_model_name_or_path=first.base_model_name_or_path)
        inject(model, config, adapter=name)
    except BaseException:
        for added in [a for a in list_adapters(model) if a not in state_before]:
            delete_adapter(model, added)
        raise
    return model


def mixture_balance_loss(model: nn.Module, name: str = "mixture") -> torch.Tensor | None:
    """The mean load-balancing loss over the mixture's layers in the last training forward (None if none ran)."""
    losses = [a.balance_loss for _, _, a in adapter_layers(model, name) if a.balance_loss is not None]
    return torch.stack(losses).mean() if losses else None


def save_mixture(model: nn.Module, path: str | os.PathLike, name: str = "mixture") -> Path:
    """Write the mixture to `path`: mixture_config.json, router.safetensors and experts/<name>/ (PEFT files)."""
    config = _mixture_config(model, name)
    path = Path(path)
    for expert in config.experts:
        save_adapter(model, path / EXPERTS_DIR / expert, adapter=expert)
    save_routers(model, path, name)
    atomic_write_json(path / CONFIG_FILE, {
        # A list, not a mapping: the order of the experts is the order of each router's outputs.
        "format": "lorakit-mixture", "experts": [[e, f"{EXPERTS_DIR}/{e}"] for e in config.experts],
        "top_k": config.top_k, "router": config.router, "load_balance": config.load_balance,
        "task_type": config.task_type, "base_model_name_or_path": config.base_model_name_or_path,
    })
    return path


def load_mixture(model: nn.Module, path: str | os.PathLike, name: str = "mixture") -> nn.Module:
    """Add the mixture saved at `path` (experts and routers) to `model`, active; outputs equal the saved one's."""
    path = Path(path)
    data = read_mixture_config(path)
    experts = {e: str(path / rel) for e, rel in data["experts"]}
    config = MixtureConfig(experts=experts, top_k=data.get("top_k"), router=data.get("router", "token"),
                           load_balance=data.get("load_balance", 0.01))
    add_mixture(model, config, name=name)
    load_routers(model, path, name)
    return model


def save_routers(model: nn.Module, path: str | os.PathLike, name: str = "mixture") -> None:
    """Only the routers (what trains): path/router.safetensors, atomically."""
    from safetensors.torch import save_file

    routers = {f"{layer}.router.weight": a.router.weight.detach().cpu().contiguous()
               for layer, _, a in adapter_layers(model, name)}
    atomic_write(Path(path) / ROUTER_FILE, lambda tmp: save_file(routers, tmp, metadata={"format": "pt"}))


def load_routers(model: nn.Module, path: str | os.PathLike, name: str = "mixture") -> None:
    """Copy path/router.safetensors into the routers of mixture `name` (already on the model)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        routers = load_file(path / ROUTER_FILE)
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterFileError(f"{path / ROUTER_FILE} is not a readable safetensors file ({e})") from None
    layers = {layer: a for layer, _, a in adapter_layers(model, name)}
    missing = sorted(set(layers) - {k.removesuffix(".router.weight") for k in routers})
    if missing:
        raise IncompatibleAdapterError(f"{path / ROUTER_FILE} has no router for {missing[:3]}; the mixture is incomplete")
    with torch.no_grad():
        for key, value in routers.items():
            layer = key.removesuffix(".router.weight")
            if layer not in layers:
                raise IncompatibleAdapterError(f"{path / ROUTER_FILE} has a router for {layer!r}, which no expert adapts")
            load_checked(layers[layer].router.weight, value, key, path / ROUTER_FILE)


def read_mixture_config(path: str | os.PathLike) -> dict:
    file = Path(path) / CONFIG_FILE
    if not file.exists():
        raise AdapterFileError(f"{file} is missing: {path} is not a saved mixture (lorakit.save_mixture writes one)")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFileError(f"{file} is not valid JSON ({e})") from None
    experts = data.get("experts")
    if data.get("format") != "lorakit-mixture" or not isinstance(experts, list) or not all(
            isinstance(e, list) and len(e) == 2 for e in experts):
        raise AdapterFileError(f"{file} is not a lorakit mixture config (format 'lorakit-mixture' with [name, path] experts)")
    return data


def is_mixture_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_FILE).exists()


def _mixture_config(model, name) -> MixtureConfig:
    state = get_state(model)
    config = state.configs.get(name) if state else None
    if not isinstance(config, MixtureConfig):
        raise ConfigError(f"the model has no mixture named {name!r}; add one with lorakit.add_mixture")
    return config
