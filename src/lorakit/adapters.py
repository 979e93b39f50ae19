"""Many named adapters on one base: choose the active one (or a weighted mix), delete, or disable them all."""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

from torch import nn

from .errors import AdapterNotFoundError, MergeStateError
from .inject import get_state, inject, lora_layers, mark_trainable, save_wrappers
from .layers import ActiveAdapter

AdapterChoice = str | Sequence[str] | Sequence[tuple[str, float]] | dict[str, float]

add_adapter = inject  # the same operation under the name people look for


def list_adapters(model: nn.Module) -> list[str]:
    state = get_state(model)
    return list(state.configs) if state else []


def active_adapters(model: nn.Module) -> list[tuple[str, float]]:
    state = get_state(model)
    return [(a.name, a.weight) for a in state.active] if state else []


def set_active(model: nn.Module, adapters: AdapterChoice) -> None:
    """Run `adapters` from now on: a name, a list of names, or (name, weight) pairs / a {name: weight} dict.

    Only each layer's list of active names changes; no weight is copied.
    """
    state = get_state(model)
    chosen = _parse_choice(adapters)
    known = list(state.configs) if state else []
    for a in chosen:
        if a.name not in known:
            raise AdapterNotFoundError(f"no adapter named {a.name!r}; the model has: {known or 'none'}")
    if is_merged(model):
        raise MergeStateError("the model has merged adapters; call lorakit.unmerge(model) before changing the active ones")
    apply_active(model, chosen)


def apply_active(model: nn.Module, chosen: list[ActiveAdapter]) -> None:
    """Record `chosen` as active on the model and on every layer (names assumed valid)."""
    state = get_state(model)
    state.active = chosen
    for _, layer in lora_layers(model):
        layer.active = [a for a in chosen if a.name in layer.adapters]
    for _, wrapper in save_wrappers(model):
        wrapper.active = next((a.name for a in chosen if a.name in wrapper.modules_to_save), None)


def set_trainable(model: nn.Module, adapter: str) -> None:
    """Make `adapter` the one whose parameters train (all others, and the base, frozen)."""
    _require(model, adapter)
    mark_trainable(model, adapter)


def delete_adapter(model: nn.Module, adapter: str) -> None:
    """Remove `adapter` from every layer; layers left with no adapter keep their LoRA wrapper."""
    state = _require(model, adapter)
    if any(a.name == adapter for _, layer in lora_layers(model) for a in layer.merged):
        raise MergeStateError(f"adapter {adapter!r} is merged into the weights; call lorakit.unmerge(model) first")
    for _, layer in lora_layers(model):
        if adapter in layer.adapters:
            del layer.adapters[adapter]
    for _, wrapper in save_wrappers(model):
        if adapter in wrapper.modules_to_save:
            del wrapper.modules_to_save[adapter]
    del state.configs[adapter]
    del state.targets[adapter]
    set_active(model, [(a.name, a.weight) for a in state.active if a.name != adapter])


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside this block the model computes the pure base output."""
    if is_merged(model):
        raise MergeStateError("adapters are merged into the weights; call lorakit.unmerge(model) to get the base output")
    layers = [layer for _, layer in lora_layers(model)]
    wrappers = [(w, w.active) for _, w in save_wrappers(model)]
    for layer in layers:
        layer.disabled = True
    for w, _ in wrappers:
        w.active = None
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False
        for w, active in wrappers:
            w.active = active


def is_merged(model: nn.Module) -> bool:
    return any(layer.merged for _, layer in lora_layers(model))


def _require(model: nn.Module, adapter: str):
    state = get_state(model)
    if state is None or adapter not in state.configs:
        raise AdapterNotFoundError(f"no adapter named {adapter!r}; the model has: {list_adapters(model) or 'none'}")
    return state


def _parse_choice(adapters: AdapterChoice) -> list[ActiveAdapter]:
    if isinstance(adapters, str):
        return [ActiveAdapter(adapters, 1.0)]
    if isinstance(adapters, dict):
        return [ActiveAdapter(n, float(w)) for n, w in adapters.items()]
    chosen = []
    for item in adapters:
        if isinstance(item, str):
            chosen.append(ActiveAdapter(item, 1.0))
        else:
            name, weight = item
            chosen.append(ActiveAdapter(name, float(weight)))
    return chosen
