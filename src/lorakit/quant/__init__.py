"""Quantised bases for QLoRA: bitsandbytes' 4-bit and 8-bit linear layers as LoRA base layers (bnb.py), turning a
quantised model back into a plain one, what its weights take, and LoftQ initialisation (loftq.py). Loading a base
quantised is `hf.load_base_model(path, quantize=...)`.

Importing this package does not import bitsandbytes (it takes seconds): the layer types in bnb.py are added to
`layers.LAYER_TYPES` once bitsandbytes has been imported, which any model holding its layers has done.
"""

from __future__ import annotations

import importlib
import logging
import math

import torch
from torch import nn

from ..errors import MissingDependencyError
from ..layers import OPTIONAL_LAYER_TYPES, LoraLayer, layer_type

QUANTIZE_MODES = ("nf4", "int8")
INSTALL_COMMAND = "pip install 'bitsandbytes>=0.45'"

OPTIONAL_LAYER_TYPES.append(("bitsandbytes", lambda: importlib.import_module(f"{__name__}.bnb").LAYER_TYPES))


def require_bitsandbytes(what: str = "quantising a base model"):
    """The bitsandbytes module, or an error that says how to install it."""
    # On import, bitsandbytes warns that an optional bf16 CPU inference kernel (package `kernels`) is missing; that
    # kernel serves the repacked layout lorakit switches off (quant/bnb.py), so the warning would only mislead.
    cpu_ops = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = cpu_ops.level
    cpu_ops.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except ImportError as e:
        raise MissingDependencyError(f"{what} needs bitsandbytes, which is not installed ({e}); install it with: "
                                     f"{INSTALL_COMMAND}") from None
    finally:
        cpu_ops.setLevel(level)
    return bitsandbytes


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every quantised layer, the bases inside LoRA layers included (named `<layer>.base_layer`)."""
    found = []
    for name, module in model.named_modules():
        ltype = layer_type(module)
        if ltype is not None and ltype.quantized:
            found.append((name, module))
    return found


def is_quantized(model: nn.Module) -> bool:
    return bool(quantized_layers(model))


def compute_dtype(model: nn.Module) -> torch.dtype:
    """What a quantised model computes in: its 4-bit layers' compute dtype, else its floating-point parameters' dtype."""
    for _, module in quantized_layers(model):
        if type(module.weight).__name__ == "Params4bit":
            return layer_type(module).weight_dtype(module)
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def logical_numel(p: torch.Tensor) -> int:
    """How many weights a parameter stands for: a 4-bit one packs several into each stored element (either layout)."""
    quant_state = getattr(p, "quant_state", None)
    if type(p).__name__ == "Params4bit" and quant_state is not None:
        return math.prod(quant_state.shape)
    return p.numel()


def storage_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes the quantised layers' weights and quantisation state take, weights they stand for), each tensor once."""
    seen: set[tuple[int, int]] = set()
    nbytes = params = 0
    for _, module in quantized_layers(model):
        ltype = layer_type(module)
        in_f, out_f = ltype.features(module)
        params += in_f * out_f
        for t in ltype.storage(module):
            key = (t.untyped_storage().data_ptr(), t.storage_offset())
            if key not in seen:
                seen.add(key)
                nbytes += t.numel() * t.element_size()
    return nbytes, params


@torch.no_grad()
def dequantize(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every quantised layer by a plain `nn.Linear` holding its dequantised weight (in `dtype`, default fp32),
    in place; LoRA layers keep their adapters over the plain base. Both 4-bit layouts are read correctly (transformers'
    `model.dequantize()` misreads bitsandbytes' CPU-repacked one). The model forgets its quantisation config."""
    for name, module in quantized_layers(model):
        plain = layer_type(module).dense_module(module, dtype or torch.float32)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, plain)
        if isinstance(parent, LoraLayer):
            parent.type = layer_type(plain)
            parent.row_stack = None
    forget_quantization(model)
    return model


def forget_quantization(model: nn.Module) -> None:
    """Drop what transformers records about a model's quantisation, so `save_pretrained` writes a plain model."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    elif hasattr(getattr(model, "config", None), "quantization_config"):
        del model.config.quantization_config
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        if getattr(model, flag, False):
            setattr(model, flag, False)
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
