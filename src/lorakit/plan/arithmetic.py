"""The LoRA parameter arithmetic that write-ups quote, computed with lorakit's own `inject` on meta-device models,
and a search for which (rank, targets) would give a quoted count, to tell a typo from a different setting."""

from __future__ import annotations

import itertools
from collections import OrderedDict

import torch
from torch import nn

from ..config import LoraConfig
from ..inject import inject, trainable_parameters
from .census import count_adapter
from .meta import build_meta_model, load_config

RANKS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def layer_params(in_features: int, out_features: int, rank: int) -> tuple[int, float]:
    """LoRA parameters on one Linear(in, out) at this rank, and their share of the layer's own weight (in %)."""
    with torch.device("meta"):
        model = nn.Sequential(OrderedDict(proj=nn.Linear(in_features, out_features, bias=False)))
    inject(model, LoraConfig(r=rank, target_modules=["proj"]))
    trainable = trainable_parameters(model, verbose=False).trainable
    return trainable, 100.0 * trainable / (in_features * out_features)


def params_per_leaf(model_or_config) -> dict[str, int]:
    """For each linear layer name ('q_proj', …): Σ (in + out) over the model's layers of that name,
    i.e. LoRA's parameter count at r = 1 (a rank-r adapter on that name has r times as many)."""
    model = build_meta_model(load_config(model_or_config))
    per_leaf: dict[str, int] = {}
    for a in count_adapter(model, LoraConfig(r=1, target_modules="all-linear")).modules:
        per_leaf[a.leaf] = per_leaf.get(a.leaf, 0) + a.in_features + a.out_features
    return per_leaf


def settings_giving(model_or_config, trainable: int, ranks=RANKS) -> list[tuple[int, tuple[str, ...]]]:
    """Every (rank, set of target names) whose LoRA has exactly `trainable` parameters on this model."""
    per_leaf = params_per_leaf(model_or_config)
    found = []
    for k in range(1, len(per_leaf) + 1):
        for leaves in itertools.combinations(per_leaf, k):
            unit = sum(per_leaf[x] for x in leaves)
            for r in ranks:
                if r * unit == trainable:
                    found.append((r, leaves))
    return sorted(found)
