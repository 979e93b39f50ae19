"""The LoRA math: a frozen base layer plus `scale · B·A`, its forward pass, and the delta that merge folds in.

    y = base(x) + scale · dropout(x) Aᵀ Bᵀ,   A ∈ R^{r×in},  B ∈ R^{out×r},  scale = α/r  (α/√r for rsLoRA)

B starts at zero, so an adapted model computes exactly what the base computes until B is trained.
"""

from __future__ import annotations

import contextvars
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

try:  # GPT-2 style layers store their weight transposed: (in, out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency, but keep the math importable alone
    Conv1D = ()

SUPPORTED_TYPES = (nn.Linear, nn.Embedding, nn.Conv2d) + ((Conv1D,) if Conv1D else ())

# Set by lorakit.serve.mixed.adapter_rows: which adapter each row of the batch runs. Every LoRA layer
# called in that context (thread or asyncio task) follows it instead of its active adapters; a context
# variable, not a layer attribute, so threads can run different row plans on one model at once.
MIXED_ROWS: contextvars.ContextVar = contextvars.ContextVar("lorakit_mixed_rows", default=None)


def layer_kind(module: nn.Module) -> str | None:
    """The name lorakit uses for a base layer type, or None when LoRA cannot wrap it."""
    if isinstance(module, nn.Linear):
        return "linear"
    if Conv1D and isinstance(module, Conv1D):
        return "conv1d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Conv2d) and module.groups == 1:
        return "conv2d"
    return None


def layer_features(module: nn.Module, kind: str) -> tuple[int, int]:
    """(in_features, out_features) of a base layer: the sizes of A's columns and B's rows."""
    w = module.weight
    if kind == "linear":
        return w.shape[1], w.shape[0]
    if kind in ("conv1d", "embedding"):
        return w.shape[0], w.shape[1]
    return w.shape[1], w.shape[0]  # conv2d: (out, in, kh, kw)


class LoraAdapter(nn.Module):
    """One adapter's trainable factors on one layer."""

    def __init__(self, base: nn.Module, kind: str, r: int, scale: float, dropout: float, init: str):
        super().__init__()
        in_f, out_f = layer_features(base, kind)
        w = base.weight
        # Half-precision bases train their adapters in fp32 (as PEFT does); the fp32 factors are tiny.
        dtype = torch.float32 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
        a_shape, b_shape = (r, in_f), (out_f, r)
        if kind == "conv2d":
            a_shape, b_shape = (r, in_f, *base.kernel_size), (out_f, r, 1, 1)
        self.lora_A = nn.Parameter(torch.empty(a_shape, dtype=dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(b_shape, dtype=dtype, device=w.device))
        self.rank, self.scale = r, float(scale)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / r)
        else:  # the default of nn.Linear, and of PEFT and the LoRA paper's code
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scale={self.scale:g}"


def delta_weight(adapter: LoraAdapter, kind: str, weight: float = 1.0) -> torch.Tensor:
    """`weight · scale · B·A` laid out like the base layer's own weight, computed in fp32."""
    A, B = adapter.lora_A.float(), adapter.lora_B.float()
    s = adapter.scale * weight
    if kind == "conv2d":
        return (B.flatten(1) @ A.flatten(1)).view(B.shape[0], *A.shape[1:]) * s
    delta = (B @ A) * s  # (out, in)
    return delta if kind == "linear" else delta.T  # conv1d and embedding store (in, out)


def lora_output(adapter: LoraAdapter, kind: str, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The adapter's contribution `scale · dropout(x) Aᵀ Bᵀ` (before any per-adapter weight)."""
    A, B = adapter.lora_A, adapter.lora_B
    if kind == "embedding":
        t = F.embedding(x, A.T, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse)
        return (t @ B.T) * adapter.scale
    x = adapter.dropout(x.to(A.dtype))
    if kind == "conv2d":
        t = F.conv2d(x, A, None, base.stride, base.padding, base.dilation)
        return F.conv2d(t, B) * adapter.scale
    return (x @ A.T) @ B.T * adapter.scale


# Folding `scale·B·A` into a temporary copy of the weight costs out·in·r multiply-adds plus a few
# memory-bound passes over the weight; adding the low-rank term row by row costs rows·r·cols. This
# constant prices those passes in multiply-adds per weight element (fitted on a 2-core EPYC, fp32:
# the measured break-even lies within ~10% of the rule below for 512/1376-wide layers).
_FOLD_PASSES = 4


def _fold_is_cheaper(rows: int, cols: int, weight: torch.Tensor, r: int) -> bool:
    """Whether adding the low-rank term to `rows` rows of width `cols` costs more than folding it into the weight.

    Long batches (a training step, a prefill) have more rows than the weight has columns, so folding
    wins there; decoding a few tokens keeps the row-wise product. Folding only happens when the
    temporary weight is smaller than the rows × cols activations the row-wise product would touch, so
    it adds less memory than that, one layer at a time. Only fp32/fp64: folding a small delta into a
    bf16/fp16 weight would round most of it away.
    """
    return weight.dtype in (torch.float32, torch.float64) and rows * cols * r > weight.numel() * (r + _FOLD_PASSES)


def _folded_weight(weight, lora_A, lora_B, scale, transposed):
    """`weight + scale·B·A` in the base weight's own layout, so using it is the base layer's own op.

    With B = 0 this is the base weight bit for bit (adding exact zeros), so the output stays bit-exact.
    """
    if transposed:  # Conv1D stores (in, out)
        return torch.addmm(weight, lora_A.T, lora_B.T, alpha=scale)
    return torch.addmm(weight, lora_B, lora_A, alpha=scale)


def _base_op(x2, weight, bias, transposed):
    """Exactly the op nn.Linear / Conv1D run on a 2-D input, so that B = 0 gives the base output bit for bit."""
    w_t = weight if transposed else weight.T  # (in, out)
    return torch.addmm(bias, x2, w_t) if bias is not None else x2 @ w_t


def _lora_linear_forward(x2, weight, bias, lora_A, lora_B, scale, transposed, keep_t):
    """`base(x2) + scale·(x2 Aᵀ) Bᵀ` on 2-D rows; returns it and `t = x2 Aᵀ` (computed only if `keep_t`)."""
    rows, in_f = x2.shape
    out_f = weight.numel() // in_f
    t = x2 @ lora_A.T if keep_t else None  # backward needs t for dB; inference does not
    # Row-wise, the LoRA term costs an (rows, out) product, plus (rows, in) for t when t is not kept anyway.
    if _fold_is_cheaper(rows, out_f if keep_t else in_f + out_f, weight, lora_A.shape[0]):
        return _base_op(x2, _folded_weight(weight, lora_A, lora_B, scale, transposed), bias, transposed), t
    y = _base_op(x2, weight, bias, transposed)
    # addmm_ adds the low-rank term into y in place: no second output-sized tensor, no separate scaling pass.
    y.addmm_(t if t is not None else x2 @ lora_A.T, lora_B.T, alpha=scale)
    return y, t


class _LoraLinearFn(torch.autograd.Function):
    """`base(x) + scale·(x Aᵀ) Bᵀ` with a hand-written backward for a frozen weight.

    Why: autograd would add the LoRA branch's input gradient to the base's in a separate pass and
    scale the output-sized tensor; here both gradients land in one buffer (through `addmm_`, or through
    a folded weight for long batches), and only r-sized tensors are scaled.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scale, transposed):
        x2 = x.reshape(-1, x.shape[-1])
        y, t = _lora_linear_forward(x2, weight, bias, lora_A, lora_B, scale, transposed, keep_t=True)
        # x is needed for dA; t (rows × r, r/in of x's size) is kept so backward need not recompute x·Aᵀ.
        ctx.save_for_backward(x2, weight, lora_A, lora_B, t)
        ctx.scale, ctx.transposed, ctx.has_bias = scale, transposed, bias is not None
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, weight, lora_A, lora_B, t = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        rows, in_f = x2.shape
        need_dx, need_dA = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        # dx = dy·(W + scale·B·A): fold the weight for long batches, else add g·A (rows·in·r) into dy·W.
        fold_dx = need_dx and _fold_is_cheaper(rows, in_f, weight, lora_A.shape[0])
        g = None
        if need_dA or (need_dx and not fold_dx):
            g = (dy2 @ lora_B).mul_(ctx.scale)  # gradient at the rank-r bottleneck
        dx = d_bias = dA = dB = None
        if need_dx:
            w = _folded_weight(weight, lora_A, lora_B, ctx.scale, ctx.transposed) if fold_dx else weight
            dx = dy2 @ (w.T if ctx.transposed else w)
            if not fold_dx:
                dx.addmm_(g, lora_A)
            dx = dx.view(*dy.shape[:-1], dx.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            d_bias = dy2.sum(0)
        if need_dA:
            dA = g.T @ x2
        if ctx.needs_input_grad[4]:
            dB = (dy2.T @ t).mul_(ctx.scale)
        return dx, None, d_bias, dA, dB, None, None


def _fused_linear(x, weight, bias, lora_A, lora_B, scale, transposed):
    """The fused path: through the autograd Function when a gradient is wanted, else forward only.

    Inference skips the Function because it would compute and keep `t = x·Aᵀ` for a backward that never
    comes, and without t the folded weight pays off for even shorter batches.
    """
    if torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in (x, bias, lora_A, lora_B)):
        return _LoraLinearFn.apply(x, weight, bias, lora_A, lora_B, scale, transposed)
    y, _ = _lora_linear_forward(x.reshape(-1, x.shape[-1]), weight, bias, lora_A, lora_B, scale, transposed, keep_t=False)
    return y.view(*x.shape[:-1], y.shape[-1])


@dataclass
class ActiveAdapter:
    name: str
    weight: float = 1.0


class LoraLayer(nn.Module):
    """A frozen base layer with any number of named adapters; `active` says which ones run, and how strongly."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        kind = layer_kind(base_layer)
        if kind is None:
            raise TypeError(f"LoRA cannot wrap {type(base_layer).__name__}; supported: Linear, Conv1D, Embedding, Conv2d")
        self.base_layer = base_layer
        self.kind = kind
        self.adapters = nn.ModuleDict()
        self.active: list[ActiveAdapter] = []
        self.merged: list[ActiveAdapter] = []  # what is folded into base_layer.weight right now
        self.disabled = False
        # merge() keeps the untouched weight here so unmerge() is bit-exact (subtracting drifts).
        self.original_weight: torch.Tensor | None = None
        self.mixed_stack = None  # this layer's adapters stacked for per-row batches (cache of serve/mixed.py)

    @property
    def weight(self) -> torch.Tensor:  # code that reads `module.weight` (tying, HF helpers) still works
        return self.base_layer.weight

    @property
    def bias(self):
        return getattr(self.base_layer, "bias", None)

    def add_adapter(self, name: str, r: int, scale: float, dropout: float = 0.0, init: str = "kaiming") -> LoraAdapter:
        adapter = LoraAdapter(self.base_layer, self.kind, r, scale, dropout, init)
        self.adapters[name] = adapter
        return adapter

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        rows = MIXED_ROWS.get()
        if rows is not None:
            return rows.forward(self, x)
        pending = self._pending_adapters()
        if not pending:
            return self.base_layer(x, *args, **kwargs)
        if len(pending) == 1 and self._can_fuse(pending[0], x):
            adapter = self.adapters[pending[0].name]
            base = self.base_layer
            return _fused_linear(
                x, base.weight, base.bias, adapter.lora_A, adapter.lora_B,
                adapter.scale * pending[0].weight, self.kind == "conv1d",
            )
        y = self.base_layer(x, *args, **kwargs)
        for a in pending:
            out = lora_output(self.adapters[a.name], self.kind, self.base_layer, x)
            y = y + (out if a.weight == 1.0 else out * a.weight).to(y.dtype)
        return y

    def _pending_adapters(self) -> list[ActiveAdapter]:
        """Active adapters not already folded into the weight (lorakit.adapters refuses to change
        the active set while merged, so a merged layer has nothing left to add)."""
        if self.disabled or self.merged:
            return []
        return self.active

    def _can_fuse(self, active: ActiveAdapter, x: torch.Tensor) -> bool:
        adapter = self.adapters[active.name]
        return (
            self.kind in ("linear", "conv1d")
            and (isinstance(adapter.dropout, nn.Identity) or not self.training)
            and not self.base_layer.weight.requires_grad
            and adapter.lora_A.dtype == x.dtype == self.base_layer.weight.dtype
            and not torch.is_autocast_enabled(x.device.type)
        )

    def extra_repr(self) -> str:
        active = ", ".join(f"{a.name}×{a.weight:g}" for a in self.active) or "none"
        return f"kind={self.kind}, active=[{active}], merged={[a.name for a in self.merged]}"
