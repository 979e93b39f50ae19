"""The LoRA math: a frozen base layer plus named adapters, each adding `scale · B·A`.

    y = base(x) + scale · dropout(x) Aᵀ Bᵀ,   A ∈ R^{r×in},  B ∈ R^{out×r},  scale = α/r  (α/√r for rsLoRA)

B starts at zero, so an adapted model computes exactly what the base computes until B is trained.

An adapter answers for itself (its output, its merge delta, its tensors' names in PEFT's files, whether the
fused and per-row paths apply); `LoraLayer` only orchestrates. Variants (variants/) follow the same contract.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import rows
from .fused import fused_linear

try:  # GPT-2 style layers store their weight transposed: (in, out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency, but keep the math importable alone
    Conv1D = None


# --- the base layers LoRA can wrap: one small object per type instead of `if kind == ...` chains ----------


class LayerType:
    """How LoRA attaches to one type of base layer: sizes, factor shapes, the low-rank product, the weight layout."""

    name = "linear"
    is_linear = True  # what "all-linear" selects
    fusable = True  # fused.py's hand-written path applies
    per_row = True  # per-row batches (rows.py) can run it
    quantized = False  # its weight is stored quantised (quant/): merging re-quantises, unmerge puts the packed data back
    takes_ids = False  # its input is token ids (an embedding), not features
    fan_in_fan_out = False  # its weight is stored (in, out), as PEFT's config flag says
    factor_names = ("lora_A.weight", "lora_B.weight")  # PEFT's tensor names for A and B

    def features(self, base: nn.Module) -> tuple[int, int]:
        """(in_features, out_features): the sizes of A's columns and B's rows."""
        w = base.weight
        return w.shape[1], w.shape[0]

    def factor_shapes(self, base: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        in_f, out_f = self.features(base)
        return (r, in_f), (out_f, r)

    def low_rank(self, base: nn.Module, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        """`(x Aᵀ) Bᵀ`, unscaled, in this layer's geometry."""
        return (x @ A.T) @ B.T

    def to_layout(self, base: nn.Module, delta: torch.Tensor) -> torch.Tensor:
        """`B·A` computed as (out, in) → laid out like the base layer's own weight."""
        return delta

    def from_layout(self, base: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        """The reverse of `to_layout`: a weight in the base's layout → (out, in·k·k), one row per output feature."""
        return weight

    def feature_view(self, v: torch.Tensor) -> torch.Tensor:
        """A per-output-feature vector (out,) shaped to broadcast against this layer's output (features last)."""
        return v

    # -- the weight itself: plain layers hold a float tensor; quantised ones (quant/) override these --

    def weight_dtype(self, base: nn.Module) -> torch.dtype:
        """The dtype the layer computes in."""
        return base.weight.dtype

    def dense_weight(self, base: nn.Module, kept=None) -> torch.Tensor:
        """The weight as a float tensor in the layer's own layout; `kept` (from `keep_weight`) instead of the current one."""
        return base.weight if kept is None else kept

    def fused_weight(self, base: nn.Module):
        """What fused.py multiplies by: the weight, or a function that materialises it (then called again in backward)."""
        return base.weight

    def keep_weight(self, base: nn.Module):
        """What `restore_weight` needs to put the current weight back bit for bit."""
        return base.weight.detach().clone()

    def restore_weight(self, base: nn.Module, kept) -> None:
        base.weight.copy_(kept)

    def write_weight(self, base: nn.Module, dense: torch.Tensor) -> None:
        """Store a dense weight (a merge's result) in the layer, in its own dtype."""
        base.weight.copy_(dense.to(base.weight.dtype))

    def on_wrap(self, base: nn.Module) -> None:
        """Called when a LoraLayer wraps `base` (quantised types switch off layouts that break gradients)."""


class _Conv1DType(LayerType):
    name = "conv1d"
    fan_in_fan_out = True

    def features(self, base):
        w = base.weight  # (in, out)
        return w.shape[0], w.shape[1]

    def to_layout(self, base, delta):
        return delta.T

    def from_layout(self, base, weight):
        return weight.T


class _EmbeddingType(LayerType):
    name = "embedding"
    is_linear = fusable = False
    takes_ids = True
    factor_names = ("lora_embedding_A", "lora_embedding_B")

    def features(self, base):
        w = base.weight  # (vocab, dim): A looks rows up like the embedding does
        return w.shape[0], w.shape[1]

    def low_rank(self, base, x, A, B):
        t = F.embedding(x, A.T, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse)
        return t @ B.T

    def to_layout(self, base, delta):
        return delta.T

    def from_layout(self, base, weight):
        return weight.T


class _Conv2dType(LayerType):
    name = "conv2d"
    is_linear = fusable = False
    per_row = False

    def factor_shapes(self, base, r):
        in_f, out_f = self.features(base)
        return (r, in_f, *base.kernel_size), (out_f, r, 1, 1)

    def low_rank(self, base, x, A, B):
        return F.conv2d(F.conv2d(x, A, None, base.stride, base.padding, base.dilation), B)

    def to_layout(self, base, delta):
        return delta.view(base.weight.shape)

    def from_layout(self, base, weight):
        return weight.flatten(1)

    def feature_view(self, v):
        return v.view(-1, 1, 1)  # (N, out, H, W) or (out, H, W): features are the channels


LINEAR, CONV1D, EMBEDDING, CONV2D = LayerType(), _Conv1DType(), _EmbeddingType(), _Conv2dType()
# Checked in order; quant/ puts bitsandbytes' layers first (they subclass nn.Linear). Conv2d with groups > 1 is refused.
LAYER_TYPES: list[tuple[type, LayerType]] = [(nn.Linear, LINEAR), (nn.Embedding, EMBEDDING), (nn.Conv2d, CONV2D)]
if Conv1D is not None:
    LAYER_TYPES.insert(1, (Conv1D, CONV1D))
# Layer types of optional packages: (package, function returning its (class, LayerType) pairs). They are added
# once the package is imported (a model can only hold its layers after that), so lorakit never imports it itself.
OPTIONAL_LAYER_TYPES: list[tuple[str, Callable[[], list[tuple[type, LayerType]]]]] = []


def layer_type(module: nn.Module) -> LayerType | None:
    """The LayerType of a base layer, or None when LoRA cannot wrap it."""
    if OPTIONAL_LAYER_TYPES:
        _add_imported_optional_types()
    for cls, ltype in LAYER_TYPES:
        if isinstance(module, cls):
            if isinstance(module, nn.Conv2d) and module.groups != 1:
                return None
            # A quantised layer of a package lorakit does not know (its weight holds integers, not numbers).
            return ltype if ltype.quantized or module.weight.is_floating_point() else None
    return None


def _add_imported_optional_types() -> None:
    for entry in list(OPTIONAL_LAYER_TYPES):
        if entry[0] in sys.modules:
            try:
                OPTIONAL_LAYER_TYPES.remove(entry)
            except ValueError:  # another thread got there first
                continue
            LAYER_TYPES[:0] = entry[1]()


def layer_kind(module: nn.Module) -> str | None:
    """The name of a base layer's type ("linear", "conv1d", "embedding", "conv2d"), or None."""
    ltype = layer_type(module)
    return ltype.name if ltype else None


# --- one adapter ------------------------------------------------------------------------------------


class LoraAdapter(nn.Module):
    """Plain LoRA on one layer: trainable A and B, `ΔW = scale·B·A`.

    The contract every variant follows (the layer, merge, io, per-row batching and training only use these):
      factors()                 effective (A, B) with ΔW = scale·B·A (VeRA, AdaLoRA compute theirs)
      delta_weight(layer)       scale·B·A in the base weight's layout, fp32
      merge_into(layer, W, w)   the weight after merging at strength w into W (fp32)
      output(layer, x, y)       the contribution added to the base output y
      fast_forward(layer, x, w) the whole layer output by a faster route when this adapter runs alone, else None
      row_factors(layer)        (Aᵀ, Bᵀ, scale) for per-row slots (when `per_row`); row_column_scale(layer) for
                                DoRA-like rescaling; share_row_slot(layer, Aᵀ, Bᵀ) lets an inference-only adapter
                                become a view of its slot
      peft_tensors(layer)       {name after the module path in PEFT's file: tensor}; load_peft_tensor() the reverse
    """

    method = "lora"
    low_rank_delta = True  # ΔW = scale·B·A with factors() exactly (DoRA's is not: combine/resize refuse it)
    per_row = True  # per-row batches hold it in slots (row_factors); False: its rows run its own output() instead

    def __init__(self, base: nn.Module, ltype: LayerType, r: int, scale: float, dropout: float = 0.0,
                 init: str = "kaiming"):
        super().__init__()
        w = base.weight
        a_shape, b_shape = ltype.factor_shapes(base, r)
        dtype = adapter_dtype(ltype.weight_dtype(base))
        self.lora_A = nn.Parameter(torch.empty(a_shape, dtype=dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(b_shape, dtype=dtype, device=w.device))
        self.rank, self.scale = r, float(scale)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / r)
        else:  # the default of nn.Linear, and of PEFT and the LoRA paper's code
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @classmethod
    def prepare(cls, config, model: nn.Module, bases: list[tuple[str, nn.Module]]):
        """Anything the adapters of one inject() share (VeRA's projections); plain LoRA shares nothing."""
        return None

    @classmethod
    def create(cls, config, base: nn.Module, ltype: LayerType, name: str, shared=None) -> "LoraAdapter":
        """This method's adapter for the base layer `name`, as `config` describes it."""
        return cls(base, ltype, config.rank_for(name), config.scale_for(name), config.dropout, config.init)

    def attach(self, layer: "LoraLayer") -> None:
        """Called once the adapter sits on `layer` (PiSSA/OLoRA move part of the base weight into it here)."""

    def detach(self, layer: "LoraLayer") -> None:
        """Called before the adapter leaves `layer`: give back what attach() took from the base."""

    def base_part(self, layer: "LoraLayer", x: torch.Tensor) -> torch.Tensor | None:
        """The output of the part of W0 this adapter holds (PiSSA/OLoRA's s·B0·A0), added back whenever the
        adapter is not running, so a disabled model or another adapter still sees the untouched base."""
        return None

    # -- the contract --

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A, self.lora_B

    def delta_weight(self, layer: "LoraLayer") -> torch.Tensor:
        A, B = (f.float() for f in self.factors())
        return layer.type.to_layout(layer.base_layer, (B.flatten(1) @ A.flatten(1)) * self.scale)

    def merge_into(self, layer: "LoraLayer", weight: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        return weight + self.delta_weight(layer).to(weight.device) * strength

    def output(self, layer: "LoraLayer", x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        A, B = self.factors()
        if not layer.type.takes_ids:  # ids cannot be dropped out (PEFT applies no dropout to embedding lookups)
            x = self.dropout(x.to(A.dtype))
        return layer.type.low_rank(layer.base_layer, x, A, B) * self.scale

    def fast_forward(self, layer: "LoraLayer", x: torch.Tensor, strength: float) -> torch.Tensor | None:
        if not self.can_fuse(layer, x):
            return None
        A, B = self.factors()
        base = layer.base_layer
        weight = layer.type.fused_weight(base)
        return fused_linear(x, weight, base.bias, A, B, self.scale * strength, layer.type.fan_in_fan_out)

    def can_fuse(self, layer: "LoraLayer", x: torch.Tensor) -> bool:
        base = layer.base_layer
        return (
            layer.type.fusable
            and (isinstance(self.dropout, nn.Identity) or not self.training)
            and not base.weight.requires_grad
            and self.factor_dtype == x.dtype == layer.type.weight_dtype(base)
            and (base.bias is None or base.bias.dtype == x.dtype)
            and not (torch.amp.is_autocast_available(x.device.type) and torch.is_autocast_enabled(x.device.type))
        )

    @property
    def factor_dtype(self) -> torch.dtype:
        """The dtype the adapter computes in (the fused path needs input, weight and factors alike)."""
        return self.lora_A.dtype

    def row_factors(self, layer: "LoraLayer") -> tuple[torch.Tensor, torch.Tensor, float]:
        """(Aᵀ (in, r), Bᵀ (r, out), scale): what a per-row slot holds. The scale stays apart (applied to the
        r-wide product) so that the slot can hold the factors themselves; a pair (Aᵀ, scale·Bᵀ) also works."""
        A, B = self.factors()
        return A.T, B.T, self.scale

    def share_row_slot(self, layer: "LoraLayer", At: torch.Tensor, Bt: torch.Tensor) -> bool:
        """Make this adapter's tensors views of its per-row slot (which holds row_factors), so that a loaded
        adapter is held once; True if done. Only when the factors are the parameters themselves (variants that
        compute theirs keep them). The Parameter objects stay the same, so optimizers holding them still work."""
        A, B = self.factors()
        own_A, own_B = self._parameters.get("lora_A"), self._parameters.get("lora_B")
        if A is not own_A or B is not own_B or At.T.shape != A.shape or Bt.T.shape != B.shape:
            return False
        self.lora_A.data, self.lora_B.data = At.T, Bt.T
        return True

    def row_column_scale(self, layer: "LoraLayer") -> torch.Tensor | None:
        """A per-output-feature factor applied to `base(x) − bias + ΔW x` (DoRA's m/‖W'‖); None for plain LoRA."""
        return None

    def row_version(self) -> tuple:
        """Changes whenever what row_factors/row_column_scale return changes (the per-row slot is refreshed then)."""
        return _tensor_versions(self._parameters.values()) + (self.scale,)

    def peft_tensors(self, layer: "LoraLayer") -> dict[str, torch.Tensor]:
        """The tensors to write, keyed by PEFT's names, for the untouched base."""
        name_A, name_B = layer.type.factor_names
        return {name_A: self.lora_A, name_B: self.lora_B}

    def load_targets(self, layer: "LoraLayer") -> dict[str, torch.Tensor]:
        """The tensors a file's tensors are copied into, by PEFT name (usually what peft_tensors returns)."""
        return self.peft_tensors(layer)

    @classmethod
    def saved_config(cls, config):
        """The config written next to `peft_tensors` (PiSSA/OLoRA's untouched-base form doubles the rank)."""
        return config

    @classmethod
    def peft_names(cls, ltype: LayerType) -> tuple[str, ...]:
        """The names after the module path that this method's files use for a layer of type `ltype`."""
        return ltype.factor_names

    @classmethod
    def expected_shapes(cls, ltype: LayerType, base: nn.Module) -> dict[str, tuple[int | None, ...]]:
        """Each PEFT tensor's shape for `base`, None where the rank goes (checked before any data is read)."""
        a_shape, b_shape = ltype.factor_shapes(base, 0)
        name_A, name_B = ltype.factor_names
        return {name_A: _rank_free(a_shape, 0), name_B: _rank_free(b_shape, 1)}

    @classmethod
    def delta_from_file(cls, parts: dict[str, torch.Tensor], config, module: str) -> torch.Tensor:
        """`ΔW` as (out, in·k·k) from one layer's file tensors keyed by their first name part (e.g. "lora_A")."""
        A = parts.get("lora_A", parts.get("lora_embedding_A"))
        B = parts.get("lora_B", parts.get("lora_embedding_B"))
        return (B.float().flatten(1) @ A.float().flatten(1)) * config.scale_for(module)

    # -- tensors that belong to the whole model rather than one layer (VeRA's shared projections) --

    @classmethod
    def model_tensors(cls, model: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
        return {}

    @classmethod
    def is_model_tensor(cls, key: str) -> bool:
        return False

    @classmethod
    def load_model_tensors(cls, model: nn.Module, adapter: str, tensors: dict[str, torch.Tensor], file) -> None:
        raise AssertionError("plain LoRA files have no model-level tensors")

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}"


def adapter_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """Half-precision (and quantised) bases train their adapters in fp32, as PEFT does; the fp32 factors are tiny."""
    return weight_dtype if weight_dtype in (torch.float32, torch.float64) else torch.float32


def _rank_free(shape: tuple[int, ...], rank_dim: int) -> tuple[int | None, ...]:
    return tuple(None if i == rank_dim else n for i, n in enumerate(shape))


def _tensor_versions(tensors) -> tuple:
    # In-place writes (a load's copy, a training step) bump `_version`; inference tensors have none.
    return tuple((id(t), t.data_ptr(), t._version if not t.is_inference() else -id(t)) for t in tensors)


# --- the layer ----------------------------------------------------------------------------------------


@dataclass
class ActiveAdapter:
    name: str
    weight: float = 1.0


class LoraLayer(nn.Module):
    """A frozen base layer with any number of named adapters; `active` says which ones run, and how strongly."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        ltype = layer_type(base_layer)
        if ltype is None:
            raise TypeError(f"LoRA cannot wrap {type(base_layer).__name__}; supported: Linear, Conv1D, Embedding, Conv2d")
        ltype.on_wrap(base_layer)
        self.base_layer = base_layer
        self.type = ltype
        self.adapters = nn.ModuleDict()
        self.active: list[ActiveAdapter] = []
        self.merged: list[ActiveAdapter] = []  # what is folded into base_layer.weight right now
        self.disabled = False
        # merge() keeps the untouched weight here (LayerType.keep_weight: a copy, or a quantised layer's packed data
        # and state) so unmerge() is bit-exact (subtracting drifts).
        self.original_weight = None
        self.base_parts: list[str] = []  # adapters that hold part of the base weight (PiSSA/OLoRA), see base_part()
        self.row_slots = None  # slots.SlotPool: this layer's adapters in stacked slots for per-row batches

    @property
    def kind(self) -> str:
        return self.type.name

    @property
    def weight(self) -> torch.Tensor:  # code that reads `module.weight` (tying, HF helpers) still works
        return self.base_layer.weight

    @property
    def bias(self):
        return getattr(self.base_layer, "bias", None)

    @property
    def features(self) -> tuple[int, int]:
        return self.type.features(self.base_layer)

    def unmerged_weight(self) -> torch.Tensor:
        """The base weight without any merged adapter, as a float tensor (what DoRA's norm and merge deltas are
        computed from; a quantised base is dequantised)."""
        return self.type.dense_weight(self.base_layer, self.original_weight)

    def add_adapter(self, name: str, r: int | None = None, scale: float | None = None, dropout: float = 0.0,
                    init: str = "kaiming", adapter: nn.Module | None = None) -> nn.Module:
        """Add a plain LoRA adapter of rank r, or an adapter object built elsewhere (a variant)."""
        adapter = adapter if adapter is not None else LoraAdapter(self.base_layer, self.type, r, scale, dropout, init)
        self.adapters[name] = adapter
        adapter.attach(self)
        if getattr(adapter, "holds_base_part", False):
            self.base_parts.append(name)
        return adapter

    def remove_adapter(self, name: str) -> None:
        """Take adapter `name` off this layer, giving back any part of the base weight it holds."""
        self.adapters[name].detach(self)
        del self.adapters[name]
        if name in self.base_parts:
            self.base_parts.remove(name)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        plan = rows.current_plan()
        if plan is not None:
            return plan.forward(self, x)
        pending = self._pending_adapters()
        if self.base_parts:
            return self._forward_with_base_parts(x, pending, *args, **kwargs)
        if not pending:
            return self.base_layer(x, *args, **kwargs)
        if len(pending) == 1:
            y = self.adapters[pending[0].name].fast_forward(self, x, pending[0].weight)
            if y is not None:
                return y
        y = self.base_layer(x, *args, **kwargs)
        return self._add_outputs(x, y, pending)

    def _add_outputs(self, x: torch.Tensor, y: torch.Tensor, pending: list[ActiveAdapter]) -> torch.Tensor:
        out = y
        for a in pending:  # each adapter's contribution is relative to the base output, weighted
            delta = self.adapters[a.name].output(self, x, y)
            out = out + (delta if a.weight == 1.0 else delta * a.weight).to(y.dtype)
        return out

    def _forward_with_base_parts(self, x: torch.Tensor, pending: list[ActiveAdapter], *args, **kwargs) -> torch.Tensor:
        """The base weight holds a residual (PiSSA/OLoRA): put back the parts its adapters hold, then add the
        running adapters' changes to that whole base. Alone at full strength, such an adapter runs its own form."""
        if len(pending) == 1 and self.base_parts == [pending[0].name]:
            y = self.adapters[pending[0].name].fast_forward(self, x, pending[0].weight)
            if y is not None:
                return y
        merged = {a.name for a in self.merged}  # a merged adapter's part is in the weight again
        y = self.base_layer(x, *args, **kwargs)
        for name in self.base_parts:
            if name not in merged:
                y = y + self.adapters[name].base_part(self, x).to(y.dtype)
        return self._add_outputs(x, y, pending)

    def _pending_adapters(self) -> list[ActiveAdapter]:
        """Active adapters not already folded into the weight (lorakit.adapters refuses to change
        the active set while merged, so a merged layer has nothing left to add)."""
        if self.disabled or self.merged:
            return []
        return self.active

    def extra_repr(self) -> str:
        active = ", ".join(f"{a.name}×{a.weight:g}" for a in self.active) or "none"
        return f"kind={self.kind}, active=[{active}], merged={[a.name for a in self.merged]}"
