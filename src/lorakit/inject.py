"""Put LoRA into a model: find the target modules, wrap them, add the adapter, freeze the rest, count parameters."""

from __future__ import annotations

from typing import NamedTuple

from torch import nn

from .adapters import install_adapter_names, mark_trainable, set_active
from .config import LoraConfig
from .errors import AdapterExistsError, ConfigError
from .layers import LoraLayer, layer_type
from .matching import default_targets, match_modules_to_save, match_targets
from .state import ModulesToSave, get_state, replace_module
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
           strict: bool = False) -> nn.Module:
    """Add adapter `adapter` to `model` in place: wrap the modules `config` targets and freeze the rest.

    The adapter starts as a no-op (B = 0), so the model's outputs do not change. Returns `model`.
    With `strict=True`, a name in `target_modules` that matches nothing is an error rather than a warning.
    """
    config = config or LoraConfig()
    if not hasattr(config, "method") or not hasattr(config, "target_modules"):
        raise ConfigError(f"inject() takes a lorakit.LoraConfig (or a variant's config), got {type(config).__name__}")
    if not isinstance(adapter, str) or not adapter or "." in adapter:
        raise ConfigError(f"adapter names must be non-empty strings without dots, got {adapter!r}")
    state = get_state(model, create=True)
    if adapter in state.configs:
        raise AdapterExistsError(f"model already has an adapter named {adapter!r}; delete it first or pick another name")
    if config.target_modules is None:
        config = config.replace(target_modules=default_targets(model))

    targets = match_targets(model, config, strict=strict)
    cls = adapter_class(config)
    bases = [(name, _base(model.get_submodule(name))) for name in targets]
    shared = cls.prepare(config, model, bases)
    # Every adapter object is built before the model is touched, so a refused layer leaves the model as it was.
    built = [(name, cls.create(config, base, layer_type(base), name, shared)) for name, base in bases]
    for name, adapter_object in built:
        _wrap(model, name).add_adapter(adapter, adapter=adapter_object)
    for name in match_modules_to_save(model, config):
        _wrap_to_save(model, name).add_copy(adapter)

    state.configs[adapter] = config
    state.targets[adapter] = targets
    if activate or not state.active:
        set_active(model, adapter)
    mark_trainable(model, adapter)
    install_adapter_names(model)  # model(ids, adapter_names=[...]): one adapter per row
    return model


def trainable_parameters(model: nn.Module, verbose: bool = True) -> TrainableCount:
    """Count trainable and total parameters (shared tensors once) and print PEFT's one-line summary."""
    trainable = total = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel() * (2 if p.__class__.__name__ == "Params4bit" else 1)  # two 4-bit values per stored byte
        total += n
        trainable += n if p.requires_grad else 0
    count = TrainableCount(trainable, total)
    if verbose:
        print(count)
    return count


def _base(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, LoraLayer) else module


def _wrap(model: nn.Module, name: str) -> LoraLayer:
    module = model.get_submodule(name)
    if isinstance(module, LoraLayer):
        return module
    layer = LoraLayer(module)
    replace_module(model, name, layer)
    return layer


def _wrap_to_save(model: nn.Module, name: str) -> ModulesToSave:
    module = model.get_submodule(name)
    if isinstance(module, ModulesToSave):
        return module
    wrapper = ModulesToSave(module)
    replace_module(model, name, wrapper)
    return wrapper
