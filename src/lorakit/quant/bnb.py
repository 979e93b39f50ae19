"""bitsandbytes' 4-bit (NF4/FP4) and 8-bit (LLM.int8) linear layers as LoRA base layers: sizes from the layer's
in/out features (never the packed weight's shape), the weight dequantised, a merged weight quantised back, and
the packed data kept aside so unmerge is bit-exact.

Two 4-bit layouts exist. On a CPU with AVX512-BF16, `Linear4bit.forward` repacks its weight in place on its first
forward without gradients (`quant_state.packing_format_for_cpu`): nibbles regrouped in tiles of 32 output rows,
double quantisation dropped, absmax stored in bf16 as (in/blocksize, out), products computed in bf16 (~5e-3 off
the fp32 path), and no gradient reaches the layer's input any more. `bnb.functional.dequantize_4bit` misreads
that layout. lorakit switches the repacking off where it loads or wraps a layer (`keep_standard_layout`) and
reads both layouts (`dequantize_4bit`).
"""

from __future__ import annotations

from dataclasses import dataclass

import bitsandbytes as bnb
import torch
from torch import nn

from ..layers import LayerType

_PACK_ROWS = 32  # output rows per tile of bitsandbytes' CPU packing (block_n in _convert_weight_packed_for_cpu)


# --- reading a 4-bit weight, in either layout --------------------------------------------------------------


def is_cpu_packed(weight) -> bool:
    return bool(getattr(weight.quant_state, "packing_format_for_cpu", False))


def dequantize_4bit(weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (out, in) weight a `Params4bit` stands for, in `dtype`: the same numbers bitsandbytes' own
    forward multiplies by (its gemm dequantises the same way), read correctly in the CPU-packed layout too."""
    qs = weight.quant_state
    if is_cpu_packed(weight):
        return _dequantize_cpu_packed(weight.data, qs).to(dtype)
    absmax = qs.absmax
    if qs.nested:  # double quantisation: the per-block scales are themselves 8-bit, in blocks of 256
        absmax = torch.ops.bitsandbytes.dequantize_blockwise.default(
            qs.absmax, qs.state2.absmax, qs.state2.code, qs.state2.blocksize, torch.float32) + qs.offset
    return torch.ops.bitsandbytes.dequantize_4bit.default(weight.data, absmax.float(), qs.blocksize, qs.quant_type,
                                                          qs.shape, dtype)


def _dequantize_cpu_packed(data: torch.Tensor, qs) -> torch.Tensor:
    """The inverse of bitsandbytes' `_convert_weight_packed_for_cpu`: each 32-byte group holds, for one pair of
    input columns, 32 output rows × 2 codes (low nibbles first); the scales are (in/blocksize, out) in bf16."""
    out_f, in_f = qs.shape
    packed = data.view(torch.uint8).reshape(-1, _PACK_ROWS)
    codes = torch.cat([packed & 0xF, packed >> 4], dim=-1)  # (tiles·in/2, 64): 32 rows × 2 columns
    codes = codes.reshape(out_f // _PACK_ROWS, in_f // 2, _PACK_ROWS, 2).transpose(1, 2).reshape(out_f, in_f)
    values = qs.code.float()[codes.long()]
    scale = qs.absmax.float().T  # (out, in/blocksize)
    return (values.view(out_f, -1, qs.blocksize) * scale.unsqueeze(-1)).view(out_f, in_f)


def keep_standard_layout(model: nn.Module) -> nn.Module:
    """Switch off bitsandbytes' CPU repacking in every 4-bit layer of `model`: products stay in the compute dtype
    and gradients keep flowing through layers after an evaluation. Already repacked layers stay as they are."""
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


# --- the layer types -----------------------------------------------------------------------------------


@dataclass
class StoredWeight:
    """A quantised weight off its layer (kept for unmerge, or made by `quantize`). An 8-bit layer's state holds its
    codes and row scales after the first forward (`CB`, `SCB`), so they are kept too."""

    weight: torch.Tensor
    CB: torch.Tensor | None = None
    SCB: torch.Tensor | None = None


class _QuantizedLinearType(LayerType):
    """What both bitsandbytes linear layers share: sizes from in/out features, a plain Linear when dequantised."""

    quantized = True

    def features(self, base):
        return base.in_features, base.out_features

    def write_weight(self, base, dense):
        self.restore_weight(base, self.quantize(base, dense))

    def dense_module(self, base: nn.Module, dtype: torch.dtype) -> nn.Linear:
        """A plain Linear holding this layer's dequantised weight (and its bias) in `dtype`."""
        with torch.device("meta"):
            plain = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
        plain.weight = nn.Parameter(self.dense_weight(base).to(dtype), requires_grad=False)
        if base.bias is not None:
            plain.bias = nn.Parameter(base.bias.detach().to(dtype), requires_grad=False)
        return plain


class Linear4bitType(_QuantizedLinearType):
    name = "linear4bit"

    def weight_dtype(self, base):
        # None until bitsandbytes' forward sets it from an fp32/bf16 input; lorakit's fused path needs fp32 then.
        return base.compute_dtype or torch.float32

    def dense_weight(self, base, kept=None):
        return dequantize_4bit(base.weight if kept is None else kept.weight, torch.float32)

    def fused_weight(self, base):
        weight, dtype = base.weight, self.weight_dtype(base)
        return lambda: dequantize_4bit(weight, dtype)

    def keep_weight(self, base):
        return StoredWeight(base.weight)  # merging installs a new Params4bit: this one (data and state) stays untouched

    def restore_weight(self, base, kept):
        base.weight = kept.weight
        base.quant_state = kept.weight.quant_state

    def quantize(self, base, dense: torch.Tensor):
        """A new Params4bit for `dense` with the layer's settings (type, block size, double quantisation, storage)."""
        w = base.weight
        qs = w.quant_state
        dtype = getattr(qs, "original_dtype", qs.dtype) if is_cpu_packed(w) else qs.dtype
        new = bnb.nn.Params4bit(dense.to(dtype), requires_grad=False, blocksize=w.blocksize,
                                compress_statistics=w.compress_statistics, quant_type=w.quant_type,
                                quant_storage=w.quant_storage)
        return StoredWeight(new.to(dense.device))  # moving an unquantised Params4bit to a device quantises it

    def on_wrap(self, base):
        base.support_avx512bf16_for_cpu = False

    def storage(self, base) -> list[torch.Tensor]:
        qs = base.weight.quant_state
        parts = [base.weight.data, qs.absmax, qs.code]
        if getattr(qs, "nested", False):
            parts += [qs.state2.absmax, qs.state2.code, qs.offset]
        return [t for t in parts if isinstance(t, torch.Tensor)]


class Linear8bitType(_QuantizedLinearType):
    name = "linear8bit"
    fusable = False  # LLM.int8 quantises the activations too: its own forward is the product to add LoRA to

    def weight_dtype(self, base):
        return torch.float32  # LLM.int8 returns the input's dtype; adapters train in fp32, as PEFT's do

    def dense_weight(self, base, kept=None):
        kept = self.keep_weight(base) if kept is None else kept
        w = kept.weight
        if w.dtype != torch.int8:  # has_fp16_weights=True: the weight is not quantised
            return w.float()
        scb = w.SCB if getattr(w, "SCB", None) is not None else kept.SCB
        # The same product as bitsandbytes' training-mode forward (MatMul8bitFp), so merged = unmerged there.
        return w.data.float().mul_(scb.float().unsqueeze(1).mul(1.0 / 127.0))

    def keep_weight(self, base):
        return StoredWeight(base.weight, base.state.CB, base.state.SCB)

    def restore_weight(self, base, kept):
        base.weight = kept.weight
        base.state.CB, base.state.SCB = kept.CB, kept.SCB

    def quantize(self, base, dense):
        new = bnb.nn.Int8Params(dense.to(torch.float16), requires_grad=False, has_fp16_weights=False)
        return StoredWeight(new.to(dense.device))

    def storage(self, base):
        kept = self.keep_weight(base)
        scb = kept.weight.SCB if getattr(kept.weight, "SCB", None) is not None else kept.SCB
        return [t for t in (kept.weight.data, scb) if isinstance(t, torch.Tensor)]


LINEAR4BIT, LINEAR8BIT = Linear4bitType(), Linear8bitType()
# Both subclass nn.Linear, so they go before it in layers.LAYER_TYPES.
LAYER_TYPES = [(bnb.nn.Linear4bit, LINEAR4BIT), (bnb.nn.Linear8bitLt, LINEAR8BIT)]
