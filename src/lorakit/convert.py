"""Rewrite an adapter directory in another method's form with the same outputs: today AdaLoRA → plain LoRA,
which every LoRA server (lorakit's, vLLM, PEFT's mixed batches) runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from .errors import AdapterFileError, ConfigError, ShapeMismatchError
from .files import atomic_write, atomic_write_json
from .io import CONFIG_NAME, PREFIX, WEIGHTS_NAME, read_adapter_config, read_adapter_tensors, split_factor_key
from .variants.adalora import TRIPLET, lora_form


def adalora_to_lora(path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the AdaLoRA adapter at `path` as a plain LoRA adapter at `out` (PEFT's LORA format) with equal outputs.

    Each layer keeps its own rank (`rank_pattern`), the scale is folded into B, and layers pruned to rank 0 are
    dropped. Biases and saved modules are copied as they are. Returns `out`.
    """
    path, out = Path(path), Path(out)
    config = read_adapter_config(path)
    if config.method != "adalora":
        raise AdapterFileError(f"{path} holds a {config.method} adapter; only AdaLoRA adapters convert to LoRA")
    layers: dict[str, dict[str, torch.Tensor]] = {}
    others: dict[str, torch.Tensor] = {}
    for key, value in read_adapter_tensors(path).items():
        factor = split_factor_key(key)
        if factor is None:
            others[key] = value
        else:
            layers.setdefault(factor[0], {})[factor[1]] = value
    for module, parts in layers.items():
        _check_layer(path, module, parts, config.rank_for(module))
    try:
        lora, converted = lora_form(config, layers)
    except ConfigError as e:
        raise AdapterFileError(f"{path}: {e}") from None
    tensors = {f"{PREFIX}{k}": v for k, v in others.items()}
    for module, parts in converted.items():
        tensors.update({f"{PREFIX}{module}.{name}": t for name, t in parts.items()})
    peft = lora.to_peft_dict()
    # GPT-2's Conv1D layers: the flag is not part of lorakit's config, so it is carried over from the source file.
    peft["fan_in_fan_out"] = bool(json.loads((path / CONFIG_NAME).read_text(encoding="utf-8")).get("fan_in_fan_out"))
    out.mkdir(parents=True, exist_ok=True)
    # Weights first, config last: a directory with a config always has the weights that go with it.
    atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write_json(out / CONFIG_NAME, peft)
    return out


def _check_layer(path: Path, module: str, parts: dict[str, torch.Tensor], rank: int) -> None:
    missing = [n for n in TRIPLET if n not in parts]
    if missing:
        raise AdapterFileError(f"{path / WEIGHTS_NAME} has no {', '.join(missing)} for {module!r}; the file is incomplete")
    A, E, B = (parts[n] for n in ("lora_A", "lora_E", "lora_B"))
    if not (A.dim() == 2 and B.dim() == 2 and tuple(E.shape) == (A.shape[0], 1) and B.shape[1] == A.shape[0] == rank):
        raise ShapeMismatchError(
            f"{path / WEIGHTS_NAME}: {module!r} has lora_A {tuple(A.shape)}, lora_E {tuple(E.shape)}, lora_B "
            f"{tuple(B.shape)}, but its config gives it rank {rank} (A: (r, in), E: (r, 1), B: (out, r)); "
            "the config and the weights disagree"
        )
