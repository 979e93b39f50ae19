"""Mixture of LoRAs (X-LoRA / MoLE style), the adapter side: at each adapted layer a small trainable router that
reads the layer's input and weights frozen expert adapters (ordinary adapters on the same layer) per token.

    g(x) = softmax(x·Wᵣᵀ)        (optionally only the top-k experts, renormalised)
    y    = base(x) + Σₑ gₑ(x) · ΔWₑ·x

The router starts at zero, so an untrained mixture is the experts' equal average. Training adds a
load-balancing loss (Switch Transformer's E·Σₑ fₑ·Pₑ) scaled by `load_balance`, so the routers do not
collapse onto one expert. Building, saving and loading a mixture: lorakit.compose.mixture.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, MergeStateError
from ..layers import LayerType, adapter_dtype
from ..rows import MixedBatchError

@dataclass
class MixtureConfig:
    """The experts (name → adapter directory) and how the routers weight them."""

    experts: dict[str, str]
    top_k: int | None = None  # None: every expert, softmax-weighted; k: the k largest, renormalised
    router: str = "token"  # routing decisions per token (the only kind so far)
    load_balance: float = 0.01  # weight of the load-balancing loss in training
    # Filled in by add_mixture: the layers any expert adapts. The fields below let inject() treat a mixture
    # like any other adapter config.
    target_modules: list[str] | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    exclude_modules: Any = None
    layers_to_transform: Any = None
    layers_pattern: Any = None
    modules_to_save: Any = None
    bias: str = "none"
    rank_pattern: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.experts, dict) or len(self.experts) < 2:
            raise ConfigError(f"a mixture needs at least two experts as {{name: adapter directory}}, got {self.experts!r}")
        for name in self.experts:
            if not isinstance(name, str) or not name or "." in name:
                raise ConfigError(f"expert names must be non-empty strings without dots, got {name!r}")
        if self.top_k is not None and not (isinstance(self.top_k, int) and not isinstance(self.top_k, bool)
                                           and 1 <= self.top_k <= len(self.experts)):
            raise ConfigError(f"top_k must be None or an integer from 1 to {len(self.experts)} (the experts), got {self.top_k!r}")
        if self.router != "token":
            raise ConfigError(f"router must be 'token' (per-token routing), got {self.router!r}")
        lb = self.load_balance
        if not isinstance(lb, (int, float)) or isinstance(lb, bool) or not math.isfinite(lb) or lb < 0:
            raise ConfigError(f"load_balance must be a finite number ≥ 0 (the weight of the load-balancing loss, e.g. "
                              f"0.01), got {lb!r}")

    @property
    def method(self) -> str:
        return "mixture"

    def rank_for(self, module_name: str) -> int:
        return len(self.experts)

    def replace(self, **changes: Any) -> "MixtureConfig":
        return replace(self, **changes)

    def to_peft_dict(self, target_modules=None) -> dict:
        raise ConfigError("a mixture is not a PEFT adapter: save it with lorakit.save_mixture(model, path)")


class MixtureAdapter(nn.Module):
    """On one layer: the router over the experts (which are ordinary adapters on the same layer, frozen)."""

    method = "mixture"
    low_rank_delta = False
    per_row = False  # routes each token itself: per-row batches run its output() on its rows, no slots

    def __init__(self, in_features: int, experts: list[str], top_k: int | None, dtype, device):
        super().__init__()
        self.router = nn.Linear(in_features, len(experts), bias=False, dtype=dtype, device=device)
        nn.init.zeros_(self.router.weight)  # equal weights at the start: the experts' plain average
        self.experts, self.top_k = list(experts), top_k
        self.rank, self.scale = len(experts), 1.0
        self.balance_loss: torch.Tensor | None = None  # of the last training forward

    @classmethod
    def prepare(cls, config, model, bases):
        return None

    @classmethod
    def create(cls, config: MixtureConfig, base: nn.Module, ltype: LayerType, name: str, shared=None) -> "MixtureAdapter":
        return cls(cls.router_width(ltype, base), list(config.experts), config.top_k, adapter_dtype(base.weight.dtype),
                   base.weight.device)

    @staticmethod
    def router_width(ltype: LayerType, base: nn.Module) -> int:
        """The features the router reads: the layer's input, or for an embedding (whose input is token ids) its output."""
        in_f, out_f = ltype.features(base)
        return out_f if ltype.takes_ids else in_f

    def attach(self, layer) -> None:
        pass

    def detach(self, layer) -> None:
        pass

    def gates(self, h: torch.Tensor) -> torch.Tensor:
        probs = F.softmax(self.router(h.to(self.router.weight.dtype)), dim=-1)
        if self.training:
            self.balance_loss = _balance_loss(probs)
        if self.top_k is None or self.top_k == len(self.experts):
            return probs
        top = probs.topk(self.top_k, dim=-1)
        kept = torch.zeros_like(probs).scatter(-1, top.indices, top.values)
        return kept / kept.sum(-1, keepdim=True)

    def output(self, layer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        g = self.gates(y if layer.type.takes_ids else x)
        present = [(e, layer.adapters._modules.get(name)) for e, name in enumerate(self.experts)]
        present = [(e, a) for e, a in present if a is not None]  # an expert may not adapt this layer
        if not present:
            return torch.zeros_like(y)
        if self._can_stack(layer, present):
            # One pass for all experts: t = x·[A₁; A₂; …]ᵀ, each rank-column weighted by its expert's gate·scale,
            # then ·[B₁ | B₂ | …]ᵀ. Costs one LoRA of rank Σrₑ instead of a product pair per expert.
            A, B, owner, scales = self._stacked(present)
            t = x.to(A.dtype) @ A.T
            return (t * (g[..., owner] * scales)) @ B.T
        out = None
        for e, expert in present:
            part = g[..., e:e + 1] * expert.output(layer, x, y).to(g.dtype)
            out = part if out is None else out + part
        return out

    def _can_stack(self, layer, present) -> bool:
        return (layer.type.is_linear and not layer.type.takes_ids
                and all(getattr(a, "low_rank_delta", False) for _, a in present)
                and not (self.training and any(not isinstance(a.dropout, nn.Identity) for _, a in present)))

    def _stacked(self, present):
        """The experts' factors side by side, rebuilt only when an expert changed (experts are frozen)."""
        key = tuple((id(a), a.row_version()) for _, a in present)
        cached = self.__dict__.get("_stack")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                factors = [(e, a.factors(), a.scale) for e, a in present]
                A = torch.cat([f[0].flatten(1).float() for _, f, _ in factors])
                B = torch.cat([f[1].flatten(1).float() for _, f, _ in factors], dim=1)
                owner = torch.cat([torch.full((f[0].shape[0],), e, dtype=torch.long) for e, f, _ in factors])
                scales = torch.cat([torch.full((f[0].shape[0],), s) for _, f, s in factors])
            cached = (key, (A, B, owner.to(A.device), scales.to(A.device)))
            self.__dict__["_stack"] = cached
        return cached[1]

    def fast_forward(self, layer, x, strength):
        return None

    def base_part(self, layer, x):
        return None

    def factors(self):
        raise MergeStateError("a mixture weights its experts per token, so it has no single ΔW (no factors, no merge)")

    def delta_weight(self, layer):
        return self.factors()

    def merge_into(self, layer, weight, strength=1.0):
        return self.factors()

    def row_factors(self, layer):
        raise MixedBatchError("a mixture routes each token itself and has no per-row slots; per-row batches "
                              "(adapter_rows) run its rows through its own output()")

    def row_column_scale(self, layer):
        return None

    def row_version(self) -> tuple:
        w = self.router.weight
        return (id(w), w.data_ptr(), w._version if not w.is_inference() else -id(w))

    def peft_tensors(self, layer) -> dict[str, torch.Tensor]:
        return {"router.weight": self.router.weight}

    def load_targets(self, layer) -> dict[str, torch.Tensor]:
        return self.peft_tensors(layer)

    @classmethod
    def saved_config(cls, config):
        return config

    @classmethod
    def model_tensors(cls, model, adapter):
        return {}

    @classmethod
    def is_model_tensor(cls, key):
        return False

    @classmethod
    def peft_names(cls, ltype):
        return ()

    @classmethod
    def expected_shapes(cls, ltype, base):
        return {}

    def extra_repr(self) -> str:
        return f"experts={self.experts}, top_k={self.top_k}"


def _balance_loss(probs: torch.Tensor) -> torch.Tensor:
    """Switch Transformer's auxiliary loss E·Σₑ fₑ·Pₑ: fₑ the share of tokens whose top expert is e, Pₑ the mean
    router probability of e. It is 1 when both are uniform and grows as routing collapses onto few experts."""
    p = probs.reshape(-1, probs.shape[-1])
    n = p.shape[-1]
    f = F.one_hot(p.argmax(-1), n).to(p.dtype).mean(0)
    return n * (f * p.mean(0)).sum()
