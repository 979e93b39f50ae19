"""Put LoRA into a model: find the target modules, wrap them, add the adapter, freeze the rest, count parameters."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import NamedTuple

from torch import nn

from .adapters import install_adapter_names, mark_trainable, set_active
from .config import LoraConfig, quiet_checks_on
from .errors import AdapterExistsError, ConfigError, ConfigWarning
from .layers import LoraLayer, layer_type
from .matching import default_targets, match_modules_to_save, match_targets
from .quant import logical_numel
from .quant.loftq import loftq_initialise
from .state import ModulesToSave, base_parameters, get_state, replace_module
from .variants import adapter_class


class TrainableCount(NamedTuple):
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


def inject(model: nn.Module, config: LoraConfig | None = None, adapter: str = "default", activate: bool = True,
           strict: bool = False, trainable: bool = True) -> nn.Module:
    """Add adapter `adapter` to `model` in place: wrap the modules `config` targets and freeze the rest.

    The adapter starts as a no-op (B = 0), so the model's outputs do not change. Returns `model`.
    With `strict=True`, a name in `target_modules` that matches nothing is an error rather than a warning.
    With `trainable=False` the new adapter is frozen too and the other adapters are left as they are (so
    adding one costs the same however many the model holds: what loading for inference needs).
    """
    return attach(model, build(model, config, adapter, strict), adapter, activate, trainable)


@dataclass
class Built:
    """An adapter's objects, made for a model but not on it yet (a server makes them outside its model lock)."""

    config: object
    targets: list[str]
    objects: list[tuple[str, nn.Module]]  # (target module name, the adapter object for it)


def build(model: nn.Module, config=None, adapter: str = "default", strict: bool = False) -> Built:
    """Match the targets and make every adapter object, without touching the model (a refused layer leaves it
    as it was)."""
    config = config or LoraConfig()
    if not hasattr(config, "method") or not hasattr(config, "target_modules"):
        raise ConfigError(f"inject() takes a lorakit.LoraConfig (or a variant's config), got {type(config).__name__}")
    if not isinstance(adapter, str) or not adapter or "." in adapter:
        raise ConfigError(f"adapter names must be non-empty strings without dots, got {adapter!r}")
    _check_free(model, adapter)
    if config.target_modules is None:
        config = config.replace(target_modules=default_targets(model))
    targets = match_targets(model, config, strict=strict)
    cls = adapter_class(config)
    bases = [(name, _base(model.get_submodule(name))) for name in targets]
    if isinstance(config, LoraConfig) and not quiet_checks_on():
        _warn_rank_above_width(config, bases)
    shared = cls.prepare(config, model, bases)
    objects = [(name, cls.create(config, base, layer_type(base), name, shared)) for name, base in bases]
    if getattr(config, "init", None) == "loftq":  # A, B fitted to the bases' rounding error (quant/loftq.py)
        loftq_initialise(model, [(name, base, a) for (name, base), (_, a) in zip(bases, objects)], config)
    return Built(config, targets, objects)


def attach(model: nn.Module, built: Built, adapter: str, activate: bool = True, trainable: bool = True) -> nn.Module:
    """Put built adapter objects on the model under `adapter`: wrap their layers, record the config, choose what trains."""
    first = get_state(model) is None
    _check_free(model, adapter)
    state = get_state(model, create=True)
    config = built.config
    for name, adapter_object in built.objects:
        layer = _wrap(model, name)
        layer.add_adapter(adapter, adapter=adapter_object)
        # New modules start in training mode: one added to a model in eval() mode would run its dropout at inference.
        adapter_object.train(layer.training)
    for name in match_modules_to_save(model, config):
        _wrap_to_save(model, name).add_copy(adapter)

    state.configs[adapter] = config
    state.targets[adapter] = built.targets
    if activate or not state.active:
        set_active(model, adapter)
    if trainable:
        mark_trainable(model, adapter)
    else:
        if first:  # the base is frozen once; later adapters leave whatever the user has set since
            for p in base_parameters(model):
                p.requires_grad_(False)
        for _, a in built.objects:
            a.requires_grad_(False)
    install_adapter_names(model)  # model(ids, adapter_names=[...]): one adapter per row
    return model


def _check_free(model: nn.Module, adapter: str) -> None:
    state = get_state(model)
    if state is not None and adapter in state.configs:
        raise AdapterExistsError(f"model already has an adapter named {adapter!r}; delete it first or pick another name")


def trainable_parameters(model: nn.Module, verbose: bool = True) -> TrainableCount:
    """Count trainable and total parameters (shared tensors once) and print PEFT's one-line summary."""
    trainable = total = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = logical_numel(p)  # a 4-bit weight packs several values into each stored element
        total += n
        trainable += n if p.requires_grad else 0
    count = TrainableCount(trainable, total)
    if verbose:
        print(count)
    return count


def _warn_rank_above_width(config: LoraConfig, bases: list[tuple[str, nn.Module]]) -> None:
    """B·A has rank at most min(in, out): ranks above a layer's width are parameters that add nothing."""
    over = []
    for name, base in bases:
        r = config.rank_for(name)
        a_shape, b_shape = layer_type(base).factor_shapes(base, r)
        width = min(math.prod(a_shape[1:]), b_shape[0])  # A is (r, in, ...), B is (out, r, ...)
        if r > width:
            over.append((name, r, width))
    if not over:
        return
    shown = ", ".join(f"{name} (r={r}, min(in, out) = {width})" for name, r, width in over[:3])
    more = f" and {len(over) - 3} more" if len(over) > 3 else ""
    leaves = {name.rsplit(".", 1)[-1]: width for name, _, width in over}
    warnings.warn(f"r is above the layer's width on {len(over)} layer(s): {shown}{more}; B·A cannot have rank above "
                  f"min(in, out), so the extra ranks only add parameters: lower r or set rank_pattern={leaves}",
                  ConfigWarning, stacklevel=3)


def _base(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, LoraLayer) else module


def _wrap(model: nn.Module, name: str) -> LoraLayer:
    module = model.get_submodule(name)
    if isinstance(module, LoraLayer):
        return module
    layer = LoraLayer(module)
    layer.training = layer.adapters.training = module.training  # the new wrapper takes the mode of what it wraps
    replace_module(model, name, layer)
    return layer


def _wrap_to_save(model: nn.Module, name: str) -> ModulesToSave:
    module = model.get_submodule(name)
    if isinstance(module, ModulesToSave):
        return module
    wrapper = ModulesToSave(module)
    wrapper.training = wrapper.modules_to_save.training = module.training
    replace_module(model, name, wrapper)
    return wrapper
