"""Many named adapters on one base: choose the active one (or a weighted mix, or one per row of a batch),
choose which one trains, delete, or disable them all."""

from __future__ import annotations

import contextlib
import inspect
import math
import numbers
from typing import Iterator, Sequence

import torch
from torch import nn

from . import rows, slots
from .errors import AdapterNotFoundError, MergeStateError
from .layers import ActiveAdapter
from .rows import MixedBatchError
from .state import get_state, lora_layers, save_wrappers

AdapterChoice = str | Sequence[str] | Sequence[tuple[str, float]] | dict[str, float]
# Per row: an adapter's name, None (the base), or a weighted mix as {name: weight} or [(name, weight), ...].
RowNames = Sequence[str | None | dict[str, float] | Sequence[tuple[str, float]]]


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
    chosen = _parse_choice(adapters)
    known = list_adapters(model)
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
    require(model, adapter)
    mark_trainable(model, adapter)


def mark_trainable(model: nn.Module, adapter: str) -> None:
    """Freeze everything, then unfreeze `adapter`'s parameters, its saved-module copies and the biases its config asks for."""
    config = get_state(model).configs[adapter]
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in lora_layers(model):
        if adapter in layer.adapters:
            for p in layer.adapters[adapter].parameters():  # a variant's frozen tensors are buffers, not parameters
                p.requires_grad_(True)
            if config.bias == "lora_only" and getattr(layer.base_layer, "bias", None) is not None:
                layer.base_layer.bias.requires_grad_(True)
    for _, wrapper in save_wrappers(model):
        if adapter in wrapper.modules_to_save:
            wrapper.modules_to_save[adapter].requires_grad_(True)
    if config.bias == "all":
        for name, p in model.named_parameters():
            if name.endswith("bias") and ".original_module." not in name:
                p.requires_grad_(True)


def delete_adapter(model: nn.Module, adapter: str) -> None:
    """Remove `adapter` from every layer; layers left with no adapter keep their LoRA wrapper."""
    state = require(model, adapter)
    if any(a.name == adapter for _, layer in lora_layers(model) for a in layer.merged):
        raise MergeStateError(f"adapter {adapter!r} is merged into the weights; call lorakit.unmerge(model) first")
    for _, layer in lora_layers(model):
        if adapter in layer.adapters:
            slots.free_slot(layer, adapter)
            layer.remove_adapter(adapter)
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


def require(model: nn.Module, adapter: str):
    """The model's state, after checking that it holds `adapter`."""
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


# --- one adapter per row -----------------------------------------------------------------------------


@contextlib.contextmanager
def adapter_rows(model: nn.Module, names: "RowNames | rows.RowPlan") -> Iterator[nn.Module]:
    """Inside this block, row i of every batch that `model` computes runs adapter `names[i]` (None: the base), or
    a weighted mix of adapters ({name: weight}), which computes what `set_active` with those weights computes.

        with adapter_rows(model, ["chat", None, {"code": 0.6, "chat": 0.4}]):   # or model(ids, adapter_names=[...])
            logits = model(ids).logits                                        # row 1 is the pure base

    Applies to the LoRA layers run in this thread (or asyncio task); a batch of k·len(names) rows
    (generate's beams or return sequences) repeats each name k times in a row. Inference only.
    """
    with rows.use_plan(names if isinstance(names, rows.RowPlan) else check_names(model, names)):
        yield model


def row_plan(model: nn.Module, names: RowNames, trust_slots: bool = False) -> rows.RowPlan:
    """A checked plan for `names` that `adapter_rows(model, plan)` can run for several batches of the same rows, as
    long as `plan.stale()` is False and nothing but slot loads/frees changes the model's adapters meanwhile.
    `trust_slots`: adapters already in slots are used as they are, without checking their tensors for changes made
    in place (for an owner, like a server, whose adapters change only through their slots)."""
    return rows.RowPlan(check_names(model, names), trust_slots)


def check_names(model: nn.Module, names: RowNames) -> tuple[rows.RowChoice, ...]:
    """`names` as a tuple, after checking each is None, an adapter `model` holds and can run per row, or a mix of
    them; a mix becomes a tuple of (name, float weight) pairs (one adapter at weight 1: its plain name)."""
    if isinstance(names, str) or not isinstance(names, Sequence) or len(names) == 0:
        raise MixedBatchError(f"adapter_names must be a non-empty list with one adapter name (or None) per row, got {names!r}")
    state = get_state(model)
    known = state.configs if state else {}  # a dict: membership costs the same with thousands of adapters
    checked = tuple(n if n is None or isinstance(n, str) else _check_mix(n, i) for i, n in enumerate(names))
    for i, choice in enumerate(checked):
        for name in rows.adapters_of(choice):
            if name not in known:
                raise AdapterNotFoundError(f"no adapter named {name!r} (row {i}); the model has: {list(known) or 'none'}")
    for name in dict.fromkeys(a for choice in checked for a in rows.adapters_of(choice)):
        if state.configs[name].modules_to_save and any(name in w.modules_to_save for _, w in save_wrappers(model)):
            raise MixedBatchError(
                f"adapter {name!r} trains its own copy of {state.configs[name].modules_to_save}, which one shared "
                "forward cannot switch per row; run its rows in their own batch with lorakit.set_active"
            )
    return checked


def _check_mix(mix, row: int) -> rows.RowChoice:
    """One row's mix as ((name, weight), ...): names distinct, weights finite numbers; one adapter at weight 1 is its name."""
    expected = "an adapter name, None, or a mix as {name: weight} or [(name, weight), ...]"
    if isinstance(mix, dict):
        pairs = list(mix.items())
    elif isinstance(mix, Sequence) and all(isinstance(p, Sequence) and not isinstance(p, str) and len(p) == 2 for p in mix):
        pairs = [tuple(p) for p in mix]
    else:
        raise MixedBatchError(f"adapter_names[{row}] must be {expected}, got {mix!r}")
    if not pairs:
        raise MixedBatchError(f"adapter_names[{row}] is an empty mix; name at least one adapter (or None for the base)")
    out = []
    for name, weight in pairs:
        if not isinstance(name, str):
            raise MixedBatchError(f"adapter_names[{row}] must be {expected}; {name!r} is not an adapter name")
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
            raise MixedBatchError(f"adapter_names[{row}]: the weight of {name!r} must be a finite number, got {weight!r}")
        out.append((name, float(weight)))
    if len({n for n, _ in out}) < len(out):
        raise MixedBatchError(f"adapter_names[{row}] names an adapter twice: {mix!r}; give each adapter one weight")
    if len(out) == 1 and out[0][1] == 1.0:
        return out[0][0]
    return tuple(out)


class AdapterNamesKeyword:
    """Stands in for `model.forward` or `model.generate`: adds `adapter_names=[...]` and otherwise calls
    what it replaced. An object, not a closure, so deepcopy and pickle carry it to the copied model."""

    def __init__(self, model: nn.Module, attr: str, inner=None):
        self.model, self.attr = model, attr
        self.inner = inner  # an instance-level forward that was there before (e.g. accelerate's hook), else None
        self._signature = None

    def _target(self):
        return self.inner if self.inner is not None else getattr(type(self.model), self.attr).__get__(self.model)

    def __call__(self, *args, adapter_names: RowNames | None = None, **kwargs):
        fn = self._target()
        if adapter_names is None:
            return fn(*args, **kwargs)
        names = check_names(self.model, adapter_names)
        n_rows = _batch_rows(args, kwargs)
        if n_rows is not None and n_rows != len(names):
            raise MixedBatchError(f"adapter_names has {len(names)} names for a batch of {n_rows} rows; pass one per row")
        with rows.use_plan(names):
            return fn(*args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        """The replaced method's signature plus `adapter_names` (transformers reads forward's parameters)."""
        if self._signature is None:
            sig = inspect.signature(self._target())
            params = [p for p in sig.parameters.values() if p.kind != p.VAR_KEYWORD]
            params.append(inspect.Parameter("adapter_names", inspect.Parameter.KEYWORD_ONLY, default=None))
            params += [p for p in sig.parameters.values() if p.kind == p.VAR_KEYWORD]
            self._signature = sig.replace(parameters=params)
        return self._signature

    def __getstate__(self) -> dict:  # deepcopy / pickle: the signature is recomputed on demand
        return {**self.__dict__, "_signature": None}

    def __repr__(self) -> str:
        return f"<{self.attr} of {type(self.model).__name__} with adapter_names=>"


def install_adapter_names(model: nn.Module) -> None:
    """Give `model.forward` (and `model.generate`, if it has one) the `adapter_names=` keyword. Idempotent."""
    for attr in ("forward", "generate"):
        current = model.__dict__.get(attr)
        if isinstance(current, AdapterNamesKeyword) or not callable(getattr(model, attr, None)):
            continue
        model.__dict__[attr] = AdapterNamesKeyword(model, attr, current)


def uninstall_adapter_names(model: nn.Module) -> None:
    """Put back what `install_adapter_names` replaced (e.g. after `lorakit.unload`)."""
    for attr in ("forward", "generate"):
        current = model.__dict__.get(attr)
        if isinstance(current, AdapterNamesKeyword):
            if current.inner is None:
                del model.__dict__[attr]
            else:
                model.__dict__[attr] = current.inner


def _batch_rows(args: tuple, kwargs: dict) -> int | None:
    for value in (args[0] if args else None, kwargs.get("input_ids"), kwargs.get("inputs"), kwargs.get("inputs_embeds")):
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return value.shape[0]
    return None
