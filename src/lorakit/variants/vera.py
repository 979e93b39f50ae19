"""VeRA (Kopiczko et al. 2024): one pair of frozen random matrices shared by every adapted layer, and two
trainable vectors per layer that scale them:

    y = base(x) + λ_b ⊙ B[:out, :r] (λ_d ⊙ A[:r, :in] x),    A ∈ R^{r × max_in},  B ∈ R^{max_out × r}

A and B are drawn from `projection_seed` exactly as PEFT draws them, sized by the widest adapted layer and
sliced for narrower ones. λ_b starts at zero, so the adapted model computes what the base computes until it
is trained. As a low-rank adapter its effective factors are λ_d ⊙ A and λ_b ⊙ B with scale 1; merge, per-row
batches and the plain-LoRA paths use those. Its fused path (bottom) is its own: the gradient it needs is two
vectors, not two r-wide matrices.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import _check_positive_int, normalise_shared_fields
from ..errors import AdapterFileError, ConfigError, IncompatibleAdapterError, ShapeMismatchError
from ..fused import _base_op, _fold_is_cheaper, _folded_weight, _materialise
from ..layers import LayerType, LoraAdapter, _tensor_versions, adapter_dtype, layer_type
from ..state import adapter_layers, get_state

LAMBDA_NAMES = ("vera_lambda_b", "vera_lambda_d")  # PEFT's names after a layer's path
PROJECTION_KEYS = ("base_model.vera_A", "base_model.vera_B")  # PEFT's keys of the shared pair (model level)
BIAS_MODES = ("none", "vera_only", "lora_only", "all")


@dataclass
class VeraConfig:
    """One VeRA adapter's settings. Names follow the paper and PEFT's VeraConfig ([PEFT's key] where it differs)."""

    r: int = 256  # rows of the shared A; higher than LoRA ranks, since only r + out numbers train per layer
    target_modules: list[str] | str | None = None  # suffixes, a regex, or "all-linear" (Linear and Conv1D only)
    projection_seed: int = 0  # [projection_prng_key] the seed A and B are drawn from
    save_projection: bool = True  # write A and B into the file; without them a loader redraws them from the seed
    dropout: float = 0.0  # [vera_dropout]
    d_initial: float = 0.1  # λ_d's start value (small values work best: the paper's Table 6c)
    bias: str = "none"  # "none" | "vera_only" (kept as lorakit's "lora_only") | "all"
    modules_to_save: list[str] | None = None
    init_weights: bool = True  # False: λ_b = 1, λ_d ~ N(0, 1), as PEFT does (the adapter then changes the output)
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None

    exclude_modules = None  # not a field: PEFT's VeraConfig has none, but the matching rules ask

    def __post_init__(self) -> None:
        _check_positive_int("r", self.r)
        if not isinstance(self.projection_seed, int) or isinstance(self.projection_seed, bool):
            raise ConfigError(f"projection_seed must be an integer, got {self.projection_seed!r}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.d_initial, (int, float)) or not math.isfinite(self.d_initial):
            raise ConfigError(f"d_initial must be a finite number, got {self.d_initial!r}")
        if self.bias not in BIAS_MODES:
            raise ConfigError(f"bias must be one of {BIAS_MODES}, got {self.bias!r}")
        if self.bias == "vera_only":  # one spelling for "the adapted layers' biases train" across methods
            self.bias = "lora_only"
        normalise_shared_fields(self)

    @property
    def method(self) -> str:
        return "vera"

    def rank_for(self, module_name: str) -> int:
        return self.r  # one r for all layers: they share A and B

    def scale_for(self, module_name: str) -> float:
        return 1.0  # λ_b and λ_d carry the scale

    def to_peft_dict(self, target_modules: list[str] | str | None = None) -> dict[str, Any]:
        """The fields PEFT's `VeraConfig` reads; `target_modules` may be replaced by the resolved list."""
        return {
            "peft_type": "VERA",
            "task_type": self.task_type,
            "base_model_name_or_path": self.base_model_name_or_path,
            "r": self.r,
            "target_modules": self.target_modules if target_modules is None else target_modules,
            "projection_prng_key": self.projection_seed,
            "save_projection": self.save_projection,
            "vera_dropout": self.dropout,
            "d_initial": self.d_initial,
            "fan_in_fan_out": False,
            "bias": "vera_only" if self.bias == "lora_only" else self.bias,
            "modules_to_save": self.modules_to_save,
            "init_weights": self.init_weights,
            "layers_to_transform": self.layers_to_transform,
            "layers_pattern": self.layers_pattern,
            "inference_mode": True,
            "revision": None,
        }

    @classmethod
    def from_peft_dict(cls, d: dict[str, Any]) -> "VeraConfig":
        if d.get("peft_type") != "VERA":
            raise ConfigError(f"peft_type is {d.get('peft_type')!r}; a VeraConfig reads VeRA adapters (peft_type 'VERA')")
        return cls(
            r=int(d.get("r", 256)),
            target_modules=d.get("target_modules"),
            projection_seed=int(d.get("projection_prng_key", 0)),
            save_projection=bool(d.get("save_projection", True)),
            dropout=float(d.get("vera_dropout") or 0.0),
            d_initial=float(d.get("d_initial", 0.1)),
            bias=d.get("bias") or "none",
            modules_to_save=d.get("modules_to_save"),
            init_weights=bool(d.get("init_weights", True)),
            layers_to_transform=d.get("layers_to_transform"),
            layers_pattern=d.get("layers_pattern"),
            task_type=d.get("task_type"),
            base_model_name_or_path=d.get("base_model_name_or_path"),
        )

    def replace(self, **changes: Any) -> "VeraConfig":
        return dataclasses.replace(self, **changes)


# --- the shared pair ------------------------------------------------------------------------------


def draw_projections(seed: int, r: int, max_in: int, max_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """vera_A (r, max_in) and vera_B (max_out, r) as PEFT 0.21 draws them: Kaiming-uniform (fan-in, gain √2)
    from one CPU generator seeded with `seed`, A first. Same seed, sizes and torch version: same bits."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return _kaiming_uniform((r, max_in), generator), _kaiming_uniform((max_out, r), generator)


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    fan = shape[1]  # fan-in of a 2-D weight: its columns
    bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(fan))  # PEFT's arithmetic step for step, so the bound's bits agree
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeraProjections(nn.Module):
    """The frozen pair of one VeRA adapter. Every layer of the adapter holds this one module, so A and B are
    stored once, and `.to()` moves them once (its later visits find them moved)."""

    def __init__(self, vera_A: torch.Tensor, vera_B: torch.Tensor):
        super().__init__()
        self.register_buffer("vera_A", vera_A)
        self.register_buffer("vera_B", vera_B)
        self._last = None  # (key, x, x·Aᵀ) of the last backward (see project)

    def project(self, x2: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        """`x·Aᵀ` for a backward pass, computed once for layers that read the same input with the same slice
        of A (q, k and v; gate and up). Holding x keeps its memory from being reused by another input while
        its key stands; the version counters catch in-place changes."""
        key = (x2.data_ptr(), x2.shape, x2.stride(), x2._version, A.data_ptr(), A.shape, A._version)
        if self._last is not None and self._last[0] == key:
            return self._last[2]
        u = x2 @ A.T
        self._last = (key, x2, u)
        return u

    def extra_repr(self) -> str:
        return f"vera_A={tuple(self.vera_A.shape)}, vera_B={tuple(self.vera_B.shape)}"


def _supported(ltype: LayerType | None) -> bool:
    return ltype is not None and ltype.is_linear and not ltype.takes_ids  # Linear and GPT-2 Conv1D, as in PEFT


def _projections(model: nn.Module, adapter: str) -> VeraProjections:
    return next(a.projections for _, _, a in adapter_layers(model, adapter))


# --- one layer --------------------------------------------------------------------------------------


class VeraAdapter(LoraAdapter):
    """VeRA on one Linear / Conv1D layer: trainable λ_d (r) and λ_b (out) around the shared frozen A and B.

    A LoraAdapter whose factors are computed: `factors()` = (λ_d ⊙ A[:r, :in], λ_b ⊙ B[:out, :r]), scale 1.
    """

    method = "vera"

    def __init__(self, base: nn.Module, ltype: LayerType, config: VeraConfig, projections: VeraProjections):
        nn.Module.__init__(self)  # not LoraAdapter's __init__: VeRA has no A and B of its own
        in_f, out_f = ltype.features(base)
        self.projections = projections
        self.in_features, self.out_features = in_f, out_f
        self.rank, self.scale = config.r, 1.0
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        like = {"dtype": projections.vera_A.dtype, "device": base.weight.device}
        if config.init_weights:  # λ_b = 0: the layer starts as the base
            self.vera_lambda_b = nn.Parameter(torch.zeros(out_f, **like))
            self.vera_lambda_d = nn.Parameter(torch.full((config.r,), float(config.d_initial), **like))
        else:
            self.vera_lambda_b = nn.Parameter(torch.ones(out_f, **like))
            self.vera_lambda_d = nn.Parameter(torch.randn(config.r, **like))

    @classmethod
    def prepare(cls, config: VeraConfig, model: nn.Module, bases: list[tuple[str, nn.Module]]) -> VeraProjections:
        """The pair all of this inject's layers share, sized by the widest of them (as PEFT's `_find_dim`)."""
        sizes = []
        for name, base in bases:
            ltype = layer_type(base)
            if not _supported(ltype):
                raise ConfigError(f"VeRA cannot adapt {name!r}, a {type(base).__name__}: VeRA (in lorakit as in PEFT) "
                                  "supports Linear and GPT-2 Conv1D layers; leave it out of target_modules")
            sizes.append(ltype.features(base))
        A, B = draw_projections(config.projection_seed, config.r, max(i for i, _ in sizes), max(o for _, o in sizes))
        base = bases[0][1]
        dtype = adapter_dtype(layer_type(base).weight_dtype(base))  # a quantised weight's storage dtype says nothing
        return VeraProjections(A.to(base.weight.device, dtype), B.to(base.weight.device, dtype))

    @classmethod
    def create(cls, config, base, ltype, name, shared=None) -> "VeraAdapter":
        return cls(base, ltype, config, shared)

    # -- the contract --

    def projection_slices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A[:r, :in] and B[:out, :r]: a narrower layer uses the top-left corner of the shared pair, as in PEFT."""
        p = self.projections
        return p.vera_A[: self.rank, : self.in_features], p.vera_B[: self.out_features, : self.rank]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        A, B = self.projection_slices()
        return A * self.vera_lambda_d[:, None], B * self.vera_lambda_b[:, None]

    @property
    def factor_dtype(self) -> torch.dtype:
        return self.vera_lambda_d.dtype

    def output(self, layer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # PEFT's order: r-wide vectors scale r- and out-wide activations, so autograd reaches λ without
        # forming gradients of the r-wide matrices.
        A, B = self.projection_slices()
        x = self.dropout(x.to(self.vera_lambda_d.dtype))
        return self.vera_lambda_b * ((self.vera_lambda_d * (x @ A.T)) @ B.T)

    def fast_forward(self, layer, x: torch.Tensor, strength: float) -> torch.Tensor | None:
        if not self.can_fuse(layer, x):
            return None
        A, B = self.projection_slices()
        base = layer.base_layer
        weight = layer.type.fused_weight(base)  # a quantised base: a function that dequantises it (fused.py)
        return vera_linear(x, weight, base.bias, self.vera_lambda_d, self.vera_lambda_b, A, B, strength,
                           layer.type.fan_in_fan_out, self.projections)

    def row_version(self) -> tuple:
        p = self.projections
        return _tensor_versions([self.vera_lambda_d, self.vera_lambda_b, p.vera_A, p.vera_B]) + (self.scale,)

    def peft_tensors(self, layer) -> dict[str, torch.Tensor]:
        return {"vera_lambda_b": self.vera_lambda_b, "vera_lambda_d": self.vera_lambda_d}

    @classmethod
    def peft_names(cls, ltype: LayerType) -> tuple[str, ...]:
        return LAMBDA_NAMES

    @classmethod
    def expected_shapes(cls, ltype, base) -> dict[str, tuple[int | None, ...]]:
        if not _supported(ltype):
            return {}
        return {"vera_lambda_b": (ltype.features(base)[1],), "vera_lambda_d": (None,)}

    @classmethod
    def delta_from_file(cls, parts: dict[str, torch.Tensor], config, module: str) -> torch.Tensor | None:
        # A layer's ΔW uses the first `in` columns of A, and no VeRA file records a layer's input width.
        return None

    # -- the shared pair in PEFT's files: base_model.vera_A / base_model.vera_B --

    @classmethod
    def model_tensors(cls, model: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
        if not get_state(model).configs[adapter].save_projection:
            return {}
        p = _projections(model, adapter)
        return {PROJECTION_KEYS[0]: p.vera_A, PROJECTION_KEYS[1]: p.vera_B}

    @classmethod
    def is_model_tensor(cls, key: str) -> bool:
        return key in PROJECTION_KEYS

    @classmethod
    @torch.no_grad()
    def load_model_tensors(cls, model: nn.Module, adapter: str, tensors: dict[str, torch.Tensor], file) -> None:
        """Use the file's A and B (they replace the pair drawn at inject) after checking every layer fits them."""
        A, B = (tensors.get(k) for k in PROJECTION_KEYS)
        if A is None or B is None:
            raise IncompatibleAdapterError(f"{file} has {', '.join(sorted(tensors))} without the other of "
                                           f"{' / '.join(PROJECTION_KEYS)}; the file is incomplete")
        if A.dim() != 2 or B.dim() != 2:
            raise ShapeMismatchError(f"{file}: {PROJECTION_KEYS[0]} and {PROJECTION_KEYS[1]} must be matrices, "
                                     f"got shapes {tuple(A.shape)} and {tuple(B.shape)}")
        for name, _, a in adapter_layers(model, adapter):
            _check_fits(A.shape, B.shape, name, a, file)
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise AdapterFileError(f"{file}: the shared projections hold NaN or Inf values; the adapter is corrupt")
        p = _projections(model, adapter)
        p.vera_A = A.to(p.vera_A.device, p.vera_A.dtype)
        p.vera_B = B.to(p.vera_B.device, p.vera_B.dtype)
        p._last = None

    def extra_repr(self) -> str:
        return f"rank={self.rank}, in={self.in_features}, out={self.out_features}"


def _check_fits(a_shape, b_shape, name: str, a: VeraAdapter, file) -> None:
    """A layer needs A[:r, :in] and B[:out, :r] from the shared pair: VeRA layers wider than it cannot run."""
    need = {"vera_A": (a.rank, a.in_features), "vera_B": (a.out_features, a.rank)}
    for (what, (rows, cols)), shape in zip(need.items(), (a_shape, b_shape)):
        if shape[0] < rows or shape[1] < cols:
            raise ShapeMismatchError(
                f"{file}: the shared {what} has shape {tuple(shape)}, but VeRA layer {name!r} (in={a.in_features}, "
                f"out={a.out_features}, r={a.rank}) needs at least ({rows}, {cols}); the adapter was made for a base "
                "with narrower layers or a smaller r"
            )


# --- the fused path ---------------------------------------------------------------------------------


def vera_linear(x, weight, bias, lambda_d, lambda_b, A, B, strength, transposed, projections):
    """`base(x) + strength · λ_b ⊙ B(λ_d ⊙ A x)` on a Linear / Conv1D weight; records a graph only when asked.
    `weight` may be a function that returns it (a quantised base dequantising on demand, as in fused.py)."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, bias, lambda_d, lambda_b)):
        return _VeraLinearFn.apply(x, weight, bias, lambda_d, lambda_b, A, B, strength, transposed, projections)
    y = _vera_forward(x.reshape(-1, x.shape[-1]), weight, bias, lambda_d, lambda_b, A, B, strength, transposed)
    return y.view(*x.shape[:-1], y.shape[-1])


def _vera_forward(x2, weight, bias, lambda_d, lambda_b, A, B, strength, transposed):
    """Long batches fold `W + s·(λ_b ⊙ B)(λ_d ⊙ A)` into a temporary weight (out·in·r multiply-adds); short
    ones add `s·λ_b ⊙ ((λ_d ⊙ x Aᵀ) Bᵀ)` row by row (rows·r·(in + out)). With λ_b = 0 both give the base exactly."""
    weight, owned = _materialise(weight)
    rows, in_f = x2.shape
    if _fold_is_cheaper(rows, in_f + B.shape[0], weight, A.shape[0]):
        folded = _folded_weight(weight, A * lambda_d[:, None], B * lambda_b[:, None], strength, transposed, owned)
        return _base_op(x2, folded, bias, transposed)
    y = _base_op(x2, weight, bias, transposed)
    return y.addcmul_((x2 @ A.T).mul_(lambda_d) @ B.T, lambda_b, value=strength)


def _vera_input_grad(dy2, weight, lambda_d, lambda_b, A, B, strength, transposed):
    """dx = dy·(W + s·(λ_b ⊙ B)(λ_d ⊙ A)): through the folded weight for long batches, else row by row."""
    weight, owned = _materialise(weight)
    A_d, B_b = A * lambda_d[:, None], B * lambda_b[:, None]
    if _fold_is_cheaper(dy2.shape[0], A.shape[1] + B.shape[0], weight, A.shape[0]):
        w = _folded_weight(weight, A_d, B_b, strength, transposed, owned)
        return dy2 @ (w.T if transposed else w)
    dx = dy2 @ (weight.T if transposed else weight)
    return dx.addmm_(dy2 @ B_b, A_d, alpha=strength)


class _VeraLinearFn(torch.autograd.Function):
    """`base(x) + s·λ_b ⊙ B(λ_d ⊙ A x)` with a hand-written backward for a frozen weight and frozen A, B.

    Why: autograd (like PEFT) reaches λ_b through `(λ_d ⊙ x Aᵀ) Bᵀ` kept from the forward and λ_d through
    `dy·(λ_b ⊙ B)`, two r-wide products over the rows, plus a third for dx. Both gradients are contractions of
    one (out × r) matrix with B:  with u = x Aᵀ and P = (dyᵀ u) ⊙ B,  dλ_b = s·P λ_d  and  dλ_d = s·Pᵀ λ_b;
    dx goes through the folded weight for long batches, and u is computed once for layers sharing an input.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lambda_d, lambda_b, A, B, strength, transposed, projections):
        x2 = x.reshape(-1, x.shape[-1])
        y = _vera_forward(x2, weight, bias, lambda_d, lambda_b, A, B, strength, transposed)
        # A weight given as a function (a quantised base) is not kept: backward dequantises it again.
        ctx.weight_fn = weight if callable(weight) else None
        ctx.save_for_backward(x2, None if callable(weight) else weight, lambda_d, lambda_b, A, B)
        ctx.strength, ctx.transposed, ctx.has_bias, ctx.projections = strength, transposed, bias is not None, projections
        projections._last = None  # a new forward: the last step's cached product is no longer needed
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, weight, lambda_d, lambda_b, A, B = ctx.saved_tensors
        weight = ctx.weight_fn if ctx.weight_fn is not None else weight
        dy2 = dy.reshape(-1, dy.shape[-1])
        s = ctx.strength
        dx = d_bias = d_lambda_d = d_lambda_b = None
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            P = (dy2.T @ ctx.projections.project(x2, A)).mul_(B)
            if ctx.needs_input_grad[3]:
                d_lambda_d = (P.T @ lambda_b).mul_(s)
            if ctx.needs_input_grad[4]:
                d_lambda_b = (P @ lambda_d).mul_(s)
        if ctx.needs_input_grad[0]:
            dx = _vera_input_grad(dy2, weight, lambda_d, lambda_b, A, B, s, ctx.transposed).view(*dy.shape[:-1], -1)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            d_bias = dy2.sum(0)
        return dx, None, d_bias, d_lambda_d, d_lambda_b, None, None, None, None, None
