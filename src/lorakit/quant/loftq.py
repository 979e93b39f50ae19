"""LoftQ (Li et al., 2023): start each adapter where it cancels part of its layer's quantisation error.

With W0 the original weight, Q the quantised base and s the adapter's scale, A and B (rank r) are chosen so that
Q + s·B·A ≈ W0: s·B·A is the best rank-r approximation of W0 − Q (an SVD, split evenly between B and A). With
loftq_iter = N > 1 the two steps alternate: the base becomes Q(W0 − s·B·A), then B·A is refitted to what remains.

One iteration leaves the base exactly as loaded, so the adapter is an ordinary one for the ordinary quantised base
(this is PEFT's `replace_lora_weights_loftq`); more iterations change the base's weights, which then belong with
the adapter. PEFT's own `loftq_init` ignores the scale (its B·A is the SVD itself); here the scale is divided out,
so any alpha works. W0 is read from the base model's safetensors files, one layer at a time.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..errors import ConfigError, ShapeMismatchError
from ..layers import layer_type


@torch.no_grad()
def loftq_factors(W0: torch.Tensor, Q: torch.Tensor, quantize, rank: int, scale: float, iters: int = 1):
    """(A, B, new stored base weight or None) for original weight W0 and dequantised base Q, both (out, in) fp32.

    `quantize(W)` returns (stored weight, its dequantised value); it is called only when iters > 1."""
    stored = None
    for i in range(iters):
        L, R = _low_rank(W0 - Q, rank)
        if i + 1 == iters:
            break
        stored, Q = quantize(W0 - L @ R)
    root = math.sqrt(scale)
    return R / root, L / root, stored


def _low_rank(residual: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, R) with L @ R the best rank-`rank` approximation of `residual`, singular values split as √S each side."""
    U, S, Vh = torch.linalg.svd(residual, full_matrices=False)
    root = S[:rank].sqrt()
    return U[:, :rank] * root, root[:, None] * Vh[:rank]


@torch.no_grad()
def loftq_initialise(model: nn.Module, targets: list[tuple[str, nn.Module, nn.Module]], config) -> None:
    """Set each (layer name, base layer, adapter)'s A and B by LoftQ, and with loftq_iter > 1 re-quantise its base.

    Everything is computed before anything is written, so a refusal leaves the model as it was."""
    originals = OriginalWeights(model)
    results = []
    for name, base, adapter in targets:
        ltype = layer_type(base)
        if not ltype.quantized:
            raise ConfigError(f"init='loftq' fits adapters to a quantised base's rounding error, but {name!r} is a plain "
                              f"{type(base).__name__}; load the base with lorakit.load_base_model(path, quantize='nf4')")
        if not hasattr(adapter, "lora_A"):
            raise ConfigError(f"init='loftq' initialises plain LoRA factors; method {adapter.method!r} has none")
        in_f, out_f = ltype.features(base)
        W0 = originals.get(name, (out_f, in_f)).to(adapter.lora_A.device, torch.float32)

        def quantize(w, base=base, ltype=ltype):
            stored = ltype.quantize(base, w)
            return stored, ltype.dense_weight(base, stored)

        results.append((base, ltype, adapter, *loftq_factors(W0, ltype.dense_weight(base), quantize, adapter.rank,
                                                                adapter.scale, config.loftq_iter)))
    for base, ltype, adapter, A, B, stored in results:
        adapter.lora_A.copy_(A)
        adapter.lora_B.copy_(B)
        if stored is not None:
            ltype.restore_weight(base, stored)


class OriginalWeights:
    """The unquantised weights of a transformers model, read tensor by tensor from its directory's safetensors."""

    def __init__(self, model: nn.Module):
        self.prefix = getattr(model, "base_model_prefix", "") or ""
        path = Path(str(getattr(model, "name_or_path", "") or ""))
        index = path / "model.safetensors.index.json"
        if index.is_file():
            self.files = {k: path / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        elif (path / "model.safetensors").is_file():
            with safe_open(str(path / "model.safetensors"), framework="pt") as f:
                self.files = {k: path / "model.safetensors" for k in f.keys()}
        else:
            raise ConfigError(
                f"init='loftq' needs the base's original (unquantised) weights, read from its directory, but the model's "
                f"name_or_path {str(path)!r} holds no model.safetensors; load the base from a local directory of "
                "safetensors weights, e.g. with lorakit.load_base_model(path, quantize='nf4')")

    def get(self, module: str, shape: tuple[int, int]) -> torch.Tensor:
        p = self.prefix
        keys = [f"{module}.weight", f"{module[len(p) + 1:]}.weight" if module.startswith(p + ".") else f"{p}.{module}.weight"]
        key = next((k for k in keys if k in self.files), None)
        if key is None:
            raise ConfigError(f"init='loftq': the base's weight files have no {keys[0]!r}; they do not match this model")
        with safe_open(str(self.files[key]), framework="pt") as f:
            tensor = f.get_tensor(key)
        if tuple(tensor.shape) != tuple(shape):
            raise ShapeMismatchError(f"init='loftq': {key} in {self.files[key]} has shape {tuple(tensor.shape)}, but "
                                     f"{module!r} is {tuple(shape)}; the files are not this model's")
        return tensor
