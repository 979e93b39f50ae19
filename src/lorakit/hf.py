"""Load Hugging Face base models from a local directory, with the right head for the adapter's task."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .errors import AdapterFileError

_TASK_TO_AUTO = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
}


def load_base_model(path: str | os.PathLike, task_type: str | None = "CAUSAL_LM", dtype: torch.dtype | str | None = None,
                    **kwargs) -> nn.Module:
    """`from_pretrained` on a local model directory (never the hub), picking the Auto class by task type."""
    import transformers

    path = Path(path)
    if not (path / "config.json").exists():
        raise AdapterFileError(f"{path} is not a model directory (no config.json); pass the base model's local directory")
    auto = getattr(transformers, _TASK_TO_AUTO.get(task_type or "", "AutoModel"))
    if isinstance(dtype, str):
        dtype = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
                 "fp16": torch.float16, "float16": torch.float16}[dtype]
    if dtype is not None:
        kwargs["dtype"] = dtype
    return auto.from_pretrained(str(path), local_files_only=True, **kwargs)


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
