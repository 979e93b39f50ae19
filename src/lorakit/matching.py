"""Which modules a config adapts: PEFT's matching rules (suffix lists, regex, "all-linear", excludes, layer
indices), so a config means the same thing in both libraries; errors list the names that would have matched."""

from __future__ import annotations

import re
import warnings
from typing import Iterator

from torch import nn

from .config import ALL_LINEAR, DEFAULT_TARGETS
from .errors import ConfigError, TargetModulesNotFoundError
from .layers import LoraLayer, layer_type
from .state import ModulesToSave

# Top-level heads that "all-linear" leaves alone: they map to the vocabulary or the labels.
OUTPUT_HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs", "cls", "embed_out")
# Default pattern for the block index in names like "model.layers.3.self_attn.q_proj".
DEFAULT_LAYERS_PATTERN = r"[^.]+"


def match_targets(model: nn.Module, config, strict: bool = False) -> list[str]:
    """Full names of the modules `config` puts LoRA on, in model order; errors if there are none.

    Names in a target list that match nothing are a warning, or an error with `strict=True`.
    """
    matched, unsupported, named = [], [], []
    heads = _output_heads(model)
    for name, module in logical_modules(model):
        if not _is_target(name, module, config, heads):
            continue
        named.append(name)
        if is_excluded(name, config) or not in_layers(name, config):
            continue
        (matched if wrappable(module) else unsupported).append((name, module))
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
        unused = [t for t in config.target_modules if not any(suffix_match(n, t) for n in named)]
        if unused:
            message = f"target_modules {unused} matched no module; candidates: {', '.join(candidate_names(model))}"
            if strict:
                raise TargetModulesNotFoundError(f"{message}. Correct or drop the unmatched name(s).")
            warnings.warn(message)
    return [name for name, _ in matched]


def default_targets(model: nn.Module) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGETS:
        return list(DEFAULT_TARGETS[model_type])
    raise ConfigError(
        f"no default target_modules for model type {model_type!r}; pass target_modules explicitly, e.g. "
        f"'all-linear' or some of: {', '.join(candidate_names(model))}"
    )


def candidate_names(model: nn.Module) -> list[str]:
    """Distinct last name parts of the modules LoRA can wrap, e.g. ['q_proj', 'k_proj', ...]."""
    names: dict[str, None] = {}
    for name, module in logical_modules(model):
        if name and wrappable(module):
            names[name.rsplit(".", 1)[-1]] = None
    return list(names)


def saved_target_modules(model: nn.Module, config, targets: list[str]) -> list[str] | str:
    """What to write as target_modules: leaf names (["q_proj", "v_proj"]) when they select exactly the
    adapted modules, else the full names (PEFT then matches them exactly)."""
    if isinstance(config.target_modules, str) and config.target_modules != ALL_LINEAR:
        return config.target_modules
    leaves = sorted({t.rsplit(".", 1)[-1] for t in targets})
    probe = config.replace(target_modules=leaves)
    reselected = [
        n for n, m in logical_modules(model)
        if wrappable(m) and n.rsplit(".", 1)[-1] in leaves and not is_excluded(n, probe) and in_layers(n, probe)
    ]
    return leaves if reselected == targets else list(targets)


def match_modules_to_save(model: nn.Module, config) -> list[str]:
    if not config.modules_to_save:
        return []
    names = [n for n, _ in logical_modules(model) if n and any(suffix_match(n, k) for k in config.modules_to_save)]
    if not names and config.task_type not in ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS"):
        raise TargetModulesNotFoundError(
            f"modules_to_save={config.modules_to_save} matched no module; top-level modules are: "
            f"{', '.join(n for n, _ in model.named_children())}"
        )
    return names


def logical_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """named_modules(), but a LoRA layer or saved-module wrapper stands for the module it wraps."""
    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(s) for s in skip):
            continue
        if isinstance(module, (LoraLayer, ModulesToSave)):
            skip.append(name + ".")
        yield name, module


def wrappable(module: nn.Module) -> bool:
    return isinstance(module, LoraLayer) or layer_type(module) is not None


def base_of(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, LoraLayer) else module


def suffix_match(name: str, key: str) -> bool:
    return name == key or name.endswith("." + key)


def is_excluded(name: str, config) -> bool:
    excl = config.exclude_modules
    if excl is None:
        return False
    if isinstance(excl, str):
        return re.fullmatch(excl, name) is not None
    return any(suffix_match(name, key) for key in excl)


def in_layers(name: str, config) -> bool:
    if config.layers_to_transform is None:
        return True
    patterns = config.layers_pattern or DEFAULT_LAYERS_PATTERN
    patterns = [patterns] if isinstance(patterns, str) else patterns
    for pattern in patterns:
        m = re.match(rf"(?:.*\.)?(?:{pattern})\.(\d+)\.", name)
        if m:
            return int(m.group(1)) in config.layers_to_transform
    return False


def _is_target(name: str, module: nn.Module, config, heads: list[str]) -> bool:
    targets = config.target_modules
    if targets == ALL_LINEAR:
        ltype = layer_type(base_of(module))
        if ltype is None or not ltype.is_linear:
            return False
        return not any(name == h or name.startswith(h + ".") for h in heads + list(config.modules_to_save or []))
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(suffix_match(name, key) for key in targets)


def _output_heads(model: nn.Module) -> list[str]:
    heads = [n for n, _ in model.named_children() if n in OUTPUT_HEAD_NAMES]
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if out is not None:
        heads += [n for n, m in model.named_modules() if m is out and n]
    return heads
