"""Put LoRA into a model: find the target modules, wrap them, freeze everything else, count parameters."""

from __future__ import annotations

import copy
import re
import warnings
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple

from torch import nn

from .config import ALL_LINEAR, DEFAULT_TARGETS, LoraConfig
from .errors import AdapterExistsError, ConfigError, TargetModulesNotFoundError
from .layers import ActiveAdapter, LoraLayer, layer_kind

# Top-level heads that "all-linear" leaves alone: they map to the vocabulary or the labels.
OUTPUT_HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs", "cls", "embed_out")
# Default pattern for the block index in names like "model.layers.3.self_attn.q_proj".
DEFAULT_LAYERS_PATTERN = r"[^.]+"


@dataclass
class LoraState:
    """What lorakit keeps on an adapted model: every adapter's config and targets, and which are active."""

    configs: dict[str, LoraConfig] = field(default_factory=dict)
    targets: dict[str, list[str]] = field(default_factory=dict)
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


class TrainableCount(NamedTuple):
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


def get_state(model: nn.Module, create: bool = False) -> LoraState | None:
    state = model.__dict__.get("_lorakit_state")
    if state is None and create:
        state = LoraState()
        model.__dict__["_lorakit_state"] = state
    return state


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def save_wrappers(model: nn.Module) -> Iterator[tuple[str, ModulesToSave]]:
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSave):
            yield name, module


def inject(model: nn.Module, config: LoraConfig | None = None, adapter: str = "default", activate: bool = True,
           strict: bool = False) -> nn.Module:
    """Add adapter `adapter` to `model` in place: wrap the modules `config` targets and freeze the rest.

    The adapter's B factors are zero, so the model's outputs do not change. Returns `model`. A name in
    `target_modules` that matches nothing is a warning, or an error with `strict=True`.
    """
    config = config or LoraConfig()
    if not isinstance(config, LoraConfig):
        raise ConfigError(f"inject() takes a lorakit.LoraConfig, got {type(config).__name__}")
    if not isinstance(adapter, str) or not adapter or "." in adapter:
        raise ConfigError(f"adapter names must be non-empty strings without dots, got {adapter!r}")
    state = get_state(model, create=True)
    if adapter in state.configs:
        raise AdapterExistsError(f"model already has an adapter named {adapter!r}; delete it first or pick another name")
    if config.target_modules is None:
        config = config.replace(target_modules=default_targets(model))

    targets = match_targets(model, config, strict=strict)
    for name in targets:
        layer = _wrap(model, name)
        layer.add_adapter(adapter, config.rank_for(name), config.scale_for(name), config.dropout, config.init)
    for name in _match_modules_to_save(model, config):
        wrapper = _wrap_to_save(model, name)
        wrapper.add_copy(adapter)

    state.configs[adapter] = config
    state.targets[adapter] = targets
    if activate or not state.active:
        from .adapters import set_active  # adapters.py builds on this module

        set_active(model, adapter)
    mark_trainable(model, adapter)
    from .serve.mixed import install_adapter_names  # model(ids, adapter_names=[...]): one adapter per row

    install_adapter_names(model)
    return model


def default_targets(model: nn.Module) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGETS:
        return list(DEFAULT_TARGETS[model_type])
    raise ConfigError(
        f"no default target_modules for model type {model_type!r}; pass target_modules explicitly, e.g. "
        f"'all-linear' or some of: {', '.join(candidate_names(model))}"
    )


def match_targets(model: nn.Module, config: LoraConfig, strict: bool = False) -> list[str]:
    """Full names of the modules `config` puts LoRA on, in model order; errors if there are none (or, with
    `strict`, if any name in a target list matches nothing: a typo would otherwise train the rest silently)."""
    matched, unsupported, named = [], [], []
    heads = _output_heads(model)
    for name, module in _logical_modules(model):
        if not _is_target(name, module, config, heads):
            continue
        named.append(name)
        if _is_excluded(name, config) or not _in_layers(name, config):
            continue
        (matched if isinstance(module, LoraLayer) or layer_kind(module) else unsupported).append((name, module))
    if unsupported and config.target_modules != ALL_LINEAR:
        name, module = unsupported[0]
        raise TargetModulesNotFoundError(
            f"target_modules matched {name!r}, a {type(module).__name__}, which LoRA cannot wrap "
            f"(it wraps Linear, GPT-2 Conv1D, Embedding and Conv2d). Target the layers inside it, e.g. "
            f"{', '.join(candidate_names(module)) or 'none found'}"
        )
    if not matched:
        raise TargetModulesNotFoundError(
            f"target_modules={config.target_modules!r} matched no module of {type(model).__name__}"
            + (f" (with layers_to_transform={config.layers_to_transform})" if config.layers_to_transform else "")
            + f". Candidates that LoRA can wrap: {', '.join(candidate_names(model))}. "
            "Pass some of these names, a regex over full module names, or 'all-linear'."
        )
    if isinstance(config.target_modules, list):
        unused = [t for t in config.target_modules if not any(_suffix_match(n, t) for n in named)]
        if unused:
            message = f"target_modules {unused} matched no module; candidates: {', '.join(candidate_names(model))}"
            if strict:
                raise TargetModulesNotFoundError(f"{message}. Correct or drop the unmatched name(s).")
            warnings.warn(message)
    return [name for name, _ in matched]


def candidate_names(model: nn.Module) -> list[str]:
    """Distinct last name parts of the modules LoRA can wrap, e.g. ['q_proj', 'k_proj', ...]."""
    names: dict[str, None] = {}
    for name, module in _logical_modules(model):
        if name and (isinstance(module, LoraLayer) or layer_kind(module)):
            names[name.rsplit(".", 1)[-1]] = None
    return list(names)


def mark_trainable(model: nn.Module, adapter: str) -> None:
    """Freeze everything, then unfreeze `adapter`'s factors, its saved-module copies and the biases its config asks for."""
    state = get_state(model)
    config = state.configs[adapter]
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in lora_layers(model):
        if adapter in layer.adapters:
            layer.adapters[adapter].requires_grad_(True)
            if config.bias == "lora_only" and getattr(layer.base_layer, "bias", None) is not None:
                layer.base_layer.bias.requires_grad_(True)
    for _, wrapper in save_wrappers(model):
        if adapter in wrapper.modules_to_save:
            wrapper.modules_to_save[adapter].requires_grad_(True)
    if config.bias == "all":
        for name, p in model.named_parameters():
            if name.endswith("bias") and ".original_module." not in name:
                p.requires_grad_(True)


def trainable_parameters(model: nn.Module, verbose: bool = True) -> TrainableCount:
    """Count trainable and total parameters (shared tensors once) and print PEFT's one-line summary."""
    trainable = total = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel() * (2 if p.__class__.__name__ == "Params4bit" else 1)
        total += n
        trainable += n if p.requires_grad else 0
    count = TrainableCount(trainable, total)
    if verbose:
        print(count)
    return count


# --- matching rules (PEFT's, so configs mean the same thing in both) ---------------------------------


def _logical_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """named_modules(), but a LoRA layer or saved-module wrapper stands for the module it wraps."""
    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(s) for s in skip):
            continue
        if isinstance(module, (LoraLayer, ModulesToSave)):
            skip.append(name + ".")
        yield name, module


def _suffix_match(name: str, key: str) -> bool:
    return name == key or name.endswith("." + key)


def _is_target(name: str, module: nn.Module, config: LoraConfig, heads: list[str]) -> bool:
    targets = config.target_modules
    if targets == ALL_LINEAR:
        base = module.base_layer if isinstance(module, LoraLayer) else module
        if layer_kind(base) not in ("linear", "conv1d"):
            return False
        return not any(name == h or name.startswith(h + ".") for h in heads + list(config.modules_to_save or []))
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(_suffix_match(name, key) for key in targets)


def _is_excluded(name: str, config: LoraConfig) -> bool:
    excl = config.exclude_modules
    if excl is None:
        return False
    if isinstance(excl, str):
        return re.fullmatch(excl, name) is not None
    return any(_suffix_match(name, key) for key in excl)


def _in_layers(name: str, config: LoraConfig) -> bool:
    if config.layers_to_transform is None:
        return True
    patterns = config.layers_pattern or DEFAULT_LAYERS_PATTERN
    patterns = [patterns] if isinstance(patterns, str) else patterns
    for pattern in patterns:
        m = re.match(rf"(?:.*\.)?(?:{pattern})\.(\d+)\.", name)
        if m:
            return int(m.group(1)) in config.layers_to_transform
    return False


def _output_heads(model: nn.Module) -> list[str]:
    heads = [n for n, _ in model.named_children() if n in OUTPUT_HEAD_NAMES]
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if out is not None:
        heads += [n for n, m in model.named_modules() if m is out and n]
    return heads


def _match_modules_to_save(model: nn.Module, config: LoraConfig) -> list[str]:
    if not config.modules_to_save:
        return []
    names = [n for n, _ in _logical_modules(model) if n and any(_suffix_match(n, k) for k in config.modules_to_save)]
    if not names and config.task_type not in ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS"):
        raise TargetModulesNotFoundError(
            f"modules_to_save={config.modules_to_save} matched no module; top-level modules are: "
            f"{', '.join(n for n, _ in model.named_children())}"
        )
    return names


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _wrap(model: nn.Module, name: str) -> LoraLayer:
    module = model.get_submodule(name)
    if isinstance(module, LoraLayer):
        return module
    layer = LoraLayer(module)
    _set_submodule(model, name, layer)
    return layer


def _wrap_to_save(model: nn.Module, name: str) -> ModulesToSave:
    module = model.get_submodule(name)
    if isinstance(module, ModulesToSave):
        return module
    wrapper = ModulesToSave(module)
    _set_submodule(model, name, wrapper)
    return wrapper
