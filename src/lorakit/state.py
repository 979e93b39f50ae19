"""What lorakit keeps on an adapted model: each adapter's config and targets, which are active, and the
modules it wrapped (LoRA layers, and per-adapter copies of modules trained in full)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Iterator

from torch import nn

from .layers import ActiveAdapter, LoraLayer


@dataclass
class LoraState:
    configs: dict = field(default_factory=dict)  # adapter name -> its config (LoraConfig or a variant's)
    targets: dict[str, list[str]] = field(default_factory=dict)  # adapter name -> full names of its layers
    active: list[ActiveAdapter] = field(default_factory=list)


class ModulesToSave(nn.Module):
    """A module trained in full per adapter (e.g. a classifier head); the original stays untouched."""

    def __init__(self, original_module: nn.Module):
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active: str | None = None

    def add_copy(self, adapter: str) -> nn.Module:
        self.modules_to_save[adapter] = copy.deepcopy(self.original_module)
        return self.modules_to_save[adapter]

    def current(self) -> nn.Module:
        if self.active is not None and self.active in self.modules_to_save:
            return self.modules_to_save[self.active]
        return self.original_module

    def forward(self, *args, **kwargs):
        return self.current()(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # e.g. `model.score.weight` read by transformers
            if name in ("original_module", "modules_to_save", "active"):
                raise
            return getattr(self.current(), name)


def get_state(model: nn.Module, create: bool = False) -> LoraState | None:
    state = model.__dict__.get("_lorakit_state")
    if state is None and create:
        state = LoraState()
        model.__dict__["_lorakit_state"] = state
    return state


def drop_state(model: nn.Module) -> None:
    model.__dict__.pop("_lorakit_state", None)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def save_wrappers(model: nn.Module) -> Iterator[tuple[str, ModulesToSave]]:
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSave):
            yield name, module


def adapter_layers(model: nn.Module, adapter: str) -> Iterator[tuple[str, LoraLayer, nn.Module]]:
    """(layer name, layer, the adapter's object on that layer) for every layer that holds `adapter`."""
    for name, layer in lora_layers(model):
        a = layer.adapters._modules.get(adapter)
        if a is not None:
            yield name, layer, a


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
