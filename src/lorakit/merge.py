"""Fold adapters into the base weights for zero added latency, restore the base exactly, or strip LoRA out.

On a quantised base (quant/), `merge_and_unload` returns a plain full-precision model by default: merging into
4 bits would round most of the adapter's small update away.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from . import quant
from .adapters import apply_active, is_merged, require, uninstall_adapter_names
from .errors import MergeStateError
from .hf import to_dtype
from .layers import ActiveAdapter
from .state import drop_state, get_state, lora_layers, replace_module, save_wrappers


def merge(model: nn.Module, adapter: str | None = None) -> nn.Module:
    """Fold `adapter` (default: the active adapters, with their weights) into the base weights.

    The untouched weight is kept aside, so `unmerge` restores it bit for bit. A quantised weight is quantised
    again after merging (with a warning saying how much of the adapter that loses); unmerge puts back the original
    packed data and quantisation state.
    """
    errors = _merge(model, adapter)
    if errors:
        shares = {n: share for n, e in errors.items() if (share := _share_of_update(*e)) is not None}
        if shares:
            name, share = max(shares.items(), key=lambda kv: kv[1])
            loss = f"the rounding changes up to {100 * share:.0f}% of the adapter's update ({name})"
        else:  # a zero adapter (B = 0): a share of nothing says nothing, so say how far the weights moved
            name, (_, err, _) = max(errors.items(), key=lambda kv: kv[1][1])
            loss = (f"the adapter's update is zero, and the rounding changes the weights by up to |error| = {err:.3g} "
                    f"({name})")
        warnings.warn(f"merging into quantised weights re-quantises them: {loss}; unmerge() restores the "
                      "original weights exactly, and merge_and_unload() returns an unrounded full-precision model",
                      stacklevel=2)
    return model


@torch.no_grad()
def _merge(model: nn.Module, adapter: str | None) -> dict[str, tuple[float, float, float]]:
    """merge(); returns, for each re-quantised layer, (‖ΔW‖, ‖what is stored − (W + ΔW)‖, ‖W + ΔW‖)."""
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
    errors = {}
    for name, layer in lora_layers(model):
        todo = [a for a in chosen if a.name in layer.adapters and a.name not in {m.name for m in layer.merged}]
        if not todo:
            continue
        base, ltype = layer.base_layer, layer.type
        if layer.original_weight is None:
            layer.original_weight = ltype.keep_weight(base)
        if ltype.quantized:  # start from the original, so merging twice does not round twice
            todo, start = layer.merged + todo, ltype.dense_weight(base, layer.original_weight)
        else:
            start = ltype.dense_weight(base)
        total = start.float()
        for a in todo:  # each adapter answers for its merged weight (DoRA's is not a plain sum)
            total = layer.adapters[a.name].merge_into(layer, total, a.weight)
        ltype.write_weight(base, total)
        if ltype.quantized:
            errors[name] = (float((total - start).norm()), float((ltype.dense_weight(base) - total).norm()),
                            float(total.norm()))
            layer.merged = []
        layer.merged.extend(todo)
    return errors


@torch.no_grad()
def unmerge(model: nn.Module) -> nn.Module:
    """Put back the weights saved at the first merge: bit-identical to before, however many cycles."""
    for _, layer in lora_layers(model):
        if layer.original_weight is not None:
            layer.type.restore_weight(layer.base_layer, layer.original_weight)
            layer.original_weight = None
        layer.merged = []
    return model


def unload(model: nn.Module) -> nn.Module:
    """Remove every LoRA module and return the plain base model (any merged adapter is unmerged first)."""
    if is_merged(model):
        unmerge(model)
    return _strip(model, keep_copies=False)


def merge_and_unload(model: nn.Module, adapter: str | None = None, dtype: torch.dtype | str | None = None,
                     requantize: bool = False) -> nn.Module:
    """Merge (the active adapters, or `adapter`) and return a plain model that `save_pretrained` writes as usual.

    On a quantised base the result is a full-precision model in `dtype` (default: the base's compute dtype): each
    weight is the dequantised base plus the adapter's update, so it computes what the unmerged QLoRA model
    computed. `requantize=True` merges into the quantised weights instead (a smaller model that loses part of the
    update to rounding) and prints each layer's error. On a plain base, `dtype` (if given) casts the merged model.
    `dtype` is a torch dtype or its name, as `load_base_model` takes it ("fp32", "bf16", "fp16", "float32", ...).
    """
    dtype = to_dtype(dtype)  # checked before anything changes
    if quant.is_quantized(model) and not requantize:
        dtype = dtype or quant.compute_dtype(model)
        if is_merged(model):  # merged into 4 bits: start again from the exact original weights (still active)
            unmerge(model)
        quant.dequantize(model, torch.float32)  # merge in fp32, then cast once
        return merge_and_unload(model, adapter).to(dtype)
    if not is_merged(model):
        errors = _merge(model, adapter)
        if requantize and errors:
            _print_requantization_errors(errors)
    plain = _strip(model, keep_copies=True)
    return plain if dtype is None or requantize else plain.to(dtype)


def _print_requantization_errors(errors: dict[str, tuple[float, float, float]]) -> None:
    print(f"{'layer (merged, then re-quantised)':<60} {'|dW|':>10} {'|error|':>10} {'error/|dW|':>10}")
    for name, (delta, err, weight) in errors.items():
        share = _share_of_update(delta, err, weight)
        print(f"{name:<60} {delta:>10.4g} {err:>10.4g} {'(|dW|=0)' if share is None else f'{share:.1%}':>10}")


# Below this fraction of the weight's norm an update is rounding noise in fp32 (about 7 significant digits).
_NEGLIGIBLE_UPDATE = 1e-6


def _share_of_update(delta: float, err: float, weight: float) -> float | None:
    """The re-quantisation error as a fraction of the adapter's update ‖ΔW‖, or None when ‖ΔW‖ is about zero next
    to the weight (a zero adapter): then only the absolute error means something."""
    return None if delta <= _NEGLIGIBLE_UPDATE * weight else err / delta


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
        if p.is_floating_point():  # a quantised weight (requantize=True) holds integers
            p.requires_grad_(True)
    return model
