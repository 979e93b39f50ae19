"""DoRA (Liu et al. 2024): the weight split into a trained magnitude and a direction that LoRA trains.

    W' = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖      norm per output feature (row of the (out, in) weight)
    y  = g ⊙ (W0 x + s·B·A x) + bias,          g = m / ‖W0 + s·B·A‖

`m` starts as ‖W0‖, so with B = 0 the layer computes exactly what the base computes. The norm is a
constant in backward (the paper's §4.3, as PEFT does): no gradient flows through it, so it is computed
without a graph, once per change of A, B or W0 and cached by their versions. A training step therefore
computes it once per layer however many forwards the step runs (gradient checkpointing, accumulation).

Files are PEFT's: `lora_A`/`lora_B` as for LoRA plus `lora_magnitude_vector` (no `.weight` suffix), of
shape (out,) for Linear, GPT-2 Conv1D and Embedding (whose "out" is the embedding dimension) and
(1, out, 1, 1) for Conv2d.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..fused import fused_linear
from ..layers import CONV1D, CONV2D, EMBEDDING, LINEAR, LayerType, LoraAdapter, _tensor_versions

MAGNITUDE = "lora_magnitude_vector"  # PEFT's name, in the module tree and in the file
# The layer types whose weight DoRA reads as it is (PEFT has DoRA on each); a type added later (quantised
# layers) is refused by name until DoRA learns to read its weight.
SUPPORTED = (LINEAR, CONV1D, EMBEDDING, CONV2D)

# row_norms sums three terms; when they cancel to below this fraction of ‖W0_i‖², rounding in ‖W0_i‖² would
# show in the result (relative error ≈ 1e-7 / fraction), so it sums the squares of W0 + s·B·A directly.
_CANCELLATION = 0.25


class DoraAdapter(LoraAdapter):
    """LoRA's A and B (the direction's update) plus `lora_magnitude_vector` m (out,), both trained."""

    method = "dora"
    low_rank_delta = False  # W' rescales every row of W0 + s·B·A: no B·A alone to combine, resize or mix

    def __init__(self, base: nn.Module, ltype: LayerType, r: int, scale: float, dropout: float = 0.0,
                 init: str = "kaiming"):
        super().__init__(base, ltype, r, scale, dropout, init)
        self._base_sq = None  # (versions of W0, ‖W0_i‖² per row)
        self._norm = None  # (versions of W0, A, B and the scale, ‖W0 + s·B·A‖ per row)
        # B = 0 here, so this is ‖W0‖ computed exactly as forward computes the norm: g = m / norm is 1 exactly.
        m = self._row_norms(ltype, base, base.weight)
        self.lora_magnitude_vector = nn.Parameter(m.to(self.lora_A.dtype))

    @classmethod
    def create(cls, config, base: nn.Module, ltype: LayerType, name: str, shared=None) -> "DoraAdapter":
        if not any(ltype is t for t in SUPPORTED):
            raise ConfigError(f"DoRA (use_dora=True) cannot adapt {name!r}, a {type(base).__name__} layer; it supports "
                              "Linear, GPT-2 Conv1D, Embedding and Conv2d. Leave it out with exclude_modules, or use plain LoRA")
        return super().create(config, base, ltype, name, shared)

    # -- the norm and the per-feature factor --

    def weight_norm(self, layer) -> torch.Tensor:
        """‖W0 + s·B·A‖ per output feature, detached, fp32 (or the adapter's dtype); cached by versions."""
        return self._row_norms(layer.type, layer.base_layer, layer.unmerged_weight())

    def _row_norms(self, ltype: LayerType, base: nn.Module, w0: torch.Tensor) -> torch.Tensor:
        A, B = self.factors()
        key = _tensor_versions((w0, A, B)) + (self.scale,)
        cached = self._norm  # one read: a server thread may replace it meanwhile
        if cached is not None and cached[0] == key:
            return cached[1]
        # A normal tensor even under inference_mode, so a later forward with gradients can use it.
        with torch.inference_mode(False), torch.no_grad():
            W = ltype.from_layout(base, w0).to(A.dtype)
            norm = row_norms(W, A.flatten(1), B.flatten(1), self.scale, self._base_squares(w0, W))
        self._norm = (key, norm)
        return norm

    def _base_squares(self, w0: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        key, cached = _tensor_versions((w0,)), self._base_sq
        if cached is None or cached[0] != key:
            cached = self._base_sq = (key, W.square().sum(1))
        return cached[1]

    def dora_factor(self, layer) -> torch.Tensor:
        """g = m / ‖W0 + s·B·A‖ (out,): differentiable in m only."""
        return self.lora_magnitude_vector / self.weight_norm(layer)

    # -- the contract --

    def output(self, layer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """`(g − 1) ⊙ (W0 x) + g ⊙ s·B·A x`, PEFT's form: y already holds W0 x + bias.

        With dropout in training, PEFT runs the base product again on the dropped-out input, so that the
        rescaled base term and the LoRA term see the same x; the unscaled y keeps the clean input.
        """
        A, B = self.factors()
        ltype, base = layer.type, layer.base_layer
        g = ltype.feature_view(self.dora_factor(layer))
        if not ltype.takes_ids and self.training and not isinstance(self.dropout, nn.Identity):
            x = self.dropout(x.to(A.dtype))
            product = _without_bias(layer, base(x.to(base.weight.dtype)))
        else:
            x = x if ltype.takes_ids else x.to(A.dtype)
            product = _without_bias(layer, y)
        lora = ltype.low_rank(base, x, A, B) * self.scale
        return (g - 1) * product + g * lora

    def fast_forward(self, layer, x: torch.Tensor, strength: float) -> torch.Tensor | None:
        """`g ⊙ (W0 x + s·B·A x) + bias` through the fused LoRA function, which takes the factor g.

        At strength w ≠ 1 the factor differs per feature between the two terms, so the general path runs.
        """
        if strength != 1.0 or not self.can_fuse(layer, x):
            return None
        A, B = self.factors()
        base = layer.base_layer
        return fused_linear(x, base.weight, base.bias, A, B, self.scale, layer.type.fan_in_fan_out, self.dora_factor(layer))

    def merged_weight(self, layer) -> torch.Tensor:
        """W' = g ⊙ (W0 + s·B·A) in the base weight's layout, fp32."""
        ltype, base = layer.type, layer.base_layer
        A, B = (f.float().flatten(1) for f in self.factors())
        W = ltype.from_layout(base, layer.unmerged_weight()).float()
        g = self.dora_factor(layer).float()
        return ltype.to_layout(base, torch.addmm(W, B, A, alpha=self.scale) * g[:, None])

    def merge_into(self, layer, weight: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        """`W + w·(W' − W0)`: the exact W' when it is the only adapter merged at strength 1 (up to rounding)."""
        w0 = layer.unmerged_weight().to(device=weight.device, dtype=torch.float32)
        return weight + (self.merged_weight(layer).to(weight.device) - w0) * strength

    # delta_weight stays s·B·A, as PEFT's get_delta_weight: the direction's low-rank update, whose effective
    # rank the trainer reports; the exact change of the weight is merged_weight − W0.

    def row_column_scale(self, layer) -> torch.Tensor:
        return self.dora_factor(layer).detach()

    def peft_tensors(self, layer) -> dict[str, torch.Tensor]:
        m = self.lora_magnitude_vector.view(_magnitude_shape(layer.type, layer.base_layer))
        return {**super().peft_tensors(layer), MAGNITUDE: m}

    @classmethod
    def peft_names(cls, ltype: LayerType) -> tuple[str, ...]:
        return ltype.factor_names + (MAGNITUDE,)

    @classmethod
    def expected_shapes(cls, ltype: LayerType, base: nn.Module) -> dict[str, tuple[int | None, ...]]:
        return {**super().expected_shapes(ltype, base), MAGNITUDE: _magnitude_shape(ltype, base)}

    # delta_from_file (inspect's effective rank) stays LoRA's s·B·A: the file alone has no W0 to rescale.


def row_norms(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, sq: torch.Tensor) -> torch.Tensor:
    """‖W_i + s·B_i A‖ for every row i of W (out, in), given sq = ‖W_i‖², without building W + s·B·A:

        ‖W_i + s·B_i A‖² = ‖W_i‖² + s·B_i·(2·A W_iᵀ + s·(A Aᵀ) B_iᵀ)

    costs out·in·r like B·A, but reads W once and writes r-wide results instead of an (out, in) matrix.
    Where the update cancels most of a row the terms nearly cancel too; the direct sum is used then.
    """
    t = (W @ A.T).mul_(2).addmm_(B, A @ A.T, alpha=scale)
    n2 = sq + scale * (t * B).sum(1)
    if not n2.is_meta and bool((n2 < _CANCELLATION * sq).any()):  # (meta: shapes only, e.g. memory planning)
        n2 = torch.addmm(W, B, A, alpha=scale).square().sum(1)
    # A zero row of W0 has m = 0: a tiny floor makes g = 0 there rather than 0/0.
    return n2.sqrt().clamp_min_(torch.finfo(n2.dtype).tiny)


def _magnitude_shape(ltype: LayerType, base: nn.Module) -> tuple[int, ...]:
    """PEFT's shape: (out,) for 2-D weights; (1, out, 1, 1) for convolutions (its norm keeps the kernel dims)."""
    out, dims = ltype.features(base)[1], base.weight.dim()
    return (out,) if dims <= 2 else (1, out) + (1,) * (dims - 2)


def _without_bias(layer, y: torch.Tensor) -> torch.Tensor:
    bias = layer.bias
    return y if bias is None else y - layer.type.feature_view(bias)
