"""Bytes of stored state: NF4 weights as bitsandbytes lays them out, and optimizer states per optimizer."""

from __future__ import annotations

import math

import torch

NF4_BLOCK = 64  # bitsandbytes' 4-bit block size: one absmax per 64 weights
DQ_BLOCK = 256  # double quantisation: the absmaxes themselves are 8-bit, one fp32 scale per 256 of them
NF4_CODE = 16 * 4  # the 16-entry NF4 code book (fp32), one per layer
DQ_CODE = 256 * 4  # the 8-bit code book of the quantised absmaxes, one per layer
ADAM8_BLOCK = 256  # bitsandbytes' 8-bit optimizers: one fp32 absmax per 256 values of each state
ADAM8_MIN_SIZE = 4096  # bitsandbytes keeps 32-bit states for tensors smaller than this (min_8bit_size)
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


def nf4_bytes(out_features: int, in_features: int, double_quant: bool = True, cpu_packed: bool = False) -> int:
    """Bytes one `Linear4bit` weight really occupies.

    Standard layout: two 4-bit codes per byte, plus one absmax per 64 weights: fp32, or with double
    quantisation 8-bit with an fp32 scale per 256 blocks and an 8-bit code book. `cpu_packed`: the layout
    bitsandbytes 0.50 switches to in place on a CPU with AVX512-BF16 at the first no-grad forward (an
    evaluation pass): same 4-bit codes, but the absmaxes are de-quantised to bf16 and double
    quantisation is dropped, so the layer grows from ~0.516 to ~0.531 bytes per weight.
    """
    n = out_features * in_features
    blocks = math.ceil(n / NF4_BLOCK)
    codes = math.ceil(n / 2)
    if cpu_packed:
        return codes + 2 * blocks + NF4_CODE
    if double_quant:
        return codes + blocks + 4 * math.ceil(blocks / DQ_BLOCK) + 4 + DQ_CODE + NF4_CODE  # + the fp32 offset
    return codes + 4 * blocks + NF4_CODE


def optimizer_bytes(sizes: list[int], param_bytes: int, optim: str) -> int:
    """Optimizer state for trainable tensors of these element counts.

    AdamW (torch) keeps two moments in the parameter's dtype. bitsandbytes' 8-bit AdamW keeps two
    uint8 moments plus an fp32 absmax per 256 values, but two fp32 moments for tensors under 4096
    elements; the paged variant has the same bytes, which CUDA may page out to CPU memory under pressure.
    """
    if optim not in OPTIMIZERS:
        raise ValueError(f"optim must be one of {OPTIMIZERS}, got {optim!r}")
    if optim == "adamw":
        return 2 * param_bytes * sum(sizes)
    total = 0
    for n in sizes:
        total += 8 * n if n < ADAM8_MIN_SIZE else 2 * (n + 4 * math.ceil(n / ADAM8_BLOCK))
    return total


def optimizer_step_temporaries(sizes: list[int], param_bytes: int, optim: str, device: str) -> int:
    """Scratch memory of `optimizer.step()`.

    torch's AdamW on CPU updates one tensor at a time and allocates two tensor-sized temporaries for
    the denominator (`exp_avg_sq.sqrt()`, then its division); on CUDA it runs the `foreach` kernels,
    whose `sqrt` makes one temporary for all trainable tensors at once. bitsandbytes updates in place.
    """
    if optim != "adamw" or not sizes:
        return 0
    if device == "cpu":
        return 2 * param_bytes * max(sizes)
    return param_bytes * sum(sizes)
