"""Rewrite an adapter directory in another method's form with the same outputs: AdaLoRA → plain LoRA, and PiSSA/OLoRA
saved for their residual base → plain LoRA for the untouched base, which every LoRA server (lorakit's, vLLM, PEFT's
mixed batches) runs. Both are registered as `lorakit check --fix` conversions."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from .check import Conversion, register_conversion
from .errors import AdapterFileError, ConfigError, ShapeMismatchError
from .files import atomic_write, atomic_write_json
from .hf import load_base_model, resolve_base
from .io import (
    CONFIG_NAME,
    PREFIX,
    WEIGHTS_NAME,
    load_adapter,
    read_adapter_config,
    read_adapter_tensors,
    save_adapter,
    split_factor_key,
)
from .variants.adalora import TRIPLET, lora_form
from .variants.pissa import is_residual_init


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


def pissa_to_lora(path: str | os.PathLike, base: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the PiSSA or OLoRA adapter at `path`, saved for its residual base (init_lora_weights "pissa" or "olora":
    PEFT's files, lorakit's checkpoints), as a plain LoRA adapter for the untouched `base` with equal outputs.

    The file holds the trained A and B only; the starting factors A0, B0 (the part of W0 the base gave up) are
    recomputed from `base`, the model it was trained on, exactly as loading the file does. The copy is what
    `save_adapter` writes for such an adapter: ΔW = s·(B·A − B0·A0) = s·[B | −B0]·[A ; A0], rank 2r at the
    same scale (PEFT's conversion). A randomised-SVD init ("pissa_niter_N") cannot be recomputed and is refused.
    Returns `out`.
    """
    path = Path(path)
    config = read_adapter_config(path)
    init = getattr(config, "init", "")
    if config.method != "lora" or not is_residual_init(init):
        raise AdapterFileError(f"{path} is not a PiSSA/OLoRA adapter saved for its residual base (method "
                               f"{config.method!r}, init_lora_weights {init!r}); only those convert this way")
    if init.startswith("pissa_niter_"):
        raise AdapterFileError(
            f"{path} is a PiSSA adapter initialised by a randomised SVD ({init}); the principal part it took out of "
            "the base cannot be recomputed exactly (another random draw gives other factors), so it cannot be written "
            "as a plain LoRA. Save the trained model again with lorakit.save_adapter (its default form is plain LoRA)")
    # fp32 as in training's factorisation; only the factors are written, so the base's own dtype does not matter.
    model = load_base_model(resolve_base(base), config.task_type or "CAUSAL_LM", dtype=torch.float32)
    load_adapter(model, path)  # re-initialises A0, B0 from the base's weights, then copies A and B in
    return save_adapter(model, out)


def to_lora(path: str | os.PathLike, out: str | os.PathLike, base: str | os.PathLike | None = None) -> Path:
    """`lorakit convert --to lora`: AdaLoRA → LoRA, or PiSSA/OLoRA → plain LoRA (which needs `base`)."""
    config = read_adapter_config(path)
    if config.method == "lora" and is_residual_init(getattr(config, "init", "")):
        if base is None:
            raise ConfigError(f"{path} is a {config.init} adapter: converting it recomputes what it took out of its "
                              "base, so pass --base DIR (the model it was trained on)")
        return pissa_to_lora(path, base, out)
    if config.method != "adalora":
        raise AdapterFileError(f"{path} holds a {config.method} adapter (init {getattr(config, 'init', None)!r}): "
                               "only AdaLoRA adapters and PiSSA/OLoRA ones saved for their residual base convert to LoRA")
    return adalora_to_lora(path, out)


register_conversion(Conversion(
    "adalora-to-lora", "AdaLoRA's kept triplets as plain LoRA factors, each layer at its own rank, scale 1",
    lambda adapter, out, engine: adalora_to_lora(adapter.path, out)))
register_conversion(Conversion(
    "pissa-to-lora", "PiSSA/OLoRA as the plain LoRA for the untouched base (rank 2r, A0 and B0 recomputed from it)",
    lambda adapter, out, engine, base: pissa_to_lora(adapter.path, base, out), needs_base=True))
