"""Combine adapters into a new one, by the methods of PEFT's `add_weighted_adapter` (and mergekit's names).

    cat              [w₁s₁A₁ ; w₂s₂A₂ ; …], [B₁ | B₂ | …]: rank Σrᵢ, exactly Σ wᵢ·ΔWᵢ
    svd              Σ wᵢ·ΔWᵢ re-factorised at `rank` (default: the largest rank) by a truncated SVD
    linear           A' = Σ sign·√|wᵢsᵢ|·Aᵢ, B' = Σ √|wᵢsᵢ|·Bᵢ (same rank; cheap, only an approximation of Σ wᵢΔWᵢ)
    ties             per factor: keep the `density` largest entries, elect the majority sign, average the agreeing
    dare_linear      per factor: drop entries at random (keep `density`, rescale by 1/density), then linear
    dare_ties        per factor: DARE's random drop, then TIES's sign election
    magnitude_prune  per factor: keep the `density` largest entries, then linear
    <method>_svd     ties / dare_linear / dare_ties / magnitude_prune applied to the full ΔWᵢ, then an SVD

The definitions are PEFT's (`peft.utils.merge_utils`), so linear, cat and svd give PEFT's logits, and the random
methods give PEFT's draws when PEFT runs after `torch.manual_seed(seed)`. The result is an ordinary plain-LoRA
adapter (scale 1: alpha = r per layer): active, saved in PEFT format, merged and served like any other.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..adapters import require
from ..config import LoraConfig
from ..device import seeded_gpus
from ..errors import AdapterExistsError, ConfigError, ConfigWarning, IncompatibleAdapterError
from ..inject import inject
from ..state import adapter_layers, get_state, lora_layers
from . import lowrank

FACTOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")  # act on A and B separately
DELTA_METHODS = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")  # act on ΔW
METHODS = ("cat",) + FACTOR_METHODS + DELTA_METHODS
NEEDS_DENSITY = {"ties", "dare_linear", "dare_ties", "magnitude_prune"}


@dataclass
class _Part:
    """One source adapter on one layer: factors as (r, in·k·k) and (out, r), its scale and its weight."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    weight: float
    shapes: tuple = ()  # the factors' shapes in the file (combine_adapter_files writes them back alike)
    source: str = ""  # the adapter directory it came from (combine_adapter_files)


@torch.no_grad()
def combine_adapters(model: nn.Module, weights: dict[str, float], method: str = "svd", name: str = "combined",
                     density: float | None = None, rank: int | None = None, seed: int = 0,
                     majority_sign: str = "total", activate: bool = True) -> nn.Module:
    """Add adapter `name`: the adapters in `weights` ({name: weight}, weights may be negative) combined by `method`."""
    weights = _check_arguments(model, weights, method, name, density, rank, majority_sign)
    layers = _parts_per_layer(model, weights, method)
    # The random methods draw from the global generator, in PEFT's order (layer by layer, A's then B's), inside
    # fork_rng so that the caller's random state is left as it was (the new adapter's throwaway init too).
    with torch.random.fork_rng(devices=seeded_gpus()):
        torch.manual_seed(seed)
        factors = {layer_name: _combine_layer(parts, method, density, majority_sign, rank)
                   for layer_name, parts in layers.items()}
        inject(model, _combined_config(model, weights, factors), adapter=name, activate=activate)
    for layer_name, layer, adapter in adapter_layers(model, name):
        A, B = factors[layer_name]
        adapter.lora_A.copy_(A.reshape(adapter.lora_A.shape))
        adapter.lora_B.copy_(B.reshape(adapter.lora_B.shape))
    return model


# --- checks ----------------------------------------------------------------------------------------


def _check_arguments(model, weights, method, name, density, rank, majority_sign) -> dict[str, float]:
    """The checked weights, as floats."""
    if not isinstance(weights, dict) or not weights:
        raise ConfigError(f"weights must be a non-empty {{adapter: weight}} dict, got {weights!r}")
    checked = {}
    for adapter, w in weights.items():
        require(model, adapter)
        checked[adapter] = _check_weight(adapter, w)
    if name in get_state(model).configs:
        raise AdapterExistsError(f"model already has an adapter named {name!r}; pass another name=")
    check_options(method, density, rank, majority_sign)
    for adapter in weights:
        config = get_state(model).configs[adapter]
        if config.modules_to_save or config.bias != "none":
            raise IncompatibleAdapterError(
                f"adapter {adapter!r} also trains {'modules ' + str(config.modules_to_save) if config.modules_to_save else 'biases'}, "
                "which have no low-rank form to combine; combine adapters that hold only LoRA factors")
    return checked


def _real(x) -> float | None:
    """`x` as a float if it is a real number (int, float, numpy scalar, 0-dim tensor; not a bool), else None."""
    if isinstance(x, torch.Tensor):
        if x.dim() != 0 or x.dtype == torch.bool or x.dtype.is_complex:
            return None
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        return None
    try:
        return float(x)
    except (OverflowError, ValueError):
        return None


def _check_weight(what, w) -> float:
    value = _real(w)
    if value is None or not math.isfinite(value):
        raise ConfigError(f"the weight of {what!r} must be a finite real number, got {w!r}")
    return value


def check_options(method, density, rank, majority_sign) -> None:
    if method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, got {method!r}")
    if method.removesuffix("_svd") in NEEDS_DENSITY:
        value = _real(density)
        if value is None or not 0 < value <= 1:
            raise ConfigError(f"method {method!r} keeps a fraction `density` of each tensor: pass 0 < density ≤ 1, "
                              f"got {density!r}")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise ConfigError(f"rank must be a positive integer, got {rank!r}")
    if rank is not None and method not in DELTA_METHODS:
        raise ConfigError(f"rank= applies to the SVD methods {DELTA_METHODS}; {method!r} fixes the rank itself")
    if majority_sign not in ("total", "frequency"):
        raise ConfigError(f"majority_sign must be 'total' or 'frequency', got {majority_sign!r}")


def _parts_per_layer(model, weights, method) -> dict[str, list[_Part]]:
    """Every layer that any of the adapters adapts, with its parts; the factor methods need the same layers and ranks."""
    layers: dict[str, list[_Part]] = {}
    adapted: dict[str, set[str]] = {adapter: set() for adapter in weights}
    for layer_name, layer in lora_layers(model):
        parts = []
        for adapter, w in weights.items():
            a = layer.adapters._modules.get(adapter)
            if a is None:
                continue
            adapted[adapter].add(layer_name)
            if not getattr(a, "low_rank_delta", False):
                raise IncompatibleAdapterError(
                    f"adapter {adapter!r} is a {a.method} adapter on {layer_name!r}, whose change is not B·A "
                    "alone (DoRA rescales the weight); combine plain LoRA-family adapters, or merge it instead")
            A, B = (f.detach().float() for f in a.factors())
            parts.append(_Part(A.flatten(1), B.flatten(1), a.scale, float(w)))
        if parts:
            layers[layer_name] = parts
    check_same_layers(method, adapted, layers)
    return layers


def check_same_layers(method: str, adapted: dict[str, set[str]], layers: dict[str, list[_Part]]) -> None:
    """The factor methods combine A and B entry by entry: every adapter on the same layers, one rank per layer.
    `adapted` is {adapter: the layers it adapts}; `layers` every layer some adapter adapts, in order, with its parts."""
    if method not in FACTOR_METHODS:
        return
    order = {name: i for i, name in enumerate(layers)}
    missing = {adapter: where for adapter, mine in adapted.items() if (where := [n for n in layers if n not in mine])}
    if missing:  # the adapter that lacks the earliest layer
        adapter, where = min(missing.items(), key=lambda item: order[item[1][0]])
        raise IncompatibleAdapterError(
            f"method {method!r} combines A and B entry by entry, so every adapter must adapt the same layers; "
            f"adapter {adapter!r} has no factors on {where[:3]}{' …' if len(where) > 3 else ''}. "
            "Use method='cat' or 'svd', which combine adapters with different targets")
    for layer_name, parts in layers.items():
        ranks = {p.A.shape[0] for p in parts}
        if len(ranks) > 1:
            raise IncompatibleAdapterError(
                f"method {method!r} needs one rank per layer, but the adapters have ranks {sorted(ranks)} on "
                f"{layer_name!r}; use method='cat' or 'svd' (or lorakit.resize_adapter first)")


# --- the methods -------------------------------------------------------------------------------------


def _combine_layer(parts, method, density, majority_sign, rank) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's combined (A, B) by `method` (dict order of the layers fixes the random methods' draws)."""
    if method == "cat":
        return _cat(parts)
    if method in FACTOR_METHODS:
        return _per_factor(parts, method, density, majority_sign)
    if method == "svd":
        return _svd_of_sum(parts, rank)
    return _svd_of_merged_deltas(parts, method.removesuffix("_svd"), density, majority_sign, rank)


def _cat(parts: list[_Part]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([p.A * (p.weight * p.scale) for p in parts]), torch.cat([p.B for p in parts], dim=1)


def _per_factor(parts, method, density, majority_sign) -> tuple[torch.Tensor, torch.Tensor]:
    # √|w·s| on each factor, the sign on A only, so that B'·A' is Σ w·s·B·A for a single adapter.
    ws = [p.weight * p.scale for p in parts]
    weights_A = torch.tensor([math.copysign(math.sqrt(abs(x)), x) for x in ws])
    weights_B = torch.tensor([math.sqrt(abs(x)) for x in ws])
    A = merge_tensors([p.A for p in parts], weights_A, method, density, majority_sign)
    B = merge_tensors([p.B for p in parts], weights_B, method, density, majority_sign)
    return A, B


def _svd_of_sum(parts, rank) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ wᵢsᵢBᵢAᵢ is itself a product of concatenated factors: factorise it without forming it."""
    A, B = _cat(parts)
    k = min(rank or max(p.A.shape[0] for p in parts), A.shape[0], B.shape[0], A.shape[1])
    return lowrank.split(*lowrank.svd_of_product(B, A), k)


def _svd_of_merged_deltas(parts, method, density, majority_sign, rank) -> tuple[torch.Tensor, torch.Tensor]:
    deltas = [p.B @ p.A * p.scale for p in parts]
    merged = merge_tensors(deltas, torch.tensor([p.weight for p in parts]), method, density, majority_sign)
    k = min(rank or max(p.A.shape[0] for p in parts), *merged.shape)
    return lowrank.split(*lowrank.svd(merged), k)


def merge_tensors(tensors: list[torch.Tensor], weights: torch.Tensor, method: str, density: float | None,
                  majority_sign: str = "total") -> torch.Tensor:
    """One weighted merge of same-shaped tensors (PEFT's merge_utils definitions)."""
    w = weights.to(tensors[0]).view(-1, *[1] * tensors[0].dim())
    if method in ("linear", "svd"):
        return (torch.stack(tensors) * w).sum(0)
    if method in ("magnitude_prune", "ties"):
        tensors = [_keep_largest(t, density) for t in tensors]
    else:  # dare_linear, dare_ties
        tensors = [_drop_at_random(t, density) for t in tensors]
    stacked = torch.stack(tensors)
    if method in ("magnitude_prune", "dare_linear"):
        return (stacked * w).sum(0)
    # TIES: keep, per entry, only the tensors that agree with the majority sign, and average those.
    signs = stacked.sign()
    votes = stacked.sum(0) if majority_sign == "total" else signs.sum(0)
    agree = signs == torch.where(votes >= 0, 1.0, -1.0)
    return (stacked * w * agree).sum(0) / agree.sum(0).clamp(min=1)


def _keep_largest(t: torch.Tensor, density: float) -> torch.Tensor:
    """The k = ⌊density·n⌋ largest-magnitude entries kept, the rest zeroed (PEFT's magnitude prune).

    Through the k-th largest magnitude (a selection, 8x faster than PEFT's top-k and scatter on a 22k-entry factor)
    rather than top-k indices: the two differ only when entries tie with the threshold, and ties at zero change
    nothing (a zero kept is still zero)."""
    if density >= 1:
        return t
    k = int(density * t.numel())
    if k == 0:
        return torch.zeros_like(t)
    magnitude = t.abs()
    threshold = torch.kthvalue(magnitude.reshape(-1).float(), t.numel() - k + 1).values
    return t * (magnitude >= threshold)


def _drop_at_random(t: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return t
    return t * torch.bernoulli(torch.full_like(t, density)) / density


# --- the new adapter's config ---------------------------------------------------------------------------


def _combined_config(model, weights, factors) -> LoraConfig:
    """A plain LoRA at scale 1 on exactly the combined layers; layers of another rank go in rank_pattern."""
    first = get_state(model).configs[next(iter(weights))]
    ranks = {name: A.shape[0] for name, (A, _) in factors.items()}
    r = max(ranks.values())
    pattern = {name: k for name, k in ranks.items() if k != r}
    return LoraConfig(r=r, alpha=r, target_modules=list(factors), rank_pattern=pattern,
                      alpha_pattern={name: float(k) for name, k in pattern.items()},
                      task_type=first.task_type, base_model_name_or_path=first.base_model_name_or_path)


def combine_adapter_files(sources: list[tuple[str, float]], out, method: str = "svd", density: float | None = None,
                          rank: int | None = None, seed: int = 0, majority_sign: str = "total") -> Path:
    """`combine_adapters` on adapter directories of plain LoRA, without their base model; writes the result to `out`.
    Layers are taken in name order (a model's own order may differ, so the random methods draw differently)."""
    from ..io import PREFIX, write_adapter_files
    from .resize import read_fan_in_fan_out, scale_one_config

    if not sources:
        raise ConfigError("name at least one adapter to combine")
    check_options(method, density, rank, majority_sign)
    layers, tokens, configs = _read_sources(sources)
    layers = {m: layers[m] for m in sorted(layers, key=lambda n: [int(p) if p.isdigit() else p for p in n.split(".")])}
    adapted = {str(path): {m for m, parts in layers.items() if str(path) in {p.source for p in parts}}
               for path, _ in sources}
    check_same_layers(method, adapted, layers)
    with torch.random.fork_rng(devices=seeded_gpus()):
        torch.manual_seed(seed)
        factors = {module: _combine_layer(parts, method, density, majority_sign, rank) for module, parts in layers.items()}
    tensors, ranks = {}, {}
    for module, (A, B) in factors.items():
        a_shape, b_shape = layers[module][0].shapes
        k = A.shape[0]
        a_token, b_token = tokens[module]
        suffix = ".weight" if a_token == "lora_A" else ""
        tensors[f"{PREFIX}{module}.{a_token}{suffix}"] = A.reshape(k, *a_shape[1:])
        tensors[f"{PREFIX}{module}.{b_token}{suffix}"] = B.reshape(b_shape[0], k, *b_shape[2:])
        ranks[module] = k
    peft = scale_one_config(ranks, configs[0]).to_peft_dict(target_modules=sorted(ranks))
    # GPT-2's Conv1D layers: PEFT reads their factors with fan_in_fan_out=True, as the sources said
    peft["fan_in_fan_out"] = any(read_fan_in_fan_out(path) for path, _ in sources)
    return write_adapter_files(out, peft, tensors)


def _read_sources(sources):
    """Each source's factors per module (checked: plain LoRA, finite weight, one base's shapes); the factor names
    per module; the sources' configs."""
    from ..io import read_adapter_config, read_adapter_tensors, split_factor_key

    layers: dict[str, list[_Part]] = {}
    tokens: dict[str, tuple[str, str]] = {}
    configs = []
    for path, weight in sources:
        config = read_adapter_config(path)
        if config.method != "lora" or config.init not in ("kaiming", "gaussian") or config.modules_to_save or config.bias != "none":
            raise IncompatibleAdapterError(
                f"{path} is not a plain LoRA adapter ({config.method}, init {config.init}); combine it through a base "
                "model (lorakit combine --base DIR, or lorakit.combine_adapters), which understands every method")
        weight = _check_weight(str(path), weight)
        configs.append(config)
        by_module: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in read_adapter_tensors(path).items():
            found = split_factor_key(key)
            if found is None:
                raise IncompatibleAdapterError(f"{path}: tensor {key!r} is not a LoRA factor; only factors can be combined")
            by_module.setdefault(found[0], {})[found[1]] = value
        for module, parts in by_module.items():
            a_token, b_token = sorted(parts)
            tokens[module] = (a_token, b_token)
            A, B = parts[a_token], parts[b_token]
            part = _Part(A.float().flatten(1), B.float().flatten(1), config.scale_for(module), weight,
                         (tuple(A.shape), tuple(B.shape)), str(path))
            if module in layers:
                _check_same_shape(module, layers[module][0], part, configs)
            layers.setdefault(module, []).append(part)
    _warn_if_other_bases(sources, configs)
    return layers, tokens, configs


def _features(part: _Part) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A layer's (input, output) shape as its factors give it: A is (r, in, …), B is (out, r, …)."""
    a_shape, b_shape = part.shapes
    return tuple(a_shape[1:]), (b_shape[0], *b_shape[2:])


def _check_same_shape(module: str, first: _Part, part: _Part, configs) -> None:
    (in1, out1), (in2, out2) = _features(first), _features(part)
    if (in1, out1) != (in2, out2):
        bases = sorted({str(c.base_model_name_or_path) for c in configs if c.base_model_name_or_path})
        raise IncompatibleAdapterError(
            f"adapters {first.source} and {part.source} were trained on different bases: layer {module!r} takes "
            f"{_dims(in1)} inputs to {_dims(out1)} outputs in the first and {_dims(in2)} to {_dims(out2)} in the "
            f"second" + (f" (their configs name the bases {bases})" if len(bases) > 1 else "")
            + "; combine adapters of one base model")


def _dims(shape: tuple[int, ...]) -> str:
    return "×".join(map(str, shape))


def _warn_if_other_bases(sources, configs) -> None:
    bases = {str(path): c.base_model_name_or_path for (path, _), c in zip(sources, configs)}
    if len({b for b in bases.values() if b}) > 1:
        warnings.warn(f"the adapters name different base models ({', '.join(f'{p}: {b!r}' for p, b in bases.items())}); "
                      "their layers have the same shapes, so they are combined, but a combination only makes sense "
                      "on the base they were all trained on", ConfigWarning, stacklevel=3)
