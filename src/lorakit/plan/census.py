"""Count what a meta-device model holds: base parameters, the linear weights a 4-bit base would quantise,
and the adapter lorakit's own `inject` puts on it (so target matching and counts are lorakit's, not a copy)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import LoraConfig
from ..inject import inject, trainable_parameters
from ..layers import LoraLayer

_BLOCK_INDEX = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class Adapted:
    """One module LoRA was put on: where it is, its base layer's sizes, and its rank."""

    name: str
    block: int | None  # index of the repeated block ("model.layers.3.…" -> 3), None outside the blocks
    leaf: str  # "q_proj"
    in_features: int
    out_features: int
    rank: int

    @property
    def params(self) -> int:
        return self.rank * (self.in_features + self.out_features)


@dataclass
class BaseCensus:
    """The base model's parameters, by what a plan needs to know about them."""

    total: int  # every parameter once (tied weights once)
    linear: int  # weights of the Linear layers bitsandbytes quantises (all but the output head)
    linear_layers: int  # how many such layers (each carries its own quantisation constants)
    linear_shapes: list[tuple[int, int]] = field(default_factory=list)  # (out, in) of each
    sizes: list[int] = field(default_factory=list)  # element count of each parameter (what an optimizer sees)
    largest_linear: int = 0


@dataclass
class AdapterCensus:
    modules: list[Adapted]
    trainable: int  # as lorakit.trainable_parameters counts it (adapter + anything else left trainable)
    total: int  # base + adapter
    dtype: torch.dtype  # what lorakit's LoraAdapter chose for this base dtype
    sizes: list[int] = field(default_factory=list)  # element count of each trainable tensor

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0


def count_base(model: nn.Module) -> BaseCensus:
    seen: set[int] = set()
    sizes = []
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            sizes.append(p.numel())
    heads = _output_head_weights(model)
    shapes = [_out_in(m) for m in model.modules() if _out_in(m) and id(m.weight) not in heads]
    linear = sum(o * i for o, i in shapes)
    return BaseCensus(sum(sizes), linear, len(shapes), shapes, sizes, max((o * i for o, i in shapes), default=0))


def count_adapter(model: nn.Module, config: LoraConfig) -> AdapterCensus:
    """Inject `config` into the meta model (in place) with lorakit's own `inject`, and read back what it made."""
    inject(model, config)
    modules = []
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        for pname, p in layer.named_parameters():
            if pname.endswith("lora_A") and p.requires_grad:
                rank, in_f = p.shape[0], p.shape[1]
                out_f = next(q for n, q in layer.named_parameters() if n == pname[:-1] + "B").shape[0]
                m = _BLOCK_INDEX.search("." + name + ".")
                modules.append(Adapted(name, int(m.group(1)) if m else None, name.rsplit(".", 1)[-1], in_f, out_f, rank))
    count = trainable_parameters(model, verbose=False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    dtype = trainable[0].dtype if trainable else torch.float32
    return AdapterCensus(modules, count.trainable, count.total, dtype, [p.numel() for p in trainable])


def _out_in(module: nn.Module) -> tuple[int, int] | None:
    """(out, in) of a layer bitsandbytes replaces by a 4-bit one: nn.Linear, and GPT-2's Conv1D (weight stored (in, out))."""
    if isinstance(module, nn.Linear):
        return tuple(module.weight.shape)
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return tuple(module.weight.shape[::-1])
    return None


def _output_head_weights(model: nn.Module) -> set[int]:
    """ids of the output head's weight(s): bitsandbytes keeps the head in full precision (transformers'
    `get_keys_to_not_convert`), and "all-linear" LoRA skips it too."""
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    return {id(out.weight)} if out is not None and getattr(out, "weight", None) is not None else set()
