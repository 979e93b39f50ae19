"""Fold adapters into the base weights for zero added latency, restore the base exactly, or strip LoRA out."""

from __future__ import annotations

import torch
from torch import nn

from .adapters import apply_active, is_merged, require, uninstall_adapter_names
from .errors import MergeStateError
from .layers import ActiveAdapter
from .state import drop_state, get_state, lora_layers, replace_module, save_wrappers


@torch.no_grad()
def merge(model: nn.Module, adapter: str | None = None) -> nn.Module:
    """Fold `adapter` (default: the active adapters, with their weights) into the base weights.

    The untouched weight is kept aside, so `unmerge` restores it bit for bit.
    """
    state = get_state(model)
    if adapter is not None:
        require(model, adapter)
        chosen = [ActiveAdapter(adapter, 1.0)]
    else:
        chosen = list(state.active) if state else []
    if not chosen:
        raise MergeStateError("no adapter to merge: the model has no active adapter; pass adapter=NAME")
    # What is merged becomes what is active, so the merged model computes exactly base + merged adapters.
    already = [a for a in state.active if a.name not in {c.name for c in chosen}] if is_merged(model) else []
    apply_active(model, already + chosen)
    for _, layer in lora_layers(model):
        todo = [a for a in chosen if a.name in layer.adapters and a.name not in {m.name for m in layer.merged}]
        if not todo:
            continue
        w = layer.base_layer.weight
        if layer.original_weight is None:
            layer.original_weight = w.detach().clone()
        total = w.float()
        for a in todo:  # each adapter answers for its merged weight (DoRA's is not a plain sum)
            total = layer.adapters[a.name].merge_into(layer, total, a.weight)
        w.copy_(total.to(w.dtype))
        layer.merged.extend(todo)
    return model


@torch.no_grad()
def unmerge(model: nn.Module) -> nn.Module:
    """Put back the weights saved at the first merge: bit-identical to before, however many cycles."""
    for _, layer in lora_layers(model):
        if layer.original_weight is not None:
            layer.base_layer.weight.copy_(layer.original_weight)
            layer.original_weight = None
        layer.merged = []
    return model


def unload(model: nn.Module) -> nn.Module:
    """Remove every LoRA module and return the plain base model (any merged adapter is unmerged first)."""
    if is_merged(model):
        unmerge(model)
    return _strip(model, keep_copies=False)


def merge_and_unload(model: nn.Module, adapter: str | None = None) -> nn.Module:
    """Merge (the active adapters, or `adapter`) and return a plain model that `save_pretrained` writes as usual."""
    if not is_merged(model):
        merge(model, adapter)
    return _strip(model, keep_copies=True)


def _strip(model: nn.Module, keep_copies: bool) -> nn.Module:
    for name, layer in list(lora_layers(model)):
        merged = {a.name for a in layer.merged}
        for adapter in [n for n in layer.adapters if n not in merged]:
            layer.remove_adapter(adapter)  # an unmerged PiSSA/OLoRA adapter gives back its part of the base
        replace_module(model, name, layer.base_layer)
    for name, wrapper in list(save_wrappers(model)):
        replace_module(model, name, wrapper.current() if keep_copies else wrapper.original_module)
    drop_state(model)
    uninstall_adapter_names(model)  # a plain model gets its plain forward/generate back
    for p in model.parameters():
        p.requires_grad_(True)
    return model
