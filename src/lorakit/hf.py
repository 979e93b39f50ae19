"""Load Hugging Face base models from a local directory, with the right head for the adapter's task."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from .errors import AdapterFileError, ConfigError

_TASK_TO_AUTO = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
}


def load_base_model(path: str | os.PathLike, task_type: str | None = "CAUSAL_LM", dtype: torch.dtype | str | None = None,
                    quantize: str | None = None, compute_dtype: torch.dtype | str | None = None,
                    double_quant: bool = True, **kwargs) -> nn.Module:
    """`from_pretrained` on a local model directory (never the hub), picking the Auto class by task type.

    `quantize="nf4"` loads the linear layers as bitsandbytes 4-bit NF4 (QLoRA; double quantisation unless
    `double_quant=False`; products in `compute_dtype`, default `dtype` or fp32), `"int8"` as LLM.int8. A directory
    that is already quantised loads as it is, with a warning, never quantised twice.
    """
    import transformers

    path = Path(path)
    if not (path / "config.json").exists():
        raise AdapterFileError(f"{path} is not a model directory (no config.json); pass the base model's local directory")
    auto = getattr(transformers, _TASK_TO_AUTO.get(task_type or "", "AutoModel"))
    dtype, compute_dtype = _dtype(dtype), _dtype(compute_dtype)
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


def _dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    if not isinstance(value, str):
        return value
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if value not in names:
        raise ConfigError(f"dtype {value!r} is not one of {sorted(names)}")
    return names[value]


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

    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def has_tokenizer(path: str | os.PathLike) -> bool:
    path = Path(path)
    return any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model"))
