"""AdaLoRA (Zhang et al. 2023): the update in SVD form `ΔW = scale · P·Λ·Q`, whose rank budget moves to the layers
that need it during training.

    y = base(x) + scale · x (E ⊙ A)ᵀ Bᵀ,   A = Q ∈ R^{r×in},  E = diag(Λ) ∈ R^{r×1},  B = P ∈ R^{out×r}
    scale = α / (init_r + 1e-5)   (PEFT's `scaling / ranknum`; the rank a layer starts with, however many triplets remain)

A triplet (row i of A, E_i, column i of B) is pruned by setting E_i = 0, as PEFT does: A and B keep training, so
a pruned triplet can come back at the next allocation. `rank_mask` records which triplets the allocator kept;
saving writes only those (PEFT's files: tensors resized to the kept rows, `rank_pattern` as boolean masks of
length init_r). The allocator and the orthogonality regulariser live in adalora_budget.py.
"""

from __future__ import annotations

import math
import re
from dataclasses import InitVar, dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import LoraConfig
from ..errors import ConfigError
from ..layers import LayerType, LoraAdapter, adapter_dtype

TRIPLET = ("lora_A", "lora_B", "lora_E")  # PEFT's names after the module path (no ".weight": they are parameters)
# The allocator's moving averages per adapter: sensitivity Ī and uncertainty Ū of every entry of A, E and B.
IMPORTANCE = ("ipt_A", "ipt_E", "ipt_B", "unc_A", "unc_E", "unc_B")
# adapter_config.json keys PEFT's AdaLoraConfig adds to its LoraConfig's (read here, not by LoraConfig's reader).
PEFT_ADALORA_KEYS = ("init_r", "target_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight", "total_step")


@dataclass
class AdaLoraConfig(LoraConfig):
    """AdaLoRA's settings, with PEFT's AdaLoraConfig names and meaning (`delta_t` is PEFT's `deltaT`, which is
    accepted too, so that `AdaLoraConfig(deltaT=10, ...)` copied from PEFT code works).

    Each layer starts at rank `init_r`; after `tinit` warm-up steps the total budget falls on a cubic schedule
    until step `total_step - tfinal`, where it reaches `target_r` per layer on average, and stays there.
    `rank_pattern` maps "<module>.lora_E" to the kept triplets (a boolean list of length init_r), as PEFT writes it.
    `r` is not used (PEFT keeps it at 8).
    """

    alpha: float = 8  # PEFT's lora_alpha default
    rank_pattern: dict[str, list[bool]] = field(default_factory=dict)
    init_r: int = 12
    target_r: int = 8
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    deltaT: InitVar[int | None] = None  # PEFT's spelling of delta_t (not a field: the config holds delta_t only)

    def __post_init__(self, deltaT: int | None = None) -> None:
        if deltaT is not None:
            if self.delta_t not in (1, deltaT):  # 1: delta_t's default, i.e. not given
                raise ConfigError(f"AdaLoraConfig got delta_t={self.delta_t!r} and deltaT={deltaT!r}, two spellings "
                                  "of one setting (deltaT is PEFT's); give one of them")
            self.delta_t = deltaT
        masks, self.rank_pattern = self.rank_pattern, {}  # LoraConfig checks integer ranks; ours are masks
        super().__post_init__()
        for name in ("init_r", "target_r", "total_step", "delta_t"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                hint = " (the number of optimizer steps the allocator will see)" if name == "total_step" else ""
                raise ConfigError(f"AdaLoraConfig.{name} must be a positive integer{hint}, got {value!r}")
        if self.target_r > self.init_r:
            raise ConfigError(f"target_r={self.target_r} exceeds init_r={self.init_r}: AdaLoRA only removes rank; "
                              "raise init_r or lower target_r")
        for name in ("tinit", "tfinal"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ConfigError(f"AdaLoraConfig.{name} must be a non-negative integer, got {getattr(self, name)!r}")
        if self.tinit >= self.total_step - self.tfinal:
            raise ConfigError(f"tinit={self.tinit} and tfinal={self.tfinal} leave no budgeting phase in "
                              f"total_step={self.total_step} steps; lower them or raise total_step")
        for name in ("beta1", "beta2"):
            if not 0 < getattr(self, name) < 1:
                raise ConfigError(f"AdaLoraConfig.{name} must be in (0, 1), got {getattr(self, name)!r}")
        if self.orth_reg_weight < 0:
            raise ConfigError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}")
        if self.rslora or self.alpha_pattern or self.init != "kaiming":
            raise ConfigError("AdaLoRA has one scale, α/init_r, and its own initialisation (E = 0, A and B ~ N(0, 0.02)): "
                              "rslora, alpha_pattern and init do not apply; leave them at their defaults")
        self.rank_pattern = {_pattern_key(k): _check_mask(k, v, self.init_r) for k, v in masks.items()}

    @property
    def method(self) -> str:
        return "adalora"

    def kept_slots(self, module_name: str) -> list[int]:
        """Which of the layer's init_r triplets it holds (all of them unless rank_pattern prunes some)."""
        mask = self.rank_pattern.get(f"{module_name}.lora_E")
        return list(range(self.init_r)) if mask is None else [i for i, keep in enumerate(mask) if keep]

    def rank_for(self, module_name: str) -> int:
        return len(self.kept_slots(module_name))

    def scale_for(self, module_name: str) -> float:
        """α / init_r for every layer, pruned or not (PEFT keeps `ranknum` at init_r, plus its 1e-5 guard)."""
        return self.alpha / (self.init_r + 1e-5)

    # PEFT's adapter_config.json ---------------------------------------------------------------

    def to_peft_dict(self, target_modules: list[str] | str | None = None) -> dict[str, Any]:
        d = super().to_peft_dict(target_modules)
        d.update(peft_type="ADALORA", init_lora_weights=True, rank_pattern=dict(self.rank_pattern) or None,
                 init_r=self.init_r, target_r=self.target_r, tinit=self.tinit, tfinal=self.tfinal, deltaT=self.delta_t,
                 beta1=self.beta1, beta2=self.beta2, orth_reg_weight=self.orth_reg_weight, total_step=self.total_step)
        return d

    @classmethod
    def from_peft_dict(cls, d: dict[str, Any]) -> "AdaLoraConfig":
        if d.get("peft_type") != "ADALORA":
            raise ConfigError(f"peft_type is {d.get('peft_type')!r}, not 'ADALORA'")
        # The fields AdaLoRA shares with LoRA are read by LoraConfig's reader; PEFT's AdaLoRA ignores use_rslora,
        # alpha_pattern and init_lora_weights (its scale is always lora_alpha/init_r), and so do we. AdaLoRA's own
        # keys are read below, so LoraConfig's reader does not see them (it warns about keys it does not know).
        shared = {**{k: v for k, v in d.items() if k not in PEFT_ADALORA_KEYS}, "peft_type": "LORA", "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False,
                  "init_lora_weights": True}
        lora = LoraConfig.from_peft_dict(shared)
        fields = {k: getattr(lora, k) for k in lora.__dataclass_fields__ if k not in ("rank_pattern", "alpha_pattern")}
        return cls(**fields, rank_pattern=dict(d.get("rank_pattern") or {}), init_r=int(d.get("init_r", 12)),
                   target_r=int(d.get("target_r", 8)), tinit=int(d.get("tinit", 0)), tfinal=int(d.get("tfinal", 0)),
                   delta_t=int(d.get("deltaT", 1)), beta1=float(d.get("beta1", 0.85)), beta2=float(d.get("beta2", 0.85)),
                   orth_reg_weight=float(d.get("orth_reg_weight", 0.5)), total_step=d.get("total_step"))


# Read back under PEFT's name too (the class attribute the InitVar's default left would always say None).
AdaLoraConfig.deltaT = property(lambda self: self.delta_t, doc="PEFT's name for delta_t")


def _pattern_key(key: str) -> str:
    """PEFT's key, "<module>.lora_E", from that key, the same with an adapter name after it, or a module name."""
    module = re.sub(r"\.lora_E(\.[^.]+)?$", "", key)
    return f"{module}.lora_E"


def _check_mask(key: str, mask: Any, init_r: int) -> list[bool]:
    if not isinstance(mask, (list, tuple)) or not all(isinstance(b, bool) for b in mask):
        raise ConfigError(f"AdaLoRA rank_pattern[{key!r}] must be a list of true/false per triplet (PEFT's format), "
                          f"got {mask!r}")
    if len(mask) != init_r:
        raise ConfigError(f"AdaLoRA rank_pattern[{key!r}] has {len(mask)} entries but init_r is {init_r}; "
                          "the config's init_r and rank_pattern disagree")
    return list(mask)


# --- the adapter on one layer ----------------------------------------------------------------------------


class AdaLoraAdapter(LoraAdapter):
    """AdaLoRA on one Linear, Conv1D or Conv2d layer: trainable A (r, in·k·k), E (r, 1), B (out, r).

    Its effective LoRA factors are (E ⊙ A, B), so the forward, merge, fused and per-row paths are LoRA's own.
    """

    method = "adalora"

    def __init__(self, base: nn.Module, ltype: LayerType, r: int, scale: float, dropout: float = 0.0,
                 slots: list[int] | None = None):
        nn.Module.__init__(self)
        a_shape, b_shape = ltype.factor_shapes(base, r)
        w = base.weight
        dtype = adapter_dtype(w.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, math.prod(a_shape[1:]), dtype=dtype, device=w.device))
        self.lora_E = nn.Parameter(torch.zeros(r, 1, dtype=dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.empty(b_shape[0], r, dtype=dtype, device=w.device))
        # E = 0: the adapter starts as a no-op; A, B ≠ 0 (PEFT's N(0, 0.02)), so E gets a gradient from the first step.
        nn.init.normal_(self.lora_A, std=0.02)
        nn.init.normal_(self.lora_B, std=0.02)
        self.scale = float(scale)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.a_view, self.b_view = a_shape[1:], b_shape[2:]  # Conv2d's A and B as LayerType expects them
        # Which triplets the allocator keeps (bookkeeping; the pruning itself is E_i = 0), and which of the layer's
        # init_r triplets these rows are (a loaded, already pruned adapter holds fewer rows).
        self.register_buffer("rank_mask", torch.ones(r, dtype=torch.bool, device=w.device), persistent=False)
        self.slots = list(range(r)) if slots is None else list(slots)
        for name in IMPORTANCE:  # created by the allocator's first update (adalora_budget.py)
            self.register_buffer(name, None, persistent=False)

    def reset_importance(self, zeros: bool = False) -> None:
        """Drop the allocator's moving averages (or start them at zero)."""
        for name, p in zip(IMPORTANCE, (self.lora_A, self.lora_E, self.lora_B) * 2):
            setattr(self, name, torch.zeros_like(p, requires_grad=False) if zeros else None)

    @classmethod
    def create(cls, config, base: nn.Module, ltype: LayerType, name: str, shared=None) -> "AdaLoraAdapter":
        if ltype.takes_ids:
            raise ConfigError(f"AdaLoRA cannot adapt {name!r}, an embedding (PEFT's AdaLoRA supports Linear, Conv1D "
                              "and Conv2d layers); leave it out of target_modules or add it to exclude_modules")
        slots = config.kept_slots(name)
        return cls(base, ltype, len(slots), config.scale_for(name), config.dropout, slots)

    @property
    def rank(self) -> int:
        """Triplets kept by the allocator (all until it first prunes)."""
        return int(self.rank_mask.sum())

    # -- the contract --

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        A = self.lora_A * self.lora_E  # E ⊙ A: pruned triplets have E_i = 0
        B = self.lora_B
        if self.b_view:  # Conv2d: A as (r, in, kh, kw), B as a 1×1 convolution
            return A.view(A.shape[0], *self.a_view), B.view(*B.shape, *self.b_view)
        return A, B

    def peft_tensors(self, layer) -> dict[str, torch.Tensor]:
        """The kept triplets: the parameters themselves while none is pruned (so loading copies into them)."""
        if bool(self.rank_mask.all()):
            return {"lora_A": self.lora_A, "lora_B": self.lora_B, "lora_E": self.lora_E}
        keep = self.rank_mask
        return {"lora_A": self.lora_A[keep].detach(), "lora_B": self.lora_B[:, keep].detach(),
                "lora_E": self.lora_E[keep].detach()}

    def load_targets(self, layer) -> dict[str, torch.Tensor]:
        """Where a file's triplets are copied: only an unpruned adapter holds them as parameters of the file's shape."""
        if not bool(self.rank_mask.all()):
            from ..errors import IncompatibleAdapterError

            raise IncompatibleAdapterError(
                "this AdaLoRA adapter was pruned in place, so a file's kept triplets have no parameters of their own to "
                "go into; load the file as a new adapter (lorakit.load_adapter), which is built at the file's ranks")
        return self.peft_tensors(layer)

    def kept_pattern(self, init_r: int) -> list[bool]:
        """PEFT's rank_pattern entry for this layer: which of its init_r triplets are kept."""
        pattern = [False] * init_r
        for slot, keep in zip(self.slots, self.rank_mask.tolist()):
            pattern[slot] = keep
        return pattern

    @classmethod
    def peft_names(cls, ltype: LayerType) -> tuple[str, ...]:
        return TRIPLET

    @classmethod
    def expected_shapes(cls, ltype: LayerType, base: nn.Module) -> dict[str, tuple[int | None, ...]]:
        if ltype.takes_ids:
            return {}
        a_shape, b_shape = ltype.factor_shapes(base, 0)
        return {"lora_A": (None, math.prod(a_shape[1:])), "lora_B": (b_shape[0], None), "lora_E": (None, 1)}

    @classmethod
    def delta_from_file(cls, parts: dict[str, torch.Tensor], config, module: str) -> torch.Tensor:
        A, E, B = (parts[n].float() for n in ("lora_A", "lora_E", "lora_B"))
        return (B @ (A * E)) * config.scale_for(module)

    def extra_repr(self) -> str:
        return f"rank={self.rank} of {len(self.slots)}, scale={self.scale:g}"


# --- the plain-LoRA form -----------------------------------------------------------------------------------


def lora_form(config: AdaLoraConfig, layers: dict[str, dict[str, torch.Tensor]]) -> tuple[LoraConfig, dict[str, dict[str, torch.Tensor]]]:
    """An equivalent plain LoRA adapter: per layer A' = E ⊙ A and B' = scale·B at the layer's own rank, every
    layer's scale 1 (r = α for the largest rank; rank_pattern = alpha_pattern for the others).

    Scale 1 everywhere means a server that ignores rank_pattern/alpha_pattern (vLLM reads one α/r) still
    computes the same output; each layer's tensors carry their own rank. Layers pruned to rank 0 are left out.
    `layers` maps a module to its file tensors {"lora_A", "lora_B", "lora_E"}; returns the config and
    {module: {"lora_A.weight", "lora_B.weight"}} (Linear and Conv1D layers: a file does not say a Conv2d's kernel).
    """
    out: dict[str, dict[str, torch.Tensor]] = {}
    for module, parts in sorted(layers.items()):
        A, E, B = (parts[n] for n in ("lora_A", "lora_E", "lora_B"))
        if A.shape[0] == 0:
            continue
        dtype = A.dtype
        out[module] = {"lora_A.weight": (A.float() * E.float()).to(dtype).contiguous(),
                       "lora_B.weight": (B.float() * config.scale_for(module)).to(dtype).contiguous()}
    if not out:
        raise ConfigError("every layer of this AdaLoRA adapter was pruned to rank 0: it changes nothing, so there is "
                          "no LoRA adapter to write")
    ranks = {m: t["lora_A.weight"].shape[0] for m, t in out.items()}
    r = max(ranks.values())
    others = {m: k for m, k in ranks.items() if k != r}
    lora = LoraConfig(r=r, alpha=r, dropout=config.dropout, target_modules=list(out), rank_pattern=others,
                      alpha_pattern=dict(others), modules_to_save=config.modules_to_save, bias=config.bias,
                      task_type=config.task_type, base_model_name_or_path=config.base_model_name_or_path)
    return lora, out
