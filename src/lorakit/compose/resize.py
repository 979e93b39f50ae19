"""Resize an adapter's rank: re-factorise each layer's s·B·A by SVD to a smaller rank, fixed or chosen per layer
by the share of ‖ΔW‖² to keep, and report what each layer kept. Also each layer's singular-value spectrum.

The result is a plain LoRA at scale 1 (alpha = rank per layer, ranks that differ in rank_pattern), so PEFT,
vLLM and lorakit's server run it as any other adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..adapters import active_adapters, apply_active, delete_adapter, is_merged, require
from ..config import LoraConfig
from ..errors import ConfigError, IncompatibleAdapterError, MergeStateError
from ..inject import inject
from ..state import adapter_layers, get_state
from . import lowrank


@dataclass
class LayerResize:
    module: str
    old_rank: int
    new_rank: int
    energy_kept: float  # share of ‖ΔW‖²_F the new rank keeps
    relative_error: float  # ‖ΔW − ΔW_new‖_F / ‖ΔW‖_F

    def format(self) -> str:
        return (f"{self.module:60s} r {self.old_rank:>4d} -> {self.new_rank:<4d} energy kept {self.energy_kept:7.2%}  "
                f"relative error {self.relative_error:.2e}")


def choose_rank(S: torch.Tensor, old_rank: int, rank: int | None, energy: float | None) -> int:
    """The new rank of one layer: `rank` capped at the layer's own (layers of a smaller rank keep theirs), or the
    smallest keeping `energy` of ‖ΔW‖²."""
    if rank is not None:
        return min(rank, old_rank)
    return lowrank.rank_for_energy(S, energy)


def check_rank_fits(rank: int | None, old_ranks: dict[str, int]) -> None:
    """Refuse a rank above the adapter's largest: resizing only lowers ranks (a larger one would add nothing)."""
    if rank is None or not old_ranks:
        return
    module, largest = max(old_ranks.items(), key=lambda item: item[1])
    if rank > largest:
        raise ConfigError(f"cannot resize to rank {rank}: the adapter's largest rank is {largest} (on {module!r}), "
                          "and resizing only lowers ranks (a larger rank would add nothing); pass --rank ≤ "
                          f"{largest} (layers of a smaller rank keep theirs)")


def check_target(rank: int | None, energy: float | None) -> None:
    if (rank is None) == (energy is None):
        raise ConfigError("pass exactly one of rank=k (the same rank everywhere) or energy=e (per layer, the "
                          "smallest rank keeping that share of ‖ΔW‖², e.g. 0.9)")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise ConfigError(f"rank must be a positive integer, got {rank!r}")
    if energy is not None and not 0 < energy <= 1:
        raise ConfigError(f"energy must be in (0, 1], got {energy!r}")


def resize_factors(module: str, A: torch.Tensor, B: torch.Tensor, scale: float, rank: int | None,
                   energy: float | None) -> tuple[torch.Tensor, torch.Tensor, LayerResize]:
    """New (A, B) at scale 1 for ΔW = scale·B·A (A as (r, in·k·k), B as (out, r)), and what was kept."""
    U, S, Vh = lowrank.svd_of_product(B.float() * scale, A.float())
    old = A.shape[0]
    k = choose_rank(S, old, rank, energy)
    kept = lowrank.energy_kept(S)[k - 1].item()
    new_A, new_B = lowrank.split(U, S, Vh, k)
    return new_A, new_B, LayerResize(module, old, k, kept, lowrank.relative_error(S, k))


@torch.no_grad()
def resize_adapter(model: nn.Module, name: str, rank: int | None = None, energy: float | None = None,
                   new_name: str | None = None) -> list[LayerResize]:
    """Re-factorise adapter `name` at `rank` (or, per layer, the smallest rank keeping `energy` of ‖ΔW‖²).

    In place by default; with `new_name` the resized adapter is added beside the original. Returns, per layer,
    the old and new rank, the energy kept and the relative Frobenius error.
    """
    check_target(rank, energy)
    config = require(model, name).configs[name]
    if is_merged(model):
        raise MergeStateError("the model has merged adapters; call lorakit.unmerge(model) before resizing")
    if config.modules_to_save or config.bias != "none":
        raise IncompatibleAdapterError(f"adapter {name!r} also trains modules or biases, which resizing would drop")
    old = {}
    for layer_name, layer, a in adapter_layers(model, name):
        if not getattr(a, "low_rank_delta", False):
            raise IncompatibleAdapterError(f"adapter {name!r} is a {a.method} adapter; its change on {layer_name!r} "
                                           "is not B·A alone, so it has no rank to resize")
        A, B = (f.detach().float() for f in a.factors())
        old[layer_name] = (A.flatten(1), B.flatten(1), a.scale)
    check_rank_fits(rank, {n: A.shape[0] for n, (A, _, _) in old.items()})
    factors, report = {}, []
    for layer_name, (A, B, scale) in old.items():
        new_A, new_B, row = resize_factors(layer_name, A, B, scale, rank, energy)
        factors[layer_name] = (new_A, new_B)
        report.append(row)
    new_config = scale_one_config({n: A.shape[0] for n, (A, _) in factors.items()}, config)
    target = new_name or name
    active = active_adapters(model)
    if new_name is None:
        delete_adapter(model, name)
    inject(model, new_config, adapter=target, activate=False)
    for layer_name, layer, a in adapter_layers(model, target):
        A, B = factors[layer_name]
        a.lora_A.copy_(A.reshape(a.lora_A.shape))
        a.lora_B.copy_(B.reshape(a.lora_B.shape))
    if new_name is None:  # the resized adapter takes the original's place in the active set
        from ..layers import ActiveAdapter

        apply_active(model, [ActiveAdapter(n, w) for n, w in active])
    get_state(model).configs[target] = new_config
    return report


def scale_one_config(ranks: dict[str, int], like) -> LoraConfig:
    """A plain LoRA config at scale 1 for these layers and ranks (the most common rank as r)."""
    counts: dict[int, int] = {}
    for k in ranks.values():
        counts[k] = counts.get(k, 0) + 1
    r = max(counts, key=lambda k: (counts[k], k))
    pattern = {name: k for name, k in ranks.items() if k != r}
    return LoraConfig(r=r, alpha=r, target_modules=list(ranks), rank_pattern=pattern,
                      alpha_pattern={name: float(k) for name, k in pattern.items()}, task_type=like.task_type,
                      base_model_name_or_path=like.base_model_name_or_path)


def resize_adapter_files(path, out, rank: int | None = None, energy: float | None = None) -> list[LayerResize]:
    """`resize_adapter` on an adapter directory, without its base model: writes the resized adapter to `out`."""
    from ..io import PREFIX, read_adapter_config, read_adapter_tensors, split_factor_key, write_adapter_files
    from ..variants import adapter_class

    check_target(rank, energy)
    config = read_adapter_config(path)
    tensors = read_adapter_tensors(path)
    parts: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, value in tensors.items():
        found = split_factor_key(key)
        if found is None:
            raise IncompatibleAdapterError(f"{path}: tensor {key!r} is not a LoRA factor (a trained module or bias), "
                                           "which resizing would drop")
        module, token = found
        parts.setdefault(module, {})[token] = (key, value)
    cls = adapter_class(config)
    if not getattr(cls, "low_rank_delta", False):
        raise IncompatibleAdapterError(f"{path} is a {config.method} adapter, whose change is not B·A alone")
    check_rank_fits(rank, {module: _rank_in_file(found, config, module) for module, found in parts.items()})
    new_tensors, ranks, report = {}, {}, []
    for module, found in sorted(parts.items()):
        by_token = {t: v for t, (_, v) in found.items()}
        if set(by_token) in ({"lora_A", "lora_B"}, {"lora_embedding_A", "lora_embedding_B"}):
            a_token, b_token = sorted(by_token)
            A, B = by_token[a_token], by_token[b_token]
            new_A, new_B, row = resize_factors(module, A.float().flatten(1), B.float().flatten(1),
                                               config.scale_for(module), rank, energy)
            shape_A, shape_B = (new_A.shape[0], *A.shape[1:]), (B.shape[0], new_A.shape[0], *B.shape[2:])
        else:  # another method's tensors (VeRA, AdaLoRA): through the full ΔW
            delta = cls.delta_from_file(by_token, config, module)
            U, S, Vh = lowrank.svd(delta.float())
            old = config.rank_for(module)
            k = choose_rank(S, old, rank, energy)
            new_A, new_B = lowrank.split(U, S, Vh, k)
            row = LayerResize(module, old, k, lowrank.energy_kept(S)[k - 1].item(), lowrank.relative_error(S, k))
            a_token, b_token, shape_A, shape_B = "lora_A", "lora_B", new_A.shape, new_B.shape
        suffix = ".weight" if a_token == "lora_A" else ""
        new_tensors[f"{PREFIX}{module}.{a_token}{suffix}"] = new_A.reshape(shape_A)
        new_tensors[f"{PREFIX}{module}.{b_token}{suffix}"] = new_B.reshape(shape_B)
        ranks[module] = new_A.shape[0]
        report.append(row)
    new_config = scale_one_config(ranks, config)
    peft = new_config.to_peft_dict(target_modules=sorted(ranks))
    peft["fan_in_fan_out"] = read_fan_in_fan_out(path)
    write_adapter_files(out, peft, new_tensors)
    return report


def _rank_in_file(found: dict[str, tuple[str, torch.Tensor]], config, module: str) -> int:
    for token in ("lora_A", "lora_embedding_A"):
        if token in found:
            return found[token][1].shape[0]
    return config.rank_for(module)  # another method's tensors (VeRA, AdaLoRA)


def read_fan_in_fan_out(path) -> bool:
    """The adapter config's fan_in_fan_out (True for GPT-2's Conv1D layers), which LoraConfig does not keep."""
    import json
    from pathlib import Path

    try:
        return bool(json.loads((Path(path) / "adapter_config.json").read_text()).get("fan_in_fan_out", False))
    except (OSError, ValueError):
        return False
